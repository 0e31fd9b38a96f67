//! `vmm run` on KVM: [`vmm::run`] (the built-in workloads, harvest rounds,
//! the PCI framebuffer, every check, the control endpoint) on a
//! [`KvmHost`], plus what the start-up probe found.
//!
//! Everything that runs the VM is in `vmm::run`, written against the
//! `vmm::host::Host` interface; this module only picks the host, whose
//! probe result ([`Detection`]) the report carries.

use crate::detect::Detection;
use crate::host::KvmHost;
use crate::vm::Result;

pub use vmm::run::{FB_BASES, FB_DEVICE, FB_REGS, FbConfig, FbReport, Progress, Round, RunConfig, VcpuReport};

/// Everything `vmm run` reports on KVM, with the start-up detection.
pub type RunReport = vmm::run::RunReport<Detection>;

/// Runs `cfg` on KVM, calling `progress` about four times a second.
pub fn run(cfg: &RunConfig, progress: &mut dyn FnMut(Progress)) -> Result<RunReport> {
    Ok(vmm::run::run(&mut KvmHost::new(), cfg, progress)?)
}
