//! The host interface: what a backend provides so that the programs of
//! this crate ([`crate::run`], [`crate::watch`]) can build and run a VM on
//! it without knowing what the backend is.
//!
//! A [`Host`] makes a VM's memory — a [`Vm`] (memory segments over a
//! vmspace) whose table pages, RAM and device memory live where that
//! backend's vCPUs can translate through them — and vCPUs in long mode on
//! that memory. The memory it returns is a [`HostMemory`]: the
//! [`MemBackend`] the machine's vCPU threads use (clients, faults,
//! harvests that make their cleared bits effective on that host) plus the
//! [`Vm`] itself and the cost of the invalidations the host made. The KVM
//! backend implements this in `vmm-kvm`; a bare-metal hypervisor would do
//! the same with EPT/NPT tables over its own physical pages.
//!
//! How the host translates through our tables ([`PagingMode`]) decides
//! how a change reaches running vCPUs: with hardware nested paging the
//! vCPUs cache our tables in their TLBs and the machine makes them reload
//! CR3 when the table generation changed; a host that shadows the tables
//! drops its shadow entries itself (inside its [`MemBackend`]).

use std::sync::Arc;
use std::time::Duration;

use nested_pt::{Gpa, TablePages};

use crate::Vm;
use crate::hv::{LongModeSetup, MemBackend, Result, Vcpu};

/// How a host translates guest accesses through our tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// Hardware nested paging (EPT/NPT): the CPU walks our tables and caches
    /// them in the vCPU's TLB; a CR3 reload inside the guest flushes them.
    HardwareNested,
    /// The host shadows our tables: it does not see writes to them, so each
    /// change that removes access is made effective by the host dropping
    /// the shadow entries of the frames concerned (or all of them, when
    /// table pages were freed).
    Shadow,
}

impl std::fmt::Display for PagingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PagingMode::HardwareNested => write!(f, "hardware nested paging (EPT/NPT): CR3 reload"),
            PagingMode::Shadow => {
                write!(f, "shadow paging: frame drop per leaf change, full shadow zap for table changes")
            }
        }
    }
}

/// What a VM's memory is made of (see [`Host::create_memory`]).
#[derive(Debug, Clone)]
pub struct MemorySpec {
    /// Bytes of RAM reservoir (system-memory segments are allocated from
    /// it in 4 KiB chunks).
    pub reservoir_bytes: u64,
    /// Bytes of table pages.
    pub table_bytes: u64,
    /// Pages a nested fault maps around the faulting one (at least 1).
    pub fault_around: u32,
    /// The VM's name (its device-memory nodes and control socket are found
    /// by it); the host makes up a process-unique one when `None`.
    pub name: Option<String>,
    /// How the host translates ([`Host::paging_mode`]).
    pub mode: PagingMode,
    /// Shadow hosts: a harvest with more dirty pages than this drops every
    /// shadow entry at once instead of each frame's (0: always, `u64::MAX`:
    /// never). Hosts that need no such choice ignore it.
    pub zap_threshold: u64,
}

/// The invalidation work a host did for a VM's memory, as counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvalidationStats {
    /// Frames whose host translations were dropped one by one.
    pub frames_dropped: u64,
    /// Time spent dropping them.
    pub drop_time: Duration,
    /// Full flushes of every host translation of the VM (shadow zaps).
    pub zaps: u64,
    /// Time spent in them.
    pub zap_time: Duration,
}

/// A VM's memory on a host: the [`Vm`] and the memory port of its vCPUs.
pub trait HostMemory: MemBackend {
    /// The table-page provider of the VM's vmspace.
    type Pages: TablePages + Send + Sync + 'static;
    /// The VM layer: memory segments over the vmspace.
    fn vm(&self) -> &Arc<Vm<Self::Pages>>;
    /// The invalidation work done so far.
    fn invalidation_stats(&self) -> InvalidationStats {
        InvalidationStats::default()
    }
}

/// A backend that creates VMs: memory and vCPUs.
pub trait Host {
    /// The memory it makes.
    type Memory: HostMemory + 'static;
    /// What the host found about itself when asked for a paging mode
    /// without naming one (a probe's results), carried into reports.
    type Probe: Clone + std::fmt::Debug + Send;
    /// How this host translates through our tables: `requested` when given
    /// (a host may refuse one it cannot honour), else what the host finds
    /// (which may mean probing it).
    fn paging_mode(&mut self, requested: Option<PagingMode>) -> Result<PagingMode>;
    /// What the last [`paging_mode`](Host::paging_mode) without a request
    /// found, if it probed.
    fn probe(&self) -> Option<Self::Probe>;
    /// A VM's memory as `spec` says, with dirty tracking on and no segment
    /// allocated yet.
    fn create_memory(&mut self, spec: &MemorySpec) -> Result<Arc<Self::Memory>>;
    /// vCPU `index` of a VM on `memory`, in long mode as `setup` says.
    fn create_vcpu(&mut self, memory: &Arc<Self::Memory>, index: usize, setup: &LongModeSetup)
    -> Result<Box<dyn Vcpu>>;
}

/// Creates `nvcpus` vCPUs on `memory` (whose runtime must be installed
/// and resident: [`install_runtime`]) and the machine that runs
/// them. With hardware nested paging the vCPUs reload CR3 whenever the
/// table generation changed.
pub fn machine<H: Host>(
    host: &mut H,
    memory: &Arc<H::Memory>,
    mode: PagingMode,
    nvcpus: usize,
) -> Result<crate::machine::Machine> {
    let code = crate::guest::code();
    let mut vcpus = Vec::with_capacity(nvcpus);
    for i in 0..nvcpus {
        let setup = crate::runtime::long_mode_setup(&code, i, nvcpus, memory.cr3(), memory.rom_base());
        vcpus.push(host.create_vcpu(memory, i, &setup)?);
    }
    let backend: Arc<dyn MemBackend> = memory.clone();
    Ok(crate::machine::Machine::new(backend, vcpus, mode == PagingMode::HardwareNested))
}

fn setup_err(what: &'static str) -> impl Fn(crate::Error) -> crate::hv::MachineError {
    move |e| crate::hv::MachineError::Setup(format!("{what}: {e}"))
}

/// Allocates a new system-memory segment of `len` bytes (the next free
/// id) and maps it at `gpa` with `prot` (pages become resident when first
/// touched, or by [`vmspace::VmSpace::populate`]). Returns the id; on an
/// error nothing is left allocated.
pub fn map_ram<P: TablePages + Send + Sync + 'static>(
    vm: &Vm<P>,
    gpa: u64,
    len: u64,
    prot: nested_pt::Prot,
) -> Result<u32> {
    let id = vm.free_segment_id().ok_or_else(|| crate::hv::MachineError::Setup("no free segment id".into()))?;
    vm.alloc_segment(id, len, crate::SegmentKind::SysMem).map_err(setup_err("segment"))?;
    if let Err(e) = vm.map_segment(gpa, id, 0, len, Some(prot)) {
        let _ = vm.free_segment(id);
        return Err(setup_err("map")(e));
    }
    Ok(id)
}

/// As [`map_ram`], with a swappable segment whose cold pages go to
/// `swap` ([`Vm::alloc_swappable_segment`]): `len` may exceed the
/// reservoir.
pub fn map_swappable_ram<P: TablePages + Send + Sync + 'static>(
    vm: &Vm<P>,
    gpa: u64,
    len: u64,
    prot: nested_pt::Prot,
    swap: std::fs::File,
) -> Result<u32> {
    let id = vm.free_segment_id().ok_or_else(|| crate::hv::MachineError::Setup("no free segment id".into()))?;
    vm.alloc_swappable_segment(id, len, swap).map_err(setup_err("swappable segment"))?;
    if let Err(e) = vm.map_segment(gpa, id, 0, len, Some(prot)) {
        let _ = vm.free_segment(id);
        return Err(setup_err("map")(e));
    }
    Ok(id)
}

/// Installs the guest runtime for `nvcpus` vCPUs whose workload regions
/// have `npages` pages each: the boot ROM as a device-memory segment named
/// "bootrom", read-only and executable just below 4 GiB
/// ([`crate::runtime::BOOTROM_BASE`], as bhyve maps its boot ROM), and the
/// per-vCPU data pages and ledgers as system memory (read + write). All of
/// it is resident before any vCPU runs: a fault while delivering a fault
/// would be a triple fault.
pub fn install_runtime<P: TablePages + Send + Sync + 'static>(vm: &Vm<P>, nvcpus: usize, npages: u64) -> Result<()> {
    use crate::runtime::*;
    use nested_pt::Prot;
    if nvcpus == 0 || nvcpus > MAX_VCPUS {
        return Err(crate::hv::MachineError::Setup(format!("vCPU count must be 1..={MAX_VCPUS}")));
    }
    let rom = rom_image_at(&crate::guest::code(), nvcpus, BOOTROM_BASE);
    let len = rom.len() as u64;
    let id = vm.free_segment_id().ok_or_else(|| crate::hv::MachineError::Setup("no free segment id".into()))?;
    vm.alloc_segment(id, len, crate::SegmentKind::DevMem { name: "bootrom".into() }).map_err(setup_err("bootrom"))?;
    vm.write_segment(id, 0, &rom).map_err(setup_err("bootrom"))?;
    vm.map_segment(BOOTROM_BASE, id, 0, len, Some(Prot::READ | Prot::EXEC)).map_err(setup_err("bootrom"))?;
    vm.space()
        .populate(Gpa(BOOTROM_BASE), len)
        .map_err(|e| crate::hv::MachineError::Setup(format!("populate bootrom: {e}")))?;
    let ledgers = (nvcpus as u64)
        .checked_mul(ledger_bytes(npages))
        .ok_or_else(|| crate::hv::MachineError::Setup("ledger size overflows".into()))?;
    let data = (0..nvcpus).map(|i| (params(i), DATA_PAGES * PAGE_BYTES));
    for (gpa, len) in data.chain([(LEDGER_BASE, ledgers)]) {
        map_ram(vm, gpa, len, Prot::READ | Prot::WRITE)?;
        vm.space()
            .populate(Gpa(gpa), len)
            .map_err(|e| crate::hv::MachineError::Setup(format!("populate {gpa:#x}: {e}")))?;
    }
    Ok(())
}

const PAGE_BYTES: u64 = 4096;

/// The default [`MemorySpec::zap_threshold`]: harvests with more dirty
/// pages than this (and more than a quarter of the resident pages) flush
/// every shadow entry at once rather than drop frames one by one. Measured
/// on a shadow-paging KVM host: a frame drop costs ~6-8 µs plus a host and
/// a shadow fault when the frame is next touched; a zap 70 µs to over
/// 1 ms (it grows with the shadow pages) plus a shadow fault (~9 µs) for
/// every page touched afterwards.
pub const DEFAULT_ZAP_THRESHOLD: u64 = 16;
