//! Every public entry point with hostile arguments: addresses and lengths
//! at and past the guest-physical limit and near `u64::MAX`, unaligned and
//! zero values, short and huge bitmaps, frames at and past the format's
//! width, out-of-range levels. Nothing may panic, and every refused call
//! must leave the table exactly as it was.

use nested_pt::mmu;
use nested_pt::{
    Access, Caps, CountingPages, Error, GPA_LIMIT, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, PhysPages,
    Prot, PteFormat, Walk, WalkStep,
};

type T = NestedTable<CountingPages<HeapPages>>;

const K4: u64 = 4096;
const M2: u64 = 1 << 21;
const G: u64 = 1 << 30;

const GPAS: [u64; 12] =
    [0, 1, 0xfff, K4, M2 - K4, G, GPA_LIMIT - K4, GPA_LIMIT - 1, GPA_LIMIT, 1 << 63, u64::MAX - 0xfff, u64::MAX];
const LENS: [u64; 10] = [0, 1, K4, K4 + 1, M2, G, GPA_LIMIT, 1 << 63, u64::MAX - 0xfff, u64::MAX];
const SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];
const MEMTYPES: [MemType; 5] =
    [MemType::Uncacheable, MemType::WriteCombining, MemType::WriteThrough, MemType::WriteProtected, MemType::WriteBack];

/// The three formats, plus the narrowest (36-bit, no large pages) and the
/// widest (52-bit) capabilities, asked for with out-of-range widths.
fn formats() -> Vec<PteFormat> {
    let c = Caps::default();
    vec![
        PteFormat::ept(c),
        PteFormat::ept_emulated_ad(c),
        PteFormat::npt(c),
        PteFormat::ept_emulated_ad(Caps { page_2m: false, page_1g: false, execute_only: false, phys_bits: 0 }),
        PteFormat::npt(Caps { phys_bits: 255, ..c }),
        PteFormat::vtd(c),
        PteFormat::amd_vi(Caps { phys_bits: 0, ..c }),
    ]
}

fn frames(f: &PteFormat) -> [u64; 8] {
    let l = f.frame_limit();
    [0, 1, l - 512, l - 1, l, l + 1, 1 << 52, u64::MAX]
}

/// Every combination of the three permissions, and unknown bits.
fn prots() -> impl Iterator<Item = Prot> {
    (0..8u8).chain([0xf8, 0xff]).map(Prot::from_bits_retain)
}

/// A table with 4 KiB, 2 MiB (and, where supported, 1 GiB) ranges, some
/// pages mapped, accessed and dirty.
fn fixture(f: PteFormat) -> T {
    let mut t = NestedTable::new(f, CountingPages::new(HeapPages::with_capacity(0x100, 64))).unwrap();
    t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
    t.map_range(Gpa(M2 - 4 * K4), 8 * K4, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x1000 + (g.0 >> 12)))).unwrap();
    t.record_access(Gpa(M2), Access::Write).unwrap();
    if f.supports(PageSize::Size2M) {
        t.populate_region(Gpa(G), 2 * M2, PageSize::Size2M).unwrap();
        t.map(Gpa(G), Pfn(0x4000), PageSize::Size2M, Prot::READ, MemType::WriteBack).unwrap();
    }
    if f.supports(PageSize::Size1G) {
        t.populate_region(Gpa(GPA_LIMIT - G), G, PageSize::Size1G).unwrap();
        t.map(Gpa(GPA_LIMIT - G), Pfn(0x4_0000), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
    }
    t
}

/// Everything observable about a table: its leaves and its pages.
fn snapshot(t: &T) -> (Vec<(u64, u64)>, usize, usize) {
    let mut leaves = Vec::new();
    t.for_each_leaf_table(Gpa(0), u64::MAX, |base, entries, size| {
        for (i, e) in entries.iter().enumerate() {
            let v = e.load(std::sync::atomic::Ordering::Relaxed);
            if v != 0 {
                leaves.push((base.0 + i as u64 * size.bytes(), v));
            }
        }
    });
    (leaves, t.table_pages(), t.pages().live())
}

/// Runs `op` on `t`; when it is refused, checks nothing changed, and when
/// it succeeds, puts a fresh fixture in its place for the next call.
fn refused_changes_nothing<R: std::fmt::Debug>(t: &mut T, what: &str, op: impl FnOnce(&mut T) -> Result<R, Error>) {
    let before = snapshot(t);
    let r = op(t);
    assert!(t.pages().errors().is_empty(), "{what}");
    if r.is_err() {
        assert_eq!(snapshot(t), before, "{what}: {r:?} changed the table");
    } else {
        *t = fixture(*t.format());
    }
}

#[test]
fn structure_operations() {
    for f in formats() {
        let mut t = fixture(f);
        for gpa in GPAS {
            for len in LENS {
                for size in SIZES {
                    let w = format!("{f:?} {gpa:#x}+{len:#x} {size:?}");
                    refused_changes_nothing(&mut t, &format!("populate {w}"), |t| {
                        t.populate_region(Gpa(gpa), len, size)
                    });
                    refused_changes_nothing(&mut t, &format!("vacate {w}"), |t| t.vacate_region(Gpa(gpa), len, size));
                    refused_changes_nothing(&mut t, &format!("unmap_vacate {w}"), |t| {
                        t.unmap_vacate_region(Gpa(gpa), len, size)
                    });
                }
            }
        }
    }
}

#[test]
fn entry_operations() {
    for f in formats() {
        let t0 = fixture(f);
        let mut t = fixture(f);
        for gpa in GPAS {
            // Single-entry operations on one shared fixture: refusals are
            // checked against its snapshot.
            for pfn in frames(&f) {
                for size in SIZES {
                    for mt in MEMTYPES {
                        let before = snapshot(&t0);
                        let r = t0.map(Gpa(gpa), Pfn(pfn), size, Prot::RW, mt);
                        // The exclusive form refuses and succeeds exactly
                        // where the shared one does.
                        let rx = t.map_exclusive(Gpa(gpa), Pfn(pfn), size, Prot::RW, mt);
                        assert_eq!(r, rx, "map_exclusive {gpa:#x} {pfn:#x} {size:?} {mt:?}");
                        if rx.is_ok() {
                            assert_eq!(t.unmap(Gpa(gpa)), Ok(true));
                        }
                        if r.is_err() {
                            assert_eq!(snapshot(&t0), before, "map {gpa:#x} {pfn:#x} {size:?} {mt:?}: {r:?}");
                        } else {
                            assert!(f.frame_fits(Pfn(pfn)) && gpa < GPA_LIMIT);
                            assert_eq!(t0.unmap(Gpa(gpa)), Ok(true));
                        }
                    }
                }
            }
            for prot in prots() {
                let before = snapshot(&t0);
                if t0.map(Gpa(gpa), Pfn(0x10), PageSize::Size4K, prot, MemType::WriteBack).is_err() {
                    assert_eq!(snapshot(&t0), before);
                } else {
                    t0.unmap(Gpa(gpa)).unwrap();
                }
            }
            let _ = t0
                .lookup(Gpa(gpa))
                .map(|l| (l.pfn(), l.pfn_of(Gpa(gpa)), l.pfn_of(Gpa(u64::MAX)), l.pfn_of(Gpa(0)), l.prot()));
            let _ = t0.is_mapped(Gpa(gpa));
            let mut cur = t0.lookup_cursor();
            assert_eq!(cur.is_mapped(Gpa(gpa)), t0.is_mapped(Gpa(gpa)));
            assert_eq!(cur.lookup(Gpa(gpa)).map(|l| l.gpa), t0.lookup(Gpa(gpa)).map(|l| l.gpa));
            let w = t0.walk(Gpa(gpa));
            assert!(w.steps().len() <= 4);
            for s in w.steps() {
                let _ = t0.entry(s);
            }
            for on in [false, true] {
                let _ = t0.reset_accessed(Gpa(gpa), on);
                let _ = t0.reset_dirty(Gpa(gpa), on);
            }
            for a in [Access::Read, Access::Write, Access::Execute] {
                let _ = t0.record_access(Gpa(gpa), a);
                for ad in [false, true] {
                    for root in [t0.root().0, 0, f.frame_limit(), u64::MAX] {
                        if let Err(v) = mmu::translate(t0.pages(), &f, Pfn(root), Gpa(gpa), a, ad) {
                            let _ = (v.npt_error_code(), v.ept_qualification());
                        }
                    }
                }
            }
            for len in LENS {
                let mut calls = 0;
                t0.for_each_leaf_table(Gpa(gpa), len, |_, e, _| calls += e.len());
                let _ = t0.leaves(Gpa(gpa), len).count();
                // Range operations on fresh fixtures.
                let w = format!("{f:?} {gpa:#x}+{len:#x}");
                let l = f.frame_limit();
                for pfn in [0, l - 1, l, u64::MAX] {
                    refused_changes_nothing(&mut t, &format!("map_range {w} {pfn:#x}"), |t| {
                        t.map_range(Gpa(gpa), len, Prot::RW, MemType::WriteBack, |g| {
                            Some(Pfn(pfn.wrapping_add(g.0 >> 12)))
                        })
                    });
                }
                refused_changes_nothing(&mut t, &format!("map_range_exclusive {w}"), |t| {
                    t.map_range_exclusive(Gpa(gpa), len, Prot::RW, MemType::WriteBack, |g| Some(Pfn(u64::MAX - g.0)))
                });
                refused_changes_nothing(&mut t, &format!("unmap_region {w}"), |t| t.unmap_region(Gpa(gpa), len));
                for words in [0usize, 1, 1 << 12] {
                    for clear in [false, true] {
                        refused_changes_nothing(&mut t, &format!("scan_dirty {w} {words}"), |t| {
                            t.scan_dirty(Gpa(gpa), len, &mut vec![0u64; words], clear)
                        });
                    }
                    refused_changes_nothing(&mut t, &format!("harvest {w} {words}"), |t| {
                        t.harvest_dirty(Gpa(gpa), len, &mut vec![u64::MAX; words])
                    });
                    refused_changes_nothing(&mut t, &format!("harvest_exclusive {w} {words}"), |t| {
                        t.harvest_dirty_exclusive(Gpa(gpa), len, &mut vec![0u64; words])
                    });
                }
            }
        }
        // Only accessed/dirty bits changed.
        let frames = |t: &T| t.leaves(Gpa(0), u64::MAX).map(|l| (l.gpa, l.pfn(), l.prot())).collect::<Vec<_>>();
        assert_eq!(frames(&t0), frames(&fixture(f)));
    }
}

#[test]
fn specific_refusals() {
    let f = PteFormat::ept(Caps::default());
    let t = fixture(f);
    let rw = Prot::RW;
    let wb = MemType::WriteBack;
    assert_eq!(t.map(Gpa(!0xfff), Pfn(1), PageSize::Size4K, rw, wb), Err(Error::OutOfRange));
    assert_eq!(t.map(Gpa(K4), Pfn(f.frame_limit()), PageSize::Size4K, rw, wb), Err(Error::OutOfRange));
    assert_eq!(t.map(Gpa(K4), Pfn(u64::MAX), PageSize::Size4K, rw, wb), Err(Error::OutOfRange));
    assert_eq!(t.map_range(Gpa(u64::MAX - 0xfff), K4, rw, wb, |_| Some(Pfn(1))), Err(Error::Overflow));
    assert_eq!(t.map_range(Gpa(GPA_LIMIT), K4, rw, wb, |_| Some(Pfn(1))), Err(Error::OutOfRange));
    assert_eq!(t.map_range(Gpa(K4), u64::MAX - 0xfff, rw, wb, |_| Some(Pfn(1))), Err(Error::Overflow));
    assert_eq!(t.unmap_region(Gpa(GPA_LIMIT - K4), 2 * K4), Err(Error::OutOfRange));
    assert_eq!(t.scan_dirty(Gpa(0), GPA_LIMIT, &mut [0; 1 << 16], false), Err(Error::BitmapTooSmall));
    assert_eq!(t.harvest_dirty(Gpa(0), 4 * M2, &mut []), Err(Error::BitmapTooSmall));
    assert_eq!(t.harvest_dirty(Gpa(K4), !0xfff, &mut []), Err(Error::Overflow));
    let mut t = t;
    assert_eq!(t.populate_region(Gpa(0), !0xfff, PageSize::Size4K), Err(Error::OutOfRange));
    assert_eq!(t.vacate_region(Gpa(G + K4), G, PageSize::Size1G), Err(Error::Unaligned));
    assert_eq!(t.vacate_region(Gpa(G), G, PageSize::Size1G), Err(Error::NotPopulated));
    // A hostile walk.
    let mut w = Walk { len: usize::MAX, ..Walk::default() };
    assert_eq!(w.steps().len(), 4);
    w.steps[0] = WalkStep { level: 200, table: Pfn(u64::MAX), index: u16::MAX, entry: u64::MAX };
    assert!(t.entry(&w.steps[0]).is_none());
    let root = WalkStep { table: t.root(), index: u16::MAX, ..WalkStep::default() };
    assert!(t.entry(&root).is_some());
}

#[test]
fn format_and_provider_functions() {
    for f in formats() {
        for pfn in frames(&f) {
            let fits = f.frame_fits(Pfn(pfn));
            assert_eq!(f.table_entry(Pfn(pfn)).is_ok(), fits);
            for size in SIZES {
                for prot in prots() {
                    for mt in MEMTYPES {
                        if let Ok(e) = f.leaf_entry(Pfn(pfn), size, prot, mt) {
                            assert!(fits);
                            assert_eq!(f.frame_at_level(e, size.level()), Pfn(pfn));
                        }
                    }
                }
            }
            let _ = f.root_pointer(Pfn(pfn), true);
        }
        for e in [0, 1, u64::MAX, 1 << 63, 0xfff] {
            for level in [0, 1, 2, 3, 4, 5, 255] {
                let _ = (f.is_leaf(e, level), f.frame_at_level(e, level));
            }
            let _ = (f.is_present(e), f.frame(e), f.prot(e), f.mem_type(e), f.accessed(e), f.dirty(e));
            for a in [Access::Read, Access::Write, Access::Execute] {
                let _ = f.access_bits(e, a);
            }
        }
        for p in prots() {
            let _ = f.check_prot(p);
        }
    }
    for level in [0, 4, 255] {
        assert_eq!(PageSize::from_level(level), None);
    }
    for b in 0..=255 {
        let _ = MemType::from_bits(b);
    }
    assert_eq!(Gpa(u64::MAX).checked_add(1), None);
    let _ = Pfn(u64::MAX).addr();
    // Providers: frame numbering near u64::MAX, hostile physical ranges.
    let mut hp = HeapPages::with_capacity(u64::MAX, 4);
    let p = nested_pt::TablePages::alloc_zeroed(&mut hp);
    assert_eq!(p, Some(Pfn(u64::MAX)));
    assert_eq!(nested_pt::TablePages::alloc_zeroed(&mut hp), None, "no frame number past u64::MAX");
    assert!(NestedTable::new(PteFormat::ept(Caps::default()), HeapPages::with_capacity(u64::MAX, 4)).is_err());
    let mut buf = vec![0u8; 3 * 4096];
    let off = buf.as_ptr().align_offset(4096);
    let virt = buf[off..].as_mut_ptr();
    for (phys, pages) in [(!0xfff, 2), (1, 1)] {
        // SAFETY: each is refused before the region is used.
        assert!(unsafe { PhysPages::new(phys, virt, pages) }.is_none(), "{phys:#x} {pages:#x}");
    }
}
