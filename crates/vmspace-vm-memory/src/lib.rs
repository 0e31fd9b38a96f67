//! rust-vmm [`vm-memory`](vm_memory) over a [`vmspace`] guest address
//! space, so that rust-vmm device crates (`virtio-queue` and the devices
//! built on it) run on vmspace memory, with every access made under page
//! holds and every device write dirty-tracked.
//!
//! # What this crate owns
//!
//! - [`VmMemory`]: a vm-memory [`GuestMemory`](vm_memory::GuestMemory)
//!   (the permission-aware trait of vm-memory 0.18: `check_range`,
//!   `get_slices`) over a [`VmSpace`](vmspace::VmSpace). vm-memory
//!   implements [`Bytes<GuestAddress>`](vm_memory::Bytes) (`read`, `write`,
//!   `read_slice`, `write_slice`, `read_obj`, `write_obj`, `load`, `store`,
//!   `read_volatile_from`, `write_volatile_to`, ...) for every
//!   `GuestMemory` on top of `get_slices`, so all of them go through the
//!   holds described below. `virtio-queue` 0.18 asks for exactly this:
//!   `Queue::pop_descriptor_chain(M)` with `M: Clone + Deref`,
//!   `M::Target: GuestMemory`; `add_used`, `needs_notification`,
//!   `is_valid`, `DescriptorChain::reader`/`writer` with `M: GuestMemory`.
//! - [`HoldSlice`]: the bitmap slice type of the slices `VmMemory` hands
//!   out; it owns the page hold (see Soundness) and routes vm-memory's
//!   [`Bitmap::mark_dirty`](vm_memory::bitmap::Bitmap::mark_dirty) into
//!   the space's dirty bits. [`HoldBitmap`] is its type-level name,
//!   [`Slices`] the iterator, [`NoRegion`] a placeholder region type.
//! - [`blk`]: a virtio-blk device over a host file (`IN`, `OUT`, `FLUSH`,
//!   `GET_ID`, status byte), generic over any `GuestMemory`.
//!
//! # Semantics
//!
//! An access of `[addr, addr + count)` is split at 4 KiB page boundaries;
//! each page is held with the access's permission (`Read` and `No`: a
//! `READ` hold; `Write` and `ReadWrite`: a `READ | WRITE` hold), so a read
//! of a read-only mapping works and a write to it is refused with an
//! `IOError` of kind `PermissionDenied` (source [`AccessDenied`]). A page
//! without mapping (a hole between mappings, beyond the space) yields
//! `InvalidGuestAddress(first byte of that page that was asked for)`; an
//! object without host view `HostAddressNotAvailable`. As with vm-memory's
//! own memory, `write`/`read` then return the bytes done before the hole
//! and `write_slice`/`read_slice`/`read_obj`/`write_obj` fail with
//! `PartialBuffer`. Accesses cross contiguous mappings (of different
//! objects) transparently. `check_range` takes and drops a hold per page
//! (faulting pages in, marking nothing). `physical_memory()` is `None`.
//!
//! Dirty tracking is exact: the holds are taken with dirty marking
//! deferred, and a page becomes dirty when a write to it is reported
//! through `mark_dirty` (vm-memory does so after every write it makes
//! through a slice; virtio-queue's `Writer` does too). The marking is done
//! at once, through a second, writable hold released on the spot, so a
//! `VmSpace::track_dirty` after the write sees the page even while the
//! device still holds the slice, and a harvest after the slice's release
//! does not see it again. Pages held for write but not written stay clean.
//!
//! # Soundness
//!
//! vm-memory's `GuestMemoryRegion::get_slice` returns slices tied to the
//! region's `&self`, which cannot carry a hold: a region over held pages
//! would have to hold every page for as long as the region is borrowed,
//! or hand out pointers that an unmap can invalidate. So `VmMemory` is
//! not a region collection: it implements `GuestMemory` directly, and each
//! slice it makes carries its page's hold *inside the slice* (the
//! [`HoldSlice`] bitmap, an `Rc` of the hold). A slice's host pointer
//! stays valid while the hold lives, because a hold keeps the page's
//! object (and so its host memory) alive even if the mapping is unmapped
//! or moved meanwhile (vmspace retires the hold instead). Every value
//! through which safe code reaches the memory — the slice, its
//! `subslice`/`offset`/`split_at` pieces, `VolatileRef`/`VolatileArrayRef`
//! made from it, references from `get_atomic_ref` (borrowing the slice) —
//! carries a clone of the bitmap or borrows the slice, so the hold
//! outlives every such use; the slice's lifetime `'a` is the borrow of the
//! `VmMemory` whose client took the hold, so it cannot outlive the client
//! either. Raw pointers (`ptr_guard().as_ptr()`) are, as in vm-memory,
//! valid only while the slice they came from lives. Guest memory is only
//! read and written with volatile or raw copies (it changes under us): no
//! `&[u8]`/`&mut [u8]` over it is ever formed, by this crate or by
//! vm-memory's `VolatileSlice`. The only `unsafe` is the slice
//! construction in [`Slices`], argued there.
//!
//! # Concurrency
//!
//! A `VmMemory` owns one [`VmClient`](vmspace::VmClient), which belongs to
//! one thread: `VmMemory` is `Send` but not `Sync`, and its slices (and
//! their holds) are neither, so they stay on the thread that made them.
//! Give each device thread its own (`VmMemory::new(&space)`, or `clone()`,
//! which makes a new client of the same space). Administrative changes
//! (`map`, `unmap`, harvests) can run on other threads at any time: an
//! access in flight either completes on the pages it held (an unmapped
//! page's writes then land in its object and are not reported, as vmspace
//! discards an unmapped range's dirty bits) or fails with an error.
//!
//! ```
//! fn send<T: Send>() {}
//! send::<vmspace_vm_memory::VmMemory<nested_pt::HeapPages>>();
//! ```
//!
//! ```compile_fail
//! fn sync<T: Sync>() {}
//! sync::<vmspace_vm_memory::VmMemory<nested_pt::HeapPages>>();
//! ```
//!
//! # Testing
//!
//! `cargo test -p vmspace-vm-memory` runs the adapter tests (boundaries,
//! holes, protection, exact dirty sets, an unmap racing a device thread),
//! a model-based property test, virtio-queue's `MockSplitQueue` driving
//! the virtio-blk device with an exact harvest check, and four of
//! virtio-queue's own queue tests ported to this memory.
//! `MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-tree-borrows" cargo +nightly
//! miri test -p vmspace-vm-memory --test adapter` runs the adapter under
//! Miri (Tree Borrows); the queue and virtio-blk tests (`--test
//! virtio_blk`, `--test virtio_queue_ported`) pass there too, slowly. Under Stacked Borrows, Miri reports undefined
//! behaviour inside vmspace's hold path, on the first hold that uses the
//! client's leaf-table cache (the cached pointer is derived from a
//! reference to one entry and then offset to other entries); that is
//! vmspace's to fix.
//!
//! # Known gaps
//!
//! - One hold and one small allocation per page per access, and one more
//!   hold per reported write (vmspace has no "mark dirty now" through an
//!   existing hold). A multi-page buffer is a slice per page: vm-memory
//!   users handle that (`get_slices` is an iterator), but virtio-queue's
//!   `Reader`/`Writer` build every slice of a chain up front, i.e. a hold
//!   per page of guest-chosen buffers; the [`blk`] device copies piecewise
//!   instead.
//! - vm-memory's slices do not carry the permission they were taken for:
//!   safe code can write through a slice from `Permissions::Read`. Such a
//!   write is counted ([`VmMemory::stray_writes`]) and marked dirty if the
//!   mapping is writable; into a read-only mapping it lands in host memory
//!   (no undefined behaviour, the reservoir is writable in the host), past
//!   the guest mapping's protection. Writes through raw pointers that are
//!   not reported with `mark_dirty` are not tracked (vm-memory's contract).
//! - If the page was unmapped and another object mapped at the same
//!   address between a write and its report, the new page is marked
//!   (a spurious dirty page, never a missed one for a live mapping).
//! - A harvest is exact for writes reported before it; a device copying
//!   while the harvest runs is caught by the next one (stop devices before
//!   the final pass, as vCPUs).
//! - No `GuestMemoryBackend`: crates that need regions with host addresses
//!   (KVM slot registration through vm-memory, vhost-user memory tables)
//!   get `physical_memory() == None` and must use vmspace's own arenas.
//! - `rust-version` is 1.85 for this crate's code; the vmspace it depends
//!   on uses let-chains, so the workspace needs Rust 1.88.
#![deny(missing_docs)]

pub mod blk;
mod memory;

pub use memory::{AccessDenied, HoldBitmap, HoldSlice, NoRegion, Slices, VmMemory};
