//! Host memory providers ("reservoirs") for guest RAM.
//!
//! Guest RAM is handed out in 4 KiB frames that need not be contiguous
//! (seed 002: memory segments in 4 KiB chunks); [`Reservoir::alloc_large`]
//! hands out aligned, physically contiguous 2 MiB runs where it can (fresh
//! frames from the next aligned index, or a run freed whole), so that a
//! mapping can map them with 2 MiB leaves, and falls back to 4 KiB
//! frames (a run is broken up only when nothing else is left), and
//! [`Reservoir::alloc_huge`] likewise hands out aligned, contiguous 1 GiB
//! runs (262,144 frames) where the arena has aligned room for them, for
//! 1 GiB leaves, falling back to 2 MiB runs and 4 KiB frames. A reservoir owns an *arena*:
//! one host-virtual range in which frame `frame_base + i` lives at byte
//! `i * 4096`. In a kernel that arena is the direct map; in user space it is
//! a shared-memory file mapped into the process ([`MemfdReservoir`]), which
//! the KVM runner registers as a memory slot so that a frame number is a KVM
//! guest-physical page. [`HeapReservoir`] is a plain heap arena for
//! environments without files (tests, loom models, no_std).

use alloc::vec::Vec;
use core::ptr::NonNull;

use nested_pt::Pfn;

use crate::PAGE_SIZE;
use crate::error::{Error, Invalid, Result};
use crate::sync::{DefaultLock, Guard, RawLock};

/// The host view of every frame a reservoir can hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arena {
    /// Host address of frame `frame_base`.
    pub host: NonNull<u8>,
    /// Length of the arena in bytes (a multiple of 4 KiB).
    pub len: usize,
    /// Frame number of the first page of the arena.
    pub frame_base: Pfn,
}

// SAFETY: an `Arena` is a description (an address, a length and a frame
// number), `Copy`, owning nothing: it neither reads nor writes the memory
// it describes, and the reservoir that owns the mapping is itself
// `Send + Sync`. Dereferencing `host` is the caller's unsafe code, which
// must allow for concurrent access in any case (the guest writes the same
// memory).
unsafe impl Send for Arena {}
// SAFETY: as above; shared references give only the same plain values.
unsafe impl Sync for Arena {}

// A multi-threaded VMM shares these (the KVM runner's vCPU threads).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Arena>();
    #[cfg(feature = "std")]
    send_sync::<HostView>();
};

impl Arena {
    /// Pages in the arena.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE as usize) as u64
    }

    /// Host pointer to frame `pfn`, or `None` if the frame is outside the arena.
    pub fn host_ptr(&self, pfn: Pfn) -> Option<NonNull<u8>> {
        let idx = pfn.0.checked_sub(self.frame_base.0)?;
        if idx >= self.pages() {
            return None;
        }
        // SAFETY: idx < pages, so the offset stays inside the arena's
        // allocation, and the result is non-null because `host` is.
        Some(unsafe { self.host.add((idx * PAGE_SIZE) as usize) })
    }
}

/// Accounting of a reservoir, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservoirStats {
    /// The most the reservoir hands out.
    pub limit: u64,
    /// Handed out and not yet freed.
    pub allocated: u64,
    /// `limit - allocated`.
    pub free: u64,
}

/// A provider of guest RAM frames.
///
/// # Safety
///
/// Implementations promise that: every frame [`Reservoir::alloc`],
/// [`Reservoir::alloc_large`] or [`Reservoir::alloc_huge`] returns lies
/// inside [`Reservoir::arena`], is zero-filled, and is not returned
/// again until it was passed to [`Reservoir::free`]; the arena stays mapped
/// and unchanged for as long as the reservoir exists. Objects hand out raw
/// pointers into the arena on the strength of these promises.
pub unsafe trait Reservoir: Send + Sync {
    /// The host view of the frames.
    fn arena(&self) -> Arena;
    /// `pages` zero-filled frames, not necessarily contiguous; all or
    /// nothing. [`Error::ReservoirFull`] when over the limit.
    fn alloc(&self, pages: u64) -> Result<Vec<Pfn>>;
    /// As [`Reservoir::alloc`], preferring large runs: each group of 512
    /// frames at index `512 * k` of the result is, where the reservoir
    /// can manage it, one physically contiguous run starting at a frame
    /// number that is a multiple of 512 (an aligned 2 MiB run, which a
    /// mapping can map with one 2 MiB leaf); other groups and the
    /// remainder fall back to 4 KiB frames. The default hands out what
    /// `alloc` does.
    fn alloc_large(&self, pages: u64) -> Result<Vec<Pfn>> {
        self.alloc(pages)
    }
    /// As [`Reservoir::alloc_large`], preferring 1 GiB runs: each group of
    /// 262,144 frames at index `262144 * k` of the result is, where the
    /// reservoir can manage it, one physically contiguous run starting at
    /// a frame number that is a multiple of 262,144 (an aligned 1 GiB run,
    /// which a mapping can map with one 1 GiB leaf); the other groups fall
    /// back as `alloc_large`'s do. The default hands out what
    /// `alloc_large` does.
    fn alloc_huge(&self, pages: u64) -> Result<Vec<Pfn>> {
        self.alloc_large(pages)
    }
    /// Give frames back.
    ///
    /// # Safety
    /// Every frame came from `alloc` (or `alloc_large` / `alloc_huge`) of
    /// this reservoir, is freed once, and nothing accesses it any more.
    unsafe fn free(&self, frames: &[Pfn]);
    /// Current accounting.
    fn stats(&self) -> ReservoirStats;
}

/// Frames in an aligned 2 MiB run.
const RUN: u64 = 512;

/// Frames in an aligned 1 GiB run.
pub(crate) const HUGE_RUN: u64 = 512 * 512;

/// What `FrameAllocator::alloc_with` prefers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Runs {
    /// 4 KiB frames only.
    None,
    /// Aligned 2 MiB runs, then 4 KiB frames.
    Large,
    /// Aligned 1 GiB runs, then 2 MiB runs, then 4 KiB frames.
    Huge,
}

/// Free-frame bookkeeping shared by the reservoirs: a stack of freed frame
/// indices, a stack of free aligned 2 MiB runs and one of free aligned
/// 1 GiB runs (first index of each), plus a high-water mark of never-used
/// frames. Indices count from the arena's first frame, whose number is
/// `base`: a run is aligned when `base + index` is a multiple of 512
/// (262,144 for a 1 GiB run). Smaller pieces are taken before larger ones
/// are broken up: a 4 KiB frame breaks a 2 MiB run only when no freed or
/// fresh frame is left, and a 1 GiB run only when no 2 MiB run is.
#[derive(Debug)]
struct FrameAllocator {
    pages: u64,
    base: u64,
    next_fresh: u64,
    freed: Vec<u64>,
    runs: Vec<u64>,
    huge: Vec<u64>,
    allocated: u64,
}

impl FrameAllocator {
    fn new(pages: u64, base: u64) -> Self {
        FrameAllocator {
            pages,
            base,
            next_fresh: 0,
            freed: Vec::new(),
            runs: Vec::new(),
            huge: Vec::new(),
            allocated: 0,
        }
    }

    /// One 4 KiB frame: a freed one, a fresh one, or one of a free run
    /// broken up (the caller checked there is room).
    fn one(&mut self) -> u64 {
        if let Some(i) = self.freed.pop() {
            return i;
        }
        if self.next_fresh < self.pages {
            self.next_fresh += 1;
            return self.next_fresh - 1;
        }
        if self.runs.is_empty() {
            self.break_huge();
        }
        let r = self.runs.pop().expect("room was checked");
        self.freed.extend((r + 1..r + RUN).rev());
        r
    }

    /// Break a free 1 GiB run up into 2 MiB runs (none left: nothing).
    fn break_huge(&mut self) {
        if let Some(h) = self.huge.pop() {
            self.runs.extend((0..HUGE_RUN / RUN).rev().map(|k| h + k * RUN));
        }
    }

    /// Fresh frames `[lo, hi)` skipped to reach an aligned start go to the
    /// pools: the aligned 2 MiB runs among them whole, the rest as 4 KiB
    /// frames (all are zero, never used).
    fn give_fresh(&mut self, lo: u64, hi: u64) {
        let mut i = lo;
        while i < hi {
            if self.base.wrapping_add(i).is_multiple_of(RUN) && hi - i >= RUN {
                self.runs.push(i);
                i += RUN;
            } else {
                self.freed.push(i);
                i += 1;
            }
        }
    }

    /// An aligned 1 GiB run: a free one, or fresh frames from the next
    /// aligned index (the fresh frames skipped go to the pools).
    fn huge_run(&mut self) -> Option<u64> {
        if let Some(h) = self.huge.pop() {
            return Some(h);
        }
        let skip = (HUGE_RUN - (self.base.wrapping_add(self.next_fresh)) % HUGE_RUN) % HUGE_RUN;
        let start = self.next_fresh.checked_add(skip)?;
        if start.checked_add(HUGE_RUN)? > self.pages {
            return None;
        }
        self.give_fresh(self.next_fresh, start);
        self.next_fresh = start + HUGE_RUN;
        Some(start)
    }

    /// An aligned run: a free one, or fresh frames from the next aligned
    /// index (the fresh frames skipped to get there go to the 4 KiB pool).
    fn run(&mut self) -> Option<u64> {
        if let Some(r) = self.runs.pop() {
            return Some(r);
        }
        let skip = (RUN - (self.base.wrapping_add(self.next_fresh)) % RUN) % RUN;
        let start = self.next_fresh.checked_add(skip)?;
        if start.checked_add(RUN)? > self.pages {
            // No fresh aligned room: a free 1 GiB run broken up, if any.
            self.break_huge();
            return self.runs.pop();
        }
        self.freed.extend(self.next_fresh..start);
        self.next_fresh = start + RUN;
        Some(start)
    }

    fn alloc(&mut self, count: u64) -> Result<Vec<u64>> {
        self.alloc_with(count, Runs::None)
    }

    fn alloc_with(&mut self, count: u64, mut prefer: Runs) -> Result<Vec<u64>> {
        if count > self.pages - self.allocated {
            return Err(Error::ReservoirFull);
        }
        let mut out = Vec::new();
        out.try_reserve_exact(count as usize).map_err(|_| Error::ReservoirFull)?;
        while (out.len() as u64) < count {
            if prefer == Runs::Huge && count - out.len() as u64 >= HUGE_RUN {
                match self.huge_run() {
                    Some(h) => {
                        out.extend(h..h + HUGE_RUN);
                        continue;
                    }
                    None => prefer = Runs::Large,
                }
            }
            if prefer >= Runs::Large && count - out.len() as u64 >= RUN {
                match self.run() {
                    Some(r) => {
                        out.extend(r..r + RUN);
                        continue;
                    }
                    None => prefer = Runs::None,
                }
            }
            let i = self.one();
            out.push(i);
        }
        self.allocated += count;
        Ok(out)
    }

    /// Give frames back: aligned runs among them go back whole (1 GiB
    /// runs as such), so that a later `alloc_large` / `alloc_huge` gets
    /// them again.
    fn free(&mut self, idx: impl Iterator<Item = u64>) {
        let mut idx: Vec<u64> = idx.collect();
        self.allocated -= idx.len() as u64;
        idx.sort_unstable();
        let mut i = 0;
        while i < idx.len() {
            let r = idx[i];
            // Sorted and distinct: the last index of a span telling its
            // length tells that it is contiguous.
            let h = HUGE_RUN as usize;
            if (self.base.wrapping_add(r)).is_multiple_of(HUGE_RUN)
                && idx.len() - i >= h
                && idx[i + h - 1] == r + HUGE_RUN - 1
            {
                self.huge.push(r);
                i += h;
                continue;
            }
            let whole = (self.base.wrapping_add(r)).is_multiple_of(RUN)
                && idx.len() - i >= RUN as usize
                && idx[i + RUN as usize - 1] == r + RUN - 1;
            if whole {
                self.runs.push(r);
                i += RUN as usize;
            } else {
                self.freed.push(r);
                i += 1;
            }
        }
    }

    fn stats(&self) -> ReservoirStats {
        let limit = self.pages * PAGE_SIZE;
        let allocated = self.allocated * PAGE_SIZE;
        ReservoirStats { limit, allocated, free: limit - allocated }
    }
}

/// `FrameAllocator` behind the crate's lock.
struct LockedAllocator {
    lock: DefaultLock,
    inner: crate::sync::Cell<FrameAllocator>,
}

impl LockedAllocator {
    fn new(pages: u64, base: Pfn) -> Self {
        LockedAllocator { lock: DefaultLock::new(), inner: crate::sync::Cell::new(FrameAllocator::new(pages, base.0)) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
        let _g = Guard::new(&self.lock);
        // SAFETY: the cell is only touched here, under `lock`.
        self.inner.with_mut(|p| f(unsafe { &mut *p }))
    }
}

// SAFETY: the allocator state is only reached through `with`, which holds
// the lock for the whole access.
unsafe impl Sync for LockedAllocator {}

fn frames_from(base: Pfn, idx: Vec<u64>) -> Vec<Pfn> {
    idx.into_iter().map(|i| Pfn(base.0 + i)).collect()
}

/// Validates a reservoir's size and frame numbering (shared by every
/// reservoir): a non-zero multiple of the page size that fits in the
/// address space, and frame numbers `frame_base ..` that do not overflow.
/// Returns the number of pages.
fn checked_pages(bytes: u64, frame_base: Pfn) -> Result<u64> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) || bytes > isize::MAX as u64 {
        return Err(Invalid::BadSize.into());
    }
    let pages = bytes / PAGE_SIZE;
    if frame_base.0.checked_add(pages).is_none() {
        return Err(Invalid::Overflow.into());
    }
    Ok(pages)
}

/// A reservoir in a zeroed heap allocation. Freed frames are zeroed before
/// they are handed out again.
pub struct HeapReservoir {
    arena: Arena,
    frames: LockedAllocator,
}

// SAFETY: the arena is a private heap allocation whose contents are only
// reached through raw pointers (never references), and the allocator state
// is locked.
unsafe impl Send for HeapReservoir {}
// SAFETY: as for Send.
unsafe impl Sync for HeapReservoir {}

impl HeapReservoir {
    /// An arena of `limit` bytes whose first frame is `frame_base`.
    pub fn new(limit: u64, frame_base: Pfn) -> Result<Self> {
        let pages = checked_pages(limit, frame_base)?;
        let layout = core::alloc::Layout::from_size_align(limit as usize, PAGE_SIZE as usize)
            .map_err(|_| Error::Invalid(Invalid::BadSize))?;
        // SAFETY: the layout has a non-zero size (checked_pages refuses 0).
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let host = NonNull::new(p).ok_or(Error::ReservoirFull)?;
        Ok(HeapReservoir {
            arena: Arena { host, len: limit as usize, frame_base },
            frames: LockedAllocator::new(pages, frame_base),
        })
    }
}

impl Drop for HeapReservoir {
    fn drop(&mut self) {
        let layout = core::alloc::Layout::from_size_align(self.arena.len, PAGE_SIZE as usize).unwrap();
        // SAFETY: allocated in `new` with this layout; objects keep the
        // reservoir alive (Arc) for as long as they reach its frames.
        unsafe { alloc::alloc::dealloc(self.arena.host.as_ptr(), layout) };
    }
}

// SAFETY: frames are indices below `pages`, so inside the arena; the arena
// starts zeroed and `free` zeroes frames before they return to the pool;
// the allocator never hands out an index twice without a free.
unsafe impl Reservoir for HeapReservoir {
    fn arena(&self) -> Arena {
        self.arena
    }

    fn alloc(&self, pages: u64) -> Result<Vec<Pfn>> {
        let idx = self.frames.with(|a| a.alloc(pages))?;
        Ok(frames_from(self.arena.frame_base, idx))
    }

    fn alloc_large(&self, pages: u64) -> Result<Vec<Pfn>> {
        let idx = self.frames.with(|a| a.alloc_with(pages, Runs::Large))?;
        Ok(frames_from(self.arena.frame_base, idx))
    }

    fn alloc_huge(&self, pages: u64) -> Result<Vec<Pfn>> {
        let idx = self.frames.with(|a| a.alloc_with(pages, Runs::Huge))?;
        Ok(frames_from(self.arena.frame_base, idx))
    }

    unsafe fn free(&self, frames: &[Pfn]) {
        for f in frames {
            if let Some(p) = self.arena.host_ptr(*f) {
                // SAFETY: the frame is inside the arena and, per the
                // caller's contract, no longer accessed by anyone.
                unsafe { core::ptr::write_bytes(p.as_ptr(), 0, PAGE_SIZE as usize) };
            }
        }
        let base = self.arena.frame_base.0;
        self.frames.with(|a| a.free(frames.iter().map(|f| f.0 - base)));
    }

    fn stats(&self) -> ReservoirStats {
        self.frames.with(|a| a.stats())
    }
}

#[cfg(feature = "std")]
pub use memfd::{HostView, MemfdReservoir};

#[cfg(feature = "std")]
mod memfd {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    fn errno() -> Error {
        Error::Os(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Guest RAM in a shared-memory file (memfd) mapped into the process.
    ///
    /// Frame `frame_base + i` is byte `i * 4096` of the file and of the
    /// mapping. Because the memory is a file, a second host view of the
    /// same pages can be mapped ([`MemfdReservoir::map_view`], for device
    /// memory), and pages can be dropped from this process's page tables
    /// without losing their contents ([`MemfdReservoir::drop_host_pages`]).
    /// Freed frames are punched out of the file, which returns the memory
    /// to the host and makes them read as zero when handed out again.
    ///
    /// For the KVM runner: register [`Arena::host`]/[`Arena::len`] as a
    /// memory slot at guest-physical `frame_base * 4096`.
    pub struct MemfdReservoir {
        fd: OwnedFd,
        arena: Arena,
        frames: LockedAllocator,
    }

    // SAFETY: the mapping is only reached through raw pointers; the
    // allocator state is locked.
    unsafe impl Send for MemfdReservoir {}
    // SAFETY: as for Send.
    unsafe impl Sync for MemfdReservoir {}

    impl MemfdReservoir {
        /// A reservoir of at most `limit` bytes whose first frame is
        /// `frame_base`. The file and the mapping are sized `limit` at once;
        /// the host allocates memory only for pages that are touched.
        pub fn new(limit: u64, frame_base: Pfn) -> Result<Self> {
            let pages = checked_pages(limit, frame_base)?;
            // SAFETY: a valid NUL-terminated name and flags.
            let raw = unsafe { libc::memfd_create(c"vmspace-reservoir".as_ptr(), libc::MFD_CLOEXEC) };
            if raw < 0 {
                return Err(errno());
            }
            // SAFETY: memfd_create returned a fresh descriptor we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: plain syscall on our descriptor.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), limit as libc::off_t) } != 0 {
                return Err(errno());
            }
            // SAFETY: a fresh shared mapping of the whole file; nothing
            // else in the process refers to the address range chosen.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    limit as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno());
            }
            let host = NonNull::new(p.cast::<u8>()).ok_or(Error::Os(libc::ENOMEM))?;
            Ok(MemfdReservoir {
                fd,
                arena: Arena { host, len: limit as usize, frame_base },
                frames: LockedAllocator::new(pages, frame_base),
            })
        }

        /// The shared-memory file descriptor (to map further views or to
        /// hand to another process).
        pub fn fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }

        /// Byte offset of frame `pfn` in the file, if it is in the arena.
        pub fn file_offset(&self, pfn: Pfn) -> Option<u64> {
            let idx = pfn.0.checked_sub(self.arena.frame_base.0)?;
            (idx < self.arena.pages()).then_some(idx * PAGE_SIZE)
        }

        fn range(&self, pfn: Pfn, pages: u64) -> Result<(u64, usize)> {
            let off = self.file_offset(pfn).ok_or(Error::Invalid(Invalid::OutsideObject))?;
            if pages == 0 {
                return Err(Invalid::ZeroLength.into());
            }
            // `off < len` (file_offset checked it), so `len - off` cannot
            // wrap; comparing page counts avoids `off + bytes` overflowing.
            let room = (self.arena.len as u64 - off) / PAGE_SIZE;
            if pages > room {
                return Err(Invalid::OutsideObject.into());
            }
            let len = pages * PAGE_SIZE;
            Ok((off, len as usize))
        }

        /// Remove `pages` frames starting at `pfn` from this process's page
        /// tables. Their contents stay in the file; the next access faults
        /// them back in. (A shadow-paging KVM host drops its shadow entries
        /// for the range as a consequence.)
        pub fn drop_host_pages(&self, pfn: Pfn, pages: u64) -> Result<()> {
            let (off, len) = self.range(pfn, pages)?;
            // SAFETY: the range is inside our own mapping; MADV_DONTNEED on
            // a shared file mapping only drops page-table entries.
            let rc =
                unsafe { libc::madvise(self.arena.host.as_ptr().add(off as usize).cast(), len, libc::MADV_DONTNEED) };
            if rc != 0 { Err(errno()) } else { Ok(()) }
        }

        /// Map a second host view of `pages` frames starting at `pfn`
        /// (device memory seen by the VMM at another address). Writes
        /// through the view are writes to guest memory that the nested
        /// table's dirty bits do not see: the caller marks them (a writable
        /// hold, or `VmSpace::dirty_op(Set)`), or maps the view read-only
        /// while tracking is on.
        pub fn map_view(&self, pfn: Pfn, pages: u64, writable: bool) -> Result<HostView> {
            let (off, len) = self.range(pfn, pages)?;
            let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
            // SAFETY: a new shared mapping of a range of our file at an
            // address the kernel chooses.
            let p = unsafe {
                libc::mmap(core::ptr::null_mut(), len, prot, libc::MAP_SHARED, self.fd.as_raw_fd(), off as libc::off_t)
            };
            if p == libc::MAP_FAILED {
                return Err(errno());
            }
            let ptr = NonNull::new(p.cast::<u8>()).ok_or(Error::Os(libc::ENOMEM))?;
            Ok(HostView { ptr, len })
        }
    }

    impl Drop for MemfdReservoir {
        fn drop(&mut self) {
            // SAFETY: our mapping from `new`; objects keep the reservoir
            // alive (Arc) as long as they use its frames.
            unsafe { libc::munmap(self.arena.host.as_ptr().cast(), self.arena.len) };
        }
    }

    // SAFETY: frames are indices below `pages`, hence inside the mapping;
    // the file starts as a hole (zero) and freed frames are punched back to
    // holes; the allocator never hands out an index twice without a free.
    unsafe impl Reservoir for MemfdReservoir {
        fn arena(&self) -> Arena {
            self.arena
        }

        fn alloc(&self, pages: u64) -> Result<Vec<Pfn>> {
            let idx = self.frames.with(|a| a.alloc(pages))?;
            Ok(frames_from(self.arena.frame_base, idx))
        }

        fn alloc_large(&self, pages: u64) -> Result<Vec<Pfn>> {
            let idx = self.frames.with(|a| a.alloc_with(pages, Runs::Large))?;
            Ok(frames_from(self.arena.frame_base, idx))
        }

        fn alloc_huge(&self, pages: u64) -> Result<Vec<Pfn>> {
            let idx = self.frames.with(|a| a.alloc_with(pages, Runs::Huge))?;
            Ok(frames_from(self.arena.frame_base, idx))
        }

        unsafe fn free(&self, frames: &[Pfn]) {
            let base = self.arena.frame_base.0;
            let mut idx: Vec<u64> = frames.iter().map(|f| f.0 - base).collect();
            idx.sort_unstable();
            // Punch contiguous runs with one call each.
            let mut i = 0;
            while i < idx.len() {
                let mut j = i + 1;
                while j < idx.len() && idx[j] == idx[j - 1] + 1 {
                    j += 1;
                }
                let off = idx[i] * PAGE_SIZE;
                let len = (j - i) as u64 * PAGE_SIZE;
                // SAFETY: plain syscall on our descriptor, range inside the
                // file. On failure (old kernels) the pages keep their
                // contents, so zero them by hand.
                let rc = unsafe {
                    libc::fallocate(
                        self.fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc != 0 {
                    // SAFETY: the range is inside our mapping and no longer
                    // accessed by anyone (caller's contract).
                    unsafe { core::ptr::write_bytes(self.arena.host.as_ptr().add(off as usize), 0, len as usize) };
                }
                i = j;
            }
            self.frames.with(|a| a.free(idx.into_iter()));
        }

        fn stats(&self) -> ReservoirStats {
            self.frames.with(|a| a.stats())
        }
    }

    /// A second host mapping of reservoir frames; unmapped on drop.
    /// Access it through raw pointers only: the guest may write the same
    /// memory concurrently.
    pub struct HostView {
        ptr: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the view is a plain memory mapping owned by this value: no
    // thread-local state, and unmapping it on drop is valid from any
    // thread.
    unsafe impl Send for HostView {}
    // SAFETY: `&HostView` only gives the mapping's address and length (no
    // method reads or writes the memory behind it, and nothing can change
    // them); what callers do with the address is their own unsafe code,
    // which must allow for concurrent access anyway (the guest writes the
    // same memory).
    unsafe impl Sync for HostView {}

    impl HostView {
        /// First byte of the view.
        pub fn as_ptr(&self) -> *mut u8 {
            self.ptr.as_ptr()
        }
        /// Length in bytes.
        pub fn len(&self) -> usize {
            self.len
        }
        /// Whether the view is empty (never: views are at least a page).
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    }

    impl Drop for HostView {
        fn drop(&mut self) {
            // SAFETY: our mapping from `map_view`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn accounting_and_limit(r: &dyn Reservoir) {
        let limit = r.stats().limit;
        assert_eq!(r.stats().allocated, 0);
        assert_eq!(r.stats().free, limit);
        let a = r.alloc(3).unwrap();
        assert_eq!(r.stats().allocated, 3 * PAGE_SIZE);
        let b = r.alloc(limit / PAGE_SIZE - 3).unwrap();
        assert_eq!(r.stats().free, 0);
        assert_eq!(r.alloc(1), Err(Error::ReservoirFull));
        // SAFETY: frames from this reservoir, unused.
        unsafe { r.free(&a[1..2]) };
        assert_eq!(r.stats().free, PAGE_SIZE);
        assert_eq!(r.alloc(2), Err(Error::ReservoirFull), "all or nothing");
        assert_eq!(r.stats().free, PAGE_SIZE);
        let c = r.alloc(1).unwrap();
        assert_eq!(c, a[1..2].to_vec());
        // SAFETY: as above.
        unsafe {
            r.free(&a[..1]);
            r.free(&a[2..]);
            r.free(&b);
            r.free(&c);
        }
        assert_eq!(r.stats().allocated, 0);
    }

    fn frames_zeroed_and_distinct(r: &dyn Reservoir) {
        let arena = r.arena();
        let a = r.alloc(4).unwrap();
        for f in &a {
            let p = arena.host_ptr(*f).unwrap();
            // SAFETY: frame owned by this test.
            unsafe { core::ptr::write_bytes(p.as_ptr(), 0xAB, PAGE_SIZE as usize) };
        }
        // SAFETY: frames from this reservoir, unused.
        unsafe { r.free(&a[1..3]) };
        let b = r.alloc(3).unwrap();
        let mut all: Vec<u64> = a.iter().chain(b.iter()).map(|f| f.0).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5, "re-allocated frames reuse the freed ones only");
        for f in &b {
            let p = arena.host_ptr(*f).unwrap();
            for i in 0..PAGE_SIZE as usize {
                // SAFETY: inside the frame.
                assert_eq!(unsafe { p.as_ptr().add(i).read_volatile() }, 0);
            }
        }
    }

    #[test]
    fn heap_reservoir() {
        let r = HeapReservoir::new(16 * PAGE_SIZE, Pfn(0x100)).unwrap();
        accounting_and_limit(&r);
        frames_zeroed_and_distinct(&r);
        assert_eq!(r.arena().frame_base, Pfn(0x100));
    }

    /// Whether frames `[512k, 512k+512)` of `f` are one aligned run.
    fn is_run(f: &[Pfn], k: usize) -> bool {
        let g = &f[k * 512..(k + 1) * 512];
        g[0].0.is_multiple_of(512) && g.iter().enumerate().all(|(i, p)| p.0 == g[0].0 + i as u64)
    }

    fn large_runs(r: &dyn Reservoir) {
        // A few 4 KiB frames first: the next run skips to an aligned frame.
        let small = r.alloc(3).unwrap();
        let a = r.alloc_large(2 * 512 + 7).unwrap();
        assert_eq!(a.len(), 1031);
        assert!(is_run(&a, 0) && is_run(&a, 1), "two aligned runs");
        let mut all: Vec<u64> = a.iter().chain(&small).map(|f| f.0).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1034, "distinct frames");
        assert_eq!(r.stats().allocated, 1034 * PAGE_SIZE);
        // A run freed whole comes back whole.
        // SAFETY: frames from this reservoir, unused.
        unsafe { r.free(&a[512..1024]) };
        let b = r.alloc_large(512).unwrap();
        assert_eq!(b, a[512..1024].to_vec());
        // Fill up: runs while fresh aligned room lasts, then 4 KiB frames,
        // breaking up free runs only when nothing else is left.
        let rest = r.stats().free / PAGE_SIZE;
        let c = r.alloc_large(rest).unwrap();
        assert_eq!(r.stats().free, 0);
        assert_eq!(r.alloc_large(1), Err(Error::ReservoirFull));
        // SAFETY: as above.
        unsafe {
            r.free(&small);
            r.free(&a[..512]);
            r.free(&a[1024..]);
            r.free(&b);
            r.free(&c);
        }
        assert_eq!(r.stats().allocated, 0);
        // Everything free: a small allocation takes no run apart while
        // 4 KiB frames remain, and runs are there for large ones.
        let d = r.alloc_large(1024).unwrap();
        assert!(is_run(&d, 0) && is_run(&d, 1));
        // SAFETY: as above.
        unsafe { r.free(&d) };
    }

    #[test]
    fn heap_reservoir_large_runs() {
        // Frame base not a multiple of 512: runs start where frames align.
        let r = HeapReservoir::new(4096 * PAGE_SIZE, Pfn(0x1_0003)).unwrap();
        large_runs(&r);
        // Too small for any aligned run: 4 KiB frames, all or nothing.
        let r = HeapReservoir::new(600 * PAGE_SIZE, Pfn(0x1_0001)).unwrap();
        let f = r.alloc_large(600).unwrap();
        let mut s: Vec<u64> = f.iter().map(|p| p.0).collect();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 600);
    }

    #[cfg(feature = "std")]
    #[test]
    fn memfd_reservoir_large_runs() {
        let r = MemfdReservoir::new(4096 * PAGE_SIZE, Pfn(0x4_0000)).unwrap();
        large_runs(&r);
    }

    /// Whether `f[k*n .. (k+1)*n]` is one run of `n` frames aligned to `n`.
    fn is_run_of(f: &[u64], k: usize, n: u64, base: u64) -> bool {
        let g = &f[k * n as usize..(k + 1) * n as usize];
        (base + g[0]).is_multiple_of(n) && g.iter().enumerate().all(|(i, p)| *p == g[0] + i as u64)
    }

    #[test]
    fn allocator_huge_runs() {
        // The bookkeeping alone (no memory behind it): 3.5 GiB of frames
        // whose first frame number is 3 past a 1 GiB boundary.
        let base = 7 * HUGE_RUN + 3;
        let mut a = FrameAllocator::new(3 * HUGE_RUN + HUGE_RUN / 2, base);
        let small = a.alloc(5).unwrap();
        // Two 1 GiB runs fit aligned (the third would reach past the end),
        // then 2 MiB runs, then 4 KiB frames.
        let n = 2 * HUGE_RUN + 3 * RUN + 9;
        let f = a.alloc_with(n, Runs::Huge).unwrap();
        assert_eq!(f.len() as u64, n);
        assert!(is_run_of(&f, 0, HUGE_RUN, base) && is_run_of(&f, 1, HUGE_RUN, base));
        for k in 0..3 {
            assert!(is_run_of(&f[2 * HUGE_RUN as usize..], k, RUN, base), "2 MiB run {k}");
        }
        let mut all: Vec<u64> = f.iter().chain(&small).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, n + 5, "distinct");
        assert_eq!(a.allocated, n + 5);
        // The fresh frames skipped to reach the first aligned GiB went to
        // the pools: 2 MiB runs among them are handed out whole.
        let r = a.alloc_with(RUN, Runs::Large).unwrap();
        assert!(is_run_of(&r, 0, RUN, base));
        assert!(r[0] < f[0], "from the skipped frames");
        // A 1 GiB run freed whole comes back whole.
        a.free(f[..HUGE_RUN as usize].iter().copied());
        assert_eq!(a.huge.len(), 1);
        let g = a.alloc_with(HUGE_RUN, Runs::Huge).unwrap();
        assert_eq!(g, f[..HUGE_RUN as usize].to_vec());
        // No 1 GiB room left: the same request gets 2 MiB runs.
        let h = a.alloc_with(HUGE_RUN, Runs::Huge).unwrap();
        assert_eq!(h.len() as u64, HUGE_RUN);
        assert!(!is_run_of(&h, 0, HUGE_RUN, base));
        assert!(h[..2 * RUN as usize].chunks_exact(RUN as usize).all(|g| (base + g[0]).is_multiple_of(RUN)));
        // Freed and broken up: a 1 GiB run gives 2 MiB runs only once
        // no other 2 MiB run is left, and 4 KiB frames last of all.
        let mut b = FrameAllocator::new(HUGE_RUN + 100, 0);
        let x = b.alloc_with(HUGE_RUN, Runs::Huge).unwrap();
        assert!(is_run_of(&x, 0, HUGE_RUN, 0));
        b.free(x.iter().copied());
        assert_eq!(b.huge, vec![0]);
        let y = b.alloc(100).unwrap();
        assert!(y.iter().all(|&i| i >= HUGE_RUN), "fresh frames before the free run");
        assert_eq!(b.huge, vec![0]);
        let z = b.alloc_with(RUN, Runs::Large).unwrap();
        assert!(is_run_of(&z, 0, RUN, 0));
        assert!(b.huge.is_empty() && b.runs.len() == 511, "broken into 2 MiB runs");
        let w = b.alloc(RUN * 511).unwrap();
        assert_eq!(w.len() as u64, RUN * 511);
        assert_eq!(b.alloc(1), Err(Error::ReservoirFull));
        b.free(w.into_iter().chain(z).chain(y));
        assert_eq!(b.allocated, 0);
        assert_eq!(b.huge, vec![0], "whole again");
    }

    #[cfg(feature = "std")]
    #[test]
    fn memfd_reservoir_huge_runs() {
        // 1 GiB + 4 MiB of frames, numbered from a 1 GiB-aligned frame: one
        // 1 GiB run, then 2 MiB runs. The memory is never touched.
        let r = MemfdReservoir::new((HUGE_RUN + 2 * RUN) * PAGE_SIZE, Pfn(4 * HUGE_RUN)).unwrap();
        let f = r.alloc_huge(HUGE_RUN + 2 * RUN).unwrap();
        let idx: Vec<u64> = f.iter().map(|p| p.0 - 4 * HUGE_RUN).collect();
        assert!(is_run_of(&idx, 0, HUGE_RUN, 0));
        assert!(is_run_of(&idx[HUGE_RUN as usize..], 0, RUN, 0) && is_run_of(&idx[HUGE_RUN as usize..], 1, RUN, 0));
        // SAFETY: frames from this reservoir, unused.
        unsafe { r.free(&f) };
        assert_eq!(r.stats().allocated, 0);
        // Frame base off the 1 GiB grid: no aligned GiB fits, 2 MiB runs.
        let r = MemfdReservoir::new((HUGE_RUN + 2 * RUN) * PAGE_SIZE, Pfn(4 * HUGE_RUN + RUN)).unwrap();
        let f = r.alloc_huge(HUGE_RUN).unwrap();
        assert!(!f[0].0.is_multiple_of(HUGE_RUN) || !f.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        assert!(f.chunks_exact(RUN as usize).all(|g| g[0].0.is_multiple_of(RUN)));
        // The default (a reservoir without 1 GiB support) hands out what
        // `alloc_large` does.
        struct Plain(HeapReservoir);
        // SAFETY: delegates to a reservoir that keeps the promises.
        unsafe impl Reservoir for Plain {
            fn arena(&self) -> Arena {
                self.0.arena()
            }
            fn alloc(&self, pages: u64) -> Result<Vec<Pfn>> {
                self.0.alloc(pages)
            }
            fn alloc_large(&self, pages: u64) -> Result<Vec<Pfn>> {
                self.0.alloc_large(pages)
            }
            unsafe fn free(&self, frames: &[Pfn]) {
                // SAFETY: the caller's contract, passed on.
                unsafe { self.0.free(frames) }
            }
            fn stats(&self) -> ReservoirStats {
                self.0.stats()
            }
        }
        let p = Plain(HeapReservoir::new(2048 * PAGE_SIZE, Pfn(0)).unwrap());
        let f = p.alloc_huge(1024).unwrap();
        assert!(f.chunks_exact(512).all(|g| g[0].0.is_multiple_of(512) && g[511].0 == g[0].0 + 511));
        // SAFETY: as above.
        unsafe { p.free(&f) };
    }

    #[test]
    fn bad_sizes() {
        assert!(matches!(HeapReservoir::new(0, Pfn(0)), Err(Error::Invalid(Invalid::BadSize))));
        // Frame numbers past u64::MAX are refused by every reservoir.
        let top = Pfn(u64::MAX - 1);
        assert!(matches!(HeapReservoir::new(4 * PAGE_SIZE, top), Err(Error::Invalid(Invalid::Overflow))));
        #[cfg(feature = "std")]
        assert!(matches!(MemfdReservoir::new(4 * PAGE_SIZE, top), Err(Error::Invalid(Invalid::Overflow))));
        assert!(matches!(HeapReservoir::new(100, Pfn(0)), Err(Error::Invalid(Invalid::BadSize))));
    }

    #[cfg(feature = "std")]
    #[test]
    fn memfd_reservoir() {
        let r = MemfdReservoir::new(16 * PAGE_SIZE, Pfn(0x4_0000)).unwrap();
        accounting_and_limit(&r);
        frames_zeroed_and_distinct(&r);
        assert!(r.fd() >= 0);
        assert_eq!(r.file_offset(Pfn(0x4_0002)), Some(2 * PAGE_SIZE));
        assert_eq!(r.file_offset(Pfn(0x4_0010)), None);
        assert_eq!(r.file_offset(Pfn(0x3_ffff)), None);
    }

    #[cfg(feature = "std")]
    #[test]
    fn memfd_second_view_and_drop_host_pages() {
        let r = MemfdReservoir::new(8 * PAGE_SIZE, Pfn(0)).unwrap();
        let f = r.alloc(2).unwrap();
        let p = r.arena().host_ptr(f[1]).unwrap().as_ptr();
        let view = r.map_view(f[1], 1, true).unwrap();
        // SAFETY: both pointers address frame f[1], which this test owns.
        unsafe {
            p.add(10).write_volatile(0x5A);
            assert_eq!(view.as_ptr().add(10).read_volatile(), 0x5A);
            view.as_ptr().add(11).write_volatile(0xA5);
            assert_eq!(p.add(11).read_volatile(), 0xA5);
        }
        r.drop_host_pages(f[1], 1).unwrap();
        // SAFETY: as above; the page faults back in with its contents.
        unsafe { assert_eq!(p.add(10).read_volatile(), 0x5A) };
        assert!(r.drop_host_pages(Pfn(8), 1).is_err());
        assert!(r.map_view(f[0], 0, false).is_err());
        // Page counts whose byte length (or `offset + length`) wraps are
        // refused as outside the arena, never panic or reach the OS.
        let out = Err(Error::Invalid(Invalid::OutsideObject));
        for pages in [u64::MAX, u64::MAX / PAGE_SIZE, u64::MAX / PAGE_SIZE - 1, 1 << 52, 8] {
            assert_eq!(r.drop_host_pages(f[1], pages).map(|_| ()), out, "{pages:#x}");
            assert_eq!(r.map_view(f[1], pages, true).map(|_| ()), out, "{pages:#x}");
        }
        assert!(r.drop_host_pages(f[1], 7).is_ok());
        drop(view);
        // SAFETY: frames from this reservoir, unused now.
        unsafe { r.free(&f) };
        let g = r.alloc(2).unwrap();
        let q = r.arena().host_ptr(g[0]).unwrap().as_ptr();
        // SAFETY: frame owned by this test; freed frames read as zero.
        unsafe { assert_eq!(q.add(10).read_volatile(), 0) };
        let q = r.arena().host_ptr(g[1]).unwrap().as_ptr();
        // SAFETY: as above.
        unsafe { assert_eq!(q.add(11).read_volatile(), 0) };
    }
}
