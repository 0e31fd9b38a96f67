//! Local APIC register rules bit by bit, priorities, acceptance, EOI,
//! errors, access widths and the timer.

use vmm::intr::lapic::{
    ESR_RECEIVE_ILLEGAL_VECTOR, ESR_SEND_ILLEGAL_VECTOR, LAPIC_TIMER_HZ, LAPIC_VERSION, Lapic, LapicEffect, reg,
    timer_divisor,
};

fn rd(l: &Lapic, off: u64) -> u32 {
    l.mmio_read(off, 4, 0) as u32
}

fn wr(l: &mut Lapic, off: u64, v: u32) -> LapicEffect {
    l.mmio_write(off, 4, u64::from(v), 0)
}

/// An enabled APIC (SVR = 0x1ff).
fn enabled(id: u8) -> Lapic {
    let mut l = Lapic::new(id);
    wr(&mut l, reg::SVR, 0x1ff);
    l
}

/// Writes all-ones then all-zeros; returns what each reads back.
fn probe(l: &mut Lapic, off: u64) -> (u32, u32) {
    wr(l, off, 0xffff_ffff);
    let ones = rd(l, off);
    wr(l, off, 0);
    (ones, rd(l, off))
}

#[test]
fn reset_values() {
    let l = Lapic::new(3);
    assert_eq!(rd(&l, reg::ID), 3 << 24);
    assert_eq!(rd(&l, reg::VERSION), 0x0006_0010);
    assert_eq!(LAPIC_VERSION & (1 << 24), 0, "no EOI-broadcast suppression");
    assert_eq!(rd(&l, reg::TPR), 0);
    assert_eq!(rd(&l, reg::PPR), 0);
    assert_eq!(rd(&l, reg::LDR), 0);
    assert_eq!(rd(&l, reg::DFR), 0xffff_ffff);
    assert_eq!(rd(&l, reg::SVR), 0xff);
    assert!(!l.enabled());
    for off in
        [reg::LVT_TIMER, reg::LVT_THERMAL, reg::LVT_PERF, reg::LVT_LINT0, reg::LVT_LINT1, reg::LVT_ERROR, reg::LVT_CMCI]
    {
        assert_eq!(rd(&l, off), 0x1_0000, "LVT {off:#x} masked at reset");
    }
    for i in 0..8 {
        assert_eq!(rd(&l, reg::ISR + 0x10 * i), 0);
        assert_eq!(rd(&l, reg::TMR + 0x10 * i), 0);
        assert_eq!(rd(&l, reg::IRR + 0x10 * i), 0);
    }
    assert_eq!(rd(&l, reg::TIMER_DIVIDE), 0);
    assert_eq!(rd(&l, reg::TIMER_INITIAL), 0);
    assert_eq!(rd(&l, reg::TIMER_CURRENT), 0);
}

#[test]
fn writable_bits_per_register() {
    let mut l = enabled(1);
    // (offset, reads after writing all-ones, reads after writing zero)
    let table: [(u64, u32, u32); 13] = [
        (reg::ID, 1 << 24, 1 << 24),                  // read-only
        (reg::VERSION, LAPIC_VERSION, LAPIC_VERSION), // read-only
        (reg::TPR, 0xff, 0),
        (reg::APR, 0, 0),
        (reg::RRD, 0, 0),
        (reg::LDR, 0xff00_0000, 0),
        (reg::DFR, 0xffff_ffff, 0x0fff_ffff), // bits 27:0 read as ones
        (reg::ICR_HI, 0xff00_0000, 0),
        (reg::TIMER_DIVIDE, 0xb, 0),
        (reg::LVT_TIMER, 0x0002_00ff | 0x1_0000, 0),
        (reg::LVT_ERROR, 0x0001_00ff, 0),
        (reg::LVT_LINT0, 0x0001_a7ff, 0),
        (reg::LVT_LINT1, 0x0001_a7ff, 0),
    ];
    for (off, ones, zeros) in table {
        assert_eq!(probe(&mut l, off), (ones, zeros), "register {off:#x}");
    }
    for off in [reg::LVT_THERMAL, reg::LVT_PERF, reg::LVT_CMCI] {
        assert_eq!(probe(&mut l, off), (0x0001_07ff, 0), "register {off:#x}");
    }
    // SVR: bits 9:0 writable, bit 12 (EOI suppression) reserved.
    wr(&mut l, reg::SVR, 0xffff_ffff);
    assert_eq!(rd(&l, reg::SVR), 0x3ff);
    // ISR/TMR/IRR and PPR are read-only.
    for off in (0x100..0x280).step_by(0x10).chain([reg::PPR]) {
        wr(&mut l, off, 0xffff_ffff);
        assert_eq!(rd(&l, off), 0, "register {off:#x}");
    }
    // Unimplemented offsets read zero and ignore writes.
    for off in [0x00, 0x10, 0x40, 0x50, 0x60, 0x70, 0x290, 0x2a0, 0x3a0, 0x3f0, 0x400, 0xff0] {
        wr(&mut l, off, 0xffff_ffff);
        assert_eq!(rd(&l, off), 0, "offset {off:#x}");
    }
}

#[test]
fn icr_low_bits_and_idle_delivery_status() {
    let mut l = enabled(0);
    wr(&mut l, reg::ICR_HI, 0xff);
    // Send to an unused destination so nothing matters but the bits.
    wr(&mut l, reg::ICR_HI, 0x0700_0000);
    wr(&mut l, reg::ICR_LO, !(7 << 8) & !(3 << 18));
    // vector, DM, dest mode, level, trigger, shorthand; bit 12 reads idle.
    assert_eq!(rd(&l, reg::ICR_LO), 0x0000_c8ff);
    wr(&mut l, reg::ICR_LO, 0x000c_0030);
    assert_eq!(rd(&l, reg::ICR_LO), 0x000c_0030);
    assert_eq!(rd(&l, reg::ICR_LO) & (1 << 12), 0);
}

#[test]
fn widths_and_alignment() {
    let mut l = enabled(0x12);
    wr(&mut l, reg::TPR, 0x5a);
    // Byte and word reads see the page image.
    assert_eq!(l.mmio_read(reg::ID + 3, 1, 0), 0x12);
    assert_eq!(l.mmio_read(reg::ID + 2, 2, 0), 0x1200);
    assert_eq!(l.mmio_read(reg::TPR, 1, 0), 0x5a);
    assert_eq!(l.mmio_read(reg::TPR + 4, 4, 0), 0, "bytes 4-15 of a slot read zero");
    assert_eq!(l.mmio_read(reg::ID, 8, 0), 0x1200_0000);
    assert_eq!(l.mmio_read(reg::TPR, 3, 0), 0, "odd widths read zero");
    assert_eq!(l.mmio_read(reg::TPR, 0, 0), 0);
    assert_eq!(l.mmio_read(0xffe, 4, 0), 0);
    assert_eq!(l.mmio_read(u64::MAX, 8, 0), 0);
    // Only aligned 4-byte writes take effect.
    for (off, size) in [(reg::TPR, 1), (reg::TPR, 2), (reg::TPR, 8), (reg::TPR + 4, 4), (reg::TPR + 1, 4)] {
        assert_eq!(l.mmio_write(off, size, 0x11, 0), LapicEffect::None);
        assert_eq!(rd(&l, reg::TPR), 0x5a);
    }
    assert_eq!(l.mmio_write(u64::MAX - 3, 4, 1, 0), LapicEffect::None);
    assert_eq!(l.mmio_write(0x1000, 4, 1, 0), LapicEffect::None);
}

#[test]
fn ppr_from_tpr_and_isrv() {
    let mut l = enabled(0);
    let cases = [
        // (tpr, in-service vector, ppr)
        (0x00, None, 0x00),
        (0x35, None, 0x35),
        (0x35, Some(0x41), 0x40),
        (0x45, Some(0x41), 0x45),
        (0x40, Some(0x4f), 0x40),
        (0x3f, Some(0x40), 0x40),
        (0xff, Some(0xfe), 0xff),
    ];
    for (tpr, isr, ppr) in cases {
        let mut l2 = l.clone();
        wr(&mut l2, reg::TPR, tpr);
        if let Some(v) = isr {
            assert!(l2.accept(v, false));
            assert!(l2.ack(v));
        }
        assert_eq!(rd(&l2, reg::PPR), ppr, "tpr {tpr:#x} isr {isr:?}");
        assert_eq!(l2.ppr(), ppr as u8);
    }
    wr(&mut l, reg::TPR, 0);
}

#[test]
fn tpr_masks_by_priority_class() {
    let mut l = enabled(0);
    assert!(l.accept(0x45, false));
    for (tpr, want) in [(0x00, Some(0x45)), (0x3f, Some(0x45)), (0x40, None), (0x44, None), (0x50, None)] {
        wr(&mut l, reg::TPR, tpr);
        assert_eq!(l.pending(), want, "tpr {tpr:#x}");
    }
    wr(&mut l, reg::TPR, 0);
    // An in-service vector blocks its own class and below.
    assert!(l.ack(0x45));
    assert!(l.accept(0x4f, false));
    assert!(l.accept(0x32, false));
    assert_eq!(l.pending(), None);
    assert!(l.accept(0x50, false));
    assert_eq!(l.pending(), Some(0x50));
}

#[test]
fn accept_ack_eoi_and_tmr() {
    let mut l = enabled(0);
    assert!(l.accept(0x31, true));
    assert!(l.accept(0x62, false));
    assert_eq!(rd(&l, reg::IRR + 0x10), 1 << 17);
    assert_eq!(rd(&l, reg::IRR + 0x30), 1 << 2);
    assert_eq!(rd(&l, reg::TMR + 0x10), 1 << 17);
    assert_eq!(rd(&l, reg::TMR + 0x30), 0);
    assert_eq!(l.pending(), Some(0x62));
    assert!(!l.ack(0x63), "ack of a vector not in IRR changes nothing");
    assert!(l.ack(0x62));
    assert_eq!(rd(&l, reg::ISR + 0x30), 1 << 2);
    assert_eq!(rd(&l, reg::IRR + 0x30), 0);
    assert_eq!(l.pending(), None, "0x31 is below the in-service class");
    assert_eq!(wr(&mut l, reg::EOI, 0), LapicEffect::Eoi { vector: 0x62, level: false });
    assert_eq!(l.pending(), Some(0x31));
    assert!(l.ack(0x31));
    assert_eq!(wr(&mut l, reg::EOI, 0xdead), LapicEffect::Eoi { vector: 0x31, level: true });
    assert_eq!(wr(&mut l, reg::EOI, 0), LapicEffect::None, "EOI with nothing in service");
    assert_eq!(rd(&l, reg::EOI), 0);
    // Re-accepting edge clears the TMR bit.
    assert!(l.accept(0x31, false));
    assert_eq!(rd(&l, reg::TMR + 0x10), 0);
}

#[test]
fn eoi_retires_highest_in_service_first() {
    let mut l = enabled(0);
    l.accept(0x40, false);
    l.ack(0x40);
    l.accept(0x80, true);
    l.ack(0x80);
    assert_eq!(l.eoi(), LapicEffect::Eoi { vector: 0x80, level: true });
    assert_eq!(l.eoi(), LapicEffect::Eoi { vector: 0x40, level: false });
}

#[test]
fn illegal_vectors_set_esr() {
    let mut l = enabled(0);
    for v in 0..16u8 {
        assert!(!l.accept(v, false));
        assert!(!l.accept(v, true));
    }
    assert_eq!(l.pending(), None);
    assert_eq!(rd(&l, reg::ESR), 0, "errors are latched by an ESR write");
    wr(&mut l, reg::ESR, 0);
    assert_eq!(rd(&l, reg::ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
    wr(&mut l, reg::ESR, 0);
    assert_eq!(rd(&l, reg::ESR), 0, "the second write latches nothing new");
    // Sending a fixed IPI with an illegal vector: nothing sent, bit 5.
    assert_eq!(wr(&mut l, reg::ICR_LO, 0x0000_0005), LapicEffect::None);
    assert_eq!(wr(&mut l, reg::ICR_LO, 0x0000_010f), LapicEffect::None);
    wr(&mut l, reg::ESR, 0);
    assert_eq!(rd(&l, reg::ESR), ESR_SEND_ILLEGAL_VECTOR);
    // ESR writes ignore the written value: it is read-only otherwise.
    wr(&mut l, reg::ESR, 0xffff_ffff);
    assert_eq!(rd(&l, reg::ESR), 0);
    // An NMI IPI has no vector: vector 2 is fine.
    assert!(matches!(wr(&mut l, reg::ICR_LO, 0x0004_0402), LapicEffect::Ipi(_)));
    // Ack of an illegal vector finds nothing.
    assert!(!l.ack(3));
}

#[test]
fn disabled_apic_drops_illegal_vectors_silently() {
    let mut l = Lapic::new(0);
    assert!(!l.accept(3, false));
    wr(&mut l, reg::SVR, 0x1ff);
    wr(&mut l, reg::ESR, 0);
    assert_eq!(rd(&l, reg::ESR), 0);
}

#[test]
fn error_lvt_fires_on_new_error() {
    let mut l = enabled(0);
    wr(&mut l, reg::LVT_ERROR, 0xe0);
    l.accept(7, false);
    assert_eq!(l.pending(), Some(0xe0));
    // An illegal error vector does not recurse.
    let mut l = enabled(0);
    wr(&mut l, reg::LVT_ERROR, 0x03);
    l.accept(7, false);
    assert_eq!(l.pending(), None);
}

#[test]
fn software_disable_masks_and_drops() {
    let mut l = Lapic::new(0);
    assert!(!l.accept(0x40, false), "disabled at reset");
    wr(&mut l, reg::LVT_LINT0, 0x0000_0700);
    assert_eq!(rd(&l, reg::LVT_LINT0), 0x0001_0700, "cannot unmask while disabled");
    wr(&mut l, reg::SVR, 0x1ff);
    wr(&mut l, reg::LVT_LINT0, 0x0000_0700);
    wr(&mut l, reg::LVT_TIMER, 0x0000_0040);
    assert_eq!(rd(&l, reg::LVT_LINT0), 0x0000_0700);
    assert!(l.accept(0x40, false));
    wr(&mut l, reg::SVR, 0x0ff);
    assert_eq!(rd(&l, reg::LVT_LINT0), 0x0001_0700, "disable masks every LVT");
    assert_eq!(rd(&l, reg::LVT_TIMER), 0x0001_0040);
    assert!(!l.accept(0x41, false));
    assert_eq!(l.pending(), Some(0x40), "already-requested vectors stay");
}

#[test]
fn ldr_dfr_view() {
    use vmm::intr::dest::DfrModel;
    let mut l = enabled(2);
    wr(&mut l, reg::LDR, 0x2400_0000);
    assert_eq!(l.view().logical_id, 0x24);
    assert_eq!(l.view().model, DfrModel::Flat);
    wr(&mut l, reg::DFR, 0);
    assert_eq!(l.view().model, DfrModel::Cluster);
    wr(&mut l, reg::DFR, 0x5000_0000);
    assert_eq!(l.view().model, DfrModel::Invalid);
    assert_eq!(l.view().id, 2);
}

#[test]
fn ipi_decoding() {
    use vmm::intr::dest::{DeliveryMode, Destination};
    use vmm::intr::lapic::{Ipi, Shorthand};
    let mut l = enabled(0);
    wr(&mut l, reg::ICR_HI, 0x0300_0000);
    let cases = [
        (0x0000_0040, DeliveryMode::Fixed, Destination::Physical(3), Shorthand::None),
        (0x0000_0940, DeliveryMode::LowestPriority, Destination::Logical(3), Shorthand::None),
        (0x0004_0040, DeliveryMode::Fixed, Destination::Physical(3), Shorthand::SelfOnly),
        (0x0008_0040, DeliveryMode::Fixed, Destination::Physical(3), Shorthand::AllIncludingSelf),
        (0x000c_0440, DeliveryMode::Nmi, Destination::Physical(3), Shorthand::AllExcludingSelf),
        (0x0000_4500, DeliveryMode::Init, Destination::Physical(3), Shorthand::None),
        (0x0000_0612, DeliveryMode::StartUp, Destination::Physical(3), Shorthand::None),
    ];
    for (lo, delivery, dest, shorthand) in cases {
        assert_eq!(
            wr(&mut l, reg::ICR_LO, lo),
            LapicEffect::Ipi(Ipi { vector: lo as u8, delivery, dest, shorthand }),
            "icr {lo:#x}"
        );
    }
    // Reserved delivery mode and INIT level de-assert send nothing.
    assert_eq!(wr(&mut l, reg::ICR_LO, 0x0000_0340), LapicEffect::None);
    assert_eq!(wr(&mut l, reg::ICR_LO, 0x0000_8500), LapicEffect::None);
}

fn timer_ns(ticks: u64, div: u32) -> u64 {
    (u128::from(ticks) * u128::from(div) * 1_000_000_000).div_ceil(u128::from(LAPIC_TIMER_HZ)) as u64
}

#[test]
fn divide_configuration() {
    let table = [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xa, 128), (0xb, 1)];
    for (dcr, div) in table {
        assert_eq!(timer_divisor(dcr), div);
        assert_eq!(timer_divisor(dcr | 0xffff_fff4), div, "bits other than 0,1,3 ignored");
    }
}

#[test]
fn one_shot_timer() {
    let mut l = enabled(0);
    wr(&mut l, reg::LVT_TIMER, 0x50);
    l.mmio_write(reg::TIMER_DIVIDE, 4, 0xb, 1000); // divide by 1
    l.mmio_write(reg::TIMER_INITIAL, 4, 1 << 20, 1000);
    let d = 1000 + timer_ns(1 << 20, 1);
    assert_eq!(l.next_deadline(), Some(d));
    assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 4, 1000), 1 << 20);
    assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 4, 1000 + timer_ns(1000, 1)), (1 << 20) - 1000);
    assert!(!l.tick(d - 1));
    assert_eq!(l.pending(), None);
    assert!(l.tick(d));
    assert_eq!(l.pending(), Some(0x50));
    assert_eq!(l.next_deadline(), None);
    assert_eq!(l.mmio_read(reg::TIMER_CURRENT, 4, d + 5), 0);
    assert_eq!(l.mmio_read(reg::TIMER_INITIAL, 4, d + 5), 1 << 20);
    // Writing 0 stops the timer.
    l.mmio_write(reg::TIMER_INITIAL, 4, 5, d);
    l.mmio_write(reg::TIMER_INITIAL, 4, 0, d);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn periodic_timer_exact_deadlines_and_coalescing() {
    let mut l = enabled(0);
    wr(&mut l, reg::LVT_TIMER, 0x2_0060);
    // Divide by 2 (reset DCR), 1000 ticks a period.
    l.mmio_write(reg::TIMER_INITIAL, 4, 1000, 0);
    for n in 1..=5u64 {
        let d = timer_ns(1000 * n, 2);
        assert_eq!(l.next_deadline(), Some(d), "period {n}");
        assert!(l.tick(d));
        assert!(l.ack(0x60));
        l.eoi();
    }
    // Late by 10 periods: one interrupt, next deadline in the future.
    let late = timer_ns(1000 * 15, 2) + 1;
    assert!(l.tick(late));
    assert!(l.ack(0x60));
    assert_eq!(l.pending(), None);
    assert_eq!(l.next_deadline(), Some(timer_ns(1000 * 16, 2)));
    // A masked timer still counts but raises nothing.
    wr(&mut l, reg::LVT_TIMER, 0x3_0060);
    assert!(l.tick(timer_ns(1000 * 16, 2)));
    assert_eq!(l.pending(), None);
    // A divide change applies at the next reload.
    l.mmio_write(reg::TIMER_DIVIDE, 4, 0xb, 0);
    assert_eq!(l.next_deadline(), Some(timer_ns(1000 * 17, 2)));
    l.mmio_write(reg::TIMER_INITIAL, 4, 1000, 7);
    assert_eq!(l.next_deadline(), Some(7 + timer_ns(1000, 1)));
}

#[test]
fn disable_stops_timer_enable_restarts_periodic() {
    let mut l = enabled(0);
    wr(&mut l, reg::LVT_TIMER, 0x2_0060);
    l.mmio_write(reg::TIMER_INITIAL, 4, 100, 0);
    l.mmio_write(reg::SVR, 4, 0xff, 10);
    assert_eq!(l.next_deadline(), None);
    l.mmio_write(reg::SVR, 4, 0x1ff, 50);
    assert_eq!(l.next_deadline(), Some(50 + timer_ns(100, 2)));
}

#[test]
fn lint_pins_through_their_lvt() {
    // Disabled APIC: LINT1 is the NMI pin, LINT0 (INTR) raises nothing.
    let mut l = Lapic::new(0);
    assert!(!l.trigger_lint(0));
    assert!(l.trigger_lint(1));
    assert!(l.take_nmi());
    assert!(!l.take_nmi());
    let mut l = enabled(0);
    // Masked (reset state): nothing.
    assert!(!l.trigger_lint(0));
    assert!(!l.trigger_lint(1));
    // Fixed.
    wr(&mut l, reg::LVT_LINT0, 0x0000_0051);
    assert!(l.trigger_lint(0));
    assert_eq!(l.pending(), Some(0x51));
    assert_eq!(rd(&l, reg::TMR + 0x20), 0, "edge");
    // NMI.
    wr(&mut l, reg::LVT_LINT1, 0x0000_0400);
    assert!(l.trigger_lint(1));
    assert!(l.take_nmi());
    // ExtINT: no 8259, nothing.
    wr(&mut l, reg::LVT_LINT0, 0x0000_0700);
    assert!(!l.trigger_lint(0));
    // Illegal fixed vector: ESR "send illegal vector".
    wr(&mut l, reg::LVT_LINT0, 0x0000_0003);
    assert!(!l.trigger_lint(0));
    wr(&mut l, reg::ESR, 0);
    assert_eq!(rd(&l, reg::ESR), ESR_SEND_ILLEGAL_VECTOR);
    // Other pins.
    assert!(!l.trigger_lint(2));
    assert!(!l.trigger_lint(usize::MAX));
}

/// Each bit on its own: a writable bit reads back, a reserved or read-only
/// bit reads as the register's fixed value.
#[test]
fn single_bit_walk() {
    let table: [(u64, u32, u32); 14] = [
        // (offset, writable mask, value of the non-writable bits)
        (reg::TPR, 0xff, 0),
        (reg::LDR, 0xff00_0000, 0),
        (reg::DFR, 0xf000_0000, 0x0fff_ffff),
        (reg::ICR_HI, 0xff00_0000, 0),
        (reg::TIMER_DIVIDE, 0xb, 0),
        (reg::TIMER_INITIAL, 0xffff_ffff, 0),
        (reg::LVT_TIMER, 0x0003_00ff, 0),
        (reg::LVT_THERMAL, 0x0001_07ff, 0),
        (reg::LVT_PERF, 0x0001_07ff, 0),
        (reg::LVT_LINT0, 0x0001_a7ff, 0),
        (reg::LVT_LINT1, 0x0001_a7ff, 0),
        (reg::LVT_ERROR, 0x0001_00ff, 0),
        (reg::LVT_CMCI, 0x0001_07ff, 0),
        (reg::ID, 0, 5 << 24),
    ];
    for (off, writable, fixed) in table {
        for b in 0..32 {
            let mut l = enabled(5);
            wr(&mut l, off, 1 << b);
            let want = ((1u32 << b) & writable) | fixed;
            assert_eq!(rd(&l, off), want, "register {off:#x} bit {b}");
        }
    }
    // SVR: bits 9:0 (bit 8 = enable).
    for b in 0..32 {
        let mut l = Lapic::new(0);
        wr(&mut l, reg::SVR, 1 << b);
        assert_eq!(rd(&l, reg::SVR), (1u32 << b) & 0x3ff, "SVR bit {b}");
    }
}

#[test]
fn isr_irr_tmr_banks_cover_every_legal_vector() {
    let mut l = enabled(0);
    for v in 16..=255u8 {
        assert!(l.accept(v, v.is_multiple_of(3)));
    }
    for bank in 0..8u64 {
        let irr = rd(&l, reg::IRR + 0x10 * bank);
        assert_eq!(irr, if bank == 0 { 0xffff_0000 } else { 0xffff_ffff });
        let mut want_tmr = 0u32;
        for bit in 0..32u32 {
            let v = bank as u32 * 32 + bit;
            if v >= 16 && v.is_multiple_of(3) {
                want_tmr |= 1 << bit;
            }
        }
        assert_eq!(rd(&l, reg::TMR + 0x10 * bank), want_tmr, "TMR bank {bank}");
    }
    // While 0xff is in service nothing else (all class 0xf or below) is
    // pending; each EOI lets the next-highest vector through.
    let mut order = Vec::new();
    while let Some(v) = l.pending() {
        assert!(l.ack(v));
        assert_eq!(l.pending(), None, "vector {v:#x} in service blocks the rest");
        assert_eq!(l.eoi(), LapicEffect::Eoi { vector: v, level: v.is_multiple_of(3) });
        order.push(v);
    }
    assert_eq!(order, (16..=255u8).rev().collect::<Vec<_>>());
    // A higher class nests over a lower one in service.
    l.accept(0x31, false);
    l.accept(0x52, false);
    assert!(l.ack(0x52) && l.pending().is_none());
    let mut l2 = enabled(0);
    l2.accept(0x31, false);
    assert!(l2.ack(0x31));
    l2.accept(0x52, false);
    assert_eq!(l2.pending(), Some(0x52));
    assert!(l2.ack(0x52));
    assert_eq!(l2.isrv(), Some(0x52));
    assert_eq!(l2.eoi(), LapicEffect::Eoi { vector: 0x52, level: false });
    assert_eq!(l2.isrv(), Some(0x31));
}

#[test]
fn set_tpr_accessor_matches_mmio() {
    let mut l = enabled(0);
    l.set_tpr(0x47);
    assert_eq!(rd(&l, reg::TPR), 0x47);
    assert_eq!(l.tpr(), 0x47);
    assert_eq!(l.ppr(), 0x47);
}
