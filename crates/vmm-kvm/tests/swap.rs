//! Swapping on the KVM runner (needs /dev/kvm): the mixed workload over
//! more guest memory than the VM's reservoir, with harvest rounds. Cold
//! pages are swapped out (their leaves cleared, KVM's translations of the
//! frames dropped, the frames freed) and swapped in on the guest's next
//! access; the guest's data, its checksums and the dirty ledgers must
//! come out exactly as without swapping.

mod common;

use std::time::Duration;
use vmm_kvm::run::{RunConfig, RunReport, run};
use vmm_kvm::workload::Mode;

const MIB: u64 = 1 << 20;

fn check(r: &RunReport, reservoir: u64) {
    for (k, round) in r.rounds.iter().enumerate() {
        assert_eq!(round.missed, 0, "round {k}: written pages missed by the harvest");
        assert_eq!(round.spurious, 0, "round {k}: pages reported dirty that no one wrote");
    }
    assert!(r.rounds.iter().filter(|x| x.dirty > 0).count() >= 2, "harvests saw no writes");
    for (i, v) in r.vcpus.iter().enumerate() {
        assert!(v.ops > 0, "vCPU {i} made no progress");
        assert_eq!(v.bad_pages, 0, "vCPU {i}: pages differ from the replayed image");
        assert_eq!(v.guest_bad_headers, 0, "vCPU {i}: misplaced pages");
        assert_eq!(v.guest_checksum, v.expected_checksum, "vCPU {i}: checksum");
        assert_eq!(v.data_errors, 0, "vCPU {i}: data errors");
    }
    let s = r.swap.expect("guest memory was swappable");
    assert!(s.swapped_out > 0, "nothing was swapped out: {s:?}");
    assert!(s.swapped_in > 0, "nothing was swapped back in: {s:?}");
    assert_eq!(s.write_errors, 0);
    assert!(s.resident * 4096 <= reservoir, "more pages resident than the reservoir holds: {s:?}");
    // The swapper thread ran, and counted no more than the space did.
    let w = r.swapper.expect("a swapping run has a swapper thread");
    assert!(w.steps > 0, "the swapper never looked: {w:?}");
    assert!(w.pages_out <= s.swapped_out, "{w:?} vs {s:?}");
    assert!(r.ok());
}

#[test]
fn mixed_workload_larger_than_reservoir_keeps_data_and_ledgers() {
    if common::skip_without_kvm() {
        return;
    }
    let reservoir = 12 * MIB;
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 32 * MIB,
        reservoir: Some(reservoir),
        mode: Mode::Mixed,
        write_pct: 60,
        duration: Duration::from_millis(1500),
        rounds: 6,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    eprintln!("{r:#?}");
    check(&r, reservoir);
}

/// The same with harvests that never zap every shadow page: only the
/// per-frame drops of the harvests and of the swapper reach KVM, so a
/// frame the swapper freed but KVM still mapped would show up as a data
/// error or a bad page.
#[test]
fn swapping_with_per_frame_drops_only() {
    if common::skip_without_kvm() {
        return;
    }
    let reservoir = 10 * MIB;
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 24 * MIB,
        reservoir: Some(reservoir),
        mode: Mode::Mixed,
        write_pct: 80,
        duration: Duration::from_millis(1000),
        rounds: 4,
        zap_threshold: u64::MAX,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    check(&r, reservoir);
}

#[test]
fn too_small_a_reservoir_is_refused() {
    if common::skip_without_kvm() {
        return;
    }
    let cfg = RunConfig { vcpus: 1, mem_bytes: 8 * MIB, reservoir: Some(MIB), ..RunConfig::default() };
    let e = run(&cfg, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("reservoir"), "{e}");
}
