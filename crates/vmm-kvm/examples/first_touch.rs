//! The 1 GiB first-touch comparison of `vmm bench` on its own
//! (`bench::first_touch_compare`): `cargo run --release -p vmm-kvm
//! --example first_touch [ROUNDS] [MiB]` (default 3 rounds, 1024 MiB).
//! Each line gives µs per page, the nested faults, KVM's exits and page
//! faults, and the ratio to the KVM's own line before it and to KVM's
//! best case (A+D leaves, preallocated, untracked).

use vmm_kvm::{bench, detect};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    vmm_kvm::kvm_available()?;
    let mode = detect::detect()?.mode;
    let runs = bench::first_touch_compare(mib << 20, mode, rounds)?;
    let best = runs
        .iter()
        .find(|r| {
            r.kvm_own() && r.label.contains("A+D") && r.label.contains("preallocated") && !r.label.contains("log")
        })
        .map(|r| r.us_per_page());
    let mut own = f64::NAN;
    println!("first touch of {mib} MiB, {rounds} rounds (median), host mode {mode:?}");
    for r in &runs {
        if r.kvm_own() {
            own = r.us_per_page();
        }
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:>8.2} us/page  {:>5.2}x own  {:>5.2}x best  nested {:>7}  KVM exits {:>8}  KVM #PF {:>8}  {}",
            r.us_per_page(),
            r.us_per_page() / own,
            best.map_or(f64::NAN, |b| r.us_per_page() / b),
            r.nested_faults,
            opt(r.kvm_exits),
            opt(r.kvm_page_faults),
            r.label
        );
    }
    Ok(())
}
