//! 1 GiB-leaf benchmarks. Run with
//! `cargo bench -p vmspace --bench huge -- --warm-up-time 1 --measurement-time 3`.
//!
//! - `first_touch_4g/{1g,2m}/{every_4k,every_2m}`: a guest touching 4 GiB
//!   of RAM (one 4 GiB object of four aligned 1 GiB runs) for the first
//!   time, in order, every 4 KiB page or one page per 2 MiB: a nested
//!   fault (`VmClient::fault`) wherever the walk finds no translation, a
//!   software hardware walk (`nested_pt::mmu::translate`, setting
//!   accessed/dirty) for each touch; 1 GiB leaves (the default) against
//!   2 MiB leaves (`SpaceConfig::huge_leaves = false`). The nested-fault
//!   counts and the median time spent in them are printed
//!   (`first_touch_report`); with every 4 KiB page touched the software
//!   walks dominate the total.
//! - `split_1g/{eager_switch_on,unmap_one_page,lazy_first_write}`: the
//!   split of one 1 GiB leaf (populated, 1 GiB mapping): dirty tracking
//!   switched on with the eager split (1 GiB -> 512 x 2 MiB -> 262,144 x
//!   4 KiB, 513 table pages), `unmap_range` of one 4 KiB page in its
//!   middle (1 GiB -> 2 MiB, that 2 MiB -> 4 KiB, the page unmapped), and
//!   the lazy split's first write through a hold (1 GiB -> 2 MiB, the
//!   written 2 MiB -> 4 KiB); `split_2m_x512/eager_switch_on` is the eager
//!   switch over the same GiB mapped with 512 2 MiB leaves, for
//!   comparison.
//! - `promote_1g/{pass_4k_to_1g,last_chunk_and_slot}`: promotion back, after
//!   a tracking on/off cycle left the GiB in 262,144 4 KiB leaves:
//!   `VmSpace::promote` over the whole GiB (512 chunks to 2 MiB, then the
//!   slot to 1 GiB), and the same with 511 chunks promoted beforehand (the
//!   last chunk and the slot: what the automatic promotion of the chunk
//!   that completes a slot costs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nested_pt::{Access, Caps, Gpa, HeapPages, PageSize, mmu};
use vmspace::*;

const PG: u64 = PAGE_SIZE;
const M2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

fn space(size: u64, huge: bool, split: SplitPolicy) -> VmSpace<HeapPages> {
    let mut cfg = SpaceConfig::new(size, PteFormat::npt(Caps::default()));
    cfg.huge_leaves = huge;
    cfg.split = split;
    VmSpace::new(cfg, HeapPages::new()).unwrap()
}

fn ram(bytes: u64) -> Arc<VmObject> {
    // Frame base 1 GiB-aligned: every GiB of the object is one 1 GiB run.
    // A memfd: only what is written is allocated, freeing punches holes.
    let r = Arc::new(MemfdReservoir::new(bytes, Pfn(0x10_0000)).unwrap());
    let o = VmObject::ram(r, bytes).unwrap();
    assert!(o.huge_run_at(0).is_some());
    o
}

fn hw(t: &nested_pt::NestedTable<HeapPages>, gpa: u64, access: Access) -> bool {
    mmu::translate(t.pages(), t.format(), t.hw_root(), Gpa(gpa), access, true).is_ok()
}

/// Touch `[0, len)` every `step` bytes as a guest would; returns the
/// nested faults taken and the time spent in them.
fn touch(s: &VmSpace<HeapPages>, c: &VmClient<HeapPages>, len: u64, step: u64) -> (u64, Duration) {
    let mut in_faults = Duration::ZERO;
    let mut faults = 0;
    let mut g = 0;
    while g < len {
        // SAFETY: the hardware walk only sets accessed/dirty bits.
        if !unsafe { s.with_table_raw(|t| hw(t, g, Access::Write)) } {
            let t0 = Instant::now();
            c.fault(Gpa(g), Prot::WRITE).unwrap();
            in_faults += t0.elapsed();
            faults += 1;
            // SAFETY: as above.
            assert!(unsafe { s.with_table_raw(|t| hw(t, g, Access::Write)) });
        }
        g += step;
    }
    (faults, in_faults)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn first_touch(c: &mut Criterion) {
    let len = 4 * GIB;
    let mut g = c.benchmark_group("first_touch_4g");
    g.throughput(Throughput::Bytes(len));
    g.sample_size(10);
    let o = ram(len);
    let mut report = Vec::new();
    for (sname, step) in [("every_4k", PG), ("every_2m", M2)] {
        for (name, huge) in [("1g", true), ("2m", false)] {
            let s = space(8 * GIB, huge, SplitPolicy::Eager);
            let client = s.client();
            let mut faults = 0;
            let mut in_faults = Vec::new();
            g.bench_function(format!("{name}/{sname}"), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        s.map(&o, 0, Gpa(0), len, Prot::RW).unwrap();
                        let t0 = Instant::now();
                        let (f, d) = touch(&s, &client, len, step);
                        t += t0.elapsed();
                        faults = f;
                        in_faults.push(d);
                        let want = if huge { PageSize::Size1G } else { PageSize::Size2M };
                        assert!(s.with_table(|t| t.leaves(Gpa(0), len).all(|l| l.size == want)));
                        s.unmap(Gpa(0), len).unwrap();
                    }
                    t
                })
            });
            report.push((format!("{name}/{sname}"), faults, median(&mut in_faults)));
        }
    }
    g.finish();
    for (name, faults, d) in &report {
        eprintln!(
            "first_touch_report {name}: {faults} nested faults, {:.3} ms in them (median)",
            d.as_secs_f64() * 1e3
        );
    }
}

/// A space with one GiB of `o` mapped at 1 GiB and populated: one 1 GiB
/// leaf (`huge`) or 512 2 MiB leaves.
fn one_gib(o: &Arc<VmObject>, huge: bool, split: SplitPolicy) -> VmSpace<HeapPages> {
    let s = space(4 * GIB, huge, split);
    s.map(o, 0, Gpa(GIB), GIB, Prot::RW).unwrap();
    s.populate(Gpa(GIB), GIB).unwrap();
    let want = if huge { 1 } else { 512 };
    assert_eq!(s.with_table(|t| t.leaves(Gpa(GIB), GIB).count()), want);
    s
}

fn split(c: &mut Criterion) {
    let mut g = c.benchmark_group("split_1g");
    g.sample_size(20);
    let o = ram(GIB);
    let cases: [(&str, bool, SplitPolicy); 4] = [
        ("eager_switch_on", true, SplitPolicy::Eager),
        ("unmap_one_page", true, SplitPolicy::Eager),
        ("lazy_first_write", true, SplitPolicy::Lazy),
        ("2m_x512_eager_switch_on", false, SplitPolicy::Eager),
    ];
    let mut report = Vec::new();
    for (name, huge, policy) in cases {
        let mut times = Vec::new();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = one_gib(&o, huge, policy);
                    let client = s.client();
                    if policy == SplitPolicy::Lazy {
                        s.set_dirty_tracking(true).unwrap();
                    }
                    let t0 = Instant::now();
                    match name {
                        "unmap_one_page" => s.unmap_range(Gpa(GIB + 300 * M2 + 17 * PG), PG).unwrap(),
                        "lazy_first_write" => {
                            client.hold(Gpa(GIB + 300 * M2 + 17 * PG), Prot::RW).unwrap().write_u64(0, 1).unwrap()
                        }
                        _ => s.set_dirty_tracking(true).unwrap(),
                    }
                    let d = t0.elapsed();
                    times.push(d);
                    t += d;
                    assert!(s.with_table(|t| t.leaves(Gpa(GIB), GIB).count()) > 512);
                }
                t
            })
        });
        report.push((name, median(&mut times)));
    }
    g.finish();
    for (name, d) in &report {
        eprintln!("split_report {name}: {:.3} ms (median)", d.as_secs_f64() * 1e3);
    }
}

fn promote_back(c: &mut Criterion) {
    let mut g = c.benchmark_group("promote_1g");
    g.sample_size(20);
    let o = ram(GIB);
    let mut report = Vec::new();
    for name in ["pass_4k_to_1g", "last_chunk_and_slot"] {
        let mut times = Vec::new();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = one_gib(&o, true, SplitPolicy::Eager);
                    s.set_dirty_tracking(true).unwrap();
                    s.set_dirty_tracking(false).unwrap();
                    if name == "last_chunk_and_slot" {
                        assert_eq!(s.promote(Gpa(GIB), GIB - M2).unwrap(), 511);
                    }
                    let t0 = Instant::now();
                    s.promote(Gpa(GIB), GIB).unwrap();
                    let d = t0.elapsed();
                    times.push(d);
                    t += d;
                    assert_eq!(s.promotions_1g().explicit, 1);
                }
                t
            })
        });
        report.push((name, median(&mut times)));
    }
    g.finish();
    for (name, d) in &report {
        eprintln!("promote_report {name}: {:.1} us (median)", d.as_secs_f64() * 1e6);
    }
}

criterion_group!(benches, first_touch, split, promote_back);
criterion_main!(benches);
