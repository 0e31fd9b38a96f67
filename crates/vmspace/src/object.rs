//! Memory objects: what a mapping maps.

use alloc::boxed::Box;
use core::ptr::NonNull;

use nested_pt::{MemType, Pfn};

use crate::PAGE_SIZE;
use crate::error::{Invalid, Result};
use crate::reservoir::{Arena, Reservoir};
use alloc::sync::Arc;

/// Frames in a 2 MiB run.
const RUN: usize = 512;

/// Frames in a 1 GiB run.
const HUGE: usize = crate::reservoir::HUGE_RUN as usize;

enum Backing {
    Ram {
        reservoir: alloc::sync::Arc<dyn Reservoir>,
        arena: Arena,
        frames: Box<[Pfn]>,
        /// Bit `k`: pages `512k .. 512k + 512` are one aligned 2 MiB run.
        runs: Box<[u64]>,
        /// Bit `k`: pages `262144k .. 262144(k+1)` are one aligned 1 GiB run.
        huge: Box<[u64]>,
    },
    Mmio {
        base: Pfn,
        host: Option<NonNull<u8>>,
    },
    /// Lazily backed, swappable RAM (see `swap.rs`).
    #[cfg(feature = "std")]
    Swap(Box<crate::swap::Swap>),
}

/// A memory object: guest RAM from a [`Reservoir`] (write-back), or a fixed
/// host-physical range (MMIO, uncached).
///
/// Objects are shared (`Arc<VmObject>`): every mapping holds a reference,
/// and a page hold on a mapping that is unmapped takes one too, so the
/// object outlives the last access to its memory. RAM frames return to the
/// reservoir when the last reference goes.
pub struct VmObject {
    size: u64,
    mem_type: MemType,
    backing: Backing,
}

// SAFETY: the object is immutable after creation; the host pointers it
// holds address memory owned by the reservoir (kept alive by the Arc) or
// vouched for by the caller of `mmio`, and are only used for raw accesses.
unsafe impl Send for VmObject {}
// SAFETY: as for Send.
unsafe impl Sync for VmObject {}

impl core::fmt::Debug for VmObject {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmObject")
            .field("size", &self.size)
            .field("mem_type", &self.mem_type)
            .field("ram", &self.is_ram())
            .finish()
    }
}

impl VmObject {
    /// Guest RAM of `size` bytes (a non-zero multiple of 4 KiB), allocated
    /// from `reservoir` with [`Reservoir::alloc_huge`] (aligned 1 GiB runs
    /// where it can, then aligned 2 MiB runs, 4 KiB frames otherwise);
    /// zero-filled.
    pub fn ram(reservoir: alloc::sync::Arc<dyn Reservoir>, size: u64) -> Result<Arc<Self>> {
        if size == 0 {
            return Err(Invalid::ZeroLength.into());
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        let frames = reservoir.alloc_huge(size / PAGE_SIZE)?.into_boxed_slice();
        let arena = reservoir.arena();
        let groups = frames.len() / RUN;
        let mut runs = alloc::vec![0u64; groups.div_ceil(64)].into_boxed_slice();
        for (k, g) in frames.chunks_exact(RUN).enumerate() {
            let first = g[0].0;
            if first.is_multiple_of(RUN as u64) && g.iter().enumerate().all(|(i, p)| p.0 == first + i as u64) {
                runs[k / 64] |= 1 << (k % 64);
            }
        }
        // A 1 GiB group is one run when its first frame is aligned and its
        // 512 2 MiB groups are runs following each other.
        let giant = frames.len() / HUGE;
        let mut huge = alloc::vec![0u64; giant.div_ceil(64)].into_boxed_slice();
        for k in 0..giant {
            let first = frames[k * HUGE].0;
            let all = (0..HUGE / RUN).all(|j| {
                let g = k * (HUGE / RUN) + j;
                runs[g / 64] & (1 << (g % 64)) != 0 && frames[g * RUN].0 == first + (j * RUN) as u64
            });
            if first.is_multiple_of(HUGE as u64) && all {
                huge[k / 64] |= 1 << (k % 64);
            }
        }
        Ok(Arc::new(VmObject {
            size,
            mem_type: MemType::WriteBack,
            backing: Backing::Ram { reservoir, arena, frames, runs, huge },
        }))
    }

    /// An MMIO object: `size` bytes of host-physical memory starting at
    /// frame `base`, mapped uncached. Holds on it fail with
    /// [`Error::NoHostView`](crate::Error::NoHostView): only the nested table reaches it.
    pub fn mmio(base: Pfn, size: u64) -> Result<Arc<Self>> {
        // SAFETY: no host view is given, so no pointer is ever formed.
        unsafe { Self::mmio_with_view(base, size, None) }
    }

    /// An MMIO object as [`VmObject::mmio`], with a host mapping of the
    /// range through which holds access it.
    ///
    /// # Safety
    /// When `host` is given, it must address `size` bytes that stay mapped
    /// and accessible (by raw reads and writes) as long as the object lives.
    pub unsafe fn mmio_with_view(base: Pfn, size: u64, host: Option<NonNull<u8>>) -> Result<Arc<Self>> {
        if size == 0 {
            return Err(Invalid::ZeroLength.into());
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        if base.0.checked_add(size / PAGE_SIZE).is_none() {
            return Err(Invalid::Overflow.into());
        }
        Ok(Arc::new(VmObject { size, mem_type: MemType::Uncacheable, backing: Backing::Mmio { base, host } }))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memory type its mappings get (write-back RAM, uncached MMIO).
    pub fn mem_type(&self) -> MemType {
        self.mem_type
    }

    /// Whether the object is reservoir RAM (swappable RAM included).
    pub fn is_ram(&self) -> bool {
        match self.backing {
            Backing::Ram { .. } => true,
            #[cfg(feature = "std")]
            Backing::Swap(_) => true,
            Backing::Mmio { .. } => false,
        }
    }

    /// The swap state of a swappable object.
    #[cfg(feature = "std")]
    pub(crate) fn swap(&self) -> Option<&crate::swap::Swap> {
        match &self.backing {
            Backing::Swap(s) => Some(s),
            _ => None,
        }
    }

    /// The swap state of a swappable object (`None` without `std`).
    #[cfg(not(feature = "std"))]
    pub(crate) fn swap(&self) -> Option<&crate::swap::Swap> {
        None
    }

    /// A swappable RAM object (see [`VmObject::swappable`]).
    #[cfg(feature = "std")]
    pub(crate) fn from_swap(size: u64, swap: crate::swap::Swap) -> Arc<Self> {
        Arc::new(VmObject { size, mem_type: MemType::WriteBack, backing: Backing::Swap(Box::new(swap)) })
    }

    /// The frame holding byte `offset`, or `None` past the end.
    #[inline]
    pub fn frame_at(&self, offset: u64) -> Option<Pfn> {
        if offset >= self.size {
            return None;
        }
        let page = offset / PAGE_SIZE;
        match &self.backing {
            Backing::Ram { frames, .. } => frames.get(page as usize).copied(),
            Backing::Mmio { base, .. } => Some(Pfn(base.0 + page)),
            #[cfg(feature = "std")]
            Backing::Swap(s) => s.frame(page),
        }
    }

    /// The first frame of the aligned 2 MiB run that backs
    /// `[offset, offset + 2 MiB)`, if one run does: `offset` a multiple of
    /// 2 MiB inside the object, its 512 frames contiguous from a frame
    /// number that is a multiple of 512 (RAM whose reservoir handed out a
    /// run there; MMIO whose range is aligned there; never a swappable object).
    /// Such a range can be mapped with one 2 MiB leaf.
    pub fn run_at(&self, offset: u64) -> Option<Pfn> {
        self.aligned_run(offset, RUN)
    }

    /// The first frame of the aligned 1 GiB run that backs
    /// `[offset, offset + 1 GiB)`, if one run does: `offset` a multiple of
    /// 1 GiB inside the object, its 262,144 frames contiguous from a frame
    /// number that is a multiple of 262,144 (RAM whose reservoir handed
    /// out a 1 GiB run there, [`Reservoir::alloc_huge`]; MMIO whose range
    /// is aligned there; never a swappable object). Such a range can be
    /// mapped with one 1 GiB leaf; each of its 2 MiB pieces is also a run
    /// for [`VmObject::run_at`].
    pub fn huge_run_at(&self, offset: u64) -> Option<Pfn> {
        self.aligned_run(offset, HUGE)
    }

    /// [`run_at`](Self::run_at) (`pages` = `RUN`) and
    /// [`huge_run_at`](Self::huge_run_at) (`pages` = `HUGE`): the first
    /// frame of the aligned run of `pages` frames backing the object from
    /// `offset`, from RAM's run bitmap of that size or MMIO's alignment.
    fn aligned_run(&self, offset: u64, pages: usize) -> Option<Pfn> {
        let span = pages as u64 * PAGE_SIZE;
        if !offset.is_multiple_of(span) || offset.checked_add(span)? > self.size {
            return None;
        }
        let k = (offset / span) as usize;
        match &self.backing {
            Backing::Ram { frames, runs, huge, .. } => {
                let bits = if pages == HUGE { huge } else { runs };
                (bits.get(k / 64)? & (1 << (k % 64)) != 0).then(|| frames[k * pages])
            }
            Backing::Mmio { base, .. } => {
                let f = base.0 + offset / PAGE_SIZE;
                f.is_multiple_of(pages as u64).then_some(Pfn(f))
            }
            // Lazily backed page by page: never one run.
            #[cfg(feature = "std")]
            Backing::Swap(_) => None,
        }
    }

    /// Whether every frame of the pages `[offset, offset+len)` (a range
    /// inside the object) is below `limit`: a table format can only express
    /// frames `0 .. PteFormat::frame_limit()`, so `map` refuses an object
    /// range with a frame beyond it before anything changes.
    pub(crate) fn frames_below(&self, offset: u64, len: u64, limit: u64) -> bool {
        let first = (offset / PAGE_SIZE) as usize;
        let pages = (len / PAGE_SIZE) as usize;
        match &self.backing {
            Backing::Ram { frames, .. } => {
                frames.get(first..first.saturating_add(pages)).is_some_and(|f| f.iter().all(|p| p.0 < limit))
            }
            // `base + size / 4096` does not overflow (checked at creation).
            Backing::Mmio { base, .. } => base.0 + ((offset + len) / PAGE_SIZE) <= limit,
            // Any frame of the arena may back any page later.
            #[cfg(feature = "std")]
            Backing::Swap(s) => s.frames_below(limit),
        }
    }

    /// The host view of the object's frames as (first frame, frame count,
    /// host address of the first frame): frame `f` with
    /// `f - first < count` is at `host + (f - first) * 4096`. `None` for
    /// MMIO without a host view. The data path caches it per mapping, so
    /// that a hold turns the frame found in the leaf into a host pointer
    /// without looking the object's frame list up.
    pub(crate) fn host_window(&self) -> Option<(Pfn, u64, NonNull<u8>)> {
        match &self.backing {
            Backing::Ram { arena, .. } => Some((arena.frame_base, arena.pages(), arena.host)),
            Backing::Mmio { base, host } => host.map(|h| (*base, self.size / PAGE_SIZE, h)),
            #[cfg(feature = "std")]
            Backing::Swap(s) => {
                let arena = s.arena();
                Some((arena.frame_base, arena.pages(), arena.host))
            }
        }
    }
}

impl Drop for VmObject {
    fn drop(&mut self) {
        if let Backing::Ram { reservoir, frames, .. } = &self.backing {
            // SAFETY: the frames came from this reservoir's `alloc`, and
            // the last reference to the object is going, so no mapping or
            // hold reaches them any more.
            unsafe { reservoir.free(frames) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::reservoir::HeapReservoir;

    #[test]
    fn ram_object_frames_and_release() {
        let r = alloc::sync::Arc::new(HeapReservoir::new(8 * PAGE_SIZE, Pfn(0x10)).unwrap());
        let o = VmObject::ram(r.clone(), 3 * PAGE_SIZE).unwrap();
        assert!(o.is_ram());
        assert_eq!(o.mem_type(), MemType::WriteBack);
        assert_eq!(r.stats().allocated, 3 * PAGE_SIZE);
        let f0 = o.frame_at(0).unwrap();
        assert_eq!(o.frame_at(PAGE_SIZE - 1), Some(f0));
        assert!(o.frame_at(2 * PAGE_SIZE).is_some());
        assert_eq!(o.frame_at(3 * PAGE_SIZE), None);
        assert_eq!(o.frame_at(u64::MAX), None);
        let o2 = o.clone();
        drop(o);
        assert_eq!(r.stats().allocated, 3 * PAGE_SIZE, "shared: still alive");
        drop(o2);
        assert_eq!(r.stats().allocated, 0);
    }

    #[test]
    fn object_errors() {
        let r = alloc::sync::Arc::new(HeapReservoir::new(2 * PAGE_SIZE, Pfn(0)).unwrap());
        assert_eq!(VmObject::ram(r.clone(), 0).unwrap_err(), Error::Invalid(Invalid::ZeroLength));
        assert_eq!(VmObject::ram(r.clone(), 10).unwrap_err(), Error::Invalid(Invalid::Unaligned));
        assert_eq!(VmObject::ram(r.clone(), 3 * PAGE_SIZE).unwrap_err(), Error::ReservoirFull);
        assert_eq!(VmObject::mmio(Pfn(0), 0).unwrap_err(), Error::Invalid(Invalid::ZeroLength));
        assert_eq!(VmObject::mmio(Pfn(u64::MAX), PAGE_SIZE).unwrap_err(), Error::Invalid(Invalid::Overflow));
    }

    #[test]
    fn runs_of_an_object() {
        let r = alloc::sync::Arc::new(HeapReservoir::new(4096 * PAGE_SIZE, Pfn(0x1_0000)).unwrap());
        let _head = r.alloc(5).unwrap();
        let o = VmObject::ram(r.clone(), 3 * 512 * PAGE_SIZE + 8 * PAGE_SIZE).unwrap();
        let m2 = 512 * PAGE_SIZE;
        for k in 0..3 {
            let f = o.run_at(k * m2).expect("a run");
            assert!(f.0.is_multiple_of(512));
            assert_eq!(o.frame_at(k * m2 + 100 * PAGE_SIZE), Some(Pfn(f.0 + 100)));
        }
        assert_eq!(o.run_at(3 * m2), None, "the tail is shorter than 2 MiB");
        assert_eq!(o.run_at(PAGE_SIZE), None, "unaligned offset");
        assert_eq!(o.run_at(!(m2 - 1)), None);
        // No aligned room for a run: 4 KiB frames.
        let r = alloc::sync::Arc::new(HeapReservoir::new(900 * PAGE_SIZE, Pfn(0x1_0001)).unwrap());
        let o = VmObject::ram(r, 800 * PAGE_SIZE).unwrap();
        assert_eq!(o.run_at(0), None);
        let m = VmObject::mmio(Pfn(0x8_0000), 2 * m2).unwrap();
        assert_eq!(m.run_at(m2), Some(Pfn(0x8_0200)));
        let m = VmObject::mmio(Pfn(0x8_0001), 2 * m2).unwrap();
        assert_eq!(m.run_at(0), None);
    }

    #[cfg(feature = "std")]
    #[test]
    fn huge_runs_of_an_object() {
        use crate::reservoir::MemfdReservoir;
        let g1 = HUGE as u64 * PAGE_SIZE;
        let m2 = RUN as u64 * PAGE_SIZE;
        // 1 GiB + 4 MiB from a 1 GiB-aligned frame: one 1 GiB run, whose
        // 2 MiB pieces are runs too, then two 2 MiB runs (never touched:
        // a memfd's pages are allocated on first access).
        let r = alloc::sync::Arc::new(MemfdReservoir::new(g1 + 2 * m2, Pfn(3 * HUGE as u64)).unwrap());
        let o = VmObject::ram(r.clone(), g1 + 2 * m2).unwrap();
        assert_eq!(o.huge_run_at(0), Some(Pfn(3 * HUGE as u64)));
        assert_eq!(o.run_at(5 * m2), Some(Pfn(3 * HUGE as u64 + 5 * RUN as u64)));
        assert_eq!(o.frame_at(g1 - PAGE_SIZE), Some(Pfn(4 * HUGE as u64 - 1)));
        assert_eq!(o.huge_run_at(m2), None, "unaligned offset");
        assert_eq!(o.huge_run_at(g1), None, "the tail is shorter than 1 GiB");
        assert!(o.run_at(g1).is_some() && o.run_at(g1 + m2).is_some());
        assert_eq!(o.huge_run_at(!(g1 - 1)), None);
        drop(o);
        assert_eq!(r.stats().allocated, 0);
        // The reservoir gives no 1 GiB run (frames off the grid): 2 MiB runs.
        let r = alloc::sync::Arc::new(MemfdReservoir::new(g1 + 2 * m2, Pfn(3 * HUGE as u64 + RUN as u64)).unwrap());
        let o = VmObject::ram(r, g1).unwrap();
        assert_eq!(o.huge_run_at(0), None);
        assert!((0..512).all(|k| o.run_at(k * m2).is_some()));
        let m = VmObject::mmio(Pfn(HUGE as u64), 2 * g1).unwrap();
        assert_eq!(m.huge_run_at(g1), Some(Pfn(2 * HUGE as u64)));
        let m = VmObject::mmio(Pfn(HUGE as u64 + RUN as u64), 2 * g1).unwrap();
        assert_eq!(m.huge_run_at(0), None);
    }

    #[test]
    fn mmio_object() {
        let o = VmObject::mmio(Pfn(0xfee00), 2 * PAGE_SIZE).unwrap();
        assert!(!o.is_ram());
        assert_eq!(o.mem_type(), MemType::Uncacheable);
        assert_eq!(o.frame_at(PAGE_SIZE + 5), Some(Pfn(0xfee01)));
        assert!(o.host_window().is_none());
    }
}
