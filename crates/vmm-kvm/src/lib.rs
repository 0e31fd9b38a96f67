//! Real vCPUs on KVM whose every memory access is translated by our tables.
//!
//! # What this crate owns
//!
//! The KVM backend of the VM layer (`vmm`): a KVM VM ([`vm::KvmVm`]) whose
//! memory slots hold a VM's RAM (a memfd reservoir whose frame numbers are
//! KVM guest-physical pages), its table pages ([`slot_pages::SlotPages`], a
//! `nested_pt::TablePages` provider inside a slot) and each device-memory
//! segment (one slot per segment, added and deleted through
//! `vmm::devmem::MemoryExposure`); vCPUs ([`vcpu::Vcpu`], implementing
//! `vmm::hv::Vcpu`) in 64-bit long mode with CR3 = the vmspace root in NPT
//! format (the x86-64 long-mode format), so guest-linear addresses *are*
//! vmspace guest-physical addresses and the vCPU's page walk is the nested
//! walk; and the invalidation that makes table changes visible to KVM on
//! both kinds of host ([`space::SpaceBackend`], which builds a `vmm::Vm`
//! on these slots and implements `vmm::hv::MemBackend`). The workload runs
//! at CPL 3: nested walks are user accesses, as NPT hardware treats them.
//!
//! [`host::KvmHost`] is KVM as a `vmm::host::Host`: it creates a fresh
//! KVM VM and a `SpaceBackend` for each VM's memory, and KVM vCPUs on it.
//!
//! What runs a VM is above the backend interface, in `vmm`: the machine
//! (vCPU threads, exit loop, nested faults, MMIO emulation, harvest
//! points), the guest code, runtime layout and workloads, the devices, and
//! the programs `vmm::run` (`vmm run`) and `vmm::watch` with `vmm::inspect`,
//! written against `vmm::host::Host`. [`run`] and [`watch`] here are those
//! programs on a [`host::KvmHost`] (thin wrappers kept for callers and the
//! CLI). What stays here besides the backend are the tools that are about
//! KVM itself: [`oracle`] (real accesses against
//! `nested_pt::mmu::translate`), [`differential`] (the emulator against
//! the CPU), [`detect`] (how KVM translates on this host),
//! [`bench`](mod@bench) (KVM exit and fault costs), and live migration:
//! [`vcpu_state`] (the complete KVM vCPU state, taken through a twin
//! descriptor while the vCPU's thread is parked) and [`migrate`] (a
//! running guest moved between two VMs by `vmm::migration`'s engine; it
//! drives its own workload loop, not `vmm::run`, and runs without the
//! framebuffer: device models are not migrated).
//!
//! A page fault in the workload is our *nested page fault*: a
//! three-instruction CPL 0 stub exits with `out`, the host reads CR2 and RSP
//! from `KVM_CAP_SYNC_REGS` and the error code from the stub's stack, runs
//! the vmspace fault path ([`backend::VcpuMem::fault`], with fault-around),
//! and the guest retries the instruction. An access outside every mapping is
//! reported as a guest error. The workload reports to the host by reading a
//! *doorbell*, an address that is never mapped, which takes the same path
//! (I/O and `int n` are unavailable at CPL 3 on our hosts).
//!
//! [`machine::Machine`] runs one thread per vCPU. Each has its own vmspace
//! client: `table_enter`/`table_exit` bracket every `KVM_RUN`, and the
//! client's kick hook ([`vcpu::KickHandle`]) sets `immediate_exit` and
//! signals the thread, so the vmspace's invalidation waits until the vCPU is
//! out. [`run`] drives the built-in workloads ([`workload`]) with harvest
//! rounds; [`watch`] remaps and unmaps under running vCPUs; [`oracle`]
//! compares real accesses with `nested_pt::mmu::translate`; [`detect`]
//! finds out how KVM translates on this host; [`bench`](mod@bench) measures.
//!
//! # Invalidation, on both kinds of host
//!
//! [`detect::detect`] probes at start-up (an unannounced leaf change, then a
//! CR3 reload) and reports [`PagingMode`]:
//!
//! - **Hardware nested paging** (EPT/NPT under KVM): our tables are cached
//!   in the vCPU's TLB. When the generation read at `table_enter` differs
//!   from the last one the vCPU flushed for, the host injects vector 0x40
//!   before resuming, whose stub reloads CR3 (no global pages, no PCID).
//! - **Shadow paging** (our machines: `kvm_pvm`, no EPT/NPT offered): KVM
//!   does not see host writes to guest page tables, and INVLPG, CR3 reloads
//!   and `KVM_SET_SREGS` do not help. Changes that only add access are seen
//!   at once. For an unmap, the vmspace's invalidation callback (on a client
//!   the backend keeps, so it runs even when no vCPU thread exists) drops
//!   the old frames' KVM view with `MADV_DONTNEED` (KVM's MMU notifier zaps
//!   their shadow entries; ~6-8 µs per frame), and, when table pages were
//!   freed (a non-leaf change), zaps every shadow page by creating and
//!   deleting a one-page memory slot. Freed table pages are quarantined
//!   until a zap has happened, so a page is never reused as a table while a
//!   shadow page built from it may survive.
//!
//! Dirty harvest is exact on both: [`run`] pauses every vCPU at a harvest
//! point (a cooperative stop at an operation boundary, so the guest's
//! ledger and the dirty bits describe the same writes), reads and clears the
//! dirty bits, makes the cleared bits effective (frame drops, or one zap
//! when many pages were dirty; see [`space::DEFAULT_ZAP_THRESHOLD`]) and
//! only then resumes. A harvest made while vCPUs run (a plain
//! `VmSpace::track_dirty`) has the window every NPT/EPT hypervisor has
//! between clearing a D bit and the vCPU's flush; on a shadow host the
//! callback zaps every shadow page after it.
//!
//! # Invariants and concurrency
//!
//! - Guest memory is touched through raw pointers and atomics only; no
//!   Rust reference to guest bytes exists.
//! - The runtime is resident before any vCPU runs (a fault while delivering
//!   a fault would be a triple fault).
//! - A vCPU thread owns its `Vcpu` and its client; other threads reach it
//!   only through its kick handle and the parameter block.
//! - The backend outlives the vCPUs that use it (the machine holds both).
//!
//! # Known gaps
//!
//! - The hardware-nested path (CR3 reload on generation change) could only
//!   be exercised here with `force_flush` on a shadow host, which proves the
//!   stub and the injection, not the coherence on EPT/NPT hardware.
//! - vmspace maps 4 KiB pages only, so the 2 MiB (and 1 GiB) oracle
//!   layouts use a bare `nested_pt` table ([`backend::TableBackend`]). The
//!   1 GiB case runs only where KVM offers 1 GiB pages; ours does not.
//! - MMIO is trapped as a nested fault on an address no mapping serves
//!   (never as a KVM MMIO exit): device ranges must not be vmspace
//!   mappings without RAM behind them.
//! - Upper-level accessed bits on a faulting walk are not compared with the
//!   model (KVM sets none; the model, like QEMU, may set some).
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod detect;
pub mod differential;
pub mod host;
pub mod interrupts;
pub mod large;
pub mod machine;
pub mod mem;
pub mod migrate;
pub mod oracle;
pub mod run;
pub mod slot_pages;
pub mod space;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod watch;

// The guest side (code, runtime layout, workloads) lives in the VM layer.
pub use vmm::{guest, inspect, runtime, workload};

pub use vm::{KvmError, KvmVm, PagingMode, Result, kvm_available};
