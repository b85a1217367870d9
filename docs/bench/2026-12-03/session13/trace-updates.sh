#!/bin/bash
# Traces a molt guest (a built-in virtio-blk disk, the disk-record workload) through N updates
# and prints what first-entry.py finds at each resume.
# Usage: trace-updates.sh exec|transfer|control N [MOLT]   (root; perf; MOLT defaults to
# target/release/molt of this checkout). The control pauses and resumes instead of updating.
# MEMORY=size=256M,hugepages=on picks the guest RAM (raise /proc/sys/vm/nr_hugepages to 128 or
# more first); KEEP=1 keeps the trace directory.
set -eu
mode=$1 n=$2
here=$(cd "$(dirname "$0")" && pwd)
molt=${3:-$here/../../../../target/release/molt}
dir=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
truncate -s 64M "$dir/disk.img"
"$molt" --api-socket "$dir/api" --serial "file=$dir/serial.txt" --disk "path=$dir/disk.img" \
    --memory "${MEMORY:-size=256M}" --cmdline "molt.memtest=0 molt.blk=on" >/dev/null 2>"$dir/molt.err" &
sleep 2
perf record -q -o "$dir/perf.data" -e 'kvmmmu:*' -e 'kvm:*' -e sched:sched_switch -a \
    -- sleep $((n / 2 + 2)) 2>/dev/null &
recorder=$!
sleep 0.5
for i in $(seq "$n"); do
    case $mode in
    exec) "$molt" ctl --api-socket "$dir/api" cpr-exec >/dev/null ;;
    transfer)
        "$molt" --incoming "$dir/in$i" >/dev/null 2>>"$dir/molt.err" &
        sleep 0.3
        "$molt" ctl --api-socket "$dir/api" cpr-transfer --socket "$dir/in$i" >/dev/null ;;
    control)
        "$molt" ctl --api-socket "$dir/api" pause >/dev/null
        "$molt" ctl --api-socket "$dir/api" resume >/dev/null ;;
    esac
    sleep 0.2
done
wait $recorder
"$molt" ctl --api-socket "$dir/api" shutdown >/dev/null
wait
perf script -i "$dir/perf.data" 2>/dev/null >"$dir/trace.txt"
python3 "$here/first-entry.py" "$dir/trace.txt"
[ -z "${KEEP:-}" ] || echo "trace kept in $dir"
