//! Large-leaf benchmarks. Run with
//! `cargo bench -p vmspace --bench large -- --warm-up-time 1 --measurement-time 3`.
//!
//! - `first_touch_1g/{4k,2m}`: a guest touching each 4 KiB page of 1 GiB
//!   once, in order: a nested fault (`VmClient::fault`, default
//!   fault-around of 16 pages) wherever the page is not present yet, a
//!   software hardware walk otherwise; 4 KiB leaves against 2 MiB leaves
//!   (`SpaceConfig::large_leaves`), and `4k_fa1` with 4 KiB leaves and no
//!   fault-around (`SpaceConfig::fault_around = 1`). The nested-fault counts and the time
//!   spent handling them are printed (the software walk of every page,
//!   which hardware does on TLB misses, dominates the total).
//! - `split/{eager,lazy}/{4g,16g}/switch_on`: `set_dirty_tracking(true)`
//!   over RAM mapped with 2 MiB leaves (the eager split, or the lazy
//!   write-protect).
//! - `split/{eager,lazy}/{4g,16g}/write_all`: the guest then writing
//!   every 4 KiB page of its memory once, in order (with the lazy split
//!   the first write to each 2 MiB faults and splits; with the eager one
//!   every write finds its small leaf). A write is
//!   `nested_pt::mmu::translate` for a write (the walk the hardware does
//!   on a TLB miss, setting accessed/dirty), then a fault where it
//!   faults: a guest on real hardware pays the walk once per TLB miss,
//!   not per write, so the software walk dilutes the ratio. The ratios
//!   are printed (`split_report`).
//! - `promote_2m_x{32,512}`: `VmSpace::promote` of 2 MiB of 512 present
//!   small leaves (one scan of the leaf table, the store, the freeing,
//!   one invalidation per call), over 64 MiB or 1 GiB at a time;
//!   throughput in 2 MiB ranges.
//! - `auto_promote_2m_x32/{auto,no_auto}/filling_fault`: the fault that
//!   fills a leaf table (its last fault-around window, after the others
//!   were faulted untimed), in a range mapped while tracking was on and
//!   tracking off again, with and without `SpaceConfig::auto_promote`;
//!   the difference per 2 MiB is the automatic promotion (printed).
//! - `refill_1g/{auto,no_auto}`: the guest writing every 4 KiB page of
//!   1 GiB of runs once, in order, after they were mapped while tracking
//!   was on (so populated for 4 KiB leaves) and tracking went off: with
//!   `SpaceConfig::auto_promote` the fault that fills a leaf table
//!   promotes it, without it every page stays a 4 KiB leaf. The
//!   nested-fault counts, the time in them, the promotions, the table
//!   pages left and a second pass over the range (walks only) are
//!   printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nested_pt::{Access, Caps, Gpa, HeapPages, mmu};
use vmspace::*;

const PG: u64 = PAGE_SIZE;
const M2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

fn space(size: u64, large: bool, split: SplitPolicy) -> VmSpace<HeapPages> {
    space_fa(size, large, split, None)
}

/// As `space`, with a fault-around window of `fault_around` pages instead
/// of the default.
fn space_fa(size: u64, large: bool, split: SplitPolicy, fault_around: Option<u32>) -> VmSpace<HeapPages> {
    let mut cfg = SpaceConfig::new(size, PteFormat::npt(Caps::default()));
    if let Some(n) = fault_around {
        cfg.fault_around = n;
    }
    cfg.large_leaves = large;
    // 2 MiB leaves against 4 KiB ones (1 GiB leaves: `benches/huge.rs`).
    cfg.huge_leaves = false;
    cfg.split = split;
    VmSpace::new(cfg, HeapPages::new()).unwrap()
}

fn ram(bytes: u64) -> Arc<VmObject> {
    // Frame base 2 MiB-aligned: every 2 MiB of the object is one run. A
    // memfd, so that freeing 16 GiB punches holes instead of zeroing it.
    let r = Arc::new(MemfdReservoir::new(bytes, Pfn(0x10_0000)).unwrap());
    VmObject::ram(r, bytes).unwrap()
}

/// The hardware's write to `gpa`: `true` when it went through.
fn hw(t: &nested_pt::NestedTable<HeapPages>, gpa: u64, access: Access) -> bool {
    mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(gpa), access, true).is_ok()
}

/// Touch every page of `[0, len)` once as a guest would; returns the
/// nested faults taken.
fn touch_all(s: &VmSpace<HeapPages>, c: &VmClient<HeapPages>, len: u64, access: Access, step: u64) -> u64 {
    touch_all_timed(s, c, len, access, step).0
}

/// As `touch_all`, also returning the time spent in the nested faults.
fn touch_all_timed(
    s: &VmSpace<HeapPages>,
    c: &VmClient<HeapPages>,
    len: u64,
    access: Access,
    step: u64,
) -> (u64, Duration) {
    let mut in_faults = Duration::ZERO;
    let mut faults = 0;
    let prot = if access == Access::Write { Prot::WRITE } else { Prot::READ };
    let mut g = 0;
    while g < len {
        // SAFETY: the hardware walk only sets accessed/dirty bits.
        let ok = unsafe { s.with_table_raw(|t| hw(t, g, access)) };
        if !ok {
            let t0 = Instant::now();
            c.fault(Gpa(g), prot).unwrap();
            in_faults += t0.elapsed();
            faults += 1;
            // SAFETY: as above.
            assert!(unsafe { s.with_table_raw(|t| hw(t, g, access)) });
        }
        g += step;
    }
    (faults, in_faults)
}

fn first_touch(c: &mut Criterion) {
    let mut g = c.benchmark_group("first_touch_1g");
    g.throughput(Throughput::Bytes(GIB));
    g.sample_size(10);
    let o = ram(GIB);
    // 4 KiB leaves with the default fault-around window (16 pages) and
    // with none (one page per fault, what a 2 MiB leaf's fault replaces).
    for (name, large, fa) in [("4k", false, None), ("4k_fa1", false, Some(1)), ("2m", true, None)] {
        let s = space_fa(4 * GIB, large, SplitPolicy::Eager, fa);
        let client = s.client();
        let mut faults = 0;
        let mut in_faults = Vec::new();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    s.map(&o, 0, Gpa(0), GIB, Prot::RW).unwrap();
                    let t0 = Instant::now();
                    let (f, d) = touch_all_timed(&s, &client, GIB, Access::Write, PG);
                    t += t0.elapsed();
                    faults = f;
                    in_faults.push(d);
                    s.unmap(Gpa(0), GIB).unwrap();
                }
                t
            })
        });
        eprintln!(
            "first_touch_1g/{name}: {faults} nested faults, {:.3} ms in them (median)",
            median(&mut in_faults).as_secs_f64() * 1e3
        );
    }
    g.finish();
}

/// A space of `bytes` of RAM mapped with 2 MiB leaves, populated.
fn large_space(bytes: u64, split: SplitPolicy, o: &Arc<VmObject>) -> VmSpace<HeapPages> {
    let s = space(bytes + GIB, true, split);
    s.map(o, 0, Gpa(0), bytes, Prot::RW).unwrap();
    s.populate(Gpa(0), bytes).unwrap();
    s
}

fn split(c: &mut Criterion) {
    let mut g = c.benchmark_group("split");
    g.sample_size(10);
    let mut medians: Vec<(String, Duration)> = Vec::new();
    for (gname, bytes) in [("4g", 4 * GIB), ("16g", 16 * GIB)] {
        let o = ram(bytes);
        for (pname, policy) in [("eager", SplitPolicy::Eager), ("lazy", SplitPolicy::Lazy)] {
            let mut on = Vec::new();
            let mut write = Vec::new();
            g.bench_function(format!("{pname}/{gname}/switch_on"), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let s = large_space(bytes, policy, &o);
                        let t0 = Instant::now();
                        s.set_dirty_tracking(true).unwrap();
                        let d = t0.elapsed();
                        on.push(d);
                        t += d;
                    }
                    t
                })
            });
            g.bench_function(format!("{pname}/{gname}/write_all"), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let s = large_space(bytes, policy, &o);
                        s.set_dirty_tracking(true).unwrap();
                        let client = s.client();
                        let t0 = Instant::now();
                        touch_all(&s, &client, bytes, Access::Write, PG);
                        let d = t0.elapsed();
                        write.push(d);
                        t += d;
                    }
                    t
                })
            });
            medians.push((format!("{pname}/{gname}/switch_on"), median(&mut on)));
            medians.push((format!("{pname}/{gname}/write_all"), median(&mut write)));
        }
    }
    g.finish();
    let get = |k: &str| medians.iter().find(|(n, _)| n == k).map(|(_, d)| d.as_secs_f64()).unwrap_or(f64::NAN);
    for gname in ["4g", "16g"] {
        eprintln!(
            "split_report {gname}: switch_on eager {:.3} ms lazy {:.3} ms (lazy/eager {:.2}); write_all eager {:.3} ms lazy {:.3} ms (lazy/eager {:.2})",
            get(&format!("eager/{gname}/switch_on")) * 1e3,
            get(&format!("lazy/{gname}/switch_on")) * 1e3,
            get(&format!("lazy/{gname}/switch_on")) / get(&format!("eager/{gname}/switch_on")),
            get(&format!("eager/{gname}/write_all")) * 1e3,
            get(&format!("lazy/{gname}/write_all")) * 1e3,
            get(&format!("lazy/{gname}/write_all")) / get(&format!("eager/{gname}/write_all")),
        );
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn promote(c: &mut Criterion) {
    promote_n(c, 32);
    promote_n(c, 512);
}

fn promote_n(c: &mut Criterion, chunks: u64) {
    let mut g = c.benchmark_group(format!("promote_2m_x{chunks}"));
    g.throughput(Throughput::Elements(chunks));
    g.sample_size(20);
    let o = ram(chunks * M2);
    let s = space(4 * GIB, true, SplitPolicy::Eager);
    s.map(&o, 0, Gpa(0), chunks * M2, Prot::RW).unwrap();
    s.populate(Gpa(0), chunks * M2).unwrap();
    g.bench_function("per_2m", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                // Split (tracking on and off), then time the promotion.
                s.set_dirty_tracking(true).unwrap();
                s.set_dirty_tracking(false).unwrap();
                let t0 = Instant::now();
                assert_eq!(s.promote(Gpa(0), chunks * M2).unwrap(), chunks);
                t += t0.elapsed();
            }
            t
        })
    });
    g.finish();
}

/// A space of `LEN`-sized RAM whose automatic promotion is `auto`: `o`
/// mapped at 0 while tracking is on (so populated for 4 KiB leaves) and
/// tracking off again, nothing resident.
fn refill_space(o: &Arc<VmObject>, len: u64, auto: bool) -> VmSpace<HeapPages> {
    let mut cfg = SpaceConfig::new(4 * GIB, PteFormat::npt(Caps::default()));
    cfg.auto_promote = auto;
    let s = VmSpace::new(cfg, HeapPages::new()).unwrap();
    s.set_dirty_tracking(true).unwrap();
    s.map(o, 0, Gpa(0), len, Prot::RW).unwrap();
    s.set_dirty_tracking(false).unwrap();
    s
}

fn refill(c: &mut Criterion) {
    let mut g = c.benchmark_group("refill_1g");
    g.throughput(Throughput::Bytes(GIB));
    g.sample_size(10);
    let o = ram(GIB);
    for (name, auto) in [("auto", true), ("no_auto", false)] {
        let mut faults = 0;
        let mut in_faults = Vec::new();
        let mut again = Vec::new();
        let (mut promoted, mut tables) = (0, 0);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = refill_space(&o, GIB, auto);
                    let client = s.client();
                    let t0 = Instant::now();
                    let (f, d) = touch_all_timed(&s, &client, GIB, Access::Write, PG);
                    t += t0.elapsed();
                    faults = f;
                    in_faults.push(d);
                    // The second pass: every page mapped, only the walks.
                    let t1 = Instant::now();
                    assert_eq!(touch_all(&s, &client, GIB, Access::Write, PG), 0);
                    again.push(t1.elapsed());
                    promoted = s.promotions().automatic;
                    tables = s.with_table(|t| t.table_pages());
                }
                t
            })
        });
        eprintln!(
            "refill_1g/{name}: {faults} nested faults, {:.3} ms in them (median), {promoted} promotions, \
             {tables} table pages after; second pass (walks only) {:.3} ms (median)",
            median(&mut in_faults).as_secs_f64() * 1e3,
            median(&mut again).as_secs_f64() * 1e3,
        );
    }
    g.finish();
}

/// The cost of an automatic promotion: the fault that fills a leaf
/// table (its last fault-around window) timed alone, with and without
/// `auto_promote`, over 32 ranges of 2 MiB per iteration; the difference
/// per range is the promotion (the note, the administrative change, the
/// invalidation).
fn auto_promote(c: &mut Criterion) {
    const CHUNKS: u64 = 32;
    let mut g = c.benchmark_group("auto_promote_2m_x32");
    g.throughput(Throughput::Elements(CHUNKS));
    g.sample_size(20);
    let o = ram(CHUNKS * M2);
    let mut per = Vec::new();
    for (name, auto) in [("auto", true), ("no_auto", false)] {
        let mut last = Vec::new();
        g.bench_function(format!("{name}/filling_fault"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = refill_space(&o, CHUNKS * M2, auto);
                    let client = s.client();
                    let mut d = Duration::ZERO;
                    for k in 0..CHUNKS {
                        let base = k * M2;
                        // All windows but the last (16 pages each), untimed.
                        for p in (0..512 - 16).step_by(16) {
                            client.fault(Gpa(base + p * PG), Prot::WRITE).unwrap();
                        }
                        let t0 = Instant::now();
                        client.fault(Gpa(base + 511 * PG), Prot::WRITE).unwrap();
                        d += t0.elapsed();
                    }
                    assert_eq!(s.promotions().automatic, if auto { CHUNKS } else { 0 });
                    last.push(d);
                    t += d;
                }
                t
            })
        });
        per.push(median(&mut last).as_secs_f64() / CHUNKS as f64);
    }
    g.finish();
    eprintln!(
        "auto_promote_2m: the filling fault {:.3} us with auto_promote, {:.3} us without (median); \
         automatic promotion {:.3} us per 2 MiB",
        per[0] * 1e6,
        per[1] * 1e6,
        (per[0] - per[1]) * 1e6
    );
}

criterion_group!(benches, first_touch, split, promote, auto_promote, refill);
criterion_main!(benches);
