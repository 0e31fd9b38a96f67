//! The instruction emulator against the CPU: every generated case runs
//! natively on RAM and emulated on a plain-memory device (and straddling
//! the two), on a real KVM vCPU; the results must be identical.
//! `EMUL_CASES=N` runs N cases (default 3000).

mod common;

use vmm_kvm::differential::run_differential;
use vmm_kvm::{PagingMode, detect};

#[test]
fn emulator_matches_the_cpu() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect::detect().map(|d| d.mode).unwrap_or(PagingMode::Shadow);
    let cases = std::env::var("EMUL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let r = run_differential(cases, 0xd1ff, mode).expect("differential run");
    eprintln!(
        "{} forms, {} cases x 3 phases; {} MMIO exits, {} emulated; phases {:?}; emulation {:?} in all",
        r.forms, r.cases, r.mmio_exits, r.emulated, r.phase_time, r.emul_time
    );
    for d in r.divergences.iter().take(20) {
        eprintln!("case {} {:?} {} {:02x?}: {}", d.index, d.phase, d.form, d.bytes, d.what);
    }
    assert!(r.divergences.is_empty(), "{} divergences", r.divergences.len());
    // Every case touches the device in the emulated phase (but REP with a
    // zero count, which touches nothing): nearly every case was emulated.
    assert!(r.emulated as usize >= cases * 9 / 10, "cases were really emulated: {}", r.emulated);
}
