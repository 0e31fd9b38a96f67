//! Shared-memory regions that back KVM memory slots.
//!
//! A [`SharedRegion`] is a `memfd` mapped `MAP_SHARED` into this process. The
//! mapping registered with KVM (the *KVM view*) is a separate mapping of the
//! same file, so that `madvise(MADV_DONTNEED)` on the KVM view drops only
//! KVM's path to a frame (the data stays in the file, and the host's own view
//! is untouched). On a shadow-paging host that is how a stale shadow entry
//! for one frame is dropped (see the crate documentation).
//!
//! Guest memory is only ever touched through raw pointers and volatile or
//! atomic accesses: the guest writes it concurrently, so no Rust reference to
//! its bytes is ever formed.

use std::io;
use std::ptr::NonNull;

/// Page size used throughout (4 KiB).
pub const PAGE: u64 = 4096;

/// One `mmap` of a memfd; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: libc::c_int, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of our own memfd; no existing memory
        // is affected. The result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping with this length and nothing else
        // unmaps it; users of the pointer are gone (the region owns it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A memfd of `len` bytes with a host view and a separate KVM view.
#[derive(Debug)]
pub struct SharedRegion {
    fd: libc::c_int,
    host: Mapping,
    kvm: Mapping,
}

// SAFETY: the region is plain shared memory addressed through raw pointers;
// every access is a raw/volatile/atomic access whose synchronisation is the
// caller's protocol, so handing the pointers to other threads is sound.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&SharedRegion` exposes only raw pointers and madvise.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates a zero-filled region of `len` bytes (a multiple of 4 KiB).
    pub fn new(name: &str, len: u64) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "region length"));
        }
        let len_usize = usize::try_from(len).map_err(io::Error::other)?;
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is our memfd; ftruncate only sizes it.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: closing the fd we just opened.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let host = Mapping::new(fd, len_usize);
        let kvm = Mapping::new(fd, len_usize);
        match (host, kvm) {
            (Ok(host), Ok(kvm)) => Ok(SharedRegion { fd, host, kvm }),
            (Err(e), _) | (_, Err(e)) => {
                // SAFETY: closing our own fd; the mappings (if any) drop.
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.host.len as u64
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Host view base pointer.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host.ptr.as_ptr()
    }

    /// Address of the KVM view (what is passed as `userspace_addr`).
    pub fn kvm_addr(&self) -> u64 {
        self.kvm.ptr.as_ptr() as u64
    }

    /// Checks that `[off, off+len)` lies inside the region, without
    /// wrapping: `off <= size && len <= size - off`.
    fn check(&self, off: u64, len: u64) -> Result<usize, RegionError> {
        let size = self.len();
        if off <= size && len <= size - off {
            // In bounds of a mapping of `size` bytes, which fits in usize.
            Ok(off as usize)
        } else {
            Err(RegionError::OutOfRange { off, len, size })
        }
    }

    /// As [`check`](Self::check) for an 8-byte, 8-aligned word.
    fn check_u64(&self, off: u64) -> Result<usize, RegionError> {
        if !off.is_multiple_of(8) {
            return Err(RegionError::Unaligned { off, align: 8 });
        }
        self.check(off, 8)
    }

    /// Host pointer to byte `off`, refused past the end.
    pub fn ptr_at(&self, off: u64) -> Result<*mut u8, RegionError> {
        let at = self.check(off, 1)?;
        // SAFETY: `at < len` (checked above), so the result stays inside
        // the host mapping.
        Ok(unsafe { self.host_ptr().add(at) })
    }

    /// Reads a u64 at byte offset `off` (8-aligned) atomically.
    pub fn read_u64(&self, off: u64) -> Result<u64, RegionError> {
        Ok(self.atomic_u64(off)?.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Writes a u64 at byte offset `off` (8-aligned) atomically.
    pub fn write_u64(&self, off: u64, v: u64) -> Result<(), RegionError> {
        self.atomic_u64(off)?.store(v, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The u64 at `off` as an atomic (guest memory is shared with vCPUs).
    pub fn atomic_u64(&self, off: u64) -> Result<&std::sync::atomic::AtomicU64, RegionError> {
        let at = self.check_u64(off)?;
        // SAFETY: 8-aligned and the whole word in bounds (checked above); the
        // mapping lives as long as &self. An AtomicU64 over shared memory is
        // the sanctioned way to share it with the guest.
        Ok(unsafe { &*(self.host_ptr().add(at) as *const std::sync::atomic::AtomicU64) })
    }

    /// Copies `src` into the region at `off` (host setup of code/tables).
    pub fn write_bytes(&self, off: u64, src: &[u8]) -> Result<(), RegionError> {
        let at = self.check(off, src.len() as u64)?;
        // SAFETY: `[at, at + src.len())` is inside the host mapping (checked
        // above); a raw copy, no reference over guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.host_ptr().add(at), src.len()) };
        Ok(())
    }

    /// Zeroes `len` bytes at `off` through the host view.
    pub fn zero(&self, off: u64, len: u64) -> Result<(), RegionError> {
        let at = self.check(off, len)?;
        // SAFETY: `[at, at + len)` is inside the host mapping (checked
        // above, so `len` fits in usize); a raw write.
        unsafe { std::ptr::write_bytes(self.host_ptr().add(at), 0, len as usize) };
        Ok(())
    }

    /// Drops the KVM view's mapping of pages `[off, off+len)` (data is kept in
    /// the memfd). KVM's MMU notifier then zaps every shadow/secondary entry
    /// that maps those frames; the next guest access re-faults them.
    pub fn drop_kvm_view(&self, off: u64, len: u64) -> io::Result<()> {
        if !off.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, RegionError::Unaligned { off, align: PAGE }));
        }
        let at = self.check(off, len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: in bounds of the KVM mapping of a MAP_SHARED memfd (checked
        // above); dropping the PTEs loses no data (the file keeps the pages).
        let r = unsafe {
            libc::madvise((self.kvm_addr() as usize + at) as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Why a [`SharedRegion`] access was refused. Nothing was read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionError {
    /// `[off, off+len)` does not lie inside the region of `size` bytes.
    OutOfRange {
        /// First byte asked for.
        off: u64,
        /// Bytes asked for.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// `off` is not a multiple of `align`.
    Unaligned {
        /// Offset asked for.
        off: u64,
        /// Alignment the access needs.
        align: u64,
    },
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionError::OutOfRange { off, len, size } => {
                write!(f, "{len:#x} bytes at offset {off:#x} are outside a region of {size:#x} bytes")
            }
            RegionError::Unaligned { off, align } => write!(f, "offset {off:#x} is not {align}-byte aligned"),
        }
    }
}

impl std::error::Error for RegionError {}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: our own fd; the mappings are dropped after this (fields).
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked_without_wrapping() {
        let r = SharedRegion::new("mem-test", 2 * PAGE).unwrap();
        let oob = |off, len| RegionError::OutOfRange { off, len, size: 2 * PAGE };
        // The reported bug: `off + len` wrapped and passed the check.
        assert_eq!(r.zero(8, u64::MAX), Err(oob(8, u64::MAX)));
        assert_eq!(r.zero(u64::MAX, 2), Err(oob(u64::MAX, 2)));
        assert_eq!(r.zero(2 * PAGE, 1), Err(oob(2 * PAGE, 1)));
        assert_eq!(r.zero(2 * PAGE, 0), Ok(()), "an empty range at the end is in bounds");
        assert_eq!(r.read_u64(u64::MAX - 7), Err(oob(u64::MAX - 7, 8)));
        assert_eq!(r.read_u64(2 * PAGE - 8), Ok(0));
        assert_eq!(r.read_u64(2 * PAGE), Err(oob(2 * PAGE, 8)));
        assert_eq!(r.read_u64(4), Err(RegionError::Unaligned { off: 4, align: 8 }));
        assert_eq!(r.write_u64(u64::MAX - 7, 1), Err(oob(u64::MAX - 7, 8)));
        assert_eq!(r.write_bytes(2 * PAGE - 1, &[1, 2]), Err(oob(2 * PAGE - 1, 2)));
        assert_eq!(r.ptr_at(2 * PAGE), Err(oob(2 * PAGE, 1)));
        assert!(r.drop_kvm_view(PAGE, u64::MAX - PAGE + 1).is_err());
        assert!(r.drop_kvm_view(u64::MAX - PAGE + 1, PAGE).is_err());
        assert!(r.drop_kvm_view(1, PAGE).is_err());
        // Nothing was written by the refused calls; the good ones work.
        r.write_u64(8, 0x1234).unwrap();
        r.write_bytes(2 * PAGE - 2, &[7, 9]).unwrap();
        assert_eq!(r.read_u64(8), Ok(0x1234));
        assert_eq!(r.read_u64(2 * PAGE - 8).unwrap() >> 48, 0x0907);
        r.zero(0, 2 * PAGE).unwrap();
        assert_eq!(r.read_u64(8), Ok(0));
        r.drop_kvm_view(0, 2 * PAGE).unwrap();
    }
}
