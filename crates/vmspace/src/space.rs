//! The address space: mappings, the nested table, generations, dirty bits.

use alloc::collections::BTreeMap;
use alloc::sync::Arc as StdArc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use nested_pt::{Access, FormatKind, Gpa, NestedTable, PageSize, Pfn, Prot, PteFormat, TablePages};

use crate::PAGE_SIZE;
use crate::client::VmClient;
use crate::error::{Error, Invalid, NoSpace, Result};
use crate::object::VmObject;
use crate::protocol::{ClientShared, PanicSlot, on_cpu, resume};
use crate::sync::{Arc, AtomicBool, AtomicU64, Cell, DefaultLock, Guard, RawLock};
use crate::view::TableView;

/// How a space is created.
#[derive(Clone, Copy, Debug)]
pub struct SpaceConfig {
    /// Size of the guest-physical space in bytes. Mappings must end below
    /// it (a mapping ending exactly at `size` is refused, as in seed 004).
    pub size: u64,
    /// The entry format of the nested table.
    pub format: PteFormat,
    /// Whether dirty tracking starts on.
    pub track_dirty: bool,
    /// Pages a vCPU fault maps around the faulting one (an aligned window
    /// inside the faulting mapping and its leaf table; 1 = just the page;
    /// rounded down to a power of two, at most 512).
    pub fault_around: u32,
    /// Set the accessed bit on the fault-around neighbours a vCPU fault
    /// maps (not on the faulting page, whose access the hardware records,
    /// and never the dirty bit). A host that prefetches only translations
    /// already marked accessed (KVM's shadow paging prefetches up to 8
    /// neighbouring entries per fault, skipping those with A clear) can
    /// then serve the neighbours without a fault each. The price is
    /// accessed-bit precision: a neighbour the guest never touched reads
    /// as accessed until the accessed bit is next cleared, so a clock that
    /// reclaims pages whose bit stays clear keeps such a page one sweep
    /// longer than it should. Dirty tracking is unaffected. No effect with
    /// emulated A/D ([`PteFormat::ept_emulated_ad`]), where accessed is a
    /// permission. Off by default.
    pub fault_around_accessed: bool,
    /// With `fault_around_accessed`, also set the dirty bit on those
    /// neighbours when the fault is a write in a writable mapping and
    /// dirty tracking is off at the time: a host that maps a clean entry
    /// read-only (so that the first write sets the bit) can then map the
    /// neighbours writable. Never while tracking is on (a harvest would
    /// report pages nobody wrote); if tracking is switched on later, the
    /// first harvest may report such pages (a superset, never a miss, as
    /// for hardware A/D formats, see [`VmSpace::dirty_tracking`]). Off by
    /// default.
    pub fault_around_dirty_untracked: bool,
    /// Map an aligned 2 MiB range of a mapping with one 2 MiB leaf when
    /// the mapping's object backs it with one aligned 2 MiB run
    /// ([`VmObject::run_at`]) and the format has 2 MiB leaves: the range
    /// is populated for a 2 MiB leaf at `map` (while dirty tracking is
    /// off), and `populate`, a fault or a hold in it maps the whole run
    /// at once. On by default; off maps 4 KiB leaves only (promotion,
    /// [`VmSpace::promote`], is refused then).
    pub large_leaves: bool,
    /// Map an aligned 1 GiB slot of a mapping with one 1 GiB leaf when
    /// the mapping's object backs it with one aligned 1 GiB run
    /// ([`VmObject::huge_run_at`]: the object offset of the slot is 1 GiB
    /// aligned too) and the format has 1 GiB leaves; as for 2 MiB leaves,
    /// the slot is populated for it at `map` (while dirty tracking is off)
    /// and `populate`, a fault or a hold in it maps the whole run. Needs
    /// `large_leaves` (a 1 GiB leaf splits to 2 MiB leaves). On by
    /// default; without 1 GiB leaves in the format it has no effect.
    pub huge_leaves: bool,
    /// How large leaves are split when dirty tracking is switched on
    /// (default [`SplitPolicy::Eager`]).
    pub split: SplitPolicy,
    /// Promote automatically (FreeBSD's promotion in `pmap_enter` when a
    /// page-table page fills): when a vCPU fault ([`VmClient::fault`]), a
    /// hold or [`VmSpace::populate`] maps leaves while dirty
    /// tracking is off and leaves the leaf table of an aligned 2 MiB
    /// range full, the range lies inside one mapping, one aligned run of
    /// its object backs it ([`VmObject::run_at`]: never a swappable
    /// object) and its 512 leaves have one protection, they become one
    /// 2 MiB leaf as [`VmSpace::promote`] makes it (accessed and dirty
    /// carried over, the leaf table freed, every client held, the
    /// generation bumped, [`Cause::Remap`] with `tables_freed`). Counted
    /// in [`PromotionStats::automatic`]. When that promotion completes a
    /// 1 GiB slot of the object's 1 GiB run ([`SpaceConfig::huge_leaves`]),
    /// the slot becomes one 1 GiB leaf likewise
    /// ([`VmSpace::promotions_1g`]). No effect without large leaves.
    /// On by default: the range was populated for 4 KiB leaves only
    /// because tracking was on (or a split cut it), and the guest filling
    /// it back is the sign that it is in use as a whole again.
    ///
    /// [`VmClient::fault`]: crate::VmClient::fault
    /// [`VmObject::run_at`]: crate::VmObject::run_at
    pub auto_promote: bool,
}

/// 2 MiB leaves made by promotion ([`VmSpace::promotions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromotionStats {
    /// By [`VmSpace::promote`].
    pub explicit: u64,
    /// By a fault, a hold or a populate ([`SpaceConfig::auto_promote`]).
    pub automatic: u64,
}

/// How [`VmSpace::set_dirty_tracking`] treats large leaves (a harvest
/// reports 4 KiB pages, so a large leaf must be split before the guest's
/// writes to it can be told apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Split every large leaf into a full leaf table when tracking is
    /// switched on (each small leaf carrying the large one's accessed and
    /// dirty state): switching costs one leaf table per large leaf, and
    /// the guest's writes afterwards take no fault in `vmspace`.
    Eager,
    /// Write-protect every large leaf when tracking is switched on (and
    /// clear its dirty bit: what was written before tracking needs no
    /// report), and split a large leaf on the first write to it (a vCPU's
    /// write fault or a writable hold), the small leaves getting the
    /// mapping's protection back: switching is cheap, each large leaf's
    /// first write pays a fault, a split and an invalidation. A large
    /// leaf that no write split gets the mapping's protection back when
    /// tracking is switched off (one compare-and-swap each).
    Lazy,
}

impl SpaceConfig {
    /// A space of `size` bytes with `format`, dirty tracking off, and a
    /// fault-around window of 16 pages whose neighbours are mapped with
    /// the accessed bit clear.
    pub fn new(size: u64, format: PteFormat) -> Self {
        SpaceConfig {
            size,
            format,
            track_dirty: false,
            fault_around: 16,
            fault_around_accessed: false,
            fault_around_dirty_untracked: false,
            large_leaves: true,
            huge_leaves: true,
            split: SplitPolicy::Eager,
            auto_promote: true,
        }
    }
}

/// What changed, as told to a client's invalidation callback.
#[derive(Debug)]
pub struct Invalidation<'a> {
    /// First guest-physical address of the range.
    pub gpa: Gpa,
    /// Length of the range in bytes.
    pub len: u64,
    /// The table generation after the change.
    pub generation: u64,
    /// Why.
    pub cause: Cause<'a>,
    /// Whether the change freed table pages (changed non-leaf entries):
    /// a host that mirrors the table (a shadow-paging KVM host) must then
    /// drop everything it built from the table, not only the leaves of the
    /// range. An unmap (it vacates the tables it emptied, and a partial
    /// one may split a large leaf it cuts), a promotion (it frees the leaf
    /// table) and a split ([`Cause::Remap`] from a protection change that
    /// cut a large leaf) set it; a harvest, a tracking switch and a lazy
    /// split on a write do not.
    pub tables_freed: bool,
    /// For [`Cause::Dirty`] from a harvest that collected them
    /// ([`VmSpace::track_dirty_frames`], [`VmSpace::dirty_op_frames`] with
    /// [`DirtyOp::Reset`]): the frames whose dirty bit it cleared, in
    /// address order, so that a host can drop exactly the translations
    /// that still allow writes without setting the bit. `None` when they
    /// were not collected: then any page of the range may have changed.
    /// For [`Cause::Swap`]: the frames evicted and those whose accessed
    /// bit the clock cleared (always collected).
    pub cleared: Option<&'a [Pfn]>,
}

/// Why a range was invalidated.
#[derive(Debug)]
pub enum Cause<'a> {
    /// The range was unmapped. It mapped `object` from byte `offset`: page
    /// `i` of the range was frame `object.frame_at(offset + i * 4096)`.
    /// A host that mirrors guest frames (a shadow-paging KVM host) drops
    /// its mappings of those frames.
    Unmap {
        /// The object that was mapped.
        object: &'a VmObject,
        /// Byte offset in the object of the range's first page.
        offset: u64,
    },
    /// A harvest ([`DirtyOp::Reset`]) cleared dirty bits of the range (at
    /// least one: a harvest that clears none, `Get` and `Set` invalidate
    /// nothing). Told without the client held.
    Dirty,
    /// Dirty tracking was switched on or off (the whole space; the root
    /// pointer may have changed).
    Tracking,
    /// The swapper ([`VmSpace::swap_out`]) cleared leaves of pages it
    /// swaps out, or accessed bits of pages it spared for a pass: their
    /// frames are in [`Invalidation::cleared`] (the evicted frames are
    /// freed once every client was told). Told without the client held.
    Swap,
    /// The translations of the range changed shape or protection without
    /// being unmapped: large leaves were split or promoted (the same
    /// frames, now through a leaf table or one large leaf), or a
    /// protection change ([`VmSpace::protect`]) rewrote its leaves.
    /// `tables_freed` is true when a promotion freed leaf tables. A host
    /// that mirrors the table drops what it built for the range.
    Remap,
}

/// Dirty-bitmap operations (bhyve's live-migration additions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyOp {
    /// Report the dirty state without clearing it.
    Get,
    /// Make pages dirty again (after a failed migration): each page whose
    /// mapping is writable is faulted in for write and marked dirty; the
    /// bitmap reports which pages were marked.
    Set,
    /// Report the dirty state and clear it (read-and-clear).
    Reset,
}

/// One mapping: `len` bytes of `object` from `offset`, with `prot`.
pub(crate) struct Mapping {
    pub(crate) object: StdArc<VmObject>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) prot: Prot,
    /// The space's unmap sequence number when the mapping was made: a
    /// hold that recorded a smaller one is not on this mapping.
    pub(crate) born: u64,
    /// Which `map` call made it (the map sequence then): the pieces a
    /// partial unmap or a protection change cut keep it, and only pieces
    /// of one mapping are ever merged again.
    pub(crate) id: u64,
}

/// A read-only description of a mapping.
#[derive(Clone, Debug)]
pub struct MappingInfo {
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// The object mapped.
    pub object: StdArc<VmObject>,
    /// Byte offset in the object of the first page.
    pub offset: u64,
    /// Protection.
    pub prot: Prot,
}

/// Table and mappings. Changed only with the space lock held *and* every
/// client held (no data-path operation in flight); read with the space
/// lock held or by an active client.
pub(crate) struct Data<P: TablePages> {
    pub(crate) table: NestedTable<P>,
    pub(crate) maps: BTreeMap<u64, Mapping>,
}

impl<P: TablePages> Data<P> {
    /// The mapping containing `gpa`: its start and the mapping.
    #[inline]
    pub(crate) fn mapping_at(&self, gpa: u64) -> Option<(u64, &Mapping)> {
        let (start, m) = self.maps.range(..=gpa).next_back()?;
        (gpa - start < m.len).then_some((*start, m))
    }
}

/// A value alone on its (pair of) cache lines.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> core::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Registry of clients; under the space lock.
pub(crate) struct Admin<L> {
    pub(crate) clients: BTreeMap<u64, Arc<ClientShared<L>>>,
    next_id: u64,
    pub(crate) destroyed: bool,
    /// A hook's panic during the current change.
    hooks: PanicSlot,
}

/// Every client held by an administrative change: released when dropped,
/// so that no exit path (an error, a hook's panic) leaves one held.
pub(crate) struct HeldAll<'a, L: RawLock>(pub(crate) &'a Admin<L>);

impl<'a, L: RawLock> HeldAll<'a, L> {
    pub(crate) fn new(a: &'a Admin<L>) -> Self {
        a.hold_all();
        HeldAll(a)
    }
}

impl<L: RawLock> Drop for HeldAll<'_, L> {
    fn drop(&mut self) {
        self.0.release_all();
    }
}

impl<L: RawLock> Admin<L> {
    /// Exclude every client's data path (seed 004's hold-enter).
    fn hold_all(&self) {
        for c in self.clients.values() {
            c.admin_hold();
        }
    }

    /// Let every client resume (hold-exit).
    fn release_all(&self) {
        for c in self.clients.values() {
            c.admin_release();
        }
    }
}

pub(crate) struct Inner<P: TablePages, L: RawLock> {
    lock: L,
    admin: Cell<Admin<L>>,
    data: Cell<Data<P>>,
    pub(crate) size: u64,
    pub(crate) format: PteFormat,
    /// The root table's frame: never freed or replaced while the table lives.
    root: Pfn,
    /// Bits that mark a leaf dirty without granting write access.
    pub(crate) dirty_bits: u64,
    pub(crate) fault_around: u64,
    /// Accessed bit preset on the neighbours a vCPU fault maps (0: none).
    pub(crate) fault_around_accessed: u64,
    /// Dirty bit preset as well on a write fault's neighbours while
    /// tracking is off (0: never).
    pub(crate) fault_around_dirty: u64,
    /// The fault path records accesses in software (emulated A/D).
    pub(crate) records_access: bool,
    pub(crate) generation: AtomicU64,
    /// Bumped by every map and unmap (client mapping caches check it).
    pub(crate) map_seq: AtomicU64,
    /// Bumped by every unmap (holds record it).
    pub(crate) unmap_seq: AtomicU64,
    /// Written by every fault that maps pages: on its own cache lines, so
    /// that it does not slow down the read-mostly fields above for other
    /// threads' holds.
    pub(crate) resident: Padded<AtomicU64>,
    pub(crate) track_dirty: AtomicBool,
    /// Large leaves are mapped (config and format allow them).
    pub(crate) large: bool,
    /// 1 GiB leaves are mapped (config and format allow them; see `huge.rs`).
    pub(crate) huge: bool,
    /// Split large leaves on their first write once tracking is on.
    pub(crate) lazy_split: AtomicBool,
    /// Promote full leaf tables after a fault or a populate (config, and
    /// `large`).
    pub(crate) auto_promote: bool,
    /// 2 MiB leaves made by `promote` and automatically.
    promoted_explicit: AtomicU64,
    promoted_auto: AtomicU64,
    /// 1 GiB leaves made by `promote` and automatically.
    promoted_huge_explicit: AtomicU64,
    promoted_huge_auto: AtomicU64,
    /// Bumped (under `struct_lock`) by every change that moves present
    /// leaves to other entries (a split, a promotion): a hold that
    /// recorded an older value finds its entry again before marking it.
    pub(crate) struct_seq: AtomicU64,
    /// Taken around every exclusive access to the data
    /// (`with_data_mut`): a release that runs while an administrative
    /// change holds its client reads the table under it.
    struct_lock: L,
}

// SAFETY: `admin` is only reached under `lock`; `data` follows the rule
// on `Data` (exclusive access needs the lock and every client held, which
// the protocol's atomics order); the rest is atomic or immutable. The
// table provider must be Send + Sync to be reached from several threads.
unsafe impl<P: TablePages + Send + Sync, L: RawLock> Sync for Inner<P, L> {}
// SAFETY: as above.
unsafe impl<P: TablePages + Send, L: RawLock> Send for Inner<P, L> {}

impl<P: TablePages, L: RawLock> Inner<P, L> {
    /// Shared access to the table and mappings.
    ///
    /// # Safety
    /// The caller holds the space lock, or is an active client.
    #[inline]
    pub(crate) unsafe fn with_data<R>(&self, f: impl FnOnce(&Data<P>) -> R) -> R {
        // SAFETY: per the caller, no exclusive access runs concurrently.
        self.data.with(|d| f(unsafe { &*d }))
    }

    /// Exclusive access (under `struct_lock`).
    ///
    /// # Safety
    /// The caller holds the space lock and every client is held.
    unsafe fn with_data_mut<R>(&self, f: impl FnOnce(&mut Data<P>) -> R) -> R {
        let _g = Guard::new(&self.struct_lock);
        // SAFETY: per the caller, nothing else reaches the data.
        self.data.with_mut(|d| f(unsafe { &mut *d }))
    }

    /// Shared access for a release that runs while its client is held by
    /// an administrative change: `struct_lock` keeps exclusive access out.
    pub(crate) fn with_data_structure_locked<R>(&self, f: impl FnOnce(&Data<P>) -> R) -> R {
        let _g = Guard::new(&self.struct_lock);
        // SAFETY: exclusive access only happens under `struct_lock`, which
        // is held; shared readers run concurrently by design.
        self.data.with(|d| f(unsafe { &*d }))
    }

    /// Run `f` with the space lock and the registry.
    /// A hook's panic during `f` is propagated after the lock is dropped.
    pub(crate) fn locked<R>(&self, f: impl FnOnce(&mut Admin<L>) -> R) -> R {
        let (r, panic) = {
            let _g = Guard::new(&self.lock);
            // SAFETY: the registry is only reached here, under the lock.
            self.admin.with_mut(|a| {
                let a = unsafe { &mut *a };
                let r = f(a);
                (r, a.hooks.take())
            })
        };
        resume(panic);
        r
    }

    /// Register a client; `None` once the space is destroyed.
    pub(crate) fn register(&self, c: &Arc<ClientShared<L>>) -> Option<u64> {
        self.locked(|a| {
            if a.destroyed {
                return None;
            }
            let id = a.next_id;
            a.next_id += 1;
            a.clients.insert(id, c.clone());
            Some(id)
        })
    }

    /// Remove a client (its destruction); a no-op if the space already
    /// orphaned it.
    pub(crate) fn unregister(&self, id: u64) {
        let c = self.locked(|a| a.clients.remove(&id));
        drop(c);
    }

    /// Run an administrative change: space lock held, every client held
    /// around `f`. `f` gets the registry (to invalidate clients).
    fn exclusive<R>(&self, f: impl FnOnce(&Admin<L>) -> Result<R>) -> Result<R> {
        self.locked(|a| {
            if a.destroyed {
                return Err(Error::Orphaned);
            }
            let held = HeldAll::new(a);
            f(held.0)
        })
    }

    /// Map the pages of `[gpa, gpa+len)` that have no leaf yet to
    /// `frame(page)` (`None` skips a page) and add exactly the pages mapped
    /// to `resident`; every multi-page mapping path (populate,
    /// fault-around, `DirtyOp::Set`) goes through here.
    ///
    /// Either the whole range is handled or nothing changes: every error
    /// `NestedTable::map_range` reports (range, protection, a missing leaf
    /// table) is found before its first entry change, except a frame the
    /// format cannot express, which it would report half way with the
    /// count of the pages already mapped lost. `map` refuses objects with
    /// such frames, and the frame function is filtered here as well, so
    /// that error cannot occur and `resident` stays exact.
    pub(crate) fn map_pages(
        &self,
        table: &NestedTable<P>,
        gpa: u64,
        len: u64,
        prot: Prot,
        object: &VmObject,
        mut frame: impl FnMut(Gpa) -> Option<Pfn>,
    ) -> Result<u64> {
        let fmt = &self.format;
        let n = table
            .map_range(Gpa(gpa), len, prot, object.mem_type(), |p| frame(p).filter(|f| fmt.frame_fits(*f)))
            .map_err(Error::Table)?;
        self.resident.fetch_add(n, Relaxed);
        Ok(n)
    }

    /// Map the empty 2 MiB slot at `c`, counted for a 2 MiB leaf, with
    /// one leaf for the run backing `object` from byte `offset`; counts
    /// 512 resident pages. `Ok(0)` when someone else mapped it first.
    pub(crate) fn map_large(
        &self,
        table: &NestedTable<P>,
        c: u64,
        prot: Prot,
        object: &VmObject,
        offset: u64,
    ) -> Result<u64> {
        // Only ranges with a run are populated for 2 MiB leaves, and an
        // object's frames never change.
        self.map_run_leaf(table, c, object.run_at(offset), PageSize::Size2M, prot, object)
    }

    /// Map one large leaf of `size` at `g` onto the run starting at frame
    /// `run` (`None`: the object has no such run there, which the caller's
    /// populate rule excludes); counts its pages resident. `Ok(0)` when
    /// someone else mapped it first.
    pub(crate) fn map_run_leaf(
        &self,
        table: &NestedTable<P>,
        g: u64,
        run: Option<Pfn>,
        size: PageSize,
        prot: Prot,
        object: &VmObject,
    ) -> Result<u64> {
        let run = run.ok_or(Error::Table(nested_pt::Error::NotPopulated))?;
        match table.map(Gpa(g), run, size, prot, object.mem_type()) {
            Ok(()) => {
                self.resident.fetch_add(size.pages(), Relaxed);
                Ok(size.pages())
            }
            Err(nested_pt::Error::AlreadyMapped { .. }) => Ok(0),
            Err(e) => Err(Error::Table(e)),
        }
    }

    /// Map what is missing of `[gpa, end)`, inside the mapping `m` at
    /// `start`: 4 KiB pages where the range is populated for them, the
    /// whole 2 MiB leaf where it is populated for one (also when the range
    /// covers only part of it). Returns the pages mapped.
    fn map_span(&self, table: &NestedTable<P>, start: u64, m: &Mapping, gpa: u64, end: u64) -> Result<u64> {
        let mut n = 0;
        let mut small: Option<(u64, u64)> = None;
        let frame = |p: Gpa| m.object.frame_at(m.offset + (p.0 - start));
        let mut a = gpa;
        while a < end {
            // A 1 GiB slot counted for one leaf (see `huge.rs`): found at
            // the range's start or a slot boundary.
            if self.huge
                && (a == gpa || a.is_multiple_of(crate::huge::G1))
                && let Some(g) = crate::huge::huge_slot_at(table, a, start, start + m.len)
            {
                if let Some((lo, hi)) = small.take() {
                    n += self.map_pages(table, lo, hi - lo, m.prot, &m.object, frame)?;
                }
                n += self.map_huge(table, g, m.prot, &m.object, m.offset + (g - start))?;
                a = (g + crate::huge::G1).min(end);
                continue;
            }
            let c = a & !(M2 - 1);
            let b = (c + M2).min(end);
            if chunk_large(table, c) {
                if let Some((lo, hi)) = small.take() {
                    n += self.map_pages(table, lo, hi - lo, m.prot, &m.object, frame)?;
                }
                n += self.map_large(table, c, m.prot, &m.object, m.offset + (c - start))?;
            } else {
                small = Some(small.map_or((a, b), |(lo, _)| (lo, b)));
            }
            a = b;
        }
        if let Some((lo, hi)) = small {
            n += self.map_pages(table, lo, hi - lo, m.prot, &m.object, frame)?;
        }
        Ok(n)
    }

    /// Turn the 2 MiB chunk at `c` (inside a mapping whose protection is
    /// `prot`) from counted for a 2 MiB leaf into counted for 4 KiB
    /// leaves: its large leaf is split into a leaf table with the same
    /// translations (the small leaves get `prot`), an empty slot gets an
    /// empty leaf table. `Ok(true)` when it changed something. The caller
    /// has exclusive access; a split bumps `struct_seq`.
    fn split_chunk(&self, table: &mut NestedTable<P>, c: u64, prot: Prot) -> Result<bool> {
        // A 1 GiB slot counted for one leaf goes to 2 MiB first (`huge.rs`).
        let huge = self.split_huge_slot(table, c)?;
        if !chunk_large(table, c) {
            return Ok(huge);
        }
        let leaf = table.lookup(Gpa(c)).map(|l| l.size);
        match leaf {
            Some(PageSize::Size2M) => table.demote_2m_as(Gpa(c), Some(prot)).map_err(Error::Table)?,
            Some(_) => return Ok(false),
            None => table.split_empty_2m(Gpa(c)).map_err(Error::Table)?,
        }
        self.struct_seq.fetch_add(1, Release);
        Ok(true)
    }

    /// Split every chunk counted for a 2 MiB leaf that overlaps
    /// `[gpa, end)` (within the mappings there); with `lazy`, a large leaf
    /// of a writable mapping is write-protected (and made clean) instead.
    /// Returns whether anything changed, and the first error (the chunks
    /// before it are split: the same translations, so the state is
    /// consistent).
    fn split_range(&self, d: &mut Data<P>, gpa: u64, end: u64, lazy: bool) -> (bool, Result<()>) {
        let Data { table, maps } = d;
        let mut changed = false;
        for (start, m) in maps.range(..end) {
            let m_end = start + m.len;
            if m_end <= gpa {
                continue;
            }
            let mut c = (*start).max(gpa) & !(M2 - 1);
            while c < m_end.min(end) {
                if c >= *start && c + M2 <= m_end {
                    let r = if lazy
                        && m.prot.contains(Prot::WRITE)
                        && table.lookup(Gpa(c)).is_some_and(|l| l.size != PageSize::Size4K)
                    {
                        self.write_protect_large(table, c);
                        Ok(false)
                    } else {
                        self.split_chunk(table, c, m.prot)
                    };
                    match r {
                        Ok(ch) => changed |= ch,
                        Err(e) => return (changed, Err(e)),
                    }
                }
                c += M2;
            }
        }
        (changed, Ok(()))
    }

    /// Clear the write permission and the dirty state of the large leaf
    /// at `c` (keeping its accessed state), so that the next write faults
    /// and splits it (the lazy split). A compare-and-swap loop: hardware
    /// may set accessed/dirty bits meanwhile.
    fn write_protect_large(&self, table: &NestedTable<P>, c: u64) {
        let fmt = &self.format;
        let Some(leaf) = table.lookup(Gpa(c)) else { return };
        let mut v = leaf.value();
        loop {
            let prot = fmt.prot(v) - Prot::WRITE;
            let mt = fmt.mem_type(v).unwrap_or(nested_pt::MemType::WriteBack);
            let Ok(mut new) = fmt.leaf_entry(fmt.frame_at_level(v, leaf.size.level()), leaf.size, prot, mt) else {
                return;
            };
            if fmt.accessed(v) {
                let read = fmt.access_bits(new, Access::Read);
                new |= read.or_else(|| fmt.access_bits(new, Access::Execute)).unwrap_or(0);
            }
            match leaf.entry.compare_exchange(v, new, AcqRel, Acquire) {
                Ok(_) => return,
                Err(now) if fmt.is_present(now) => v = now,
                Err(_) => return,
            }
        }
    }

    /// Give every large leaf whose protection lacks part of its mapping's
    /// (the lazy split's write protection, [`Inner::write_protect_large`])
    /// the mapping's protection again, keeping frame, memory type and
    /// accessed/dirty state; for tracking going off. A compare-and-swap
    /// each (hardware may set accessed/dirty meanwhile). Exclusive access;
    /// returns how many leaves it rewrote.
    fn unprotect_large(&self, d: &mut Data<P>) -> u64 {
        let fmt = &self.format;
        let mut n = 0;
        for (start, m) in d.maps.iter() {
            if !m.prot.contains(Prot::WRITE) {
                continue;
            }
            let m_end = start + m.len;
            let mut c = start.next_multiple_of(M2);
            while c + M2 <= m_end {
                let mut next = c + M2;
                if let Some(leaf) = d.table.lookup(Gpa(c)).filter(|l| l.size != PageSize::Size4K) {
                    if leaf.size == PageSize::Size1G {
                        next = leaf.gpa.0 + crate::huge::G1;
                    }
                    let mut v = leaf.value();
                    while fmt.is_present(v) && !fmt.prot(v).contains(m.prot) {
                        let Ok(new) = self.with_prot(v, leaf.size, m.prot) else { break };
                        match leaf.entry.compare_exchange(v, new, AcqRel, Acquire) {
                            Ok(_) => {
                                n += 1;
                                break;
                            }
                            Err(now) => v = now,
                        }
                    }
                }
                c = next;
            }
        }
        n
    }

    /// Clear and vacate `[gpa, end)` (whole chunks counted for 2 MiB
    /// leaves, the rest for 4 KiB ones); the caller split the chunks the
    /// range cuts. Returns the 4 KiB pages cleared (a 2 MiB leaf: 512).
    fn vacate_span(&self, table: &mut NestedTable<P>, gpa: u64, end: u64) -> Result<u64> {
        let mut n = 0;
        let huge = self.huge;
        let plan = crate::huge::plan(gpa, end, |g| huge && crate::huge::slot_huge(table, g), |c| chunk_large(table, c));
        for (lo, hi, size) in plan {
            n += table.unmap_vacate_region(Gpa(lo), hi - lo, size).map_err(Error::Table)?;
        }
        Ok(n)
    }

    /// Split the chunks counted for 2 MiB leaves that `[gpa, end)` cuts
    /// (inside the mapping at `start`, of protection `prot`): at most the
    /// two at its ends. Returns whether one was split.
    fn split_ends(
        &self,
        table: &mut NestedTable<P>,
        start: u64,
        m_end: u64,
        gpa: u64,
        end: u64,
        prot: Prot,
    ) -> Result<bool> {
        let mut changed = self.split_cut_huge(table, start, m_end, gpa, end)?;
        for c in [gpa & !(M2 - 1), (end - 1) & !(M2 - 1)] {
            let cut = c < gpa || c + M2 > end;
            if cut && c >= start && c + M2 <= m_end {
                changed |= self.split_chunk(table, c, prot)?;
            }
        }
        Ok(changed)
    }

    /// Part of `unmap_range`: space lock held, clients held.
    fn unmap_part_locked(&self, a: &Admin<L>, start: u64, gpa: u64, end: u64) -> Result<StdArc<VmObject>> {
        // SAFETY: lock held, clients held.
        let (object, m_offset, m_len, prot, born, id) = unsafe {
            self.with_data(|d| {
                let m = &d.maps[&start];
                (m.object.clone(), m.offset, m.len, m.prot, m.born, m.id)
            })
        };
        let m_end = start + m_len;
        // Splits first: on error nothing is unmapped (what was split keeps
        // its translations; vCPUs are told of the new tables).
        // SAFETY: lock held, clients held.
        let split = unsafe { self.with_data_mut(|d| self.split_ends(&mut d.table, start, m_end, gpa, end, prot)) };
        let split = match split {
            Ok(s) => s,
            Err(e) => {
                self.map_seq.fetch_add(1, Release);
                self.bump_gen_and_invalidate(a, gpa, end - gpa, Cause::Remap, true, None);
                return Err(e);
            }
        };
        let seq = self.unmap_seq.load(Relaxed) + 1;
        for c in a.clients.values() {
            c.retire(gpa, end, born, seq, &object);
        }
        self.unmap_seq.store(seq, Release);
        // SAFETY: lock held, clients held.
        let (cleared, freed) = unsafe {
            self.with_data_mut(|d| {
                let before = d.table.table_pages();
                let cleared = self.vacate_span(&mut d.table, gpa, end)?;
                d.maps.remove(&start);
                if gpa > start {
                    let left = Mapping { object: object.clone(), offset: m_offset, len: gpa - start, prot, born, id };
                    d.maps.insert(start, left);
                }
                if end < m_end {
                    let offset = m_offset + (end - start);
                    let right = Mapping { object: object.clone(), offset, len: m_end - end, prot, born, id };
                    d.maps.insert(end, right);
                }
                Ok::<_, Error>((cleared, d.table.table_pages() < before))
            })
        }?;
        self.map_seq.fetch_add(1, Release);
        self.resident.fetch_sub(cleared, Relaxed);
        if cleared > 0 || freed || split {
            let cause = Cause::Unmap { object: &object, offset: m_offset + (gpa - start) };
            self.bump_gen_and_invalidate(a, gpa, end - gpa, cause, freed || split, None);
        }
        Ok(object)
    }

    /// The leaf entry `v` (of a page of `size`) with protection `prot`,
    /// its frame, memory type and accessed/dirty state kept.
    fn with_prot(&self, v: u64, size: PageSize, prot: Prot) -> Result<u64> {
        let fmt = &self.format;
        let mt = fmt.mem_type(v).unwrap_or(nested_pt::MemType::WriteBack);
        let mut new = fmt.leaf_entry(fmt.frame_at_level(v, size.level()), size, prot, mt).map_err(Error::Table)?;
        if fmt.accessed(v) {
            let read = fmt.access_bits(new, Access::Read);
            new |= read.or_else(|| fmt.access_bits(new, Access::Execute)).unwrap_or(0);
        }
        if fmt.dirty(v) {
            new |= fmt.set_dirty_bits();
        }
        Ok(new)
    }

    /// Part of `protect`: space lock held, clients held.
    fn protect_locked(&self, a: &Admin<L>, start: u64, gpa: u64, end: u64, prot: Prot) -> Result<()> {
        let tracking = self.track_dirty.load(Acquire);
        // SAFETY: lock held, clients held.
        let r = unsafe {
            self.with_data_mut(|d| {
                let m = &d.maps[&start];
                let (m_end, old) = (start + m.len, m.prot);
                let mut split = self.split_ends(&mut d.table, start, m_end, gpa, end, old)?;
                if tracking {
                    let (s, r) = self.split_range(d, gpa, end, false);
                    split |= s;
                    r?;
                }
                // Rewrite the leaves: a compare-and-swap each, since the
                // hardware may set accessed/dirty bits meanwhile.
                let fmt = &self.format;
                let mut err = Ok(());
                d.table.for_each_leaf_table(Gpa(gpa), end - gpa, |_, entries, size| {
                    for e in entries {
                        let mut v = e.load(Acquire);
                        while fmt.is_present(v) {
                            let new = match self.with_prot(v, size, prot) {
                                Ok(n) => n,
                                Err(x) => {
                                    err = Err(x);
                                    return;
                                }
                            };
                            match e.compare_exchange(v, new, AcqRel, Acquire) {
                                Ok(_) => break,
                                Err(now) => v = now,
                            }
                        }
                    }
                });
                err?;
                let m = d.maps.remove(&start).expect("found above");
                let piece = |offset: u64, len: u64, prot: Prot| Mapping {
                    object: m.object.clone(),
                    offset: m.offset + offset,
                    len,
                    prot,
                    born: m.born,
                    id: m.id,
                };
                if gpa > start {
                    d.maps.insert(start, piece(0, gpa - start, old));
                }
                d.maps.insert(gpa, piece(gpa - start, end - gpa, prot));
                if end < m_end {
                    d.maps.insert(end, piece(end - start, m_end - end, old));
                }
                // Pieces of one mapping with the same protection again
                // become one (so that a later promotion sees them whole).
                coalesce(&mut d.maps, gpa);
                Ok::<_, Error>(split)
            })
        };
        // The map sequence and the generation move whatever happened: the
        // leaves may be rewritten in part when an error stopped it.
        self.map_seq.fetch_add(1, Release);
        let split = *r.as_ref().unwrap_or(&true);
        self.bump_gen_and_invalidate(a, gpa, end - gpa, Cause::Remap, split, None);
        r.map(|_| ())
    }

    /// Promote the qualifying 2 MiB chunks of `[gpa, end)` (see
    /// [`VmSpace::promote`]), then the qualifying 1 GiB slots of
    /// `slots` (1 GiB aligned; see [`Inner::promote_slots`]); exclusive
    /// access. Returns how many 2 MiB and how many 1 GiB leaves it made.
    fn promote_range(&self, d: &mut Data<P>, gpa: u64, end: u64, slots: (u64, u64)) -> (u64, u64) {
        let n = self.promote_chunks(d, gpa, end);
        let n1 = self.promote_slots(d, slots.0, slots.1);
        if n + n1 > 0 {
            self.struct_seq.fetch_add(1, Release);
        }
        (n, n1)
    }

    /// The 1 GiB slots of `[lo, hi)` (aligned) that lie wholly inside one
    /// mapping whose object backs them with one 1 GiB run
    /// ([`VmObject::huge_run_at`], the rule by which `map` populates a
    /// slot for a 1 GiB leaf, see `huge.rs`) and whose 512 2 MiB leaves
    /// carry the mapping's whole protection become one 1 GiB leaf
    /// (nested-pt's `promote_1g`, which checks the leaves themselves).
    /// Nothing when 1 GiB leaves are off. Exclusive access; returns how
    /// many.
    fn promote_slots(&self, d: &mut Data<P>, lo: u64, hi: u64) -> u64 {
        if !self.huge || lo >= hi {
            return 0;
        }
        let Data { table, maps } = d;
        let mut n = 0;
        for (start, m) in maps.range(..hi) {
            let m_end = start + m.len;
            if m_end <= lo {
                continue;
            }
            let mut g = (*start).max(lo).next_multiple_of(crate::huge::G1);
            while g < hi && g + crate::huge::G1 <= m_end {
                if !crate::huge::slot_huge(table, g)
                    && m.object.huge_run_at(m.offset + (g - start)).is_some()
                    && table
                        .lookup(Gpa(g))
                        .is_some_and(|l| l.size == PageSize::Size2M && self.format.prot(l.value()).contains(m.prot))
                    && table.promote_1g(Gpa(g)).is_ok()
                {
                    n += 1;
                }
                g += crate::huge::G1;
            }
        }
        n
    }

    /// The 2 MiB part of [`Inner::promote_range`].
    fn promote_chunks(&self, d: &mut Data<P>, gpa: u64, end: u64) -> u64 {
        let Data { table, maps } = d;
        let mut n = 0;
        for (start, m) in maps.range(..end) {
            let m_end = start + m.len;
            if m_end <= gpa {
                continue;
            }
            let lo = (*start).max(gpa).next_multiple_of(M2);
            let hi = m_end.min(end) & !(M2 - 1);
            let mut c = lo;
            while c + M2 <= hi {
                // The leaves must carry the mapping's whole protection
                // (promote_2m checks that all 512 have the first one's):
                // a large leaf is only ever made with it, never
                // write-protected below it, which is what bounds the
                // lazy split's retries (see `VmClient::fault_split`).
                // Every path that maps or rewrites 4 KiB leaves gives
                // them the mapping's protection, so this refuses nothing
                // today; it keeps the bound from resting on that.
                if !chunk_large(table, c)
                    && m.object.run_at(m.offset + (c - start)).is_some()
                    && table.lookup(Gpa(c)).is_some_and(|l| self.format.prot(l.value()).contains(m.prot))
                    && table.promote_2m(Gpa(c)).is_ok()
                {
                    n += 1;
                }
                c += M2;
            }
        }
        n
    }

    /// The lazy split on a write: split the large leaf that covers `gpa`
    /// (if it is still there) with its mapping's protection, bump the
    /// generation and tell every client. Called by a client's data path
    /// with nothing held and the client inactive.
    pub(crate) fn split_for_write(&self, gpa: u64) -> Result<()> {
        if on_cpu::holds(self as *const Inner<P, L> as usize) {
            return Err(Error::SelfDeadlock);
        }
        self.exclusive(|a| {
            let c = gpa & !(M2 - 1);
            // SAFETY: lock held, clients held.
            let changed = unsafe {
                self.with_data_mut(|d| {
                    let Some((start, m)) = d.mapping_at(gpa) else { return Ok(false) };
                    if c < start || c + M2 > start + m.len {
                        return Ok(false);
                    }
                    let prot = m.prot;
                    self.split_chunk(&mut d.table, c, prot)
                })
            }?;
            if changed {
                self.map_seq.fetch_add(1, Release);
                self.bump_gen_and_invalidate(a, c, M2, Cause::Remap, false, None);
            }
            Ok(())
        })
    }

    /// Automatic promotion after a fault or hold filled the leaf table of
    /// the 2 MiB chunk at `c` (see [`SpaceConfig::auto_promote`]): an
    /// administrative change, called with nothing held and the client
    /// inactive. [`Error::SelfDeadlock`] from a thread in guest context on
    /// the same space (it would wait for itself); otherwise the number of
    /// leaves made (0 when the chunk no longer qualifies).
    pub(crate) fn promote_after_fault(&self, c: u64) -> Result<u64> {
        if on_cpu::holds(self as *const Inner<P, L> as usize) {
            return Err(Error::SelfDeadlock);
        }
        self.locked(|a| if a.destroyed { Ok(0) } else { Ok(self.auto_promote_locked(a, c, c + M2)) })
    }

    /// Promote the qualifying chunks of `[lo, hi)` (2 MiB aligned), as an
    /// automatic promotion: space lock held, no client held (this holds
    /// them all). Nothing while tracking is on. Returns how many.
    fn auto_promote_locked(&self, a: &Admin<L>, lo: u64, hi: u64) -> u64 {
        // Tracking only changes under the space lock, which is held.
        if !self.auto_promote || self.track_dirty.load(Acquire) || lo >= hi {
            return 0;
        }
        let held = HeldAll::new(a);
        // The 1 GiB slots holding the range: a chunk promoted now may be
        // the last of its slot.
        let slots = (lo & !(crate::huge::G1 - 1), (hi - 1) | (crate::huge::G1 - 1));
        let slots = (slots.0, slots.1.saturating_add(1));
        // SAFETY: lock held, clients held.
        let (n, n1) = unsafe { self.with_data_mut(|d| self.promote_range(d, lo, hi, slots)) };
        if n + n1 > 0 {
            self.map_seq.fetch_add(1, Release);
            self.promoted_auto.fetch_add(n, Relaxed);
            self.promoted_huge_auto.fetch_add(n1, Relaxed);
            let (lo, hi) = if n1 > 0 { slots } else { (lo, hi) };
            self.bump_gen_and_invalidate(held.0, lo, hi - lo, Cause::Remap, true, None);
        }
        n
    }

    pub(crate) fn bump_gen_and_invalidate(
        &self,
        a: &Admin<L>,
        gpa: u64,
        len: u64,
        cause: Cause<'_>,
        tables_freed: bool,
        cleared: Option<&[Pfn]>,
    ) {
        let generation = self.generation.fetch_add(1, AcqRel) + 1;
        let inv = Invalidation { gpa: Gpa(gpa), len, generation, cause, tables_freed, cleared };
        for c in a.clients.values() {
            c.invalidate(generation, &inv, &a.hooks);
        }
    }

    /// The unmap itself; space lock held, clients held.
    fn unmap_locked(&self, a: &Admin<L>, gpa: u64) -> Result<StdArc<VmObject>> {
        // SAFETY: lock held, clients held.
        let (object, offset, len, born) = unsafe {
            self.with_data(|d| {
                let m = d.maps.get(&gpa).ok_or(Error::NotFound)?;
                Ok::<_, Error>((m.object.clone(), m.offset, m.len, m.born))
            })
        }?;
        // Holds outstanding on the range get their own reference to the
        // object before any entry is cleared (seed 004's unmap preparation,
        // done per client rather than by walking a list of holds).
        let seq = self.unmap_seq.load(Relaxed) + 1;
        for c in a.clients.values() {
            c.retire(gpa, gpa + len, born, seq, &object);
        }
        self.unmap_seq.store(seq, Release);
        // SAFETY: lock held, clients held.
        let (cleared, freed_tables) = unsafe {
            self.with_data_mut(|d| {
                let before = d.table.table_pages();
                // One pass over the leaf entries: clear and vacate.
                let cleared = self.vacate_span(&mut d.table, gpa, gpa + len)?;
                d.maps.remove(&gpa);
                Ok::<_, Error>((cleared, d.table.table_pages() < before))
            })
        }?;
        self.map_seq.fetch_add(1, Release);
        self.resident.fetch_sub(cleared, Relaxed);
        // Tables were vacated before the invalidation: a vCPU that was in
        // guest context may have cached the freed table pages, and those
        // pages are not reused before the space lock is dropped.
        if cleared > 0 || freed_tables {
            self.bump_gen_and_invalidate(a, gpa, len, Cause::Unmap { object: &object, offset }, freed_tables, None);
        }
        Ok(object)
    }
}

/// A guest-physical address space (seed 004's `vmspace_t`).
///
/// Generic over the table-page provider `P` (table pages can live in a KVM
/// memory slot) and the lock `L` (a kernel supplies its own).
/// Administrative operations take `&self` and serialize on the space lock;
/// the data path goes through [`VmClient`]s.
pub struct VmSpace<P: TablePages, L: RawLock = DefaultLock> {
    pub(crate) inner: Arc<Inner<P, L>>,
}

/// Bytes a 2 MiB leaf (and a leaf table) covers.
pub(crate) const M2: u64 = 2 << 20;

/// Whether the 2 MiB chunk at `c` (inside a mapping) is counted for a
/// 2 MiB leaf: the walk ends at level 2, at a large leaf or an empty
/// entry (a chunk counted for 4 KiB leaves has its leaf table).
#[inline]
pub(crate) fn chunk_large<P: TablePages>(table: &NestedTable<P>, c: u64) -> bool {
    counted_for_leaf(table, c, 2)
}

/// Whether the aligned slot at `g` is counted for a leaf of `level` (2:
/// 2 MiB, 3: 1 GiB): the walk of `g` ends at that level, at a leaf or an
/// empty entry (a slot counted for smaller leaves has its next table,
/// which the mapping's populate created and keeps).
#[inline]
pub(crate) fn counted_for_leaf<P: TablePages>(table: &NestedTable<P>, g: u64, level: u8) -> bool {
    let fmt = table.format();
    let w = table.walk(Gpa(g));
    w.steps().last().is_some_and(|s| s.level == level && (!fmt.is_present(s.entry) || fmt.is_leaf(s.entry, level)))
}

/// Whether the 2 MiB chunk at `c` has a leaf table whose 512 entries are
/// all present (a scan of the table: only where there is reason to
/// believe it full).
pub(crate) fn chunk_full<P: TablePages>(table: &NestedTable<P>, c: u64) -> bool {
    let fmt = table.format();
    let w = table.walk(Gpa(c));
    let Some(step) = w.steps().last().filter(|s| s.level == 1) else { return false };
    (0..512u16).all(|i| {
        table.entry(&nested_pt::WalkStep { index: i, ..*step }).is_some_and(|e| fmt.is_present(e.load(Acquire)))
    })
}

/// `[gpa, end)` cut into spans of one leaf size: whole aligned 2 MiB
/// chunks for which `large` holds are `Size2M`, the rest `Size4K`;
/// neighbours of the same size merged.
pub(crate) fn spans(gpa: u64, end: u64, mut large: impl FnMut(u64) -> bool) -> Vec<(u64, u64, PageSize)> {
    let mut out: Vec<(u64, u64, PageSize)> = Vec::new();
    let mut a = gpa;
    while a < end {
        let b = ((a | (M2 - 1)) + 1).min(end);
        let size = if a.is_multiple_of(M2) && b - a == M2 && large(a) { PageSize::Size2M } else { PageSize::Size4K };
        match out.last_mut() {
            Some((_, hi, s)) if *hi == a && *s == size => *hi = b,
            _ => out.push((a, b, size)),
        }
        a = b;
    }
    out
}

fn check_aligned(gpa: u64, len: u64) -> Result<u64> {
    if len == 0 {
        return Err(Invalid::ZeroLength.into());
    }
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(Invalid::Unaligned.into());
    }
    gpa.checked_add(len).ok_or(Error::Invalid(Invalid::Overflow))
}

/// Whether a large leaf covers `gpa` or `end - 1` and sticks out of
/// `[gpa, end)` (nested-pt's harvest refuses such a range).
fn cuts_large<P: TablePages>(table: &NestedTable<P>, gpa: u64, end: u64) -> bool {
    end > gpa
        && [gpa, end - 1].into_iter().any(|a| {
            table
                .lookup(Gpa(a))
                .is_some_and(|l| l.size != PageSize::Size4K && (l.gpa.0 < gpa || l.gpa.0 + l.size.bytes() > end))
        })
}

/// Merge the mapping at `at` with the one that ends where it starts and
/// the one that starts where it ends, where they are pieces of one
/// mapping (same `map` call, contiguous offsets, same protection): two
/// mappings made apart stay apart, so that `unmap` of either still
/// matches it exactly.
fn coalesce(maps: &mut BTreeMap<u64, Mapping>, at: u64) {
    let same = |a: &Mapping, a_start: u64, b: &Mapping, b_start: u64| {
        a.id == b.id
            && StdArc::ptr_eq(&a.object, &b.object)
            && a.prot == b.prot
            && a.born == b.born
            && a_start + a.len == b_start
            && a.offset + a.len == b.offset
    };
    let mut at = at;
    // Left neighbour.
    if let Some((&l, lm)) = maps.range(..at).next_back()
        && let Some(m) = maps.get(&at)
        && same(lm, l, m, at)
    {
        let m = maps.remove(&at).expect("present");
        maps.get_mut(&l).expect("present").len += m.len;
        at = l;
    }
    // Right neighbour.
    let Some(m) = maps.get(&at) else { return };
    let next = at + m.len;
    if let Some(r) = maps.get(&next)
        && same(m, at, r, next)
    {
        let r = maps.remove(&next).expect("present");
        maps.get_mut(&at).expect("present").len += r.len;
    }
}

fn bit(bitmap: &[u64], i: u64) -> bool {
    bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Zero bits `0..n` of `bitmap` (which has room for them).
fn clear_bits(bitmap: &mut [u64], n: u64) {
    let full = (n / 64) as usize;
    bitmap[..full].fill(0);
    if !n.is_multiple_of(64) {
        bitmap[full] &= !((1u64 << (n % 64)) - 1);
    }
}

fn put_bit(bitmap: &mut [u64], i: u64, v: bool) {
    let w = &mut bitmap[(i / 64) as usize];
    if v {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

impl<P: TablePages + Send + Sync, L: RawLock> VmSpace<P, L> {
    /// A new, empty space whose table pages come from `pages`.
    pub fn new(config: SpaceConfig, pages: P) -> Result<Self> {
        if config.size == 0 || !config.size.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::BadSize.into());
        }
        if config.size > nested_pt::GPA_LIMIT {
            return Err(Invalid::BadSize.into());
        }
        if config.track_dirty && !config.format.can_track_dirty() {
            return Err(Error::Unsupported);
        }
        let table = NestedTable::new(config.format, pages).map_err(Error::Table)?;
        let root = table.root();
        let fa = config.fault_around.clamp(1, 512);
        let fault_around = 1u64 << (31 - fa.leading_zeros());
        // Marking dirty must not grant write access (emulated A/D: the
        // software dirty bit, not the hardware W bit).
        let dirty_bits = config.format.set_dirty_bits();
        Ok(VmSpace {
            inner: Arc::new(Inner {
                lock: L::new(),
                admin: Cell::new(Admin {
                    clients: BTreeMap::new(),
                    next_id: 0,
                    destroyed: false,
                    hooks: PanicSlot::default(),
                }),
                data: Cell::new(Data { table, maps: BTreeMap::new() }),
                size: config.size,
                format: config.format,
                root,
                dirty_bits,
                fault_around,
                fault_around_accessed: if config.fault_around_accessed && !records_access(&config.format) {
                    config.format.accessed_mask()
                } else {
                    0
                },
                fault_around_dirty: if config.fault_around_accessed
                    && config.fault_around_dirty_untracked
                    && !records_access(&config.format)
                {
                    config.format.dirty_mask()
                } else {
                    0
                },
                records_access: records_access(&config.format),
                generation: AtomicU64::new(1),
                map_seq: AtomicU64::new(0),
                unmap_seq: AtomicU64::new(0),
                resident: Padded(AtomicU64::new(0)),
                track_dirty: AtomicBool::new(config.track_dirty),
                large: config.large_leaves && config.format.supports(PageSize::Size2M),
                huge: config.huge_leaves
                    && config.large_leaves
                    && config.format.supports(PageSize::Size2M)
                    && config.format.supports(PageSize::Size1G),
                lazy_split: AtomicBool::new(config.split == SplitPolicy::Lazy),
                auto_promote: config.auto_promote && config.large_leaves && config.format.supports(PageSize::Size2M),
                promoted_explicit: AtomicU64::new(0),
                promoted_auto: AtomicU64::new(0),
                promoted_huge_explicit: AtomicU64::new(0),
                promoted_huge_auto: AtomicU64::new(0),
                struct_seq: AtomicU64::new(0),
                struct_lock: L::new(),
            }),
        })
    }

    /// Size of the space in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The table's entry format.
    pub fn format(&self) -> &PteFormat {
        &self.inner.format
    }

    /// A new client (one per vCPU, device, or host view).
    pub fn client(&self) -> VmClient<P, L> {
        VmClient::new(self.inner.clone())
    }

    /// Refuse a change that waits for vCPUs when the calling thread is
    /// itself in guest context on a client of this space.
    pub(crate) fn check_not_on_cpu(&self) -> Result<()> {
        if on_cpu::holds(&*self.inner as *const Inner<P, L> as usize) {
            return Err(Error::SelfDeadlock);
        }
        Ok(())
    }

    /// Map `len` bytes of `object` from byte `offset` at `gpa` with `prot`.
    ///
    /// Refused with [`Error::Invalid`] for a zero length, unaligned
    /// values, overflow, a range beyond the object, a protection the
    /// format cannot express, or an object range with a frame the format
    /// cannot address ([`Invalid::FrameOutOfRange`]: at or above
    /// [`PteFormat::frame_limit`], so no later fault, populate or dirty
    /// operation meets such a frame half way); with [`Error::NoSpace`] when the range ends
    /// at or beyond the space's size or overlaps another mapping. Tables
    /// are populated for the range; no leaf is written (pages appear on
    /// fault, hold or [`VmSpace::populate`]).
    pub fn map(&self, object: &StdArc<VmObject>, offset: u64, gpa: Gpa, len: u64, prot: Prot) -> Result<()> {
        let gpa = gpa.0;
        let end = check_aligned(gpa, len)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        let obj_end = offset.checked_add(len).ok_or(Error::Invalid(Invalid::Overflow))?;
        if obj_end > object.size() {
            return Err(Invalid::OutsideObject.into());
        }
        self.inner.format.check_prot(prot).map_err(|_| Error::Invalid(Invalid::BadProt))?;
        if !object.frames_below(offset, len, self.inner.format.frame_limit()) {
            return Err(Invalid::FrameOutOfRange.into());
        }
        if end >= self.inner.size {
            return Err(NoSpace::BeyondEnd.into());
        }
        let inner = &*self.inner;
        inner.exclusive(|_| {
            // SAFETY: lock held, clients held.
            unsafe {
                inner.with_data_mut(|d| {
                    if let Some((s, m)) = d.maps.range(..end).next_back()
                        && s + m.len > gpa
                    {
                        return Err(Error::NoSpace(NoSpace::Overlap));
                    }
                    // Whole aligned 2 MiB chunks that one run backs are
                    // populated for a 2 MiB leaf (not while tracking: a
                    // harvest needs 4 KiB leaves), the rest for 4 KiB.
                    let large = inner.large && !inner.track_dirty.load(Acquire);
                    let huge = inner.huge && large;
                    let plan = crate::huge::plan(
                        gpa,
                        end,
                        |g| huge && object.huge_run_at(offset + (g - gpa)).is_some(),
                        |c| large && object.run_at(offset + (c - gpa)).is_some(),
                    );
                    for (i, &(lo, hi, size)) in plan.iter().enumerate() {
                        if let Err(e) = d.table.populate_region(Gpa(lo), hi - lo, size) {
                            for &(lo, hi, size) in &plan[..i] {
                                let _ = d.table.vacate_region(Gpa(lo), hi - lo, size);
                            }
                            return Err(Error::Table(e));
                        }
                    }
                    d.maps.insert(
                        gpa,
                        Mapping {
                            object: object.clone(),
                            offset,
                            len,
                            prot,
                            born: inner.unmap_seq.load(Relaxed),
                            id: inner.map_seq.load(Relaxed),
                        },
                    );
                    Ok::<_, Error>(())
                })
            }?;
            inner.map_seq.fetch_add(1, Release);
            Ok(())
        })
    }

    /// Unmap the mapping that starts at `gpa` and is `len` bytes long.
    ///
    /// Clears and vacates its tables, bumps the generation if any page was
    /// present (or a table page was freed), tells every client (kicking
    /// vCPUs still in guest context with an older generation and waiting
    /// until they leave). Holds on the range keep the object alive; their
    /// release reports the unmap. [`Error::NotFound`] unless one mapping
    /// matches exactly.
    pub fn unmap(&self, gpa: Gpa, len: u64) -> Result<()> {
        let gpa = gpa.0;
        check_aligned(gpa, len)?;
        self.check_not_on_cpu()?;
        let inner = &*self.inner;
        let object = inner.exclusive(|a| {
            // SAFETY: lock held, clients held.
            let exact = unsafe { inner.with_data(|d| d.maps.get(&gpa).is_some_and(|m| m.len == len)) };
            if !exact {
                return Err(Error::NotFound);
            }
            inner.unmap_locked(a, gpa)
        })?;
        // The mapping's reference is dropped here, outside every lock.
        drop(object);
        Ok(())
    }

    /// Unmap `[gpa, gpa+len)`, which must lie inside one mapping (all of
    /// it, or any part: the mapping is cut, and what is left of it on
    /// either side stays mapped as before, same object offsets and
    /// protection). A large leaf the range cuts is split first (its pages
    /// outside the range keep their translations, with no not-present
    /// window). Then as [`VmSpace::unmap`] for the range: its leaves are
    /// cleared and its tables vacated, holds on its pages keep the object
    /// and report the unmap on release (holds elsewhere on the mapping
    /// are unaffected), the generation is bumped and every client told
    /// ([`Cause::Unmap`] with the range's object offset;
    /// `tables_freed` also when a split rewrote a table entry).
    /// [`Error::NotFound`] unless one mapping contains the range.
    pub fn unmap_range(&self, gpa: Gpa, len: u64) -> Result<()> {
        let gpa = gpa.0;
        let end = check_aligned(gpa, len)?;
        self.check_not_on_cpu()?;
        let inner = &*self.inner;
        let object = inner.exclusive(|a| {
            // SAFETY: lock held, clients held.
            let start = unsafe {
                inner.with_data(|d| match d.mapping_at(gpa) {
                    Some((s, m)) if end - s <= m.len => Ok(s),
                    _ => Err(Error::NotFound),
                })
            }?;
            inner.unmap_part_locked(a, start, gpa, end)
        })?;
        drop(object);
        Ok(())
    }

    /// Change the protection of `[gpa, gpa+len)`, which must lie inside
    /// one mapping, to `prot` (FreeBSD's `pmap_protect`, seed 004's
    /// missing `vmspace_protect`): the mapping is cut where the range
    /// ends inside it, a large leaf the range cuts is split first, and
    /// every present leaf of the range is rewritten with the new
    /// protection, keeping its frame, memory type and accessed/dirty
    /// state (a dirty page stays dirty for the next harvest). With every
    /// client held; the generation is bumped and every client told
    /// ([`Cause::Remap`]), kicking vCPUs in guest context, so no vCPU uses
    /// a right the change removed once it returns. While dirty tracking
    /// is on, large leaves of the range are split first (only 4 KiB
    /// leaves are writable then).
    ///
    /// Refused, with nothing changed: [`Error::Invalid`] for a zero
    /// length, unaligned values or a protection the format cannot
    /// express; [`Error::NotFound`] unless one mapping contains the
    /// range; [`Error::Held`] when the change removes a right and a page
    /// hold of any client is outstanding on the range (the holder reaches
    /// the page through the host, which the table cannot stop; release
    /// the holds first).
    pub fn protect(&self, gpa: Gpa, len: u64, prot: Prot) -> Result<()> {
        let gpa = gpa.0;
        let end = check_aligned(gpa, len)?;
        self.inner.format.check_prot(prot).map_err(|_| Error::Invalid(Invalid::BadProt))?;
        self.check_not_on_cpu()?;
        let inner = &*self.inner;
        inner.exclusive(|a| {
            // SAFETY: lock held, clients held.
            let (start, old) = unsafe {
                inner.with_data(|d| match d.mapping_at(gpa) {
                    Some((s, m)) if end - s <= m.len => Ok((s, m.prot)),
                    _ => Err(Error::NotFound),
                })
            }?;
            if !prot.contains(old) && a.clients.values().any(|c| c.has_holds(gpa, end)) {
                return Err(Error::Held);
            }
            inner.protect_locked(a, start, gpa, end, prot)
        })
    }

    /// Promote every aligned 2 MiB range inside `[gpa, gpa+len)` whose
    /// 512 leaves are present, with one protection, and map one aligned
    /// run of their mapping's object, to one 2 MiB leaf (FreeBSD's
    /// `pmap_promote_pde`; what a khugepaged-like pass of the VMM calls,
    /// e.g. after a migration switched tracking off). The leaf table is
    /// freed; the large leaf is accessed if any small one was and dirty if
    /// any was (tracking is off, and switching it on splits or
    /// write-protects the leaf again, so no harvest misses a write).
    /// `resident_count` does not change (a 2 MiB leaf counts 512 pages).
    /// With every client held; when anything was promoted, the generation
    /// is bumped and every client told ([`Cause::Remap`],
    /// `tables_freed`), kicking vCPUs in guest context, before the freed
    /// leaf tables can be reused. Ranges that do not qualify (a hole,
    /// mixed protections, frames of no single run, a mapping boundary
    /// inside) are left as they are. Then every 1 GiB slot wholly inside
    /// the range whose 512 chunks are now 2 MiB leaves of the mapping's
    /// 1 GiB run ([`VmObject::huge_run_at`], [`SpaceConfig::huge_leaves`])
    /// with its protection becomes one 1 GiB leaf, the level-2 table freed
    /// likewise ([`VmSpace::promotions_1g`] counts them). Returns the
    /// number of 2 MiB leaves made.
    ///
    /// [`VmObject::huge_run_at`]: crate::VmObject::huge_run_at
    ///
    /// [`Error::TrackingOn`] while dirty tracking is on;
    /// [`Error::Unsupported`] when large leaves are off
    /// ([`SpaceConfig::large_leaves`], or the format has none);
    /// [`Error::Invalid`] for unaligned values or a zero length.
    pub fn promote(&self, gpa: Gpa, len: u64) -> Result<u64> {
        let gpa = gpa.0;
        let end = check_aligned(gpa, len)?;
        self.check_not_on_cpu()?;
        let inner = &*self.inner;
        if !inner.large {
            return Err(Error::Unsupported);
        }
        inner.exclusive(|a| {
            if inner.track_dirty.load(Acquire) {
                return Err(Error::TrackingOn);
            }
            // The 1 GiB slots wholly inside the range.
            let slots = (gpa.next_multiple_of(crate::huge::G1), end & !(crate::huge::G1 - 1));
            // SAFETY: lock held, clients held.
            let (n, n1) = unsafe { inner.with_data_mut(|d| inner.promote_range(d, gpa, end, slots)) };
            if n + n1 > 0 {
                inner.map_seq.fetch_add(1, Release);
                inner.promoted_explicit.fetch_add(n, Relaxed);
                inner.promoted_huge_explicit.fetch_add(n1, Relaxed);
                inner.bump_gen_and_invalidate(a, gpa, len, Cause::Remap, true, None);
            }
            Ok(n)
        })
    }

    /// Make `[gpa, gpa+len)`, which must lie inside one mapping, resident
    /// in the table. Returns the number of pages this call mapped. On
    /// error nothing changed (no leaf was written); `resident_count`
    /// always counts exactly the leaves present. A 2 MiB range whose leaf
    /// table this call filled is then promoted where it qualifies
    /// ([`SpaceConfig::auto_promote`]; every client held for it), except
    /// from a thread in guest context on the space.
    pub fn populate(&self, gpa: Gpa, len: u64) -> Result<u64> {
        let gpa = gpa.0;
        check_aligned(gpa, len)?;
        let inner = &*self.inner;
        inner.locked(|a| {
            if a.destroyed {
                return Err(Error::Orphaned);
            }
            let end = gpa + len;
            // SAFETY: lock held; entry changes are atomic and clients may
            // run concurrently (they only read the table and CAS leaves).
            let (n, full) = unsafe {
                inner.with_data(|d| {
                    let (start, m) = d.mapping_at(gpa).ok_or(Error::NotFound)?;
                    if end > start + m.len {
                        return Err(Error::NotFound);
                    }
                    let n = inner.map_span(&d.table, start, m, gpa, end)?;
                    // The chunks this call touched whose leaf tables are
                    // now full (and so may promote); [lo, hi) spans them.
                    let mut full: Option<(u64, u64)> = None;
                    if n > 0 && inner.auto_promote && !inner.track_dirty.load(Acquire) {
                        let mut c = (gpa & !(M2 - 1)).max(start.next_multiple_of(M2));
                        while c < end && c + M2 <= start + m.len {
                            if m.object.run_at(m.offset + (c - start)).is_some() && chunk_full(&d.table, c) {
                                full = Some(full.map_or((c, c + M2), |(lo, _)| (lo, c + M2)));
                            }
                            c += M2;
                        }
                    }
                    Ok((n, full))
                })
            }?;
            // Promotion waits for vCPUs in guest context: not from one.
            if let Some((lo, hi)) = full
                && !on_cpu::holds(inner as *const Inner<P, L> as usize)
            {
                inner.auto_promote_locked(a, lo, hi);
            }
            Ok(n)
        })
    }

    /// The 2 MiB leaves made by promotion so far: by [`VmSpace::promote`]
    /// and automatically ([`SpaceConfig::auto_promote`]).
    pub fn promotions(&self) -> PromotionStats {
        PromotionStats {
            explicit: self.inner.promoted_explicit.load(Relaxed),
            automatic: self.inner.promoted_auto.load(Relaxed),
        }
    }

    /// The 1 GiB leaves made by promotion so far (counted as
    /// [`VmSpace::promotions`] counts 2 MiB ones): a 1 GiB slot whose 512
    /// 2 MiB leaves map its mapping's 1 GiB run
    /// ([`SpaceConfig::huge_leaves`]), by [`VmSpace::promote`] or after an
    /// automatic 2 MiB promotion completed the slot.
    pub fn promotions_1g(&self) -> PromotionStats {
        PromotionStats {
            explicit: self.inner.promoted_huge_explicit.load(Relaxed),
            automatic: self.inner.promoted_huge_auto.load(Relaxed),
        }
    }

    /// Pages present in the table.
    pub fn resident_count(&self) -> u64 {
        self.inner.resident.load(Relaxed)
    }

    /// The root pointer hardware is given (EPTP with the A/D bit when
    /// tracking, or nCR3).
    pub fn table_root(&self) -> u64 {
        self.inner.format.root_pointer(self.inner.root, self.inner.track_dirty.load(Acquire))
    }

    /// The root table's frame (fixed for the life of the space).
    pub fn table_root_pfn(&self) -> Pfn {
        self.inner.root
    }

    /// The table generation: bumped by every change after which a vCPU
    /// must flush translations it cached (TLB, paging-structure caches).
    pub fn table_gen(&self) -> u64 {
        self.inner.generation.load(Acquire)
    }

    /// Run `f` on a read-only view of the nested table with the space lock
    /// held (no map or unmap runs meanwhile): for software walks and
    /// inspection. Clients may change entries concurrently. The view
    /// cannot change entries: every leaf stays inside a mapping and
    /// `resident_count` exact.
    pub fn with_table<R>(&self, f: impl FnOnce(&TableView<'_, P>) -> R) -> R {
        // SAFETY: lock held.
        self.inner.locked(|_| unsafe { self.inner.with_data(|d| f(&TableView::new(&d.table))) })
    }

    /// Run `f` on the nested table itself, with the space lock held: for
    /// benchmarks and tests that must set accessed/dirty bits the way
    /// hardware does (`NestedTable`'s `&self` methods change entries).
    ///
    /// # Safety
    /// `f` may only set or clear accessed and dirty bits of present leaves
    /// (as a vCPU's hardware walk or a harvest would); it must not map,
    /// unmap or otherwise change any entry, or the space's invariants
    /// (every leaf inside a mapping, an exact `resident_count`) break.
    pub unsafe fn with_table_raw<R>(&self, f: impl FnOnce(&NestedTable<P>) -> R) -> R {
        // SAFETY: lock held.
        self.inner.locked(|_| unsafe { self.inner.with_data(|d| f(&d.table)) })
    }

    /// Frame and protection of the page at `gpa` if it is present in the
    /// table.
    pub fn lookup(&self, gpa: Gpa) -> Option<(Pfn, Prot)> {
        let gpa = gpa.0;
        self.with_table(|t| t.is_mapped(Gpa(gpa)))
    }

    /// The mapping containing `gpa`.
    pub fn mapping_at(&self, gpa: Gpa) -> Option<MappingInfo> {
        let gpa = gpa.0;
        // SAFETY: lock held.
        self.inner.locked(|_| unsafe {
            self.inner.with_data(|d| {
                d.mapping_at(gpa).map(|(s, m)| MappingInfo {
                    gpa: Gpa(s),
                    len: m.len,
                    object: m.object.clone(),
                    offset: m.offset,
                    prot: m.prot,
                })
            })
        })
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> alloc::vec::Vec<MappingInfo> {
        // SAFETY: lock held.
        self.inner.locked(|_| unsafe {
            self.inner.with_data(|d| {
                d.maps
                    .iter()
                    .map(|(s, m)| MappingInfo {
                        gpa: Gpa(*s),
                        len: m.len,
                        object: m.object.clone(),
                        offset: m.offset,
                        prot: m.prot,
                    })
                    .collect()
            })
        })
    }

    /// Whether dirty tracking is on.
    ///
    /// While tracking is off, writes may still leave pages dirty in the
    /// table: hardware A/D formats set the dirty bit on every write, and
    /// with emulated A/D ([`PteFormat::ept_emulated_ad`]) a vCPU's write
    /// fault grants the hardware W bit, which that format reads as dirty
    /// (it is the only way to let the guest write). Holds never do: their
    /// release marks a page dirty only while tracking is on. So the first
    /// harvest after tracking is switched on may report pages written
    /// while it was off (a superset, never a miss).
    pub fn dirty_tracking(&self) -> bool {
        self.inner.track_dirty.load(Acquire)
    }

    /// Choose how the next switch of dirty tracking to on treats large
    /// leaves (see [`SplitPolicy`]; initially [`SpaceConfig::split`]).
    pub fn set_split_policy(&self, split: SplitPolicy) {
        self.inner.lazy_split.store(split == SplitPolicy::Lazy, Relaxed);
    }

    /// Switch dirty tracking on or off. Refused with
    /// [`Error::Unsupported`] where the format cannot track dirty bits.
    /// Invalidates the whole space (the root pointer may change).
    pub fn set_dirty_tracking(&self, on: bool) -> Result<()> {
        if on && !self.inner.format.can_track_dirty() {
            return Err(Error::Unsupported);
        }
        self.check_not_on_cpu()?;
        let inner = &*self.inner;
        inner.exclusive(|a| {
            if on && !inner.track_dirty.load(Acquire) {
                // Large leaves go first (see `SplitPolicy`); chunks
                // counted for a 2 MiB leaf and still empty get leaf
                // tables, so that faults map 4 KiB leaves from now on.
                // SAFETY: lock held, clients held.
                let (changed, r) = unsafe {
                    inner.with_data_mut(|d| inner.split_range(d, 0, inner.size, inner.lazy_split.load(Relaxed)))
                };
                if changed {
                    inner.map_seq.fetch_add(1, Release);
                }
                if let Err(e) = r {
                    // Tracking stays off; what was split keeps its
                    // translations, but vCPUs must see the new tables.
                    if changed {
                        inner.bump_gen_and_invalidate(a, 0, inner.size, Cause::Remap, false, None);
                    }
                    return Err(e);
                }
            }
            if !on && inner.track_dirty.load(Acquire) {
                // The large leaves the lazy split write-protected and no
                // write split get their mapping's protection back.
                // SAFETY: lock held, clients held.
                if unsafe { inner.with_data_mut(|d| inner.unprotect_large(d)) } > 0 {
                    inner.map_seq.fetch_add(1, Release);
                }
            }
            inner.track_dirty.store(on, Release);
            inner.bump_gen_and_invalidate(a, 0, inner.size, Cause::Tracking, false, None);
            Ok(())
        })
    }

    fn check_dirty_args(&self, gpa: u64, len: u64, bitmaps: [Option<usize>; 2]) -> Result<()> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        if len == 0 {
            return Err(Invalid::ZeroLength.into());
        }
        gpa.checked_add(len).ok_or(Error::Overflow)?;
        let pages = len / PAGE_SIZE;
        for b in bitmaps.into_iter().flatten() {
            if (b as u64).saturating_mul(64) < pages {
                return Err(Invalid::BitmapTooSmall.into());
            }
        }
        if !self.dirty_tracking() {
            return Err(Error::NotPermitted);
        }
        Ok(())
    }

    /// Read-and-clear the dirty bits of `[gpa, gpa+len)` into `bitmap`
    /// (bit `i` of the bitmap, least significant first in each word, is
    /// page `gpa + i * 4096`; pages without a leaf read 0; the range's bits
    /// are overwritten). Returns the number of dirty pages. When it
    /// cleared any bit, it then bumps the generation and invalidates
    /// clients (kicking vCPUs in guest context on an older generation and
    /// waiting until they leave), so vCPUs drop translations whose dirty
    /// bit was cleared before it returns; a harvest that found nothing
    /// dirty changes nothing and invalidates nothing. Clients are never
    /// held: holds and faults of every client proceed while it runs.
    ///
    /// [`Error::Invalid`] for unaligned values, a zero length or a short
    /// bitmap; [`Error::Overflow`] when `gpa + len` overflows;
    /// [`Error::NotPermitted`] when tracking is off.
    ///
    /// # Harvesting while vCPUs run
    ///
    /// The harvest is exact only for vCPUs that are out of guest context.
    /// A vCPU in guest context may have cached a writable translation
    /// whose dirty bit was set (hardware sets the bit once, when it caches
    /// the translation for a write): between the clearing of the bit and
    /// that vCPU leaving guest context (the invalidation kicks it and
    /// waits), it can go on writing the page without setting the bit
    /// again, and those writes are reported by no harvest. This holds on
    /// NPT/EPT hardware as on a shadow-paging host. For an exact harvest
    /// (the final pass of a migration), stop the vCPUs first; a harvest
    /// while they run is good for the iterative passes, whose misses the
    /// final pass catches.
    pub fn track_dirty(&self, gpa: Gpa, len: u64, bitmap: &mut [u64]) -> Result<u64> {
        let gpa = gpa.0;
        self.dirty_op(DirtyOp::Reset, Gpa(gpa), len, None, bitmap)
    }

    /// As [`VmSpace::track_dirty`], and append to `frames` the frame of
    /// each page whose dirty bit it cleared, in address order (the frames
    /// of the pages whose output bit is set). Invalidation callbacks get
    /// the same list in [`Invalidation::cleared`]. For a host that mirrors
    /// the table: it drops exactly those frames' translations, without
    /// looking each dirty page up again.
    pub fn track_dirty_frames(&self, gpa: Gpa, len: u64, bitmap: &mut [u64], frames: &mut Vec<Pfn>) -> Result<u64> {
        let gpa = gpa.0;
        self.dirty_op_frames(DirtyOp::Reset, Gpa(gpa), len, None, bitmap, frames)
    }

    /// A dirty-bitmap operation on `[gpa, gpa+len)`: see [`DirtyOp`].
    ///
    /// With `select`, only pages whose bit is set there are looked at.
    /// With or without it, the output bits of the whole range are written
    /// (bits `0 .. len / 4096`; later bits of `bitmap` are left alone): an
    /// unselected page reports 0, as does a page without a leaf. The
    /// output bit of a selected page is its dirty state before the
    /// operation (`Get`, `Reset`) or whether it is now marked (`Set`); a
    /// page without a leaf reports 0 (for `Set`: without a writable
    /// mapping). Returns the number of output bits set. Validation as in
    /// [`VmSpace::track_dirty`].
    ///
    /// Only what cleared bits require is invalidated: `Reset` bumps the
    /// generation and invalidates clients when it cleared a bit (not when
    /// it found none); `Get` (which changes nothing) and `Set` (which only
    /// adds leaves and sets bits: no cached translation contradicts that)
    /// never do. No dirty operation holds clients: the data path runs on
    /// during the scan and the invalidation.
    pub fn dirty_op(&self, op: DirtyOp, gpa: Gpa, len: u64, select: Option<&[u64]>, bitmap: &mut [u64]) -> Result<u64> {
        let gpa = gpa.0;
        self.dirty_op_inner(op, gpa, len, select, bitmap, None)
    }

    /// As [`VmSpace::dirty_op`]; for [`DirtyOp::Reset`] also append to
    /// `frames` the frame of each page whose dirty bit it cleared, in
    /// address order, and pass that list to invalidation callbacks
    /// ([`Invalidation::cleared`]). For `Get` and `Set` nothing is
    /// appended (no bit is cleared) and callbacks get `None`.
    pub fn dirty_op_frames(
        &self,
        op: DirtyOp,
        gpa: Gpa,
        len: u64,
        select: Option<&[u64]>,
        bitmap: &mut [u64],
        frames: &mut Vec<Pfn>,
    ) -> Result<u64> {
        let gpa = gpa.0;
        self.dirty_op_inner(op, gpa, len, select, bitmap, Some(frames))
    }

    fn dirty_op_inner(
        &self,
        op: DirtyOp,
        gpa: u64,
        len: u64,
        select: Option<&[u64]>,
        bitmap: &mut [u64],
        mut frames: Option<&mut Vec<Pfn>>,
    ) -> Result<u64> {
        self.check_dirty_args(gpa, len, [Some(bitmap.len()), select.map(|s| s.len())])?;
        self.check_not_on_cpu()?;
        if op != DirtyOp::Reset {
            frames = None;
        }
        let inner = &*self.inner;
        if op == DirtyOp::Set {
            // Set marks 4 KiB pages: large leaves of the range (only
            // write-protected ones of the lazy split exist while tracking
            // is on) are split first, with every client held.
            self.split_span(gpa, len)?;
        }
        // Entries beyond the 48-bit space do not exist: clip, reporting 0.
        let clipped = len.min(nested_pt::GPA_LIMIT.saturating_sub(gpa));
        let first_frame = frames.as_ref().map_or(0, |f| f.len());
        inner.locked(|a| {
            if a.destroyed {
                return Err(Error::Orphaned);
            }
            // SAFETY: lock held; only shared access is needed (entry
            // changes are atomic), so clients keep running during the scan.
            let n = unsafe {
                inner.with_data(|d| match (op, select) {
                    (DirtyOp::Reset, sel) if frames.is_some() => {
                        // The leaf iterator, which sees each entry (and so
                        // its frame) as it clears the bit.
                        let f = frames.as_deref_mut();
                        Ok(self.scan_leaves(d, gpa, len, sel, bitmap, true, f))
                    }
                    (DirtyOp::Get | DirtyOp::Reset, None) if cuts_large(&d.table, gpa, gpa + clipped) => {
                        // A large leaf sticks out of the range: the leaf
                        // iterator reports its pages inside, and clears
                        // nothing it cannot clear whole.
                        Ok(self.scan_leaves(d, gpa, len, None, bitmap, op == DirtyOp::Reset, None))
                    }
                    (DirtyOp::Get | DirtyOp::Reset, None) => {
                        if clipped == 0 {
                            for p in 0..len / PAGE_SIZE {
                                put_bit(bitmap, p, false);
                            }
                            return Ok(0);
                        }
                        // Bits of pages past the 48-bit space read 0.
                        for p in clipped / PAGE_SIZE..len / PAGE_SIZE {
                            put_bit(bitmap, p, false);
                        }
                        d.table.scan_dirty(Gpa(gpa), clipped, bitmap, op == DirtyOp::Reset).map_err(Error::Table)
                    }
                    (DirtyOp::Get | DirtyOp::Reset, Some(sel)) => {
                        Ok(self.scan_leaves(d, gpa, len, Some(sel), bitmap, op == DirtyOp::Reset, None))
                    }
                    (DirtyOp::Set, sel) => Ok(self.set_dirty(d, gpa, len, sel, bitmap)),
                })
            }?;
            // Swappable objects keep the dirty state of swapped-out pages
            // beside the table (see `swap.rs`): merged in, counted once.
            // SAFETY: lock held; shared access.
            let swapped = unsafe { inner.with_data(|d| crate::swap::merge_dirty(d, op, gpa, len, select, bitmap)) };
            // Only cleared bits need an invalidation: `Get` changes
            // nothing, and `Set` only adds leaves and sets bits, which a
            // cached translation cannot contradict (a vCPU that cached a
            // clean translation sets the bit on its next write, finding it
            // set). A `Reset` that cleared bits must make the clear
            // effective before it returns: a vCPU may hold a cached
            // writable translation of a page whose bit it cleared, and
            // would keep writing through it without setting the bit again.
            // The generation bump makes vCPUs flush before they next enter;
            // those in guest context on an older generation are kicked and
            // waited for; callbacks drop what a host mirrors (the cleared
            // frames when collected). No client is held: the table and the
            // mapping map do not change, so holds and faults of every
            // client run on meanwhile (a release that sets a bit again
            // after the scan is reported by the next harvest).
            if op == DirtyOp::Reset && n > 0 {
                let cleared = frames.as_deref().map(|f| &f[first_frame..]);
                inner.bump_gen_and_invalidate(a, gpa, len, Cause::Dirty, false, cleared);
            }
            Ok(n + swapped)
        })
    }

    /// Writes 0 for every page of `[gpa, gpa+len)` into `out`, then calls `f(page index, entry)` for each
    /// selected 4 KiB leaf entry in the range, visiting each leaf table once.
    /// Shared by the dirty operations that honour a selection bitmap.
    fn for_each_selected(
        d: &Data<P>,
        gpa: u64,
        len: u64,
        sel: Option<&[u64]>,
        out: &mut [u64],
        mut f: impl FnMut(&mut [u64], u64, &core::sync::atomic::AtomicU64),
    ) {
        // One rule with and without a selection: every output bit of the
        // range is written (unselected pages and pages without a leaf
        // report 0; `f` sets the bits it reports); bits past the range
        // are left alone.
        clear_bits(out, len / PAGE_SIZE);
        d.table.for_each_leaf_table(Gpa(gpa), len, |base, entries, size| {
            // Only 4 KiB leaves are ever mapped by this crate.
            if size != PageSize::Size4K {
                return;
            }
            let first = (base.0 - gpa) / PAGE_SIZE;
            for (i, e) in entries.iter().enumerate() {
                let p = first + i as u64;
                if sel.is_none_or(|s| bit(s, p)) {
                    f(out, p, e);
                }
            }
        });
    }

    /// Get/Reset through the leaf iterator, one leaf table at a time: of
    /// the selected pages (every page without `sel`), appending the frame
    /// of each page whose bit it clears to `frames`. A large leaf reports
    /// its pages inside the range when dirty, and is cleared only when it
    /// lies wholly inside the range with every page selected (its one
    /// dirty bit stands for all its pages; left set, the next harvest
    /// reports them again: a superset, never a miss).
    #[allow(clippy::too_many_arguments)]
    fn scan_leaves(
        &self,
        d: &Data<P>,
        gpa: u64,
        len: u64,
        sel: Option<&[u64]>,
        out: &mut [u64],
        clear: bool,
        mut frames: Option<&mut Vec<Pfn>>,
    ) -> u64 {
        let fmt = &self.inner.format;
        let dmask = fmt.dirty_mask();
        let end = gpa.saturating_add(len);
        let mut count = 0;
        clear_bits(out, len / PAGE_SIZE);
        let selected = |p: u64| sel.is_none_or(|s| bit(s, p));
        d.table.for_each_leaf_table(Gpa(gpa), len, |base, entries, size| {
            if size != PageSize::Size4K {
                let e = &entries[0];
                let v = e.load(Relaxed);
                if v & dmask == 0 || !fmt.is_present(v) {
                    return;
                }
                let (lo, hi) = (base.0.max(gpa), (base.0 + size.bytes()).min(end));
                let pages = (lo - gpa) / PAGE_SIZE..(hi - gpa) / PAGE_SIZE;
                let whole = lo == base.0 && hi == base.0 + size.bytes() && pages.clone().all(selected);
                let cleared = clear && whole && {
                    e.fetch_and(!dmask, AcqRel);
                    true
                };
                let first = fmt.frame_at_level(v, size.level());
                for p in pages {
                    if selected(p) {
                        put_bit(out, p, true);
                        count += 1;
                        if cleared && let Some(f) = frames.as_deref_mut() {
                            f.push(Pfn(first.0 + (gpa + p * PAGE_SIZE - base.0) / PAGE_SIZE));
                        }
                    }
                }
                return;
            }
            let first = (base.0 - gpa) / PAGE_SIZE;
            for (i, e) in entries.iter().enumerate() {
                let p = first + i as u64;
                if !selected(p) {
                    continue;
                }
                let v = e.load(Relaxed);
                if v & dmask == 0 {
                    continue;
                }
                if clear {
                    // Harvests are serialized (space lock): nobody else
                    // clears the bit, so the entry still has it here.
                    let v = e.fetch_and(!dmask, AcqRel);
                    if let Some(f) = frames.as_deref_mut()
                        && fmt.is_present(v)
                    {
                        f.push(fmt.frame(v));
                    }
                }
                put_bit(out, p, true);
                count += 1;
            }
        });
        count
    }

    /// Split the large leaves (and give empty 2 MiB-counted chunks leaf
    /// tables) in `[gpa, gpa+len)`, with every client held, when there are
    /// any; bumps the generation and tells every client when it split
    /// something ([`Cause::Remap`]).
    fn split_span(&self, gpa: u64, len: u64) -> Result<()> {
        let inner = &*self.inner;
        let end = gpa.saturating_add(len).min(inner.size);
        if gpa >= end {
            return Ok(());
        }
        // SAFETY: lock held (shared access).
        let any = inner.locked(|_| unsafe {
            inner.with_data(|d| {
                d.maps.range(..end).rev().take_while(|(s, m)| *s + m.len > gpa).any(|(s, m)| {
                    let mut c = (*s).max(gpa) & !(M2 - 1);
                    let m_end = s + m.len;
                    while c < m_end.min(end) {
                        let huge = inner.huge && crate::huge::slot_huge(&d.table, c & !(crate::huge::G1 - 1));
                        if c >= *s && c + M2 <= m_end && (chunk_large(&d.table, c) || huge) {
                            return true;
                        }
                        c += M2;
                    }
                    false
                })
            })
        });
        if !any {
            return Ok(());
        }
        inner.exclusive(|a| {
            // SAFETY: lock held, clients held.
            let (changed, r) = unsafe { inner.with_data_mut(|d| inner.split_range(d, gpa, end, false)) };
            if changed {
                inner.map_seq.fetch_add(1, Release);
                inner.bump_gen_and_invalidate(a, gpa, end - gpa, Cause::Remap, false, None);
            }
            r
        })
    }

    /// Set: fault each selected page whose mapping is writable in for
    /// write and mark it dirty.
    fn set_dirty(&self, d: &Data<P>, gpa: u64, len: u64, sel: Option<&[u64]>, out: &mut [u64]) -> u64 {
        let end = gpa + len;
        // Fault in: per mapping overlapping the range, the selected pages.
        for (start, m) in d.maps.range(..end).rev() {
            let m_end = start + m.len;
            if m_end <= gpa {
                break;
            }
            if !m.prot.contains(Prot::WRITE) {
                continue;
            }
            let lo = gpa.max(*start);
            let hi = end.min(m_end);
            // An error (none is expected: see `map_pages`) changes
            // nothing; those pages are then not marked below.
            let _ = self.inner.map_pages(&d.table, lo, hi - lo, m.prot, &m.object, |a| {
                let p = (a.0 - gpa) / PAGE_SIZE;
                if sel.is_none_or(|s| bit(s, p)) { m.object.frame_at(m.offset + (a.0 - start)) } else { None }
            });
        }
        // Mark: present, writable leaves of selected pages.
        let fmt = &self.inner.format;
        let bits = self.inner.dirty_bits;
        let mut count = 0;
        Self::for_each_selected(d, gpa, len, sel, out, |out, p, e| {
            let v = e.load(Relaxed);
            if fmt.is_present(v) && fmt.prot(v).contains(Prot::WRITE) {
                e.fetch_or(bits, AcqRel);
                put_bit(out, p, true);
                count += 1;
            }
        });
        count
    }

    /// Destroy the space: unmap every mapping (holds keep their objects),
    /// orphan every client (their operations fail with
    /// [`Error::Orphaned`] from now on). Also done on drop.
    pub fn destroy(&self) {
        destroy_inner(&self.inner);
    }
}

impl<P: TablePages, L: RawLock> Drop for VmSpace<P, L> {
    fn drop(&mut self) {
        destroy_inner(&self.inner);
    }
}

fn destroy_inner<P: TablePages, L: RawLock>(inner: &Inner<P, L>) {
    let objects = inner.locked(|a| {
        if a.destroyed {
            return alloc::vec::Vec::new();
        }
        let objects = {
            let held = HeldAll::new(a);
            // SAFETY: lock held, clients held.
            let starts: alloc::vec::Vec<u64> = unsafe { inner.with_data(|d| d.maps.keys().copied().collect()) };
            let objects: alloc::vec::Vec<_> =
                starts.into_iter().filter_map(|s| inner.unmap_locked(held.0, s).ok()).collect();
            // Orphaned before `held` releases them: woken sleepers fail.
            for c in held.0.clients.values() {
                c.orphan();
            }
            objects
        };
        a.destroyed = true;
        drop(core::mem::take(&mut a.clients));
        objects
    });
    drop(objects);
}

/// Whether the fault path records accesses in software (emulated A/D).
pub(crate) fn records_access(format: &PteFormat) -> bool {
    format.kind() == FormatKind::EptEmulatedAd
}

/// The access a fault or hold with `prot` records.
pub(crate) fn access_of(prot: Prot) -> Access {
    if prot.contains(Prot::WRITE) {
        Access::Write
    } else if prot.contains(Prot::READ) {
        Access::Read
    } else {
        Access::Execute
    }
}
