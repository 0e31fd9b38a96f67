//! Measurements for `vmm bench`: exit round trip, nested-fault cost and the
//! share of it spent in our code, KVM's own first-touch cost, harvest and
//! invalidation costs. Programs, not tests: the numbers are reported, never
//! asserted.

use crate::guest::{self, P_CTRL, P_LEDGER, P_MAGIC, P_MODE, P_NPAGES, P_OPS, P_WATCH_READS};
use crate::machine::{Action, Event, Machine};
use crate::mem::PAGE;
use crate::runtime;
use crate::space::SpaceBackend;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use crate::workload::Mode;
use nested_pt::Prot;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The exit round trip: a doorbell read at CPL 3 (#PF, the three-instruction
/// stub, `out`, back to user space, and all the way back) with no work.
#[derive(Debug, Clone)]
pub struct RoundTrip {
    /// Exits measured.
    pub exits: u64,
    /// Time they took.
    pub elapsed: Duration,
    /// Of which inside `KVM_RUN` (guest, KVM, the exception delivery).
    pub in_kvm_run: Duration,
    /// Of which in our code (from `KVM_RUN` returning to the next call).
    pub in_our_code: Duration,
}

impl RoundTrip {
    /// Mean time per exit.
    pub fn per_exit(&self) -> Duration {
        self.elapsed / self.exits.max(1) as u32
    }
}

fn one_vcpu(mem: u64, fault_around: u32, mode: PagingMode, prefault: bool) -> Result<(Arc<SpaceBackend>, Machine)> {
    let vm = Arc::new(KvmVm::new()?);
    let npages = mem / PAGE;
    let be = Arc::new(SpaceBackend::with_fault_around(
        vm.clone(),
        mem + (4 << 20),
        mem / 256 + (4 << 20),
        mode,
        fault_around,
    )?);
    if mem > 0 {
        let ram = be.ram_segment(mem)?;
        if prefault {
            // Make the host allocate every page now (through the host view),
            // so the first guest touch measures faults, not host allocation.
            for off in (0..mem).step_by(PAGE as usize) {
                let p = be.object_ptr(&ram.object, off).ok_or_else(|| KvmError::Setup("prefault".into()))?;
                // SAFETY: a resident page of our own object; no vCPU runs yet.
                unsafe { (p as *mut u64).write_volatile(0) };
            }
        }
        be.map(&ram, 0, mem, Prot::READ | Prot::WRITE)?;
    }
    be.map_runtime(1, npages.max(1))?;
    let m = crate::machine::create(&vm, be.clone(), mode, 1)?;
    Ok((be, m))
}

fn wait_param(m: &Machine, off: u64, at_least: u64, limit: Duration) -> Result<Instant> {
    let t = Instant::now();
    loop {
        if m.param(0, off) >= at_least {
            return Ok(Instant::now());
        }
        if t.elapsed() > limit || m.control.finished() > 0 {
            return Err(KvmError::Guest("benchmark workload stalled".into()));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn stop(m: &Machine) -> Result<()> {
    m.set_param(0, P_CTRL, 2)?;
    m.control.wait_all_paused(1, Duration::from_secs(30))?;
    Ok(())
}

fn handler(i: usize, ev: Event) -> Action {
    match ev {
        Event::Port(guest::PORT_PING, _) => Action::Continue,
        Event::Port(guest::PORT_DONE, _) => Action::Stop,
        other => Action::Fatal(format!("vCPU {i}: unexpected {other:?}")),
    }
}

/// Measures the exit round trip for about `duration`.
pub fn exit_round_trip(duration: Duration, mode: PagingMode) -> Result<RoundTrip> {
    let (_be, mut m) = one_vcpu(0, 1, mode, false)?;
    m.set_param(0, P_MODE, Mode::Ping as u64)?;
    m.run(handler, |m| {
        wait_param(m, P_WATCH_READS, 100, Duration::from_secs(10))?;
        let st = &m.stats[0];
        let snap = || (st.run_ns.load(Ordering::Relaxed), st.host_ns.load(Ordering::Relaxed));
        let (n0, t0, (r0, h0)) = (m.param(0, P_WATCH_READS), Instant::now(), snap());
        std::thread::sleep(duration);
        let (n1, t1, (r1, h1)) = (m.param(0, P_WATCH_READS), Instant::now(), snap());
        stop(m)?;
        Ok(RoundTrip {
            exits: n1 - n0,
            elapsed: t1 - t0,
            in_kvm_run: Duration::from_nanos(r1 - r0),
            in_our_code: Duration::from_nanos(h1 - h0),
        })
    })
}

/// First touch of fresh memory through nested faults, then again after a
/// full shadow zap (KVM serves every fault itself), then warm.
#[derive(Debug, Clone)]
pub struct FirstTouch {
    /// Pages touched per pass.
    pub pages: u64,
    /// Fault-around window.
    pub fault_around: u32,
    /// The host allocated the memory before the first pass.
    pub prefault: bool,
    /// Nested faults served in the first pass.
    pub faults: u64,
    /// First pass (our nested faults).
    pub first_pass: Duration,
    /// Our code's time over the first pass's faults.
    pub ours: Duration,
    /// Time inside `KVM_RUN` for the runs that ended in those faults.
    pub in_kvm_run: Duration,
    /// Second pass after a zap of every shadow page (KVM-served faults only;
    /// `None` on a hardware-nested host, where no zap is needed).
    pub kvm_pass: Option<Duration>,
    /// Third pass, everything mapped.
    pub warm_pass: Duration,
}

impl FirstTouch {
    /// Nested faults per second in the first pass.
    pub fn faults_per_sec(&self) -> f64 {
        self.faults as f64 / self.first_pass.as_secs_f64()
    }
    /// Our code per fault.
    pub fn ours_per_fault(&self) -> Duration {
        self.ours / self.faults.max(1) as u32
    }
    /// Wall time per fault, as the guest sees it (first pass less the warm pass).
    pub fn per_fault(&self) -> Duration {
        self.first_pass.saturating_sub(self.warm_pass) / self.faults.max(1) as u32
    }
    /// Share of each fault's time spent in our code.
    pub fn our_share(&self) -> f64 {
        self.ours_per_fault().as_secs_f64() / self.per_fault().as_secs_f64().max(1e-12)
    }
}

/// Runs the first-touch benchmark over `mem` bytes with one vCPU; with
/// `prefault`, the host allocates the memory before the guest touches it.
pub fn first_touch(mem: u64, fault_around: u32, mode: PagingMode, prefault: bool) -> Result<FirstTouch> {
    let (be, mut m) = one_vcpu(mem, fault_around, mode, prefault)?;
    let n = mem / PAGE;
    m.set_param(0, P_MODE, Mode::Touch as u64)?;
    m.set_param(0, P_NPAGES, n)?;
    m.set_param(0, P_MAGIC, 0x7ac4)?;
    m.set_param(0, P_LEDGER, runtime::ledger(0, n))?;
    let h = |i: usize, ev: Event| handler(i, ev);
    m.run(h, |m| {
        let start = Instant::now();
        let t1 = wait_param(m, P_OPS, n, Duration::from_secs(60))?;
        m.pause_all(Duration::from_secs(10))?;
        let st = &m.stats[0];
        let faults = st.faults.load(Ordering::Relaxed);
        let ours = Duration::from_nanos(st.fault_host_ns.load(Ordering::Relaxed));
        let in_kvm_run = Duration::from_nanos(st.fault_run_ns.load(Ordering::Relaxed));
        let shadow = mode == PagingMode::Shadow;
        if shadow {
            be.vm().zap_all()?;
        }
        let t2s = Instant::now();
        m.resume_all()?;
        let t2 = wait_param(m, P_OPS, 2 * n, Duration::from_secs(60))?;
        let t3s = Instant::now();
        let t3 = wait_param(m, P_OPS, 3 * n, Duration::from_secs(60))?;
        stop(m)?;
        let _ = &be;
        Ok(FirstTouch {
            pages: n,
            fault_around,
            prefault,
            faults,
            first_pass: t1 - start,
            ours,
            in_kvm_run,
            kvm_pass: shadow.then_some(t2 - t2s),
            warm_pass: t3 - t3s,
        })
    })
}

/// MMIO emulation under load: a guest loop of `mov eax, [moffs]` reading a
/// device register, each read a nested fault that is emulated.
#[derive(Debug, Clone)]
pub struct MmioBench {
    /// MMIO exits measured.
    pub exits: u64,
    /// Wall time they took.
    pub elapsed: Duration,
    /// Time in our fetch + decode + emulate + device model over them.
    pub emulate: Duration,
    /// Time inside `KVM_RUN` over them.
    pub in_kvm_run: Duration,
    /// Time in all of our code between `KVM_RUN`s over them (the fault
    /// path's lookup, the emulation, the bookkeeping).
    pub in_our_code: Duration,
}

impl MmioBench {
    /// MMIO exits per second.
    pub fn per_sec(&self) -> f64 {
        self.exits as f64 / self.elapsed.as_secs_f64()
    }
    /// Wall time per MMIO exit (the whole round trip).
    pub fn per_exit(&self) -> Duration {
        self.elapsed / self.exits.max(1) as u32
    }
    /// Our fetch + decode + emulate per exit.
    pub fn emulate_per_exit(&self) -> Duration {
        self.emulate / self.exits.max(1) as u32
    }
    /// Our emulation's share of the exit round trip.
    pub fn our_share(&self) -> f64 {
        self.emulate.as_secs_f64() / self.elapsed.as_secs_f64()
    }
}

/// A device register that reads a constant.
struct Register;

impl crate::machine::MmioDevices for Register {
    fn claims(&self, gpa: u64) -> bool {
        gpa & !(PAGE - 1) == MMIO_REG
    }
    fn read(&self, _vcpu: usize, _gpa: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&self, _vcpu: usize, _gpa: u64, _data: &[u8]) {}
}

/// Guest address of the benchmark's code page.
const MMIO_CODE: u64 = 0x4000_0000;
/// Guest address of the benchmark's device register page.
const MMIO_REG: u64 = 0x4001_0000;

/// Measures MMIO exits for about `duration`.
pub fn mmio(duration: Duration, mode: PagingMode) -> Result<MmioBench> {
    let (be, mut m) = one_vcpu(0, 1, mode, false)?;
    // loop: mov eax, [MMIO_REG] (A1 moffs64); jmp loop
    let mut code = vec![0xa1];
    code.extend_from_slice(&MMIO_REG.to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf5]);
    be.map_bytes(MMIO_CODE, &code, PAGE, Prot::READ | Prot::EXEC)?;
    m.set_param(0, P_MODE, Mode::Exec as u64)?;
    m.set_param(0, guest::P_EXEC_ENTRY, MMIO_CODE)?;
    m.mmio = Some(Arc::new(Register));
    let h = |i: usize, ev: Event| Action::Fatal(format!("vCPU {i}: unexpected {ev:?}"));
    m.run(h, |m| {
        let st = &m.stats[0];
        let snap = || {
            (
                st.mmio_exits.load(Ordering::Relaxed),
                st.emul_ns.load(Ordering::Relaxed),
                st.run_ns.load(Ordering::Relaxed),
                st.host_ns.load(Ordering::Relaxed),
            )
        };
        let t = Instant::now();
        while snap().0 < 100 {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(KvmError::Guest("MMIO loop did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (n0, e0, r0, h0) = snap();
        let t0 = Instant::now();
        std::thread::sleep(duration);
        let (n1, e1, r1, h1) = snap();
        let elapsed = t0.elapsed();
        m.control.request_stop();
        for k in m.kick_handles() {
            k.kick();
        }
        Ok(MmioBench {
            exits: n1 - n0,
            elapsed,
            emulate: Duration::from_nanos(e1 - e0),
            in_kvm_run: Duration::from_nanos(r1 - r0),
            in_our_code: Duration::from_nanos(h1 - h0),
        })
    })
}
