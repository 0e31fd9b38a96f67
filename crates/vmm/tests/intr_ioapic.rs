//! I/O APIC register rules bit by bit and pin semantics.

use vmm::intr::dest::{DeliveryMode, Destination};
use vmm::intr::ioapic::{
    IOAPIC_PINS, IOAPIC_VERSION, IOREGSEL, IOWIN, Ioapic, IoapicMessage, RTE_LEVEL, RTE_MASKED, RTE_POLARITY_LOW,
    RTE_REMOTE_IRR,
};

fn rd(io: &Ioapic, idx: u32) -> u32 {
    let mut io2 = io.clone();
    io2.mmio_write(IOREGSEL, 4, u64::from(idx));
    io2.mmio_read(IOWIN, 4) as u32
}

fn wr(io: &mut Ioapic, idx: u32, v: u32) -> Option<IoapicMessage> {
    io.mmio_write(IOREGSEL, 4, u64::from(idx));
    io.mmio_write(IOWIN, 4, u64::from(v))
}

fn set_entry(io: &mut Ioapic, pin: usize, e: u64) -> Option<IoapicMessage> {
    let idx = 0x10 + 2 * pin as u32;
    wr(io, idx + 1, (e >> 32) as u32);
    wr(io, idx, e as u32)
}

fn msg(pin: usize, vector: u8, level: bool) -> Option<IoapicMessage> {
    Some(IoapicMessage {
        pin,
        vector,
        delivery: Some(DeliveryMode::Fixed),
        dest: Destination::Physical(0),
        level_triggered: level,
    })
}

#[test]
fn id_version_arbitration() {
    let mut io = Ioapic::new();
    assert_eq!(rd(&io, 0), 0);
    assert_eq!(rd(&io, 1), 0x0017_0011);
    assert_eq!(IOAPIC_VERSION, 0x0017_0011);
    wr(&mut io, 0, 0xffff_ffff);
    assert_eq!(rd(&io, 0), 0x0f00_0000, "only bits 27:24 writable");
    assert_eq!(rd(&io, 2), 0x0f00_0000, "arbitration reads the ID");
    wr(&mut io, 1, 0);
    wr(&mut io, 2, 0);
    assert_eq!(rd(&io, 1), IOAPIC_VERSION, "version read-only");
    assert_eq!(rd(&io, 2), 0x0f00_0000, "arbitration read-only");
    // Unimplemented indices read zero.
    for idx in [3, 0x0f, 0x40, 0x41, 0xff] {
        wr(&mut io, idx, 0xffff_ffff);
        assert_eq!(rd(&io, idx), 0, "index {idx:#x}");
    }
}

#[test]
fn ioregsel_and_widths() {
    let mut io = Ioapic::new();
    io.mmio_write(IOREGSEL, 4, 0xffff_ff01);
    assert_eq!(io.mmio_read(IOREGSEL, 4), 0x01, "IOREGSEL bits 7:0");
    assert_eq!(io.mmio_read(IOWIN, 4), u64::from(IOAPIC_VERSION));
    // Other widths/offsets read zero and are ignored.
    assert_eq!(io.mmio_read(IOWIN, 1), 0);
    assert_eq!(io.mmio_read(IOWIN, 8), 0);
    assert_eq!(io.mmio_read(0x04, 4), 0);
    assert_eq!(io.mmio_read(0x20, 4), 0);
    io.mmio_write(IOREGSEL, 1, 0x00);
    assert_eq!(io.mmio_read(IOREGSEL, 4), 0x01);
    io.mmio_write(0x14, 4, 0);
    io.mmio_write(IOWIN, 2, 0);
    assert_eq!(io.mmio_read(IOWIN, 4), u64::from(IOAPIC_VERSION));
}

#[test]
fn redirection_entry_bits() {
    let mut io = Ioapic::new();
    for pin in 0..IOAPIC_PINS {
        assert_eq!(io.entry(pin), RTE_MASKED, "pin {pin} masked at reset");
        let idx = 0x10 + 2 * pin as u32;
        wr(&mut io, idx, 0xffff_ffff);
        wr(&mut io, idx + 1, 0xffff_ffff);
        // Writable: 7:0, 10:8, 11, 13, 15, 16, 63:56; 12 and 14 read-only.
        assert_eq!(rd(&io, idx), 0x0001_afff, "pin {pin} low");
        assert_eq!(rd(&io, idx + 1), 0xff00_0000, "pin {pin} high");
        wr(&mut io, idx, 0);
        wr(&mut io, idx + 1, 0);
        assert_eq!(io.entry(pin), 0);
    }
    assert_eq!(io.entry(IOAPIC_PINS), 0);
}

#[test]
fn edge_pin_delivers_on_assertion_edge() {
    let mut io = Ioapic::new();
    assert_eq!(set_entry(&mut io, 1, 0x31), None);
    assert_eq!(io.set_level(1, true), msg(1, 0x31, false));
    assert_eq!(io.set_level(1, true), None, "no edge");
    assert_eq!(io.set_level(1, false), None);
    assert_eq!(io.set_level(1, true), msg(1, 0x31, false));
    assert_eq!(io.entry(1) & RTE_REMOTE_IRR, 0, "edge never sets Remote IRR");
    // Masked: the edge is lost.
    io.set_level(1, false);
    set_entry(&mut io, 1, 0x31 | RTE_MASKED);
    assert_eq!(io.set_level(1, true), None);
    assert_eq!(set_entry(&mut io, 1, 0x31), None, "unmasking an edge pin sends nothing");
    // Out-of-range pins are ignored.
    assert_eq!(io.set_level(IOAPIC_PINS, true), None);
    assert_eq!(io.set_level(usize::MAX, true), None);
}

#[test]
fn active_low_polarity() {
    let mut io = Ioapic::new();
    set_entry(&mut io, 2, 0x32 | RTE_POLARITY_LOW);
    // Line low = asserted for an active-low pin.
    io.set_level(2, true);
    assert!(!io.asserted(2));
    assert_eq!(io.set_level(2, false), msg(2, 0x32, false));
    assert!(io.asserted(2));
    assert_eq!(io.set_level(2, true), None);
}

#[test]
fn level_pin_remote_irr_and_eoi() {
    let mut io = Ioapic::new();
    set_entry(&mut io, 5, 0x45 | RTE_LEVEL);
    assert_eq!(io.set_level(5, true), msg(5, 0x45, true));
    assert_ne!(io.entry(5) & RTE_REMOTE_IRR, 0);
    assert_eq!(io.set_level(5, true), None, "Remote IRR blocks re-sending");
    // EOI while still asserted: re-sent, Remote IRR set again.
    assert_eq!(io.eoi(0x45), vec![msg(5, 0x45, true).unwrap()]);
    assert_ne!(io.entry(5) & RTE_REMOTE_IRR, 0);
    // EOI of another vector changes nothing.
    assert_eq!(io.eoi(0x46), vec![]);
    assert_ne!(io.entry(5) & RTE_REMOTE_IRR, 0);
    // Deassert, then EOI: Remote IRR cleared, nothing sent.
    assert_eq!(io.set_level(5, false), None);
    assert_eq!(io.eoi(0x45), vec![]);
    assert_eq!(io.entry(5) & RTE_REMOTE_IRR, 0);
    assert_eq!(io.eoi(0x45), vec![]);
}

#[test]
fn eoi_covers_every_pin_with_the_vector() {
    let mut io = Ioapic::new();
    set_entry(&mut io, 3, 0x50 | RTE_LEVEL);
    set_entry(&mut io, 9, 0x50 | RTE_LEVEL);
    io.set_level(3, true);
    io.set_level(9, true);
    io.set_level(9, false);
    assert_eq!(io.eoi(0x50), vec![msg(3, 0x50, true).unwrap()]);
    assert_ne!(io.entry(3) & RTE_REMOTE_IRR, 0);
    assert_eq!(io.entry(9) & RTE_REMOTE_IRR, 0);
}

#[test]
fn masked_level_pin_then_unmask_delivers_at_once() {
    let mut io = Ioapic::new();
    set_entry(&mut io, 7, 0x60 | RTE_LEVEL | RTE_MASKED);
    assert_eq!(io.set_level(7, true), None);
    assert_eq!(io.entry(7) & RTE_REMOTE_IRR, 0, "masked: Remote IRR stays clear");
    assert_eq!(set_entry(&mut io, 7, 0x60 | RTE_LEVEL), msg(7, 0x60, true));
    assert_ne!(io.entry(7) & RTE_REMOTE_IRR, 0);
    // Rewriting the entry with Remote IRR set neither clears it nor re-sends.
    assert_eq!(set_entry(&mut io, 7, 0x60 | RTE_LEVEL), None);
    assert_ne!(io.entry(7) & RTE_REMOTE_IRR, 0);
    // A masked pin's EOI clears Remote IRR but sends nothing.
    set_entry(&mut io, 7, 0x60 | RTE_LEVEL | RTE_MASKED);
    assert_eq!(io.eoi(0x60), vec![]);
    assert_eq!(io.entry(7) & RTE_REMOTE_IRR, 0);
}

#[test]
fn edge_entry_write_clears_remote_irr() {
    let mut io = Ioapic::new();
    set_entry(&mut io, 4, 0x70 | RTE_LEVEL);
    io.set_level(4, true);
    assert_ne!(io.entry(4) & RTE_REMOTE_IRR, 0);
    // Level -> edge: Remote IRR cleared; no send (edge pins send on edges).
    assert_eq!(set_entry(&mut io, 4, 0x70), None);
    assert_eq!(io.entry(4) & RTE_REMOTE_IRR, 0);
    // Back to level while asserted: sent at once.
    assert_eq!(set_entry(&mut io, 4, 0x70 | RTE_LEVEL), msg(4, 0x70, true));
}

#[test]
fn message_fields() {
    let mut io = Ioapic::new();
    let e = (0x35u64 << 56) | (1 << 11) | (1 << 8) | 0x99;
    set_entry(&mut io, 0, e);
    assert_eq!(
        io.set_level(0, true),
        Some(IoapicMessage {
            pin: 0,
            vector: 0x99,
            delivery: Some(DeliveryMode::LowestPriority),
            dest: Destination::Logical(0x35),
            level_triggered: false,
        })
    );
    set_entry(&mut io, 1, 3 << 8);
    assert_eq!(io.set_level(1, true).unwrap().delivery, None, "reserved mode");
}

#[test]
fn single_bit_walk() {
    for b in 0..32u32 {
        let mut io = Ioapic::new();
        wr(&mut io, 0x10, 1 << b);
        assert_eq!(rd(&io, 0x10), (1u32 << b) & 0x0001_afff, "RTE low bit {b}");
        wr(&mut io, 0x11, 1 << b);
        assert_eq!(rd(&io, 0x11), (1u32 << b) & 0xff00_0000, "RTE high bit {b}");
        wr(&mut io, 0x00, 1 << b);
        assert_eq!(rd(&io, 0x00), (1u32 << b) & 0x0f00_0000, "ID bit {b}");
        io.mmio_write(IOREGSEL, 4, 1u64 << b);
        assert_eq!(io.mmio_read(IOREGSEL, 4), (1u64 << b) & 0xff, "IOREGSEL bit {b}");
    }
}

#[test]
fn remote_irr_and_delivery_status_are_read_only() {
    let mut io = Ioapic::new();
    wr(&mut io, 0x10, (1 << 14) | (1 << 12) | RTE_LEVEL as u32);
    assert_eq!(io.entry(0) & (RTE_REMOTE_IRR | (1 << 12)), 0);
    set_entry(&mut io, 0, 0x40 | RTE_LEVEL);
    io.set_level(0, true);
    // Writing 0 to bit 14 of a level entry leaves Remote IRR set.
    wr(&mut io, 0x10, 0x40 | RTE_LEVEL as u32);
    assert_ne!(io.entry(0) & RTE_REMOTE_IRR, 0);
    // The high word write leaves it too.
    wr(&mut io, 0x11, 0);
    assert_ne!(io.entry(0) & RTE_REMOTE_IRR, 0);
}
