//! `vmm`: run guests whose every memory access goes through our nested
//! tables, inspect a vmspace, and measure.
//!
//! This binary owns no memory logic: it parses options, calls
//! [`vmm_kvm`] (which runs KVM vCPUs over a [`vmspace`] whose tables come
//! from [`nested_pt`]) and prints results, as text for people or as JSON
//! (`--json`) for scripts. Every failure is reported as a message and a
//! non-zero exit status; nothing here panics on bad input or on a host
//! without `/dev/kvm`.
//!
//! Subcommands:
//! - `run`: the built-in workloads on real vCPUs over a `vmm::Vm` (RAM and
//!   boot-ROM segments, a PCI framebuffer the guest programs and moves
//!   through emulated MMIO) with dirty-harvest rounds, and a summary
//!   (faults, residency, dirty pages per round, MMIO exits, BAR moves,
//!   generations, kicks, the host's invalidation mode). `--name NAME`
//!   makes the running VM reachable; `--screenshot`, `--pin`. SIGINT or
//!   SIGTERM stop it cleanly (exit 130). Exit status 1 when a check fails.
//! - `inspect [NAME]`: a running VM's segments, mappings, vCPU registers and
//!   tables (through its control socket), or the built-in layout (no KVM
//!   needed), or a short run's (`--run`).
//! - `screenshot NAME OUT`: a PNG of a running VM's framebuffer, mapped by
//!   name from this process.
//! - `check-emulator`: the MMIO emulator against the CPU (`--cases N`).
//! - `bench`: exit round trip, MMIO exits and the emulator's share,
//!   nested-fault cost and our share of it, KVM's own first-touch cost,
//!   harvest and invalidation costs. `bench migrate`: live migration of
//!   a write-heavy guest over loopback at several write rates (total
//!   time, downtime, bytes per guest byte, rounds) against a plain
//!   loopback copy of the guest's size and a memory-to-memory copy of it
//!   measured in the same run.
//! - `conformance`: builds the bare-metal conformance kernel and runs it
//!   under QEMU (SVM+NPT) and Bochs (VMX+EPT, with and without EPT A/D),
//!   and the DMA suite under QEMU's VT-d and AMD-Vi IOMMUs, printing a
//!   pass/fail table per scenario and emulator
//!   (`hwtest::run_conformance`).
//!
//! - `run --incoming ADDR` / `run --migrate-to ADDR --migrate-after T`:
//!   live migration of the running guest over TCP (see the `migrate`
//!   module: QEMU-style, the target started first with the same machine
//!   options), with per-round progress and a summary (`--json`);
//!   `run --migratable --name NAME` and `migrate NAME ADDR`: the same on
//!   command, asked over the VM's control socket; `--auto-converge`.
//!
//! Known gaps: a migrating run has no framebuffer (device models are not
//! migrated).

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use vmm_kvm::run::{RunConfig, RunReport};
use vmm_kvm::workload::Mode;
use vmm_kvm::{PagingMode, bench, detect, inspect, kvm_available, run, watch};

/// `println!` that ignores a closed stdout (`vmm run | head` must not panic).
macro_rules! out {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that ignores a closed stdout.
macro_rules! outp {
    ($($t:tt)*) => {{
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

mod migrate;

#[derive(Parser, Debug)]
#[command(name = "vmm", version, about = "Nested-paging guest memory on KVM: run, inspect, bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Workload {
    /// Sequential touch of every page, pass after pass.
    Touch,
    /// Random read/write mix from a seeded generator.
    Random,
    /// One sequential pass, then the random mix.
    Mixed,
}

impl From<Workload> for Mode {
    fn from(w: Workload) -> Mode {
        match w {
            Workload::Touch => Mode::Touch,
            Workload::Random => Mode::Random,
            Workload::Mixed => Mode::Mixed,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Number of vCPUs (1-64).
    #[arg(long, default_value = "2", value_parser = parse_vcpus, allow_hyphen_values = true)]
    vcpus: usize,
    /// Guest memory (bytes; K, M, G suffixes; a multiple of 4 KiB).
    #[arg(long, default_value = "256M", value_parser = parse_mem, allow_hyphen_values = true)]
    mem: u64,
    /// RAM reservoir of the VM (guest memory plus the runtime's pages;
    /// bytes with K, M, G suffixes). Smaller than `--mem` plus the runtime
    /// makes guest memory swappable: cold pages go to an anonymous swap
    /// file and come back on access. Default: enough for all of it. A
    /// migrating run may use it too (on either side, independently).
    #[arg(long, value_parser = parse_mem, allow_hyphen_values = true)]
    reservoir: Option<u64>,
    /// Directory of the swap file (default: the system's temporary
    /// directory).
    #[arg(long)]
    swap_dir: Option<std::path::PathBuf>,
    /// Workload every vCPU runs on its share of memory.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    workload: Workload,
    /// Percentage of random operations that write (0-100).
    #[arg(long, default_value = "50", value_parser = parse_percent, allow_hyphen_values = true)]
    write_pct: u32,
    /// Running time (e.g. 2s, 500ms, 1.5s, 100us, 1m; at most a day).
    #[arg(long, default_value = "2s", value_parser = parse_duration, allow_hyphen_values = true)]
    duration: Duration,
    /// Dirty-harvest rounds during the run (a final one follows; 0-10000).
    #[arg(long, default_value = "4", value_parser = parse_rounds, allow_hyphen_values = true)]
    rounds: u32,
    /// Seed of the guests' generators (decimal or 0x hex).
    #[arg(long, default_value = "0x5eed", value_parser = parse_seed, allow_hyphen_values = true)]
    seed: u64,
    /// Pages each nested fault maps around the faulting one (a power of
    /// two from 1 to 512).
    #[arg(long, default_value = "16", value_parser = parse_fault_around, allow_hyphen_values = true)]
    fault_around: u32,
    /// Also reload CR3 in the guest on every generation change (the
    /// hardware-nested protocol) on a shadow-paging host.
    #[arg(long)]
    force_flush: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// The VM's name: `vmm inspect NAME` and `vmm screenshot NAME` reach
    /// it while it runs; its device-memory nodes live under
    /// `$XDG_RUNTIME_DIR/vmm/NAME/` (or `/dev/shm/vmm-UID/NAME/`).
    #[arg(long, value_parser = parse_vm_name)]
    name: Option<String>,
    /// Write a PNG of the guest's framebuffer here at the end.
    #[arg(long)]
    screenshot: Option<std::path::PathBuf>,
    /// Pin the vCPU threads to these host CPUs (e.g. `0,1` or `0-3`;
    /// vCPU i on the i-th, round robin).
    #[arg(long, value_parser = parse_cpus)]
    pin: Option<CpuList>,
    /// Live migration (`--incoming`, `--migrate-to`; see `migrate`).
    #[command(flatten)]
    migration: migrate::MigrationArgs,
}

/// A parsed `--pin` list.
#[derive(Clone, Debug)]
struct CpuList(Vec<usize>);

fn parse_vm_name(s: &str) -> Result<String, String> {
    vmm::devmem::check_name(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("bad VM name {s:?} ({e:?}): 1 to 63 letters, digits, '.', '_' or '-'"))
}

/// A CPU list (`0,2,4-7`); every CPU must be one this process may run on.
fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let allowed = vmm::machine::allowed_cpus();
    let mut out = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let lo = parse_int(lo, "a CPU number", 0, 4095)? as usize;
        let hi = parse_int(hi, "a CPU number", 0, 4095)? as usize;
        if lo > hi {
            return Err(format!("bad CPU range {part:?}"));
        }
        for c in lo..=hi {
            if !allowed.contains(&c) {
                return Err(format!("CPU {c} does not exist here (this process may use CPUs {allowed:?})"));
            }
            out.push(c);
        }
    }
    Ok(CpuList(out))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the built-in workloads on KVM vCPUs translated by our tables.
    Run(RunArgs),
    /// Print a vmspace's mappings and a decoded table dump.
    Inspect {
        /// A running VM's name (`vmm run --name NAME`): its segments,
        /// mappings, vCPU registers and tables, asked through its control
        /// socket. Without a name: the built-in layout.
        name: Option<String>,
        /// Dump the vmspace of a short `vmm run` instead of the built-in layout.
        #[arg(long, conflicts_with = "name")]
        run: bool,
        /// Present leaves shown per leaf table (0-512).
        #[arg(long, default_value = "8", value_parser = parse_leaves, allow_hyphen_values = true)]
        leaves: usize,
    },
    /// Write a PNG of a running VM's framebuffer, mapped by name from
    /// this process.
    Screenshot {
        /// The VM's name (`vmm run --name NAME`).
        name: String,
        /// Where to write the PNG.
        out: std::path::PathBuf,
    },
    /// Ask a running `vmm run --migratable --name NAME` to migrate its
    /// guest to the target listening on ADDR (`vmm run --incoming ADDR`);
    /// prints the answer when the attempt ended.
    Migrate {
        /// The VM's name (`vmm run --name NAME`).
        name: String,
        /// The target's address (host:port).
        addr: String,
    },
    /// Check the MMIO instruction emulator against the CPU: every
    /// generated case runs natively on RAM, emulated on a device, and
    /// straddling the two, on a KVM vCPU; any difference is printed.
    CheckEmulator {
        /// Cases to run (each in three ways), at least 1.
        #[arg(long, default_value = "3000", value_parser = parse_cases, allow_hyphen_values = true)]
        cases: usize,
        /// Seed of the case generator (decimal or 0x hex).
        #[arg(long, default_value = "0xd1ff", value_parser = parse_seed, allow_hyphen_values = true)]
        seed: u64,
    },
    /// Measure exit and fault costs, harvest and invalidation
    /// (`vmm bench migrate`: live migration).
    Bench {
        /// `migrate`: live migration over loopback against a plain copy.
        #[command(subcommand)]
        what: Option<migrate::BenchWhat>,
        /// Memory touched by the first-touch benchmark (4K to 16G, a
        /// multiple of 4 KiB).
        #[arg(long, default_value = "64M", value_parser = parse_bench_mem, allow_hyphen_values = true)]
        mem: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Conformance of the table formats as real nested tables on emulated
    /// SVM+NPT (QEMU) and VMX+EPT (Bochs): a pass/fail table per scenario
    /// and emulator.
    Conformance {
        /// Emulators to run (qemu, bochs, bochs-noad, qemu-vtd, qemu-amdvi); all when none given.
        emulators: Vec<String>,
        /// Also print each emulator's detailed per-scenario report.
        #[arg(long)]
        verbose: bool,
    },
}

/// A whole decimal number in `lo..=hi` (named `what` in messages). Signs,
/// fractions and exponents are refused with a message that says what is
/// expected.
fn parse_int(s: &str, what: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{what} cannot be negative (got {s:?}); expected a whole number from {lo} to {hi}"));
    }
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} must be a whole number from {lo} to {hi} (got {s:?})"));
    }
    match t.parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("{what} must be from {lo} to {hi} (got {s:?})")),
    }
}

fn parse_vcpus(s: &str) -> Result<usize, String> {
    parse_int(s, "the vCPU count", 1, vmm_kvm::runtime::MAX_VCPUS as u64).map(|v| v as usize)
}

fn parse_cases(s: &str) -> Result<usize, String> {
    parse_int(s, "the case count", 1, 100_000_000).map(|v| v as usize)
}

fn parse_percent(s: &str) -> Result<u32, String> {
    parse_int(s, "the write percentage", 0, 100).map(|v| v as u32)
}

fn parse_rounds(s: &str) -> Result<u32, String> {
    parse_int(s, "the round count", 0, 10_000).map(|v| v as u32)
}

fn parse_leaves(s: &str) -> Result<usize, String> {
    parse_int(s, "the leaf count", 0, 512).map(|v| v as usize)
}

fn parse_fault_around(s: &str) -> Result<u32, String> {
    let v = parse_int(s, "the fault-around window", 1, 512)?;
    if !v.is_power_of_two() {
        return Err(format!("the fault-around window must be a power of two from 1 to 512 (got {s:?})"));
    }
    Ok(v as u32)
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return u64::from_str_radix(hex, 16).map_err(|_| format!("the seed {s:?} does not fit in 64 bits"));
        }
        return Err(format!("the seed {s:?} is not a hexadecimal number"));
    }
    parse_int(s, "the seed", 0, u64::MAX)
}

/// A guest-memory size: a non-zero multiple of 4 KiB within `lo..=hi`.
fn parse_mem_in(s: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 || !v.is_multiple_of(4096) {
        return Err(format!("memory size {s:?} must be a non-zero multiple of 4 KiB (4096 bytes)"));
    }
    if !(lo..=hi).contains(&v) {
        return Err(format!("memory size {s:?} must be from {} KiB to {} GiB", lo >> 10, hi >> 30));
    }
    Ok(v)
}

fn parse_mem(s: &str) -> Result<u64, String> {
    // Guest RAM lives below the runtime at 512 GiB.
    parse_mem_in(s, 4096, 256 << 30)
}

fn parse_bench_mem(s: &str) -> Result<u64, String> {
    parse_mem_in(s, 4096, 16 << 30)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("size {s:?} cannot be negative"));
    }
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad size {s:?}: expected a whole number of bytes with an optional K, M or G suffix"));
    }
    let n: u64 = num.parse().map_err(|_| format!("size {s:?} does not fit in 64 bits"))?;
    n.checked_mul(mul).ok_or_else(|| format!("size {s:?} overflows"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let expected = "expected a number with an optional unit: 2s, 500ms, 1.5s, 100us, 1m";
    if s.starts_with('-') {
        return Err(format!("duration {s:?} cannot be negative; {expected}"));
    }
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    // Plain decimal only: digits with at most one point (no exponent, no
    // "nan"/"inf", which f64 parsing would accept).
    let digits = num.bytes().filter(|b| b.is_ascii_digit()).count();
    let points = num.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || points > 1 || digits + points != num.len() {
        return Err(format!("bad duration {s:?}; {expected}"));
    }
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}; {expected}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration {s:?}: unknown unit; {expected}")),
    };
    if !(0.0..=86400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Serialize)]
struct FbJson {
    width: u32,
    height: u32,
    bar_size: u64,
    fb_size: u64,
    guest_bar_moves: u64,
    applied_bar_moves: u64,
    retried_writes: u64,
    master_aborts: u64,
    bad_pixels: u64,
    node: String,
}

#[derive(Serialize)]
struct RoundJson {
    dirty: u64,
    ledger: u64,
    missed: u64,
    spurious: u64,
    harvest_us: f64,
    pause_us: f64,
}

/// One vCPU's results in the `--json` reports (`run`, and the migrating
/// run's guest report).
#[derive(Serialize)]
pub(crate) struct VcpuJson {
    ops: u64,
    faults: u64,
    exits: u64,
    bad_pages: u64,
    checksum_ok: bool,
    misplaced_headers: u64,
    data_errors: u64,
    verified_pages: u64,
}

impl From<&vmm_kvm::run::VcpuReport> for VcpuJson {
    fn from(v: &vmm_kvm::run::VcpuReport) -> Self {
        VcpuJson {
            ops: v.ops,
            faults: v.faults,
            exits: v.exits,
            bad_pages: v.bad_pages,
            checksum_ok: v.guest_checksum == v.expected_checksum,
            misplaced_headers: v.guest_bad_headers,
            data_errors: v.data_errors,
            verified_pages: v.verified_pages,
        }
    }
}

#[derive(Serialize)]
struct RunJson {
    ok: bool,
    interrupted: bool,
    name: String,
    host_cpus: Vec<u64>,
    screenshot: Option<String>,
    mmio_exits: u64,
    emulated: u64,
    emul_us_per_instruction: f64,
    framebuffer: Option<FbJson>,
    invalidation_mode: String,
    kvm_module: Option<String>,
    probe_stale_after_change: Option<bool>,
    probe_cr3_reload_fixed: Option<bool>,
    probe_frame_drop_fixed: Option<bool>,
    probe_zap_fixed: Option<bool>,
    host_1g_pages: Option<bool>,
    elapsed_s: f64,
    verify_s: f64,
    nested_faults: u64,
    faults_per_s: f64,
    our_code_us_per_fault: f64,
    pages_resident: u64,
    table_pages: u64,
    generation: u64,
    kicks: u64,
    cr3_flushes: u64,
    frames_dropped: u64,
    shadow_zaps: u64,
    zap_ms: f64,
    rounds: Vec<RoundJson>,
    vcpus: Vec<VcpuJson>,
    swap: Option<SwapJson>,
}

#[derive(Serialize)]
struct SwapJson {
    swapped_out: u64,
    swapped_in: u64,
    first_touch: u64,
    clock_passes: u64,
    aged: u64,
    write_errors: u64,
    resident: u64,
    swapped: u64,
    /// The swapper thread's low-water steps that swapped out, and the
    /// pages they swapped out (the rest were evicted by faults that found
    /// the reservoir exhausted).
    swapper_calls: u64,
    swapper_pages_out: u64,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mode_name(m: PagingMode) -> &'static str {
    match m {
        PagingMode::Shadow => "shadow",
        PagingMode::HardwareNested => "hardware-nested",
    }
}

fn run_json(r: &RunReport) -> RunJson {
    RunJson {
        ok: r.ok(),
        interrupted: r.interrupted,
        name: r.name.clone(),
        host_cpus: r.host_cpus.clone(),
        screenshot: r.screenshot.as_ref().map(|p| p.display().to_string()),
        mmio_exits: r.mmio_exits,
        emulated: r.emulated,
        emul_us_per_instruction: us(r.emul_time) / r.emulated.max(1) as f64,
        framebuffer: r.framebuffer.as_ref().map(|f| FbJson {
            width: f.geometry.0,
            height: f.geometry.1,
            bar_size: f.bar_size,
            fb_size: f.fb_size,
            guest_bar_moves: f.guest_moves,
            applied_bar_moves: f.applied_moves,
            retried_writes: f.retried_writes,
            master_aborts: f.master_aborts,
            bad_pixels: f.bad_pixels,
            node: f.node.clone(),
        }),
        invalidation_mode: mode_name(r.mode).into(),
        kvm_module: r.detection.as_ref().map(|d| d.module.clone()),
        probe_stale_after_change: r.detection.as_ref().map(|d| d.stale_after_change),
        probe_cr3_reload_fixed: r.detection.as_ref().map(|d| d.cr3_reload_fixed),
        probe_frame_drop_fixed: r.detection.as_ref().and_then(|d| d.frame_drop_fixed),
        probe_zap_fixed: r.detection.as_ref().and_then(|d| d.zap_fixed),
        host_1g_pages: r.detection.as_ref().map(|d| d.page_1g),
        elapsed_s: r.elapsed.as_secs_f64(),
        verify_s: r.verify_time.as_secs_f64(),
        nested_faults: r.faults,
        faults_per_s: r.faults as f64 / r.elapsed.as_secs_f64(),
        our_code_us_per_fault: us(r.fault_host_time) / r.faults.max(1) as f64,
        pages_resident: r.resident,
        table_pages: r.table_pages,
        generation: r.generation,
        kicks: r.kicks,
        cr3_flushes: r.flushes,
        frames_dropped: r.frames_dropped,
        shadow_zaps: r.zaps,
        zap_ms: r.zap_time.as_secs_f64() * 1e3,
        rounds: r
            .rounds
            .iter()
            .map(|x| RoundJson {
                dirty: x.dirty,
                ledger: x.ledger,
                missed: x.missed,
                spurious: x.spurious,
                harvest_us: us(x.harvest),
                pause_us: us(x.pause),
            })
            .collect(),
        vcpus: r.vcpus.iter().map(VcpuJson::from).collect(),
        swap: r.swap.map(|s| SwapJson {
            swapper_calls: r.swapper.map_or(0, |w| w.swap_calls),
            swapper_pages_out: r.swapper.map_or(0, |w| w.pages_out),
            swapped_out: s.swapped_out,
            swapped_in: s.swapped_in,
            first_touch: s.first_touch,
            clock_passes: s.clock_passes,
            aged: s.aged,
            write_errors: s.write_errors,
            resident: s.resident,
            swapped: s.swapped,
        }),
    }
}

fn print_run(r: &RunReport) {
    out!(
        "vmm run: {}{}",
        if r.ok() { "all checks passed" } else { "CHECKS FAILED" },
        if r.interrupted { " (interrupted: the workload was stopped early)" } else { "" }
    );
    match &r.detection {
        Some(d) => {
            out!("  host:            KVM module {}, paging mode detected: {}", d.module, mode_name(r.mode));
            out!("  invalidation:    {}", r.mode);
            out!(
                "  start-up probe:  unannounced leaf change {}; CR3 reload {}{}",
                if d.stale_after_change { "not seen (translation cached)" } else { "seen at once" },
                if d.cr3_reload_fixed { "made it visible" } else { "did not help" },
                match (d.frame_drop_fixed, d.frame_drop_time, d.zap_fixed, d.zap_time) {
                    (Some(f), Some(ft), Some(z), Some(zt)) => format!(
                        "; frame drop {} ({:.1} us); slot zap {} ({:.1} us)",
                        if f { "fixed it" } else { "FAILED" },
                        us(ft),
                        if z { "fixed it" } else { "FAILED" },
                        us(zt)
                    ),
                    _ => String::new(),
                }
            );
            out!(
                "  host offers:     1 GiB pages {}, guest MAXPHYADDR {}",
                if d.page_1g { "yes" } else { "no" },
                d.phys_bits
            );
        }
        None => out!("  host:            {} (given); invalidation: {}", mode_name(r.mode), r.mode),
    }
    out!(
        "  time:            {:.3} s workload, {:.3} s final verify pass",
        r.elapsed.as_secs_f64(),
        r.verify_time.as_secs_f64()
    );
    out!(
        "  nested faults:   {} ({:.0}/s; our code {:.2} us per fault)",
        r.faults,
        r.faults as f64 / r.elapsed.as_secs_f64(),
        us(r.fault_host_time) / r.faults.max(1) as f64
    );
    out!("  pages resident:  {} ({} MiB), table pages {}", r.resident, r.resident * 4 / 1024, r.table_pages);
    out!("  generations:     {}   kicks: {}   CR3 flushes: {}", r.generation, r.kicks, r.flushes);
    if let Some(s) = &r.swap {
        out!(
            "  swapping:        {} pages swapped out, {} swapped in, {} first touches, {} clock passes ({} pages spared), {} write errors; at the end {} resident, {} in the swap file",
            s.swapped_out,
            s.swapped_in,
            s.first_touch,
            s.clock_passes,
            s.aged,
            s.write_errors,
            s.resident,
            s.swapped
        );
        if let Some(w) = &r.swapper {
            out!("  swapper thread:  {} low-water steps swapped out {} pages", w.swap_calls, w.pages_out);
        }
    }
    out!(
        "  invalidation:    {} frames dropped ({:.1} us each), {} shadow zaps ({:.1} us each)",
        r.frames_dropped,
        if r.frames_dropped == 0 { 0.0 } else { us(r.drop_time) / r.frames_dropped as f64 },
        r.zaps,
        us(r.zap_time) / r.zaps.max(1) as f64
    );
    out!(
        "  MMIO:            {} exits, {} instructions emulated ({:.2} us each in fetch + decode + emulate + device)",
        r.mmio_exits,
        r.emulated,
        us(r.emul_time) / r.emulated.max(1) as f64
    );
    if !r.host_cpus.is_empty() {
        out!("  vCPU threads:    on host CPUs {:?}", r.host_cpus);
    }
    if let Some(p) = &r.screenshot {
        out!("  screenshot:      {}", p.display());
    }
    if let Some(fb) = &r.framebuffer {
        out!(
            "  framebuffer:     {}x{} read from the register BAR, BAR sized {} KiB (segment {} KiB), {} guest BAR moves ({} applied), {} writes redone, {} master aborts; pixels {}",
            fb.geometry.0,
            fb.geometry.1,
            fb.bar_size >> 10,
            fb.fb_size >> 10,
            fb.guest_moves,
            fb.applied_moves,
            fb.retried_writes,
            fb.master_aborts,
            if fb.bad_pixels == 0 { "all as drawn".to_string() } else { format!("{} WRONG", fb.bad_pixels) }
        );
        out!("  device memory:   {} (VM {:?})", fb.node, r.name);
    }
    out!("  harvest rounds (dirty pages / guest ledger / missed / spurious / harvest time):");
    for (k, x) in r.rounds.iter().enumerate() {
        let last = if k + 1 == r.rounds.len() { " (final)" } else { "" };
        out!(
            "    {:2}: {:7} / {:7} / {} / {}  {:8.1} us{last}",
            k + 1,
            x.dirty,
            x.ledger,
            x.missed,
            x.spurious,
            us(x.harvest)
        );
    }
    for (i, v) in r.vcpus.iter().enumerate() {
        out!(
            "  vCPU {i}: {} ops, {} faults, {} exits, {} pages verified; data {}",
            v.ops,
            v.faults,
            v.exits,
            v.verified_pages,
            if v.bad_pages == 0 && v.guest_checksum == v.expected_checksum && v.guest_bad_headers == 0 {
                "intact (checksum matches the replay)".to_string()
            } else {
                format!(
                    "DAMAGED: {} pages differ, {} misplaced, checksum {:#x} vs {:#x}",
                    v.bad_pages, v.guest_bad_headers, v.guest_checksum, v.expected_checksum
                )
            }
        );
    }
}

fn need_kvm(what: &str) -> Result<(), ExitCode> {
    if let Err(e) = kvm_available() {
        eprintln!("vmm {what}: KVM is not available on this host ({e}); it needs a readable and writable /dev/kvm.");
        return Err(ExitCode::from(2));
    }
    Ok(())
}

/// A flag set by the first SIGINT or SIGTERM, so that a run ends cleanly
/// (its vCPUs stopped, its checks made, everything it owns released); a
/// second signal exits at once with status 130.
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    Ok(stop)
}

fn cmd_run(a: RunArgs) -> ExitCode {
    if let Err(c) = need_kvm("run") {
        return c;
    }
    if a.migration.active() {
        return cmd_run_migrating(&a);
    }
    let stop = match stop_on_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = RunConfig {
        vcpus: a.vcpus,
        mem_bytes: a.mem,
        mode: a.workload.into(),
        write_pct: a.write_pct,
        duration: a.duration,
        rounds: a.rounds,
        seed: a.seed,
        force_flush: a.force_flush,
        fault_around: a.fault_around,
        name: a.name.clone(),
        screenshot: a.screenshot.clone(),
        pin: a.pin.clone().map(|p| p.0).unwrap_or_default(),
        reservoir: a.reservoir,
        swap_dir: a.swap_dir.clone(),
        stop: Some(stop.clone()),
        ..RunConfig::default()
    };
    // The progress line rewrites itself with `\r`: only on a terminal.
    let show = !a.json && a.duration > Duration::from_secs(1) && std::io::stderr().is_terminal();
    let mut progress = |p: run::Progress| {
        if show {
            eprint!(
                "\r  {:5.1}/{:.1} s  faults {:8}  resident {:8} pages  rounds {}   ",
                p.elapsed.as_secs_f64(),
                a.duration.as_secs_f64(),
                p.faults,
                p.resident,
                p.rounds
            );
            let _ = std::io::stderr().flush();
        }
    };
    let r = run::run(&cfg, &mut progress);
    if show {
        eprintln!();
    }
    match r {
        Ok(r) => {
            if a.json {
                match serde_json::to_string_pretty(&run_json(&r)) {
                    Ok(s) => out!("{s}"),
                    Err(e) => {
                        eprintln!("vmm run: cannot encode JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_run(&r);
            }
            if !r.ok() {
                ExitCode::FAILURE
            } else if r.interrupted {
                eprintln!("vmm run: interrupted by a signal; stopped cleanly");
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vmm run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vmm run --incoming` / `--migrate-to` (the `migrate` module).
fn cmd_run_migrating(a: &RunArgs) -> ExitCode {
    let m = migrate::Machine {
        vcpus: a.vcpus,
        mem: a.mem,
        mode: a.workload.into(),
        write_pct: a.write_pct,
        seed: a.seed,
        fault_around: a.fault_around,
        name: a.name.clone(),
        duration: a.duration,
        rounds: a.rounds,
        json: a.json,
        reservoir: a.reservoir,
        swap_dir: a.swap_dir.clone(),
    };
    vmm::migration::priority::set_stream_boost(a.migration.migration_boost);
    match (&a.migration.incoming, &a.migration.migrate_to) {
        (Some(at), _) => migrate::incoming(&m, at),
        (None, Some(to)) => migrate::migrate_to(&m, &a.migration, to),
        (None, None) if a.migration.migratable => migrate::migratable(&m, &a.migration),
        (None, None) => ExitCode::FAILURE,
    }
}

fn cmd_check_emulator(cases: usize, seed: u64) -> ExitCode {
    if let Err(c) = need_kvm("check-emulator") {
        return c;
    }
    let mode = detect::detect().map(|d| d.mode).unwrap_or(PagingMode::Shadow);
    match vmm_kvm::differential::run_differential(cases, seed, mode) {
        Ok(r) => {
            out!(
                "vmm check-emulator: {} forms, {} cases, each native on RAM, emulated on MMIO and straddling RAM/MMIO (seed {seed:#x})",
                r.forms,
                r.cases
            );
            out!(
                "  {} MMIO exits, {} instructions emulated; phases native/emulated/mixed {:.0}/{:.0}/{:.0} ms",
                r.mmio_exits,
                r.emulated,
                r.phase_time[0].as_secs_f64() * 1e3,
                r.phase_time[1].as_secs_f64() * 1e3,
                r.phase_time[2].as_secs_f64() * 1e3
            );
            for d in &r.divergences {
                out!("  DIVERGENCE case {} ({:?}) {} {:02x?}: {}", d.index, d.phase, d.form, d.bytes, d.what);
            }
            if r.divergences.is_empty() {
                out!("  registers, flags, RIP and memory identical in every case");
                ExitCode::SUCCESS
            } else {
                out!("  {} divergences", r.divergences.len());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmm check-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_inspect_vm(name: &str) -> ExitCode {
    match vmm::control::request(name, "inspect") {
        Ok(s) => {
            outp!("{s}");
            ExitCode::SUCCESS
        }
        Err(vmm::Error::NoSuchNode) => {
            eprintln!("vmm inspect: no running VM named {name:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmm inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_screenshot(name: &str, out: &std::path::Path) -> ExitCode {
    let r = vmm::fbuf::screenshot(name).and_then(|(png, w, h)| {
        std::fs::write(out, png).map_err(|e| vmm::Error::Io("write PNG", e.kind(), e.raw_os_error()))?;
        Ok((w, h))
    });
    match r {
        Ok((w, h)) => {
            out!("vmm screenshot: {w}x{h} from VM {name:?} written to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(vmm::Error::NoSuchNode) => {
            eprintln!("vmm screenshot: no running VM named {name:?} (or it has no framebuffer)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmm screenshot: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_inspect(from_run: bool, leaves: usize) -> ExitCode {
    if !from_run {
        return match inspect::builtin_layout_dump(leaves) {
            Ok(s) => {
                out!("built-in layout (heap table pages, no KVM):");
                outp!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm inspect: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(c) = need_kvm("inspect --run") {
        return c;
    }
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 8 << 20,
        duration: Duration::from_millis(200),
        rounds: 1,
        snapshot: true,
        snapshot_leaves: leaves,
        ..RunConfig::default()
    };
    match run::run(&cfg, &mut |_| {}) {
        Ok(r) => {
            out!("snapshot of a running `vmm run` (2 vCPUs, 8 MiB, mixed workload), vCPUs paused at a harvest point:");
            outp!("{}", r.snapshot.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Serialize)]
struct BenchJson {
    invalidation_mode: String,
    exit_round_trip_us: f64,
    exit_in_kvm_run_us: f64,
    exit_in_our_code_us: f64,
    first_touch: Vec<FirstTouchJson>,
    first_touch_1g: Vec<TouchJson>,
    harvest_adaptive: HarvestJson,
    harvest_zap: HarvestJson,
    harvest_frame_drop: HarvestJson,
    frame_drop_us: Option<f64>,
    zap_us: Option<f64>,
    unmap_with_kick_us: f64,
    remap_with_kick_us: f64,
    kicks: u64,
    mmio_exits_per_s: f64,
    mmio_exit_us: f64,
    mmio_decode_emulate_us: f64,
    mmio_our_code_us: f64,
    mmio_emulate_share_of_exit: f64,
}

#[derive(Serialize)]
struct FirstTouchJson {
    fault_around: u32,
    host_memory_preallocated: bool,
    pages: u64,
    faults: u64,
    faults_per_s: f64,
    us_per_fault: f64,
    our_code_us_per_fault: f64,
    our_share: f64,
    us_per_page: f64,
    kvm_own_us_per_page: Option<f64>,
    warm_us_per_page: f64,
}

#[derive(Serialize)]
struct TouchJson {
    what: String,
    pages: u64,
    us_per_page: f64,
    vs_kvm_own: f64,
    nested_faults: u64,
    kvm_exits: Option<u64>,
    kvm_page_faults: Option<u64>,
}

#[derive(Serialize)]
struct HarvestJson {
    rounds: usize,
    mean_dirty_pages: f64,
    mean_harvest_us: f64,
    missed: u64,
    guest_ops: u64,
}

fn harvest_bench(mode: PagingMode, zap_threshold: u64) -> Result<HarvestJson, vmm_kvm::KvmError> {
    let cfg = RunConfig {
        vcpus: 2,
        mem_bytes: 64 << 20,
        mode: Mode::Random,
        write_pct: 10,
        duration: Duration::from_millis(1200),
        rounds: 10,
        mode_override: Some(mode),
        zap_threshold,
        ..RunConfig::default()
    };
    let r = run::run(&cfg, &mut |_| {})?;
    let rounds = &r.rounds[..r.rounds.len() - 1];
    let n = rounds.len().max(1) as f64;
    Ok(HarvestJson {
        rounds: rounds.len(),
        mean_dirty_pages: rounds.iter().map(|x| x.dirty as f64).sum::<f64>() / n,
        mean_harvest_us: rounds.iter().map(|x| us(x.harvest)).sum::<f64>() / n,
        missed: r.rounds.iter().map(|x| x.missed).sum(),
        guest_ops: r.vcpus.iter().map(|v| v.ops).sum(),
    })
}

fn cmd_bench(mem: u64, json: bool) -> ExitCode {
    if let Err(c) = need_kvm("bench") {
        return c;
    }
    let res = (|| -> Result<BenchJson, vmm_kvm::KvmError> {
        let d = detect::detect()?;
        let mode = d.mode;
        let rt = bench::exit_round_trip(Duration::from_millis(500), mode)?;
        let mm = bench::mmio(Duration::from_millis(500), mode)?;
        let mut ft = Vec::new();
        for (fa, prefault) in [(1u32, false), (16, false), (1, true), (16, true)] {
            let f = bench::first_touch(mem, fa, mode, prefault)?;
            let pages = f.pages as f64;
            ft.push(FirstTouchJson {
                fault_around: fa,
                host_memory_preallocated: prefault,
                pages: f.pages,
                faults: f.faults,
                faults_per_s: f.faults_per_sec(),
                us_per_fault: us(f.per_fault()),
                our_code_us_per_fault: us(f.ours_per_fault()),
                our_share: f.our_share(),
                us_per_page: us(f.first_pass) / pages,
                kvm_own_us_per_page: f.kvm_pass.map(|t| us(t) / pages),
                warm_us_per_page: us(f.warm_pass) / pages,
            });
        }
        let cmp = bench::first_touch_compare(1 << 30, mode, 3)?;
        // Each variant against the KVM's own measurement before it (fresh
        // memory, then preallocated).
        let mut own = 1.0;
        let first_touch_1g = cmp
            .iter()
            .map(|t| TouchJson {
                what: t.label.clone(),
                pages: t.pages,
                us_per_page: t.us_per_page(),
                vs_kvm_own: {
                    if t.kvm_own() {
                        own = t.us_per_page();
                    }
                    t.us_per_page() / own
                },
                nested_faults: t.nested_faults,
                kvm_exits: t.kvm_exits,
                kvm_page_faults: t.kvm_page_faults,
            })
            .collect();
        let ha = harvest_bench(mode, vmm_kvm::space::DEFAULT_ZAP_THRESHOLD)?;
        let hz = harvest_bench(mode, 0)?;
        let hd = harvest_bench(mode, u64::MAX)?;
        let w = watch::run_watch(2, 30, false, Duration::from_millis(2), mode)?;
        let u = watch::run_watch(2, 1, true, Duration::from_millis(5), mode)?;
        let mean = |v: &[Duration]| v.iter().map(|d| us(*d)).sum::<f64>() / v.len().max(1) as f64;
        Ok(BenchJson {
            invalidation_mode: mode_name(mode).into(),
            exit_round_trip_us: us(rt.per_exit()),
            exit_in_kvm_run_us: us(rt.in_kvm_run) / rt.exits.max(1) as f64,
            exit_in_our_code_us: us(rt.in_our_code) / rt.exits.max(1) as f64,
            first_touch: ft,
            first_touch_1g,
            harvest_adaptive: ha,
            harvest_zap: hz,
            harvest_frame_drop: hd,
            frame_drop_us: d.frame_drop_time.map(us),
            zap_us: d.zap_time.map(us),
            unmap_with_kick_us: mean(&u.change_times),
            remap_with_kick_us: mean(&w.change_times),
            kicks: w.kicks + u.kicks,
            mmio_exits_per_s: mm.per_sec(),
            mmio_exit_us: us(mm.per_exit()),
            mmio_decode_emulate_us: us(mm.emulate_per_exit()),
            mmio_our_code_us: us(mm.in_our_code) / mm.exits.max(1) as f64,
            mmio_emulate_share_of_exit: mm.our_share(),
        })
    })();
    let b = match res {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vmm bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&b) {
            Ok(s) => out!("{s}"),
            Err(e) => {
                eprintln!("vmm bench: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    out!("vmm bench (host invalidation mode: {})", b.invalidation_mode);
    out!(
        "  exit round trip (doorbell #PF -> stub -> user space -> back): {:.2} us ({:.2} us inside KVM_RUN, {:.2} us in our code)",
        b.exit_round_trip_us,
        b.exit_in_kvm_run_us,
        b.exit_in_our_code_us
    );
    out!(
        "  MMIO (mov eax, [device] in a loop): {:.0} exits/s, {:.2} us per exit; decode + emulate {:.2} us ({:.2}% of the exit), all our code {:.2} us",
        b.mmio_exits_per_s,
        b.mmio_exit_us,
        b.mmio_decode_emulate_us,
        100.0 * b.mmio_emulate_share_of_exit,
        b.mmio_our_code_us
    );
    for f in &b.first_touch {
        out!(
            "  first touch, fault-around {:2}, host memory {}: {} faults, {:.0} faults/s, {:.2} us/fault, our code {:.2} us ({:.1}%), {:.2} us/page",
            f.fault_around,
            if f.host_memory_preallocated { "preallocated" } else { "fresh" },
            f.faults,
            f.faults_per_s,
            f.us_per_fault,
            f.our_code_us_per_fault,
            100.0 * f.our_share,
            f.us_per_page
        );
        if let Some(k) = f.kvm_own_us_per_page {
            out!(
                "      KVM's own first touch after a full zap: {k:.2} us/page; warm pass {:.3} us/page",
                f.warm_us_per_page
            );
        }
    }
    out!(
        "  first touch of 1 GiB, one sequential write pass (median of 3 alternating rounds; each against the KVM's own line above it):"
    );
    for t in &b.first_touch_1g {
        let n = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        out!(
            "      {:.2} us/page ({:.2}x KVM's own), {} nested faults, {} KVM exits, {} KVM page faults: {}",
            t.us_per_page,
            t.vs_kvm_own,
            t.nested_faults,
            n(t.kvm_exits),
            n(t.kvm_page_faults),
            t.what
        );
    }
    for (name, h) in [
        ("adaptive", &b.harvest_adaptive),
        ("zap always", &b.harvest_zap),
        ("frame drop always", &b.harvest_frame_drop),
    ] {
        out!(
            "  harvest ({name}): {} rounds, {:.0} dirty pages/round, {:.1} us/round, missed {}, guest ops {}",
            h.rounds,
            h.mean_dirty_pages,
            h.mean_harvest_us,
            h.missed,
            h.guest_ops
        );
    }
    if let (Some(fd), Some(z)) = (b.frame_drop_us, b.zap_us) {
        out!("  shadow invalidation: one frame drop {fd:.1} us, one full zap {z:.1} us");
    }
    out!(
        "  unmap while 2 vCPUs run (kick + wait + invalidate): {:.1} us; remap: {:.1} us; kicks {}",
        b.unmap_with_kick_us,
        b.remap_with_kick_us,
        b.kicks
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Inspect { name: Some(name), .. } => cmd_inspect_vm(&name),
        Cmd::Inspect { name: None, run, leaves } => cmd_inspect(run, leaves),
        Cmd::Screenshot { name, out } => cmd_screenshot(&name, &out),
        Cmd::Migrate { name, addr } => migrate::command(&name, &addr),
        Cmd::CheckEmulator { cases, seed } => cmd_check_emulator(cases, seed),
        Cmd::Bench { what: Some(w), .. } => migrate::bench(w),
        Cmd::Bench { what: None, mem, json } => cmd_bench(mem, json),
        Cmd::Conformance { emulators, verbose } => conformance(&emulators, verbose),
    }
}

/// `vmm conformance`: exit 0 when every emulator that could run passed,
/// 1 on any failure, 2 when none could run (or an unknown name was given).
fn conformance(names: &[String], verbose: bool) -> ExitCode {
    let mut emus = Vec::new();
    for n in names {
        match n.parse::<hwtest::Emulator>() {
            Ok(e) => emus.push(e),
            Err(e) => {
                eprintln!("vmm conformance: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if emus.is_empty() {
        emus = hwtest::Emulator::ALL.to_vec();
    }
    let results: Vec<_> = emus
        .iter()
        .map(|&e| {
            eprintln!("vmm conformance: running {e} ({})...", e.format());
            (e, hwtest::run_conformance(e))
        })
        .collect();
    if verbose {
        for (_, r) in &results {
            if let Ok(rep) = r {
                println!("{}", rep.table());
            }
        }
    }
    print!("{}", hwtest::matrix(&results));
    let failed = results.iter().any(|(_, r)| match r {
        Ok(rep) => !rep.passed(),
        Err(hwtest::Error::Missing(_)) => false,
        Err(_) => true,
    });
    let ran = results.iter().any(|(_, r)| r.is_ok());
    if failed {
        ExitCode::from(1)
    } else if ran {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("nan").is_err() && parse_duration("1e-3").is_err() && parse_duration(".").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn default_run_arguments() {
        let cli = Cli::try_parse_from(["vmm", "run"]).expect("parse");
        let Cmd::Run(a) = cli.cmd else { panic!("not run") };
        assert_eq!((a.vcpus, a.mem, a.rounds), (2, 256 << 20, 4));
        assert!(Cli::try_parse_from(["vmm", "run", "--write-pct", "101"]).is_err());
        assert_eq!((a.reservoir, a.swap_dir), (None, None));
    }

    #[test]
    fn reservoir_and_swap_dir_parse() {
        let cli = Cli::try_parse_from(["vmm", "run", "--mem", "1G", "--reservoir", "256M", "--swap-dir", "/var/tmp"])
            .expect("parse");
        let Cmd::Run(a) = cli.cmd else { panic!("not run") };
        assert_eq!((a.mem, a.reservoir), (1 << 30, Some(256 << 20)));
        assert_eq!(a.swap_dir.as_deref(), Some(std::path::Path::new("/var/tmp")));
        assert!(Cli::try_parse_from(["vmm", "run", "--reservoir", "1000"]).is_err(), "not a multiple of 4 KiB");
        assert!(Cli::try_parse_from(["vmm", "run", "--reservoir", "-1M"]).is_err());
    }
}
