//! The interrupt models travel in the migration stream's device state
//! (`vmm::migration::devices::{save,restore}_interrupts`): registers,
//! pending vectors, the I/O APIC's routes and levels, the HPET counter and
//! the LAPIC timer arrive intact, the target's clock continues the
//! source's (a timer neither restarts nor fires early, and does fire), and
//! bad blobs are refused with nothing changed.

use std::time::{Duration, Instant};

use vmm::intr::lapic::{LVT_MASKED, SVR_ENABLE, reg};
use vmm::intr::system::IntrSystem;
use vmm::intr::{HPET_BASE, IOAPIC_BASE, LAPIC_BASE};
use vmm::machine::MmioDevices;
use vmm::migration::StateKind;
use vmm::migration::devices::{INTERRUPTS_INSTANCE, decode_interrupts, restore_interrupts, save_interrupts};

fn w32(s: &IntrSystem, vcpu: usize, gpa: u64, v: u32) {
    s.write(vcpu, gpa, &v.to_le_bytes());
}

fn r32(s: &IntrSystem, vcpu: usize, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    s.read(vcpu, gpa, &mut b);
    u32::from_le_bytes(b)
}

const TIMER_VECTOR: u32 = 0x30;
const PIN: u32 = 5;
const PIN_VECTOR: u32 = 0x41;

/// A source system with state everywhere: both LAPICs enabled with a TPR,
/// vCPU 0's one-shot timer running (~1.5 s), an I/O APIC pin routed
/// level-triggered to vCPU 1 and asserted (pending there), the HPET
/// counting.
fn programmed() -> std::sync::Arc<IntrSystem> {
    let s = IntrSystem::new(2).unwrap();
    for v in 0..2 {
        w32(&s, v, LAPIC_BASE + reg::SVR, SVR_ENABLE | 0xff);
        w32(&s, v, LAPIC_BASE + reg::TPR, 0x10 * v as u32);
    }
    w32(&s, 0, LAPIC_BASE + reg::TIMER_DIVIDE, 0xb);
    w32(&s, 0, LAPIC_BASE + reg::LVT_TIMER, TIMER_VECTOR);
    w32(&s, 0, LAPIC_BASE + reg::TIMER_INITIAL, 200_000_000);
    w32(&s, 0, IOAPIC_BASE, 0x10 + 2 * PIN);
    w32(&s, 0, IOAPIC_BASE + 0x10, PIN_VECTOR | (1 << 15));
    w32(&s, 0, IOAPIC_BASE, 0x11 + 2 * PIN);
    w32(&s, 0, IOAPIC_BASE + 0x10, 1 << 24);
    s.set_irq(PIN as usize, true);
    w32(&s, 0, HPET_BASE + 0x10, 1);
    s
}

#[test]
fn interrupt_models_round_trip_with_their_clock() {
    let src = programmed();
    assert_eq!(src.with_interrupts(|i| i.pending(1)).flatten(), Some(PIN_VECTOR as u8));
    std::thread::sleep(Duration::from_millis(20));
    let left_before = r32(&src, 0, LAPIC_BASE + reg::TIMER_CURRENT);
    let hpet_before = r32(&src, 0, HPET_BASE + 0xf0);
    assert!(left_before > 0 && left_before < 200_000_000, "timer runs: {left_before}");
    assert!(hpet_before > 0, "HPET counts");
    let blob = save_interrupts(&src).unwrap();
    assert_eq!((blob.kind, blob.instance), (StateKind::Device, INTERRUPTS_INSTANCE));
    let saved = decode_interrupts(&blob.data, 2).unwrap();
    assert_eq!(saved.state, src.snapshot().unwrap().state);
    drop(src);

    // The target was built earlier and its clock has run on its own for
    // longer than the bounds below allow.
    let dst = IntrSystem::new(2).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    restore_interrupts(&dst, &blob.data, 2).unwrap();
    let got = dst.snapshot().unwrap();
    assert_eq!(got.state, saved.state, "models differ after the round trip");
    // The clock continues the source's: not restarted, not jumped ahead
    // by the target's own age or the time in between.
    assert!(got.at_ns >= saved.at_ns && got.at_ns < saved.at_ns + 300_000_000, "{} vs {}", got.at_ns, saved.at_ns);
    let left_after = r32(&dst, 0, LAPIC_BASE + reg::TIMER_CURRENT);
    assert!(left_after > 0 && left_after <= left_before, "timer restarted or expired: {left_before} -> {left_after}");
    let hpet_after = r32(&dst, 0, HPET_BASE + 0xf0);
    assert!(hpet_after >= hpet_before && hpet_after - hpet_before < 3_000_000, "HPET {hpet_before} -> {hpet_after}");
    // Pending state arrived: the asserted level pin's vector on vCPU 1;
    // the TPRs.
    assert_eq!(dst.with_interrupts(|i| i.pending(1)).flatten(), Some(PIN_VECTOR as u8));
    assert_eq!(r32(&dst, 1, LAPIC_BASE + reg::TPR), 0x10);
    // The target's timer thread took the restored deadline: the one-shot
    // timer fires there (within the functional deadline of 20 s).
    let t = Instant::now();
    while dst.with_interrupts(|i| i.pending(0)).flatten() != Some(TIMER_VECTOR as u8) {
        assert!(t.elapsed() < Duration::from_secs(20), "the restored LAPIC timer never fired");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(dst.stats().timer_ticks >= 1);
}

#[test]
fn bad_interrupt_blobs_are_refused_and_change_nothing() {
    let src = programmed();
    let blob = save_interrupts(&src).unwrap().data;
    let dst = IntrSystem::new(2).unwrap();
    w32(&dst, 0, LAPIC_BASE + reg::SVR, SVR_ENABLE | 0xff);
    w32(&dst, 0, LAPIC_BASE + reg::LVT_TIMER, LVT_MASKED | 0x55);
    let before = dst.snapshot().unwrap().state;
    let check = |data: &[u8], vcpus: usize, what: &str| {
        let e = restore_interrupts(&dst, data, vcpus).expect_err(what);
        assert_eq!(e.op, "interrupt state", "{what}: {e}");
        assert_eq!(dst.snapshot().unwrap().state, before, "{what}: the target changed");
    };
    // Every truncation of the header and body.
    for n in [0, 3, 8, 11, 12, 13, blob.len() / 2, blob.len() - 1] {
        check(&blob[..n], 2, &format!("truncated to {n}"));
    }
    let mut m = blob.clone();
    m[0] ^= 1;
    check(&m, 2, "magic");
    let mut m = blob.clone();
    m[4] = 9;
    check(&m, 2, "version");
    // Another vCPU count: the header's, and a target of another size.
    check(&blob, 3, "vCPU count");
    let three = IntrSystem::new(3).unwrap();
    assert!(restore_interrupts(&three, &blob, 3).is_err());
    // JSON that decodes but holds what no guest could produce: a LAPIC
    // whose ID is not its vCPU number.
    let mut snap = decode_interrupts(&blob, 2).unwrap();
    snap.state.lapics.swap(0, 1);
    let mut forged = blob[..12].to_vec();
    forged.extend_from_slice(&serde_json::to_vec(&snap).unwrap());
    check(&forged, 2, "LAPIC IDs swapped");
    let mut garbage = blob[..12].to_vec();
    garbage.extend_from_slice(b"{\"at_ns\": 1}");
    check(&garbage, 2, "incomplete JSON");
    // A system driving an external controller has nothing of ours to save.
    struct Lines;
    impl vmm::intr::system::IrqLines for Lines {
        fn set_irq(&self, _: usize, _: bool) {}
        fn send_msi(&self, _: u64, _: u32) {}
    }
    let ext = IntrSystem::with_external(2, std::sync::Arc::new(Lines));
    assert!(save_interrupts(&ext).is_err());
    assert!(restore_interrupts(&ext, &blob, 2).is_err());
}
