//! Swap-in cost per page, against its parts measured in the same run:
//! reading the same page straight from the swap file (`pread`, 4 KiB, from
//! the same file through a second descriptor) plus one fault round trip of
//! the data path on a page that needs no swap-in (a resident frame of
//! plain RAM whose leaf is absent). Target: the swap-in fault's median
//! within twice the sum of the two medians.
//!
//! The direct read is measured twice: into one buffer used for every page
//! (hot in the CPU caches), and into page `p` of a buffer as large as the
//! object (cold, as the fresh frame a swap-in reads into is); the ratio is
//! given against both.
//!
//! For each page of each round the three are measured back to back (the
//! order rotates per page), so the page cache, the reservoir and the
//! table are in the same state for all three. Prints p50/p99 of each and
//! the ratio. `cargo bench -p vmspace --bench swap` (`SWAP_BENCH_PAGES`,
//! `SWAP_BENCH_ROUNDS` to change the size).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use nested_pt::{Caps, HeapPages};
use vmspace::*;

const PG: u64 = PAGE_SIZE;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with
    // few pages as a smoke test.
    let quick = !std::env::args().any(|a| a == "--bench");
    let pages = env("SWAP_BENCH_PAGES", if quick { 256 } else { 4096 });
    let rounds = env("SWAP_BENCH_ROUNDS", if quick { 1 } else { 8 });
    let mut cfg = SpaceConfig::new(1 << 40, PteFormat::ept(Caps::default()));
    cfg.fault_around = 1;
    let space: VmSpace<HeapPages> = VmSpace::new(cfg, HeapPages::with_capacity(0x100, 1 << 14)).unwrap();
    // Room for both objects: no measured fault has to reclaim.
    let reservoir = Arc::new(HeapReservoir::new((2 * pages + 64) * PG, Pfn(0x10_0000)).unwrap());
    let file = swap_file_in(&std::env::temp_dir()).unwrap();
    let direct = file.try_clone().unwrap();
    let swap = VmObject::swappable(reservoir.clone(), pages * PG, file).unwrap();
    let plain = VmObject::ram(reservoir.clone(), pages * PG).unwrap();
    let (swap_at, plain_at) = (0u64, 1u64 << 32);
    space.map(&swap, 0, Gpa(swap_at), pages * PG, Prot::RW).unwrap();
    let client = space.client();
    let mut buf = vec![0u8; PG as usize];
    let mut cold = vec![0u8; (pages * PG) as usize];
    let (mut t_swapin, mut t_pread, mut t_cold, mut t_fault) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Every page resident with distinct contents, then swapped out.
        for p in 0..pages {
            client.fault(Gpa(swap_at + p * PG), Prot::WRITE).unwrap();
            swap.write(p * PG, &(p ^ round << 32).to_le_bytes()).unwrap();
        }
        assert_eq!(space.swap_out(pages).unwrap(), pages);
        // Plain RAM mapped afresh: frames resident, no leaf.
        space.map(&plain, 0, Gpa(plain_at), pages * PG, Prot::RW).unwrap();
        for p in 0..pages {
            for k in 0..4 {
                match (p + k) % 4 {
                    0 => {
                        let t = Instant::now();
                        client.fault(Gpa(swap_at + p * PG), Prot::READ).unwrap();
                        t_swapin.push(t.elapsed().as_nanos() as u64);
                    }
                    1 => {
                        let t = Instant::now();
                        direct.read_exact_at(&mut buf, p * PG).unwrap();
                        t_pread.push(t.elapsed().as_nanos() as u64);
                    }
                    2 => {
                        let dst = &mut cold[(p * PG) as usize..((p + 1) * PG) as usize];
                        let t = Instant::now();
                        direct.read_exact_at(dst, p * PG).unwrap();
                        t_cold.push(t.elapsed().as_nanos() as u64);
                    }
                    _ => {
                        let t = Instant::now();
                        client.fault(Gpa(plain_at + p * PG), Prot::READ).unwrap();
                        t_fault.push(t.elapsed().as_nanos() as u64);
                    }
                }
            }
            assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), p ^ round << 32);
        }
        space.unmap(Gpa(plain_at), pages * PG).unwrap();
    }
    let st = space.swap_stats();
    assert_eq!(st.swapped_in, pages * rounds);
    let (s50, s99) = (pct(&mut t_swapin, 0.5), pct(&mut t_swapin, 0.99));
    let (r50, r99) = (pct(&mut t_pread, 0.5), pct(&mut t_pread, 0.99));
    let (c50, c99) = (pct(&mut t_cold, 0.5), pct(&mut t_cold, 0.99));
    let (f50, f99) = (pct(&mut t_fault, 0.5), pct(&mut t_fault, 0.99));
    let us = |ns: u64| ns as f64 / 1000.0;
    println!("swap-in per page, {pages} pages x {rounds} rounds ({} samples each):", t_swapin.len());
    println!("  swap-in fault          p50 {:7.2} us  p99 {:7.2} us", us(s50), us(s99));
    println!("  pread 4 KiB, hot buf   p50 {:7.2} us  p99 {:7.2} us", us(r50), us(r99));
    println!("  pread 4 KiB, cold page p50 {:7.2} us  p99 {:7.2} us", us(c50), us(c99));
    println!("  fault, no swap-in      p50 {:7.2} us  p99 {:7.2} us", us(f50), us(f99));
    for (what, p50, p99) in [("hot", r50, r99), ("cold", c50, c99)] {
        println!(
            "  ratio swap-in / (pread {what} + fault): p50 {:.2} (target <= 2), p99 {:.2}",
            s50 as f64 / (p50 + f50) as f64,
            s99 as f64 / (p99 + f99) as f64
        );
    }
}
