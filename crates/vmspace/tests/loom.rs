//! loom models of the client protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmspace --test loom --release`.
//!
//! - an unmap racing a hold (and its release);
//! - an invalidation racing a vCPU entering guest context;
//! - the destruction of the space racing the destruction of a client;
//! - a harvest that clears a bit racing a vCPU entering guest context and
//!   another client's hold and release (the harvest holds no client).
//!
//! What loom sees: the protocol's atomics (`active`, `state`, generations,
//! sequence numbers, the held-page records) and the space's data and
//! client cells (loom cells, so an exclusive access overlapping a shared
//! one is reported). What it does not: the table entries, which are
//! `core` atomics inside `nested-pt` (their orderings are not explored:
//! every entry change is a compare-and-swap or read-modify-write, and the
//! entries are reached only under the protocol's exclusion, which loom
//! does check), and a client's mapping cache, plain cells private to the
//! owning thread (never shared, so there is nothing to interleave; its
//! validity rests on the map sequence, which loom sees).
#![cfg(loom)]

use std::sync::Arc as StdArc;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use nested_pt::{Caps, CountingPages, HeapPages};
use vmspace::*;

const PG: u64 = PAGE_SIZE;

type Space = VmSpace<CountingPages<HeapPages>>;

fn space(track: bool) -> Space {
    let mut cfg = SpaceConfig::new(1 << 30, PteFormat::npt(Caps::default()));
    cfg.track_dirty = track;
    cfg.fault_around = 1;
    VmSpace::new(cfg, CountingPages::new(HeapPages::with_capacity(0x100, 16))).unwrap()
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

#[test]
fn unmap_races_hold() {
    model(|| {
        let r = StdArc::new(HeapReservoir::new(2 * PG, Pfn(0x1000)).unwrap());
        let o = VmObject::ram(r.clone(), PG).unwrap();
        let s = Arc::new(space(true));
        s.map(&o, 0, Gpa(0x10 * PG), PG, Prot::RW).unwrap();
        drop(o);
        let client = s.client();
        // Set by the unmap's invalidation of this client: after the entry
        // was cleared (and after the hold was retired).
        let invalidated = Arc::new(AtomicBool::new(false));
        {
            let inv = invalidated.clone();
            client.set_invalidation(Some(move |_: &Invalidation<'_>| inv.store(true, Ordering::SeqCst)));
        }
        let admin = {
            let s = s.clone();
            loom::thread::spawn(move || s.unmap(Gpa(0x10 * PG), PG).unwrap())
        };
        let outcome = match client.hold(Gpa(0x10 * PG), Prot::RW) {
            Ok(h) => {
                // The object is alive whatever the unmap does meanwhile.
                h.write_u64(0, 7).unwrap();
                assert_eq!(h.read_u64(0).unwrap(), 7);
                assert_eq!(r.stats().allocated, PG);
                // Once the unmap has invalidated this client, the release
                // must report it (and so not touch the cleared entry).
                let done_before = invalidated.load(Ordering::SeqCst);
                let unmapped = h.release();
                assert!(unmapped || !done_before, "release after the unmap did not report it");
                Some(unmapped)
            }
            Err(e) => {
                assert_eq!(e, Error::NoMapping);
                None
            }
        };
        admin.join().unwrap();
        // After the unmap: nothing resident, tables vacated, object gone.
        assert_eq!(s.resident_count(), 0);
        s.with_table(|t| {
            assert_eq!(t.pages().live(), 1);
            assert!(t.pages().errors().is_empty());
        });
        assert_eq!(r.stats().allocated, 0);
        let _ = outcome;
        drop(client);
    });
}

#[test]
fn invalidation_races_vcpu_entry() {
    model(|| {
        let r = StdArc::new(HeapReservoir::new(PG, Pfn(0x1000)).unwrap());
        let o = VmObject::ram(r, PG).unwrap();
        let s = Arc::new(space(false));
        s.map(&o, 0, Gpa(0), PG, Prot::RW).unwrap();
        s.populate(Gpa(0), PG).unwrap();
        let old_gen = s.table_gen();
        // The vCPU records whether it is in guest context with a stale
        // generation; the unmap must not return while that is so.
        let stale = Arc::new(AtomicBool::new(false));
        let kicks = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (s, stale, kicks) = (s.clone(), stale.clone(), kicks.clone());
            loom::thread::spawn(move || {
                let c = s.client();
                let k = kicks.clone();
                c.set_kick(Some(move |_| {
                    k.fetch_add(1, Ordering::SeqCst);
                }));
                let g = c.table_enter(0).unwrap();
                if g.generation() == old_gen {
                    stale.store(true, Ordering::SeqCst);
                    // In guest context on the old generation: stay until
                    // kicked. A lost kick leaves this thread spinning and
                    // the unmap waiting, which loom reports.
                    while kicks.load(Ordering::SeqCst) == 0 {
                        loom::thread::yield_now();
                    }
                }
                // Leave guest context.
                stale.store(false, Ordering::SeqCst);
                g.exit();
            })
        };
        s.unmap(Gpa(0), PG).unwrap();
        assert!(!stale.load(Ordering::SeqCst), "unmap returned with a vCPU on a stale generation");
        assert!(s.table_gen() > old_gen);
        vcpu.join().unwrap();
    });
}

#[test]
fn space_destruction_races_client_destruction() {
    model(|| {
        let r = StdArc::new(HeapReservoir::new(PG, Pfn(0x1000)).unwrap());
        let o = VmObject::ram(r.clone(), PG).unwrap();
        let s = space(true);
        s.map(&o, 0, Gpa(0), PG, Prot::RW).unwrap();
        drop(o);
        let c = s.client();
        let c2 = c.clone();
        let t = loom::thread::spawn(move || {
            // The client may or may not be orphaned by now.
            match c.fault(Gpa(0), Prot::READ) {
                Ok(()) | Err(Error::Orphaned) => {}
                Err(e) => panic!("unexpected {e:?}"),
            }
            drop(c);
        });
        drop(s);
        t.join().unwrap();
        assert!(c2.is_orphaned());
        drop(c2);
        assert_eq!(r.stats().allocated, 0);
    });
}

#[test]
fn map_races_fault_and_release() {
    // A map (which changes the table structure and the mapping map under
    // exclusive access) against a client faulting and releasing a writable
    // hold on another mapping: loom's cell tracking reports any overlap of
    // the exclusive access with the client's shared access.
    model(|| {
        let r = StdArc::new(HeapReservoir::new(2 * PG, Pfn(0x1000)).unwrap());
        let a = VmObject::ram(r.clone(), PG).unwrap();
        let b = VmObject::ram(r, PG).unwrap();
        let s = Arc::new(space(true));
        s.map(&a, 0, Gpa(0), PG, Prot::RW).unwrap();
        let client = s.client();
        let admin = {
            let s = s.clone();
            loom::thread::spawn(move || s.map(&b, 0, Gpa(1 << 30 >> 1), PG, Prot::RW).unwrap())
        };
        let h = client.hold(Gpa(0), Prot::RW).unwrap();
        h.write_u64(0, 1).unwrap();
        assert!(!h.release());
        admin.join().unwrap();
        let mut bm = [0u64];
        assert_eq!(s.track_dirty(Gpa(0), PG, &mut bm), Ok(1));
        client.fault(Gpa(1 << 30 >> 1), Prot::WRITE).unwrap();
        assert_eq!(s.resident_count(), 2);
    });
}

#[test]
fn harvest_races_vcpu_entry_and_hold() {
    // A harvest clears a dirty bit without holding any client: it must
    // not return while a vCPU is in guest context on the generation from
    // before the clear, and another client's hold and release run
    // alongside (loom's cell tracking would report an exclusive access).
    model(|| {
        let r = StdArc::new(HeapReservoir::new(2 * PG, Pfn(0x1000)).unwrap());
        let o = VmObject::ram(r, 2 * PG).unwrap();
        let s = Arc::new(space(true));
        s.map(&o, 0, Gpa(0), 2 * PG, Prot::RW).unwrap();
        s.populate(Gpa(0), 2 * PG).unwrap();
        let data = s.client();
        data.hold(Gpa(0), Prot::RW).unwrap().release();
        let old_gen = s.table_gen();
        let stale = Arc::new(AtomicBool::new(false));
        let kicks = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (s, stale, kicks) = (s.clone(), stale.clone(), kicks.clone());
            loom::thread::spawn(move || {
                let c = s.client();
                let k = kicks.clone();
                c.set_kick(Some(move |_| {
                    k.fetch_add(1, Ordering::SeqCst);
                }));
                let g = c.table_enter(0).unwrap();
                if g.generation() == old_gen {
                    stale.store(true, Ordering::SeqCst);
                    while kicks.load(Ordering::SeqCst) == 0 {
                        loom::thread::yield_now();
                    }
                }
                stale.store(false, Ordering::SeqCst);
                g.exit();
            })
        };
        let holder = loom::thread::spawn(move || {
            let h = data.hold(Gpa(PG), Prot::RW).unwrap();
            h.write_u64(0, 1).unwrap();
            assert!(!h.release());
            data
        });
        let mut bm = [0u64];
        let n = s.track_dirty(Gpa(0), 2 * PG, &mut bm).unwrap();
        assert!(n >= 1 && bm[0] & 1 == 1, "page 0 was dirty");
        assert!(!stale.load(Ordering::SeqCst), "harvest returned with a vCPU on a stale generation");
        assert_eq!(s.table_gen(), old_gen + 1);
        let data = holder.join().unwrap();
        vcpu.join().unwrap();
        // Page 1's mark is either in the first harvest or in this one.
        let mut bm2 = [0u64];
        s.track_dirty(Gpa(0), 2 * PG, &mut bm2).unwrap();
        assert_eq!((bm[0] | bm2[0]) & 2, 2, "the release's dirty bit was lost");
        assert_eq!(bm2[0] & 1, 0);
        drop(data);
    });
}
