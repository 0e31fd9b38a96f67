//! Live migration from the command line, QEMU-style:
//!
//! ```text
//! target$ vmm run --vcpus 2 --mem 1G --duration 5s --incoming 0.0.0.0:4444
//! source$ vmm run --vcpus 2 --mem 1G --duration 20s --migrate-to HOST:4444 --migrate-after 3s
//! ```
//!
//! The target is started first with the same machine options (vCPUs,
//! memory, workload, seed, fault-around): it listens, takes one
//! connection, receives the guest, and runs it for `--duration` from the
//! moment it resumed, with `--rounds` harvest rounds, the verify pass and
//! the replay of every operation since the guest first started. The source
//! runs the workload and migrates it after `--migrate-after`, printing one
//! progress line per pre-copy round (round, pages sent, remaining dirty,
//! throughput, dirty rate) and a summary (total time, downtime from pause
//! here to resume there, bytes sent against guest memory, rounds, dirty
//! rate, whether pre-copy converged); `--json` prints the same as one
//! object. A migration that fails leaves the guest running here: it runs
//! to `--duration` with every check, and the exit status is 3.
//!
//! Convergence: pre-copy switches over when the dirty set fits
//! `--downtime-limit` at the measured throughput, or after `--max-rounds`
//! rounds anyway (the downtime is then bounded by the dirty set over the
//! throughput, and the summary says `converged: false`). That is the
//! default; `--auto-converge` throttles the vCPUs instead when the guest
//! dirties faster than the link carries (QEMU's auto-converge, see
//! `vmm::migration`), and the summary and JSON give the highest throttle
//! reached (`max_throttle_pct`).
//!
//! On command instead of after a delay:
//!
//! ```text
//! source$ vmm run --vcpus 2 --mem 1G --duration 60s --name web --migratable
//! source$ vmm migrate web HOST:4444
//! ```
//!
//! `vmm migrate` asks the running VM over its control socket and prints
//! its answer when the attempt ended (`migrated: ` and the figures, or
//! `error: ` and why; a failed attempt leaves the guest running there,
//! and it may be asked again).
//!
//! A migrating run has no framebuffer (device models are not migrated).

use crate::{VcpuJson, parse_duration, parse_rounds};
use serde::Serialize;
use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vmm::migration::{MigrationSummary, Progress, SourceConfig, TargetConfig, TargetSummary};
use vmm_kvm::migrate::{Guest, GuestConfig, GuestReport, SourceOutcome};

/// The migration options of `vmm run`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrationArgs {
    /// Wait for an incoming migration on ADDR (host:port), then run the
    /// guest it brings for --duration. Start it before the source, with
    /// the same machine options.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["migrate_to", "screenshot"])]
    pub incoming: Option<String>,
    /// Migrate the running guest to the target listening on ADDR
    /// (host:port) after --migrate-after.
    #[arg(long, value_name = "ADDR", conflicts_with = "screenshot")]
    pub migrate_to: Option<String>,
    /// When to start the migration (time into the run).
    #[arg(long, default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub migrate_after: Duration,
    /// The downtime pre-copy aims for (switch over when the dirty set
    /// fits in it at the measured throughput).
    #[arg(long, default_value = "300ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub downtime_limit: Duration,
    /// Pre-copy rounds after the first pass before switching over anyway.
    #[arg(long, default_value = "30", value_parser = parse_rounds, allow_hyphen_values = true)]
    pub max_rounds: u32,
    /// Throttle the guest's vCPUs when it dirties memory faster than the
    /// link carries it (QEMU's auto-converge: when the bytes dirtied in a
    /// round exceed half the bytes sent in it twice in a row, the vCPUs
    /// sleep 20% of the time, then 10% more each time, up to 99%). Off by
    /// default (as in QEMU): pre-copy then stops at --max-rounds.
    #[arg(long)]
    pub auto_converge: bool,
    /// Raise the priority of this side's migration thread (the source's
    /// sender, the target's receiver) by N nice steps while it streams,
    /// so that on a host whose cores the vCPUs keep busy the stream gets
    /// the CPU it needs and the vCPUs the rest (0, the default, as QEMU:
    /// the stream competes at the vCPUs' priority). Needs CAP_SYS_NICE;
    /// without it the stream runs unboosted.
    #[arg(long, default_value = "0", value_parser = clap::value_parser!(i32).range(0..=39))]
    pub migration_boost: i32,
    /// Run the guest for --duration ready to migrate on command: `vmm
    /// migrate NAME ADDR` (NAME from --name) asks it, over its control
    /// socket, to migrate to the target listening on ADDR.
    #[arg(long, conflicts_with_all = ["incoming", "migrate_to", "screenshot"])]
    pub migratable: bool,
}

impl MigrationArgs {
    /// Whether the run migrates (in or out).
    pub fn active(&self) -> bool {
        self.incoming.is_some() || self.migrate_to.is_some() || self.migratable
    }
}

/// The machine options of a migrating run.
pub struct Machine {
    pub vcpus: usize,
    pub mem: u64,
    pub mode: vmm_kvm::workload::Mode,
    pub write_pct: u32,
    pub seed: u64,
    pub fault_around: u32,
    pub name: Option<String>,
    pub duration: Duration,
    pub rounds: u32,
    pub json: bool,
    /// `--reservoir`: below guest memory plus the runtime, guest memory is
    /// swappable (each side of a migration uses its own).
    pub reservoir: Option<u64>,
    /// `--swap-dir`.
    pub swap_dir: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct RoundJson {
    dirty: u64,
    ledger: u64,
    missed: u64,
    spurious: u64,
    pause_us: f64,
}

#[derive(Serialize)]
struct GuestJson {
    ok: bool,
    elapsed_s: f64,
    nested_faults: u64,
    rounds: Vec<RoundJson>,
    vcpus: Vec<VcpuJson>,
}

fn guest_json(r: &GuestReport) -> GuestJson {
    GuestJson {
        ok: r.ok(),
        elapsed_s: r.elapsed.as_secs_f64(),
        nested_faults: r.faults,
        rounds: r
            .rounds
            .iter()
            .map(|x| RoundJson {
                dirty: x.dirty,
                ledger: x.ledger,
                missed: x.missed,
                spurious: x.spurious,
                pause_us: x.pause.as_secs_f64() * 1e6,
            })
            .collect(),
        vcpus: r.vcpus.iter().map(VcpuJson::from).collect(),
    }
}

#[derive(Serialize)]
struct SourceJson {
    migrated: bool,
    error: Option<String>,
    summary: Option<MigrationSummary>,
    progress: Vec<Progress>,
    /// The guest here: its harvest rounds (the migration's included) and,
    /// when it stayed, its final checks.
    guest: GuestJson,
}

#[derive(Serialize)]
struct TargetJson {
    received: TargetSummary,
    guest: GuestJson,
}

fn print_guest(what: &str, r: &GuestReport) {
    out!("{what}: {}", if r.ok() { "all checks passed" } else { "CHECKS FAILED" });
    let missed: u64 = r.rounds.iter().map(|x| x.missed).sum();
    let spurious: u64 = r.rounds.iter().map(|x| x.spurious).sum();
    out!(
        "  {} harvest rounds: {} pages written (ledgers), {} missed, {} spurious",
        r.rounds.len(),
        r.ledger_pages(),
        missed,
        spurious
    );
    for (i, v) in r.vcpus.iter().enumerate() {
        out!(
            "  vCPU {i}: {} ops, {} bad pages, checksum {}, {} misplaced headers, {} data errors",
            v.ops,
            v.bad_pages,
            if v.guest_checksum == v.expected_checksum { "ok" } else { "WRONG" },
            v.guest_bad_headers,
            v.data_errors
        );
    }
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn print_summary(s: &MigrationSummary, limit: Duration) {
    out!("migration: done in {:.1} ms", s.total_ms);
    out!(
        "  downtime {:.1} ms ({}), limit {:.0} ms",
        s.downtime_ms,
        if s.downtime_shared_clock { "pause here to resume there" } else { "pause to the target's ack" },
        limit.as_secs_f64() * 1e3
    );
    out!(
        "  sent {:.1} MiB for {:.1} MiB of guest memory ({:.2} bytes per byte), {} pages ({} zero), {} in the final round",
        mib(s.bytes_sent as f64),
        mib(s.guest_bytes as f64),
        s.bytes_per_guest_byte,
        s.pages_sent,
        s.zero_pages,
        s.final_round_pages
    );
    out!(
        "  {} pre-copy rounds, {}{}; throughput {:.0} MiB/s, dirty rate {:.0} pages/s; vCPU state {} bytes",
        s.rounds,
        if s.converged { "converged" } else { "did NOT converge (round limit)" },
        if s.max_throttle_pct > 0 {
            format!(" (vCPUs throttled up to {}%)", s.max_throttle_pct)
        } else {
            String::new()
        },
        mib(s.throughput),
        s.dirty_rate,
        s.state_bytes
    );
}

fn guest_config(m: &Machine) -> GuestConfig {
    GuestConfig {
        vcpus: m.vcpus,
        mem_bytes: m.mem,
        mode: m.mode,
        write_pct: m.write_pct,
        seed: m.seed,
        paging: None,
        fault_around: m.fault_around,
        name: m.name.clone(),
        prefault: false,
        reservoir: m.reservoir,
        swap_dir: m.swap_dir.clone(),
    }
}

fn addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("bad address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {s:?} resolves to nothing"))
}

/// `vmm run --incoming ADDR`.
pub fn incoming(m: &Machine, at: &str) -> ExitCode {
    let res = (|| -> Result<(TargetSummary, GuestReport), String> {
        let listener = TcpListener::bind(addr(at)?).map_err(|e| format!("cannot listen on {at}: {e}"))?;
        let mut g = Guest::new(&guest_config(m), true).map_err(|e| e.to_string())?;
        if !m.json {
            eprintln!("vmm run: waiting for a migration on {}", listener.local_addr().map_err(|e| e.to_string())?);
        }
        let (conn, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        if !m.json {
            eprintln!("vmm run: receiving from {peer}");
        }
        let t0 = Instant::now();
        let sum = g.receive(&conn, &TargetConfig::default()).map_err(|e| e.to_string())?;
        if !m.json {
            eprintln!(
                "vmm run: received {:.1} MiB in {:.1} ms; the guest runs here now",
                mib(sum.bytes_received as f64),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        let rep = g.run_local(m.duration, m.rounds).map_err(|e| e.to_string())?;
        Ok((sum, rep))
    })();
    match res {
        Ok((sum, rep)) => {
            if m.json {
                match serde_json::to_string_pretty(&TargetJson { received: sum, guest: guest_json(&rep) }) {
                    Ok(s) => out!("{s}"),
                    Err(e) => {
                        eprintln!("vmm run: cannot encode JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                out!(
                    "incoming migration: {} pages ({} zero runs' pages), {} distinct, {} rounds, {} state blobs",
                    sum.pages,
                    sum.zero_pages,
                    sum.distinct_pages,
                    sum.rounds,
                    sum.state_blobs
                );
                print_guest("vmm run (migrated in)", &rep);
            }
            if rep.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("vmm run --incoming: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vmm run --migrate-to ADDR`.
pub fn migrate_to(m: &Machine, a: &MigrationArgs, to: &str) -> ExitCode {
    if a.migrate_after >= m.duration {
        eprintln!("vmm run: --migrate-after must be shorter than --duration");
        return ExitCode::from(2);
    }
    source(m, a, Some(to))
}

/// `vmm run --migratable`: migrates when `vmm migrate NAME ADDR` asks.
pub fn migratable(m: &Machine, a: &MigrationArgs) -> ExitCode {
    source(m, a, None)
}

/// `vmm migrate NAME ADDR`: asks the running `vmm run --migratable
/// --name NAME` to migrate to ADDR, and prints its answer when the
/// attempt ended. Exit status 0 when it migrated, 3 when the attempt
/// failed (the guest keeps running there), 1 when the VM cannot be asked.
pub fn command(name: &str, to: &str) -> ExitCode {
    match vmm::control::request_with_timeout(name, &format!("migrate {to}"), Duration::from_secs(3600)) {
        Ok(answer) => {
            out!("{}", answer.trim_end());
            if answer.starts_with("migrated:") { ExitCode::SUCCESS } else { ExitCode::from(3) }
        }
        Err(vmm::Error::NoSuchNode) => {
            eprintln!("vmm migrate: no running VM named {name:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmm migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A source run: migrating to `to` after --migrate-after, or on command
/// when `to` is `None`.
fn source(m: &Machine, a: &MigrationArgs, to: Option<&str>) -> ExitCode {
    let cfg = SourceConfig {
        downtime_limit: a.downtime_limit,
        max_rounds: a.max_rounds,
        auto_converge: a.auto_converge,
        // One clock when the target is on this host (on command: set
        // per request).
        shared_clock: to.and_then(|t| addr(t).ok()).is_some_and(|x| x.ip().is_loopback()),
        ..SourceConfig::default()
    };
    let mut progress = Vec::new();
    let json = m.json;
    let res = (|| -> Result<SourceOutcome, String> {
        let mut g = Guest::new(&guest_config(m), false).map_err(|e| e.to_string())?;
        let mut show = |p: &Progress| {
            if !json {
                eprintln!(
                    "  round {:3}{}: sent {:8} pages, {:8} dirty remaining, {:7.1} MiB/s, dirty {:9.0} pages/s",
                    p.round,
                    if p.paused { " (paused)" } else { "" },
                    p.pages_sent,
                    p.remaining_dirty,
                    mib(p.throughput),
                    p.dirty_rate
                );
                let _ = std::io::stderr().flush();
            }
            progress.push(p.clone());
        };
        match to {
            Some(to) => {
                let conn =
                    TcpStream::connect(addr(to)?).map_err(|e| format!("cannot reach the target at {to}: {e}"))?;
                g.run_source(m.duration, m.rounds, a.migrate_after, &conn, &cfg, &mut show)
            }
            None => {
                if !json {
                    eprintln!("vmm run: VM {:?} runs; `vmm migrate {} ADDR` migrates it", g.name(), g.name());
                }
                g.run_on_command(m.duration, m.rounds, &cfg, &mut show)
            }
        }
        .map_err(|e| e.to_string())
    })();
    let out = match res {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmm run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (summary, error, rep) = match out {
        SourceOutcome::Migrated(s, r) => (Some(s), None, r),
        SourceOutcome::Failed(e, r) => (None, Some(e.to_string()), r),
        SourceOutcome::NotRequested(r) => (None, None, r),
    };
    if m.json {
        let j = SourceJson {
            migrated: summary.is_some(),
            error: error.clone(),
            summary: summary.clone(),
            progress,
            guest: guest_json(&rep),
        };
        match serde_json::to_string_pretty(&j) {
            Ok(s) => out!("{s}"),
            Err(e) => {
                eprintln!("vmm run: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        if let Some(s) = &summary {
            print_summary(s, a.downtime_limit);
        }
        if let Some(e) = &error {
            out!("migration FAILED: {e}; the guest kept running here");
        }
        print_guest(if summary.is_some() { "vmm run (source, until the hand-over)" } else { "vmm run" }, &rep);
    }
    if !rep.ok() {
        ExitCode::FAILURE
    } else if error.is_some() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// `vmm bench ...` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// Live migration of a write-heavy guest over loopback, at several
    /// write percentages (dirty rates): total time, downtime, bytes sent
    /// per byte of guest memory, rounds, and the throughput against a
    /// plain copy of the guest's size over a loopback TCP connection,
    /// measured in the same run (before, between and after the cases), and
    /// against a plain copy of the same bytes while a guest of the case's
    /// configuration runs (the same competition for the cores), and
    /// against a memory-to-memory copy of the guest's size (a guest-sized
    /// buffer into another over loopback, right after each plain copy:
    /// the least work that moves the guest's bytes; it needs twice the
    /// guest's size of free memory); `--json`
    /// adds where each side's time went (`source_timings`,
    /// `target_timings`). The target is built before the source starts.
    /// The source's RAM is mapped before its guest starts, so the guest
    /// writes at full speed, and the migration starts after the warm-up
    /// once every vCPU's sequential pass has written each page of its
    /// region: the first pass sends all of it, the same bytes as the plain
    /// copies.
    Migrate {
        /// Guest memory (bytes; K, M, G suffixes).
        #[arg(long, default_value = "1G", value_parser = crate::parse_mem, allow_hyphen_values = true)]
        mem: u64,
        /// vCPUs.
        #[arg(long, default_value = "2", value_parser = crate::parse_vcpus, allow_hyphen_values = true)]
        vcpus: usize,
        /// Write percentages of the guest's random operations, one case
        /// each (comma-separated, 0-100).
        #[arg(long, default_value = "0,1,10,80", value_delimiter = ',', value_parser = crate::parse_percent)]
        write_pct: Vec<u32>,
        /// The downtime pre-copy aims for.
        #[arg(long, default_value = "300ms", value_parser = parse_duration, allow_hyphen_values = true)]
        downtime_limit: Duration,
        /// Pre-copy rounds before switching over anyway.
        #[arg(long, default_value = "8", value_parser = parse_rounds, allow_hyphen_values = true)]
        max_rounds: u32,
        /// How long each guest runs before the migration starts.
        #[arg(long, default_value = "500ms", value_parser = parse_duration, allow_hyphen_values = true)]
        warmup: Duration,
        /// Repetitions of every case (interleaved); the table and the
        /// JSON's `medians` give the median of each write percentage.
        #[arg(long, default_value = "3", value_parser = parse_rounds, allow_hyphen_values = true)]
        runs: u32,
        /// The size of one socket write, for the migration and the plain
        /// copies alike (bytes; K, M suffixes; the engine's default).
        #[arg(long, default_value = "256K", value_parser = crate::parse_mem, allow_hyphen_values = true)]
        batch: u64,
        /// Throttle the guest when it dirties faster than the link
        /// carries (QEMU's auto-converge).
        #[arg(long)]
        auto_converge: bool,
        /// Nice steps by which the sender and receiver threads raise their
        /// priority while they stream (`vmm run --migration-boost`; 0 runs
        /// them at the vCPUs' priority).
        #[arg(long, default_value_t = vmm::migration::priority::BENCH_STREAM_BOOST, value_parser = clap::value_parser!(i32).range(0..=39))]
        migration_boost: i32,
        /// Leave the sender and the receiver threads where the scheduler
        /// puts them. By default, on a host with two CPUs or more, each is
        /// pinned to a CPU of its own for the transfer (the first and the
        /// last this process may use), as two hosts would run them; the
        /// vCPUs are not pinned.
        #[arg(long)]
        no_pin_stream: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct BenchCaseJson {
    write_pct: u32,
    run: u32,
    target_ok: bool,
    total_ms: f64,
    downtime_ms: f64,
    downtime_within_limit: bool,
    bytes_sent: u64,
    bytes_per_guest_byte: f64,
    rounds: u32,
    converged: bool,
    max_throttle_pct: u8,
    dirty_pages_per_s: f64,
    throughput_bytes_per_s: f64,
    throughput_vs_plain_copy: f64,
    loaded_plain_copy_bytes_per_s: f64,
    loaded_plain_copy_under_load: bool,
    throughput_vs_loaded_plain_copy: f64,
    /// Over the median memory-to-memory copy of the guest's size.
    throughput_vs_memory_copy: f64,
    /// Guest memory over the total time: how fast the guest's memory
    /// moved, zero pages (sent as a few bytes each) included.
    guest_bytes_per_s: f64,
    /// `guest_bytes_per_s` over the median memory-to-memory copy (which
    /// moves every byte of the guest's size).
    guest_rate_vs_memory_copy: f64,
    pages_sent: u64,
    zero_pages: u64,
    /// CPU of the source's engine thread and the target's receiving
    /// thread together, ns per byte sent.
    cpu_ns_per_byte: f64,
    /// The median plain copy's CPU per byte over this case's.
    cpu_efficiency_vs_plain_copy: f64,
    loaded_plain_copy_cpu_ns_per_byte: f64,
    source_timings: vmm::migration::SourceTimings,
    target_timings: vmm::migration::TargetTimings,
}

#[derive(Serialize)]
struct BenchJson {
    guest_bytes: u64,
    vcpus: usize,
    downtime_limit_ms: f64,
    max_rounds: u32,
    plain_copy_bytes_per_s: Vec<f64>,
    plain_copy_median_bytes_per_s: f64,
    /// CPU of the plain copies' two threads, ns per byte.
    plain_copy_cpu_ns_per_byte: Vec<f64>,
    plain_copy_median_cpu_ns_per_byte: f64,
    /// Memory-to-memory copies of the guest's size (a guest-sized buffer
    /// into another over loopback), right after each plain copy.
    memory_copy_bytes_per_s: Vec<f64>,
    memory_copy_median_bytes_per_s: f64,
    memory_copy_cpu_ns_per_byte: Vec<f64>,
    memory_copy_median_cpu_ns_per_byte: f64,
    batch_bytes: u64,
    auto_converge: bool,
    /// The nice steps the migration threads were asked to raise their
    /// priority by, and whether this process may (`CAP_SYS_NICE`).
    migration_boost: i32,
    migration_boost_effective: bool,
    /// The CPUs the source's sender and the target's receiver were pinned
    /// to for each transfer (`null`: not pinned).
    stream_cpus: Option<(usize, usize)>,
    cases: Vec<BenchCaseJson>,
    /// Per write percentage, the medians over its runs.
    medians: Vec<BenchMedianJson>,
}

#[derive(Serialize)]
struct BenchMedianJson {
    write_pct: u32,
    runs: usize,
    total_ms: f64,
    downtime_ms: f64,
    throughput_bytes_per_s: f64,
    throughput_vs_plain_copy: f64,
    throughput_vs_loaded_plain_copy: f64,
    throughput_vs_memory_copy: f64,
    guest_bytes_per_s: f64,
    guest_rate_vs_memory_copy: f64,
    cpu_ns_per_byte: f64,
    cpu_efficiency_vs_plain_copy: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `vmm bench migrate`.
pub fn bench(w: BenchWhat) -> ExitCode {
    let BenchWhat::Migrate {
        mem,
        vcpus,
        write_pct,
        downtime_limit,
        max_rounds,
        warmup,
        runs,
        batch,
        auto_converge,
        migration_boost,
        no_pin_stream,
        json,
    } = w;
    vmm::migration::priority::set_stream_boost(migration_boost);
    let cpus = vmm::machine::allowed_cpus();
    let stream_cpus = match (cpus.first(), cpus.last()) {
        (Some(&a), Some(&b)) if a != b && !no_pin_stream => Some((a, b)),
        _ => None,
    };
    vmm::migration::priority::set_stream_cpus(stream_cpus.map(|c| c.0), stream_cpus.map(|c| c.1));
    // Whether the boost can take effect here, tried on a thread of its own.
    let boost_effective =
        std::thread::spawn(move || vmm::migration::priority::PriorityGuard::boost(migration_boost).boosted())
            .join()
            .unwrap_or(false);
    let Ok(batch_bytes) = usize::try_from(batch) else {
        eprintln!("vmm bench migrate: --batch too large");
        return ExitCode::from(2);
    };
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("vmm bench migrate: KVM is not available on this host ({e})");
        return ExitCode::from(2);
    }
    let cfg = GuestConfig { vcpus, mem_bytes: mem, prefault: true, ..GuestConfig::default() };
    let scfg = SourceConfig {
        downtime_limit,
        max_rounds,
        shared_clock: true,
        batch_bytes,
        auto_converge,
        ..SourceConfig::default()
    };
    let r = vmm_kvm::migrate::bench_with_memory_copy(
        &cfg,
        &write_pct,
        runs,
        &scfg,
        warmup,
        Duration::from_millis(300),
        &mut |pct, p| {
            if !json {
                eprintln!(
                    "  [{pct:3}% writes] round {:3}{}: sent {:8} pages, {:8} dirty, {:7.1} MiB/s",
                    p.round,
                    if p.paused { " (paused)" } else { "" },
                    p.pages_sent,
                    p.remaining_dirty,
                    mib(p.throughput)
                );
            }
        },
    );
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm bench migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mem_copy, mem_cpu) = (r.memory_median(), r.memory_cpu_median());
    let memory_copy = r.memory_copy.clone();
    let r = r.report;
    let plain = r.plain_median();
    let plain_cpu = r.plain_cpu_median();
    let limit_ms = downtime_limit.as_secs_f64() * 1e3;
    let mut j = BenchJson {
        guest_bytes: r.guest_bytes,
        vcpus,
        downtime_limit_ms: limit_ms,
        max_rounds,
        plain_copy_bytes_per_s: r.plain_copy.clone(),
        plain_copy_median_bytes_per_s: plain,
        plain_copy_cpu_ns_per_byte: r.plain_copy_cpu_ns_per_byte.clone(),
        plain_copy_median_cpu_ns_per_byte: plain_cpu,
        memory_copy_bytes_per_s: memory_copy.iter().map(|c| c.throughput).collect(),
        memory_copy_median_bytes_per_s: mem_copy,
        memory_copy_cpu_ns_per_byte: memory_copy.iter().map(|c| c.cpu_ns_per_byte).collect(),
        memory_copy_median_cpu_ns_per_byte: mem_cpu,
        cases: r
            .cases
            .iter()
            .map(|c| BenchCaseJson {
                write_pct: c.write_pct,
                run: c.run,
                target_ok: c.target_ok,
                total_ms: c.summary.total_ms,
                downtime_ms: c.summary.downtime_ms,
                downtime_within_limit: c.summary.downtime_ms <= limit_ms,
                bytes_sent: c.summary.bytes_sent,
                bytes_per_guest_byte: c.summary.bytes_per_guest_byte,
                rounds: c.summary.rounds,
                converged: c.summary.converged,
                max_throttle_pct: c.summary.max_throttle_pct,
                dirty_pages_per_s: c.summary.dirty_rate,
                throughput_bytes_per_s: c.summary.throughput,
                throughput_vs_plain_copy: c.summary.throughput / plain.max(1.0),
                loaded_plain_copy_bytes_per_s: c.loaded_copy.throughput,
                loaded_plain_copy_under_load: c.loaded_copy.under_load,
                throughput_vs_loaded_plain_copy: c.summary.throughput / c.loaded_copy.throughput.max(1.0),
                throughput_vs_memory_copy: c.summary.throughput / mem_copy.max(1.0),
                guest_bytes_per_s: c.summary.guest_bytes as f64 / (c.summary.total_ms / 1e3).max(1e-9),
                guest_rate_vs_memory_copy: c.summary.guest_bytes as f64
                    / (c.summary.total_ms / 1e3).max(1e-9)
                    / mem_copy.max(1.0),
                pages_sent: c.summary.pages_sent,
                zero_pages: c.summary.zero_pages,
                cpu_ns_per_byte: (c.summary.timings.cpu_ms + c.target.timings.cpu_ms) * 1e6
                    / c.summary.bytes_sent.max(1) as f64,
                cpu_efficiency_vs_plain_copy: plain_cpu * c.summary.bytes_sent.max(1) as f64
                    / ((c.summary.timings.cpu_ms + c.target.timings.cpu_ms) * 1e6).max(1.0),
                loaded_plain_copy_cpu_ns_per_byte: c.loaded_copy.cpu_ns_per_byte,
                source_timings: c.summary.timings.clone(),
                target_timings: c.target.timings.clone(),
            })
            .collect(),
        batch_bytes: batch,
        auto_converge,
        migration_boost,
        migration_boost_effective: boost_effective,
        stream_cpus,
        medians: Vec::new(),
    };

    for &pct in &write_pct {
        if j.medians.iter().any(|m| m.write_pct == pct) {
            continue;
        }
        let cs: Vec<&BenchCaseJson> = j.cases.iter().filter(|c| c.write_pct == pct).collect();
        let med = |f: &dyn Fn(&BenchCaseJson) -> f64| median(cs.iter().map(|c| f(c)).collect());
        j.medians.push(BenchMedianJson {
            write_pct: pct,
            runs: cs.len(),
            total_ms: med(&|c| c.total_ms),
            downtime_ms: med(&|c| c.downtime_ms),
            throughput_bytes_per_s: med(&|c| c.throughput_bytes_per_s),
            throughput_vs_plain_copy: med(&|c| c.throughput_vs_plain_copy),
            throughput_vs_loaded_plain_copy: med(&|c| c.throughput_vs_loaded_plain_copy),
            throughput_vs_memory_copy: med(&|c| c.throughput_vs_memory_copy),
            guest_bytes_per_s: med(&|c| c.guest_bytes_per_s),
            guest_rate_vs_memory_copy: med(&|c| c.guest_rate_vs_memory_copy),
            cpu_ns_per_byte: med(&|c| c.cpu_ns_per_byte),
            cpu_efficiency_vs_plain_copy: med(&|c| c.cpu_efficiency_vs_plain_copy),
        });
    }
    if json {
        match serde_json::to_string_pretty(&j) {
            Ok(s) => out!("{s}"),
            Err(e) => {
                eprintln!("vmm bench migrate: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        out!(
            "live migration over loopback: {:.0} MiB guest, {vcpus} vCPUs, downtime limit {limit_ms:.0} ms, at most {max_rounds} rounds",
            mib(r.guest_bytes as f64)
        );
        out!(
            "migration threads' priority boost: {migration_boost} nice steps{}; {}",
            if migration_boost != 0 && !boost_effective { " (not in effect: no CAP_SYS_NICE)" } else { "" },
            match stream_cpus {
                Some((a, b)) => format!("sender pinned to CPU {a}, receiver to CPU {b} while they stream"),
                None => "sender and receiver not pinned".to_string(),
            }
        );
        out!(
            "plain copy of the guest's size over loopback: median {:.0} MiB/s (runs: {})",
            mib(plain),
            r.plain_copy.iter().map(|x| format!("{:.0}", mib(*x))).collect::<Vec<_>>().join(", ")
        );
        out!("its CPU (sender and receiver threads): median {plain_cpu:.3} ns per byte");
        out!(
            "memory-to-memory copy of the guest's size over loopback: median {:.0} MiB/s (runs: {}), CPU median {mem_cpu:.3} ns per byte",
            mib(mem_copy),
            j.memory_copy_bytes_per_s.iter().map(|x| format!("{:.0}", mib(*x))).collect::<Vec<_>>().join(", ")
        );
        out!(
            "writes%  run  total ms  downtime ms  bytes/guest byte  rounds  converged  throttle%  dirty pages/s  MiB/s  vs plain  vs loaded  vs memory  target ok"
        );
        for c in &j.cases {
            out!(
                "{:6}  {:3}  {:8.0}  {:11.1}  {:16.2}  {:6}  {:9}  {:9}  {:13.0}  {:5.0}  {:7.0}%  {:8.0}%  {:8.0}%  {}",
                c.write_pct,
                c.run,
                c.total_ms,
                c.downtime_ms,
                c.bytes_per_guest_byte,
                c.rounds,
                c.converged,
                c.max_throttle_pct,
                c.dirty_pages_per_s,
                mib(c.throughput_bytes_per_s),
                c.throughput_vs_plain_copy * 100.0,
                c.throughput_vs_loaded_plain_copy * 100.0,
                c.throughput_vs_memory_copy * 100.0,
                c.target_ok
            );
        }
        out!(
            "medians: writes%  runs  total ms  downtime ms  MiB/s  vs plain  vs loaded  vs memory  CPU ns/byte  plain CPU/ours  guest MiB/s  guest vs memory"
        );
        for m in &j.medians {
            out!(
                "         {:6}  {:4}  {:8.0}  {:11.1}  {:5.0}  {:7.0}%  {:8.0}%  {:8.0}%  {:11.3}  {:13.0}%  {:11.0}  {:14.0}%",
                m.write_pct,
                m.runs,
                m.total_ms,
                m.downtime_ms,
                mib(m.throughput_bytes_per_s),
                m.throughput_vs_plain_copy * 100.0,
                m.throughput_vs_loaded_plain_copy * 100.0,
                m.throughput_vs_memory_copy * 100.0,
                m.cpu_ns_per_byte,
                m.cpu_efficiency_vs_plain_copy * 100.0,
                mib(m.guest_bytes_per_s),
                m.guest_rate_vs_memory_copy * 100.0
            );
        }
    }
    if j.cases.iter().all(|c| c.target_ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
