//! Promotion and demotion of 2 MiB leaves (FreeBSD's `pmap_promote_pde` /
//! `pmap_demote_pde`, for nested tables).
//!
//! [`NestedTable::promote_2m`] replaces a leaf table whose 512 entries map
//! one aligned, physically contiguous 2 MiB run with one protection and
//! memory type by a single 2 MiB leaf in the parent entry, carrying the
//! accessed and dirty state over (the large leaf is accessed if any small
//! one was, dirty if any was), and frees the leaf table.
//! [`NestedTable::demote_2m`] does the reverse: a full leaf table with the
//! same translations, each entry carrying the large leaf's accessed and
//! dirty state, so a harvest after the split reports every page of a dirty
//! large leaf (it cannot tell which 4 KiB of it were written).
//!
//! Both change the translation in one store of the parent entry: a page
//! that stays mapped is never not-present, for hardware walking the table
//! meanwhile. Both take `&mut self` (no software walker runs), and the
//! caller invalidates the hardware's cached translations (INVEPT / the
//! vmspace's generation) before the freed leaf-table page can be reused.
//!
//! The tree's populate counts move with the translation: after a promotion
//! the range counts as populated for 2 MiB leaves (vacate it with
//! `PageSize::Size2M`, or demote it first), after a demotion for 4 KiB
//! leaves.
//!
//! 1 GiB leaves are demoted one level at a time:
//! [`NestedTable::demote_1g_as`] replaces a level-3 leaf by a level-2
//! table of 512 2 MiB leaves (the same translations, accessed/dirty
//! carried to each, one store of the level-3 entry), after which the
//! range counts as populated for 2 MiB leaves, and
//! [`NestedTable::split_empty_1g`] gives an empty slot counted for a
//! 1 GiB leaf an empty level-2 table counted for 512 2 MiB leaves.
//! [`NestedTable::promote_1g`] is the reverse of `demote_1g`: a level-2
//! table whose 512 entries are all 2 MiB leaves mapping one aligned,
//! contiguous 1 GiB run with one protection and memory type becomes one
//! 1 GiB leaf (accessed/dirty ORed, one store of the level-3 entry), and
//! the range counts as populated for a 1 GiB leaf again. Promotion goes
//! one level at a time too: the 2 MiB ranges of the slot are promoted
//! first.

use core::sync::atomic::Ordering;

use super::{NestedTable, Node, alloc_table, index, table_of};
use crate::pages::TablePages;
use crate::{ENTRIES, Error, Gpa, MemType, PageSize, Pfn, Prot};

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// Why a promotion did not happen (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromoteRefusal {
    /// The address is not 2 MiB aligned, or beyond the table's width.
    Unaligned,
    /// The format (its capabilities) has no 2 MiB leaves.
    Unsupported,
    /// No leaf table covers the range (already large, or not populated).
    NoLeafTable,
    /// A leaf of the range is not present.
    Hole,
    /// The leaves do not map one aligned, contiguous 2 MiB run of frames.
    NotContiguous,
    /// The leaves differ in protection or memory type.
    Mixed,
    /// The leaf table's populate count is not a whole number of 2 MiB
    /// ranges (partial, overlapping populates), so it cannot move to the
    /// parent without changing what a later vacate must undo.
    PartialCount,
}

impl<P: TablePages> NestedTable<P> {
    /// A 2 MiB-aligned address inside the table's width, for the split
    /// operations.
    fn check_2m(&self, g: u64) -> Result<(), Error> {
        if !g.is_multiple_of(M2) {
            return Err(Error::Unaligned);
        }
        if g >= self.fmt.gpa_limit() {
            return Err(Error::OutOfRange);
        }
        Ok(())
    }

    /// The level-2 node covering `gpa`, if the tables down to it exist.
    fn node_l2(&mut self, g: u64) -> Option<&mut Node> {
        let n3 = self.root.child_pos(index(4, g)).ok().map(|p| &mut self.root.children[p])?;
        let p = n3.child_pos(index(3, g)).ok()?;
        Some(&mut n3.children[p])
    }

    /// The one leaf of `level + 1` that the table at `child` (whose 512
    /// entries are at `level`, 1 or 2) can become: its entries must all be
    /// leaves of one contiguous run aligned to the large size, with one
    /// protection and memory type; the large leaf is accessed if any entry
    /// was and dirty if any was. Reads only.
    fn merged_leaf(&self, child: Pfn, level: u8) -> Result<u64, PromoteRefusal> {
        let fmt = self.fmt;
        let (size, large_size) =
            if level == 1 { (PageSize::Size4K, PageSize::Size2M) } else { (PageSize::Size2M, PageSize::Size1G) };
        let shift = 12 + 9 * (level as u32 - 1);
        let t = table_of(&self.pages, child).ok_or(PromoteRefusal::NoLeafTable)?;
        let leaf = |e: u64| fmt.is_present(e) && fmt.is_leaf(e, level);
        let first = t[0].load(Ordering::Acquire);
        if !leaf(first) {
            return Err(PromoteRefusal::Hole);
        }
        let pfn0 = fmt.frame_at_level(first, level);
        if !pfn0.0.is_multiple_of(large_size.pages()) {
            return Err(PromoteRefusal::NotContiguous);
        }
        let (prot, mt) = (fmt.prot(first), fmt.mem_type(first));
        // One compare per entry: apart from the accessed/dirty bits, entry
        // `k` of a contiguous run with one protection and memory type is
        // the first entry plus `k` frames of its size. The bits of all
        // entries are ORed to carry accessed/dirty; only a mismatch takes
        // the slow path that says why.
        let ad = fmt.accessed_mask() | fmt.dirty_mask();
        let want = first & !ad;
        let mut all = 0u64;
        let mut mismatch = false;
        for (k, slot) in t.iter().enumerate() {
            let e = slot.load(Ordering::Acquire);
            all |= e;
            mismatch |= e & !ad != want + ((k as u64) << shift);
        }
        if mismatch {
            for (k, slot) in t.iter().enumerate() {
                let e = slot.load(Ordering::Acquire);
                if !leaf(e) {
                    return Err(PromoteRefusal::Hole);
                }
                if fmt.frame_at_level(e, level) != Pfn(pfn0.0 + k as u64 * size.pages()) {
                    return Err(PromoteRefusal::NotContiguous);
                }
                if fmt.prot(e) != prot || fmt.mem_type(e) != mt {
                    return Err(PromoteRefusal::Mixed);
                }
            }
            // Differing only in bits that are neither frame, protection
            // nor memory type (software bits): refused as mixed.
            return Err(PromoteRefusal::Mixed);
        }
        // The OR keeps each entry's other bits (equal in all of them), so
        // it reads accessed/dirty as any entry's.
        let (accessed, dirty) = (fmt.accessed(all & !fmt.addr_mask()), fmt.dirty(all & !fmt.addr_mask()));
        let mut large = fmt
            .leaf_entry(pfn0, large_size, prot, mt.unwrap_or(MemType::WriteBack))
            .map_err(|_| PromoteRefusal::Unsupported)?;
        if accessed {
            large |= fmt.set_accessed_bits(large);
        }
        if dirty {
            large |= fmt.set_dirty_bits();
        }
        Ok(large)
    }

    /// Promotes the 2 MiB range at `gpa` to one 2 MiB leaf if its 512
    /// leaves map one aligned contiguous run with one protection and
    /// memory type (see the module doc). Returns the freed leaf table's
    /// frame; on refusal nothing changes.
    pub fn promote_2m(&mut self, gpa: Gpa) -> Result<Pfn, PromoteRefusal> {
        let g = gpa.0;
        if !g.is_multiple_of(M2) || g >= self.fmt.gpa_limit() {
            return Err(PromoteRefusal::Unaligned);
        }
        if !self.fmt.supports(PageSize::Size2M) {
            return Err(PromoteRefusal::Unsupported);
        }
        let i2 = index(2, g);
        let (l2_pfn, l1_pfn, l1_reserved) = {
            let n2 = self.node_l2(g).ok_or(PromoteRefusal::NoLeafTable)?;
            let pos = n2.child_pos(i2).map_err(|_| PromoteRefusal::NoLeafTable)?;
            let l1 = &n2.children[pos];
            (n2.pfn, l1.pfn, l1.reserved)
        };
        if l1_reserved == 0 || !(l1_reserved as usize).is_multiple_of(ENTRIES) {
            return Err(PromoteRefusal::PartialCount);
        }
        let large = self.merged_leaf(l1_pfn, 1)?;
        // One store: the translation changes from the leaf table's to the
        // large leaf's, with no not-present window.
        let t2 = table_of(&self.pages, l2_pfn).ok_or(PromoteRefusal::NoLeafTable)?;
        t2[i2].store(large, Ordering::Release);
        let n2 = self.node_l2(g).expect("checked above");
        let pos = n2.child_pos(i2).expect("checked above");
        n2.children.remove(pos);
        n2.reserved += l1_reserved / ENTRIES as u32;
        // SAFETY: the leaf table is no longer referenced by any entry or
        // node; hardware may still cache it until the caller invalidates
        // (see the module doc), which the caller does before the provider
        // hands the page out again.
        unsafe { self.pages.free(l1_pfn) };
        self.tables -= 1;
        Ok(l1_pfn)
    }

    /// Splits the 2 MiB leaf at `gpa` into a leaf table of 512 entries with
    /// the same translations, protection and memory type, each carrying
    /// the large leaf's accessed and dirty state (see the module doc).
    /// Refused with [`Error::Unaligned`] for an unaligned address,
    /// [`Error::NotMapped`] when no 2 MiB leaf is there, and
    /// [`Error::NoMemory`] / [`Error::OutOfRange`] when the provider has no
    /// usable page; on error nothing changes.
    pub fn demote_2m(&mut self, gpa: Gpa) -> Result<(), Error> {
        self.demote_2m_as(gpa, None)
    }

    /// [`demote_2m`](Self::demote_2m), giving the 512 small leaves `prot`
    /// instead of the large leaf's protection when it is `Some` (a large
    /// leaf that was write-protected to catch the first write, split on
    /// that write with the mapping's protection back). Refused as
    /// `demote_2m` is, and with the errors of `PteFormat::leaf_entry` for
    /// a protection the format cannot express; on error nothing changes.
    pub fn demote_2m_as(&mut self, gpa: Gpa, prot: Option<Prot>) -> Result<(), Error> {
        let g = gpa.0;
        self.check_2m(g)?;
        self.demote_large(g, 2, prot)
    }

    /// The demotion both large sizes share: the leaf of `level` (2 or 3)
    /// at `g` becomes a table of 512 leaves one level down (4 KiB or
    /// 2 MiB) with its frames in order, its memory type, its A/D state on
    /// each, and its protection or `prot`, put in with one store of the
    /// parent entry; the populate count moves from the parent table to the
    /// new one. Refused with [`Error::NotMapped`] (no table or no leaf of
    /// `level` there), [`Error::NotPopulated`], [`Error::NoMemory`] and
    /// the errors of `PteFormat::leaf_entry`; nothing changes then. The
    /// caller checked the alignment and the format's support.
    fn demote_large(&mut self, g: u64, level: u8, prot: Option<Prot>) -> Result<(), Error> {
        debug_assert!(level == 2 || level == 3);
        let fmt = self.fmt;
        let (small_size, shift) = if level == 3 { (PageSize::Size2M, 21) } else { (PageSize::Size4K, 12) };
        let i = index(level, g);
        let (parent_pfn, reserved) =
            self.large_parent(g, level).map(|n| (n.pfn, n.reserved)).ok_or(Error::NotMapped)?;
        let parent = table_of(&self.pages, parent_pfn).ok_or(Error::NotMapped)?;
        let large = parent[i].load(Ordering::Acquire);
        if !fmt.is_present(large) || !fmt.is_leaf(large, level) {
            return Err(Error::NotMapped);
        }
        if reserved == 0 {
            return Err(Error::NotPopulated);
        }
        let pfn0 = fmt.frame_at_level(large, level);
        let prot: Prot = prot.unwrap_or_else(|| fmt.prot(large));
        let mt = fmt.mem_type(large).unwrap_or(MemType::WriteBack);
        let mut small = fmt.leaf_entry(pfn0, small_size, prot, mt)?;
        if fmt.accessed(large) {
            small |= fmt.set_accessed_bits(small);
        }
        if fmt.dirty(large) {
            small |= fmt.set_dirty_bits();
        }
        let (child_pfn, table_entry) = alloc_table(&mut self.pages, &fmt, level)?;
        let Some(child) = table_of(&self.pages, child_pfn) else {
            // SAFETY: just allocated, referenced by nothing.
            unsafe { self.pages.free(child_pfn) };
            return Err(Error::NoMemory);
        };
        for (k, slot) in child.iter().enumerate() {
            // Part k of the run: the leaf's other bits are the same.
            slot.store(small + ((k as u64) << shift), Ordering::Relaxed);
        }
        let parent = table_of(&self.pages, parent_pfn).ok_or(Error::NotMapped)?;
        // One store: the large leaf's translation becomes the table's.
        parent[i].store(table_entry, Ordering::Release);
        let n = self.large_parent(g, level).expect("exists");
        n.reserved -= 1;
        let pos = n.child_pos(i).expect_err("a large leaf has no child table");
        let mut node = Node::new(child_pfn, i as u16);
        node.reserved = ENTRIES as u32;
        n.children.insert(pos, node);
        self.tables += 1;
        Ok(())
    }

    /// The tree node of the table that holds `g`'s entry of `level` (2 or
    /// 3).
    fn large_parent(&mut self, g: u64, level: u8) -> Option<&mut Node> {
        if level == 3 { self.node_l3(g) } else { self.node_l2(g) }
    }

    /// Gives the empty 2 MiB slot at `gpa`, which the caller populated for
    /// a 2 MiB leaf (`populate_region` with `PageSize::Size2M`), an empty
    /// leaf table instead: the slot's populate count moves from the
    /// level-2 table to the new leaf table (512 entries), as a demotion
    /// moves it, so that 4 KiB leaves can then be mapped there and the
    /// range is vacated with `PageSize::Size4K`. Nothing is translated
    /// before or after, so no cached translation changes. Refused with
    /// [`Error::Unaligned`], [`Error::OutOfRange`], [`Error::NotPopulated`]
    /// (no level-2 table, or it counts no 2 MiB entry),
    /// [`Error::AlreadyMapped`] (the slot holds a leaf or a table) and
    /// [`Error::NoMemory`]; on error nothing changes. The tree keeps one
    /// count per table, not per slot: that this slot is the one counted is
    /// the caller's word.
    pub fn split_empty_2m(&mut self, gpa: Gpa) -> Result<(), Error> {
        let g = gpa.0;
        self.check_2m(g)?;
        let fmt = self.fmt;
        let i2 = index(2, g);
        let (l2_pfn, reserved) = self.node_l2(g).map(|n| (n.pfn, n.reserved)).ok_or(Error::NotPopulated)?;
        if reserved == 0 {
            return Err(Error::NotPopulated);
        }
        let t2 = table_of(&self.pages, l2_pfn).ok_or(Error::NotPopulated)?;
        if fmt.is_present(t2[i2].load(Ordering::Acquire)) {
            return Err(Error::AlreadyMapped { same_frame: false });
        }
        let (l1_pfn, table_entry) = alloc_table(&mut self.pages, &fmt, 2)?;
        let Some(t2) = table_of(&self.pages, l2_pfn) else {
            // SAFETY: just allocated, referenced by nothing.
            unsafe { self.pages.free(l1_pfn) };
            return Err(Error::NoMemory);
        };
        t2[i2].store(table_entry, Ordering::Release);
        let n2 = self.node_l2(g).expect("exists");
        n2.reserved -= 1;
        let pos = n2.child_pos(i2).expect_err("an empty slot has no child table");
        let mut child = Node::new(l1_pfn, i2 as u16);
        child.reserved = ENTRIES as u32;
        n2.children.insert(pos, child);
        self.tables += 1;
        Ok(())
    }

    /// Promotes the 1 GiB range at `gpa` to one 1 GiB leaf if its level-2
    /// table holds 512 2 MiB leaves that map one 1 GiB-aligned contiguous
    /// run with one protection and memory type (the reverse of
    /// [`demote_1g`](Self::demote_1g); see the module doc): accessed if any
    /// 2 MiB leaf was, dirty if any was, put in with one store of the
    /// level-3 entry, so no page of the range is ever not-present. The
    /// level-2 table is freed (its frame returned) and the range counts as
    /// populated for a 1 GiB leaf. The caller invalidates cached
    /// translations before the freed page is reused, as for
    /// [`promote_2m`](Self::promote_2m). Refused, with nothing changed:
    /// [`PromoteRefusal::Unaligned`] (not 1 GiB aligned, or beyond the
    /// table's width), [`PromoteRefusal::Unsupported`] (the format has no
    /// 1 GiB leaves), [`PromoteRefusal::NoLeafTable`] (no level-2 table
    /// there: not populated, or already one leaf), [`PromoteRefusal::Hole`]
    /// (an entry is not present, or is a leaf table rather than a 2 MiB
    /// leaf: promote that first), [`PromoteRefusal::NotContiguous`],
    /// [`PromoteRefusal::Mixed`] and [`PromoteRefusal::PartialCount`] (the
    /// table is not counted for 512 2 MiB leaves).
    pub fn promote_1g(&mut self, gpa: Gpa) -> Result<Pfn, PromoteRefusal> {
        let g = gpa.0;
        if !g.is_multiple_of(G1) || g >= self.fmt.gpa_limit() {
            return Err(PromoteRefusal::Unaligned);
        }
        if !self.fmt.supports(PageSize::Size1G) || !self.fmt.supports(PageSize::Size2M) {
            return Err(PromoteRefusal::Unsupported);
        }
        let i3 = index(3, g);
        let (l3_pfn, l2_pfn, l2_reserved) = {
            let n3 = self.node_l3(g).ok_or(PromoteRefusal::NoLeafTable)?;
            let pos = n3.child_pos(i3).map_err(|_| PromoteRefusal::NoLeafTable)?;
            let l2 = &n3.children[pos];
            if !l2.children.is_empty() {
                // A 2 MiB range still has its leaf table.
                return Err(PromoteRefusal::Hole);
            }
            (n3.pfn, l2.pfn, l2.reserved)
        };
        if l2_reserved as usize != ENTRIES {
            return Err(PromoteRefusal::PartialCount);
        }
        let huge = self.merged_leaf(l2_pfn, 2)?;
        let t3 = table_of(&self.pages, l3_pfn).ok_or(PromoteRefusal::NoLeafTable)?;
        // One store: the level-2 table's translations become the leaf's.
        t3[i3].store(huge, Ordering::Release);
        let n3 = self.node_l3(g).expect("checked above");
        let pos = n3.child_pos(i3).expect("checked above");
        n3.children.remove(pos);
        n3.reserved += 1;
        // SAFETY: the level-2 table is no longer referenced by any entry
        // or node; hardware may cache it until the caller invalidates,
        // which it does before the provider hands the page out again.
        unsafe { self.pages.free(l2_pfn) };
        self.tables -= 1;
        Ok(l2_pfn)
    }

    /// A 1 GiB-aligned address inside the table's width.
    fn check_1g(&self, g: u64) -> Result<(), Error> {
        if !g.is_multiple_of(G1) {
            return Err(Error::Unaligned);
        }
        if g >= self.fmt.gpa_limit() {
            return Err(Error::OutOfRange);
        }
        Ok(())
    }

    /// The level-3 node covering `gpa` (the table holding its 1 GiB
    /// entry), if it exists.
    fn node_l3(&mut self, g: u64) -> Option<&mut Node> {
        let p = self.root.child_pos(index(4, g)).ok()?;
        Some(&mut self.root.children[p])
    }

    /// Splits the 1 GiB leaf at `gpa` into a level-2 table of 512 2 MiB
    /// leaves with the same translations and memory type, each carrying
    /// the large leaf's accessed and dirty state, with the large leaf's
    /// protection or `prot` when it is `Some` (see the module doc): one
    /// store of the level-3 entry, so no page of the range is ever
    /// not-present. The range then counts as populated for 2 MiB leaves
    /// (demote those with [`demote_2m_as`](Self::demote_2m_as), or vacate
    /// with `PageSize::Size2M`). Refused with [`Error::Unaligned`],
    /// [`Error::OutOfRange`], [`Error::UnsupportedSize`] (the format has no
    /// 2 MiB leaves), [`Error::NotMapped`] (no 1 GiB leaf there),
    /// [`Error::NotPopulated`], [`Error::NoMemory`] and the errors of
    /// `PteFormat::leaf_entry` for `prot`; on error nothing changes. The
    /// caller invalidates cached translations as for a 2 MiB demotion.
    pub fn demote_1g_as(&mut self, gpa: Gpa, prot: Option<Prot>) -> Result<(), Error> {
        let g = gpa.0;
        self.check_1g(g)?;
        if !self.fmt.supports(PageSize::Size2M) {
            return Err(Error::UnsupportedSize);
        }
        self.demote_large(g, 3, prot)
    }

    /// [`demote_1g_as`](Self::demote_1g_as) keeping the leaf's protection.
    pub fn demote_1g(&mut self, gpa: Gpa) -> Result<(), Error> {
        self.demote_1g_as(gpa, None)
    }

    /// Gives the empty 1 GiB slot at `gpa`, which the caller populated for
    /// a 1 GiB leaf (`populate_region` with `PageSize::Size1G`), an empty
    /// level-2 table counted for 512 2 MiB leaves instead (as a demotion
    /// moves the count), so that 2 MiB leaves can be mapped there (or each
    /// 2 MiB slot split further with [`split_empty_2m`](Self::split_empty_2m))
    /// and the range is vacated with `PageSize::Size2M`. Nothing is
    /// translated before or after. Refused with [`Error::Unaligned`],
    /// [`Error::OutOfRange`], [`Error::UnsupportedSize`],
    /// [`Error::NotPopulated`] (no level-3 table, or it counts no 1 GiB
    /// entry), [`Error::AlreadyMapped`] (the slot holds a leaf or a table)
    /// and [`Error::NoMemory`]; on error nothing changes. As for
    /// `split_empty_2m`, that this slot is the one counted is the caller's
    /// word.
    pub fn split_empty_1g(&mut self, gpa: Gpa) -> Result<(), Error> {
        let g = gpa.0;
        self.check_1g(g)?;
        let fmt = self.fmt;
        if !fmt.supports(PageSize::Size2M) {
            return Err(Error::UnsupportedSize);
        }
        let i3 = index(3, g);
        let (l3_pfn, reserved) = self.node_l3(g).map(|n| (n.pfn, n.reserved)).ok_or(Error::NotPopulated)?;
        if reserved == 0 {
            return Err(Error::NotPopulated);
        }
        let t3 = table_of(&self.pages, l3_pfn).ok_or(Error::NotPopulated)?;
        if fmt.is_present(t3[i3].load(Ordering::Acquire)) {
            return Err(Error::AlreadyMapped { same_frame: false });
        }
        let (l2_pfn, table_entry) = alloc_table(&mut self.pages, &fmt, 3)?;
        let Some(t3) = table_of(&self.pages, l3_pfn) else {
            // SAFETY: just allocated, referenced by nothing.
            unsafe { self.pages.free(l2_pfn) };
            return Err(Error::NoMemory);
        };
        t3[i3].store(table_entry, Ordering::Release);
        let n3 = self.node_l3(g).expect("exists");
        n3.reserved -= 1;
        let pos = n3.child_pos(i3).expect_err("an empty slot has no child table");
        let mut child = Node::new(l2_pfn, i3 as u16);
        child.reserved = ENTRIES as u32;
        n3.children.insert(pos, child);
        self.tables += 1;
        Ok(())
    }
}
