//! Swappable objects: lazy backing, swap-out by the accessed-bit clock,
//! swap-in on fault, pinning by holds, dirty state across swapping, and
//! the data path racing the swapper.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use nested_pt::Gpa;
use vmspace::*;

const GIB: u64 = 1 << 30;

fn swap_obj(r: &Arc<HeapReservoir>, pages: u64) -> Arc<VmObject> {
    let f = swap_file_in(&std::env::temp_dir()).unwrap();
    VmObject::swappable(r.clone(), pages * PG, f).unwrap()
}

/// A space of `pages` swappable pages at 0 over a reservoir of `frames`.
fn setup(pages: u64, frames: u64, track: bool) -> (Space, Arc<HeapReservoir>, Arc<VmObject>) {
    let s = space(GIB, track);
    let r = reservoir(frames);
    let o = swap_obj(&r, pages);
    s.map(&o, 0, Gpa(0), pages * PG, Prot::RW).unwrap();
    (s, r, o)
}

fn pattern(page: u64, round: u64) -> u64 {
    0x5157_0000_0000_0000 ^ (page << 20) ^ round
}

fn write_page(c: &VmClient<Pages>, page: u64, v: u64) {
    let h = c.hold(Gpa(page * PG), Prot::RW).unwrap();
    h.write_u64(0, v).unwrap();
    h.write_u64(4088, !v).unwrap();
    h.release();
}

fn read_page(c: &VmClient<Pages>, page: u64) -> (u64, u64) {
    let h = c.hold(Gpa(page * PG), Prot::READ).unwrap();
    let r = (h.read_u64(0).unwrap(), h.read_u64(4088).unwrap());
    h.release();
    r
}

/// Sets the accessed bit of the leaf at `gpa` as a hardware walk would.
fn touch(s: &Space, gpa: u64) {
    // SAFETY: only the accessed bit of a present leaf is set.
    unsafe { s.with_table_raw(|t| t.reset_accessed(Gpa(gpa), true).unwrap()) };
}

#[test]
fn creation_errors_and_lazy_backing() {
    let r = reservoir(4);
    let f = || swap_file_in(&std::env::temp_dir()).unwrap();
    assert_eq!(VmObject::swappable(r.clone(), 0, f()).unwrap_err(), Error::Invalid(Invalid::ZeroLength));
    assert_eq!(VmObject::swappable(r.clone(), 10, f()).unwrap_err(), Error::Invalid(Invalid::Unaligned));
    // Larger than the reservoir, and nothing allocated until touched.
    let o = VmObject::swappable(r.clone(), 64 * PG, f()).unwrap();
    assert!(o.is_swappable() && o.is_ram());
    assert_eq!(r.stats().allocated, 0);
    assert_eq!(o.frame_at(0), None);
    let mut b = [1u8; 16];
    o.read(5 * PG - 8, &mut b).unwrap();
    assert_eq!(b, [0; 16], "never touched reads as zero");
    assert_eq!(o.read(64 * PG - 8, &mut b).unwrap_err(), Error::Invalid(Invalid::OutsideObject));
    // A host write to a never-touched page goes to the swap file.
    o.write(3 * PG + 100, b"swapped").unwrap();
    let mut back = [0u8; 7];
    o.read(3 * PG + 100, &mut back).unwrap();
    assert_eq!(&back, b"swapped");
    assert_eq!(r.stats().allocated, 0);
    assert_eq!(o.swap_stats().unwrap().swapped, 1);
    // A plain RAM object has no swap state.
    assert!(!ram(&r, 1).is_swappable());
    assert!(ram(&r, 1).swap_stats().is_none());
}

#[test]
fn more_memory_than_reservoir_round_trips() {
    let (s, r, o) = setup(64, 16, false);
    let c = s.client();
    for p in 0..64 {
        write_page(&c, p, pattern(p, 1));
        assert!(r.stats().allocated <= 16 * PG);
    }
    for p in (0..64).rev() {
        assert_eq!(read_page(&c, p), (pattern(p, 1), !pattern(p, 1)), "page {p}");
    }
    let st = s.swap_stats();
    assert_eq!(st, o.swap_stats().unwrap());
    assert!(st.swapped_out >= 48, "{st:?}");
    assert!(st.swapped_in >= 48, "{st:?}");
    assert_eq!(st.first_touch, 64);
    assert_eq!(st.resident + st.swapped, 64, "{st:?}");
    assert_eq!(st.resident * PG, r.stats().allocated);
    assert_eq!(st.write_errors, 0);
    assert_eq!(s.resident_count(), present_leaves(&s));
    // The host view sees every page, resident or not, without swapping in.
    let before = s.swap_stats().swapped_in;
    for p in 0..64 {
        let mut w = [0u8; 8];
        o.read(p * PG, &mut w).unwrap();
        assert_eq!(u64::from_le_bytes(w), pattern(p, 1));
    }
    assert_eq!(s.swap_stats().swapped_in, before);
    // Everything goes back to the reservoir with the object.
    s.unmap(Gpa(0), 64 * PG).unwrap();
    drop(o);
    assert_eq!(r.stats().allocated, 0);
}

#[test]
fn vcpu_faults_swap_in_and_neighbours_stay_out() {
    let s = space_with(GIB, npt(), false, 16);
    let r = reservoir(32);
    let o = swap_obj(&r, 64);
    s.map(&o, 0, Gpa(0), 64 * PG, Prot::RW).unwrap();
    o.write(5 * PG, &42u64.to_le_bytes()).unwrap(); // straight into the swap file
    let c = s.client();
    c.fault(Gpa(5 * PG), Prot::READ).unwrap();
    // Only the faulting page became resident: fault-around maps no
    // neighbour without a frame.
    assert_eq!(s.resident_count(), 1);
    assert_eq!(s.swap_stats().swapped_in, 1);
    let (pfn, _) = s.lookup(Gpa(5 * PG)).unwrap();
    assert_eq!(o.frame_at(5 * PG), Some(pfn));
    assert_eq!(read_page(&c, 5).0, 42);
    // Everything out, then two pages in, one fault each.
    assert_eq!(s.swap_out(64).unwrap(), 1);
    assert_eq!(s.resident_count(), 0);
    c.fault(Gpa(0), Prot::READ).unwrap();
    c.fault(Gpa(2 * PG), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), 2);
    // Resident neighbours (frames kept, leaves gone with the unmap) are
    // mapped around a later fault.
    s.unmap(Gpa(0), 64 * PG).unwrap();
    s.map(&o, 0, Gpa(0), 64 * PG, Prot::RW).unwrap();
    c.fault(Gpa(0), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), 2);
    assert!(s.lookup(Gpa(2 * PG)).is_some());
    assert_eq!(s.resident_count(), present_leaves(&s));
}

#[test]
fn clock_spares_accessed_pages_for_a_pass() {
    let (s, _r, o) = setup(8, 8, false);
    let c = s.client();
    for p in 0..8 {
        c.fault(Gpa(p * PG), Prot::READ).unwrap();
    }
    for p in 0..4 {
        touch(&s, p * PG);
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    c.set_invalidation(Some(move |inv: &Invalidation<'_>| {
        if matches!(inv.cause, Cause::Swap) {
            s2.lock().unwrap().push(inv.cleared.map(|f| f.to_vec()).unwrap_or_default());
        }
    }));
    let frames: Vec<Pfn> = (0..8).map(|p| o.frame_at(p * PG).unwrap()).collect();
    let gen0 = s.table_gen();
    assert_eq!(s.swap_out(4).unwrap(), 4);
    // The cold half went; the accessed half lost its bit and stayed.
    for p in 0..8 {
        assert_eq!(s.lookup(Gpa(p * PG)).is_some(), p < 4, "page {p}");
        assert_eq!(o.frame_at(p * PG).is_some(), p < 4);
    }
    let st = s.swap_stats();
    assert_eq!((st.swapped_out, st.aged, st.resident, st.swapped), (4, 4, 4, 4));
    assert!(s.table_gen() > gen0);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "one invalidation per batch");
        let mut told = seen[0].clone();
        told.sort();
        assert_eq!(told, frames, "aged and evicted frames are told");
    }
    s.with_table(|t| {
        for p in 0..4 {
            assert_eq!(t.lookup(Gpa(p * PG)).unwrap().value & npt().accessed_mask(), 0);
        }
    });
    // A pass later, the spared pages are cold too (page 1 touched again).
    touch(&s, PG);
    let mut told = Vec::new();
    assert_eq!(s.swap_out(3).unwrap(), 3);
    assert!(s.lookup(Gpa(PG)).is_some());
    told.extend(seen.lock().unwrap()[1].iter().copied());
    told.sort();
    assert_eq!(told, [0, 1, 2, 3].map(|p| frames[p]));
    assert!(s.swap_stats().clock_passes >= 1);
    assert_eq!(s.resident_count(), present_leaves(&s));
}

#[test]
fn holds_pin_pages() {
    let (s, _r, o) = setup(16, 16, false);
    let c = s.client();
    let other = s.client();
    for p in 0..16 {
        write_page(&c, p, pattern(p, 2));
    }
    let h = other.hold(Gpa(3 * PG), Prot::RW).unwrap();
    let chain = c.hold_range(Gpa(9 * PG), 2 * PG, Prot::READ).unwrap();
    assert_eq!(s.swap_out(16).unwrap(), 13);
    for p in 0..16 {
        assert_eq!(o.frame_at(p * PG).is_some(), [3, 9, 10].contains(&p), "page {p}");
    }
    // The held page is still the held frame, writable through the hold.
    assert_eq!(s.lookup(Gpa(3 * PG)).map(|l| l.0), Some(h.pfn()));
    h.write_u64(8, 99).unwrap();
    assert!(!h.release());
    chain.release();
    assert_eq!(s.swap_out(16).unwrap(), 3);
    assert_eq!(read_page(&c, 3).0, pattern(3, 2));
    let mut w = [0u8; 8];
    o.read(3 * PG + 8, &mut w).unwrap();
    assert_eq!(u64::from_le_bytes(w), 99);
}

#[test]
fn swapped_out_dirty_page_stays_dirty_clean_swap_in_is_not_resent() {
    let (s, _r, _o) = setup(8, 8, true);
    let c = s.client();
    for p in 0..8 {
        write_page(&c, p, pattern(p, 3));
    }
    let mut bm = [0u64; 1];
    // Harvest pages 0..4 now (they become clean), leave 4..8 dirty.
    assert_eq!(s.dirty_op(DirtyOp::Reset, Gpa(0), 4 * PG, None, &mut bm).unwrap(), 4);
    assert_eq!(s.swap_out(8).unwrap(), 8);
    assert_eq!(s.resident_count(), 0);
    assert_eq!(s.swap_stats().swapped_dirty, 4);
    // Get reports the swapped-out dirty pages without clearing them.
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 8 * PG, None, &mut bm).unwrap(), 4);
    assert_eq!(bm[0], 0xf0);
    // Swap the dirty pages and one clean page back in by reading them.
    for p in 3..8 {
        assert_eq!(read_page(&c, p).0, pattern(p, 3));
    }
    // The next harvest reports exactly the pages dirty before swap-out
    // (whether swapped in since or not), and clears them.
    let mut frames = Vec::new();
    assert_eq!(s.track_dirty_frames(Gpa(0), 8 * PG, &mut bm, &mut frames).unwrap(), 4);
    assert_eq!(bm[0], 0xf0);
    assert_eq!(s.swap_stats().swapped_dirty, 0);
    // Swapped in clean and not written since: nothing to re-send.
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm).unwrap(), 0);
    // A swapped-in page written again is dirty again.
    write_page(&c, 3, 1);
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm).unwrap(), 1);
    assert_eq!(bm[0], 1 << 3);
    // A page both dirty in its leaf and swapped-dirty counts once.
    write_page(&c, 2, 5);
    s.swap_out(8).unwrap();
    write_page(&c, 2, 6);
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm).unwrap(), 1);
    assert_eq!(bm[0], 1 << 2);
    // Set marks swapped-out pages of the selection too.
    s.swap_out(8).unwrap();
    assert!(s.lookup(Gpa(6 * PG)).is_none());
    let sel = [0b0100_0100u64];
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(0), 8 * PG, Some(&sel), &mut bm).unwrap(), 2);
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm).unwrap(), 2);
    assert_eq!(bm[0], 0b0100_0100);
}

#[test]
fn unmap_and_remap_keep_swapped_contents() {
    let (s, r, o) = setup(32, 8, false);
    let c = s.client();
    for p in 0..32 {
        write_page(&c, p, pattern(p, 4));
    }
    s.unmap(Gpa(0), 32 * PG).unwrap();
    assert_eq!(s.resident_count(), 0);
    // Mapped elsewhere: the resident and the swapped-out pages come back.
    s.map(&o, 0, Gpa(1 << 20), 32 * PG, Prot::RW).unwrap();
    for p in 0..32 {
        assert_eq!(read_page(&c, (1 << 20) / PG + p).0, pattern(p, 4));
    }
    assert!(r.stats().allocated <= 8 * PG);
}

#[test]
fn exhausted_reservoir_with_everything_pinned_fails_cleanly() {
    let (s, _r, o) = setup(8, 2, false);
    let c = s.client();
    let h0 = c.hold(Gpa(0), Prot::RW).unwrap();
    let h1 = c.hold(Gpa(PG), Prot::RW).unwrap();
    assert_eq!(c.hold(Gpa(2 * PG), Prot::RW).unwrap_err(), Error::ReservoirFull);
    assert_eq!(c.fault(Gpa(2 * PG), Prot::READ).unwrap_err(), Error::ReservoirFull);
    assert_eq!(o.frame_at(2 * PG), None);
    assert_eq!(s.resident_count(), 2);
    drop((h0, h1));
    c.fault(Gpa(2 * PG), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), present_leaves(&s));
}

#[test]
fn swap_out_from_guest_context_is_refused() {
    let (s, _r, _o) = setup(4, 4, false);
    let c = s.client();
    c.fault(Gpa(0), Prot::READ).unwrap();
    let on = c.table_enter(0).unwrap();
    assert_eq!(s.swap_out(4).unwrap_err(), Error::SelfDeadlock);
    on.exit();
    assert_eq!(s.swap_out(4).unwrap(), 1);
}

/// Threads write and check their own pages through holds and faults while
/// a swapper thread evicts back to back; a vCPU-like client in guest
/// context is kicked by every batch.
#[test]
fn data_path_races_the_swapper() {
    const THREADS: u64 = 3;
    const PER: u64 = 48;
    let s = Arc::new(space_with(GIB, npt(), true, 8));
    let r = reservoir(40);
    // One more range of PER pages, written and read only by the host
    // (through the object: frames, or the swap file) meanwhile.
    let o = swap_obj(&r, (THREADS + 1) * PER);
    s.map(&o, 0, Gpa(0), (THREADS + 1) * PER * PG, Prot::RW).unwrap();
    let host = {
        let (o, s) = (o.clone(), s.clone());
        std::thread::spawn(move || {
            // Some of its pages faulted in, so that host copies meet
            // resident, swapped-out and never-touched pages.
            let c = s.client();
            for round in 1..=30u64 {
                for i in 0..PER {
                    if (i + round) % 4 == 0 {
                        c.fault(Gpa((THREADS * PER + i) * PG), Prot::READ).unwrap();
                    }
                    let off = (THREADS * PER + i) * PG + 8 * (round % 8);
                    let v = pattern(i, round);
                    o.write(off, &v.to_le_bytes()).unwrap();
                    let mut w = [0u8; 8];
                    o.read(off, &mut w).unwrap();
                    assert_eq!(u64::from_le_bytes(w), v);
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += s.swap_out(8).unwrap();
            }
            n
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let c = s.client();
                let mut last = vec![0u64; PER as usize];
                for round in 1..=30u64 {
                    for i in 0..PER {
                        let p = t * PER + i;
                        if (i + round) % 3 == 0 {
                            c.fault(Gpa(p * PG), Prot::WRITE).unwrap();
                            continue;
                        }
                        let h = match c.hold(Gpa(p * PG), Prot::RW) {
                            Ok(h) => h,
                            Err(e) => panic!("{e:?} {:?} {:?}", s.swap_stats(), s.resident_count()),
                        };
                        assert_eq!(h.read_u64(0).unwrap(), last[i as usize], "page {p}");
                        let v = pattern(p, round);
                        h.write_u64(0, v).unwrap();
                        h.release();
                        last[i as usize] = v;
                    }
                }
                last
            })
        })
        .collect();
    let lasts: Vec<Vec<u64>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    host.join().unwrap();
    // The host's last round is intact too.
    for i in 0..PER {
        let mut w = [0u8; 8];
        o.read((THREADS * PER + i) * PG + 8 * (30 % 8), &mut w).unwrap();
        assert_eq!(u64::from_le_bytes(w), pattern(i, 30));
    }
    stop.store(true, Ordering::Relaxed);
    let evicted = swapper.join().unwrap();
    assert!(evicted > 0);
    for (t, last) in lasts.iter().enumerate() {
        for (i, v) in last.iter().enumerate() {
            let mut w = [0u8; 8];
            o.read((t as u64 * PER + i as u64) * PG, &mut w).unwrap();
            assert_eq!(u64::from_le_bytes(w), *v);
        }
    }
    let st = s.swap_stats();
    assert!(st.swapped_out > 0 && st.swapped_in > 0, "{st:?}");
    assert_eq!(st.resident * PG, r.stats().allocated);
    assert_eq!(s.resident_count(), present_leaves(&s));
    // Every page was written (held writable) since the last harvest.
    let mut bm = vec![0u64; (THREADS * PER).div_ceil(64) as usize];
    assert_eq!(s.track_dirty(Gpa(0), THREADS * PER * PG, &mut bm).unwrap(), THREADS * PER);
}

#[test]
fn vcpu_in_guest_context_is_kicked_before_frames_are_freed() {
    let (s, _r, o) = setup(4, 4, false);
    let s = Arc::new(s);
    let v = s.client();
    v.fault(Gpa(0), Prot::READ).unwrap();
    let kicked = Arc::new(AtomicBool::new(false));
    let k2 = kicked.clone();
    v.set_kick(Some(move |_cpu: u32| k2.store(true, Ordering::SeqCst)));
    let (tx, rx) = std::sync::mpsc::channel();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    let vcpu = std::thread::spawn(move || {
        let on = v.table_enter(1).unwrap();
        tx.send(()).unwrap();
        // "Guest context" until kicked.
        back_rx.recv().unwrap();
        on.exit();
    });
    rx.recv().unwrap();
    let s2 = s.clone();
    let swapper = std::thread::spawn(move || s2.swap_out(4).unwrap());
    while !kicked.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // The frame is not freed while the vCPU may still translate to it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(o.swap_stats().unwrap().swapped_out, 0);
    assert!(!swapper.is_finished());
    back_tx.send(()).unwrap();
    assert_eq!(swapper.join().unwrap(), 1);
    vcpu.join().unwrap();
    assert_eq!(o.frame_at(0), None);
}
