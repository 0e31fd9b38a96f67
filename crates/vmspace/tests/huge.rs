//! Transparent 1 GiB leaves: a reservoir's aligned 1 GiB run mapped with
//! one level-3 leaf by `populate`, faults and holds; exact
//! `resident_count`; the slot split to 2 MiB and 4 KiB when dirty tracking
//! goes on (eager and lazy), by `unmap_range` and by `protect`, with data
//! and harvests exact afterwards; the fallbacks to 2 MiB leaves; writers
//! through holds while splits run.
//!
//! RAM comes from memfd reservoirs (pages are allocated only where a test
//! writes, and freeing punches holes), one or two GiB-sized objects at a
//! time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use nested_pt::{Access, Caps, CountingPages, FormatKind, Gpa, HeapPages, PageSize, mmu};
use vmspace::*;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
/// Where the tests map their GiB.
const BASE: u64 = 4 * G1;
/// Frames numbered from here are 1 GiB aligned.
const FRAMES: u64 = 0x10_0000;

/// RAM of `bytes` from a memfd reservoir of as much, first frame `base`.
fn ram_at(bytes: u64, base: u64) -> Arc<VmObject> {
    let r = Arc::new(MemfdReservoir::new(bytes, Pfn(base)).unwrap());
    VmObject::ram(r, bytes).unwrap()
}

/// 1 GiB + 4 MiB of RAM: one 1 GiB run, then two 2 MiB runs.
fn huge_ram() -> Arc<VmObject> {
    let o = ram_at(G1 + 2 * M2, FRAMES);
    assert!(o.huge_run_at(0).is_some(), "the reservoir handed out a 1 GiB run");
    o
}

fn space_cfg(format: PteFormat, split: SplitPolicy) -> Space {
    let mut cfg = SpaceConfig::new(1 << 36, format);
    cfg.split = split;
    VmSpace::new(cfg, pages()).unwrap()
}

/// The level the table walk of `gpa` ends at.
fn walk_level(s: &Space, gpa: u64) -> u8 {
    s.with_table(|t| t.walk(Gpa(gpa)).steps().last().unwrap().level)
}

/// The sizes of the present leaves, in address order.
fn leaf_sizes(s: &Space, gpa: u64, len: u64) -> Vec<PageSize> {
    s.with_table(|t| t.leaves(Gpa(gpa), len).map(|l| l.size).collect())
}

/// How many present leaves of each size (4K, 2M, 1G) the range has.
fn leaf_counts(s: &Space, gpa: u64, len: u64) -> [usize; 3] {
    let mut n = [0; 3];
    for size in leaf_sizes(s, gpa, len) {
        n[size.level() as usize - 1] += 1;
    }
    n
}

/// 4 KiB pages the present leaves map.
fn mapped_pages(s: &Space) -> u64 {
    s.with_table(|t| t.leaves(Gpa(0), s.size()).map(|l| l.size.pages()).sum())
}

/// The hardware's walk of `gpa` for `access` (setting accessed/dirty):
/// the page size it found, or `None` if it faults.
fn hw(s: &Space, gpa: u64, access: Access) -> Option<PageSize> {
    // SAFETY: a hardware walk only sets accessed/dirty bits.
    unsafe {
        s.with_table_raw(|t| mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(gpa), access, true).ok())
            .map(|x| x.size)
    }
}

fn emulated(f: &PteFormat) -> bool {
    f.kind() == FormatKind::EptEmulatedAd
}

/// A few pages of every 2 MiB of `[gpa, gpa+len)` translate to the
/// object's frames at `off`.
fn check_frames(s: &Space, o: &VmObject, gpa: u64, off: u64, len: u64) {
    let mut p = 0;
    while p < len {
        for q in [p, p + 13 * PG, p + M2 - PG] {
            if q < len {
                assert_eq!(s.lookup(Gpa(gpa + q)).map(|(f, _)| f), o.frame_at(off + q), "page {:#x}", gpa + q);
            }
        }
        p += M2;
    }
}

fn read_u64(o: &VmObject, off: u64) -> u64 {
    let mut b = [0u8; 8];
    o.read(off, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Pages of the 1 GiB at `BASE` the tests write (spread over 2 MiB
/// chunks, first and last pages included).
const PAGES: [u64; 7] = [0, 5, 511, 512, 77 * 512 + 300, 100_000, 262_143];

/// A harvest of the GiB at `BASE`: the pages reported.
fn harvest(s: &Space) -> Vec<u64> {
    let mut bm = vec![0u64; (G1 / PG / 64) as usize];
    let n = s.track_dirty(Gpa(BASE), G1, &mut bm).unwrap();
    let pages: Vec<u64> = (0..G1 / PG).filter(|&p| bit(&bm, p)).collect();
    assert_eq!(pages.len() as u64, n);
    pages
}

#[test]
fn populate_faults_and_holds_map_one_1g_leaf() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        let base_tables = table_pages(&s);
        s.map(&o, 0, Gpa(BASE), G1 + 2 * M2, Prot::RW).unwrap();
        // populate of one page maps the whole GiB with one leaf.
        assert_eq!(s.populate(Gpa(BASE + 5 * PG), PG).unwrap(), G1 / PG, "{f:?}");
        assert_eq!(s.resident_count(), G1 / PG);
        assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G], "{f:?}");
        assert_eq!(walk_level(&s, BASE + 300 * M2 + 7 * PG), 3, "{f:?}: the walk ends at a level-3 leaf");
        if !emulated(&f) {
            assert_eq!(hw(&s, BASE + 511 * M2 + 3, Access::Read), Some(PageSize::Size1G), "{f:?}");
        }
        assert_eq!(s.populate(Gpa(BASE), G1).unwrap(), 0, "already there");
        check_frames(&s, &o, BASE, 0, G1);
        // The tail: 2 MiB runs, 2 MiB leaves.
        assert_eq!(s.populate(Gpa(BASE), G1 + 2 * M2).unwrap(), 1024);
        assert_eq!(leaf_counts(&s, BASE, G1 + 2 * M2), [0, 2, 1]);
        assert_eq!(s.resident_count(), G1 / PG + 1024);
        assert_eq!(mapped_pages(&s), s.resident_count());
        check_frames(&s, &o, BASE, 0, G1 + 2 * M2);
        s.unmap(Gpa(BASE), G1 + 2 * M2).unwrap();
        assert_eq!(s.resident_count(), 0);
        assert_eq!(table_pages(&s), base_tables, "{f:?}: every table freed");

        // Mapped again: a fault anywhere maps the whole GiB.
        s.map(&o, 0, Gpa(BASE), G1 + 2 * M2, Prot::RW).unwrap();
        let c = s.client();
        c.fault(Gpa(BASE + 123 * M2 + 7 * PG + 3), Prot::READ).unwrap();
        assert_eq!(s.resident_count(), G1 / PG, "{f:?}");
        assert_eq!(walk_level(&s, BASE), 3);
        c.fault(Gpa(BASE + 400 * M2), Prot::WRITE).unwrap();
        assert_eq!(s.resident_count(), G1 / PG, "a fault on the present leaf maps nothing");
        // Holds inside it address the run's frame plus the offset, and
        // what they write the object reads back (and the other way).
        for &p in &PAGES {
            let h = c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap();
            assert_eq!(Some(h.pfn()), o.frame_at(p * PG), "{f:?} page {p}");
            assert_eq!(h.pfn().0, FRAMES + p);
            h.write_u64(16, 0x1000 + p).unwrap();
            assert!(!h.release());
        }
        for &p in &PAGES {
            assert_eq!(read_u64(&o, p * PG + 16), 0x1000 + p);
        }
        o.write(200_000 * PG + 8, &42u64.to_le_bytes()).unwrap();
        let h = c.hold(Gpa(BASE + 200_000 * PG), Prot::READ).unwrap();
        assert_eq!(h.read_u64(8).unwrap(), 42);
        drop(h);
        // A hold in a fresh space maps the GiB too.
        let s2 = space_cfg(f, SplitPolicy::Eager);
        s2.map(&o, 0, Gpa(2 * G1), G1, Prot::RW).unwrap();
        let h = s2.client().hold(Gpa(2 * G1 + 99 * PG), Prot::READ).map(|h| h.pfn());
        assert_eq!(h.unwrap(), Pfn(FRAMES + 99));
        assert_eq!(s2.resident_count(), G1 / PG);
        assert_eq!(leaf_sizes(&s2, 2 * G1, G1), vec![PageSize::Size1G]);
    }
}

#[test]
fn eager_split_on_tracking_on_keeps_data_and_harvests_exactly() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        let c = s.client();
        for &p in &PAGES {
            let h = c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap();
            h.write_u64(0, 0xa000 + p).unwrap();
        }
        assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G]);
        let tables = table_pages(&s);
        s.set_dirty_tracking(true).unwrap();
        // 1 GiB -> 512 x 2 MiB -> 262,144 x 4 KiB: a level-2 table and 512
        // leaf tables; the same pages resident.
        assert_eq!(leaf_counts(&s, BASE, G1), [262_144, 0, 0], "{f:?}");
        assert_eq!(table_pages(&s), tables + 513, "{f:?}");
        assert_eq!(s.resident_count(), G1 / PG);
        assert_eq!(walk_level(&s, BASE + 9 * PG), 1);
        check_frames(&s, &o, BASE, 0, G1);
        // Nothing was dirty (holds mark only while tracking is on): the
        // first harvest is empty; then exactly what is written.
        assert_eq!(harvest(&s), Vec::<u64>::new(), "{f:?}");
        for &p in &PAGES {
            let h = c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap();
            assert_eq!(h.read_u64(0).unwrap(), 0xa000 + p, "{f:?}: written before the split");
            h.write_u64(8, p).unwrap();
        }
        assert_eq!(harvest(&s), PAGES.to_vec(), "{f:?}");
        assert_eq!(harvest(&s), Vec::<u64>::new());
        for &p in &PAGES {
            assert_eq!((read_u64(&o, p * PG), read_u64(&o, p * PG + 8)), (0xa000 + p, p));
        }
        assert_eq!(s.promote(Gpa(BASE), G1), Err(Error::TrackingOn));
        // Tracking off again: the pass promotes the 512 chunks to 2 MiB
        // leaves and then the slot back to one 1 GiB leaf.
        s.set_dirty_tracking(false).unwrap();
        assert_eq!(s.promote(Gpa(BASE), G1).unwrap(), 512);
        assert_eq!(s.promotions_1g().explicit, 1, "{f:?}");
        assert_eq!(leaf_counts(&s, BASE, G1), [0, 0, 1], "{f:?}");
        assert_eq!(table_pages(&s), tables, "{f:?}: every table of the split freed");
        assert_eq!(walk_level(&s, BASE + 9 * PG), 3);
        assert_eq!(s.resident_count(), G1 / PG);
        check_frames(&s, &o, BASE, 0, G1);
        for &p in &PAGES {
            let h = c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap();
            assert_eq!((h.read_u64(0).unwrap(), h.read_u64(8).unwrap()), (0xa000 + p, p));
        }
        // Tracking on again splits it again, and the harvest is exact.
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(leaf_counts(&s, BASE, G1), [262_144, 0, 0], "{f:?}");
        harvest(&s);
        c.hold(Gpa(BASE + 77 * PG), Prot::RW).unwrap().write_u64(16, 1).unwrap();
        assert_eq!(harvest(&s), vec![77], "{f:?}");
        s.set_dirty_tracking(false).unwrap();
        s.unmap(Gpa(BASE), G1).unwrap();
        assert_eq!(s.resident_count(), 0);
    }
}

#[test]
fn a_dirty_1g_leaf_is_carried_to_every_small_leaf_by_the_eager_split() {
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    assert_eq!(hw(&s, BASE + 3 * PG, Access::Write), Some(PageSize::Size1G));
    s.set_dirty_tracking(true).unwrap();
    // The leaf's one dirty bit stands for all its pages: a superset.
    assert_eq!(harvest(&s).len() as u64, G1 / PG);
    assert_eq!(harvest(&s).len(), 0);
}

#[test]
fn lazy_split_on_the_first_write() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Lazy);
        let o = huge_ram();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        s.populate(Gpa(BASE), G1).unwrap();
        if !emulated(&f) {
            // Written before tracking: a lazy switch clears that.
            hw(&s, BASE, Access::Write).unwrap();
        }
        let tables = table_pages(&s);
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(table_pages(&s), tables, "{f:?}: nothing split yet");
        assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G]);
        assert_eq!(s.lookup(Gpa(BASE + 5 * PG)).map(|(_, p)| p), Some(Prot::READ), "{f:?}: write-protected");
        if !emulated(&f) {
            assert_eq!(hw(&s, BASE + 7 * M2, Access::Write), None, "{f:?}: a write faults");
            assert_eq!(hw(&s, BASE + 7 * M2, Access::Read), Some(PageSize::Size1G));
        }
        assert_eq!(harvest(&s), Vec::<u64>::new(), "{f:?}");
        // A read changes nothing; the first write (a hold) splits the GiB
        // to 2 MiB leaves (still write-protected) and its 2 MiB to 4 KiB.
        let c = s.client();
        assert_eq!(c.hold(Gpa(BASE + 77 * M2 + 300 * PG), Prot::READ).unwrap().read_u64(0).unwrap(), 0);
        assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G]);
        let h = c.hold(Gpa(BASE + 77 * M2 + 300 * PG), Prot::RW).unwrap();
        h.write_u64(0, 77).unwrap();
        drop(h);
        assert_eq!(leaf_counts(&s, BASE, G1), [512, 511, 0], "{f:?}");
        assert_eq!(table_pages(&s), tables + 2);
        assert_eq!(s.lookup(Gpa(BASE + 77 * M2 + 301 * PG)).map(|(_, p)| p), Some(Prot::RW));
        assert_eq!(s.lookup(Gpa(BASE + 78 * M2)).map(|(_, p)| p), Some(Prot::READ), "{f:?}");
        assert_eq!(s.resident_count(), G1 / PG);
        // A vCPU's write fault in another 2 MiB splits that one.
        c.fault(Gpa(BASE + 500 * M2 + 9 * PG), Prot::WRITE).unwrap();
        if !emulated(&f) {
            assert_eq!(hw(&s, BASE + 500 * M2 + 9 * PG, Access::Write), Some(PageSize::Size4K));
        }
        assert_eq!(leaf_counts(&s, BASE, G1), [1024, 510, 0], "{f:?}");
        assert_eq!(harvest(&s), vec![77 * 512 + 300, 500 * 512 + 9], "{f:?}");
        assert_eq!(harvest(&s), Vec::<u64>::new());
        assert_eq!(read_u64(&o, 77 * M2 + 300 * PG), 77);
        check_frames(&s, &o, BASE, 0, G1);
        assert_eq!(mapped_pages(&s), s.resident_count());
        // DirtyOp::Set marks 4 KiB pages: the write-protected 2 MiB leaves
        // of its range are split first.
        let mut bm = vec![0u64; 8];
        let sel = [1u64 << 3, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(BASE + 3 * M2), M2, Some(&sel), &mut bm).unwrap(), 1);
        assert_eq!(leaf_counts(&s, BASE, G1), [1536, 509, 0], "{f:?}");
        assert_eq!(harvest(&s), vec![3 * 512 + 3], "{f:?}");
    }
}

#[test]
fn lazy_switch_on_an_empty_huge_slot_gives_it_small_tables() {
    let s = space_cfg(npt(), SplitPolicy::Lazy);
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    assert_eq!(walk_level(&s, BASE), 3, "counted for a 1 GiB leaf, empty");
    s.set_dirty_tracking(true).unwrap();
    assert_eq!(walk_level(&s, BASE + 5 * M2), 1, "leaf tables now");
    s.client().fault(Gpa(BASE + 5 * M2), Prot::WRITE).unwrap();
    assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size4K; 16], "fault-around, 4 KiB leaves");
    assert_eq!(s.resident_count(), 16);
    s.unmap(Gpa(BASE), G1).unwrap();
    assert_eq!(s.resident_count(), 0);
}

#[test]
fn unmap_range_of_one_page_in_the_middle_of_a_1g_leaf() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        let base_tables = table_pages(&s);
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        for &p in &PAGES {
            o.write(p * PG, &(p + 1).to_le_bytes()).unwrap();
        }
        s.populate(Gpa(BASE), G1).unwrap();
        if !emulated(&f) {
            hw(&s, BASE + 100_000 * PG, Access::Write).unwrap();
        }
        let hole = BASE + 300 * M2 + 17 * PG;
        s.unmap_range(Gpa(hole), PG).unwrap();
        assert_eq!(s.resident_count(), G1 / PG - 1, "{f:?}");
        assert_eq!(mapped_pages(&s), s.resident_count());
        assert_eq!(s.lookup(Gpa(hole)), None);
        assert_eq!(leaf_counts(&s, BASE, G1), [511, 511, 0], "{f:?}");
        assert_eq!(s.lookup(Gpa(hole - PG)).map(|(p, _)| p), o.frame_at(300 * M2 + 16 * PG));
        assert_eq!(s.lookup(Gpa(hole + PG)).map(|(p, _)| p), o.frame_at(300 * M2 + 18 * PG));
        check_frames(&s, &o, BASE, 0, 300 * M2);
        check_frames(&s, &o, BASE + 301 * M2, 301 * M2, G1 - 301 * M2);
        // The A/D state was carried: the written 2 MiB is still dirty.
        if !emulated(&f) {
            let dirty =
                s.with_table(|t| t.lookup(Gpa(BASE + 100_000 * PG)).map(|l| (l.size, t.format().dirty(l.value))));
            assert_eq!(dirty, Some((PageSize::Size2M, true)), "{f:?}");
        }
        let m = s.mappings();
        assert_eq!(
            m.iter().map(|m| (m.gpa.0, m.len, m.offset)).collect::<Vec<_>>(),
            vec![(BASE, hole - BASE, 0), (hole + PG, BASE + G1 - hole - PG, hole + PG - BASE)]
        );
        let c = s.client();
        assert_eq!(c.hold(Gpa(hole), Prot::READ).err(), Some(Error::NoMapping));
        for &p in &PAGES {
            let h = c.hold(Gpa(BASE + p * PG), Prot::READ).unwrap();
            assert_eq!(h.read_u64(0).unwrap(), p + 1, "{f:?} page {p}");
        }
        // An aligned 2 MiB cut out of the other GiB of a second mapping:
        // its slot is split to 2 MiB leaves, that one vacated whole.
        let o2 = huge_ram();
        s.map(&o2, 0, Gpa(2 * G1), G1, Prot::RW).unwrap();
        s.populate(Gpa(2 * G1), G1).unwrap();
        s.unmap_range(Gpa(2 * G1 + 10 * M2), M2).unwrap();
        assert_eq!(leaf_counts(&s, 2 * G1, G1), [0, 511, 0], "{f:?}");
        assert_eq!(s.resident_count(), 2 * (G1 / PG) - 1 - 512);
        check_frames(&s, &o2, 2 * G1 + 11 * M2, 11 * M2, G1 - 11 * M2);
        for m in s.mappings() {
            s.unmap(m.gpa, m.len).unwrap();
        }
        assert_eq!(s.resident_count(), 0);
        assert_eq!(table_pages(&s), base_tables, "{f:?}");
    }
}

#[test]
fn protect_part_of_a_1g_leaf() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        s.map(&o, 0, Gpa(BASE), G1 + 2 * M2, Prot::RW).unwrap();
        s.populate(Gpa(BASE), G1).unwrap();
        let ro = BASE + 7 * M2 + 3 * PG;
        s.protect(Gpa(ro), 2 * PG, Prot::READ).unwrap();
        assert_eq!(s.resident_count(), G1 / PG, "{f:?}");
        assert_eq!(leaf_counts(&s, BASE, G1), [512, 511, 0]);
        for (g, want) in [(ro - PG, Prot::RW), (ro, Prot::READ), (ro + PG, Prot::READ), (ro + 2 * PG, Prot::RW)] {
            assert_eq!(s.lookup(Gpa(g)).map(|(_, p)| p), Some(want), "{f:?} {g:#x}");
        }
        assert_eq!(s.lookup(Gpa(BASE + 8 * M2)).map(|(_, p)| p), Some(Prot::RW));
        check_frames(&s, &o, BASE, 0, G1);
        let c = s.client();
        assert_eq!(c.hold(Gpa(ro), Prot::RW).err(), Some(Error::Protection));
        c.hold(Gpa(ro + 2 * PG), Prot::RW).unwrap().write_u64(0, 5).unwrap();
        assert_eq!(read_u64(&o, 7 * M2 + 5 * PG), 5);
        if !emulated(&f) {
            assert_eq!(hw(&s, ro, Access::Write), None, "{f:?}");
            assert_eq!(hw(&s, ro + 2 * PG, Access::Write), Some(PageSize::Size4K));
        }
        // A whole 1 GiB slot of a larger mapping: the leaf stays one leaf.
        let o2 = huge_ram();
        s.map(&o2, 0, Gpa(2 * G1), G1 + 2 * M2, Prot::RW).unwrap();
        s.populate(Gpa(2 * G1), G1 + 2 * M2).unwrap();
        s.protect(Gpa(2 * G1), G1, Prot::READ).unwrap();
        assert_eq!(leaf_counts(&s, 2 * G1, G1 + 2 * M2), [0, 2, 1], "{f:?}");
        assert_eq!(s.lookup(Gpa(2 * G1 + 5 * M2)).map(|(_, p)| p), Some(Prot::READ));
        assert_eq!(s.lookup(Gpa(3 * G1)).map(|(_, p)| p), Some(Prot::RW));
        if !emulated(&f) {
            assert_eq!(hw(&s, 2 * G1 + 9, Access::Write), None);
        }
        // And back: the pieces of one mapping with one protection merge.
        s.protect(Gpa(2 * G1), G1, Prot::RW).unwrap();
        s.unmap(Gpa(2 * G1), G1 + 2 * M2).unwrap();
        assert_eq!(s.resident_count(), G1 / PG);
    }
}

#[test]
fn fallbacks_to_2m_leaves() {
    let all_2m = |s: &Space, gpa: u64| {
        s.populate(Gpa(gpa), G1).unwrap();
        assert_eq!(leaf_counts(s, gpa, G1), [0, 512, 0]);
        assert_eq!(walk_level(s, gpa + 5 * M2), 2);
        assert_eq!(s.resident_count(), G1 / PG);
    };
    // The reservoir's frames are off the 1 GiB grid: no 1 GiB run.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = ram_at(G1 + 2 * M2, FRAMES + 512);
    assert_eq!(o.huge_run_at(0), None);
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    all_2m(&s, BASE);
    check_frames(&s, &o, BASE, 0, G1);
    // The reservoir is too small for a 1 GiB run.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = ram_at(G1 - M2, FRAMES);
    s.map(&o, 0, Gpa(BASE), G1 - M2, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1 - M2).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 511, 0]);
    // A 1 GiB run, but the guest address is not 1 GiB aligned against the
    // object offset.
    let o = huge_ram();
    let s = space_cfg(npt(), SplitPolicy::Eager);
    s.map(&o, 2 * M2, Gpa(BASE), G1, Prot::RW).unwrap();
    all_2m(&s, BASE);
    check_frames(&s, &o, BASE, 2 * M2, G1);
    drop(s);
    let s = space_cfg(npt(), SplitPolicy::Eager);
    s.map(&o, 0, Gpa(BASE + M2 * 2), G1 + 2 * M2, Prot::RW).unwrap();
    s.populate(Gpa(BASE + 2 * M2), G1 + 2 * M2).unwrap();
    assert_eq!(leaf_counts(&s, BASE, 2 * G1), [0, 514, 0], "the run is not at a 1 GiB-aligned address");
    drop(s);
    // The format has no 1 GiB leaves, or the space does not want them.
    let c = Caps { page_1g: false, ..Caps::default() };
    for (f, huge) in [(PteFormat::ept(c), true), (npt(), false)] {
        let mut cfg = SpaceConfig::new(1 << 36, f);
        cfg.huge_leaves = huge;
        let s: Space = VmSpace::new(cfg, pages()).unwrap();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        all_2m(&s, BASE);
        s.client().hold(Gpa(BASE + 3 * PG), Prot::RW).unwrap().write_u64(0, 1).unwrap();
        assert_eq!(read_u64(&o, 3 * PG), 1);
        o.write(3 * PG, &0u64.to_le_bytes()).unwrap();
    }
    // Large leaves off: 4 KiB leaves only, 1 GiB ones too.
    let mut cfg = SpaceConfig::new(1 << 36, npt());
    cfg.large_leaves = false;
    let s: Space = VmSpace::new(cfg, pages()).unwrap();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), 4 * M2).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [2048, 0, 0]);
    // Tracking on at map time: 4 KiB leaves.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    s.set_dirty_tracking(true).unwrap();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), M2).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [512, 0, 0]);
}

/// Writers through holds (each its own client and pages) while the
/// control thread splits: no write is lost, and the final harvest
/// reports every page written after tracking went on.
fn writers_during(split: SplitPolicy, control: impl FnOnce(&Space)) {
    let s = Arc::new(space_cfg(npt(), split));
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    if split == SplitPolicy::Lazy {
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    const WRITERS: u64 = 3;
    // Rounds each writer completed.
    let rounds: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    // Writer w's pages: one in each of 8 chunks, distinct per writer.
    let pages_of = |w: u64| (0..8u64).map(move |k| (k * 61 + w * 7) * 512 + w * 3 + 1);
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (s, stop, rounds) = (s.clone(), stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let c = s.client();
                let mut v = 0u64;
                while !stop.load(Ordering::Acquire) || v < 4 {
                    v += 1;
                    for p in pages_of(w) {
                        let h = c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap();
                        h.write_u64(0, v).unwrap();
                        h.write_u64(8, p).unwrap();
                    }
                    rounds[w as usize].fetch_add(1, Ordering::Release);
                }
                v
            })
        })
        .collect();
    let done = |w: usize| rounds[w].load(Ordering::Acquire);
    while (0..WRITERS as usize).any(|w| done(w) < 2) {
        std::thread::yield_now();
    }
    control(&s);
    // Every writer goes on for two whole rounds past the change (so each
    // of its pages is written after it), then they stop.
    let at: Vec<u64> = (0..WRITERS as usize).map(done).collect();
    while (0..WRITERS as usize).any(|w| done(w) < at[w] + 2) {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    let last: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut want = Vec::new();
    for w in 0..WRITERS {
        for p in pages_of(w) {
            assert_eq!((read_u64(&o, p * PG), read_u64(&o, p * PG + 8)), (last[w as usize], p), "writer {w} page {p}");
            want.push(p);
        }
    }
    want.sort_unstable();
    assert_eq!(harvest(&s), want);
    assert_eq!(harvest(&s), Vec::<u64>::new());
    assert_eq!(s.resident_count(), G1 / PG);
    assert_eq!(mapped_pages(&s), G1 / PG);
    check_frames(&s, &o, BASE, 0, G1);
}

#[test]
fn writers_through_holds_while_the_eager_split_runs() {
    writers_during(SplitPolicy::Eager, |s| {
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(leaf_counts(s, BASE, G1), [262_144, 0, 0]);
    });
}

#[test]
fn writers_through_holds_split_lazily_and_concurrently() {
    writers_during(SplitPolicy::Lazy, |s| {
        // The writers' first writes split the GiB and their chunks, from
        // three threads at once; a protection change of a page nobody
        // writes splits its chunk meanwhile.
        s.protect(Gpa(BASE + 400 * M2 + 5 * PG), PG, Prot::READ).unwrap();
        s.protect(Gpa(BASE + 400 * M2 + 5 * PG), PG, Prot::RW).unwrap();
    });
}

#[test]
fn writers_through_holds_while_unmap_range_cuts_the_leaf() {
    let s = Arc::new(space_cfg(npt(), SplitPolicy::Lazy));
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = s.client();
            let mut v = 0u64;
            while !stop.load(Ordering::Acquire) || v < 100 {
                v += 1;
                let h = c.hold(Gpa(BASE + 9 * PG), Prot::RW).unwrap();
                h.write_u64(0, v).unwrap();
            }
            v
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    s.unmap_range(Gpa(BASE + 300 * M2 + PG), PG).unwrap();
    assert_eq!(s.resident_count(), G1 / PG - 1);
    stop.store(true, Ordering::Release);
    let v = writer.join().unwrap();
    assert_eq!(read_u64(&o, 9 * PG), v, "no lost write");
    assert_eq!(leaf_counts(&s, BASE, G1), [511, 511, 0]);
}

#[test]
fn heap_reservoir_and_mmio_give_1g_leaves_too() {
    // A heap arena of 1 GiB + 2 MiB numbered from a 1 GiB-aligned frame
    // (untouched pages of the zeroed allocation cost nothing until used;
    // freeing zeroes the frames).
    let r = Arc::new(HeapReservoir::new(G1 + M2, Pfn(FRAMES)).unwrap());
    let o = VmObject::ram(r.clone(), G1 + M2).unwrap();
    assert_eq!(o.huge_run_at(0), Some(Pfn(FRAMES)));
    let s = space_cfg(PteFormat::ept(Caps::default()), SplitPolicy::Eager);
    s.map(&o, 0, Gpa(BASE), G1 + M2, Prot::RW).unwrap();
    let c = s.client();
    let h = c.hold(Gpa(BASE + 1234 * PG), Prot::RW).unwrap();
    assert_eq!(h.pfn(), Pfn(FRAMES + 1234));
    h.write_u64(0, 7).unwrap();
    drop(h);
    assert_eq!(leaf_counts(&s, BASE, G1 + M2), [0, 0, 1]);
    assert_eq!(read_u64(&o, 1234 * PG), 7);
    drop(c);
    drop(s);
    drop(o);
    assert_eq!(r.stats().allocated, 0);
    // MMIO whose range is 1 GiB-aligned: one uncached 1 GiB leaf.
    let m = VmObject::mmio(Pfn(8 * 0x4_0000), G1).unwrap();
    let s = space_cfg(npt(), SplitPolicy::Eager);
    s.map(&m, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.client().fault(Gpa(BASE + 5 * M2), Prot::READ).unwrap();
    assert_eq!(leaf_sizes(&s, BASE, G1), vec![PageSize::Size1G]);
    assert_eq!(s.lookup(Gpa(BASE + 3 * PG)).map(|(f, _)| f), Some(Pfn(8 * 0x4_0000 + 3)));
    assert_eq!(s.resident_count(), G1 / PG);
}

#[test]
fn unmap_range_and_protect_across_slots() {
    // 2 GiB + 2 MiB of RAM (two 1 GiB runs, one 2 MiB run) at 2 GiB.
    let o = ram_at(2 * G1 + M2, FRAMES);
    assert!(o.huge_run_at(0).is_some() && o.huge_run_at(G1).is_some());
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let base_tables = table_pages(&s);
        let at = 2 * G1;
        s.map(&o, 0, Gpa(at), 2 * G1 + M2, Prot::RW).unwrap();
        s.populate(Gpa(at), 2 * G1 + M2).unwrap();
        assert_eq!(leaf_counts(&s, at, 2 * G1 + M2), [0, 1, 2]);
        // Protect from the last 2 MiB of the first GiB into the middle of
        // the second: the first slot is cut (split), so is the second.
        s.protect(Gpa(at + G1 - M2), M2 + 5 * M2 + 3 * PG, Prot::READ).unwrap();
        // The first GiB is cut at a 2 MiB boundary: 512 2 MiB leaves; the
        // second inside a chunk: 511 and 512 small ones; the tail's one.
        assert_eq!(leaf_counts(&s, at, 2 * G1 + M2), [512, 1024, 0], "{f:?}");
        assert_eq!(s.lookup(Gpa(at + G1 - M2 - PG)).map(|(_, p)| p), Some(Prot::RW));
        assert_eq!(s.lookup(Gpa(at + G1 - M2)).map(|(_, p)| p), Some(Prot::READ));
        assert_eq!(s.lookup(Gpa(at + G1 + 5 * M2 + 2 * PG)).map(|(_, p)| p), Some(Prot::READ));
        assert_eq!(s.lookup(Gpa(at + G1 + 5 * M2 + 3 * PG)).map(|(_, p)| p), Some(Prot::RW));
        check_frames(&s, &o, at, 0, 2 * G1 + M2);
        assert_eq!(s.resident_count(), 2 * (G1 / PG) + 512);
        s.unmap(Gpa(at), G1 - M2).unwrap();
        s.unmap(Gpa(at + G1 - M2), M2 + 5 * M2 + 3 * PG).unwrap();
        s.unmap(Gpa(at + G1 + 5 * M2 + 3 * PG), G1 - 5 * M2 - 3 * PG + M2).unwrap();
        assert_eq!(s.resident_count(), 0);
        assert_eq!(table_pages(&s), base_tables, "{f:?}");

        // unmap_range of a whole slot and the pieces around it: the slot
        // goes as one 1 GiB leaf, the cut one is split.
        s.map(&o, 0, Gpa(at), 2 * G1 + M2, Prot::RW).unwrap();
        s.populate(Gpa(at), 2 * G1 + M2).unwrap();
        s.unmap_range(Gpa(at + G1 - 4 * M2 - PG), 4 * M2 + PG + G1).unwrap();
        // Left: chunks 0..507 of the first GiB as 2 MiB leaves, 511 pages
        // of chunk 507, the tail's 2 MiB leaf.
        assert_eq!(s.resident_count(), 507 * 512 + 511 + 512, "{f:?}");
        assert_eq!(mapped_pages(&s), s.resident_count());
        assert_eq!(leaf_counts(&s, at, 2 * G1 + M2), [511, 507 + 1, 0]);
        check_frames(&s, &o, at, 0, G1 - 5 * M2);
        assert_eq!(s.lookup(Gpa(at + G1 - 4 * M2 - 2 * PG)).map(|(f, _)| f), o.frame_at(G1 - 4 * M2 - 2 * PG));
        assert_eq!(s.lookup(Gpa(at + G1 - 4 * M2 - PG)), None);
        check_frames(&s, &o, at + 2 * G1, 2 * G1, M2);
        for m in s.mappings() {
            s.unmap(m.gpa, m.len).unwrap();
        }
        assert_eq!(table_pages(&s), base_tables, "{f:?}");
    }
}

#[test]
fn an_eager_split_out_of_table_pages_keeps_tracking_off_and_translations() {
    // Room for the tables of the 1 GiB leaf and a hundred more: the eager
    // split (513 pages) runs out part way.
    let s: Space =
        VmSpace::new(SpaceConfig::new(1 << 36, npt()), CountingPages::new(HeapPages::with_capacity(0x100, 104)))
            .unwrap();
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    o.write(200_000 * PG, &9u64.to_le_bytes()).unwrap();
    let r = s.set_dirty_tracking(true);
    assert!(matches!(r, Err(Error::Table(nested_pt::Error::NoMemory))), "{r:?}");
    assert!(!s.dirty_tracking());
    let [small, mid, huge] = leaf_counts(&s, BASE, G1);
    assert_eq!(huge, 0, "the 1 GiB leaf was split");
    assert!(small > 0 && mid > 0 && small + mid * 512 == 262_144, "{small} {mid}");
    assert_eq!(s.resident_count(), G1 / PG);
    assert_eq!(mapped_pages(&s), G1 / PG);
    check_frames(&s, &o, BASE, 0, G1);
    assert_eq!(s.client().hold(Gpa(BASE + 200_000 * PG), Prot::RW).unwrap().read_u64(0).unwrap(), 9);
    s.unmap(Gpa(BASE), G1).unwrap();
    assert_eq!(s.resident_count(), 0);
}

/// A small deterministic generator (the test must be reproducible).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_operations_on_a_1g_leaf_keep_translations_data_and_harvests_exact() {
    use std::collections::{BTreeMap, BTreeSet};
    for seed in 1..=6u64 {
        let mut rng = Lcg(seed);
        let s = space_cfg(npt(), SplitPolicy::Eager);
        let o = huge_ram();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        let c = s.client();
        // The model: each mapped page's protection, the value last
        // written to each page, the pages a harvest must report.
        let mut prot: BTreeMap<u64, Prot> = (0..G1 / PG).map(|p| (p, Prot::RW)).collect();
        let mut data: BTreeMap<u64, u64> = BTreeMap::new();
        let mut dirty: BTreeSet<u64> = BTreeSet::new();
        let mut tracking = false;
        let pages = G1 / PG;
        for step in 0..200 {
            // Ranges stay inside one mapping piece: from a mapped page, up
            // to 40 pages while the same piece goes on.
            let piece = |p: u64, prot: &BTreeMap<u64, Prot>| {
                let m = s.mappings().into_iter().find(|m| m.gpa.0 <= BASE + p * PG && BASE + p * PG < m.gpa.0 + m.len);
                m.map(|m| ((m.gpa.0 - BASE) / PG, (m.gpa.0 + m.len - BASE) / PG)).filter(|_| prot.contains_key(&p))
            };
            if step % 40 == 39 {
                // Start over: a fresh mapping (one 1 GiB slot again while
                // tracking is off).
                for m in s.mappings() {
                    s.unmap(m.gpa, m.len).unwrap();
                }
                assert_eq!(s.resident_count(), 0);
                s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
                prot = (0..G1 / PG).map(|p| (p, Prot::RW)).collect();
                dirty.clear();
                if !tracking {
                    assert_eq!(walk_level(&s, BASE), 3);
                }
            }
            let p = rng.below(pages);
            match rng.below(10) {
                0 | 1 => {
                    // Write through a hold.
                    if prot.get(&p) == Some(&Prot::RW) {
                        let v = step * 1000 + p;
                        c.hold(Gpa(BASE + p * PG), Prot::RW).unwrap().write_u64(0, v).unwrap();
                        data.insert(p, v);
                        if tracking {
                            dirty.insert(p);
                        }
                    }
                }
                2 => {
                    let want = match prot.get(&p) {
                        None => Err(Error::NoMapping),
                        Some(&pr) if !pr.contains(Prot::WRITE) => Err(Error::Protection),
                        Some(_) => Ok(()),
                    };
                    assert_eq!(c.fault(Gpa(BASE + p * PG), Prot::WRITE), want, "seed {seed} step {step}");
                }
                3 => {
                    if let Some((_, hi)) = piece(p, &prot) {
                        let n = 1 + rng.below(40).min(hi - p - 1);
                        s.populate(Gpa(BASE + p * PG), n * PG).unwrap();
                    }
                }
                4 => {
                    if let Some((_, hi)) = piece(p, &prot) {
                        let n = 1 + rng.below(40).min(hi - p - 1);
                        s.unmap_range(Gpa(BASE + p * PG), n * PG).unwrap();
                        for q in p..p + n {
                            prot.remove(&q);
                            dirty.remove(&q);
                        }
                    }
                }
                5 | 6 => {
                    if let Some((_, hi)) = piece(p, &prot) {
                        let n = 1 + rng.below(3000).min(hi - p - 1);
                        let new = if rng.below(2) == 0 { Prot::READ } else { Prot::RW };
                        let r = s.protect(Gpa(BASE + p * PG), n * PG, new);
                        assert_eq!(r, Ok(()), "seed {seed} step {step}");
                        for q in p..p + n {
                            prot.insert(q, new);
                        }
                    }
                }
                7 => {
                    if tracking {
                        let got: BTreeSet<u64> = harvest(&s).into_iter().collect();
                        assert_eq!(got, dirty, "seed {seed} step {step}: harvest before switching off");
                        dirty.clear();
                        s.set_dirty_tracking(false).unwrap();
                    } else {
                        let lazy = rng.below(2) == 0;
                        s.set_split_policy(if lazy { SplitPolicy::Lazy } else { SplitPolicy::Eager });
                        s.set_dirty_tracking(true).unwrap();
                    }
                    tracking = !tracking;
                }
                8 => {
                    if !tracking {
                        s.promote(Gpa(BASE), G1).unwrap();
                    }
                }
                _ => {
                    if tracking {
                        let got: BTreeSet<u64> = harvest(&s).into_iter().collect();
                        assert_eq!(got, dirty, "seed {seed} step {step}");
                        dirty.clear();
                    }
                }
            }
            if step % 10 == 9 {
                assert_eq!(mapped_pages(&s), s.resident_count(), "seed {seed} step {step}");
                for _ in 0..64 {
                    let q = rng.below(pages);
                    let seen = s.lookup(Gpa(BASE + q * PG));
                    match prot.get(&q) {
                        None => assert_eq!(seen, None, "seed {seed} step {step} page {q}"),
                        Some(&pr) => {
                            if let Some((f, sp)) = seen {
                                // A large leaf the lazy split write-protected
                                // stays so until a write splits it.
                                let large =
                                    s.with_table(|t| t.lookup(Gpa(BASE + q * PG)).unwrap().size) != PageSize::Size4K;
                                let sp = if large && sp == Prot::READ && pr == Prot::RW { pr } else { sp };
                                assert_eq!((f, sp), (o.frame_at(q * PG).unwrap(), pr), "seed {seed} page {q}");
                            }
                        }
                    }
                }
            }
        }
        for (p, v) in &data {
            assert_eq!(read_u64(&o, p * PG), *v, "seed {seed} page {p}");
        }
        for m in s.mappings() {
            s.unmap(m.gpa, m.len).unwrap();
        }
        assert_eq!(s.resident_count(), 0);
    }
}

/// Automatic promotion inside a 1 GiB slot populated for smaller leaves
/// (mapped while tracking was on): faults that fill one 2 MiB chunk's
/// leaf table after tracking goes off promote it to a 2 MiB leaf (not to
/// 1 GiB), the other chunks keep their small leaves, and data written
/// before and after reads back through the object.
#[test]
fn automatic_promotion_inside_a_1g_slot_gives_2m_leaves() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        s.set_dirty_tracking(true).unwrap();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        let c = s.client();
        let chunk = BASE + 3 * M2;
        // While tracking is on, faults map small leaves: half the chunk.
        for p in 0..256 {
            c.hold(Gpa(chunk + p * PG), Prot::RW).unwrap().write_u64(0, 0xb000 + p).unwrap();
        }
        assert_eq!(leaf_counts(&s, chunk, M2), [256, 0, 0], "{f:?}");
        let before = s.promotions();
        s.set_dirty_tracking(false).unwrap();
        for p in 256..512 {
            c.fault(Gpa(chunk + p * PG), Prot::READ | Prot::WRITE).unwrap();
        }
        assert_eq!(leaf_counts(&s, chunk, M2), [0, 1, 0], "{f:?}: the full table was not promoted");
        assert_eq!(s.promotions().automatic, before.automatic + 1, "{f:?}");
        assert_eq!(walk_level(&s, chunk + 9 * PG), 2, "{f:?}");
        assert_eq!(hw(&s, chunk + 300 * PG, Access::Write), Some(PageSize::Size2M), "{f:?}");
        // The rest of the slot is untouched: no leaves, no 1 GiB leaf.
        assert_eq!(leaf_counts(&s, BASE, G1), [0, 1, 0], "{f:?}");
        for p in [0u64, 100, 255] {
            let h = c.hold(Gpa(chunk + p * PG), Prot::RW).unwrap();
            assert_eq!(h.read_u64(0).unwrap(), 0xb000 + p, "{f:?}");
            h.write_u64(8, p).unwrap();
        }
        assert_eq!(read_u64(&o, 3 * M2 + 100 * PG + 8), 100);
        assert_eq!(s.resident_count(), 512);
        check_frames(&s, &o, chunk, 3 * M2, M2);
        drop(c);
        s.unmap(Gpa(BASE), G1).unwrap();
        assert_eq!(s.resident_count(), 0);
    }
}

/// Automatic promotion to 1 GiB: a slot mapped while tracking was on
/// (populated for 4 KiB leaves) whose pages the guest then touches with
/// tracking off goes 4 KiB -> 2 MiB chunk by chunk as each leaf table
/// fills, and the chunk that completes the slot makes it one 1 GiB leaf;
/// translations, data and `resident_count` stay exact.
#[test]
fn automatic_promotion_completes_a_1g_slot() {
    for f in [npt(), PteFormat::ept(Caps::default())] {
        let s = space_cfg(f, SplitPolicy::Eager);
        let o = huge_ram();
        s.set_dirty_tracking(true).unwrap();
        s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
        let c = s.client();
        c.hold(Gpa(BASE + 5 * PG), Prot::RW).unwrap().write_u64(0, 0x5eed).unwrap();
        s.set_dirty_tracking(false).unwrap();
        let tables = table_pages(&s);
        let mut p = 0;
        while p < G1 / PG {
            c.fault(Gpa(BASE + p * PG), Prot::READ | Prot::WRITE).unwrap();
            // The fault maps a window of pages: go to the next unmapped.
            p += 1;
            while p < G1 / PG && s.lookup(Gpa(BASE + p * PG)).is_some() {
                p += 1;
            }
        }
        assert_eq!(leaf_counts(&s, BASE, G1), [0, 0, 1], "{f:?}");
        assert_eq!(s.promotions().automatic, 512, "{f:?}");
        assert_eq!(s.promotions_1g(), PromotionStats { explicit: 0, automatic: 1 }, "{f:?}");
        assert!(table_pages(&s) < tables, "{f:?}: the level-2 table freed");
        assert_eq!(hw(&s, BASE + 999 * PG, Access::Write), Some(PageSize::Size1G), "{f:?}");
        assert_eq!(s.resident_count(), G1 / PG);
        check_frames(&s, &o, BASE, 0, G1);
        assert_eq!(c.hold(Gpa(BASE + 5 * PG), Prot::READ).unwrap().read_u64(0).unwrap(), 0x5eed);
        s.unmap(Gpa(BASE), G1).unwrap();
        assert_eq!(s.resident_count(), 0);
    }
}

/// No 1 GiB promotion where the slot does not qualify: 1 GiB leaves off,
/// an object offset that is not 1 GiB aligned, a slot that a mapping
/// boundary cuts, or one 2 MiB chunk with another protection.
#[test]
fn no_1g_promotion_where_the_slot_does_not_qualify() {
    // 1 GiB leaves off: 2 MiB leaves only.
    let mut cfg = SpaceConfig::new(1 << 36, npt());
    cfg.huge_leaves = false;
    let s: Space = VmSpace::new(cfg, pages()).unwrap();
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    assert_eq!(s.promote(Gpa(BASE), G1).unwrap(), 0);
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
    assert_eq!(s.promotions_1g(), PromotionStats::default());
    // One chunk read-only: the 2 MiB leaves differ, no 1 GiB leaf.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    s.protect(Gpa(BASE + 7 * M2), M2, Prot::READ).unwrap();
    s.promote(Gpa(BASE), G1).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
    assert_eq!(s.promotions_1g(), PromotionStats::default());
    // Protection restored: a promote range that covers only part of the
    // slot leaves it be; the whole slot's pass makes the 1 GiB leaf again.
    s.protect(Gpa(BASE + 7 * M2), M2, Prot::RW).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
    s.promote(Gpa(BASE), G1 - M2).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
    s.promote(Gpa(BASE), G1).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 0, 1]);
    assert_eq!(s.promotions_1g(), PromotionStats { explicit: 1, automatic: 0 });
    // An object offset that is not 1 GiB aligned (2 MiB runs only).
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = ram_at(2 * G1, FRAMES);
    s.map(&o, M2, Gpa(BASE), G1, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1).unwrap();
    s.promote(Gpa(BASE), G1).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
    // Two mappings meeting inside the slot.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let o = huge_ram();
    s.map(&o, 0, Gpa(BASE), G1 / 2, Prot::RW).unwrap();
    s.map(&o, G1 / 2, Gpa(BASE + G1 / 2), G1 / 2, Prot::RW).unwrap();
    s.populate(Gpa(BASE), G1 / 2).unwrap();
    s.populate(Gpa(BASE + G1 / 2), G1 / 2).unwrap();
    s.promote(Gpa(BASE), G1).unwrap();
    assert_eq!(leaf_counts(&s, BASE, G1), [0, 512, 0]);
}

/// With the lazy split, switching tracking off gives the large leaves no
/// write split back their mapping's protection: a write then goes
/// through the 1 GiB / 2 MiB leaf without a fault or a split, and the
/// leaves written and split while tracking was on stay 4 KiB leaves.
#[test]
fn tracking_off_gives_lazily_write_protected_leaves_their_protection_back() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Lazy);
        let o = ram_at(2 * G1, FRAMES);
        s.map(&o, 0, Gpa(BASE), G1 + 4 * M2, Prot::RW).unwrap();
        // A read-only mapping beside it keeps its protection.
        s.map(&o, G1 + 4 * M2, Gpa(BASE + G1 + 4 * M2), 2 * M2, Prot::READ).unwrap();
        s.populate(Gpa(BASE), G1 + 4 * M2).unwrap();
        s.populate(Gpa(BASE + G1 + 4 * M2), 2 * M2).unwrap();
        assert_eq!(leaf_counts(&s, BASE, G1 + 6 * M2), [0, 6, 1], "{f:?}");
        s.set_dirty_tracking(true).unwrap();
        let c = s.client();
        // One write splits the 2 MiB leaf at G1 + 2 MiB (only).
        c.hold(Gpa(BASE + G1 + M2 + 5 * PG), Prot::RW).unwrap().write_u64(0, 7).unwrap();
        if !emulated(&f) {
            assert_eq!(hw(&s, BASE + 9 * PG, Access::Write), None, "{f:?}: write-protected while tracking");
        }
        s.set_dirty_tracking(false).unwrap();
        // (The read-only mapping's leaves were split when tracking went
        // on: nothing to write-protect there.)
        assert_eq!(leaf_counts(&s, BASE, G1 + 6 * M2), [3 * 512, 3, 1], "{f:?}");
        let prot = |g: u64| s.with_table(|t| t.lookup(Gpa(g)).map(|l| t.format().prot(l.value)));
        for g in [BASE + 9 * PG, BASE + G1 + 3 * PG, BASE + G1 + 3 * M2] {
            assert!(prot(g).unwrap().contains(Prot::RW), "{f:?} {g:#x}: {:?}", prot(g));
        }
        assert_eq!(prot(BASE + G1 + 5 * M2), Some(Prot::READ), "{f:?}: the read-only mapping");
        if !emulated(&f) {
            assert_eq!(hw(&s, BASE + 9 * PG, Access::Write), Some(PageSize::Size1G), "{f:?}");
            assert_eq!(hw(&s, BASE + G1 + 3 * M2, Access::Write), Some(PageSize::Size2M), "{f:?}");
        }
        c.fault(Gpa(BASE + G1 + 7 * PG), Prot::WRITE).unwrap();
        assert_eq!(leaf_counts(&s, BASE, G1 + 6 * M2), [3 * 512, 3, 1], "{f:?}: no split after tracking");
        assert_eq!(c.hold(Gpa(BASE + G1 + M2 + 5 * PG), Prot::READ).unwrap().read_u64(0).unwrap(), 7);
        check_frames(&s, &o, BASE, 0, G1 + 4 * M2);
    }
}
