//! What the vCPU loop needs from an address space, and the plain-table
//! implementation used by the oracle tests.
//!
//! [`MemBackend`] is the seam between the KVM runner and the memory system. The
//! production implementation is [`SpaceBackend`](crate::space::SpaceBackend)
//! (a `vmspace::VmSpace` with one client per vCPU); [`TableBackend`] is a bare
//! `nested_pt::NestedTable` over a flat RAM region, which lets tests lay out
//! exactly the entries they want (2 MiB pages, read-only, non-executable,
//! not-present) and compare the hardware's behaviour with `mmu::translate`.

use crate::mem::{PAGE, SharedRegion};
use crate::runtime;
use crate::slot_pages::SlotPages;
use crate::vcpu::Exit;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use nested_pt::{Access, Caps, Gpa, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vmm::hv::Kick;

pub use vmm::hv::{FaultError, MemBackend, VcpuMem};

/// KVM guest-physical base of the table-page slot.
pub const TABLES_KVM_BASE: u64 = 0x1_0000_0000;
/// KVM guest-physical base of guest RAM (the reservoir's frame base).
pub const RAM_KVM_BASE: u64 = 0x2_0000_0000;

/// The NPT format with what this host offers.
pub fn npt_format(vm: &KvmVm) -> PteFormat {
    let f = vm.facts();
    PteFormat::npt(Caps { page_2m: true, page_1g: f.page_1g, execute_only: false, phys_bits: f.phys_bits })
}

/// Invalidation bookkeeping shared by the backends.
#[derive(Debug, Default)]
pub struct InvalStats {
    /// Frames whose KVM view was dropped (shadow hosts).
    pub frames_dropped: AtomicU64,
    /// Nanoseconds spent dropping frames.
    pub drop_ns: AtomicU64,
    /// Full shadow zaps requested by invalidations.
    pub zaps: AtomicU64,
}

/// A flat RAM region mapped 1:1 by a bare nested table (tests and probes).
pub struct TableBackend {
    vm: Arc<KvmVm>,
    table: NestedTable<SlotPages>,
    ram: Arc<SharedRegion>,
    ram_used: AtomicU64,
    mode: PagingMode,
    generation: AtomicU64,
    /// Invalidation counters.
    pub stats: InvalStats,
}

impl std::fmt::Debug for TableBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableBackend").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl TableBackend {
    /// A table with `table_bytes` of table pages and `ram_bytes` of RAM,
    /// both registered with `vm`.
    pub fn new(vm: Arc<KvmVm>, table_bytes: u64, ram_bytes: u64, mode: PagingMode) -> Result<Self> {
        let treg = Arc::new(SharedRegion::new("vmm-tables", table_bytes).map_err(|e| KvmError::Os("memfd", e))?);
        vm.add_region(treg.clone(), TABLES_KVM_BASE)?;
        let ram = Arc::new(SharedRegion::new("vmm-ram", ram_bytes).map_err(|e| KvmError::Os("memfd", e))?);
        vm.add_region(ram.clone(), RAM_KVM_BASE)?;
        let pages = SlotPages::new(treg, TABLES_KVM_BASE, Some(vm.clone()))?;
        let table = NestedTable::new(npt_format(&vm), pages).map_err(|e| KvmError::Setup(format!("table: {e}")))?;
        Ok(TableBackend {
            vm,
            table,
            ram,
            ram_used: AtomicU64::new(0),
            mode,
            generation: AtomicU64::new(1),
            stats: InvalStats::default(),
        })
    }

    /// The RAM region.
    pub fn ram(&self) -> &Arc<SharedRegion> {
        &self.ram
    }

    /// The table (mutable: populate/vacate before vCPUs run).
    pub fn table_mut(&mut self) -> &mut NestedTable<SlotPages> {
        &mut self.table
    }

    /// The table.
    pub fn table(&self) -> &NestedTable<SlotPages> {
        &self.table
    }

    /// Takes `bytes` of RAM (bump allocation); returns its RAM offset.
    pub fn alloc_ram(&self, bytes: u64, align: u64) -> Result<u64> {
        let mut cur = self.ram_used.load(Ordering::SeqCst);
        loop {
            let exhausted = || KvmError::Setup("RAM region exhausted".into());
            let off = cur.checked_next_multiple_of(align.max(1)).ok_or_else(exhausted)?;
            let end = off.checked_add(bytes).filter(|&e| e <= self.ram.len()).ok_or_else(exhausted)?;
            match self.ram_used.compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(off),
                Err(c) => cur = c,
            }
        }
    }

    /// Frame of RAM offset `off`.
    pub fn ram_pfn(&self, off: u64) -> Pfn {
        Pfn((RAM_KVM_BASE + off) / PAGE)
    }

    /// Maps `len` bytes of RAM at offset `off` to `gpa` with 4 KiB or 2 MiB pages.
    pub fn map_range(&mut self, gpa: u64, off: u64, len: u64, size: PageSize, prot: Prot) -> Result<()> {
        self.table
            .populate_region(Gpa(gpa), len, size)
            .map_err(|e| KvmError::Setup(format!("populate {gpa:#x}: {e}")))?;
        let mut a = 0;
        while a < len {
            self.table
                .map(Gpa(gpa + a), self.ram_pfn(off + a), size, prot, MemType::WriteBack)
                .map_err(|e| KvmError::Setup(format!("map {:#x}: {e}", gpa + a)))?;
            a += size.bytes();
        }
        Ok(())
    }

    /// Maps the runtime (ROM, per-vCPU data, ledgers) for `nvcpus` vCPUs
    /// whose data regions have `npages` pages each.
    pub fn map_runtime(&mut self, rom: &[u8], nvcpus: usize, npages: u64) -> Result<()> {
        let rom_off = self.alloc_ram(rom.len() as u64, PAGE)?;
        self.ram.write_bytes(rom_off, rom)?;
        self.map_range(runtime::RT_BASE, rom_off, rom.len() as u64, PageSize::Size4K, Prot::READ | Prot::EXEC)?;
        let data_len = runtime::DATA_PAGES * PAGE;
        for i in 0..nvcpus {
            let data_off = self.alloc_ram(data_len, PAGE)?;
            self.map_range(runtime::params(i), data_off, data_len, PageSize::Size4K, Prot::READ | Prot::WRITE)?;
        }
        let led_len = nvcpus as u64 * runtime::ledger_bytes(npages);
        let led_off = self.alloc_ram(led_len, PAGE)?;
        self.map_range(runtime::LEDGER_BASE, led_off, led_len, PageSize::Size4K, Prot::READ | Prot::WRITE)?;
        Ok(())
    }

    /// Paging mode this backend invalidates for.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Bumps the generation (the vCPUs flush on hardware-nested hosts).
    pub fn bump_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }
}

impl MemBackend for TableBackend {
    fn describe(&self) -> String {
        "bare nested table".into()
    }
    fn cr3(&self) -> u64 {
        self.table.root_pointer(false)
    }
    fn format(&self) -> PteFormat {
        *self.table.format()
    }
    fn vcpu_mem(&self, _vcpu: usize, _kick: Arc<dyn Kick>) -> vmm::hv::Result<Box<dyn VcpuMem + '_>> {
        Ok(Box::new(TableVcpu { be: self }))
    }
    fn host_ptr(&self, gpa: u64) -> Option<*mut u8> {
        let (pfn, _) = self.table.is_mapped(Gpa(gpa))?;
        let off = pfn.0.checked_mul(PAGE)?.checked_sub(RAM_KVM_BASE)?;
        self.ram.ptr_at(off.checked_add(gpa % PAGE)?).ok()
    }
    fn harvest(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> vmm::hv::Result<u64> {
        Ok(self.harvest_kvm(gpa, len, bitmap)?)
    }
    fn resident(&self) -> u64 {
        0
    }
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
    fn table_pages(&self) -> u64 {
        self.table.table_pages() as u64
    }
}

impl TableBackend {
    /// Harvest, then zap on a shadow host so the cleared bits take effect.
    fn harvest_kvm(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> Result<u64> {
        let n =
            self.table.harvest_dirty(Gpa(gpa), len, bitmap).map_err(|e| KvmError::Setup(format!("harvest: {e}")))?;
        if self.mode == PagingMode::Shadow {
            self.vm.zap_all()?;
            self.stats.zaps.fetch_add(1, Ordering::Relaxed);
        }
        self.bump_generation();
        Ok(n)
    }
}

struct TableVcpu<'a> {
    be: &'a TableBackend,
}

impl VcpuMem for TableVcpu<'_> {
    fn entered(&mut self, run: &mut dyn FnMut(u64) -> vmm::hv::Result<Exit>) -> vmm::hv::Result<Exit> {
        run(self.be.generation.load(Ordering::SeqCst))
    }
    fn fault(&mut self, _gpa: u64, _access: Access) -> std::result::Result<(), FaultError> {
        // The layout is fixed by the test: nothing is mapped on demand.
        Err(FaultError::NoMapping)
    }
}
