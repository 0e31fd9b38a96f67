//! The four-level table tree.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use crate::format::{Kind, PteFormat, with_kind};
use crate::pages::TablePages;
use crate::{Access, ENTRIES, Error, Gpa, MemType, PageSize, Pfn, Prot, check_range};

pub(crate) mod export;
pub(crate) mod harvest;
pub(crate) mod large;

/// The large-page bit of a level-2/3 entry (EPT bit 7 and NPT PS, bit 7).
const LARGE: u64 = crate::format::EPT_LARGE;

/// One table page, as the hardware sees it.
pub(crate) type Table = [AtomicU64; ENTRIES];

/// Bytes one entry at `level` covers (level 1: 4 KiB .. level 4: 512 GiB).
#[inline(always)]
pub(crate) const fn entry_span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}

/// Index of `gpa`'s entry in a table at `level`.
#[inline(always)]
pub(crate) const fn index(level: u8, gpa: u64) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

/// Converts a frame to its table, if the provider owns it.
#[inline(always)]
pub(crate) fn table_of<P: TablePages + ?Sized>(pages: &P, pfn: Pfn) -> Option<&Table> {
    let p = pages.ptr(pfn);
    if p.is_null() {
        return None;
    }
    // SAFETY: by the `TablePages` contract a non-null pointer addresses the
    // 4096 bytes of an allocated page, 8-byte aligned, valid until `free`;
    // the returned reference borrows `pages`, and pages are freed only
    // through `&mut` access to the provider, so it cannot outlive the page.
    // All access is atomic, so concurrent writers (other threads, hardware
    // setting A/D bits) are fine.
    Some(unsafe { &*(p as *const Table) })
}

/// Software shadow of one table page: its reference count and children.
///
/// `reserved` counts the entries `populate_region` reserved for leaves in
/// this table; the page is freed when that count is zero and no child
/// table is left (never the root). Children are kept sorted by their index
/// in this table. Keeping reservations apart from children means a vacate
/// with wrong arguments can at worst release another range's reservation;
/// it can never free a table that still has children.
struct Node {
    pfn: Pfn,
    reserved: u32,
    index: u16,
    children: Vec<Node>,
}

impl Node {
    fn new(pfn: Pfn, index: u16) -> Node {
        Node { pfn, reserved: 0, index, children: Vec::new() }
    }
    fn child_pos(&self, index: usize) -> Result<usize, usize> {
        self.children.binary_search_by_key(&(index as u16), |c| c.index)
    }
}

/// How many whole-table transactions in a row may fail before a harvest
/// pass clears the rest of its range with locked operations only.
pub(crate) const TXN_GIVE_UP: usize = 8;

/// How a dirty pass clears what it reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clear {
    /// Reads only.
    No,
    /// One locked AND per dirty entry (what `Txn` falls back to; the
    /// tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Locked,
    /// A whole leaf table in one hardware transaction where the processor
    /// has RTM (`harvest::scan_table_txn`), else as `Locked`: safe against
    /// any concurrent use.
    Txn,
    /// Plain stores: only with exclusive access.
    Plain,
}

/// The entries on the path of a walk, root first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Walk {
    /// The steps; only the first `len` are meaningful.
    pub steps: [WalkStep; 4],
    /// How many steps the walk took (it stops at a non-present entry or a
    /// leaf).
    pub len: usize,
}

impl Walk {
    /// The steps taken.
    pub fn steps(&self) -> &[WalkStep] {
        &self.steps[..self.len.min(self.steps.len())]
    }
}

/// One entry visited by a walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStep {
    /// Table level, 4 (root) to 1.
    pub level: u8,
    /// The table page holding the entry.
    pub table: Pfn,
    /// Index of the entry in its table.
    pub index: u16,
    /// The entry's value when read.
    pub entry: u64,
}

/// A present leaf entry.
#[derive(Clone, Copy)]
pub struct Leaf<'a> {
    /// Guest-physical address of the page the leaf maps.
    pub gpa: Gpa,
    /// Size of the page.
    pub size: PageSize,
    /// The entry itself (hardware may change it at any time).
    pub entry: &'a AtomicU64,
    fmt: &'a PteFormat,
}

impl core::fmt::Debug for Leaf<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Leaf")
            .field("gpa", &self.gpa)
            .field("size", &self.size)
            .field("entry", &format_args!("{:#x}", self.value()))
            .finish()
    }
}

impl<'a> Leaf<'a> {
    /// The entry's current value.
    pub fn value(&self) -> u64 {
        self.entry.load(Ordering::Acquire)
    }
    /// First frame the leaf maps.
    pub fn pfn(&self) -> Pfn {
        self.fmt.frame_at_level(self.value(), self.size.level())
    }
    /// Frame that backs `gpa`, or `None` when `gpa` lies outside the
    /// leaf's page (below `self.gpa` or at or past its end).
    pub fn pfn_of(&self, gpa: Gpa) -> Option<Pfn> {
        let off = gpa.0.checked_sub(self.gpa.0)?;
        if off >= self.size.bytes() {
            return None;
        }
        // The leaf's frame fits the format (< 2^40) and the offset is less
        // than the page: no overflow.
        Some(Pfn(self.pfn().0 + (off >> 12)))
    }
    /// Protection the leaf grants.
    pub fn prot(&self) -> Prot {
        self.fmt.prot(self.value())
    }
    /// Accessed state.
    pub fn accessed(&self) -> bool {
        self.fmt.accessed(self.value())
    }
    /// Dirty state.
    pub fn dirty(&self) -> bool {
        self.fmt.dirty(self.value())
    }
    /// Sets (`on`) or clears the accessed state atomically; returns the old
    /// state. For the emulated format, clearing also revokes the hardware
    /// write bit and keeps a pending dirty state in software bit 55.
    pub fn reset_accessed(&self, on: bool) -> bool {
        let fmt = self.fmt;
        if on {
            let cur = self.value();
            let old = self.entry.fetch_or(fmt.set_accessed_bits(cur), Ordering::AcqRel);
            return fmt.accessed(old);
        }
        let mut cur = self.value();
        loop {
            let new = fmt.clear_accessed(cur);
            if new == cur {
                return fmt.accessed(cur);
            }
            match self.entry.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return fmt.accessed(cur),
                Err(v) => cur = v,
            }
        }
    }
    /// Sets (`on`) or clears the dirty state atomically; returns the old
    /// state. Setting never grants write access the mapping lacks.
    pub fn reset_dirty(&self, on: bool) -> bool {
        let fmt = self.fmt;
        let old = if on {
            self.entry.fetch_or(fmt.set_dirty_bits(), Ordering::AcqRel)
        } else {
            self.entry.fetch_and(!fmt.dirty_mask(), Ordering::AcqRel)
        };
        fmt.dirty(old)
    }
}

/// Where [`NestedTable::descend`] stopped.
enum Descent<'a> {
    /// At the leaf table (level 1) that holds the address's entry.
    Table(&'a Table),
    /// At a present large leaf: its entry, page size and value.
    Large(&'a AtomicU64, PageSize, u64),
    /// At a non-present entry (or an address past the 48-bit space).
    Absent,
}

/// The present 4 KiB leaf for `g` in its leaf table `t`, read with
/// acquire ordering.
#[inline(always)]
fn leaf_4k<K: Kind>(t: &Table, g: u64) -> Option<(&AtomicU64, PageSize, u64)> {
    let s1 = &t[index(1, g)];
    let e1 = s1.load(Ordering::Acquire);
    if e1 & K::PRESENT == 0 {
        return None;
    }
    Some((s1, PageSize::Size4K, e1))
}

/// Frame of the 4 KiB page holding `g` and protection, from the present
/// leaf value `v` of a page of `size` (`am`: the format's address mask).
#[inline(always)]
fn decode<K: Kind>(am: u64, g: u64, size: PageSize, v: u64) -> (Pfn, Prot) {
    if size == PageSize::Size4K {
        return (Pfn((v & am) >> 12), K::prot(v));
    }
    // The host address: the leaf's page base (its low bits are PAT or
    // reserved in large leaves) plus the offset into it.
    let low = size.bytes() - 1;
    let hpa = (v & am & !low) | (g & low);
    (Pfn(hpa >> 12), K::prot(v))
}

/// Lookups that remember the last leaf table they used; see
/// [`NestedTable::lookup_cursor`].
///
/// The cursor borrows the table, so no table page can be freed while it
/// lives (that takes `&mut`) and the leaf table it remembers stays the one
/// the tree holds for that 2 MiB: populate and vacate cannot run, and no
/// `&self` operation of the tree replaces a table entry (maps fill empty
/// entries, unmaps clear leaves). What it does not see is a table entry
/// rewritten by its user through [`NestedTable::entry`] after the cursor
/// passed it: lookups keep using the leaf table they found (a page of this
/// table either way, so nothing unsafe follows). Each result is read from
/// the leaf entry at the time of the call, as with [`NestedTable::lookup`].
pub struct LookupCursor<'a, P: TablePages> {
    t: &'a NestedTable<P>,
    /// `gpa >> 21` of the remembered leaf table; `u64::MAX` (which no
    /// address matches) before the first 4 KiB leaf is found.
    tag: u64,
    /// The remembered leaf table (the root until one is found).
    leaf: &'a Table,
}

impl<'a, P: TablePages> LookupCursor<'a, P> {
    /// What [`NestedTable::is_mapped`] returns for `gpa`.
    #[inline]
    pub fn is_mapped(&mut self, gpa: Gpa) -> Option<(Pfn, Prot)> {
        let fmt = &self.t.fmt;
        with_kind!(fmt, K => {
            let (_, size, v) = self.find::<K>(gpa.0)?;
            Some(decode::<K>(fmt.addr_mask(), gpa.0, size, v))
        })
    }

    /// What [`NestedTable::lookup`] returns for `gpa`.
    #[inline]
    pub fn lookup(&mut self, gpa: Gpa) -> Option<Leaf<'a>> {
        let fmt = &self.t.fmt;
        let (entry, size, _) = with_kind!(fmt, K => self.find::<K>(gpa.0))?;
        Some(Leaf { gpa: Gpa(gpa.0 & !(size.bytes() - 1)), size, entry, fmt })
    }

    #[inline(always)]
    fn find<K: Kind>(&mut self, g: u64) -> Option<(&'a AtomicU64, PageSize, u64)> {
        // `tag` is below 2^27 once set, so an address past the 48-bit
        // space never matches it.
        if g >> 21 == self.tag {
            return leaf_4k::<K>(self.leaf, g);
        }
        match self.t.descend::<K>(g) {
            Descent::Table(t) => {
                self.tag = g >> 21;
                self.leaf = t;
                leaf_4k::<K>(t, g)
            }
            Descent::Large(s, size, e) => Some((s, size, e)),
            Descent::Absent => None,
        }
    }
}

/// A four-level nested page table.
pub struct NestedTable<P: TablePages> {
    fmt: PteFormat,
    pages: P,
    root: Node,
    /// The root table page, as `pages.ptr(root.pfn)` returned it in `new`.
    root_ptr: RootPtr,
    /// Table pages in use, the root included.
    tables: usize,
}

/// The address of a table's root page, kept so that walks start without
/// asking the provider (one load instead of the provider's conversion).
#[derive(Clone, Copy)]
struct RootPtr(core::ptr::NonNull<Table>);

// SAFETY: the pointer names a page of the table's own provider and is only
// turned into a shared reference to atomics (`Table` is `Sync`); whether a
// `NestedTable` may be sent or shared between threads is decided by its
// other fields (the provider among them), as it is for the pages the
// provider hands out.
unsafe impl Send for RootPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for RootPtr {}

impl<P: TablePages> NestedTable<P> {
    /// An empty table (just the root page).
    ///
    /// Refused with [`Error::NoMemory`] when the provider has no page (or
    /// hands out one it cannot convert to a pointer), and with
    /// [`Error::OutOfRange`] when the page's frame is past the format's
    /// physical-address width ([`PteFormat::frame_fits`]): the root pointer
    /// could not name it. Every table page the tree takes later is checked
    /// the same way.
    pub fn new(format: PteFormat, mut pages: P) -> Result<Self, Error> {
        let (root, _) = alloc_table(&mut pages, &format, 4)?;
        // `alloc_table` checked the pointer non-null; a provider that
        // answers differently now gets its page back.
        let Some(root_ptr) = core::ptr::NonNull::new(pages.ptr(root).cast::<Table>()) else {
            // SAFETY: the page was just allocated and nothing points at it.
            unsafe { pages.free(root) };
            return Err(Error::NoMemory);
        };
        let mut t =
            NestedTable { fmt: format, pages, root: Node::new(root, 0), root_ptr: RootPtr(root_ptr), tables: 1 };
        if format.levels() == 3 {
            // The top table of a three-level walk: the level-3 table under
            // the root's entry 0, pinned (a reservation nothing releases)
            // so that no vacate frees it. Dropping `t` on error gives the
            // root back.
            let (pfn, entry) = alloc_table(&mut t.pages, &format, 4)?;
            t.root_table()[0].store(entry, Ordering::Release);
            let mut top = Node::new(pfn, 0);
            top.reserved = 1;
            t.root.children.push(top);
            t.tables += 1;
        }
        Ok(t)
    }

    /// The top table the hardware walks: the root, or for a three-level
    /// format ([`PteFormat::vtd_3level`]) the level-3 table under the
    /// root's entry 0. This is what a root pointer or a context entry
    /// names.
    pub fn hw_root(&self) -> Pfn {
        if self.fmt.levels() == 3 { self.root.children.first().map_or(self.root.pfn, |c| c.pfn) } else { self.root.pfn }
    }

    /// [`check_range`] within this table's format's width.
    fn check(&self, gpa: Gpa, len: u64, align: PageSize) -> Result<u64, Error> {
        let end = check_range(gpa, len, align)?;
        if end > self.fmt.gpa_limit() {
            return Err(Error::OutOfRange);
        }
        Ok(end)
    }

    /// The entry format.
    pub fn format(&self) -> &PteFormat {
        &self.fmt
    }
    /// The table-page provider.
    pub fn pages(&self) -> &P {
        &self.pages
    }
    /// The root table's frame.
    pub fn root(&self) -> Pfn {
        self.root.pfn
    }
    /// The root pointer for hardware: EPTP or nCR3.
    pub fn root_pointer(&self, track_dirty: bool) -> u64 {
        self.fmt.root_pointer(self.hw_root(), track_dirty)
    }

    #[inline(always)]
    fn table(&self, pfn: Pfn) -> Option<&Table> {
        table_of(&self.pages, pfn)
    }

    #[inline(always)]
    fn root_table(&self) -> &Table {
        // SAFETY: `root_ptr` is what the provider's `ptr` returned for the
        // root page in `new`; the root page stays allocated until `drop`,
        // and the `TablePages` contract keeps such a pointer valid (for
        // reads and atomic writes, 8-byte aligned, 4096 bytes) until the
        // page is freed, wherever the provider value moves. The reference
        // borrows `self`, so it cannot outlive the table.
        unsafe { self.root_ptr.0.as_ref() }
    }

    // ---------------------------------------------------------------
    // Structure: populate and vacate.
    // ---------------------------------------------------------------

    /// Creates the tables that leaves of size `leaf` in `[gpa, gpa+len)`
    /// need, and counts the range's entries in them. Both `gpa` and `len`
    /// must be multiples of the leaf size.
    ///
    /// On error nothing changes: the tables created are freed and the
    /// counts taken are released. Besides the range errors, refused with
    /// [`Error::NoMemory`] when the provider runs out, [`Error::OutOfRange`]
    /// when it hands out a page whose frame the format cannot address,
    /// [`Error::AlreadyMapped`] where a large leaf sits where a table is
    /// needed, and [`Error::CountOverflow`] when a table's count of
    /// reserved entries would overflow (overlapping populates).
    pub fn populate_region(&mut self, gpa: Gpa, len: u64, leaf: PageSize) -> Result<(), Error> {
        let end = self.check(gpa, len, leaf)?;
        if !self.fmt.supports(leaf) {
            return Err(Error::UnsupportedSize);
        }
        let mut progress = gpa.0;
        let r = populate(
            &mut self.root,
            4,
            gpa.0,
            end,
            leaf.level(),
            &mut self.pages,
            &self.fmt,
            &mut progress,
            &mut self.tables,
        );
        if let Err(e) = r {
            // Undo the counts taken before the failure and free the tables
            // created for nothing.
            if progress > gpa.0 {
                uncount(&mut self.root, 4, gpa.0, progress, leaf.level());
            }
            prune(&mut self.root, 4, gpa.0, end, &mut self.pages, &self.fmt, false, &mut self.tables);
            return Err(e);
        }
        Ok(())
    }

    /// Releases the counts `populate_region` took for the same range and
    /// leaf size, and frees tables left with nothing, bottom-up (never the
    /// root). The range must map no pages any more.
    pub fn vacate_region(&mut self, gpa: Gpa, len: u64, leaf: PageSize) -> Result<(), Error> {
        let end = self.check(gpa, len, leaf)?;
        if !self.fmt.supports(leaf) {
            return Err(Error::UnsupportedSize);
        }
        if !counted(&self.root, 4, gpa.0, end, leaf.level()) {
            return Err(Error::NotPopulated);
        }
        // One straight run of vector loads ORed together (no branch per
        // entry; 64-byte loads with AVX-512, the unit the harvest uses):
        // some entry is present exactly when the OR has a present bit.
        let simd = harvest::simd();
        let mut all = 0u64;
        self.for_each_leaf_table(gpa, len, |_, entries, _| all |= harvest::or_entries(simd, entries));
        if self.fmt.is_present(all) {
            return Err(Error::StillMapped);
        }
        uncount(&mut self.root, 4, gpa.0, end, leaf.level());
        prune(&mut self.root, 4, gpa.0, end, &mut self.pages, &self.fmt, false, &mut self.tables);
        Ok(())
    }

    /// Unmaps every leaf in `[gpa, gpa+len)` and vacates the range in one
    /// pass (what `unmap_region` then `vacate_region` do, at close to the
    /// cost of reading the leaf entries once): leaf tables freed by the
    /// vacate are only counted, not cleared entry by entry, since they
    /// leave the hardware's view with their parent entry. Returns the
    /// number of 4 KiB pages that were mapped. The caller must invalidate
    /// cached translations before the freed pages are reused.
    pub fn unmap_vacate_region(&mut self, gpa: Gpa, len: u64, leaf: PageSize) -> Result<u64, Error> {
        let end = self.check(gpa, len, leaf)?;
        if !self.fmt.supports(leaf) {
            return Err(Error::UnsupportedSize);
        }
        if !counted(&self.root, 4, gpa.0, end, leaf.level()) {
            return Err(Error::NotPopulated);
        }
        self.check_no_split(gpa.0, end)?;
        uncount(&mut self.root, 4, gpa.0, end, leaf.level());
        let n = prune(&mut self.root, 4, gpa.0, end, &mut self.pages, &self.fmt, true, &mut self.tables);
        core::sync::atomic::fence(Ordering::Release);
        Ok(n)
    }

    /// Table pages in use, the root included.
    pub fn table_pages(&self) -> usize {
        self.tables
    }

    /// Bytes the table costs: its pages plus the software shadow.
    pub fn table_bytes(&self) -> usize {
        fn meta(n: &Node) -> usize {
            n.children.capacity() * core::mem::size_of::<Node>() + n.children.iter().map(meta).sum::<usize>()
        }
        self.table_pages() * 4096 + core::mem::size_of::<Self>() + meta(&self.root)
    }

    // ---------------------------------------------------------------
    // Entries: map, unmap, lookup, walk.
    // ---------------------------------------------------------------

    /// The table at `level` that holds `gpa`'s entry, walking down only
    /// through table entries: [`Error::NotPopulated`] where one is missing,
    /// [`Error::AlreadyMapped`] where a large leaf sits above `level`.
    #[inline(always)]
    fn table_at(&self, gpa: u64, level: u8) -> Result<&Table, Error> {
        with_kind!(self.fmt, K => self.table_at_k::<K>(gpa, level))
    }

    /// [`table_at`](Self::table_at) specialized for the format kind `K`.
    #[inline(always)]
    fn table_at_k<K: Kind>(&self, gpa: u64, level: u8) -> Result<&Table, Error> {
        // Clearing the low bits again is free and tells the compiler the
        // frame-to-address round trip is a no-op.
        let am = self.fmt.addr_mask() & !0xfff;
        let mut table = self.root_table();
        let mut l = 4;
        while l > level {
            // Relaxed: see `find`.
            let e = table[index(l, gpa)].load(Ordering::Relaxed);
            if e & K::PRESENT == 0 {
                return Err(Error::NotPopulated);
            }
            if l < 4 && e & LARGE != 0 {
                return Err(Error::AlreadyMapped { same_frame: false });
            }
            table = self.table(Pfn((e & am) >> 12)).ok_or(Error::NotPopulated)?;
            l -= 1;
        }
        Ok(table)
    }

    /// Maps `pfn` at `gpa` as a page of `size`: a compare-and-swap from an
    /// empty entry, safe against other threads mapping, unmapping or
    /// faulting on the same table at the same time. This is the form for
    /// fault handlers and other `&self` users; a caller that owns the table
    /// exclusively (building a table before it is shared, a single-threaded
    /// tool) should use [`map_exclusive`](Self::map_exclusive), which stores
    /// plainly and is several times faster on random addresses. The tables
    /// must have been populated with leaves of that size.
    #[inline]
    pub fn map(&self, gpa: Gpa, pfn: Pfn, size: PageSize, prot: Prot, mt: MemType) -> Result<(), Error> {
        with_kind!(self.fmt, K => self.map_k::<K, false>(gpa, pfn, size, prot, mt))
    }

    /// [`map`](Self::map) for a caller with exclusive access to the table
    /// (`&mut self`: no other thread maps, unmaps or reads it meanwhile;
    /// hardware may walk it): the empty entry is checked with a plain load
    /// and filled with a plain store, no locked compare-and-swap, so the
    /// walks of consecutive calls overlap their cache misses. Same checks,
    /// errors and result as `map`.
    #[inline]
    pub fn map_exclusive(&mut self, gpa: Gpa, pfn: Pfn, size: PageSize, prot: Prot, mt: MemType) -> Result<(), Error> {
        with_kind!(self.fmt, K => self.map_k::<K, true>(gpa, pfn, size, prot, mt))
    }

    /// [`map`](Self::map) specialized for the format kind `K`; `EXCLUSIVE`
    /// callers hold `&mut self`.
    #[inline(always)]
    fn map_k<K: Kind, const EXCLUSIVE: bool>(
        &self,
        gpa: Gpa,
        pfn: Pfn,
        size: PageSize,
        prot: Prot,
        mt: MemType,
    ) -> Result<(), Error> {
        if !gpa.is_aligned(size) {
            return Err(Error::Unaligned);
        }
        if gpa.0 >= self.fmt.gpa_limit() {
            return Err(Error::OutOfRange);
        }
        let new = self.fmt.leaf_entry_k::<K>(pfn, size, prot, mt)?;
        let level = size.level();
        let slot = &self.table_at_k::<K>(gpa.0, level)?[index(level, gpa.0)];
        let old = if EXCLUSIVE {
            // Exclusive access: no software changes the entry between the
            // load and the store, and hardware never writes an empty entry.
            let old = slot.load(Ordering::Relaxed);
            if old == 0 {
                slot.store(new, Ordering::Release);
                return Ok(());
            }
            old
        } else {
            match slot.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(old) => old,
            }
        };
        let same = self.fmt.is_leaf(old, level) && self.fmt.frame_at_level(old, level) == pfn;
        Err(Error::AlreadyMapped { same_frame: same })
    }

    /// Maps each 4 KiB page of `[gpa, gpa+len)` to the frame `frame(gpa)`
    /// returns (`None` skips the page), visiting each leaf table once; each
    /// entry is a compare-and-swap from empty, so concurrent faults are
    /// fine. Pages already mapped are left as they are. Returns the number
    /// of pages this call mapped.
    ///
    /// The range's leaf tables must exist (checked before anything
    /// changes). A frame the format cannot address
    /// ([`PteFormat::frame_fits`]) fails the call with
    /// [`Error::OutOfRange`] and nothing stays changed: the entries this
    /// call installed before it are cleared again. Each is cleared only
    /// while it still holds this call's protection and memory type,
    /// whatever accessed/dirty bits it gained; one unmapped meanwhile is
    /// left alone. (The frame is not re-checked: an unmap and remap of the
    /// same entry, same protection, by another thread during the call would
    /// be cleared too; callers own their ranges, which excludes that.)
    /// `frame` has then been called
    /// for the pages up to the refused one. Other threads and the hardware
    /// may have used those entries in the moment they existed: they mapped
    /// the frames the caller gave, and accessed/dirty bits set through them
    /// are lost with them, so a caller that tracks dirty pages treats those
    /// frames as possibly written. A concurrent `map_range` over an
    /// overlapping range may have found such an entry in place (and not
    /// counted it as its own): after the rollback that page is empty again,
    /// so a fault handler must look its page up again rather than assume
    /// it is mapped.
    pub fn map_range(
        &self,
        gpa: Gpa,
        len: u64,
        prot: Prot,
        mt: MemType,
        frame: impl FnMut(Gpa) -> Option<Pfn>,
    ) -> Result<u64, Error> {
        self.fill(gpa, len, prot, mt, frame, false)
    }

    /// [`map_range`](Self::map_range) for a caller with exclusive access
    /// (no other thread maps or unmaps meanwhile): plain stores instead of
    /// locked compare-and-swaps. Errors roll back as `map_range` does.
    pub fn map_range_exclusive(
        &mut self,
        gpa: Gpa,
        len: u64,
        prot: Prot,
        mt: MemType,
        frame: impl FnMut(Gpa) -> Option<Pfn>,
    ) -> Result<u64, Error> {
        self.fill(gpa, len, prot, mt, frame, true)
    }

    /// The leaf table (level 1) that holds `gpa`'s entry.
    #[inline(always)]
    fn leaf_table(&self, gpa: u64) -> Result<&Table, Error> {
        self.table_at(gpa, 1)
    }

    fn fill(
        &self,
        gpa: Gpa,
        len: u64,
        prot: Prot,
        mt: MemType,
        mut frame: impl FnMut(Gpa) -> Option<Pfn>,
        exclusive: bool,
    ) -> Result<u64, Error> {
        let end = self.check(gpa, len, PageSize::Size4K)?;
        // Validate protection and the tables' presence before changing
        // anything; the entry for frame 0 is the template for all.
        let template = self.fmt.leaf_entry(Pfn(0), PageSize::Size4K, prot, mt)?;
        let limit = self.fmt.frame_limit();
        // Check every leaf table exists before changing anything; a range
        // inside one leaf table (a fault-around window) is checked by the
        // walk that maps it.
        if gpa.0 >> 21 != (end - 1) >> 21 {
            let mut a = gpa.0;
            while a < end {
                self.leaf_table(a)?;
                a = (a | (entry_span(2) - 1)) + 1;
            }
        }
        // The entries this call installed, one 512-bit set per leaf table,
        // to undo them if a later frame is refused. Only a range spanning
        // several leaf tables keeps the sets of the tables it finished.
        let mut done: Vec<(u64, [u64; 8])> = Vec::new();
        let mut mapped = 0;
        let mut a = gpa.0;
        while a < end {
            let table_end = ((a | (entry_span(2) - 1)) + 1).min(end);
            let first = index(1, a);
            let n = ((table_end - a) >> 12) as usize;
            let table = match self.leaf_table(a) {
                Ok(t) => t,
                Err(e) => {
                    self.unfill(&done, None, template, exclusive);
                    return Err(e);
                }
            };
            let mut ours = [0u64; 8];
            for (i, slot) in table[first..first + n].iter().enumerate() {
                let page = Gpa(a + ((i as u64) << 12));
                let Some(pfn) = frame(page) else { continue };
                if pfn.0 >= limit {
                    self.unfill(&done, Some((table, &ours)), template, exclusive);
                    return Err(Error::OutOfRange);
                }
                let new = template | (pfn.0 << 12);
                let installed = if exclusive {
                    slot.load(Ordering::Relaxed) == 0 && {
                        slot.store(new, Ordering::Relaxed);
                        true
                    }
                } else {
                    slot.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire).is_ok()
                };
                if installed {
                    let k = first + i;
                    ours[k / 64] |= 1 << (k % 64);
                    mapped += 1;
                }
            }
            if table_end < end {
                done.push((a, ours));
            }
            a = table_end;
        }
        if exclusive {
            core::sync::atomic::fence(Ordering::Release);
        }
        Ok(mapped)
    }

    /// Undoes a failed [`fill`](Self::fill): clears the entries marked in
    /// the sets of the finished leaf tables (`done`, by the address of
    /// their first page) and of the current one. Shared mode clears an
    /// entry only while it still holds what the fill stored, up to the
    /// accessed/dirty bits hardware and other threads may have set since
    /// (and up to the frame, which the sets do not keep: only an unmap
    /// and remap of that very entry by another thread meanwhile, which the
    /// caller's range ownership excludes, could change it).
    #[cold]
    fn unfill(&self, done: &[(u64, [u64; 8])], current: Option<(&Table, &[u64; 8])>, template: u64, exclusive: bool) {
        let keep = !(self.fmt.addr_mask() | self.fmt.accessed_mask() | self.fmt.dirty_mask());
        let clear = |table: &Table, set: &[u64; 8]| {
            for (w, &bits) in set.iter().enumerate() {
                let mut b = bits;
                while b != 0 {
                    let slot = &table[w * 64 + b.trailing_zeros() as usize];
                    b &= b - 1;
                    if exclusive {
                        slot.store(0, Ordering::Relaxed);
                        continue;
                    }
                    let mut v = slot.load(Ordering::Acquire);
                    while v != 0 && v & keep == template & keep {
                        match slot.compare_exchange_weak(v, 0, Ordering::AcqRel, Ordering::Acquire) {
                            Ok(_) => break,
                            Err(now) => v = now,
                        }
                    }
                }
            }
        };
        for (base, set) in done {
            // The finished tables existed a moment ago and only `&mut self`
            // can free a table.
            if let Ok(table) = self.leaf_table(*base) {
                clear(table, set);
            }
        }
        if let Some((table, set)) = current {
            clear(table, set);
        }
        core::sync::atomic::fence(Ordering::Release);
    }

    /// The present leaf that maps `gpa`, if any.
    #[inline]
    pub fn lookup(&self, gpa: Gpa) -> Option<Leaf<'_>> {
        let (entry, size, _) = with_kind!(self.fmt, K => self.find::<K>(gpa.0))?;
        Some(Leaf { gpa: Gpa(gpa.0 & !(size.bytes() - 1)), size, entry, fmt: &self.fmt })
    }

    /// The present leaf entry that maps `g`, the size of its page and the
    /// value read from it, for the format kind `K`: [`descend`](Self::descend)
    /// and, for a 4 KiB page, one acquire load of the leaf.
    #[inline(always)]
    fn find<K: Kind>(&self, g: u64) -> Option<(&AtomicU64, PageSize, u64)> {
        match self.descend::<K>(g) {
            Descent::Table(t) => leaf_4k::<K>(t, g),
            Descent::Large(s, size, e) => Some((s, size, e)),
            Descent::Absent => None,
        }
    }

    /// Walks from the root towards `g` for the format kind `K` and stops
    /// at the leaf table (level 1) that holds `g`'s entry, at a large leaf,
    /// or at a non-present entry.
    ///
    /// Unrolled: the levels are known, so each step is a load, a mask test
    /// with the format's present bit as an immediate, and an address
    /// computation, with nothing between lookups that stops the processor
    /// overlapping their cache misses. Each table pointer still goes
    /// through the provider's `ptr` (for the arena providers a subtraction
    /// and one compare on the entry's address field, beside the walk's
    /// critical path): entries are reachable for writing through
    /// [`entry`](Self::entry) and through the `entry` of a large [`Leaf`],
    /// so safe code can put any value in a table entry and an entry is not
    /// trusted to name one of the provider's pages. The root is: it is
    /// allocated for the table's whole life.
    ///
    /// Table entries are read relaxed: tables are created and freed only
    /// under `&mut self`, so a walk under `&self` is already ordered after
    /// the stores that made the tables it meets. A large leaf's read is
    /// followed by an acquire fence, as a 4 KiB leaf's read is an acquire,
    /// so a caller that sees a mapping sees what the mapping thread did
    /// before it mapped.
    #[inline(always)]
    fn descend<K: Kind>(&self, g: u64) -> Descent<'_> {
        if g >= self.fmt.gpa_limit() {
            return Descent::Absent;
        }
        let am = self.fmt.addr_mask() & !0xfff;
        let e4 = self.root_table()[index(4, g)].load(Ordering::Relaxed);
        if e4 & K::PRESENT == 0 {
            return Descent::Absent;
        }
        let Some(t3) = self.table(Pfn((e4 & am) >> 12)) else { return Descent::Absent };
        let s3 = &t3[index(3, g)];
        let e3 = s3.load(Ordering::Relaxed);
        if e3 & K::PRESENT == 0 {
            return Descent::Absent;
        }
        if e3 & LARGE != 0 {
            fence(Ordering::Acquire);
            return Descent::Large(s3, PageSize::Size1G, e3);
        }
        let Some(t2) = self.table(Pfn((e3 & am) >> 12)) else { return Descent::Absent };
        let s2 = &t2[index(2, g)];
        let e2 = s2.load(Ordering::Relaxed);
        if e2 & K::PRESENT == 0 {
            return Descent::Absent;
        }
        if e2 & LARGE != 0 {
            fence(Ordering::Acquire);
            return Descent::Large(s2, PageSize::Size2M, e2);
        }
        match self.table(Pfn((e2 & am) >> 12)) {
            Some(t1) => Descent::Table(t1),
            None => Descent::Absent,
        }
    }

    /// The frame backing the 4 KiB page that contains `gpa`, and the
    /// protection, when mapped: one walk and one read of the leaf (frame
    /// and protection are decoded from that one value). For runs of
    /// lookups near each other, [`lookup_cursor`](Self::lookup_cursor)
    /// skips the walk while they stay in one leaf table.
    #[inline]
    pub fn is_mapped(&self, gpa: Gpa) -> Option<(Pfn, Prot)> {
        with_kind!(self.fmt, K => {
            let (_, size, v) = self.find::<K>(gpa.0)?;
            Some(decode::<K>(self.fmt.addr_mask(), gpa.0, size, v))
        })
    }

    /// A lookup cursor: [`is_mapped`](LookupCursor::is_mapped) and
    /// [`lookup`](LookupCursor::lookup) that remember the leaf table of
    /// the last 4 KiB page they found and go straight to it while the
    /// addresses stay in its 2 MiB, walking from the root only when they
    /// leave it (sequential scans walk once per 512 pages).
    pub fn lookup_cursor(&self) -> LookupCursor<'_, P> {
        LookupCursor { t: self, tag: u64::MAX, leaf: self.root_table() }
    }

    /// The entries on the path to `gpa`, root first, ending at a leaf or a
    /// non-present entry.
    pub fn walk(&self, gpa: Gpa) -> Walk {
        let mut w = Walk::default();
        if gpa.0 >= self.fmt.gpa_limit() {
            return w;
        }
        let mut pfn = self.root.pfn;
        let mut level = 4;
        while let Some(table) = self.table(pfn) {
            let i = index(level, gpa.0);
            let e = table[i].load(Ordering::Acquire);
            w.steps[w.len] = WalkStep { level, table: pfn, index: i as u16, entry: e };
            w.len += 1;
            if !self.fmt.is_present(e) || self.fmt.is_leaf(e, level) {
                break;
            }
            pfn = self.fmt.frame(e);
            level -= 1;
        }
        w
    }

    /// The entry a walk step read, for atomic access to upper-level
    /// entries (aging accessed bits in tables, fault injection in tests).
    /// `None` when the step's table is not one of this table's pages.
    pub fn entry(&self, step: &WalkStep) -> Option<&AtomicU64> {
        Some(&self.table(step.table)?[step.index as usize % ENTRIES])
    }

    /// Unmaps the leaf whose page starts at `gpa`. Returns whether a leaf
    /// was present. An address inside a large page is refused
    /// ([`Error::WouldSplit`]).
    pub fn unmap(&self, gpa: Gpa) -> Result<bool, Error> {
        if !gpa.is_aligned(PageSize::Size4K) {
            return Err(Error::Unaligned);
        }
        let Some(leaf) = self.lookup(gpa) else { return Ok(false) };
        if leaf.gpa != gpa {
            return Err(Error::WouldSplit);
        }
        let old = leaf.entry.swap(0, Ordering::AcqRel);
        Ok(self.fmt.is_present(old))
    }

    /// Refuses a range whose ends cut through a large leaf.
    fn check_no_split(&self, start: u64, end: u64) -> Result<(), Error> {
        for a in [start, end - 1] {
            if let Some(leaf) = self.lookup(Gpa(a))
                && (leaf.gpa.0 < start || leaf.gpa.0 + leaf.size.bytes() > end)
            {
                return Err(Error::WouldSplit);
            }
        }
        Ok(())
    }

    /// Unmaps every leaf in `[gpa, gpa+len)`, visiting each leaf table
    /// once. Returns the number of 4 KiB pages unmapped (a 2 MiB leaf
    /// counts 512).
    pub fn unmap_region(&self, gpa: Gpa, len: u64) -> Result<u64, Error> {
        let end = self.check(gpa, len, PageSize::Size4K)?;
        self.check_no_split(gpa.0, end)?;
        // Plain (unlocked) loads and stores: an unmap does not need the old
        // accessed/dirty bits, hardware only ever sets A/D in an entry it
        // read as present, and a concurrent software change of an entry in
        // a range being unmapped can only make the returned count stale.
        let mut count = 0;
        self.for_each_leaf_table(gpa, len, |_, entries, size| {
            for e in entries {
                if self.fmt.is_present(e.load(Ordering::Relaxed)) {
                    e.store(0, Ordering::Relaxed);
                    count += size.pages();
                }
            }
        });
        // Publish the cleared entries before the caller invalidates.
        core::sync::atomic::fence(Ordering::Release);
        Ok(count)
    }

    // ---------------------------------------------------------------
    // Accessed and dirty.
    // ---------------------------------------------------------------

    /// Sets or clears the accessed state of the leaf mapping `gpa`;
    /// returns the old state.
    pub fn reset_accessed(&self, gpa: Gpa, on: bool) -> Result<bool, Error> {
        Ok(self.lookup(gpa).ok_or(Error::NotMapped)?.reset_accessed(on))
    }

    /// Sets or clears the dirty state of the leaf mapping `gpa`; returns the
    /// old state.
    pub fn reset_dirty(&self, gpa: Gpa, on: bool) -> Result<bool, Error> {
        Ok(self.lookup(gpa).ok_or(Error::NotMapped)?.reset_dirty(on))
    }

    /// Records `access` to `gpa` as the hardware would: accessed, and dirty
    /// for a write. This is the fault path of the emulated-A/D format (it
    /// sets the hardware permission bits, so the next access does not
    /// fault); for the other formats it marks the bits in software (device
    /// emulation). Returns `Ok(false)` when the mapping's permission does
    /// not allow the access (a real violation).
    pub fn record_access(&self, gpa: Gpa, access: Access) -> Result<bool, Error> {
        let leaf = self.lookup(gpa).ok_or(Error::NotMapped)?;
        match self.fmt.access_bits(leaf.value(), access) {
            Some(bits) => {
                leaf.entry.fetch_or(bits, Ordering::AcqRel);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Reads the dirty state of every 4 KiB page of `[gpa, gpa+len)` into
    /// `bitmap` (bit `i` = page `gpa + i*4096`; pages without a leaf read
    /// 0) and, when `clear`, clears it in the leaves, visiting each leaf
    /// table once. Returns the number of dirty pages.
    pub fn scan_dirty(&self, gpa: Gpa, len: u64, bitmap: &mut [u64], clear: bool) -> Result<u64, Error> {
        self.dirty_pass(gpa, len, bitmap, if clear { Clear::Txn } else { Clear::No }, harvest::simd())
    }

    /// Read-and-clear of the dirty state into `bitmap`: see
    /// [`scan_dirty`](Self::scan_dirty). Each dirty entry is cleared
    /// atomically, so this is safe against any concurrent use of the table
    /// (vCPU faults, holds marking pages dirty, unmaps, hardware): where
    /// the processor has AVX-512 and RTM, a whole leaf table is scanned and
    /// its dirty entries cleared with plain stores inside one hardware
    /// transaction, which another writer's access aborts; a table whose
    /// transaction aborts (and every table elsewhere) is cleared with one
    /// locked AND per dirty entry.
    pub fn harvest_dirty(&self, gpa: Gpa, len: u64, bitmap: &mut [u64]) -> Result<u64, Error> {
        self.dirty_pass(gpa, len, bitmap, Clear::Txn, harvest::simd())
    }

    /// [`harvest_dirty`](Self::harvest_dirty) for a caller with exclusive
    /// access: no software can change an entry meanwhile, and hardware only
    /// ever sets accessed/dirty bits, which are already set in an entry
    /// that reads dirty, so each dirty entry is cleared with a plain store
    /// instead of a locked operation.
    pub fn harvest_dirty_exclusive(&mut self, gpa: Gpa, len: u64, bitmap: &mut [u64]) -> Result<u64, Error> {
        self.dirty_pass(gpa, len, bitmap, Clear::Plain, harvest::simd())
    }

    fn dirty_pass(
        &self,
        gpa: Gpa,
        len: u64,
        bitmap: &mut [u64],
        clear: Clear,
        simd: harvest::Simd,
    ) -> Result<u64, Error> {
        with_kind!(self.fmt, K => self.dirty_pass_k::<K>(gpa, len, bitmap, clear, simd))
    }

    /// [`dirty_pass`](Self::dirty_pass) specialized for the format kind
    /// `K`, with the vector unit `simd`. Each leaf table's entries are
    /// read with plain vector loads (equivalent to relaxed atomic loads;
    /// see `harvest::scan_words`), their dirty bits gathered 64 to a word
    /// without branches, and only then are the entries that read dirty
    /// cleared (a locked AND for `Clear::Locked`; for `Clear::Plain` the
    /// AVX-512 path clears them in the scan itself, with masked stores).
    /// An entry that reads clean is not written, so a dirty bit the
    /// hardware or another thread sets after the read is kept for the next
    /// pass; one that reads dirty is cleared by an atomic AND of that bit
    /// alone, so the other bits set meanwhile are kept too (a dirty bit set
    /// again between the read and the clear is the same dirty state,
    /// reported by this pass).
    #[inline(always)]
    fn dirty_pass_k<K: Kind>(
        &self,
        gpa: Gpa,
        len: u64,
        bitmap: &mut [u64],
        clear: Clear,
        simd: harvest::Simd,
    ) -> Result<u64, Error> {
        let end = self.check(gpa, len, PageSize::Size4K)?;
        let pages = len >> 12;
        if (bitmap.len() as u64).saturating_mul(64) < pages {
            return Err(Error::BitmapTooSmall);
        }
        self.check_no_split(gpa.0, end)?;
        let dmask = K::DIRTY;
        let mut count = 0;
        // The bitmap's bits are written once each, in address order: a
        // leaf table's as the words it gathered, a large leaf's set, and
        // the gaps before them (and after the last) cleared; `written` is
        // where the next gap starts.
        let mut written = 0u64;
        // Whole-table transactions that failed in a row: past
        // `TXN_GIVE_UP` (a processor whose RTM aborts everything, or a
        // range under heavy concurrent writes) the pass stops trying them.
        let mut txn_fails = 0usize;
        self.for_each_leaf_table(gpa, len, |base, entries, size| {
            if size == PageSize::Size4K {
                let first = (base.0 - gpa.0) >> 12;
                // A whole leaf table at a word boundary of the bitmap (the
                // common case): scanned straight into the bitmap's words.
                if let Ok(table) = <&Table>::try_from(entries)
                    && first.is_multiple_of(64)
                {
                    fill_bits(bitmap, written, first.saturating_sub(written), false);
                    let w0 = (first / 64) as usize;
                    if let Some(dst) = bitmap.get_mut(w0..w0 + ENTRIES / 64)
                        && let Ok(dst) = <&mut [u64; ENTRIES / 64]>::try_from(dst)
                    {
                        if clear == Clear::Txn && txn_fails < TXN_GIVE_UP {
                            if let Some(n) = harvest::scan_table_txn::<K>(simd, table, dst, false) {
                                txn_fails = 0;
                                count += n;
                                written = first + ENTRIES as u64;
                                return;
                            }
                            txn_fails += 1;
                        }
                        if let Some((n, cleared)) = harvest::scan_table::<K>(simd, table, dst, clear == Clear::Plain) {
                            count += n;
                            if !cleared && clear != Clear::No {
                                for (c, &word) in dst.iter().enumerate() {
                                    if word != 0 {
                                        clear_dirty::<K>(&entries[c * 64..], word, clear);
                                    }
                                }
                            }
                            written = first + ENTRIES as u64;
                            return;
                        }
                    }
                }
                // Leaf-table slices start inside the range. First the
                // dirty bits of the whole slice, 64 entries to a word,
                // with loads only (no locked operation in between to hold
                // the next loads back); then the clears, for the entries
                // that read dirty, and each word into the bitmap once.
                let mut words = [0u64; ENTRIES / 64];
                let (full, cleared) = harvest::scan_words::<K>(simd, entries, &mut words, clear == Clear::Plain);
                for (i, e) in entries.iter().enumerate().skip(full) {
                    if let Some(w) = words.get_mut(i / 64) {
                        *w |= K::dirty_bit(e.load(Ordering::Relaxed)) << (i % 64);
                    }
                }
                let chunks = entries.len().div_ceil(64);
                count += harvest::count_ones(simd, &words);
                for (c, &word) in words.iter().enumerate().take(chunks) {
                    // Less the entries the scan cleared already.
                    let todo = if cleared { word & !harvest::low_bits(full.saturating_sub(c * 64)) } else { word };
                    if todo != 0 {
                        clear_dirty::<K>(&entries[c * 64..], todo, clear);
                    }
                }
                fill_bits(bitmap, written, first.saturating_sub(written), false);
                store_words(bitmap, first, &words[..chunks], entries.len() as u64);
                written = first + entries.len() as u64;
            } else if entries[0].load(Ordering::Relaxed) & dmask != 0 {
                // A large leaf. `check_no_split` refused one cutting the
                // range's ends, but one mapped concurrently since may
                // stick out: report only its pages inside the range, and
                // then leave its dirty state (it covers pages outside).
                let (lo, hi) = (base.0.max(gpa.0), (base.0 + size.bytes()).min(end));
                let whole = hi - lo == size.bytes();
                if clear != Clear::No && whole {
                    entries[0].fetch_and(!dmask, Ordering::AcqRel);
                }
                let lo_bit = (lo - gpa.0) >> 12;
                fill_bits(bitmap, written, lo_bit.saturating_sub(written), false);
                fill_bits(bitmap, lo_bit, (hi - lo) >> 12, true);
                written = lo_bit + ((hi - lo) >> 12);
                count += (hi - lo) >> 12;
            }
        });
        fill_bits(bitmap, written, pages.saturating_sub(written), false);
        if clear == Clear::Plain {
            core::sync::atomic::fence(Ordering::Release);
        }
        Ok(count)
    }

    // ---------------------------------------------------------------
    // Iteration.
    // ---------------------------------------------------------------

    /// Calls `f` once per leaf table that maps part of `[gpa, gpa+len)`,
    /// with the address of the first entry passed and the entries inside
    /// the range (present or not); large leaves are passed one at a time
    /// as one-entry slices. Descends from the root once per table, never
    /// per page. Ranges reaching past the guest-physical space are clipped.
    pub fn for_each_leaf_table(&self, gpa: Gpa, len: u64, mut f: impl FnMut(Gpa, &[AtomicU64], PageSize)) {
        let end = gpa.0.saturating_add(len).min(self.fmt.gpa_limit());
        if gpa.0 >= end {
            return;
        }
        self.visit(self.root_table(), 4, 0, gpa.0 & !0xfff, end, &mut f);
    }

    fn visit(
        &self,
        table: &Table,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        f: &mut impl FnMut(Gpa, &[AtomicU64], PageSize),
    ) {
        let span = entry_span(level);
        let first = ((start - base) / span) as usize;
        let last = ((end - 1 - base) / span) as usize;
        if level == 1 {
            f(Gpa(base + first as u64 * span), &table[first..=last], PageSize::Size4K);
            return;
        }
        for (i, slot) in table.iter().enumerate().take(last + 1).skip(first) {
            let e = slot.load(Ordering::Acquire);
            if !self.fmt.is_present(e) {
                continue;
            }
            let slot_base = base + i as u64 * span;
            if self.fmt.is_leaf(e, level) {
                if let Some(size) = PageSize::from_level(level) {
                    f(Gpa(slot_base), core::slice::from_ref(slot), size);
                }
                continue;
            }
            if let Some(child) = self.table(self.fmt.frame(e)) {
                let (lo, hi) = (start.max(slot_base), end.min(slot_base + span));
                if level == 2 {
                    // A leaf table: its slice straight to `f`, without a
                    // call one level down per table.
                    let first = ((lo - slot_base) >> 12) as usize;
                    let last = ((hi - 1 - slot_base) >> 12) as usize;
                    f(Gpa(lo), &child[first..=last], PageSize::Size4K);
                } else {
                    self.visit(child, level - 1, slot_base, lo, hi, f);
                }
            }
        }
    }

    /// An iterator over the present leaves that map part of
    /// `[gpa, gpa+len)`, in address order; it descends from the root once
    /// per leaf table.
    pub fn leaves(&self, gpa: Gpa, len: u64) -> Leaves<'_, P> {
        let end = gpa.0.saturating_add(len).min(self.fmt.gpa_limit());
        Leaves { t: self, cur: gpa.0 & !0xfff, end, leaf_table: None, leaf_base: 0 }
    }
}

impl<P: TablePages> Drop for NestedTable<P> {
    fn drop(&mut self) {
        fn free_all<P: TablePages>(n: &mut Node, pages: &mut P) {
            for mut c in core::mem::take(&mut n.children) {
                free_all(&mut c, pages);
            }
            // SAFETY: the node's page came from this provider and the table
            // is being dropped, so nothing references it any more.
            unsafe { pages.free(n.pfn) };
        }
        free_all(&mut self.root, &mut self.pages);
    }
}

/// Iterator over present leaves; see [`NestedTable::leaves`].
pub struct Leaves<'a, P: TablePages> {
    t: &'a NestedTable<P>,
    cur: u64,
    end: u64,
    leaf_table: Option<&'a Table>,
    leaf_base: u64,
}

impl<'a, P: TablePages> Iterator for Leaves<'a, P> {
    type Item = Leaf<'a>;

    /// The common step, inlined into the caller: the next entry of the
    /// current leaf table; the descent to the next leaf table is out of
    /// line.
    #[inline]
    fn next(&mut self) -> Option<Leaf<'a>> {
        if let Some(table) = self.leaf_table {
            let fmt = &self.t.fmt;
            let lim = self.end.min(self.leaf_base + entry_span(2));
            while self.cur < lim && self.cur >= self.leaf_base {
                let gpa = self.cur;
                self.cur += 4096;
                let slot = &table[index(1, gpa)];
                if fmt.is_present(slot.load(Ordering::Acquire)) {
                    return Some(Leaf { gpa: Gpa(gpa), size: PageSize::Size4K, entry: slot, fmt });
                }
            }
        }
        self.next_slow()
    }
}

impl<'a, P: TablePages> Leaves<'a, P> {
    /// [`next`](Iterator::next) past the end of the current leaf table:
    /// descends from the root to the next leaf table or large leaf.
    #[inline(never)]
    fn next_slow(&mut self) -> Option<Leaf<'a>> {
        let fmt = &self.t.fmt;
        'outer: while self.cur < self.end {
            if let Some(table) = self.leaf_table {
                if self.cur >= self.leaf_base && self.cur < self.leaf_base + entry_span(2) {
                    let i = index(1, self.cur);
                    let gpa = self.cur;
                    self.cur += 4096;
                    let slot = &table[i];
                    if fmt.is_present(slot.load(Ordering::Acquire)) {
                        return Some(Leaf { gpa: Gpa(gpa), size: PageSize::Size4K, entry: slot, fmt });
                    }
                    continue;
                }
                self.leaf_table = None;
            }
            // Descend from the root to the next leaf table or large leaf.
            let mut table = self.t.root_table();
            let mut level = 4;
            loop {
                let slot = &table[index(level, self.cur)];
                let e = slot.load(Ordering::Acquire);
                let span = entry_span(level);
                let slot_base = self.cur & !(span - 1);
                if !fmt.is_present(e) {
                    // Skip this table's empty entries in one scan instead
                    // of descending from the root again for each of them;
                    // the descent resumes at the next present entry.
                    let table_base = self.cur & !(span * ENTRIES as u64 - 1);
                    let next = (index(level, self.cur) + 1..ENTRIES)
                        .find(|&j| fmt.is_present(table[j].load(Ordering::Relaxed)));
                    self.cur = table_base + next.unwrap_or(ENTRIES) as u64 * span;
                    continue 'outer;
                }
                if fmt.is_leaf(e, level) {
                    self.cur = slot_base.saturating_add(span);
                    let size = PageSize::from_level(level)?;
                    return Some(Leaf { gpa: Gpa(slot_base), size, entry: slot, fmt });
                }
                match self.t.table(fmt.frame(e)) {
                    Some(child) if level == 2 => {
                        self.leaf_table = Some(child);
                        self.leaf_base = slot_base;
                        continue 'outer;
                    }
                    Some(child) => {
                        table = child;
                        level -= 1;
                    }
                    None => {
                        self.cur = slot_base.saturating_add(span);
                        continue 'outer;
                    }
                }
            }
        }
        None
    }
}

// ---------------------------------------------------------------------
// Tree helpers (structure changes; run with `&mut`).
// ---------------------------------------------------------------------

/// Slot index range `[first, last]` of a table at `level` based at `base`
/// covered by `[start, end)`.
fn slot_range(level: u8, base: u64, start: u64, end: u64) -> (usize, usize) {
    let span = entry_span(level);
    (((start - base) / span) as usize, ((end - 1 - base) / span) as usize)
}

#[allow(clippy::too_many_arguments)]
fn populate<P: TablePages>(
    node: &mut Node,
    level: u8,
    start: u64,
    end: u64,
    leaf_level: u8,
    pages: &mut P,
    fmt: &PteFormat,
    progress: &mut u64,
    tables: &mut usize,
) -> Result<(), Error> {
    let span = entry_span(level);
    let base = start & !(span * 512 - 1);
    let (first, last) = slot_range(level, base, start, end);
    if level == leaf_level {
        // At most 512 per call; refused (and rolled back by the caller)
        // rather than wrapped after billions of overlapping populates.
        node.reserved = node.reserved.checked_add((last - first + 1) as u32).ok_or(Error::CountOverflow)?;
        *progress = end;
        return Ok(());
    }
    // Room for the children this call adds, made once: the children in
    // `[first, last]` that are missing.
    let lo = node.children.partition_point(|c| (c.index as usize) < first);
    let have = node.children.partition_point(|c| (c.index as usize) <= last) - lo;
    node.children.reserve(last - first + 1 - have);
    // The children are sorted by index and the slots are visited in
    // order, so slot `i`'s child is at (or is inserted at) the position
    // after slot `i - 1`'s: a cursor instead of a search per slot.
    let mut cursor = lo;
    for i in first..=last {
        let slot_base = base + i as u64 * span;
        let (s, e) = (start.max(slot_base), end.min(slot_base + span));
        let found = node.children.get(cursor).is_some_and(|c| c.index as usize == i);
        let pos = match if found { Ok(cursor) } else { Err(cursor) } {
            Ok(pos) => pos,
            Err(pos) => {
                let table = table_of(pages, node.pfn).ok_or(Error::NoMemory)?;
                if fmt.is_present(table[i].load(Ordering::Acquire)) {
                    // A large leaf sits where a table is needed.
                    return Err(Error::AlreadyMapped { same_frame: false });
                }
                let (pfn, entry) = alloc_table(pages, fmt, level)?;
                let Some(table) = table_of(pages, node.pfn) else {
                    // The provider broke its contract (the parent's page
                    // lost its pointer); give the new page back.
                    // SAFETY: the page was just allocated and nothing
                    // points at it.
                    unsafe { pages.free(pfn) };
                    return Err(Error::NoMemory);
                };
                table[i].store(entry, Ordering::Release);
                *tables += 1;
                node.children.insert(pos, Node::new(pfn, i as u16));
                pos
            }
        };
        populate(&mut node.children[pos], level - 1, s, e, leaf_level, pages, fmt, progress, tables)?;
        cursor = pos + 1;
    }
    Ok(())
}

/// A zeroed table page and the entry that points at it: allocated,
/// addressable (`ptr` non-null) and inside the format's frame range. A page
/// that fails the last two checks is handed straight back, so on error
/// nothing is allocated and no entry can mask the frame into another one.
/// `level` is the level of the entry that will point at the page.
fn alloc_table<P: TablePages>(pages: &mut P, fmt: &PteFormat, level: u8) -> Result<(Pfn, u64), Error> {
    let pfn = pages.alloc_zeroed().ok_or(Error::NoMemory)?;
    let r = if pages.ptr(pfn).is_null() { Err(Error::NoMemory) } else { fmt.table_entry_at(pfn, level) };
    match r {
        Ok(entry) => Ok((pfn, entry)),
        Err(e) => {
            // SAFETY: the page was just allocated and nothing points at it.
            unsafe { pages.free(pfn) };
            Err(e)
        }
    }
}

/// The children of `node` for the slots `first ..= last`, when every one
/// of those slots has one (children are sorted by index, one per index,
/// so they are then the run starting at the first index not below
/// `first`).
#[inline(always)]
fn children_of(node: &Node, first: usize, last: usize) -> Option<&[Node]> {
    let lo = node.children.partition_point(|c| (c.index as usize) < first);
    let kids = node.children.get(lo..lo + (last - first + 1))?;
    kids.iter().enumerate().all(|(k, c)| c.index as usize == first + k).then_some(kids)
}

/// True when every entry of `[start, end)` at `leaf_level` lies in an
/// existing table whose count covers it.
fn counted(node: &Node, level: u8, start: u64, end: u64, leaf_level: u8) -> bool {
    let span = entry_span(level);
    let base = start & !(span * 512 - 1);
    let (first, last) = slot_range(level, base, start, end);
    if level == leaf_level {
        return node.reserved as usize > last - first;
    }
    let Some(kids) = children_of(node, first, last) else { return false };
    kids.iter().all(|c| {
        let slot_base = base + c.index as u64 * span;
        let (s, e) = (start.max(slot_base), end.min(slot_base + span));
        if level - 1 == leaf_level {
            // The leaf level inline (no call per table).
            let (f, l) = slot_range(leaf_level, slot_base, s, e);
            c.reserved as usize > l - f
        } else {
            counted(c, level - 1, s, e, leaf_level)
        }
    })
}

/// Drops the counts `[start, end)` holds at `leaf_level`.
fn uncount(node: &mut Node, level: u8, start: u64, end: u64, leaf_level: u8) {
    let span = entry_span(level);
    let base = start & !(span * 512 - 1);
    let (first, last) = slot_range(level, base, start, end);
    if level == leaf_level {
        node.reserved = node.reserved.saturating_sub((last - first + 1) as u32);
        return;
    }
    // The children in `[first, last]`, in order (a run of the sorted
    // children, not a search per slot).
    let lo = node.children.partition_point(|c| (c.index as usize) < first);
    let hi = node.children.partition_point(|c| (c.index as usize) <= last);
    for c in &mut node.children[lo..hi] {
        let slot_base = base + c.index as u64 * span;
        let (s, e) = (start.max(slot_base), end.min(slot_base + span));
        if level - 1 == leaf_level {
            let (f, l) = slot_range(leaf_level, slot_base, s, e);
            c.reserved = c.reserved.saturating_sub((l - f + 1) as u32);
        } else {
            uncount(c, level - 1, s, e, leaf_level);
        }
    }
}

/// Frees, bottom-up, the tables under `node` in `[start, end)` whose count
/// is zero, clearing the entries that pointed at them. With `clear`, also
/// drops every leaf in the range and returns how many 4 KiB pages they
/// mapped: entries of surviving tables are cleared one by one, while a leaf
/// table that is freed is only counted (it leaves the hardware's view with
/// its parent entry).
#[allow(clippy::too_many_arguments)]
fn prune<P: TablePages>(
    node: &mut Node,
    level: u8,
    start: u64,
    end: u64,
    pages: &mut P,
    fmt: &PteFormat,
    clear: bool,
    tables: &mut usize,
) -> u64 {
    let span = entry_span(level);
    let base = start & !(span * 512 - 1);
    let (first, last) = slot_range(level, base, start, end);
    let mut count = 0;
    if level == 1 {
        if clear && let Some(table) = table_of(pages, node.pfn) {
            for e in &table[first..=last] {
                if fmt.is_present(e.load(Ordering::Relaxed)) {
                    e.store(0, Ordering::Relaxed);
                    count += 1;
                }
            }
        }
        return count;
    }
    // Large leaves (no child table) in the range.
    if clear && let Some(table) = table_of(pages, node.pfn) {
        let mut children = node.children.iter().map(|c| c.index as usize).peekable();
        for (i, e) in table.iter().enumerate().take(last + 1).skip(first) {
            while children.next_if(|&c| c < i).is_some() {}
            if children.peek() == Some(&i) {
                continue;
            }
            let v = e.load(Ordering::Relaxed);
            if fmt.is_present(v) && fmt.is_leaf(v, level) {
                e.store(0, Ordering::Relaxed);
                count += span >> 12;
            }
        }
    }
    let lo = node.children.partition_point(|c| (c.index as usize) < first);
    let hi = node.children.partition_point(|c| (c.index as usize) <= last);
    for k in lo..hi {
        // Only a clearing pass reads the child tables' entries.
        if clear && let Some(next) = node.children.get(k + 1) {
            prefetch_table(pages.ptr(next.pfn));
        }
        let child = &mut node.children[k];
        let slot_base = base + child.index as u64 * span;
        if clear && level == 2 && child.reserved == 0 {
            if let Some(t) = table_of(pages, child.pfn) {
                count += count_present(t, fmt.present_mask());
            }
        } else {
            count +=
                prune(child, level - 1, start.max(slot_base), end.min(slot_base + span), pages, fmt, clear, tables);
        }
    }
    // Detach and free the children left with nothing, in one pass.
    let mut freed: Vec<(u16, Pfn)> = Vec::with_capacity(hi - lo);
    let mut pos = 0;
    node.children.retain(|c| {
        pos += 1;
        let gone = pos > lo && pos <= hi && c.reserved == 0 && c.children.is_empty();
        if gone {
            freed.push((c.index, c.pfn));
        }
        !gone
    });
    if !freed.is_empty() {
        if let Some(table) = table_of(pages, node.pfn) {
            for (index, _) in &freed {
                table[*index as usize].store(0, Ordering::Release);
            }
        }
        for (_, pfn) in freed {
            // SAFETY: the child's page came from `pages`; its parent entry
            // was just cleared and its shadow node removed, so no entry or
            // reference points at it any more.
            unsafe { pages.free(pfn) };
            *tables -= 1;
        }
    }
    if node.children.is_empty() {
        node.children = Vec::new();
    }
    count
}

/// Number of present entries in a table (`mask`: the format's present
/// bits), read as a straight run of loads.
fn count_present(table: &Table, mask: u64) -> u64 {
    let mut n = [0u64; 4];
    for quad in table.chunks_exact(4) {
        for (k, e) in quad.iter().enumerate() {
            n[k] += (e.load(Ordering::Relaxed) & mask != 0) as u64;
        }
    }
    n.iter().sum()
}

/// Asks the processor to start loading a table page into the cache (a
/// hint: it never faults and changes nothing the program can observe).
#[inline(always)]
fn prefetch_table(p: *const u64) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..64 {
        // SAFETY: PREFETCHT0 is a hint that never faults, whatever the
        // address, and SSE (which provides it) is part of the x86-64
        // baseline.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line * 8).cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Puts the dirty state of `entries[k]` for the format kind `K` in bit
/// `k % 64` of `words[k / 64]`, read as relaxed loads would read it, for
/// the leading entries it handles in blocks of 64 (one word each); returns
/// how many it handled (a multiple of 64; the caller reads the rest one by
/// one). `words` must be zero.
#[inline(always)]
fn dirty_words<K: Kind>(entries: &[AtomicU64], words: &mut [u64; ENTRIES / 64]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if K::DIRTY.count_ones() == 1 && K::DIRTY.trailing_zeros() < 32 {
        let blocks = entries.len().min(ENTRIES) / 64;
        if blocks == 0 {
            return 0;
        }
        let shift = 31 - K::DIRTY.trailing_zeros();
        // SAFETY: the block reads the first `blocks * 64` entries of
        // `entries` (at most 512, of a live table page, 8-byte aligned,
        // valid for reads while the borrow lasts) with unaligned 16-byte
        // SSE2 loads, and writes `blocks` 64-bit words into `words` (at
        // most 8, its 64 bytes). Other threads and the hardware change
        // entries only with atomic operations, and x86 reads every
        // naturally aligned quadword of a vector load atomically (a wide
        // load may be split into several accesses, never inside an aligned
        // quadword), so the reads are equivalent to relaxed atomic loads,
        // which may race with those writes. SSE2 is part of the x86-64
        // baseline. For each 16 entries (the macro below, four times per
        // word): the low dwords of four pairs gathered (`shufps`; the
        // dirty bit is below bit 32), shifted so the dirty bit is each
        // dword's sign, and narrowed with signed saturation (which keeps
        // the sign) to one byte per entry, whose signs `pmovmskb` reads
        // out, entry `k` to bit `k`; the four 16-bit masks are combined in
        // registers and the word stored once.
        unsafe {
            core::arch::asm!(
                ".macro npt_dirty16 off, dst",
                "movdqu {a}, [{p} + \\off]",
                "movdqu {t}, [{p} + \\off + 16]",
                "shufps {a}, {t}, 0x88",
                "movdqu {b}, [{p} + \\off + 32]",
                "movdqu {t}, [{p} + \\off + 48]",
                "shufps {b}, {t}, 0x88",
                "movdqu {c}, [{p} + \\off + 64]",
                "movdqu {t}, [{p} + \\off + 80]",
                "shufps {c}, {t}, 0x88",
                "movdqu {d}, [{p} + \\off + 96]",
                "movdqu {t}, [{p} + \\off + 112]",
                "shufps {d}, {t}, 0x88",
                "pslld {a}, {n}",
                "pslld {b}, {n}",
                "pslld {c}, {n}",
                "pslld {d}, {n}",
                "packssdw {a}, {b}",
                "packssdw {c}, {d}",
                "packsswb {a}, {c}",
                "pmovmskb \\dst, {a}",
                ".endm",
                "movd {n}, {sh:e}",
                "2:",
                "npt_dirty16 0, {w:e}",
                "npt_dirty16 128, {x:e}",
                "shl {x}, 16",
                "or {w}, {x}",
                "npt_dirty16 256, {x:e}",
                "shl {x}, 32",
                "or {w}, {x}",
                "npt_dirty16 384, {x:e}",
                "shl {x}, 48",
                "or {w}, {x}",
                "mov qword ptr [{o}], {w}",
                "add {p}, 512",
                "add {o}, 8",
                "dec {k}",
                "jnz 2b",
                ".purgem npt_dirty16",
                p = inout(reg) entries.as_ptr() => _,
                o = inout(reg) words.as_mut_ptr() => _,
                k = inout(reg) blocks => _,
                sh = in(reg) shift as u64,
                n = out(xmm_reg) _,
                a = out(xmm_reg) _,
                b = out(xmm_reg) _,
                c = out(xmm_reg) _,
                d = out(xmm_reg) _,
                t = out(xmm_reg) _,
                w = out(reg) _,
                x = out(reg) _,
                options(nostack),
            );
        }
        return blocks * 64;
    }
    let _ = (entries, words);
    0
}

/// The SSE2 part of [`harvest::or_entries`]: the OR of the leading
/// entries of `entries` it handles (a multiple of 16), read as relaxed
/// loads would read them, and how many.
#[inline(always)]
pub(crate) fn or_all_sse2(entries: &[AtomicU64]) -> (u64, usize) {
    let mut all = 0u64;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let blocks = entries.len() / 16;
        if blocks > 0 {
            // SAFETY: the block reads the first `blocks * 16` entries of
            // `entries` (of a live table page, 8-byte aligned, valid for
            // reads while the borrow lasts) with unaligned 16-byte SSE2
            // loads and writes no memory. As in `dirty_words`, x86 reads
            // each aligned quadword of a vector load atomically, so the
            // reads are equivalent to relaxed atomic loads. SSE2 is part of
            // the x86-64 baseline. Two vector accumulators, folded at the
            // end.
            unsafe {
                core::arch::asm!(
                    "pxor {a}, {a}",
                    "pxor {b}, {b}",
                    "2:",
                    "movdqu {t}, [{p}]",
                    "por {a}, {t}",
                    "movdqu {u}, [{p} + 16]",
                    "por {b}, {u}",
                    "movdqu {t}, [{p} + 32]",
                    "por {a}, {t}",
                    "movdqu {u}, [{p} + 48]",
                    "por {b}, {u}",
                    "movdqu {t}, [{p} + 64]",
                    "por {a}, {t}",
                    "movdqu {u}, [{p} + 80]",
                    "por {b}, {u}",
                    "movdqu {t}, [{p} + 96]",
                    "por {a}, {t}",
                    "movdqu {u}, [{p} + 112]",
                    "por {b}, {u}",
                    "add {p}, 128",
                    "dec {k}",
                    "jnz 2b",
                    "por {a}, {b}",
                    "pshufd {b}, {a}, 0x4e",
                    "por {a}, {b}",
                    "movq {r}, {a}",
                    p = inout(reg) entries.as_ptr() => _,
                    k = inout(reg) blocks => _,
                    a = out(xmm_reg) _,
                    b = out(xmm_reg) _,
                    t = out(xmm_reg) _,
                    u = out(xmm_reg) _,
                    r = out(reg) all,
                    options(readonly, nostack),
                );
            }
            done = blocks * 16;
        }
    }
    let _ = entries;
    (all, done)
}

/// ORs the 64 bits of `word` into `bitmap` starting at bit `first`.
#[inline(always)]
fn or_word(bitmap: &mut [u64], first: u64, word: u64) {
    let (w, o) = ((first / 64) as usize, first % 64);
    bitmap[w] |= word << o;
    if o != 0 && word >> (64 - o) != 0 {
        bitmap[w + 1] |= word >> (64 - o);
    }
}

/// Clears the dirty state of the entries of `chunk` whose bit is set in
/// `word` (bit `k` = `chunk[k]`), as `clear` says: a locked AND of the
/// dirty bits alone, or a plain store of the entry without them.
#[inline(always)]
fn clear_dirty<K: Kind>(chunk: &[AtomicU64], mut word: u64, clear: Clear) {
    match clear {
        Clear::Plain => {
            while word != 0 {
                if let Some(e) = chunk.get(word.trailing_zeros() as usize) {
                    e.store(e.load(Ordering::Relaxed) & !K::DIRTY, Ordering::Relaxed);
                }
                word &= word - 1;
            }
        }
        Clear::Locked | Clear::Txn => {
            while word != 0 {
                if let Some(e) = chunk.get(word.trailing_zeros() as usize) {
                    e.fetch_and(!K::DIRTY, Ordering::AcqRel);
                }
                word &= word - 1;
            }
        }
        Clear::No => {}
    }
}

/// Writes the dirty words of `n` entries (`words[c]` holds entries
/// `64 c ..`) into bits `first .. first + n` of `bitmap`, whatever they
/// held; bits outside are left as they were. Where `first` is
/// word-aligned, each whole word is stored once (no read-modify-write)
/// and a last partial word merged under a mask; an unaligned start is
/// cleared and then ORed in.
#[inline(always)]
fn store_words(bitmap: &mut [u64], first: u64, words: &[u64], n: u64) {
    if first.is_multiple_of(64) {
        let w0 = (first / 64) as usize;
        let whole = (n / 64) as usize;
        if let Some(dst) = bitmap.get_mut(w0..w0 + whole) {
            // A whole table's words as one fixed-size copy (a few vector
            // stores, not a call to `memcpy`).
            match (<&mut [u64; ENTRIES / 64]>::try_from(&mut *dst), <&[u64; ENTRIES / 64]>::try_from(words)) {
                (Ok(d), Ok(w)) => *d = *w,
                _ => dst.copy_from_slice(&words[..whole]),
            }
        }
        let rest = harvest::low_bits((n % 64) as usize);
        if let (Some(&last), Some(dst)) = (words.get(whole), bitmap.get_mut(w0 + whole))
            && !n.is_multiple_of(64)
        {
            *dst = (*dst & !rest) | (last & rest);
        }
    } else {
        fill_bits(bitmap, first, n, false);
        for (c, &word) in words.iter().enumerate() {
            if word != 0 {
                or_word(bitmap, first + c as u64 * 64, word);
            }
        }
    }
}

/// Sets (`on`) or clears `count` bits of `bitmap` from bit `first`, a word
/// at a time.
fn fill_bits(bitmap: &mut [u64], first: u64, count: u64, on: bool) {
    let (mut b, end) = (first, first + count);
    let fill = if on { u64::MAX } else { 0 };
    while b < end {
        let (w, o) = ((b / 64) as usize, b % 64);
        let n = (64 - o).min(end - b);
        if n == 64 {
            // The whole words at once.
            let words = ((end - b) / 64) as usize;
            bitmap[w..w + words].fill(fill);
            b += words as u64 * 64;
            continue;
        }
        let mask = ((1u64 << n) - 1) << o;
        if on {
            bitmap[w] |= mask;
        } else {
            bitmap[w] &= !mask;
        }
        b += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Caps, CountingPages, HeapPages, MemType, Prot};

    /// The leaf-level node (level 1) that holds `gpa`'s entry.
    fn leaf_node(root: &mut Node, gpa: u64) -> &mut Node {
        let mut n = root;
        for level in [4u8, 3, 2] {
            let pos = n.child_pos(index(level, gpa)).expect("populated");
            n = &mut n.children[pos];
        }
        n
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// `vacate_region` of any sub-range of a populated region (four
        /// leaf tables across a 1 GiB boundary) refuses exactly when some
        /// entry of the sub-range is present (entries outside it, and
        /// non-present entries with other bits set, do not count), and
        /// then changes nothing; otherwise it releases the sub-range and
        /// frees exactly the tables left with nothing: the scalar model.
        #[test]
        fn vacate_refuses_exactly_present_entries(
            fi in 0usize..5,
            seed in proptest::prelude::any::<u64>(),
            present in proptest::prop_oneof![proptest::strategy::Just(0usize), 1usize..4],
            junk in proptest::prelude::any::<bool>(),
            first in 0u64..4 * 512,
            pages in 1u64..=4 * 512,
        ) {
            use alloc::vec::Vec;
            const K4: u64 = 4096;
            const BASE: u64 = (1 << 30) - 2 * (2 << 20);
            let c = Caps::default();
            let f = [PteFormat::ept(c), PteFormat::ept_emulated_ad(c), PteFormat::npt(c), PteFormat::vtd(c), PteFormat::amd_vi(c)][fi];
            let pages = pages.min(4 * 512 - first);
            let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
            t.populate_region(Gpa(BASE), 4 * 512 * K4, PageSize::Size4K).unwrap();
            assert_eq!(t.table_pages(), 8);
            // Entries: zero, or (with `junk`) non-present values with
            // every other bit random; `present` present ones anywhere.
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let mut model = Vec::new();
            let mut live = Vec::new();
            t.for_each_leaf_table(Gpa(BASE), 4 * 512 * K4, |_, entries, _| {
                for e in entries {
                    let v = if junk && next() % 3 == 0 { next() & !f.present_mask() } else { 0 };
                    e.store(v, Ordering::Relaxed);
                    model.push(v);
                }
            });
            for _ in 0..present {
                let p = (next() % (4 * 512)) as usize;
                model[p] = f.leaf_entry(Pfn(next() % 0x1000), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
                live.push(p);
            }
            t.for_each_leaf_table(Gpa(BASE), 4 * 512 * K4, |b, entries, _| {
                let o = ((b.0 - BASE) / K4) as usize;
                for (k, e) in entries.iter().enumerate() {
                    e.store(model[o + k], Ordering::Relaxed);
                }
            });
            let snapshot = |t: &NestedTable<HeapPages>| {
                let mut v = Vec::new();
                t.for_each_leaf_table(Gpa(BASE), 4 * 512 * K4, |_, e, _| v.extend(e.iter().map(|e| e.load(Ordering::Relaxed))));
                v
            };
            let (lo, hi) = (first as usize, (first + pages) as usize);
            let r = t.vacate_region(Gpa(BASE + first * K4), pages * K4, PageSize::Size4K);
            if live.iter().any(|&p| p >= lo && p < hi) {
                proptest::prop_assert_eq!(r, Err(Error::StillMapped));
                proptest::prop_assert_eq!(t.table_pages(), 8);
                proptest::prop_assert!(snapshot(&t) == model, "a refused vacate changes nothing");
                return Ok(());
            }
            proptest::prop_assert_eq!(r, Ok(()));
            // Leaf table `k` is freed when the sub-range covers all of it;
            // a level-2 table when both of its leaf tables are; the
            // level-3 table when both level-2 tables are.
            let gone: Vec<bool> = (0..4).map(|k| lo <= k * 512 && hi >= (k + 1) * 512).collect();
            let (a, b) = (gone[0] && gone[1], gone[2] && gone[3]);
            let freed = gone.iter().filter(|&&g| g).count() + a as usize + b as usize + (a && b) as usize;
            proptest::prop_assert_eq!(t.table_pages(), 8 - freed);
            // Each surviving leaf table's count is what it was less the
            // sub-range's pages in it.
            for (k, &g) in gone.iter().enumerate() {
                if !g {
                    let overlap = hi.min((k + 1) * 512).saturating_sub(lo.max(k * 512));
                    let leaf = leaf_node(&mut t.root, BASE + (k * 512) as u64 * K4);
                    proptest::prop_assert_eq!(leaf.reserved as usize, 512 - overlap, "leaf table {}", k);
                }
            }
        }
    }

    /// Overflow of a reservation count is refused and rolled back: the
    /// table created for the range's first part is freed, and the counts
    /// are as before. (Reaching the limit honestly takes about 8.4 million
    /// populates; the count is set near it directly.)
    #[test]
    fn reservation_count_overflow_rolls_back() {
        const M2: u64 = 1 << 21;
        let pages = CountingPages::new(HeapPages::with_capacity(0x100, 64));
        let mut t = NestedTable::new(PteFormat::ept(Caps::default()), pages).unwrap();
        t.populate_region(Gpa(M2), 4096, PageSize::Size4K).unwrap();
        assert_eq!(t.table_pages(), 4);
        leaf_node(&mut t.root, M2).reserved = u32::MAX - 511;
        // Exactly up to the limit is fine ...
        t.populate_region(Gpa(M2 + 4096), 511 * 4096, PageSize::Size4K).unwrap();
        assert_eq!(leaf_node(&mut t.root, M2).reserved, u32::MAX);
        t.vacate_region(Gpa(M2 + 4096), 511 * 4096, PageSize::Size4K).unwrap();
        // ... one more is not. The range starts in a new leaf table (below
        // 2 MiB) and ends in one past 4 MiB that the walk never reaches.
        leaf_node(&mut t.root, M2).reserved = u32::MAX;
        let r = t.populate_region(Gpa(M2 - 4096), M2 + 2 * 4096, PageSize::Size4K);
        assert_eq!(r, Err(Error::CountOverflow));
        assert_eq!(leaf_node(&mut t.root, M2).reserved, u32::MAX, "count unchanged");
        assert_eq!(t.table_pages(), 4, "the table made for the first part is freed");
        assert_eq!(t.pages().live(), 4);
        assert_eq!(t.walk(Gpa(M2 - 4096)).len, 3);
        assert!(t.pages().errors().is_empty());
        // The overflowed table still works and releases normally.
        leaf_node(&mut t.root, M2).reserved = 1;
        t.vacate_region(Gpa(M2), 4096, PageSize::Size4K).unwrap();
        assert_eq!(t.pages().live(), 1);
    }
}
