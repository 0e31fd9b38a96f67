//! The VM: one vmspace and its memory segments (bhyve's memseg interface).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use vmspace::{DirtyOp, Gpa, Pfn, Prot, Reservoir, SpaceConfig, TablePages, VmObject, VmSpace};

use crate::devmem::{DevMemReservoir, MemoryExposure, VmDir};
use crate::error::{Error, Result};

/// Bytes in a page.
const PAGE: u64 = 4096;

/// Segment ids are `0 .. MAX_SEGMENTS`.
pub const MAX_SEGMENTS: u32 = 64;

/// Frames reserved per device-memory segment are rounded up to this many
/// (2 MiB), so that segments never share a 2 MiB frame region.
const DEVMEM_ALIGN_FRAMES: u64 = 512;

/// What a segment is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// Guest RAM, from the VM's reservoir in 4 KiB chunks; mapped with any
    /// protection the table format can express (read-write-execute by
    /// default).
    SysMem,
    /// Named device memory (a boot ROM, a framebuffer) with a host node that
    /// other processes map by name; mapped read-only or read-write, or
    /// read-execute (never writable and executable at once); read-write by
    /// default.
    DevMem {
        /// The node's name (see [`crate::devmem::check_name`]).
        name: String,
    },
}

/// A read-only description of a segment.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// Its id.
    pub id: u32,
    /// Length in bytes.
    pub len: u64,
    /// What it is.
    pub kind: SegmentKind,
    /// The host node of device memory.
    pub node: Option<PathBuf>,
    /// How many guest mappings it has now.
    pub mappings: usize,
}

/// One guest mapping of a segment range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentMapping {
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// The segment mapped.
    pub segment: u32,
    /// Byte offset in the segment of the first page.
    pub offset: u64,
    /// Protection.
    pub prot: Prot,
}

struct Segment {
    len: u64,
    kind: SegmentKind,
    object: Arc<VmObject>,
    /// Device memory: the node (for its path and host view).
    node: Option<Arc<DevMemReservoir>>,
    /// Device memory, while dirty tracking is on: the contents at the last
    /// harvest, to find pages written through host views.
    shadow: Option<Vec<u8>>,
}

struct State {
    segments: BTreeMap<u32, Segment>,
    maps: BTreeMap<u64, SegmentMapping>,
    next_devmem_frame: u64,
    /// System memory is populated when mapped and stays resident (a VM
    /// with a passthrough device: DMA never faults).
    wired: bool,
    /// Follows every system-memory mapping (an IOMMU domain).
    mirror: Option<Arc<dyn DmaMirror>>,
}

/// Something that follows a VM's system-memory mappings: an IOMMU domain
/// whose I/O page tables must translate guest-physical addresses to the
/// same frames as the VM's own tables (bhyve's `iommu_create_mapping` /
/// `iommu_remove_mapping` on every sysmem map and unmap of a passthrough
/// guest). Device memory is not mirrored (bhyve maps only sysmem into a
/// domain).
pub trait DmaMirror: Send + Sync {
    /// `[gpa, gpa+len)` now maps `object` from byte `offset` with `prot`.
    /// On an error the mirror must have changed nothing; the VM then undoes
    /// the mapping and reports the error.
    fn map(&self, gpa: u64, object: &VmObject, offset: u64, len: u64, prot: Prot) -> Result<()>;
    /// `[gpa, gpa+len)` (a range an earlier `map` covered) is going away:
    /// called before the VM's own tables change, so no DMA reaches the
    /// frames once the unmap returns.
    fn unmap(&self, gpa: u64, len: u64);
}

/// How a VM is created.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The VM's name: its device-memory nodes live in
    /// [`crate::devmem::vm_dir`]`(name)`.
    pub name: String,
    /// The address space.
    pub space: SpaceConfig,
    /// First frame number handed to device-memory segments (a backend
    /// chooses it clear of the reservoir's and the table pages' frames).
    pub devmem_frame_base: Pfn,
    /// Frames available to device memory from `devmem_frame_base`.
    pub devmem_frames: u64,
}

/// A VM's memory: a vmspace plus memory segments, with bhyve's semantics
/// (FreeBSD `vm_alloc_memseg` / `vm_mmap_memseg` / `vm_munmap_memseg` /
/// `vm_get_memseg` / `vm_mmap_getnext`).
///
/// A segment is allocated once under an id, then ranges of it are mapped
/// at guest-physical addresses, possibly several at once (aliases: every
/// alias reaches the same memory). A segment lives while it is mapped (it
/// cannot be freed then), held (a page hold keeps its object), or open (a
/// process that mapped a device-memory node keeps that memory). Every bad
/// argument is refused with a typed [`Error`] and changes nothing.
pub struct Vm<P: TablePages> {
    name: String,
    space: VmSpace<P>,
    ram: Arc<dyn Reservoir>,
    exposure: Arc<dyn MemoryExposure>,
    devmem_base: Pfn,
    devmem_frames: u64,
    state: Mutex<State>,
    // Last: the node directory goes after the nodes in it.
    dir: VmDir,
}

impl<P: TablePages> std::fmt::Debug for Vm<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("name", &self.name).finish_non_exhaustive()
    }
}

fn check_aligned(v: u64) -> Result<()> {
    if v.is_multiple_of(PAGE) { Ok(()) } else { Err(Error::Unaligned) }
}

fn space_err(e: vmspace::Error) -> Error {
    use vmspace::{Error as E, Invalid};
    match e {
        E::NoSpace(_) => Error::NoSpace,
        E::NotFound => Error::NotMapped,
        E::Invalid(Invalid::BadProt) => Error::BadProt,
        E::Invalid(Invalid::Overflow) | E::Overflow => Error::Overflow,
        E::Invalid(Invalid::Unaligned) => Error::Unaligned,
        E::Invalid(Invalid::ZeroLength) => Error::BadLength,
        E::Invalid(Invalid::OutsideObject) => Error::OutsideSegment,
        e => Error::Space(e),
    }
}

impl<P: TablePages + Send + Sync> Vm<P> {
    /// A VM with no segments: an address space of `config.space` whose table
    /// pages come from `pages`, system memory from `ram`, and device memory
    /// exposed to the hypervisor through `exposure`. Creates the VM's node
    /// directory ([`Error::VmNameInUse`] while a live VM has the name).
    pub fn new(config: VmConfig, pages: P, ram: Arc<dyn Reservoir>, exposure: Arc<dyn MemoryExposure>) -> Result<Self> {
        if config.devmem_frame_base.0.checked_add(config.devmem_frames).is_none() {
            return Err(Error::Overflow);
        }
        let dir = VmDir::create(&config.name)?;
        let space = VmSpace::new(config.space, pages).map_err(space_err)?;
        Ok(Vm {
            name: config.name,
            space,
            ram,
            exposure,
            devmem_base: config.devmem_frame_base,
            devmem_frames: config.devmem_frames,
            state: Mutex::new(State {
                segments: BTreeMap::new(),
                maps: BTreeMap::new(),
                next_devmem_frame: 0,
                wired: false,
                mirror: None,
            }),
            dir,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address space (for clients, faults, holds and the table).
    pub fn space(&self) -> &VmSpace<P> {
        &self.space
    }

    /// The directory of the VM's device-memory nodes.
    pub fn node_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere with the lock held left no half-made change:
        // every operation validates first and changes the maps last.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, locked, for a new segment `id` of `len` bytes: refused
    /// for an id beyond [`MAX_SEGMENTS`] or in use, and a zero, unaligned
    /// or oversized length.
    fn new_segment_state(&self, id: u32, len: u64) -> Result<MutexGuard<'_, State>> {
        if id >= MAX_SEGMENTS {
            return Err(Error::BadSegmentId(id));
        }
        if len == 0 || !len.is_multiple_of(PAGE) || len > isize::MAX as u64 {
            return Err(Error::BadLength);
        }
        let st = self.state();
        if st.segments.contains_key(&id) {
            return Err(Error::DuplicateSegment(id));
        }
        Ok(st)
    }

    /// Allocates segment `id` of `len` bytes (bhyve's `vm_alloc_memseg`).
    /// System memory comes from the reservoir in aligned 2 MiB runs where
    /// it has them, 4 KiB frames otherwise; device memory
    /// gets a node named `name` that other processes can map
    /// ([`crate::devmem::open`]). Refused: an id beyond [`MAX_SEGMENTS`], an
    /// id in use, a zero or unaligned length, a bad or duplicate name, a
    /// full reservoir or device-memory frame range.
    pub fn alloc_segment(&self, id: u32, len: u64, kind: SegmentKind) -> Result<()> {
        let mut st = self.new_segment_state(id, len)?;
        let (object, node) = match &kind {
            SegmentKind::SysMem => (VmObject::ram(self.ram.clone(), len)?, None),
            SegmentKind::DevMem { name } => {
                crate::devmem::check_name(name).map_err(Error::BadName)?;
                if st.segments.values().any(|s| s.kind == kind) {
                    return Err(Error::NameInUse);
                }
                let frames = len / PAGE;
                let reserved = frames.div_ceil(DEVMEM_ALIGN_FRAMES) * DEVMEM_ALIGN_FRAMES;
                let first = st.next_devmem_frame;
                if reserved > self.devmem_frames - first {
                    return Err(Error::Space(vmspace::Error::ReservoirFull));
                }
                let base = Pfn(self.devmem_base.0 + first);
                let node = Arc::new(DevMemReservoir::create(&self.dir, name, len, base, self.exposure.clone())?);
                let object = VmObject::ram(node.clone(), len)?;
                st.next_devmem_frame = first + reserved;
                (object, Some(node))
            }
        };
        let shadow = self.devmem_shadow(&object, &node);
        st.segments.insert(id, Segment { len, kind, object, node, shadow });
        Ok(())
    }

    /// Allocates segment `id` as *swappable* system memory of `len` bytes
    /// (`vmspace::VmObject::swappable`): its pages take reservoir frames
    /// when first touched, may be swapped out to `swap` (a file of ours,
    /// e.g. `vmspace::swap_file_in`) by [`VmSpace::swap_out`] or by a fault
    /// that finds the reservoir exhausted, and come back on the next
    /// access, so the segment may be larger than the reservoir. It is
    /// [`SegmentKind::SysMem`] otherwise. Refused as
    /// [`Vm::alloc_segment`], and while memory is wired or a DMA mirror is
    /// attached ([`Error::Backend`]: a device's DMA cannot follow pages
    /// that move).
    pub fn alloc_swappable_segment(&self, id: u32, len: u64, swap: std::fs::File) -> Result<()> {
        let mut st = self.new_segment_state(id, len)?;
        if st.wired || st.mirror.is_some() {
            return Err(Error::Backend("swappable memory cannot be wired or DMA-mirrored".into()));
        }
        let object = VmObject::swappable(self.ram.clone(), len, swap)?;
        st.segments.insert(id, Segment { len, kind: SegmentKind::SysMem, object, node: None, shadow: None });
        Ok(())
    }

    /// The accounting of the system-memory reservoir.
    pub fn ram_stats(&self) -> vmspace::ReservoirStats {
        self.ram.stats()
    }

    /// Whether any segment is swappable system memory.
    fn has_swappable(st: &State) -> bool {
        st.segments.values().any(|s| s.object.is_swappable())
    }

    /// A copy of device memory for the harvest's comparison, while dirty
    /// tracking is on.
    fn devmem_shadow(&self, object: &VmObject, node: &Option<Arc<DevMemReservoir>>) -> Option<Vec<u8>> {
        let node = node.as_ref()?;
        if !self.space.dirty_tracking() {
            return None;
        }
        let mut v = vec![0u8; object.size() as usize];
        copy_out(node, 0, &mut v);
        Some(v)
    }

    /// Frees segment `id` (the VM's reference to it). Refused while it is
    /// mapped ([`Error::SegmentMapped`]); holds taken earlier keep its
    /// memory until they are released, and processes that opened its node
    /// keep theirs.
    pub fn free_segment(&self, id: u32) -> Result<()> {
        let mut st = self.state();
        if !st.segments.contains_key(&id) {
            return Err(Error::UnknownSegment(id));
        }
        if st.maps.values().any(|m| m.segment == id) {
            return Err(Error::SegmentMapped(id));
        }
        st.segments.remove(&id);
        Ok(())
    }

    /// Segment `id` (bhyve's `vm_get_memseg`).
    pub fn segment(&self, id: u32) -> Result<SegmentInfo> {
        let st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        Ok(Self::info(&st, id, s))
    }

    /// The memory object behind segment `id` (for a backend's host view of
    /// it; guest access goes through mappings and holds).
    pub fn segment_object(&self, id: u32) -> Result<Arc<VmObject>> {
        let st = self.state();
        Ok(st.segments.get(&id).ok_or(Error::UnknownSegment(id))?.object.clone())
    }

    /// The lowest segment id not in use, if any.
    pub fn free_segment_id(&self) -> Option<u32> {
        let st = self.state();
        (0..MAX_SEGMENTS).find(|id| !st.segments.contains_key(id))
    }

    /// Every segment, by id.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = self.state();
        st.segments.iter().map(|(id, s)| Self::info(&st, *id, s)).collect()
    }

    fn info(st: &State, id: u32, s: &Segment) -> SegmentInfo {
        SegmentInfo {
            id,
            len: s.len,
            kind: s.kind.clone(),
            node: s.node.as_ref().map(|n| n.path().to_path_buf()),
            mappings: st.maps.values().filter(|m| m.segment == id).count(),
        }
    }

    /// Maps `len` bytes of segment `id` from byte `offset` at `gpa` with
    /// `prot` (the kind's default when `None`): bhyve's `vm_mmap_memseg`.
    /// Refused: unknown segment, zero or unaligned values, overflow, a range
    /// beyond the segment, an overlap or a range beyond the space, a
    /// protection the kind does not allow (see [`SegmentKind`]) or the
    /// table format cannot express.
    pub fn map_segment(&self, gpa: u64, id: u32, offset: u64, len: u64, prot: Option<Prot>) -> Result<()> {
        let mut st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        if len == 0 {
            return Err(Error::BadLength);
        }
        check_aligned(gpa)?;
        check_aligned(offset)?;
        check_aligned(len)?;
        gpa.checked_add(len).ok_or(Error::Overflow)?;
        let end = offset.checked_add(len).ok_or(Error::Overflow)?;
        if end > s.len {
            return Err(Error::OutsideSegment);
        }
        let prot = match (&s.kind, prot) {
            (SegmentKind::SysMem, None) => Prot::RWX,
            (SegmentKind::DevMem { .. }, None) => Prot::RW,
            (_, Some(p)) if p.is_empty() => return Err(Error::BadProt),
            (SegmentKind::SysMem, Some(p)) => p,
            (SegmentKind::DevMem { .. }, Some(p)) => {
                if !p.contains(Prot::READ) || p.contains(Prot::WRITE | Prot::EXEC) {
                    return Err(Error::BadProt);
                }
                p
            }
        };
        self.space.map(&s.object, offset, Gpa(gpa), len, prot).map_err(space_err)?;
        if s.kind == SegmentKind::SysMem {
            let object = s.object.clone();
            if let Err(e) = self.follow_sysmem_map(&st, gpa, &object, offset, len, prot) {
                let _ = self.space.unmap(Gpa(gpa), len);
                return Err(e);
            }
        }
        st.maps.insert(gpa, SegmentMapping { gpa: Gpa(gpa), len, segment: id, offset, prot });
        Ok(())
    }

    /// What a new system-memory mapping needs besides the vmspace's: made
    /// resident when memory is wired, and mirrored into the DMA mirror.
    fn follow_sysmem_map(
        &self,
        st: &State,
        gpa: u64,
        object: &VmObject,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        if st.wired {
            self.space.populate(Gpa(gpa), len).map_err(space_err)?;
        }
        if let Some(m) = &st.mirror {
            m.map(gpa, object, offset, len, prot)?;
        }
        Ok(())
    }

    /// Wires system memory (bhyve's `vm_assign_pptdev` wiring the guest):
    /// every system-memory mapping is made resident now, and every later
    /// one when it is mapped, so a device's DMA never needs a fault.
    /// Resident pages of plain system memory stay resident until unmapped;
    /// a VM with swappable memory ([`Vm::alloc_swappable_segment`]) is
    /// refused ([`Error::Backend`]). On an error (the reservoir ran out)
    /// the VM is left unwired.
    pub fn wire_memory(&self) -> Result<()> {
        let mut st = self.state();
        if st.wired {
            return Ok(());
        }
        if Self::has_swappable(&st) {
            return Err(Error::Backend("swappable memory cannot be wired".into()));
        }
        for m in st.maps.values() {
            if st.segments.get(&m.segment).is_some_and(|s| s.kind == SegmentKind::SysMem) {
                self.space.populate(m.gpa, m.len).map_err(space_err)?;
            }
        }
        st.wired = true;
        Ok(())
    }

    /// Whether system memory is wired ([`Vm::wire_memory`]).
    pub fn is_wired(&self) -> bool {
        self.state().wired
    }

    /// Attaches `mirror`, which from now on follows every system-memory
    /// mapping; the existing ones are given to it first. Refused when a
    /// mirror is attached already ([`Error::Backend`]); on an error from
    /// the mirror the ranges it accepted are taken back and nothing is
    /// attached.
    pub fn attach_dma_mirror(&self, mirror: Arc<dyn DmaMirror>) -> Result<()> {
        let mut st = self.state();
        if st.mirror.is_some() {
            return Err(Error::Backend("a DMA mirror is attached already".into()));
        }
        if Self::has_swappable(&st) {
            return Err(Error::Backend("swappable memory cannot be DMA-mirrored".into()));
        }
        let mut done: Vec<(u64, u64)> = Vec::new();
        for m in st.maps.values() {
            let Some(s) = st.segments.get(&m.segment).filter(|s| s.kind == SegmentKind::SysMem) else { continue };
            if let Err(e) = mirror.map(m.gpa.0, &s.object, m.offset, m.len, m.prot) {
                for &(gpa, len) in done.iter().rev() {
                    mirror.unmap(gpa, len);
                }
                return Err(e);
            }
            done.push((m.gpa.0, m.len));
        }
        st.mirror = Some(mirror);
        Ok(())
    }

    /// Detaches the DMA mirror, taking back every range it was given.
    /// Returns it (`None` when none was attached).
    pub fn detach_dma_mirror(&self) -> Option<Arc<dyn DmaMirror>> {
        let mut st = self.state();
        let mirror = st.mirror.take()?;
        for m in st.maps.values() {
            if st.segments.get(&m.segment).is_some_and(|s| s.kind == SegmentKind::SysMem) {
                mirror.unmap(m.gpa.0, m.len);
            }
        }
        Some(mirror)
    }

    /// Unmaps the mapping that starts at `gpa` and is `len` bytes long
    /// (bhyve's `vm_munmap_memseg`): [`Error::NotMapped`] unless one matches
    /// exactly. vCPUs and other clients are invalidated (vmspace's unmap).
    pub fn unmap(&self, gpa: u64, len: u64) -> Result<()> {
        let mut st = self.state();
        let segment = match st.maps.get(&gpa) {
            Some(m) if m.len == len => m.segment,
            _ => return Err(Error::NotMapped),
        };
        let sysmem = st.segments.get(&segment).is_some_and(|s| s.kind == SegmentKind::SysMem);
        if let (true, Some(mirror)) = (sysmem, &st.mirror) {
            // No DMA reaches the frames once the unmap returns.
            mirror.unmap(gpa, len);
        }
        if let Err(e) = self.space.unmap(Gpa(gpa), len) {
            // Still mapped: give the range back to the mirror.
            if let (true, Some(mirror), Some(s)) = (sysmem, &st.mirror, st.segments.get(&segment)) {
                let m = st.maps[&gpa];
                let _ = mirror.map(gpa, &s.object, m.offset, len, m.prot);
            }
            return Err(space_err(e));
        }
        st.maps.remove(&gpa);
        Ok(())
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> Vec<SegmentMapping> {
        self.state().maps.values().copied().collect()
    }

    /// The first mapping that starts at or after `gpa` (bhyve's
    /// `vm_mmap_getnext`), to iterate without holding a list.
    pub fn mapping_next(&self, gpa: u64) -> Option<SegmentMapping> {
        self.state().maps.range(gpa..).next().map(|(_, m)| *m)
    }

    /// The mapping containing `gpa`.
    pub fn mapping_at(&self, gpa: u64) -> Option<SegmentMapping> {
        let st = self.state();
        let (_, m) = st.maps.range(..=gpa).next_back()?;
        (gpa - m.gpa.0 < m.len).then_some(*m)
    }

    /// Copies `src` into segment `id` at byte `offset` from the host (boot
    /// ROM contents, firmware tables). The pages written are marked dirty in
    /// every guest mapping of them while tracking is on, so no migration
    /// misses them.
    pub fn write_segment(&self, id: u32, offset: u64, src: &[u8]) -> Result<()> {
        let st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        let n = src.len() as u64;
        if !(offset <= s.len && n <= s.len - offset) {
            return Err(Error::OutsideSegment);
        }
        if s.object.is_swappable() {
            // Resident pages in their frames, the others in the swap file.
            s.object.write(offset, src)?;
        } else {
            s.for_each_host_piece(&self.ram, offset, n, |host, at, len| {
                // SAFETY: `host` points at `len` bytes inside one host page of
                // the segment's object, which lives (we hold it); a raw copy
                // from a host buffer, no reference over guest memory.
                unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), host, len) };
            });
        }
        if n > 0 && self.space.dirty_tracking() {
            self.mark_segment_dirty(&st, id, offset, n)?;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of segment `id` at `offset` to the host.
    pub fn read_segment(&self, id: u32, offset: u64, dst: &mut [u8]) -> Result<()> {
        let st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        let n = dst.len() as u64;
        if !(offset <= s.len && n <= s.len - offset) {
            return Err(Error::OutsideSegment);
        }
        if s.object.is_swappable() {
            return Ok(s.object.read(offset, dst)?);
        }
        s.for_each_host_piece(&self.ram, offset, n, |host, at, len| {
            // SAFETY: as in `write_segment`, copying out.
            unsafe { std::ptr::copy_nonoverlapping(host, dst[at..].as_mut_ptr(), len) };
        });
        Ok(())
    }

    /// Which of the `pages` pages (at most 64) of segment `id` from
    /// `offset` (page-aligned) read as zero, bit `i` for the page at
    /// `offset + i * 4096`, checked in place in the segment's memory
    /// without copying it out (a page stops being checked at its first
    /// non-zero word). `None` for a swappable segment, whose pages may lie
    /// in the swap file. The check reads guest memory with raw loads, as
    /// [`Vm::read_segment`] copies it; it sees every write a harvest before
    /// it reported.
    pub fn segment_zero_pages(&self, id: u32, offset: u64, pages: usize) -> Result<Option<u64>> {
        let st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        let n = (pages as u64).checked_mul(PAGE).ok_or(Error::OutsideSegment)?;
        if pages > 64 || !offset.is_multiple_of(PAGE) || !(offset <= s.len && n <= s.len - offset) {
            return Err(Error::OutsideSegment);
        }
        if s.object.is_swappable() {
            return Ok(None);
        }
        let mut mask = 0u64;
        s.for_each_host_piece(&self.ram, offset, n, |host, at, len| {
            // `offset` is page-aligned: every piece is one whole page.
            if host_page_is_zero(host, len) {
                mask |= 1 << (at as u64 / PAGE);
            }
        });
        Ok(Some(mask))
    }

    /// Calls `f` with the host memory of `[offset, offset+n)` of segment
    /// `id` (pieces in order, physically adjacent host pages merged, `n`
    /// bytes in all; the segment's state lock held meanwhile, so the
    /// segment cannot be freed under it), for receiving a migration in
    /// place; returns `f`'s result, or `None` without calling it for a
    /// swappable segment. The pages are marked dirty afterwards while
    /// tracking is on, as [`Vm::write_segment`] does. `f` must only write
    /// the pieces through raw pointers (or the kernel); no vCPU may run
    /// meanwhile if it reads them back ([`crate::migration::RawDest`]).
    pub fn with_segment_host<R>(
        &self,
        id: u32,
        offset: u64,
        n: u64,
        f: impl FnOnce(&[crate::migration::RawDest]) -> R,
    ) -> Result<Option<R>> {
        let st = self.state();
        let s = st.segments.get(&id).ok_or(Error::UnknownSegment(id))?;
        if !(offset <= s.len && n <= s.len - offset) {
            return Err(Error::OutsideSegment);
        }
        if s.object.is_swappable() {
            return Ok(None);
        }
        let mut pieces: Vec<(*mut u8, usize)> = Vec::new();
        s.for_each_host_piece(&self.ram, offset, n, |host, _, len| match pieces.last_mut() {
            Some((p, l)) if p.wrapping_add(*l) == host => *l += len,
            _ => pieces.push((host, len)),
        });
        let dests: Vec<crate::migration::RawDest> = pieces
            .iter()
            // SAFETY: each piece is a run of whole host pages of the
            // segment's object inside its arena's mapping, which lives as
            // long as the segment, held by the state lock we keep until
            // `f` returned; the pieces are disjoint (distinct frames), and
            // the caller's contract (this method's doc) covers references
            // and other writers.
            .filter_map(|&(p, l)| unsafe { crate::migration::RawDest::new(p, l) })
            .collect();
        let r = f(&dests);
        if n > 0 && self.space.dirty_tracking() {
            self.mark_segment_dirty(&st, id, offset, n)?;
        }
        Ok(Some(r))
    }

    /// Marks `[offset, offset+n)` of segment `id` dirty in each of its guest
    /// mappings that covers part of it.
    fn mark_segment_dirty(&self, st: &State, id: u32, offset: u64, n: u64) -> Result<()> {
        let lo = offset & !(PAGE - 1);
        let hi = (offset + n).next_multiple_of(PAGE);
        for m in st.maps.values().filter(|m| m.segment == id && m.prot.contains(Prot::WRITE)) {
            let (a, b) = (lo.max(m.offset), hi.min(m.offset + m.len));
            if a >= b {
                continue;
            }
            let pages = (b - a) / PAGE;
            let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
            self.space.dirty_op(DirtyOp::Set, Gpa(m.gpa.0 + (a - m.offset)), b - a, None, &mut bitmap)?;
        }
        Ok(())
    }

    /// Switches dirty tracking on or off. Turning it on snapshots device
    /// memory, so that [`Vm::harvest_dirty`] also reports pages written
    /// through host views of it.
    pub fn set_dirty_tracking(&self, on: bool) -> Result<()> {
        let mut st = self.state();
        self.space.set_dirty_tracking(on)?;
        for s in st.segments.values_mut() {
            s.shadow = None;
        }
        if on {
            let ids: Vec<u32> = st.segments.keys().copied().collect();
            for id in ids {
                let s = &st.segments[&id];
                let shadow = self.devmem_shadow(&s.object, &s.node);
                st.segments.get_mut(&id).expect("listed").shadow = shadow;
            }
        }
        Ok(())
    }

    /// Read-and-clear the dirty pages of `[gpa, gpa+len)` into `bitmap`
    /// (bit `i` = page `gpa + i * 4096`; see `VmSpace::track_dirty`), and
    /// add every page of a device-memory mapping in the range whose
    /// contents changed since the last harvest, whoever wrote it: the
    /// guest, a hold, or another process through the segment's node.
    /// Returns the number of dirty pages.
    pub fn harvest_dirty(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> Result<u64> {
        let mut st = self.state();
        let mut n = self.space.track_dirty(Gpa(gpa), len, bitmap)?;
        let end = gpa + len;
        let maps: Vec<SegmentMapping> = st.maps.values().copied().collect();
        for m in maps {
            let Some(seg) = st.segments.get_mut(&m.segment) else { continue };
            let (Some(node), Some(shadow)) = (&seg.node, seg.shadow.as_mut()) else { continue };
            let (a, b) = (gpa.max(m.gpa.0), end.min(m.gpa.0 + m.len));
            let mut page = [0u8; PAGE as usize];
            let mut g = a;
            while g < b {
                let off = m.offset + (g - m.gpa.0);
                copy_out(node, off, &mut page);
                let old = &mut shadow[off as usize..(off + PAGE) as usize];
                if old != page {
                    old.copy_from_slice(&page);
                    let i = (g - gpa) / PAGE;
                    let w = &mut bitmap[(i / 64) as usize];
                    if *w & (1 << (i % 64)) == 0 {
                        *w |= 1 << (i % 64);
                        n += 1;
                    }
                }
                g += PAGE;
            }
        }
        Ok(n)
    }
}

impl Segment {
    /// The arena the segment's frames live in.
    fn object_arena(&self, ram: &Arc<dyn Reservoir>) -> vmspace::Arena {
        match &self.node {
            Some(n) => n.arena(),
            None => ram.arena(),
        }
    }

    /// Calls `f(host pointer, buffer offset, bytes)` for each page-sized
    /// piece of `[offset, offset+n)` of the segment (which the caller
    /// checked lies inside it): the pointer addresses `bytes` bytes inside
    /// one host page of the segment's object.
    fn for_each_host_piece(
        &self,
        ram: &Arc<dyn Reservoir>,
        offset: u64,
        n: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) {
        let arena = self.object_arena(ram);
        for_each_page(offset, n, |off, at, len| {
            let pfn = self.object.frame_at(off).expect("inside the segment");
            let p = arena.host_ptr(pfn).expect("segment frames lie in their arena");
            // SAFETY: `off % PAGE + len <= PAGE` (a page piece), so the
            // result stays inside the frame's host page.
            f(unsafe { p.as_ptr().add((off % PAGE) as usize) }, at, len);
        });
    }
}

/// Copies bytes of a device-memory node into `dst` (raw, from the mapping).
fn copy_out(node: &DevMemReservoir, off: u64, dst: &mut [u8]) {
    let arena = node.arena();
    assert!(off <= arena.len as u64 && dst.len() as u64 <= arena.len as u64 - off);
    // SAFETY: in bounds of the node's mapping (checked above), which lives
    // as long as `node`; a raw copy.
    unsafe { std::ptr::copy_nonoverlapping(arena.host.as_ptr().add(off as usize), dst.as_mut_ptr(), dst.len()) };
}

/// Whether the `len` bytes at `host` (a piece of one host page of guest
/// memory) are all zero, read with raw volatile loads of 64 bytes (the
/// memory may be written by a running guest meanwhile: no reference is
/// formed over it); stops at the first non-zero block.
fn host_page_is_zero(host: *const u8, len: usize) -> bool {
    const BLOCK: usize = 64;
    // Pieces of whole pages are page-aligned; another start goes byte by
    // byte.
    let blocks = if (host as usize).is_multiple_of(8) { len / BLOCK } else { 0 };
    for b in 0..blocks {
        // SAFETY: `b * BLOCK + BLOCK <= len`, inside the piece the caller
        // passed (a live host page), and 8-byte aligned (checked above); a
        // volatile read of plain integers, no reference.
        let words = unsafe { std::ptr::read_volatile(host.add(b * BLOCK).cast::<[u64; BLOCK / 8]>()) };
        if words.iter().fold(0, |a, w| a | w) != 0 {
            return false;
        }
    }
    // SAFETY: the tail `[blocks * BLOCK, len)` lies inside the piece.
    (blocks * BLOCK..len).all(|i| unsafe { std::ptr::read_volatile(host.add(i)) } == 0)
}

/// Calls `f(segment offset, buffer offset, bytes)` for each page-sized
/// piece of `[offset, offset+n)`.
fn for_each_page(offset: u64, n: u64, mut f: impl FnMut(u64, usize, usize)) {
    let mut done = 0u64;
    while done < n {
        let off = offset + done;
        let len = (PAGE - off % PAGE).min(n - done);
        f(off, done as usize, len as usize);
        done += len;
    }
}
