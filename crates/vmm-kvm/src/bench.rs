//! Measurements for `vmm bench`: exit round trip, nested-fault cost and the
//! share of it spent in our code, KVM's own first-touch cost (after a zap,
//! and a 1 GiB first touch through a plain slot with guest page tables of
//! its own against the vmspace's fault policies, with KVM's exit and
//! page-fault counters), harvest and invalidation costs. Programs, not
//! tests: the numbers are reported, never asserted.

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
use vmspace::Gpa;

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
    /// `None` on a hardware-nested host, where no zap is needed, and when
    /// the guest ran through most of the pass before it was paused). When
    /// part of the pass ran before the pause, the time of the rest is
    /// scaled to the whole pass.
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
        // The guest may have gone on into the second pass before it was
        // paused: only the pages it touches after the zap are timed.
        let at_resume = m.param(0, P_OPS).clamp(n, 2 * n);
        let t2s = Instant::now();
        m.resume_all()?;
        let t2 = wait_param(m, P_OPS, 2 * n, Duration::from_secs(60))?;
        let kvm_pages = 2 * n - at_resume;
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
            kvm_pass: (shadow && kvm_pages >= n / 4)
                .then(|| Duration::from_secs_f64((t2 - t2s).as_secs_f64() * n as f64 / kvm_pages as f64)),
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

/// The counters of a KVM vCPU (KVM's binary statistics,
/// `KVM_GET_STATS_FD`), found through `/proc/self/fd`: the vCPU's file is
/// private to [`crate::vcpu::Vcpu`], and a benchmark machine has exactly
/// one vCPU alive. `None` when the host offers no statistics or the vCPU
/// is not unique.
pub struct VcpuCounters {
    stats: std::fs::File,
    /// (name, byte offset of its first value in the file).
    fields: Vec<(String, u64)>,
}

impl std::fmt::Debug for VcpuCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuCounters").field("fields", &self.fields.len()).finish()
    }
}

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

impl VcpuCounters {
    /// The statistics of the one KVM vCPU this process has.
    pub fn find() -> Option<Self> {
        match Self::find_all("anon_inode:kvm-vcpu").as_mut_slice() {
            [one] => one.take(),
            _ => None,
        }
    }

    /// The statistics of every KVM file of this process whose
    /// `/proc/self/fd` link starts with `kind` (`"anon_inode:kvm-vcpu"`:
    /// the vCPUs, `"anon_inode:kvm-vm"`: the VMs) followed by nothing or
    /// by `:` (not the statistics files, `kvm-vcpu-stats`), in descriptor
    /// order; `None` for one that offers no statistics.
    pub fn find_all(kind: &str) -> Vec<Option<Self>> {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
        let named = |l: std::path::PathBuf| {
            let l = l.to_string_lossy();
            l.strip_prefix(kind).is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        };
        let mut fds: Vec<i32> = dir
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(named))
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        fds.into_iter().map(Self::of_fd).collect()
    }

    /// The statistics of KVM file descriptor `fd` (a VM or a vCPU).
    fn of_fd(fd: i32) -> Option<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: an ioctl without argument on a descriptor of ours; it
        // returns a new descriptor or fails.
        let fd = unsafe { libc::ioctl(fd, KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let stats = unsafe { std::fs::File::from_raw_fd(fd) };
        let read = |off: u64, n: usize| -> Option<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let mut b = vec![0u8; n];
            stats.read_exact_at(&mut b, off).ok()?;
            Some(b)
        };
        let u32_at = |b: &[u8], i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let h = read(0, 24)?;
        let (name_size, num, desc_off, data_off) =
            (u32_at(&h, 4)? as usize, u32_at(&h, 8)? as usize, u32_at(&h, 16)? as u64, u32_at(&h, 20)? as u64);
        let dsize = 16 + name_size;
        let descs = read(desc_off, dsize.checked_mul(num)?)?;
        let mut fields = Vec::new();
        for d in descs.chunks_exact(dsize) {
            let offset = u32_at(d, 8)? as u64;
            let name = &d[16..];
            let name = String::from_utf8_lossy(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())]);
            fields.push((name.into_owned(), data_off + offset));
        }
        Some(VcpuCounters { stats, fields })
    }

    /// The names of the counters offered.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.0.as_str())
    }

    /// The counter `name` now (its first value).
    pub fn get(&self, name: &str) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let (_, off) = self.fields.iter().find(|f| f.0 == name)?;
        let mut b = [0u8; 8];
        self.stats.read_exact_at(&mut b, *off).ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Exits to KVM and page faults KVM handled, now.
    fn snapshot(&self) -> (u64, u64) {
        (self.get("exits").unwrap_or(0), self.get("pf_taken").unwrap_or(0))
    }
}

/// One sequential first touch (the `Touch` workload writes every page
/// once) of fresh memory, with what it cost.
#[derive(Debug, Clone)]
pub struct TouchCost {
    /// What was measured.
    pub label: String,
    /// Pages touched.
    pub pages: u64,
    /// Time of the pass.
    pub elapsed: Duration,
    /// Nested faults (our exits to user space) during the pass.
    pub nested_faults: u64,
    /// The vCPU's exits to KVM during the pass (`None`: no statistics).
    pub kvm_exits: Option<u64>,
    /// Page faults KVM took during the pass (`None`: no statistics).
    pub kvm_page_faults: Option<u64>,
    /// Host work done for this touch before the pass (populating the
    /// range), counted in [`TouchCost::us_per_page`].
    pub prepare: Duration,
}

impl TouchCost {
    /// Microseconds per page, the preparation included.
    pub fn us_per_page(&self) -> f64 {
        (self.elapsed + self.prepare).as_secs_f64() * 1e6 / self.pages.max(1) as f64
    }
}

impl TouchCost {
    /// Whether this is a KVM's-own measurement (no vmspace).
    pub fn kvm_own(&self) -> bool {
        self.label.starts_with("KVM's own")
    }
}

/// Runs the `Touch` workload's first pass over `n` pages on machine `m`
/// and reports it (stats: the vCPU's counters, if found).
fn touch_pass(m: &mut Machine, n: u64, label: String) -> Result<TouchCost> {
    m.set_param(0, P_MODE, Mode::Touch as u64)?;
    m.set_param(0, P_NPAGES, n)?;
    m.set_param(0, P_MAGIC, 0x7ac4)?;
    m.set_param(0, P_LEDGER, runtime::ledger(0, n))?;
    let counters = VcpuCounters::find();
    m.run(handler, |m| {
        let st = &m.stats[0];
        let before = counters.as_ref().map(|c| c.snapshot());
        let f0 = st.faults.load(Ordering::Relaxed);
        let start = Instant::now();
        let t1 = wait_param(m, P_OPS, n, Duration::from_secs(600))?;
        m.pause_all(Duration::from_secs(10))?;
        let after = counters.as_ref().map(|c| c.snapshot());
        let faults = st.faults.load(Ordering::Relaxed) - f0;
        m.resume_all()?;
        stop(m)?;
        let d = before.zip(after).map(|(b, a)| (a.0 - b.0, a.1 - b.1));
        Ok(TouchCost {
            label,
            pages: n,
            elapsed: t1 - start,
            nested_faults: faults,
            kvm_exits: d.map(|d| d.0),
            kvm_page_faults: d.map(|d| d.1),
            prepare: Duration::ZERO,
        })
    })
}

/// Bits a plain guest's own page tables carry in every leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnLeafBits {
    /// Neither accessed nor dirty (a table built without them).
    None,
    /// Accessed and dirty preset (as Linux builds its direct map).
    AccessedDirty,
}

/// KVM's own first touch: a plain KVM memory slot of `mem` bytes mapped
/// by guest page tables of its own (every 4 KiB leaf present from the
/// start, with `bits`), no vmspace and no nested fault; one vCPU writes
/// every page once. With `prefault` the host allocates the memory first
/// (through the mapping KVM uses). With `dirty_log`, KVM's own dirty
/// tracking is on for the slot (`KVM_MEM_LOG_DIRTY_PAGES`, the log
/// cleared before the pass), the fair baseline for the vmspace with its
/// dirty tracking on; the pages KVM logged during the pass go into the
/// label.
pub fn kvm_own_first_touch(
    mem: u64,
    mode: PagingMode,
    bits: OwnLeafBits,
    prefault: bool,
    dirty_log: bool,
) -> Result<TouchCost> {
    use crate::backend::TableBackend;
    use nested_pt::{Gpa, PageSize};
    let vm = Arc::new(KvmVm::new()?);
    let n = mem / PAGE;
    let mut be = TableBackend::new(vm.clone(), mem / 256 + (4 << 20), mem + (8 << 20), mode)?;
    be.map_runtime(&runtime::rom_image(&guest::code(), 1), 1, n)?;
    let off = be.alloc_ram(mem, 2 << 20)?;
    be.map_range(0, off, mem, PageSize::Size4K, Prot::READ | Prot::WRITE)?;
    if bits == OwnLeafBits::AccessedDirty {
        let t = be.table();
        let set = t.format().accessed_mask() | t.format().dirty_mask();
        t.for_each_leaf_table(Gpa(0), mem, |_, entries, _| {
            for e in entries {
                e.fetch_or(set, Ordering::Relaxed);
            }
        });
    }
    if prefault {
        for p in 0..n {
            be.ram().write_u64(off + p * PAGE, 0).map_err(|e| KvmError::Setup(format!("prefault: {e}")))?;
        }
        // The region has a host view and a KVM view: KVM finds pages
        // (and prefetches neighbours) only where its own view maps them.
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        if off.checked_add(mem).is_none_or(|e| e > be.ram().len()) {
            return Err(KvmError::Setup("RAM outside its region".into()));
        }
        // SAFETY: `[off, off+mem)` lies inside the region's KVM view
        // (checked); populating a shared mapping never changes data.
        let r = unsafe {
            libc::madvise((be.ram().kvm_addr() + off) as *mut libc::c_void, mem as usize, MADV_POPULATE_WRITE)
        };
        if r != 0 {
            return Err(KvmError::Os("madvise(MADV_POPULATE_WRITE)", std::io::Error::last_os_error()));
        }
    }
    let log_slot = if dirty_log {
        let slot = vm.set_dirty_log(be.ram(), crate::backend::RAM_KVM_BASE, true)?;
        vm.dirty_log_pages(slot, be.ram().len())?;
        Some(slot)
    } else {
        None
    };
    let ram_len = be.ram().len();
    let be = Arc::new(be);
    let mut m = crate::machine::create(&vm, be.clone(), mode, 1)?;
    let label = format!(
        "KVM's own (plain slot, own page tables, leaves {}, host memory {}{})",
        if bits == OwnLeafBits::AccessedDirty { "A+D" } else { "clean" },
        if prefault { "preallocated" } else { "fresh" },
        if dirty_log { ", KVM dirty log on" } else { "" }
    );
    let mut r = touch_pass(&mut m, n, label)?;
    if let Some(slot) = log_slot {
        // The guest may have run on into its next pass before the pause:
        // the count is of pages, each logged once.
        let logged = vm.dirty_log_pages(slot, ram_len)?;
        r.label += &format!(": {logged} pages logged");
    }
    Ok(r)
}

/// How the vmspace first-touch variants map the memory.
#[derive(Debug, Clone, Copy)]
pub struct TouchPolicy {
    /// Fault-around window.
    pub fault_around: u32,
    /// `SpaceConfig::fault_around_accessed`.
    pub preset_accessed: bool,
    /// The host allocates the memory first (through both views).
    pub prefault: bool,
    /// Populate the whole range before the guest runs (`VmSpace::populate`).
    pub populate: bool,
    /// Dirty tracking off, and the dirty bit preset on a write fault's
    /// neighbours (`FaultOptions::preset_dirty_untracked`; needs
    /// `preset_accessed`).
    pub untracked_dirty: bool,
}

/// The vmspace's first touch of `mem` bytes with `policy`, one vCPU.
pub fn vmspace_first_touch(mem: u64, mode: PagingMode, policy: TouchPolicy) -> Result<TouchCost> {
    let vm = Arc::new(KvmVm::new()?);
    let n = mem / PAGE;
    let opts = crate::space::FaultOptions {
        fault_around: policy.fault_around,
        preset_accessed: policy.preset_accessed,
        preset_dirty_untracked: policy.untracked_dirty,
    };
    let be = Arc::new(SpaceBackend::create_with(vm.clone(), mem + (4 << 20), mem / 256 + (4 << 20), mode, opts, None)?);
    let ram = be.ram_segment(mem)?;
    if policy.prefault {
        for off in (0..mem).step_by(PAGE as usize) {
            let p = be.object_ptr(&ram.object, off).ok_or_else(|| KvmError::Setup("prefault".into()))?;
            // SAFETY: a resident page of our own object; no vCPU runs yet.
            unsafe { (p as *mut u64).write_volatile(0) };
        }
        be.populate_kvm_view(&ram.object, 0, mem)?;
    }
    be.map(&ram, 0, mem, Prot::READ | Prot::WRITE)?;
    if policy.untracked_dirty {
        be.space().set_dirty_tracking(false).map_err(|e| KvmError::Setup(format!("tracking: {e}")))?;
    }
    let t = Instant::now();
    if policy.populate {
        be.space().populate(Gpa(0), mem).map_err(|e| KvmError::Setup(format!("populate: {e}")))?;
    }
    let prepare = t.elapsed();
    be.map_runtime(1, n.max(1))?;
    let mut m = crate::machine::create(&vm, be.clone(), mode, 1)?;
    let label = format!(
        "vmspace, fault-around {}{}{}, host memory {}",
        policy.fault_around,
        match (policy.preset_accessed, policy.untracked_dirty) {
            (true, true) => " + A+D preset on neighbours (dirty tracking off)",
            (true, false) => " + A preset on neighbours",
            _ => "",
        },
        if policy.populate { ", range populated first" } else { "" },
        if policy.prefault { "preallocated" } else { "fresh" }
    );
    let mut r = touch_pass(&mut m, n, label)?;
    r.prepare = prepare;
    if !policy.untracked_dirty {
        // The harvest after the pass: with tracking on, every written page
        // must be reported (the guest writes each once per pass).
        let mut bitmap = vec![0u64; n.div_ceil(64) as usize];
        let dirty =
            be.space().track_dirty(Gpa(0), mem, &mut bitmap).map_err(|e| KvmError::Setup(format!("harvest: {e}")))?;
        r.label += &format!(": {dirty} pages harvested dirty");
    }
    Ok(r)
}

/// The first-touch comparison of `vmm bench`: one sequential write pass
/// over `mem` bytes of fresh memory, KVM's own (a plain slot with guest
/// page tables of its own, clean leaves) against the vmspace's nested
/// faults with several policies, in `rounds` alternating rounds; for each
/// variant the round with the median time. Then the same with host memory
/// preallocated through both views: first KVM's own with accessed and
/// dirty preset in its leaves (its best case, untracked) and the two
/// vmspace variants with dirty tracking off and A+D preset on the
/// neighbours; then KVM's own with clean leaves, and KVM's own with A+D
/// leaves and its dirty log on (`KVM_MEM_LOG_DIRTY_PAGES`: the tracked
/// baseline), followed by the vmspace's policies with tracking on.
/// Each vmspace entry follows the KVM's own entry it is compared with
/// (`TouchCost::kvm_own`).
pub fn first_touch_compare(mem: u64, mode: PagingMode, rounds: usize) -> Result<Vec<TouchCost>> {
    let fresh = |fault_around, preset_accessed, populate| TouchPolicy {
        fault_around,
        preset_accessed,
        prefault: false,
        populate,
        untracked_dirty: false,
    };
    let policies = [fresh(16, false, false), fresh(16, true, false), fresh(512, false, false), fresh(16, false, true)];
    let pre = |p: TouchPolicy| TouchPolicy { prefault: true, ..p };
    let untracked = |fault_around| TouchPolicy { untracked_dirty: true, ..pre(fresh(fault_around, true, false)) };
    let untracked_policies = [untracked(16), untracked(512)];
    let tracked_policies: Vec<TouchPolicy> = policies.iter().map(|p| pre(*p)).collect();
    let mut runs: Vec<Vec<TouchCost>> =
        vec![Vec::new(); policies.len() + untracked_policies.len() + tracked_policies.len() + 4];
    for _ in 0..rounds.max(1) {
        let mut slot = runs.iter_mut();
        let mut push = |r: TouchCost| slot.next().map(|v| v.push(r)).ok_or(KvmError::Setup("bench slots".into()));
        push(kvm_own_first_touch(mem, mode, OwnLeafBits::None, false, false)?)?;
        for p in &policies {
            push(vmspace_first_touch(mem, mode, *p)?)?;
        }
        push(kvm_own_first_touch(mem, mode, OwnLeafBits::AccessedDirty, true, false)?)?;
        for p in &untracked_policies {
            push(vmspace_first_touch(mem, mode, *p)?)?;
        }
        push(kvm_own_first_touch(mem, mode, OwnLeafBits::None, true, false)?)?;
        push(kvm_own_first_touch(mem, mode, OwnLeafBits::AccessedDirty, true, true)?)?;
        for p in &tracked_policies {
            push(vmspace_first_touch(mem, mode, *p)?)?;
        }
    }
    Ok(runs
        .into_iter()
        .map(|mut v| {
            v.sort_by_key(|r| r.elapsed + r.prepare);
            v.swap_remove(v.len() / 2)
        })
        .collect())
}
