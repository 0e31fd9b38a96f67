//! The I/O APIC (82093AA register model, version `0x11`, 24 pins).
//!
//! The guest reaches it through two 32-bit windows of its MMIO page:
//! IOREGSEL at offset `0x00` (bits 7:0 select a register) and IOWIN at
//! `0x10` (the selected register). Accesses of any other width or at any
//! other offset read zero and are ignored when written.
//!
//! Registers: `0x00` ID (bits 27:24 writable), `0x01` version (`0x11`,
//! max redirection entry 23 in bits 23:16, read-only), `0x02` arbitration
//! ID (reads the ID, read-only), `0x10 + 2n` / `0x11 + 2n` the low / high
//! words of redirection entry `n`. Unimplemented indices read zero.
//!
//! Redirection entry bits: 7:0 vector, 10:8 delivery mode, 11 destination
//! mode, 12 delivery status (read-only, always idle), 13 polarity
//! (1 = active low), 14 Remote IRR (read-only), 15 trigger mode
//! (1 = level), 16 mask, 63:56 destination; bits 55:17 are reserved and
//! read zero. Reset: every entry masked, everything else zero.
//!
//! # Pin semantics (bhyve's vioapic, plus polarity)
//!
//! * [`Ioapic::set_level`] takes the electrical level; the pin is asserted
//!   when that level differs from the polarity bit (active high: high
//!   asserts). bhyve itself ignores polarity; this model honours it.
//! * Edge: a transition to asserted sends the interrupt (if unmasked).
//! * Level: while asserted, unmasked and Remote IRR clear, the interrupt is
//!   sent and Remote IRR set. A masked pin sends nothing and leaves Remote
//!   IRR clear.
//! * [`Ioapic::eoi`]: every level pin with that vector and Remote IRR set
//!   has Remote IRR cleared and, if still asserted (and unmasked), is sent
//!   again.
//! * Writing a redirection entry keeps Remote IRR, except that an entry
//!   written edge-triggered has it cleared (illumos' vioapic does this so
//!   a guest can retire a lost level interrupt by flipping the trigger
//!   mode, as FreeBSD's own I/O APIC driver does). After any write of a
//!   level entry whose pin is asserted the pin is re-evaluated, so
//!   unmasking an asserted level pin with Remote IRR clear sends at once.

use serde::{Deserialize, Serialize};

use super::dest::{DeliveryMode, Destination};

/// Number of pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// Version register: version `0x11`, max redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
/// Offset of IOREGSEL in the MMIO page.
pub const IOREGSEL: u64 = 0x00;
/// Offset of IOWIN in the MMIO page.
pub const IOWIN: u64 = 0x10;
/// Size of the I/O APIC MMIO page.
pub const IOAPIC_PAGE_SIZE: u64 = 0x1000;

/// Redirection entry: polarity (1 = active low).
pub const RTE_POLARITY_LOW: u64 = 1 << 13;
/// Redirection entry: Remote IRR (read-only).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection entry: trigger mode (1 = level).
pub const RTE_LEVEL: u64 = 1 << 15;
/// Redirection entry: mask.
pub const RTE_MASKED: u64 = 1 << 16;
/// Writable bits of a redirection entry.
pub const RTE_WRITABLE: u64 = 0xff00_0000_0000_0000 | 0x1_afff;

/// An interrupt message the I/O APIC sends, for the aggregate to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoapicMessage {
    /// The pin that sent it.
    pub pin: usize,
    /// Bits 7:0.
    pub vector: u8,
    /// Bits 10:8 (`None`: reserved encoding; the aggregate drops it).
    pub delivery: Option<DeliveryMode>,
    /// Bits 63:56 with the mode of bit 11.
    pub dest: Destination,
    /// Bit 15.
    pub level_triggered: bool,
}

/// The virtual I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ioapic {
    id: u32,
    ioregsel: u32,
    rtbl: [u64; IOAPIC_PINS],
    high: [bool; IOAPIC_PINS],
}

impl Default for Ioapic {
    fn default() -> Self {
        Ioapic::new()
    }
}

impl Ioapic {
    /// An I/O APIC in its reset state (ID 0, every pin masked and low).
    pub fn new() -> Ioapic {
        Ioapic { id: 0, ioregsel: 0, rtbl: [RTE_MASKED; IOAPIC_PINS], high: [false; IOAPIC_PINS] }
    }

    pub(crate) fn sanitize(&mut self) {
        self.id &= 0x0f00_0000;
        self.ioregsel &= 0xff;
        for e in &mut self.rtbl {
            *e &= RTE_WRITABLE | RTE_REMOTE_IRR;
        }
    }

    /// Redirection entry `pin` (zero for a pin out of range).
    pub fn entry(&self, pin: usize) -> u64 {
        self.rtbl.get(pin).copied().unwrap_or(0)
    }

    /// Whether `pin` is asserted (its level differs from its polarity).
    pub fn asserted(&self, pin: usize) -> bool {
        match (self.high.get(pin), self.rtbl.get(pin)) {
            (Some(&high), Some(&e)) => high != (e & RTE_POLARITY_LOW != 0),
            _ => false,
        }
    }

    fn message(&self, pin: usize) -> IoapicMessage {
        let e = self.rtbl[pin];
        let id = (e >> 56) as u8;
        IoapicMessage {
            pin,
            vector: e as u8,
            delivery: DeliveryMode::from_bits((e >> 8) as u32),
            dest: if e & (1 << 11) != 0 { Destination::Logical(id) } else { Destination::Physical(id) },
            level_triggered: e & RTE_LEVEL != 0,
        }
    }

    /// Sends `pin`'s interrupt if it is unmasked and, for a level pin,
    /// Remote IRR is clear (which it then sets).
    fn send(&mut self, pin: usize) -> Option<IoapicMessage> {
        let e = self.rtbl[pin];
        if e & RTE_MASKED != 0 {
            return None;
        }
        if e & RTE_LEVEL != 0 {
            if e & RTE_REMOTE_IRR != 0 {
                return None;
            }
            self.rtbl[pin] |= RTE_REMOTE_IRR;
        }
        Some(self.message(pin))
    }

    /// Drives `pin` to electrical level `high`. Returns the interrupt this
    /// sends, if any. Pins out of range are ignored.
    pub fn set_level(&mut self, pin: usize, high: bool) -> Option<IoapicMessage> {
        if pin >= IOAPIC_PINS {
            return None;
        }
        let before = self.asserted(pin);
        self.high[pin] = high;
        let now = self.asserted(pin);
        if self.rtbl[pin] & RTE_LEVEL != 0 {
            if now { self.send(pin) } else { None }
        } else if now && !before {
            self.send(pin)
        } else {
            None
        }
    }

    /// A LAPIC EOI broadcast for `vector`: clears Remote IRR on every level
    /// pin with that vector and re-sends those still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<IoapicMessage> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let e = self.rtbl[pin];
            if e as u8 != vector || e & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.rtbl[pin] &= !RTE_REMOTE_IRR;
            if e & RTE_LEVEL != 0 && self.asserted(pin) {
                out.extend(self.send(pin));
            }
        }
        out
    }

    fn read_indexed(&self) -> u32 {
        let idx = self.ioregsel as usize;
        match idx {
            0x00 | 0x02 => self.id,
            0x01 => IOAPIC_VERSION,
            0x10..=0x3f => {
                let e = self.rtbl[(idx - 0x10) / 2];
                if idx & 1 == 0 { e as u32 } else { (e >> 32) as u32 }
            }
            _ => 0,
        }
    }

    fn write_indexed(&mut self, value: u32) -> Option<IoapicMessage> {
        let idx = self.ioregsel as usize;
        match idx {
            0x00 => self.id = value & 0x0f00_0000,
            0x10..=0x3f => {
                let pin = (idx - 0x10) / 2;
                let old = self.rtbl[pin];
                let mut new = if idx & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if new & RTE_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.rtbl[pin] = new;
                if new & RTE_LEVEL != 0 && self.asserted(pin) {
                    return self.send(pin);
                }
            }
            _ => {}
        }
        None
    }

    /// Reads `size` bytes at `offset` of the page.
    pub fn mmio_read(&self, offset: u64, size: usize) -> u64 {
        match (offset, size) {
            (IOREGSEL, 4) => u64::from(self.ioregsel),
            (IOWIN, 4) => u64::from(self.read_indexed()),
            _ => 0,
        }
    }

    /// Writes `size` bytes at `offset` of the page; returns the interrupt
    /// the write sends, if any.
    pub fn mmio_write(&mut self, offset: u64, size: usize, value: u64) -> Option<IoapicMessage> {
        match (offset, size) {
            (IOREGSEL, 4) => {
                self.ioregsel = value as u32 & 0xff;
                None
            }
            (IOWIN, 4) => self.write_indexed(value as u32),
            _ => None,
        }
    }
}
