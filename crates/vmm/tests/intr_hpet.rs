//! HPET register rules bit by bit and timer semantics with exact
//! deadlines.

use vmm::intr::hpet::{
    HPET_CAPABILITIES, HPET_TICK_NS, Hpet, HpetEvent, TCONF_FSB_ENABLE, TCONF_INT_ENABLE, TCONF_LEVEL, TCONF_PERIODIC,
    TCONF_VAL_SET, reg,
};

fn rd(h: &mut Hpet, off: u64, now: u64) -> u64 {
    h.mmio_read(off, 8, now)
}

fn wr(h: &mut Hpet, off: u64, v: u64, now: u64) {
    h.mmio_write(off, 8, v, now)
}

fn route(pin: u64) -> u64 {
    pin << 9
}

#[test]
fn capabilities() {
    let mut h = Hpet::new(24);
    for n in 0..8 {
        assert_eq!(rd(&mut h, reg::timer_comparator(n), 0), 0xffff_ffff, "reset comparator");
    }
    let cap = rd(&mut h, reg::CAPABILITIES, 0);
    assert_eq!(cap, HPET_CAPABILITIES);
    assert_eq!(cap >> 32, 100_000_000, "period in fs");
    assert_eq!((cap >> 16) & 0xffff, 0x8086);
    assert_eq!(cap & (1 << 15), 0, "no legacy replacement");
    assert_eq!(cap & (1 << 13), 0, "32-bit counter");
    assert_eq!((cap >> 8) & 0x1f, 7, "8 timers");
    assert_eq!(cap & 0xff, 1, "revision");
    wr(&mut h, reg::CAPABILITIES, 0, 0);
    assert_eq!(rd(&mut h, reg::CAPABILITIES, 0), cap, "read-only");
    assert_eq!(h.mmio_read(reg::CAPABILITIES + 4, 4, 0), 100_000_000);
    assert_eq!(h.mmio_read(reg::CAPABILITIES, 4, 0), cap & 0xffff_ffff);
}

#[test]
fn general_configuration_bits() {
    let mut h = Hpet::new(24);
    wr(&mut h, reg::CONFIG, u64::MAX, 0);
    assert_eq!(rd(&mut h, reg::CONFIG, 0), 1, "only ENABLE; legacy route reads 0");
    wr(&mut h, reg::CONFIG, 2, 0);
    assert_eq!(rd(&mut h, reg::CONFIG, 0), 0);
}

#[test]
fn timer_configuration_bits() {
    let mut h = Hpet::new(24);
    for n in 0..8 {
        let off = reg::timer_config(n);
        assert_eq!(rd(&mut h, off, 0), 0x00f0_0000_0000_8010, "timer {n} reset");
        // Route 0 (not in the capability) is kept as 0; all other writable
        // bits: 1, 2, 3, 6, 14. 32-bit mode (8) forced clear.
        wr(&mut h, off, !route(0x1f), 0);
        assert_eq!(rd(&mut h, off, 0), 0x00f0_0000_0000_c05e, "timer {n}");
        // Routes 20-23 accepted, others replaced by 0.
        for pin in 0..32u64 {
            wr(&mut h, off, route(pin), 0);
            let want = if (20..24).contains(&pin) { route(pin) } else { 0 };
            assert_eq!(rd(&mut h, off, 0) & route(0x1f), want, "timer {n} route {pin}");
        }
        wr(&mut h, off, 0, 0);
        assert_eq!(rd(&mut h, off, 0), 0x00f0_0000_0000_8010);
        // Writing the high dword (capabilities) changes nothing.
        h.mmio_write(off + 4, 4, 0, 0);
        assert_eq!(rd(&mut h, off, 0), 0x00f0_0000_0000_8010);
    }
    // Fewer than 24 I/O APIC pins: no routes at all.
    let mut h = Hpet::new(16);
    assert_eq!(rd(&mut h, reg::timer_config(0), 0) >> 32, 0);
    wr(&mut h, reg::timer_config(0), route(20), 0);
    assert_eq!(rd(&mut h, reg::timer_config(0), 0) & route(0x1f), 0);
}

#[test]
fn comparator_and_fsb_registers() {
    let mut h = Hpet::new(24);
    let c = reg::timer_comparator(3);
    wr(&mut h, c, 0x1234_5678_9abc_def0, 0);
    assert_eq!(rd(&mut h, c, 0), 0x9abc_def0, "32-bit comparator");
    h.mmio_write(c + 4, 4, 0xffff_ffff, 0);
    assert_eq!(rd(&mut h, c, 0), 0x9abc_def0, "upper dword ignored");
    h.mmio_write(c, 4, 0x11, 0);
    assert_eq!(h.mmio_read(c, 4, 0), 0x11);
    assert_eq!(h.mmio_read(c + 4, 4, 0), 0);
    let f = reg::timer_fsb(3);
    wr(&mut h, f, 0xfee0_0000_0000_0041, 0);
    assert_eq!(rd(&mut h, f, 0), 0xfee0_0000_0000_0041);
    h.mmio_write(f, 4, 0x42, 0);
    assert_eq!(rd(&mut h, f, 0), 0xfee0_0000_0000_0042);
}

#[test]
fn widths_and_unimplemented_offsets() {
    let mut h = Hpet::new(24);
    for (off, size) in [(0, 1), (0, 2), (2, 4), (4, 8), (0, 3), (0, 16)] {
        assert_eq!(h.mmio_read(off, size, 0), 0, "{off:#x}/{size}");
    }
    h.mmio_write(reg::CONFIG, 1, 1, 0);
    h.mmio_write(reg::CONFIG + 2, 4, 1, 0);
    assert_eq!(rd(&mut h, reg::CONFIG, 0), 0);
    for off in [0x008, 0x018, 0x028, 0x0e0, 0x0f8, 0x118, 0x200, 0x3f8, 0x400, u64::MAX - 7] {
        h.mmio_write(off, 8, u64::MAX, 0);
        assert_eq!(h.mmio_read(off, 8, 0), 0, "offset {off:#x}");
    }
    assert!(h.take_events().is_empty());
}

#[test]
fn main_counter_runs_at_10mhz_and_is_32_bit() {
    let mut h = Hpet::new(24);
    wr(&mut h, reg::COUNTER, 0x1_0000_0010, 0);
    assert_eq!(rd(&mut h, reg::COUNTER, 0), 0x10, "32-bit counter");
    assert_eq!(rd(&mut h, reg::COUNTER, 5_000), 0x10, "frozen while disabled");
    wr(&mut h, reg::CONFIG, 1, 1_000);
    assert_eq!(rd(&mut h, reg::COUNTER, 1_000), 0x10);
    assert_eq!(rd(&mut h, reg::COUNTER, 1_099), 0x10);
    assert_eq!(rd(&mut h, reg::COUNTER, 1_100), 0x11);
    assert_eq!(rd(&mut h, reg::COUNTER, 1_000 + 100 * 1_000_000), 0x10 + 1_000_000);
    assert_eq!(h.mmio_read(reg::COUNTER + 4, 4, 1_000_000), 0);
    // Wraps at 2^32.
    wr(&mut h, reg::COUNTER, 0xffff_ffff, 2_000);
    assert_eq!(rd(&mut h, reg::COUNTER, 2_100), 0);
    // Disable freezes, enable continues from the frozen value.
    wr(&mut h, reg::CONFIG, 0, 2_550);
    assert_eq!(rd(&mut h, reg::COUNTER, 9_999), 4);
    wr(&mut h, reg::CONFIG, 1, 10_000);
    assert_eq!(rd(&mut h, reg::COUNTER, 10_250), 6);
}

fn level_timer(h: &mut Hpet, n: usize, pin: u64, extra: u64) {
    wr(h, reg::timer_config(n), TCONF_INT_ENABLE | TCONF_LEVEL | route(pin) | extra, 0);
}

#[test]
fn one_shot_exact_deadline_and_wrap() {
    let mut h = Hpet::new(24);
    level_timer(&mut h, 0, 20, 0);
    wr(&mut h, reg::timer_comparator(0), 1000, 0);
    assert_eq!(h.next_deadline(), None, "disabled HPET arms nothing");
    wr(&mut h, reg::CONFIG, 1, 500);
    let d = 500 + 1000 * HPET_TICK_NS;
    assert_eq!(h.next_deadline(), Some(d));
    h.tick(d - 1);
    assert!(h.take_events().is_empty());
    h.tick(d);
    assert_eq!(h.take_events(), vec![HpetEvent::Assert(20)]);
    assert_eq!(h.interrupt_status(), 1);
    // One-shot fires once (bhyve): no re-fire when the counter wraps.
    assert_eq!(h.next_deadline(), None);
    assert_eq!(rd(&mut h, reg::timer_comparator(0), d), 1000, "one-shot comparator stays");
    // Rewriting the same comparator does not re-arm; a new value does.
    wr(&mut h, reg::timer_comparator(0), 1000, d);
    assert_eq!(h.next_deadline(), None);
    wr(&mut h, reg::timer_comparator(0), 1010, d);
    assert_eq!(h.next_deadline(), Some(d + 10 * HPET_TICK_NS));
    // Level already asserted: firing again raises nothing new.
    h.tick(d + 10 * HPET_TICK_NS);
    assert!(h.take_events().is_empty());
    assert_eq!(h.interrupt_status(), 1);
}

#[test]
fn status_write_one_to_clear_deasserts() {
    let mut h = Hpet::new(24);
    level_timer(&mut h, 2, 21, 0);
    wr(&mut h, reg::timer_comparator(2), 10, 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    h.tick(1000);
    assert_eq!(h.take_events(), vec![HpetEvent::Assert(21)]);
    assert_eq!(rd(&mut h, reg::INT_STATUS, 1000), 0b100);
    wr(&mut h, reg::INT_STATUS, 0b011, 1000);
    assert_eq!(rd(&mut h, reg::INT_STATUS, 1000), 0b100, "writing 0 / other bits keeps it");
    assert!(h.take_events().is_empty());
    wr(&mut h, reg::INT_STATUS, u64::MAX, 1000);
    assert_eq!(rd(&mut h, reg::INT_STATUS, 1000), 0);
    assert_eq!(h.take_events(), vec![HpetEvent::Deassert(21)]);
    wr(&mut h, reg::INT_STATUS, u64::MAX, 1000);
    assert!(h.take_events().is_empty(), "clearing a clear bit does nothing");
}

#[test]
fn leaving_level_mode_clears_status() {
    for change in [
        TCONF_INT_ENABLE | route(21),
        TCONF_LEVEL | route(21),
        TCONF_INT_ENABLE | TCONF_LEVEL | route(22),
        TCONF_INT_ENABLE | TCONF_LEVEL | route(21) | TCONF_FSB_ENABLE,
    ] {
        let mut h = Hpet::new(24);
        level_timer(&mut h, 1, 21, 0);
        wr(&mut h, reg::timer_comparator(1), 1, 0);
        wr(&mut h, reg::CONFIG, 1, 0);
        h.tick(100);
        assert_eq!(h.take_events(), vec![HpetEvent::Assert(21)]);
        wr(&mut h, reg::timer_config(1), change, 100);
        assert_eq!(h.interrupt_status(), 0, "config {change:#x}");
        assert_eq!(h.take_events(), vec![HpetEvent::Deassert(21)]);
    }
}

#[test]
fn edge_mode_pulses_and_interrupt_disable_suppresses() {
    let mut h = Hpet::new(24);
    wr(&mut h, reg::timer_config(4), TCONF_INT_ENABLE | route(23), 0);
    wr(&mut h, reg::timer_comparator(4), 5, 0);
    wr(&mut h, reg::timer_config(5), route(23), 0);
    wr(&mut h, reg::timer_comparator(5), 5, 0);
    wr(&mut h, reg::timer_config(6), TCONF_INT_ENABLE, 0); // unrouted
    wr(&mut h, reg::timer_comparator(6), 5, 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    h.tick(500);
    assert_eq!(h.take_events(), vec![HpetEvent::Pulse(23)]);
    assert_eq!(h.interrupt_status(), 0, "edge mode sets no status");
}

#[test]
fn periodic_exact_deadlines_and_value_set() {
    let mut h = Hpet::new(24);
    let cfg = TCONF_INT_ENABLE | TCONF_PERIODIC | route(20);
    wr(&mut h, reg::timer_config(0), cfg | TCONF_VAL_SET, 0);
    // VAL_SET: first write sets the comparator (and the period) ...
    wr(&mut h, reg::timer_comparator(0), 300, 0);
    assert_eq!(rd(&mut h, reg::timer_config(0), 0) & TCONF_VAL_SET, 0, "cleared by the write");
    // ... the second only the period.
    wr(&mut h, reg::timer_comparator(0), 1000, 0);
    assert_eq!(rd(&mut h, reg::timer_comparator(0), 0), 300);
    wr(&mut h, reg::CONFIG, 1, 0);
    let mut at = 300 * HPET_TICK_NS;
    for k in 0..5u64 {
        assert_eq!(h.next_deadline(), Some(at), "period {k}");
        h.tick(at);
        assert_eq!(h.take_events(), vec![HpetEvent::Pulse(20)]);
        assert_eq!(rd(&mut h, reg::timer_comparator(0), at), 300 + 1000 * (k as u32 as u64 + 1));
        at += 1000 * HPET_TICK_NS;
    }
    // Late by 7 periods: one interrupt, comparator skipped ahead.
    let late = at + 7 * 1000 * HPET_TICK_NS + 50;
    h.tick(late);
    assert_eq!(h.take_events(), vec![HpetEvent::Pulse(20)]);
    let next = at + 8 * 1000 * HPET_TICK_NS;
    assert_eq!(h.next_deadline(), Some(next));
    assert_eq!(rd(&mut h, reg::timer_comparator(0), late), (next / HPET_TICK_NS));
}

#[test]
fn switching_to_one_shot_forgets_the_period() {
    let mut h = Hpet::new(24);
    let cfg = TCONF_INT_ENABLE | TCONF_PERIODIC | route(20);
    wr(&mut h, reg::timer_config(0), cfg | TCONF_VAL_SET, 0);
    wr(&mut h, reg::timer_comparator(0), 10, 0);
    wr(&mut h, reg::timer_config(0), TCONF_INT_ENABLE | route(20), 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    h.tick(10 * HPET_TICK_NS);
    assert_eq!(h.take_events(), vec![HpetEvent::Pulse(20)]);
    assert_eq!(h.next_deadline(), None, "one-shot: fired once");
}

#[test]
fn fsb_delivery() {
    let mut h = Hpet::new(24);
    wr(&mut h, reg::timer_config(7), TCONF_INT_ENABLE | TCONF_LEVEL | TCONF_FSB_ENABLE, 0);
    wr(&mut h, reg::timer_fsb(7), (0xfee0_1000u64 << 32) | 0x47, 0);
    wr(&mut h, reg::timer_comparator(7), 2, 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    h.tick(200);
    assert_eq!(h.take_events(), vec![HpetEvent::Msi { addr: 0xfee0_1000, data: 0x47 }]);
    assert_eq!(h.interrupt_status(), 0, "FSB delivery sets no status");
}

#[test]
fn counter_write_while_enabled_rearms() {
    let mut h = Hpet::new(24);
    wr(&mut h, reg::timer_config(0), TCONF_INT_ENABLE | route(20), 0);
    wr(&mut h, reg::timer_comparator(0), 1000, 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    wr(&mut h, reg::COUNTER, 900, 5_000);
    assert_eq!(h.next_deadline(), Some(5_000 + 100 * HPET_TICK_NS));
    // Comparator equal to the counter: fires at once (bhyve).
    wr(&mut h, reg::timer_comparator(0), 900, 5_000);
    assert_eq!(h.take_events(), vec![HpetEvent::Pulse(20)]);
    assert_eq!(h.next_deadline(), None);
    // A comparator behind the counter waits for the wrap.
    wr(&mut h, reg::timer_comparator(0), 899, 5_000);
    assert_eq!(h.next_deadline(), Some(5_000 + ((1u64 << 32) - 1) * HPET_TICK_NS));
    wr(&mut h, reg::CONFIG, 0, 6_000);
    assert_eq!(h.next_deadline(), None);
}

#[test]
fn interrupt_disabled_timers_need_no_deadline_but_catch_up() {
    let mut h = Hpet::new(24);
    let cfg = TCONF_PERIODIC | route(20);
    wr(&mut h, reg::timer_config(0), cfg | TCONF_VAL_SET, 0);
    wr(&mut h, reg::timer_comparator(0), 10, 0);
    wr(&mut h, reg::CONFIG, 1, 0);
    assert_eq!(h.next_deadline(), None);
    // A read catches the comparator up: 10 + 10 * 4 after 45 ticks.
    assert_eq!(rd(&mut h, reg::timer_comparator(0), 45 * HPET_TICK_NS), 50);
    assert!(h.take_events().is_empty());
}

#[test]
fn timers_fire_in_time_order() {
    let mut h = Hpet::new(24);
    for (n, cmp, pin) in [(0, 30, 20), (1, 10, 21), (2, 20, 22)] {
        wr(&mut h, reg::timer_config(n), TCONF_INT_ENABLE | route(pin), 0);
        wr(&mut h, reg::timer_comparator(n), cmp, 0);
    }
    wr(&mut h, reg::CONFIG, 1, 0);
    assert_eq!(h.next_deadline(), Some(10 * HPET_TICK_NS));
    h.tick(10_000);
    assert_eq!(h.take_events(), vec![HpetEvent::Pulse(21), HpetEvent::Pulse(22), HpetEvent::Pulse(20)]);
}

#[test]
fn single_bit_walk() {
    for b in 0..64u32 {
        let bit = 1u64 << b;
        let mut h = Hpet::new(24);
        wr(&mut h, reg::CONFIG, bit, 0);
        assert_eq!(rd(&mut h, reg::CONFIG, 0), bit & 1, "config bit {b}");
        wr(&mut h, reg::timer_config(2), bit, 0);
        // Writable: 1, 2, 3, 6, 14 (route bits 13:9 are validated).
        let fixed = 0x00f0_0000_0000_8010;
        assert_eq!(rd(&mut h, reg::timer_config(2), 0), (bit & 0x404e) | fixed, "timer config bit {b}");
        wr(&mut h, reg::timer_fsb(2), bit, 0);
        assert_eq!(rd(&mut h, reg::timer_fsb(2), 0), bit, "FSB bit {b}");
        // (Timer 3: timer 2 may be periodic now, where writes set the period.)
        wr(&mut h, reg::timer_comparator(3), bit, 0);
        assert_eq!(rd(&mut h, reg::timer_comparator(3), 0), bit & 0xffff_ffff, "comparator bit {b}");
        wr(&mut h, reg::COUNTER, bit, 0);
        assert_eq!(rd(&mut h, reg::COUNTER, 0), bit & 0xffff_ffff, "counter bit {b}");
        wr(&mut h, reg::INT_STATUS, bit, 0);
        assert_eq!(rd(&mut h, reg::INT_STATUS, 0), 0, "status bit {b}: write 1 never sets");
    }
    // Route bits: each single bit is a route value of 1, 2, 4, 8 or 16, none
    // of them in 20-23.
    for b in 9..14u32 {
        let mut h = Hpet::new(24);
        wr(&mut h, reg::timer_config(0), 1 << b, 0);
        assert_eq!(rd(&mut h, reg::timer_config(0), 0) & (0x1f << 9), 0);
    }
}
