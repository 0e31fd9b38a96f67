//! The adapter: [`VmMemory`], a vm-memory [`GuestMemory`] whose slices
//! carry the page holds they were made from.

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::iter::FusedIterator;
use std::marker::PhantomData;
use std::rc::Rc;

use vm_memory::bitmap::{BS, Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes, GuestRegionCollection,
    GuestUsize, MemoryRegionAddress, Permissions, VolatileSlice,
};
use vmspace::{DefaultLock, Gpa, PAGE_SIZE, PageHold, Prot, RawLock, TablePages, VmClient, VmSpace};

/// Bytes of one page, as a `usize`.
const PAGE: usize = PAGE_SIZE as usize;

/// A vm-memory [`GuestMemory`] over a [`VmSpace`], for one thread.
///
/// It owns one [`VmClient`] of the space. Every access takes a page hold
/// per 4 KiB page it touches, with the permission it asks for (a read a
/// `READ` hold, a write a `READ | WRITE` hold), and the hold lives in the
/// [`VolatileSlice`] it hands out (in the slice's bitmap, [`HoldSlice`]):
/// the slice, every subslice and every `VolatileRef` made from it keep
/// the page's object alive, so an unmap (or a BAR move) that happens
/// while a device uses the slice is safe; the hold is released when the
/// last of them is dropped. A write reported through the slice
/// ([`Bitmap::mark_dirty`], which vm-memory calls after every write it
/// makes) marks the page dirty in the space at once; pages that were only
/// held for write but not written stay clean, so a harvest reports
/// exactly the pages written. See the crate documentation for the
/// soundness argument and the error mapping.
///
/// `VmMemory` is `Send` but not `Sync` (like its client): give each device
/// thread its own, from [`VmMemory::new`] or [`Clone::clone`] (a new
/// client of the same space). Slices borrow it and cannot leave its
/// thread.
pub struct VmMemory<P: TablePages, L: RawLock = DefaultLock> {
    client: VmClient<P, L>,
    stray_writes: Cell<u64>,
}

impl<P: TablePages + Send + Sync, L: RawLock> VmMemory<P, L> {
    /// A memory over `space`, with a new client of it.
    pub fn new(space: &VmSpace<P, L>) -> Self {
        Self::with_client(space.client())
    }
}

impl<P: TablePages, L: RawLock> VmMemory<P, L> {
    /// A memory over the space of `client` (e.g. one with an invalidation
    /// callback installed).
    pub fn with_client(client: VmClient<P, L>) -> Self {
        VmMemory { client, stray_writes: Cell::new(0) }
    }

    /// The client every access goes through.
    pub fn client(&self) -> &VmClient<P, L> {
        &self.client
    }

    /// Give the client back.
    pub fn into_client(self) -> VmClient<P, L> {
        self.client
    }

    /// How many times a write was reported ([`Bitmap::mark_dirty`]) on a
    /// slice taken for reading only. vm-memory's slices do not carry the
    /// permission they were taken for, so safe code can write through a
    /// slice from `get_slices(.., Permissions::Read)`. Such a write is
    /// still marked dirty if the mapping is writable; into a read-only
    /// mapping it lands in host memory (the reservoir, mapped writable in
    /// the host: no undefined behaviour) past the mapping's protection. A
    /// nonzero count is a bug in the device code.
    pub fn stray_writes(&self) -> u64 {
        self.stray_writes.get()
    }

    /// Hold the page containing `gpa` for `prot`, with dirty marking
    /// deferred (and never asked for: writes are marked as they are
    /// reported, see [`HoldSlice`]).
    fn hold(&self, gpa: u64, prot: Prot) -> Result<PageHold<'_, P, L>, GuestMemoryError> {
        let page = gpa & !(PAGE_SIZE - 1);
        self.client.hold_ext(Gpa(page), prot, true).map_err(|e| to_guest_error(e, gpa, prot.contains(Prot::WRITE)))
    }
}

impl<P: TablePages, L: RawLock> Clone for VmMemory<P, L> {
    /// A memory with a new client of the same space (for another thread).
    fn clone(&self) -> Self {
        VmMemory::with_client(self.client.clone())
    }
}

impl<P: TablePages, L: RawLock> fmt::Debug for VmMemory<P, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmMemory").field("client", &self.client).finish()
    }
}

/// The hold permission for a vm-memory access.
fn prot_of(access: Permissions) -> Prot {
    if access.has_write() { Prot::READ | Prot::WRITE } else { Prot::READ }
}

/// Why an access was refused by the mapping's protection (the source of
/// the `PermissionDenied` I/O error [`VmMemory`] reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessDenied {
    /// The guest-physical address refused.
    pub gpa: GuestAddress,
    /// Whether a write was asked for.
    pub write: bool,
}

impl fmt::Display for AccessDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.write { "write" } else { "read" };
        write!(f, "guest mapping at {:#x} does not allow {what}", self.gpa.0)
    }
}

impl std::error::Error for AccessDenied {}

/// Map a vmspace error for an access at `gpa` to vm-memory's error:
/// no mapping is an invalid guest address, a protection refusal an I/O
/// error of kind `PermissionDenied` (source [`AccessDenied`]), an object
/// without host view `HostAddressNotAvailable`, anything else an I/O
/// error whose source is the vmspace error.
fn to_guest_error(e: vmspace::Error, gpa: u64, write: bool) -> GuestMemoryError {
    match e {
        vmspace::Error::NoMapping => GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)),
        vmspace::Error::Protection => GuestMemoryError::IOError(io::Error::new(
            io::ErrorKind::PermissionDenied,
            AccessDenied { gpa: GuestAddress(gpa), write },
        )),
        vmspace::Error::NoHostView => GuestMemoryError::HostAddressNotAvailable,
        other => GuestMemoryError::IOError(io::Error::other(other)),
    }
}

/// A held page, shared by the slices made over it.
struct Held<'a, P: TablePages, L: RawLock> {
    hold: PageHold<'a, P, L>,
    mem: &'a VmMemory<P, L>,
    dirty: Cell<bool>,
}

/// The bitmap slice of a [`VmMemory`] slice: it owns (a share of) the
/// hold of the page the slice lies in, which is released when the last
/// slice sharing it is dropped. Marking it dirty marks the page dirty in
/// the space at once (see [`Bitmap::mark_dirty`] below); `dirty_at` says
/// whether a write was reported through any slice sharing the hold.
pub struct HoldSlice<'a, P: TablePages, L: RawLock = DefaultLock>(Rc<Held<'a, P, L>>);

impl<P: TablePages, L: RawLock> HoldSlice<'_, P, L> {
    /// The hold this slice keeps.
    pub fn hold(&self) -> &PageHold<'_, P, L> {
        &self.0.hold
    }
}

impl<P: TablePages, L: RawLock> Clone for HoldSlice<'_, P, L> {
    fn clone(&self) -> Self {
        HoldSlice(self.0.clone())
    }
}

impl<P: TablePages, L: RawLock> fmt::Debug for HoldSlice<'_, P, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldSlice").field("hold", &self.0.hold).field("dirty", &self.0.dirty.get()).finish()
    }
}

impl<'b, P: TablePages, L: RawLock> WithBitmapSlice<'b> for HoldSlice<'_, P, L> {
    type S = Self;
}

impl<P: TablePages, L: RawLock> BitmapSlice for HoldSlice<'_, P, L> {}

impl<P: TablePages, L: RawLock> Bitmap for HoldSlice<'_, P, L> {
    /// Page granularity: a write of any length > 0 makes the page dirty
    /// in the space now, before this returns (vm-memory reports a write
    /// after making it), through a fresh writable hold of the page that
    /// is released at once: so a harvest after the write sees it even if
    /// the slice is still alive, and a harvest after a later release does
    /// not see it again. If the page is no longer mapped, nothing is
    /// marked (an unmap discards the range's dirty bits anyway).
    fn mark_dirty(&self, _offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let held = &*self.0;
        if !held.hold.prot().contains(Prot::WRITE) {
            let n = &held.mem.stray_writes;
            n.set(n.get().saturating_add(1));
        }
        held.dirty.set(true);
        // A failure means the page is gone or not writable: nothing to mark.
        let _ = held.mem.client.hold(held.hold.gpa(), Prot::READ | Prot::WRITE);
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        self.0.dirty.get()
    }

    fn slice_at(&self, _offset: usize) -> Self {
        self.clone()
    }
}

/// The [`GuestMemory::Bitmap`] type of [`VmMemory`]: a type-level name
/// for [`HoldSlice`] (no value of it exists; the dirty state lives in the
/// holds and, after release, in the space's table).
pub struct HoldBitmap<P, L>(Infallible, PhantomData<fn() -> (P, L)>);

impl<P, L> fmt::Debug for HoldBitmap<P, L> {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {}
    }
}

impl<'a, P: TablePages + 'static, L: RawLock + 'static> WithBitmapSlice<'a> for HoldBitmap<P, L> {
    type S = HoldSlice<'a, P, L>;
}

impl<P: TablePages + 'static, L: RawLock + 'static> Bitmap for HoldBitmap<P, L> {
    fn mark_dirty(&self, _offset: usize, _len: usize) {
        match self.0 {}
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        match self.0 {}
    }

    fn slice_at(&self, _offset: usize) -> HoldSlice<'_, P, L> {
        match self.0 {}
    }
}

/// The iterator of [`VmMemory`]'s `get_slices`: one slice per page
/// touched, each with its hold. The holds are taken lazily; the first
/// failure ends the iteration (as vm-memory's own iterator does).
pub struct Slices<'a, P: TablePages, L: RawLock = DefaultLock> {
    mem: &'a VmMemory<P, L>,
    addr: u64,
    left: usize,
    prot: Prot,
}

impl<P: TablePages, L: RawLock> fmt::Debug for Slices<'_, P, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slices").field("addr", &self.addr).field("left", &self.left).field("prot", &self.prot).finish()
    }
}

impl<'a, P: TablePages, L: RawLock> Iterator for Slices<'a, P, L> {
    type Item = Result<VolatileSlice<'a, HoldSlice<'a, P, L>>, GuestMemoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let in_page = (self.addr % PAGE_SIZE) as usize;
        let n = (PAGE - in_page).min(self.left);
        let hold = match self.mem.hold(self.addr, self.prot) {
            Ok(h) => h,
            Err(e) => {
                self.left = 0;
                return Some(Err(e));
            }
        };
        // `in_page < 4096`: the pointer stays inside the held page.
        let ptr = hold.as_ptr().wrapping_add(in_page);
        let held = Rc::new(Held { hold, mem: self.mem, dirty: Cell::new(false) });
        // SAFETY: `ptr..ptr + n` lies inside one host page (`in_page + n
        // <= 4096`) that the hold keeps mapped (it keeps the page's object,
        // and so its host memory, alive) for as long as the hold lives;
        // the hold lives in the slice's bitmap, and every value through
        // which safe code can reach the memory (this slice, its subslices,
        // `VolatileRef`s and `VolatileArrayRef`s made from it) carries a
        // clone of that bitmap, so the memory outlives every such use; the
        // slice cannot outlive `'a` (the borrow of the client the hold is
        // taken through) either. Guest memory is only ever accessed with
        // volatile or raw copies (the guest writes it concurrently): no
        // reference to its bytes exists.
        let slice = unsafe { VolatileSlice::with_bitmap(ptr, n, HoldSlice(held), None) };
        self.left -= n;
        // `get_slices` checked that `addr + count` does not overflow.
        self.addr = self.addr.wrapping_add(n as u64);
        Some(Ok(slice))
    }
}

impl<P: TablePages, L: RawLock> FusedIterator for Slices<'_, P, L> {}

impl<'a, P: TablePages, L: RawLock> GuestMemorySliceIterator<'a, HoldSlice<'a, P, L>> for Slices<'a, P, L> {}

impl<P: TablePages + 'static, L: RawLock + 'static> GuestMemory for VmMemory<P, L> {
    type PhysicalMemory = GuestRegionCollection<NoRegion>;
    type Bitmap = HoldBitmap<P, L>;

    /// Whether every page of `[addr, addr + count)` is mapped, backed by
    /// host memory and allows `access`. Takes and releases a hold per page
    /// (marking nothing dirty). `count == 0` is `true` (as in vm-memory).
    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if count == 0 {
            return true;
        }
        let Some(last) = addr.0.checked_add(count as u64 - 1) else {
            return false;
        };
        let prot = prot_of(access);
        let mut page = addr.0 & !(PAGE_SIZE - 1);
        loop {
            if self.hold(page, prot).is_err() {
                return false;
            }
            match page.checked_add(PAGE_SIZE) {
                Some(next) if next <= last => page = next,
                _ => return true,
            }
        }
    }

    /// The slices of `[addr, addr + count)`, one per page touched, each
    /// carrying its page's hold (see [`VmMemory`]). An address range that
    /// wraps past `u64::MAX` is refused with `GuestAddressOverflow`; a
    /// page without mapping yields `InvalidGuestAddress`, a page whose
    /// mapping refuses `access` an I/O error of kind `PermissionDenied`,
    /// and the iteration stops there.
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>, GuestMemoryError> {
        if addr.0.checked_add(count as u64).is_none() {
            return Err(GuestMemoryError::GuestAddressOverflow);
        }
        Ok(Slices { mem: self, addr: addr.0, left: count, prot: prot_of(access) })
    }
}

/// The [`GuestMemory::PhysicalMemory`] region type of [`VmMemory`]: no
/// value exists. `VmMemory::physical_memory` is `None`: its layout is the
/// space's mappings, which change at run time, and a host pointer into it
/// is only valid under a hold, so it offers no `GuestMemoryBackend`.
#[derive(Debug)]
pub struct NoRegion(Infallible);

impl GuestMemoryRegion for NoRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        match self.0 {}
    }

    fn start_addr(&self) -> GuestAddress {
        match self.0 {}
    }

    fn bitmap(&self) {
        match self.0 {}
    }

    fn get_slice(&self, _: MemoryRegionAddress, _: usize) -> vm_memory::GuestMemoryResult<VolatileSlice<'_, ()>> {
        match self.0 {}
    }
}

impl GuestMemoryRegionBytes for NoRegion {}
