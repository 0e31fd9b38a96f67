//! vCPU threads over a [`MemBackend`]: the exit loop, nested faults,
//! harvest points, and the kick. Written against the hypervisor interface
//! ([`crate::hv`]), so every backend runs the same loop.
#![allow(unsafe_code)]

use crate::emul::{MemError, MemErrorKind, gpr};
use crate::guest::{self, GuestCode};
use crate::hv::{Exit, FaultError, Kick, MachineError, MemBackend, Regs, Result, Vcpu, VcpuMem};
use crate::runtime;
use nested_pt::Access;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Per-vCPU counters (updated by the vCPU thread, read by anyone).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Nested faults served.
    pub faults: AtomicU64,
    /// Nanoseconds spent in our fault path (from the exit returning to the
    /// next entry), summed over served faults.
    pub fault_host_ns: AtomicU64,
    /// Nanoseconds spent inside `KVM_RUN` calls that ended in a fault exit.
    pub fault_run_ns: AtomicU64,
    /// All exits.
    pub exits: AtomicU64,
    /// Nanoseconds inside `KVM_RUN`, all exits.
    pub run_ns: AtomicU64,
    /// Nanoseconds in our code between one `KVM_RUN` and the next.
    pub host_ns: AtomicU64,
    /// Harvest points reached.
    pub pauses: AtomicU64,
    /// Faults the host did not serve (skipped or fatal).
    pub unserved: AtomicU64,
    /// Data errors the guest reported.
    pub data_errors: AtomicU64,
    /// Flush vectors injected (hardware nested paging).
    pub flushes: AtomicU64,
    /// Exits caused by kicks/signals, and interrupt-window exits (both
    /// are `Exit::Interrupted`).
    pub interrupted: AtomicU64,
    /// Nested faults on a device's range (MMIO exits).
    pub mmio_exits: AtomicU64,
    /// Instructions emulated (a REP string instruction counts once per
    /// exit).
    pub emulated: AtomicU64,
    /// Nanoseconds in instruction fetch, decode and emulation, including
    /// the device models.
    pub emul_ns: AtomicU64,
    /// The general registers as of the vCPU's last exit (for inspection
    /// from another thread while it runs).
    pub last_regs: Mutex<Regs>,
    /// The host CPU the vCPU thread last ran on (`u64::MAX`: unknown).
    pub host_cpu: AtomicU64,
    /// External interrupts from the [`InterruptSource`] injected.
    pub injected: AtomicU64,
    /// Entries made with an interrupt pending that the guest could not
    /// take yet (an interrupt window was requested instead).
    pub window_waits: AtomicU64,
    /// Nanoseconds the vCPU thread slept throttled ([`Control::set_throttle`]).
    pub throttle_ns: AtomicU64,
}

/// The time slice of the vCPU throttle: a throttled vCPU sleeps
/// `THROTTLE_SLICE * pct / (100 - pct)` after each slice it ran (QEMU's
/// `cpu_throttle`, 10 ms).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Where the vCPU loop gets external interrupts from (the interrupt
/// controller models, `crate::intr::system::IntrSystem`): before each
/// entry the loop asks for the vCPU's pending vector and, if the guest can
/// take it, injects it and reports the injection; if it cannot, it asks
/// the backend for an interrupt-window exit. Whoever makes an interrupt
/// pending for a vCPU from another thread kicks that vCPU, so that its
/// loop comes round to this check.
pub trait InterruptSource: Send + Sync {
    /// The vector to inject into `vcpu` now, if any (the highest-priority
    /// deliverable one). Does not change the controller state.
    fn pending(&self, vcpu: usize) -> Option<u8>;
    /// `vector`, returned by [`pending`](Self::pending), was injected into
    /// `vcpu` (the LAPIC moves it from IRR to ISR).
    fn injected(&self, vcpu: usize, vector: u8);
}

/// A nested fault as the vCPU loop saw it.
#[derive(Debug, Clone, Copy)]
pub struct FaultInfo {
    /// CR2: the faulting guest address.
    pub gpa: u64,
    /// The #PF error code pushed by the CPU.
    pub err: u64,
    /// The access, decoded from the error code.
    pub access: Access,
    /// RIP of the faulting instruction.
    pub rip: u64,
}

/// What the loop reports to the handler.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A fault the backend did not serve.
    Unserved(FaultInfo, FaultError),
    /// A report other than a pause, with rax, rdx, rsi, rdi.
    Port(u16, [u64; 4]),
    /// An access to a device's range whose instruction could not be
    /// emulated (unsupported, undecodable, a fault to inject, a failed
    /// access): the bytes and RIP are in the error.
    EmulationFailed(FaultInfo, crate::emul::Error),
}

/// What the handler wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// Resume at this guest address instead of retrying (faults only).
    Skip(u64),
    /// Leave the loop normally.
    Stop,
    /// Leave the loop with an error.
    Fatal(String),
}

#[derive(Debug, Default)]
struct PauseState {
    paused: usize,
    finished: usize,
    epoch: u64,
}

/// The devices behind trapped guest-physical ranges, as the vCPU loop
/// reaches them: a nested fault that no mapping serves, on an address a
/// device claims, is emulated against them.
pub trait MmioDevices: Send + Sync {
    /// Whether `gpa` belongs to a device.
    fn claims(&self, gpa: u64) -> bool;
    /// A read of `data.len()` bytes (1 to 16) at `gpa` by vCPU `vcpu`.
    fn read(&self, vcpu: usize, gpa: u64, data: &mut [u8]);
    /// A write of `data` at `gpa` by vCPU `vcpu`.
    fn write(&self, vcpu: usize, gpa: u64, data: &[u8]);
}

/// Guest memory for the emulator: each page piece goes to RAM through the
/// vCPU's memory port (page holds) or, where nothing is mapped, to a device
/// that claims it.
struct EmulMemory<'a> {
    mem: &'a mut dyn VcpuMem,
    dev: &'a dyn MmioDevices,
    vcpu: usize,
}

impl EmulMemory<'_> {
    /// Splits `[addr, addr+len)` (modulo 2^64) at page boundaries and calls
    /// `f(address, buffer range)` for each piece.
    fn pieces(
        addr: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> std::result::Result<(), MemError>,
    ) -> std::result::Result<(), MemError> {
        let mut done = 0usize;
        while done < len {
            let a = addr.wrapping_add(done as u64);
            let room = (PAGE - a % PAGE) as usize;
            let n = room.min(len - done);
            f(a, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

impl crate::emul::Memory for EmulMemory<'_> {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> std::result::Result<usize, MemError> {
        let n = buf.len().min((PAGE - addr % PAGE) as usize);
        // Code comes from RAM only (a device's range never holds it).
        self.mem.read(addr, &mut buf[..n]).ok_or(MemError { addr, kind: MemErrorKind::Unmapped })?;
        Ok(n)
    }

    fn read(&mut self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), MemError> {
        let (mem, dev, vcpu) = (&mut *self.mem, self.dev, self.vcpu);
        Self::pieces(addr, buf.len(), |a, r| {
            if dev.claims(a) {
                dev.read(vcpu, a, &mut buf[r]);
                Ok(())
            } else if mem.read(a, &mut buf[r]).is_some() {
                Ok(())
            } else {
                Err(MemError { addr: a, kind: MemErrorKind::Unmapped })
            }
        })
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> std::result::Result<(), MemError> {
        let (mem, dev, vcpu) = (&mut *self.mem, self.dev, self.vcpu);
        Self::pieces(addr, data.len(), |a, r| {
            if dev.claims(a) {
                dev.write(vcpu, a, &data[r]);
                Ok(())
            } else if mem.write(a, &data[r]).is_some() {
                Ok(())
            } else {
                Err(MemError { addr: a, kind: MemErrorKind::Unmapped })
            }
        })
    }
}

/// Emulates the instruction that faulted on a device's range. The #PF
/// stub has pushed the user-mode frame (error code, RIP, CS, RFLAGS, RSP,
/// SS) on the kernel stack at `ksp`: the emulator gets the general
/// registers with the user RSP, RIP and RFLAGS from the frame, and the
/// results go back the same way (general registers into the vCPU, RIP,
/// RFLAGS and RSP into the frame, which the stub's `iretq` returns
/// through). Returns the instructions emulated (1).
fn emulate_at(
    v: &mut dyn Vcpu,
    mem: &mut dyn VcpuMem,
    dev: &dyn MmioDevices,
    vcpu: usize,
    ksp: u64,
) -> std::result::Result<u64, crate::emul::Error> {
    // The frame's RIP, CS, RFLAGS and RSP words, through the vCPU's own
    // memory port (page holds: no lookup under the space lock).
    let mut words = [0u8; 32];
    crate::emul::Memory::read(&mut EmulMemory { mem: &mut *mem, dev, vcpu }, ksp + 8, &mut words)
        .map_err(crate::emul::Error::Memory)?;
    let word = |k: usize| u64::from_le_bytes(words[8 * k..8 * k + 8].try_into().expect("8 bytes"));
    let (rip, rflags, ursp) = (word(0), word(2), word(3));
    let hv = v.regs();
    let mut er = crate::emul::Regs { rip, rflags, ..hv };
    er.gpr[gpr::RSP] = ursp;
    let mut em = EmulMemory { mem, dev, vcpu };
    crate::emul::emulate(&mut er, &mut em)?;
    let mut out = hv;
    out.gpr = er.gpr;
    out.gpr[gpr::RSP] = hv.gpr[gpr::RSP];
    v.set_regs(&out);
    words[..8].copy_from_slice(&er.rip.to_le_bytes());
    words[16..24].copy_from_slice(&er.rflags.to_le_bytes());
    words[24..].copy_from_slice(&er.gpr[gpr::RSP].to_le_bytes());
    crate::emul::Memory::write(&mut em, ksp + 8, &words).map_err(crate::emul::Error::Memory)?;
    Ok(1)
}

/// The pending-interrupt check before an entry: injects `src`'s pending
/// vector for vCPU `i` when the guest can take it (and nothing was
/// injected for this entry yet: one event per entry), and requests an
/// interrupt window while something stays pending, so the loop comes back
/// as soon as the guest can take it.
fn inject_pending(
    v: &mut dyn Vcpu,
    src: &dyn InterruptSource,
    i: usize,
    st: &VcpuStats,
    already_injected: bool,
) -> Result<()> {
    let Some(vector) = src.pending(i) else {
        v.request_interrupt_window(false);
        return Ok(());
    };
    if !already_injected && v.interrupt_ready() && v.inject_interrupt(vector).map_err(MachineError::Backend)? {
        src.injected(i, vector);
        st.injected.fetch_add(1, Ordering::Relaxed);
        v.request_interrupt_window(src.pending(i).is_some());
        return Ok(());
    }
    st.window_waits.fetch_add(1, Ordering::Relaxed);
    v.request_interrupt_window(true);
    Ok(())
}

/// The host CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set we own, for indices below its size.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Pins the calling thread to host CPU `cpu`.
fn pin_thread(cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(MachineError::Setup(format!("CPU {cpu} does not exist")));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it
    // (cpu < CPU_SETSIZE, checked above).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(MachineError::Setup(format!(
            "cannot pin a vCPU thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Coordination between the vCPU threads and the controlling thread.
#[derive(Debug, Default)]
pub struct Control {
    state: Mutex<PauseState>,
    cv: Condvar,
    stop: AtomicBool,
    throttle: AtomicU8,
}

impl Control {
    /// Throttle the vCPUs to run at most `100 - pct` percent of the time
    /// (`pct` clamped to 0..=99; 0 lifts it): after each
    /// [`THROTTLE_SLICE`] a vCPU ran, its thread sleeps
    /// `THROTTLE_SLICE * pct / (100 - pct)` (cut short by a stop, a pause
    /// request or the throttle's lifting). The vCPUs only notice at an
    /// exit: whoever sets a throttle kicks them every slice (live
    /// migration's auto-converge does). A new run starts unthrottled.
    pub fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct.min(99), Ordering::SeqCst);
    }

    /// The throttle in force (percent).
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    fn arrive_paused(&self) {
        let mut s = self.state.lock().expect("pause lock");
        s.paused += 1;
        let e = s.epoch;
        self.cv.notify_all();
        while s.epoch == e && !self.stop.load(Ordering::SeqCst) {
            s = self.cv.wait(s).expect("pause wait");
        }
    }

    fn arrive_finished(&self) {
        let mut s = self.state.lock().expect("pause lock");
        s.finished += 1;
        self.cv.notify_all();
    }

    /// Waits until every vCPU that has not finished is paused; returns the
    /// number finished. Gives up after `timeout`.
    pub fn wait_all_paused(&self, n: usize, timeout: Duration) -> Result<usize> {
        let t = Instant::now();
        let mut s = self.state.lock().expect("pause lock");
        while s.paused + s.finished < n {
            let left = timeout
                .checked_sub(t.elapsed())
                .ok_or_else(|| MachineError::Guest("vCPUs did not reach the harvest point in time".into()))?;
            s = self.cv.wait_timeout(s, left).expect("pause wait").0;
        }
        Ok(s.finished)
    }

    /// Releases every paused vCPU.
    pub fn resume_all(&self) {
        let mut s = self.state.lock().expect("pause lock");
        s.paused = 0;
        s.epoch += 1;
        self.cv.notify_all();
    }

    /// Number of vCPUs that finished.
    pub fn finished(&self) -> usize {
        self.state.lock().expect("pause lock").finished
    }

    /// Asks every vCPU thread to leave (after its current exit).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _s = self.state.lock().expect("pause lock");
        self.cv.notify_all();
    }
}

/// A VM with its vCPUs and runtime, ready to run workloads.
pub struct Machine {
    /// The address space.
    pub backend: Arc<dyn MemBackend>,
    /// Inject the CR3-reload vector when the table generation changed
    /// since the vCPU last flushed (hosts whose vCPUs cache our tables in
    /// their TLB: hardware nested paging; also forced on other hosts to
    /// exercise the path).
    pub flush: bool,
    /// The guest code offsets.
    pub code: GuestCode,
    /// Where the boot ROM (and so the guest code) is mapped.
    pub rom_base: u64,
    /// The vCPUs while no run holds them (a mutex only to make the machine
    /// `Sync`: each vCPU is owned by one thread while it runs).
    vcpus: Mutex<Vec<Box<dyn Vcpu>>>,
    /// Per-vCPU counters.
    pub stats: Vec<VcpuStats>,
    /// Pause/stop coordination.
    pub control: Control,
    /// The devices trapped accesses are emulated against (none: every
    /// access outside a mapping is a guest error).
    pub mmio: Option<Arc<dyn MmioDevices>>,
    /// Host CPUs the vCPU threads are pinned to: vCPU `i` runs on
    /// `pin[i % pin.len()]` (bhyve's cpuset pinning); empty: not pinned.
    pub pin: Vec<usize>,
    /// Where external interrupts come from (none: only the flush vector
    /// is ever injected).
    pub irq: Option<Arc<dyn InterruptSource>>,
    kicks: Vec<Arc<dyn Kick>>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("vcpus", &self.stats.len()).field("flush", &self.flush).finish()
    }
}

/// Reads a u64 at guest address `gpa` through the backend.
pub fn read_guest_u64(b: &dyn MemBackend, gpa: u64) -> Option<u64> {
    let p = b.host_ptr(gpa)?;
    // SAFETY: host_ptr points into live guest memory; an aligned atomic
    // load is the sound way to read memory the guest may be writing.
    Some(unsafe { &*(p as *const AtomicU64) }.load(Ordering::SeqCst))
}

/// Writes a u64 at guest address `gpa` through the backend.
pub fn write_guest_u64(b: &dyn MemBackend, gpa: u64, v: u64) -> Option<()> {
    let p = b.host_ptr(gpa)?;
    // SAFETY: as for read_guest_u64.
    unsafe { &*(p as *const AtomicU64) }.store(v, Ordering::SeqCst);
    Some(())
}

/// Reads `out.len()` u64 words from guest address `gpa` through the
/// backend, all inside one page (`gpa` 8-byte aligned). `None` when the
/// page is not resident or the words would cross the page's end.
pub fn read_guest_words(b: &dyn MemBackend, gpa: u64, out: &mut [u64]) -> Option<()> {
    let in_page = gpa % 4096;
    let bytes = (out.len() as u64).checked_mul(8)?;
    if !gpa.is_multiple_of(8) || bytes > 4096 - in_page {
        return None;
    }
    let p = b.host_ptr(gpa)? as *const AtomicU64;
    for (w, o) in out.iter_mut().enumerate() {
        // SAFETY: `p` is the host address of `gpa` in a resident page and
        // the `out.len()` aligned words from it lie inside that page
        // (checked above); an atomic load is the sound way to read memory
        // the guest may be writing.
        *o = unsafe { &*p.add(w) }.load(Ordering::Relaxed);
    }
    Some(())
}

impl Machine {
    /// The guest address of code offset `off` (an offset in [`GuestCode`]).
    pub fn code_addr(&self, off: u64) -> u64 {
        self.rom_base + runtime::CODE_OFF + off
    }

    /// A machine of `vcpus` (index `i` at position `i`, each set up in long
    /// mode with [`runtime::long_mode_setup`]) over `backend`, whose runtime
    /// (see [`runtime`]) must already be mapped and resident.
    pub fn new(backend: Arc<dyn MemBackend>, vcpus: Vec<Box<dyn Vcpu>>, flush: bool) -> Self {
        let code = guest::code();
        let kicks = vcpus.iter().map(|v| v.kick_handle()).collect();
        let stats = (0..vcpus.len()).map(|_| VcpuStats::default()).collect();
        let rom_base = backend.rom_base();
        Machine {
            backend,
            flush,
            code,
            rom_base,
            vcpus: Mutex::new(vcpus),
            stats,
            control: Control::default(),
            mmio: None,
            pin: Vec::new(),
            irq: None,
            kicks,
        }
    }

    /// Number of vCPUs.
    pub fn nvcpus(&self) -> usize {
        self.stats.len()
    }

    /// Kick handles (index = vCPU).
    pub fn kick_handles(&self) -> &[Arc<dyn Kick>] {
        &self.kicks
    }

    /// Writes parameter `off` of vCPU `i`.
    pub fn set_param(&self, i: usize, off: u64, v: u64) -> Result<()> {
        write_guest_u64(&*self.backend, runtime::params(i) + off, v)
            .ok_or_else(|| MachineError::Setup("parameter block not resident".into()))
    }

    /// Sets vCPU `i` up to run the probe workload over `probes` (its mode,
    /// count and typed entries, [`crate::guest::ProbeOp`]). Refused when
    /// there are more than [`crate::guest::MAX_PROBES`].
    pub fn load_probes(&self, i: usize, probes: &[crate::guest::ProbeOp]) -> Result<()> {
        if probes.len() > crate::guest::MAX_PROBES {
            return Err(MachineError::Setup(format!("{} probes, at most {}", probes.len(), crate::guest::MAX_PROBES)));
        }
        self.set_param(i, crate::guest::P_MODE, crate::workload::Mode::Probe as u64)?;
        self.set_param(i, crate::guest::P_PROBE_COUNT, probes.len() as u64)?;
        for (k, p) in probes.iter().enumerate() {
            for (off, v) in p.encode(k).into_iter().flatten() {
                self.set_param(i, off, v)?;
            }
        }
        Ok(())
    }

    /// The value read probe `k` of vCPU `i` returned (meaningful once the
    /// guest reported that step).
    pub fn probe_value(&self, i: usize, k: usize) -> Option<u64> {
        crate::guest::probe_value_offset(k).map(|off| self.param(i, off))
    }

    /// Reads parameter `off` of vCPU `i`.
    pub fn param(&self, i: usize, off: u64) -> u64 {
        read_guest_u64(&*self.backend, runtime::params(i) + off).unwrap_or(0)
    }

    /// Runs every vCPU on its own thread until each leaves its loop, while
    /// `coordinator` runs on the calling thread. `handler(vcpu, event)`
    /// decides about unserved faults and workload ports. The first fatal
    /// error (of a vCPU or the coordinator) is returned, in the
    /// coordinator's error type.
    pub fn run<H, C, T, E>(&mut self, handler: H, coordinator: C) -> std::result::Result<T, E>
    where
        H: Fn(usize, Event) -> Action + Sync,
        C: FnOnce(&Machine) -> std::result::Result<T, E>,
        E: From<MachineError>,
    {
        self.control = Control::default();
        let mut vcpus = std::mem::take(self.vcpus.get_mut().unwrap_or_else(|e| e.into_inner()));
        let this: &Machine = self;
        let res = std::thread::scope(|s| {
            let mut joins = Vec::new();
            for v in vcpus.iter_mut() {
                let h = &handler;
                joins.push(s.spawn(move || {
                    let r = this.vcpu_loop(&mut **v, h);
                    this.control.arrive_finished();
                    if r.is_err() {
                        this.control.request_stop();
                        for k in &this.kicks {
                            k.kick();
                        }
                    }
                    r
                }));
            }
            let c = coordinator(this);
            if c.is_err() {
                this.control.request_stop();
                for k in &this.kicks {
                    k.kick();
                }
            }
            let mut first_err = None;
            for j in joins {
                match j.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(MachineError::Guest("vCPU thread panicked".into()));
                    }
                }
            }
            match (c, first_err) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(e)) => Err(E::from(e)),
                (Ok(t), None) => Ok(t),
            }
        });
        *self.vcpus.get_mut().unwrap_or_else(|e| e.into_inner()) = vcpus;
        res
    }

    fn vcpu_loop(&self, v: &mut dyn Vcpu, handler: &(dyn Fn(usize, Event) -> Action + Sync)) -> Result<()> {
        let i = v.index() as usize;
        if !self.pin.is_empty() {
            pin_thread(self.pin[i % self.pin.len()])?;
        }
        v.bind_thread();
        let r = self.vcpu_loop_inner(v, i, handler);
        v.unbind_thread();
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        self.stats[i].host_cpu.store(u64::try_from(cpu).unwrap_or(u64::MAX), Ordering::Relaxed);
        r
    }

    fn vcpu_loop_inner(
        &self,
        v: &mut dyn Vcpu,
        i: usize,
        handler: &(dyn Fn(usize, Event) -> Action + Sync),
    ) -> Result<()> {
        let st = &self.stats[i];
        let b = &*self.backend;
        let mut mem = b.vcpu_mem(i, self.kicks[i].clone())?;
        let flush = self.flush;
        let irq = self.irq.as_deref();
        let mut flushed_gen = 0u64;
        let mut pending_fault: Option<Instant> = None;
        let mut last_exit: Option<Instant> = None;
        let mut slice_start = Instant::now();
        loop {
            if self.control.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let pct = self.control.throttle();
            if pct > 0 && slice_start.elapsed() >= THROTTLE_SLICE {
                self.throttle_sleep(i, pct);
                slice_start = Instant::now();
            }
            let mut t0 = Instant::now();
            let exit = mem.entered(&mut |g| {
                let mut injected = false;
                if flush && g != flushed_gen {
                    if v.inject_interrupt(guest::FLUSH_VECTOR).map_err(MachineError::Backend)? {
                        st.flushes.fetch_add(1, Ordering::Relaxed);
                        injected = true;
                    }
                    flushed_gen = g;
                }
                if let Some(src) = irq {
                    inject_pending(v, src, i, st, injected)?;
                }
                t0 = Instant::now();
                v.run().map_err(MachineError::Backend)
            });
            let t1 = Instant::now();
            st.run_ns.fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
            if let Some(te) = last_exit.replace(t1) {
                st.host_ns.fetch_add((t0 - te).as_nanos() as u64, Ordering::Relaxed);
            }
            if let Some(tf) = pending_fault.take() {
                st.fault_host_ns.fetch_add((t0 - tf).as_nanos() as u64, Ordering::Relaxed);
            }
            st.exits.fetch_add(1, Ordering::Relaxed);
            let exit = exit?;
            *st.last_regs.lock().unwrap_or_else(|e| e.into_inner()) = v.regs();
            match exit {
                Exit::Out(guest::PORT_FAULT) => {
                    st.fault_run_ns.fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
                    let gpa = v.cr2();
                    let rsp = v.regs().gpr[gpr::RSP];
                    let err = read_guest_u64(b, rsp)
                        .ok_or_else(|| MachineError::Guest("kernel stack not resident".into()))?;
                    let rip = read_guest_u64(b, rsp + 8).unwrap_or(0);
                    let access = if err & 0x10 != 0 {
                        Access::Execute
                    } else if err & 0x2 != 0 {
                        Access::Write
                    } else {
                        Access::Read
                    };
                    let info = FaultInfo { gpa, err, access, rip };
                    let bell = runtime::doorbell(i);
                    if (bell..bell + PAGE).contains(&gpa) {
                        // A doorbell: report `gpa - bell`, resume after it.
                        write_guest_u64(b, rsp + 8, rip + guest::DOORBELL_INSN_LEN)
                            .ok_or_else(|| MachineError::Guest("kernel stack not resident".into()))?;
                        let port = (gpa - bell) as u16;
                        if port == guest::PORT_PAUSE {
                            st.pauses.fetch_add(1, Ordering::Relaxed);
                            self.control.arrive_paused();
                            continue;
                        }
                        let r = v.regs();
                        match handler(
                            i,
                            Event::Port(port, [r.gpr[gpr::RAX], r.gpr[gpr::RDX], r.gpr[gpr::RSI], r.gpr[gpr::RDI]]),
                        ) {
                            Action::Continue | Action::Skip(_) => {}
                            Action::Stop => return Ok(()),
                            Action::Fatal(m) => return Err(MachineError::Guest(m)),
                        }
                        continue;
                    }
                    let served = mem.fault(gpa, access);
                    if served == Err(FaultError::NoMapping)
                        && let Some(dev) = self.mmio.as_deref()
                        && dev.claims(gpa)
                    {
                        // An access to a device: emulate the instruction.
                        st.mmio_exits.fetch_add(1, Ordering::Relaxed);
                        let te = Instant::now();
                        let r = emulate_at(v, &mut *mem, dev, i, rsp);
                        st.emul_ns.fetch_add(te.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        match r {
                            Ok(n) => {
                                st.emulated.fetch_add(n, Ordering::Relaxed);
                                continue;
                            }
                            Err(e) => match handler(i, Event::EmulationFailed(info, e)) {
                                Action::Continue | Action::Skip(_) => continue,
                                Action::Stop => return Ok(()),
                                Action::Fatal(m) => return Err(MachineError::Guest(m)),
                            },
                        }
                    }
                    match served {
                        Ok(()) => {
                            st.faults.fetch_add(1, Ordering::Relaxed);
                            pending_fault = Some(t1);
                        }
                        Err(e) => {
                            st.unserved.fetch_add(1, Ordering::Relaxed);
                            match handler(i, Event::Unserved(info, e)) {
                                Action::Continue => {}
                                Action::Skip(new_rip) => {
                                    write_guest_u64(b, rsp + 8, new_rip)
                                        .ok_or_else(|| MachineError::Guest("kernel stack not resident".into()))?;
                                }
                                Action::Stop => return Ok(()),
                                Action::Fatal(m) => return Err(MachineError::Guest(m)),
                            }
                        }
                    }
                }
                Exit::Out(p) if p >= guest::PORT_EXCEPTION_BASE => {
                    let rsp = v.regs().gpr[gpr::RSP];
                    let vec = p - guest::PORT_EXCEPTION_BASE;
                    let has_err = matches!(vec, 8 | 10..=14 | 17 | 21 | 29 | 30);
                    let rip = read_guest_u64(b, rsp + if has_err { 8 } else { 0 }).unwrap_or(0);
                    return Err(MachineError::Guest(format!(
                        "vCPU {i}: unexpected exception {vec} at rip {rip:#x} (cr2 {:#x})",
                        v.cr2()
                    )));
                }
                Exit::Out(p) => {
                    let r = v.regs();
                    match handler(
                        i,
                        Event::Port(p, [r.gpr[gpr::RAX], r.gpr[gpr::RDX], r.gpr[gpr::RSI], r.gpr[gpr::RDI]]),
                    ) {
                        Action::Continue | Action::Skip(_) => {}
                        Action::Stop => return Ok(()),
                        Action::Fatal(m) => return Err(MachineError::Guest(m)),
                    }
                }
                Exit::Interrupted => {
                    st.interrupted.fetch_add(1, Ordering::Relaxed);
                }
                Exit::Shutdown => {
                    let r = v.regs();
                    return Err(MachineError::Guest(format!("vCPU {i}: triple fault (rip {:#x})", r.rip)));
                }
                Exit::Halt => return Err(MachineError::Guest(format!("vCPU {i}: halted"))),
                Exit::Other(what, x) => {
                    let rip = v.regs().rip;
                    return Err(MachineError::Guest(format!("vCPU {i}: {what} ({x:#x}) at rip {rip:#x}")));
                }
            }
        }
    }

    /// The throttle's sleep of vCPU `i` after a slice (see
    /// [`Control::set_throttle`]), in steps of at most a millisecond so
    /// that a stop, a pause request (its parameter block's control word)
    /// or a lifted throttle ends it early.
    fn throttle_sleep(&self, i: usize, pct: u8) {
        let pct = u32::from(pct.min(99));
        let total = THROTTLE_SLICE * pct / (100 - pct);
        let t0 = Instant::now();
        loop {
            let el = t0.elapsed();
            if el >= total
                || self.control.stop.load(Ordering::SeqCst)
                || self.control.throttle() == 0
                || self.param(i, guest::P_CTRL) != 0
            {
                break;
            }
            std::thread::sleep((total - el).min(Duration::from_millis(1)));
        }
        self.stats[i].throttle_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Asks every vCPU to stop at its next harvest point and waits until all
    /// are paused (or finished). Returns the number finished.
    pub fn pause_all(&self, timeout: Duration) -> Result<usize> {
        for i in 0..self.nvcpus() {
            self.set_param(i, guest::P_CTRL, 1)?;
        }
        self.control.wait_all_paused(self.nvcpus(), timeout)
    }

    /// Resumes vCPUs paused by [`pause_all`](Self::pause_all).
    pub fn resume_all(&self) -> Result<()> {
        for i in 0..self.nvcpus() {
            self.set_param(i, guest::P_CTRL, 0)?;
        }
        self.control.resume_all();
        Ok(())
    }

    /// Total kicks sent.
    pub fn kicks(&self) -> u64 {
        self.kicks.iter().map(|k| k.kicks()).sum()
    }

    /// Pages per vCPU ledger.
    pub fn ledger_page_bytes(npages: u64) -> u64 {
        runtime::ledger_bytes(npages)
    }

    /// Sum of a counter over vCPUs.
    pub fn total(&self, f: impl Fn(&VcpuStats) -> &AtomicU64) -> u64 {
        self.stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }
}

/// Bytes in a page.
const PAGE: u64 = 4096;

/// Size helper: bytes of `n` pages.
pub fn pages(n: u64) -> u64 {
    n * PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU that records injections and window requests.
    #[derive(Default)]
    struct FakeVcpu {
        ready: bool,
        refuse: bool,
        injected: Vec<u8>,
        window: Option<bool>,
    }

    struct NoKick;
    impl Kick for NoKick {
        fn kick(&self) {}
        fn kicks(&self) -> u64 {
            0
        }
    }

    impl Vcpu for FakeVcpu {
        fn index(&self) -> u32 {
            0
        }
        fn kick_handle(&self) -> Arc<dyn Kick> {
            Arc::new(NoKick)
        }
        fn bind_thread(&self) {}
        fn unbind_thread(&self) {}
        fn run(&mut self) -> std::result::Result<Exit, crate::hv::BackendError> {
            Ok(Exit::Interrupted)
        }
        fn regs(&mut self) -> Regs {
            Regs::default()
        }
        fn set_regs(&mut self, _regs: &Regs) {}
        fn cr2(&mut self) -> u64 {
            0
        }
        fn inject_interrupt(&mut self, vector: u8) -> std::result::Result<bool, crate::hv::BackendError> {
            if self.refuse {
                return Ok(false);
            }
            self.injected.push(vector);
            Ok(true)
        }
        fn interrupt_ready(&mut self) -> bool {
            self.ready
        }
        fn request_interrupt_window(&mut self, on: bool) {
            self.window = Some(on);
        }
    }

    /// A source with a queue of vectors (highest first) per call.
    #[derive(Default)]
    struct Queue {
        vectors: Mutex<Vec<u8>>,
        acked: Mutex<Vec<u8>>,
    }

    impl InterruptSource for Queue {
        fn pending(&self, _vcpu: usize) -> Option<u8> {
            self.vectors.lock().expect("queue").last().copied()
        }
        fn injected(&self, _vcpu: usize, vector: u8) {
            let mut q = self.vectors.lock().expect("queue");
            assert_eq!(q.pop(), Some(vector));
            self.acked.lock().expect("acked").push(vector);
        }
    }

    fn queue(v: &[u8]) -> Queue {
        Queue { vectors: Mutex::new(v.to_vec()), acked: Mutex::new(Vec::new()) }
    }

    #[test]
    fn nothing_pending_clears_the_window_request() {
        let (mut v, q, st) =
            (FakeVcpu { ready: true, window: Some(true), ..Default::default() }, queue(&[]), VcpuStats::default());
        inject_pending(&mut v, &q, 0, &st, false).expect("check");
        assert_eq!((v.injected.len(), v.window), (0, Some(false)));
        assert_eq!(st.injected.load(Ordering::Relaxed) + st.window_waits.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_ready_guest_gets_the_vector_and_the_source_hears_of_it() {
        let (mut v, q, st) = (FakeVcpu { ready: true, ..Default::default() }, queue(&[0x41]), VcpuStats::default());
        inject_pending(&mut v, &q, 0, &st, false).expect("check");
        assert_eq!(v.injected, [0x41]);
        assert_eq!(*q.acked.lock().unwrap(), [0x41]);
        assert_eq!(v.window, Some(false), "nothing left: no window");
        assert_eq!(st.injected.load(Ordering::Relaxed), 1);
        // Two pending: one injected, a window asked for the other.
        let q = queue(&[0x41, 0x51]);
        inject_pending(&mut v, &q, 0, &st, false).expect("check");
        assert_eq!(v.injected, [0x41, 0x51]);
        assert_eq!(v.window, Some(true));
    }

    #[test]
    fn a_guest_that_cannot_take_it_gets_a_window_and_the_vector_stays_pending() {
        let st = VcpuStats::default();
        // IF clear (in a CPL 0 stub).
        let (mut v, q) = (FakeVcpu::default(), queue(&[0x41]));
        inject_pending(&mut v, &q, 0, &st, false).expect("check");
        assert!(v.injected.is_empty() && q.acked.lock().unwrap().is_empty());
        assert_eq!(v.window, Some(true));
        // Ready, but another event (the flush vector) was injected for this
        // entry: one event per entry.
        let mut v = FakeVcpu { ready: true, ..Default::default() };
        inject_pending(&mut v, &q, 0, &st, true).expect("check");
        assert!(v.injected.is_empty() && q.acked.lock().unwrap().is_empty());
        assert_eq!(v.window, Some(true));
        // The backend refuses it: not acknowledged, retried at the window.
        let mut v = FakeVcpu { ready: true, refuse: true, ..Default::default() };
        inject_pending(&mut v, &q, 0, &st, false).expect("check");
        assert!(q.acked.lock().unwrap().is_empty());
        assert_eq!(v.window, Some(true));
        assert_eq!(st.window_waits.load(Ordering::Relaxed), 3);
        assert_eq!(st.injected.load(Ordering::Relaxed), 0);
        assert_eq!(q.pending(0), Some(0x41));
    }
}
