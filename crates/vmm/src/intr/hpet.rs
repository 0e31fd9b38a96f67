//! The HPET, after bhyve's vhpet (IA-PC HPET specification 1.0a register
//! layout).
//!
//! * 8 timers, a 10 MHz main counter (period 100,000,000 fs = 100 ns; the
//!   counter advances by one every 100 ns of caller time, exactly).
//! * As in bhyve, the main counter and all comparators are **32 bits**
//!   (general capabilities bit 13 and every timer's bit 5 clear): the
//!   counter wraps at 2^32, the upper dword of the counter and comparator
//!   registers reads zero and writes to it are ignored, and the 32-bit
//!   mode bit (Tn bit 8) is forced to zero.
//! * Legacy replacement routing is not offered (capabilities bit 15 clear)
//!   and its configuration bit (bit 1) always reads zero.
//! * Interrupt routes: only I/O APIC pins 20-23 (route capability
//!   `0x00f00000`), and only when the I/O APIC has at least 24 pins; a
//!   route outside the capability is replaced by 0, which means
//!   "unrouted": the timer then raises nothing (unless FSB delivery is on).
//! * FSB (MSI) delivery is offered on every timer: the FSB route register
//!   holds the data in bits 31:0 and the address in bits 63:32.
//! * Level mode: a firing timer sets its general-interrupt-status bit and
//!   asserts its pin (nothing if the bit is already set); writing 1 to the
//!   bit clears it and deasserts the pin. The bit is also cleared (pin
//!   deasserted) when the timer leaves level mode, has interrupts disabled,
//!   switches to FSB delivery or changes its route. Edge mode pulses the
//!   pin.
//! * A timer is armed when the HPET is enabled (or its counter written),
//!   and when a comparator write changes its comparator or period; it then
//!   fires when the 32-bit counter reaches the comparator (at once if they
//!   are equal). Periodic mode: the comparator then advances by the period;
//!   writes to the comparator set the period, and also the comparator
//!   itself when the "value set" bit (Tn bit 6) is set, which each
//!   comparator write clears. A periodic timer whose expirations were
//!   missed (late `tick`) fires once and skips ahead, like bhyve. A one-shot
//!   (or zero-period) timer fires once and stays idle until re-armed, like
//!   bhyve (it does not fire again when the counter wraps).
//! * Deliberate differences from bhyve: the counter runs at 10 MHz (bhyve:
//!   2^24 Hz) so that ticks are an exact 100 ns; a periodic timer keeps the
//!   guest's comparator when (re)started instead of re-basing it on the
//!   counter; reserved configuration bits read zero. Timer comparators
//!   reset to `0xffffffff` as in bhyve.
//! * The main counter may be written at any time (bhyve); when enabled,
//!   counting continues from the written value and every timer is re-armed.
//!   Disabling the HPET freezes the counter; status bits stay as they are.
//!
//! Accesses: 4-byte accesses at 4-byte aligned and 8-byte accesses at
//! 8-byte aligned offsets; anything else reads zero and is ignored.
//! Unimplemented offsets read zero.
//!
//! Interrupt side effects are queued as [`HpetEvent`]s, which the owner
//! drains with [`Hpet::take_events`] after each call.

use serde::{Deserialize, Serialize};

/// Number of timers.
pub const HPET_TIMERS: usize = 8;
/// The counter period in femtoseconds (10 MHz).
pub const HPET_PERIOD_FS: u64 = 100_000_000;
/// The counter period in nanoseconds.
pub const HPET_TICK_NS: u64 = 100;
/// The interrupt route capability: I/O APIC pins 20-23.
pub const HPET_ROUTE_CAP: u32 = 0x00f0_0000;
/// Size of the HPET MMIO region.
pub const HPET_PAGE_SIZE: u64 = 0x400;

/// Register offsets.
pub mod reg {
    /// General capabilities and ID (read-only).
    pub const CAPABILITIES: u64 = 0x000;
    /// General configuration.
    pub const CONFIG: u64 = 0x010;
    /// General interrupt status (write 1 to clear).
    pub const INT_STATUS: u64 = 0x020;
    /// Main counter.
    pub const COUNTER: u64 = 0x0f0;
    /// Timer `n` configuration and capabilities.
    pub const fn timer_config(n: usize) -> u64 {
        0x100 + 0x20 * n as u64
    }
    /// Timer `n` comparator.
    pub const fn timer_comparator(n: usize) -> u64 {
        0x108 + 0x20 * n as u64
    }
    /// Timer `n` FSB interrupt route (data 31:0, address 63:32).
    pub const fn timer_fsb(n: usize) -> u64 {
        0x110 + 0x20 * n as u64
    }
}

/// The general capabilities register (without the route-independent
/// parts there is nothing else): revision 1, 8 timers, 32-bit counter, no
/// legacy replacement, vendor `0x8086`, period 100 ns.
pub const HPET_CAPABILITIES: u64 = (HPET_PERIOD_FS << 32) | (0x8086 << 16) | (7 << 8) | 1;

/// General configuration: overall enable.
pub const CONF_ENABLE: u64 = 1 << 0;
/// General configuration: legacy replacement route (unsupported, reads 0).
pub const CONF_LEGACY: u64 = 1 << 1;

/// Timer configuration: level-triggered interrupt.
pub const TCONF_LEVEL: u64 = 1 << 1;
/// Timer configuration: interrupt enable.
pub const TCONF_INT_ENABLE: u64 = 1 << 2;
/// Timer configuration: periodic mode.
pub const TCONF_PERIODIC: u64 = 1 << 3;
/// Timer capability: periodic mode supported (read-only, set).
pub const TCAP_PERIODIC: u64 = 1 << 4;
/// Timer capability: 64-bit comparator (read-only, clear).
pub const TCAP_64BIT: u64 = 1 << 5;
/// Timer configuration: the next comparator write sets the comparator.
pub const TCONF_VAL_SET: u64 = 1 << 6;
/// Timer configuration: force 32-bit mode (forced clear).
pub const TCONF_32MODE: u64 = 1 << 8;
/// Timer configuration: interrupt route field shift (bits 13:9).
pub const TCONF_ROUTE_SHIFT: u32 = 9;
/// Timer configuration: FSB (MSI) delivery enable.
pub const TCONF_FSB_ENABLE: u64 = 1 << 14;
/// Timer capability: FSB delivery supported (read-only, set).
pub const TCAP_FSB: u64 = 1 << 15;
/// Writable bits of a timer configuration register.
pub const TCONF_WRITABLE: u64 =
    TCONF_LEVEL | TCONF_INT_ENABLE | TCONF_PERIODIC | TCONF_VAL_SET | (0x1f << TCONF_ROUTE_SHIFT) | TCONF_FSB_ENABLE;

/// An interrupt side effect of the HPET.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HpetEvent {
    /// Drive the I/O APIC pin high (level mode).
    Assert(usize),
    /// Drive the I/O APIC pin low (level mode).
    Deassert(usize),
    /// Raise and lower the I/O APIC pin (edge mode).
    Pulse(usize),
    /// Send an MSI (FSB delivery).
    Msi {
        /// The FSB route register's bits 63:32.
        addr: u64,
        /// The FSB route register's bits 31:0.
        data: u32,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Timer {
    config: u64,
    compval: u32,
    comprate: u32,
    fsb: u64,
    /// The counter tick (ticks since `base_ns`) at which it next fires.
    fire_tick: Option<u64>,
}

impl Timer {
    fn route(&self) -> usize {
        ((self.config >> TCONF_ROUTE_SHIFT) & 0x1f) as usize
    }
}

/// The virtual HPET.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hpet {
    route_cap: u32,
    config: u64,
    isr: u64,
    countbase: u32,
    base_ns: u64,
    timers: [Timer; HPET_TIMERS],
    #[serde(skip)]
    events: Vec<HpetEvent>,
}

fn merge(old: u64, data: u64, mask: u64) -> u64 {
    (old & !mask) | (data & mask)
}

impl Hpet {
    /// An HPET in its reset state (disabled, counter 0), for an I/O APIC
    /// with `ioapic_pins` pins (routes 20-23 are offered only if it has at
    /// least 24).
    pub fn new(ioapic_pins: usize) -> Hpet {
        Hpet {
            route_cap: if ioapic_pins >= 24 { HPET_ROUTE_CAP } else { 0 },
            config: 0,
            isr: 0,
            countbase: 0,
            base_ns: 0,
            timers: [Timer { compval: u32::MAX, ..Timer::default() }; HPET_TIMERS],
            events: Vec::new(),
        }
    }

    pub(crate) fn sanitize(&mut self) {
        self.route_cap &= HPET_ROUTE_CAP;
        self.config &= CONF_ENABLE;
        self.isr &= 0xff;
        for t in &mut self.timers {
            t.config &= TCONF_WRITABLE;
        }
    }

    /// Checks for state no guest could have produced (see
    /// [`crate::intr::Interrupts::restore`]).
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.config & CONF_LEGACY != 0 {
            return Err("HPET legacy replacement routing is not supported");
        }
        if self.isr & !0xff != 0 {
            return Err("HPET status bit for a timer that does not exist");
        }
        for (n, t) in self.timers.iter().enumerate() {
            let route = t.route();
            if route != 0 && self.route_cap & (1 << route) == 0 {
                return Err("HPET timer routed outside its capability");
            }
            let level = t.config & TCONF_LEVEL != 0 && t.config & TCONF_FSB_ENABLE == 0;
            if self.isr & (1 << n) != 0 && (!level || route == 0) {
                return Err("HPET status bit on a timer not in routed level mode");
            }
        }
        Ok(())
    }

    fn enabled(&self) -> bool {
        self.config & CONF_ENABLE != 0
    }

    fn elapsed(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.base_ns) / HPET_TICK_NS
    }

    /// The main counter at `now_ns`.
    pub fn counter(&self, now_ns: u64) -> u32 {
        if self.enabled() { self.countbase.wrapping_add(self.elapsed(now_ns) as u32) } else { self.countbase }
    }

    /// The general interrupt status register (bit `n`: timer `n`).
    pub fn interrupt_status(&self) -> u8 {
        self.isr as u8
    }

    /// Drains the queued interrupt side effects, oldest first.
    pub fn take_events(&mut self) -> Vec<HpetEvent> {
        core::mem::take(&mut self.events)
    }

    fn arm(&mut self, n: usize, now_ns: u64) {
        if !self.enabled() {
            self.timers[n].fire_tick = None;
            return;
        }
        let k = self.elapsed(now_ns);
        let c = self.countbase.wrapping_add(k as u32);
        let delta = u64::from(self.timers[n].compval.wrapping_sub(c));
        self.timers[n].fire_tick = Some(k.saturating_add(delta));
    }

    fn arm_all(&mut self, now_ns: u64) {
        for n in 0..HPET_TIMERS {
            self.arm(n, now_ns);
        }
    }

    /// When the next timer with interrupts enabled fires, if the HPET is
    /// enabled. Timers with interrupts disabled are still armed (a
    /// periodic one's comparator advances) but raise nothing, so they need
    /// no host timer: [`Hpet::tick`] catches them up whenever it runs.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers
            .iter()
            .filter(|t| t.config & TCONF_INT_ENABLE != 0)
            .filter_map(|t| t.fire_tick)
            .min()
            .map(|k| self.base_ns.saturating_add(k.saturating_mul(HPET_TICK_NS)))
    }

    /// Fires every timer whose comparator the counter reached by `now_ns`,
    /// in time order (ties: lower timer first), queuing their events.
    pub fn tick(&mut self, now_ns: u64) {
        let k_now = self.elapsed(now_ns);
        let mut due: Vec<(u64, usize)> = self
            .timers
            .iter()
            .enumerate()
            .filter_map(|(n, t)| t.fire_tick.filter(|&f| f <= k_now).map(|f| (f, n)))
            .collect();
        due.sort_unstable();
        for (f, n) in due {
            self.fire(n);
            let t = &mut self.timers[n];
            if t.config & TCONF_PERIODIC != 0 && t.comprate != 0 {
                let rate = u64::from(t.comprate);
                let m = (k_now - f) / rate + 1;
                t.compval = t.compval.wrapping_add((m as u32).wrapping_mul(t.comprate));
                t.fire_tick = Some(f.saturating_add(m.saturating_mul(rate)));
            } else {
                t.fire_tick = None;
            }
        }
    }

    fn fire(&mut self, n: usize) {
        let t = self.timers[n];
        if t.config & TCONF_INT_ENABLE == 0 {
            return;
        }
        if t.config & TCONF_FSB_ENABLE != 0 {
            self.events.push(HpetEvent::Msi { addr: t.fsb >> 32, data: t.fsb as u32 });
            return;
        }
        let pin = t.route();
        if pin == 0 {
            return;
        }
        if t.config & TCONF_LEVEL != 0 {
            if self.isr & (1 << n) == 0 {
                self.isr |= 1 << n;
                self.events.push(HpetEvent::Assert(pin));
            }
        } else {
            self.events.push(HpetEvent::Pulse(pin));
        }
    }

    fn clear_isr(&mut self, n: usize, pin: usize) {
        if self.isr & (1 << n) != 0 {
            self.isr &= !(1 << n);
            if pin != 0 {
                self.events.push(HpetEvent::Deassert(pin));
            }
        }
    }

    fn read64(&self, reg_off: u64, now_ns: u64) -> u64 {
        match reg_off {
            reg::CAPABILITIES => HPET_CAPABILITIES,
            reg::CONFIG => self.config,
            reg::INT_STATUS => self.isr,
            reg::COUNTER => u64::from(self.counter(now_ns)),
            0x100..=0x1ff => {
                let n = ((reg_off - 0x100) / 0x20) as usize;
                let t = &self.timers[n];
                match (reg_off - 0x100) % 0x20 {
                    0x00 => t.config | TCAP_PERIODIC | TCAP_FSB | (u64::from(self.route_cap) << 32),
                    0x08 => u64::from(t.compval),
                    0x10 => t.fsb,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    fn write64(&mut self, reg_off: u64, data: u64, mask: u64, now_ns: u64) {
        match reg_off {
            reg::CONFIG => {
                let was = self.enabled();
                let counter = self.counter(now_ns);
                self.config = merge(self.config, data, mask) & CONF_ENABLE;
                match (was, self.enabled()) {
                    (false, true) => {
                        self.base_ns = now_ns;
                        self.arm_all(now_ns);
                    }
                    (true, false) => {
                        self.countbase = counter;
                        self.arm_all(now_ns);
                    }
                    _ => {}
                }
            }
            reg::INT_STATUS => {
                let clear = data & mask & self.isr;
                for n in 0..HPET_TIMERS {
                    if clear & (1 << n) != 0 {
                        let pin = self.timers[n].route();
                        self.clear_isr(n, pin);
                    }
                }
            }
            reg::COUNTER => {
                self.countbase = merge(u64::from(self.counter(now_ns)), data, mask) as u32;
                self.base_ns = now_ns;
                if self.enabled() {
                    self.arm_all(now_ns);
                }
            }
            0x100..=0x1ff => {
                let n = ((reg_off - 0x100) / 0x20) as usize;
                match (reg_off - 0x100) % 0x20 {
                    0x00 => self.write_timer_config(n, data, mask),
                    0x08 => self.write_comparator(n, data, mask, now_ns),
                    0x10 => self.timers[n].fsb = merge(self.timers[n].fsb, data, mask),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn write_timer_config(&mut self, n: usize, data: u64, mask: u64) {
        let old = self.timers[n];
        let mut new = merge(old.config, data, mask) & TCONF_WRITABLE;
        let route = ((new >> TCONF_ROUTE_SHIFT) & 0x1f) as u32;
        if route != 0 && self.route_cap & (1 << route) == 0 {
            new &= !(0x1f << TCONF_ROUTE_SHIFT);
        }
        self.timers[n].config = new;
        if new & TCONF_PERIODIC == 0 {
            self.timers[n].comprate = 0;
        }
        let t = self.timers[n];
        if new & TCONF_LEVEL == 0
            || new & TCONF_INT_ENABLE == 0
            || new & TCONF_FSB_ENABLE != 0
            || t.route() != old.route()
        {
            self.clear_isr(n, old.route());
        }
    }

    fn write_comparator(&mut self, n: usize, data: u64, mask: u64, now_ns: u64) {
        let t = &mut self.timers[n];
        let old = (t.compval, t.comprate);
        if t.config & TCONF_PERIODIC != 0 {
            t.comprate = merge(u64::from(t.comprate), data, mask) as u32;
            if t.config & TCONF_VAL_SET != 0 {
                t.compval = t.comprate;
            }
        } else {
            t.compval = merge(u64::from(t.compval), data, mask) as u32;
        }
        t.config &= !TCONF_VAL_SET;
        if (t.compval, t.comprate) != old {
            self.arm(n, now_ns);
        }
    }

    /// Reads `size` bytes at `offset` at time `now_ns` (timers due by then
    /// fire first).
    pub fn mmio_read(&mut self, offset: u64, size: usize, now_ns: u64) -> u64 {
        self.tick(now_ns);
        let ok = match size {
            4 => offset.is_multiple_of(4),
            8 => offset.is_multiple_of(8),
            _ => false,
        };
        if !ok || offset >= HPET_PAGE_SIZE {
            return 0;
        }
        let v = self.read64(offset & !7, now_ns);
        if size == 4 { (v >> ((offset & 4) * 8)) & 0xffff_ffff } else { v }
    }

    /// Writes `size` bytes at `offset` at time `now_ns` (timers due by
    /// then fire first).
    pub fn mmio_write(&mut self, offset: u64, size: usize, value: u64, now_ns: u64) {
        self.tick(now_ns);
        let (data, mask) = match size {
            4 if offset.is_multiple_of(4) => {
                let shift = (offset & 4) * 8;
                ((value & 0xffff_ffff) << shift, 0xffff_ffffu64 << shift)
            }
            8 if offset.is_multiple_of(8) => (value, u64::MAX),
            _ => return,
        };
        if offset >= HPET_PAGE_SIZE {
            return;
        }
        self.write64(offset & !7, data, mask, now_ns);
        // A write can arm a timer that is due at once.
        self.tick(now_ns);
    }
}
