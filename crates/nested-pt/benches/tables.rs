//! Table benchmarks at 1 GiB and 16 GiB of guest space, each run beside
//! the seed's algorithm (a walk from the root for every page, entry
//! operations through a table of function pointers, as illumos'
//! `vmm_gpt.c` does) and a sequential read of an equal-sized `u64` array
//! (8 bytes per 4 KiB page: the bandwidth reference).
//!
//! Run: `cargo bench -p nested-pt --bench tables`
//! (`-- --quick` or a filter such as `harvest` for a subset).
//! Every benchmark reports throughput in pages; ns per page = 1000 /
//! (Melem/s).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use nested_pt::{Caps, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat, TablePages};

const K4: u64 = 4096;
const GIB: u64 = 1 << 30;

/// The seed's PTE operations: function pointers looked up at run time.
struct SeedOps {
    is_present: fn(u64) -> bool,
    pfn: fn(u64) -> u64,
    map_page: fn(u64, u8) -> u64,
    reset_dirty: fn(&AtomicU64, bool) -> bool,
}

fn ept_present(e: u64) -> bool {
    e & 7 != 0
}
fn ept_pfn(e: u64) -> u64 {
    (e & 0x000f_ffff_ffff_f000) >> 12
}
fn ept_map_page(pfn: u64, prot: u8) -> u64 {
    (pfn << 12) | (6 << 3) | (1 << 6) | prot as u64
}
fn ept_reset_dirty(e: &AtomicU64, on: bool) -> bool {
    let old = if on { e.fetch_or(1 << 9, Ordering::AcqRel) } else { e.fetch_and(!(1 << 9), Ordering::AcqRel) };
    old & (1 << 9) != 0
}

static SEED_OPS: SeedOps =
    SeedOps { is_present: ept_present, pfn: ept_pfn, map_page: ept_map_page, reset_dirty: ept_reset_dirty };

/// The seed's walker over the same table pages: fills the entry pointers of
/// every level from the root for each page.
struct Seed<'a> {
    pages: &'a HeapPages,
    root: u64,
    ops: &'a SeedOps,
}

impl<'a> Seed<'a> {
    fn new(t: &'a NestedTable<HeapPages>) -> Self {
        Seed { pages: t.pages(), root: t.root().0, ops: black_box(&SEED_OPS) }
    }
    #[inline(never)]
    fn walk(&self, gpa: u64, entries: &mut [*const AtomicU64; 4]) {
        let mut cur = self.pages.ptr(Pfn(self.root)) as *const AtomicU64;
        for (i, slot) in entries.iter_mut().enumerate() {
            if cur.is_null() {
                *slot = std::ptr::null();
                continue;
            }
            let idx = (gpa >> (39 - 9 * i)) & 511;
            // SAFETY: `cur` points at a live table page of `pages`.
            let p = unsafe { cur.add(idx as usize) };
            *slot = p;
            // SAFETY: as above.
            let e = unsafe { (*p).load(Ordering::Acquire) };
            if !(self.ops.is_present)(e) {
                cur = std::ptr::null();
                continue;
            }
            cur = self.pages.ptr(Pfn((self.ops.pfn)(e))) as *const AtomicU64;
        }
    }
    fn lookup(&self, gpa: u64) -> *const AtomicU64 {
        let mut e = [std::ptr::null(); 4];
        self.walk(gpa, &mut e);
        e[3]
    }
    fn map(&self, gpa: u64, pfn: u64) -> bool {
        let p = self.lookup(gpa);
        // SAFETY: populated range: the leaf table exists.
        unsafe { (*p).compare_exchange(0, (self.ops.map_page)(pfn, 3), Ordering::AcqRel, Ordering::Acquire).is_ok() }
    }
    fn unmap_region(&self, gpa: u64, len: u64) -> u64 {
        let mut n = 0;
        for a in (gpa..gpa + len).step_by(K4 as usize) {
            let p = self.lookup(a);
            if !p.is_null() {
                // SAFETY: `p` is an entry in a live leaf table.
                let old = unsafe { (*p).swap(0, Ordering::AcqRel) };
                n += (self.ops.is_present)(old) as u64;
            }
        }
        n
    }
    fn harvest(&self, gpa: u64, len: u64, bitmap: &mut [u64]) -> u64 {
        let mut n = 0;
        for (i, a) in (gpa..gpa + len).step_by(K4 as usize).enumerate() {
            let p = self.lookup(a);
            // SAFETY: `p` is null or an entry in a live leaf table.
            let dirty = !p.is_null() && (self.ops.reset_dirty)(unsafe { &*p }, false);
            if dirty {
                bitmap[i / 64] |= 1 << (i % 64);
                n += 1;
            } else {
                bitmap[i / 64] &= !(1 << (i % 64));
            }
        }
        n
    }
}

fn fmt() -> PteFormat {
    PteFormat::ept(Caps::default())
}

fn new_table(bytes: u64) -> NestedTable<HeapPages> {
    let pages = (bytes / (2 << 20)) + 64;
    let mut arena = HeapPages::with_capacity(0x100, pages);
    arena.prefault(pages);
    NestedTable::new(fmt(), arena).unwrap()
}

fn populated(bytes: u64) -> NestedTable<HeapPages> {
    let mut t = new_table(bytes);
    t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
    t
}

fn mapped(bytes: u64) -> NestedTable<HeapPages> {
    let t = populated(bytes);
    t.map_range(Gpa(0), bytes, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x100_0000 + (g.0 >> 12)))).unwrap();
    t
}

fn shuffled(n: u64, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn dirty_10pct(t: &NestedTable<HeapPages>, bytes: u64) {
    for p in (0..bytes / K4).step_by(10) {
        t.reset_dirty(Gpa(p * K4), true).unwrap();
    }
}

/// Not timed: what the tables cost, in real bytes (pages at 4 KiB each plus
/// the software shadow), per GiB mapped.
fn table_memory() {
    for gib in [1u64, 16] {
        let bytes = gib * GIB;
        let t = mapped(bytes);
        let share = t.table_bytes() as f64 / bytes as f64 * 100.0;
        println!(
            "table memory, {gib} GiB of 4 KiB pages: {} bytes ({} pages), {:.4}% of mapped memory",
            t.table_bytes(),
            t.table_pages(),
            share
        );
        let mut t = new_table(bytes);
        t.populate_region(Gpa(0), bytes, PageSize::Size1G).unwrap();
        for i in 0..gib {
            t.map(Gpa(i * GIB), Pfn(i << 18), PageSize::Size1G, Prot::RW, MemType::WriteBack).unwrap();
        }
        let share = t.table_bytes() as f64 / bytes as f64 * 100.0;
        println!(
            "table memory, {gib} GiB of 1 GiB pages: {} bytes ({} pages), {:.6}% of mapped memory",
            t.table_bytes(),
            t.table_pages(),
            share
        );
    }
}

fn benches(c: &mut Criterion) {
    table_memory();
    for (name, bytes) in [("1GiB", GIB), ("16GiB", 16 * GIB)] {
        let pages = bytes / K4;
        let mut g = c.benchmark_group(format!("tables/{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(pages));

        // Bandwidth reference: read 8 bytes per page sequentially.
        let array: Vec<u64> = (0..pages).collect();
        g.bench_function("bandwidth_ref_seq_read", |b| {
            b.iter(|| black_box(&array).iter().fold(0u64, |a, x| a.wrapping_add(*x)))
        });
        drop(array);

        g.bench_function("populate", |b| {
            b.iter_batched(
                || new_table(bytes),
                |mut t| {
                    t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });

        g.bench_function("map_in_order/ours_bulk", |b| {
            b.iter_batched(
                || populated(bytes),
                |t| {
                    t.map_range(Gpa(0), bytes, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x100_0000 + (g.0 >> 12))))
                        .unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("map_in_order/ours_bulk_exclusive", |b| {
            b.iter_batched(
                || populated(bytes),
                |mut t| {
                    t.map_range_exclusive(Gpa(0), bytes, Prot::RW, MemType::WriteBack, |g| {
                        Some(Pfn(0x100_0000 + (g.0 >> 12)))
                    })
                    .unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("map_in_order/ours_per_page", |b| {
            b.iter_batched(
                || populated(bytes),
                |t| {
                    for p in 0..pages {
                        t.map(Gpa(p * K4), Pfn(0x100_0000 + p), PageSize::Size4K, Prot::RW, MemType::WriteBack)
                            .unwrap();
                    }
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("map_in_order/seed", |b| {
            b.iter_batched(
                || populated(bytes),
                |t| {
                    let s = Seed::new(&t);
                    for p in 0..pages {
                        assert!(s.map(p * K4, 0x100_0000 + p));
                    }
                    t
                },
                BatchSize::PerIteration,
            )
        });

        let order = shuffled(pages, 0x9e37_79b9_7f4a_7c15);
        g.bench_function("map_random/ours", |b| {
            b.iter_batched(
                || populated(bytes),
                |t| {
                    for &p in &order {
                        let p = p as u64;
                        t.map(Gpa(p * K4), Pfn(0x100_0000 + p), PageSize::Size4K, Prot::RW, MemType::WriteBack)
                            .unwrap();
                    }
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("map_random/seed", |b| {
            b.iter_batched(
                || populated(bytes),
                |t| {
                    let s = Seed::new(&t);
                    for &p in &order {
                        assert!(s.map(p as u64 * K4, 0x100_0000 + p as u64));
                    }
                    t
                },
                BatchSize::PerIteration,
            )
        });

        let t = mapped(bytes);
        g.bench_function("lookup_random/ours", |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for &p in &order {
                    acc = acc.wrapping_add(t.lookup(Gpa(p as u64 * K4)).map_or(0, |l| l.value()));
                }
                acc
            })
        });
        g.bench_function("lookup_random/seed", |b| {
            let s = Seed::new(&t);
            b.iter(|| {
                let mut acc = 0u64;
                for &p in &order {
                    let e = s.lookup(p as u64 * K4);
                    // SAFETY: every page is mapped, so `e` is a live entry.
                    acc = acc.wrapping_add(unsafe { (*e).load(Ordering::Relaxed) });
                }
                acc
            })
        });
        drop(order);

        let mut bitmap = vec![0u64; (pages / 64) as usize];
        g.bench_function("harvest_10pct/ours", |b| {
            b.iter_batched(
                || dirty_10pct(&t, bytes),
                |_| {
                    assert_eq!(t.harvest_dirty(Gpa(0), bytes, &mut bitmap).unwrap(), pages.div_ceil(10));
                },
                BatchSize::PerIteration,
            )
        });
        drop(t);
        let mut t = mapped(bytes);
        g.bench_function("harvest_10pct/ours_exclusive", |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    dirty_10pct(&t, bytes);
                    let start = std::time::Instant::now();
                    let n = t.harvest_dirty_exclusive(Gpa(0), bytes, &mut bitmap).unwrap();
                    total += start.elapsed();
                    assert_eq!(n, pages.div_ceil(10));
                }
                total
            })
        });
        g.bench_function("harvest_10pct/seed", |b| {
            let s = Seed::new(&t);
            b.iter_batched(
                || dirty_10pct(&t, bytes),
                |_| {
                    assert_eq!(s.harvest(0, bytes, &mut bitmap), pages.div_ceil(10));
                },
                BatchSize::PerIteration,
            )
        });
        drop(t);

        g.bench_function("unmap_vacate/ours_one_pass", |b| {
            b.iter_batched(
                || mapped(bytes),
                |mut t| {
                    assert_eq!(t.unmap_vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap(), pages);
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("unmap_vacate/ours_two_calls", |b| {
            b.iter_batched(
                || mapped(bytes),
                |mut t| {
                    assert_eq!(t.unmap_region(Gpa(0), bytes).unwrap(), pages);
                    t.vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("unmap_vacate/seed", |b| {
            b.iter_batched(
                || mapped(bytes),
                |mut t| {
                    assert_eq!(Seed::new(&t).unmap_region(0, bytes), pages);
                    t.vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(tables, benches);
criterion_main!(tables);
