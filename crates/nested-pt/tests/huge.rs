//! Demotion of a 1 GiB leaf to 512 2 MiB leaves (and on to 4 KiB): every
//! translation is identical before and after (through the software MMU
//! and the table's lookup), accessed and dirty state is carried, every
//! refusal changes nothing, and the populate counts move with the
//! translation (the range vacates as 2 MiB leaves afterwards).

use nested_pt::mmu;
use nested_pt::{
    Access, Caps, Error, FormatKind, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat,
};

const G1: u64 = 1 << 30;
const M2: u64 = 2 << 20;
const BASE: u64 = 3 * G1;
const RUN: u64 = 0x4_0000 * 5; // a 1 GiB-aligned frame

fn formats() -> Vec<PteFormat> {
    let c = Caps::default();
    vec![PteFormat::ept(c), PteFormat::ept_emulated_ad(c), PteFormat::npt(c), PteFormat::vtd(c), PteFormat::amd_vi(c)]
}

fn rw(f: &PteFormat) -> Prot {
    if f.is_iommu() { Prot::RW } else { Prot::RWX }
}

fn huge_table(f: PteFormat) -> NestedTable<HeapPages> {
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), G1, PageSize::Size1G).unwrap();
    t.map(Gpa(BASE), Pfn(RUN), PageSize::Size1G, rw(&f), MemType::WriteBack).unwrap();
    t
}

/// Sample addresses across the GiB (every 2 MiB run, two pages in each).
fn samples() -> impl Iterator<Item = u64> {
    (0..512u64).flat_map(|k| [BASE + k * M2 + 8, BASE + k * M2 + 511 * 4096 + 16])
}

/// A page's hardware translation (if the walk succeeds) and its mapping.
type Seen = (Option<u64>, Option<(Pfn, Prot)>);

fn translations(t: &NestedTable<HeapPages>) -> Vec<Seen> {
    let hw = t.format().kind() != FormatKind::EptEmulatedAd;
    samples()
        .map(|g| {
            let walk = hw
                .then(|| mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(g), Access::Read, false).ok())
                .flatten()
                .map(|x| x.hpa);
            (walk, t.is_mapped(Gpa(g)))
        })
        .collect()
}

#[test]
fn demote_1g_keeps_every_translation_and_carries_ad() {
    for f in formats() {
        if !f.supports(PageSize::Size1G) {
            continue;
        }
        let mut t = huge_table(f);
        assert_eq!(t.lookup(Gpa(BASE + 5 * M2)).map(|l| l.size), Some(PageSize::Size1G));
        let before = translations(&t);
        for (k, g) in samples().enumerate() {
            let want = RUN + (g - BASE) / 4096;
            assert_eq!(before[k].1.map(|(p, _)| p), Some(Pfn(want)), "{f:?} {g:#x}");
        }
        // Dirty and accessed on the 1 GiB leaf.
        let leaf = t.lookup(Gpa(BASE)).unwrap();
        leaf.reset_dirty(true);
        leaf.reset_accessed(true);
        let tables = t.table_pages();
        t.demote_1g(Gpa(BASE)).unwrap();
        assert_eq!(t.table_pages(), tables + 1, "{f:?}: one level-2 table");
        assert_eq!(translations(&t), before, "{f:?}: same translations");
        for k in 0..512 {
            let l = t.lookup(Gpa(BASE + k * M2 + 4096)).unwrap();
            assert_eq!(l.size, PageSize::Size2M);
            assert_eq!(l.gpa, Gpa(BASE + k * M2));
            assert_eq!(l.pfn(), Pfn(RUN + k * 512));
            let ad = f.dirty_mask() != 0;
            assert_eq!(l.dirty() && l.accessed(), ad, "{f:?}: A/D carried to run {k}");
            assert_eq!(l.prot(), rw(&f));
        }
        // Further down: one 2 MiB leaf to 4 KiB, same translations.
        t.demote_2m(Gpa(BASE + 7 * M2)).unwrap();
        assert_eq!(translations(&t), before, "{f:?}");
        assert_eq!(t.lookup(Gpa(BASE + 7 * M2 + 3 * 4096)).unwrap().size, PageSize::Size4K);
        // The counts moved: vacate as 2 MiB leaves around the leaf table,
        // and the 4 KiB chunk as 4 KiB.
        assert_eq!(t.unmap_vacate_region(Gpa(BASE), 7 * M2, PageSize::Size2M).unwrap(), 7 * 512);
        assert_eq!(t.unmap_vacate_region(Gpa(BASE + 7 * M2), M2, PageSize::Size4K).unwrap(), 512);
        assert_eq!(t.unmap_vacate_region(Gpa(BASE + 8 * M2), G1 - 8 * M2, PageSize::Size2M).unwrap(), 504 * 512);
        assert_eq!(t.unmap_vacate_region(Gpa(BASE), G1, PageSize::Size1G), Err(Error::NotPopulated));
        let empty = NestedTable::new(f, HeapPages::new()).unwrap();
        assert_eq!(t.table_pages(), empty.table_pages(), "{f:?}: every table freed");
    }
}

#[test]
fn demote_1g_with_another_protection() {
    let f = PteFormat::ept(Caps::default());
    let mut t = huge_table(f);
    t.demote_1g_as(Gpa(BASE), Some(Prot::READ)).unwrap();
    for k in [0u64, 100, 511] {
        let l = t.lookup(Gpa(BASE + k * M2)).unwrap();
        assert_eq!((l.size, l.prot()), (PageSize::Size2M, Prot::READ));
    }
    // A write-protected translation now refuses writes in the walk.
    let w = mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(BASE + 9), Access::Write, false);
    assert!(w.is_err());
}

#[test]
fn demote_1g_refusals_change_nothing() {
    for f in formats() {
        if !f.supports(PageSize::Size1G) {
            continue;
        }
        let mut t = huge_table(f);
        let before = translations(&t);
        let tables = t.table_pages();
        assert_eq!(t.demote_1g(Gpa(BASE + M2)), Err(Error::Unaligned));
        assert_eq!(t.demote_1g(Gpa(BASE + G1)), Err(Error::NotMapped), "no leaf there");
        assert_eq!(t.demote_1g(Gpa(BASE + 4096)), Err(Error::Unaligned));
        assert_eq!(t.demote_1g(Gpa(1 << 50)), Err(Error::OutOfRange));
        assert_eq!(t.split_empty_1g(Gpa(BASE)), Err(Error::AlreadyMapped { same_frame: false }));
        // No level-3 table there (the next 512 GiB).
        assert_eq!(t.split_empty_1g(Gpa(1 << 39)), Err(Error::NotPopulated));
        assert_eq!(t.table_pages(), tables);
        assert_eq!(translations(&t), before);
        // Twice: the second finds a table, not a leaf.
        t.demote_1g(Gpa(BASE)).unwrap();
        assert_eq!(t.demote_1g(Gpa(BASE)), Err(Error::NotMapped));
    }
    // No 2 MiB leaves in the format: no demotion to them.
    let c = Caps { page_2m: false, ..Caps::default() };
    let mut t = NestedTable::new(PteFormat::ept(c), HeapPages::new()).unwrap();
    assert_eq!(t.demote_1g(Gpa(BASE)), Err(Error::UnsupportedSize));
}

#[test]
fn split_empty_1g_moves_the_count_to_2m_slots() {
    let f = PteFormat::npt(Caps::default());
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), G1, PageSize::Size1G).unwrap();
    let tables = t.table_pages();
    t.split_empty_1g(Gpa(BASE)).unwrap();
    assert_eq!(t.table_pages(), tables + 1);
    assert!(t.is_mapped(Gpa(BASE)).is_none());
    // 2 MiB leaves map there now, and one slot splits on to 4 KiB.
    t.map(Gpa(BASE + M2), Pfn(RUN + 512), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    assert!(t.map(Gpa(BASE), Pfn(RUN), PageSize::Size1G, Prot::RW, MemType::WriteBack).is_err());
    t.split_empty_2m(Gpa(BASE + 2 * M2)).unwrap();
    t.map(Gpa(BASE + 2 * M2 + 4096), Pfn(9), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(t.unmap_vacate_region(Gpa(BASE + 2 * M2), M2, PageSize::Size4K).unwrap(), 1);
    assert_eq!(t.unmap_vacate_region(Gpa(BASE), 2 * M2, PageSize::Size2M).unwrap(), 512);
    assert_eq!(t.unmap_vacate_region(Gpa(BASE + 3 * M2), G1 - 3 * M2, PageSize::Size2M).unwrap(), 0);
    let empty = NestedTable::new(f, HeapPages::new()).unwrap();
    assert_eq!(t.table_pages(), empty.table_pages());
}

/// A 1 GiB range mapped with 512 2 MiB leaves of one aligned run.
fn table_of_2m_leaves(f: PteFormat) -> NestedTable<HeapPages> {
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), G1, PageSize::Size2M).unwrap();
    for k in 0..512 {
        t.map(Gpa(BASE + k * M2), Pfn(RUN + k * 512), PageSize::Size2M, rw(&f), MemType::WriteBack).unwrap();
    }
    t
}

#[test]
fn promote_1g_keeps_every_translation_and_carries_ad() {
    for f in formats() {
        if !f.supports(PageSize::Size1G) {
            continue;
        }
        for (mark, dirty) in [(None, false), (Some(0u64), true), (Some(511), true), (Some(77), false)] {
            let mut t = table_of_2m_leaves(f);
            // (The software walk sets accessed bits: clear them after.)
            let before = translations(&t);
            for k in 0..512 {
                let l = t.lookup(Gpa(BASE + k * M2)).unwrap();
                l.reset_accessed(false);
                l.reset_dirty(false);
            }
            // One 2 MiB leaf accessed (and maybe dirty), the rest clean.
            if let Some(k) = mark {
                let l = t.lookup(Gpa(BASE + k * M2)).unwrap();
                l.reset_accessed(true);
                if dirty {
                    l.reset_dirty(true);
                }
            }
            let tables = t.table_pages();
            t.promote_1g(Gpa(BASE)).unwrap();
            assert_eq!(t.table_pages(), tables - 1, "{f:?}: the level-2 table freed");
            let l = t.lookup(Gpa(BASE + 300 * M2 + 4096)).unwrap();
            assert_eq!((l.size, l.gpa, l.pfn(), l.prot()), (PageSize::Size1G, Gpa(BASE), Pfn(RUN), rw(&f)));
            let ad = f.dirty_mask() != 0;
            assert_eq!(l.accessed(), ad && mark.is_some(), "{f:?} {mark:?}: accessed carried");
            assert_eq!(l.dirty(), ad && dirty, "{f:?} {mark:?}: dirty carried");
            assert_eq!(translations(&t), before, "{f:?}: same translations");
            // The range counts as populated for a 1 GiB leaf again: it
            // demotes and promotes back, and vacates as one leaf.
            t.demote_1g(Gpa(BASE)).unwrap();
            assert_eq!(translations(&t), before);
            t.promote_1g(Gpa(BASE)).unwrap();
            assert_eq!(t.unmap_vacate_region(Gpa(BASE), G1, PageSize::Size1G).unwrap(), 1 << 18);
            let empty = NestedTable::new(f, HeapPages::new()).unwrap();
            assert_eq!(t.table_pages(), empty.table_pages(), "{f:?}: every table freed");
        }
    }
}

#[test]
fn promote_1g_refusals_change_nothing() {
    use nested_pt::PromoteRefusal as R;
    let f = PteFormat::ept(Caps::default());
    let check = |t: &mut NestedTable<HeapPages>, want: R| {
        let (before, tables) = (translations(t), t.table_pages());
        assert_eq!(t.promote_1g(Gpa(BASE)), Err(want));
        assert_eq!((translations(t), t.table_pages()), (before, tables), "{want:?} changed something");
    };
    // One 2 MiB range still a leaf table (demoted to 4 KiB).
    let mut t = table_of_2m_leaves(f);
    t.demote_2m(Gpa(BASE + 9 * M2)).unwrap();
    check(&mut t, R::Hole);
    // ... which promotes back, and then the whole GiB does.
    t.promote_2m(Gpa(BASE + 9 * M2)).unwrap();
    t.promote_1g(Gpa(BASE)).unwrap();
    // A hole.
    let mut t = table_of_2m_leaves(f);
    t.unmap(Gpa(BASE + 400 * M2)).unwrap();
    check(&mut t, R::Hole);
    // Frames out of order.
    let mut t = table_of_2m_leaves(f);
    t.unmap(Gpa(BASE + 3 * M2)).unwrap();
    t.map(Gpa(BASE + 3 * M2), Pfn(RUN + 4 * 512), PageSize::Size2M, Prot::RWX, MemType::WriteBack).unwrap();
    check(&mut t, R::NotContiguous);
    // A run that is contiguous but not 1 GiB aligned.
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), G1, PageSize::Size2M).unwrap();
    for k in 0..512 {
        t.map(Gpa(BASE + k * M2), Pfn(RUN + 512 + k * 512), PageSize::Size2M, Prot::RWX, MemType::WriteBack).unwrap();
    }
    check(&mut t, R::NotContiguous);
    // Mixed protections and memory types.
    let mut t = table_of_2m_leaves(f);
    t.unmap(Gpa(BASE + 511 * M2)).unwrap();
    t.map(Gpa(BASE + 511 * M2), Pfn(RUN + 511 * 512), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
    check(&mut t, R::Mixed);
    let mut t = table_of_2m_leaves(f);
    t.unmap(Gpa(BASE + 5 * M2)).unwrap();
    t.map(Gpa(BASE + 5 * M2), Pfn(RUN + 5 * 512), PageSize::Size2M, Prot::RWX, MemType::Uncacheable).unwrap();
    check(&mut t, R::Mixed);
    // Not aligned, no level-2 table, already one leaf, beyond the width.
    let mut t = table_of_2m_leaves(f);
    assert_eq!(t.promote_1g(Gpa(BASE + M2)), Err(R::Unaligned));
    assert_eq!(t.promote_1g(Gpa(1 << 50)), Err(R::Unaligned));
    assert_eq!(t.promote_1g(Gpa(BASE + G1)), Err(R::NoLeafTable));
    let mut h = huge_table(f);
    assert_eq!(h.promote_1g(Gpa(BASE)), Err(R::NoLeafTable));
    // A level-2 table counted for 4 KiB leaves (populated so) that holds
    // 2 MiB leaves nowhere: partial count, or holes.
    let mut p = NestedTable::new(f, HeapPages::new()).unwrap();
    p.populate_region(Gpa(BASE), G1, PageSize::Size4K).unwrap();
    assert!(p.promote_1g(Gpa(BASE)).is_err());
    // The format without 1 GiB leaves.
    let c = Caps { page_1g: false, ..Caps::default() };
    let mut t = table_of_2m_leaves(PteFormat::ept(c));
    assert_eq!(t.promote_1g(Gpa(BASE)), Err(R::Unsupported));
    let _ = &mut t;
}
