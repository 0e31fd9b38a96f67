//! Tree operations: populate/vacate, map/unmap, lookup, walk, A/D, harvest,
//! iteration, error cases, and the root-boundary case.

use nested_pt::mmu::{self, ViolationKind};
use nested_pt::{
    Access, Caps, CountingPages, Error, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat,
};

type T = NestedTable<CountingPages<HeapPages>>;

fn formats() -> [PteFormat; 3] {
    let c = Caps::default();
    [PteFormat::ept(c), PteFormat::ept_emulated_ad(c), PteFormat::npt(c)]
}

fn table(f: PteFormat) -> T {
    NestedTable::new(f, CountingPages::new(HeapPages::with_capacity(0x100, 1 << 12))).unwrap()
}

const G: u64 = 1 << 30;
const M2: u64 = 1 << 21;
const K4: u64 = 4096;

#[test]
fn populate_map_lookup_unmap_vacate() {
    for f in formats() {
        let mut t = table(f);
        assert_eq!(t.pages().live(), 1, "root only");
        t.populate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K).unwrap();
        // root + PDPT + PD + 3 PTs (1 MiB..5 MiB spans three 2 MiB tables)
        assert_eq!(t.pages().live(), 6);
        assert_eq!(t.table_pages(), 6);
        t.map(Gpa(0x10_0000), Pfn(0x500), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        assert_eq!(
            t.map(Gpa(0x10_0000), Pfn(0x500), PageSize::Size4K, Prot::RW, MemType::WriteBack),
            Err(Error::AlreadyMapped { same_frame: true })
        );
        assert_eq!(
            t.map(Gpa(0x10_0000), Pfn(0x501), PageSize::Size4K, Prot::RW, MemType::WriteBack),
            Err(Error::AlreadyMapped { same_frame: false })
        );
        assert_eq!(t.is_mapped(Gpa(0x10_0123)), Some((Pfn(0x500), Prot::RW)));
        assert_eq!(t.is_mapped(Gpa(0x10_1000)), None);
        let w = t.walk(Gpa(0x10_0000));
        assert_eq!(w.len, 4);
        assert_eq!(w.steps().iter().map(|s| s.level).collect::<Vec<_>>(), vec![4, 3, 2, 1]);
        assert_eq!(w.steps()[0].table, t.root());
        assert_eq!(w.steps()[3].index, 0x100);
        for s in w.steps() {
            assert_eq!(t.entry(s).unwrap().load(std::sync::atomic::Ordering::Relaxed), s.entry);
        }
        // Vacating a mapped range is refused and changes nothing.
        assert_eq!(t.vacate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K), Err(Error::StillMapped));
        assert_eq!(t.unmap(Gpa(0x10_0000)), Ok(true));
        assert_eq!(t.unmap(Gpa(0x10_0000)), Ok(false));
        t.vacate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K).unwrap();
        assert_eq!(t.pages().live(), 1, "all but the root freed");
        assert_eq!(t.walk(Gpa(0x10_0000)).len, 1);
        assert!(t.pages().errors().is_empty());
        // The one-pass form: map again, unmap and vacate together.
        t.populate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K).unwrap();
        t.map_range(Gpa(0x10_0000), 0x40_0000, Prot::RW, MemType::WriteBack, |g| Some(Pfn(g.0 >> 12))).unwrap();
        assert_eq!(t.unmap_vacate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K), Ok(0x400));
        assert_eq!(t.pages().live(), 1);
        assert_eq!(t.unmap_vacate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K), Err(Error::NotPopulated));
        // Vacating again: nothing is populated.
        assert_eq!(t.vacate_region(Gpa(0x10_0000), 0x40_0000, PageSize::Size4K), Err(Error::NotPopulated));
    }
}

#[test]
fn two_ranges_share_a_leaf_table() {
    let mut t = table(formats()[0]);
    t.populate_region(Gpa(0), 16 * K4, PageSize::Size4K).unwrap();
    t.populate_region(Gpa(16 * K4), 16 * K4, PageSize::Size4K).unwrap();
    assert_eq!(t.pages().live(), 4);
    t.map(Gpa(0), Pfn(0x1000), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    t.map(Gpa(16 * K4), Pfn(0x2000), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(t.unmap_region(Gpa(0), 16 * K4), Ok(1));
    t.vacate_region(Gpa(0), 16 * K4, PageSize::Size4K).unwrap();
    // The other range keeps its table and mapping.
    assert_eq!(t.pages().live(), 4);
    assert_eq!(t.is_mapped(Gpa(16 * K4)), Some((Pfn(0x2000), Prot::RW)));
    t.map(Gpa(17 * K4), Pfn(0x2001), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(t.unmap_region(Gpa(16 * K4), 16 * K4), Ok(2));
    t.vacate_region(Gpa(16 * K4), 16 * K4, PageSize::Size4K).unwrap();
    assert_eq!(t.pages().live(), 1);
}

#[test]
fn root_boundary_512g() {
    // A range straddling the 512 GiB boundary of the root table at every
    // level: it needs two PDPTs, two PDs and two PTs.
    let start = (512 * G) - 2 * K4;
    let len = 4 * K4;
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(start), len, PageSize::Size4K).unwrap();
        assert_eq!(t.pages().live(), 7);
        for i in 0..4 {
            t.map(Gpa(start + i * K4), Pfn(0x900 + i), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        }
        let seen: Vec<_> = t.leaves(Gpa(start), len).map(|l| (l.gpa.0, l.pfn().0)).collect();
        assert_eq!(seen, (0..4).map(|i| (start + i * K4, 0x900 + i)).collect::<Vec<_>>());
        assert_eq!(t.walk(Gpa(start)).steps()[0].index, 0);
        assert_eq!(t.walk(Gpa(start + 3 * K4)).steps()[0].index, 1);
        assert_eq!(t.unmap_region(Gpa(start), len), Ok(4));
        t.vacate_region(Gpa(start), len, PageSize::Size4K).unwrap();
        assert_eq!(t.pages().live(), 1);
    }
}

#[test]
fn large_pages() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(2 * G), 2 * G, PageSize::Size1G).unwrap();
        assert_eq!(t.pages().live(), 2, "root + PDPT for 1 GiB leaves");
        t.populate_region(Gpa(4 * M2), 4 * M2, PageSize::Size2M).unwrap();
        assert_eq!(t.pages().live(), 3, "+ a PD for 2 MiB leaves");
        t.map(Gpa(2 * G), Pfn(0x40000), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
        t.map(Gpa(4 * M2), Pfn(0x200), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
        assert_eq!(t.is_mapped(Gpa(2 * G + 0x12345)), Some((Pfn(0x40012), Prot::RW)));
        assert_eq!(t.is_mapped(Gpa(4 * M2 + 5 * K4)), Some((Pfn(0x205), Prot::READ)));
        let l = t.lookup(Gpa(2 * G + 77)).unwrap();
        assert_eq!((l.gpa, l.size), (Gpa(2 * G), PageSize::Size1G));
        // A 4K map inside a large leaf, partial unmaps, and a harvest that
        // would cut it are refused.
        assert_eq!(t.unmap(Gpa(2 * G + K4)), Err(Error::WouldSplit));
        assert_eq!(t.unmap_region(Gpa(4 * M2), K4), Err(Error::WouldSplit));
        let mut bm = vec![0u64; 8];
        assert_eq!(t.harvest_dirty(Gpa(4 * M2 + K4), K4, &mut bm), Err(Error::WouldSplit));
        // Harvest counts a dirty large page as all of its 4K pages.
        t.reset_dirty(Gpa(4 * M2), true).unwrap();
        let mut bm = vec![0u64; 1024 / 64];
        assert_eq!(t.harvest_dirty(Gpa(4 * M2), 2 * M2, &mut bm), Ok(512));
        assert!(bm[..8].iter().all(|w| *w == u64::MAX) && bm[8..].iter().all(|w| *w == 0));
        assert_eq!(t.unmap_region(Gpa(0), 8 * G), Ok(512 + 262144));
        t.vacate_region(Gpa(2 * G), 2 * G, PageSize::Size1G).unwrap();
        t.vacate_region(Gpa(4 * M2), 4 * M2, PageSize::Size2M).unwrap();
        assert_eq!(t.pages().live(), 1);
    }
}

#[test]
fn unsupported_sizes_refused() {
    let f = PteFormat::ept(Caps { page_1g: false, ..Caps::default() });
    let mut t = table(f);
    assert_eq!(t.populate_region(Gpa(0), G, PageSize::Size1G), Err(Error::UnsupportedSize));
    assert_eq!(t.pages().live(), 1);
}

#[test]
fn bad_ranges_change_nothing() {
    let mut t = table(formats()[2]);
    for (gpa, len, leaf, err) in [
        (0, 0, PageSize::Size4K, Error::ZeroLength),
        (1, K4, PageSize::Size4K, Error::Unaligned),
        (0, K4 + 1, PageSize::Size4K, Error::Unaligned),
        (K4, M2, PageSize::Size2M, Error::Unaligned),
        (!0xfff, 2 * K4, PageSize::Size4K, Error::Overflow),
        ((1 << 48) - K4, 2 * K4, PageSize::Size4K, Error::OutOfRange),
    ] {
        assert_eq!(t.populate_region(Gpa(gpa), len, leaf), Err(err));
        assert_eq!(t.vacate_region(Gpa(gpa), len, leaf), Err(err));
        if leaf == PageSize::Size4K {
            assert_eq!(t.unmap_region(Gpa(gpa), len), Err(err));
        }
    }
    assert_eq!(t.pages().live(), 1);
    assert_eq!(t.map(Gpa(0), Pfn(1), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::NotPopulated));
    assert_eq!(t.map(Gpa(1), Pfn(1), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::Unaligned));
    assert_eq!(t.map(Gpa(1 << 48), Pfn(1), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::OutOfRange));
    assert_eq!(t.unmap(Gpa(5)), Err(Error::Unaligned));
    assert_eq!(t.reset_dirty(Gpa(0), false), Err(Error::NotMapped));
    let mut small = [0u64; 1];
    assert_eq!(t.harvest_dirty(Gpa(0), 65 * K4, &mut small), Err(Error::BitmapTooSmall));
}

#[test]
fn out_of_memory_rolls_back() {
    // A range across the 512 GiB boundary needs 6 pages below the root:
    // PDPT, PD and PT on each side.
    let (start, len) = (512 * G - K4, 2 * K4);
    for k in 0..=6 {
        let mut pages = CountingPages::new(HeapPages::with_capacity(0x100, 64));
        pages.fail_after(Some(1 + k)); // the root is the first allocation
        let mut t = NestedTable::new(formats()[0], pages).unwrap();
        let r = t.populate_region(Gpa(start), len, PageSize::Size4K);
        if k < 6 {
            assert_eq!(r, Err(Error::NoMemory), "fail after {k}");
            assert_eq!(t.pages().live(), 1, "everything created was freed");
            assert_eq!(t.walk(Gpa(start)).len, 1);
            assert_eq!(t.walk(Gpa(start + K4)).len, 1);
            assert_eq!(t.vacate_region(Gpa(start), len, PageSize::Size4K), Err(Error::NotPopulated));
        } else {
            r.unwrap();
            assert_eq!(t.pages().live(), 7);
            t.vacate_region(Gpa(start), len, PageSize::Size4K).unwrap();
            assert_eq!(t.pages().live(), 1);
        }
        assert!(t.pages().errors().is_empty());
    }
}

/// Harvests of ranges that start and end anywhere in a leaf table (whole
/// bitmap words, an unaligned start, a last partial word, slices shorter
/// than a block of 64 entries), in all three clear forms: the bitmap holds
/// exactly the dirty pages of the range, its bits past the range keep
/// what they held, and the entries outside the range stay dirty.
#[test]
fn harvest_ranges_at_any_offset() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), 3 * M2, PageSize::Size4K).unwrap();
        t.map_range(Gpa(0), 3 * M2, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10000 + (g.0 >> 12)))).unwrap();
        let dirty = |p: u64| p.is_multiple_of(3) || p % 64 == 63;
        for (first, pages) in [(0u64, 1536u64), (5, 700), (64, 512), (511, 2), (100, 37), (448, 600), (1, 1535)] {
            for form in 0..3 {
                for p in 0..1536u64 {
                    t.reset_dirty(Gpa(p * K4), dirty(p)).unwrap();
                }
                let mut bm = vec![u64::MAX; 1536 / 64 + 1];
                let (g, len) = (Gpa(first * K4), pages * K4);
                let n = match form {
                    0 => t.harvest_dirty(g, len, &mut bm),
                    1 => t.harvest_dirty_exclusive(g, len, &mut bm),
                    _ => t.scan_dirty(g, len, &mut bm, false),
                };
                let want = (first..first + pages).filter(|&p| dirty(p)).count() as u64;
                assert_eq!(n, Ok(want), "{first}+{pages} form {form}");
                for b in 0..bm.len() as u64 * 64 {
                    let bit = bm[(b / 64) as usize] >> (b % 64) & 1 == 1;
                    let expect = if b < pages { dirty(first + b) } else { true };
                    assert_eq!(bit, expect, "bit {b} of {first}+{pages} form {form}");
                }
                for p in 0..1536u64 {
                    let cleared = form != 2 && (first..first + pages).contains(&p);
                    let leaf = t.lookup(Gpa(p * K4)).unwrap();
                    assert_eq!(leaf.dirty(), dirty(p) && !cleared, "page {p} after {first}+{pages} form {form}");
                }
            }
        }
    }
}

#[test]
fn accessed_dirty_reset_and_harvest() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
        let n =
            t.map_range(Gpa(0), 4 * M2, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10000 + (g.0 >> 12)))).unwrap();
        assert_eq!(n, 2048);
        assert_eq!(t.reset_accessed(Gpa(0), true), Ok(false));
        assert_eq!(t.reset_accessed(Gpa(0), false), Ok(true));
        assert_eq!(t.reset_accessed(Gpa(0), false), Ok(false));
        // Every 10th page dirty.
        for p in (0..2048u64).step_by(10) {
            assert_eq!(t.record_access(Gpa(p * K4), Access::Write), Ok(true));
        }
        let mut bm = vec![0u64; 32];
        assert_eq!(t.scan_dirty(Gpa(0), 4 * M2, &mut bm, false), Ok(205));
        let mut bm2 = vec![u64::MAX; 32];
        assert_eq!(t.harvest_dirty(Gpa(0), 4 * M2, &mut bm2), Ok(205));
        assert_eq!(bm, bm2, "bitmap bits outside the dirty set are written 0");
        for p in 0..2048u64 {
            assert_eq!(bm[(p / 64) as usize] >> (p % 64) & 1 == 1, p % 10 == 0);
        }
        assert_eq!(t.harvest_dirty(Gpa(0), 4 * M2, &mut bm2), Ok(0));
        for p in (3..2048u64).step_by(7) {
            t.reset_dirty(Gpa(p * K4), true).unwrap();
        }
        let mut bm3 = vec![0u64; 32];
        assert_eq!(t.harvest_dirty_exclusive(Gpa(0), 4 * M2, &mut bm3), Ok(293));
        for p in 0..2048u64 {
            assert_eq!(bm3[(p / 64) as usize] >> (p % 64) & 1 == 1, p >= 3 && (p - 3) % 7 == 0);
        }
        assert_eq!(t.harvest_dirty(Gpa(0), 4 * M2, &mut bm2), Ok(0));
        // Dirty survives an accessed reset (emulated format saves it).
        t.record_access(Gpa(K4), Access::Write).unwrap();
        t.reset_accessed(Gpa(K4), false).unwrap();
        assert_eq!(t.reset_dirty(Gpa(K4), false), Ok(true));
        assert_eq!(t.reset_dirty(Gpa(K4), false), Ok(false));
        // Harvest of an unaligned sub-range.
        t.record_access(Gpa(100 * K4), Access::Write).unwrap();
        let mut bm = vec![0u64; 1];
        assert_eq!(t.harvest_dirty(Gpa(99 * K4), 3 * K4, &mut bm), Ok(1));
        assert_eq!(bm[0], 0b010);
        assert_eq!(t.unmap_region(Gpa(0), 4 * M2), Ok(2048));
    }
}

#[test]
fn leaves_iterator_and_leaf_tables() {
    let mut t = table(formats()[0]);
    t.populate_region(Gpa(0), 8 * M2, PageSize::Size4K).unwrap();
    t.populate_region(Gpa(G), 2 * M2, PageSize::Size2M).unwrap();
    let pages = [0u64, 1, 511, 512, 1500, 4095];
    for p in pages {
        t.map(Gpa(p * K4), Pfn(p + 0x1000), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    }
    t.map(Gpa(G + M2), Pfn(0x600), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
    let got: Vec<_> = t.leaves(Gpa(0), 2 * G).map(|l| (l.gpa.0 / K4, l.size)).collect();
    let mut want: Vec<_> = pages.iter().map(|p| (*p, PageSize::Size4K)).collect();
    want.push(((G + M2) / K4, PageSize::Size2M));
    assert_eq!(got, want);
    let sub: Vec<_> = t.leaves(Gpa(2 * K4), 1498 * K4).map(|l| l.gpa.0 / K4).collect();
    assert_eq!(sub, vec![511, 512]);
    let mut calls = 0;
    t.for_each_leaf_table(Gpa(0), 8 * M2, |_, e, _| {
        calls += 1;
        assert_eq!(e.len(), 512);
    });
    assert_eq!(calls, 8, "one call per leaf table");
}

#[test]
fn translate_matches_table_per_format() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), M2, PageSize::Size4K).unwrap();
        t.populate_region(Gpa(M2), M2, PageSize::Size2M).unwrap();
        t.map(Gpa(0), Pfn(0x1000), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
        t.map(Gpa(K4), Pfn(0x1001), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        t.map(Gpa(M2), Pfn(0x2000 & !511), PageSize::Size2M, Prot::RWX, MemType::WriteBack).unwrap();
        let root = t.root();
        let tr = |gpa, acc, ad| mmu::translate(t.pages(), &f, root, Gpa(gpa), acc, ad);
        let emulated = f.kind() == nested_pt::FormatKind::EptEmulatedAd;
        if emulated {
            // Hardware sees nothing until software records the access.
            let v = tr(0x10, Access::Read, false).unwrap_err();
            assert_eq!((v.kind, v.level), (ViolationKind::NotPresent, 1));
            assert!(t.record_access(Gpa(0), Access::Read).unwrap());
            assert!(!t.record_access(Gpa(0), Access::Write).unwrap(), "read-only mapping");
            assert!(t.record_access(Gpa(K4), Access::Write).unwrap());
            assert!(t.record_access(Gpa(M2), Access::Read).unwrap());
        }
        let ok = tr(0x10, Access::Read, true).unwrap();
        assert_eq!((ok.hpa, ok.size), (0x1000 << 12 | 0x10, PageSize::Size4K));
        let v = tr(0x10, Access::Write, true).unwrap_err();
        assert_eq!((v.kind, v.level, v.access), (ViolationKind::Permission, 1, Access::Write));
        let v = tr(0x10, Access::Execute, true).unwrap_err();
        assert_eq!(v.kind, ViolationKind::Permission);
        let ok = tr(K4 + 8, Access::Write, true).unwrap();
        assert_eq!(ok.hpa, 0x1001 << 12 | 8);
        let ok = tr(M2 + 0x1234, Access::Execute, true).unwrap();
        assert_eq!((ok.hpa, ok.size), (0x2000 << 12 | 0x1234, PageSize::Size2M));
        let v = tr(2 * K4, Access::Read, true).unwrap_err();
        assert_eq!((v.kind, v.level), (ViolationKind::NotPresent, 1));
        let v = tr(G, Access::Read, true).unwrap_err();
        assert_eq!((v.kind, v.level), (ViolationKind::NotPresent, 3));
        let v = tr(1 << 40, Access::Read, true).unwrap_err();
        assert_eq!((v.kind, v.level), (ViolationKind::NotPresent, 4));
        // A/D as the hardware sets them.
        let hw_ad = f.kind() != nested_pt::FormatKind::EptEmulatedAd;
        assert!(t.lookup(Gpa(K4)).unwrap().dirty(), "write recorded");
        assert!(!t.lookup(Gpa(0)).unwrap().dirty());
        if hw_ad {
            assert!(t.lookup(Gpa(0)).unwrap().accessed());
            // Upper levels got A too.
            for s in t.walk(Gpa(0)).steps() {
                assert_ne!(s.entry & f.accessed_mask(), 0, "level {}", s.level);
            }
        }
        if f.kind() == nested_pt::FormatKind::Ept {
            // With A/D disabled in the EPTP nothing is set.
            t.reset_accessed(Gpa(K4), false).unwrap();
            t.reset_dirty(Gpa(K4), false).unwrap();
            tr(K4, Access::Write, false).unwrap();
            assert!(!t.lookup(Gpa(K4)).unwrap().accessed() && !t.lookup(Gpa(K4)).unwrap().dirty());
        }
    }
}

#[test]
fn table_memory_per_gib() {
    // 4 KiB pages: one leaf table per 2 MiB (0.195%) plus a little.
    for gib in [1u64, 16] {
        let mut t = NestedTable::new(formats()[0], HeapPages::with_capacity(0x100, 8192 * gib + 64)).unwrap();
        t.populate_region(Gpa(0), gib * G, PageSize::Size4K).unwrap();
        let n = t.map_range(Gpa(0), gib * G, Prot::RW, MemType::WriteBack, |g| Some(Pfn(g.0 >> 12))).unwrap();
        assert_eq!(n, gib * G / K4);
        let share = t.table_bytes() as f64 / (gib * G) as f64;
        assert!(share <= 0.002, "{gib} GiB of 4K pages: table bytes {} = {:.4}%", t.table_bytes(), share * 100.0);
        assert_eq!(t.pages().live() as usize, t.table_pages());
    }
    // 1 GiB pages: the root and one PDPT.
    for gib in [1u64, 16] {
        let mut t = NestedTable::new(formats()[2], HeapPages::with_capacity(0x100, 64)).unwrap();
        t.populate_region(Gpa(0), gib * G, PageSize::Size1G).unwrap();
        for i in 0..gib {
            t.map(Gpa(i * G), Pfn(i << 18), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
        }
        let share = t.table_bytes() as f64 / (gib * G) as f64;
        assert!(share <= 0.00001, "{gib} GiB of 1G pages: table bytes {} = {:.6}%", t.table_bytes(), share * 100.0);
    }
}

#[test]
fn map_range_variants() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(M2 - 4 * K4), 8 * K4, PageSize::Size4K).unwrap();
        // A hole in the tables is refused before anything changes.
        let r = t.map_range(Gpa(M2 - 4 * K4), 8 * K4 + M2, Prot::RW, MemType::WriteBack, |g| Some(Pfn(g.0 >> 12)));
        assert_eq!(r, Err(Error::NotPopulated));
        assert_eq!(t.leaves(Gpa(0), 4 * M2).count(), 0);
        // Every other page through the shared path, then the rest exclusively.
        let odd = |g: Gpa| ((g.0 >> 12) % 2 == 1).then_some(Pfn(0x7000 + (g.0 >> 12)));
        assert_eq!(t.map_range(Gpa(M2 - 4 * K4), 8 * K4, Prot::READ, MemType::WriteBack, odd), Ok(4));
        let all = |g: Gpa| Some(Pfn(0x7000 + (g.0 >> 12)));
        assert_eq!(t.map_range_exclusive(Gpa(M2 - 4 * K4), 8 * K4, Prot::RW, MemType::WriteBack, all), Ok(4));
        for p in 0..8u64 {
            let g = M2 - 4 * K4 + p * K4;
            let want = if (g >> 12) % 2 == 1 { Prot::READ } else { Prot::RW };
            assert_eq!(t.is_mapped(Gpa(g)), Some((Pfn(0x7000 + (g >> 12)), want)));
        }
        let big = |_g: Gpa| Some(Pfn(1 << 40));
        assert_eq!(t.map_range(Gpa(M2 - 4 * K4), 8 * K4, Prot::RW, MemType::WriteBack, big), Err(Error::OutOfRange));
        assert_eq!(t.unmap_region(Gpa(0), 4 * M2), Ok(8));
    }
}

#[test]
fn wrong_vacate_never_frees_a_table_with_children() {
    let mut t = table(formats()[2]);
    t.populate_region(Gpa(4 * M2), 2 * M2, PageSize::Size2M).unwrap();
    t.populate_region(Gpa(0), 4 * K4, PageSize::Size4K).unwrap();
    t.map(Gpa(0), Pfn(0x3000), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    t.vacate_region(Gpa(4 * M2), 2 * M2, PageSize::Size2M).unwrap();
    // The 2 MiB range is gone; vacating it again is refused even though its
    // table (shared with the 4 KiB range) still exists.
    assert_eq!(t.vacate_region(Gpa(4 * M2), 2 * M2, PageSize::Size2M), Err(Error::NotPopulated));
    assert_eq!(t.unmap_vacate_region(Gpa(4 * M2), 2 * M2, PageSize::Size2M), Err(Error::NotPopulated));
    assert_eq!(t.is_mapped(Gpa(0)), Some((Pfn(0x3000), Prot::RW)));
    assert_eq!(t.pages().live(), 4);
    assert_eq!(t.unmap_vacate_region(Gpa(0), 4 * K4, PageSize::Size4K), Ok(1));
    assert_eq!(t.pages().live(), 1);
}

#[test]
fn phys_pages_provider() {
    // A page-aligned buffer stands in for physical memory at 0x4000_0000.
    let mut buf = vec![0u8; 16 * 4096 + 4096];
    let off = buf.as_ptr().align_offset(4096);
    let virt = buf[off..].as_mut_ptr();
    // SAFETY: the 16 pages at `virt` belong to `buf`, which outlives the
    // table and is not touched while the table lives.
    let pages = unsafe { nested_pt::PhysPages::new(0x4000_0000, virt, 16) }.unwrap();
    let mut t = NestedTable::new(formats()[0], pages).unwrap();
    assert_eq!(t.root(), Pfn(0x4_0000), "frame numbers are physical");
    t.populate_region(Gpa(0), 2 * K4, PageSize::Size4K).unwrap();
    t.map(Gpa(K4), Pfn(0x777), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    let w = t.walk(Gpa(K4));
    assert_eq!(w.steps().iter().map(|s| s.table.0).collect::<Vec<_>>(), vec![0x4_0000, 0x4_0001, 0x4_0002, 0x4_0003]);
    assert_eq!(t.unmap_vacate_region(Gpa(0), 2 * K4, PageSize::Size4K), Ok(1));
    assert_eq!(t.pages().live(), 1);
    // Exhaustion is a typed error, not a panic.
    assert_eq!(t.populate_region(Gpa(0), 64 * M2, PageSize::Size4K), Err(Error::NoMemory));
    assert_eq!(t.pages().live(), 1);
    drop(t);
    // SAFETY: rejected before anything is touched.
    assert!(unsafe { nested_pt::PhysPages::new(0x123, virt, 1) }.is_none());
}

#[test]
fn table_pages_past_the_format_width_are_refused() {
    for f in formats() {
        let limit = f.frame_limit();
        assert_eq!(f.table_entry(Pfn(limit)), Err(Error::OutOfRange));
        assert_eq!(f.frame(f.table_entry(Pfn(limit - 1)).unwrap()), Pfn(limit - 1));
        // A root the root pointer could not name.
        let r = NestedTable::new(f, CountingPages::new(HeapPages::with_capacity(limit, 8)));
        assert_eq!(r.err(), Some(Error::OutOfRange));
        // The root fits, the next pages do not: the populate fails and
        // frees the page it was handed.
        let mut t = NestedTable::new(f, CountingPages::new(HeapPages::with_capacity(limit - 1, 8))).unwrap();
        assert_eq!(t.root(), Pfn(limit - 1));
        assert_eq!(f.frame(t.root_pointer(false)), Pfn(limit - 1));
        assert_eq!(t.populate_region(Gpa(0), K4, PageSize::Size4K), Err(Error::OutOfRange));
        assert_eq!((t.pages().live(), t.table_pages()), (1, 1));
        assert_eq!((t.pages().allocs(), t.pages().frees()), (2, 1));
        assert_eq!(t.walk(Gpa(0)).len, 1);
        assert_eq!(t.vacate_region(Gpa(0), K4, PageSize::Size4K), Err(Error::NotPopulated));
        assert!(t.pages().errors().is_empty());
        // Part way: a range across the 512 GiB boundary gets its first
        // three tables, then meets the limit; an earlier range is kept.
        let pages = CountingPages::new(HeapPages::with_capacity(limit - 7, 16));
        let mut t = NestedTable::new(f, pages).unwrap();
        t.populate_region(Gpa(0), K4, PageSize::Size4K).unwrap();
        t.map(Gpa(0), Pfn(0x1234), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        let r = t.populate_region(Gpa(512 * G - K4), 2 * K4, PageSize::Size4K);
        assert_eq!(r, Err(Error::OutOfRange));
        assert_eq!((t.pages().live(), t.table_pages()), (4, 4), "only the first range's tables are left");
        assert_eq!(t.walk(Gpa(512 * G)).steps()[0].entry, 0, "nothing left in root slot 1");
        assert_eq!(t.walk(Gpa(512 * G - K4)).len, 2, "nor below the shared PDPT");
        assert_eq!(t.vacate_region(Gpa(512 * G - K4), K4, PageSize::Size4K), Err(Error::NotPopulated));
        assert_eq!(t.is_mapped(Gpa(0)), Some((Pfn(0x1234), Prot::RW)));
        assert_eq!(t.unmap_vacate_region(Gpa(0), K4, PageSize::Size4K), Ok(1));
        assert_eq!(t.pages().live(), 1);
        assert!(t.pages().errors().is_empty());
    }
}

#[test]
fn pfn_of_outside_the_leaf_is_none() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(2 * M2), M2, PageSize::Size2M).unwrap();
        t.map(Gpa(2 * M2), Pfn(0x4000), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
        let l = t.lookup(Gpa(2 * M2 + 5)).unwrap();
        assert_eq!(l.pfn_of(Gpa(2 * M2)), Some(Pfn(0x4000)));
        assert_eq!(l.pfn_of(Gpa(3 * M2 - 1)), Some(Pfn(0x4000 + 511)));
        for outside in [0, 2 * M2 - 1, 3 * M2, u64::MAX] {
            assert_eq!(l.pfn_of(Gpa(outside)), None, "{outside:#x}");
        }
        let mut moved = l;
        moved.gpa = Gpa(u64::MAX);
        assert_eq!(moved.pfn_of(Gpa(0)), None);
    }
}

#[test]
fn map_range_rolls_back_on_a_refused_frame() {
    // Three leaf tables: [2M-8K, 2M), [2M, 4M), [4M, 4M+8K).
    let (start, len) = (M2 - 8 * K4, M2 + 16 * K4);
    let pages = len / K4;
    for f in formats() {
        let limit = f.frame_limit();
        for exclusive in [false, true] {
            // The refused frame in the first, second and last table.
            for bad in [1, 2, 300, pages - 1] {
                let mut t = table(f);
                t.populate_region(Gpa(start), len, PageSize::Size4K).unwrap();
                // Pages mapped before the call stay, dirty bit included.
                for p in [0u64, 9, 200] {
                    t.map(Gpa(start + p * K4), Pfn(0x9000 + p), PageSize::Size4K, Prot::READ, MemType::WriteBack)
                        .unwrap();
                }
                t.reset_dirty(Gpa(start + 9 * K4), true).unwrap();
                let before: Vec<_> = t.leaves(Gpa(0), 1 << 48).map(|l| (l.gpa, l.value())).collect();
                let mut calls = 0;
                let frame = |g: Gpa| {
                    calls += 1;
                    let p = (g.0 - start) / K4;
                    Some(Pfn(if p == bad { limit } else { 0x5_0000 + p }))
                };
                let r = if exclusive {
                    t.map_range_exclusive(Gpa(start), len, Prot::RW, MemType::WriteBack, frame)
                } else {
                    t.map_range(Gpa(start), len, Prot::RW, MemType::WriteBack, frame)
                };
                assert_eq!(r, Err(Error::OutOfRange), "{f:?} bad {bad}");
                assert_eq!(calls, bad + 1, "frame asked up to the refused page");
                let after: Vec<_> = t.leaves(Gpa(0), 1 << 48).map(|l| (l.gpa, l.value())).collect();
                assert_eq!(after, before, "{f:?} exclusive {exclusive} bad {bad}");
                // And the same range maps whole afterwards.
                let n = t.map_range(Gpa(start), len, Prot::RW, MemType::WriteBack, |g| Some(Pfn(g.0 >> 12)));
                assert_eq!(n, Ok(pages - 3));
            }
        }
    }
}

#[test]
fn map_range_rollback_spares_what_others_changed() {
    // While the call runs (from inside the frame closure, standing in for
    // other threads and the hardware), one installed entry gets written
    // (dirty), one is unmapped, and one is unmapped and remapped
    // read-only: the rollback clears the first and leaves the others.
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
        let limit = f.frame_limit();
        let tr = &t;
        let frame = |g: Gpa| {
            let p = g.0 / K4;
            if p == 700 {
                assert_eq!(tr.record_access(Gpa(K4), Access::Write), Ok(true));
                assert_eq!(tr.unmap(Gpa(2 * K4)), Ok(true));
                assert_eq!(tr.unmap(Gpa(600 * K4)), Ok(true));
                tr.map(Gpa(600 * K4), Pfn(0x777), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
                return Some(Pfn(limit + 5));
            }
            Some(Pfn(0x1000 + p))
        };
        assert_eq!(t.map_range(Gpa(0), 4 * M2, Prot::RW, MemType::WriteBack, frame), Err(Error::OutOfRange));
        let left: Vec<_> = t.leaves(Gpa(0), 1 << 48).map(|l| (l.gpa.0 / K4, l.pfn().0, l.prot())).collect();
        assert_eq!(left, vec![(600, 0x777, Prot::READ)], "{f:?}");
    }
}

#[test]
fn populate_meeting_a_large_leaf_rolls_back() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(2 * M2), 2 * M2, PageSize::Size2M).unwrap();
        t.map(Gpa(3 * M2), Pfn(0x600), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
        let (live, allocs) = (t.pages().live(), t.pages().allocs());
        // [2M-4K, 6M+4K): leaf tables for the 2 MiB slots at 0, 2M and 4M
        // are made (4M is an empty slot of the 2 MiB range, see the lib
        // docs on overlapping populates), then the 2 MiB leaf at 6M is
        // where the fourth would go.
        let r = t.populate_region(Gpa(M2 - K4), 2 * M2 + 2 * K4, PageSize::Size4K);
        assert_eq!(r, Err(Error::AlreadyMapped { same_frame: false }));
        assert_eq!(t.pages().allocs(), allocs + 3, "three tables made on the way");
        assert_eq!((t.pages().live(), t.table_pages()), (live, live), "and freed");
        assert_eq!(t.walk(Gpa(M2 - K4)).len, 3);
        assert_eq!(t.walk(Gpa(2 * M2)).steps()[2].entry, 0);
        assert_eq!(t.is_mapped(Gpa(3 * M2)), Some((Pfn(0x600), Prot::RW)));
        assert_eq!(t.vacate_region(Gpa(M2 - K4), K4, PageSize::Size4K), Err(Error::NotPopulated));
        assert_eq!(t.unmap_vacate_region(Gpa(2 * M2), 2 * M2, PageSize::Size2M), Ok(512));
        assert_eq!(t.pages().live(), 1);
        assert!(t.pages().errors().is_empty());
    }
}

#[test]
fn map_range_rollback_races_an_overlapping_map_range() {
    // Thread A maps [0, 4M) and fails at its last page; thread B maps
    // [1M, 3M) with other frames at the same time. Whatever the
    // interleaving, A's rollback removes exactly A's entries: what is left
    // is B's, as many as B counted.
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
        let limit = f.frame_limit();
        for round in 0..50u64 {
            let (ra, rb) = std::thread::scope(|s| {
                let a = s.spawn(|| {
                    t.map_range(Gpa(0), 4 * M2, Prot::RW, MemType::WriteBack, |g| {
                        Some(Pfn(if g.0 == 4 * M2 - K4 { limit } else { 0x10_0000 + (g.0 >> 12) }))
                    })
                });
                let b = s.spawn(|| {
                    t.map_range(Gpa(M2 / 2), M2, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x20_0000 + (g.0 >> 12))))
                });
                (a.join().unwrap(), b.join().unwrap())
            });
            assert_eq!(ra, Err(Error::OutOfRange));
            let left: Vec<_> = t.leaves(Gpa(0), 4 * M2).map(|l| (l.gpa.0, l.pfn().0)).collect();
            assert_eq!(left.len() as u64, rb.unwrap(), "{f:?} round {round}");
            assert!(left.iter().all(|&(g, p)| p == 0x20_0000 + (g >> 12)), "{f:?} round {round}");
            t.unmap_region(Gpa(0), 4 * M2).unwrap();
        }
    }
}

/// The reservation count of one leaf table, the honest way: 2^32 / 512
/// populates of its whole span fit, the next is refused and changes
/// nothing. About 1.5 s in release; ignored in debug builds (run it there
/// with `--ignored`), where the unit test in `src/table.rs` covers the
/// same path by setting the count.
#[test]
#[cfg_attr(debug_assertions, ignore = "8.4 million populates: slow without optimisation")]
fn reservation_count_overflow_end_to_end() {
    let mut t = table(formats()[0]);
    let fits = (u32::MAX / 512) as u64;
    for _ in 0..fits {
        t.populate_region(Gpa(M2), M2, PageSize::Size4K).unwrap();
    }
    assert_eq!(t.table_pages(), 4);
    // One table short of overflow on the far side: the first (new) table
    // is counted, then the overflowing one refuses; both roll back.
    assert_eq!(t.populate_region(Gpa(M2 - K4), M2 + K4, PageSize::Size4K), Err(Error::CountOverflow));
    assert_eq!(t.populate_region(Gpa(M2), M2, PageSize::Size4K), Err(Error::CountOverflow));
    assert_eq!((t.table_pages(), t.pages().live()), (4, 4));
    assert_eq!(t.walk(Gpa(M2 - K4)).len, 3, "the table made for [2M-4K, 2M) is freed");
    // A smaller populate still fits (the count is 511 short of u32::MAX).
    t.populate_region(Gpa(M2), 511 * K4, PageSize::Size4K).unwrap();
    t.vacate_region(Gpa(M2), 511 * K4, PageSize::Size4K).unwrap();
    t.vacate_region(Gpa(M2), M2, PageSize::Size4K).unwrap();
    assert_eq!(t.pages().live(), 4, "still counted by the other populates");
    assert!(t.pages().errors().is_empty());
}

/// A harvest running while another thread (standing in for a vCPU with
/// hardware A/D) dirties pages loses no dirty bit and reports none twice:
/// each page is dirtied exactly once, so across the concurrent harvests and
/// a final one every page is reported exactly once. The writer also sets
/// accessed bits on the same entries, which the clears must keep.
#[test]
fn harvest_races_dirtying_writer() {
    for f in formats() {
        let mut t = table(f);
        let len = 4 * M2;
        let pages = (len / K4) as usize;
        t.populate_region(Gpa(0), len, PageSize::Size4K).unwrap();
        t.map_range(Gpa(0), len, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10_0000 + (g.0 >> 12)))).unwrap();
        let mut seen = vec![0u32; pages];
        let mut add = |bitmap: &[u64]| {
            for (i, n) in seen.iter_mut().enumerate() {
                *n += (bitmap[i / 64] >> (i % 64)) as u32 & 1;
            }
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = &t;
            let done = &done;
            s.spawn(move || {
                // A scattered order, so writes land all over the range
                // while the harvester sweeps it.
                for k in 0..pages {
                    let p = (k * 97) % pages;
                    t.reset_dirty(Gpa(p as u64 * K4), true).unwrap();
                    t.reset_accessed(Gpa(p as u64 * K4), true).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            let mut bitmap = vec![0u64; pages / 64];
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                t.harvest_dirty(Gpa(0), len, &mut bitmap).unwrap();
                add(&bitmap);
            }
        });
        let mut bitmap = vec![0u64; pages / 64];
        t.harvest_dirty(Gpa(0), len, &mut bitmap).unwrap();
        add(&bitmap);
        assert!(seen.iter().all(|&n| n == 1), "{:?}: every page reported exactly once", f.kind());
        assert_eq!(t.harvest_dirty(Gpa(0), len, &mut bitmap), Ok(0));
        for p in (0..pages).step_by(61) {
            assert!(t.lookup(Gpa(p as u64 * K4)).unwrap().accessed(), "accessed bit kept");
        }
    }
}

/// Harvests (bitmap and run forms, which clear a whole leaf table in one
/// hardware transaction where the processor has RTM) running while
/// another thread unmaps every page, dirty, in a scattered order: no
/// harvest writes an entry back from a value it read before the unmap
/// (which would map the page again), so every page ends unmapped, and no
/// page is reported dirty twice.
#[test]
fn harvest_races_unmapping_writer() {
    for f in formats().into_iter().filter(|f| f.dirty_mask() != 0) {
        for round in 0..8 {
            let mut t = table(f);
            let len = 8 * M2;
            let pages = (len / K4) as usize;
            t.populate_region(Gpa(0), len, PageSize::Size4K).unwrap();
            t.map_range(Gpa(0), len, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10_0000 + (g.0 >> 12)))).unwrap();
            for p in 0..pages as u64 {
                t.reset_dirty(Gpa(p * K4), true).unwrap();
            }
            let seen: Vec<std::sync::atomic::AtomicU32> =
                (0..pages).map(|_| std::sync::atomic::AtomicU32::new(0)).collect();
            let done = std::sync::atomic::AtomicBool::new(false);
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                let (t, done, start) = (&t, &done, &start);
                s.spawn(move || {
                    start.wait();
                    for k in 0..pages {
                        let p = (k * 97 + round) % pages;
                        assert_eq!(t.unmap(Gpa(p as u64 * K4)), Ok(true), "page {p} was mapped");
                    }
                    done.store(true, std::sync::atomic::Ordering::Release);
                });
                start.wait();
                let mut bitmap = vec![0u64; pages / 64];
                let mut odd = false;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if odd {
                        t.harvest_dirty_runs(Gpa(0), len, true, |g, n| {
                            for p in g.0 / K4..(g.0 + n) / K4 {
                                seen[p as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        })
                        .unwrap();
                    } else {
                        t.harvest_dirty(Gpa(0), len, &mut bitmap).unwrap();
                        for (i, n) in seen.iter().enumerate() {
                            n.fetch_add((bitmap[i / 64] >> (i % 64)) as u32 & 1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    odd = !odd;
                }
            });
            for (p, n) in seen.iter().enumerate() {
                assert!(t.lookup(Gpa(p as u64 * K4)).is_none(), "{:?}: page {p} stays unmapped", f.kind());
                assert!(n.load(std::sync::atomic::Ordering::Relaxed) <= 1, "{:?}: page {p} reported once", f.kind());
            }
        }
    }
}

/// The run harvest against the same writer, with two harvesters at once:
/// a page is reported only by the harvest whose locked AND found it dirty,
/// so across both, and a final harvest, every page is reported exactly
/// once (no dirty bit set between a scan and its clear is lost, none
/// reported twice), and the accessed bits the writer sets are kept. Then
/// rounds of two harvests started together over all pages dirty: each
/// page goes to exactly one of them (a harvest that reported what its
/// scan read, without checking its AND's result, fails this).
#[test]
fn harvest_runs_race_dirtying_writer_and_each_other() {
    for f in formats() {
        let mut t = table(f);
        let len = 16 * M2;
        let pages = (len / K4) as usize;
        t.populate_region(Gpa(0), len, PageSize::Size4K).unwrap();
        t.map_range(Gpa(0), len, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10_0000 + (g.0 >> 12)))).unwrap();
        let seen: Vec<std::sync::atomic::AtomicU32> =
            (0..pages).map(|_| std::sync::atomic::AtomicU32::new(0)).collect();
        let add = |g: Gpa, n: u64| {
            for p in g.0 / K4..(g.0 + n) / K4 {
                seen[p as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        let start = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            let (t, done, add, start) = (&t, &done, &add, &start);
            s.spawn(move || {
                start.wait();
                for k in 0..pages {
                    let p = (k * 97) % pages;
                    t.reset_dirty(Gpa(p as u64 * K4), true).unwrap();
                    t.reset_accessed(Gpa(p as u64 * K4), true).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            for _ in 0..2 {
                s.spawn(move || {
                    start.wait();
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        t.harvest_dirty_runs(Gpa(0), len, true, add).unwrap();
                    }
                });
            }
        });
        t.harvest_dirty_runs(Gpa(0), len, true, add).unwrap();
        for (p, n) in seen.iter().enumerate() {
            assert_eq!(n.swap(0, std::sync::atomic::Ordering::Relaxed), 1, "{:?}: page {p} reported once", f.kind());
        }
        assert_eq!(t.harvest_dirty_runs(Gpa(0), len, true, |_, _| panic!("nothing left")), Ok(0));
        for p in (0..pages).step_by(61) {
            assert!(t.lookup(Gpa(p as u64 * K4)).unwrap().accessed(), "accessed bit kept");
        }
        // Two harvests of the same dirty pages at once, started together:
        // each page goes to one of them.
        for round in 0..40 {
            for p in 0..pages as u64 {
                t.reset_dirty(Gpa(p * K4), true).unwrap();
            }
            let start = std::sync::Barrier::new(2);
            let n: u64 = std::thread::scope(|s| {
                let (t, add, start) = (&t, &add, &start);
                let h: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(move || {
                            start.wait();
                            t.harvest_dirty_runs(Gpa(0), len, true, add).unwrap()
                        })
                    })
                    .collect();
                h.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(n, pages as u64, "{:?} round {round}", f.kind());
            for (p, c) in seen.iter().enumerate() {
                assert_eq!(
                    c.swap(0, std::sync::atomic::Ordering::Relaxed),
                    1,
                    "{:?} round {round}: page {p}",
                    f.kind()
                );
            }
        }
    }
}

/// A lookup cursor answers exactly what `lookup` and `is_mapped` answer, in
/// sequential and scattered order, across holes, table boundaries, large
/// leaves and addresses past the 48-bit space, and sees entries mapped and
/// unmapped (through `&self`) after it remembered their leaf table.
#[test]
fn lookup_cursor_matches_lookup() {
    for f in formats() {
        let mut t = table(f);
        t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
        t.populate_region(Gpa(G), 2 * M2, PageSize::Size2M).unwrap();
        t.populate_region(Gpa(2 * G), G, PageSize::Size1G).unwrap();
        for p in (0..4 * 512u64).filter(|p| p % 3 != 0) {
            t.map(Gpa(p * K4), Pfn(0x1000 + p), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        }
        t.map(Gpa(G), Pfn(0x20_0000), PageSize::Size2M, Prot::RX, MemType::WriteBack).unwrap();
        t.map(Gpa(2 * G), Pfn(0x4_0000), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
        let mut probes: Vec<u64> = (0..4 * 512u64 + 8).map(|p| p * K4 + 8).collect();
        probes.extend([G, G + 5 * K4, G + M2, 2 * G + 77 * K4, 3 * G, 1 << 48, u64::MAX, 4 * M2 - K4]);
        let mut scattered = probes.clone();
        scattered.sort_by_key(|a| a.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for order in [&probes, &scattered] {
            let mut c = t.lookup_cursor();
            for &a in order.iter() {
                let want = t.lookup(Gpa(a)).map(|l| (l.gpa, l.size, l.pfn()));
                assert_eq!(c.lookup(Gpa(a)).map(|l| (l.gpa, l.size, l.pfn())), want, "{f:?} {a:#x}");
                assert_eq!(c.is_mapped(Gpa(a)), t.is_mapped(Gpa(a)), "{f:?} {a:#x}");
            }
        }
        // Changes to leaves through `&self` are seen by a live cursor.
        let mut c = t.lookup_cursor();
        assert_eq!(c.is_mapped(Gpa(K4)), Some((Pfn(0x1001), Prot::RW)));
        assert_eq!(c.is_mapped(Gpa(0)), None);
        t.map(Gpa(0), Pfn(0x999), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
        assert_eq!(c.is_mapped(Gpa(0)), Some((Pfn(0x999), Prot::READ)));
        assert_eq!(t.unmap(Gpa(K4)), Ok(true));
        assert_eq!(c.is_mapped(Gpa(K4)), None);
        assert!(c.lookup(Gpa(K4)).is_none());
    }
}

/// `HeapPages::ptr` names exactly the frames handed out, on both of its
/// paths (frames below 2^52 are checked on their address, the others on
/// their index), including an arena that straddles 2^52 and one at the
/// top of the frame numbers; frames that differ by a multiple of 2^52
/// (whose addresses wrap onto each other) are never confused.
#[test]
fn heap_pages_ptr_at_frame_number_edges() {
    use nested_pt::TablePages;
    const TOP: u64 = 1 << 52;
    for base in [0, 0x100, TOP - 2, TOP, u64::MAX - 3] {
        let mut hp = HeapPages::with_capacity(base, 4);
        let mut got = Vec::new();
        while let Some(pfn) = hp.alloc_zeroed() {
            got.push(pfn);
        }
        let want: Vec<Pfn> = (0..4).filter_map(|i| base.checked_add(i)).map(Pfn).collect();
        assert_eq!(got, want, "{base:#x}");
        let ptrs: Vec<*mut u64> = got.iter().map(|&p| hp.ptr(p)).collect();
        for (i, p) in ptrs.iter().enumerate() {
            assert!(!p.is_null() && (*p as usize).is_multiple_of(4096), "{base:#x} frame {i}");
            assert_eq!(*p as usize - ptrs[0] as usize, i * 4096, "{base:#x} frame {i}");
        }
        for p in [base.wrapping_sub(1), base.wrapping_add(4), base ^ TOP, base.wrapping_add(TOP), u64::MAX - 4] {
            if !got.contains(&Pfn(p)) {
                assert!(hp.ptr(Pfn(p)).is_null(), "{base:#x}: {p:#x}");
            }
        }
        // A freed frame keeps its page (it was handed out) until reused.
        // SAFETY: nothing refers to the page.
        unsafe { hp.free(got[0]) };
        assert_eq!(hp.ptr(got[0]), ptrs[0]);
    }
}
