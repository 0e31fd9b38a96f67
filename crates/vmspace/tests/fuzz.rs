//! Fuzzing on stable Rust: random operation sequences (decoded from seeded
//! random bytes by `arbitrary`) from several clients, over every format and
//! address window of `tests/common/model.rs`, checked against its
//! reference model.
//!
//! In the normal test suite it runs for a short fixed budget (3 s). By
//! hand, longer and from another seed:
//! `FUZZ_SECONDS=600 FUZZ_SEED=7 cargo test -p vmspace --release --test fuzz -- --nocapture`.
//! A failure prints the seed and the case number, which replay it.

mod common;
#[path = "common/model.rs"]
mod harness;

use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// splitmix64: a seeded, reproducible byte source.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The bytes of case `case` from `seed` (each case on its own, so that one
/// replays without the ones before it).
fn case_bytes(seed: u64, case: u64) -> Vec<u8> {
    let mut rng = Rng(seed ^ case.wrapping_mul(0xd6e8_feb8_6659_fd93));
    let len = 64 + (rng.next() % 2048) as usize;
    (0..len).map(|_| rng.next() as u8).collect()
}

#[test]
fn fuzz_space_against_model() {
    let seconds = env_u64("FUZZ_SECONDS", 3);
    let seed = env_u64("FUZZ_SEED", 0x5eed);
    let only = std::env::var("FUZZ_CASE").ok().and_then(|v| v.parse::<u64>().ok());
    let configs = harness::configs();
    let budget = Duration::from_secs(seconds);
    let start = Instant::now();
    let (mut cases, mut ops) = (0u64, 0u64);
    let mut case = only.unwrap_or(0);
    loop {
        let cfg = configs[(case % configs.len() as u64) as usize];
        let seq = harness::ops_from(&case_bytes(seed, case));
        if let Err(e) = harness::run(&cfg, &seq) {
            panic!("FUZZ_SEED={seed} FUZZ_CASE={case} ({cfg:?}, {} ops): {e}", seq.len());
        }
        cases += 1;
        ops += seq.len() as u64;
        case += 1;
        if only.is_some() || start.elapsed() >= budget {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("fuzz: seed {seed}: {cases} cases, {ops} ops in {secs:.1} s: {:.0} ops/s", ops as f64 / secs);
}
