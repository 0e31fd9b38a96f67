//! Live migration of a running guest between two KVM VMs of this process
//! over TCP loopback (need /dev/kvm).

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use vmm::migration::{Progress, SourceConfig, TargetConfig};
use vmm_kvm::migrate::{Guest, GuestConfig, GuestReport, SourceOutcome};
use vmm_kvm::workload::Mode;

fn cfg(vcpus: usize, mem: u64) -> GuestConfig {
    GuestConfig { vcpus, mem_bytes: mem, mode: Mode::Mixed, write_pct: 80, paging: None, ..GuestConfig::default() }
}

fn assert_rounds(what: &str, r: &GuestReport) {
    for (k, round) in r.rounds.iter().enumerate() {
        assert_eq!(round.missed, 0, "{what} round {k}: written pages missed by the harvest: {round:?}");
        assert_eq!(round.spurious, 0, "{what} round {k}: pages reported dirty that no one wrote: {round:?}");
    }
}

fn assert_checks(what: &str, r: &GuestReport) {
    assert_rounds(what, r);
    assert!(!r.vcpus.is_empty(), "{what}: no final checks");
    for (i, v) in r.vcpus.iter().enumerate() {
        assert!(v.ops > 0, "{what}: vCPU {i} made no progress");
        assert_eq!(v.bad_pages, 0, "{what}: vCPU {i}: pages differ from the replayed image");
        assert_eq!(v.guest_bad_headers, 0, "{what}: vCPU {i}: misplaced pages");
        assert_eq!(v.guest_checksum, v.expected_checksum, "{what}: vCPU {i}: checksum");
        assert_eq!(v.data_errors, 0, "{what}: vCPU {i}: data errors");
    }
    assert!(r.ok());
}

/// Migrates a guest of `c` after `after`, from a source to a target in
/// this process; returns the source's outcome and the target's report.
fn migrate_once(c: &GuestConfig, after: Duration, target_time: Duration) -> (SourceOutcome, Option<GuestReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::scope(|s| {
        let tc = c.clone();
        let target = s.spawn(move || {
            let mut g = Guest::new(&tc, true).expect("target guest");
            let (conn, _) = listener.accept().expect("accept");
            let (sum, rep) = g.run_target(&conn, &TargetConfig::default(), target_time, 4).expect("target run");
            eprintln!("target: {sum:?}");
            rep
        });
        let mut g = Guest::new(c, false).expect("source guest");
        let conn = TcpStream::connect(addr).expect("connect");
        let mut rounds = Vec::new();
        let out = g
            .run_source(
                after * 4,
                3,
                after,
                &conn,
                &SourceConfig { shared_clock: true, ..Default::default() },
                &mut |p: &Progress| rounds.push(p.clone()),
            )
            .expect("source run");
        eprintln!("progress: {rounds:?}");
        let t = target.join().ok();
        (out, t)
    })
}

#[test]
fn running_guest_migrates_with_two_vcpus_and_loses_nothing() {
    if common::skip_without_kvm() {
        return;
    }
    let c = cfg(2, 32 << 20);
    let (out, target) = migrate_once(&c, Duration::from_millis(500), Duration::from_millis(800));
    let SourceOutcome::Migrated(sum, src) = out else { panic!("migration failed: {out:?}") };
    eprintln!("summary: {sum:#?}");
    assert_rounds("source", &src);
    assert!(src.rounds.len() >= 2, "the migration harvested fewer than twice");
    assert!(src.ledger_pages() > 0, "the guest wrote nothing on the source");
    let target = target.expect("target thread");
    eprintln!("target report: {target:#?}");
    assert_checks("target", &target);
    assert!(target.ledger_pages() > 0, "the guest wrote nothing on the target");
    assert!(sum.pages_sent > 0 && sum.bytes_sent > 0);
}
