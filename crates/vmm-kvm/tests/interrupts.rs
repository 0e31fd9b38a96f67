//! Interrupt delivery on real KVM vCPUs: our LAPIC / I/O APIC / HPET
//! models reached through MMIO emulation, vectors injected into the
//! runtime's IDT, EOIs by the guest; and the same guest programs with
//! KVM's in-kernel LAPIC and I/O APIC (the differential). Each test checks
//! the exact log every vCPU left.

mod common;

use std::time::Duration;
use vmm_kvm::interrupts::{Controller, ScriptRun, differential, kvm_keeps_in_service, run_scripts, scripts};
use vmm_kvm::{PagingMode, detect};

const TIMEOUT: Duration = Duration::from_secs(15);

fn mode() -> PagingMode {
    detect::detect().map(|d| d.mode).unwrap_or(PagingMode::Shadow)
}

fn show(what: &str, r: &ScriptRun) {
    eprintln!(
        "{what}: {:?} in {:?}; {} injected, {} window waits, {} MMIO exits, {:?}",
        r.logs, r.elapsed, r.injected, r.window_waits, r.mmio_exits, r.stats
    );
}

#[test]
fn hpet_level_interrupt_is_reinjected_until_its_status_is_cleared() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::hpet_level();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    // The first delivery and the re-injection after the EOI; nothing after
    // the status was cleared.
    assert_eq!(r.injected, 2);
    assert!(r.stats.timer_ticks >= 1, "the host timer fired the HPET");
    // The re-sent vector became pending during the EOI's emulation, with
    // the guest in its #PF stub (IF clear): it waited for the window.
    assert!(r.window_waits >= 1, "no interrupt window was needed");
}

#[test]
fn ipis_reach_their_targets() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::ipis();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.injected, 4);
    assert!(r.stats.kicks >= 1, "a target was kicked");
}

#[test]
fn task_priority_holds_back_lower_classes() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::task_priority();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.injected, 2);
}

#[test]
fn differential_task_priority_against_kvm_irqchip() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::task_priority();
    check_differential(&s, &expect);
}

#[test]
fn ipi_ping_pong_loops() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::ping_pong(64);
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.seen, [64, 64]);
    assert_eq!(r.injected, 128);
    let kvm = run_scripts(Controller::Kvm, &s, mode(), TIMEOUT).expect("KVM run");
    show("kvm", &kvm);
    assert_eq!(kvm.logs, r.logs);
    assert_eq!(kvm.seen, [64, 64]);
}

#[test]
fn lapic_timer_fires_once() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::lapic_timer();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.injected, 1);
    assert!(r.stats.timer_ticks >= 1, "the host timer fired the LAPIC timer");
}

#[test]
fn differential_lapic_timer_against_kvm_irqchip() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::lapic_timer();
    check_differential(&s, &expect);
}

#[test]
fn msis_reach_the_destinations_of_each_mode() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::msi_modes();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    let delivered: u64 =
        scripts::MSI_FLAT.iter().chain(&scripts::MSI_CLUSTER).map(|c| u64::from(c.targets.count_ones())).sum();
    assert_eq!(r.injected, delivered);
    assert_eq!(r.stats.msis, (scripts::MSI_FLAT.len() + scripts::MSI_CLUSTER.len()) as u64);
}

#[test]
fn lowest_priority_msis_go_to_the_lowest_priority_target() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::lowest_priority();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.injected, 2);
}

fn check_differential(s: &[Vec<vmm::guest::ScriptOp>], expect: &[Vec<vmm::guest::LogEntry>]) {
    let (ours, kvm) = differential(s, mode(), TIMEOUT).expect("differential run");
    show("ours", &ours);
    show("kvm", &kvm);
    assert_eq!(ours.logs, kvm.logs, "our models and KVM's in-kernel irqchip disagree");
    assert_eq!(kvm.logs, expect);
}

#[test]
fn delivered_vector_stays_in_service_until_eoi() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::in_service_probe();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    match kvm_keeps_in_service(mode()).expect("KVM probe") {
        Ok(()) => eprintln!("KVM's in-kernel LAPIC agrees"),
        Err(log) => eprintln!("KVM's in-kernel LAPIC on this host does not keep the vector in service: {log:x?}"),
    }
}

/// The differential of a level-triggered sequence, where KVM's LAPIC
/// keeps vectors in service (see `vmm_kvm::interrupts`).
fn check_level_differential(s: &[Vec<vmm::guest::ScriptOp>], expect: &[Vec<vmm::guest::LogEntry>]) {
    if let Err(log) = kvm_keeps_in_service(mode()).expect("KVM probe") {
        eprintln!(
            "SKIPPED: KVM's in-kernel LAPIC here retires a vector on delivery (self-IPI probe log {log:x?}, \
             expected ISR bit set and PPR 0x50 before the EOI), so it re-sends an asserted level-triggered \
             vector without any guest EOI: there is no in-kernel reference for the level sequence on this host"
        );
        return;
    }
    check_differential(s, expect);
}

#[test]
fn differential_hpet_level_against_kvm_irqchip() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::hpet_level();
    check_level_differential(&s, &expect);
}

#[test]
fn unmasking_an_asserted_level_pin_delivers_at_once() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::unmask_asserted();
    let r = run_scripts(Controller::Ours, &s, mode(), TIMEOUT).expect("run");
    show("ours", &r);
    assert_eq!(r.logs, expect);
    assert_eq!(r.injected, 1);
    check_level_differential(&s, &expect);
}

#[test]
fn differential_ipis_against_kvm_irqchip() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::ipis();
    check_differential(&s, &expect);
}

#[test]
fn differential_msis_against_kvm_irqchip() {
    if common::skip_without_kvm() {
        return;
    }
    let (s, expect) = scripts::msi_modes();
    check_differential(&s, &expect);
}
