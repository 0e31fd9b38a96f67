//! Eager against lazy split under a KVM guest: switching dirty tracking
//! on over RAM mapped with 2 MiB leaves, and the guest's next pass writing
//! all of it. `cargo run --release -p vmm-kvm --example large_split --
//! [MiB...] [rounds]` (default 256 and 1024 MiB, 5 rounds; medians).
//! Then the guest's random-access rate with 2 MiB against 4 KiB leaves
//! over the same sizes (1 s each, interleaved rounds, medians).

use vmm_kvm::detect::detect;
use vmm_kvm::large::{random_rate, split_cost};
use vmspace::SplitPolicy;

fn main() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("no KVM: {e}");
        return;
    }
    let mode = detect().expect("detect").mode;
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (sizes, rounds) = match args.split_last() {
        Some((r, s)) if !s.is_empty() => (s.to_vec(), *r as usize),
        _ => (vec![256, 1024], 5),
    };
    println!("mode {mode:?}, {rounds} rounds, medians");
    let sizes_again = sizes.clone();
    for mib in sizes {
        let mem = mib << 20;
        let mut eager = Vec::new();
        let mut lazy = Vec::new();
        // Interleaved rounds, so that host noise hits both alike.
        for _ in 0..rounds {
            eager.push(split_cost(mem, mode, SplitPolicy::Eager).expect("eager"));
            lazy.push(split_cost(mem, mode, SplitPolicy::Lazy).expect("lazy"));
        }
        let med = |v: &mut Vec<vmm_kvm::large::SplitCost>, f: fn(&vmm_kvm::large::SplitCost) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let on = |c: &vmm_kvm::large::SplitCost| c.switch_on.as_secs_f64() * 1e3;
        let wr = |c: &vmm_kvm::large::SplitCost| c.write_all.as_secs_f64() * 1e3;
        let fa = |c: &vmm_kvm::large::SplitCost| c.faults as f64;
        println!(
            "{mib} MiB: switch_on eager {:.3} ms lazy {:.3} ms; write_all eager {:.1} ms ({} faults) lazy {:.1} ms ({} faults); write_all lazy/eager {:.2}",
            med(&mut eager, on),
            med(&mut lazy, on),
            med(&mut eager, wr),
            med(&mut eager, fa),
            med(&mut lazy, wr),
            med(&mut lazy, fa),
            med(&mut lazy, wr) / med(&mut eager, wr),
        );
    }
    for mib in sizes_again {
        let mem = mib << 20;
        let (mut large, mut small) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            large.push(random_rate(mem, mode, true, std::time::Duration::from_secs(1)).expect("2m"));
            small.push(random_rate(mem, mode, false, std::time::Duration::from_secs(1)).expect("4k"));
        }
        let med = |v: &mut Vec<(f64, u64)>| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v[v.len() / 2]
        };
        let (l, s) = (med(&mut large), med(&mut small));
        println!(
            "{mib} MiB random access: 2 MiB leaves {:.0} ops/s ({} faults), 4 KiB leaves {:.0} ops/s ({} faults); 2m/4k {:.2}",
            l.0,
            l.1,
            s.0,
            s.1,
            l.0 / s.0
        );
    }
}
