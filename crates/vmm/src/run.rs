//! `vmm run`: the built-in workloads on a [`Vm`](crate::Vm) of any
//! [`Host`], with harvest rounds and every check the host can make.
//!
//! The run builds the VM the way bhyve's `bhyve(8)` does on `vmm.ko`:
//! system memory as a segment mapped at [`runtime::RAM_BASE`], the boot ROM
//! as a device-memory segment named "bootrom" below 4 GiB, and — by
//! default — a PCI framebuffer whose 64-bit BAR is backed by a
//! device-memory segment named "framebuffer", which vCPU 0 sizes, places
//! and moves while vCPU 1 draws through it (MMIO emulation for the
//! configuration space and the register BAR). Each vCPU runs a workload
//! over its share of RAM and keeps a ledger of the pages it wrote; at each
//! harvest point the vCPUs are paused and the harvest's dirty bitmap must
//! equal the ledgers exactly. At the end each vCPU's operations are
//! replayed on the host and the image compared with guest memory, the
//! guest's own verify pass and checksums are checked, and the framebuffer
//! is read through its node by name, as another process sees it.
//!
//! With a reservoir smaller than guest memory plus the runtime
//! ([`RunConfig::reservoir`]) guest memory is a *swappable* segment
//! ([`crate::Vm::alloc_swappable_segment`]): pages get frames on first
//! touch, a swapper thread ([`crate::swapper::Swapper`]) swaps cold pages
//! out whenever the reservoir's free frames fall below a low-water mark
//! (`vmspace::VmSpace::swap_out`, the accessed-bit clock), a fault that
//! still finds it exhausted evicts a batch itself, and the next access
//! swaps a page back in. Every check is the same: the ledgers must match
//! the harvests exactly (swapped-out dirty pages included), and the replay
//! reads guest memory through the segment's object (resident pages from
//! their frames, the others from the swap file). The report gives the
//! swap counters ([`RunReport::swap`], [`RunReport::swapper`]).
//!
//! While it runs, the VM answers on its control socket ([`crate::control`]):
//! `inspect` (segments, mappings, vCPU registers, tables) and
//! `framebuffer` (the geometry a screenshot needs).

use crate::guest::*;
use crate::host::{Host, HostMemory, MemorySpec, PagingMode};
use crate::hv::{MachineError, MemBackend, Result};
use crate::machine::{Action, Event, Machine, read_guest_u64, read_guest_words, write_guest_u64};
use crate::runtime;
use crate::workload::{Mode, Replay, Spec, checksum};
use vmspace::Gpa;

use nested_pt::Prot;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

fn setup(msg: impl Into<String>) -> MachineError {
    MachineError::Setup(msg.into())
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM in bytes (split evenly between the vCPUs).
    pub mem_bytes: u64,
    /// Workload of every vCPU.
    pub mode: Mode,
    /// Percentage of random operations that write.
    pub write_pct: u32,
    /// Total running time.
    pub duration: Duration,
    /// Harvest rounds during the run (evenly spaced), plus a final one.
    pub rounds: u32,
    /// Seed of the generators.
    pub seed: u64,
    /// Paging mode to assume; `None` runs the start-up detection.
    pub mode_override: Option<PagingMode>,
    /// Also inject the CR3 reload on shadow hosts (exercises the path).
    pub force_flush: bool,
    /// Dump the vmspace (mappings and tables) at the first harvest point,
    /// while the vCPUs are paused (at the end if no round ran).
    pub snapshot: bool,
    /// Present leaves shown per leaf table in the snapshot.
    pub snapshot_leaves: usize,
    /// Pages a nested fault maps around the faulting one.
    pub fault_around: u32,
    /// Harvests with more dirty pages zap all shadow pages (shadow hosts).
    pub zap_threshold: u64,
    /// The PCI framebuffer the guest programs, draws into and moves
    /// (`None`: no framebuffer, no MMIO).
    pub framebuffer: Option<FbConfig>,
    /// The VM's name (its device-memory nodes are found by it); a
    /// process-unique one when `None`.
    pub name: Option<String>,
    /// Host CPUs to pin the vCPU threads to (vCPU `i` on `pin[i % len]`);
    /// empty: no pinning.
    pub pin: Vec<usize>,
    /// Write a PNG of the framebuffer here at the end of the run (taken
    /// through the framebuffer's node by name).
    pub screenshot: Option<std::path::PathBuf>,
    /// Bytes of RAM reservoir for the VM (guest memory, the runtime's data
    /// pages and ledgers); `None`, or enough for all of it: no swapping.
    /// Less than that makes guest memory swappable (see the module doc);
    /// it must still hold the runtime plus [`MIN_SWAP_FRAMES`] frames.
    pub reservoir: Option<u64>,
    /// Directory of the (anonymous) swap file when swapping; the system's
    /// temporary directory when `None`.
    pub swap_dir: Option<std::path::PathBuf>,
    /// Set (e.g. by a SIGINT/SIGTERM handler) to end the workload early:
    /// the run then stops its vCPUs the normal way (verify pass, final
    /// harvest, every check) and reports [`RunReport::interrupted`].
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            vcpus: 2,
            mem_bytes: 256 << 20,
            mode: Mode::Mixed,
            write_pct: 50,
            duration: Duration::from_secs(2),
            rounds: 4,
            seed: 0x5eed,
            mode_override: None,
            force_flush: false,
            snapshot: false,
            snapshot_leaves: 8,
            fault_around: 16,
            zap_threshold: crate::host::DEFAULT_ZAP_THRESHOLD,
            framebuffer: Some(FbConfig::default()),
            name: None,
            pin: Vec::new(),
            screenshot: None,
            reservoir: None,
            swap_dir: None,
            stop: None,
        }
    }
}

/// Reservoir frames a swapping run needs beyond the runtime's (the
/// guest's working set must fit in them between two evictions).
pub const MIN_SWAP_FRAMES: u64 = 256;

/// The framebuffer of a run: a bhyve-style PCI display whose 64-bit BAR
/// is backed by a device-memory segment named "framebuffer".
#[derive(Debug, Clone, Copy)]
pub struct FbConfig {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// At least this many BAR moves by vCPU 0 while vCPU 1 draws.
    pub moves: u64,
}

impl Default for FbConfig {
    fn default() -> Self {
        FbConfig { width: 320, height: 200, moves: 4 }
    }
}

/// PCI device number of the framebuffer.
pub const FB_DEVICE: u8 = 3;
/// Where the guest puts the framebuffer's register BAR.
pub const FB_REGS: u64 = crate::platform::PCI_WINDOW_32.0;
/// The two places the guest moves the framebuffer BAR between.
pub const FB_BASES: [u64; 2] = [crate::platform::PCI_WINDOW_64.0, crate::platform::PCI_WINDOW_64.0 + 0x1000_0000];

/// What the framebuffer part of a run did and found.
#[derive(Debug, Clone, Default)]
pub struct FbReport {
    /// Geometry (width, height) the guest read from the register BAR.
    pub geometry: (u32, u32),
    /// BAR size the guest found by sizing.
    pub bar_size: u64,
    /// The framebuffer's size.
    pub fb_size: u64,
    /// BAR moves the guest made, and those the VMM applied.
    pub guest_moves: u64,
    /// BAR placements the VMM applied (first placement included).
    pub applied_moves: u64,
    /// Writes the drawing vCPU had to repeat because the BAR had moved.
    pub retried_writes: u64,
    /// Accesses to the PCI windows that nothing decoded (master aborts).
    pub master_aborts: u64,
    /// Pixels that differ from what the guest was asked to draw, read
    /// through the segment's node by name.
    pub bad_pixels: u64,
    /// The node's path.
    pub node: String,
}

impl FbReport {
    /// True when the guest saw the device right and every pixel arrived.
    pub fn ok(&self, cfg: &FbConfig) -> bool {
        self.geometry == (cfg.width, cfg.height)
            && self.bar_size == self.fb_size
            && self.bad_pixels == 0
            && self.guest_moves >= cfg.moves
            && self.applied_moves > self.guest_moves
    }
}

/// One harvest round.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Pages the harvest reported dirty.
    pub dirty: u64,
    /// Pages the guests' ledgers say were written.
    pub ledger: u64,
    /// Written (ledger) but not reported dirty: must be zero.
    pub missed: u64,
    /// Reported dirty but not in any ledger.
    pub spurious: u64,
    /// Time to harvest and make the cleared bits effective.
    pub harvest: Duration,
    /// Time from asking the vCPUs to pause until all had.
    pub pause: Duration,
}

/// Per-vCPU results.
#[derive(Debug, Clone, Default)]
pub struct VcpuReport {
    /// Operations completed.
    pub ops: u64,
    /// Nested faults served.
    pub faults: u64,
    /// Exits of all kinds.
    pub exits: u64,
    /// Pages whose contents differ from the replayed image.
    pub bad_pages: u64,
    /// Checksum the guest's verify pass computed.
    pub guest_checksum: u64,
    /// Checksum of the replayed image.
    pub expected_checksum: u64,
    /// Headers the guest's verify pass found wrong.
    pub guest_bad_headers: u64,
    /// Data errors the guest reported during the run.
    pub data_errors: u64,
    /// Pages the guest's verify pass covered.
    pub verified_pages: u64,
}

/// Everything `vmm run` reports; `D` is what the host found about itself
/// ([`Host::Probe`]).
#[derive(Debug, Clone)]
pub struct RunReport<D = ()> {
    /// What the host's start-up probe found (absent when the paging mode
    /// was given).
    pub detection: Option<D>,
    /// How the host translated through our tables (given or found).
    pub mode: PagingMode,
    /// Wall time of the workload (until the stop request).
    pub elapsed: Duration,
    /// Wall time of the guests' final verify pass.
    pub verify_time: Duration,
    /// Harvest rounds (the last one after the workload stopped).
    pub rounds: Vec<Round>,
    /// Per-vCPU results.
    pub vcpus: Vec<VcpuReport>,
    /// Nested faults served.
    pub faults: u64,
    /// Time in our fault path (exit returned to next entry), all faults.
    pub fault_host_time: Duration,
    /// Time inside the backend's run calls (e.g. `KVM_RUN`) that ended in a
    /// fault exit.
    pub fault_run_time: Duration,
    /// Pages resident at the end.
    pub resident: u64,
    /// Table pages at the end.
    pub table_pages: u64,
    /// Table generation at the end.
    pub generation: u64,
    /// Kicks sent.
    pub kicks: u64,
    /// CR3-reload vectors injected.
    pub flushes: u64,
    /// Frames whose host translations were dropped one by one (shadow
    /// hosts).
    pub frames_dropped: u64,
    /// Time spent dropping frames.
    pub drop_time: Duration,
    /// Full flushes of every host translation (shadow zaps).
    pub zaps: u64,
    /// Time spent in zaps.
    pub zap_time: Duration,
    /// The vmspace dump, when asked for.
    pub snapshot: Option<String>,
    /// The workload was ended early through [`RunConfig::stop`].
    pub interrupted: bool,
    /// Nested faults on device ranges (MMIO exits).
    pub mmio_exits: u64,
    /// Instructions emulated.
    pub emulated: u64,
    /// Time in instruction fetch, decode, emulation and device models.
    pub emul_time: Duration,
    /// The framebuffer part, when configured.
    pub framebuffer: Option<FbReport>,
    /// The framebuffer configuration (for [`RunReport::ok`]).
    pub fb_config: Option<FbConfig>,
    /// The VM's name.
    pub name: String,
    /// The host CPU each vCPU thread last ran on.
    pub host_cpus: Vec<u64>,
    /// Where the end-of-run screenshot was written.
    pub screenshot: Option<std::path::PathBuf>,
    /// The swap counters at the end (pages swapped out and in, clock
    /// passes...), when guest memory was swappable.
    pub swap: Option<vmspace::SwapStats>,
    /// What the swapper thread did ([`crate::swapper::Swapper`]), when
    /// guest memory was swappable.
    pub swapper: Option<crate::swapper::SwapperStats>,
}

impl<D> RunReport<D> {
    /// True when no check failed.
    pub fn ok(&self) -> bool {
        let fb_ok = match (&self.framebuffer, &self.fb_config) {
            (Some(r), Some(c)) => r.ok(c),
            (None, None) => true,
            _ => false,
        };
        fb_ok
            && self.rounds.iter().all(|r| r.missed == 0 && r.spurious == 0)
            && self.vcpus.iter().all(|v| {
                v.bad_pages == 0
                    && v.guest_bad_headers == 0
                    && v.data_errors == 0
                    && v.guest_checksum == v.expected_checksum
            })
    }
}

/// Progress callback data.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Time since start.
    pub elapsed: Duration,
    /// Faults so far.
    pub faults: u64,
    /// Resident pages.
    pub resident: u64,
    /// Harvest rounds done.
    pub rounds: usize,
}

fn bit(b: &[u64], i: u64) -> bool {
    b[(i / 64) as usize] & (1 << (i % 64)) != 0
}

impl Round {
    /// Adds one vCPU's ledger to the round: `ledger` is its bitmap of the
    /// pages it wrote since the last round (bit `p` = page `p` of its
    /// region, `npages` pages), `bitmap` the harvest's bitmap of all RAM
    /// with the vCPU's region starting at page `first`. Counts the ledger
    /// pages, those the harvest missed, and those it reported unwritten.
    pub fn compare_ledger(&mut self, ledger: &[u8], bitmap: &[u64], first: u64, npages: u64) {
        for p in 0..npages {
            let led = ledger.get((p / 8) as usize).is_some_and(|b| b & (1 << (p % 8)) != 0);
            let h = bit(bitmap, first + p);
            self.ledger += u64::from(led);
            self.missed += u64::from(led && !h);
            self.spurious += u64::from(h && !led);
        }
    }
}

/// What the built-in workload's reports mean to the exit loop, shared by
/// every program that runs it (`vmm run`, live migration): done stops the
/// vCPU, a data error is counted in `data_errors[i]` and the vCPU goes on,
/// anything else is fatal.
pub fn workload_event(i: usize, ev: Event, data_errors: &[AtomicU64]) -> Action {
    match ev {
        Event::Unserved(f, e) => Action::Fatal(format!(
            "vCPU {i}: guest access at {:#x} (error code {:#x}, rip {:#x}) outside every mapping: {e:?}",
            f.gpa, f.err, f.rip
        )),
        Event::Port(PORT_DONE, _) => Action::Stop,
        Event::Port(PORT_DATA_ERROR, r) => {
            if let Some(c) = data_errors.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            eprintln!("vCPU {i}: data error at {:#x}: read {:#x}", r[2], r[3]);
            Action::Continue
        }
        Event::Port(p, r) => Action::Fatal(format!("vCPU {i}: unexpected report {p:#x} {r:x?}")),
        Event::EmulationFailed(f, e) => {
            Action::Fatal(format!("vCPU {i}: MMIO access at {:#x} not emulated: {e}", f.gpa))
        }
    }
}

/// Runs `cfg` on `host`, calling `progress` about four times a second.
pub fn run<H: Host>(host: &mut H, cfg: &RunConfig, progress: &mut dyn FnMut(Progress)) -> Result<RunReport<H::Probe>> {
    if cfg.vcpus == 0 || cfg.vcpus > runtime::MAX_VCPUS {
        return Err(setup(format!("vCPU count must be 1..={}", runtime::MAX_VCPUS)));
    }
    let per = cfg.mem_bytes / cfg.vcpus as u64 / PAGE;
    let ram_base = runtime::RAM_BASE;
    if per == 0 || !cfg.mem_bytes.is_multiple_of(PAGE) || cfg.mem_bytes > crate::platform::PCI_WINDOW_64.0 - ram_base {
        return Err(setup(format!(
            "memory size must be a multiple of 4 KiB, at least a page per vCPU, at most {} GiB",
            (crate::platform::PCI_WINDOW_64.0 - ram_base) >> 30
        )));
    }
    let mode = host.paging_mode(cfg.mode_override)?;
    let npages = per;
    let rt_bytes = (runtime::ROM_PAGES + cfg.vcpus as u64 * runtime::DATA_PAGES) * PAGE
        + cfg.vcpus as u64 * runtime::ledger_bytes(npages);
    let table_bytes = (cfg.mem_bytes / 512 + (8 << 20)).next_multiple_of(PAGE);
    let need = cfg.mem_bytes + rt_bytes + (1 << 20);
    let (reservoir_bytes, swapping) = match cfg.reservoir {
        Some(r) if r < need => {
            let min = rt_bytes + (1 << 20) + MIN_SWAP_FRAMES * PAGE;
            if r < min || !r.is_multiple_of(PAGE) {
                return Err(setup(format!(
                    "a reservoir smaller than guest memory must be a multiple of 4 KiB and at least {} KiB \
                     (the runtime and {MIN_SWAP_FRAMES} frames)",
                    min >> 10
                )));
            }
            (r, true)
        }
        Some(r) => (r, false),
        None => (need, false),
    };
    let be = host.create_memory(&MemorySpec {
        reservoir_bytes,
        table_bytes,
        fault_around: cfg.fault_around,
        name: cfg.name.clone(),
        mode,
        zap_threshold: cfg.zap_threshold,
    })?;
    if swapping {
        let dir = cfg.swap_dir.clone().unwrap_or_else(std::env::temp_dir);
        let file = vmspace::swap_file_in(&dir).map_err(|e| setup(format!("swap file in {}: {e}", dir.display())))?;
        crate::host::map_swappable_ram(be.vm(), ram_base, cfg.mem_bytes, Prot::READ | Prot::WRITE, file)?;
    } else {
        crate::host::map_ram(be.vm(), ram_base, cfg.mem_bytes, Prot::READ | Prot::WRITE)?;
    }
    crate::host::install_runtime(be.vm(), cfg.vcpus, npages)?;
    let mut m = crate::host::machine(host, &be, mode, cfg.vcpus)?;
    m.flush |= cfg.force_flush;
    m.pin = cfg.pin.clone();
    let fb = match cfg.framebuffer {
        Some(f) => Some(setup_framebuffer(&*be, &mut m, &f)?),
        None => None,
    };
    let specs: Vec<Spec> =
        (0..cfg.vcpus).map(|i| Spec::for_vcpu(i, cfg.mode, ram_base, npages, cfg.seed, cfg.write_pct)).collect();
    for (i, s) in specs.iter().enumerate() {
        m.set_param(i, P_MODE, s.mode as u64)?;
        m.set_param(i, P_BASE, s.base)?;
        m.set_param(i, P_NPAGES, s.npages)?;
        m.set_param(i, P_SEED, s.seed)?;
        m.set_param(i, P_WRITE_THRESH, s.write_thresh())?;
        m.set_param(i, P_MAGIC, s.magic)?;
        m.set_param(i, P_LEDGER, runtime::ledger(i, npages))?;
    }
    let data_errors: Vec<std::sync::atomic::AtomicU64> = (0..cfg.vcpus).map(|_| Default::default()).collect();
    let start = Instant::now();
    let words = npages.div_ceil(64) as usize;
    let mem_pages = npages * cfg.vcpus as u64;
    let ledger_words = runtime::ledger_bytes(npages) / 8;

    // One harvest point: all vCPUs paused (or finished).
    let harvest_round = |m: &Machine| -> Result<Round> {
        let tp = Instant::now();
        m.pause_all(Duration::from_secs(30))?;
        let pause = tp.elapsed();
        let mut bitmap = vec![0u64; mem_pages.div_ceil(64) as usize];
        let th = Instant::now();
        let dirty = be.harvest(ram_base, mem_pages * PAGE, &mut bitmap)?;
        let harvest = th.elapsed();
        let mut r = Round { dirty, pause, harvest, ..Default::default() };
        for i in 0..cfg.vcpus {
            let lbase = runtime::ledger(i, npages);
            let ledger: Vec<u8> = (0..words as u64)
                .flat_map(|w| read_guest_u64(&*be, lbase + 8 * w).unwrap_or(0).to_le_bytes())
                .collect();
            r.compare_ledger(&ledger, &bitmap, i as u64 * npages, npages);
            for w in 0..ledger_words {
                write_guest_u64(&*be, lbase + 8 * w, 0);
            }
        }
        Ok(r)
    };

    let stop_ports = |i: usize, ev: Event| workload_event(i, ev, &data_errors);

    // The swapper keeps the reservoir above its low-water mark on a thread
    // of its own while the vCPUs run (a fault that finds it exhausted
    // still reclaims by itself).
    let swapper = if swapping {
        let s = crate::swapper::Swapper::spawn(be.vm().clone(), crate::swapper::SwapperConfig::default());
        Some(s.map_err(|e| setup(format!("swapper: {e}")))?)
    } else {
        None
    };
    let stop_requested = || cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let mut snapshot = None;
    let mut coordinate = |m: &Machine| {
        let mut rounds = Vec::new();
        let interval = cfg.duration / (cfg.rounds + 1);
        let mut next_round = start + interval;
        let end = start + cfg.duration;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if now >= end || m.control.finished() > 0 || stop_requested() {
                break;
            }
            if let Some(e) = swapper.as_ref().and_then(crate::swapper::Swapper::error) {
                return Err(setup(format!("swap out: {e}")));
            }
            if now >= next_round && (rounds.len() as u32) < cfg.rounds {
                rounds.push(harvest_round(m)?);
                if cfg.snapshot && snapshot.is_none() {
                    // The vCPUs are paused at a harvest point: a live view.
                    snapshot = Some(crate::inspect::dump_space(be.vm().space(), cfg.snapshot_leaves));
                }
                m.resume_all()?;
                next_round += interval;
            }
            if last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                progress(Progress {
                    elapsed: start.elapsed(),
                    faults: m.total(|s| &s.faults),
                    resident: be.resident(),
                    rounds: rounds.len(),
                });
            }
            std::thread::sleep(Duration::from_millis(5).min(end.saturating_duration_since(Instant::now())));
        }
        // Stop: the guests finish their operation, run the verify pass and
        // report done; a last harvest covers everything since the last round.
        let stop_at = Instant::now();
        for i in 0..m.nvcpus() {
            m.set_param(i, P_CTRL, 2)?;
        }
        m.control.wait_all_paused(m.nvcpus(), Duration::from_secs(600))?;
        Ok::<_, MachineError>((rounds, stop_at))
    };
    let listener = crate::control::bind(be.vm().node_dir()).map_err(|e| setup(format!("control socket: {e}")))?;
    let served = AtomicU64::new(0);
    let rounds = m.run::<_, _, _, MachineError>(stop_ports, |m| {
        // The control endpoint: `vmm inspect NAME`, `vmm screenshot NAME`.
        let stop_control = std::sync::atomic::AtomicBool::new(false);
        let handler = |cmd: &str| {
            served.fetch_add(1, Ordering::Relaxed);
            control_answer(cmd, &*be, m, fb.as_deref())
        };
        std::thread::scope(|s| {
            s.spawn(|| crate::control::serve(&listener, &stop_control, &handler));
            let r = coordinate(m);
            stop_control.store(true, Ordering::SeqCst);
            r
        })
    });
    let end = Instant::now();
    let swapper =
        swapper.map(crate::swapper::Swapper::stop).transpose().map_err(|e| setup(format!("swap out: {e}")))?;
    let (mut rounds, stop_at) = rounds?;
    let elapsed = stop_at - start;
    let verify_time = end - stop_at;
    // Final round, all vCPUs finished (the verify pass only reads data).
    rounds.push(harvest_round(&m)?);

    // Replay each vCPU (in parallel) and compare memory with the image.
    let ops: Vec<u64> = (0..cfg.vcpus).map(|i| m.param(i, P_OPS)).collect();
    let be2: &dyn MemBackend = &*be;
    // Swappable RAM is read through its object: swapped-out pages have
    // no leaf (and no host pointer), their contents are in the swap file.
    let ram_obj = if swapping {
        let mi = be.vm().space().mapping_at(Gpa(ram_base)).ok_or_else(|| setup("guest RAM is not mapped"))?;
        Some((mi.object, mi.gpa.0, mi.offset))
    } else {
        None
    };
    let ram_obj = ram_obj.as_ref();
    let vcpus: Vec<VcpuReport> = std::thread::scope(|s| {
        let hs: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let ops = ops[i];
                s.spawn(move || {
                    let img = Replay::image(*spec, ops);
                    let mut bad = 0;
                    let mut words = [0u64; USED_WORDS as usize];
                    for p in 0..spec.npages {
                        let gpa = spec.base + p * PAGE;
                        let b = (p * USED_WORDS) as usize;
                        let expect = &img[b..b + USED_WORDS as usize];
                        let ok = match read_ram_words(be2, ram_obj, gpa, &mut words) {
                            Some(()) => words[..] == *expect,
                            // Not resident: never written, reads as zero.
                            None => expect.iter().all(|&w| w == 0),
                        };
                        bad += u64::from(!ok);
                    }
                    let verified = crate::workload::verified_pages(spec, ops);
                    (bad, checksum(&img[..(verified * USED_WORDS) as usize]))
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(i, h)| {
                let (bad_pages, expected_checksum) = h.join().unwrap_or((u64::MAX, 0));
                VcpuReport {
                    ops: ops[i],
                    faults: m.stats[i].faults.load(Ordering::Relaxed),
                    exits: m.stats[i].exits.load(Ordering::Relaxed),
                    bad_pages,
                    guest_checksum: m.param(i, P_CHECKSUM),
                    expected_checksum,
                    guest_bad_headers: m.param(i, P_BAD_PAGES),
                    data_errors: data_errors[i].load(Ordering::Relaxed),
                    verified_pages: m.param(i, P_VERIFIED),
                }
            })
            .collect()
    });
    let framebuffer = match (&fb, &cfg.framebuffer) {
        (Some(devs), Some(f)) => Some(framebuffer_report(&*be, &m, devs, f, cfg.vcpus)?),
        _ => None,
    };
    let screenshot = match (&cfg.screenshot, &cfg.framebuffer) {
        (Some(path), Some(f)) => {
            let png = crate::fbuf::screenshot_node(be.vm().name(), f.width, f.height, f.width * 4)
                .map_err(|e| setup(format!("screenshot: {e}")))?;
            std::fs::write(path, png).map_err(|e| setup(format!("write screenshot {}: {e}", path.display())))?;
            Some(path.clone())
        }
        (Some(_), None) => return Err(setup("a screenshot needs the framebuffer")),
        _ => None,
    };
    let st = be.invalidation_stats();
    Ok(RunReport {
        mmio_exits: m.total(|s| &s.mmio_exits),
        emulated: m.total(|s| &s.emulated),
        emul_time: Duration::from_nanos(m.total(|s| &s.emul_ns)),
        framebuffer,
        fb_config: cfg.framebuffer,
        name: be.vm().name().to_string(),
        host_cpus: m.stats.iter().map(|s| s.host_cpu.load(Ordering::Relaxed)).collect(),
        screenshot,
        swap: swapping.then(|| be.vm().space().swap_stats()),
        swapper,
        detection: if cfg.mode_override.is_none() { host.probe() } else { None },
        mode,
        elapsed,
        verify_time,
        rounds,
        vcpus,
        faults: m.total(|s| &s.faults),
        fault_host_time: Duration::from_nanos(m.total(|s| &s.fault_host_ns)),
        fault_run_time: Duration::from_nanos(m.total(|s| &s.fault_run_ns)),
        resident: be.resident(),
        table_pages: be.table_pages(),
        generation: be.generation(),
        kicks: m.kicks(),
        flushes: m.total(|s| &s.flushes),
        frames_dropped: st.frames_dropped,
        drop_time: st.drop_time,
        zaps: st.zaps,
        zap_time: st.zap_time,
        interrupted: stop_requested(),
        snapshot: if cfg.snapshot {
            snapshot.or_else(|| Some(crate::inspect::dump_space(be.vm().space(), cfg.snapshot_leaves)))
        } else {
            None
        },
    })
}

/// Reads `out.len()` words of guest RAM at `gpa` (inside one page): through
/// the RAM object `(object, start gpa, offset)` when it is swappable, else
/// through the backend's host view (`None`: the page is not resident).
fn read_ram_words(
    be: &dyn MemBackend,
    ram: Option<&(Arc<vmspace::VmObject>, u64, u64)>,
    gpa: u64,
    out: &mut [u64],
) -> Option<()> {
    let Some((object, start, offset)) = ram else { return read_guest_words(be, gpa, out) };
    let mut bytes = vec![0u8; out.len() * 8];
    object.read(offset + gpa.checked_sub(*start)?, &mut bytes).ok()?;
    for (w, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().ok()?);
    }
    Some(())
}

type Devices<P> = crate::platform::PlatformDevices<P>;

/// The framebuffer device: a "framebuffer" device-memory segment behind a
/// PCI function's 64-bit BAR, the platform that traps ECAM and the PCI
/// windows, and the guest's program (vCPU 0 sizes, places and moves the
/// BAR; vCPU 1, if there is one, draws through it meanwhile).
fn setup_framebuffer<M: HostMemory>(be: &M, m: &mut Machine, f: &FbConfig) -> Result<Arc<Devices<M::Pages>>> {
    use crate::fbuf::{self, Fbuf};
    use crate::platform::{BarBacking, ECAM_BASE, Platform, PlatformDevices};
    let pixels = u64::from(f.width) * u64::from(f.height);
    let fb_size = (pixels * 4).next_power_of_two().max(PAGE);
    let model = Fbuf::new(fb_size, f.width, f.height)
        .ok_or_else(|| setup(format!("bad framebuffer geometry {}x{}", f.width, f.height)))?;
    let vm = be.vm();
    let id = vm.free_segment_id().ok_or_else(|| setup("no free segment id"))?;
    vm.alloc_segment(id, fb_size, crate::SegmentKind::DevMem { name: "framebuffer".into() })
        .map_err(|e| setup(format!("framebuffer segment: {e}")))?;
    let mut platform = Platform::new(ECAM_BASE);
    platform
        .attach(
            FB_DEVICE,
            Box::new(model),
            &[
                (fbuf::REG_BAR, BarBacking::Emulated),
                (fbuf::FB_BAR, BarBacking::Segment { id, prot: Prot::READ | Prot::WRITE }),
            ],
        )
        .map_err(|e| setup(format!("attach framebuffer: {e:?}")))?;
    let devs = Arc::new(PlatformDevices::new(platform, vm.clone()));
    m.mmio = Some(devs.clone());
    let shared = runtime::params(0) + P_FB_SHARED_WORDS;
    let writer = m.nvcpus() > 1;
    m.set_param(0, P_FB_ROLE, 1)?;
    m.set_param(0, P_FB_CONFIG, ECAM_BASE + (u64::from(FB_DEVICE) << 15))?;
    m.set_param(0, P_FB_REGS, FB_REGS)?;
    m.set_param(0, P_FB_BASE_A, FB_BASES[0])?;
    m.set_param(0, P_FB_BASE_B, FB_BASES[1])?;
    m.set_param(0, P_FB_MOVES, f.moves)?;
    m.set_param(0, P_FB_SHARED, shared)?;
    m.set_param(0, P_FB_PIXELS, if writer { pixels / 2 } else { pixels })?;
    if writer {
        m.set_param(1, P_FB_ROLE, 2)?;
        m.set_param(1, P_FB_SHARED, shared)?;
        m.set_param(1, P_FB_PIXELS, pixels)?;
    } else {
        // No writer: the mover does not wait for one.
        m.set_param(0, P_FB_SHARED_WORDS + 8, 1)?;
    }
    Ok(devs)
}

/// What the framebuffer part did, checked through the segment's node by
/// name (as another process sees it).
fn framebuffer_report<M: HostMemory>(
    be: &M,
    m: &Machine,
    devs: &Devices<M::Pages>,
    f: &FbConfig,
    vcpus: usize,
) -> Result<FbReport> {
    let name = be.vm().name().to_string();
    let view = crate::devmem::open(&name, "framebuffer", false).map_err(|e| setup(format!("framebuffer node: {e}")))?;
    let pixels = u64::from(f.width) * u64::from(f.height);
    let mut bytes = vec![0u8; (pixels * 4) as usize];
    view.read(0, &mut bytes).map_err(|e| setup(format!("framebuffer node: {e}")))?;
    let bad_pixels = bytes
        .chunks_exact(4)
        .enumerate()
        .filter(|(i, px)| u32::from_le_bytes([px[0], px[1], px[2], px[3]]) != fb_pixel(*i as u64))
        .count() as u64;
    let geo = m.param(0, P_FB_GEOMETRY);
    let stats = devs.stats();
    Ok(FbReport {
        geometry: (geo as u32, (geo >> 32) as u32),
        bar_size: m.param(0, P_FB_BAR_SIZE),
        fb_size: view.len(),
        guest_moves: m.param(0, P_FB_COUNT),
        applied_moves: stats.bar_moves,
        retried_writes: if vcpus > 1 { m.param(1, P_FB_COUNT) } else { 0 },
        master_aborts: stats.unclaimed,
        bad_pixels,
        node: view.path().display().to_string(),
    })
}

/// Answers a control request of a running VM (see `vmm::control`):
/// - `inspect`: segments, mappings, vCPU registers as of their last exit,
///   counters, and the decoded tables (what `vmm inspect NAME` prints);
/// - `framebuffer`: `width height stride size` of the framebuffer, whose
///   pixels the client maps by name from the "framebuffer" node.
fn control_answer<M: HostMemory>(cmd: &str, be: &M, m: &Machine, devs: Option<&Devices<M::Pages>>) -> String {
    use std::fmt::Write;
    let vm = be.vm();
    match cmd {
        "inspect" => {
            let mut o = String::new();
            let _ = writeln!(o, "VM {:?} (pid {})", vm.name(), std::process::id());
            let _ = writeln!(o, "segments:");
            for s in vm.segments() {
                let kind = match &s.kind {
                    crate::SegmentKind::SysMem => "sysmem".to_string(),
                    crate::SegmentKind::DevMem { name } => format!("devmem {name:?}"),
                };
                let node = s.node.as_ref().map(|p| format!(" node {}", p.display())).unwrap_or_default();
                let _ = writeln!(o, "  {:2}: {kind}, {} KiB, {} mapping(s){node}", s.id, s.len >> 10, s.mappings);
            }
            let _ = writeln!(o, "segment mappings:");
            for x in vm.mappings() {
                let _ = writeln!(
                    o,
                    "  [{:#014x}, {:#014x}) segment {} offset {:#x} {:?}",
                    x.gpa.0,
                    x.gpa.0 + x.len,
                    x.segment,
                    x.offset,
                    x.prot
                );
            }
            let _ = writeln!(o, "vCPUs (registers as of the last exit):");
            for (i, st) in m.stats.iter().enumerate() {
                let r = *st.last_regs.lock().unwrap_or_else(|e| e.into_inner());
                let g = &r.gpr;
                let _ = writeln!(
                    o,
                    "  vCPU {i}: rip {:#x} rflags {:#x} rax {:#x} rcx {:#x} rdx {:#x} rbx {:#x} rsp {:#x} rbp {:#x} rsi {:#x} rdi {:#x}",
                    r.rip, r.rflags, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
                );
                let _ = writeln!(
                    o,
                    "          r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
                    g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
                );
                let _ = writeln!(
                    o,
                    "          exits {} nested faults {} MMIO exits {} emulated {}",
                    st.exits.load(Ordering::Relaxed),
                    st.faults.load(Ordering::Relaxed),
                    st.mmio_exits.load(Ordering::Relaxed),
                    st.emulated.load(Ordering::Relaxed)
                );
            }
            if let Some(d) = devs {
                let s = d.stats();
                let _ = writeln!(
                    o,
                    "platform: {} MMIO accesses, {} BAR moves, {} master aborts",
                    s.mmio, s.bar_moves, s.unclaimed
                );
            }
            o.push_str(&crate::inspect::dump_space(be.vm().space(), 4));
            o
        }
        "framebuffer" => match devs {
            Some(d) => {
                let mut p = d.platform.lock().unwrap_or_else(|e| e.into_inner());
                match p.fbuf(FB_DEVICE) {
                    Some(f) => format!("{} {} {} {}\n", f.width(), f.height(), f.stride(), f.fb_size()),
                    None => "error: no framebuffer\n".into(),
                }
            }
            None => "error: no framebuffer\n".into(),
        },
        other => format!("error: unknown command {other:?} (inspect, framebuffer)\n"),
    }
}
