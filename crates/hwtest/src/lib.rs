//! Host side of the conformance kernel (DESIGN.md §5.2). Crate docs are
//! completed below once the scenario list is final.

pub mod image;
pub mod protocol;

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use protocol::{Outcome, Parsed, Scenario};

/// Which emulator runs the kernel, and so which nested-paging format is
/// checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Emulator {
    /// `qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt`: AMD SVM with
    /// nested paging (NPT).
    Qemu,
    /// Bochs with a Skylake-X CPU model: Intel VMX with EPT, EPT A/D,
    /// execute-only and 2 MiB / 1 GiB EPT pages.
    Bochs,
}

impl Emulator {
    /// Both emulators, in the order the suite runs them.
    pub const ALL: [Emulator; 2] = [Emulator::Qemu, Emulator::Bochs];

    /// The program that must be on `PATH`.
    pub fn program(self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu-system-x86_64",
            Emulator::Bochs => "bochs",
        }
    }

    /// The nested-paging flavour this emulator checks.
    pub fn format(self) -> &'static str {
        match self {
            Emulator::Qemu => "SVM+NPT",
            Emulator::Bochs => "VMX+EPT",
        }
    }

    /// Whether the emulator (and for Bochs, its BIOS images) is installed.
    pub fn available(self) -> Result<(), Error> {
        if find_in_path(self.program()).is_none() {
            return Err(Error::Missing(format!("{} not found on PATH", self.program())));
        }
        if self == Emulator::Bochs {
            for f in [BOCHS_BIOS, BOCHS_VGABIOS] {
                if !Path::new(f).exists() {
                    return Err(Error::Missing(format!("{f} missing (install bochsbios and vgabios)")));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        })
    }
}

impl std::str::FromStr for Emulator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "qemu" => Ok(Emulator::Qemu),
            "bochs" => Ok(Emulator::Bochs),
            _ => Err(Error::Usage(format!("unknown emulator {s:?} (qemu or bochs)"))),
        }
    }
}

/// Why a conformance run produced no report.
#[derive(Debug)]
pub enum Error {
    /// The emulator (or a file it needs) is not installed: callers skip.
    Missing(String),
    /// The kernel did not build.
    Build(String),
    /// Spawning or talking to a process failed.
    Io(std::io::Error),
    /// The emulator ran past its time limit; the output so far is kept.
    Timeout {
        /// The limit.
        limit: Duration,
        /// Output captured before the limit.
        output: String,
    },
    /// The kernel never finished (no `END` line); the output is kept.
    Incomplete {
        /// Everything the emulator printed.
        output: String,
    },
    /// Bad argument.
    Usage(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Missing(s) => write!(f, "not installed: {s}"),
            Error::Build(s) => write!(f, "kernel build failed: {s}"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Timeout { limit, output } => {
                write!(f, "emulator ran past {limit:?}; output so far:\n{output}")
            }
            Error::Incomplete { output } => write!(f, "kernel did not finish; output:\n{output}"),
            Error::Usage(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// The result of one emulator run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Which emulator ran.
    pub emulator: Emulator,
    /// The emulator's version line.
    pub version: String,
    /// Parsed kernel output.
    pub parsed: Parsed,
    /// Wall time of the emulator run.
    pub elapsed: Duration,
    /// Raw output (for logs).
    pub output: String,
}

impl Report {
    /// True when the kernel finished, said `END PASS`, and no scenario failed
    /// and no disagreement was left unattributed.
    pub fn passed(&self) -> bool {
        self.parsed.end == Some(true)
            && self.parsed.panic.is_none()
            && self.parsed.orphans.is_empty()
            && !self.parsed.scenarios.is_empty()
            && self.parsed.scenarios.iter().all(|s| s.outcome != Outcome::Fail)
    }

    /// Scenarios that failed.
    pub fn failures(&self) -> Vec<&Scenario> {
        self.parsed.scenarios.iter().filter(|s| s.outcome == Outcome::Fail).collect()
    }

    /// A pass/fail table, one row per scenario, followed by every
    /// disagreement and every quirk with its evidence.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "== {} ({}) — {} — {:.1}s ==",
            self.emulator,
            self.emulator.format(),
            self.version,
            self.elapsed.as_secs_f64()
        );
        for i in &self.parsed.info {
            let _ = writeln!(t, "   info: {i}");
        }
        let w = self.parsed.scenarios.iter().map(|s| s.name.len()).max().unwrap_or(8);
        for s in &self.parsed.scenarios {
            let _ = writeln!(t, "   {:w$}  {}{}", s.name, s.outcome, detail_suffix(&s.detail));
            for d in &s.diffs {
                let _ = writeln!(t, "   {:w$}    DIFF {d}", "");
            }
            for q in &s.quirks {
                let _ = writeln!(t, "   {:w$}    quirk {q}", "");
            }
        }
        for o in &self.parsed.orphans {
            let _ = writeln!(t, "   unattributed: {o}");
        }
        if let Some(p) = &self.parsed.panic {
            let _ = writeln!(t, "   kernel PANIC: {p}");
        }
        let n = |f: &dyn Fn(&Outcome) -> bool| self.parsed.scenarios.iter().filter(|s| f(&s.outcome)).count();
        let _ = writeln!(
            t,
            "   => {}: {} pass, {} pass with quirks, {} fail, {} skip",
            if self.passed() { "PASS" } else { "FAIL" },
            n(&|o| *o == Outcome::Pass),
            n(&|o| matches!(o, Outcome::PassWithQuirks(_))),
            n(&|o| *o == Outcome::Fail),
            n(&|o| *o == Outcome::Skip),
        );
        t
    }
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() { String::new() } else { format!("  ({d})") }
}

const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const BOCHS_VGABIOS: &str = "/usr/share/bochs/VGABIOS-lgpl-latest";

/// Time limit for one emulator run.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

fn find_in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| p.is_file())
}

/// Directory of the kernel workspace.
pub fn kernel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel")
}

/// Build the kernel (release, x86_64-unknown-linux-gnu, no_std) and return
/// the path of its ELF file. Built once per process.
pub fn build_kernel() -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let cell = BUILT.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let dir = kernel_dir();
    let target_dir = dir.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu"])
        .env("CARGO_TARGET_DIR", &target_dir)
        // The kernel's flags live in kernel/.cargo/config.toml; an outer
        // RUSTFLAGS would replace them.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(Error::Build(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/hwtest-kernel");
    *guard = Some(elf.clone());
    Ok(elf)
}

/// The emulator's version line.
pub fn version(emu: Emulator) -> String {
    match emu {
        Emulator::Qemu => Command::new(emu.program())
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into()),
        // Bochs prints its banner on any start; `--help cpu` exits at once.
        Emulator::Bochs => Command::new(emu.program())
            .args(["--help", "cpu"])
            .stdin(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
                s.lines().find(|l| l.contains("Bochs x86 Emulator")).map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into()),
    }
}

/// The Bochs configuration: Skylake-X (VMX with EPT, EPT A/D, execute-only,
/// 2 MiB/1 GiB pages), headless through the RFB display with no wait for a
/// client (the Debian build has no `nogui`), port 0xE9 to stdout, a panic
/// (the kernel's shutdown-port write) ends the process.
fn bochsrc(disk: &Path, log: &Path) -> String {
    format!(
        "megs: 128\n\
         cpu: model=corei7_skylake_x, reset_on_triple_fault=0, ips=200000000\n\
         romimage: file={BOCHS_BIOS}\n\
         vgaromimage: file={BOCHS_VGABIOS}\n\
         display_library: rfb, options=\"timeout=0\"\n\
         boot: disk\n\
         ata0-master: type=disk, path={}, mode=flat, cylinders={}, heads={}, spt={}\n\
         port_e9_hack: enabled=1\n\
         log: {}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         clock: sync=none, time0=local\n\
         speaker: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n",
        disk.display(),
        image::CYLINDERS,
        image::HEADS,
        image::SPT,
        log.display()
    )
}

fn emulator_command(emu: Emulator, work: &Path, disk: &Path) -> Result<Command, Error> {
    let mut c = Command::new(emu.program());
    match emu {
        Emulator::Qemu => {
            c.args(["-accel", "tcg", "-cpu", "qemu64,+svm,+npt,+pdpe1gb", "-m", "128", "-display", "none"])
                .args(["-no-reboot", "-monitor", "none", "-serial", "none", "-debugcon", "stdio"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-drive"])
                .arg(format!("file={},format=raw,if=ide", disk.display()));
        }
        Emulator::Bochs => {
            let rc = work.join("bochsrc");
            std::fs::write(&rc, bochsrc(disk, &work.join("bochs.log")))?;
            // The Debian build includes the debugger, which stops before the
            // first instruction: `c` continues.
            let dbg = work.join("debugger.rc");
            std::fs::write(&dbg, "c\n")?;
            c.arg("-q").arg("-f").arg(&rc).arg("-rc").arg(&dbg);
        }
    }
    c.current_dir(work).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(c)
}

/// Run an already built kernel image under `emu` and return its output. The
/// emulator is stopped as soon as the kernel prints its `END` line, or when
/// `limit` passes.
pub fn run_image(emu: Emulator, disk_image: &[u8], limit: Duration) -> Result<(String, Duration), Error> {
    emu.available()?;
    let work = std::env::temp_dir().join(format!(
        "hwtest-{}-{}-{}",
        emu,
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.img");
    std::fs::write(&disk, disk_image)?;
    let start = Instant::now();
    let mut child = emulator_command(emu, &work, &disk)?.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut output = String::new();
    let mut finished = false;
    let mut timed_out = false;
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                let end = line.starts_with("END ");
                output.push_str(&line);
                output.push('\n');
                if end {
                    finished = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let elapsed = start.elapsed();
    // The kernel asks both emulators to exit; give it a moment, then stop it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait()?.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = reader.join();
    let errs = err_reader.join().unwrap_or_default();
    if timed_out {
        return Err(Error::Timeout { limit, output: output + &errs });
    }
    if !finished {
        return Err(Error::Incomplete { output: output + &errs });
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok((output, elapsed))
}

/// Build the kernel, run it under `emu`, and parse its report. This is what
/// `vmm conformance` and the integration tests call.
pub fn run_conformance(emu: Emulator) -> Result<Report, Error> {
    emu.available()?;
    let elf = build_kernel()?;
    let bytes = std::fs::read(&elf)?;
    let img = image::disk_image(&bytes).map_err(|e| Error::Build(e.to_string()))?;
    let (output, elapsed) = run_image(emu, &img, RUN_LIMIT)?;
    let parsed = protocol::parse(&output);
    Ok(Report { emulator: emu, version: version(emu), parsed, elapsed, output })
}
