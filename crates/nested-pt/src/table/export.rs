//! Access for code outside the crate that inspects, exports or copies a
//! table: its table pages, raw entries by address and level, a copy into
//! another provider, and a dirty harvest that reports runs instead of
//! filling a bitmap.
//!
//! Everything here goes through the tree's software shadow (which owns the
//! table pages and their counts), never through frame numbers read from
//! entries, so nothing here can be led into a page the tree does not own.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{NestedTable, Node, alloc_table, entry_span, index, table_of};
use crate::pages::TablePages;
use crate::{ENTRIES, Error, Gpa, PageSize, Pfn};

/// One table page of a [`NestedTable`], as
/// [`NestedTable::table_pages_iter`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TablePage {
    /// The page's frame (in the table's provider).
    pub pfn: Pfn,
    /// Its level: 4 for the root (PML4 / EPT PML4), 1 for a leaf table
    /// (PT).
    pub level: u8,
    /// The first guest-physical address the page's entries cover (0 for
    /// the root; the page covers `512 * entry span` bytes from here).
    pub gpa: Gpa,
}

/// Iterator over a table's pages, root first, then depth-first in address
/// order; see [`NestedTable::table_pages_iter`].
pub struct TablePagesIter<'a> {
    stack: Vec<(&'a Node, u8, u64)>,
}

impl Iterator for TablePagesIter<'_> {
    type Item = TablePage;

    fn next(&mut self) -> Option<TablePage> {
        let (node, level, base) = self.stack.pop()?;
        // Children are sorted by index: push them in reverse so that the
        // lowest address comes out first.
        if level > 1 {
            let span = entry_span(level);
            for c in node.children.iter().rev() {
                self.stack.push((c, level - 1, base + c.index as u64 * span));
            }
        }
        Some(TablePage { pfn: node.pfn, level, gpa: Gpa(base) })
    }
}

impl<P: TablePages> NestedTable<P> {
    /// The table pages the tree uses, root first, then depth-first in
    /// address order (each table before the tables below it): what an
    /// external checker or a dump needs to find every page, and what a
    /// provider needs to know which of its frames are table pages. There
    /// are exactly [`table_pages`](Self::table_pages) of them.
    ///
    /// [`copy_into`](Self::copy_into) allocates the copy's pages in this
    /// order, so zipping the two tables' iterators pairs each page with
    /// its copy.
    pub fn table_pages_iter(&self) -> TablePagesIter<'_> {
        let mut stack = Vec::with_capacity(8);
        stack.push((&self.root, 4u8, 0u64));
        TablePagesIter { stack }
    }

    /// The shadow node of the table at `level` that holds `gpa`'s entry.
    /// [`Error::NotPopulated`] where a table is missing,
    /// [`Error::AlreadyMapped`] where a large leaf sits above `level`.
    fn node_at(&self, gpa: u64, level: u8) -> Result<&Node, Error> {
        if !(1..=4).contains(&level) || gpa >= self.fmt.gpa_limit() {
            return Err(Error::OutOfRange);
        }
        let mut node = &self.root;
        let mut l = 4;
        while l > level {
            let i = index(l, gpa);
            match node.child_pos(i) {
                Ok(pos) => node = &node.children[pos],
                Err(_) => {
                    let e = table_of(&self.pages, node.pfn).map_or(0, |t| t[i].load(Ordering::Acquire));
                    return Err(if self.fmt.is_present(e) && self.fmt.is_leaf(e, l) {
                        Error::AlreadyMapped { same_frame: false }
                    } else {
                        Error::NotPopulated
                    });
                }
            }
            l -= 1;
        }
        Ok(node)
    }

    /// The entry at `level` (4: root .. 1: leaf table) that translates
    /// `gpa`, for atomic access: the raw-entry form of
    /// [`walk`](Self::walk) plus [`entry`](Self::entry), without building
    /// the walk. Refused with [`Error::OutOfRange`] for a level outside
    /// `1..=4` or an address past the 48-bit space, [`Error::NotPopulated`]
    /// where no table exists at that level, and [`Error::AlreadyMapped`]
    /// where a large leaf above `level` maps the address.
    ///
    /// Writes through the returned reference bypass every check of the
    /// tree (as writes through [`entry`](Self::entry) do); prefer
    /// [`write_entry`](Self::write_entry).
    pub fn entry_at(&self, gpa: Gpa, level: u8) -> Result<&AtomicU64, Error> {
        let node = self.node_at(gpa.0, level)?;
        let table = table_of(&self.pages, node.pfn).ok_or(Error::NotPopulated)?;
        Ok(&table[index(level, gpa.0) % ENTRIES])
    }

    /// The value of the entry at `level` that translates `gpa` (see
    /// [`entry_at`](Self::entry_at) for the errors).
    pub fn read_entry(&self, gpa: Gpa, level: u8) -> Result<u64, Error> {
        Ok(self.entry_at(gpa, level)?.load(Ordering::Acquire))
    }

    /// Stores `value` as the entry at `level` that translates `gpa` and
    /// returns the old value (one atomic swap): a raw leaf write for an
    /// external tool (planting a leaf with chosen bits, injecting a bad
    /// entry for a fault test, restoring an exported table).
    ///
    /// The tree keeps its structure: an entry that points at one of the
    /// tree's tables cannot be overwritten, and a present `value` must be
    /// a leaf the format can hold at that level (level 1; level 2 or 3
    /// with the large-page bit, when the format supports that page size).
    /// Besides [`entry_at`](Self::entry_at)'s errors, refused with
    /// [`Error::AlreadyMapped`] (`same_frame: false`) where a table hangs
    /// from the entry, and [`Error::UnsupportedSize`] for a present value
    /// that is a table pointer or a leaf at a level the format cannot map
    /// (any present value at level 4). The value's other bits are not
    /// checked: that is what a raw write is for.
    ///
    /// Write leaves inside populated ranges (the counts of
    /// [`populate_region`](Self::populate_region) keep their table alive);
    /// a leaf written into an unreserved slot goes with its table when a
    /// vacate frees it. The caller invalidates cached translations after
    /// changing a present entry.
    pub fn write_entry(&self, gpa: Gpa, level: u8, value: u64) -> Result<u64, Error> {
        let node = self.node_at(gpa.0, level)?;
        let i = index(level, gpa.0);
        if level > 1 && node.child_pos(i).is_ok() {
            return Err(Error::AlreadyMapped { same_frame: false });
        }
        if self.fmt.is_present(value) {
            let leaf_ok = match PageSize::from_level(level) {
                Some(size) => self.fmt.supports(size) && self.fmt.is_leaf(value, level),
                None => false,
            };
            if !leaf_ok {
                return Err(Error::UnsupportedSize);
            }
        }
        let table = table_of(&self.pages, node.pfn).ok_or(Error::NotPopulated)?;
        Ok(table[i % ENTRIES].swap(value, Ordering::AcqRel))
    }

    /// A copy of the table whose pages come from `pages`: the same
    /// format, entries and populated ranges, with every table pointer
    /// remapped to the copy's own pages (leaves are copied bit for bit,
    /// accessed/dirty bits included). The copy's pages are allocated in
    /// [`table_pages_iter`](Self::table_pages_iter) order, so the two
    /// iterators pair each page with its copy; the copy then lives on its
    /// own (populate, map, vacate, harvest on either leave the other as
    /// it was).
    ///
    /// Entries are read one at a time: a copy taken while other threads
    /// or hardware change entries holds each entry as it was when read.
    /// A table pointer the tree does not own (planted through raw access)
    /// is not copied (the copy's entry is empty).
    ///
    /// Refused with [`Error::NoMemory`] when `pages` runs out and
    /// [`Error::OutOfRange`] when it hands out a frame the format cannot
    /// address; the pages taken so far are returned to `pages` before it
    /// is dropped.
    pub fn copy_into<Q: TablePages>(&self, pages: Q) -> Result<NestedTable<Q>, Error> {
        let mut dst = NestedTable::new(self.fmt, pages)?;
        copy_node(&self.root, 4, &self.pages, &mut dst.root, &mut dst.pages, &self.fmt, &mut dst.tables)?;
        Ok(dst)
    }

    /// Reports the dirty pages of `[gpa, gpa+len)` as runs: `f(start,
    /// bytes)` once per maximal run of contiguous dirty memory, in address
    /// order, and, when `clear`, clears the dirty state of the leaves it
    /// reports (the locked form, safe against concurrent use, as
    /// [`harvest_dirty`](Self::harvest_dirty)). A dirty 1 GiB leaf is one
    /// run of 1 GiB, not 262144 bitmap bits. Returns the number of dirty
    /// 4 KiB pages reported.
    ///
    /// Same range rules as `harvest_dirty`: 4 KiB aligned, non-empty,
    /// inside the 48-bit space, and no large leaf cut by the range's ends
    /// ([`Error::WouldSplit`]). A large leaf mapped concurrently that
    /// sticks out of the range has only its pages inside reported, and
    /// keeps its dirty state (it covers pages outside).
    pub fn harvest_dirty_runs(
        &self,
        gpa: Gpa,
        len: u64,
        clear: bool,
        mut f: impl FnMut(Gpa, u64),
    ) -> Result<u64, Error> {
        self.dirty_runs(gpa, len, clear, &mut f, super::harvest::simd())
    }
}

/// Copies the table of `src` (in `sp`, at `level`) into the table of
/// `dst` (in `dp`), allocating `dst`'s children in pre-order; each child is
/// attached to the copy's tree before anything can fail, so a failed copy
/// is freed by the tree's drop.
fn copy_node<P: TablePages, Q: TablePages>(
    src: &Node,
    level: u8,
    sp: &P,
    dst: &mut Node,
    dp: &mut Q,
    fmt: &crate::PteFormat,
    tables: &mut usize,
) -> Result<(), Error> {
    dst.reserved = src.reserved;
    let st = table_of(sp, src.pfn).ok_or(Error::NoMemory)?;
    // This table's entries first: leaves and empty slots as they are;
    // slots with a child are set below, when the child's page exists, and
    // a table pointer without a child (not the tree's) stays empty.
    {
        let dt = table_of(dp, dst.pfn).ok_or(Error::NoMemory)?;
        for (s, d) in st.iter().zip(dt.iter()) {
            let v = s.load(Ordering::Acquire);
            let keep = !fmt.is_present(v) || fmt.is_leaf(v, level);
            d.store(if keep { v } else { 0 }, Ordering::Relaxed);
        }
    }
    dst.children.reserve_exact(src.children.len());
    for child in &src.children {
        let (pfn, entry) = alloc_table(dp, fmt, level)?;
        dst.children.push(Node::new(pfn, child.index));
        *tables += 1;
        let i = child.index as usize % ENTRIES;
        // Keep the accessed bit hardware set in the table pointer.
        let old = st[i].load(Ordering::Acquire);
        let new = entry | (old & fmt.accessed_mask() & !fmt.addr_mask());
        if let Some(dt) = table_of(dp, dst.pfn) {
            dt[i].store(new, Ordering::Release);
        }
        let last = dst.children.last_mut().ok_or(Error::NoMemory)?;
        copy_node(child, level - 1, sp, last, dp, fmt, tables)?;
    }
    Ok(())
}
