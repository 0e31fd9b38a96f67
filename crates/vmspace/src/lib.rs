//! Guest address spaces for Rust hypervisors: bhyve's `vmspace` model
//! (illumos `vmm_vm.c`, seed 004) on top of `nested-pt`'s tables.
//!
//! # What this crate owns
//!
//! A [`VmSpace`] is one guest's physical address space: a fixed size, a
//! table format, and an ordered map of *mappings*, each a range of a
//! [`VmObject`] (guest RAM from a [`Reservoir`], or a fixed MMIO range) at
//! a guest-physical address with a protection. The nested table behind it
//! is filled lazily: `map` only populates the intermediate tables, and
//! leaves appear when a vCPU faults ([`VmClient::fault`], with a window of
//! neighbours: fault-around), when a page is held ([`VmClient::hold`]) or
//! when a range is populated ([`VmSpace::populate`]). `unmap` clears the
//! leaves, vacates the tables, bumps the table *generation* and tells every
//! client. Dirty bits are harvested and set again ([`VmSpace::dirty_op`])
//! for live migration; tracking can be switched at run time.
//!
//! Large leaves are transparent: a reservoir hands out aligned 2 MiB
//! runs of frames where it can ([`Reservoir::alloc_large`]), and an
//! aligned 2 MiB range of a mapping that one run backs
//! ([`VmObject::run_at`]) is populated at `map` for one 2 MiB leaf (while
//! tracking is off), which `populate`, a fault or a hold anywhere in it
//! maps whole. [`VmSpace::set_dirty_tracking`] splits them when tracking
//! goes on ([`SplitPolicy`]: eagerly, or lazily on the first write to
//! each), [`VmSpace::promote`] merges 512 small leaves of one run back
//! (FreeBSD's `pmap_promote_pde`), as a vCPU fault, a hold or a
//! `populate` does automatically when it fills such a leaf table while tracking is off
//! ([`SpaceConfig::auto_promote`], counted in [`VmSpace::promotions`]),
//! and [`VmSpace::unmap_range`] /
//! [`VmSpace::protect`] work on part of a mapping, splitting a large leaf
//! they cut.
//!
//! 1 GiB leaves work the same way one level up (`huge.rs`): a reservoir
//! hands out aligned 1 GiB runs where its arena has aligned room
//! ([`Reservoir::alloc_huge`], which [`VmObject::ram`] uses), and an
//! aligned 1 GiB slot of a mapping that one such run backs
//! ([`VmObject::huge_run_at`], the object offset 1 GiB-aligned against the
//! guest address) is populated at `map` for one level-3 leaf
//! ([`SpaceConfig::huge_leaves`], where the format has 1 GiB leaves),
//! which `populate`, a fault or a hold anywhere in it maps whole. Every
//! change that needs smaller leaves splits the slot first, 1 GiB to 512
//! 2 MiB leaves in one store of the level-3 entry (nested-pt's
//! `demote_1g_as`, accessed/dirty carried), then applies the 2 MiB rules:
//! the eager split goes on to 4 KiB, the lazy one write-protects the 1 GiB
//! leaf and its first write splits it to (write-protected) 2 MiB leaves
//! and the written 2 MiB to 4 KiB, `unmap_range` and `protect` split the
//! slots and chunks they cut. A harvest
//! invalidates only what its cleared bits require: one that clears bits
//! bumps the generation and tells every client (without holding any), one
//! that clears none, a `Get` and a `Set` invalidate nothing.
//!
//! Guest RAM may be *swappable* ([`VmObject::swappable`], with `std`): its
//! pages get reservoir frames lazily, on first touch, so the object may be
//! larger than its reservoir; cold pages, chosen by an accessed-bit clock,
//! are written to a swap file and their frames freed
//! ([`VmSpace::swap_out`], or a fault that finds the reservoir
//! exhausted), and the next access swaps them back in. Dirty state
//! survives swapping (a swapped-out dirty page is reported by the next
//! harvest; a page swapped in and not written since is not). The design
//! (per-page slot states, the four steps of a swap-out, pinning by holds)
//! is in `swap.rs`'s module doc; counters in [`SwapStats`].
//!
//! Guest-physical addresses in the API are [`Gpa`]s and frames [`Pfn`]s
//! (nested-pt's newtypes, re-exported); lengths and offsets into an
//! object are plain byte counts.
//!
//! # Example
//!
//! A 1 GiB space with 1 MiB of RAM at guest-physical 0, a vCPU client
//! faulting a page in, a device client writing through a hold, and a
//! harvest reporting what was written:
//!
//! ```
//! use std::sync::Arc;
//! use nested_pt::{Caps, HeapPages};
//! use vmspace::{Gpa, HeapReservoir, Pfn, Prot, PteFormat, SpaceConfig, VmObject, VmSpace};
//!
//! let config = SpaceConfig::new(1 << 30, PteFormat::ept(Caps::default()));
//! let space: VmSpace<HeapPages> = VmSpace::new(config, HeapPages::new())?;
//! let reservoir = Arc::new(HeapReservoir::new(16 << 20, Pfn(0x1_0000))?);
//! let ram = VmObject::ram(reservoir, 1 << 20)?;
//! space.map(&ram, 0, Gpa(0), 1 << 20, Prot::RWX)?;
//! space.set_dirty_tracking(true)?;
//!
//! // A vCPU's nested page fault: the page (and its neighbours) appear.
//! let vcpu = space.client();
//! vcpu.fault(Gpa(0x3000), Prot::READ)?;
//! let (frame, prot) = space.lookup(Gpa(0x3000)).expect("faulted in");
//! assert_eq!((frame, prot), (ram.frame_at(0x3000).unwrap(), Prot::RWX));
//!
//! // A device (another thread's client) writes guest memory through a
//! // hold; releasing a writable hold marks the page dirty.
//! let device = space.client();
//! let hold = device.hold(Gpa(0x5000), Prot::RW)?;
//! hold.write(8, b"hello")?;
//! assert!(!hold.release(), "the mapping was not unmapped meanwhile");
//!
//! // The migration's harvest: exactly the page the device wrote.
//! let mut bitmap = [0u64; 4]; // 256 pages
//! assert_eq!(space.track_dirty(Gpa(0), 1 << 20, &mut bitmap)?, 1);
//! assert_eq!(bitmap[0], 1 << 5);
//! let mut back = [0u8; 5];
//! ram.read(0x5008, &mut back)?; // the host view of the object
//! assert_eq!(&back, b"hello");
//! # Ok::<(), vmspace::Error>(())
//! ```
//!
//! # Invariants
//!
//! - Mappings never overlap and end below the space's size; every leaf
//!   present in the table lies inside a mapping and maps the frame the
//!   mapping's object has at that offset, with the mapping's protection
//!   (for a swappable object: only a resident page has a frame and a
//!   leaf; a page leaves that state only while every client is held and
//!   its leaves are cleared before its frame is freed).
//! - `resident_count` is the number of 4 KiB pages the present leaves
//!   map: a 2 MiB leaf counts 512, a 1 GiB leaf 262,144 (mapping one adds
//!   that many, a split or a promotion changes nothing).
//! - Each aligned 2 MiB range of the space is populated either for one
//!   2 MiB leaf (no leaf table: the table walk ends at level 2, at the
//!   large leaf or an empty entry) or for 4 KiB leaves (a leaf table); the
//!   first only for a range inside one mapping that one aligned run of
//!   its object backs. A 2 MiB leaf maps exactly that run. Likewise each
//!   aligned 1 GiB slot lying inside one mapping is populated either for
//!   one 1 GiB leaf (no level-2 table: the walk ends at level 3), only
//!   where one aligned 1 GiB run of the object backs it, or for smaller
//!   leaves (a level-2 table whose chunks follow the rule above).
//!   Swappable objects have no runs: they get 4 KiB leaves only.
//! - While dirty tracking is on, no large leaf allows writes: with the
//!   eager split there are none (and no empty 2 MiB-populated range),
//!   with the lazy one they are write-protected and clean, and the first
//!   write (a vCPU fault or a writable hold) splits the leaf, the small
//!   leaves getting the mapping's protection. So a harvest sees 4 KiB
//!   dirty bits only, except where a hold taken before the switch marks
//!   a large leaf on release (reported as its 512 pages: a superset).
//! - A [`PageHold`] keeps its object alive: if its mapping is unmapped, the
//!   unmap first hands the client a reference to the object (*retires* it),
//!   then clears entries; the release reports the unmap and does not touch
//!   the (gone) entry. Only clients with a hold on a page of the unmapped
//!   range get the reference (a client records the pages of its
//!   outstanding holds), and a client drops it as soon as no hold of its
//!   own is on that range any more: a long-lived hold elsewhere pins
//!   nothing. A writable hold marks its page dirty on release
//!   (unless "defer dirty" was asked and never revoked).
//! - The generation only grows; a vCPU that entered guest context with an
//!   older generation than a change's is kicked and waited for before the
//!   change returns.
//!
//! # Locking and concurrency
//!
//! Administrative operations (`map`, `unmap`, `unmap_range`, `protect`,
//! `promote` and the automatic promotion, `populate`, dirty operations, tracking switch, swap-out,
//! destroy) serialize on the space lock. The data path (hold, fault,
//! release) never takes it (a fault or hold that finds the reservoir
//! exhausted for a swappable page leaves the data path and reclaims as an
//! administrative operation, then tries again; a swap-in reads the swap
//! file inside the active section, without the space lock): it goes
//! through a per-client `active` word and a per-client state word (see
//! `protocol.rs`). A change that alters the mapping map or the table
//! structure (map, unmap, protection change, promotion, a split, tracking
//! switch, destroy, and the leaf-clearing step of a swap-out) first
//! *holds* every client (setting `HOLD`,
//! then waiting for an operation in flight to finish), makes the change,
//! and releases them; an operation that arrives meanwhile sleeps on its
//! client's lock. `populate` and the dirty operations hold no client:
//! they only change leaf entries atomically, so holds and faults of every
//! client proceed while they run (a harvest that cleared bits still kicks
//! and waits for vCPUs in guest context on an older generation, which is
//! what makes the clear effective). Activation is one fenced store
//! plus a load (Dekker's pattern against the administrator's `HOLD`
//! store), deactivation a plain release store; a client also caches its
//! last mapping, leaf table and the mapping's host window, valid while
//! the space's map sequence is unchanged, so a hold of a resident page
//! does not walk the table or the object's frame list (the host pointer
//! comes from the frame in the leaf). The cache is read before the
//! activation, so that only the map sequence and the leaf are loaded
//! after its fence.
//! Leaf entries are only ever changed atomically (compare-and-swap from
//! empty when mapping), so the data path, `populate` and harvests run
//! concurrently. The only blocking primitive is a [`RawLock`] (mutex +
//! condition variable); with the `std` feature [`StdLock`] provides it, a
//! kernel brings its own. Invalidation callbacks and kick hooks run
//! outside client locks (but under the space lock: they must not call
//! administrative operations of the same space). A change that waits for vCPUs (unmap, dirty operations,
//! tracking switch) asked by a thread that is itself in guest context on
//! the same space is refused with [`Error::SelfDeadlock`] (with `std`).
//! A panicking callback or hook does not leave clients held: see
//! [`VmClient::set_invalidation`]. Lock order: space lock,
//! then a client lock; the data path takes a client lock only to sleep or
//! on its slow paths, never with anything else held.
//!
//! Splits and promotions take `&mut NestedTable`, so they run like an
//! unmap: space lock, every client held, then a generation bump and an
//! invalidation ([`Cause::Remap`]) before the lock is dropped (a promotion
//! frees the leaf table, which vCPUs may cache; a split changes no
//! translation, but a host that mirrors the table must see the new leaf
//! table). Both change the translation with one store of the level-2
//! entry (nested-pt's `promote_2m` / `demote_2m_as`): a page that stays
//! mapped is never not-present. The lazy split runs from the data path:
//! the fault (or hold) deactivates its client, splits as an
//! administrative change, and retries; from a thread in guest context on
//! the same space it is refused with [`Error::SelfDeadlock`]. The
//! automatic promotion runs the same way: the fault's (or hold's)
//! active section only notes a leaf table it filled (a check of one entry per
//! fault-around window, then of all 512 where those are present); after
//! deactivating, it promotes as an administrative change (not
//! from guest context on the same space, where it is skipped: the page
//! is mapped either way). `populate`, under the space lock already,
//! holds every client for the promotion of the chunks it filled. The
//! split's retry loop (a fault's or a writable hold's) ends even with
//! promotions running: a promotion, like a fault into an empty 2 MiB
//! slot, only makes a large leaf while tracking is off and with the
//! mapping's whole protection (writable in a writable mapping), so the
//! retry meets a leaf to split again only after another thread switched
//! tracking on in between; each extra round is one such completed
//! switch (see `VmClient::fault_split`). A hold
//! records the leaf entry it found and a *structure sequence*, bumped by
//! every split and promotion: a release that sees it changed finds the
//! leaf again (through the table) before marking it dirty. Exclusive
//! access to the table and mappings also takes a *structure lock*, under
//! which a release that runs while an administrative change holds its
//! client reads the table (lock order: client lock, then structure lock;
//! the space lock is taken before the structure lock, and no client lock
//! is taken under it).
//!
//! An unmap clears the leaves and vacates the tables first, then bumps the
//! generation and waits for vCPUs still in guest context on an older one
//! (seed 004 invalidates before vacating): freed table pages may sit in a
//! vCPU's paging-structure caches, and they are not reused before the
//! space lock is dropped. For the same reason the generation is also
//! bumped when an unmap frees table pages without any leaf present.
//!
//! # For a VMM (the KVM runner)
//!
//! - RAM: a [`MemfdReservoir`] with a chosen frame base; register its
//!   [`Arena`] (`host`, `len`) as a KVM memory slot at `frame_base * 4096`,
//!   so a frame number is a KVM guest-physical page. Its fd and
//!   `file_offset` let the VMM map second views (device memory).
//! - Tables: `VmSpace<P>` is generic over `nested_pt::TablePages`, so
//!   table pages can live in another KVM slot.
//! - vCPUs: one client each; [`VmClient::set_kick`],
//!   [`VmClient::set_invalidation`] (told the range, the new generation,
//!   for unmaps the object and offset, i.e. the old frames, and whether
//!   table pages were freed; for harvests that collect them, the frames
//!   whose dirty bit was cleared), and
//!   [`VmClient::table_enter`] around guest execution (flush when the
//!   generation changed); nested faults go to [`VmClient::fault`]. A
//!   host that prefetches only translations marked accessed may ask for
//!   the accessed bit on fault-around neighbours
//!   ([`SpaceConfig::fault_around_accessed`], off by default: it costs
//!   accessed-bit precision for pages the guest never touched), and, while
//!   dirty tracking is off, the dirty bit on a write fault's neighbours
//!   ([`SpaceConfig::fault_around_dirty_untracked`]).
//! - Migration: [`VmSpace::track_dirty`] / [`VmSpace::dirty_op`], or
//!   [`VmSpace::track_dirty_frames`] / [`VmSpace::dirty_op_frames`] to get
//!   the cleared frames too. A harvest is exact only with the vCPUs out
//!   of guest context (see [`VmSpace::track_dirty`]).
//! - Host access to an object outside any mapping: [`VmObject::read`] and
//!   [`VmObject::write`] by byte offset (across its non-contiguous frames;
//!   not dirty-tracked), and [`VmObject::frame_runs`], its frames as runs
//!   of contiguous frames (one host mapping per run instead of per page).
//! - [`Arena`] and [`HostView`] are `Send + Sync`: plain descriptions of
//!   shared mappings, used through raw addresses.
//!
//! # Testing and measuring
//!
//! `cargo test -p vmspace` runs the unit tests (every validation rule and
//! error), the model-based property test (`tests/model.rs`), a 3-second
//! stable-Rust fuzz run against the same reference model
//! (`tests/fuzz.rs`; longer by hand: `FUZZ_SECONDS=600 cargo test -p
//! vmspace --release --test fuzz -- --nocapture`, which prints ops/s) and
//! the multi-threaded stress tests (`tests/stress.rs`), the large-leaf
//! tests (`tests/large.rs`: runs, populate/fault/hold with 2 MiB leaves,
//! eager and lazy splits, harvests after them, partial unmap, protection
//! changes, promotion explicit and automatic, a promotion between a
//! lazy split and the writer's retry, and splits/promotions explicit
//! and automatic under concurrent writers;
//! `tests/huge.rs` the same for 1 GiB leaves on memfd RAM: one level-3
//! leaf, exact resident counts, data through holds across splits, eager
//! and lazy splits with exact harvests, one page unmapped from the middle
//! of a 1 GiB leaf, protection of part and across two slots, the
//! fallbacks to 2 MiB leaves, an eager split out of table pages, writers
//! through holds while splits run, and a deterministic random sequence of
//! operations on a 1 GiB leaf checked against a model);
//! `tests/swap.rs` covers swapping (lazy backing, the clock, pinning,
//! dirty state across swapping, the data path racing the swapper, kicks
//! before frames are freed).
//! `RUSTFLAGS="--cfg loom" cargo test -p vmspace --test loom --release`
//! model-checks the protocol. `cargo bench -p vmspace --bench vmspace --
//! --warm-up-time 1 --measurement-time 3` runs the criterion benchmarks
//! (fault-in, hold+release scaling, hold+release while another thread
//! harvests back to back, map/unmap churn under holds, harvest against
//! nested-pt alone); `cargo bench -p vmspace --bench large` the large-leaf
//! ones (first touch of 1 GiB with 2 MiB against 4 KiB leaves, eager
//! against lazy split at 4 and 16 GiB, promotion per 2 MiB explicit and
//! automatic, writing 1 GiB after a tracking on/off cycle with and
//! without automatic promotion), and
//! `cargo bench -p vmspace --bench huge` the 1 GiB ones (first touch of
//! 4 GiB with 1 GiB against 2 MiB leaves, the split of one 1 GiB leaf).
//!
//! # Known gaps
//!
//! - Every multi-step operation completes or changes nothing: frames are
//!   checked against the format's width at `map`
//!   ([`Invalid::FrameOutOfRange`]), so populate, fault-around and
//!   `DirtyOp::Set` never stop half way, and `resident_count` is exact.
//! - A 1 GiB slot is promoted back to one leaf only when its object
//!   backs it with one 1 GiB run: a 1 GiB run is only ever the reservoir's
//!   fresh aligned frames or one freed whole (free 2 MiB runs are not
//!   reassembled). A mapping whose object offset is not 2 MiB-aligned
//!   against its guest address gets 4 KiB leaves only (1 GiB-aligned for
//!   a 1 GiB leaf).
//! - The lazy split of a 1 GiB leaf on a write invalidates only the
//!   written 2 MiB (the other 511 keep their translations and stay
//!   write-protected), but the change of the level-3 entry is reported
//!   with `tables_freed` false, as for a 2 MiB lazy split.
//! - Automatic promotion ([`SpaceConfig::auto_promote`]) happens only
//!   when a vCPU fault, a hold or a `populate` maps the leaves that fill
//!   a leaf table: not after a `DirtyOp::Set`, or a
//!   protection change that makes a full table uniform again (nothing is
//!   mapped then: [`VmSpace::promote`], a khugepaged-like pass the VMM
//!   runs, e.g. after a migration switched tracking off, merges those).
//!   A fault in guest context on the same space skips it, and a table
//!   filled while tracking was on is not promoted when tracking goes off.
//!   Promotion of either kind is refused while tracking is on.
//!   The split's retry is lock-free, not wait-free: a writer whose
//!   chunk another thread promotes and write-protects again (tracking
//!   switched off, promoted, switched on lazily) between its split and
//!   its retry splits again, once per such switch, as a vCPU would fault
//!   again.
//! - The eager split carries a large leaf's dirty bit (set while tracking
//!   was off) to all its 512 small leaves: the first harvest reports them
//!   (a superset). The lazy split clears it when tracking goes on.
//! - A split that runs out of table pages when tracking is switched on
//!   leaves tracking off with what it split split (same translations) and
//!   returns the error.
//! - `unmap` must match one mapping exactly (as in the seed);
//!   [`VmSpace::unmap_range`] and [`VmSpace::protect`] take any range
//!   inside one mapping, not one across several. `populate` must stay
//!   within one mapping. A protection change refuses ([`Error::Held`])
//!   when any hold of any client is on the range and a right is removed
//!   (holds record pages, not their access).
//! - Swappable objects: see `swap.rs` for their gaps (4 KiB leaves only,
//!   the swap-in's file read inside the active section, the clock seeing
//!   only mapped pages). [`VmObject::frame_runs`] of a swappable object
//!   stops at its first page without a frame.
//! - A client belongs to one thread (`Send`, not `Sync`); holds are
//!   released on the thread that took them (seed 004 allows a release from
//!   any thread).
//! - An unmap discards the dirty bits of the range it clears (as the seed
//!   does): harvest before unmapping what a migration still needs. A
//!   writable hold whose mapping was unmapped meanwhile reports it on
//!   release and marks nothing, even if the same object was mapped again
//!   at the same address.
//! - Holds and releases of writable pages each cost one fenced atomic
//!   operation (the activation); a deferred, batched dirty marking could
//!   remove the release's, at the price of delaying marks to a later
//!   harvest.
//! - A space dropped while clients live on keeps its (empty) table until
//!   the last client goes; the clients are orphaned.
//! - The format capability "cannot track dirty bits" never occurs with the
//!   current nested-pt formats (all three can), so the refusal path of
//!   [`VmSpace::set_dirty_tracking`] is unreachable today.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

mod client;
mod error;
mod host_view;
mod huge;
mod object;
mod protocol;
mod reservoir;
mod space;
#[cfg(feature = "std")]
mod swap;
#[cfg(not(feature = "std"))]
#[path = "swap_none.rs"]
mod swap;
mod sync;
mod view;

pub use client::{HoldChain, OnCpu, PageHold, VmClient};
pub use error::{Error, Invalid, NoSpace, Result};
pub use host_view::{FrameRun, FrameRuns};
pub use object::VmObject;
pub use reservoir::{Arena, HeapReservoir, Reservoir, ReservoirStats};
#[cfg(feature = "std")]
pub use reservoir::{HostView, MemfdReservoir};
pub use space::{Cause, DirtyOp, Invalidation, MappingInfo, PromotionStats, SpaceConfig, SplitPolicy, VmSpace};
#[cfg(feature = "std")]
pub use swap::{SwapStats, swap_file_in};
#[cfg(any(loom, feature = "std"))]
pub use sync::StdLock;
pub use sync::{DefaultLock, RawLock, SpinLock};
pub use view::{LeafEntry, TableView};

pub use nested_pt::{Gpa, MemType, Pfn, Prot, PteFormat, TablePages};

/// Size of a page, in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
