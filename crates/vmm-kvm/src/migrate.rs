//! Live migration of a running KVM guest: the built-in workload on a
//! [`Guest`] whose memory ([`vmm::migration::vm::VmMemory`]) and vCPUs
//! ([`crate::vcpu_state`]) move to another [`Guest`] over a connection,
//! driven by the pre-copy engine of [`vmm::migration`].
//!
//! # Source
//!
//! [`Guest::run_source`] runs the workload; after `migrate_after` the
//! coordinator runs the engine against [`KvmSource`]:
//!
//! - every harvest the engine asks for is a **harvest point**: the vCPUs
//!   stop cooperatively at an operation boundary, the system-memory dirty
//!   bits are read and cleared (the backend makes the cleared bits
//!   effective before it returns), the guests' ledgers are compared with
//!   them (a page written by the guest and not reported is counted
//!   `missed`: the run fails) and cleared through the VM's host-write path
//!   (which marks them dirty), and only then are the other segments (the
//!   per-vCPU parameter blocks, kernel stacks and the ledgers themselves)
//!   harvested, so the ledger clears travel in the same round; on a
//!   shadow-paging host the RAM harvest of each of the attempt's harvest
//!   points makes its cleared bits effective by zapping every shadow page
//!   rather than dropping each dirty frame ([`MIGRATION_ZAP_THRESHOLD`]: the drops cost the engine's
//!   thread, the zap's refaults cost the vCPU threads);
//! - pages are read a run of consecutive dirty pages at a time
//!   ([`MigrationSource::read_pages`], one read of the segment) and
//!   written on the target the same way;
//! - at switch-over the vCPUs stay parked; [`crate::vcpu_state::VcpuTwin`]
//!   completes each one's pending port exit and saves its state;
//! - on success the source's vCPU threads leave (the guest runs on the
//!   target); on failure the engine resumed them and put every harvested
//!   bit back, and the guest runs to its end here, with every check.
//!
//! # Target
//!
//! [`Guest::run_target`] builds the same machine (same configuration, as
//! QEMU's `-incoming`), receives into [`KvmTarget`] (dirty tracking off
//! while pages arrive through the host view, on again before the vCPUs are
//! restored, CR3 replaced by the target's table root), clears the pause
//! request in every parameter block, and runs the rest of the workload:
//! harvest rounds with ledger checks, the guests' verify pass, and the
//! replay of every operation since the guest first started (the operation
//! counts are guest memory) against the target's memory.
//!
//! # Swappable memory
//!
//! With [`GuestConfig::reservoir`] below guest memory plus the runtime,
//! guest RAM is a swappable segment (as `vmm run --reservoir`): a fault
//! that finds the reservoir exhausted swaps cold pages out. Such a guest
//! migrates like any other: the first pass sends its resident and
//! swapped-out pages (read from the swap file without swapping them in),
//! the harvest points report pages swapped out dirty, and the ledger
//! comparison holds as for plain RAM. Each side backs its memory as its
//! own configuration says (a swappable source may go to a plain target and
//! back); the layout check compares sizes and kinds only. Each side runs
//! a swapper thread ([`vmm::swapper::Swapper`], as `vmm run` does) that
//! keeps its reservoir above the low-water mark while the guest runs, is
//! migrated or is received, beside the faults that still reclaim when
//! they find the reservoir exhausted ([`GuestReport::swapper`]).
//!
//! # Triggers and convergence
//!
//! A source migrates after a delay ([`Guest::run_source`]) or when its
//! control socket asks (`migrate ADDR`, [`Guest::run_on_command`]; `vmm
//! migrate NAME ADDR`). With [`SourceConfig::auto_converge`] the engine's
//! throttle ([`MigrationSource::throttle`]) sets the machine's vCPU
//! throttle, and a ticker thread kicks the vCPUs every
//! [`vmm::machine::THROTTLE_SLICE`] while it is set, so that the vCPU loop
//! gets to sleep its share; the throttle is lifted when the attempt ends.
//!
//! # Known gaps
//!
//! - No framebuffer or other device model runs in a migrating guest, so
//!   none is migrated here (`vmm::migration::devices` carries the PCI
//!   platform's state for a VMM that has one).
//! - The target's resume time is taken when the engine acks, a few
//!   milliseconds before its vCPU threads have entered the guest.

use crate::backend::MemBackend;
use crate::detect::detect;
use crate::guest::*;
use crate::machine::{Event, Machine};
use crate::mem::PAGE;
use crate::run::{Round, VcpuReport};
use crate::runtime;
use crate::slot_pages::SlotPages;
use crate::space::SpaceBackend;
use crate::vcpu::Vcpu;
use crate::vcpu_state::{VcpuState, VcpuTwin};
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use crate::workload::{Mode, Replay, Spec, checksum};
use vmspace::Gpa;

use nested_pt::Prot;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmm::migration::vm::VmMemory;
use vmm::migration::{
    HostError, Layout, MemRange, MigrationError, MigrationSource, MigrationSummary, MigrationTarget, Progress,
    SourceConfig, StateBlob, StateKind, TargetConfig, TargetSummary,
};

/// The machine a migrating guest runs on; the target must be built with
/// the same values.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// vCPUs (1 to [`runtime::MAX_VCPUS`]).
    pub vcpus: usize,
    /// Guest RAM in bytes, split evenly between the vCPUs.
    pub mem_bytes: u64,
    /// Workload of every vCPU.
    pub mode: Mode,
    /// Percentage of random operations that write.
    pub write_pct: u32,
    /// Seed of the generators.
    pub seed: u64,
    /// Paging mode; `None` runs the start-up detection.
    pub paging: Option<PagingMode>,
    /// Pages a nested fault maps around the faulting one.
    pub fault_around: u32,
    /// The VM's name (a process-unique one when `None`).
    pub name: Option<String>,
    /// Map every RAM page before the guest starts, on the source and on a
    /// target once the guest arrived (no nested faults: the guest writes
    /// at full speed from the start; benchmarks).
    pub prefault: bool,
    /// Bytes of RAM reservoir (guest memory plus the runtime's pages), as
    /// `vmm run --reservoir`: smaller than that, guest memory is a
    /// swappable segment whose cold pages go to a swap file (faults that
    /// find the reservoir exhausted swap pages out). `None`: enough for
    /// everything, nothing swaps. Each side of a migration uses its own.
    pub reservoir: Option<u64>,
    /// Directory of the anonymous swap file (the system's temporary
    /// directory when `None`).
    pub swap_dir: Option<std::path::PathBuf>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            vcpus: 2,
            mem_bytes: 64 << 20,
            mode: Mode::Mixed,
            write_pct: 50,
            seed: 0x5eed,
            paging: None,
            fault_around: 16,
            name: None,
            prefault: false,
            reservoir: None,
            swap_dir: None,
        }
    }
}

/// What one run (or run segment) of the workload found.
#[derive(Debug, Clone, Default)]
pub struct GuestReport {
    /// Harvest rounds with their ledger comparison (migration harvests
    /// included).
    pub rounds: Vec<Round>,
    /// Per-vCPU results of the final checks (empty when the guest left by
    /// migration: the target checks it).
    pub vcpus: Vec<VcpuReport>,
    /// Workload time in this process.
    pub elapsed: Duration,
    /// Nested faults served in this process.
    pub faults: u64,
    /// What the swapper thread did in this process, when guest memory is
    /// swappable.
    pub swapper: Option<vmm::swapper::SwapperStats>,
}

impl GuestReport {
    /// No ledger round missed or invented a page, every vCPU's memory
    /// matches its replay and its checksum is the expected one.
    pub fn ok(&self) -> bool {
        self.rounds.iter().all(|r| r.missed == 0 && r.spurious == 0)
            && self.vcpus.iter().all(|v| {
                v.bad_pages == 0
                    && v.guest_bad_headers == 0
                    && v.data_errors == 0
                    && v.guest_checksum == v.expected_checksum
            })
    }

    /// Pages written by the guests (ledger) over all rounds.
    pub fn ledger_pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.ledger).sum()
    }
}

/// How a source run ended.
#[derive(Debug)]
pub enum SourceOutcome {
    /// The guest now runs on the target.
    Migrated(MigrationSummary, GuestReport),
    /// The migration failed; the guest ran to its end here.
    Failed(MigrationError, GuestReport),
    /// No migration was asked for ([`Guest::run_on_command`]); the guest
    /// ran to its end here.
    NotRequested(GuestReport),
}

/// When a source migrates.
enum When<'a> {
    /// After this long into the run, over this connection.
    After(Duration, &'a TcpStream),
    /// When the control socket asks (`migrate ADDR`).
    OnCommand(std::sync::mpsc::Receiver<Request>),
}

/// What triggered an attempt.
enum Due<'a> {
    Timer(&'a TcpStream),
    Command(TcpStream),
}

/// A migration the run is to make.
struct Plan<'a> {
    when: When<'a>,
    config: &'a SourceConfig,
    progress: &'a mut dyn FnMut(&Progress),
}

/// A control request to migrate, with where its answer goes.
struct Request {
    addr: String,
    reply: std::sync::mpsc::Sender<String>,
}

/// Connects to a migration target (5 s timeout per address).
fn connect(addr: &str) -> std::result::Result<TcpStream, String> {
    use std::net::ToSocketAddrs;
    let addrs = addr.to_socket_addrs().map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let mut last = format!("address {addr:?} resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(c) => return Ok(c),
            Err(e) => last = format!("cannot reach the target at {a}: {e}"),
        }
    }
    Err(last)
}

/// What the source's coordinator hands back.
enum Coord {
    Migrated(MigrationSummary),
    Local(Option<MigrationError>),
}

/// Everything of a guest but its machine (so the coordinator can borrow it
/// while the machine runs).
struct Core {
    cfg: GuestConfig,
    vm: Arc<KvmVm>,
    be: Arc<SpaceBackend>,
    twins: Vec<VcpuTwin>,
    specs: Vec<Spec>,
    npages: u64,
    mem: VmMemory<SlotPages>,
    rounds: Vec<Round>,
    ram_seg: u32,
    ledger_seg: (u32, u64),
    /// The zap threshold of a migration attempt's RAM harvests.
    migration_zap: u64,
    /// A timed migration also waits until every vCPU of a `Mixed` or
    /// `Touch` workload has written each page of its region once.
    after_first_pass: bool,
}

impl Core {
    /// Whether a timed migration may start as far as the first pass is
    /// concerned ([`Guest::set_migrate_after_first_pass`]): always when the
    /// gate is off or the workload has no sequential pass, else once every
    /// vCPU's operation count reached its region's pages.
    fn first_pass_done(&self, m: &Machine) -> bool {
        !self.after_first_pass
            || self
                .specs
                .iter()
                .enumerate()
                .all(|(i, s)| !matches!(s.mode, Mode::Mixed | Mode::Touch) || m.param(i, P_OPS) >= s.npages)
    }
}

/// A guest running the built-in workload on KVM, ready to migrate.
pub struct Guest {
    machine: Machine,
    core: Core,
    data_errors: Vec<AtomicU64>,
    mode: PagingMode,
    /// Keeps a swappable guest's reservoir above its low-water mark while
    /// it runs, migrates or receives (`None` for plain RAM).
    swapper: Option<vmm::swapper::Swapper>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("cfg", &self.core.cfg).finish_non_exhaustive()
    }
}

fn host(op: &'static str) -> impl Fn(KvmError) -> HostError {
    move |e| HostError::new(op, e.to_string())
}

impl Guest {
    /// Makes a migration started after a delay ([`Guest::run_source`])
    /// also wait until every vCPU of a `Mixed` (or `Touch`) workload has
    /// written each page of its region once, so that the guest's memory
    /// holds data rather than never-written zero pages when the first pass
    /// starts (the benchmark's "the same bytes" as its plain copies). Off
    /// by default.
    pub fn set_migrate_after_first_pass(&mut self, on: bool) {
        self.core.after_first_pass = on;
    }

    /// Builds the machine of `cfg`. A source (`incoming == false`) gets its
    /// workload parameters; a target gets them with the guest's memory.
    pub fn new(cfg: &GuestConfig, incoming: bool) -> Result<Guest> {
        if cfg.vcpus == 0 || cfg.vcpus > runtime::MAX_VCPUS {
            return Err(KvmError::Setup(format!("vCPU count must be 1..={}", runtime::MAX_VCPUS)));
        }
        let npages = cfg.mem_bytes / cfg.vcpus as u64 / PAGE;
        let ram_base = runtime::RAM_BASE;
        if npages == 0
            || !cfg.mem_bytes.is_multiple_of(PAGE)
            || cfg.mem_bytes > vmm::platform::PCI_WINDOW_64.0 - ram_base
        {
            return Err(KvmError::Setup("bad memory size".into()));
        }
        let mode = match cfg.paging {
            Some(m) => m,
            None => detect()?.mode,
        };
        let vm = Arc::new(KvmVm::new()?);
        let rt_bytes = (runtime::ROM_PAGES + cfg.vcpus as u64 * runtime::DATA_PAGES) * PAGE
            + cfg.vcpus as u64 * runtime::ledger_bytes(npages);
        let table_bytes = (cfg.mem_bytes / 512 + (8 << 20)).next_multiple_of(PAGE);
        let need = cfg.mem_bytes + rt_bytes + (1 << 20);
        let (reservoir_bytes, swapping) = match cfg.reservoir {
            Some(r) if r < need => {
                let min = rt_bytes + (1 << 20) + vmm::run::MIN_SWAP_FRAMES * PAGE;
                if r < min || !r.is_multiple_of(PAGE) {
                    return Err(KvmError::Setup(format!(
                        "a reservoir smaller than guest memory must be a multiple of 4 KiB and at least {} KiB",
                        min >> 10
                    )));
                }
                if cfg.prefault {
                    return Err(KvmError::Setup("prefaulting is not supported with swappable memory".into()));
                }
                (r, true)
            }
            Some(r) => (r, false),
            None => (need, false),
        };
        let be = Arc::new(SpaceBackend::create(
            vm.clone(),
            reservoir_bytes,
            table_bytes,
            mode,
            cfg.fault_around,
            cfg.name.as_deref(),
        )?);
        if swapping {
            let dir = cfg.swap_dir.clone().unwrap_or_else(std::env::temp_dir);
            let file = vmspace::swap_file_in(&dir)
                .map_err(|e| KvmError::Setup(format!("swap file in {}: {e}", dir.display())))?;
            vmm::host::map_swappable_ram(be.segments(), ram_base, cfg.mem_bytes, Prot::READ | Prot::WRITE, file)
                .map_err(|e| KvmError::Setup(format!("swappable RAM: {e}")))?;
        } else {
            let ram = be.ram_segment(cfg.mem_bytes)?;
            be.map(&ram, ram_base, cfg.mem_bytes, Prot::READ | Prot::WRITE)?;
        }
        be.map_runtime(cfg.vcpus, npages)?;
        let swapper = if swapping {
            let s = vmm::swapper::Swapper::spawn(be.segments().clone(), vmm::swapper::SwapperConfig::default());
            Some(s.map_err(|e| KvmError::Setup(format!("swapper: {e}")))?)
        } else {
            None
        };
        if cfg.prefault && !incoming {
            be.space().populate(Gpa(ram_base), cfg.mem_bytes).map_err(|e| KvmError::Setup(format!("populate: {e}")))?;
            // The memory is allocated now; map it in the host view too,
            // so that reading it out (migration) is copies, not a fault
            // per page (see `populate_host_view`).
            populate_host_view_read(&be);
        }
        if cfg.prefault && incoming {
            // Before the source connects (see `populate_host_view`).
            populate_host_view(&be);
        }
        let code = vmm::guest::code();
        let mut twins = Vec::new();
        let mut vcpus: Vec<Box<dyn vmm::hv::Vcpu>> = Vec::new();
        for i in 0..cfg.vcpus {
            let mut v = Vcpu::new(&vm, i as u32)?;
            v.setup_long_mode(&runtime::long_mode_setup(&code, i, cfg.vcpus, be.cr3(), be.rom_base()))?;
            twins.push(v.twin(&vm)?);
            vcpus.push(Box::new(v));
        }
        let machine = Machine::new(be.clone(), vcpus, mode == PagingMode::HardwareNested);
        let specs: Vec<Spec> =
            (0..cfg.vcpus).map(|i| Spec::for_vcpu(i, cfg.mode, ram_base, npages, cfg.seed, cfg.write_pct)).collect();
        if !incoming {
            for (i, s) in specs.iter().enumerate() {
                machine.set_param(i, P_MODE, s.mode as u64)?;
                machine.set_param(i, P_BASE, s.base)?;
                machine.set_param(i, P_NPAGES, s.npages)?;
                machine.set_param(i, P_SEED, s.seed)?;
                machine.set_param(i, P_WRITE_THRESH, s.write_thresh())?;
                machine.set_param(i, P_MAGIC, s.magic)?;
                machine.set_param(i, P_LEDGER, runtime::ledger(i, npages))?;
            }
        }
        let segs = be.segments().clone();
        let ram_seg = segs.mapping_at(ram_base).ok_or_else(|| KvmError::Setup("RAM not mapped".into()))?.segment;
        let lm = segs.mapping_at(runtime::LEDGER_BASE).ok_or_else(|| KvmError::Setup("ledger not mapped".into()))?;
        let mem = VmMemory::new(segs, Some(be.clone() as Arc<dyn MemBackend>));
        let data_errors = (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect();
        Ok(Guest {
            machine,
            core: Core {
                cfg: cfg.clone(),
                vm,
                be,
                twins,
                specs,
                npages,
                mem,
                rounds: Vec::new(),
                ram_seg,
                ledger_seg: (lm.segment, lm.offset),
                migration_zap: MIGRATION_ZAP_THRESHOLD,
                after_first_pass: false,
            },
            data_errors,
            mode,
            swapper,
        })
    }

    /// The paging mode the machine runs in.
    pub fn paging(&self) -> PagingMode {
        self.mode
    }

    /// The VM layer (segments, mappings, the vmspace).
    pub fn vm(&self) -> &Arc<vmm::Vm<SlotPages>> {
        self.core.be.segments()
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        self.core.be.segments().name()
    }

    /// Guest memory in the migration's layout (every segment), bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.core.mem.layout().map(|l| l.bytes()).unwrap_or(0)
    }

    /// Pages received by a migration in and not yet delivered out.
    pub fn received_pages(&self) -> u64 {
        self.core.mem.received_pages()
    }

    /// The vCPU twins (state save and restore), for tests.
    pub fn twins(&mut self) -> &mut [VcpuTwin] {
        &mut self.core.twins
    }

    /// Runs the workload for `duration` with `rounds` evenly spaced harvest
    /// rounds, and migrates it over `stream` after `migrate_after` (the
    /// stream's peer runs [`Guest::run_target`]). `progress` sees every
    /// engine round.
    pub fn run_source(
        &mut self,
        duration: Duration,
        rounds: u32,
        migrate_after: Duration,
        stream: &TcpStream,
        config: &SourceConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SourceOutcome> {
        let mut plan = Some(Plan { when: When::After(migrate_after, stream), config, progress });
        let (coord, rep) = self.run_workload(duration, rounds, &mut plan)?;
        Ok(match coord {
            Coord::Migrated(s) => SourceOutcome::Migrated(s, rep),
            Coord::Local(Some(e)) => SourceOutcome::Failed(e, rep),
            Coord::Local(None) => {
                return Err(KvmError::Setup("the workload ended before the migration started".into()));
            }
        })
    }

    /// Runs the workload for `duration` with `rounds` harvest rounds,
    /// serving the VM's control socket ([`vmm::control`], in its node
    /// directory, reached by name): the command `migrate ADDR` connects to
    /// the target listening on ADDR (`host:port`) and migrates the guest
    /// there (`config`'s `shared_clock` is set when ADDR is a loopback
    /// address). The request's answer comes when the attempt ended:
    /// `migrated: ` and the summary's figures (`total_ms`, `downtime_ms`,
    /// `rounds`, `converged`, `max_throttle_pct`, `bytes_sent`,
    /// `pages_sent`, as `name value` pairs) on success (the run then ends:
    /// the guest runs on the target), `error: ` and why on failure (the
    /// guest keeps running here, and another `migrate` may be asked).
    /// Returns [`SourceOutcome::NotRequested`] when the run ended without
    /// a successful migration and none failed, [`SourceOutcome::Failed`]
    /// with the last failure when one did.
    pub fn run_on_command(
        &mut self,
        duration: Duration,
        rounds: u32,
        config: &SourceConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SourceOutcome> {
        let listener = vmm::control::bind(self.core.be.segments().node_dir())
            .map_err(|e| KvmError::Setup(format!("control socket: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let stop = AtomicBool::new(false);
        let handler = |cmd: &str| -> String {
            let Some(addr) = cmd.strip_prefix("migrate ").map(str::trim) else {
                return format!("error: unknown command {cmd:?} (migrate ADDR)\n");
            };
            let (rtx, rrx) = std::sync::mpsc::channel();
            if tx.send(Request { addr: addr.to_string(), reply: rtx }).is_err() {
                return "error: the VM is stopping\n".into();
            }
            rrx.recv().unwrap_or_else(|_| "error: the VM stopped before it could migrate\n".into())
        };
        let res = std::thread::scope(|s| {
            s.spawn(|| vmm::control::serve(&listener, &stop, &handler));
            let mut plan = Some(Plan { when: When::OnCommand(rx), config, progress });
            let r = self.run_workload(duration, rounds, &mut plan);
            drop(plan);
            stop.store(true, Ordering::SeqCst);
            r
        });
        let (coord, rep) = res?;
        Ok(match coord {
            Coord::Migrated(s) => SourceOutcome::Migrated(s, rep),
            Coord::Local(Some(e)) => SourceOutcome::Failed(e, rep),
            Coord::Local(None) => SourceOutcome::NotRequested(rep),
        })
    }

    /// Runs the workload here only (no migration): `duration`, `rounds`
    /// harvest rounds, then every check.
    pub fn run_local(&mut self, duration: Duration, rounds: u32) -> Result<GuestReport> {
        Ok(self.run_workload(duration, rounds, &mut None)?.1)
    }

    /// Receives a migration from `stream` (into this machine, built with
    /// the source's configuration), then runs the rest of the workload for
    /// `duration` with `rounds` harvest rounds and every check.
    pub fn run_target(
        &mut self,
        stream: &TcpStream,
        config: &TargetConfig,
        duration: Duration,
        rounds: u32,
    ) -> Result<(TargetSummary, GuestReport)> {
        let sum = self.receive(stream, config)?;
        let rep = self.run_local(duration, rounds)?;
        Ok((sum, rep))
    }

    /// Receives a migration from `stream` into this machine; afterwards
    /// [`run_local`](Self::run_local) continues the guest.
    pub fn receive(&mut self, stream: &TcpStream, config: &TargetConfig) -> Result<TargetSummary> {
        let mut t = KvmTarget { core: &mut self.core, machine: &self.machine };
        let sum = vmm::migration::receive_tcp(&mut t, stream, config, Some(Duration::from_secs(60)))
            .map_err(|e| KvmError::Setup(format!("incoming migration: {e}")))?;
        if self.core.cfg.prefault {
            let (ram, len) = (runtime::RAM_BASE, self.core.cfg.mem_bytes);
            self.core.be.space().populate(Gpa(ram), len).map_err(|e| KvmError::Setup(format!("populate: {e}")))?;
        }
        Ok(sum)
    }

    fn run_workload(
        &mut self,
        duration: Duration,
        rounds: u32,
        plan: &mut Option<Plan<'_>>,
    ) -> Result<(Coord, GuestReport)> {
        let start = Instant::now();
        let data_errors = &self.data_errors;
        let handler = |i: usize, ev: Event| vmm::run::workload_event(i, ev, data_errors);
        let core = &mut self.core;
        let coord = self.machine.run(handler, |m| {
            let interval = duration / (rounds + 1);
            let mut next_round = start + interval;
            let end = start + duration;
            let mut failed = None;
            loop {
                let now = Instant::now();
                if now >= end || m.control.finished() > 0 {
                    break;
                }
                let due = match plan.as_mut().map(|p| &mut p.when) {
                    Some(When::After(after, stream)) if now >= start + *after && core.first_pass_done(m) => {
                        Some((Due::Timer(stream), None))
                    }
                    Some(When::OnCommand(rx)) => match rx.try_recv() {
                        Ok(req) => match connect(&req.addr) {
                            Ok(c) => Some((Due::Command(c), Some(req))),
                            Err(e) => {
                                let _ = req.reply.send(format!("error: {e}\n"));
                                None
                            }
                        },
                        Err(_) => None,
                    },
                    _ => None,
                };
                if let Some((due, req)) = due
                    && let Some(Plan { config, progress, .. }) = plan.as_mut()
                {
                    let mut config = (*config).clone();
                    let stream = match &due {
                        Due::Timer(s) => *s,
                        Due::Command(c) => {
                            config.shared_clock = c.peer_addr().map(|a| a.ip().is_loopback()).unwrap_or(false);
                            c
                        }
                    };
                    let config = &config;
                    let mut src = KvmSource { core: &mut *core, machine: m, paused: false, cache: Vec::new() };
                    let ticking = AtomicBool::new(true);
                    let r = std::thread::scope(|s| {
                        // Auto-converge's throttle acts at exits: kick every
                        // slice while a throttle is set.
                        s.spawn(|| throttle_ticker(m, &ticking));
                        let r = vmm::migration::migrate_tcp(
                            &mut src,
                            stream,
                            config,
                            Some(Duration::from_secs(60)),
                            &mut **progress,
                        );
                        ticking.store(false, Ordering::SeqCst);
                        r
                    });
                    // The engine lifted it on failure; after success the
                    // vCPUs leave. Lifted either way.
                    m.control.set_throttle(0);
                    if let Some(req) = req {
                        let _ = req.reply.send(match &r {
                            Ok(s) => format!(
                                "migrated: total_ms {:.1} downtime_ms {:.1} rounds {} converged {} max_throttle_pct {} bytes_sent {} pages_sent {}\n",
                                s.total_ms,
                                s.downtime_ms,
                                s.rounds,
                                s.converged,
                                s.max_throttle_pct,
                                s.bytes_sent,
                                s.pages_sent
                            ),
                            Err(e) => format!("error: migration failed: {e}; the guest keeps running here\n"),
                        });
                    } else {
                        *plan = None;
                    }
                    match r {
                        Ok(s) => {
                            core.mem.migrated_out();
                            // The guest runs on the target now.
                            m.control.request_stop();
                            for k in m.kick_handles() {
                                k.kick();
                            }
                            return Ok(Coord::Migrated(s));
                        }
                        Err(e) => failed = Some(e),
                    }
                    continue;
                }
                if now >= next_round {
                    let r = core.harvest_point(m, false, false)?;
                    drop(r);
                    next_round += interval;
                }
                std::thread::sleep(Duration::from_millis(2).min(end.saturating_duration_since(Instant::now())));
            }
            for i in 0..m.nvcpus() {
                m.set_param(i, P_CTRL, 2)?;
            }
            m.control.wait_all_paused(m.nvcpus(), Duration::from_secs(600))?;
            Ok::<_, KvmError>(Coord::Local(failed))
        })?;
        let elapsed = start.elapsed();
        let faults = self.machine.total(|s| &s.faults);
        if let Some(e) = self.swapper.as_ref().and_then(vmm::swapper::Swapper::error) {
            return Err(KvmError::Setup(format!("swapper: {e}")));
        }
        let swapper = self.swapper.as_ref().map(vmm::swapper::Swapper::stats);
        if let Coord::Migrated(_) = coord {
            let rep = GuestReport {
                rounds: std::mem::take(&mut self.core.rounds),
                vcpus: Vec::new(),
                elapsed,
                faults,
                swapper,
            };
            return Ok((coord, rep));
        }
        // Every vCPU finished (the verify pass only reads): a last round.
        self.core.harvest_point(&self.machine, true, false)?;
        let vcpus = self.core.check(&self.machine, &self.data_errors)?;
        let rep = GuestReport { rounds: std::mem::take(&mut self.core.rounds), vcpus, elapsed, faults, swapper };
        Ok((coord, rep))
    }
}

impl Core {
    fn layout(&self) -> std::result::Result<Layout, HostError> {
        self.mem.layout()
    }

    /// One harvest point (module doc): the bitmaps of every range of the
    /// layout, in order. `paused`: the vCPUs are already stopped (or done).
    /// `migrating`: the bits failed attempts put back are added (after the
    /// ledger comparison, which they are not part of).
    fn harvest_point(&mut self, m: &Machine, paused: bool, migrating: bool) -> Result<Vec<Vec<u64>>> {
        let tp = Instant::now();
        if !paused {
            m.pause_all(Duration::from_secs(30))?;
        }
        let pause = tp.elapsed();
        let r = self.harvest_paused(pause, migrating);
        if !paused {
            m.resume_all()?;
        }
        r
    }

    fn harvest_paused(&mut self, pause: Duration, migrating: bool) -> Result<Vec<Vec<u64>>> {
        let layout = self.layout().map_err(|e| KvmError::Setup(e.to_string()))?;
        let ram_idx = layout
            .ranges
            .iter()
            .position(|r| vmm::migration::vm::split_addr(r.gpa).0 == self.ram_seg)
            .ok_or_else(|| KvmError::Setup("RAM segment not in the layout".into()))?;
        let mut out: Vec<Vec<u64>> = layout.ranges.iter().map(|r| vec![0u64; r.bitmap_words()]).collect();
        let th = Instant::now();
        // A migration's RAM harvest zaps (MIGRATION_ZAP_THRESHOLD); the
        // small segments after it drop their few frames as usual.
        let saved_zap = migrating.then(|| self.be.zap_threshold.swap(self.migration_zap, Ordering::Relaxed));
        let r = self.mem.harvest_fresh(&layout.ranges[ram_idx], &mut out[ram_idx]);
        if let Some(z) = saved_zap {
            self.be.zap_threshold.store(z, Ordering::Relaxed);
        }
        r.map_err(|e| KvmError::Setup(e.to_string()))?;
        let harvest = th.elapsed();
        // The ledgers against the RAM bitmap (segment page = RAM page).
        let ram = &out[ram_idx];
        let npages = self.npages;
        let mut round = Round { pause, harvest, ..Default::default() };
        round.dirty = ram.iter().map(|w| u64::from(w.count_ones())).sum();
        let lbytes = runtime::ledger_bytes(npages) as usize;
        let (lseg, loff) = self.ledger_seg;
        let segs = self.be.segments();
        for i in 0..self.cfg.vcpus {
            let mut led = vec![0u8; lbytes];
            let off = loff + (runtime::ledger(i, npages) - runtime::LEDGER_BASE);
            segs.read_segment(lseg, off, &mut led).map_err(|e| KvmError::Setup(format!("ledger: {e}")))?;
            round.compare_ledger(&led, ram, i as u64 * npages, npages);
            // Cleared through the host-write path, which marks the pages
            // dirty: harvested below, in this same point.
            if led.iter().any(|&b| b != 0) {
                segs.write_segment(lseg, off, &vec![0u8; lbytes])
                    .map_err(|e| KvmError::Setup(format!("ledger: {e}")))?;
            }
        }
        self.rounds.push(round);
        for (i, r) in layout.ranges.iter().enumerate() {
            if i != ram_idx {
                self.mem.harvest_fresh(r, &mut out[i]).map_err(|e| KvmError::Setup(e.to_string()))?;
            }
            if migrating {
                self.mem.add_pending(r, &mut out[i]).map_err(|e| KvmError::Setup(e.to_string()))?;
            }
        }
        Ok(out)
    }

    /// Replays every vCPU's operations and compares memory (read through
    /// the segment: on a target, pages that arrived by migration need not
    /// be in the tables), the guest's checksum and its reports.
    fn check(&self, m: &Machine, data_errors: &[AtomicU64]) -> Result<Vec<VcpuReport>> {
        let ops: Vec<u64> = (0..self.cfg.vcpus).map(|i| m.param(i, P_OPS)).collect();
        let segs = self.be.segments();
        let ram_seg = self.ram_seg;
        let results: Vec<(u64, u64)> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let ops = ops[i];
                    s.spawn(move || {
                        let img = Replay::image(*spec, ops);
                        let mut bad = 0;
                        let mut page = vec![0u8; (USED_WORDS * 8) as usize];
                        for p in 0..spec.npages {
                            let off = spec.base - runtime::RAM_BASE + p * PAGE;
                            let b = (p * USED_WORDS) as usize;
                            let ok = segs.read_segment(ram_seg, off, &mut page).is_ok()
                                && page
                                    .chunks_exact(8)
                                    .zip(&img[b..b + USED_WORDS as usize])
                                    .all(|(w, &e)| u64::from_le_bytes(w.try_into().expect("8 bytes")) == e);
                            bad += u64::from(!ok);
                        }
                        let verified = crate::workload::verified_pages(spec, ops);
                        (bad, checksum(&img[..(verified * USED_WORDS) as usize]))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or((u64::MAX, 0))).collect()
        });
        Ok(results
            .into_iter()
            .enumerate()
            .map(|(i, (bad_pages, expected_checksum))| VcpuReport {
                ops: ops[i],
                faults: m.stats[i].faults.load(Ordering::Relaxed),
                exits: m.stats[i].exits.load(Ordering::Relaxed),
                bad_pages,
                guest_checksum: m.param(i, P_CHECKSUM),
                expected_checksum,
                guest_bad_headers: m.param(i, P_BAD_PAGES),
                data_errors: data_errors[i].load(Ordering::Relaxed),
                verified_pages: m.param(i, P_VERIFIED),
            })
            .collect())
    }
}

/// Kicks every vCPU each [`vmm::machine::THROTTLE_SLICE`] while the
/// machine's throttle is set, until `ticking` is cleared: a vCPU notices
/// its throttle at an exit, and a guest that rarely exits would not.
fn throttle_ticker(m: &Machine, ticking: &AtomicBool) {
    while ticking.load(Ordering::SeqCst) {
        if m.control.throttle() > 0 {
            for k in m.kick_handles() {
                k.kick();
            }
        }
        std::thread::sleep(vmm::machine::THROTTLE_SLICE);
    }
}

/// The zap threshold ([`SpaceBackend::zap_threshold`]) of the RAM harvest
/// of each harvest point a migration attempt makes on a shadow-paging
/// host: 0, a harvest that found anything dirty zaps all shadow pages (one ioctl on the engine's
/// thread; KVM updates a memory slot for it, a few milliseconds on a loaded
/// host) instead of dropping each dirty frame from KVM's view (an `madvise` of 6-8 µs per run of frames, on the
/// engine's thread too, which is the migration's critical path: nothing is
/// sent while it harvests). The zap's price, a shadow fault on every page
/// the guest touches afterwards, is paid by the vCPU threads, which slows
/// the guest rather than the stream. Measured with `vmm bench migrate
/// --mem 1G --write-pct 80` (`perf record -g`): dropping frames put 0.4 s of
/// `madvise` per GiB sent on the engine's thread (half its CPU time in
/// that run). The point's other segments (a few runtime pages) drop their
/// frames as usual, so a point zaps once; the run's own harvests outside
/// an attempt keep the backend's threshold.
pub const MIGRATION_ZAP_THRESHOLD: u64 = 0;

/// A running [`Guest`] as the engine's source (module doc).
pub struct KvmSource<'a> {
    core: &'a mut Core,
    machine: &'a Machine,
    paused: bool,
    /// The bitmaps of the last harvest point not yet handed out, by range.
    cache: Vec<Option<Vec<u64>>>,
}

impl std::fmt::Debug for KvmSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSource").field("paused", &self.paused).finish_non_exhaustive()
    }
}

impl MigrationSource for KvmSource<'_> {
    fn layout(&self) -> Layout {
        self.core.layout().unwrap_or_default()
    }

    fn resident(&mut self, range: &MemRange, bitmap: &mut [u64]) -> std::result::Result<(), HostError> {
        self.core.mem.resident(range, bitmap)
    }

    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), HostError> {
        self.core.mem.read_page(gpa, buf)
    }

    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), HostError> {
        self.core.mem.read_pages(gpa, buf)
    }

    fn zero_mask(&mut self, gpa: u64, n: usize) -> std::result::Result<Option<u64>, HostError> {
        self.core.mem.zero_mask(gpa, n)
    }

    fn harvest(&mut self, range: &MemRange, bitmap: &mut [u64]) -> std::result::Result<(), HostError> {
        let layout = self.core.layout()?;
        let idx =
            layout.ranges.iter().position(|r| r == range).ok_or_else(|| HostError::new("harvest", "unknown range"))?;
        if self.cache.get(idx).is_none_or(|c| c.is_none()) {
            // A new harvest point for every range; bits not handed out from
            // the previous one are kept.
            let fresh = self.core.harvest_point(self.machine, self.paused, true).map_err(host("harvest"))?;
            let old = std::mem::take(&mut self.cache);
            self.cache = fresh.into_iter().map(Some).collect();
            for (c, o) in self.cache.iter_mut().zip(old) {
                if let (Some(c), Some(o)) = (c.as_mut(), o) {
                    for (a, b) in c.iter_mut().zip(o) {
                        *a |= b;
                    }
                }
            }
        }
        let bits = self.cache[idx].take().expect("filled above");
        bitmap.copy_from_slice(&bits);
        Ok(())
    }

    fn set_dirty(&mut self, range: &MemRange, bitmap: &[u64]) -> std::result::Result<(), HostError> {
        self.core.mem.set_dirty(range, bitmap)
    }

    fn throttle(&mut self, pct: u8) -> std::result::Result<(), HostError> {
        self.machine.control.set_throttle(pct);
        Ok(())
    }

    fn pause(&mut self) -> std::result::Result<(), HostError> {
        self.machine.pause_all(Duration::from_secs(30)).map_err(|e| HostError::new("pause", e.to_string()))?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> std::result::Result<(), HostError> {
        self.paused = false;
        self.machine.resume_all().map_err(|e| HostError::new("resume", e.to_string()))
    }

    fn state(&mut self) -> std::result::Result<Vec<StateBlob>, HostError> {
        let mut blobs = vec![StateBlob { kind: StateKind::VmLayout, instance: 0, data: self.core.mem.layout_blob() }];
        for t in &mut self.core.twins {
            let st = t.save().map_err(host("vCPU state"))?;
            blobs.push(StateBlob { kind: StateKind::Vcpu, instance: t.index(), data: st.encode() });
        }
        Ok(blobs)
    }
}

/// A [`Guest`] being built by an incoming migration (module doc).
pub struct KvmTarget<'a> {
    core: &'a mut Core,
    machine: &'a Machine,
}

impl std::fmt::Debug for KvmTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmTarget").finish_non_exhaustive()
    }
}

/// Faults the whole host view of the guest's RAM in for writing, in one
/// call: pages arriving by migration are then plain copies, not one page
/// fault (allocation and zeroing) each. A kernel without
/// `MADV_POPULATE_WRITE` (before 5.14) falls back to faulting page by page.
/// A prefaulting target ([`GuestConfig::prefault`]) does it when it is
/// built, before the source connects (as QEMU's `-incoming` with
/// preallocated memory); otherwise [`MigrationTarget::prepare`] does, and
/// the source waits for it in the handshake.
///
/// Measured with `vmm bench migrate --mem 1G --write-pct 0 --json`
/// (`handshake_ms`): populating in `prepare` took 2.0 to 4.0 s of the
/// 4.1 to 6.1 s total. Populating on a thread of its own while the pages
/// arrive was worse: the copies outran it and faulted page by page
/// (`write_pages_ms` 139 ms to 2.8 s, throughput 696 to 265 MiB/s).
/// Populating the view of a source that is not prefaulted would allocate
/// every page its guest never touched, so such a source does not.
///
/// A prefaulting source maps its host view for reading when it is built
/// (`populate_host_view_read`; its memory is allocated by then, so this
/// allocates nothing): its first pass then reads pages without a fault
/// each. Measured with the same command, `read_pages_ms` went from 920 to
/// 212 ms at 0% writes; the populate itself takes 0.7 to 0.85 s per GiB at
/// build time on this host (about what the faults cost), so this moves
/// the cost out of the migration rather than removing it.
fn populate_host_view(be: &SpaceBackend) {
    let arena = vmspace::Reservoir::arena(&*be.reservoir());
    // SAFETY: the range is the reservoir's own shared mapping, which lives
    // as long as `be`; populating it faults pages in and changes no byte.
    let r = unsafe { libc::madvise(arena.host.as_ptr().cast(), arena.len, libc::MADV_POPULATE_WRITE) };
    // Best effort: without it, pages fault in one by one as they arrive.
    let _ = r;
}

/// Maps the host view of the reservoir for reading (`MADV_POPULATE_READ`),
/// best effort (module doc of `populate_host_view`).
fn populate_host_view_read(be: &SpaceBackend) {
    let arena = vmspace::Reservoir::arena(&*be.reservoir());
    // SAFETY: as in `populate_host_view`; populating for reading maps
    // pages and changes no byte.
    let r = unsafe { libc::madvise(arena.host.as_ptr().cast(), arena.len, libc::MADV_POPULATE_READ) };
    let _ = r;
}

impl MigrationTarget for KvmTarget<'_> {
    fn prepare(&mut self, layout: &Layout) -> std::result::Result<(), HostError> {
        self.core.mem.prepare(layout)?;
        if !self.core.cfg.prefault {
            populate_host_view(&self.core.be);
        }
        // Pages arrive through the host view; no vCPU runs yet, nothing to
        // track (tracking would fault every page in for write).
        self.core.be.segments().set_dirty_tracking(false).map_err(|e| HostError::new("prepare", e.to_string()))
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), HostError> {
        self.core.mem.write_page(gpa, data)
    }

    fn write_pages(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), HostError> {
        self.core.mem.write_pages(gpa, data)
    }

    /// In place: no vCPU runs while the guest arrives (they start at
    /// [`MigrationTarget::resume`]), and tracking is off meanwhile.
    fn receive_pages(
        &mut self,
        gpa: u64,
        len: usize,
        recv: &mut dyn FnMut(&[vmm::migration::RawDest]),
    ) -> std::result::Result<bool, HostError> {
        self.core.mem.receive_pages(gpa, len, recv)
    }

    fn zero_page(&mut self, gpa: u64) -> std::result::Result<(), HostError> {
        self.core.mem.zero_page(gpa)
    }

    fn mark_received(&mut self, range: &MemRange, bitmap: &[u64]) -> std::result::Result<(), HostError> {
        self.core.mem.mark_received(range, bitmap)
    }

    fn apply_state(&mut self, blobs: Vec<StateBlob>) -> std::result::Result<(), HostError> {
        let n = self.core.twins.len();
        let mut states: Vec<Option<VcpuState>> = vec![None; n];
        let mut layout_seen = false;
        for b in blobs {
            match b.kind {
                StateKind::VmLayout => {
                    self.core.mem.check_layout_blob(&b.data)?;
                    layout_seen = true;
                }
                StateKind::Vcpu => {
                    let i = b.instance as usize;
                    if i >= n || states[i].is_some() {
                        return Err(HostError::new("apply_state", format!("vCPU {i}: unexpected (this VM has {n})")));
                    }
                    states[i] = Some(VcpuState::decode(&b.data).map_err(host("apply_state"))?);
                }
                k => return Err(HostError::new("apply_state", format!("state of kind {k:?} is not supported"))),
            }
        }
        if !layout_seen || states.iter().any(|s| s.is_none()) {
            return Err(HostError::new("apply_state", "missing VM layout or vCPU state"));
        }
        let segs = self.core.be.segments();
        segs.set_dirty_tracking(true).map_err(|e| HostError::new("apply_state", e.to_string()))?;
        // The table root after the switch (it may move).
        let cr3 = self.core.be.cr3();
        for (t, s) in self.core.twins.iter_mut().zip(&states) {
            t.restore(s.as_ref().expect("checked"), Some(cr3)).map_err(host("vCPU state"))?;
        }
        Ok(())
    }

    fn resume(&mut self) -> std::result::Result<(), HostError> {
        self.core.mem.finish();
        // The source paused the guests at a harvest point: release them.
        for i in 0..self.machine.nvcpus() {
            self.machine.set_param(i, P_CTRL, 0).map_err(|e| HostError::new("resume", e.to_string()))?;
        }
        Ok(())
    }

    fn discard(&mut self) {
        self.core.mem.discard();
        let _ = self.core.be.segments().set_dirty_tracking(true);
    }
}

impl Guest {
    /// Writes `bytes` into guest RAM at byte `offset` through the host
    /// view (as firmware tables or a device model would; the write is
    /// marked dirty while tracking is on).
    pub fn write_ram(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.core
            .be
            .segments()
            .write_segment(self.core.ram_seg, offset, bytes)
            .map_err(|e| KvmError::Setup(e.to_string()))
    }

    /// Reads guest RAM at byte `offset` through the host view.
    pub fn read_ram(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.core.be.segments().read_segment(self.core.ram_seg, offset, out).map_err(|e| KvmError::Setup(e.to_string()))
    }

    /// The KVM VM.
    pub fn kvm_vm(&self) -> &Arc<KvmVm> {
        &self.core.vm
    }

    /// The backend's zap threshold in force
    /// ([`SpaceBackend::zap_threshold`]): the backend's own outside a
    /// migration attempt's RAM harvests (which use
    /// [`MIGRATION_ZAP_THRESHOLD`]).
    pub fn zap_threshold(&self) -> u64 {
        self.core.be.zap_threshold.load(Ordering::Relaxed)
    }

    /// Sets the zap threshold of a migration attempt's RAM harvests
    /// (default [`MIGRATION_ZAP_THRESHOLD`]: zap all shadow pages, which
    /// makes the vCPUs refault their working set after each harvest and
    /// so slows a guest while it migrates; the backend's default,
    /// [`crate::space::DEFAULT_ZAP_THRESHOLD`], drops each dirty frame
    /// instead, leaving the guest's speed alone at the engine's cost).
    pub fn set_migration_zap_threshold(&mut self, threshold: u64) {
        self.core.migration_zap = threshold;
    }
}

/// One case of [`bench()`]: a guest migrated at one write percentage.
#[derive(Debug, Clone)]
pub struct BenchCase {
    /// Percentage of the guest's random operations that write.
    pub write_pct: u32,
    /// Which repetition of the case (0-based).
    pub run: u32,
    /// The engine's summary.
    pub summary: MigrationSummary,
    /// The target's checks passed (ledger rounds, replay, checksums).
    pub target_ok: bool,
    /// What the target received (its timings included).
    pub target: TargetSummary,
    /// A plain copy of the same bytes under the same guest load.
    pub loaded_copy: LoadedCopy,
}

/// What [`bench()`] measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Guest memory in the layout (bytes).
    pub guest_bytes: u64,
    /// Plain copies of `guest_bytes` over a loopback TCP connection
    /// (bytes per second), measured around the cases.
    pub plain_copy: Vec<f64>,
    /// The same copies' CPU, ns per byte ([`CopyRun`]).
    pub plain_copy_cpu_ns_per_byte: Vec<f64>,
    /// The cases, in the order run.
    pub cases: Vec<BenchCase>,
}

/// A plain copy measured while a guest of a case's configuration runs
/// (the migration's competition for the cores, without the migration).
#[derive(Debug, Clone, Copy)]
pub struct LoadedCopy {
    /// Bytes per second.
    pub throughput: f64,
    /// CPU of the copy's two threads, ns per byte ([`CopyRun`]).
    pub cpu_ns_per_byte: f64,
    /// Whether the guest still ran when the copy ended (if not, the copy
    /// ran partly unloaded).
    pub under_load: bool,
}

impl BenchReport {
    /// The median plain-copy throughput.
    pub fn plain_median(&self) -> f64 {
        median_of(&self.plain_copy)
    }

    /// The median plain-copy CPU per byte (ns).
    pub fn plain_cpu_median(&self) -> f64 {
        median_of(&self.plain_copy_cpu_ns_per_byte)
    }
}

fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One plain loopback copy ([`plain_copy`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyRun {
    /// Bytes per second.
    pub throughput: f64,
    /// CPU time of the sending and the receiving thread together, in ns
    /// per byte copied (the work the copy costs, whatever share of the
    /// cores it was given).
    pub cpu_ns_per_byte: f64,
}

/// Copies `bytes` over a fresh loopback TCP connection in `batch`-byte
/// writes (the engine's batch), the reader discarding into a 1 MiB buffer
/// (the target's read buffer); returns the throughput and the CPU time
/// its two threads used. The two threads run under the process's stream
/// policy (`vmm::migration::priority`), as the migration's do.
pub fn plain_copy(bytes: u64, batch: usize) -> Result<CopyRun> {
    use std::io::{Read, Write};
    use vmm::migration::priority::{Side, StreamGuard};
    use vmm::migration::thread_cpu_time;
    let io = |e| KvmError::Os("loopback copy", e);
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = l.local_addr().map_err(io)?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let _policy = StreamGuard::enter(Side::Target);
        let cpu0 = thread_cpu_time();
        let (mut c, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = c.read(&mut buf)?;
            if k == 0 {
                return Ok((n, thread_cpu_time().saturating_sub(cpu0)));
            }
            n += k as u64;
        }
    });
    let policy = StreamGuard::enter(Side::Source);
    let cpu0 = thread_cpu_time();
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.set_nodelay(true).map_err(io)?;
    let buf: Vec<u8> = (0..batch).map(|i| (i * 31) as u8).collect();
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(batch);
        c.write_all(&buf[..n]).map_err(io)?;
        left -= n as u64;
    }
    c.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let sender_cpu = thread_cpu_time().saturating_sub(cpu0);
    drop(policy);
    let (got, reader_cpu) = reader.join().map_err(|_| KvmError::Setup("copy reader panicked".into()))?.map_err(io)?;
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        return Err(KvmError::Setup(format!("loopback copy delivered {got} of {bytes} bytes")));
    }
    Ok(CopyRun {
        throughput: bytes as f64 / secs.max(1e-9),
        cpu_ns_per_byte: (sender_cpu + reader_cpu).as_nanos() as f64 / bytes.max(1) as f64,
    })
}

/// Copies `bytes` from a buffer of that size on the sending side into a
/// buffer of that size on the receiving side over a fresh loopback TCP
/// connection, in `batch`-byte writes: the least work that moves a guest's
/// bytes from one memory to another over the socket (every byte read from
/// memory that is not cache-hot, as the engine reads guest memory, and
/// landing in its own place, as a target receiving in place does), where
/// [`plain_copy`] sends one cache-hot buffer over and over. Both buffers
/// are allocated and written before the clock starts (page faults are not
/// part of the copy), so this needs twice `bytes` of free memory. Returns
/// the throughput and the CPU of its two threads during the copy, which
/// run under the process's stream policy as [`plain_copy`]'s.
pub fn memory_copy(bytes: u64, batch: usize) -> Result<CopyRun> {
    use std::io::{Read, Write};
    use vmm::migration::priority::{Side, StreamGuard};
    use vmm::migration::thread_cpu_time;
    let io = |e| KvmError::Os("loopback memory copy", e);
    let n = usize::try_from(bytes).map_err(|_| KvmError::Setup("memory copy too large".into()))?;
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = l.local_addr().map_err(io)?;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration, u64)> {
        // Written once (a memset), so that no page is left to fault in.
        let mut dst = vec![1u8; n];
        let _ = ready_tx.send(());
        let _policy = StreamGuard::enter(Side::Target);
        let (mut c, _) = l.accept()?;
        let cpu0 = thread_cpu_time();
        let mut got = 0usize;
        while got < n {
            let k = c.read(&mut dst[got..])?;
            if k == 0 {
                break;
            }
            got += k;
        }
        let cpu = thread_cpu_time().saturating_sub(cpu0);
        // What landed, sampled (a page's first byte), so the copy is not
        // optimised away and a short one shows.
        let sum = dst[..got].iter().step_by(4096).map(|&b| u64::from(b)).sum();
        Ok((got as u64, cpu, sum))
    });
    let mut src = vec![0x5au8; n];
    // Each page's first byte tells it apart (what the reader samples).
    for (i, b) in src.iter_mut().step_by(4096).enumerate() {
        *b = (i % 251) as u8;
    }
    let expected: u64 = src.iter().step_by(4096).map(|&b| u64::from(b)).sum();
    ready.recv().map_err(|_| KvmError::Setup("memory copy reader failed to start".into()))?;
    let policy = StreamGuard::enter(Side::Source);
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.set_nodelay(true).map_err(io)?;
    let cpu0 = thread_cpu_time();
    let t0 = Instant::now();
    for chunk in src.chunks(batch.max(1)) {
        c.write_all(chunk).map_err(io)?;
    }
    c.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let sender_cpu = thread_cpu_time().saturating_sub(cpu0);
    drop(policy);
    let (got, reader_cpu, sum) =
        reader.join().map_err(|_| KvmError::Setup("memory copy reader panicked".into()))?.map_err(io)?;
    let secs = t0.elapsed().as_secs_f64();
    drop(src);
    if got != bytes || sum != expected {
        return Err(KvmError::Setup(format!("loopback memory copy delivered {got} of {bytes} bytes (sum {sum})")));
    }
    Ok(CopyRun {
        throughput: bytes as f64 / secs.max(1e-9),
        cpu_ns_per_byte: (sender_cpu + reader_cpu).as_nanos() as f64 / bytes.max(1) as f64,
    })
}

/// A plain copy of `bytes` over loopback while a guest of `cfg` runs
/// (started `warmup` before the copy, as the migration is), for comparing
/// the migration with a copy that competes for the same cores.
/// `unloaded` (bytes per second) sizes the guest's run to outlast the copy.
pub fn loaded_copy(cfg: &GuestConfig, bytes: u64, batch: usize, warmup: Duration, unloaded: f64) -> Result<LoadedCopy> {
    let run = warmup + Duration::from_secs_f64(2.0 + 8.0 * bytes as f64 / unloaded.max(1e6));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<LoadedCopy> {
        let g = s.spawn(move || -> Result<Instant> {
            let mut g = Guest::new(cfg, false)?;
            let _ = tx.send(());
            g.run_local(run, 0)?;
            Ok(Instant::now())
        });
        if rx.recv().is_err() {
            // The guest failed to build: its error below.
            return Err(g
                .join()
                .map_err(|_| KvmError::Setup("loaded guest panicked".into()))?
                .err()
                .unwrap_or_else(|| KvmError::Setup("loaded guest ended early".into())));
        }
        std::thread::sleep(warmup);
        let copy = plain_copy(bytes, batch);
        let copied = Instant::now();
        let ended = g.join().map_err(|_| KvmError::Setup("loaded guest panicked".into()))??;
        let copy = copy?;
        Ok(LoadedCopy {
            throughput: copy.throughput,
            cpu_ns_per_byte: copy.cpu_ns_per_byte,
            under_load: ended > copied,
        })
    })
}

/// Migrates a guest of `cfg` (its `write_pct` replaced by each of
/// `write_pcts`) over loopback after `warmup` and, for a `Mixed` or
/// `Touch` workload, once its sequential pass has written every page
/// ([`Guest::set_migrate_after_first_pass`]), `runs` times per write
/// percentage (the percentages interleaved: every one once, then again),
/// with the target checking the guest for `check_time` after it resumed;
/// plain copies of the guest's size over loopback before, between and
/// after the cases.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    cfg: &GuestConfig,
    write_pcts: &[u32],
    runs: u32,
    source: &SourceConfig,
    warmup: Duration,
    check_time: Duration,
    progress: &mut dyn FnMut(u32, &Progress),
) -> Result<BenchReport> {
    Ok(bench_runs(cfg, write_pcts, runs, source, warmup, check_time, false, progress)?.report)
}

/// What [`bench_with_memory_copy`] measured.
#[derive(Debug, Clone)]
pub struct BenchRun {
    /// What [`bench()`] reports.
    pub report: BenchReport,
    /// Memory-to-memory copies of the guest's size ([`memory_copy`]),
    /// each right after a plain copy (before, between and after the
    /// cases).
    pub memory_copy: Vec<CopyRun>,
}

impl BenchRun {
    /// The median memory-to-memory copy throughput.
    pub fn memory_median(&self) -> f64 {
        median_of(&self.memory_copy.iter().map(|c| c.throughput).collect::<Vec<_>>())
    }

    /// The median memory-to-memory copy CPU per byte (ns).
    pub fn memory_cpu_median(&self) -> f64 {
        median_of(&self.memory_copy.iter().map(|c| c.cpu_ns_per_byte).collect::<Vec<_>>())
    }
}

/// [`bench()`] with a second baseline: after each plain copy, a
/// memory-to-memory copy of the guest's size ([`memory_copy`]; it needs
/// twice the guest's size of free memory while no guest runs).
#[allow(clippy::too_many_arguments)]
pub fn bench_with_memory_copy(
    cfg: &GuestConfig,
    write_pcts: &[u32],
    runs: u32,
    source: &SourceConfig,
    warmup: Duration,
    check_time: Duration,
    progress: &mut dyn FnMut(u32, &Progress),
) -> Result<BenchRun> {
    bench_runs(cfg, write_pcts, runs, source, warmup, check_time, true, progress)
}

#[allow(clippy::too_many_arguments)]
fn bench_runs(
    cfg: &GuestConfig,
    write_pcts: &[u32],
    runs: u32,
    source: &SourceConfig,
    warmup: Duration,
    check_time: Duration,
    with_memory_copy: bool,
    progress: &mut dyn FnMut(u32, &Progress),
) -> Result<BenchRun> {
    let guest_bytes = Guest::new(cfg, true)?.memory_bytes();
    let mut memory = Vec::new();
    let first = plain_copy(guest_bytes, source.batch_bytes)?;
    if with_memory_copy {
        memory.push(memory_copy(guest_bytes, source.batch_bytes)?);
    }
    let mut rep = BenchReport {
        guest_bytes,
        plain_copy: vec![first.throughput],
        plain_copy_cpu_ns_per_byte: vec![first.cpu_ns_per_byte],
        cases: Vec::new(),
    };
    let order: Vec<(u32, u32)> = (0..runs.max(1)).flat_map(|r| write_pcts.iter().map(move |&p| (r, p))).collect();
    for (run, pct) in order {
        let c = GuestConfig { write_pct: pct, ..cfg.clone() };
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| KvmError::Os("bind", e))?;
        let addr = l.local_addr().map_err(|e| KvmError::Os("bind", e))?;
        let case = std::thread::scope(|s| -> Result<BenchCase> {
            let tc = c.clone();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let t = s.spawn(move || -> Result<(bool, TargetSummary)> {
                let mut g = Guest::new(&tc, true)?;
                // The target is built (its memory populated) before the
                // source starts, as `vmm run --incoming` is.
                let _ = ready_tx.send(());
                let (conn, _) = l.accept().map_err(|e| KvmError::Os("accept", e))?;
                let (sum, r) = g.run_target(&conn, &TargetConfig::default(), check_time, 1)?;
                Ok((r.ok(), sum))
            });
            if ready.recv().is_err() {
                // The target failed to build: its error.
                return Err(t
                    .join()
                    .map_err(|_| KvmError::Setup("target panicked".into()))?
                    .err()
                    .unwrap_or_else(|| KvmError::Setup("the target ended before it was built".into())));
            }
            let mut g = Guest::new(&c, false)?;
            // The guest's memory holds data when the migration starts (its
            // sequential pass wrote every page), as the plain copies' bytes.
            g.set_migrate_after_first_pass(true);
            let conn = TcpStream::connect(addr).map_err(|e| KvmError::Os("connect", e))?;
            let out =
                g.run_source(warmup + Duration::from_secs(600), 0, warmup, &conn, source, &mut |p| progress(pct, p))?;
            let (target_ok, target) = t.join().map_err(|_| KvmError::Setup("target panicked".into()))??;
            match out {
                SourceOutcome::Migrated(summary, r) => Ok(BenchCase {
                    write_pct: pct,
                    run,
                    summary,
                    target_ok: target_ok && r.ok(),
                    target,
                    loaded_copy: LoadedCopy { throughput: 0.0, cpu_ns_per_byte: 0.0, under_load: false },
                }),
                SourceOutcome::Failed(e, _) => Err(KvmError::Setup(format!("migration at {pct}% writes failed: {e}"))),
                SourceOutcome::NotRequested(_) => Err(KvmError::Setup("no migration was made".into())),
            }
        })?;
        let mut case = case;
        case.loaded_copy = loaded_copy(&c, guest_bytes, source.batch_bytes, warmup, rep.plain_copy[0])?;
        rep.cases.push(case);
        let copy = plain_copy(guest_bytes, source.batch_bytes)?;
        rep.plain_copy.push(copy.throughput);
        rep.plain_copy_cpu_ns_per_byte.push(copy.cpu_ns_per_byte);
        if with_memory_copy {
            memory.push(memory_copy(guest_bytes, source.batch_bytes)?);
        }
    }
    Ok(BenchRun { report: rep, memory_copy: memory })
}
