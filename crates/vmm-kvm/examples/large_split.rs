//! Eager against lazy split under a KVM guest: switching dirty tracking
//! on over RAM mapped with 2 MiB leaves, and the guest's next pass writing
//! all of it, with one vCPU and with two (each writing half).
//! `cargo run --release -p vmm-kvm --example large_split -- [--split-only]
//! [--vcpus N,M] [--verbose] [MiB...] [rounds]` (default 256 and 1024 MiB,
//! 1 and 2 vCPUs, 5 rounds; medians). Per size and vCPU count: the
//! switch-on time, the write-all time and its nested faults, the ratio,
//! then where the write-all went: KVM's page faults (`pf_taken`) and exits
//! per written page, our exits, full shadow zaps (and their time, and the
//! switch-on's), and the time per KVM
//! page fault (write-all time per vCPU / its faults). `--verbose` prints
//! every KVM counter that changed. Then (unless `--split-only`) the
//! guest's random-access rate with 2 MiB against 4 KiB leaves over the
//! same sizes (1 s each, interleaved rounds, medians).

use vmm_kvm::detect::detect;
use vmm_kvm::large::{SplitCost, WriteAllDetail, random_rate, split_profile};
use vmspace::SplitPolicy;

type Round = (SplitCost, WriteAllDetail);

/// The median of `f` over `v`.
fn med(v: &[Round], f: impl Fn(&Round) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// One line about where one policy's write-all went (medians).
fn detail(name: &str, v: &[Round]) -> String {
    let pages = v[0].1.pages as f64;
    let pf = med(v, |r| r.1.kvm("pf_taken") as f64);
    let vcpus = v[0].1.vcpus as f64;
    format!(
        "{name}: KVM pf_taken {:.0} ({:.3}/page), KVM exits {:.3}/page, our exits {:.0}, zaps {:.0} ({:.1} ms; switch-on {:.0}, {:.2} ms), mmu_shadow_zapped {:.0}, {:.2} us per KVM fault, fault path {:.1} ms",
        pf,
        pf / pages,
        med(v, |r| r.1.kvm("exits") as f64) / pages,
        med(v, |r| r.1.exits as f64),
        med(v, |r| r.1.zaps as f64),
        med(v, |r| r.1.zap_ns as f64 / 1e6),
        med(v, |r| r.1.switch_on_zaps as f64),
        med(v, |r| r.1.switch_on_zap_ns as f64 / 1e6),
        med(v, |r| r.1.kvm("mmu_shadow_zapped") as f64),
        med(v, |r| r.0.write_all.as_secs_f64() * 1e6 * vcpus / r.1.kvm("pf_taken").max(1) as f64),
        med(v, |r| r.1.fault_host_ns as f64 / 1e6),
    )
}

fn main() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("no KVM: {e}");
        return;
    }
    let mode = detect().expect("detect").mode;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let split_only = argv.iter().any(|a| a == "--split-only");
    let verbose = argv.iter().any(|a| a == "--verbose");
    let vcpus: Vec<usize> = match argv.iter().position(|a| a == "--vcpus") {
        Some(i) => argv.get(i + 1).expect("--vcpus N,M").split(',').map(|n| n.parse().expect("vCPU count")).collect(),
        None => vec![1, 2],
    };
    let args: Vec<u64> = argv
        .iter()
        .enumerate()
        .filter(|(i, _)| argv.get(i.wrapping_sub(1)).is_none_or(|p| p != "--vcpus"))
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let (sizes, rounds) = match args.split_last() {
        Some((r, s)) if !s.is_empty() => (s.to_vec(), *r as usize),
        _ => (vec![256, 1024], 5),
    };
    println!("mode {mode:?}, {rounds} rounds, medians");
    for &mib in &sizes {
        for &nv in &vcpus {
            let mem = mib << 20;
            let mut eager = Vec::new();
            let mut lazy = Vec::new();
            // Interleaved rounds, so that host noise hits both alike.
            for _ in 0..rounds {
                eager.push(split_profile(mem, mode, SplitPolicy::Eager, nv).expect("eager"));
                lazy.push(split_profile(mem, mode, SplitPolicy::Lazy, nv).expect("lazy"));
            }
            let on = |r: &Round| r.0.switch_on.as_secs_f64() * 1e3;
            let wr = |r: &Round| r.0.write_all.as_secs_f64() * 1e3;
            let fa = |r: &Round| r.0.faults as f64;
            println!(
                "{mib} MiB, {nv} vCPU: switch_on eager {:.3} ms lazy {:.3} ms; write_all eager {:.1} ms ({} faults) lazy {:.1} ms ({} faults); write_all lazy/eager {:.2}",
                med(&eager, on),
                med(&lazy, on),
                med(&eager, wr),
                med(&eager, fa),
                med(&lazy, wr),
                med(&lazy, fa),
                med(&lazy, wr) / med(&eager, wr),
            );
            println!("  {}", detail("eager", &eager));
            println!("  {}", detail("lazy", &lazy));
            if verbose {
                for (name, v) in [("eager", &eager), ("lazy", &lazy)] {
                    println!("  {name} KVM vCPU counters (last round): {:?}", v[v.len() - 1].1.kvm_vcpu);
                    println!("  {name} KVM VM counters (last round): {:?}", v[v.len() - 1].1.kvm_vm);
                }
            }
        }
    }
    if split_only {
        return;
    }
    for mib in sizes {
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
