//! KVM as a [`vmm::host::Host`]: what lets the VM layer's programs
//! (`vmm::run`, `vmm::watch`) build and run a VM here.
//!
//! Each [`Host::create_memory`] makes a fresh KVM VM and a
//! [`SpaceBackend`] on it (table pages, RAM reservoir and device memory in
//! memory slots); [`Host::create_vcpu`] makes a KVM vCPU of that VM in long
//! mode. [`Host::paging_mode`] without a request runs the start-up probe
//! ([`detect`]) once and keeps what it found ([`KvmHost::detection`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vmm::host::{Host, HostMemory, InvalidationStats, MemorySpec, PagingMode};
use vmm::hv::{LongModeSetup, MachineError};

use crate::detect::{Detection, detect};
use crate::slot_pages::SlotPages;
use crate::space::SpaceBackend;
use crate::vcpu::Vcpu;
use crate::vm::KvmVm;

/// The KVM host: creates VMs on `/dev/kvm`.
#[derive(Debug, Default)]
pub struct KvmHost {
    detection: Option<Detection>,
}

impl KvmHost {
    /// A host that probes how KVM translates when first asked.
    pub fn new() -> Self {
        KvmHost::default()
    }

    /// What the start-up probe found (`None` until a paging mode was asked
    /// for without naming one).
    pub fn detection(&self) -> Option<&Detection> {
        self.detection.as_ref()
    }

    /// Takes the probe's result out of the host.
    pub fn take_detection(&mut self) -> Option<Detection> {
        self.detection.take()
    }
}

impl Host for KvmHost {
    type Memory = SpaceBackend;
    type Probe = Detection;

    fn probe(&self) -> Option<Detection> {
        self.detection.clone()
    }

    fn paging_mode(&mut self, requested: Option<PagingMode>) -> vmm::hv::Result<PagingMode> {
        if let Some(m) = requested {
            return Ok(m);
        }
        if self.detection.is_none() {
            self.detection = Some(detect()?);
        }
        Ok(self.detection.as_ref().map_or(PagingMode::Shadow, |d| d.mode))
    }

    fn create_memory(&mut self, spec: &MemorySpec) -> vmm::hv::Result<Arc<SpaceBackend>> {
        let vm = Arc::new(KvmVm::new()?);
        let be = SpaceBackend::create(
            vm,
            spec.reservoir_bytes,
            spec.table_bytes,
            spec.mode,
            spec.fault_around,
            spec.name.as_deref(),
        )?;
        be.zap_threshold.store(spec.zap_threshold, Ordering::Relaxed);
        Ok(Arc::new(be))
    }

    fn create_vcpu(
        &mut self,
        memory: &Arc<SpaceBackend>,
        index: usize,
        setup: &LongModeSetup,
    ) -> vmm::hv::Result<Box<dyn vmm::hv::Vcpu>> {
        let index = u32::try_from(index).map_err(|_| MachineError::Setup(format!("vCPU index {index}")))?;
        let mut v = Vcpu::new(memory.vm(), index)?;
        v.setup_long_mode(setup)?;
        debug_assert_eq!(v.index(), index);
        Ok(Box::new(v))
    }
}

impl HostMemory for SpaceBackend {
    type Pages = SlotPages;

    fn vm(&self) -> &Arc<vmm::Vm<SlotPages>> {
        self.segments()
    }

    fn invalidation_stats(&self) -> InvalidationStats {
        let st = self.inval_stats();
        InvalidationStats {
            frames_dropped: st.frames_dropped.load(Ordering::Relaxed),
            drop_time: Duration::from_nanos(st.drop_ns.load(Ordering::Relaxed)),
            zaps: SpaceBackend::vm(self).zap_count(),
            zap_time: SpaceBackend::vm(self).zap_time(),
        }
    }
}
