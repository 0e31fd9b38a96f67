//! A VM built on `vmspace`: memory segments (system memory and named,
//! remappable device memory with host mappings), guest-driven BAR
//! relocation, MMIO instruction emulation, the passthrough/IOMMU model and
//! the dirty-page migration stream (DESIGN.md §2 and roadmap rows 4, 5
//! and 7).
//!
//! Not started: this crate holds no code yet. The running VM of today
//! lives in `vmm-kvm` (vCPUs on KVM over a `vmspace::VmSpace`) and the
//! `vmm` binary in `vmm-cli`.
#![deny(unsafe_code)]
pub mod emul;
