//! The memory of a real VM ([`crate::Vm`]) for the migration engine: the
//! memory half of [`MigrationSource`](super::MigrationSource) and
//! [`MigrationTarget`](super::MigrationTarget), which a backend completes
//! with its vCPUs (pause, resume, vCPU state; `vmm-kvm`'s `migrate`).
//!
//! # Addresses: segments, not guest-physical ranges
//!
//! The stream's ranges are the VM's **segments**, one range per segment
//! at `id << SEGMENT_SHIFT` (see [`segment_addr`]), as QEMU migrates RAM
//! blocks rather than guest-physical ranges: a page is the same page
//! whatever the guest does with its mappings meanwhile (a BAR moved, a
//! ROM aliased), and a segment mapped twice is sent once. The mappings
//! themselves travel as the VM-layout state blob ([`VmMemory::layout_blob`])
//! taken at pause, which the target checks against its own.
//!
//! # What is sent, and how nothing is lost
//!
//! - **First pass** ([`VmMemory::resident`]): a system-memory page is
//!   resident when the vmspace has a leaf for it in one of its mappings
//!   (the guest or a host write touched it; a page never touched has none
//!   and is not sent); a device-memory page when its contents are not zero.
//!   A **swappable** system-memory segment
//!   ([`crate::Vm::alloc_swappable_segment`]) sends every page that has
//!   content ([`vmspace::VmObject::page_has_content`]): resident or in the
//!   swap file (a swapped-out page has no leaf, so the table would miss
//!   it), read through [`crate::Vm::read_segment`], which reads a
//!   swapped-out page from the swap file without swapping it in.
//!   Both add the pages **received** by an earlier migration in and not yet
//!   delivered by a successful migration out (propolis 232), and the pages
//!   a failed attempt harvested.
//! - **Harvest** ([`VmMemory::harvest`]): system memory through the dirty
//!   bits of each writable mapping of the segment (through the backend's
//!   [`MemBackend::harvest`], which makes the cleared bits effective before
//!   it returns, so a read after it sees every write it cleared; for a
//!   swappable segment the harvest adds the swapped-dirty bits, so a page
//!   swapped out dirty is reported, and one swapped in clean is not); writes
//!   by holds, by the MMIO emulator (through holds) and by the host
//!   ([`crate::Vm::write_segment`]) set those bits too. Device memory by
//!   comparing the segment's contents with a copy taken at the previous
//!   harvest, mapped or not, whoever wrote it (the guest, a hold, another
//!   process through the segment's node).
//! - **Put back** ([`VmMemory::set_dirty`]): the bits a failed attempt
//!   harvested are kept in an accumulated mask that the next harvest and
//!   the next first pass add, whatever happened to the mappings meanwhile.
//!
//! # Target
//!
//! [`VmMemory::prepare`] checks that the VM (built from the same
//! configuration, as QEMU's `-incoming`) has a segment of the right size
//! and kind for every range; how a segment is backed is not part of the
//! check (a swappable source may migrate to a plain target and back: each
//! side allocates what its own configuration says, and the layout blob
//! names only sizes and kinds). Pages are written through the host view
//! (on a swappable target, into a resident frame or its swap file);
//! a zero record touches only a page that may hold something (written by
//! this attempt, or resident before it); [`VmMemory::discard`] zeroes every
//! page the attempt wrote.
//!
//! # Known gaps
//!
//! - A host write into a system-memory page that no mapping covers sets no
//!   dirty bit (there is none to set): such a page is sent by the first
//!   pass only if some mapping made it resident.
//! - The first pass over a swappable segment reads its swapped-out pages
//!   from the swap file one by one (a `pread` each, no readahead), and a
//!   target with a small reservoir writes what does not fit to its swap
//!   file page by page.
//! - Device memory is compared whole at every harvest: fine for ROMs and
//!   framebuffers, not for gigabytes of device memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use vmspace::TablePages;

use super::{HostError, Layout, MemRange, PAGE_SIZE, RangeKind};
use crate::hv::MemBackend;
use crate::vm::{SegmentKind, Vm};

/// A segment's range starts at `id << SEGMENT_SHIFT` in the stream (so a
/// segment may be up to 1 TiB).
pub const SEGMENT_SHIFT: u32 = 40;

/// The stream address of byte `offset` of segment `id`.
pub fn segment_addr(id: u32, offset: u64) -> u64 {
    (u64::from(id) << SEGMENT_SHIFT) | offset
}

/// The segment and offset of a stream address.
pub fn split_addr(addr: u64) -> (u32, u64) {
    ((addr >> SEGMENT_SHIFT) as u32, addr & ((1 << SEGMENT_SHIFT) - 1))
}

fn err(op: &'static str, e: impl std::fmt::Display) -> HostError {
    HostError::new(op, e.to_string())
}

fn set_bit(b: &mut [u64], i: u64) {
    b[(i / 64) as usize] |= 1 << (i % 64);
}

fn get_bit(b: &[u64], i: u64) -> bool {
    b[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a |= *b;
    }
}

/// The memory side of migrating a [`Vm`] (module doc).
pub struct VmMemory<P: TablePages> {
    vm: Arc<Vm<P>>,
    backend: Option<Arc<dyn MemBackend>>,
    /// Device memory: contents at the last harvest (or first pass).
    shadow: BTreeMap<u32, Vec<u8>>,
    /// Bits of failed attempts, delivered by the next harvest.
    pending: BTreeMap<u32, Vec<u64>>,
    /// Pages received by a migration in and not delivered since.
    received: BTreeMap<u32, Vec<u64>>,
    /// Target, during an attempt: pages it wrote.
    written: BTreeMap<u32, Vec<u64>>,
    /// Target, during an attempt: pages that held data before it.
    before: BTreeMap<u32, Vec<u64>>,
}

impl<P: TablePages + Send + Sync> std::fmt::Debug for VmMemory<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMemory").field("vm", &self.vm.name()).finish_non_exhaustive()
    }
}

impl<P: TablePages + Send + Sync> VmMemory<P> {
    /// The memory of `vm`. System-memory dirty bits are harvested through
    /// `backend` (which makes cleared bits effective for running vCPUs);
    /// without one, through the vmspace directly.
    pub fn new(vm: Arc<Vm<P>>, backend: Option<Arc<dyn MemBackend>>) -> Self {
        VmMemory {
            vm,
            backend,
            shadow: BTreeMap::new(),
            pending: BTreeMap::new(),
            received: BTreeMap::new(),
            written: BTreeMap::new(),
            before: BTreeMap::new(),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm<P>> {
        &self.vm
    }

    /// One range per segment, by id (module doc).
    pub fn layout(&self) -> Result<Layout, HostError> {
        let mut ranges = Vec::new();
        for s in self.vm.segments() {
            if s.len >= 1 << SEGMENT_SHIFT {
                return Err(HostError::new("layout", format!("segment {} is too large ({} bytes)", s.id, s.len)));
            }
            let kind = match s.kind {
                SegmentKind::SysMem => RangeKind::Ram,
                SegmentKind::DevMem { .. } => RangeKind::Device,
            };
            ranges.push(MemRange { gpa: segment_addr(s.id, 0), len: s.len, kind });
        }
        Ok(Layout { ranges })
    }

    fn segment_of(&self, range: &MemRange) -> Result<(u32, RangeKind), HostError> {
        let (id, off) = split_addr(range.gpa);
        let s = self.vm.segment(id).map_err(|e| err("segment", e))?;
        if off != 0 || s.len != range.len {
            return Err(HostError::new(
                "segment",
                format!("range {:#x}+{:#x} is not segment {id}", range.gpa, range.len),
            ));
        }
        Ok((id, if matches!(s.kind, SegmentKind::SysMem) { RangeKind::Ram } else { RangeKind::Device }))
    }

    fn is_swappable(&self, id: u32) -> Result<bool, HostError> {
        Ok(self.vm.segment_object(id).map_err(|e| err("segment", e))?.is_swappable())
    }

    fn contents(&self, id: u32, len: u64) -> Result<Vec<u8>, HostError> {
        let mut v = vec![0u8; len as usize];
        self.vm.read_segment(id, 0, &mut v).map_err(|e| err("read_segment", e))?;
        Ok(v)
    }

    /// The first pass's pages of `range` (module doc) into `bitmap`.
    pub fn resident(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        let (id, kind) = self.segment_of(range)?;
        bitmap.fill(0);
        match kind {
            RangeKind::Ram if self.is_swappable(id)? => {
                // Resident and swapped-out pages alike: a swapped-out page
                // has no leaf. One atomic load per page, no lock.
                let obj = self.vm.segment_object(id).map_err(|e| err("segment", e))?;
                for i in 0..range.pages() {
                    if obj.page_has_content(i * PAGE_SIZE) == Some(true) {
                        set_bit(bitmap, i);
                    }
                }
            }
            RangeKind::Ram => {
                // One table view (one take of the space lock) per 2 MiB,
                // not one per page; short enough that faults wait little.
                const CHUNK: u64 = 512;
                for m in self.vm.mappings().into_iter().filter(|m| m.segment == id) {
                    let first = m.offset / PAGE_SIZE;
                    let pages = m.len / PAGE_SIZE;
                    let mut i = 0;
                    while i < pages {
                        let end = (i + CHUNK).min(pages);
                        self.vm.space().with_table(|t| {
                            for k in i..end {
                                if t.is_mapped(vmspace::Gpa(m.gpa.0 + k * PAGE_SIZE)).is_some() {
                                    set_bit(bitmap, first + k);
                                }
                            }
                        });
                        i = end;
                    }
                }
            }
            RangeKind::Device => {
                let v = self.contents(id, range.len)?;
                for (i, page) in v.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        set_bit(bitmap, i as u64);
                    }
                }
                self.shadow.insert(id, v);
            }
        }
        if let Some(r) = self.received.get(&id) {
            or_into(bitmap, r);
        }
        if let Some(p) = self.pending.get(&id) {
            or_into(bitmap, p);
        }
        Ok(())
    }

    /// Read-and-clear the pages of `range` changed since the last harvest
    /// (module doc), without the bits put back by failed attempts (a
    /// harvest that is not a migration's leaves those for the next one).
    pub fn harvest_fresh(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        let (id, kind) = self.segment_of(range)?;
        bitmap.fill(0);
        match kind {
            RangeKind::Ram => {
                for m in self.vm.mappings().into_iter().filter(|m| m.segment == id) {
                    if !m.prot.contains(vmspace::Prot::WRITE) {
                        continue;
                    }
                    let pages = m.len / PAGE_SIZE;
                    let mut tmp = vec![0u64; pages.div_ceil(64) as usize];
                    match &self.backend {
                        Some(b) => b.harvest(m.gpa.0, m.len, &mut tmp).map(|_| ()).map_err(|e| err("harvest", e))?,
                        None => self
                            .vm
                            .space()
                            .track_dirty(m.gpa, m.len, &mut tmp)
                            .map(|_| ())
                            .map_err(|e| err("harvest", e))?,
                    }
                    let first = m.offset / PAGE_SIZE;
                    for (w, &word) in tmp.iter().enumerate() {
                        let mut word = word;
                        while word != 0 {
                            let b = word.trailing_zeros() as u64;
                            word &= word - 1;
                            let i = w as u64 * 64 + b;
                            if i < pages {
                                set_bit(bitmap, first + i);
                            }
                        }
                    }
                }
            }
            RangeKind::Device => {
                let now = self.contents(id, range.len)?;
                let ps = PAGE_SIZE as usize;
                match self.shadow.get(&id) {
                    Some(old) if old.len() == now.len() => {
                        for (i, (a, b)) in old.chunks_exact(ps).zip(now.chunks_exact(ps)).enumerate() {
                            if a != b {
                                set_bit(bitmap, i as u64);
                            }
                        }
                    }
                    // No copy yet: every page may have changed.
                    _ => {
                        for i in 0..range.pages() {
                            set_bit(bitmap, i);
                        }
                    }
                }
                self.shadow.insert(id, now);
            }
        }
        Ok(())
    }

    /// [`harvest_fresh`](Self::harvest_fresh) plus the bits put back by
    /// failed attempts (which it hands out, once).
    pub fn harvest(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        self.harvest_fresh(range, bitmap)?;
        self.add_pending(range, bitmap)
    }

    /// Add to `bitmap` (and forget) the bits of `range` put back by failed
    /// attempts.
    pub fn add_pending(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        let (id, _) = self.segment_of(range)?;
        if let Some(p) = self.pending.remove(&id) {
            or_into(bitmap, &p);
        }
        Ok(())
    }

    /// Keep the bits of `bitmap` for the next harvest (a failed attempt's).
    pub fn set_dirty(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError> {
        let (id, _) = self.segment_of(range)?;
        let p = self.pending.entry(id).or_insert_with(|| vec![0u64; range.bitmap_words()]);
        or_into(p, bitmap);
        Ok(())
    }

    /// Copy the page at stream address `addr` into `buf`.
    pub fn read_page(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let (id, off) = split_addr(addr);
        self.vm.read_segment(id, off, buf).map_err(|e| err("read_page", e))
    }

    /// Copy the pages at stream address `addr` into `buf` (a whole number
    /// of pages of one segment) with one read of the segment.
    pub fn read_pages(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let (id, off) = split_addr(addr);
        self.vm.read_segment(id, off, buf).map_err(|e| err("read_pages", e))
    }

    /// Which of the `n` pages at stream address `addr` read as zero,
    /// checked in place ([`MigrationSource::zero_mask`](super::MigrationSource::zero_mask));
    /// `None` for a swappable segment.
    pub fn zero_mask(&mut self, addr: u64, n: usize) -> Result<Option<u64>, HostError> {
        let (id, off) = split_addr(addr);
        self.vm.segment_zero_pages(id, off, n).map_err(|e| err("zero_mask", e))
    }

    /// After a successful migration out: the received pages were delivered.
    pub fn migrated_out(&mut self) {
        self.received.clear();
        self.pending.clear();
    }

    /// The segments and mappings, for the VM-layout state blob: one line
    /// per segment (`segment ID LEN sysmem|devmem NAME`) and per mapping
    /// (`map GPA LEN SEGMENT OFFSET PROT`), hexadecimal.
    pub fn layout_blob(&self) -> Vec<u8> {
        let mut s = String::new();
        for seg in self.vm.segments() {
            let kind = match &seg.kind {
                SegmentKind::SysMem => "sysmem -".to_string(),
                SegmentKind::DevMem { name } => format!("devmem {name}"),
            };
            s.push_str(&format!("segment {:x} {:x} {kind}\n", seg.id, seg.len));
        }
        for m in self.vm.mappings() {
            s.push_str(&format!("map {:x} {:x} {:x} {:x} {:x}\n", m.gpa.0, m.len, m.segment, m.offset, m.prot.bits()));
        }
        s.into_bytes()
    }

    /// Check a source's VM-layout blob against this VM: the same segments
    /// and mappings (the target runs the same configuration; device
    /// models that move mappings are not migrated).
    pub fn check_layout_blob(&self, blob: &[u8]) -> Result<(), HostError> {
        let ours = self.layout_blob();
        if ours == blob {
            return Ok(());
        }
        let theirs = String::from_utf8_lossy(blob);
        let ours = String::from_utf8_lossy(&ours);
        let diff: Vec<String> = theirs
            .lines()
            .filter(|l| !ours.lines().any(|o| o == *l))
            .map(|l| format!("source has `{l}`"))
            .chain(ours.lines().filter(|l| !theirs.lines().any(|t| t == *l)).map(|l| format!("target has `{l}`")))
            .collect();
        Err(HostError::new("VM layout", format!("differs: {}", diff.join("; "))))
    }

    // ---- target ----

    /// Check that the VM has every segment of `layout` (same size and
    /// kind) and nothing else; start an attempt.
    pub fn prepare(&mut self, layout: &Layout) -> Result<(), HostError> {
        let ours = self.layout()?;
        if ours.ranges.len() != layout.ranges.len() {
            return Err(HostError::new(
                "prepare",
                format!("the source has {} segments, this VM {}", layout.ranges.len(), ours.ranges.len()),
            ));
        }
        for (a, b) in layout.ranges.iter().zip(&ours.ranges) {
            if a != b {
                let (id, _) = split_addr(a.gpa);
                return Err(HostError::new(
                    "prepare",
                    format!(
                        "segment {id}: the source's is {:#x} bytes of {:?}, this VM's {:#x} of {:?}",
                        a.len, a.kind, b.len, b.kind
                    ),
                ));
            }
        }
        self.written.clear();
        self.before.clear();
        for r in &layout.ranges {
            let mut may = vec![0u64; r.bitmap_words()];
            // What this VM put there itself may be non-zero.
            self.resident(r, &mut may)?;
            let (id, _) = split_addr(r.gpa);
            self.before.insert(id, may);
            self.written.insert(id, vec![0u64; r.bitmap_words()]);
        }
        Ok(())
    }

    /// Write one page at stream address `addr`.
    pub fn write_page(&mut self, addr: u64, data: &[u8]) -> Result<(), HostError> {
        let (id, off) = split_addr(addr);
        self.vm.write_segment(id, off, data).map_err(|e| err("write_page", e))?;
        if let Some(w) = self.written.get_mut(&id) {
            set_bit(w, off / PAGE_SIZE);
        }
        Ok(())
    }

    /// Write the pages of `data` (a whole number of pages of one segment)
    /// at stream address `addr` with one write of the segment.
    pub fn write_pages(&mut self, addr: u64, data: &[u8]) -> Result<(), HostError> {
        let (id, off) = split_addr(addr);
        self.vm.write_segment(id, off, data).map_err(|e| err("write_pages", e))?;
        if let Some(w) = self.written.get_mut(&id) {
            let first = off / PAGE_SIZE;
            for i in first..first + data.len() as u64 / PAGE_SIZE {
                set_bit(w, i);
            }
        }
        Ok(())
    }

    /// Receive the `len` bytes of pages at stream address `addr` in place
    /// ([`MigrationTarget::receive_pages`](super::MigrationTarget::receive_pages)):
    /// the pages are counted as written first (a failed `recv` leaves them
    /// for [`discard`](Self::discard)), then `recv` gets the segment's host
    /// memory. `Ok(false)` for a swappable segment.
    pub fn receive_pages(
        &mut self,
        addr: u64,
        len: usize,
        recv: &mut dyn FnMut(&[super::RawDest]),
    ) -> Result<bool, HostError> {
        let (id, off) = split_addr(addr);
        if self.is_swappable(id)? {
            return Ok(false);
        }
        let Some(w) = self.written.get_mut(&id) else {
            return Err(HostError::new("receive_pages", "no such segment"));
        };
        let first = off / PAGE_SIZE;
        let count = len as u64 / PAGE_SIZE;
        if w.len() as u64 * 64 < first + count {
            return Err(HostError::new("receive_pages", "outside the segment"));
        }
        for i in first..first + count {
            set_bit(w, i);
        }
        let done = self.vm.with_segment_host(id, off, len as u64, |d| recv(d)).map_err(|e| err("receive_pages", e))?;
        Ok(done.is_some())
    }

    /// Make the page at stream address `addr` read as zero.
    pub fn zero_page(&mut self, addr: u64) -> Result<(), HostError> {
        let (id, off) = split_addr(addr);
        let i = off / PAGE_SIZE;
        let (Some(w), Some(b)) = (self.written.get_mut(&id), self.before.get_mut(&id)) else {
            return Err(HostError::new("zero_page", "no such segment"));
        };
        if get_bit(w, i) || get_bit(b, i) {
            w[(i / 64) as usize] &= !(1 << (i % 64));
            b[(i / 64) as usize] &= !(1 << (i % 64));
            self.vm.write_segment(id, off, &[0u8; PAGE_SIZE as usize]).map_err(|e| err("zero_page", e))?;
        }
        Ok(())
    }

    /// Record the pages received in `range` (module doc).
    pub fn mark_received(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError> {
        let (id, _) = self.segment_of(range)?;
        let r = self.received.entry(id).or_insert_with(|| vec![0u64; range.bitmap_words()]);
        or_into(r, bitmap);
        Ok(())
    }

    /// End the attempt: after success, keep what arrived.
    pub fn finish(&mut self) {
        self.written.clear();
        self.before.clear();
    }

    /// Zero every page the attempt wrote (the VM is to be thrown away: a
    /// page it held before and the attempt overwrote is zeroed too);
    /// forget what it received.
    pub fn discard(&mut self) {
        self.before.clear();
        let zero = [0u8; PAGE_SIZE as usize];
        for (id, w) in std::mem::take(&mut self.written) {
            for (wi, &word) in w.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let _ = self.vm.write_segment(id, (wi as u64 * 64 + b) * PAGE_SIZE, &zero);
                }
            }
        }
        self.received.clear();
    }

    /// Pages marked received and not yet delivered out (for tests and
    /// reports).
    pub fn received_pages(&self) -> u64 {
        self.received.values().flatten().map(|w| u64::from(w.count_ones())).sum()
    }
}
