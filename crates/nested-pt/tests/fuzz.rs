//! Fuzz target on stable Rust: operation sequences decoded with the
//! `arbitrary` crate from pseudo-random bytes, run against the reference
//! model of `common/mod.rs` on all three formats and three physical widths.
//!
//! In the normal test suite it runs for a short fixed budget (4 seconds).
//! By hand, for longer and with a chosen or fresh seed:
//!
//! ```text
//! FUZZ_SECONDS=600 cargo test --release -p nested-pt --test fuzz -- --nocapture
//! FUZZ_SEED=0x1234 FUZZ_SECONDS=60 cargo test --release -p nested-pt --test fuzz -- --nocapture
//! FUZZ_CASE=0xdeadbeef cargo test --release -p nested-pt --test fuzz -- --nocapture   # replay one case
//! ```
//!
//! A failure prints the case's seed (replay it with `FUZZ_CASE`) and its
//! operations.

mod common;

use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use common::Op;
use nested_pt::{Caps, PteFormat};

/// SplitMix64: a small, fast generator that is good enough to feed bytes
/// to `arbitrary`.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The format and operations of case `seed`: up to 4 KiB of bytes, decoded.
fn case(seed: u64) -> (PteFormat, Vec<Op>) {
    let mut rng = SplitMix(seed);
    let len = 64 + (rng.next() % 4032) as usize;
    let bytes: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| rng.next().to_le_bytes()).take(len).collect();
    let mut u = Unstructured::new(&bytes);
    let kind = u.int_in_range(0..=2u8).unwrap_or(0);
    let phys_bits = [36, 46, 52][u.int_in_range(0..=2usize).unwrap_or(1)];
    let caps = Caps { phys_bits, ..Caps::default() };
    let fmt = [PteFormat::ept(caps), PteFormat::ept_emulated_ad(caps), PteFormat::npt(caps)][kind as usize];
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < 200 {
        match u.arbitrary::<Op>() {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    (fmt, ops)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn run_case(seed: u64) -> usize {
    let (fmt, ops) = case(seed);
    if let Err(e) = common::run(fmt, &ops) {
        panic!("fuzz case {seed:#x} failed (replay: FUZZ_CASE={seed:#x}): {e}\nformat: {fmt:?}\nops: {ops:#?}");
    }
    ops.len()
}

#[test]
fn fuzz_against_model() {
    if let Some(seed) = env_u64("FUZZ_CASE") {
        let n = run_case(seed);
        println!("fuzz: case {seed:#x}: {n} operations passed");
        return;
    }
    let budget = Duration::from_secs_f64(
        std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(4.0).max(0.0),
    );
    // A fixed seed in the test suite (reproducible); a fresh one by hand
    // unless one is given.
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(|| {
        if std::env::var("FUZZ_SECONDS").is_ok() {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        } else {
            0x6e65_7374_6564_7074
        }
    });
    let mut seeds = SplitMix(seed);
    let start = Instant::now();
    let (mut cases, mut ops) = (0u64, 0u64);
    while cases == 0 || start.elapsed() < budget {
        ops += run_case(seeds.next()) as u64;
        cases += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: seed {seed:#x}: {cases} cases, {ops} operations in {secs:.1} s: {:.0} ops/s, {:.0} cases/s",
        ops as f64 / secs,
        cases as f64 / secs
    );
    assert!(ops > cases, "cases decode to operations");
}
