//! Multi-threaded stress: workers hold, write through holds and fault while
//! an administrator maps, unmaps, remaps and harvests.
//!
//! Checked:
//! - a hold never sees a frame of an object that was not mapped at its
//!   address when it was taken;
//! - every page written through a hold of the stable region appears in a
//!   later harvest (see [`Written`] for which harvests qualify), and a page
//!   written exactly once appears exactly once; harvests report only pages
//!   that were written;
//! - all data written is read back intact (through the hold, and at the
//!   end from the objects' memory).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use vmspace::*;

const SLOT_X: u64 = 0x1000 * PG; // churned: mapped, unmapped, remapped
const SLOT_Y: u64 = 0x4000 * PG; // stable: harvested
const PAGES: u64 = 64;
const WORKERS: usize = 3;

/// One worker's account of a stable page: how often it was written through
/// a hold, and the lowest harvest index that may report its last write.
///
/// Harvests are numbered by a counter the (single) harvesting thread bumps
/// before each one, so when a worker reads `started` harvests `0..started`
/// have begun and `0..started - 1` have returned. A release that begins
/// after that read sets the dirty bit after harvest `started - 2` returned:
/// harvest `started - 1` (if its scan reaches the page later) or a later
/// one reports it, and no earlier one can. The counter must be read
/// *before* the release: read after it, a worker preempted (or sleeping on
/// its client's lock in `hold_released`) between the release and the read
/// lets any number of harvests start meanwhile, the first of which reports
/// the write and clears the bit, and a count that no harvest can satisfy is
/// demanded when no later write of the page follows (at the end of the
/// run).
#[derive(Clone, Copy, Default, Debug)]
struct Written {
    writes: u64,
    need: u64,
}

impl Written {
    /// A write whose release has not begun; `started` read just now.
    fn releasing(&mut self, started: u64) {
        self.writes += 1;
        self.need = self.need.max(started);
    }

    /// Whether a harvest in `seen` (indices of the harvests that reported
    /// the page) may be the one that reported the last write.
    fn reported_in(need: u64, seen: &[u64]) -> bool {
        seen.iter().any(|&k| k + 1 >= need)
    }
}

/// `(epoch << 8) | object index`, or 0 when nothing is mapped.
fn tag(epoch: u64, obj: usize) -> u64 {
    (epoch << 8) | obj as u64
}

#[test]
fn stress_holds_faults_against_map_unmap_harvest() {
    let s = Arc::new(space_with(1 << 30, npt(), true, 8));
    let r = reservoir(8 * PAGES);
    let objs: Vec<Arc<VmObject>> = (0..4).map(|_| ram(&r, PAGES)).collect();
    let stable = ram(&r, PAGES);
    s.map(&stable, 0, Gpa(SLOT_Y), PAGES * PG, Prot::RW).unwrap();
    let cur_x = Arc::new(AtomicU64::new(tag(1, 0)));
    s.map(&objs[0], 0, Gpa(SLOT_X), PAGES * PG, Prot::RW).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let harvest_started = Arc::new(AtomicU64::new(0));
    // Set once a worker has checked a hold against a mapping that stayed
    // in place: on a loaded machine the administrator's rounds can all
    // run while the workers wait for a CPU, so it goes on until then.
    let checked_any = Arc::new(AtomicBool::new(false));
    // Per stable page: harvests that reported it.
    let reported: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); PAGES as usize]));

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (s, objs, stable, cur_x, stop, harvest_started, checked_any) = (
                s.clone(),
                objs.clone(),
                stable.clone(),
                cur_x.clone(),
                stop.clone(),
                harvest_started.clone(),
                checked_any.clone(),
            );
            std::thread::spawn(move || {
                let c = s.client();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64) << 32;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                // Stable pages.
                let mut written = vec![Written::default(); PAGES as usize];
                // Last value this worker wrote, by frame.
                let mut last: HashMap<u64, u64> = HashMap::new();
                let mut checked = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let page = next() % PAGES;
                    let value = (w as u64) << 56 | i;
                    let off = w * 8;
                    match next() % 4 {
                        0 => {
                            let _ = c.fault(Gpa(SLOT_X + page * PG + 5), Prot::WRITE);
                        }
                        1 => {
                            // Stable region: write and account for the dirty bit.
                            let h = c.hold(Gpa(SLOT_Y + page * PG), Prot::RW).unwrap();
                            assert_eq!(h.pfn(), stable.frame_at(page * PG).unwrap());
                            h.write_u64(off, value).unwrap();
                            assert_eq!(h.read_u64(off).unwrap(), value);
                            last.insert(h.pfn().0, value);
                            written[page as usize].releasing(harvest_started.load(Ordering::SeqCst));
                            assert!(!h.release());
                        }
                        _ => {
                            let before = cur_x.load(Ordering::SeqCst);
                            let Ok(h) = c.hold(Gpa(SLOT_X + page * PG), Prot::RW) else { continue };
                            let after = cur_x.load(Ordering::SeqCst);
                            if before == after && before != 0 {
                                let o = &objs[(before & 0xff) as usize];
                                assert_eq!(h.pfn(), o.frame_at(page * PG).unwrap(), "frame of the mapped object");
                                checked += 1;
                                checked_any.store(true, Ordering::Relaxed);
                            } else {
                                assert!(
                                    objs.iter().any(|o| o.frame_at(page * PG) == Some(h.pfn())),
                                    "frame of one of the objects, at the right offset"
                                );
                            }
                            h.write_u64(off, value).unwrap();
                            // Another worker may unmap-remap meanwhile; the
                            // hold still reaches the same frame.
                            assert_eq!(h.read_u64(off).unwrap(), value);
                            last.insert(h.pfn().0, value);
                            drop(h);
                        }
                    }
                }
                (written, last, checked)
            })
        })
        .collect();

    let admin = {
        let (s, objs, cur_x, stop, harvest_started, reported) =
            (s.clone(), objs.clone(), cur_x.clone(), stop.clone(), harvest_started.clone(), reported.clone());
        std::thread::spawn(move || {
            let mut bitmap = [0u64; 1];
            let mut epoch = 1;
            let mut obj = 0;
            let harvest = |k: &mut u64, bitmap: &mut [u64; 1]| {
                let idx = harvest_started.fetch_add(1, Ordering::SeqCst);
                s.track_dirty(Gpa(SLOT_Y), PAGES * PG, bitmap).unwrap();
                let mut rep = reported.lock().unwrap();
                for p in 0..PAGES {
                    if bit(&bitmap[..], p) {
                        rep[p as usize].push(idx);
                    }
                }
                *k += 1;
            };
            let mut harvests = 0;
            let t0 = std::time::Instant::now();
            let mut round = 0;
            while round < 300 || (!checked_any.load(Ordering::Relaxed) && t0.elapsed().as_secs() < 60) {
                s.unmap(Gpa(SLOT_X), PAGES * PG).unwrap();
                cur_x.store(0, Ordering::SeqCst);
                harvest(&mut harvests, &mut bitmap);
                epoch += 1;
                obj = (obj + 1) % objs.len();
                cur_x.store(tag(epoch, obj), Ordering::SeqCst);
                s.map(&objs[obj], 0, Gpa(SLOT_X), PAGES * PG, Prot::RW).unwrap();
                if round % 3 == 0 {
                    s.populate(Gpa(SLOT_X), PAGES * PG).unwrap();
                }
                round += 1;
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
            harvests
        })
    };

    let harvests = admin.join().unwrap();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // A final harvest sees whatever was released after the last one.
    let mut bitmap = [0u64; 1];
    let last_idx = harvest_started.fetch_add(1, Ordering::SeqCst);
    s.track_dirty(Gpa(SLOT_Y), PAGES * PG, &mut bitmap).unwrap();
    {
        let mut rep = reported.lock().unwrap();
        for p in 0..PAGES {
            if bit(&bitmap, p) {
                rep[p as usize].push(last_idx);
            }
        }
    }
    assert!(harvests >= 300);

    // Every stable page written through a hold is still in the table, with
    // its frame (nothing unmaps the stable region).
    for p in 0..PAGES {
        if results.iter().any(|r| r.0[p as usize].writes > 0) {
            assert_eq!(s.lookup(Gpa(SLOT_Y + p * PG)).map(|l| l.0), stable.frame_at(p * PG), "stable page {p}");
        }
    }
    // Dirty tracking: none lost, none invented, exactly once when written once.
    let rep = reported.lock().unwrap();
    let mut total_checked = 0;
    for p in 0..PAGES as usize {
        let writes: u64 = results.iter().map(|r| r.0[p].writes).sum();
        let need: u64 = results.iter().map(|r| r.0[p].need).max().unwrap();
        let seen = &rep[p];
        if writes == 0 {
            assert!(seen.is_empty(), "page {p} never written but reported");
            continue;
        }
        // The harvest running when the last release began, or a later one.
        if !Written::reported_in(need, seen) {
            let last: Vec<_> = rep.iter().map(|v| v.last().copied()).collect();
            let lk = s.with_table(|t| t.lookup(nested_pt::Gpa(SLOT_Y + p as u64 * PG)));
            panic!(
                "page {p}: written (last needing harvest {need}) but only reported in {seen:?}; \
                 last report of every page: {last:?}; leaf now {lk:?}"
            );
        }
        assert!(seen.len() as u64 <= writes, "page {p} reported more often than written");
        if writes == 1 {
            assert_eq!(seen.len(), 1, "page {p} written once");
        }
    }
    for r in &results {
        total_checked += r.2;
    }
    assert!(total_checked > 0, "some holds were checked against the mapping");

    // Data intact: each worker's last value at its offset in each frame.
    let arena = r.arena();
    for (w, res) in results.iter().enumerate() {
        for (&pfn, &value) in &res.1 {
            let p = arena.host_ptr(Pfn(pfn)).unwrap().as_ptr();
            // SAFETY: the frame belongs to a live object; read through a
            // raw pointer after every thread has finished.
            let got = unsafe { p.add(w * 8).cast::<u64>().read_volatile() };
            assert_eq!(got, value, "worker {w} frame {pfn:#x}");
        }
    }
    drop(rep);
    s.unmap(Gpa(SLOT_X), PAGES * PG).unwrap();
    s.unmap(Gpa(SLOT_Y), PAGES * PG).unwrap();
    assert_eq!(s.resident_count(), 0);
    s.with_table(|t| assert!(t.pages().errors().is_empty()));
}

/// The interleaving the accounting above must accept, replayed on one
/// thread: a worker's release of a stable page, then (the worker preempted
/// before it records anything) two harvests, the first of which reports
/// the page. A count read after the release (2) would demand harvest 1 or
/// later, which cannot report the page; read before it (0), harvest 0
/// qualifies.
#[test]
fn stress_accounting_release_then_preempted_across_harvests() {
    let s = space_with(1 << 30, npt(), true, 8);
    let r = reservoir(PAGES);
    let stable = ram(&r, PAGES);
    s.map(&stable, 0, Gpa(SLOT_Y), PAGES * PG, Prot::RW).unwrap();
    let c = s.client();
    let mut started = 0u64;
    let mut seen = Vec::new();
    let mut w = Written::default();
    let h = c.hold(Gpa(SLOT_Y + 3 * PG), Prot::RW).unwrap();
    h.write_u64(0, 1).unwrap();
    w.releasing(started);
    assert!(!h.release());
    // The worker is preempted here; the administrator harvests twice.
    for _ in 0..2 {
        let idx = started;
        started += 1;
        let mut bitmap = [0u64; 1];
        s.track_dirty(Gpa(SLOT_Y), PAGES * PG, &mut bitmap).unwrap();
        if bit(&bitmap, 3) {
            seen.push(idx);
        }
    }
    assert_eq!(seen, [0], "the first harvest after the release reports it, and clears it");
    assert!(Written::reported_in(w.need, &seen));
    // What the worker would have read after the release.
    let mut late = Written::default();
    late.releasing(started);
    assert!(!Written::reported_in(late.need, &seen), "a count read after the release is too late");
    s.unmap(Gpa(SLOT_Y), PAGES * PG).unwrap();
}

/// Objects are created, mapped, unmapped and dropped by the administrator
/// while workers hold their pages: a hold must keep its object's frames
/// (a frame freed early is zeroed and handed to the next object, which
/// the read-back catches), and every object must be freed once the last
/// hold on it goes (the reservoir fits only a few, so a leak exhausts it).
#[test]
fn stress_objects_dropped_while_held() {
    const OBJ: u64 = 16;
    let s = Arc::new(space_with(1 << 30, npt(), true, 4));
    let r = reservoir(6 * OBJ);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = s.client();
                let (mut held, mut i) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let page = (i * 7 + w as u64) % OBJ;
                    let Ok(h) = c.hold(Gpa(SLOT_X + page * PG), Prot::RW) else { continue };
                    let value = (w as u64) << 56 | i;
                    h.write_u64(w * 8, value).unwrap();
                    for _ in 0..(i % 64) {
                        std::hint::spin_loop();
                    }
                    if i.is_multiple_of(16) {
                        std::thread::yield_now();
                    }
                    assert_eq!(h.read_u64(w * 8).unwrap(), value, "the held frame was freed or reused");
                    held += 1;
                    drop(h);
                }
                held
            })
        })
        .collect();
    for round in 0..2000 {
        let o = match VmObject::ram(r.clone(), OBJ * PG) {
            Ok(o) => o,
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(200));
                panic!("round {round}: {e:?}: objects leak: {:?} after the workers stopped", r.stats());
            }
        };
        s.map(&o, 0, Gpa(SLOT_X), OBJ * PG, Prot::RW).unwrap();
        if round % 2 == 0 {
            s.populate(Gpa(SLOT_X), OBJ * PG).unwrap();
        }
        drop(o);
        std::thread::yield_now();
        s.unmap(Gpa(SLOT_X), OBJ * PG).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let held: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(held > 0);
    assert_eq!(r.stats().allocated, 0, "every object freed after its last hold");
    assert_eq!(s.resident_count(), 0);
}
