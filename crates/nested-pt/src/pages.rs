//! Where table pages come from.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::ptr;

use crate::Pfn;

/// A provider of 4 KiB table pages.
///
/// The tree asks for zeroed pages, converts frame numbers to pointers when
/// it descends, and returns pages it no longer needs.
///
/// # Safety
///
/// Implementers promise that:
/// - `alloc_zeroed` returns a frame not currently allocated, whose 4096
///   bytes are zero;
/// - for an allocated frame, `ptr` returns a non-null, 8-byte-aligned
///   pointer to its 4096 bytes, valid for reads and writes (including atomic
///   ones) until the frame is freed, and never aliased by a Rust reference
///   elsewhere (the pointer stays valid when the provider value itself is
///   moved: the pages do not live inside it); for a frame that is not one
///   of its pages, `ptr` returns null;
/// - the memory is not reused for anything else until `free` is called.
///
/// The tree relies on these to form atomic references to entries.
pub unsafe trait TablePages {
    /// A zeroed page, or `None` when out of memory.
    fn alloc_zeroed(&mut self) -> Option<Pfn>;
    /// Pointer to the page's 512 entries; null when `pfn` is not a page of
    /// this provider.
    fn ptr(&self, pfn: Pfn) -> *mut u64;
    /// Returns a page.
    ///
    /// # Safety
    ///
    /// `pfn` came from `alloc_zeroed`, was not freed since, and no table
    /// entry or reference points at it any more.
    unsafe fn free(&mut self, pfn: Pfn);
}

// SAFETY: forwards every call to the boxed provider, which upholds the
// contract itself.
unsafe impl<T: TablePages + ?Sized> TablePages for alloc::boxed::Box<T> {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        (**self).alloc_zeroed()
    }
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        (**self).ptr(pfn)
    }
    unsafe fn free(&mut self, pfn: Pfn) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { (**self).free(pfn) }
    }
}

/// A user-space provider: one contiguous arena reserved up front, so that
/// a frame-to-pointer conversion is a subtraction, one compare and an
/// addition on the frame's address (what a table entry holds), and every
/// table page costs exactly 4 KiB (no per-page heap header or alignment
/// padding).
///
/// The arena is obtained zeroed from the global allocator; on hosts whose
/// allocator maps large blocks lazily (glibc), untouched pages cost nothing,
/// so a generous capacity is cheap. Frames are numbered from a base the
/// caller chooses.
pub struct HeapPages {
    base: *mut u8,
    layout: Layout,
    pages: *mut u8,
    /// `base_pfn * 4096` when the first frame is below 2^52 (frames that
    /// have a 64-bit address), else 0.
    base_addr: u64,
    /// Bytes from `base_addr` covered by frames handed out so far that
    /// lie below 2^52: `ptr` of such a frame is an offset check on the
    /// frame's address (what a table entry holds), one subtraction and one
    /// compare. Frames at or past 2^52 take the index check.
    addr_len: u64,
    /// Frames from `base_pfn` up to 2^52 (0 when `base_pfn` is past it).
    addr_frames: u64,
    frames: Frames,
}

/// Frames below this have a 64-bit address (`pfn * 4096` does not wrap).
const ADDR_FRAMES: u64 = 1 << 52;

/// Bookkeeping shared by the arena providers: frames `base_pfn ..
/// base_pfn + capacity`, handed out by a bump index and recycled through a
/// free list.
struct Frames {
    base_pfn: u64,
    capacity: u64,
    next: u64,
    free: Vec<u32>,
}

impl Frames {
    /// Frames from `base_pfn`, at most `capacity` of them and never more
    /// than frame numbers left below `u64::MAX` (so `base_pfn + index`
    /// cannot overflow).
    fn new(base_pfn: u64, capacity: u64) -> Self {
        let capacity = capacity.min((u64::MAX - base_pfn).saturating_add(1));
        Frames { base_pfn, capacity, next: 0, free: Vec::new() }
    }
    /// A frame index not in use, and whether it was used before (and so
    /// may not be zero).
    fn take(&mut self) -> Option<(usize, bool)> {
        if let Some(i) = self.free.pop() {
            return Some((i as usize, true));
        }
        if self.next < self.capacity {
            self.next += 1;
            return Some(((self.next - 1) as usize, false));
        }
        None
    }
    /// The index of `pfn` if it was ever handed out.
    #[inline(always)]
    fn index(&self, pfn: Pfn) -> Option<usize> {
        let index = pfn.0.wrapping_sub(self.base_pfn);
        (index < self.next).then_some(index as usize)
    }
    fn give(&mut self, pfn: Pfn) {
        if let Some(i) = self.index(pfn) {
            self.free.push(i as u32);
        }
    }
    fn live(&self) -> u64 {
        self.next - self.free.len() as u64
    }
}

// SAFETY: the arena is owned by this value; the raw pointers are not shared
// with anything that is tied to a thread.
unsafe impl Send for HeapPages {}
// SAFETY: `&self` methods only compute pointers; they do not touch the
// arena's bookkeeping.
unsafe impl Sync for HeapPages {}

impl HeapPages {
    /// Default capacity: 2^18 pages (1 GiB of address space, enough tables
    /// for 512 GiB of 4 KiB mappings).
    pub const DEFAULT_CAPACITY: u64 = 1 << 18;

    /// An arena of the default capacity with frames numbered from 0x100.
    pub fn new() -> Self {
        Self::with_capacity(0x100, Self::DEFAULT_CAPACITY)
    }

    /// An arena of `capacity` pages whose first frame is `base_pfn`. The
    /// capacity is clamped to `1 ..= u32::MAX` pages and to the frame
    /// numbers left from `base_pfn` up to `u64::MAX`. Frames the table's
    /// format cannot address are refused by the table, not here.
    ///
    /// # Panics
    ///
    /// When the global allocator cannot reserve the arena.
    pub fn with_capacity(base_pfn: u64, capacity: u64) -> Self {
        let capacity = capacity.min((u64::MAX - base_pfn).saturating_add(1)).clamp(1, u32::MAX as u64);
        let bytes = (capacity as usize).checked_mul(4096).and_then(|b| b.checked_add(4096));
        let bytes = bytes.expect("arena size overflows");
        // A byte-aligned request lets the allocator use calloc, which maps
        // large blocks lazily; the page alignment is done by hand.
        let layout = Layout::from_size_align(bytes, 16).expect("arena layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "cannot reserve table arena");
        let pages = base.wrapping_add(base.align_offset(4096));
        let addr_frames = ADDR_FRAMES.saturating_sub(base_pfn);
        let base_addr = if addr_frames > 0 { base_pfn << 12 } else { 0 };
        HeapPages { base, layout, pages, base_addr, addr_len: 0, addr_frames, frames: Frames::new(base_pfn, capacity) }
    }

    /// Touches the arena's first `pages` pages so the host backs them now
    /// (they stay zero): benchmarks use it to keep the host kernel's
    /// first-touch page faults out of the table figures.
    pub fn prefault(&mut self, pages: u64) {
        for i in self.frames.next..pages.min(self.frames.capacity) {
            let p = self.pages.wrapping_add(i as usize * 4096);
            // SAFETY: page `i` is inside the arena and not handed out yet
            // (it is at or past the bump index), so nothing else refers to
            // it; writing zero keeps it zero.
            unsafe { ptr::write_volatile(p, 0) };
        }
    }

    /// Pages currently allocated.
    pub fn live(&self) -> u64 {
        self.frames.live()
    }
    /// The frame number of the arena's first page.
    pub fn base_pfn(&self) -> u64 {
        self.frames.base_pfn
    }
}

impl Default for HeapPages {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HeapPages {
    fn drop(&mut self) {
        // SAFETY: `base` was allocated with `layout` in `with_capacity`.
        unsafe { dealloc(self.base, self.layout) }
    }
}

// SAFETY: pages are handed out at most once until freed (the free list and
// the bump index never overlap), reused pages are zeroed before being handed
// out again, and `ptr` returns an in-arena, page-aligned pointer only for
// indices inside the arena.
unsafe impl TablePages for HeapPages {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        let (index, reused) = self.frames.take()?;
        // At most `u32::MAX` frames, so the product fits.
        self.addr_len = self.frames.next.min(self.addr_frames) << 12;
        if reused {
            let p = self.pages.wrapping_add(index * 4096);
            // SAFETY: page `index` is inside the arena and not allocated.
            unsafe { ptr::write_bytes(p, 0, 4096) };
        }
        Some(Pfn(self.frames.base_pfn + index as u64))
    }

    #[inline(always)]
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        if pfn.0 < ADDR_FRAMES {
            // The frame's offset from the first frame, in bytes: a frame
            // below `base_pfn` wraps to at least `2^64 - base_addr`, which
            // is at least `addr_len` (`base_addr + addr_len <= 2^64`), so
            // one unsigned compare checks both ends. A table entry's
            // address field is `pfn * 4096` already, so for the walks this
            // is a subtraction and a compare on the entry, and the `< 2^52`
            // test folds away (the frame came from a masked entry).
            let off = (pfn.0 << 12).wrapping_sub(self.base_addr);
            if off < self.addr_len {
                let p = self.pages.wrapping_add(off as usize);
                // SAFETY: `p` is a page of the arena (the offset is below
                // the pages handed out), which the allocator placed at a
                // non-null address; telling the compiler lets the tree's
                // null check of the result fold into the offset check.
                unsafe { core::hint::assert_unchecked(!p.is_null()) };
                return p.cast();
            }
            return ptr::null_mut();
        }
        match self.frames.index(pfn) {
            Some(index) => self.pages.wrapping_add(index * 4096).cast(),
            None => ptr::null_mut(),
        }
    }

    unsafe fn free(&mut self, pfn: Pfn) {
        self.frames.give(pfn);
    }
}

/// A provider over memory the caller owns, for kernels and other bare-metal
/// users: a range of `pages` page frames starting at physical address
/// `phys`, reachable at virtual address `virt` (equal to `phys` in an
/// identity-mapped kernel). Frame numbers are real physical frame numbers,
/// so entries point where the hardware will look.
pub struct PhysPages {
    virt: *mut u8,
    frames: Frames,
}

// SAFETY: the region is owned by this value (the constructor's contract);
// the raw pointer is not tied to a thread.
unsafe impl Send for PhysPages {}
// SAFETY: `&self` methods only compute pointers.
unsafe impl Sync for PhysPages {}

impl PhysPages {
    /// A provider over `pages` frames at physical address `phys`, mapped at
    /// `virt`. Returns `None` when an address is not 4 KiB aligned or the
    /// range overflows.
    ///
    /// # Safety
    ///
    /// `[virt, virt + pages * 4096)` must be writable memory that maps
    /// `[phys, phys + pages * 4096)`, that nothing else uses for as long as
    /// the provider (and any table built on it) lives.
    pub unsafe fn new(phys: u64, virt: *mut u8, pages: u64) -> Option<Self> {
        let pages = pages.min(u32::MAX as u64);
        if phys & 0xfff != 0 || (virt as usize) & 0xfff != 0 {
            return None;
        }
        phys.checked_add(pages.checked_mul(4096)?)?;
        (virt as usize).checked_add(usize::try_from(pages.checked_mul(4096)?).ok()?)?;
        Some(PhysPages { virt, frames: Frames::new(phys >> 12, pages) })
    }
    /// Pages handed out and not yet returned.
    pub fn live(&self) -> u64 {
        self.frames.live()
    }
}

// SAFETY: each frame is handed out at most once until freed (bump index and
// free list never overlap) and is zeroed before it is handed out; `ptr`
// returns a pointer into the caller-owned region only for frames handed out
// at some point (`index < next`), which the constructor's contract keeps
// valid.
unsafe impl TablePages for PhysPages {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        let (index, _) = self.frames.take()?;
        let p = self.virt.wrapping_add(index * 4096);
        // SAFETY: page `index` lies inside the caller's region and is not
        // in use (just taken from the free list or the bump index).
        unsafe { ptr::write_bytes(p, 0, 4096) };
        Some(Pfn(self.frames.base_pfn + index as u64))
    }

    #[inline(always)]
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        match self.frames.index(pfn) {
            Some(index) => self.virt.wrapping_add(index * 4096).cast(),
            None => ptr::null_mut(),
        }
    }

    unsafe fn free(&mut self, pfn: Pfn) {
        self.frames.give(pfn);
    }
}

/// A checking wrapper for tests: counts live pages, catches double frees
/// and frees of foreign pages, and can be told to fail allocations.
pub struct CountingPages<P> {
    inner: P,
    live: BTreeSet<u64>,
    allocs: u64,
    frees: u64,
    fail_after: Option<u64>,
    errors: Vec<&'static str>,
}

impl<P: TablePages> CountingPages<P> {
    /// Wraps `inner`.
    pub fn new(inner: P) -> Self {
        CountingPages { inner, live: BTreeSet::new(), allocs: 0, frees: 0, fail_after: None, errors: Vec::new() }
    }
    /// Pages currently allocated.
    pub fn live(&self) -> usize {
        self.live.len()
    }
    /// Allocations made so far.
    pub fn allocs(&self) -> u64 {
        self.allocs
    }
    /// Frees made so far.
    pub fn frees(&self) -> u64 {
        self.frees
    }
    /// Let `n` more allocations succeed, then fail every one; `None` lifts
    /// the limit.
    pub fn fail_after(&mut self, n: Option<u64>) {
        self.fail_after = n;
    }
    /// Misuse seen so far (double free, foreign free).
    pub fn errors(&self) -> &[&'static str] {
        &self.errors
    }
    /// True when `pfn` is allocated.
    pub fn is_live(&self, pfn: Pfn) -> bool {
        self.live.contains(&pfn.0)
    }
}

// SAFETY: forwards to `inner`, which upholds the contract; the wrapper only
// adds bookkeeping and refuses to forward a free it can tell is wrong.
unsafe impl<P: TablePages> TablePages for CountingPages<P> {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        if let Some(n) = self.fail_after {
            if n == 0 {
                return None;
            }
            self.fail_after = Some(n - 1);
        }
        let pfn = self.inner.alloc_zeroed()?;
        self.allocs += 1;
        if !self.live.insert(pfn.0) {
            self.errors.push("provider handed out a live page twice");
        }
        Some(pfn)
    }
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        if !self.live.contains(&pfn.0) {
            return ptr::null_mut();
        }
        self.inner.ptr(pfn)
    }
    unsafe fn free(&mut self, pfn: Pfn) {
        if !self.live.remove(&pfn.0) {
            self.errors.push("free of a page that is not allocated");
            return;
        }
        self.frees += 1;
        // SAFETY: the page was live in this wrapper, so it came from
        // `inner.alloc_zeroed`; the caller promises it is unreferenced.
        unsafe { self.inner.free(pfn) }
    }
}
