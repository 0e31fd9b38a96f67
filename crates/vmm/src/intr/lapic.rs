//! The local APIC (xAPIC mode, memory-mapped 4 KiB page), one per vCPU.
//!
//! Register layout per SDM vol. 3 ch. 11 ("Advanced Programmable Interrupt
//! Controller"). Every register is 32 bits wide and sits at a 16-byte
//! aligned offset.
//!
//! # Access widths
//!
//! * Reads of 1, 2, 4 or 8 bytes at any offset return the bytes of the
//!   page image: bytes 0-3 of each 16-byte slot hold the register, bytes
//!   4-15 read as zero. Other widths and offsets past the page read zero.
//! * Writes take effect only as 4-byte accesses at a 16-byte aligned
//!   offset; every other write is ignored (the SDM leaves them undefined).
//! * Writes to read-only or reserved registers are ignored; reserved bits
//!   of writable registers read as zero.
//!
//! # bhyve rules followed
//!
//! * Version `0x10` with max LVT entry 6 (CMCI present), as bhyve's vlapic
//!   (version 16); the "suppress EOI broadcast" capability (bit 24) is
//!   **not** advertised (bhyve does not either), so SVR bit 12 is reserved
//!   and every EOI of a level-triggered vector is broadcast to the I/O
//!   APIC.
//! * The APIC ID register is read-only (the ID is the vCPU's).
//! * Software-disabled (SVR bit 8 clear, the reset state): interrupts are
//!   dropped at acceptance, all LVTs become masked and cannot be unmasked,
//!   and the timer stops; re-enabling restarts a periodic timer.
//! * Vectors 0-15 are illegal: an enabled APIC accepting one sets ESR
//!   "receive illegal vector" (bit 6) and drops it; sending one as a fixed or
//!   lowest-priority IPI sets ESR "send illegal vector" (bit 5) and sends
//!   nothing. A newly set ESR bit fires the error LVT when unmasked.
//! * ESR: a write (of any value) latches the errors gathered since the last
//!   write into the readable register and clears the gathered set.
//! * ICR delivery status always reads idle: delivery is instantaneous.
//!   IPIs are delivered edge-triggered; an INIT level de-assert is ignored.
//! * Timer: bus clock [`LAPIC_TIMER_HZ`] (bhyve's 128 `MiHz`); one-shot and
//!   periodic modes (TSC-deadline is not offered, LVT bit 18 is reserved).
//!   As in bhyve, a divide-configuration change takes effect at the next
//!   initial-count write. Periodic expirations missed because `tick` was
//!   called late coalesce into one interrupt.

use serde::{Deserialize, Serialize};

use super::dest::{ApicView, DeliveryMode, Destination, DfrModel};

/// The version register value: version `0x10` (bhyve's), max LVT entry 6
/// in bits 23:16, no EOI-broadcast suppression (bit 24 clear).
pub const LAPIC_VERSION: u32 = 0x10 | (6 << 16);

/// The timer's input clock (bus frequency), in Hz.
pub const LAPIC_TIMER_HZ: u64 = 128 * 1024 * 1024;

/// Size of the LAPIC MMIO page.
pub const LAPIC_PAGE_SIZE: u64 = 0x1000;

/// Register offsets within the LAPIC page.
pub mod reg {
    /// Local APIC ID (bits 31:24), read-only here.
    pub const ID: u64 = 0x20;
    /// Version, read-only.
    pub const VERSION: u64 = 0x30;
    /// Task priority.
    pub const TPR: u64 = 0x80;
    /// Arbitration priority (reads zero).
    pub const APR: u64 = 0x90;
    /// Processor priority, read-only.
    pub const PPR: u64 = 0xa0;
    /// End of interrupt, write-only.
    pub const EOI: u64 = 0xb0;
    /// Remote read (reads zero).
    pub const RRD: u64 = 0xc0;
    /// Logical destination.
    pub const LDR: u64 = 0xd0;
    /// Destination format.
    pub const DFR: u64 = 0xe0;
    /// Spurious interrupt vector.
    pub const SVR: u64 = 0xf0;
    /// In-service register bank 0 (bank `i` at `ISR + 0x10 * i`).
    pub const ISR: u64 = 0x100;
    /// Trigger mode register bank 0.
    pub const TMR: u64 = 0x180;
    /// Interrupt request register bank 0.
    pub const IRR: u64 = 0x200;
    /// Error status.
    pub const ESR: u64 = 0x280;
    /// LVT corrected machine check.
    pub const LVT_CMCI: u64 = 0x2f0;
    /// Interrupt command, low word (writing it sends).
    pub const ICR_LO: u64 = 0x300;
    /// Interrupt command, high word (destination in bits 31:24).
    pub const ICR_HI: u64 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u64 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u64 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u64 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u64 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u64 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u64 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u64 = 0x380;
    /// Timer current count, read-only.
    pub const TIMER_CURRENT: u64 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u64 = 0x3e0;
}

/// ESR bit 5: a fixed IPI with an illegal vector was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an interrupt with an illegal vector was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer periodic-mode bit.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// SVR software-enable bit.
pub const SVR_ENABLE: u32 = 1 << 8;

const SVR_WRITABLE: u32 = 0x3ff;
const ICR_LO_WRITABLE: u32 = 0x000c_cfff;

/// LVT slots, in the order of [`LVT_OFFSETS`].
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const NUM_LVT: usize = 7;
/// Offsets of the LVT registers, indexed by LVT slot.
const LVT_OFFSETS: [u64; NUM_LVT] =
    [reg::LVT_TIMER, reg::LVT_THERMAL, reg::LVT_PERF, reg::LVT_LINT0, reg::LVT_LINT1, reg::LVT_ERROR, reg::LVT_CMCI];

/// Writable bits of each LVT (vector, mask and, per entry, delivery mode,
/// timer mode, polarity and trigger mode); delivery status and remote IRR
/// are read-only and always read zero here.
fn lvt_writable(slot: usize) -> u32 {
    const BASE: u32 = 0xff | LVT_MASKED;
    const DM: u32 = 0x700;
    match slot {
        LVT_TIMER => BASE | LVT_TIMER_PERIODIC,
        LVT_ERROR => BASE,
        LVT_LINT0 | LVT_LINT1 => BASE | DM | (1 << 13) | (1 << 15),
        _ => BASE | DM,
    }
}

/// The destination shorthand of an ICR write (bits 19:18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shorthand {
    /// `00`: the destination field names the targets.
    None,
    /// `01`: the sender only.
    SelfOnly,
    /// `10`: every APIC, the sender included.
    AllIncludingSelf,
    /// `11`: every APIC but the sender.
    AllExcludingSelf,
}

/// An IPI requested by an ICR low write, for the aggregate to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipi {
    /// Bits 7:0.
    pub vector: u8,
    /// Bits 10:8.
    pub delivery: DeliveryMode,
    /// ICR high bits 31:24 with the mode of bit 11 (ignored unless the
    /// shorthand is [`Shorthand::None`]).
    pub dest: Destination,
    /// Bits 19:18.
    pub shorthand: Shorthand,
}

/// What a register write asks of the rest of the interrupt system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LapicEffect {
    /// Nothing.
    None,
    /// An EOI retired `vector`; `level` says its TMR bit was set, so the
    /// EOI must be broadcast to the I/O APIC.
    Eoi {
        /// The retired vector.
        vector: u8,
        /// Whether it was accepted level-triggered.
        level: bool,
    },
    /// An IPI to deliver.
    Ipi(Ipi),
}

/// One virtual local APIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lapic {
    id: u8,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    irr: [u32; 8],
    tmr: [u32; 8],
    esr: u32,
    esr_pending: u32,
    esr_firing: bool,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; NUM_LVT],
    timer_initial: u32,
    timer_divide: u32,
    timer_divisor: u32,
    timer_running: bool,
    timer_start_ns: u64,
    timer_periods: u64,
    nmi_pending: bool,
}

fn bank_test(bank: &[u32; 8], v: u8) -> bool {
    bank[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bank_set(bank: &mut [u32; 8], v: u8, on: bool) {
    let w = &mut bank[usize::from(v >> 5)];
    if on {
        *w |= 1 << (v & 31);
    } else {
        *w &= !(1 << (v & 31));
    }
}

fn bank_highest(bank: &[u32; 8]) -> Option<u8> {
    (0..8usize).rev().find(|&i| bank[i] != 0).map(|i| (i as u8) * 32 + (31 - bank[i].leading_zeros() as u8))
}

/// The divisor selected by a divide-configuration value (bits 0, 1, 3).
pub fn timer_divisor(dcr: u32) -> u32 {
    let code = (dcr & 3) | ((dcr & 8) >> 1);
    if code == 7 { 1 } else { 2 << code }
}

impl Lapic {
    /// A local APIC in its reset state with APIC ID `id`: software
    /// disabled (SVR `0xff`), all LVTs masked, DFR flat (`0xffffffff`).
    pub fn new(id: u8) -> Lapic {
        Lapic {
            id,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            irr: [0; 8],
            tmr: [0; 8],
            esr: 0,
            esr_pending: 0,
            esr_firing: false,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; NUM_LVT],
            timer_initial: 0,
            timer_divide: 0,
            timer_divisor: 2,
            timer_running: false,
            timer_start_ns: 0,
            timer_periods: 0,
            nmi_pending: false,
        }
    }

    /// Re-applies every register's writable mask (used on restore, so a
    /// foreign snapshot cannot hold values the guest could not write).
    pub(crate) fn sanitize(&mut self) {
        self.tpr &= 0xff;
        self.ldr &= 0xff00_0000;
        self.dfr |= 0x0fff_ffff;
        self.svr &= SVR_WRITABLE;
        self.icr_lo &= ICR_LO_WRITABLE;
        self.icr_hi &= 0xff00_0000;
        self.timer_divide &= 0xb;
        if !matches!(self.timer_divisor, 1 | 2 | 4 | 8 | 16 | 32 | 64 | 128) {
            self.timer_divisor = timer_divisor(self.timer_divide);
        }
        if self.timer_initial == 0 || !self.enabled() {
            self.timer_running = false;
        }
        for (slot, v) in self.lvt.iter_mut().enumerate() {
            *v &= lvt_writable(slot);
        }
        for v in 0..16u8 {
            bank_set(&mut self.irr, v, false);
            bank_set(&mut self.isr, v, false);
        }
    }

    /// The APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sets the task priority register (the CR8 / TPR-shadow path;
    /// CR8 = TPR bits 7:4).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// Whether the APIC is software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The task priority register.
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// The highest in-service vector, if any.
    pub fn isrv(&self) -> Option<u8> {
        bank_highest(&self.isr)
    }

    /// The processor priority: the TPR if its class is at least the highest
    /// in-service vector's class, else that class (low nibble zero).
    pub fn ppr(&self) -> u8 {
        let tpr = self.tpr as u8;
        let isrv = self.isrv().unwrap_or(0);
        if (tpr & 0xf0) >= (isrv & 0xf0) { tpr } else { isrv & 0xf0 }
    }

    /// What destination resolution needs to know about this APIC.
    pub fn view(&self) -> ApicView {
        ApicView {
            id: self.id,
            logical_id: (self.ldr >> 24) as u8,
            model: DfrModel::from_dfr(self.dfr),
            ppr: self.ppr(),
        }
    }

    fn set_error(&mut self, bits: u32) {
        let new = bits & !self.esr_pending;
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if new != 0 && lvt & LVT_MASKED == 0 && !self.esr_firing {
            self.esr_firing = true;
            self.accept(lvt as u8, false);
            self.esr_firing = false;
        }
    }

    /// Accepts an interrupt: sets its IRR bit and sets (level) or clears
    /// (edge) its TMR bit. Returns whether it was accepted: a
    /// software-disabled APIC drops it silently, and an enabled one given
    /// an illegal vector (0-15) sets ESR bit 6 and drops it (bhyve's order
    /// of checks).
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if vector < 16 {
            self.set_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        bank_set(&mut self.irr, vector, true);
        bank_set(&mut self.tmr, vector, level_triggered);
        true
    }

    /// The vector to inject: the highest IRR vector whose priority class
    /// (bits 7:4) is above the PPR's class.
    pub fn pending(&self) -> Option<u8> {
        let v = bank_highest(&self.irr)?;
        ((v & 0xf0) > (self.ppr() & 0xf0)).then_some(v)
    }

    /// Records that `vector` was injected: moves it from IRR to ISR (and so
    /// raises the PPR). Returns false, changing nothing, if its IRR bit was
    /// clear.
    pub fn ack(&mut self, vector: u8) -> bool {
        if !bank_test(&self.irr, vector) {
            return false;
        }
        bank_set(&mut self.irr, vector, false);
        bank_set(&mut self.isr, vector, true);
        true
    }

    /// Retires the highest in-service vector, as an EOI write does.
    pub fn eoi(&mut self) -> LapicEffect {
        match self.isrv() {
            None => LapicEffect::None,
            Some(vector) => {
                bank_set(&mut self.isr, vector, false);
                LapicEffect::Eoi { vector, level: bank_test(&self.tmr, vector) }
            }
        }
    }

    /// Raises local interrupt pin LINT0 (`pin` 0) or LINT1 (`pin` 1), as a
    /// virtual 8259 or NMI button would, through its LVT entry: masked
    /// raises nothing; fixed delivery accepts the vector edge-triggered
    /// (an illegal vector sets ESR bit 5, as bhyve does); NMI delivery sets
    /// the pending NMI. A software-disabled APIC treats LINT1 as the NMI
    /// pin (and LINT0 as INTR), as bhyve does. `ExtINT` delivery, and any
    /// other mode or pin, raises nothing (there is no 8259 model). Returns
    /// whether something was raised.
    pub fn trigger_lint(&mut self, pin: usize) -> bool {
        let slot = match pin {
            0 => LVT_LINT0,
            1 => LVT_LINT1,
            _ => return false,
        };
        if !self.enabled() {
            if slot == LVT_LINT1 {
                self.nmi_pending = true;
                return true;
            }
            return false;
        }
        let lvt = self.lvt[slot];
        if lvt & LVT_MASKED != 0 {
            return false;
        }
        match DeliveryMode::from_bits(lvt >> 8) {
            Some(DeliveryMode::Fixed) => {
                if (lvt as u8) < 16 {
                    self.set_error(ESR_SEND_ILLEGAL_VECTOR);
                    return false;
                }
                self.accept(lvt as u8, false)
            }
            Some(DeliveryMode::Nmi) => {
                self.nmi_pending = true;
                true
            }
            _ => false,
        }
    }

    /// Marks an NMI pending (NMIs bypass IRR/ISR).
    pub fn inject_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Takes the pending-NMI flag.
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    fn timer_periodic(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC != 0
    }

    /// Nanoseconds from the timer start to the end of `ticks` timer ticks,
    /// rounded up.
    fn ticks_ns(&self, ticks: u128) -> u128 {
        let num = ticks.saturating_mul(u128::from(self.timer_divisor) * 1_000_000_000);
        num.div_ceil(u128::from(LAPIC_TIMER_HZ))
    }

    fn elapsed_ticks(&self, now_ns: u64) -> u128 {
        let ns = u128::from(now_ns.saturating_sub(self.timer_start_ns));
        ns * u128::from(LAPIC_TIMER_HZ) / (1_000_000_000 * u128::from(self.timer_divisor))
    }

    fn timer_start(&mut self, now_ns: u64) {
        self.timer_divisor = timer_divisor(self.timer_divide);
        self.timer_start_ns = now_ns;
        self.timer_periods = 0;
        self.timer_running = self.timer_initial != 0 && self.enabled();
    }

    /// When the timer next expires, if it is running.
    pub fn next_deadline(&self) -> Option<u64> {
        if !self.timer_running {
            return None;
        }
        let n = u128::from(self.timer_periods) + 1;
        let at = u128::from(self.timer_start_ns) + self.ticks_ns(n * u128::from(self.timer_initial));
        Some(u64::try_from(at).unwrap_or(u64::MAX))
    }

    /// Advances the timer to `now_ns`: an expiry at or before `now_ns`
    /// raises the timer LVT's vector (edge) unless masked. Returns whether
    /// the timer expired.
    pub fn tick(&mut self, now_ns: u64) -> bool {
        match self.next_deadline() {
            Some(d) if d <= now_ns => {}
            _ => return false,
        }
        if self.timer_periodic() {
            let periods = self.elapsed_ticks(now_ns) / u128::from(self.timer_initial);
            self.timer_periods = u64::try_from(periods).unwrap_or(u64::MAX);
        } else {
            self.timer_running = false;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
        true
    }

    fn timer_current(&self, now_ns: u64) -> u32 {
        if !self.timer_running {
            return 0;
        }
        let initial = u128::from(self.timer_initial);
        let elapsed = self.elapsed_ticks(now_ns);
        let left = if self.timer_periodic() { initial - elapsed % initial } else { initial.saturating_sub(elapsed) };
        left as u32
    }

    /// Reads the 32-bit register at the 16-byte aligned `offset`.
    fn read32(&self, offset: u64, now_ns: u64) -> u32 {
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => LAPIC_VERSION,
            reg::TPR => self.tpr,
            reg::PPR => u32::from(self.ppr()),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - reg::ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((offset - reg::TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((offset - reg::IRR) >> 4) as usize],
            reg::ESR => self.esr,
            reg::ICR_LO => self.icr_lo,
            reg::ICR_HI => self.icr_hi,
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.timer_current(now_ns),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => match LVT_OFFSETS.iter().position(|&o| o == offset) {
                Some(slot) => self.lvt[slot],
                None => 0,
            },
        }
    }

    /// Reads `size` bytes at `offset` of the page (see the module doc for
    /// widths). `now_ns` is the time, for the timer's current count.
    pub fn mmio_read(&self, offset: u64, size: usize, now_ns: u64) -> u64 {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return 0;
        }
        let mut value = 0u64;
        for i in 0..size as u64 {
            let at = offset.saturating_add(i);
            if at >= LAPIC_PAGE_SIZE || at & 0xf >= 4 {
                continue;
            }
            let byte = (self.read32(at & !0xf, now_ns) >> ((at & 3) * 8)) & 0xff;
            value |= u64::from(byte) << (i * 8);
        }
        value
    }

    /// Writes `size` bytes at `offset`; only 4-byte writes at 16-byte
    /// aligned offsets take effect. Returns what the write asks of the rest
    /// of the system (an EOI broadcast, an IPI).
    pub fn mmio_write(&mut self, offset: u64, size: usize, value: u64, now_ns: u64) -> LapicEffect {
        if size != 4 || offset & 0xf != 0 || offset >= LAPIC_PAGE_SIZE {
            return LapicEffect::None;
        }
        self.write32(offset, value as u32, now_ns)
    }

    fn write32(&mut self, offset: u64, value: u32, now_ns: u64) -> LapicEffect {
        match offset {
            reg::TPR => self.tpr = value & 0xff,
            reg::EOI => return self.eoi(),
            reg::LDR => self.ldr = value & 0xff00_0000,
            reg::DFR => self.dfr = (value & 0xf000_0000) | 0x0fff_ffff,
            reg::SVR => self.write_svr(value, now_ns),
            reg::ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            reg::ICR_HI => self.icr_hi = value & 0xff00_0000,
            reg::ICR_LO => {
                self.icr_lo = value & ICR_LO_WRITABLE;
                return self.send_ipi();
            }
            reg::TIMER_INITIAL => {
                self.timer_initial = value;
                self.timer_start(now_ns);
            }
            reg::TIMER_DIVIDE => self.timer_divide = value & 0xb,
            _ => {
                if let Some(slot) = LVT_OFFSETS.iter().position(|&o| o == offset) {
                    let mut v = value & lvt_writable(slot);
                    if !self.enabled() {
                        v |= LVT_MASKED;
                    }
                    self.lvt[slot] = v;
                }
            }
        }
        LapicEffect::None
    }

    fn write_svr(&mut self, value: u32, now_ns: u64) {
        let was = self.enabled();
        self.svr = value & SVR_WRITABLE;
        match (was, self.enabled()) {
            (true, false) => {
                self.timer_running = false;
                for v in &mut self.lvt {
                    *v |= LVT_MASKED;
                }
            }
            (false, true) if self.timer_periodic() => self.timer_start(now_ns),
            _ => {}
        }
    }

    fn send_ipi(&mut self) -> LapicEffect {
        let lo = self.icr_lo;
        let vector = lo as u8;
        let Some(delivery) = DeliveryMode::from_bits(lo >> 8) else {
            return LapicEffect::None;
        };
        match delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority if vector < 16 => {
                self.set_error(ESR_SEND_ILLEGAL_VECTOR);
                return LapicEffect::None;
            }
            // INIT level de-assert: a no-op on modern processors.
            DeliveryMode::Init if lo & (1 << 15) != 0 && lo & (1 << 14) == 0 => {
                return LapicEffect::None;
            }
            _ => {}
        }
        let id = (self.icr_hi >> 24) as u8;
        let dest = if lo & (1 << 11) != 0 { Destination::Logical(id) } else { Destination::Physical(id) };
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        LapicEffect::Ipi(Ipi { vector, delivery, dest, shorthand })
    }
}
