//! The generic machine (vCPU threads, exit loop, harvest points: in
//! `vmm::machine`) on KVM vCPUs.

pub use vmm::machine::*;

use crate::backend::MemBackend;
use crate::runtime;
use crate::vcpu::Vcpu;
use crate::vm::{KvmVm, PagingMode, Result};
use std::sync::Arc;

/// Creates `nvcpus` KVM vCPUs in long mode over `backend` (whose runtime
/// must already be mapped and resident) and the machine that runs them.
/// On a host with hardware nested paging the vCPUs reload CR3 whenever
/// the table generation changed.
pub fn create(vm: &KvmVm, backend: Arc<dyn MemBackend>, mode: PagingMode, nvcpus: usize) -> Result<Machine> {
    let code = vmm::guest::code();
    let mut vcpus: Vec<Box<dyn vmm::hv::Vcpu>> = Vec::new();
    for i in 0..nvcpus {
        let mut v = Vcpu::new(vm, i as u32)?;
        v.setup_long_mode(&runtime::long_mode_setup(&code, i, nvcpus, backend.cr3(), backend.rom_base()))?;
        vcpus.push(Box::new(v));
    }
    Ok(Machine::new(backend, vcpus, mode == PagingMode::HardwareNested))
}
