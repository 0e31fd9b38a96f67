//! Swappable RAM: objects whose pages are backed lazily by reservoir
//! frames and written to a swap file when cold.
//!
//! A swappable object ([`VmObject::swappable`]) has one atomic *slot* per
//! page instead of a fixed frame list. A slot is one of:
//!
//! - `EMPTY`: never touched; reads as zero, has no frame and nothing in the
//!   swap file;
//! - `RESIDENT(pfn)`: backed by reservoir frame `pfn` (the only state a
//!   leaf may map, and the only one [`VmObject::frame_at`] reports);
//! - `LOCKED(pfn)`: resident, and the host is copying it
//!   ([`VmObject::read`]/[`VmObject::write`]): still mappable, but not
//!   evicted until the copy is done;
//! - `EVICTING(pfn)`: being swapped out: its leaves are cleared, the frame
//!   is being written to the swap file;
//! - `SWAPPED`: its contents are in the swap file at byte
//!   `page * 4096` (the swap "slot" is the page index: the file is as
//!   large as the object and sparse);
//! - `LOADING`: being swapped in, first-touched, or accessed in the swap
//!   file by the host.
//!
//! Transitions are compare-and-swaps; `EVICTING` and `LOADING` are busy
//! states whose owner finishes without waiting for anything of the space,
//! so whoever meets one waits briefly (yielding) and looks again.
//!
//! # Swap-in (the data path)
//!
//! A fault or hold that finds no leaf for a page of a swappable object
//! first makes the page resident ([`Swap::ensure_resident`]): it takes a
//! frame from the reservoir, reads the page from the swap file into it
//! (or leaves it zero for a first touch) and stores `RESIDENT(pfn)`; the
//! usual fault path then installs the leaf, clean (the hardware sets the
//! dirty bit on the next write). This runs inside the client's active
//! section, without the space lock. Fault-around maps only neighbours
//! that are already resident: it never swaps a neighbour in. When the
//! reservoir has no frame left, the fault leaves the data path and
//! reclaims (below) as an administrative operation, then tries again.
//!
//! # Swap-out (an administrative operation)
//!
//! [`VmSpace::swap_out`] (and a fault that found the reservoir exhausted)
//! runs under the space lock:
//!
//! 1. The *clock*: a hand per object sweeps its pages; a resident page
//!    whose leaf has the accessed bit set gets it cleared (it is skipped,
//!    and looked at again a pass later); one whose bit is clear (or that
//!    has no leaf) is a candidate. No client is held meanwhile (only A
//!    bits change, atomically, as a harvest changes D bits).
//! 2. With every client held (as an unmap holds them: no fault or hold is
//!    in flight), each candidate that no outstanding hold is on (clients
//!    record the pages of their holds: a hold pins its page) moves from
//!    `RESIDENT` to `EVICTING` and its leaves (in every mapping of the
//!    object) are swapped for zero atomically, so that a dirty bit the
//!    hardware set until that moment is seen: a dirty leaf sets the
//!    page's *swapped-dirty* bit.
//! 3. Clients are released; the generation is bumped and every client
//!    invalidated with [`Cause::Swap`] and the frames (those evicted and
//!    those whose accessed bit the clock cleared) in
//!    [`Invalidation::cleared`]: vCPUs in guest context on an older
//!    generation are kicked and waited for, so none still translates to
//!    an evicted frame. One invalidation per batch.
//! 4. Each evicted frame is written to the swap file (`pwrite`), its slot
//!    becomes `SWAPPED` and the frame goes back to the reservoir. A write
//!    that fails puts the page back as `RESIDENT` (without a leaf: the
//!    next access maps it again) and is counted.
//!
//! # Dirty tracking
//!
//! The swapped-dirty bits are part of the dirty state a harvest reports:
//! [`VmSpace::dirty_op`] ORs them into its output (`Get`), reports and
//! clears them (`Reset`), and `Set` marks a non-resident page of a
//! writable mapping there. A page swapped out dirty therefore stays dirty
//! until a harvest reports it, whether or not it was swapped in since; a
//! page swapped out clean and swapped in again is installed clean, and is
//! reported only once written again.
//!
//! # Known gaps
//!
//! - Only 4 KiB leaves map swappable objects (they decline large leaves:
//!   their frames are never contiguous by construction).
//! - The swap-in's read of the swap file happens inside the client's
//!   active section: an administrative change waits for that read.
//! - The clock sees only pages mapped in the space: a resident page of an
//!   object mapped nowhere is never chosen (its frame is freed with the
//!   object).
//! - A hold pins its page only through the address it was taken at: an
//!   object mapped twice is pinned in both mappings (the swapper checks
//!   every address of the page), but host copies through
//!   [`VmObject::read`] lock the page only for the copy.
//! - The host's own writes ([`VmObject::write`]) are not dirty-tracked (as
//!   for plain RAM); to a swapped-out page they go to the swap file.
//! - DMA mirrors (IOMMU tables) of a swappable object would pin nothing:
//!   the VM layer refuses them.

use alloc::sync::Arc as StdArc;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::os::fd::AsRawFd;

use nested_pt::{Gpa, PageSize, Pfn, Prot, TablePages};

use crate::PAGE_SIZE;
use crate::error::{Error, Invalid, Result};
use crate::object::VmObject;
use crate::reservoir::{Arena, Reservoir};
use crate::space::{Cause, Data, DirtyOp, HeldAll, Inner, VmSpace};
use crate::sync::RawLock;

const TAG_SHIFT: u32 = 60;
const FRAME_MASK: u64 = (1 << TAG_SHIFT) - 1;
const EMPTY: u64 = 0;
const RESIDENT: u64 = 1;
const LOCKED: u64 = 2;
const EVICTING: u64 = 3;
const SWAPPED: u64 = 4;
const LOADING: u64 = 5;

fn tag(v: u64) -> u64 {
    v >> TAG_SHIFT
}

fn with_frame(t: u64, pfn: Pfn) -> u64 {
    (t << TAG_SHIFT) | pfn.0
}

fn state(t: u64) -> u64 {
    t << TAG_SHIFT
}

/// Pages a fault that found the reservoir exhausted evicts at once: one
/// invalidation (kicks, waits, a host's frame drops) per batch. On the KVM
/// runner (`vmm run --mem 64M --reservoir 16M`, mixed workload) 256
/// instead of 32 cut our code per fault from ~180 us to ~40 us and more
/// than tripled the guest's operations.
pub(crate) const FAULT_BATCH: u64 = 256;
/// Reclaims a fault tries before it gives up with `ReservoirFull`.
const FAULT_TRIES: u32 = 16;

/// Counters of swapping, for an object ([`VmObject::swap_stats`]) or a
/// whole space ([`VmSpace::swap_stats`], the sum over the swappable
/// objects mapped in it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapStats {
    /// Pages written to the swap file and their frames freed.
    pub swapped_out: u64,
    /// Pages read back from the swap file into a frame.
    pub swapped_in: u64,
    /// Pages given a (zero) frame on their first touch.
    pub first_touch: u64,
    /// Full revolutions of the clock hand.
    pub clock_passes: u64,
    /// Accessed bits the clock cleared (pages spared for a pass).
    pub aged: u64,
    /// Swap-file writes that failed (the page stayed resident).
    pub write_errors: u64,
    /// Pages resident now.
    pub resident: u64,
    /// Pages in the swap file now.
    pub swapped: u64,
    /// Pages whose swapped-dirty bit is set now (dirty state kept for the
    /// next harvest).
    pub swapped_dirty: u64,
}

impl SwapStats {
    fn add(&mut self, o: &SwapStats) {
        self.swapped_out += o.swapped_out;
        self.swapped_in += o.swapped_in;
        self.first_touch += o.first_touch;
        self.clock_passes += o.clock_passes;
        self.aged += o.aged;
        self.write_errors += o.write_errors;
        self.resident += o.resident;
        self.swapped += o.swapped;
        self.swapped_dirty += o.swapped_dirty;
    }
}

#[derive(Default)]
struct Counters {
    swapped_out: AtomicU64,
    swapped_in: AtomicU64,
    first_touch: AtomicU64,
    clock_passes: AtomicU64,
    aged: AtomicU64,
    write_errors: AtomicU64,
    resident: AtomicU64,
    swapped: AtomicU64,
    swapped_dirty: AtomicU64,
}

/// The swap state of a swappable object (see the module doc).
pub(crate) struct Swap {
    reservoir: StdArc<dyn Reservoir>,
    arena: Arena,
    slots: alloc::boxed::Box<[AtomicU64]>,
    /// Swapped-dirty bits, one per page.
    dirty: alloc::boxed::Box<[AtomicU64]>,
    file: std::fs::File,
    /// The clock hand (a page index); moved under the space lock only.
    hand: AtomicU64,
    n: Counters,
}

fn os_err(e: std::io::Error) -> Error {
    Error::Os(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Waits one step for a busy slot's owner.
fn relax() {
    std::thread::yield_now();
}

/// What a host copy found when it locked a page.
enum Locked {
    Resident(Pfn),
    Swapped,
    Empty,
}

impl Swap {
    fn new(reservoir: StdArc<dyn Reservoir>, size: u64, file: std::fs::File) -> Result<Self> {
        let pages = size / PAGE_SIZE;
        let n = usize::try_from(pages).map_err(|_| Error::Invalid(Invalid::BadSize))?;
        // A file whose every page reads as zero until written.
        file.set_len(0).map_err(os_err)?;
        file.set_len(size).map_err(os_err)?;
        let arena = reservoir.arena();
        Ok(Swap {
            reservoir,
            arena,
            slots: (0..n).map(|_| AtomicU64::new(EMPTY)).collect(),
            dirty: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            file,
            hand: AtomicU64::new(0),
            n: Counters::default(),
        })
    }

    fn pages(&self) -> u64 {
        self.slots.len() as u64
    }

    pub(crate) fn arena(&self) -> Arena {
        self.arena
    }

    /// Every frame the reservoir can give is below `limit`.
    pub(crate) fn frames_below(&self, limit: u64) -> bool {
        self.arena.frame_base.0.checked_add(self.arena.pages()).is_some_and(|end| end <= limit)
    }

    /// The frame of a resident page.
    #[inline]
    pub(crate) fn frame(&self, page: u64) -> Option<Pfn> {
        let v = self.slots.get(page as usize)?.load(Acquire);
        matches!(tag(v), RESIDENT | LOCKED).then_some(Pfn(v & FRAME_MASK))
    }

    fn host(&self, pfn: Pfn) -> Result<*mut u8> {
        Ok(self.arena.host_ptr(pfn).ok_or(Error::NoHostView)?.as_ptr())
    }

    /// `pread`/`pwrite` of one whole page between frame `pfn` and the swap
    /// file; `write` is the direction (frame to file).
    fn page_io(&self, page: u64, pfn: Pfn, write: bool) -> Result<()> {
        let p = self.host(pfn)?;
        let fd = self.file.as_raw_fd();
        let base = page.checked_mul(PAGE_SIZE).ok_or(Error::Overflow)?;
        let mut done = 0usize;
        while done < PAGE_SIZE as usize {
            let off = libc::off_t::try_from(base + done as u64).map_err(|_| Error::Overflow)?;
            let n = PAGE_SIZE as usize - done;
            // SAFETY: `p + done .. p + 4096` lies inside the frame's host
            // page (the reservoir's arena, mapped while the reservoir
            // lives); the frame is owned by this page's busy state
            // (`EVICTING` or `LOADING`), so no guest translation or other
            // copy reaches it: raw I/O, no Rust reference to it.
            let r = unsafe {
                if write {
                    libc::pwrite(fd, p.add(done).cast(), n, off)
                } else {
                    libc::pread(fd, p.add(done).cast(), n, off)
                }
            };
            match r {
                r if r > 0 => done += r as usize,
                // Past the end of the file (never: it is object-sized):
                // the rest of a fresh frame is already zero.
                0 if !write => return Ok(()),
                0 => return Err(Error::Os(libc::EIO)),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(os_err(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Make `page` resident: give a never-touched page a zero frame, read a
    /// swapped-out page back into a new frame; wait for a page another
    /// thread is moving. [`Error::ReservoirFull`] when no frame is left
    /// (the page is as it was).
    pub(crate) fn ensure_resident(&self, page: u64) -> Result<()> {
        let slot = self.slots.get(page as usize).ok_or(Error::Invalid(Invalid::OutsideObject))?;
        loop {
            let v = slot.load(Acquire);
            match tag(v) {
                RESIDENT | LOCKED => return Ok(()),
                EMPTY | SWAPPED => {
                    if slot.compare_exchange(v, state(LOADING), AcqRel, Acquire).is_err() {
                        continue;
                    }
                    let frame = match self.reservoir.alloc(1) {
                        Ok(f) => f[0],
                        Err(e) => {
                            slot.store(v, Release);
                            return Err(e);
                        }
                    };
                    if tag(v) == SWAPPED {
                        if let Err(e) = self.page_io(page, frame, false) {
                            // SAFETY: the frame came from `alloc` just now
                            // and was never mapped.
                            unsafe { self.reservoir.free(&[frame]) };
                            slot.store(v, Release);
                            return Err(e);
                        }
                        self.n.swapped.fetch_sub(1, Relaxed);
                        self.n.swapped_in.fetch_add(1, Relaxed);
                    } else {
                        self.n.first_touch.fetch_add(1, Relaxed);
                    }
                    self.n.resident.fetch_add(1, Relaxed);
                    slot.store(with_frame(RESIDENT, frame), Release);
                    return Ok(());
                }
                _ => relax(),
            }
        }
    }

    /// Lock `page` for a host copy (waiting while it is busy).
    fn lock_page(&self, page: u64) -> Locked {
        let slot = &self.slots[page as usize];
        loop {
            let v = slot.load(Acquire);
            let (new, what) = match tag(v) {
                RESIDENT => (with_frame(LOCKED, Pfn(v & FRAME_MASK)), Locked::Resident(Pfn(v & FRAME_MASK))),
                SWAPPED => (state(LOADING), Locked::Swapped),
                EMPTY => (state(LOADING), Locked::Empty),
                _ => {
                    relax();
                    continue;
                }
            };
            if slot.compare_exchange(v, new, AcqRel, Acquire).is_ok() {
                return what;
            }
        }
    }

    /// Undo [`Swap::lock_page`]; `written`: a host write went to the swap
    /// file (a never-touched page is then swapped out).
    fn unlock_page(&self, page: u64, was: &Locked, written: bool) {
        let slot = &self.slots[page as usize];
        let v = match was {
            Locked::Resident(pfn) => with_frame(RESIDENT, *pfn),
            Locked::Swapped => state(SWAPPED),
            Locked::Empty if written => {
                self.n.swapped.fetch_add(1, Relaxed);
                state(SWAPPED)
            }
            Locked::Empty => state(EMPTY),
        };
        slot.store(v, Release);
    }

    /// Host copies by byte offset, page by page: `f(page, in-page offset,
    /// done, n, what the page is)`; the range is checked first.
    fn for_each_piece(
        &self,
        size: u64,
        offset: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, u64, usize, usize, &Locked) -> Result<()>,
    ) -> Result<()> {
        let len64 = len as u64;
        if offset > size || len64 > size - offset {
            return Err(Invalid::OutsideObject.into());
        }
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            let page = at / PAGE_SIZE;
            let was = self.lock_page(page);
            let r = f(page, at % PAGE_SIZE, done, n, &was);
            self.unlock_page(page, &was, write && r.is_ok());
            r?;
            done += n;
        }
        Ok(())
    }

    /// [`VmObject::read`] of a swappable object: resident pages from their
    /// frames, swapped-out pages from the swap file, never-touched pages as
    /// zero. Nothing is swapped in.
    pub(crate) fn read(&self, size: u64, offset: u64, dst: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let len = dst.len();
        self.for_each_piece(size, offset, len, false, |page, in_page, done, n, was| {
            let out = &mut dst[done..done + n];
            match was {
                Locked::Resident(pfn) => {
                    let p = self.host(*pfn)?;
                    // SAFETY: `p + in_page .. + n` lies inside the frame's
                    // host page, locked against eviction for this copy;
                    // `out` is host memory of ours. A raw copy (the guest
                    // may write the page meanwhile).
                    unsafe { core::ptr::copy_nonoverlapping(p.add(in_page as usize), out.as_mut_ptr(), n) };
                }
                Locked::Swapped => self.file.read_exact_at(out, page * PAGE_SIZE + in_page).map_err(os_err)?,
                Locked::Empty => out.fill(0),
            }
            Ok(())
        })
    }

    /// [`VmObject::write`] of a swappable object: resident pages in their
    /// frames, others in the swap file (a never-touched page becomes
    /// swapped out). Nothing is swapped in.
    pub(crate) fn write(&self, size: u64, offset: u64, src: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.for_each_piece(size, offset, src.len(), true, |page, in_page, done, n, was| {
            let from = &src[done..done + n];
            match was {
                Locked::Resident(pfn) => {
                    let p = self.host(*pfn)?;
                    // SAFETY: as in `read`, in the other direction.
                    unsafe { core::ptr::copy_nonoverlapping(from.as_ptr(), p.add(in_page as usize), n) };
                }
                Locked::Swapped | Locked::Empty => {
                    self.file.write_all_at(from, page * PAGE_SIZE + in_page).map_err(os_err)?
                }
            }
            Ok(())
        })
    }

    fn dirty_bit(&self, page: u64) -> (&AtomicU64, u64) {
        (&self.dirty[(page / 64) as usize], 1u64 << (page % 64))
    }

    fn set_dirty(&self, page: u64) -> bool {
        let (w, b) = self.dirty_bit(page);
        let old = w.fetch_or(b, AcqRel) & b != 0;
        if !old {
            self.n.swapped_dirty.fetch_add(1, Relaxed);
        }
        !old
    }

    fn is_dirty(&self, page: u64) -> bool {
        let (w, b) = self.dirty_bit(page);
        w.load(Acquire) & b != 0
    }

    fn take_dirty(&self, page: u64) -> bool {
        let (w, b) = self.dirty_bit(page);
        let was = w.fetch_and(!b, AcqRel) & b != 0;
        if was {
            self.n.swapped_dirty.fetch_sub(1, Relaxed);
        }
        was
    }

    /// Whether `page` has content: any state but `EMPTY` (resident, being
    /// copied, evicted, in the swap file, or being loaded). A page never
    /// touched (by the guest or the host) has none and reads as zero.
    pub(crate) fn has_content(&self, page: u64) -> bool {
        self.slots.get(page as usize).is_some_and(|s| tag(s.load(Acquire)) != EMPTY)
    }

    /// Whether `page` is resident (its slot has a frame leaves may map).
    fn is_resident(&self, page: u64) -> bool {
        self.frame(page).is_some()
    }

    pub(crate) fn stats(&self) -> SwapStats {
        let l = |a: &AtomicU64| a.load(Relaxed);
        SwapStats {
            swapped_out: l(&self.n.swapped_out),
            swapped_in: l(&self.n.swapped_in),
            first_touch: l(&self.n.first_touch),
            clock_passes: l(&self.n.clock_passes),
            aged: l(&self.n.aged),
            write_errors: l(&self.n.write_errors),
            resident: l(&self.n.resident),
            swapped: l(&self.n.swapped),
            swapped_dirty: l(&self.n.swapped_dirty),
        }
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let frames: Vec<Pfn> = self
            .slots
            .iter()
            .filter_map(|s| {
                let v = s.load(Acquire);
                matches!(tag(v), RESIDENT | LOCKED | EVICTING).then_some(Pfn(v & FRAME_MASK))
            })
            .collect();
        // SAFETY: the frames came from this reservoir's `alloc`, each slot
        // holds its own, and the object (the last reference to it) is
        // going: no mapping or hold reaches them.
        unsafe { self.reservoir.free(&frames) };
    }
}

impl VmObject {
    /// Swappable guest RAM of `size` bytes (a non-zero multiple of 4 KiB):
    /// pages get a frame from `reservoir` on their first touch, may be
    /// swapped out to `file` when cold ([`VmSpace::swap_out`], or a fault
    /// that finds the reservoir exhausted) and are swapped back in on the
    /// next access. The object may be larger than the reservoir. `file`
    /// becomes the swap file: it is truncated and sized to `size`
    /// (sparse); see [`swap_file_in`] for an anonymous one.
    pub fn swappable(reservoir: StdArc<dyn Reservoir>, size: u64, file: std::fs::File) -> Result<StdArc<Self>> {
        if size == 0 {
            return Err(Invalid::ZeroLength.into());
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        Ok(VmObject::from_swap(size, Swap::new(reservoir, size, file)?))
    }

    /// Whether the object is swappable RAM.
    pub fn is_swappable(&self) -> bool {
        self.swap().is_some()
    }

    /// For a swappable object, whether the page holding byte `offset` has
    /// content: it is resident or swapped out (or moving between the two)
    /// rather than never touched. `None` for an object that is not
    /// swappable or past the end. A live migration's first pass sends
    /// exactly these pages (a never-touched page reads as zero): a
    /// swapped-out page has no leaf, so the page table alone would miss it.
    /// A snapshot: a page may gain content right after (its first touch),
    /// which the dirty bits then report.
    pub fn page_has_content(&self, offset: u64) -> Option<bool> {
        if offset >= self.size() {
            return None;
        }
        self.swap().map(|s| s.has_content(offset / PAGE_SIZE))
    }

    /// The swapping counters of a swappable object.
    pub fn swap_stats(&self) -> Option<SwapStats> {
        self.swap().map(Swap::stats)
    }
}

/// An anonymous swap file in directory `dir`: `O_TMPFILE` (no name, gone
/// when closed), or where the file system lacks it a uniquely named file
/// removed at once.
pub fn swap_file_in(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir);
    match tmp {
        Ok(f) => Ok(f),
        Err(_) => {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let name = dir.join(format!(".vmspace-swap-{}-{}", std::process::id(), NEXT.fetch_add(1, Relaxed)));
            let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&name)?;
            std::fs::remove_file(&name)?;
            Ok(f)
        }
    }
}

/// A swappable object mapped in the space: the object and its mappings
/// as (start, object offset, length).
struct Target {
    object: StdArc<VmObject>,
    maps: Vec<(u64, u64, u64)>,
}

impl Target {
    /// The guest-physical addresses at which object page `page` is mapped.
    fn gpas(&self, page: u64) -> impl Iterator<Item = u64> + '_ {
        let off = page * PAGE_SIZE;
        self.maps.iter().filter(move |m| m.1 <= off && off - m.1 < m.2).map(move |m| m.0 + (off - m.1))
    }

    fn swap(&self) -> &Swap {
        self.object.swap().expect("targets are swappable")
    }
}

fn targets<P: TablePages>(d: &Data<P>) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for (start, m) in &d.maps {
        if !m.object.is_swappable() {
            continue;
        }
        let entry = (*start, m.offset, m.len);
        match out.iter_mut().find(|t| StdArc::ptr_eq(&t.object, &m.object)) {
            Some(t) => t.maps.push(entry),
            None => out.push(Target { object: m.object.clone(), maps: alloc::vec![entry] }),
        }
    }
    out
}

impl<P: TablePages, L: RawLock> Inner<P, L> {
    /// The clock over `t`'s pages: clears the accessed bit of resident
    /// pages that have it (appending their frames to `aged`), and appends
    /// up to `want` pages found with it clear to `cands`. At most two
    /// revolutions. Space lock held; no client held.
    fn clock(&self, d: &Data<P>, t: &Target, want: usize, cands: &mut Vec<u64>, aged: &mut Vec<Pfn>) {
        let s = t.swap();
        let pages = s.pages();
        let mut hand = s.hand.load(Relaxed) % pages;
        let mut scanned = 0;
        while cands.len() < want && scanned < 2 * pages {
            let page = hand;
            hand += 1;
            if hand == pages {
                hand = 0;
                s.n.clock_passes.fetch_add(1, Relaxed);
            }
            scanned += 1;
            if tag(s.slots[page as usize].load(Acquire)) != RESIDENT {
                continue;
            }
            let mut young = false;
            for g in t.gpas(page) {
                if let Some(leaf) = d.table.lookup(Gpa(g))
                    && leaf.size == PageSize::Size4K
                    && leaf.accessed()
                {
                    leaf.reset_accessed(false);
                    aged.push(leaf.pfn());
                    young = true;
                }
            }
            if young {
                s.n.aged.fetch_add(1, Relaxed);
            } else {
                cands.push(page);
            }
        }
        s.hand.store(hand, Relaxed);
    }

    /// Swap out up to `want` cold pages of the swappable objects mapped in
    /// the space (see the module doc); returns the number swapped out.
    pub(crate) fn reclaim(&self, want: u64) -> Result<u64> {
        self.locked(|a| {
            if a.destroyed {
                return Err(Error::Orphaned);
            }
            let want = usize::try_from(want).unwrap_or(usize::MAX);
            // SAFETY: lock held; shared access (entry changes are atomic).
            let ts = unsafe { self.with_data(|d| targets(d)) };
            if ts.is_empty() || want == 0 {
                return Ok(0);
            }
            // 1. The clock, clients running.
            let mut aged = Vec::new();
            let mut cands: Vec<Vec<u64>> = ts.iter().map(|_| Vec::new()).collect();
            // SAFETY: as above.
            unsafe {
                self.with_data(|d| {
                    let mut found = 0;
                    for (t, c) in ts.iter().zip(cands.iter_mut()) {
                        self.clock(d, t, want - found, c, &mut aged);
                        found += c.len();
                        if found >= want {
                            break;
                        }
                    }
                })
            };
            // 2. Clear the candidates' leaves with every client held.
            let fmt = &self.format;
            let mut victims: Vec<(usize, u64, Pfn)> = Vec::new();
            {
                let held = HeldAll::new(a);
                // SAFETY: lock held, clients held (only leaf entries change).
                unsafe {
                    self.with_data(|d| {
                        for (ti, (t, c)) in ts.iter().zip(&cands).enumerate() {
                            let s = t.swap();
                            for &page in c {
                                let pinned = t
                                    .gpas(page)
                                    .any(|g| held.0.clients.values().any(|cl| cl.has_holds(g, g + crate::PAGE_SIZE)));
                                if pinned {
                                    continue;
                                }
                                let slot = &s.slots[page as usize];
                                let v = slot.load(Acquire);
                                if tag(v) != RESIDENT
                                    || slot
                                        .compare_exchange(v, with_frame(EVICTING, Pfn(v & FRAME_MASK)), AcqRel, Acquire)
                                        .is_err()
                                {
                                    continue;
                                }
                                for g in t.gpas(page) {
                                    let Some(leaf) = d.table.lookup(Gpa(g)) else { continue };
                                    if leaf.size != PageSize::Size4K {
                                        continue;
                                    }
                                    // A swap, so a dirty bit set until now is seen.
                                    let old = leaf.entry.swap(0, AcqRel);
                                    if fmt.is_present(old) {
                                        self.resident.fetch_sub(1, Relaxed);
                                        if fmt.dirty(old) {
                                            s.set_dirty(page);
                                        }
                                    }
                                }
                                victims.push((ti, page, Pfn(v & FRAME_MASK)));
                            }
                        }
                    })
                };
            }
            // 3. No vCPU translates to an evicted frame (nor keeps a
            // translation whose accessed bit was cleared) after this.
            if !victims.is_empty() || !aged.is_empty() {
                let mut frames = aged;
                frames.extend(victims.iter().map(|v| v.2));
                self.bump_gen_and_invalidate(a, 0, self.size, Cause::Swap, false, Some(&frames));
            }
            // 4. Write out and free.
            let mut out = 0;
            for (ti, page, pfn) in victims {
                let s = ts[ti].swap();
                let slot = &s.slots[page as usize];
                match s.page_io(page, pfn, true) {
                    Ok(()) => {
                        slot.store(state(SWAPPED), Release);
                        // SAFETY: the frame came from this reservoir, the
                        // slot no longer names it, no leaf maps it and no
                        // vCPU translates to it (invalidated above).
                        unsafe { s.reservoir.free(&[pfn]) };
                        s.n.resident.fetch_sub(1, Relaxed);
                        s.n.swapped.fetch_add(1, Relaxed);
                        s.n.swapped_out.fetch_add(1, Relaxed);
                        out += 1;
                    }
                    Err(_) => {
                        s.n.write_errors.fetch_add(1, Relaxed);
                        slot.store(with_frame(RESIDENT, pfn), Release);
                    }
                }
            }
            Ok(out)
        })
    }

    /// A data-path operation failed with `ReservoirFull`: reclaim a batch
    /// (outside the client's active section) and say whether to try
    /// again. Not from a thread in guest context on this space (the
    /// invalidation would wait for it), and at most a few times (fewer
    /// when reclaims free nothing), then the operation fails.
    pub(crate) fn reclaim_after_full(&self, tries: &mut u32) -> bool {
        if *tries >= FAULT_TRIES || crate::protocol::on_cpu::holds(self as *const Self as usize) {
            return false;
        }
        match self.reclaim(FAULT_BATCH) {
            Ok(0) => {
                // Nothing evicted: every resident page pinned or busy, or
                // another swapper freed frames that other threads took.
                // A few more tries (letting the others run), then give up.
                *tries += FAULT_TRIES / 4;
                std::thread::yield_now();
                true
            }
            Ok(_) => {
                *tries += 1;
                true
            }
            Err(_) => false,
        }
    }
}

fn bit(bitmap: &[u64], i: u64) -> bool {
    bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn set_bit(bitmap: &mut [u64], i: u64) {
    bitmap[(i / 64) as usize] |= 1 << (i % 64);
}

/// The swapped-dirty part of a dirty operation on `[gpa, gpa+len)` (after
/// the leaves' part wrote `out`): `Get` ORs the swapped-dirty bits of the
/// selected pages into `out`, `Reset` does and clears them, `Set` marks
/// the selected non-resident pages of writable mappings. Returns the
/// output bits it set that were not set yet. Space lock held.
pub(crate) fn merge_dirty<P: TablePages>(
    d: &Data<P>,
    op: DirtyOp,
    gpa: u64,
    len: u64,
    sel: Option<&[u64]>,
    out: &mut [u64],
) -> u64 {
    let end = gpa.saturating_add(len);
    let mut n = 0;
    for (start, m) in d.maps.range(..end).rev() {
        let m_end = start + m.len;
        if m_end <= gpa {
            break;
        }
        let Some(s) = m.object.swap() else { continue };
        if op != DirtyOp::Set && s.n.swapped_dirty.load(Acquire) == 0 {
            continue;
        }
        if op == DirtyOp::Set && !m.prot.contains(Prot::WRITE) {
            continue;
        }
        let mut g = gpa.max(*start);
        let hi = end.min(m_end);
        while g < hi {
            let p = (g - gpa) / PAGE_SIZE;
            let page = (m.offset + (g - start)) / PAGE_SIZE;
            g += PAGE_SIZE;
            if sel.is_some_and(|s| !bit(s, p)) {
                continue;
            }
            let report = match op {
                DirtyOp::Get => s.is_dirty(page),
                DirtyOp::Reset => s.take_dirty(page),
                DirtyOp::Set => {
                    let mark = !s.is_resident(page);
                    if mark {
                        s.set_dirty(page);
                    }
                    mark
                }
            };
            if report && !bit(out, p) {
                set_bit(out, p);
                n += 1;
            }
        }
    }
    n
}

impl<P: TablePages + Send + Sync, L: RawLock> VmSpace<P, L> {
    /// Swap out up to `pages` cold pages of the swappable objects mapped
    /// in the space, chosen by the accessed-bit clock (a page whose
    /// accessed bit is set is spared for a pass, its bit cleared); pages
    /// with an outstanding hold are never chosen. Returns the number of
    /// pages written to the swap file and freed (fewer when fewer are
    /// cold, pinned or resident). Bumps the generation and invalidates
    /// every client ([`Cause::Swap`]) when it cleared a leaf or an
    /// accessed bit. [`Error::SelfDeadlock`] from a thread in guest
    /// context on the space.
    pub fn swap_out(&self, pages: u64) -> Result<u64> {
        self.check_not_on_cpu()?;
        self.inner.reclaim(pages)
    }

    /// The swapping counters summed over the swappable objects mapped in
    /// the space (each counted once however often it is mapped).
    pub fn swap_stats(&self) -> SwapStats {
        let inner = &*self.inner;
        // SAFETY: lock held.
        let ts = inner.locked(|_| unsafe { inner.with_data(|d| targets(d)) });
        let mut sum = SwapStats::default();
        for t in &ts {
            sum.add(&t.swap().stats());
        }
        sum
    }
}
