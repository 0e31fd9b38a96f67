//! 1 GiB leaves: the slots of a space that one aligned 1 GiB run of a
//! mapping's object backs, mapped with one level-3 leaf.
//!
//! A 1 GiB *slot* (an aligned 1 GiB of the space) lying wholly inside one
//! mapping is populated either for one 1 GiB leaf (no level-2 table: the
//! table walk ends at level 3, at the leaf or an empty entry) or for
//! smaller leaves (a level-2 table, whose 2 MiB chunks follow the 2 MiB
//! rules of `space.rs`). `map` populates a slot for a 1 GiB leaf when
//! [`SpaceConfig::huge_leaves`](crate::SpaceConfig::huge_leaves) is on, the
//! format has 1 GiB (and 2 MiB) leaves, dirty tracking is off, and the
//! mapping's object backs the slot with one 1 GiB run
//! ([`VmObject::huge_run_at`]: the object offset of the slot is 1 GiB
//! aligned as well). `populate`, a fault or a hold anywhere in such a
//! slot maps the whole run with one leaf (262,144 pages for
//! `resident_count`).
//!
//! Everything that needs smaller leaves first *splits the slot*: a 1 GiB
//! leaf becomes a level-2 table of 512 2 MiB leaves with the same
//! translations, protection and accessed/dirty state (nested-pt's
//! `demote_1g_as`, one store of the level-3 entry, so no page is ever
//! not-present), an empty slot an empty level-2 table counted for 512
//! 2 MiB leaves (`split_empty_1g`). From then on the 2 MiB machinery
//! applies: the eager split of tracking splits each 2 MiB leaf on to
//! 4 KiB, the lazy one write-protects the 1 GiB leaf and its first write
//! splits it to 2 MiB (still write-protected and clean) and the written
//! 2 MiB on to 4 KiB with the mapping's protection, and `unmap_range` /
//! `protect` split the slots their ends cut, then the 2 MiB chunks. The
//! split runs under the same exclusion as a 2 MiB split (space lock, every
//! client held, `struct_seq` bumped), from `split_chunk` and `split_ends`.
//!
//! Promotion goes the other way one level at a time: once a slot's 512
//! chunks are 2 MiB leaves (promoted, or never split further) of the
//! mapping's 1 GiB run with its whole protection, [`VmSpace::promote`]
//! over the slot, or the automatic promotion of the chunk that completes
//! it, makes them one 1 GiB leaf again (nested-pt's `promote_1g`, one
//! store of the level-3 entry, the level-2 table freed and the generation
//! bumped with `tables_freed`), as for 2 MiB; counted by
//! [`VmSpace::promotions_1g`].
//!
//! [`VmSpace::promote`]: crate::VmSpace::promote
//! [`VmSpace::promotions_1g`]: crate::VmSpace::promotions_1g

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Release;

use nested_pt::{Gpa, NestedTable, PageSize, Prot, TablePages};

use crate::error::{Error, Result};
use crate::object::VmObject;
use crate::space::Inner;
use crate::sync::RawLock;

/// Bytes a 1 GiB leaf (and a level-2 table) covers.
pub(crate) const G1: u64 = 1 << 30;

/// Whether the 1 GiB slot at `g` (aligned, lying inside a mapping) is
/// counted for a 1 GiB leaf (`space::counted_for_leaf` at level 3).
#[inline]
pub(crate) fn slot_huge<P: TablePages>(table: &NestedTable<P>, g: u64) -> bool {
    crate::space::counted_for_leaf(table, g, 3)
}

/// The 1 GiB slot holding `a`, if it lies wholly inside the mapping
/// `[start, m_end)` and is counted for a 1 GiB leaf.
#[inline]
pub(crate) fn huge_slot_at<P: TablePages>(table: &NestedTable<P>, a: u64, start: u64, m_end: u64) -> Option<u64> {
    let g = a & !(G1 - 1);
    (g >= start && m_end - g >= G1 && slot_huge(table, g)).then_some(g)
}

/// `[gpa, end)` cut into spans of one leaf size: whole aligned 1 GiB
/// slots for which `huge` holds are `Size1G`, the rest as
/// `space::spans` cuts it with `large` (2 MiB chunks and 4 KiB pages);
/// neighbours of the same size merged.
pub(crate) fn plan(
    gpa: u64,
    end: u64,
    mut huge: impl FnMut(u64) -> bool,
    mut large: impl FnMut(u64) -> bool,
) -> Vec<(u64, u64, PageSize)> {
    let mut out: Vec<(u64, u64, PageSize)> = Vec::new();
    let push = |out: &mut Vec<(u64, u64, PageSize)>, lo: u64, hi: u64, size: PageSize| match out.last_mut() {
        Some((_, h, s)) if *h == lo && *s == size => *h = hi,
        _ => out.push((lo, hi, size)),
    };
    let mut a = gpa;
    while a < end {
        let b = ((a | (G1 - 1)) + 1).min(end);
        if a.is_multiple_of(G1) && b - a == G1 && huge(a) {
            push(&mut out, a, b, PageSize::Size1G);
        } else {
            for (lo, hi, size) in crate::space::spans(a, b, &mut large) {
                push(&mut out, lo, hi, size);
            }
        }
        a = b;
    }
    out
}

impl<P: TablePages, L: RawLock> Inner<P, L> {
    /// Map the empty 1 GiB slot at `g`, counted for a 1 GiB leaf, with one
    /// leaf for the 1 GiB run backing `object` from byte `offset`; counts
    /// 262,144 resident pages. `Ok(0)` when someone else mapped it first.
    pub(crate) fn map_huge(
        &self,
        table: &NestedTable<P>,
        g: u64,
        prot: Prot,
        object: &VmObject,
        offset: u64,
    ) -> Result<u64> {
        // Only slots with a 1 GiB run are populated for 1 GiB leaves, and
        // an object's frames never change.
        self.map_run_leaf(table, g, object.huge_run_at(offset), PageSize::Size1G, prot, object)
    }

    /// The data path's part: if `gpa` lies in a 1 GiB slot of the mapping
    /// `[start, end)` (object offset `m_offset` at `start`) counted for a
    /// 1 GiB leaf, map the slot's run with one leaf (if nobody did yet)
    /// and return `true`; `false` where the slot has smaller leaves.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fault_huge(
        &self,
        table: &NestedTable<P>,
        gpa: u64,
        start: u64,
        end: u64,
        m_offset: u64,
        prot: Prot,
        object: &VmObject,
    ) -> Result<bool> {
        if !self.huge {
            return Ok(false);
        }
        let Some(g) = huge_slot_at(table, gpa, start, end) else { return Ok(false) };
        self.map_huge(table, g, prot, object, m_offset + (g - start))?;
        Ok(true)
    }

    /// Split the 1 GiB slot holding `c` (a 2 MiB chunk inside a mapping)
    /// if it is counted for a 1 GiB leaf: its leaf becomes 512 2 MiB
    /// leaves with its translations, protection and accessed/dirty state,
    /// an empty slot an empty level-2 table counted for 2 MiB leaves (see
    /// the module doc). `Ok(true)` when it changed something; bumps
    /// `struct_seq` then. Exclusive access; on error nothing changed.
    pub(crate) fn split_huge_slot(&self, table: &mut NestedTable<P>, c: u64) -> Result<bool> {
        if !self.huge {
            return Ok(false);
        }
        let g = c & !(G1 - 1);
        if !slot_huge(table, g) {
            return Ok(false);
        }
        match table.lookup(Gpa(g)).map(|l| l.size) {
            Some(PageSize::Size1G) => table.demote_1g_as(Gpa(g), None).map_err(Error::Table)?,
            Some(_) => return Ok(false),
            None => table.split_empty_1g(Gpa(g)).map_err(Error::Table)?,
        }
        self.struct_seq.fetch_add(1, Release);
        Ok(true)
    }

    /// Split the 1 GiB slots counted for 1 GiB leaves that `[gpa, end)`
    /// cuts (inside the mapping `[start, m_end)`): at most the two at its
    /// ends. Returns whether one was split.
    pub(crate) fn split_cut_huge(
        &self,
        table: &mut NestedTable<P>,
        start: u64,
        m_end: u64,
        gpa: u64,
        end: u64,
    ) -> Result<bool> {
        if !self.huge {
            return Ok(false);
        }
        let mut changed = false;
        for g in [gpa & !(G1 - 1), (end - 1) & !(G1 - 1)] {
            let cut = g < gpa || end - g < G1;
            if cut && g >= start && m_end - g >= G1 {
                changed |= self.split_huge_slot(table, g)?;
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn plan_cuts_slots_chunks_and_pages() {
        const M2: u64 = 2 << 20;
        // 4 KiB head, 2 MiB chunks up to the first GiB, two GiB slots (the
        // second not huge: its chunks), a 2 MiB chunk and a 4 KiB tail.
        let (gpa, end) = (G1 - 2 * M2 - PAGE_SIZE, 3 * G1 + M2 + PAGE_SIZE);
        let p = plan(gpa, end, |g| g == G1, |_| true);
        assert_eq!(
            p,
            alloc::vec![
                (gpa, G1 - 2 * M2, PageSize::Size4K),
                (G1 - 2 * M2, G1, PageSize::Size2M),
                (G1, 2 * G1, PageSize::Size1G),
                (2 * G1, 3 * G1 + M2, PageSize::Size2M),
                (3 * G1 + M2, end, PageSize::Size4K),
            ]
        );
        // Adjacent huge slots merge; nothing large: one 4 KiB span.
        assert_eq!(plan(0, 2 * G1, |_| true, |_| true), alloc::vec![(0, 2 * G1, PageSize::Size1G)]);
        assert_eq!(plan(0, 2 * G1, |_| false, |_| false), alloc::vec![(0, 2 * G1, PageSize::Size4K)]);
    }
}
