//! The interrupt models on running vCPUs: [`IntrSystem`] puts an
//! [`Interrupts`] (or, for a differential against another interrupt
//! controller, only its HPET) behind a lock, and is at once
//!
//! * the [`MmioDevices`] that the machine's nested-fault path emulates
//!   accesses to the LAPIC page (`0xfee00000`), the I/O APIC
//!   (`0xfec00000`) and the HPET (`0xfed00000`) against,
//! * the machine's [`InterruptSource`]: before each entry a vCPU thread
//!   asks for its pending vector, injects it when the guest can take it
//!   (the LAPIC then moves it from IRR to ISR), or asks for an
//!   interrupt-window exit,
//! * the kicker: whenever an interrupt becomes pending for a vCPU other
//!   than the one whose access caused it (an IPI, an I/O APIC or MSI
//!   delivery, a timer), that vCPU is kicked once, so that its loop comes
//!   round to the pending check (a flag per vCPU, cleared by its check,
//!   keeps a storm of deliveries from kicking it more than once),
//! * the host timer: one thread sleeps until the models' next deadline
//!   ([`Interrupts::next_deadline`]: HPET timers, LAPIC timers), ticks
//!   them and kicks whoever got something. Register writes wake it, as
//!   they may move a deadline.
//!
//! Time is nanoseconds since the system was built (a monotonic clock),
//! plus an offset that [`IntrSystem::restore`] sets so that a snapshot's
//! clock continues where it was taken (timers neither restart nor fire
//! early on a migration's target).
//!
//! # Snapshots
//!
//! [`IntrSystem::snapshot`] takes the models' state and their clock
//! ([`IntrSnapshot`]) under the lock, so it is consistent with itself; it
//! is meant for paused vCPUs (a migration's switch-over), as a vCPU
//! running on would change the state right after. [`IntrSystem::restore`]
//! replaces the models with a validated snapshot ([`Interrupts::restore`])
//! and wakes the timer thread for the restored deadlines.
//!
//! # External controllers
//!
//! [`IntrSystem::with_external`] keeps only the HPET model: its pin
//! changes and FSB messages go to an [`IrqLines`] (KVM's in-kernel I/O
//! APIC and LAPICs, through `KVM_IRQ_LINE` and `KVM_SIGNAL_MSI`, in
//! `vmm-kvm`), and only the HPET page is claimed; the LAPIC and I/O APIC
//! pages are the other controller's, and nothing is ever pending here.
//!
//! # Concurrency
//!
//! One lock over the models. vCPU threads take it for an MMIO access and
//! for their pending check, the timer thread for a tick, devices for
//! [`IntrSystem::send_msi`] / [`IntrSystem::set_irq`]. Kicks and
//! [`IrqLines`] calls are made under it (neither calls back).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::hpet::{HPET_PAGE_SIZE, Hpet, HpetEvent};
use super::ioapic::{IOAPIC_PAGE_SIZE, IOAPIC_PINS};
use super::lapic::LAPIC_PAGE_SIZE;
use super::msi::{self, MsiError};
use super::{HPET_BASE, IOAPIC_BASE, Interrupts, InterruptsState, IntrError, LAPIC_BASE};
use crate::hv::Kick;
use crate::machine::{InterruptSource, MmioDevices};

/// Interrupt lines of another interrupt controller (the differential's
/// in-kernel one), driven by the HPET model.
pub trait IrqLines: Send + Sync {
    /// Drives I/O APIC input `pin` to `high`.
    fn set_irq(&self, pin: usize, high: bool);
    /// Sends an MSI (address and data as a device writes them).
    fn send_msi(&self, addr: u64, data: u32);
}

/// Counters of an [`IntrSystem`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemStats {
    /// MMIO reads served.
    pub mmio_reads: u64,
    /// MMIO writes served.
    pub mmio_writes: u64,
    /// Timer-thread ticks that found a deadline reached.
    pub timer_ticks: u64,
    /// Kicks sent to vCPUs that got an interrupt.
    pub kicks: u64,
    /// MSIs sent by devices ([`IntrSystem::send_msi`]) and HPET FSB
    /// messages.
    pub msis: u64,
    /// MSIs refused by the decoder.
    pub msis_refused: u64,
    /// Pin changes driven into an external controller.
    pub line_changes: u64,
    /// Vectors injected (reported by the vCPU loops).
    pub injected: u64,
}

// One of the two lives in each system, behind its lock: the size
// difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Models {
    Ours(Interrupts),
    External { hpet: Hpet, lines: Arc<dyn IrqLines> },
}

struct State {
    models: Models,
    /// vCPU `i` was kicked since its last pending check.
    notified: Vec<bool>,
    stats: SystemStats,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    epoch: Instant,
    /// Added to the time since `epoch` (set by a restore).
    offset_ns: AtomicI64,
    kicks: Mutex<Vec<Arc<dyn Kick>>>,
    stop: AtomicBool,
}

/// An [`IntrSystem`]'s models with the time they were taken at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IntrSnapshot {
    /// The system's clock ([`IntrSystem::now_ns`]) when it was taken.
    pub at_ns: u64,
    /// The models.
    pub state: InterruptsState,
}

/// The interrupt models of a running VM (see the module doc).
pub struct IntrSystem {
    shared: Arc<Shared>,
    ours: bool,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for IntrSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrSystem").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

fn in_range(gpa: u64, base: u64, len: u64) -> bool {
    gpa.checked_sub(base).is_some_and(|o| o < len)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        let t = self.epoch.elapsed().as_nanos() as i128 + i128::from(self.offset_ns.load(Ordering::Acquire));
        u64::try_from(t.max(0)).unwrap_or(u64::MAX)
    }

    /// Kicks every vCPU but `except` that has a pending vector and was not
    /// kicked since its last check.
    fn kick_pending(&self, st: &mut State, except: Option<usize>) {
        let Models::Ours(intr) = &st.models else {
            return;
        };
        let kicks = self.kicks.lock().unwrap_or_else(|e| e.into_inner());
        for j in 0..intr.vcpus() {
            if Some(j) == except || st.notified[j] || intr.pending(j).is_none() {
                continue;
            }
            if let Some(k) = kicks.get(j) {
                st.notified[j] = true;
                st.stats.kicks += 1;
                k.kick();
            }
        }
    }

    fn timer_loop(&self) {
        let mut st = self.lock();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = self.now_ns();
            let deadline = match &st.models {
                Models::Ours(intr) => intr.next_deadline(),
                Models::External { hpet, .. } => hpet.next_deadline(),
            };
            match deadline {
                Some(d) if d <= now => {
                    tick(&mut st, now);
                    st.stats.timer_ticks += 1;
                    self.kick_pending(&mut st, None);
                }
                Some(d) => {
                    let wait = Duration::from_nanos(d - now);
                    st = self.cv.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// Drains the external HPET's events into its lines.
fn drain_external(hpet: &mut Hpet, lines: &dyn IrqLines, stats: &mut SystemStats) {
    for ev in hpet.take_events() {
        match ev {
            HpetEvent::Assert(pin) => {
                lines.set_irq(pin, true);
                stats.line_changes += 1;
            }
            HpetEvent::Deassert(pin) => {
                lines.set_irq(pin, false);
                stats.line_changes += 1;
            }
            HpetEvent::Pulse(pin) => {
                lines.set_irq(pin, true);
                lines.set_irq(pin, false);
                stats.line_changes += 2;
            }
            HpetEvent::Msi { addr, data } => send_external_msi(lines, addr, data, stats),
        }
    }
}

/// Forwards an MSI the decoder accepts (the same refusals as ours).
fn send_external_msi(lines: &dyn IrqLines, addr: u64, data: u32, stats: &mut SystemStats) {
    if msi::decode(addr, data).is_ok() {
        stats.msis += 1;
        lines.send_msi(addr, data);
    } else {
        stats.msis_refused += 1;
    }
}

fn tick(st: &mut State, now: u64) {
    match &mut st.models {
        Models::Ours(intr) => intr.tick(now),
        Models::External { hpet, lines } => {
            hpet.tick(now);
            drain_external(hpet, &**lines, &mut st.stats);
        }
    }
}

impl IntrSystem {
    fn start(models: Models, vcpus: usize) -> Arc<IntrSystem> {
        let ours = matches!(models, Models::Ours(_));
        let shared = Arc::new(Shared {
            state: Mutex::new(State { models, notified: vec![false; vcpus], stats: SystemStats::default() }),
            cv: Condvar::new(),
            epoch: Instant::now(),
            offset_ns: AtomicI64::new(0),
            kicks: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let timer = std::thread::Builder::new().name("intr-timer".into()).spawn(move || s2.timer_loop()).ok();
        Arc::new(IntrSystem { shared, ours, timer: Mutex::new(timer) })
    }

    /// Our LAPICs, I/O APIC and HPET for `vcpus` vCPUs, with the timer
    /// thread running.
    ///
    /// # Errors
    ///
    /// [`IntrError::BadVcpuCount`] as [`Interrupts::new`].
    pub fn new(vcpus: usize) -> Result<Arc<IntrSystem>, IntrError> {
        Ok(Self::start(Models::Ours(Interrupts::new(vcpus)?), vcpus))
    }

    /// Only our HPET (routes to pins 20-23 of a 24-pin I/O APIC), driving
    /// another controller's `lines` (see the module doc).
    pub fn with_external(vcpus: usize, lines: Arc<dyn IrqLines>) -> Arc<IntrSystem> {
        Self::start(Models::External { hpet: Hpet::new(IOAPIC_PINS), lines }, vcpus)
    }

    /// Whether the LAPICs and I/O APIC are ours (not an external
    /// controller's).
    pub fn models_are_ours(&self) -> bool {
        self.ours
    }

    /// Sets the vCPUs' kick handles (index = vCPU), as the machine has
    /// them ([`crate::machine::Machine::kick_handles`]).
    pub fn set_kicks(&self, kicks: &[Arc<dyn Kick>]) {
        *self.shared.kicks.lock().unwrap_or_else(|e| e.into_inner()) = kicks.to_vec();
    }

    /// The models' clock: nanoseconds since the system was built, or
    /// since the clock of the snapshot it was restored from
    /// ([`IntrSystem::restore`]).
    pub fn now_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// A device's MSI: delivered by our models (and the targets kicked), or
    /// sent to the external controller.
    ///
    /// # Errors
    ///
    /// The decoder's [`MsiError`]; nothing is sent then.
    pub fn send_msi(&self, addr: u64, data: u32) -> Result<(), MsiError> {
        let mut st = self.shared.lock();
        let st = &mut *st;
        match &mut st.models {
            Models::Ours(intr) => match intr.send_msi(addr, data) {
                Ok(()) => st.stats.msis += 1,
                Err(e) => {
                    st.stats.msis_refused += 1;
                    return Err(e);
                }
            },
            Models::External { lines, .. } => {
                msi::decode(addr, data).inspect_err(|_| st.stats.msis_refused += 1)?;
                st.stats.msis += 1;
                lines.send_msi(addr, data);
            }
        }
        self.shared.kick_pending(st, None);
        Ok(())
    }

    /// A device drives I/O APIC pin `pin` to `high`.
    pub fn set_irq(&self, pin: usize, high: bool) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        match &mut st.models {
            Models::Ours(intr) => intr.set_irq(pin, high),
            Models::External { lines, .. } => {
                st.stats.line_changes += 1;
                lines.set_irq(pin, high);
            }
        }
        self.shared.kick_pending(st, None);
    }

    /// Calls `f` on our models (`None` for an external controller).
    pub fn with_interrupts<R>(&self, f: impl FnOnce(&Interrupts) -> R) -> Option<R> {
        match &self.shared.lock().models {
            Models::Ours(intr) => Some(f(intr)),
            Models::External { .. } => None,
        }
    }

    /// Our models' state and their clock, taken together under the lock
    /// (see the module doc; `None` for an external controller, whose
    /// state is not ours to take).
    pub fn snapshot(&self) -> Option<IntrSnapshot> {
        let st = self.shared.lock();
        let at_ns = self.shared.now_ns();
        match &st.models {
            Models::Ours(intr) => Some(IntrSnapshot { at_ns, state: intr.snapshot() }),
            Models::External { .. } => None,
        }
    }

    /// Replaces our models with `snap`'s, validated as
    /// [`Interrupts::restore`] does, and sets the clock so that it reads
    /// `snap.at_ns` now and runs on from there. Nothing changes on error.
    ///
    /// # Errors
    ///
    /// [`IntrError::BadVcpuCount`] for a snapshot of another number of
    /// vCPUs than this system's, [`IntrError::BadSnapshot`] for state no
    /// guest could have produced or for a system with an external
    /// controller.
    pub fn restore(&self, snap: IntrSnapshot) -> Result<(), IntrError> {
        let intr = Interrupts::restore(snap.state)?;
        let mut st = self.shared.lock();
        if !matches!(st.models, Models::Ours(_)) {
            return Err(IntrError::BadSnapshot("the system drives an external controller"));
        }
        if intr.vcpus() != st.notified.len() {
            return Err(IntrError::BadVcpuCount(intr.vcpus()));
        }
        let elapsed = self.shared.epoch.elapsed().as_nanos() as i128;
        let off = (i128::from(snap.at_ns) - elapsed).clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        self.shared.offset_ns.store(off as i64, Ordering::Release);
        st.models = Models::Ours(intr);
        st.notified.iter_mut().for_each(|n| *n = false);
        // New deadlines for the timer thread; vCPUs find what is pending
        // at their next entry.
        self.shared.cv.notify_all();
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> SystemStats {
        self.shared.lock().stats
    }

    fn read_u64(&self, vcpu: usize, gpa: u64, size: usize) -> u64 {
        let now = self.now_ns();
        let mut st = self.shared.lock();
        let st = &mut *st;
        st.stats.mmio_reads += 1;
        let v = match &mut st.models {
            Models::Ours(intr) => intr.mmio_read(vcpu, gpa, size, now).unwrap_or(0),
            Models::External { hpet, lines } => {
                let v = if in_range(gpa, HPET_BASE, HPET_PAGE_SIZE) {
                    hpet.mmio_read(gpa - HPET_BASE, size, now)
                } else {
                    0
                };
                drain_external(hpet, &**lines, &mut st.stats);
                v
            }
        };
        // A read may fire a timer (the models catch up on time).
        self.shared.kick_pending(st, Some(vcpu));
        v
    }

    fn write_u64(&self, vcpu: usize, gpa: u64, size: usize, value: u64) {
        let now = self.now_ns();
        let mut st = self.shared.lock();
        let st = &mut *st;
        st.stats.mmio_writes += 1;
        match &mut st.models {
            Models::Ours(intr) => {
                intr.mmio_write(vcpu, gpa, size, value, now);
            }
            Models::External { hpet, lines } => {
                if in_range(gpa, HPET_BASE, HPET_PAGE_SIZE) {
                    hpet.mmio_write(gpa - HPET_BASE, size, value, now);
                }
                drain_external(hpet, &**lines, &mut st.stats);
            }
        }
        self.shared.kick_pending(st, Some(vcpu));
        // The write may have moved a deadline.
        self.shared.cv.notify_all();
    }
}

impl Drop for IntrSystem {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _st = self.shared.lock();
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.timer.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl MmioDevices for IntrSystem {
    fn claims(&self, gpa: u64) -> bool {
        in_range(gpa, HPET_BASE, HPET_PAGE_SIZE)
            || (self.models_are_ours()
                && (in_range(gpa, LAPIC_BASE, LAPIC_PAGE_SIZE) || in_range(gpa, IOAPIC_BASE, IOAPIC_PAGE_SIZE)))
    }

    fn read(&self, vcpu: usize, gpa: u64, data: &mut [u8]) {
        // Accesses wider than 8 bytes (SSE) are two 8-byte halves.
        for (k, chunk) in data.chunks_mut(8).enumerate() {
            let v = self.read_u64(vcpu, gpa.wrapping_add(8 * k as u64), chunk.len());
            let n = chunk.len();
            chunk.copy_from_slice(&v.to_le_bytes()[..n]);
        }
    }

    fn write(&self, vcpu: usize, gpa: u64, data: &[u8]) {
        for (k, chunk) in data.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(vcpu, gpa.wrapping_add(8 * k as u64), chunk.len(), u64::from_le_bytes(b));
        }
    }
}

impl InterruptSource for IntrSystem {
    fn pending(&self, vcpu: usize) -> Option<u8> {
        let mut st = self.shared.lock();
        if let Some(n) = st.notified.get_mut(vcpu) {
            *n = false;
        }
        match &st.models {
            Models::Ours(intr) => intr.pending(vcpu),
            Models::External { .. } => None,
        }
    }

    fn injected(&self, vcpu: usize, vector: u8) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        if let Models::Ours(intr) = &mut st.models
            && intr.ack(vcpu, vector)
        {
            st.stats.injected += 1;
        }
    }
}

/// Several MMIO devices in the machine's one device slot
/// ([`crate::machine::Machine::mmio`]), e.g. the PCI platform and an
/// [`IntrSystem`]: each access goes to the first device that claims its
/// address (the emulator splits accesses at page boundaries, and every
/// device range here is page-aligned, so one access has one claimant).
pub struct MmioChain(pub Vec<Arc<dyn MmioDevices>>);

impl std::fmt::Debug for MmioChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioChain").field("devices", &self.0.len()).finish()
    }
}

impl MmioChain {
    fn find(&self, gpa: u64) -> Option<&dyn MmioDevices> {
        self.0.iter().find(|d| d.claims(gpa)).map(|d| &**d)
    }
}

impl MmioDevices for MmioChain {
    fn claims(&self, gpa: u64) -> bool {
        self.find(gpa).is_some()
    }

    fn read(&self, vcpu: usize, gpa: u64, data: &mut [u8]) {
        match self.find(gpa) {
            Some(d) => d.read(vcpu, gpa, data),
            // Only reached if a device stopped claiming between the check
            // and the access: what nobody decodes reads all ones.
            None => data.fill(0xff),
        }
    }

    fn write(&self, vcpu: usize, gpa: u64, data: &[u8]) {
        if let Some(d) = self.find(gpa) {
            d.write(vcpu, gpa, data);
        }
    }
}
