//! vmspace benchmarks. Run with
//! `cargo bench -p vmspace --bench vmspace -- --warm-up-time 1 --measurement-time 3`.
//!
//! - `fault_in_1g`: fault every page of 1 GiB through one client (default
//!   fault-around window); throughput in pages.
//! - `hold_release/{1,2}_threads`: hold + release of a writable page with
//!   dirty tracking on, each thread through its own client; throughput in
//!   hold+release pairs (the 2/1 ratio is printed by `scaling_report`).
//! - `hold_under_harvest/{quiet,harvesting}`: hold + release of a
//!   writable page on one thread, alone and while another thread harvests
//!   (`track_dirty`) the 16 MiB around it back to back; every harvest
//!   finds that page dirty again, so each clears a bit and invalidates.
//!   `harvest_report` prints both rates from one run and their ratio.
//! - `devmem_map_unmap_16m`: map + unmap of a 16 MiB device-memory object
//!   while another thread holds and releases pages without pause.
//! - `harvest/{vmspace,nested_pt}/{1g,16g}`: read-and-clear of dirty bits
//!   with 10% of pages dirty, through `VmSpace::track_dirty` and through
//!   `NestedTable::harvest_dirty` alone on the same table.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nested_pt::{Caps, Gpa, HeapPages};
use vmspace::*;

const PG: u64 = PAGE_SIZE;
const GIB: u64 = 1 << 30;

fn space(size: u64, track: bool) -> VmSpace<HeapPages> {
    let mut cfg = SpaceConfig::new(size, PteFormat::npt(Caps::default()));
    cfg.track_dirty = track;
    // 4 KiB leaves, as these figures always measured (large leaves:
    // `benches/large.rs`).
    cfg.large_leaves = false;
    VmSpace::new(cfg, HeapPages::new()).unwrap()
}

fn ram(bytes: u64) -> Arc<VmObject> {
    let r = Arc::new(HeapReservoir::new(bytes, Pfn(0x10_0000)).unwrap());
    VmObject::ram(r, bytes).unwrap()
}

fn fault_in(c: &mut Criterion) {
    let pages = GIB / PG;
    let mut g = c.benchmark_group("fault_in_1g");
    g.throughput(Throughput::Elements(pages));
    g.sample_size(10);
    let mut setup = None;
    g.bench_function("one_client", |b| {
        let (s, o) = setup.get_or_insert_with(|| (space(2 * GIB, false), ram(GIB)));
        let client = s.client();
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                s.map(o, 0, Gpa(0), GIB, Prot::RW).unwrap();
                let t0 = Instant::now();
                for p in 0..pages {
                    client.fault(Gpa(p * PG), Prot::WRITE).unwrap();
                }
                t += t0.elapsed();
                s.unmap(Gpa(0), GIB).unwrap();
            }
            t
        })
    });
    g.finish();
}

/// Time `iters` hold+release pairs on each of `threads` threads (each with
/// its own client and its own page); returns the wall time.
fn hold_release_run(s: &VmSpace<HeapPages>, threads: u64, iters: u64) -> Duration {
    let start = Arc::new(AtomicBool::new(false));
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let client = s.client();
                let start = start.clone();
                sc.spawn(move || {
                    let gpa = (i * 64) * PG;
                    client.hold(Gpa(gpa), Prot::RW).unwrap();
                    while !start.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        let h = client.hold(black_box(Gpa(gpa)), Prot::RW).unwrap();
                        black_box(&h);
                        drop(h);
                    }
                    t0.elapsed()
                })
            })
            .collect();
        start.store(true, Ordering::Release);
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

/// Whether the command line's filter (if any) selects `id`: setups that
/// are too heavy to run for nothing check it.
fn wanted(id: &str) -> bool {
    let mut it = std::env::args().skip(1).peekable();
    let mut filters = Vec::new();
    while let Some(a) = it.next() {
        if a.starts_with("--") {
            // Options that take a value.
            if matches!(
                a.as_str(),
                "--warm-up-time" | "--measurement-time" | "--sample-size" | "--save-baseline" | "--baseline"
            ) {
                it.next();
            }
            continue;
        }
        filters.push(a);
    }
    filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()) || f.split('|').any(|p| id.contains(p)))
}

fn hold_release(c: &mut Criterion) {
    if !wanted("hold_release/1_threads") && !wanted("hold_release/2_threads") {
        return;
    }
    let s = space(GIB, true);
    let o = ram(16 << 20);
    s.map(&o, 0, Gpa(0), 16 << 20, Prot::RW).unwrap();
    s.populate(Gpa(0), 16 << 20).unwrap();
    let mut g = c.benchmark_group("hold_release");
    for threads in [1u64, 2] {
        g.throughput(Throughput::Elements(threads));
        g.bench_function(format!("{threads}_threads"), |b| b.iter_custom(|iters| hold_release_run(&s, threads, iters)));
    }
    g.finish();
    // One run, both figures: the ratio is only meaningful measured together.
    let n = 20_000_000;
    let mut best = [f64::MAX; 2];
    for _ in 0..3 {
        for (i, threads) in [1u64, 2].into_iter().enumerate() {
            let t = hold_release_run(&s, threads, n).as_secs_f64();
            best[i] = best[i].min(t);
        }
    }
    let r1 = n as f64 / best[0];
    let r2 = 2.0 * n as f64 / best[1];
    println!(
        "scaling_report: hold+release 1 thread {:.1} ns/op ({:.1} M/s); 2 threads {:.1} M/s; ratio 2/1 = {:.2}",
        1e9 / r1,
        r1 / 1e6,
        r2 / 1e6,
        r2 / r1
    );
}

/// Time `iters` hold+release pairs of a writable page on one thread; with
/// `harvest`, another thread harvests the space's first 16 MiB (which hold
/// that page) back to back meanwhile. Returns the holding thread's time
/// and the number of harvests made while it ran.
/// Batches of holds timed separately by [`hold_under_harvest_run`].
const BATCH: u64 = 256;
/// A batch slower than this (normally 5-15 us) stalled: it slept, or the
/// thread lost its CPU.
const STALL: Duration = Duration::from_micros(40);

fn hold_under_harvest_run(s: &VmSpace<HeapPages>, iters: u64, harvest: bool) -> (Duration, u64) {
    let (t, h, _) = hold_under_harvest_stalls(s, iters, harvest);
    (t, h)
}

/// As [`hold_under_harvest_run`], also counting the batches of [`BATCH`]
/// holds that took longer than [`STALL`].
fn hold_under_harvest_stalls(s: &VmSpace<HeapPages>, iters: u64, harvest: bool) -> (Duration, u64, u64) {
    let start = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let harvests = AtomicU64::new(0);
    let mut stalls = 0;
    let t = std::thread::scope(|sc| {
        if harvest {
            let (start, stop, harvests) = (&start, &stop, &harvests);
            sc.spawn(move || {
                let mut bitmap = vec![0u64; (16 << 20) / PG as usize / 64];
                let mut n = 0;
                start.store(true, Ordering::Release);
                while !stop.load(Ordering::Relaxed) {
                    black_box(s.track_dirty(Gpa(0), 16 << 20, &mut bitmap).unwrap());
                    n += 1;
                }
                harvests.store(n, Ordering::Relaxed);
            });
            while !start.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
        let client = s.client();
        let gpa = 100 * PG;
        let t0 = Instant::now();
        let mut done = 0;
        while done < iters {
            let n = BATCH.min(iters - done);
            let tb = Instant::now();
            for _ in 0..n {
                let h = client.hold(black_box(Gpa(gpa)), Prot::RW).unwrap();
                black_box(&h);
                drop(h);
            }
            if tb.elapsed() > STALL {
                stalls += 1;
            }
            done += n;
        }
        let t = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        t
    });
    // The harvester has stopped (joined by the scope): its count covers
    // the holding thread's run and at most one harvest more.
    (t, harvests.load(Ordering::Relaxed), stalls)
}

fn hold_under_harvest(c: &mut Criterion) {
    if !wanted("hold_under_harvest/quiet") && !wanted("hold_under_harvest/harvesting") {
        return;
    }
    let s = space(GIB, true);
    let o = ram(16 << 20);
    s.map(&o, 0, Gpa(0), 16 << 20, Prot::RW).unwrap();
    s.populate(Gpa(0), 16 << 20).unwrap();
    let mut g = c.benchmark_group("hold_under_harvest");
    g.throughput(Throughput::Elements(1));
    for (name, harvest) in [("quiet", false), ("harvesting", true)] {
        g.bench_function(name, |b| b.iter_custom(|iters| hold_under_harvest_run(&s, iters, harvest).0));
    }
    g.finish();
    // One run, both figures (medians of 5 alternating runs).
    let n = 5_000_000;
    let (mut quiet, mut busy, mut hv) = (Vec::new(), Vec::new(), Vec::new());
    let (mut quiet_stalls, mut busy_stalls) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (t, _, st) = hold_under_harvest_stalls(&s, n, false);
        quiet.push(n as f64 / t.as_secs_f64());
        quiet_stalls.push(st as f64);
        let (t, h, st) = hold_under_harvest_stalls(&s, n, true);
        busy.push(n as f64 / t.as_secs_f64());
        hv.push(h as f64 / t.as_secs_f64());
        busy_stalls.push(st as f64);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (q, b, h) = (med(&mut quiet), med(&mut busy), med(&mut hv));
    let (qs, bs) = (med(&mut quiet_stalls), med(&mut busy_stalls));
    println!(
        "harvest_report: hold+release alone {:.1} M/s; while another thread harvests 16 MiB back to back \
         ({:.0} harvests/s, each clearing a bit) {:.1} M/s; ratio {:.2}; batches of {BATCH} holds slower than \
         {STALL:?}: {qs:.0} alone, {bs:.0} under harvests (of {})",
        q / 1e6,
        h,
        b / 1e6,
        b / q,
        n / BATCH
    );
}

fn devmem_churn(c: &mut Criterion) {
    if !wanted("devmem_map_unmap_16m/while_holding") {
        return;
    }
    let s = space(4 * GIB, true);
    let o = ram(16 << 20);
    let dev = ram(16 << 20);
    s.map(&o, 0, Gpa(0), 16 << 20, Prot::RW).unwrap();
    s.populate(Gpa(0), 16 << 20).unwrap();
    let stop = AtomicBool::new(false);
    let held = AtomicU64::new(0);
    let mut g = c.benchmark_group("devmem_map_unmap_16m");
    g.throughput(Throughput::Elements(1));
    std::thread::scope(|sc| {
        let client = s.client();
        let (stop, held) = (&stop, &held);
        sc.spawn(move || {
            let mut p = 0;
            while !stop.load(Ordering::Relaxed) {
                let h = client.hold(Gpa((p % 4096) * PG), Prot::RW).unwrap();
                h.write_u64(0, p).unwrap();
                drop(h);
                p += 1;
            }
            held.store(p, Ordering::Relaxed);
        });
        g.bench_function("while_holding", |b| {
            b.iter(|| {
                s.map(&dev, 0, Gpa(2 * GIB), 16 << 20, Prot::RW).unwrap();
                s.unmap(Gpa(2 * GIB), 16 << 20).unwrap();
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
    println!("devmem_churn: the holding thread made {} holds meanwhile", held.load(Ordering::Relaxed));
}

fn dirty_10pct(s: &VmSpace<HeapPages>, bytes: u64) {
    // SAFETY: only dirty bits of present leaves are set, as hardware would.
    unsafe {
        s.with_table_raw(|t| {
            let d = t.format().dirty_mask();
            t.for_each_leaf_table(Gpa(0), bytes, |base, entries, _| {
                for (i, e) in entries.iter().enumerate() {
                    if ((base.0 / PG) + i as u64).is_multiple_of(10) {
                        e.fetch_or(d, Ordering::Relaxed);
                    }
                }
            })
        })
    };
}

fn harvest(c: &mut Criterion) {
    let mut g = c.benchmark_group("harvest");
    g.sample_size(10);
    for (name, bytes) in [("1g", GIB), ("16g", 16 * GIB)] {
        if !wanted(&format!("harvest/vmspace/{name}")) && !wanted(&format!("harvest/nested_pt/{name}")) {
            continue;
        }
        let s = space(2 * bytes, true);
        let o = ram(bytes);
        s.map(&o, 0, Gpa(0), bytes, Prot::RW).unwrap();
        s.populate(Gpa(0), bytes).unwrap();
        let mut bitmap = vec![0u64; (bytes / PG / 64) as usize];
        g.throughput(Throughput::Elements(bytes / PG));
        g.bench_function(format!("vmspace/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    dirty_10pct(&s, bytes);
                    let t0 = Instant::now();
                    black_box(s.track_dirty(Gpa(0), bytes, &mut bitmap).unwrap());
                    t += t0.elapsed();
                }
                t
            })
        });
        g.bench_function(format!("nested_pt/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    dirty_10pct(&s, bytes);
                    // SAFETY: a harvest only clears dirty bits.
                    t += unsafe {
                        s.with_table_raw(|tb| {
                            let t0 = Instant::now();
                            black_box(tb.harvest_dirty(Gpa(0), bytes, &mut bitmap).unwrap());
                            t0.elapsed()
                        })
                    };
                }
                t
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fault_in, hold_release, hold_under_harvest, devmem_churn, harvest);
criterion_main!(benches);
