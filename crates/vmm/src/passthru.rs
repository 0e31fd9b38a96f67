//! PCI passthrough, as bhyve models it (FreeBSD `sys/amd64/vmm/io/ppt.c`,
//! `iommu.c`, `usr.sbin/bhyve/pci_passthru.c`): a guest with a passthrough
//! device wires all its memory, gets an IOMMU domain whose I/O page tables
//! mirror its system memory, and sees the device's memory BARs mapped
//! straight through, except the pages of the MSI-X table, which are
//! emulated.
//!
//! # What this module owns
//!
//! - **The IOMMU domain** ([`IommuDomain`]): a second-level table (built by
//!   `nested_pt`, over any table-page provider) that maps each I/O virtual
//!   address equal to a guest-physical address of system memory to the
//!   frame the VM's own tables map there, readable and writable as the
//!   mapping is (execute means nothing to DMA). It is a [`DmaMirror`] of
//!   the [`Vm`]: every later sysmem map and unmap reaches it (unmaps first,
//!   with a global IOTLB invalidation counted, as FreeBSD's `vtd.c` does).
//!   [`IommuDomain::translate`] is the DMA path: the frame, or the fault
//!   the hardware would record.
//! - **When a domain exists** ([`IommuTunables`]): only once a passthrough
//!   device is attached (bhyve allocates VT-d domains only for passthrough
//!   guests: they are a scarce hardware resource), or from the start when
//!   `force` is set (FreeBSD's force tunable, for devices such as SR-IOV
//!   functions that appear after the VM is made). `enable = false` (FreeBSD
//!   `hw.vmm.iommu.enable=0`) refuses passthrough devices.
//! - **BARs and the MSI-X hole** ([`msix_hole`], [`bar_pieces`],
//!   [`Passthrough::map_bar`]): a memory BAR is backed by a BAR object (a
//!   device-memory segment here), mapped at the guest address the guest
//!   programmed; a mapping must lie inside the BAR and the BAR's guest
//!   address must be aligned to its size. When the BAR holds the MSI-X
//!   table, the table's pages (offset rounded down to 4 KiB, end rounded
//!   up) are left unmapped and trapped: accesses to the table entries are
//!   emulated ([`Passthrough`] is an [`MmioDevices`]); the rest of those
//!   pages, the pending-bit array (PBA) included, is forwarded to the
//!   device.
//! - **Wiring** ([`Vm::wire_memory`]): attaching a device populates every
//!   sysmem mapping and every later one at map time, so DMA never faults.
//!
//! # The device side
//!
//! On a host with VFIO the BAR object would map the device's BAR region
//! and the PBA would be the device's. On our machines there is no device
//! to pass through, so [`TestDoubleDevice`] stands in for one — named as
//! such: its BARs are device-memory segments (which other processes can
//! map by name, like any device memory), it raises MSI-X vectors on
//! request and keeps its pending bits. The domain's tables are exercised
//! for real by QEMU's emulated IOMMUs in the conformance kernel (issue 12,
//! item 2), not here.
//!
//! # Known gaps
//!
//! - The domain's tables are in the format the caller passes: nested-pt's
//!   VT-d second-level or AMD-Vi format (`PteFormat::vtd`,
//!   `PteFormat::amd_vi`), whose tables QEMU's emulated IOMMUs walk in the
//!   hwtest DMA suite. The model does not program a remapping unit itself
//!   (no root/context or device table here: that is the host IOMMU
//!   driver's job, VFIO's on Linux); [`DmaFault`] names VT-d's fault
//!   reasons for the cases.
//! - I/O BARs, expansion ROMs and configuration-space passthrough (the
//!   virtual PCI device a guest enumerates) are not modelled; MSI (as
//!   opposed to MSI-X) is left to [`crate::intr`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nested_pt::{Gpa, MemType, NestedTable, PageSize, PteFormat, TablePages};
use vmspace::{Prot, VmObject};

use crate::machine::MmioDevices;
use crate::{DmaMirror, Error, SegmentKind, Vm};

const PAGE: u64 = 4096;
/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_BYTES: u64 = 16;
/// Most MSI-X table entries a function can have (the table size field is
/// 11 bits, N-1 encoded).
pub const MSIX_MAX_ENTRIES: u16 = 2048;
/// Vector-control bit 0: the entry is masked.
pub const MSIX_MASKED: u32 = 1;

/// Errors of the passthrough model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassthroughError {
    /// The IOMMU is disabled (`enable = false`): no passthrough device can
    /// be attached.
    IommuDisabled,
    /// A device with this address is attached already.
    DuplicateDevice(Bdf),
    /// No attached device has this address.
    UnknownDevice(Bdf),
    /// The device has no memory BAR with this index.
    UnknownBar(u8),
    /// A BAR size that is not a power of two of at least 4 KiB, or two BARs
    /// with one index.
    BadBar(u8),
    /// The MSI-X capability does not fit: zero or too many entries, a table
    /// or PBA not 8-byte aligned or reaching past its BAR, or a BAR that
    /// does not exist.
    BadMsix,
    /// A BAR's guest address not aligned to its size, or overflowing.
    Misaligned,
    /// The BAR is mapped already (unmap it first), or not mapped.
    BarState(u8),
    /// The VM layer refused (a segment, a mapping, the reservoir).
    Vm(Error),
    /// The domain's table refused a mapping.
    Table(nested_pt::Error),
}

impl std::fmt::Display for PassthroughError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassthroughError::IommuDisabled => write!(f, "the IOMMU is disabled: no passthrough devices"),
            PassthroughError::DuplicateDevice(b) => write!(f, "device {b} is attached already"),
            PassthroughError::UnknownDevice(b) => write!(f, "no passthrough device {b}"),
            PassthroughError::UnknownBar(i) => write!(f, "no memory BAR {i}"),
            PassthroughError::BadBar(i) => write!(f, "BAR {i}: size must be a power of two of at least 4 KiB"),
            PassthroughError::BadMsix => write!(f, "MSI-X table or PBA does not fit its BAR"),
            PassthroughError::Misaligned => write!(f, "BAR address not aligned to the BAR's size"),
            PassthroughError::BarState(i) => write!(f, "BAR {i} is not in the state this needs"),
            PassthroughError::Vm(e) => write!(f, "{e}"),
            PassthroughError::Table(e) => write!(f, "IOMMU table: {e:?}"),
        }
    }
}

impl std::error::Error for PassthroughError {}

impl From<Error> for PassthroughError {
    fn from(e: Error) -> Self {
        PassthroughError::Vm(e)
    }
}

/// Result alias of the passthrough model.
pub type Result<T> = std::result::Result<T, PassthroughError>;

/// When the VM gets an IOMMU domain (FreeBSD's `hw.vmm.iommu.enable` and
/// the force tunable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuTunables {
    /// Use the IOMMU at all; without it no passthrough device attaches.
    pub enable: bool,
    /// Create the domain with the VM, before any device is attached.
    pub force: bool,
}

impl Default for IommuTunables {
    fn default() -> Self {
        IommuTunables { enable: true, force: false }
    }
}

/// A PCI function's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0-31).
    pub device: u8,
    /// Function (0-7).
    pub function: u8,
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Why a DMA access was refused, as VT-d's fault-recording registers name
/// the reasons for second-level translation (VT-d spec, section 7.1.3,
/// table "Unrecoverable Fault Conditions": non-present second-level entry,
/// read or write without the R or W bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// No present entry maps the address (VT-d fault reason 0x6 for a
    /// legacy-mode walk).
    NotPresent,
    /// A read of a page without R (reason 0x6 as well in legacy mode; a
    /// separate case here so tests can tell).
    ReadDenied,
    /// A write of a page without W (reason 0x5).
    WriteDenied,
}

/// Counters of a domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Pages mapped (each mirrored sysmem page once).
    pub pages_mapped: u64,
    /// Pages unmapped.
    pub pages_unmapped: u64,
    /// Global IOTLB invalidations (one per unmap).
    pub iotlb_flushes: u64,
}

/// An IOMMU domain: I/O page tables that mirror a VM's system memory.
pub struct IommuDomain<Q: TablePages> {
    id: u16,
    table: Mutex<NestedTable<Q>>,
    pages_mapped: AtomicU64,
    pages_unmapped: AtomicU64,
    iotlb_flushes: AtomicU64,
}

impl<Q: TablePages + Send> std::fmt::Debug for IommuDomain<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuDomain").field("id", &self.id).field("stats", &self.stats()).finish()
    }
}

impl<Q: TablePages + Send> IommuDomain<Q> {
    /// An empty domain `id` whose tables have `format` and live in `pages`.
    pub fn new(id: u16, format: PteFormat, pages: Q) -> Result<Self> {
        let table = NestedTable::new(format, pages).map_err(PassthroughError::Table)?;
        Ok(IommuDomain {
            id,
            table: Mutex::new(table),
            pages_mapped: AtomicU64::new(0),
            pages_unmapped: AtomicU64::new(0),
            iotlb_flushes: AtomicU64::new(0),
        })
    }

    /// The domain id (what a context entry names).
    pub fn id(&self) -> u16 {
        self.id
    }

    fn table(&self) -> std::sync::MutexGuard<'_, NestedTable<Q>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The root of the I/O page tables (what a context entry points at).
    pub fn root(&self) -> nested_pt::Pfn {
        self.table().root()
    }

    /// Translates a DMA access at I/O virtual address `iova`: the host
    /// frame and the byte address inside it, or the fault.
    pub fn translate(&self, iova: u64, write: bool) -> std::result::Result<u64, DmaFault> {
        let t = self.table();
        let (pfn, prot) = t.is_mapped(Gpa(iova)).ok_or(DmaFault::NotPresent)?;
        if write && !prot.contains(Prot::WRITE) {
            return Err(DmaFault::WriteDenied);
        }
        if !write && !prot.contains(Prot::READ) {
            return Err(DmaFault::ReadDenied);
        }
        Ok(pfn.0 * PAGE + iova % PAGE)
    }

    /// The counters.
    pub fn stats(&self) -> DomainStats {
        DomainStats {
            pages_mapped: self.pages_mapped.load(Ordering::Relaxed),
            pages_unmapped: self.pages_unmapped.load(Ordering::Relaxed),
            iotlb_flushes: self.iotlb_flushes.load(Ordering::Relaxed),
        }
    }

    /// Table pages in use.
    pub fn table_pages(&self) -> usize {
        self.table().table_pages()
    }
}

impl<Q: TablePages + Send> DmaMirror for IommuDomain<Q> {
    fn map(&self, gpa: u64, object: &VmObject, offset: u64, len: u64, prot: Prot) -> crate::Result<()> {
        // Execute means nothing to a device; memory it cannot read is
        // memory it cannot reach.
        let dma = prot & (Prot::READ | Prot::WRITE);
        if !dma.contains(Prot::READ) {
            return Ok(());
        }
        let mut t = self.table();
        let err = |e: nested_pt::Error| Error::Backend(format!("IOMMU domain: {e:?}"));
        t.populate_region(Gpa(gpa), len, PageSize::Size4K).map_err(err)?;
        let mapped =
            t.map_range_exclusive(Gpa(gpa), len, dma, MemType::WriteBack, |g| object.frame_at(offset + (g.0 - gpa)));
        let n = match mapped {
            Ok(n) => n,
            Err(e) => {
                // The failed map installed nothing; give back the tables
                // the populate made, so the mirror changed nothing.
                let _ = t.vacate_region(Gpa(gpa), len, PageSize::Size4K);
                return Err(err(e));
            }
        };
        self.pages_mapped.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&self, gpa: u64, len: u64) {
        let mut t = self.table();
        if let Ok(n) = t.unmap_vacate_region(Gpa(gpa), len, PageSize::Size4K) {
            self.pages_unmapped.fetch_add(n, Ordering::Relaxed);
        }
        // FreeBSD's vtd.c invalidates the whole IOTLB after an unmap.
        self.iotlb_flushes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where the MSI-X table and PBA of a function are (its MSI-X capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Table entries (1 to [`MSIX_MAX_ENTRIES`]).
    pub entries: u16,
    /// BAR index holding the table.
    pub table_bar: u8,
    /// Byte offset of the table in that BAR (8-byte aligned).
    pub table_offset: u64,
    /// BAR index holding the pending-bit array.
    pub pba_bar: u8,
    /// Byte offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u64,
}

impl MsixCap {
    /// Bytes of the table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.entries) * MSIX_ENTRY_BYTES
    }

    /// Bytes of the PBA (one bit per entry, in 64-bit words).
    pub fn pba_bytes(&self) -> u64 {
        u64::from(self.entries).div_ceil(64) * 8
    }
}

/// The pages of a BAR that the MSI-X table occupies: `(offset, len)`, the
/// table's offset rounded down to 4 KiB and its end rounded up (bhyve's
/// rule). `None` when the table does not fit in a BAR of `bar_size` bytes
/// or has no entries.
pub fn msix_hole(table_offset: u64, entries: u16, bar_size: u64) -> Option<(u64, u64)> {
    if entries == 0 || entries > MSIX_MAX_ENTRIES || !table_offset.is_multiple_of(8) {
        return None;
    }
    let bytes = u64::from(entries) * MSIX_ENTRY_BYTES;
    if !(table_offset <= bar_size && bytes <= bar_size - table_offset) {
        return None;
    }
    let start = table_offset & !(PAGE - 1);
    let end = (table_offset + bytes).next_multiple_of(PAGE);
    Some((start, end - start))
}

/// The straight-through pieces of a BAR of `bar_size` bytes around an
/// optional hole `(offset, len)`: `(offset, len)` ranges, the one before
/// the hole and the one after it, empty ones left out.
pub fn bar_pieces(bar_size: u64, hole: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    match hole {
        None => vec![(0, bar_size)],
        Some((off, len)) => {
            let mut v = Vec::new();
            if off > 0 {
                v.push((0, off));
            }
            let end = off.saturating_add(len);
            if end < bar_size {
                v.push((end, bar_size - end));
            }
            v
        }
    }
}

/// A memory BAR of a passthrough device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR index (0-5).
    pub index: u8,
    /// Size in bytes (a power of two, at least 4 KiB).
    pub size: u64,
}

/// What a passthrough device looks like to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its address on the host.
    pub bdf: Bdf,
    /// Its memory BARs.
    pub bars: Vec<BarSpec>,
    /// Its MSI-X capability, if any.
    pub msix: Option<MsixCap>,
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address (low and high dwords).
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// A test double standing in for a passthrough device on a host without
/// one (no VFIO device here): each memory BAR is a device-memory segment
/// of the VM named `ppt-BB-DD-F-barN`, and it keeps the pending bits of
/// its MSI-X vectors. It is the device side only; the model around it
/// (wiring, domain, hole, table emulation) is the real one.
#[derive(Debug)]
pub struct TestDoubleDevice {
    spec: DeviceSpec,
    /// Segment id of each BAR, in `spec.bars` order.
    segments: Vec<u32>,
}

impl TestDoubleDevice {
    /// Creates the double's BAR segments in `vm`. Refused for a BAR size
    /// that is not a power of two of at least 4 KiB, duplicate BAR indexes,
    /// or an MSI-X capability that does not fit; on an error no segment is
    /// left behind.
    pub fn create<P: TablePages + Send + Sync>(vm: &Vm<P>, spec: DeviceSpec) -> Result<Self> {
        check_spec(&spec)?;
        let mut segments = Vec::new();
        for b in &spec.bars {
            let made = vm.free_segment_id().ok_or(Error::NoSpace).and_then(|id| {
                let name =
                    format!("ppt-{:02x}-{:02x}-{}-bar{}", spec.bdf.bus, spec.bdf.device, spec.bdf.function, b.index);
                vm.alloc_segment(id, b.size, SegmentKind::DevMem { name }).map(|()| id)
            });
            match made {
                Ok(id) => segments.push(id),
                Err(e) => {
                    for id in segments {
                        let _ = vm.free_segment(id);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(TestDoubleDevice { spec, segments })
    }

    /// The device's description.
    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    /// The segment backing BAR `index`.
    pub fn bar_segment(&self, index: u8) -> Option<u32> {
        self.spec.bars.iter().position(|b| b.index == index).map(|i| self.segments[i])
    }
}

fn check_spec(spec: &DeviceSpec) -> Result<()> {
    for (i, b) in spec.bars.iter().enumerate() {
        if b.index > 5
            || b.size < PAGE
            || !b.size.is_power_of_two()
            || spec.bars[..i].iter().any(|o| o.index == b.index)
        {
            return Err(PassthroughError::BadBar(b.index));
        }
    }
    if let Some(m) = spec.msix {
        let size = |bar: u8| spec.bars.iter().find(|b| b.index == bar).map(|b| b.size);
        let tsize = size(m.table_bar).ok_or(PassthroughError::BadMsix)?;
        let psize = size(m.pba_bar).ok_or(PassthroughError::BadMsix)?;
        msix_hole(m.table_offset, m.entries, tsize).ok_or(PassthroughError::BadMsix)?;
        let pba = m.pba_bytes();
        if !(m.pba_offset.is_multiple_of(8) && m.pba_offset <= psize && pba <= psize - m.pba_offset) {
            return Err(PassthroughError::BadMsix);
        }
    }
    Ok(())
}

struct Attached {
    dev: TestDoubleDevice,
    /// Guest address of each mapped BAR, in `spec.bars` order.
    mapped: Vec<Option<u64>>,
    /// The MSI-X table the guest programs (emulated).
    table: Vec<MsixEntry>,
    /// The device's pending bits (one per entry).
    pending: Vec<u64>,
}

impl Attached {
    /// The MSI-X hole of BAR slot `i` if it holds the table.
    fn hole(&self, i: usize) -> Option<(u64, u64)> {
        let b = self.dev.spec.bars[i];
        let m = self.dev.spec.msix?;
        if m.table_bar != b.index {
            return None;
        }
        msix_hole(m.table_offset, m.entries, b.size)
    }
}

/// The passthrough state of a VM: its tunables, its IOMMU domain (if one
/// exists), the attached devices and their MSI-X tables.
pub struct Passthrough<P: TablePages, Q: TablePages> {
    vm: Arc<Vm<P>>,
    tunables: IommuTunables,
    /// The domain's tables, made up front (a root page) but attached to
    /// the VM — the domain brought into being — only when needed.
    tables: Arc<IommuDomain<Q>>,
    domain: Mutex<Option<Arc<IommuDomain<Q>>>>,
    devices: Mutex<Vec<Attached>>,
    table_accesses: AtomicU64,
}

impl<P: TablePages, Q: TablePages> std::fmt::Debug for Passthrough<P, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough").field("tunables", &self.tunables).finish_non_exhaustive()
    }
}

impl<P: TablePages + Send + Sync + 'static, Q: TablePages + Send + Sync + 'static> Passthrough<P, Q> {
    /// The passthrough state of `vm`. The IOMMU domain (id `domain_id`,
    /// tables of `format` in `pages`) is created now when
    /// `tunables.force` (and `enable`) are set, else when the first device
    /// is attached.
    pub fn new(vm: Arc<Vm<P>>, tunables: IommuTunables, domain_id: u16, format: PteFormat, pages: Q) -> Result<Self> {
        let p = Passthrough {
            vm,
            tunables,
            tables: Arc::new(IommuDomain::new(domain_id, format, pages)?),
            domain: Mutex::new(None),
            devices: Mutex::new(Vec::new()),
            table_accesses: AtomicU64::new(0),
        };
        if tunables.enable && tunables.force {
            p.ensure_domain()?;
        }
        Ok(p)
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm<P>> {
        &self.vm
    }

    /// The IOMMU domain, once there is one.
    pub fn domain(&self) -> Option<Arc<IommuDomain<Q>>> {
        lock(&self.domain).clone()
    }

    fn ensure_domain(&self) -> Result<Arc<IommuDomain<Q>>> {
        let mut d = lock(&self.domain);
        if let Some(d) = &*d {
            return Ok(d.clone());
        }
        // On an error the VM took back what the tables accepted: they are
        // empty again for the next attempt.
        self.vm.attach_dma_mirror(self.tables.clone())?;
        *d = Some(self.tables.clone());
        Ok(self.tables.clone())
    }

    /// Attaches a passthrough device (bhyve's `vm_assign_pptdev`): wires
    /// the VM's memory, creates the IOMMU domain if there is none yet, and
    /// starts with every MSI-X entry masked. Refused when the IOMMU is
    /// disabled or the device is attached already; on an error the device
    /// is not attached (memory stays wired and a domain stays, as on
    /// FreeBSD).
    pub fn attach(&self, dev: TestDoubleDevice) -> Result<()> {
        if !self.tunables.enable {
            return Err(PassthroughError::IommuDisabled);
        }
        check_spec(&dev.spec)?;
        let mut devs = lock(&self.devices);
        if devs.iter().any(|a| a.dev.spec.bdf == dev.spec.bdf) {
            return Err(PassthroughError::DuplicateDevice(dev.spec.bdf));
        }
        self.vm.wire_memory()?;
        self.ensure_domain()?;
        let entries = dev.spec.msix.map_or(0, |m| usize::from(m.entries));
        let masked = MsixEntry { control: MSIX_MASKED, ..Default::default() };
        devs.push(Attached {
            mapped: vec![None; dev.spec.bars.len()],
            table: vec![masked; entries],
            pending: vec![0; entries.div_ceil(64)],
            dev,
        });
        Ok(())
    }

    /// Detaches device `bdf` (its BARs must be unmapped) and hands its
    /// double back.
    pub fn detach(&self, bdf: Bdf) -> Result<TestDoubleDevice> {
        let mut devs = lock(&self.devices);
        let i = devs.iter().position(|a| a.dev.spec.bdf == bdf).ok_or(PassthroughError::UnknownDevice(bdf))?;
        if let Some(k) = devs[i].mapped.iter().position(Option::is_some) {
            return Err(PassthroughError::BarState(devs[i].dev.spec.bars[k].index));
        }
        Ok(devs.remove(i).dev)
    }

    /// Maps memory BAR `bar` of device `bdf` at guest address `gpa` (where
    /// the guest programmed it): the BAR object straight through, except
    /// the MSI-X table's pages, which stay unmapped so that accesses trap
    /// to [`MmioDevices`]. `gpa` must be aligned to the BAR's size. All
    /// pieces are mapped or none.
    pub fn map_bar(&self, bdf: Bdf, bar: u8, gpa: u64) -> Result<()> {
        let mut devs = lock(&self.devices);
        let a = devs.iter_mut().find(|a| a.dev.spec.bdf == bdf).ok_or(PassthroughError::UnknownDevice(bdf))?;
        let i = a.dev.spec.bars.iter().position(|b| b.index == bar).ok_or(PassthroughError::UnknownBar(bar))?;
        let b = a.dev.spec.bars[i];
        if a.mapped[i].is_some() {
            return Err(PassthroughError::BarState(bar));
        }
        if !gpa.is_multiple_of(b.size) || gpa.checked_add(b.size).is_none() {
            return Err(PassthroughError::Misaligned);
        }
        let id = a.dev.segments[i];
        let mut done: Vec<(u64, u64)> = Vec::new();
        for (off, len) in bar_pieces(b.size, a.hole(i)) {
            match self.map_bar_piece(b.size, id, gpa, off, len) {
                Ok(()) => done.push((gpa + off, len)),
                Err(e) => {
                    for &(g, l) in done.iter().rev() {
                        let _ = self.vm.unmap(g, l);
                    }
                    return Err(e);
                }
            }
        }
        a.mapped[i] = Some(gpa);
        Ok(())
    }

    /// Maps one straight-through piece `[off, off+len)` of a BAR of
    /// `bar_size` bytes, checking that it lies inside the BAR (the
    /// containment rule for BAR objects).
    fn map_bar_piece(&self, bar_size: u64, id: u32, gpa: u64, off: u64, len: u64) -> Result<()> {
        if !(off <= bar_size && len <= bar_size - off) {
            return Err(PassthroughError::Vm(Error::OutsideSegment));
        }
        self.vm.map_segment(gpa + off, id, off, len, Some(Prot::READ | Prot::WRITE))?;
        Ok(())
    }

    /// Unmaps memory BAR `bar` of device `bdf` (before the guest moves it).
    pub fn unmap_bar(&self, bdf: Bdf, bar: u8) -> Result<()> {
        let mut devs = lock(&self.devices);
        let a = devs.iter_mut().find(|a| a.dev.spec.bdf == bdf).ok_or(PassthroughError::UnknownDevice(bdf))?;
        let i = a.dev.spec.bars.iter().position(|b| b.index == bar).ok_or(PassthroughError::UnknownBar(bar))?;
        let gpa = a.mapped[i].ok_or(PassthroughError::BarState(bar))?;
        let size = a.dev.spec.bars[i].size;
        for (off, len) in bar_pieces(size, a.hole(i)) {
            self.vm.unmap(gpa + off, len)?;
        }
        a.mapped[i] = None;
        Ok(())
    }

    /// The MSI-X entry `k` of device `bdf` as the guest programmed it.
    pub fn msix_entry(&self, bdf: Bdf, k: u16) -> Option<MsixEntry> {
        let devs = lock(&self.devices);
        let a = devs.iter().find(|a| a.dev.spec.bdf == bdf)?;
        a.table.get(usize::from(k)).copied()
    }

    /// The device raises MSI-X vector `k`: the message (address, data) to
    /// deliver when the entry is unmasked, else `None` with the entry's
    /// pending bit set (delivered by the unmasking write, see
    /// [`Passthrough::take_unmasked`]).
    pub fn raise(&self, bdf: Bdf, k: u16) -> Option<(u64, u32)> {
        let mut devs = lock(&self.devices);
        let a = devs.iter_mut().find(|a| a.dev.spec.bdf == bdf)?;
        let e = *a.table.get(usize::from(k))?;
        if e.control & MSIX_MASKED != 0 {
            a.pending[usize::from(k) / 64] |= 1 << (k % 64);
            None
        } else {
            Some((e.addr, e.data))
        }
    }

    /// Messages of entries that were pending and have been unmasked since:
    /// their pending bits are cleared and the messages returned (the
    /// device sends them once unmasked, per the PCI spec's MSI-X rules).
    pub fn take_unmasked(&self, bdf: Bdf) -> Vec<(u16, u64, u32)> {
        let mut devs = lock(&self.devices);
        let Some(a) = devs.iter_mut().find(|a| a.dev.spec.bdf == bdf) else { return Vec::new() };
        let mut out = Vec::new();
        for (k, e) in a.table.iter().enumerate() {
            let (w, bit) = (k / 64, 1u64 << (k % 64));
            if a.pending[w] & bit != 0 && e.control & MSIX_MASKED == 0 {
                a.pending[w] &= !bit;
                out.push((k as u16, e.addr, e.data));
            }
        }
        out
    }

    /// Accesses to the MSI-X table pages that were emulated or forwarded.
    pub fn table_accesses(&self) -> u64 {
        self.table_accesses.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a trapped access landed.
enum Target {
    /// Byte `off` of the MSI-X table of device slot `dev`.
    Table { dev: usize, off: u64 },
    /// Byte `off` of the PBA.
    Pba { dev: usize, off: u64 },
    /// Byte `off` of BAR slot `bar`'s object (forwarded to the device).
    Bar { dev: usize, bar: usize, off: u64 },
}

fn find(devs: &[Attached], gpa: u64) -> Option<Target> {
    for (d, a) in devs.iter().enumerate() {
        for (i, g) in a.mapped.iter().enumerate() {
            let (Some(g), Some((hoff, hlen))) = (*g, a.hole(i)) else { continue };
            if gpa < g + hoff || gpa - (g + hoff) >= hlen {
                continue;
            }
            let off = gpa - g;
            let m = a.dev.spec.msix.expect("a hole means MSI-X");
            if off >= m.table_offset && off - m.table_offset < m.table_bytes() {
                return Some(Target::Table { dev: d, off: off - m.table_offset });
            }
            let pba_here = m.pba_bar == a.dev.spec.bars[i].index;
            if pba_here && off >= m.pba_offset && off - m.pba_offset < m.pba_bytes() {
                return Some(Target::Pba { dev: d, off: off - m.pba_offset });
            }
            return Some(Target::Bar { dev: d, bar: i, off });
        }
    }
    None
}

impl<P: TablePages + Send + Sync + 'static, Q: TablePages + Send + Sync + 'static> MmioDevices for Passthrough<P, Q> {
    fn claims(&self, gpa: u64) -> bool {
        find(&lock(&self.devices), gpa).is_some()
    }

    fn read(&self, _vcpu: usize, gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
        let devs = lock(&self.devices);
        self.table_accesses.fetch_add(1, Ordering::Relaxed);
        match find(&devs, gpa) {
            Some(Target::Table { dev, off }) => {
                let e = devs[dev].table[(off / MSIX_ENTRY_BYTES) as usize];
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&e.addr.to_le_bytes());
                bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
                bytes[12..].copy_from_slice(&e.control.to_le_bytes());
                copy_field(&bytes, (off % MSIX_ENTRY_BYTES) as usize, data);
            }
            Some(Target::Pba { dev, off }) => {
                let bytes: Vec<u8> = devs[dev].pending.iter().flat_map(|w| w.to_le_bytes()).collect();
                copy_field(&bytes, off as usize, data);
            }
            Some(Target::Bar { dev, bar, off }) => {
                let _ = self.vm.read_segment(devs[dev].dev.segments[bar], off, data);
            }
            None => {}
        }
    }

    fn write(&self, _vcpu: usize, gpa: u64, data: &[u8]) {
        let mut devs = lock(&self.devices);
        self.table_accesses.fetch_add(1, Ordering::Relaxed);
        match find(&devs, gpa) {
            Some(Target::Table { dev, off }) => {
                // Accesses are dword or qword aligned (PCI spec); anything
                // else is dropped, as hardware may.
                let in_entry = (off % MSIX_ENTRY_BYTES) as usize;
                if !(data.len() == 4 || data.len() == 8) || !in_entry.is_multiple_of(data.len()) {
                    return;
                }
                let e = &mut devs[dev].table[(off / MSIX_ENTRY_BYTES) as usize];
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&e.addr.to_le_bytes());
                bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
                bytes[12..].copy_from_slice(&e.control.to_le_bytes());
                bytes[in_entry..in_entry + data.len()].copy_from_slice(data);
                e.addr = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
                e.data = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
                e.control = u32::from_le_bytes(bytes[12..].try_into().expect("4 bytes"));
            }
            // The PBA is read-only; writes are ignored (PCI spec).
            Some(Target::Pba { .. }) => {}
            Some(Target::Bar { dev, bar, off }) => {
                let _ = self.vm.write_segment(devs[dev].dev.segments[bar], off, data);
            }
            None => {}
        }
    }
}

/// Copies `out.len()` bytes of `field` from `off` (bytes past its end
/// read as all-ones, as a master abort would).
fn copy_field(field: &[u8], off: usize, out: &mut [u8]) {
    for (k, o) in out.iter_mut().enumerate() {
        *o = off.checked_add(k).and_then(|i| field.get(i)).copied().unwrap_or(0xff);
    }
}
