//! IPI ping-pong between two vCPUs, with our interrupt models (MMIO
//! emulation, injection by `KVM_INTERRUPT`) and with KVM's in-kernel LAPIC:
//! the median time per round trip over several runs of each, and the
//! ratio. A round trip is two IPIs, each with an ICR write, a kick, an
//! injection and an EOI.
//!
//! `cargo run --release -p vmm-kvm --example intr_pingpong [ROUNDS] [RUNS]`
//! (defaults 2000 and 5). The first and last rounds include vCPU thread
//! start-up; the time of a 10-round run is subtracted.

use std::time::Duration;
use vmm_kvm::interrupts::{Controller, run_scripts, scripts};
use vmm_kvm::{PagingMode, detect};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("no KVM: {e}");
        std::process::exit(1);
    }
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(2000).max(20);
    let runs = args.get(1).copied().unwrap_or(5).max(1);
    let mode = detect::detect().map(|d| d.mode).unwrap_or(PagingMode::Shadow);
    let timeout = Duration::from_secs(600);
    let mut per = Vec::new();
    for ctrl in [Controller::Ours, Controller::Kvm] {
        let mut us = Vec::new();
        let mut injected = 0;
        for _ in 0..runs {
            let (short, _) = scripts::ping_pong(10);
            let (long, _) = scripts::ping_pong(rounds);
            let a = run_scripts(ctrl, &short, mode, timeout).expect("short run");
            let b = run_scripts(ctrl, &long, mode, timeout).expect("long run");
            assert_eq!(b.seen, [rounds, rounds], "every IPI arrived");
            injected = b.injected;
            let d = b.elapsed.as_secs_f64() - a.elapsed.as_secs_f64();
            us.push(d * 1e6 / (rounds - 10) as f64);
        }
        let m = median(us.clone());
        println!("{ctrl:?}: {m:.1} us per round trip (median of {runs}: {us:.1?}); {injected} injected by us");
        per.push(m);
    }
    println!("ours / KVM in-kernel: {:.2}x", per[0] / per[1]);
}
