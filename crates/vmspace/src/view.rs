//! A read-only view of a nested table.

use nested_pt::{Gpa, NestedTable, PageSize, Pfn, Prot, PteFormat, TablePages, TablePagesIter, Walk};

/// A present leaf, as a value: where it maps, its size and its entry as
/// read (no reference to the entry, so nothing can be written through it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafEntry {
    /// Guest-physical address of the page the leaf maps.
    pub gpa: Gpa,
    /// Size of the page.
    pub size: PageSize,
    /// The entry's value when read.
    pub value: u64,
}

/// A read-only view of a [`NestedTable`]: what
/// [`VmSpace::with_table`](crate::VmSpace::with_table) hands out.
///
/// `NestedTable`'s `&self` methods change entries (map, unmap, accessed
/// and dirty resets) and would let safe code plant or remove leaves behind
/// the space's back (breaking `resident_count` and the mapping
/// invariants); this view only reads. Entries are read atomically and may
/// change concurrently (clients fault, hardware sets accessed/dirty bits).
#[derive(Clone, Copy)]
pub struct TableView<'a, P: TablePages> {
    table: &'a NestedTable<P>,
}

impl<P: TablePages> core::fmt::Debug for TableView<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TableView").field("root", &self.table.root()).finish()
    }
}

impl<'a, P: TablePages> TableView<'a, P> {
    /// A read-only view of `table` (for code that owns a table and shares
    /// the readers written against this view, like a VMM's table dump).
    pub fn new(table: &'a NestedTable<P>) -> Self {
        TableView { table }
    }

    /// The entry format.
    pub fn format(&self) -> &'a PteFormat {
        self.table.format()
    }

    /// The root table's frame.
    pub fn root(&self) -> Pfn {
        self.table.root()
    }

    /// The root pointer given to hardware (see `NestedTable::root_pointer`).
    pub fn root_pointer(&self, track_dirty: bool) -> u64 {
        self.table.root_pointer(track_dirty)
    }

    /// Table pages in use.
    pub fn table_pages(&self) -> usize {
        self.table.table_pages()
    }

    /// Bytes of table pages in use.
    pub fn table_bytes(&self) -> usize {
        self.table.table_bytes()
    }

    /// The table-page provider (its statistics, or the pages for a
    /// software walk such as `nested_pt::mmu::translate`). Writing a table
    /// page through it needs `unsafe` (`TablePages::ptr` is a raw
    /// pointer); note that `mmu::translate` sets accessed/dirty bits as
    /// hardware would (never anything else).
    pub fn pages(&self) -> &'a P {
        self.table.pages()
    }

    /// The table pages in use (frame, level, first address covered), root
    /// first (see `NestedTable::table_pages_iter`): for a provider or an
    /// exporter that must know which of its frames hold the space's tables.
    pub fn table_pages_iter(&self) -> TablePagesIter<'a> {
        self.table.table_pages_iter()
    }

    /// The value of the entry at `level` (4: root .. 1: leaf table) that
    /// translates `gpa` (see `NestedTable::read_entry` for the errors).
    pub fn read_entry(&self, gpa: Gpa, level: u8) -> Result<u64, nested_pt::Error> {
        self.table.read_entry(gpa, level)
    }

    /// The present leaf that maps `gpa`, as a value.
    pub fn lookup(&self, gpa: Gpa) -> Option<LeafEntry> {
        let l = self.table.lookup(gpa)?;
        Some(LeafEntry { gpa: l.gpa, size: l.size, value: l.value() })
    }

    /// Frame of the 4 KiB page containing `gpa`, and the protection, when
    /// mapped.
    pub fn is_mapped(&self, gpa: Gpa) -> Option<(Pfn, Prot)> {
        self.table.is_mapped(gpa)
    }

    /// The entries on the path to `gpa`, root first (values).
    pub fn walk(&self, gpa: Gpa) -> Walk {
        self.table.walk(gpa)
    }

    /// The present leaves that map part of `[gpa, gpa+len)`, in address
    /// order, as values.
    pub fn leaves(&self, gpa: Gpa, len: u64) -> impl Iterator<Item = LeafEntry> + 'a {
        self.table.leaves(gpa, len).map(|l| LeafEntry { gpa: l.gpa, size: l.size, value: l.value() })
    }

    /// Calls `f` once per leaf table that maps part of `[gpa, gpa+len)`
    /// with the address of the first entry passed and the values of the
    /// entries inside the range (present or not); large leaves come one at
    /// a time (see `NestedTable::for_each_leaf_table`).
    pub fn for_each_leaf_table(&self, gpa: Gpa, len: u64, mut f: impl FnMut(Gpa, &[u64], PageSize)) {
        let mut buf = [0u64; 512];
        self.table.for_each_leaf_table(gpa, len, |base, entries, size| {
            let n = entries.len().min(buf.len());
            for (b, e) in buf.iter_mut().zip(entries) {
                *b = e.load(core::sync::atomic::Ordering::Acquire);
            }
            f(base, &buf[..n], size);
        });
    }
}
