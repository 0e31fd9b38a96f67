//! The aggregate: routing end to end, IPIs, MSIs, MMIO dispatch,
//! snapshots, and no panics from guest-controlled values.

use vmm::intr::hpet::{TCONF_INT_ENABLE, TCONF_LEVEL, reg as hreg};
use vmm::intr::ioapic::{IOREGSEL, IOWIN, RTE_LEVEL, RTE_MASKED, RTE_REMOTE_IRR};
use vmm::intr::lapic::reg;
use vmm::intr::msi::{MsiError, RhPolicy};
use vmm::intr::{CpuEvent, HPET_BASE, IOAPIC_BASE, Interrupts, InterruptsState, IntrError, LAPIC_BASE};

fn lw(ic: &mut Interrupts, vcpu: usize, off: u64, v: u32) {
    assert!(ic.mmio_write(vcpu, LAPIC_BASE + off, 4, u64::from(v), 0));
}

fn lr(ic: &mut Interrupts, vcpu: usize, off: u64) -> u32 {
    ic.mmio_read(vcpu, LAPIC_BASE + off, 4, 0).unwrap() as u32
}

fn rte(ic: &mut Interrupts, pin: usize, e: u64) {
    let idx = 0x10 + 2 * pin as u64;
    assert!(ic.mmio_write(0, IOAPIC_BASE + IOREGSEL, 4, idx + 1, 0));
    assert!(ic.mmio_write(0, IOAPIC_BASE + IOWIN, 4, e >> 32, 0));
    assert!(ic.mmio_write(0, IOAPIC_BASE + IOREGSEL, 4, idx, 0));
    assert!(ic.mmio_write(0, IOAPIC_BASE + IOWIN, 4, e & 0xffff_ffff, 0));
}

fn hw(ic: &mut Interrupts, off: u64, v: u64, now: u64) {
    assert!(ic.mmio_write(0, HPET_BASE + off, 8, v, now));
}

/// `n` vCPUs, all software-enabled; vCPU `i` gets logical ID `1 << i` (flat).
fn system(n: usize) -> Interrupts {
    let mut ic = Interrupts::new(n).unwrap();
    for i in 0..n {
        lw(&mut ic, i, reg::SVR, 0x1ff);
        lw(&mut ic, i, reg::LDR, (1u32 << (i % 8)) << 24);
    }
    ic
}

/// Pending vectors per vCPU, taking them (ack + EOI) so each is seen once.
fn drain(ic: &mut Interrupts) -> Vec<Vec<u8>> {
    (0..ic.vcpus())
        .map(|v| {
            let mut got = Vec::new();
            while let Some(x) = ic.pending(v) {
                assert!(ic.ack(v, x));
                got.push(x);
                lw(ic, v, reg::EOI, 0);
            }
            got
        })
        .collect()
}

#[test]
fn construction_limits() {
    assert_eq!(Interrupts::new(0), Err(IntrError::BadVcpuCount(0)));
    assert_eq!(Interrupts::new(65), Err(IntrError::BadVcpuCount(65)));
    let ic = Interrupts::new(64).unwrap();
    assert_eq!(ic.lapic(63).unwrap().id(), 63);
    assert!(ic.lapic(64).is_none());
    assert_eq!(ic.rh_policy(), RhPolicy::DmOnly);
}

#[test]
fn hpet_level_eoi_forwarding_end_to_end() {
    let mut ic = system(2);
    // Pin 20 -> vCPU 1, vector 0x80, level, active high.
    rte(&mut ic, 20, (1u64 << 56) | RTE_LEVEL | 0x80);
    hw(&mut ic, hreg::timer_config(0), TCONF_INT_ENABLE | TCONF_LEVEL | (20 << 9), 0);
    hw(&mut ic, hreg::timer_comparator(0), 50, 0);
    hw(&mut ic, hreg::CONFIG, 1, 0);
    assert_eq!(ic.next_deadline(), Some(5_000));
    ic.tick(4_999);
    assert_eq!(ic.pending(1), None);
    ic.tick(5_000);
    assert_eq!(ic.pending(1), Some(0x80));
    assert_eq!(ic.pending(0), None);
    let tmr = ic.mmio_read(1, LAPIC_BASE + reg::TMR + 0x40, 4, 5_000).unwrap();
    assert_eq!(tmr, 1, "level vector sets TMR");
    assert!(ic.ack(1, 0x80));
    assert_ne!(ic.ioapic().entry(20) & RTE_REMOTE_IRR, 0);
    // EOI while the timer's status (and the line) is still asserted:
    // re-injected.
    lw(&mut ic, 1, reg::EOI, 0);
    assert_eq!(ic.pending(1), Some(0x80));
    assert!(ic.ack(1, 0x80));
    // Clear the status (deasserts the line), then EOI: nothing more.
    hw(&mut ic, hreg::INT_STATUS, 1, 6_000);
    assert_eq!(ic.pending(1), None);
    lw(&mut ic, 1, reg::EOI, 0);
    assert_eq!(ic.pending(1), None);
    assert_eq!(ic.ioapic().entry(20) & RTE_REMOTE_IRR, 0);
    assert!(!ic.ioapic().asserted(20));
}

#[test]
fn edge_eoi_is_not_forwarded() {
    let mut ic = system(1);
    rte(&mut ic, 3, 0x41);
    ic.pulse_irq(3);
    assert!(!ic.ioapic().asserted(3));
    assert!(ic.ack(0, 0x41));
    lw(&mut ic, 0, reg::EOI, 0);
    assert_eq!(ic.pending(0), None);
}

#[test]
fn unmask_of_asserted_level_pin_delivers_at_once() {
    let mut ic = system(1);
    rte(&mut ic, 10, RTE_LEVEL | RTE_MASKED | 0x55);
    ic.set_irq(10, true);
    assert_eq!(ic.pending(0), None);
    rte(&mut ic, 10, RTE_LEVEL | 0x55);
    assert_eq!(ic.pending(0), Some(0x55));
}

#[test]
fn ioapic_destinations_and_lowest_priority() {
    let mut ic = system(4);
    // Logical flat 0b0110 -> vCPUs 1, 2.
    rte(&mut ic, 1, (0x06u64 << 56) | (1 << 11) | 0x31);
    ic.set_irq(1, true);
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x31], vec![0x31], vec![]]);
    // Physical broadcast.
    rte(&mut ic, 2, (0xffu64 << 56) | 0x32);
    ic.set_irq(2, true);
    assert_eq!(drain(&mut ic), vec![vec![0x32]; 4]);
    // Lowest priority among 0b1111: raise TPR on 0 and 1 -> vCPU 2 wins (tie 2,3).
    lw(&mut ic, 0, reg::TPR, 0x20);
    lw(&mut ic, 1, reg::TPR, 0x10);
    rte(&mut ic, 4, (0x0fu64 << 56) | (1 << 11) | (1 << 8) | 0x33);
    ic.set_irq(4, true);
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x33], vec![]]);
    // NMI delivery mode.
    rte(&mut ic, 5, (3u64 << 56) | (4 << 8));
    ic.set_irq(5, true);
    assert!(ic.take_nmi(3));
    assert!(!ic.take_nmi(3));
    assert!(!ic.take_nmi(0));
    // ExtINT / SMI / INIT are dropped.
    for (pin, mode) in [(6, 7u64), (7, 2), (8, 5)] {
        rte(&mut ic, pin, (0xffu64 << 56) | (mode << 8) | 0x40);
        ic.set_irq(pin, true);
    }
    assert_eq!(drain(&mut ic), vec![Vec::<u8>::new(); 4]);
}

fn ipi(ic: &mut Interrupts, from: usize, hi: u32, lo: u32) {
    lw(ic, from, reg::ICR_HI, hi);
    lw(ic, from, reg::ICR_LO, lo);
}

#[test]
fn ipis_every_destination_mode_and_shorthand() {
    let mut ic = system(4);
    // Physical.
    ipi(&mut ic, 0, 2 << 24, 0x40);
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x40], vec![]]);
    ipi(&mut ic, 0, 0xff << 24, 0x41);
    assert_eq!(drain(&mut ic), vec![vec![0x41]; 4]);
    ipi(&mut ic, 0, 9 << 24, 0x42);
    assert_eq!(drain(&mut ic), vec![Vec::<u8>::new(); 4]);
    // Logical flat.
    ipi(&mut ic, 1, 0x09 << 24, 0x800 | 0x43);
    assert_eq!(drain(&mut ic), vec![vec![0x43], vec![], vec![], vec![0x43]]);
    // Logical cluster: vCPUs 0,1 in cluster 1 (members 1,2), 2,3 in cluster 2.
    for (v, ldr) in [(0, 0x11u32), (1, 0x12), (2, 0x21), (3, 0x22)] {
        lw(&mut ic, v, reg::DFR, 0x0fff_ffff);
        lw(&mut ic, v, reg::LDR, ldr << 24);
    }
    ipi(&mut ic, 0, 0x23 << 24, 0x800 | 0x44);
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x44], vec![0x44]]);
    ipi(&mut ic, 0, 0x12 << 24, 0x800 | 0x45);
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x45], vec![], vec![]]);
    ipi(&mut ic, 0, 0xff << 24, 0x800 | 0x46);
    assert_eq!(drain(&mut ic), vec![vec![0x46]; 4]);
    // Shorthands (the destination field is ignored).
    ipi(&mut ic, 2, 0, (1 << 18) | 0x47);
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x47], vec![]]);
    ipi(&mut ic, 2, 0, (2 << 18) | 0x48);
    assert_eq!(drain(&mut ic), vec![vec![0x48]; 4]);
    ipi(&mut ic, 2, 0, (3 << 18) | 0x49);
    assert_eq!(drain(&mut ic), vec![vec![0x49], vec![0x49], vec![], vec![0x49]]);
    // NMI to all but self.
    ipi(&mut ic, 0, 0, (3 << 18) | (4 << 8));
    assert_eq!((0..4).map(|v| ic.take_nmi(v)).collect::<Vec<_>>(), vec![false, true, true, true]);
    // Lowest priority (logical 0x23 -> 2, 3; 2 has the higher TPR).
    lw(&mut ic, 2, reg::TPR, 0x30);
    ipi(&mut ic, 0, 0x23 << 24, 0x900 | 0x4a);
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![], vec![0x4a]]);
    // IPIs are edge: TMR stays clear.
    ipi(&mut ic, 0, 1 << 24, 0xc000 | 0x4b);
    assert_eq!(lr(&mut ic, 1, reg::TMR + 0x20), 0);
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x4b], vec![], vec![]]);
    // An illegal vector: nothing sent, sender's ESR bit 5.
    ipi(&mut ic, 0, 1 << 24, 0x0e);
    assert_eq!(drain(&mut ic), vec![Vec::<u8>::new(); 4]);
    lw(&mut ic, 0, reg::ESR, 0);
    assert_eq!(lr(&mut ic, 0, reg::ESR), 1 << 5);
}

#[test]
fn init_and_startup_ipis_become_cpu_events() {
    let mut ic = system(3);
    // INIT assert (level, assert) to vCPU 1, then SIPI vector 0x9f.
    ipi(&mut ic, 0, 1 << 24, 0x0000_c500);
    ipi(&mut ic, 0, 1 << 24, 0x0000_069f);
    // INIT level de-assert: ignored.
    ipi(&mut ic, 0, 1 << 24, 0x0000_8500);
    assert_eq!(ic.take_cpu_events(), vec![CpuEvent::Init { vcpu: 1 }, CpuEvent::StartUp { vcpu: 1, vector: 0x9f }]);
    assert!(ic.take_cpu_events().is_empty());
    // All-but-self shorthand.
    ipi(&mut ic, 1, 0, 0x000c_4500);
    assert_eq!(ic.take_cpu_events(), vec![CpuEvent::Init { vcpu: 0 }, CpuEvent::Init { vcpu: 2 }]);
    // The I/O APIC's mode 110 is reserved: dropped. INIT through it is an event.
    rte(&mut ic, 9, (2u64 << 56) | (6 << 8) | 0x10);
    ic.set_irq(9, true);
    rte(&mut ic, 11, (2u64 << 56) | (5 << 8));
    ic.set_irq(11, true);
    assert_eq!(ic.take_cpu_events(), vec![CpuEvent::Init { vcpu: 2 }]);
    // Nothing reached an IRR.
    assert_eq!(drain(&mut ic), vec![Vec::<u8>::new(); 3]);
}

#[test]
fn nmi_msi() {
    let mut ic = system(2);
    ic.send_msi(0xfee0_1000, 0x400).unwrap();
    assert!(ic.take_nmi(1));
    assert!(!ic.take_nmi(0));
    assert_eq!(ic.pending(1), None);
}

#[test]
fn restore_refuses_impossible_state() {
    use vmm::intr::lapic::Lapic;
    let ic = system(2);
    let mut s = ic.snapshot();
    s.lapics.swap(0, 1);
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    let mut s = ic.snapshot();
    s.lapics.push(Lapic::new(7));
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    let mut s = ic.snapshot();
    s.cpu_events.push(CpuEvent::Init { vcpu: 2 });
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    let mut s = ic.snapshot();
    s.lapics = (0..65).map(|i| Lapic::new(i as u8)).collect();
    assert_eq!(Interrupts::restore(s), Err(IntrError::BadVcpuCount(65)));
    // HPET: a status bit on an edge timer, a bad route, legacy routing.
    let json = serde_json::to_value(ic.snapshot()).unwrap();
    let mut bad = json.clone();
    bad["hpet"]["isr"] = 1.into();
    let s: InterruptsState = serde_json::from_value(bad).unwrap();
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    let mut bad = json.clone();
    bad["hpet"]["timers"][0]["config"] = (5u64 << 9).into();
    let s: InterruptsState = serde_json::from_value(bad).unwrap();
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    let mut bad = json.clone();
    bad["hpet"]["config"] = 2.into();
    let s: InterruptsState = serde_json::from_value(bad).unwrap();
    assert!(matches!(Interrupts::restore(s), Err(IntrError::BadSnapshot(_))));
    // A foreign snapshot's impossible register bits are masked off.
    let mut odd = json;
    odd["lapics"][0]["tpr"] = 0x1234.into();
    odd["lapics"][0]["irr"][0] = 0xffff_ffffu32.into();
    let s: InterruptsState = serde_json::from_value(odd).unwrap();
    let mut r = Interrupts::restore(s).unwrap();
    assert_eq!(r.mmio_read(0, LAPIC_BASE + reg::TPR, 4, 0), Some(0x34));
    assert_eq!(r.mmio_read(0, LAPIC_BASE + reg::IRR, 4, 0), Some(0xffff_0000));
}

#[test]
fn disabled_apic_drops_ipis() {
    let mut ic = system(2);
    lw(&mut ic, 1, reg::SVR, 0xff);
    ipi(&mut ic, 0, 0xff << 24, 0x50);
    assert_eq!(drain(&mut ic), vec![vec![0x50], vec![]]);
}

#[test]
fn msi_routing_under_both_policies() {
    // Logical flat, fixed, DM=1, RH=0 (what Linux programs): DmOnly sends to
    // the logical destination, RhAndDm treats 0x02 as physical ID 2.
    let addr = 0xfee0_2004;
    let mut ic = system(4);
    ic.send_msi(addr, 0x61).unwrap();
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x61], vec![], vec![]]);
    ic.set_rh_policy(RhPolicy::RhAndDm);
    ic.send_msi(addr, 0x62).unwrap();
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x62], vec![]]);
    // RH=1, DM=1: logical under both.
    ic.send_msi(0xfee0_600c, 0x63).unwrap();
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x63], vec![0x63], vec![]]);
    // DmOnly with RH=1: lowest priority among the logical destinations.
    ic.set_rh_policy(RhPolicy::DmOnly);
    lw(&mut ic, 1, reg::TPR, 0x40);
    ic.send_msi(0xfee0_600c, 0x64).unwrap();
    assert_eq!(drain(&mut ic), vec![vec![], vec![], vec![0x64], vec![]]);
    // Physical broadcast; MSIs are edge even with the trigger bit set.
    ic.send_msi(0xfeef_f000, 0xc065).unwrap();
    assert_eq!(lr(&mut ic, 3, reg::TMR + 0x60), 0);
    assert_eq!(drain(&mut ic), vec![vec![0x65]; 4]);
    // Errors.
    assert_eq!(ic.send_msi(0xfed0_0000, 0x66), Err(MsiError::NotInterruptAddress(0xfed0_0000)));
    assert_eq!(ic.send_msi(0xfee0_0000, 0x366), Err(MsiError::ReservedDeliveryMode(3)));
    // Illegal vector: receiver ESR bit 6.
    ic.send_msi(0xfee0_0000, 0x05).unwrap();
    assert_eq!(ic.pending(0), None);
    lw(&mut ic, 0, reg::ESR, 0);
    assert_eq!(lr(&mut ic, 0, reg::ESR), 1 << 6);
}

#[test]
fn hpet_fsb_goes_through_the_msi_decoder() {
    let mut ic = system(2);
    hw(&mut ic, hreg::timer_config(1), TCONF_INT_ENABLE | (1 << 14), 0);
    hw(&mut ic, hreg::timer_fsb(1), (0xfee0_1000u64 << 32) | 0x70, 0);
    hw(&mut ic, hreg::timer_comparator(1), 3, 0);
    hw(&mut ic, hreg::CONFIG, 1, 0);
    ic.tick(300);
    assert_eq!(drain(&mut ic), vec![vec![], vec![0x70]]);
}

#[test]
fn lint_through_the_aggregate() {
    let mut ic = system(2);
    lw(&mut ic, 1, reg::LVT_LINT1, 0x400);
    assert!(ic.lint(1, 1));
    assert!(ic.take_nmi(1));
    assert!(!ic.lint(0, 1), "masked");
    assert!(!ic.lint(2, 1), "no such vCPU");
}

#[test]
fn mmio_claims() {
    let mut ic = system(2);
    for (gpa, claimed) in [
        (LAPIC_BASE, true),
        (LAPIC_BASE + 0xfff, true),
        (LAPIC_BASE + 0x1000, false),
        (IOAPIC_BASE, true),
        (IOAPIC_BASE + 0xfff, true),
        (IOAPIC_BASE + 0x1000, false),
        (HPET_BASE, true),
        (HPET_BASE + 0x3ff, true),
        (HPET_BASE + 0x400, false),
        (0, false),
        (0xfebf_ffff, false),
        (u64::MAX, false),
    ] {
        assert_eq!(ic.mmio_read(0, gpa, 4, 0).is_some(), claimed, "read {gpa:#x}");
        assert_eq!(ic.mmio_write(0, gpa, 4, 0, 0), claimed, "write {gpa:#x}");
    }
    // The LAPIC page is per vCPU; a vCPU that does not exist is not claimed.
    assert_eq!(ic.mmio_read(1, LAPIC_BASE + reg::ID, 4, 0), Some(1 << 24));
    assert_eq!(ic.mmio_read(2, LAPIC_BASE + reg::ID, 4, 0), None);
    assert!(!ic.mmio_write(2, LAPIC_BASE + reg::TPR, 4, 1, 0));
    // The HPET is reachable through the dispatch.
    assert_eq!(ic.mmio_read(0, HPET_BASE + 4, 4, 0), Some(100_000_000));
}

#[test]
fn lapic_timer_through_the_aggregate() {
    let mut ic = system(1);
    lw(&mut ic, 0, reg::LVT_TIMER, 0x90);
    lw(&mut ic, 0, reg::TIMER_DIVIDE, 0xb);
    ic.mmio_write(0, LAPIC_BASE + reg::TIMER_INITIAL, 4, 128 * 1024 * 1024, 1_000);
    assert_eq!(ic.next_deadline(), Some(1_000 + 1_000_000_000));
    ic.tick(1_000_000_999);
    assert_eq!(ic.pending(0), None);
    ic.tick(1_000_001_000);
    assert_eq!(ic.pending(0), Some(0x90));
    assert_eq!(ic.next_deadline(), None);
}

#[test]
fn snapshot_restore_round_trip() {
    let mut ic = system(3);
    rte(&mut ic, 21, (2u64 << 56) | RTE_LEVEL | 0xa0);
    hw(&mut ic, hreg::timer_config(0), TCONF_INT_ENABLE | TCONF_LEVEL | (21 << 9), 0);
    hw(&mut ic, hreg::timer_comparator(0), 10, 0);
    hw(&mut ic, hreg::CONFIG, 1, 0);
    ic.tick(1_000);
    lw(&mut ic, 1, reg::TPR, 0x20);
    ic.send_msi(0xfee0_0000, 0x77).unwrap();
    ic.set_rh_policy(RhPolicy::RhAndDm);
    let snap = ic.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let back: InterruptsState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);
    let mut other = Interrupts::restore(back).unwrap();
    assert_eq!(other, ic);
    // Both continue identically.
    for sys in [&mut ic, &mut other] {
        assert_eq!(sys.pending(2), Some(0xa0));
        assert!(sys.ack(2, 0xa0));
        lw(sys, 2, reg::EOI, 0);
        assert_eq!(sys.pending(2), Some(0xa0), "still asserted: re-injected");
    }
    assert_eq!(other.snapshot(), ic.snapshot());
    // A snapshot with no vCPUs is refused.
    let mut bad = ic.snapshot();
    bad.lapics.clear();
    assert_eq!(Interrupts::restore(bad), Err(IntrError::BadVcpuCount(0)));
}

#[test]
fn guest_values_never_panic() {
    // A deterministic xorshift over offsets, widths and values on every
    // device, with timers ticking, then a snapshot round trip.
    let mut ic = system(4);
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let bases = [LAPIC_BASE, IOAPIC_BASE, HPET_BASE];
    let mut now = 0u64;
    for _ in 0..200_000 {
        let r = next();
        let base = bases[(r % 3) as usize];
        let off = (r >> 8) % 0x1010;
        let size = [0usize, 1, 2, 3, 4, 8, 16][((r >> 24) % 7) as usize];
        let vcpu = ((r >> 32) % 5) as usize;
        let value = next();
        now += (r >> 40) % 5_000;
        if r & (1 << 63) != 0 {
            ic.mmio_write(vcpu, base + off, size, value, now);
        } else {
            ic.mmio_read(vcpu, base + off, size, now);
        }
        match (r >> 56) % 8 {
            0 => {
                ic.tick(now);
                assert!(ic.next_deadline().is_none_or(|d| d > now), "tick leaves no due work");
            }
            1 => {
                let _ = ic.send_msi(0xfee0_0000 | (value & 0xff00c), (value >> 32) as u32);
            }
            2 => ic.set_irq(((value >> 8) % 30) as usize, value & 1 != 0),
            3 => {
                if let Some(v) = ic.pending(vcpu) {
                    ic.ack(vcpu, v);
                }
            }
            _ => {}
        }
    }
    for v in 0..4 {
        for vec in 0..16u8 {
            assert!(!ic.ack(v, vec), "illegal vectors never reach IRR");
        }
    }
    let snap = ic.snapshot();
    assert_eq!(Interrupts::restore(snap).unwrap(), ic);
}
