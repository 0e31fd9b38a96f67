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

    /// Host pointer to byte `off` (panics if out of range: a host bug).
    pub fn ptr_at(&self, off: u64) -> *mut u8 {
        assert!(off < self.len(), "offset {off:#x} outside region");
        // SAFETY: in bounds of the host mapping (checked above).
        unsafe { self.host_ptr().add(off as usize) }
    }

    /// Reads a u64 at byte offset `off` (8-aligned) atomically.
    pub fn read_u64(&self, off: u64) -> u64 {
        self.atomic_u64(off).load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes a u64 at byte offset `off` (8-aligned) atomically.
    pub fn write_u64(&self, off: u64, v: u64) {
        self.atomic_u64(off).store(v, std::sync::atomic::Ordering::SeqCst)
    }

    /// The u64 at `off` as an atomic (guest memory is shared with vCPUs).
    pub fn atomic_u64(&self, off: u64) -> &std::sync::atomic::AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.len(), "bad u64 offset {off:#x}");
        // SAFETY: aligned, in bounds, and the mapping lives as long as &self.
        // An AtomicU64 over shared memory is the sanctioned way to share it.
        unsafe { &*(self.ptr_at(off) as *const std::sync::atomic::AtomicU64) }
    }

    /// Copies `src` into the region at `off` (host setup of code/tables).
    pub fn write_bytes(&self, off: u64, src: &[u8]) {
        assert!(off + src.len() as u64 <= self.len(), "write out of range");
        // SAFETY: in bounds; a raw copy (no reference over guest memory).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr_at(off), src.len());
        }
    }

    /// Zeroes `len` bytes at `off` through the host view.
    pub fn zero(&self, off: u64, len: u64) {
        assert!(off + len <= self.len(), "zero out of range");
        // SAFETY: in bounds; raw write.
        unsafe { std::ptr::write_bytes(self.ptr_at(off), 0, len as usize) };
    }

    /// Drops the KVM view's mapping of pages `[off, off+len)` (data is kept in
    /// the memfd). KVM's MMU notifier then zaps every shadow/secondary entry
    /// that maps those frames; the next guest access re-faults them.
    pub fn drop_kvm_view(&self, off: u64, len: u64) -> io::Result<()> {
        assert!(off.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && off + len <= self.len());
        // SAFETY: in bounds of the KVM mapping of a MAP_SHARED memfd; dropping
        // the PTEs loses no data (the file keeps the pages).
        let r =
            unsafe { libc::madvise((self.kvm_addr() + off) as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: our own fd; the mappings are dropped after this (fields).
        unsafe { libc::close(self.fd) };
    }
}
