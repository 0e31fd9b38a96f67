//! End-to-end runs of the built-in workloads (need /dev/kvm).

mod common;

use std::time::Duration;
use vmm_kvm::run::{RunConfig, run};
use vmm_kvm::workload::Mode;

#[test]
fn write_heavy_harvest_rounds_miss_nothing() {
    if common::skip_without_kvm() {
        return;
    }
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 32 << 20,
        mode: Mode::Mixed,
        write_pct: 80,
        duration: Duration::from_millis(1500),
        rounds: 12,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    eprintln!("{r:#?}");
    assert!(r.rounds.len() >= 2, "too few harvest rounds ran");
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
        assert_eq!(v.data_errors, 0);
    }
    assert!(r.ok());
}

/// Harvests that never zap: on a shadow-paging host every cleared bit takes
/// effect only through dropping the frames `track_dirty_frames` reported,
/// so a frame missing from that list shows up as a missed write in a later
/// round.
#[test]
fn harvest_rounds_dropping_the_cleared_frames_miss_nothing() {
    if common::skip_without_kvm() {
        return;
    }
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 8 << 20,
        mode: Mode::Mixed,
        write_pct: 80,
        duration: Duration::from_millis(1000),
        rounds: 8,
        zap_threshold: u64::MAX,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    eprintln!("{r:#?}");
    assert!(r.rounds.iter().filter(|x| x.dirty > 0).count() >= 2, "harvests saw no writes");
    for (k, round) in r.rounds.iter().enumerate() {
        assert_eq!(round.missed, 0, "round {k}: written pages missed by the harvest");
        assert_eq!(round.spurious, 0, "round {k}: pages reported dirty that no one wrote");
    }
    assert!(r.ok());
}

/// The hardware-nested protocol (CR3 reload on every generation change)
/// forced on whatever host this is: the flush stub runs under load and the
/// run stays correct.
#[test]
fn cr3_reload_protocol_runs_under_load() {
    if common::skip_without_kvm() {
        return;
    }
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 8 << 20,
        mode: Mode::Random,
        write_pct: 50,
        duration: Duration::from_millis(400),
        rounds: 4,
        force_flush: true,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    assert!(r.flushes >= 2 * 2, "expected a flush per vCPU per generation change, got {}", r.flushes);
    assert!(r.ok(), "{r:#?}");
}

#[test]
fn snapshot_dumps_the_running_space() {
    if common::skip_without_kvm() {
        return;
    }
    let cfg = RunConfig {
        vcpus: 1,
        mem_bytes: 4 << 20,
        duration: Duration::from_millis(100),
        rounds: 1,
        snapshot: true,
        ..RunConfig::default()
    };
    let r = run(&cfg, &mut |_| {}).expect("run");
    let s = r.snapshot.expect("snapshot");
    assert!(s.contains("[0x000100000000, 0x000100400000)"), "guest RAM at 4 GiB: {s}");
    assert!(s.contains("PML4E[  1]"), "runtime data slot missing: {s}");
    assert!(s.contains("[0x0000ffff8000, 0x000100000000)") && s.contains("r-x"), "boot ROM below 4 GiB: {s}");
}
