//! Named device memory: the host node of a device-memory segment.
//!
//! bhyve gives every device-memory segment a character device,
//! `/dev/vmm.io/<vm>.<name>`, that any process allowed to can `mmap`,
//! independently of where (or whether) the guest maps the segment. The
//! user-space counterpart here is a file: `<runtime dir>/vmm/<vm>/<name>`,
//! where the runtime directory is `$XDG_RUNTIME_DIR`, or `/dev/shm` when
//! that is unset (a memory file system in both cases, so the file *is* the
//! memory: no disk I/O). The file is created, sized and mapped when the
//! segment is allocated, is the segment's only backing store, and is
//! removed when the segment goes (or its VM does: [`VmDir`] removes the
//! VM's directory on drop). A process that still has it open or mapped
//! keeps the memory until it lets go, as with an unlinked file anywhere.
//!
//! The VM reaches the memory through [`DevMemReservoir`], a
//! `vmspace::Reservoir` over the file's mapping whose frames are one
//! contiguous run starting at a frame base the VM chose, so the segment is
//! a RAM-like `VmObject` (holds, dirty bits) and a backend registers the
//! mapping with its hypervisor at `frame_base * 4096` (a KVM memory slot).
//! Other processes use [`open`], which maps the node by VM and segment
//! name ([`DevMemView`]).
//!
//! Only the VM's own process creates nodes; the directory holds a `pid`
//! file so a second VM of the same name is refused while the first lives,
//! and a directory left behind by a process that was killed is reclaimed.
#![allow(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use vmspace::{Arena, Pfn, Reservoir, ReservoirStats};

use crate::error::{BadName, Error, Result};

/// Bytes in a page.
const PAGE: u64 = 4096;

/// Longest VM or segment name, in bytes.
pub const MAX_NAME: usize = 63;

/// Checks a VM or segment name: 1 to [`MAX_NAME`] bytes of ASCII letters,
/// digits, `.`, `_` and `-`, not `.` or `..` (it becomes a file name).
pub fn check_name(name: &str) -> std::result::Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(BadName::TooLong);
    }
    if name == "." || name == ".." || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(BadName::Characters);
    }
    Ok(())
}

/// The directory that holds the VMs' node directories: `$XDG_RUNTIME_DIR/vmm`
/// or `/dev/shm/vmm-<uid>`.
pub fn runtime_root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmm"),
        // SAFETY: getuid has no preconditions and cannot fail.
        _ => PathBuf::from(format!("/dev/shm/vmm-{}", unsafe { libc::getuid() })),
    }
}

/// Where the nodes of VM `vm` live.
pub fn vm_dir(vm: &str) -> PathBuf {
    runtime_root().join(vm)
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> Error {
    move |e| Error::Io(what, e.kind(), e.raw_os_error())
}

/// Whether process `pid` exists.
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence/permission.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// A VM's node directory, owned by the VM's process; removed (with every
/// node in it) on drop.
#[derive(Debug)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// Creates the node directory of VM `name` (mode 0700). Refused with
    /// [`Error::VmNameInUse`] while another live process owns one of that
    /// name; a directory left by a dead process is cleared and reused.
    pub fn create(name: &str) -> Result<Self> {
        check_name(name).map_err(Error::BadVmName)?;
        let root = runtime_root();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).map_err(io_err("create runtime dir"))?;
        let path = root.join(name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(path.join("pid")).ok().and_then(|s| s.trim().parse::<i32>().ok());
                // SAFETY: getpid has no preconditions.
                let me = unsafe { libc::getpid() };
                if owner.is_some_and(|p| p != me && alive(p)) {
                    return Err(Error::VmNameInUse);
                }
                if owner == Some(me) {
                    return Err(Error::VmNameInUse);
                }
                // Stale: a process that died without cleaning up.
                fs::remove_dir_all(&path).map_err(io_err("remove stale VM dir"))?;
                fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err("create VM dir"))?;
            }
            Err(e) => return Err(io_err("create VM dir")(e)),
        }
        let dir = VmDir { path };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path.join("pid"))
            .map_err(io_err("write pid file"))?;
        // SAFETY: getpid has no preconditions.
        writeln!(f, "{}", unsafe { libc::getpid() }).map_err(io_err("write pid file"))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A shared mapping of a node file; unmapped on drop. Only raw pointers
/// reach it: the guest and other processes write the same memory.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a plain shared mapping owned by this value; it is only reached
// through raw pointers, and munmap on drop is valid from any thread.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` gives only the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64, writable: bool) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a new shared mapping of our file at an address the kernel
        // chooses; nothing else refers to that range.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping of this length; its users are gone (the
        // owner drops it last).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// What a backend is told about device memory, so the hypervisor can reach
/// it: the mapping appears when the segment is allocated and disappears
/// when its memory is freed (after the last mapping, hold and VM reference
/// are gone). For KVM: add and delete a memory slot at `frame_base * 4096`.
pub trait MemoryExposure: Send + Sync {
    /// `len` bytes at `host` become frames `frame_base ..`.
    fn expose(&self, frame_base: Pfn, host: NonNull<u8>, len: u64) -> Result<()>;
    /// The frames `frame_base ..` (exposed earlier) go away; called before
    /// the host mapping is unmapped.
    fn withdraw(&self, frame_base: Pfn, len: u64);
}

/// A backend that needs to be told nothing (tests, software-only use).
#[derive(Debug, Default)]
pub struct NoExposure;

impl MemoryExposure for NoExposure {
    fn expose(&self, _: Pfn, _: NonNull<u8>, _: u64) -> Result<()> {
        Ok(())
    }
    fn withdraw(&self, _: Pfn, _: u64) {}
}

/// The memory of one device-memory segment: its node file, mapped, as a
/// reservoir of exactly one allocation of contiguous frames.
pub struct DevMemReservoir {
    path: PathBuf,
    map: Mapping,
    frame_base: Pfn,
    taken: Mutex<bool>,
    exposure: std::sync::Arc<dyn MemoryExposure>,
}

impl std::fmt::Debug for DevMemReservoir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevMemReservoir")
            .field("path", &self.path)
            .field("len", &self.map.len)
            .field("frame_base", &self.frame_base)
            .finish_non_exhaustive()
    }
}

impl DevMemReservoir {
    /// Creates node `name` of `len` bytes (a non-zero multiple of 4 KiB)
    /// in `dir`, zero-filled, mapped read-write, exposed at `frame_base`.
    pub fn create(
        dir: &VmDir,
        name: &str,
        len: u64,
        frame_base: Pfn,
        exposure: std::sync::Arc<dyn MemoryExposure>,
    ) -> Result<Self> {
        check_name(name).map_err(Error::BadName)?;
        if len == 0 || !len.is_multiple_of(PAGE) || len > isize::MAX as u64 {
            return Err(Error::BadLength);
        }
        if frame_base.0.checked_add(len / PAGE).is_none() {
            return Err(Error::BadLength);
        }
        let path = dir.path().join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists { Error::NameInUse } else { io_err("create node")(e) }
        })?;
        let cleanup = |e: Error| {
            let _ = fs::remove_file(&path);
            e
        };
        file.set_len(len).map_err(io_err("size node")).map_err(cleanup)?;
        let map = Mapping::new(&file, len, true).map_err(io_err("map node")).map_err(cleanup)?;
        exposure.expose(frame_base, map.ptr, len).map_err(cleanup)?;
        Ok(DevMemReservoir { path, map, frame_base, taken: Mutex::new(false), exposure })
    }

    /// The node's path (what other processes open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len as u64
    }

    /// Always false: a node has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// First frame.
    pub fn frame_base(&self) -> Pfn {
        self.frame_base
    }
}

impl Drop for DevMemReservoir {
    fn drop(&mut self) {
        self.exposure.withdraw(self.frame_base, self.map.len as u64);
        let _ = fs::remove_file(&self.path);
    }
}

// SAFETY: the one allocation is frames `frame_base .. + len/4096` in
// order, all inside the arena (the whole mapping), zero-filled (a new
// file), handed out once (`taken`); the mapping lives as long as the
// reservoir.
unsafe impl Reservoir for DevMemReservoir {
    fn arena(&self) -> Arena {
        Arena { host: self.map.ptr, len: self.map.len, frame_base: self.frame_base }
    }

    fn alloc(&self, pages: u64) -> vmspace::Result<Vec<Pfn>> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if *taken || pages != self.len() / PAGE {
            return Err(vmspace::Error::ReservoirFull);
        }
        *taken = true;
        Ok((0..pages).map(|i| Pfn(self.frame_base.0 + i)).collect())
    }

    unsafe fn free(&self, _frames: &[Pfn]) {
        // The node is freed as a whole when the reservoir goes.
        *self.taken.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }

    fn stats(&self) -> ReservoirStats {
        let limit = self.len();
        let allocated = if *self.taken.lock().unwrap_or_else(|e| e.into_inner()) { limit } else { 0 };
        ReservoirStats { limit, allocated, free: limit - allocated }
    }
}

/// Another process's view of a device-memory node, by VM and segment
/// name; unmapped on drop.
///
/// Writes through a writable view are not seen by the nested table's
/// dirty bits. The VM catches them at its dirty harvest by comparing the
/// segment with the copy it kept at the previous harvest (see
/// `Vm::harvest_dirty`), so no write is lost to a migration.
#[derive(Debug)]
pub struct DevMemView {
    map: Mapping,
    path: PathBuf,
    writable: bool,
}

/// Opens and maps node `segment` of VM `vm` (read-only unless `writable`).
/// [`Error::NoSuchNode`] when the VM or segment does not exist.
pub fn open(vm: &str, segment: &str, writable: bool) -> Result<DevMemView> {
    check_name(vm).map_err(Error::BadVmName)?;
    check_name(segment).map_err(Error::BadName)?;
    let path = vm_dir(vm).join(segment);
    let file =
        OpenOptions::new().read(true).write(writable).open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound { Error::NoSuchNode } else { io_err("open node")(e) }
        })?;
    let len = file.metadata().map_err(io_err("stat node"))?.len();
    if len == 0 || !len.is_multiple_of(PAGE) {
        return Err(Error::BadLength);
    }
    let map = Mapping::new(&file, len, writable).map_err(io_err("map node"))?;
    Ok(DevMemView { map, path, writable })
}

impl DevMemView {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len as u64
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The node's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn range(&self, off: u64, n: usize) -> Result<usize> {
        let len = self.len();
        if off <= len && n as u64 <= len - off { Ok(off as usize) } else { Err(Error::OutsideSegment) }
    }

    /// Copies `dst.len()` bytes at `off` out of the node.
    pub fn read(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        let at = self.range(off, dst.len())?;
        // SAFETY: `[at, at + dst.len())` is inside the mapping (checked); a
        // raw copy, no reference over memory the guest writes.
        unsafe { std::ptr::copy_nonoverlapping(self.map.ptr.as_ptr().add(at), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the node at `off` ([`Error::ReadOnlyView`] for a
    /// read-only view).
    pub fn write(&self, off: u64, src: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnlyView);
        }
        let at = self.range(off, src.len())?;
        // SAFETY: in bounds (checked) of a mapping made writable (checked
        // above); a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.ptr.as_ptr().add(at), src.len()) };
        Ok(())
    }
}

/// Reads the pid file of VM `vm`, if it has a node directory.
pub fn owner_pid(vm: &str) -> Option<i32> {
    let mut s = String::new();
    File::open(vm_dir(vm).join("pid")).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}
