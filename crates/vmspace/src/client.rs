//! Clients: the data path (holds, faults) and vCPU guest-context marking.

use alloc::sync::Arc as StdArc;
use alloc::vec::Vec;
use core::cell::Cell;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::AtomicU64 as EntryAtomic;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

use nested_pt::{Gpa, Pfn, Prot, TablePages};

use crate::PAGE_SIZE;
use crate::error::{Error, Invalid, Result};
use crate::object::VmObject;
use crate::protocol::{ClientShared, on_cpu};
use crate::space::{Data, Inner, Invalidation, access_of, chunk_large};
use crate::sync::{Arc, DefaultLock, RawLock};

/// The last mapping a client resolved, valid while the space's map
/// sequence number equals `seq`. Separate cells, so the hot path reads the
/// fields it needs instead of copying a struct around.
struct Cache {
    seq: Cell<u64>,
    start: Cell<u64>,
    end: Cell<u64>,
    object: Cell<*const VmObject>,
    offset: Cell<u64>,
    prot: Cell<Prot>,
    /// The 2 MiB region whose leaf table `leaf_table` is (or `u64::MAX`).
    leaf_region: Cell<u64>,
    leaf_table: Cell<*const EntryAtomic>,
    /// The mapping's object's host window (`VmObject::host_window`):
    /// first frame, frame count (0 without a host view), host address of
    /// the first frame. A hold maps the frame it finds in the leaf to a
    /// host pointer with these, without the object's frame list.
    host_first: Cell<u64>,
    host_pages: Cell<u64>,
    host_base: Cell<*mut u8>,
    /// The 2 MiB chunk a fault's fault-around just filled (`u64::MAX`:
    /// none), promoted by the fault once its client is inactive.
    promote: Cell<u64>,
}

impl Cache {
    fn new() -> Self {
        Cache {
            seq: Cell::new(u64::MAX),
            start: Cell::new(0),
            end: Cell::new(0),
            object: Cell::new(core::ptr::null()),
            offset: Cell::new(0),
            prot: Cell::new(Prot::empty()),
            leaf_region: Cell::new(u64::MAX),
            leaf_table: Cell::new(core::ptr::null()),
            host_first: Cell::new(0),
            host_pages: Cell::new(0),
            host_base: Cell::new(core::ptr::null_mut()),
            promote: Cell::new(u64::MAX),
        }
    }
}

/// The cache's fields the fast path needs, read before the client is
/// activated: they are private to the owning thread, so reading them
/// early is sound, and it takes these loads out of the chain of
/// dependent loads that can only start once the activation's fence is
/// done. They are trusted only after the activation, when the map
/// sequence has been compared.
#[derive(Clone, Copy)]
struct Snap {
    seq: u64,
    start: u64,
    end: u64,
    prot: Prot,
    leaf_region: u64,
    leaf_table: *const EntryAtomic,
    host_first: u64,
    host_pages: u64,
    host_base: *mut u8,
}

/// Bytes one leaf table covers.
const LEAF_SPAN: u64 = 512 * PAGE_SIZE;

/// The data path's signal that a write met a large leaf that must be
/// split first (the lazy split, or any large leaf while tracking is on):
/// caught by `fault` and `hold_ext`, which split and retry; never
/// returned to a caller (nested-pt's map never reports it).
const SPLIT: Error = Error::Table(nested_pt::Error::WouldSplit);

/// A page found by the data path.
struct Found {
    pfn: Pfn,
    entry: *const EntryAtomic,
    host: Option<NonNull<u8>>,
}

/// Which entries of the fault-around window `[lo, hi)` (inside one leaf
/// table, `slot` being `gpa`'s entry) are empty, as a bitmap indexed by
/// page from `lo`.
fn empty_entries(fmt: &nested_pt::PteFormat, slot: *const EntryAtomic, gpa: u64, lo: u64, hi: u64) -> [u64; 8] {
    let mut empty = [0u64; 8];
    let first = slot.wrapping_sub(((gpa - lo) / PAGE_SIZE) as usize);
    for i in 0..((hi - lo) / PAGE_SIZE) as usize {
        // SAFETY: an aligned window of at most 512 pages lies in one leaf
        // table, of which `slot` is `gpa`'s entry; the table stays
        // allocated while the client is active (the mapping populated it).
        let e = unsafe { &*first.add(i) }.load(Acquire);
        if !fmt.is_present(e) {
            empty[i / 64] |= 1 << (i % 64);
        }
    }
    empty
}

/// Set `bit` (the accessed bit, and the dirty bit where asked) on the
/// entries of the window starting at `lo` that were empty before
/// fault-around mapped them (`empty`), except `gpa`'s own, if they are now
/// present with neither accessed nor dirty set (an entry the hardware or a
/// harvest changed meanwhile is left alone).
fn preset_accessed(fmt: &nested_pt::PteFormat, slot: *const EntryAtomic, gpa: u64, lo: u64, empty: [u64; 8], bit: u64) {
    let me = ((gpa - lo) / PAGE_SIZE) as usize;
    let first = slot.wrapping_sub(me);
    let untouched = fmt.accessed_mask() | fmt.dirty_mask();
    for (w, mut bits) in empty.into_iter().enumerate() {
        while bits != 0 {
            let i = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if i == me {
                continue;
            }
            // SAFETY: as in `empty_entries`.
            let e = unsafe { &*first.add(i) };
            let v = e.load(Acquire);
            if fmt.is_present(v) && v & untouched == 0 {
                // A compare-and-swap, so that a concurrent unmap's clear or
                // the hardware's own update is never overwritten.
                let _ = e.compare_exchange(v, v | bit, AcqRel, Relaxed);
            }
        }
    }
}

/// A client of a [`VmSpace`](crate::VmSpace): one per vCPU, per device,
/// per host view (seed 004's `vm_client_t`).
///
/// Holds and faults go through a client without any space-wide lock; an
/// administrative change excludes them briefly, client by client. A client
/// belongs to one thread at a time (it is `Send`, not `Sync`); its holds
/// borrow it and stay on that thread. Dropping the client destroys it,
/// safely against a concurrent destruction of the space.
pub struct VmClient<P: TablePages, L: RawLock = DefaultLock> {
    space: Arc<Inner<P, L>>,
    shared: Arc<ClientShared<L>>,
    id: Option<u64>,
    cache: Cache,
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: the cache holds a raw pointer that is only dereferenced while the
// client is active and the map sequence proves the mapping (and so its
// object) still exists; everything else is Send.
unsafe impl<P: TablePages + Send + Sync, L: RawLock> Send for VmClient<P, L> {}

impl<P: TablePages, L: RawLock> VmClient<P, L> {
    pub(crate) fn new(space: Arc<Inner<P, L>>) -> Self {
        let shared = Arc::new(ClientShared::new(false));
        let id = space.register(&shared);
        if id.is_none() {
            shared.orphan();
        }
        VmClient { space, shared, id, cache: Cache::new(), _not_sync: PhantomData }
    }

    /// Whether the space is gone (every operation fails with
    /// [`Error::Orphaned`]).
    pub fn is_orphaned(&self) -> bool {
        self.shared.is_orphaned()
    }

    /// Install (or remove) the invalidation callback. It runs on the thread
    /// making an administrative change, outside the client's lock; for an
    /// unmap or a tracking switch while the client is held, for a harvest
    /// ([`Cause::Dirty`](crate::Cause::Dirty)) without holding any client
    /// (the data path runs on). It may release holds, but must not take
    /// holds or fault through this client (during an unmap that would wait
    /// for the change it is part of).
    ///
    /// A callback (or kick hook) that panics does not stop the change:
    /// the change is complete when callbacks run (entries already
    /// cleared), so with `std` the panic is caught, every remaining
    /// client is still kicked and invalidated, every client is released,
    /// and the first panic is propagated from the administrative call
    /// once the space lock is dropped. Without `std` (no `catch_unwind`)
    /// the panic unwinds at once; every client is still released, but
    /// clients after the panicking one are not invalidated (kernels build
    /// with `panic = "abort"`).
    pub fn set_invalidation(&self, f: Option<impl Fn(&Invalidation<'_>) + Send + Sync + 'static>) {
        self.shared.set_inval(f.map(|f| StdArc::new(f) as _));
    }

    /// Install (or remove) the kick hook: called with the cpu given to
    /// [`VmClient::table_enter`] when a change must be seen by this vCPU
    /// while it is in guest context. It must make the vCPU leave guest
    /// context soon (an IPI, a signal, KVM's `immediate_exit`); the change
    /// waits until it has.
    pub fn set_kick(&self, f: Option<impl Fn(u32) + Send + Sync + 'static>) {
        self.shared.set_kick(f.map(|f| StdArc::new(f) as _));
    }

    /// Mark that this vCPU enters guest context on `cpu`, using the
    /// space's tables; returns a guard carrying the table generation read
    /// after the mark. If the generation differs from the one the vCPU
    /// last flushed for, it must flush its cached translations (INVEPT,
    /// ASID flush) before entering. Never blocks (callable with interrupts
    /// off). Drop the guard (or call [`OnCpu::exit`]) after leaving.
    ///
    /// While the guard lives, an administrative change of the same space
    /// that waits for vCPUs (unmap, dirty operations, tracking switch)
    /// made by this thread is refused with [`Error::SelfDeadlock`] (with
    /// `std`; without it, it would wait for itself forever). A *leaked*
    /// guard (`mem::forget`) leaves the client in guest context: every
    /// later such change kicks it and waits until the client re-enters
    /// with the new generation or is dropped (dropping the client marks
    /// its exit); on this thread they are refused until then.
    pub fn table_enter(&self, cpu: u32) -> Result<OnCpu<'_, P, L>> {
        let generation = self.shared.enter(cpu, &self.space.generation)?;
        on_cpu::entered(self.space_key(), self.client_key());
        Ok(OnCpu { client: self, generation })
    }

    fn space_key(&self) -> usize {
        &*self.space as *const Inner<P, L> as usize
    }

    fn client_key(&self) -> usize {
        &*self.shared as *const ClientShared<L> as usize
    }

    #[inline]
    fn data<R>(&self, f: impl FnOnce(&Data<P>) -> R) -> R {
        // SAFETY: every caller has activated the client (see `active`).
        unsafe { self.space.with_data(f) }
    }

    /// Run `f` with the client active (excluded from administrative
    /// changes, which wait for it).
    #[inline]
    fn active<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.shared.activate()?;
        let r = f();
        self.shared.deactivate();
        r
    }

    /// Make the cache describe the mapping containing `gpa`; false when
    /// there is none. Client active.
    #[inline]
    fn mapping(&self, d: &Data<P>, gpa: u64) -> bool {
        let c = &self.cache;
        let seq = self.space.map_seq.load(Acquire);
        if c.seq.get() == seq && c.start.get() <= gpa && gpa < c.end.get() {
            return true;
        }
        let Some((start, m)) = d.mapping_at(gpa) else { return false };
        c.seq.set(seq);
        c.start.set(start);
        c.end.set(start + m.len);
        c.object.set(StdArc::as_ptr(&m.object));
        c.offset.set(m.offset);
        c.prot.set(m.prot);
        c.leaf_region.set(u64::MAX);
        let (first, pages, base) = match m.object.host_window() {
            Some((first, pages, base)) => (first.0, pages, base.as_ptr()),
            None => (0, 0, core::ptr::null_mut()),
        };
        c.host_first.set(first);
        c.host_pages.set(pages);
        c.host_base.set(base);
        true
    }

    /// The leaf entry for `gpa` (inside the cached mapping), from the
    /// cached leaf table or by a walk that then fills the cache; `None` if
    /// the walk finds no 4 KiB leaf present.
    #[inline]
    fn leaf_slot(&self, d: &Data<P>, gpa: u64) -> Option<*const EntryAtomic> {
        let idx = ((gpa / PAGE_SIZE) % 512) as usize;
        let region = gpa & !(LEAF_SPAN - 1);
        if self.cache.leaf_region.get() == region {
            // SAFETY: the cached pointer is the leaf table of this 2 MiB
            // region; the mapping (still in place: same map sequence, and
            // the client is active) holds a populate count on it, so it is
            // allocated; idx < 512.
            return Some(unsafe { self.cache.leaf_table.get().add(idx) });
        }
        let leaf = d.table.lookup(Gpa(gpa))?;
        if leaf.size != nested_pt::PageSize::Size4K {
            return None;
        }
        let slot = leaf.entry as *const EntryAtomic;
        self.cache.leaf_region.set(region);
        // SAFETY: `slot` is entry `idx` of its 512-entry leaf table.
        self.cache.leaf_table.set(unsafe { slot.sub(idx) });
        Some(slot)
    }

    /// `gpa`'s entry in its 4 KiB leaf table, present or not (the cached
    /// leaf table, or a walk); `None` without a leaf table. Client active.
    fn entry_slot(&self, d: &Data<P>, gpa: u64) -> Option<*const EntryAtomic> {
        let idx = ((gpa / PAGE_SIZE) % 512) as usize;
        if self.cache.leaf_region.get() == gpa & !(LEAF_SPAN - 1) {
            // SAFETY: as in `leaf_slot`.
            return Some(unsafe { self.cache.leaf_table.get().add(idx) });
        }
        let w = d.table.walk(Gpa(gpa));
        let step = w.steps().last().filter(|s| s.level == 1)?;
        Some(d.table.entry(step)? as *const EntryAtomic)
    }

    /// Read the cache for [`VmClient::lookup_map`] (before activating).
    #[inline(always)]
    fn snap(&self) -> Snap {
        let c = &self.cache;
        Snap {
            seq: c.seq.get(),
            start: c.start.get(),
            end: c.end.get(),
            prot: c.prot.get(),
            leaf_region: c.leaf_region.get(),
            leaf_table: c.leaf_table.get(),
            host_first: c.host_first.get(),
            host_pages: c.host_pages.get(),
            host_base: c.host_base.get(),
        }
    }

    /// The host page of frame `pfn`, found in a leaf of the mapping whose
    /// host window `s` describes.
    #[inline(always)]
    fn host_of(s: &Snap, pfn: Pfn) -> Result<NonNull<u8>> {
        // The leaf maps the object's frame at this offset (an invariant of
        // the table), so its host page is the frame's place in the
        // object's host window.
        let idx = pfn.0.wrapping_sub(s.host_first);
        if idx >= s.host_pages {
            return Err(Error::NoHostView);
        }
        // SAFETY: idx < the window's page count, so the address lies inside
        // the window, which stays mapped while the object lives (the
        // mapping holds it; a hold keeps it alive past an unmap); it is
        // non-null because the window's base is.
        Ok(unsafe { NonNull::new_unchecked(s.host_base.add((idx * PAGE_SIZE) as usize)) })
    }

    /// The data path: find (and if needed map) the page at `gpa` for
    /// `prot`; client active, `s` read from the cache before activating.
    /// The fast path serves a present leaf of the cached mapping and leaf
    /// table from `s`; anything else takes [`VmClient::lookup_map_slow`].
    #[inline(always)]
    fn lookup_map(&self, d: &Data<P>, gpa: u64, prot: Prot, host: bool, s: &Snap) -> Result<Found> {
        let seq = self.space.map_seq.load(Acquire);
        if s.seq == seq
            && s.start <= gpa
            && gpa < s.end
            && s.leaf_region == gpa & !(LEAF_SPAN - 1)
            && s.prot.contains(prot)
            && !self.space.records_access
        {
            let idx = ((gpa / PAGE_SIZE) % 512) as usize;
            // SAFETY: as in `leaf_slot`: the same map sequence proves the
            // cached leaf table still belongs to this region's mapping,
            // which keeps it allocated while the client is active.
            let slot = unsafe { s.leaf_table.add(idx) };
            // SAFETY: as above.
            let e = unsafe { &*slot }.load(Acquire);
            let fmt = &self.space.format;
            if fmt.is_present(e) {
                let pfn = fmt.frame(e);
                let host = if host { Some(Self::host_of(s, pfn)?) } else { None };
                return Ok(Found { pfn, entry: slot, host });
            }
        }
        self.lookup_map_slow(d, gpa, prot, host)
    }

    /// [`VmClient::lookup_map`] through the cache's cells, refilling them
    /// (and mapping the fault-around window) as needed; client active.
    #[inline(never)]
    fn lookup_map_slow(&self, d: &Data<P>, gpa: u64, prot: Prot, host: bool) -> Result<Found> {
        if !self.mapping(d, gpa) {
            return Err(Error::NoMapping);
        }
        let c = &self.cache;
        let mprot = c.prot.get();
        if !mprot.contains(prot) {
            return Err(Error::Protection);
        }
        // SAFETY: the mapping exists (map sequence unchanged while active)
        // and holds a reference to the object.
        let object = unsafe { &*c.object.get() };
        let fmt = &self.space.format;
        let present = |slot: *const EntryAtomic| {
            // SAFETY: slots come from `leaf_slot`, valid while active.
            let e = unsafe { &*slot }.load(Acquire);
            fmt.is_present(e).then_some(e)
        };
        if self.cache.leaf_region.get() != gpa & !(LEAF_SPAN - 1)
            && let Some(found) = self.large_leaf(d, gpa, prot, host, mprot, object)?
        {
            return Ok(found);
        }
        let (slot, e) = match self.leaf_slot(d, gpa).and_then(|s| Some((s, present(s)?))) {
            Some(found) => found,
            None => {
                // A swappable object's page may have no frame yet (never
                // touched, or swapped out): it gets one first, so that
                // the mapping below finds it (its neighbours are mapped
                // only if already resident). No swapper runs meanwhile:
                // it holds every client while it clears leaves.
                if let Some(sw) = object.swap() {
                    sw.ensure_resident((c.offset.get() + (gpa - c.start.get())) / PAGE_SIZE)?;
                }
                // Fault-around: an aligned window inside the mapping.
                let w = self.space.fault_around * PAGE_SIZE;
                let lo = (gpa & !(w - 1)).max(c.start.get());
                let hi = ((gpa | (w - 1)) + 1).min(c.end.get());
                let base = c.offset.get().wrapping_sub(c.start.get());
                let mut preset = if host { 0 } else { self.space.fault_around_accessed };
                if preset != 0
                    && prot.contains(Prot::WRITE)
                    && mprot.contains(Prot::WRITE)
                    && !self.space.track_dirty.load(Acquire)
                {
                    // Tracking is off and cannot be switched on while this
                    // client is active (the switch holds every client).
                    preset |= self.space.fault_around_dirty;
                }
                // The window's leaf table, and which of its entries are
                // empty now: only those get the accessed bit (an entry
                // already present keeps the state its accesses gave it).
                let before = if preset != 0 && hi - lo > PAGE_SIZE {
                    self.entry_slot(d, gpa).map(|s| (s, empty_entries(fmt, s, gpa, lo, hi)))
                } else {
                    None
                };
                let n = self
                    .space
                    .map_pages(&d.table, lo, hi - lo, mprot, object, |p| object.frame_at(base.wrapping_add(p.0)))?;
                if let Some((s, empty)) = before {
                    preset_accessed(fmt, s, gpa, lo, empty, preset);
                }
                let slot = self.leaf_slot(d, gpa).ok_or(Error::NoMapping)?;
                if n > 0 {
                    self.note_full(gpa, slot, object);
                }
                (slot, present(slot).ok_or(Error::NoMapping)?)
            }
        };
        if self.space.records_access {
            // Emulated A/D: the access is recorded in the hardware
            // permission bits (R/X mean accessed, W means written), which
            // also stop the vCPU's next access from faulting. Only a vCPU's
            // fault (`host == false`) is granted W: a hold accesses the
            // page through the host, so it records a read, and its write
            // is marked dirty (software bit) by its release, or not at all
            // for a deferred hold never marked.
            let access = if host { nested_pt::Access::Read } else { access_of(prot) };
            let bits = fmt.access_bits(e, access).ok_or(Error::Protection)?;
            if e & bits != bits {
                // SAFETY: as in `present`.
                unsafe { &*slot }.fetch_or(bits, AcqRel);
            }
        }
        let pfn = fmt.frame(e);
        let host = if host { Some(Self::host_of(&self.snap(), pfn)?) } else { None };
        Ok(Found { pfn, entry: slot, host })
    }

    /// After a fault or a hold mapped leaves in `gpa`'s leaf table (`slot` is
    /// `gpa`'s entry): note its chunk for automatic promotion if it may
    /// promote (see [`SpaceConfig::auto_promote`](crate::SpaceConfig)) and
    /// the table is now full and would promote. Cheap unless it is
    /// nearly full: the first entry of each other fault-around window is
    /// checked (stopping at the first empty one; fault-around maps whole
    /// windows), then all 512 (about 0.5 µs). Tracking cannot be switched
    /// while the client is active; the promotion checks everything again.
    /// Client active.
    #[inline(never)]
    fn note_full(&self, gpa: u64, slot: *const EntryAtomic, object: &VmObject) {
        let sp = &*self.space;
        if !sp.auto_promote || sp.track_dirty.load(Acquire) {
            return;
        }
        let c = gpa & !(LEAF_SPAN - 1);
        let (start, end) = (self.cache.start.get(), self.cache.end.get());
        if c < start || end - c < LEAF_SPAN || object.run_at(self.cache.offset.get() + (c - start)).is_none() {
            return;
        }
        let fmt = &sp.format;
        let me = ((gpa / PAGE_SIZE) % 512) as usize;
        let first = slot.wrapping_sub(me);
        let present = |i: usize| {
            // SAFETY: `first` is entry 0 of `gpa`'s 512-entry leaf table
            // (`slot` is entry `me` of it), allocated while the client is
            // active (the mapping populated it); i < 512.
            fmt.is_present(unsafe { &*first.add(i) }.load(Acquire))
        };
        let w = sp.fault_around as usize;
        let windows = 512 / w;
        if !(1..windows).all(|k| present((me / w + k) % windows * w)) {
            return;
        }
        // All 512: apart from accessed and dirty, entry `i` of one run
        // with one protection and memory type is entry 0 plus `i` frames,
        // as the promotion requires (it checks again, exclusively): a
        // range it would refuse costs no administrative change.
        // SAFETY: as in `present`.
        let load = |i: usize| unsafe { &*first.add(i) }.load(Acquire);
        let ad = fmt.accessed_mask() | fmt.dirty_mask();
        let e0 = load(0);
        let want = e0 & !ad;
        if fmt.is_present(e0) && (1..512).all(|i| load(i) & !ad == want + ((i as u64) << 12)) {
            self.cache.promote.set(c);
        }
    }

    /// The automatic promotion a fault or hold noted
    /// ([`VmClient::note_full`]), run with the client inactive. A refusal
    /// (the chunk changed, or [`Error::SelfDeadlock`] from guest context)
    /// is not the fault's or hold's error: the page is mapped either way.
    #[inline(always)]
    fn promote_noted(&self) {
        // One client-local load on the hot paths; the rest only when set.
        let c = self.cache.promote.get();
        if c != u64::MAX {
            self.cache.promote.set(u64::MAX);
            let _ = self.space.promote_after_fault(c);
        }
    }

    /// The large-leaf part of the slow path: `gpa`'s 2 MiB leaf, mapped
    /// first (the whole run, one leaf) if its chunk is counted for one and
    /// still empty. `None` where the chunk has 4 KiB leaves (a leaf
    /// table). [`SPLIT`] for a write the leaf does not allow (lazily
    /// write-protected) or any write while tracking is on. Client active.
    #[inline(never)]
    fn large_leaf(
        &self,
        d: &Data<P>,
        gpa: u64,
        prot: Prot,
        host: bool,
        mprot: Prot,
        object: &VmObject,
    ) -> Result<Option<Found>> {
        let c = gpa & !(LEAF_SPAN - 1);
        let fmt = &self.space.format;
        let leaf = match d.table.lookup(Gpa(gpa)) {
            Some(l) if l.size == nested_pt::PageSize::Size4K => return Ok(None),
            Some(l) => l,
            None => {
                let (start, end) = (self.cache.start.get(), self.cache.end.get());
                let offset = self.cache.offset.get();
                // A 1 GiB slot counted for one leaf: its whole run (`huge.rs`).
                if !self.space.fault_huge(&d.table, gpa, start, end, offset, mprot, object)? {
                    if c < start || end - c < LEAF_SPAN || !chunk_large(&d.table, c) {
                        return Ok(None);
                    }
                    self.space.map_large(&d.table, c, mprot, object, offset + (c - start))?;
                }
                match d.table.lookup(Gpa(gpa)) {
                    Some(l) if l.size != nested_pt::PageSize::Size4K => l,
                    _ => return Err(Error::NoMapping),
                }
            }
        };
        let e = leaf.value();
        if prot.contains(Prot::WRITE) && (!fmt.prot(e).contains(Prot::WRITE) || self.space.track_dirty.load(Acquire)) {
            return Err(SPLIT);
        }
        if self.space.records_access {
            // As for a 4 KiB leaf (see `lookup_map_slow`).
            let access = if host { nested_pt::Access::Read } else { access_of(prot) };
            let bits = fmt.access_bits(e, access).ok_or(Error::Protection)?;
            if e & bits != bits {
                leaf.entry.fetch_or(bits, AcqRel);
            }
        }
        let pfn = leaf.pfn_of(Gpa(gpa)).ok_or(Error::NoMapping)?;
        let host = if host { Some(Self::host_of(&self.snap(), pfn)?) } else { None };
        Ok(Some(Found { pfn, entry: leaf.entry as *const EntryAtomic, host }))
    }

    /// Handle a nested page fault at `gpa` (any alignment) for an access
    /// needing `prot`: map the page (and its fault-around window) with a
    /// compare-and-swap if it is not present. [`Error::NoMapping`] when no
    /// mapping covers `gpa`, [`Error::Protection`] when the mapping does
    /// not allow `prot`. In a 2 MiB range populated for a large leaf the
    /// whole run is mapped with one leaf. A write to a large leaf that
    /// must be split first (the lazy split, see
    /// [`SplitPolicy`](crate::SplitPolicy)) splits it as an administrative
    /// change (every client held, the generation bumped) and retries;
    /// from a thread in guest context on the same space that is refused
    /// with [`Error::SelfDeadlock`]. A writable hold does the same.
    /// A fault (or hold) that fills the leaf table of an aligned 2 MiB range of one
    /// run promotes it afterwards, also as an administrative change, while
    /// tracking is off ([`SpaceConfig::auto_promote`](crate::SpaceConfig));
    /// not from a thread in guest context on the same space, and a
    /// promotion that does not happen is not the fault's error.
    #[inline]
    pub fn fault(&self, gpa: Gpa, prot: Prot) -> Result<()> {
        let gpa = gpa.0;
        if prot.is_empty() {
            return Err(Invalid::BadProt.into());
        }
        let gpa = gpa & !(PAGE_SIZE - 1);
        let mut tries = 0;
        loop {
            let s = self.snap();
            let r = self.active(|| self.data(|d| self.lookup_map(d, gpa, prot, false, &s).map(|_| ())));
            self.promote_noted();
            match r {
                Err(e) if e == SPLIT => return self.fault_split(gpa, prot),
                // A swappable page found the reservoir exhausted: reclaim
                // outside the active section, then try again.
                Err(Error::ReservoirFull) if self.space.reclaim_after_full(&mut tries) => continue,
                r => return r,
            }
        }
    }

    /// A write fault on a large leaf that must be split first: split it
    /// (an administrative change: every client held, the generation
    /// bumped) and fault again. [`Error::SelfDeadlock`] from a thread in
    /// guest context on the same space. (Swappable objects have no large
    /// leaves, so no reservoir reclaim is needed here.)
    ///
    /// # Why the loop ends
    ///
    /// [`SPLIT`] comes only from `large_leaf`: a write to a 2 MiB leaf
    /// without write permission, or to any 2 MiB leaf while tracking is
    /// on. `split_for_write` leaves `gpa`'s chunk with 4 KiB leaves of
    /// the mapping's protection (or finds it so, or finds no mapping,
    /// and then the retry ends with [`Error::NoMapping`]). For the retry
    /// to see [`SPLIT`] again, other threads must meanwhile have made a
    /// 2 MiB leaf there again and then taken its write permission away
    /// or switched tracking on:
    /// - a 2 MiB leaf is made only by a promotion (explicit or
    ///   automatic) or by a fault into an empty slot counted for one,
    ///   both only while tracking is off, and both with the mapping's
    ///   whole protection (a promotion refuses leaves without it), so
    ///   that leaf is writable in a writable mapping;
    /// - with tracking off, only [`VmSpace::set_dirty_tracking`]
    ///   switching it on removes that: it splits the leaf (eager) or
    ///   write-protects it (lazy).
    ///
    /// So every round after the first needs one more completed
    /// `set_dirty_tracking(true)` by another thread, and the loop ends
    /// once no other thread switches tracking on meanwhile: it cannot
    /// spin on its own, and a concurrent automatic promotion alone never
    /// sends it round again. (A vCPU would fault again the same way.)
    ///
    /// [`VmSpace::set_dirty_tracking`]: crate::VmSpace::set_dirty_tracking
    #[cold]
    fn fault_split(&self, gpa: u64, prot: Prot) -> Result<()> {
        loop {
            self.space.split_for_write(gpa)?;
            let s = self.snap();
            let r = self.active(|| self.data(|d| self.lookup_map(d, gpa, prot, false, &s).map(|_| ())));
            self.promote_noted();
            match r {
                Err(e) if e == SPLIT => continue,
                r => return r,
            }
        }
    }

    /// Hold the page at `gpa` (4 KiB aligned) for `prot` (read and/or
    /// write). Releasing a writable hold marks the page dirty.
    #[inline(always)]
    pub fn hold(&self, gpa: Gpa, prot: Prot) -> Result<PageHold<'_, P, L>> {
        let gpa = gpa.0;
        self.hold_ext(Gpa(gpa), prot, false)
    }

    /// As [`VmClient::hold`]; with `defer_dirty`, a writable hold marks the
    /// page dirty on release only if [`PageHold::mark_dirty`] was called.
    #[inline(always)]
    pub fn hold_ext(&self, gpa: Gpa, prot: Prot, defer_dirty: bool) -> Result<PageHold<'_, P, L>> {
        let gpa = gpa.0;
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid::Unaligned.into());
        }
        if !prot.intersects(Prot::READ | Prot::WRITE) || prot.contains(Prot::EXEC) {
            return Err(Invalid::BadProt.into());
        }
        let take = || {
            let s = self.snap();
            self.active(|| {
                let f = self.data(|d| self.lookup_map(d, gpa, prot, true, &s))?;
                let host = f.host.ok_or(Error::NoHostView)?;
                // Counted while active, so an unmap (which waits for us) sees it.
                let seq = self.space.unmap_seq.load(Relaxed);
                let slot = self.shared.hold_taken(gpa, seq);
                // No split or promotion runs while we are active: the
                // entry found is valid for this structure sequence.
                Ok((f, host, seq, slot, self.space.struct_seq.load(Acquire)))
            })
        };
        let mut r = take();
        let mut tries = 0;
        loop {
            match r {
                // As in `fault_split`: split again until the retry finds
                // the page (and it ends for the same reason: each round
                // after the first needs another thread's completed
                // switch of tracking on).
                Err(e) if e == SPLIT => self.space.split_for_write(gpa)?,
                // As in `fault`: reclaim outside the active section.
                Err(Error::ReservoirFull) if self.space.reclaim_after_full(&mut tries) => {}
                _ => break,
            }
            r = take();
        }
        // A promotion moves the hold's leaf: its release finds it again
        // (the structure sequence changed).
        self.promote_noted();
        let (found, host, seq, slot, sseq) = r?;
        Ok(PageHold {
            client: self,
            gpa,
            pfn: found.pfn,
            host,
            entry: found.entry,
            prot,
            defer_dirty: core::cell::Cell::new(defer_dirty),
            seq,
            sseq,
            slot,
            released: false,
        })
    }

    /// Hold every page of `[gpa, gpa+len)` (any alignment, `len > 0`) as a
    /// chain, for accesses that cross pages.
    pub fn hold_range(&self, gpa: Gpa, len: u64, prot: Prot) -> Result<HoldChain<'_, P, L>> {
        let gpa = gpa.0;
        if len == 0 {
            return Err(Invalid::ZeroLength.into());
        }
        let end = gpa.checked_add(len).ok_or(Error::Invalid(Invalid::Overflow))?;
        let len = usize::try_from(len).map_err(|_| Error::Invalid(Invalid::Overflow))?;
        let mut chain = HoldChain { holds: Vec::new(), first: (gpa % PAGE_SIZE) as usize, len };
        let mut page = gpa & !(PAGE_SIZE - 1);
        while page < end {
            chain.holds.push(self.hold(Gpa(page), prot)?);
            // The last page of the 64-bit space has no successor.
            let Some(next) = page.checked_add(PAGE_SIZE) else { break };
            page = next;
        }
        Ok(chain)
    }

    /// Release a hold (see [`PageHold::release`]).
    #[inline(always)]
    fn release(&self, h: &PageHold<'_, P, L>) -> bool {
        let shared = &*self.shared;
        let mark = h.prot.contains(Prot::WRITE) && !h.defer_dirty.get();
        if !mark {
            let unmapped = shared.was_unmapped(h.gpa, h.seq);
            shared.hold_released(h.slot, h.gpa);
            return unmapped;
        }
        let bits = self.space.dirty_bits;
        let mark = |e: &EntryAtomic| {
            if e.load(Relaxed) & bits != bits {
                e.fetch_or(bits, AcqRel);
            }
        };
        // The hold's leaf, found again if a split or a promotion moved it
        // since the hold was taken (its entry pointer may then be a table
        // entry, or in a freed leaf table); the caller excludes exclusive
        // access to the data and checked the mapping is still in place.
        let set_dirty_in = |d: &Data<P>| {
            if !self.space.track_dirty.load(Relaxed) {
                return;
            }
            if self.space.struct_seq.load(Acquire) == h.sseq {
                // SAFETY: the mapping is still in place and nothing moved
                // its leaves, so the entry pointer is valid.
                mark(unsafe { &*h.entry });
            } else if let Some(l) = d.table.lookup(Gpa(h.gpa)) {
                mark(l.entry);
            }
        };
        if shared.try_activate() {
            // No administrative change can run; retired entries describe
            // every unmap that happened since the hold was taken.
            let unmapped = shared.was_unmapped(h.gpa, h.seq);
            if !unmapped {
                self.data(set_dirty_in);
            }
            shared.hold_released(h.slot, h.gpa);
            shared.deactivate();
            unmapped
        } else {
            // A change is in progress: decide under the client lock, which
            // an unmap takes to retire holds before clearing any entry.
            // The structure lock keeps the change's exclusive access to
            // the table out while the leaf is found and marked.
            shared.release_locked(h.gpa, h.seq, h.slot, || self.space.with_data_structure_locked(set_dirty_in))
        }
    }
}

impl<P: TablePages, L: RawLock> Clone for VmClient<P, L> {
    /// A new client of the same space (seed 004's `vmc_clone`): only the
    /// association is cloned, not holds or callbacks. The clone of an
    /// orphaned client is orphaned.
    fn clone(&self) -> Self {
        VmClient::new(self.space.clone())
    }
}

impl<P: TablePages, L: RawLock> Drop for VmClient<P, L> {
    fn drop(&mut self) {
        // A guard that borrowed the client is gone, or was leaked: mark
        // the exit, so that no change waits for this vCPU any more.
        if self.shared.is_on_cpu() {
            self.shared.exit();
            on_cpu::left(self.client_key());
        }
        if let Some(id) = self.id {
            self.space.unregister(id);
        }
    }
}

impl<P: TablePages, L: RawLock> core::fmt::Debug for VmClient<P, L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmClient").field("id", &self.id).field("orphaned", &self.is_orphaned()).finish()
    }
}

/// A vCPU in guest context (see [`VmClient::table_enter`]); leaving is
/// marked when it is dropped.
#[must_use = "dropping the guard marks the exit from guest context"]
pub struct OnCpu<'c, P: TablePages, L: RawLock = DefaultLock> {
    client: &'c VmClient<P, L>,
    generation: u64,
}

impl<P: TablePages, L: RawLock> OnCpu<'_, P, L> {
    /// The table generation read at entry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Mark the exit from guest context (same as dropping).
    pub fn exit(self) {}
}

impl<P: TablePages, L: RawLock> Drop for OnCpu<'_, P, L> {
    fn drop(&mut self) {
        on_cpu::left(self.client.client_key());
        self.client.shared.exit();
    }
}

/// A held guest page (seed 004's `vm_page_t`).
///
/// Readable and/or writable as it was taken for; accessed only through
/// copies via raw pointers or volatile accesses (the guest and other
/// agents may change the page at any time, so no Rust reference to its
/// bytes is ever formed). Released on drop, marking the page dirty if it
/// was held writable (unless dirty marking was deferred and never asked
/// for). A hold keeps the page's object alive even if the mapping is
/// unmapped meanwhile; [`PageHold::release`] then reports `true`.
pub struct PageHold<'c, P: TablePages, L: RawLock = DefaultLock> {
    client: &'c VmClient<P, L>,
    gpa: u64,
    pfn: Pfn,
    host: NonNull<u8>,
    entry: *const EntryAtomic,
    prot: Prot,
    defer_dirty: core::cell::Cell<bool>,
    seq: u64,
    /// The space's structure sequence when taken (see `Inner::struct_seq`).
    sseq: u64,
    /// Where the client records the held page (see `ClientShared::held`).
    slot: u8,
    released: bool,
}

impl<P: TablePages, L: RawLock> core::fmt::Debug for PageHold<'_, P, L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageHold")
            .field("gpa", &Gpa(self.gpa))
            .field("pfn", &self.pfn)
            .field("prot", &self.prot)
            .finish()
    }
}

impl<P: TablePages, L: RawLock> PageHold<'_, P, L> {
    /// Guest-physical address of the page.
    pub fn gpa(&self) -> Gpa {
        Gpa(self.gpa)
    }

    /// Frame of the page (the KVM runner's guest-physical page).
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// The access the hold was taken for.
    pub fn prot(&self) -> Prot {
        self.prot
    }

    /// Host pointer to the page's first byte, for raw or volatile access
    /// within the page while the hold lives. Never turn it into a slice
    /// reference: the guest may write the page concurrently.
    pub fn as_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Undo "defer dirty": the release will mark the page dirty. Refused
    /// with [`Error::Protection`] for a hold that is not writable.
    pub fn mark_dirty(&self) -> Result<()> {
        if !self.prot.contains(Prot::WRITE) {
            return Err(Error::Protection);
        }
        self.defer_dirty.set(false);
        Ok(())
    }

    fn check(&self, offset: usize, len: usize, need: Prot) -> Result<*mut u8> {
        if !self.prot.contains(need) {
            return Err(Error::Protection);
        }
        let end = offset.checked_add(len).ok_or(Error::Invalid(Invalid::OutsideHold))?;
        if end > PAGE_SIZE as usize {
            return Err(Invalid::OutsideHold.into());
        }
        // SAFETY: offset <= 4096 stays inside (or one past) the page.
        Ok(unsafe { self.host.as_ptr().add(offset) })
    }

    /// Copy `dst.len()` bytes from the page at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.check(offset, dst.len(), Prot::READ)?;
        // SAFETY: `src..src+len` lies inside the held page (checked), which
        // stays mapped in the host while the hold keeps its object alive;
        // `dst` is host memory that cannot overlap guest memory we hold
        // through a raw pointer only.
        unsafe { core::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copy `src` into the page at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.check(offset, src.len(), Prot::WRITE)?;
        // SAFETY: as in `read`, in the other direction.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Volatile read of the naturally aligned `u64` at `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        if !offset.is_multiple_of(8) {
            return Err(Invalid::Unaligned.into());
        }
        let p = self.check(offset, 8, Prot::READ)?;
        // SAFETY: inside the page and 8-byte aligned (the page is).
        Ok(unsafe { p.cast::<u64>().read_volatile() })
    }

    /// Volatile write of the naturally aligned `u64` at `offset`.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<()> {
        if !offset.is_multiple_of(8) {
            return Err(Invalid::Unaligned.into());
        }
        let p = self.check(offset, 8, Prot::WRITE)?;
        // SAFETY: inside the page and 8-byte aligned.
        unsafe { p.cast::<u64>().write_volatile(v) };
        Ok(())
    }

    /// Release the hold; returns whether its mapping was unmapped while it
    /// was held (the page then was not marked dirty: the table entry no
    /// longer exists).
    pub fn release(mut self) -> bool {
        self.released = true;
        self.client.release(&self)
    }
}

impl<P: TablePages, L: RawLock> Drop for PageHold<'_, P, L> {
    #[inline(always)]
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            self.client.release(self);
        }
    }
}

/// Holds on consecutive pages, for accesses that cross page boundaries
/// (seed 004's page chains). Offsets are relative to the first byte of the
/// chain's range.
pub struct HoldChain<'c, P: TablePages, L: RawLock = DefaultLock> {
    holds: Vec<PageHold<'c, P, L>>,
    first: usize,
    len: usize,
}

impl<P: TablePages, L: RawLock> core::fmt::Debug for HoldChain<'_, P, L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HoldChain")
            .field("holds", &self.holds)
            .field("first", &self.first)
            .field("len", &self.len)
            .finish()
    }
}

impl<P: TablePages, L: RawLock> Default for HoldChain<'_, P, L> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'c, P: TablePages, L: RawLock> HoldChain<'c, P, L> {
    /// The holds, in address order.
    pub fn holds(&self) -> &[PageHold<'c, P, L>] {
        &self.holds
    }

    /// Length of the chain's range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty (never, for a chain from `hold_range`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The per-page pieces of `[offset, offset+len)`: (hold index,
    /// offset in its page, bytes).
    fn pieces(&self, offset: usize, len: usize) -> Result<impl Iterator<Item = (usize, usize, usize)>> {
        let end = offset.checked_add(len).ok_or(Error::Invalid(Invalid::OutsideHold))?;
        if end > self.len {
            return Err(Invalid::OutsideHold.into());
        }
        let ps = PAGE_SIZE as usize;
        let mut pos = self.first + offset;
        let stop = self.first + end;
        Ok(core::iter::from_fn(move || {
            if pos >= stop {
                return None;
            }
            let in_page = pos % ps;
            let n = (ps - in_page).min(stop - pos);
            let piece = (pos / ps, in_page, n);
            pos += n;
            Some(piece)
        }))
    }

    /// Copy `dst.len()` bytes from the range at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let mut at = 0;
        for (page, in_page, n) in self.pieces(offset, dst.len())? {
            self.holds[page].read(in_page, &mut dst[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Copy `src` into the range at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        let mut at = 0;
        for (page, in_page, n) in self.pieces(offset, src.len())? {
            self.holds[page].write(in_page, &src[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// An empty chain, to be extended with [`HoldChain::push`].
    pub fn new() -> Self {
        HoldChain { holds: Vec::new(), first: 0, len: 0 }
    }

    /// Append a hold, which should be of the page after the last one: the
    /// chain's range then extends to the end of that page.
    pub fn push(&mut self, hold: PageHold<'c, P, L>) {
        self.holds.push(hold);
        self.len = self.holds.len() * PAGE_SIZE as usize - self.first;
    }

    /// Release every hold; returns whether any mapping went away meanwhile.
    pub fn release(self) -> bool {
        let mut any = false;
        for h in self.holds {
            any |= h.release();
        }
        any
    }
}
