//! Promotion of 512 small leaves to one 2 MiB leaf and demotion back: the
//! translations (through the software MMU) are identical before and after,
//! accessed and dirty state is carried, every refusal changes nothing, and
//! the populate counts move with the translation.

use nested_pt::mmu;
use nested_pt::{
    Access, Caps, Error, FormatKind, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, PromoteRefusal, Prot,
    PteFormat,
};

const M2: u64 = 2 << 20;
const BASE: u64 = 0x4000_0000 + 3 * M2;
const RUN: u64 = 0x1_0000; // frame of the 2 MiB-aligned run

fn formats() -> Vec<PteFormat> {
    let c = Caps::default();
    vec![PteFormat::ept(c), PteFormat::ept_emulated_ad(c), PteFormat::npt(c), PteFormat::vtd(c), PteFormat::amd_vi(c)]
}

fn rw(f: &PteFormat) -> Prot {
    if f.is_iommu() { Prot::RW } else { Prot::RWX }
}

/// 512 small leaves of one contiguous run at BASE.
fn small_table(f: PteFormat) -> NestedTable<HeapPages> {
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), M2, PageSize::Size4K).unwrap();
    let n = t.map_range(Gpa(BASE), M2, rw(&f), MemType::WriteBack, |g| Some(Pfn(RUN + (g.0 - BASE) / 4096))).unwrap();
    assert_eq!(n, 512);
    t
}

/// A page's hardware translation (if the walk succeeds) and its mapping.
type Seen = (Option<u64>, Option<(Pfn, Prot)>);

/// What each page of the range translates to: through the software MMU
/// (the hardware's walk) where the format's hardware bits say present,
/// and through the table's own lookup (frame and protection) for all.
fn translations(t: &NestedTable<HeapPages>) -> Vec<Seen> {
    let hw = t.format().kind() != FormatKind::EptEmulatedAd;
    (0..512u64)
        .map(|k| BASE + k * 4096 + 8)
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
fn promote_then_demote_keeps_every_translation_and_carries_ad() {
    for f in formats() {
        let mut t = small_table(f);
        let before = translations(&t);
        assert!(before.iter().all(|(_, m)| m.is_some()));
        if f.kind() != FormatKind::EptEmulatedAd {
            assert!(before.iter().all(|(w, _)| w.is_some()), "{f:?}");
        }
        // One page written (hardware A/D where the format has them).
        t.record_access(Gpa(BASE + 77 * 4096), Access::Write).unwrap();
        let pages = t.table_pages();
        let freed = t.promote_2m(Gpa(BASE)).unwrap();
        assert_eq!(t.table_pages(), pages - 1, "{f:?}: the leaf table is freed");
        let leaf = t.lookup(Gpa(BASE + 5)).unwrap();
        assert_eq!(leaf.size, PageSize::Size2M, "{f:?}");
        assert_eq!(leaf.pfn(), Pfn(RUN));
        assert_eq!(translations(&t), before, "{f:?}: same translations as one large leaf");
        let ad = f.can_track_dirty();
        assert_eq!(leaf.dirty(), ad, "{f:?}: the small leaf's D carried to the large one");
        assert_eq!(leaf.accessed(), ad && f.hw_ad() || f.kind() == FormatKind::EptEmulatedAd);
        assert_ne!(freed, t.hw_root());
        // The range now counts as populated for 2 MiB leaves.
        let mut bm = [0u64; 8];
        if ad {
            assert_eq!(t.scan_dirty(Gpa(BASE), M2, &mut bm, false), Ok(512), "{f:?}");
        }
        // Demote: 512 small leaves again, each dirty where the large one was.
        t.demote_2m(Gpa(BASE)).unwrap();
        assert_eq!(t.table_pages(), pages, "{f:?}");
        assert_eq!(translations(&t), before, "{f:?}: same translations after the split");
        let l = t.lookup(Gpa(BASE + 300 * 4096)).unwrap();
        assert_eq!((l.size, l.pfn(), l.prot()), (PageSize::Size4K, Pfn(RUN + 300), rw(&f)));
        if ad {
            assert_eq!(
                t.harvest_dirty(Gpa(BASE), M2, &mut bm),
                Ok(512),
                "{f:?}: a harvest after the split misses nothing"
            );
        }
        // Back to the 4 KiB counts: the range unmaps and vacates as such.
        assert_eq!(t.unmap_vacate_region(Gpa(BASE), M2, PageSize::Size4K), Ok(512), "{f:?}");
    }
}

#[test]
fn refusals_change_nothing() {
    let f = PteFormat::ept(Caps::default());
    let dump = |t: &NestedTable<HeapPages>| {
        (t.table_pages(), (0..512u64).map(|k| t.is_mapped(Gpa(BASE + k * 4096))).collect::<Vec<_>>())
    };
    // A hole.
    let mut t = small_table(f);
    t.unmap(Gpa(BASE + 9 * 4096)).unwrap();
    let d = dump(&t);
    assert_eq!(t.promote_2m(Gpa(BASE)), Err(PromoteRefusal::Hole));
    assert_eq!(dump(&t), d);
    // Mixed protection.
    let mut t = small_table(f);
    t.unmap(Gpa(BASE + 9 * 4096)).unwrap();
    t.map(Gpa(BASE + 9 * 4096), Pfn(RUN + 9), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(t.promote_2m(Gpa(BASE)), Err(PromoteRefusal::Mixed));
    // Not contiguous.
    let mut t = small_table(f);
    t.unmap(Gpa(BASE + 9 * 4096)).unwrap();
    t.map(Gpa(BASE + 9 * 4096), Pfn(RUN + 999), PageSize::Size4K, Prot::RWX, MemType::WriteBack).unwrap();
    assert_eq!(t.promote_2m(Gpa(BASE)), Err(PromoteRefusal::NotContiguous));
    // A run that starts off a 2 MiB frame boundary.
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), M2, PageSize::Size4K).unwrap();
    t.map_range(Gpa(BASE), M2, Prot::RWX, MemType::WriteBack, |g| Some(Pfn(RUN + 1 + (g.0 - BASE) / 4096))).unwrap();
    assert_eq!(t.promote_2m(Gpa(BASE)), Err(PromoteRefusal::NotContiguous));
    // Unaligned, no leaf table, a format without 2 MiB pages.
    let mut t = small_table(f);
    assert_eq!(t.promote_2m(Gpa(BASE + 4096)), Err(PromoteRefusal::Unaligned));
    assert_eq!(t.promote_2m(Gpa(BASE + M2)), Err(PromoteRefusal::NoLeafTable));
    assert_eq!(t.promote_2m(Gpa(1 << 60)), Err(PromoteRefusal::Unaligned));
    let no2m = PteFormat::ept(Caps { page_2m: false, ..Caps::default() });
    let mut t2 = small_table(no2m);
    assert_eq!(t2.promote_2m(Gpa(BASE)), Err(PromoteRefusal::Unsupported));
    // Overlapping populates: the count is not a whole 2 MiB.
    t.populate_region(Gpa(BASE), 4096, PageSize::Size4K).unwrap();
    assert_eq!(t.promote_2m(Gpa(BASE)), Err(PromoteRefusal::PartialCount));
    // Demote refusals.
    let mut t = small_table(f);
    assert_eq!(t.demote_2m(Gpa(BASE + 4096)), Err(Error::Unaligned));
    assert_eq!(t.demote_2m(Gpa(BASE)), Err(Error::NotMapped), "small leaves: nothing to split");
    assert_eq!(t.demote_2m(Gpa(BASE + 8 * M2)), Err(Error::NotMapped));
    assert_eq!(t.demote_2m(Gpa(1 << 60)), Err(Error::OutOfRange));
}

#[test]
fn a_populated_large_leaf_demotes_and_promotes_back() {
    let f = PteFormat::npt(Caps::default());
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), M2, PageSize::Size2M).unwrap();
    t.map(Gpa(BASE), Pfn(RUN), PageSize::Size2M, Prot::RW, MemType::WriteThrough).unwrap();
    let before = translations(&t);
    t.demote_2m(Gpa(BASE)).unwrap();
    let l = t.lookup(Gpa(BASE + 4096 * 511)).unwrap();
    assert_eq!((l.size, l.pfn(), l.prot()), (PageSize::Size4K, Pfn(RUN + 511), Prot::RW));
    assert_eq!(f.mem_type(l.value()), Some(MemType::WriteThrough), "memory type carried");
    assert_eq!(translations(&t), before);
    t.promote_2m(Gpa(BASE)).unwrap();
    assert_eq!(translations(&t), before);
    assert_eq!(t.unmap_vacate_region(Gpa(BASE), M2, PageSize::Size2M), Ok(512));
    assert_eq!(t.table_pages(), 1, "everything vacated back to the root");
}

#[test]
fn demote_with_another_protection() {
    for f in formats() {
        let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
        t.populate_region(Gpa(BASE), M2, PageSize::Size2M).unwrap();
        t.map(Gpa(BASE), Pfn(RUN), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
        t.demote_2m_as(Gpa(BASE), Some(rw(&f))).unwrap();
        for k in [0u64, 200, 511] {
            assert_eq!(t.is_mapped(Gpa(BASE + k * 4096)), Some((Pfn(RUN + k), rw(&f))), "{f:?}");
        }
        assert_eq!(t.unmap_vacate_region(Gpa(BASE), M2, PageSize::Size4K), Ok(512), "{f:?}");
        assert_eq!(t.table_pages(), 1, "{f:?}");
    }
    // A protection the format cannot express changes nothing.
    let f = PteFormat::ept(Caps::default());
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(BASE), M2, PageSize::Size2M).unwrap();
    t.map(Gpa(BASE), Pfn(RUN), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
    let pages = t.table_pages();
    assert!(t.demote_2m_as(Gpa(BASE), Some(Prot::WRITE)).is_err(), "write without read on EPT");
    assert_eq!(t.table_pages(), pages);
    assert_eq!(t.lookup(Gpa(BASE)).unwrap().size, PageSize::Size2M);
}

#[test]
fn an_empty_2m_slot_becomes_an_empty_leaf_table() {
    for f in formats() {
        let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
        assert_eq!(t.split_empty_2m(Gpa(BASE)), Err(Error::NotPopulated), "{f:?}: no level-2 table");
        t.populate_region(Gpa(BASE), 2 * M2, PageSize::Size2M).unwrap();
        let pages = t.table_pages();
        assert_eq!(t.split_empty_2m(Gpa(BASE + 4096)), Err(Error::Unaligned));
        assert_eq!(t.split_empty_2m(Gpa(1 << 60)), Err(Error::OutOfRange));
        t.split_empty_2m(Gpa(BASE)).unwrap();
        assert_eq!(t.table_pages(), pages + 1, "{f:?}");
        assert_eq!(t.split_empty_2m(Gpa(BASE)), Err(Error::AlreadyMapped { same_frame: false }), "a table now");
        // 4 KiB leaves go in; the other slot still takes a 2 MiB leaf.
        assert_eq!(
            t.map_range(Gpa(BASE), M2, rw(&f), MemType::WriteBack, |g| Some(Pfn(RUN + (g.0 - BASE) / 4096))),
            Ok(512)
        );
        t.map(Gpa(BASE + M2), Pfn(RUN + 512), PageSize::Size2M, rw(&f), MemType::WriteBack).unwrap();
        assert_eq!(t.split_empty_2m(Gpa(BASE + M2)), Err(Error::AlreadyMapped { same_frame: false }), "a leaf");
        // Vacated as what each slot now is: the counts moved exactly.
        assert_eq!(t.unmap_vacate_region(Gpa(BASE), M2, PageSize::Size4K), Ok(512), "{f:?}");
        assert_eq!(t.unmap_vacate_region(Gpa(BASE + M2), M2, PageSize::Size2M), Ok(512), "{f:?}");
        assert_eq!(t.table_pages(), 1, "{f:?}");
    }
}
