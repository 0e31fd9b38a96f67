//! The host's view of a memory object: reads and writes by offset, and
//! the object's frames as runs of contiguous frames.
//!
//! An object's frames need not be contiguous (the reservoir hands out
//! 4 KiB frames), so a host view is a walk over the pages an access
//! touches, each page reached through the object's host window (the
//! reservoir's arena for RAM, the caller's mapping for MMIO with a view).
//! Nothing here forms a Rust reference to object memory: the guest and
//! other threads may write it at any time, so every access is a raw copy.

use nested_pt::Pfn;

use crate::PAGE_SIZE;
use crate::error::{Error, Invalid, Result};
use crate::object::VmObject;

/// A run of contiguous frames of an object: the pages
/// `[offset, offset + pages * 4096)` of the object are frames
/// `pfn .. pfn + pages`. See [`VmObject::frame_runs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameRun {
    /// Byte offset in the object of the run's first page.
    pub offset: u64,
    /// The run's first frame.
    pub pfn: Pfn,
    /// Pages in the run (at least one).
    pub pages: u64,
}

/// Iterator over an object's frame runs, in offset order; see
/// [`VmObject::frame_runs`].
#[derive(Clone, Debug)]
pub struct FrameRuns<'a> {
    object: &'a VmObject,
    /// Offset of the next page not reported yet.
    next: u64,
}

impl Iterator for FrameRuns<'_> {
    type Item = FrameRun;

    fn next(&mut self) -> Option<FrameRun> {
        let offset = self.next;
        let pfn = self.object.frame_at(offset)?;
        let mut pages = 1;
        while let Some(f) = self.object.frame_at(offset + pages * PAGE_SIZE) {
            if pfn.0.checked_add(pages) != Some(f.0) {
                break;
            }
            pages += 1;
        }
        self.next = offset + pages * PAGE_SIZE;
        Some(FrameRun { offset, pfn, pages })
    }
}

impl VmObject {
    /// The object's frames as maximal runs of contiguous frames, in
    /// offset order: one run per host mapping a VMM needs to map the
    /// object (e.g. one [`MemfdReservoir::map_view`](crate::MemfdReservoir::map_view)
    /// per run, not one per page), or the extents an external tool
    /// exports. An MMIO object is one run.
    pub fn frame_runs(&self) -> FrameRuns<'_> {
        FrameRuns { object: self, next: 0 }
    }

    /// Host pointer to byte `offset` of the object (`offset` inside it).
    fn host_at(&self, offset: u64) -> Result<*mut u8> {
        let (first, count, host) = self.host_window().ok_or(Error::NoHostView)?;
        let pfn = self.frame_at(offset).ok_or(Invalid::OutsideObject)?;
        // The object's frames lie in its window (the reservoir's arena, or
        // the MMIO range its view covers); checked rather than assumed.
        let idx = pfn.0.checked_sub(first.0).filter(|&i| i < count).ok_or(Error::NoHostView)?;
        let byte = idx * PAGE_SIZE + offset % PAGE_SIZE;
        // SAFETY: `idx < count`, so `byte` is inside the window, which the
        // reservoir (RAM) or the creator of the MMIO view keeps mapped for
        // the object's life.
        Ok(unsafe { host.as_ptr().add(byte as usize) })
    }

    /// Calls `f(host, done, n)` for each piece of `[offset, offset+len)`
    /// that lies in one page: `host` points at the piece, `done` bytes
    /// came before it. Checks the whole range first.
    fn for_each_piece(&self, offset: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> Result<()> {
        let len64 = len as u64;
        if offset > self.size() || len64 > self.size() - offset {
            return Err(Invalid::OutsideObject.into());
        }
        if len > 0 && self.host_window().is_none() {
            return Err(Error::NoHostView);
        }
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            f(self.host_at(at)?, done, n);
            done += n;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of the object from byte `offset` into
    /// `dst`, crossing page boundaries (the frames of consecutive pages
    /// need not be contiguous). Refused, with nothing read, with
    /// [`Invalid::OutsideObject`] for a range past the object's end and
    /// [`Error::NoHostView`] for MMIO without a host view.
    ///
    /// The copy is not atomic: the guest or another thread writing the
    /// range meanwhile may leave a mix of old and new bytes in `dst`.
    ///
    /// For a swappable object, resident pages are read from their frames,
    /// swapped-out pages from the swap file and never-touched pages as
    /// zero; nothing is swapped in.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        if let Some(s) = self.swap() {
            return s.read(self.size(), offset, dst);
        }
        let base = dst.as_mut_ptr();
        self.for_each_piece(offset, dst.len(), |host, done, n| {
            // SAFETY: `host..host+n` is inside one page of the object's
            // host window (`for_each_piece`), valid while `self` lives;
            // `base + done .. + n` is inside `dst`, which is host memory
            // of ours and cannot overlap the object's pages (no Rust
            // reference to them exists).
            unsafe { core::ptr::copy_nonoverlapping(host, base.add(done), n) }
        })
    }

    /// Copies `src` into the object from byte `offset` (errors as
    /// [`read`](Self::read); nothing is written when refused).
    ///
    /// This is the host's own access, outside every mapping: it is not
    /// seen by dirty tracking. Writes a migration must see go through a
    /// page hold ([`VmClient::hold`](crate::VmClient::hold)), or are
    /// reported with [`DirtyOp::Set`](crate::DirtyOp::Set) on the
    /// mappings of the pages written. Use it to load images before a
    /// guest runs, or on objects no mapping tracks.
    ///
    /// For a swappable object, pages that are not resident are written in
    /// the swap file (nothing is swapped in).
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        if let Some(s) = self.swap() {
            return s.write(self.size(), offset, src);
        }
        let base = src.as_ptr();
        self.for_each_piece(offset, src.len(), |host, done, n| {
            // SAFETY: as in `read`, in the other direction.
            unsafe { core::ptr::copy_nonoverlapping(base.add(done), host, n) }
        })
    }
}
