//! Interrupt device models after bhyve: local APICs, the I/O APIC, the
//! HPET, MSI decoding and destination resolution, tied together by
//! [`Interrupts`].
//!
//! # Design
//!
//! Everything here is pure, deterministic logic: no threads, no locks, no
//! host timers. Time is a caller-supplied `now_ns` (nanoseconds on any
//! monotonic clock the caller likes); the caller arms a host timer for
//! [`Interrupts::next_deadline`] and calls [`Interrupts::tick`] when it
//! expires. Device models do not call each other: a write that has effects
//! elsewhere returns them ([`lapic::LapicEffect`],
//! [`ioapic::IoapicMessage`]) or queues them ([`hpet::HpetEvent`]), and
//! [`Interrupts`] routes them. All routing goes through one MSI decoder
//! ([`msi`]) and one destination resolver ([`dest`]).
//!
//! # Invariants
//!
//! * No guest-controlled value (MMIO offset, width, written value, vector,
//!   destination) can panic: out-of-range widths and offsets read zero and
//!   are ignored on write, illegal vectors (0-15) set the LAPIC ESR and
//!   are dropped, bad MSI addresses are refused with an [`msi::MsiError`].
//! * At most [`dest::MAX_VCPUS`] (64) vCPUs; the LAPIC ID of vCPU `i` is
//!   `i`.
//! * Vectors 0-15 are never set in any IRR or ISR.
//!
//! # bhyve rules followed (see each module for the register-level rules)
//!
//! * LAPIC: bhyve vlapic's version (`0x10`, 7 LVTs, no EOI-broadcast
//!   suppression), read-only ID, software-disable masking, ESR latching,
//!   EOI of a TMR-set vector broadcast to the I/O APIC.
//! * I/O APIC: vioapic's Remote IRR handling, EOI re-send of still-asserted
//!   level pins, Remote IRR cleared by an edge-mode entry write.
//! * HPET: vhpet's 32-bit counter and comparators, route capability
//!   `0x00f00000`, no legacy replacement, periodic "value set" semantics,
//!   one-shot timers that fire once.
//! * MSI: decoding per the SDM with the redirection hint policy selectable
//!   ([`msi::RhPolicy`]; default illumos' DM-only rule); MSIs are always
//!   edge-triggered, as in both bhyves.
//! * Destinations: `0xff` broadcasts in physical and logical mode alike;
//!   each APIC is matched under its own DFR model; a bad model matches no
//!   logical destination.
//!
//! # Deliberate differences from bhyve
//!
//! * The HPET counts at 10 MHz (bhyve: 2^24 Hz) so ticks are an exact
//!   100 ns of caller time.
//! * Lowest priority arbitrates on PPR (bhyve takes the first matching
//!   vCPU); with equal PPRs both pick the lowest-numbered vCPU.
//! * The LAPIC's TMR bit is set or cleared when a vector is accepted (as
//!   the SDM describes) rather than precomputed from the I/O APIC's
//!   redirection table.
//! * I/O APIC pins honour the polarity bit (bhyve ignores it).
//! * Reserved bits read zero everywhere (bhyve stores some of them).
//!
//! # Delivery modes
//!
//! Fixed and lowest priority are delivered (lowest priority to the
//! destination with the lowest PPR, ties to the lowest vCPU number). NMI
//! sets the target's pending-NMI flag ([`Interrupts::take_nmi`]). INIT and
//! start-up are queued as [`CpuEvent`]s for the VMM's vCPU start-up logic
//! ([`Interrupts::take_cpu_events`]); unlike bhyve, which only honours
//! them from the BSP and tracks a per-AP boot state, they are reported for
//! every target and the VMM decides. SMI and `ExtINT` are dropped, as is the
//! I/O APIC's reserved delivery mode `110`.
//!
//! # Wired to vCPUs
//!
//! [`system::IntrSystem`] runs these models under a VM: it is the
//! machine's MMIO device for the LAPIC page, the I/O APIC and the HPET
//! (accesses are nested faults on unmapped guest addresses, emulated by
//! [`crate::emul`]), its [`crate::machine::InterruptSource`] (before each
//! entry the vCPU loop injects the pending vector through the backend, or
//! asks for an interrupt-window exit while the guest has IF clear), the
//! kicker of vCPUs that got an interrupt from elsewhere (IPIs, MSIs, the
//! I/O APIC, timers), and the host timer (one thread sleeping until
//! [`Interrupts::next_deadline`]). The runtime's IDT sends vectors
//! `0x20..=0xff` (but the flush vector `0x40`) to stubs that log them; the
//! guest's script mode ([`crate::guest::ScriptOp`]) EOIs through the LAPIC
//! page. On KVM this is tested end to end (`vmm-kvm`'s `interrupts` tests:
//! an HPET level interrupt on pin 20 re-injected after an EOI while
//! asserted and not after its status is cleared, an asserted masked pin
//! delivered when unmasked, IPIs between three vCPUs and an IPI
//! ping-pong, MSIs by destination mode across four and lowest-priority
//! arbitration, task priority, the LAPIC timer), and against KVM's
//! in-kernel LAPIC and I/O APIC ([`system::IntrSystem::with_external`]
//! keeps only our HPET, driving KVM's lines): IPIs, the ping-pong, MSIs,
//! task priority and the LAPIC timer agree. The level-triggered sequence cannot be compared on our
//! hosts: there (`kvm_pvm`, kernel 6.18) KVM's in-kernel LAPIC leaves ISR
//! and PPR at 0 once a vector is delivered, before any EOI, so an asserted
//! level vector is re-sent without end (10,000 times, KVM's storm guard);
//! a probe (a self-IPI, ISR read before the EOI) detects this and the
//! level differential says it skipped.
//!
//! # Known gaps
//!
//! * Not wired: NMIs ([`Interrupts::take_nmi`]) and INIT/SIPI
//!   ([`CpuEvent`]) are not acted on by the vCPU loop; `vmm run` does not
//!   build an [`system::IntrSystem`] (it gives the machine's one MMIO
//!   device slot to the PCI platform; [`system::MmioChain`] lets both
//!   share it). A running system's snapshot
//!   ([`system::IntrSystem::snapshot`]) is consistent only with its
//!   vCPUs paused, which the caller ensures (a migration's switch-over).
//! * Delivery costs a nested fault per LAPIC access (EOI, ICR) and a kick
//!   per cross-vCPU interrupt: no posted interrupts, no APIC-access page,
//!   no paravirtual EOI.
//! * No x2APIC (MSR access, 32-bit IDs), no APIC base MSR relocation, no
//!   TSC-deadline timer, no 8259 PIC / ExtINT, no CR8 accessors (TPR is
//!   reachable through MMIO only); INIT/SIPI are only reported
//!   ([`CpuEvent`]), not acted on.
//! * No focus processor checking or arbitration priority (APR reads 0).
//! * ESR reports only illegal vectors (not illegal register addresses or
//!   checksum/accept errors).
//! * HPET legacy replacement and 64-bit mode are not offered.
//! * The I/O APIC has a fixed 24 pins and no EOI register (version 0x11).
#![forbid(unsafe_code)]

pub mod dest;
pub mod hpet;
pub mod ioapic;
pub mod lapic;
pub mod msi;
pub mod system;

use serde::{Deserialize, Serialize};

use dest::{ApicView, DeliveryMode, Destination, MAX_VCPUS};
use hpet::{HPET_PAGE_SIZE, Hpet, HpetEvent};
use ioapic::{IOAPIC_PAGE_SIZE, IOAPIC_PINS, Ioapic, IoapicMessage};
use lapic::{LAPIC_PAGE_SIZE, Lapic, LapicEffect, Shorthand};
use msi::{MsiError, RhPolicy};

/// Default guest-physical base of every vCPU's LAPIC page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Default guest-physical base of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Default guest-physical base of the HPET.
pub const HPET_BASE: u64 = 0xfed0_0000;

/// Why an interrupt system could not be built or restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntrError {
    /// The vCPU count is 0 or above [`MAX_VCPUS`].
    BadVcpuCount(usize),
    /// A snapshot holds state no guest could have produced.
    BadSnapshot(&'static str),
}

impl core::fmt::Display for IntrError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IntrError::BadVcpuCount(n) => {
                write!(f, "{n} vCPUs: the interrupt system supports 1 to {MAX_VCPUS}")
            }
            IntrError::BadSnapshot(why) => write!(f, "bad interrupt snapshot: {why}"),
        }
    }
}

impl std::error::Error for IntrError {}

/// An INIT or start-up IPI for the VMM to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuEvent {
    /// INIT (assert) to `vcpu`.
    Init {
        /// The target vCPU.
        vcpu: usize,
    },
    /// Start-up IPI to `vcpu`: the AP starts in real mode at
    /// `vector << 12`.
    StartUp {
        /// The target vCPU.
        vcpu: usize,
        /// The start-up vector (the start page number).
        vector: u8,
    },
}

/// All interrupt state, as plain serializable data (for snapshots and
/// live migration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptsState {
    /// One local APIC per vCPU.
    pub lapics: Vec<Lapic>,
    /// The I/O APIC.
    pub ioapic: Ioapic,
    /// The HPET.
    pub hpet: Hpet,
    /// The MSI redirection-hint policy.
    pub rh_policy: RhPolicy,
    /// INIT/start-up events not yet taken.
    pub cpu_events: Vec<CpuEvent>,
}

/// The interrupt system of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interrupts {
    lapics: Vec<Lapic>,
    ioapic: Ioapic,
    hpet: Hpet,
    policy: RhPolicy,
    cpu_events: Vec<CpuEvent>,
}

impl Interrupts {
    /// An interrupt system for `vcpus` vCPUs (LAPIC IDs `0..vcpus`), every
    /// device in its reset state, MSIs under the default [`RhPolicy`].
    ///
    /// # Errors
    ///
    /// [`IntrError::BadVcpuCount`] unless `1 <= vcpus <= MAX_VCPUS`.
    pub fn new(vcpus: usize) -> Result<Interrupts, IntrError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(IntrError::BadVcpuCount(vcpus));
        }
        Ok(Interrupts {
            lapics: (0..vcpus).map(|i| Lapic::new(i as u8)).collect(),
            ioapic: Ioapic::new(),
            hpet: Hpet::new(IOAPIC_PINS),
            policy: RhPolicy::default(),
            cpu_events: Vec::new(),
        })
    }

    /// Selects the MSI redirection-hint policy.
    pub fn set_rh_policy(&mut self, policy: RhPolicy) {
        self.policy = policy;
    }

    /// The MSI redirection-hint policy.
    pub fn rh_policy(&self) -> RhPolicy {
        self.policy
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.lapics.len()
    }

    /// vCPU `vcpu`'s local APIC.
    pub fn lapic(&self, vcpu: usize) -> Option<&Lapic> {
        self.lapics.get(vcpu)
    }

    /// The I/O APIC.
    pub fn ioapic(&self) -> &Ioapic {
        &self.ioapic
    }

    /// The HPET.
    pub fn hpet(&self) -> &Hpet {
        &self.hpet
    }

    fn views(&self) -> Vec<ApicView> {
        self.lapics.iter().map(Lapic::view).collect()
    }

    fn all_mask(&self) -> u64 {
        match self.lapics.len() {
            MAX_VCPUS => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// Delivers to the vCPUs in `mask`.
    fn deliver_mask(&mut self, mut mask: u64, delivery: DeliveryMode, lowest: bool, vector: u8, level: bool) {
        if lowest || delivery == DeliveryMode::LowestPriority {
            mask = dest::lowest_priority(mask, &self.views());
        }
        for (i, l) in self.lapics.iter_mut().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            match delivery {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                    l.accept(vector, level);
                }
                DeliveryMode::Nmi => l.inject_nmi(),
                DeliveryMode::Init => self.cpu_events.push(CpuEvent::Init { vcpu: i }),
                DeliveryMode::StartUp => self.cpu_events.push(CpuEvent::StartUp { vcpu: i, vector }),
                DeliveryMode::Smi | DeliveryMode::ExtInt => {}
            }
        }
    }

    fn deliver(&mut self, dest: Destination, delivery: DeliveryMode, lowest: bool, vector: u8, level: bool) {
        let mask = dest::resolve(dest, &self.views());
        self.deliver_mask(mask, delivery, lowest, vector, level);
    }

    fn route_ioapic(&mut self, msg: Option<IoapicMessage>) {
        if let Some(m) = msg
            && let Some(delivery) = m.delivery
            && delivery != DeliveryMode::StartUp
        {
            self.deliver(m.dest, delivery, false, m.vector, m.level_triggered);
        }
    }

    fn apply_lapic_effect(&mut self, src: usize, effect: LapicEffect) {
        match effect {
            LapicEffect::None => {}
            LapicEffect::Eoi { vector, level } => {
                if level {
                    for m in self.ioapic.eoi(vector) {
                        self.route_ioapic(Some(m));
                    }
                }
            }
            LapicEffect::Ipi(ipi) => {
                let me = 1u64 << src;
                let mask = match ipi.shorthand {
                    Shorthand::None => dest::resolve(ipi.dest, &self.views()),
                    Shorthand::SelfOnly => me,
                    Shorthand::AllIncludingSelf => self.all_mask(),
                    Shorthand::AllExcludingSelf => self.all_mask() & !me,
                };
                self.deliver_mask(mask, ipi.delivery, false, ipi.vector, false);
            }
        }
    }

    fn drain_hpet(&mut self) {
        for ev in self.hpet.take_events() {
            match ev {
                HpetEvent::Assert(pin) => self.set_irq(pin, true),
                HpetEvent::Deassert(pin) => self.set_irq(pin, false),
                HpetEvent::Pulse(pin) => self.pulse_irq(pin),
                HpetEvent::Msi { addr, data } => {
                    // A guest-programmed bad FSB address is dropped, as a
                    // write to a non-interrupt address would be.
                    let _ = self.send_msi(addr, data);
                }
            }
        }
    }

    /// Drives I/O APIC pin `pin` to electrical level `high` (device
    /// interrupt lines); any resulting interrupt is routed at once.
    pub fn set_irq(&mut self, pin: usize, high: bool) {
        let msg = self.ioapic.set_level(pin, high);
        self.route_ioapic(msg);
    }

    /// Raises and lowers I/O APIC pin `pin` (an edge from an active-high
    /// device, e.g. an ISA interrupt).
    pub fn pulse_irq(&mut self, pin: usize) {
        self.set_irq(pin, true);
        self.set_irq(pin, false);
    }

    /// Delivers an MSI (always edge-triggered), decoded under the current
    /// [`RhPolicy`].
    ///
    /// # Errors
    ///
    /// The decoder's [`MsiError`]; nothing is delivered then.
    pub fn send_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError> {
        let m = msi::decode_with(addr, data, self.policy)?;
        self.deliver(m.dest, m.delivery, m.lowest_priority, m.vector, false);
        Ok(())
    }

    /// The vector to inject into `vcpu`, if any.
    pub fn pending(&self, vcpu: usize) -> Option<u8> {
        self.lapics.get(vcpu)?.pending()
    }

    /// Records the injection of `vector` into `vcpu` (IRR to ISR).
    pub fn ack(&mut self, vcpu: usize, vector: u8) -> bool {
        self.lapics.get_mut(vcpu).is_some_and(|l| l.ack(vector))
    }

    /// Raises `vcpu`'s LINT0 (`pin` 0) or LINT1 (`pin` 1) through its LVT
    /// (see [`Lapic::trigger_lint`]).
    pub fn lint(&mut self, vcpu: usize, pin: usize) -> bool {
        self.lapics.get_mut(vcpu).is_some_and(|l| l.trigger_lint(pin))
    }

    /// Takes the queued INIT/start-up events, oldest first.
    pub fn take_cpu_events(&mut self) -> Vec<CpuEvent> {
        core::mem::take(&mut self.cpu_events)
    }

    /// Takes `vcpu`'s pending-NMI flag.
    pub fn take_nmi(&mut self, vcpu: usize) -> bool {
        self.lapics.get_mut(vcpu).is_some_and(Lapic::take_nmi)
    }

    /// Advances every timer (LAPIC timers, HPET) to `now_ns`.
    pub fn tick(&mut self, now_ns: u64) {
        for l in &mut self.lapics {
            l.tick(now_ns);
        }
        self.hpet.tick(now_ns);
        self.drain_hpet();
    }

    /// The earliest time at which [`Interrupts::tick`] has work to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.lapics.iter().filter_map(Lapic::next_deadline).chain(self.hpet.next_deadline()).min()
    }

    /// An MMIO read by `vcpu` of `size` bytes at `gpa`: `None` if no
    /// interrupt device claims the address (a LAPIC page access by a vCPU
    /// that does not exist is not claimed).
    pub fn mmio_read(&mut self, vcpu: usize, gpa: u64, size: usize, now_ns: u64) -> Option<u64> {
        if let Some(off) = gpa.checked_sub(LAPIC_BASE).filter(|&o| o < LAPIC_PAGE_SIZE) {
            self.tick(now_ns);
            return self.lapics.get(vcpu).map(|l| l.mmio_read(off, size, now_ns));
        }
        if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_PAGE_SIZE) {
            return Some(self.ioapic.mmio_read(off, size));
        }
        if let Some(off) = gpa.checked_sub(HPET_BASE).filter(|&o| o < HPET_PAGE_SIZE) {
            let v = self.hpet.mmio_read(off, size, now_ns);
            self.drain_hpet();
            return Some(v);
        }
        None
    }

    /// An MMIO write by `vcpu`; returns whether an interrupt device claimed
    /// the address. Its effects (IPIs, EOI broadcasts, pin deliveries) are
    /// carried out before it returns.
    pub fn mmio_write(&mut self, vcpu: usize, gpa: u64, size: usize, value: u64, now_ns: u64) -> bool {
        if let Some(off) = gpa.checked_sub(LAPIC_BASE).filter(|&o| o < LAPIC_PAGE_SIZE) {
            if vcpu >= self.lapics.len() {
                return false;
            }
            self.tick(now_ns);
            let effect = self.lapics[vcpu].mmio_write(off, size, value, now_ns);
            self.apply_lapic_effect(vcpu, effect);
            return true;
        }
        if let Some(off) = gpa.checked_sub(IOAPIC_BASE).filter(|&o| o < IOAPIC_PAGE_SIZE) {
            let msg = self.ioapic.mmio_write(off, size, value);
            self.route_ioapic(msg);
            return true;
        }
        if let Some(off) = gpa.checked_sub(HPET_BASE).filter(|&o| o < HPET_PAGE_SIZE) {
            self.hpet.mmio_write(off, size, value, now_ns);
            self.drain_hpet();
            return true;
        }
        false
    }

    /// All state, as plain data.
    pub fn snapshot(&self) -> InterruptsState {
        InterruptsState {
            lapics: self.lapics.clone(),
            ioapic: self.ioapic.clone(),
            hpet: self.hpet.clone(),
            rh_policy: self.policy,
            cpu_events: self.cpu_events.clone(),
        }
    }

    /// Rebuilds an interrupt system from a snapshot.
    ///
    /// Refused: a vCPU count of 0 or above [`MAX_VCPUS`], a LAPIC whose ID
    /// is not its vCPU number, a CPU event for a vCPU that does not exist,
    /// and HPET state no guest could have produced (as illumos' vhpet
    /// import refuses it: a status bit on a timer not in level mode or in
    /// FSB mode, a route outside the capability). Register values are then
    /// re-masked to what a guest could have written.
    ///
    /// # Errors
    ///
    /// [`IntrError::BadVcpuCount`] or [`IntrError::BadSnapshot`], as above.
    pub fn restore(state: InterruptsState) -> Result<Interrupts, IntrError> {
        let n = state.lapics.len();
        if n == 0 || n > MAX_VCPUS {
            return Err(IntrError::BadVcpuCount(n));
        }
        if state.lapics.iter().enumerate().any(|(i, l)| usize::from(l.id()) != i) {
            return Err(IntrError::BadSnapshot("a LAPIC ID differs from its vCPU number"));
        }
        if state.cpu_events.iter().any(|e| match *e {
            CpuEvent::Init { vcpu } | CpuEvent::StartUp { vcpu, .. } => vcpu >= n,
        }) {
            return Err(IntrError::BadSnapshot("a CPU event names a vCPU that does not exist"));
        }
        state.hpet.validate().map_err(IntrError::BadSnapshot)?;
        let mut me = Interrupts {
            lapics: state.lapics,
            ioapic: state.ioapic,
            hpet: state.hpet,
            policy: state.rh_policy,
            cpu_events: state.cpu_events,
        };
        me.lapics.iter_mut().for_each(Lapic::sanitize);
        me.ioapic.sanitize();
        me.hpet.sanitize();
        Ok(me)
    }
}
