//! The VM layer on `vmspace`: memory segments (system memory and named,
//! remappable device memory with host nodes), and what is built on them
//! (DESIGN.md §2 and §8).
//!
//! # What this crate owns
//!
//! A [`Vm`] is one guest's memory as bhyve's `vmm.c` presents it: a
//! `vmspace::VmSpace` plus *memory segments*. A segment is allocated under
//! an id with a length and a kind — system memory (guest RAM from the VM's
//! reservoir in 4 KiB chunks) or device memory with a name (a boot ROM, a
//! framebuffer) — and ranges of it are mapped at guest-physical addresses
//! with a protection, possibly at several addresses at once (aliases). Each
//! device-memory segment has a host node ([`devmem`]): a file under the
//! user's runtime directory that any process of the same user maps by name,
//! independently of where the guest maps it, so a viewer keeps its mapping
//! while the guest moves a BAR. The crate knows nothing of KVM: a backend
//! exposes device memory to its hypervisor through
//! [`devmem::MemoryExposure`] and runs vCPUs over the vmspace.
//!
//! # Invariants
//!
//! - Every refused operation returns a typed [`Error`] and changes nothing:
//!   all arguments are validated before the first change, and the
//!   segment table and mapping list change only after the vmspace did.
//! - The VM's mapping list and the vmspace's mappings are the same set.
//! - A segment cannot be freed while mapped; its memory lives while mapped,
//!   held (vmspace holds keep objects) or open (a process mapped its node).
//! - Nodes are removed when their segment's memory is freed and the VM's
//!   directory when the VM goes (also on a clean stop by SIGINT/SIGTERM,
//!   which the CLI turns into a normal shutdown).
//! - No write is lost to dirty tracking: host writes through
//!   [`Vm::write_segment`] are marked in every writable alias, and
//!   [`Vm::harvest_dirty`] adds every device-memory page whose contents
//!   changed since the last harvest (writes through other processes' views
//!   of a node are not seen by the table's dirty bits; the VM compares the
//!   segment with the copy it kept).
//!
//! # Concurrency
//!
//! Segment and mapping changes serialize on one VM lock, taken before the
//! space lock (never the other way round); the data path (holds, faults)
//! goes through vmspace clients and never takes the VM lock.
//!
//! # Known gaps
//!
//! - The KVM runner does not run on this crate yet (`vmm-kvm` still holds
//!   the run loop and talks to vmspace directly); MMIO emulation, the PCI
//!   framebuffer and BAR moves are not wired to vCPUs.
//! - Device-memory frame ranges are handed out by a bump allocator and not
//!   reused after a segment is freed.
//! - The harvest's comparison of device memory costs a copy of every
//!   device-memory segment while tracking is on.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod control;
pub mod devmem;
pub mod emul;
mod error;
pub mod fbuf;
pub mod guest;
pub mod hv;
pub mod intr;
pub mod machine;
pub mod migration;
pub mod pci;
pub mod platform;
pub mod runtime;
mod vm;
pub mod workload;

pub use error::{BadName, Error, Result};
pub use vm::{MAX_SEGMENTS, SegmentInfo, SegmentKind, SegmentMapping, Vm, VmConfig};
