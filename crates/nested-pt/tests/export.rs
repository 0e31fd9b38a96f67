//! The export API: table pages listed, raw entries by address and level,
//! a copy into another provider, and the run-reporting dirty harvest, on
//! real tables of all three formats.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use nested_pt::mmu::translate;
use nested_pt::{
    Access, Caps, CountingPages, Error, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat,
    TablePages,
};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

fn formats() -> [PteFormat; 3] {
    let caps = Caps::default();
    [PteFormat::ept(caps), PteFormat::ept_emulated_ad(caps), PteFormat::npt(caps)]
}

/// A table with 4 KiB pages in two distant places, a 2 MiB leaf and a
/// 1 GiB leaf.
fn sample<P: TablePages>(fmt: PteFormat, pages: P) -> NestedTable<P> {
    let mut t = NestedTable::new(fmt, pages).unwrap();
    t.populate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
    t.populate_region(Gpa(4 * M2), M2, PageSize::Size2M).unwrap();
    t.populate_region(Gpa(G1), G1, PageSize::Size1G).unwrap();
    t.populate_region(Gpa(1 << 40), M2, PageSize::Size4K).unwrap();
    for i in 0..600u64 {
        t.map(Gpa(i * K4), Pfn(0x10_0000 + i), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    }
    t.map(Gpa(4 * M2), Pfn(0x20_0000), PageSize::Size2M, Prot::RWX, MemType::WriteBack).unwrap();
    t.map(Gpa(G1), Pfn(0x40_0000), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
    t.map(Gpa((1 << 40) + 5 * K4), Pfn(0x12345), PageSize::Size4K, Prot::READ, MemType::Uncacheable).unwrap();
    t
}

/// A provider shared with the test, so that its counts can be read after
/// the table that owned it is gone.
#[derive(Clone)]
struct Shared(Arc<Mutex<CountingPages<HeapPages>>>);

// SAFETY: forwards to the inner provider under a lock; the pointers it
// returns address the inner arena, which lives as long as the `Arc`.
unsafe impl TablePages for Shared {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        self.0.lock().unwrap().alloc_zeroed()
    }
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        self.0.lock().unwrap().ptr(pfn)
    }
    unsafe fn free(&mut self, pfn: Pfn) {
        // SAFETY: the caller's promise is passed on.
        unsafe { self.0.lock().unwrap().free(pfn) }
    }
}

#[test]
fn table_pages_iter_lists_every_page_once() {
    for fmt in formats() {
        let t = sample(fmt, CountingPages::new(HeapPages::new()));
        let list: Vec<_> = t.table_pages_iter().collect();
        assert_eq!(list.len(), t.table_pages());
        assert_eq!((list[0].pfn, list[0].level, list[0].gpa), (t.root(), 4, Gpa(0)));
        // Exactly the provider's live pages.
        let listed: BTreeSet<u64> = list.iter().map(|p| p.pfn.0).collect();
        assert_eq!(listed.len(), list.len(), "no page twice");
        assert_eq!(listed.len(), t.pages().live());
        assert!(listed.iter().all(|&p| t.pages().is_live(Pfn(p))));
        // Each page is the table the hardware walk meets at its level for
        // its first address, and the order is by address within a level's
        // parent (pre-order).
        for p in &list[1..] {
            let w = t.walk(p.gpa);
            let step = w.steps().iter().find(|s| s.level == p.level).expect("walk reaches the level");
            assert_eq!(step.table, p.pfn, "{p:?}");
        }
        let levels: Vec<u8> = list.iter().map(|p| p.level).collect();
        // 0..8 MiB (four leaf tables under one PD) and the 2 MiB leaf's PD
        // are under PDPT 0; the 1 GiB leaf sits in PDPT 0 too; 1 TiB has
        // its own PDPT, PD and PT.
        assert_eq!(levels, [4, 3, 2, 1, 1, 1, 1, 3, 2, 1]);
        assert!(list.windows(2).all(|w| w[0].level != w[1].level || w[0].gpa < w[1].gpa));
    }
}

#[test]
fn raw_entries_read_and_write() {
    for fmt in formats() {
        let t = sample(fmt, HeapPages::new());
        // Reads agree with the walk at every level.
        for gpa in [Gpa(3 * K4), Gpa(4 * M2 + 77 * K4), Gpa(G1 + 12345 * K4), Gpa((1 << 40) + 5 * K4)] {
            for s in t.walk(gpa).steps() {
                assert_eq!(t.read_entry(gpa, s.level).unwrap(), s.entry);
                assert!(std::ptr::eq(t.entry_at(gpa, s.level).unwrap(), t.entry(s).unwrap()));
            }
        }
        // A raw leaf is what lookup and the software MMU see.
        let g = Gpa(700 * K4);
        assert!(t.lookup(g).is_none());
        let leaf = fmt.leaf_entry(Pfn(0x5_5555), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
        assert_eq!(t.write_entry(g, 1, leaf), Ok(0));
        assert_eq!(t.lookup(g).unwrap().value(), leaf);
        if !fmt.hw_ad() {
            // The emulated format's first access faults to software.
            t.record_access(g, Access::Read).unwrap();
        }
        let tr = translate(t.pages(), &fmt, t.root(), Gpa(g.0 + 8), Access::Read, false).unwrap();
        assert_eq!(tr.hpa, 0x5555_5000 + 8);
        assert!(translate(t.pages(), &fmt, t.root(), g, Access::Write, false).is_err());
        // Clearing returns the old value (with the accessed state the
        // access recorded, for the emulated format).
        let now = t.read_entry(g, 1).unwrap();
        assert_eq!(now & !fmt.accessed_mask(), leaf & !fmt.accessed_mask());
        assert_eq!(t.write_entry(g, 1, 0), Ok(now));
        assert!(t.lookup(g).is_none());
        // A large leaf written where a 2 MiB range is populated.
        let big = fmt.leaf_entry(Pfn(0x30_0000), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
        let old = t.write_entry(Gpa(4 * M2), 2, 0).unwrap();
        assert!(fmt.is_present(old));
        assert_eq!(t.write_entry(Gpa(4 * M2), 2, big), Ok(0));
        assert_eq!(t.lookup(Gpa(4 * M2 + 5)).unwrap().size, PageSize::Size2M);
        assert_eq!(t.is_mapped(Gpa(4 * M2 + 3 * K4)).unwrap().0, Pfn(0x30_0003));
    }
}

#[test]
fn raw_entry_refusals_change_nothing() {
    let fmt = PteFormat::ept(Caps { page_1g: false, ..Caps::default() });
    let mut t = NestedTable::new(fmt, CountingPages::new(HeapPages::new())).unwrap();
    t.populate_region(Gpa(0), M2, PageSize::Size4K).unwrap();
    t.populate_region(Gpa(M2), M2, PageSize::Size2M).unwrap();
    t.map(Gpa(M2), Pfn(0x400), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    let leaf = fmt.leaf_entry(Pfn(9), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    let before: Vec<u64> = t.leaves(Gpa(0), 1 << 40).map(|l| l.value()).collect();
    // Bad levels and addresses.
    for level in [0, 5, 200] {
        assert_eq!(t.read_entry(Gpa(0), level), Err(Error::OutOfRange));
        assert_eq!(t.write_entry(Gpa(0), level, 0), Err(Error::OutOfRange));
    }
    assert_eq!(t.read_entry(Gpa(1 << 48), 4), Err(Error::OutOfRange));
    assert_eq!(t.read_entry(Gpa(u64::MAX), 1), Err(Error::OutOfRange));
    // No table there.
    assert_eq!(t.read_entry(Gpa(1 << 39), 1), Err(Error::NotPopulated));
    assert_eq!(t.write_entry(Gpa(4 * M2), 1, leaf), Err(Error::NotPopulated));
    // Below a large leaf.
    assert_eq!(t.read_entry(Gpa(M2 + K4), 1), Err(Error::AlreadyMapped { same_frame: false }));
    // A table hangs from the entry.
    assert_eq!(t.write_entry(Gpa(0), 2, 0), Err(Error::AlreadyMapped { same_frame: false }));
    assert_eq!(t.write_entry(Gpa(0), 4, 0), Err(Error::AlreadyMapped { same_frame: false }));
    // A table pointer, a leaf at level 4, a 1 GiB leaf the format lacks.
    let ptr = fmt.table_entry(Pfn(0x100)).unwrap();
    assert_eq!(t.write_entry(Gpa(M2), 2, ptr), Err(Error::UnsupportedSize));
    assert_eq!(t.write_entry(Gpa(1 << 40), 4, leaf), Err(Error::UnsupportedSize));
    assert_eq!(t.write_entry(Gpa(G1 * 3), 3, leaf | (1 << 7)), Err(Error::UnsupportedSize));
    let after: Vec<u64> = t.leaves(Gpa(0), 1 << 40).map(|l| l.value()).collect();
    assert_eq!(before, after);
    assert_eq!(t.pages().live(), t.table_pages());
}

/// A leaf as (address, size, value).
type LeafRow = (Gpa, PageSize, u64);

/// Every leaf of `a` and `b`.
fn leaves<P: TablePages, Q: TablePages>(a: &NestedTable<P>, b: &NestedTable<Q>) -> (Vec<LeafRow>, Vec<LeafRow>) {
    let f = |l: nested_pt::Leaf<'_>| (l.gpa, l.size, l.value());
    (a.leaves(Gpa(0), 1 << 48).map(f).collect(), b.leaves(Gpa(0), 1 << 48).map(f).collect())
}

#[test]
fn copy_into_another_provider() {
    for fmt in formats() {
        let t = sample(fmt, HeapPages::with_capacity(0x100, 64));
        t.record_access(Gpa(7 * K4), Access::Write).unwrap();
        t.record_access(Gpa(G1 + 5), Access::Write).unwrap();
        // Frames numbered elsewhere, so that no frame number is shared.
        let c = t.copy_into(CountingPages::new(HeapPages::with_capacity(0x8000, 64))).unwrap();
        assert_eq!(c.table_pages(), t.table_pages());
        assert_eq!(c.pages().live(), t.table_pages());
        let (a, b) = leaves(&t, &c);
        assert_eq!(a, b, "every leaf copied bit for bit");
        assert_eq!(a.len(), 603);
        // Same shape, own pages, in the same order.
        for (p, q) in t.table_pages_iter().zip(c.table_pages_iter()) {
            assert_eq!((p.level, p.gpa), (q.level, q.gpa));
            assert!(q.pfn.0 >= 0x8000 && p.pfn.0 < 0x8000);
            assert!(c.pages().is_live(q.pfn));
        }
        // The hardware walk of the copy stays in the copy's pages and gives
        // the same translations.
        for (gpa, acc) in [(3 * K4 + 1, Access::Write), (4 * M2 + 9 * K4, Access::Execute), (G1 + 77, Access::Read)] {
            if !fmt.hw_ad() {
                // The emulated format's first access faults to software.
                t.record_access(Gpa(gpa), acc).unwrap();
                c.record_access(Gpa(gpa), acc).unwrap();
            }
            let x = translate(t.pages(), &fmt, t.root(), Gpa(gpa), acc, false).unwrap();
            let y = translate(c.pages(), &fmt, c.root(), Gpa(gpa), acc, false).unwrap();
            assert_eq!((x.hpa, x.size, x.prot), (y.hpa, y.size, y.prot));
        }
        assert!(c.lookup(Gpa(7 * K4)).unwrap().dirty());
        // The counts came along: the copy unmaps and vacates on its own,
        // freeing its pages, and the original is untouched.
        let mut c = c;
        c.unmap_vacate_region(Gpa(0), 4 * M2, PageSize::Size4K).unwrap();
        c.unmap_vacate_region(Gpa(4 * M2), M2, PageSize::Size2M).unwrap();
        c.unmap_vacate_region(Gpa(G1), G1, PageSize::Size1G).unwrap();
        c.unmap_vacate_region(Gpa(1 << 40), M2, PageSize::Size4K).unwrap();
        assert_eq!(c.table_pages(), 1);
        assert_eq!(c.pages().live(), 1);
        assert!(c.pages().errors().is_empty());
        assert_eq!(t.leaves(Gpa(0), 1 << 48).count(), 603);
        assert_eq!(c.vacate_region(Gpa(0), M2, PageSize::Size4K), Err(Error::NotPopulated));
    }
}

#[test]
fn copy_into_failure_returns_every_page() {
    let t = sample(PteFormat::ept(Caps::default()), HeapPages::new());
    for n in 0..t.table_pages() as u64 {
        let shared = Shared(Arc::new(Mutex::new(CountingPages::new(HeapPages::with_capacity(0x9000, 64)))));
        shared.0.lock().unwrap().fail_after(Some(n));
        assert_eq!(t.copy_into(shared.clone()).err(), Some(Error::NoMemory), "after {n} pages");
        let inner = shared.0.lock().unwrap();
        assert_eq!(inner.live(), 0, "after {n} pages");
        assert_eq!(inner.allocs(), n);
        assert!(inner.errors().is_empty());
    }
    // Frames past the format's width (46-bit addresses: frames below 2^34).
    let far = HeapPages::with_capacity(1 << 34, 64);
    assert_eq!(t.copy_into(far).err(), Some(Error::OutOfRange));
    let shared = Shared(Arc::new(Mutex::new(CountingPages::new(HeapPages::with_capacity(0x9000, 64)))));
    let c = t.copy_into(shared.clone()).unwrap();
    drop(c);
    assert_eq!(shared.0.lock().unwrap().live(), 0);
}

#[test]
fn harvest_dirty_runs_reports_ranges() {
    for fmt in formats() {
        let t = sample(fmt, HeapPages::new());
        // 4 KiB pages 10..20 and 598, 599; the 2 MiB leaf; the 1 GiB leaf.
        for p in (10..20).chain([598, 599]) {
            t.record_access(Gpa(p * K4), Access::Write).unwrap();
        }
        t.record_access(Gpa(4 * M2 + 3), Access::Write).unwrap();
        t.record_access(Gpa(G1 + 3 * M2), Access::Write).unwrap();
        let mut runs = Vec::new();
        let n = t.harvest_dirty_runs(Gpa(0), 2 * G1, false, |g, len| runs.push((g, len))).unwrap();
        assert_eq!(runs, [(Gpa(10 * K4), 10 * K4), (Gpa(598 * K4), 2 * K4), (Gpa(4 * M2), M2), (Gpa(G1), G1)]);
        assert_eq!(n, 12 + 512 + (G1 >> 12));
        // The same pages as the bitmap harvest (without clearing), over
        // the 4 KiB part.
        let mut bitmap = vec![0u64; 8 * 512 / 64];
        assert_eq!(t.scan_dirty(Gpa(0), 4 * M2, &mut bitmap, false), Ok(12));
        let mut from_runs = vec![0u64; bitmap.len()];
        t.harvest_dirty_runs(Gpa(0), 4 * M2, false, |g, len| {
            for p in g.0 / K4..(g.0 + len) / K4 {
                from_runs[(p / 64) as usize] |= 1 << (p % 64);
            }
        })
        .unwrap();
        assert_eq!(from_runs, bitmap);
        // Clearing: reported once, then gone; a new write is seen again.
        let mut runs = Vec::new();
        assert_eq!(t.harvest_dirty_runs(Gpa(0), 2 * G1, true, |g, l| runs.push((g, l))).unwrap(), n);
        assert_eq!(runs.len(), 4);
        assert_eq!(t.harvest_dirty_runs(Gpa(0), 2 * G1, true, |_, _| panic!("nothing left")), Ok(0));
        assert!(!t.lookup(Gpa(G1)).unwrap().dirty());
        t.record_access(Gpa(20 * K4), Access::Write).unwrap();
        t.record_access(Gpa(21 * K4), Access::Write).unwrap();
        let mut runs = Vec::new();
        t.harvest_dirty_runs(Gpa(0), 2 * G1, true, |g, l| runs.push((g, l))).unwrap();
        assert_eq!(runs, [(Gpa(20 * K4), 2 * K4)]);
        // Adjacent 4 KiB and large dirty pages merge into one run.
        t.map(Gpa(4 * M2 - K4), Pfn(0x7777), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
        t.record_access(Gpa(4 * M2 - K4), Access::Write).unwrap();
        t.record_access(Gpa(4 * M2), Access::Write).unwrap();
        let mut runs = Vec::new();
        t.harvest_dirty_runs(Gpa(0), 2 * G1, true, |g, l| runs.push((g, l))).unwrap();
        assert_eq!(runs, [(Gpa(4 * M2 - K4), K4 + M2)]);
    }
}

#[test]
fn harvest_dirty_runs_refusals() {
    let t = sample(PteFormat::ept(Caps::default()), HeapPages::new());
    t.record_access(Gpa(4 * M2), Access::Write).unwrap();
    let never = |_: Gpa, _: u64| panic!("refused calls report nothing");
    assert_eq!(t.harvest_dirty_runs(Gpa(4 * M2 + K4), K4, true, never), Err(Error::WouldSplit));
    assert_eq!(t.harvest_dirty_runs(Gpa(3 * M2), M2 + K4, true, never), Err(Error::WouldSplit));
    assert_eq!(t.harvest_dirty_runs(Gpa(1), K4, true, never), Err(Error::Unaligned));
    assert_eq!(t.harvest_dirty_runs(Gpa(0), 0, true, never), Err(Error::ZeroLength));
    assert_eq!(t.harvest_dirty_runs(Gpa(!0xfff), 2 * K4, true, never), Err(Error::Overflow));
    assert_eq!(t.harvest_dirty_runs(Gpa(1 << 48), K4, true, never), Err(Error::OutOfRange));
    assert!(t.lookup(Gpa(4 * M2)).unwrap().dirty(), "still dirty");
}

/// Hostile arguments to every export call: no panic, typed refusals, and
/// a table that stays usable (raw garbage leaves included: they are
/// walked, copied, harvested and dropped like any leaf).
#[test]
fn hostile_arguments() {
    let addrs = [0, K4 - 1, M2, G1, (1 << 47) - K4, (1 << 48) - 1, 1 << 48, u64::MAX - K4 + 1, u64::MAX];
    let values = [0, 1, 0x87, u64::MAX, 0x8000_0000_0000_0007, 0x000f_ffff_ffff_f007];
    for fmt in formats() {
        let t = sample(fmt, CountingPages::new(HeapPages::new()));
        let pages_before = t.table_pages();
        for &a in &addrs {
            for level in 0..=6u8 {
                let _ = t.read_entry(Gpa(a), level);
                let _ = t.entry_at(Gpa(a), level);
                for &v in &values {
                    if let Ok(old) = t.write_entry(Gpa(a), level, v) {
                        // Whatever was written reads back, and walks over
                        // it do not panic.
                        assert_eq!(t.read_entry(Gpa(a), level), Ok(v));
                        let _ = t.lookup(Gpa(a));
                        let _ = t.is_mapped(Gpa(a));
                        let _ = translate(t.pages(), &fmt, t.root(), Gpa(a), Access::Write, true);
                        if v == u64::MAX {
                            t.write_entry(Gpa(a), level, old).unwrap();
                        }
                    }
                }
            }
            for len in [0, K4, M2, u64::MAX, u64::MAX - a] {
                let _ = t.harvest_dirty_runs(Gpa(a), len, true, |g, l| {
                    assert!(l > 0 && g.0.checked_add(l).is_some());
                });
            }
        }
        assert_eq!(t.table_pages(), pages_before, "raw writes never add or drop tables");
        let _ = t.harvest_dirty_runs(Gpa(0), 1 << 47, true, |_, _| {});
        let c = t.copy_into(CountingPages::new(HeapPages::with_capacity(0x9000, 64))).unwrap();
        let (a, b) = leaves(&t, &c);
        assert_eq!(a, b);
        assert_eq!(c.table_pages_iter().count(), t.table_pages());
        drop(c);
        assert!(t.pages().errors().is_empty());
    }
}
