//! Instruction-count harness for the per-page and bulk paths: run it under
//! `valgrind --tool=callgrind` with a workload and a repeat count, twice
//! with different counts; the difference divided by the pages is the
//! instructions per page (`cargo run --release -p nested-pt --example
//! walk_cost -- lookup 3`). Workloads: `lookup`, `lookup_seq`, `map`,
//! `map_shared`, `harvest`, `harvest_shared`, `dirty_setup` (the
//! harvests' setup alone), `vacate`.

use nested_pt::{Caps, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat};
use std::hint::black_box;

const GIB: u64 = 1 << 30;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let work = args.get(1).map_or("lookup", |s| s.as_str()).to_string();
    let reps: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let bytes = GIB / 4;
    let pages = bytes >> 12;
    let mk = || {
        let mut t = NestedTable::new(PteFormat::ept(Caps::default()), HeapPages::with_capacity(0x100, 4096)).unwrap();
        t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
        t
    };
    let mut t = mk();
    t.map_range_exclusive(Gpa(0), bytes, Prot::RW, MemType::WriteBack, |g| Some(Pfn(0x10_0000 + (g.0 >> 12)))).unwrap();
    let mut order: Vec<u64> = (0..pages).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut bitmap = vec![0u64; (pages / 64) as usize];
    let mut acc = 0u64;
    for _ in 0..reps {
        match work.as_str() {
            "lookup" | "lookup_seq" => {
                let random = work == "lookup";
                for (i, &p) in order.iter().enumerate() {
                    let p = if random { p } else { i as u64 };
                    let (pfn, prot) = t.is_mapped(Gpa(p << 12)).unwrap();
                    acc = acc.wrapping_add(pfn.0 ^ prot.bits() as u64);
                }
            }
            "map" | "map_shared" => {
                t.unmap_region(Gpa(0), bytes).unwrap();
                let exclusive = work == "map";
                for &p in &order {
                    let r = if exclusive {
                        t.map_exclusive(
                            Gpa(p << 12),
                            Pfn(0x10_0000 + p),
                            PageSize::Size4K,
                            Prot::RW,
                            MemType::WriteBack,
                        )
                    } else {
                        t.map(Gpa(p << 12), Pfn(0x10_0000 + p), PageSize::Size4K, Prot::RW, MemType::WriteBack)
                    };
                    r.unwrap();
                }
            }
            "harvest" | "harvest_shared" | "dirty_setup" => {
                for p in (0..pages).step_by(10) {
                    t.reset_dirty(Gpa(p << 12), true).unwrap();
                }
                if work == "dirty_setup" {
                    continue;
                }
                let n = if work == "harvest" {
                    t.harvest_dirty_exclusive(Gpa(0), bytes, &mut bitmap).unwrap()
                } else {
                    t.harvest_dirty(Gpa(0), bytes, &mut bitmap).unwrap()
                };
                acc = acc.wrapping_add(n);
            }
            "vacate" => {
                t.unmap_region(Gpa(0), bytes).unwrap();
                t.vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
            }
            _ => panic!("unknown workload {work}"),
        }
    }
    black_box(acc);
}
