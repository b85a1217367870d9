#!/usr/bin/env python3
"""Reads `perf script` output of kvm:*, kvmmmu:* and sched:sched_switch events, taken while a
molt guest went through updates (or pauses), and prints one line for every KVM_RUN entry that
resumes the guest after a pause (in a new VM after an update): how long KVM took until it
created the first shadow page (the root for the guest's CR3), until the guest's first page
fault (or first emulated instruction), until its first exit to userspace; whether the vCPU
thread was switched out before that fault, and for which task; and how many shadow page faults
(kvm_mmu_spte_requested) the vCPU took in the next 20 ms."""
import sys

events = []
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 5:
        continue
    try:
        t = float(parts[3].rstrip(":"))
    except ValueError:
        continue
    events.append((t, parts[0], parts[1], parts[4].rstrip(":"), line))
events.sort(key=lambda e: e[0])
vcpu = [e for e in events if e[1].startswith("vcpu")]

# A resume is a KVM_RUN entry after an exit that ran no guest code to its end (a kick, INTR,
# or an entry with immediate_exit set, UNKNOWN: a new vCPU's first entry or a pause), or after
# 0.3 ms or more out of KVM (a vCPU paused while it handled an I/O exit; in steady state it is
# back in ~30 µs).
last_exit = {}
entries = []
for t, comm, tid, name, line in vcpu:
    if name == "kvm:kvm_userspace_exit":
        last_exit[tid] = (t, line)
    elif name == "kvm:kvm_fpu" and " load" in line and tid in last_exit:
        out_at, why = last_exit[tid]
        if "KVM_EXIT_UNKNOWN" in why or "KVM_EXIT_INTR" in why or t - out_at >= 0.0003:
            entries.append((t, tid))
            last_exit[tid] = (t, "")


def first(pred, start, end):
    return next((e[0] for e in vcpu if start <= e[0] < end and pred(e)), None)


for t0, tid in entries:
    out = first(lambda e: e[2] == tid and e[3] == "kvm:kvm_userspace_exit", t0, t0 + 1)
    if out is None or out - t0 < 10e-6:
        continue  # an entry with immediate_exit set: no guest code ran
    root = first(lambda e: e[2] == tid and e[3] == "kvmmmu:kvm_mmu_get_page" and "created=1" in e[4], t0, out)
    walk = first(lambda e: e[2] == tid and e[3] == "kvmmmu:kvm_mmu_pagetable_walk", t0, out)
    until = walk if walk is not None else out
    switched = [e[4].split("next_comm=")[1].split()[0] + ":" + e[4].split("next_pid=")[1].split()[0] for e in events
                if t0 <= e[0] < until and e[3] == "sched:sched_switch" and f"prev_pid={tid} " in e[4]]
    faults = sum(1 for e in vcpu if e[2] == tid and t0 <= e[0] < t0 + 0.02
                 and e[3] == "kvmmmu:kvm_mmu_spte_requested")
    us = lambda a, b: "%5.0f" % ((b - a) * 1e6) if a is not None and b is not None else "    -"
    print(f"entry->root {us(t0, root)} us"
          f"  root->first fault {us(root, walk)} us  entry->first fault {us(t0, walk)} us  entry->first exit {us(t0, out)} us"
          f"  {'ran alone' if not switched else 'switched out for ' + ','.join(switched)}  shadow faults in 20 ms: {faults}")
