//! Transparent 2 MiB leaves: the reservoir's aligned runs mapped with one
//! leaf by `populate` and by faults and holds, exact `resident_count`,
//! holds inside a large leaf, and the split when dirty tracking is
//! switched on (eager and lazy), with harvests exact afterwards.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use nested_pt::{Access, Caps, Gpa, PageSize, mmu};
use vmspace::*;

const M2: u64 = 2 << 20;

/// Sets its flag when dropped. The concurrent tests' main thread holds
/// one for the workers' stop flag: a failed assertion there unwinds
/// through it and stops the workers, so the scope (which joins them
/// before the panic propagates) ends and the test fails instead of
/// waiting forever for workers that never see the flag.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// 4 KiB pages the present leaves map (a 2 MiB leaf: 512).
fn mapped_pages(s: &Space) -> u64 {
    s.with_table(|t| t.leaves(Gpa(0), s.size()).map(|l| l.size.pages()).sum())
}

/// The sizes of the present leaves, in address order.
fn leaf_sizes(s: &Space, gpa: u64, len: u64) -> Vec<PageSize> {
    s.with_table(|t| t.leaves(Gpa(gpa), len).map(|l| l.size).collect())
}

/// A vCPU's write as the hardware does it: the walk sets accessed/dirty
/// (NPT always, EPT with A/D on). Emulated A/D records it in the fault
/// path instead, so it is not used with that format.
fn hw_write(s: &Space, gpa: u64) -> bool {
    // SAFETY: a hardware walk only sets accessed/dirty bits.
    unsafe {
        s.with_table_raw(|t| mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(gpa), Access::Write, true).is_ok())
    }
}

fn space_cfg(format: PteFormat, split: SplitPolicy) -> Space {
    let mut cfg = SpaceConfig::new(1 << 32, format);
    cfg.split = split;
    cfg.fault_around = 16;
    VmSpace::new(cfg, pages()).unwrap()
}

/// Every page of the range translates to its object frame.
fn check_frames(s: &Space, o: &VmObject, gpa: u64, off: u64, pages: u64) {
    for p in 0..pages {
        let g = gpa + p * PG;
        assert_eq!(s.lookup(Gpa(g)).map(|(f, _)| f), o.frame_at(off + p * PG), "page {g:#x}");
    }
}

#[test]
fn populate_and_faults_map_large_leaves() {
    for f in formats() {
        let s = space_cfg(f, SplitPolicy::Eager);
        let r = reservoir(8192);
        let o = ram(&r, 4 * 512 + 16);
        for k in 0..4 {
            assert!(o.run_at(k * M2).is_some(), "{f:?}: the reservoir handed out runs");
        }
        s.map(&o, 0, Gpa(0x4000_0000), 4 * M2 + 16 * PG, Prot::RW).unwrap();
        let tables = table_pages(&s);
        // populate: one 2 MiB leaf per run, even for part of one.
        assert_eq!(s.populate(Gpa(0x4000_0000 + 5 * PG), PG).unwrap(), 512, "{f:?}");
        assert_eq!(s.resident_count(), 512);
        assert_eq!(leaf_sizes(&s, 0x4000_0000, M2), vec![PageSize::Size2M]);
        // A fault anywhere in the second run maps it with one leaf.
        let c = s.client();
        c.fault(Gpa(0x4000_0000 + M2 + 77 * PG + 3), Prot::READ).unwrap();
        assert_eq!(s.resident_count(), 1024, "{f:?}");
        // A hold in the third: the host pointer is the frame + offset.
        let h = c.hold(Gpa(0x4000_0000 + 2 * M2 + 300 * PG), Prot::RW).unwrap();
        assert_eq!(Some(h.pfn()), o.frame_at(2 * M2 + 300 * PG));
        h.write_u64(8, 0xdead_beef).unwrap();
        drop(h);
        let mut b = [0u8; 8];
        o.read(2 * M2 + 300 * PG + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xdead_beef);
        // The rest: the fourth run and the 4 KiB tail.
        assert_eq!(s.populate(Gpa(0x4000_0000), 4 * M2 + 16 * PG).unwrap(), 512 + 16);
        assert_eq!(s.resident_count(), 4 * 512 + 16);
        assert_eq!(mapped_pages(&s), s.resident_count(), "{f:?}: resident_count exact");
        assert_eq!(leaf_sizes(&s, 0x4000_0000, 4 * M2), vec![PageSize::Size2M; 4]);
        assert_eq!(table_pages(&s), tables, "no leaf table for the runs");
        check_frames(&s, &o, 0x4000_0000, 0, 4 * 512 + 16);
        assert_eq!(s.lookup(Gpa(0x4000_0000 + 3 * M2)).unwrap().1, Prot::RW);
        s.unmap(Gpa(0x4000_0000), 4 * M2 + 16 * PG).unwrap();
        assert_eq!(s.resident_count(), 0);
        assert_eq!(table_pages(&s), 1, "{f:?}: every table vacated");
    }
}

#[test]
fn no_large_leaf_where_the_range_is_not_one_aligned_run() {
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let r = reservoir(8192);
    let o = ram(&r, 3 * 512);
    // Object offset not 2 MiB aligned against the guest address.
    s.map(&o, PG, Gpa(0), 2 * M2, Prot::RW).unwrap();
    // The same object at an aligned offset, but the space's address is not.
    s.map(&o, 0, Gpa(0x1000_0000 + PG), M2, Prot::RW).unwrap();
    s.populate(Gpa(0), 2 * M2).unwrap();
    s.populate(Gpa(0x1000_0000 + PG), M2).unwrap();
    assert!(leaf_sizes(&s, 0, 1 << 30).iter().all(|&z| z == PageSize::Size4K));
    assert_eq!(s.resident_count(), 3 * 512);
    // Large leaves off by configuration.
    let mut cfg = SpaceConfig::new(1 << 32, npt());
    cfg.large_leaves = false;
    let s: Space = VmSpace::new(cfg, pages()).unwrap();
    s.map(&o, 0, Gpa(0), M2, Prot::RW).unwrap();
    s.populate(Gpa(0), M2).unwrap();
    assert_eq!(leaf_sizes(&s, 0, M2), vec![PageSize::Size4K; 512]);
    // Fragmented frames (no aligned room): 4 KiB leaves.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let r = Arc::new(HeapReservoir::new(900 * PG, Pfn(0x10_0001)).unwrap());
    let o = VmObject::ram(r, 512 * PG).unwrap();
    assert!(o.run_at(0).is_none());
    s.map(&o, 0, Gpa(0), M2, Prot::RW).unwrap();
    s.client().fault(Gpa(0), Prot::WRITE).unwrap();
    assert_eq!(s.resident_count(), 16, "fault-around of 4 KiB leaves");
}

/// A space with `runs` large leaves at 1 GiB, populated, and the object.
fn large_space(f: PteFormat, split: SplitPolicy, runs: u64) -> (Space, Arc<VmObject>) {
    let s = space_cfg(f, split);
    let r = reservoir(runs * 512 + 1024);
    let o = ram(&r, runs * 512);
    s.map(&o, 0, Gpa(1 << 30), runs * M2, Prot::RW).unwrap();
    s.populate(Gpa(1 << 30), runs * M2).unwrap();
    assert_eq!(leaf_sizes(&s, 1 << 30, runs * M2), vec![PageSize::Size2M; runs as usize]);
    (s, o)
}

#[test]
fn eager_split_when_tracking_is_switched_on_and_harvest_is_exact() {
    for f in formats() {
        let (s, o) = large_space(f, SplitPolicy::Eager, 3);
        let base = 1 << 30;
        let tables = table_pages(&s);
        let gens = Arc::new(Mutex::new(Vec::new()));
        let c = s.client();
        let g2 = gens.clone();
        c.set_invalidation(Some(move |inv: &Invalidation<'_>| g2.lock().unwrap().push(format!("{:?}", inv.cause))));
        // A writable hold taken before the split, released after it.
        let held = c.hold(Gpa(base + M2 + 9 * PG), Prot::RW).unwrap();
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(gens.lock().unwrap().as_slice(), ["Tracking"]);
        assert_eq!(leaf_sizes(&s, base, 3 * M2), vec![PageSize::Size4K; 3 * 512], "{f:?}");
        assert_eq!(table_pages(&s), tables + 3, "one leaf table per large leaf");
        assert_eq!(s.resident_count(), 3 * 512);
        assert_eq!(mapped_pages(&s), 3 * 512);
        check_frames(&s, &o, base, 0, 3 * 512);
        // Nothing was written while tracking was off; the split reports
        // nothing either.
        let mut bm = vec![0u64; 3 * 8];
        assert_eq!(s.track_dirty(Gpa(base), 3 * M2, &mut bm).unwrap(), 0, "{f:?}");
        // Writes after the split: a hold's release and (where the format
        // has hardware A/D) the vCPU's own writes, page by page.
        assert!(!held.release());
        let h = c.hold(Gpa(base + 2 * M2 + 511 * PG), Prot::WRITE | Prot::READ).unwrap();
        drop(h);
        let mut want = vec![512 + 9, 1024 + 511];
        if f.kind() != nested_pt::FormatKind::EptEmulatedAd {
            assert!(hw_write(&s, base + 40 * PG));
            want.push(40);
        } else {
            c.fault(Gpa(base + 40 * PG), Prot::WRITE).unwrap();
            want.push(40);
        }
        want.sort();
        assert_eq!(s.track_dirty(Gpa(base), 3 * M2, &mut bm).unwrap(), 3, "{f:?}");
        let got: Vec<u64> = (0..3 * 512).filter(|&p| bit(&bm, p)).collect();
        assert_eq!(got, want, "{f:?}: exactly the pages written");
        s.unmap(Gpa(base), 3 * M2).unwrap();
        assert_eq!(s.resident_count(), 0);
        assert_eq!(table_pages(&s), 1);
    }
}

#[test]
fn large_leaf_dirty_before_tracking_is_carried_by_the_split() {
    // A hardware write to a large leaf while tracking is off sets its
    // dirty bit; the eager split carries it to every small leaf, so the
    // first harvest reports the whole 2 MiB (a superset, never a miss).
    let (s, _o) = large_space(npt(), SplitPolicy::Eager, 1);
    let base = 1 << 30;
    assert!(hw_write(&s, base + 3 * PG));
    s.set_dirty_tracking(true).unwrap();
    let mut bm = [0u64; 8];
    assert_eq!(s.track_dirty(Gpa(base), M2, &mut bm).unwrap(), 512);
    assert_eq!(s.track_dirty(Gpa(base), M2, &mut bm).unwrap(), 0);
}

#[test]
fn lazy_split_on_the_first_write() {
    for f in formats() {
        let (s, o) = large_space(f, SplitPolicy::Lazy, 2);
        let base = 1 << 30;
        let tables = table_pages(&s);
        if f.kind() != nested_pt::FormatKind::EptEmulatedAd {
            assert!(hw_write(&s, base + 5 * PG), "a write while tracking is off");
        }
        let causes = Arc::new(Mutex::new(Vec::new()));
        let c = s.client();
        let k = causes.clone();
        c.set_invalidation(Some(move |inv: &Invalidation<'_>| k.lock().unwrap().push(format!("{:?}", inv.cause))));
        s.set_dirty_tracking(true).unwrap();
        // Still large, write-protected and clean.
        assert_eq!(leaf_sizes(&s, base, 2 * M2), vec![PageSize::Size2M; 2], "{f:?}");
        assert_eq!(table_pages(&s), tables);
        assert_eq!(s.lookup(Gpa(base)).unwrap().1, Prot::READ, "{f:?}: write-protected");
        let mut bm = [0u64; 16];
        assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(base), 2 * M2, None, &mut bm).unwrap(), 0, "{f:?}: made clean");
        if f.kind() != nested_pt::FormatKind::EptEmulatedAd {
            assert!(!hw_write(&s, base + 5 * PG), "{f:?}: the hardware write faults now");
        }
        // A read fault does not split.
        c.fault(Gpa(base + 7 * PG), Prot::READ).unwrap();
        assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M]);
        // The write fault splits that leaf only, with write back.
        c.fault(Gpa(base + 5 * PG), Prot::WRITE).unwrap();
        assert_eq!(causes.lock().unwrap().as_slice(), ["Tracking", "Remap"], "{f:?}");
        let sizes = leaf_sizes(&s, base, 2 * M2);
        assert_eq!(sizes.len(), 513);
        assert_eq!(sizes[512], PageSize::Size2M, "the other leaf is still large");
        assert_eq!(s.lookup(Gpa(base + 100 * PG)).unwrap().1, Prot::RW);
        assert_eq!(table_pages(&s), tables + 1);
        assert_eq!(s.resident_count(), 1024);
        assert_eq!(mapped_pages(&s), 1024);
        check_frames(&s, &o, base, 0, 1024);
        if f.kind() != nested_pt::FormatKind::EptEmulatedAd {
            assert!(hw_write(&s, base + 5 * PG));
        }
        // A writable hold on the other leaf splits it too.
        let h = c.hold(Gpa(base + M2 + 200 * PG), Prot::RW).unwrap();
        assert_eq!(Some(h.pfn()), o.frame_at(M2 + 200 * PG));
        drop(h);
        assert_eq!(leaf_sizes(&s, base, 2 * M2).len(), 1024);
        assert_eq!(s.track_dirty(Gpa(base), 2 * M2, &mut bm).unwrap(), 2, "{f:?}: exactly the two pages written");
        assert!(bit(&bm, 5) && bit(&bm, 512 + 200));
    }
}

#[test]
fn harvests_and_set_with_large_leaves_while_tracking() {
    let (s, _o) = large_space(npt(), SplitPolicy::Lazy, 2);
    let base = 1 << 30;
    s.set_dirty_tracking(true).unwrap();
    // A dirty bit on a (write-protected) large leaf: a hold released
    // after the switch, taken before, marks its leaf (here set by hand).
    // SAFETY: only the dirty bit of a present leaf changes.
    unsafe { s.with_table_raw(|t| t.reset_dirty(Gpa(base), true).unwrap()) };
    // A harvest of part of the leaf reports its pages inside, clears
    // nothing (its one bit stands for the whole leaf)...
    let mut bm = [0u64; 16];
    assert_eq!(s.track_dirty(Gpa(base), M2 / 2, &mut bm).unwrap(), 256);
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(base + M2 / 2), M2, None, &mut bm).unwrap(), 256);
    // ...one of the whole leaf clears it, with the frames collected.
    let mut frames = Vec::new();
    assert_eq!(s.track_dirty_frames(Gpa(base), 2 * M2, &mut bm, &mut frames).unwrap(), 512);
    assert_eq!(frames.len(), 512);
    assert_eq!(s.track_dirty(Gpa(base), 2 * M2, &mut bm).unwrap(), 0);
    // Set splits the large leaves it touches and marks 4 KiB pages.
    let mut sel = [0u64; 16];
    sel[8] = 1 << 3; // page 512 + 3
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(base), 2 * M2, Some(&sel), &mut bm).unwrap(), 1);
    assert_eq!(leaf_sizes(&s, base, 2 * M2).len(), 1024);
    assert_eq!(s.track_dirty(Gpa(base), 2 * M2, &mut bm).unwrap(), 1);
    assert!(bit(&bm, 515));
    assert_eq!(s.resident_count(), 1024);
}

#[test]
fn tracking_on_gives_empty_large_chunks_leaf_tables() {
    // Chunks counted for a 2 MiB leaf but never touched get leaf tables
    // when tracking goes on (both policies): faults map 4 KiB leaves then.
    for split in [SplitPolicy::Eager, SplitPolicy::Lazy] {
        let s = space_cfg(npt(), split);
        let r = reservoir(4096);
        let o = ram(&r, 1024);
        s.map(&o, 0, Gpa(0), 2 * M2, Prot::RW).unwrap();
        let tables = table_pages(&s);
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(table_pages(&s), tables + 2, "{split:?}");
        let c = s.client();
        c.fault(Gpa(M2 + 5 * PG), Prot::WRITE).unwrap();
        assert_eq!(s.resident_count(), 16, "{split:?}: a 4 KiB fault-around window");
        let mut bm = [0u64; 16];
        assert!(hw_write(&s, M2 + 5 * PG));
        assert_eq!(s.track_dirty(Gpa(0), 2 * M2, &mut bm).unwrap(), 1);
        // Mapped while tracking: 4 KiB only.
        let o2 = ram(&r, 512);
        s.map(&o2, 0, Gpa(1 << 30), M2, Prot::RW).unwrap();
        s.populate(Gpa(1 << 30), M2).unwrap();
        assert_eq!(leaf_sizes(&s, 1 << 30, M2), vec![PageSize::Size4K; 512]);
        // Tracking off again: mappings keep what they have.
        s.set_dirty_tracking(false).unwrap();
        s.unmap(Gpa(0), 2 * M2).unwrap();
        s.unmap(Gpa(1 << 30), M2).unwrap();
        assert_eq!((s.resident_count(), table_pages(&s)), (0, 1));
    }
}

#[test]
fn holds_across_a_split_mark_the_right_page() {
    // Writable holds on a large leaf, taken with tracking off, are
    // released after the eager split: each marks its own 4 KiB page.
    let (s, _o) = large_space(npt(), SplitPolicy::Eager, 1);
    let base = 1 << 30;
    let c = s.client();
    let hs: Vec<_> = [3u64, 400].iter().map(|p| c.hold(Gpa(base + p * PG), Prot::RW).unwrap()).collect();
    s.set_dirty_tracking(true).unwrap();
    drop(hs);
    let mut bm = [0u64; 8];
    assert_eq!(s.track_dirty(Gpa(base), M2, &mut bm).unwrap(), 2);
    assert!(bit(&bm, 3) && bit(&bm, 400));
    // A release while another thread's change holds the client: the
    // slow path finds the moved leaf under the structure lock.
    let (s, _o) = large_space(npt(), SplitPolicy::Eager, 1);
    let c = s.client();
    let h = c.hold(Gpa(base + 7 * PG), Prot::RW).unwrap();
    let released = AtomicU64::new(0);
    std::thread::scope(|t| {
        t.spawn(|| {
            s.set_dirty_tracking(true).unwrap();
        });
        drop(h);
        released.store(1, Ordering::SeqCst);
    });
    let mut bm = [0u64; 8];
    let n = s.track_dirty(Gpa(base), M2, &mut bm).unwrap();
    // The release ran before the switch (tracking off: nothing marked)
    // or after it (the page marked); never anything else.
    assert!(n == 0 || (n == 1 && bit(&bm, 7)), "{n}");
}

#[test]
fn partial_unmap_cuts_mappings_and_splits_large_leaves() {
    for f in formats() {
        let (s, o) = large_space(f, SplitPolicy::Eager, 3);
        let base = 1 << 30;
        let c = s.client();
        let causes = Arc::new(Mutex::new(Vec::new()));
        let k = causes.clone();
        c.set_invalidation(Some(move |inv: &Invalidation<'_>| {
            if let Cause::Unmap { offset, .. } = inv.cause {
                k.lock().unwrap().push((inv.gpa.0, inv.len, offset, inv.tables_freed));
            }
        }));
        // Holds: one inside the hole (keeps the object, reports the
        // unmap), one outside (unaffected, still marks dirty).
        let inside = c.hold(Gpa(base + M2 + 10 * PG), Prot::RW).unwrap();
        let outside = c.hold(Gpa(base + 3 * PG), Prot::RW).unwrap();
        // The middle of the second large leaf, and more.
        let (lo, hi) = (base + M2 + 8 * PG, base + 2 * M2 + 4 * PG);
        assert_eq!(s.unmap_range(Gpa(base + M2), 4 * M2), Err(Error::NotFound), "{f:?}: past the mapping");
        assert_eq!(s.unmap_range(Gpa(base + PG / 2), PG), Err(Error::Invalid(Invalid::Unaligned)));
        s.unmap_range(Gpa(lo), hi - lo).unwrap();
        assert_eq!(causes.lock().unwrap().as_slice(), [(lo, hi - lo, M2 + 8 * PG, true)], "{f:?}");
        let left = 512 + 8;
        let right = 3 * 512 - left - (hi - lo) / PG;
        assert_eq!(s.resident_count(), left + right, "{f:?}");
        assert_eq!(mapped_pages(&s), s.resident_count());
        // The first leaf is still large, the cut ones are 4 KiB now.
        assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M]);
        check_frames(&s, &o, base, 0, left);
        check_frames(&s, &o, hi, hi - base, right);
        assert!(s.lookup(Gpa(lo)).is_none() && s.lookup(Gpa(hi - PG)).is_none());
        // The mapping is now two, with the right offsets.
        let maps = s.mappings();
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[0].gpa.0, maps[0].len, maps[0].offset), (base, left * PG, 0));
        assert_eq!((maps[1].gpa.0, maps[1].len, maps[1].offset), (hi, right * PG, hi - base));
        assert_eq!(c.fault(Gpa(lo), Prot::READ), Err(Error::NoMapping));
        c.fault(Gpa(hi + 50 * PG), Prot::WRITE).unwrap();
        assert!(inside.release(), "{f:?}: its page was unmapped");
        assert!(!outside.release());
        // Unmapping every remaining piece gives every table back.
        s.unmap_range(Gpa(base), left * PG).unwrap();
        s.unmap(Gpa(hi), right * PG).unwrap();
        assert_eq!((s.resident_count(), table_pages(&s)), (0, 1), "{f:?}");
    }
}

#[test]
fn protect_part_of_a_mapping() {
    for f in formats() {
        let (s, o) = large_space(f, SplitPolicy::Eager, 2);
        let base = 1 << 30;
        let c = s.client();
        // Read-only: the middle of the first leaf and all of the second.
        let lo = base + 100 * PG;
        assert_eq!(s.protect(Gpa(lo), 2 * M2, Prot::READ), Err(Error::NotFound), "{f:?}");
        assert_eq!(s.protect(Gpa(lo), PG, Prot::empty()), Err(Error::Invalid(Invalid::BadProt)));
        // A hold on the range refuses a change that removes write.
        let h = c.hold(Gpa(base + M2 + 5 * PG), Prot::READ).unwrap();
        assert_eq!(s.protect(Gpa(lo), 2 * M2 - 100 * PG, Prot::READ), Err(Error::Held), "{f:?}");
        assert_eq!(leaf_sizes(&s, base, 2 * M2), vec![PageSize::Size2M; 2], "nothing changed");
        // ...but not one that only adds a right.
        s.protect(Gpa(lo), 2 * M2 - 100 * PG, Prot::RWX).unwrap();
        drop(h);
        s.protect(Gpa(lo), 2 * M2 - 100 * PG, Prot::READ).unwrap();
        let sizes = leaf_sizes(&s, base, 2 * M2);
        assert_eq!(sizes.len(), 513, "{f:?}: the cut leaf split, the whole one kept");
        assert_eq!(sizes[512], PageSize::Size2M);
        assert_eq!(s.lookup(Gpa(base + 99 * PG)).unwrap().1, Prot::RW);
        assert_eq!(s.lookup(Gpa(lo)).unwrap().1, Prot::READ);
        assert_eq!(s.lookup(Gpa(base + M2 + 7 * PG)).unwrap().1, Prot::READ);
        check_frames(&s, &o, base, 0, 1024);
        assert_eq!(c.fault(Gpa(lo), Prot::WRITE), Err(Error::Protection), "{f:?}");
        assert_eq!(c.hold(Gpa(base + M2), Prot::RW).map(|_| ()), Err(Error::Protection));
        c.fault(Gpa(base + 99 * PG), Prot::WRITE).unwrap();
        let maps = s.mappings();
        assert_eq!(maps.iter().map(|m| (m.gpa.0, m.prot)).collect::<Vec<_>>(), [(base, Prot::RW), (lo, Prot::READ)]);
        // Back to writable, tracking on: writes to the range are reported.
        s.set_dirty_tracking(true).unwrap();
        s.protect(Gpa(lo), 2 * M2 - 100 * PG, Prot::RW).unwrap();
        c.fault(Gpa(base + M2 + 9 * PG), Prot::WRITE).unwrap();
        drop(c.hold(Gpa(base + M2 + 11 * PG), Prot::RW).unwrap());
        let mut bm = [0u64; 16];
        let n = s.track_dirty(Gpa(base), 2 * M2, &mut bm).unwrap();
        if f.kind() == nested_pt::FormatKind::EptEmulatedAd {
            // The fault granted W, which that format reads as dirty.
            assert_eq!(n, 3, "{f:?}");
        } else {
            assert_eq!(n, 1, "{f:?}");
        }
        assert!(bit(&bm, 512 + 11));
        assert_eq!(s.resident_count(), 1024);
    }
}

#[test]
fn a_dirty_page_stays_dirty_across_a_protection_change() {
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let r = reservoir(1024);
    let o = ram(&r, 64);
    s.map(&o, 0, Gpa(0), 64 * PG, Prot::RW).unwrap();
    s.set_dirty_tracking(true).unwrap();
    s.populate(Gpa(0), 64 * PG).unwrap();
    assert!(hw_write(&s, 5 * PG));
    s.protect(Gpa(0), 64 * PG, Prot::READ).unwrap();
    let mut bm = [0u64; 1];
    assert_eq!(s.track_dirty(Gpa(0), 64 * PG, &mut bm).unwrap(), 1);
    assert_eq!(bm[0], 1 << 5);
    assert!(!hw_write(&s, 6 * PG), "read-only now");
}

#[test]
fn promotion_makes_one_leaf_and_frees_the_leaf_table() {
    for f in formats() {
        let (s, o) = large_space(f, SplitPolicy::Eager, 3);
        let base = 1 << 30;
        let c = s.client();
        let tables = table_pages(&s);
        // Tracking on (split) and off again: 4 KiB leaves stay.
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(s.promote(Gpa(base), 3 * M2), Err(Error::TrackingOn));
        let h = c.hold(Gpa(base + 2 * M2 + 8 * PG), Prot::RW).unwrap();
        s.set_dirty_tracking(false).unwrap();
        assert_eq!(table_pages(&s), tables + 3);
        // A hole in the first range, another protection in the second.
        s.unmap_range(Gpa(base + 3 * PG), PG).unwrap();
        s.protect(Gpa(base + M2 + 3 * PG), PG, Prot::READ).unwrap();
        let inv = Arc::new(Mutex::new(Vec::new()));
        let k = inv.clone();
        c.set_invalidation(Some(move |i: &Invalidation<'_>| {
            k.lock().unwrap().push((format!("{:?}", i.cause), i.tables_freed))
        }));
        assert_eq!(s.promote(Gpa(base), 3 * M2).unwrap(), 1, "{f:?}: only the third range qualifies");
        assert_eq!(inv.lock().unwrap().as_slice(), [("Remap".to_string(), true)]);
        assert_eq!(table_pages(&s), tables + 2, "{f:?}: its leaf table freed");
        assert_eq!(leaf_sizes(&s, base + 2 * M2, M2), vec![PageSize::Size2M]);
        assert_eq!(s.resident_count(), 3 * 512 - 1);
        assert_eq!(mapped_pages(&s), s.resident_count());
        check_frames(&s, &o, base + 2 * M2, 2 * M2, 512);
        assert_eq!(s.promote(Gpa(base), 3 * M2).unwrap(), 0, "nothing more");
        // The hold taken before the promotion marks its page when
        // released after tracking is on again (the leaf was split again).
        s.set_dirty_tracking(true).unwrap();
        drop(h);
        let mut bm = [0u64; 24];
        s.track_dirty(Gpa(base), 3 * M2, &mut bm).unwrap();
        assert!(bit(&bm, 1024 + 8), "{f:?}");
        // Fill the hole and restore the protection: both promote.
        s.set_dirty_tracking(false).unwrap();
        s.protect(Gpa(base + M2 + 3 * PG), PG, Prot::RW).unwrap();
        // The pieces the protection change cut are one mapping again; the
        // third range was split again when tracking went on.
        assert_eq!(s.mappings().len(), 2, "{f:?}");
        assert_eq!(s.promote(Gpa(base), 3 * M2).unwrap(), 2, "{f:?}");
        assert_eq!(leaf_sizes(&s, base + M2, 2 * M2), vec![PageSize::Size2M; 2]);
        check_frames(&s, &o, base + M2, M2, 1024);
        assert_eq!(mapped_pages(&s), s.resident_count());
    }
}

#[test]
fn promote_refusals() {
    let s = space_cfg(npt(), SplitPolicy::Eager);
    assert_eq!(s.promote(Gpa(PG / 2), PG), Err(Error::Invalid(Invalid::Unaligned)));
    let mut cfg = SpaceConfig::new(1 << 32, npt());
    cfg.large_leaves = false;
    let s: Space = VmSpace::new(cfg, pages()).unwrap();
    assert_eq!(s.promote(Gpa(0), M2), Err(Error::Unsupported));
}

#[test]
fn splits_and_promotions_under_concurrent_faults_and_holds() {
    // Two threads write through holds and fault for write over 8 MiB of
    // large leaves while the main thread switches tracking on (lazy and
    // eager in turn) and off, promotes and harvests: every value a thread
    // wrote reads back, nothing deadlocks, resident_count stays exact.
    let (s, o) = large_space(npt(), SplitPolicy::Lazy, 4);
    let base = 1u64 << 30;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|t| {
        for id in 0..2u64 {
            let (s, stop) = (&s, &stop);
            t.spawn(move || {
                let c = s.client();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id + 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Thread `id` owns the even or the odd pages.
                    let page = ((x % 2048) & !1) | id;
                    let g = base + page * PG;
                    if x & 0x100 == 0 {
                        c.fault(Gpa(g), Prot::WRITE).unwrap();
                    }
                    let h = c.hold(Gpa(g), Prot::RW).unwrap();
                    h.write_u64(16, x).unwrap();
                    assert_eq!(h.read_u64(16).unwrap(), x);
                    drop(h);
                    n += 1;
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        let mut bm = vec![0u64; 4 * 8];
        let mut promoted = 0;
        for round in 0..200 {
            s.set_split_policy(if round % 2 == 0 { SplitPolicy::Lazy } else { SplitPolicy::Eager });
            s.set_dirty_tracking(true).unwrap();
            s.track_dirty(Gpa(base), 4 * M2, &mut bm).unwrap();
            s.set_dirty_tracking(false).unwrap();
            promoted += s.promote(Gpa(base), 4 * M2).unwrap();
            assert_eq!(mapped_pages(&s), s.resident_count(), "round {round}");
        }
        assert!(promoted > 0, "no promotion ran");
    });
    assert_eq!(s.resident_count(), 4 * 512);
    check_frames(&s, &o, base, 0, 4 * 512);
}

#[test]
fn protection_changes_never_merge_two_mappings() {
    // Two mappings of one object, side by side with contiguous offsets:
    // a protection change and its undo merge the pieces of the first one
    // only, so that an exact unmap of either still matches.
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let r = reservoir(1024);
    let o = ram(&r, 64);
    s.map(&o, 0, Gpa(0), 32 * PG, Prot::RW).unwrap();
    s.map(&o, 32 * PG, Gpa(32 * PG), 32 * PG, Prot::RW).unwrap();
    s.protect(Gpa(16 * PG), 16 * PG, Prot::READ).unwrap();
    assert_eq!(s.mappings().len(), 3);
    s.protect(Gpa(16 * PG), 16 * PG, Prot::RW).unwrap();
    assert_eq!(s.mappings().len(), 2, "the first mapping whole again, the second apart");
    s.unmap(Gpa(32 * PG), 32 * PG).unwrap();
    s.unmap(Gpa(0), 32 * PG).unwrap();
    assert!(s.mappings().is_empty());
}

/// A space of `chunks` 2 MiB runs at 1 GiB, mapped while tracking was on
/// (so populated for 4 KiB leaves), tracking off again, nothing
/// resident; `auto` is [`SpaceConfig::auto_promote`].
fn small_populated(f: PteFormat, chunks: u64, auto: bool) -> (Space, Arc<VmObject>) {
    let mut cfg = SpaceConfig::new(1 << 32, f);
    cfg.fault_around = 16;
    cfg.auto_promote = auto;
    let s: Space = VmSpace::new(cfg, pages()).unwrap();
    let r = reservoir(chunks * 512 + 1024);
    let o = ram(&r, chunks * 512);
    for k in 0..chunks {
        assert!(o.run_at(k * M2).is_some(), "{f:?}: the reservoir handed out runs");
    }
    s.set_dirty_tracking(true).unwrap();
    s.map(&o, 0, Gpa(1 << 30), chunks * M2, Prot::RW).unwrap();
    s.set_dirty_tracking(false).unwrap();
    assert_eq!(s.resident_count(), 0);
    (s, o)
}

/// Fault every page of the chunk at `chunk` for `prot`, in ascending or
/// descending order.
fn fault_chunk(c: &VmClient<Pages>, chunk: u64, prot: Prot, descending: bool) {
    for i in 0..512 {
        let p = if descending { 511 - i } else { i };
        c.fault(Gpa(chunk + p * PG), prot).unwrap();
    }
}

#[test]
fn faults_filling_a_leaf_table_promote_it() {
    // Hardware A/D formats (the hardware's write is simulated); emulated
    // A/D below, where the fault path records the accesses.
    for f in [npt(), PteFormat::ept(Caps::default())] {
        let (s, o) = small_populated(f, 3, true);
        let base = 1u64 << 30;
        let c = s.client();
        let inv = Arc::new(Mutex::new(Vec::new()));
        let k = inv.clone();
        c.set_invalidation(Some(move |i: &Invalidation<'_>| {
            k.lock().unwrap().push((i.gpa.0, i.len, format!("{:?}", i.cause), i.tables_freed))
        }));
        let tables = table_pages(&s);
        // All but the last window of the first chunk: no promotion yet.
        for p in 0..512 - 16 {
            c.fault(Gpa(base + p * PG), Prot::WRITE).unwrap();
            assert!(hw_write(&s, base + p * PG));
        }
        assert_eq!(s.promotions(), PromotionStats::default(), "{f:?}");
        assert_eq!(leaf_sizes(&s, base, M2).len(), 512 - 16);
        // The last window fills the table: one 2 MiB leaf, table freed.
        c.fault(Gpa(base + 511 * PG), Prot::READ).unwrap();
        assert_eq!(s.promotions(), PromotionStats { explicit: 0, automatic: 1 }, "{f:?}");
        assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M], "{f:?}");
        assert_eq!(table_pages(&s), tables - 1, "{f:?}: the leaf table freed");
        assert_eq!(inv.lock().unwrap().as_slice(), [(base, M2, "Remap".to_string(), true)]);
        assert_eq!(s.resident_count(), 512);
        check_frames(&s, &o, base, 0, 512);
        // The second chunk read only, in descending order (the window
        // that fills it is its first).
        fault_chunk(&c, base + M2, Prot::READ, true);
        assert_eq!(s.promotions().automatic, 2, "{f:?}");
        assert_eq!(leaf_sizes(&s, base + M2, M2), vec![PageSize::Size2M], "{f:?}");
        // The third by populate, in two halves.
        assert_eq!(s.populate(Gpa(base + 2 * M2), M2 / 2).unwrap(), 256);
        assert_eq!(s.promotions().automatic, 2, "half full");
        assert_eq!(s.populate(Gpa(base + 2 * M2), M2).unwrap(), 256);
        assert_eq!(s.promotions().automatic, 3, "{f:?}");
        assert_eq!(leaf_sizes(&s, base, 3 * M2), vec![PageSize::Size2M; 3], "{f:?}");
        assert_eq!(s.resident_count(), 3 * 512);
        assert_eq!(mapped_pages(&s), s.resident_count());
        check_frames(&s, &o, base, 0, 3 * 512);
        assert_eq!(table_pages(&s), tables - 3);
        // A/D carried: the written chunk's large leaf is dirty, the read
        // one's is not; the eager split reports the whole written one.
        let fmt = *s.format();
        let ad = |g: u64| {
            let v = s.with_table(|t| t.leaves(Gpa(g), M2).map(|l| l.value).next().unwrap());
            (fmt.accessed(v), fmt.dirty(v))
        };
        let (a0, d0) = ad(base);
        assert!(a0 && d0, "{f:?}");
        let (a1, d1) = ad(base + M2);
        assert!(!a1 && !d1, "{f:?}: faulted (the hardware sets accessed), never written");
        s.set_dirty_tracking(true).unwrap();
        let mut bm = [0u64; 24];
        assert_eq!(s.track_dirty(Gpa(base), 3 * M2, &mut bm).unwrap(), 512, "{f:?}");
        assert!((0..512).all(|p| bit(&bm, p)), "{f:?}: every written page reported");
        assert!((512..1536).all(|p| !bit(&bm, p)), "{f:?}: nothing unwritten");
    }
    // Emulated A/D: the accessed/dirty permission bits a fault grants do
    // not count as another protection; a write fault's dirty state is
    // carried.
    let f = PteFormat::ept_emulated_ad(Caps::default());
    let (s, o) = small_populated(f, 2, true);
    let base = 1u64 << 30;
    let c = s.client();
    fault_chunk(&c, base, Prot::READ, false);
    c.fault(Gpa(base + M2 + 7 * PG), Prot::WRITE).unwrap();
    fault_chunk(&c, base + M2, Prot::READ, true);
    assert_eq!(s.promotions().automatic, 2);
    assert_eq!(leaf_sizes(&s, base, 2 * M2), vec![PageSize::Size2M; 2]);
    assert_eq!(s.resident_count(), 1024);
    check_frames(&s, &o, base, 0, 1024);
    s.set_dirty_tracking(true).unwrap();
    let mut bm = [0u64; 16];
    assert_eq!(s.track_dirty(Gpa(base), 2 * M2, &mut bm).unwrap(), 512, "the written chunk, whole");
    assert!((512..1024).all(|p| bit(&bm, p)) && (0..512).all(|p| !bit(&bm, p)));
}

#[test]
fn auto_promotion_refusals() {
    let base = 1u64 << 30;
    // While tracking is on: nothing, by faults or populate.
    for f in formats() {
        let (s, _o) = small_populated(f, 2, true);
        s.set_dirty_tracking(true).unwrap();
        let c = s.client();
        fault_chunk(&c, base, Prot::READ, false);
        s.populate(Gpa(base + M2), M2).unwrap();
        assert_eq!(s.promotions(), PromotionStats::default(), "{f:?}");
        assert_eq!(leaf_sizes(&s, base, 2 * M2), vec![PageSize::Size4K; 1024], "{f:?}");
        assert_eq!(s.resident_count(), 1024);
    }
    // With the knob off: nothing; the explicit promotion still works.
    {
        let (s, _o) = small_populated(npt(), 2, false);
        let c = s.client();
        fault_chunk(&c, base, Prot::READ, false);
        s.populate(Gpa(base + M2), M2).unwrap();
        assert_eq!(s.promotions(), PromotionStats::default());
        assert_eq!(leaf_sizes(&s, base, 2 * M2).len(), 1024);
        assert_eq!(s.promote(Gpa(base), 2 * M2).unwrap(), 2);
        assert_eq!(s.promotions(), PromotionStats { explicit: 2, automatic: 0 });
    }
    // One page of another protection: not promoted (the other chunk is).
    for f in formats() {
        let (s, _o) = small_populated(f, 2, true);
        s.protect(Gpa(base + 100 * PG), PG, Prot::READ).unwrap();
        let c = s.client();
        fault_chunk(&c, base, Prot::READ, false);
        s.populate(Gpa(base + M2), M2).unwrap();
        assert_eq!(s.promotions().automatic, 1, "{f:?}");
        assert_eq!(leaf_sizes(&s, base, M2).len(), 512, "{f:?}");
        assert_eq!(s.resident_count(), 1024);
        assert_eq!(mapped_pages(&s), 1024);
    }
    // Large leaves off: nothing (and no runs are looked for).
    {
        let mut cfg = SpaceConfig::new(1 << 32, npt());
        cfg.large_leaves = false;
        let s: Space = VmSpace::new(cfg, pages()).unwrap();
        let r = reservoir(1024);
        let o = ram(&r, 512);
        s.map(&o, 0, Gpa(base), M2, Prot::RW).unwrap();
        let c = s.client();
        fault_chunk(&c, base, Prot::READ, false);
        assert_eq!(s.promotions(), PromotionStats::default());
        assert_eq!(leaf_sizes(&s, base, M2).len(), 512);
    }
}

#[test]
fn no_auto_promotion_from_guest_context() {
    // A fault from a thread in guest context on the space maps the page
    // but does not promote (it would wait for itself): the range stays
    // full of 4 KiB leaves until an explicit promotion.
    let (s, _o) = small_populated(npt(), 1, true);
    let base = 1u64 << 30;
    let c = s.client();
    for p in 0..512 - 16 {
        c.fault(Gpa(base + p * PG), Prot::READ).unwrap();
    }
    {
        let _g = c.table_enter(0).unwrap();
        c.fault(Gpa(base + 511 * PG), Prot::READ).unwrap();
    }
    assert_eq!(s.promotions().automatic, 0);
    assert_eq!(s.resident_count(), 512);
    assert_eq!(leaf_sizes(&s, base, M2).len(), 512);
    assert_eq!(s.promote(Gpa(base), M2).unwrap(), 1);
    assert_eq!(s.promotions(), PromotionStats { explicit: 1, automatic: 0 });
    assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M]);
}

#[test]
fn auto_promotions_under_concurrent_faults_and_holds() {
    // Two threads fault and write through holds over 4 runs while the
    // main thread unmaps and maps them again with tracking on (4 KiB
    // leaves, empty) and switches tracking off: the faults refill the
    // leaf tables and promote them. Every value a thread wrote reads
    // back, resident_count stays exact, promotions happen.
    //
    // resident_count is compared with the leaves in the table while the
    // workers are parked (`gate`): a fault maps its window and counts it
    // in two steps, and `with_table` does not stop clients, so a check
    // while they fault can see one window mapped but not yet counted, or
    // counted after the walk passed it (this test once failed so, 16
    // pages apart, and then hung: the workers never saw the stop flag).
    let (s, o) = small_populated(npt(), 4, true);
    let base = 1u64 << 30;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let gate = std::sync::RwLock::new(());
    std::thread::scope(|t| {
        for id in 0..2u64 {
            let (s, stop, gate) = (&s, &stop, &gate);
            t.spawn(move || {
                let c = s.client();
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ (id + 1);
                while !stop.load(Ordering::Relaxed) {
                    let _running = gate.read().unwrap();
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = ((x % 2048) & !1) | id;
                    let g = base + page * PG;
                    // Between an unmap and the map again: no mapping.
                    match c.fault(Gpa(g), if x & 0x100 == 0 { Prot::WRITE } else { Prot::READ }) {
                        Ok(()) | Err(Error::NoMapping) => {}
                        Err(e) => panic!("fault: {e:?}"),
                    }
                    match c.hold(Gpa(g), Prot::RW) {
                        Ok(h) => {
                            h.write_u64(16, x).unwrap();
                            assert_eq!(h.read_u64(16).unwrap(), x);
                        }
                        Err(Error::NoMapping) => {}
                        Err(e) => panic!("hold: {e:?}"),
                    }
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        let mut rounds = 0;
        while s.promotions().automatic < 8 || rounds < 20 {
            s.set_dirty_tracking(true).unwrap();
            s.unmap(Gpa(base), 4 * M2).unwrap();
            s.map(&o, 0, Gpa(base), 4 * M2, Prot::RW).unwrap();
            s.set_dirty_tracking(false).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            {
                let _parked = gate.write().unwrap();
                assert_eq!(mapped_pages(&s), s.resident_count(), "round {rounds}");
            }
            rounds += 1;
            assert!(rounds < 2000, "no promotions after {rounds} rounds");
        }
    });
    assert_eq!(mapped_pages(&s), s.resident_count());
    // What the threads left unfaulted (populate promotes what it fills),
    // and a table filled while tracking was still on (between the map
    // and the switch) is promoted explicitly.
    s.populate(Gpa(base), 4 * M2).unwrap();
    s.promote(Gpa(base), 4 * M2).unwrap();
    assert_eq!(leaf_sizes(&s, base, 4 * M2), vec![PageSize::Size2M; 4]);
    assert_eq!(s.resident_count(), 4 * 512);
    check_frames(&s, &o, base, 0, 4 * 512);
}

#[test]
fn a_promotion_between_a_lazy_split_and_the_retry_gives_a_writable_leaf() {
    // The interleaving the split retry (`VmClient::fault_split`, and the
    // hold's loop) must survive, run in order on one thread: a 2 MiB
    // leaf write-protected by a lazy tracking switch, a write splits it,
    // tracking goes off and the chunk is promoted again (explicitly, or
    // automatically by faults refilling it) before the writer retries. The new leaf carries the mapping's protection,
    // so the retried write and a writable hold map it with no other
    // split and no other change: the retry goes round again only after
    // another switch of tracking on.
    let base = 1u64 << 30;
    for f in formats() {
        let causes = Arc::new(Mutex::new(Vec::new()));
        let watch = |c: &VmClient<Pages>| {
            let k = causes.clone();
            c.set_invalidation(Some(move |i: &Invalidation<'_>| k.lock().unwrap().push(format!("{:?}", i.cause))));
        };
        // Explicit promotion.
        let (s, o) = large_space(f, SplitPolicy::Lazy, 1);
        let c = s.client();
        watch(&c);
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(s.lookup(Gpa(base)).unwrap().1, Prot::READ, "{f:?}: write-protected");
        c.fault(Gpa(base + 5 * PG), Prot::WRITE).unwrap();
        assert_eq!(leaf_sizes(&s, base, M2).len(), 512, "{f:?}: split by the write");
        s.set_dirty_tracking(false).unwrap();
        assert!(
            (0..512).all(|p| s.lookup(Gpa(base + p * PG)).unwrap().1 == Prot::RW),
            "{f:?}: the mapping's protection"
        );
        assert_eq!(s.promote(Gpa(base), M2).unwrap(), 1);
        assert_eq!(s.lookup(Gpa(base)).unwrap().1, Prot::RW, "{f:?}: promoted writable");
        causes.lock().unwrap().clear();
        c.fault(Gpa(base + 9 * PG), Prot::WRITE).unwrap();
        let h = c.hold(Gpa(base + 10 * PG), Prot::RW).unwrap();
        h.write_u64(0, 7).unwrap();
        drop(h);
        assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M], "{f:?}: not split again");
        assert!(causes.lock().unwrap().is_empty(), "{f:?}: {:?}", causes.lock().unwrap());
        check_frames(&s, &o, base, 0, 512);
        causes.lock().unwrap().clear();

        // Automatic promotion: the same with the table refilled by faults
        // (unmapped, mapped again while tracking is on, tracking off).
        let (s, o) = small_populated(f, 1, true);
        s.set_split_policy(SplitPolicy::Lazy);
        let c = s.client();
        watch(&c);
        fault_chunk(&c, base, Prot::READ, false);
        assert_eq!(s.promotions().automatic, 1, "{f:?}");
        s.set_dirty_tracking(true).unwrap();
        assert_eq!(s.lookup(Gpa(base)).unwrap().1, Prot::READ, "{f:?}: write-protected");
        c.fault(Gpa(base + 5 * PG), Prot::WRITE).unwrap();
        assert_eq!(leaf_sizes(&s, base, M2).len(), 512, "{f:?}: split by the write");
        s.set_dirty_tracking(false).unwrap();
        s.set_dirty_tracking(true).unwrap();
        s.unmap(Gpa(base), M2).unwrap();
        s.map(&o, 0, Gpa(base), M2, Prot::RW).unwrap();
        s.set_dirty_tracking(false).unwrap();
        fault_chunk(&c, base, Prot::WRITE, true);
        assert_eq!(s.promotions().automatic, 2, "{f:?}: refilled and promoted");
        assert_eq!(s.lookup(Gpa(base)).unwrap().1, Prot::RW, "{f:?}: promoted writable");
        causes.lock().unwrap().clear();
        c.fault(Gpa(base + 9 * PG), Prot::WRITE).unwrap();
        let h = c.hold(Gpa(base + 10 * PG), Prot::RW).unwrap();
        h.write_u64(0, 7).unwrap();
        drop(h);
        assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M], "{f:?}: not split again");
        assert!(causes.lock().unwrap().is_empty(), "{f:?}: {:?}", causes.lock().unwrap());
        assert_eq!(s.resident_count(), 512);
        check_frames(&s, &o, base, 0, 512);
    }
}

#[test]
fn a_swappable_object_is_never_promoted() {
    // Its pages get frames one by one (no runs): a full leaf table of it
    // stays 4 KiB leaves, even though a fresh reservoir hands them out as
    // one aligned run (which the table would promote).
    let s = space_cfg(npt(), SplitPolicy::Eager);
    let r = reservoir(2048);
    let f = swap_file_in(&std::env::temp_dir()).unwrap();
    let o = VmObject::swappable(r.clone(), M2, f).unwrap();
    s.map(&o, 0, Gpa(1 << 30), M2, Prot::RW).unwrap();
    let c = s.client();
    fault_chunk(&c, 1 << 30, Prot::READ, false);
    s.populate(Gpa(1 << 30), M2).unwrap();
    assert_eq!(s.resident_count(), 512);
    assert_eq!(s.promotions(), PromotionStats::default());
    assert_eq!(leaf_sizes(&s, 1 << 30, M2).len(), 512);
    let f0 = o.frame_at(0).unwrap().0;
    let one_run = f0.is_multiple_of(512) && (0..512).all(|p| o.frame_at(p * PG).map(|f| f.0) == Some(f0 + p));
    assert!(one_run, "only the object's lack of runs refuses the promotion");
    assert_eq!(o.run_at(0), None);
}

#[test]
fn a_hold_that_fills_a_leaf_table_promotes_it() {
    // The hold's leaf moves under it: its release, after tracking went on
    // (an eager split), finds its page again and marks exactly it.
    let (s, o) = small_populated(npt(), 1, true);
    let base = 1u64 << 30;
    let c = s.client();
    for p in 0..512 - 16 {
        c.fault(Gpa(base + p * PG), Prot::READ).unwrap();
    }
    let h = c.hold(Gpa(base + 500 * PG), Prot::RW).unwrap();
    assert_eq!(s.promotions().automatic, 1);
    assert_eq!(leaf_sizes(&s, base, M2), vec![PageSize::Size2M]);
    assert_eq!(Some(h.pfn()), o.frame_at(500 * PG));
    h.write_u64(0, 0x1234).unwrap();
    s.set_dirty_tracking(true).unwrap();
    assert!(!h.release());
    let mut bm = [0u64; 8];
    assert_eq!(s.track_dirty(Gpa(base), M2, &mut bm).unwrap(), 1);
    assert!(bit(&bm, 500));
    let mut b = [0u8; 8];
    o.read(500 * PG, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1234);
}
