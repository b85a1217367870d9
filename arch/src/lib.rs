//! x86-64 architecture support for molt.
//!
//! Everything needed to put a freshly created KVM VM into the state a kernel expects at its
//! entry point: the guest physical memory map ([`layout`]), identity page tables
//! ([`paging`]), the GDT ([`gdt`]), Linux's zero page and e820 map ([`zeropage`]), the PVH
//! start info ([`pvh`]), the MP table ([`mptable`]), CPUID ([`cpuid`]) and CPU templates
//! ([`cpu_template`]), initial vCPU registers and MSRs ([`regs`]), and kernel/initrd loading
//! ([`loader`]). [`pvm`] detects the native-execution control of PVM hosts.
//!
//! This crate knows no devices.

pub mod blob;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod pvh;
pub mod pvm;
pub mod regs;
pub mod vcpu_state;
pub mod vm_state;
pub mod zeropage;

/// Guest memory type used throughout molt: regions mapped from memfds.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
