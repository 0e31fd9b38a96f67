//! The VM layer on `vmspace` (DESIGN.md §2 and §8): memory segments,
//! named device memory, the hypervisor interface and the machine that runs
//! vCPUs through it, MMIO instruction emulation, PCI and the platform's
//! devices, interrupt device models, live migration, and the control
//! endpoint of a running VM.
//!
//! # What this crate owns
//!
//! - **Memory** ([`Vm`]): one guest's memory as bhyve's `vmm.c` presents
//!   it: a `vmspace::VmSpace` plus *memory segments*. A segment is allocated
//!   under an id with a length and a kind — system memory (guest RAM from
//!   the VM's reservoir in 4 KiB chunks) or device memory with a name (the
//!   boot ROM, a framebuffer) — and ranges of it are mapped at
//!   guest-physical addresses with a protection, possibly at several
//!   addresses at once (aliases). System memory may be *swappable*
//!   ([`Vm::alloc_swappable_segment`]: larger than the reservoir, cold
//!   pages in a swap file; `vmm run --reservoir`). Each device-memory segment has a host
//!   node ([`devmem`]): a file under the user's runtime directory that any
//!   process of the same user maps by name, independently of where the
//!   guest maps it, so a viewer keeps its mapping while the guest moves a
//!   BAR. Beside the nodes, the [`control`] socket lets other processes
//!   reach a running VM by name (`vmm inspect NAME`, `vmm screenshot NAME`).
//! - **The hypervisor interface** ([`hv`]): what the layer needs from a
//!   backend — vCPUs that run until an exit, their registers, a kick — and
//!   from the memory system ([`hv::MemBackend`], [`hv::VcpuMem`]). The crate
//!   knows nothing of KVM: `vmm-kvm` implements these traits (and
//!   [`devmem::MemoryExposure`], which puts device memory into memory
//!   slots); a bare-metal hypervisor or another host API would implement the
//!   same and reuse everything here.
//! - **The machine** ([`machine`]): one thread per vCPU, the exit loop,
//!   nested faults served by vmspace, harvest points, kicks, CPU pinning;
//!   a fault on an address a device claims goes to **MMIO emulation**
//!   ([`emul`], decoding with iced-x86): the instruction's bytes are fetched
//!   through page holds up to the page end (then the next page), executed
//!   against the device and RAM (RAM through holds, so emulator writes are
//!   dirty-tracked), and the registers, flags and RIP are updated.
//! - **The host interface and the programs on it** ([`host`], [`run`],
//!   [`watch`], [`inspect`]): a [`host::Host`] creates a VM's memory (a
//!   [`Vm`] whose tables, RAM and device memory its vCPUs can translate
//!   through) and vCPUs in long mode on it; [`run`] (`vmm run`: the
//!   built-in workloads with ledgers, harvest rounds, the PCI framebuffer
//!   with BAR moves, the replay check, the control endpoint) and [`watch`]
//!   (remaps under running vCPUs) are written once against it, and
//!   [`inspect`] dumps a vmspace's mappings and tables. The KVM backend
//!   is one `Host` (`vmm_kvm::host::KvmHost`); another backend implements
//!   the same three methods and runs all of it unchanged.
//! - **Guest side** ([`guest`], [`runtime`], [`workload`]): the
//!   position-independent guest code, the runtime's layout (boot ROM below
//!   4 GiB, per-vCPU data), the built-in workloads and their host replay.
//! - **Devices**: PCI behind ECAM ([`pci`]), a bhyve-style framebuffer with
//!   a segment-backed 64-bit BAR ([`fbuf`]), the platform that applies BAR
//!   moves to the VM and answers master aborts ([`platform`]); the
//!   passthrough model ([`passthru`]: wired memory, an IOMMU domain
//!   mirroring system memory only for passthrough guests or when forced,
//!   BARs with the MSI-X table hole and its emulation); vLAPIC,
//!   vIOAPIC, vHPET and MSI decoding ([`intr`]).
//! - **Live migration** ([`migration`]): the pre-copy engine and the
//!   versioned, checksummed stream, against source/target traits, and the
//!   memory half of both for a [`Vm`] ([`migration::vm`]: segments as
//!   stream ranges, residency, dirty harvest, device-memory comparison,
//!   put-back and received pages); `vmm-kvm::migrate` completes it with
//!   vCPUs.
//!
//! # Invariants
//!
//! - Every refused operation returns a typed [`Error`] and changes nothing:
//!   all arguments are validated before the first change, and the
//!   segment table and mapping list change only after the vmspace did.
//! - A segment cannot be freed while mapped; its memory lives while mapped,
//!   held (vmspace holds keep objects) or open (a process mapped its node).
//! - Nodes are removed when their segment's memory is freed and the VM's
//!   directory when the VM goes (also on a clean stop by SIGINT/SIGTERM,
//!   which the CLI turns into a normal shutdown).
//! - No write is lost to dirty tracking: host writes through
//!   [`Vm::write_segment`] are marked in every writable alias, emulated
//!   writes go through writable holds, and [`Vm::harvest_dirty`] adds every
//!   device-memory page whose contents changed since the last harvest
//!   (writes through other processes' views of a node are not seen by the
//!   table's dirty bits, so the VM compares the segment with the copy it
//!   kept: such writes are *marked*, not refused).
//! - An instruction the emulator does not support is reported with its
//!   bytes and RIP, never guessed at.
//!
//! # Concurrency
//!
//! Segment and mapping changes serialize on one VM lock, taken before the
//! space lock (never the other way round); the data path (holds, faults,
//! emulation) goes through each vCPU's vmspace client and never takes the
//! VM lock. Device models sit behind one platform lock; a BAR move made by
//! one vCPU's emulated configuration write unmaps and maps the segment
//! (vmspace invalidates and kicks the other vCPUs) before that write
//! returns.
//!
//! # Known gaps
//!
//! - KVM is the only [`host::Host`] so far; the interface has not been
//!   exercised by a second backend, so what a bare-metal one needs beyond
//!   it (e.g. its own invalidation counters) is a guess.
//! - The interrupt models reach vCPUs through `intr::system::IntrSystem`
//!   (MMIO emulation, injection before entry, kicks, a host timer; tested
//!   on KVM), but `vmm run` does not attach them, and NMI / INIT / SIPI
//!   are not acted on (see [`intr`]).
//! - Migration runs its own workload loop (`vmm-kvm::migrate`), not
//!   [`run`]: there is no vCPU-state hook in [`host::Host`] or
//!   [`hv::Vcpu`] yet, and its guests have no PCI platform or interrupt
//!   system, whose state [`migration::devices`] serializes.
//! - Swappable memory is refused for wiring and DMA mirrors (passthrough
//!   guests); live migration runs with it (the first pass sends resident
//!   and swapped-out pages, [`migration::vm`], reading swapped-out ones
//!   from the swap file through [`Vm::read_segment`]); `vmm run` and the
//!   KVM migration's source and target swap from a swapper thread
//!   ([`swapper::Swapper`], a fixed low-water mark) and from faults that
//!   find the reservoir exhausted.
//! - Device-memory frame ranges are handed out by a bump allocator and not
//!   reused after a segment is freed.
//! - The harvest's comparison of device memory costs a copy of every
//!   device-memory segment while tracking is on.
//! - Emulation is 64-bit mode only (see [`emul`] for the instruction gaps).
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod control;
pub mod devmem;
pub mod emul;
mod error;
pub mod fbuf;
pub mod guest;
pub mod host;
pub mod hv;
pub mod inspect;
pub mod intr;
pub mod machine;
pub mod migration;
pub mod passthru;
pub mod pci;
pub mod platform;
pub mod run;
pub mod runtime;
pub mod swapper;
mod vm;
pub mod watch;
pub mod workload;

pub use error::{BadName, Error, Result};
pub use vm::{DmaMirror, MAX_SEGMENTS, SegmentInfo, SegmentKind, SegmentMapping, Vm, VmConfig};
