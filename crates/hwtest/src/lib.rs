//! Conformance of `nested-pt`'s tables as *real* nested page tables
//! (DESIGN.md §5.2): a bare-metal kernel builds its nested tables with
//! `nested-pt`, runs a guest under an emulator's implementation of nested
//! paging, and compares every exit and every accessed/dirty bit with what
//! `nested_pt::mmu::translate` predicts.
//!
//! # What this crate owns
//!
//! - `kernel/`: the bare-metal `no_std` x86-64 kernel, its own Cargo
//!   workspace, built for the standard `x86_64-unknown-linux-gnu` target with
//!   `#![no_main]`, `panic = "abort"`, a linker script and no C runtime. A
//!   BIOS boot sector loads it from a disk image; it enters long mode with an
//!   identity map, then enables **AMD SVM** (EFER.SVME, host save area, a
//!   VMCB with nested paging, VMRUN/#VMEXIT) or **Intel VMX** (VMXON, one
//!   VMCS, EPT with unrestricted guest, VMLAUNCH/VMRESUME). The guest runs in
//!   32-bit protected mode with **paging off**, so the nested table alone
//!   translates every access.
//! - This host library: builds the kernel ([`build_kernel`]), turns its ELF
//!   into a disk image ([`image`]), runs it under `qemu-system-x86_64 -accel
//!   tcg -cpu qemu64,+svm,+npt,+pdpe1gb` (SVM+NPT; `pdpe1gb` so 1 GiB nested
//!   pages exist), under Bochs 2.7 with a Skylake-X CPU model (VMX with
//!   EPT, EPT A/D, execute-only, 2 MiB/1 GiB pages) and under Bochs with an
//!   Ivy Bridge model (EPT without A/D and without 1 GiB pages: the
//!   processor the emulated-A/D format is for), stops the emulator when
//!   the kernel is done or a time limit passes, and parses the kernel's lines
//!   ([`protocol`]) into a per-scenario [`Report`]. [`run_conformance`] is
//!   the entry point for `vmm conformance` and the integration tests.
//!
//! - The DMA suite ([`Emulator::QemuVtd`], [`Emulator::QemuAmdVi`]): under
//!   `qemu-system-x86_64 -machine q35 -device intel-iommu,aw-bits=48
//!   -device edu` (or `-device amd-iommu`) the kernel
//!   (`kernel/src/iommu.rs`) finds QEMU's `edu` device, builds a VT-d root
//!   and context table (or an AMD-Vi device-table entry, command buffer and
//!   event log) pointing at I/O page tables built by nested-pt in its VT-d
//!   (or AMD-Vi) format, turns translation on, and has
//!   `edu`'s DMA engine copy between its buffer and I/O virtual addresses.
//!   For each transfer `nested_pt::mmu::translate` predicts where the bytes
//!   land or which fault is recorded; the kernel checks the bytes at the
//!   predicted host address (and that a faulting DMA changed no memory) and
//!   the fault-recording register (reason, page, source id, read/write) or
//!   the event log. Scenarios: 4 KiB and 2 MiB reads and writes, a write to
//!   a read-only page (after a cached read and after an invalidation),
//!   not-present at levels 1, 2 and 4, a table entry with only its present
//!   bits cleared, unmap followed by an IOTLB invalidation; VT-d also
//!   reserved bit 11 and an address bit above the 48-bit width (reason
//!   0xC; QEMU's AMD-Vi checks no reserved field), and the same device
//!   through a three-level (39-bit) table (`PteFormat::vtd_3level`): a
//!   transfer each way, a not-present top entry, and an address beyond
//!   the width (reason 0x4).
//!
//! # How a comparison works (kernel side)
//!
//! The table pages come from a fixed, identity-mapped arena (frame number =
//! physical address >> 12) through nested-pt's `TablePages`; no entry is
//! written by hand except the fault injections of the reserved-bit
//! scenarios, which modify an entry nested-pt built and restore it after.
//! For each guest access the kernel snapshots the table pages, runs the
//! guest (one fetch of its code page, then the access), snapshots again,
//! rewinds the tables, replays the same fetch and access on the software
//! MMU, and compares: the exit kind, SVM EXITINFO1/EXITINFO2 in full, the
//! VMX exit qualification (bits 12:0) and guest-physical address, the EPT
//! misconfiguration address, the HLT RIP, the data read or written through
//! the predicted frame, and **every 64-bit word of every table page**. The
//! guest's code page shares only the PML4E and one PDPTE with the test
//! pages; the model replays the code fetch, so those shared A bits are
//! compared too rather than hidden. Each scenario also states what it
//! expects (fault kind, A/D after each access) independently of the model.
//! To read a whole 2 MiB range without 512 runs, a second guest stub
//! (`Suite::scan`) reads one word per page in a loop and checks in the
//! guest that page `i` holds `first + i`, stopping at the first that does
//! not; the model replays the fetch and every read, and the tables are
//! compared as for one access.
//!
//! # Scenarios
//!
//! On every configuration: 4 KiB, 2 MiB and 1 GiB mappings (read, write, fetch;
//! A/D after each); read-only and non-executable at each size; not present
//! at levels 1-3 (data) and 4 (the code fetch itself, with an empty table);
//! reserved bits (NPT) / misconfigurations (EPT: address bits above
//! MAXPHYADDR, memory types 2 and 7, write without read, non-leaf reserved
//! bits, large-leaf bits 12 and 13); a write after a cached read; dirty
//! harvest and accessed reset against CPU-set bits, with re-setting after
//! the page invalidation; unmap followed by INVLPGA (SVM) or single-context
//! INVEPT (VMX). EPT only: A/D disabled through EPTP bit 6; execute-only;
//! emulated A/D (the first access and first write exit, the kernel records
//! them with `NestedTable::record_access` and resumes, the next access does
//! not exit; harvest and accessed reset make them exit again); large-leaf
//! bit 12 again with EPTP bit 6 clear. On the Ivy Bridge model (no EPT A/D,
//! no 1 GiB pages) the 1 GiB, hardware-harvest and "A/D disabled"
//! scenarios skip, every A/D expectation becomes "none set", and a PDPTE
//! with PS must be a misconfiguration.
//!
//! Promotion and demotion (`kernel/src/promote.rs`, every configuration,
//! in a table of their own): `promote-2m` (512 small leaves onto a
//! contiguous aligned run, some written, some read, half untouched, then
//! `NestedTable::promote_2m`), `promote-2m-clean` (reads only),
//! `demote-2m` (a written 2 MiB leaf, `demote_2m`), `demote-2m-clean` (a
//! read one) and `promote-2m-refused` (not contiguous, a hole, mixed
//! protection: refused with the matching `PromoteRefusal` and no table word
//! changed; then repaired and promoted), and `demote-1g` (a written
//! 1 GiB leaf, `demote_1g` to 512 2 MiB leaves, each checked for its part
//! of the run and the carried A/D, two of them scanned and harvested, then
//! one demoted on to 4 KiB and written once: the harvest reports exactly
//! that page), and `promote-1g` (the same range back: refused while a
//! part is a leaf table, then `promote_2m` of it and `promote_1g` to one
//! 1 GiB leaf, accessed and clean from the 2 MiB leaves' state, every
//! page of two parts scanned through it, a write dirtying it and a
//! harvest reporting the whole GiB); neither on the Ivy Bridge model,
//! which has no 1 GiB EPT pages.
//! Each page holds a distinct value,
//! written by the guest or in host memory (with a decoy where the guest is
//! to write, or where a wrong frame would lead); after the change and the
//! invalidation (single-context INVEPT; on SVM a TLB flush, since INVLPGA
//! covers one page) the guest scans all 512 pages and must find every value:
//! the same translation. A/D: each small leaf's state before, the large
//! leaf = their OR, each small leaf after a demotion = the large leaf's,
//! a write through the new leaf sets D (after the harvest and the page's
//! invalidation where D was already set), and after a demotion and a
//! harvest a write to one page makes the next harvest report exactly that
//! page. Without EPT A/D those expectations are "none set" and the
//! harvests report nothing; `promote-demote-emulated-ad` (VMX, both
//! models) checks the carried state in the emulated-A/D format instead,
//! recording each exit with `record_access` (there the dirty state is
//! carried in software bit 55, so the first write through the promoted or
//! demoted leaf exits once more, as the model predicts). Not applicable
//! scenarios print
//! `SKIP` with the reason; [`Emulator::required_scenarios`] lists what each
//! configuration must run, so a silently shortened suite fails.
//!
//! # Emulator quirks (accepted by name, with evidence)
//!
//! - `QEMU_VTD_IOTLB_HIT_NO_FAULT_RECORD` (DMA suite): QEMU records a VT-d
//!   fault only when its page walk fails; a write refused by a read-only
//!   translation cached in its IOTLB reaches no memory but records no fault
//!   (VT-d spec §7.1.3: reason 0x5 either way). Seen in
//!   `vtd-write-ro-after-cached-read`; the same write after an IOTLB
//!   invalidation records reason 0x5 (`vtd-fault-write-ro-4k`).
//! - `QEMU_AMDVI_NO_EVENT_LOGGED` (DMA suite): QEMU's AMD-Vi refuses every
//!   DMA the model says must fault (nothing reaches memory; its
//!   `amdvi_page_fault` trace event fires, seen with `-trace amdvi_*`) but
//!   no IO_PAGE_FAULT entry reaches the event log, with the log running
//!   and not overflowed. So under QEMU the AMD-Vi fault *flags* are not
//!   compared; every translation that succeeds is, byte for byte.
//!
//! A disagreement is attributed to a quirk only if recomputing the model's
//! prediction under the quirk's hypothesis reproduces the emulator's exit and
//! every table word exactly; anything else fails the run. Observed with QEMU
//! 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3) and Bochs 2.7 (Debian
//! 2.7+dfsg-4+deb12u1); the kernel prints the hardware and model values in
//! its `QUIRK` lines:
//!
//! - `QEMU_NPF_RSV_WITHOUT_P`: a reserved-bit #NPF has EXITINFO1 =
//!   0x1_0000_000c (RSV|U, final-translation bit 32) where the AMD APM gives
//!   P=1 (0x1_0000_000d), as Bochs does for EPT's equivalent. Seen for high
//!   address bits in a PTE and a PDE, bit 13 of 2 MiB and 1 GiB leaves, bit
//!   29 of a 1 GiB leaf, PS in the PML4E.
//! - `QEMU_FAULT_WALK_SETS_A`: a walk that faults (not present at level 1,
//!   permission at level 1) sets A in the PDE it walked through (e.g. PDE
//!   0x204007 becomes 0x204027). The model sets nothing on a faulting walk
//!   and neither manual settles it; Bochs sets nothing.
//! - `QEMU_1G_LEAF_A_ON_FAULT`: a 1 GiB nested leaf gets A even when the
//!   access then faults on permission (read-only write, NX fetch) or on its
//!   low reserved bits (13, 29): e.g. 0x85 becomes 0xa5. 2 MiB and 4 KiB
//!   leaves do not.
//! - `BOCHS_EPT_LARGE_LEAF_BIT12_IGNORED`: bit 12 of a 2 MiB or 1 GiB EPT
//!   leaf is reserved (SDM vol. 3C, EPT misconfigurations), but Bochs
//!   translates exactly as if it were clear (the walk succeeds and sets A),
//!   while bit 13 gives the misconfiguration. Seen on both CPU models and
//!   with EPTP bit 6 set or clear: Bochs masks bit 12 out of a large EPT
//!   leaf's frame before its reserved-offset check, as if it were the PAT
//!   bit of ordinary paging.
//!
//! # Known gaps
//!
//! The guest never enables paging, so guest-paging-structure accesses
//! (EXITINFO1 bit 33, qualification bit 8 = 0) are not exercised; level-4
//! faults are reached only through the code fetch; QEMU's model has no
//! execute-only NPT (none exists) and Debian's Bochs has no `nogui`
//! display, so Bochs runs with the RFB display library without waiting for
//! a client (it listens on a local TCP port in 5900-5949 while it runs).
//! The emulators are found on `PATH`; where one is missing its run reports
//! [`Error::Missing`] and the tests skip with a message.

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
    /// `qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt,+pdpe1gb`: AMD
    /// SVM with nested paging (NPT) and 1 GiB pages.
    Qemu,
    /// Bochs with a Skylake-X CPU model: Intel VMX with EPT, EPT A/D,
    /// execute-only and 2 MiB / 1 GiB EPT pages.
    Bochs,
    /// Bochs with an Ivy Bridge CPU model: VMX with EPT but **without** EPT
    /// A/D and without 1 GiB EPT pages, the processor the emulated-A/D
    /// format exists for.
    BochsNoAd,
    /// `qemu-system-x86_64 -machine q35 -device intel-iommu,aw-bits=48
    /// -device edu`: Intel VT-d DMA remapping through second-level tables
    /// in nested-pt's VT-d format, exercised by the `edu` device's DMA.
    QemuVtd,
    /// `qemu-system-x86_64 -machine q35 -device amd-iommu -device edu`:
    /// AMD-Vi DMA translation through I/O page tables in nested-pt's AMD-Vi
    /// format.
    QemuAmdVi,
}

impl Emulator {
    /// Every configuration, in the order the suite runs them.
    pub const ALL: [Emulator; 5] =
        [Emulator::Qemu, Emulator::Bochs, Emulator::BochsNoAd, Emulator::QemuVtd, Emulator::QemuAmdVi];

    /// The program that must be on `PATH`.
    pub fn program(self) -> &'static str {
        match self {
            Emulator::Qemu | Emulator::QemuVtd | Emulator::QemuAmdVi => "qemu-system-x86_64",
            Emulator::Bochs | Emulator::BochsNoAd => "bochs",
        }
    }

    /// The nested-paging flavour this emulator checks.
    pub fn format(self) -> &'static str {
        match self {
            Emulator::Qemu => "SVM+NPT",
            Emulator::Bochs => "VMX+EPT",
            Emulator::BochsNoAd => "VMX+EPT, no A/D, no 1G",
            Emulator::QemuVtd => "VT-d second level (DMA)",
            Emulator::QemuAmdVi => "AMD-Vi I/O page tables (DMA)",
        }
    }

    /// Scenarios the kernel must run (not skip) on this emulator's pinned
    /// CPU model; a report missing any of them fails.
    pub fn required_scenarios(self) -> Vec<&'static str> {
        const COMMON: &[&str] = &[
            "map-4k",
            "map-2m",
            "map-1g",
            "ro-4k",
            "ro-2m",
            "ro-1g",
            "nx-4k",
            "nx-2m",
            "nx-1g",
            "not-present-l1",
            "not-present-l2",
            "not-present-l3",
            "not-present-l4",
            "ad-write-after-cached-read",
            "harvest-dirty-4k",
            "harvest-dirty-2m",
            "unmap-invalidate-4k",
            "unmap-invalidate-2m",
            "promote-2m",
            "promote-2m-clean",
            "demote-2m",
            "demote-2m-clean",
            "promote-2m-refused",
            "demote-1g",
            "promote-1g",
        ];
        const QEMU: &[&str] = &[
            "rsv-4k-high-addr",
            "rsv-pde-high-addr",
            "rsv-2m-bit13",
            "pat-2m-bit12-ok",
            "rsv-1g-bit13",
            "rsv-1g-bit29",
            "rsv-pml4e-ps",
        ];
        const BOCHS: &[&str] = &[
            "mis-4k-high-addr",
            "mis-4k-memtype-2",
            "mis-4k-memtype-7",
            "mis-4k-write-no-read",
            "mis-pde-bit3",
            "mis-pdpte-bit7-table",
            "mis-2m-bit13",
            "mis-2m-bit12",
            "mis-1g-bit13",
            "mis-1g-bit12",
            "mis-2m-bit12-ad-off",
            "mis-1g-bit12-ad-off",
            "ept-ad-disabled",
            "exec-only-4k",
            "ept-emulated-ad",
            "promote-demote-emulated-ad",
        ];
        // Ivy Bridge: no 1 GiB EPT pages, no EPT A/D (so no hardware dirty
        // harvest and no "A/D disabled" variant).
        const NOT_ON_IVB: &[&str] = &[
            "map-1g",
            "ro-1g",
            "nx-1g",
            "demote-1g",
            "promote-1g",
            "harvest-dirty-4k",
            "harvest-dirty-2m",
            "mis-1g-bit13",
            "mis-1g-bit12",
            "mis-1g-bit12-ad-off",
            "mis-2m-bit12-ad-off",
            "ept-ad-disabled",
        ];
        // The DMA suite, the same scenarios under both IOMMUs (`vtd-` or
        // `amdvi-` before each name); QEMU's AMD-Vi checks no reserved
        // field, so those run under VT-d only.
        const DMA: &[&str] = &[
            "dma-write-4k",
            "dma-read-4k",
            "dma-read-ro-4k",
            "write-ro-after-cached-read",
            "fault-write-ro-4k",
            "fault-write-not-present-l1",
            "fault-read-not-present-l1",
            "fault-write-not-present-l2",
            "fault-read-not-present-l4",
            "dma-write-2m",
            "dma-read-2m",
            "fault-pde-not-present",
            "unmap-before",
            "unmap-invalidate",
        ];
        const VTD_ONLY: &[&str] = &[
            "vtd-fault-rsv-bit11",
            "vtd-fault-rsv-high-addr",
            "vtd39-dma-write-4k",
            "vtd39-dma-read-4k",
            "vtd39-fault-read-not-present-l3",
            "vtd39-fault-beyond-width",
        ];
        let dma = |p: &'static str| -> Vec<&'static str> {
            DMA.iter().map(|n| &*Box::leak(format!("{p}-{n}").into_boxed_str())).collect()
        };
        let own = match self {
            Emulator::Qemu => QEMU,
            Emulator::Bochs | Emulator::BochsNoAd => BOCHS,
            // A DMA suite: none of the nested-paging scenarios.
            Emulator::QemuVtd => return dma("vtd").into_iter().chain(VTD_ONLY.iter().copied()).collect(),
            Emulator::QemuAmdVi => return dma("amdvi"),
        };
        COMMON.iter().chain(own).copied().filter(|n| self != Emulator::BochsNoAd || !NOT_ON_IVB.contains(n)).collect()
    }

    /// Whether the emulator (and for Bochs, its BIOS images) is installed.
    pub fn available(self) -> Result<(), Error> {
        if find_in_path(self.program()).is_none() {
            return Err(Error::Missing(format!("{} not found on PATH", self.program())));
        }
        if self.program() == "bochs" {
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
            Emulator::BochsNoAd => "bochs-noad",
            Emulator::QemuVtd => "qemu-vtd",
            Emulator::QemuAmdVi => "qemu-amdvi",
        })
    }
}

impl std::str::FromStr for Emulator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "qemu" => Ok(Emulator::Qemu),
            "bochs" => Ok(Emulator::Bochs),
            "bochs-noad" => Ok(Emulator::BochsNoAd),
            "qemu-vtd" => Ok(Emulator::QemuVtd),
            "qemu-amdvi" => Ok(Emulator::QemuAmdVi),
            _ => Err(Error::Usage(format!("unknown emulator {s:?} (qemu, bochs, bochs-noad, qemu-vtd or qemu-amdvi)"))),
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
    /// True when the kernel finished, said `END PASS`, no scenario failed,
    /// no disagreement was left unattributed, and every scenario the pinned
    /// CPU model must run ran (see [`Emulator::required_scenarios`]), so a
    /// kernel that silently skips its work cannot pass.
    pub fn passed(&self) -> bool {
        self.parsed.end == Some(true)
            && self.parsed.panic.is_none()
            && self.parsed.orphans.is_empty()
            && self.missing().is_empty()
            && self.parsed.scenarios.iter().all(|s| s.outcome != Outcome::Fail)
    }

    /// Required scenarios that did not run (absent, or skipped).
    pub fn missing(&self) -> Vec<&'static str> {
        self.emulator
            .required_scenarios()
            .into_iter()
            .filter(|n| !self.parsed.scenarios.iter().any(|s| s.name == *n && s.outcome != Outcome::Skip))
            .collect()
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
        for m in self.missing() {
            let _ = writeln!(t, "   required scenario did not run: {m}");
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
pub const RUN_LIMIT: Duration = Duration::from_secs(60);

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
        Emulator::Qemu | Emulator::QemuVtd | Emulator::QemuAmdVi => Command::new(emu.program())
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into()),
        // Bochs prints its banner on any start; `--help cpu` exits at once.
        Emulator::Bochs | Emulator::BochsNoAd => Command::new(emu.program())
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

/// The Bochs configuration for CPU `model` (Skylake-X: VMX with EPT, EPT
/// A/D, execute-only, 2 MiB/1 GiB pages; Ivy Bridge: EPT without A/D and
/// without 1 GiB pages), headless through the RFB display with no wait for a
/// client (the Debian build has no `nogui`), port 0xE9 to stdout, a panic
/// (the kernel's shutdown-port write) ends the process.
fn bochsrc(model: &str, disk: &Path, log: &Path) -> String {
    format!(
        "megs: 128\n\
         cpu: model={model}, reset_on_triple_fault=0, ips=200000000\n\
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
        Emulator::QemuVtd | Emulator::QemuAmdVi => {
            // The IOMMU first: QEMU wants it created before the devices
            // whose DMA it translates. `edu`'s default DMA mask is 28 bits.
            let iommu = if emu == Emulator::QemuVtd { "intel-iommu,aw-bits=48" } else { "amd-iommu" };
            c.args(["-accel", "tcg", "-machine", "q35", "-cpu", "qemu64", "-m", "128", "-display", "none"])
                .args(["-no-reboot", "-monitor", "none", "-serial", "none", "-debugcon", "stdio"])
                .args(["-device", iommu, "-device", "edu,dma_mask=0xffffffffffffffff"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-drive"])
                .arg(format!("file={},format=raw,if=ide", disk.display()));
        }
        Emulator::Bochs | Emulator::BochsNoAd => {
            let model = if emu == Emulator::Bochs { "corei7_skylake_x" } else { "corei7_ivy_bridge_3770k" };
            let rc = work.join("bochsrc");
            std::fs::write(&rc, bochsrc(model, disk, &work.join("bochs.log")))?;
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
/// `limit` passes. The work directory (disk image, bochsrc, `bochs.log`)
/// under the system temp directory is removed after a complete run and kept
/// after a timeout or an incomplete run, for inspection.
///
/// A Bochs that exits at start because its RFB display found no free port
/// among 5900-5949 (other programs, or other Bochs instances starting at
/// the same moment, holding them) is started again, up to three times:
/// that failure says nothing about the kernel.
pub fn run_image(emu: Emulator, disk_image: &[u8], limit: Duration) -> Result<(String, Duration), Error> {
    let mut tries = 0;
    loop {
        tries += 1;
        match run_image_once(emu, disk_image, limit) {
            Err(Error::Incomplete { output }) if tries < 3 && output.contains("RFB could not bind") => {
                std::thread::sleep(Duration::from_millis(200 * tries));
            }
            r => return r,
        }
    }
}

fn run_image_once(emu: Emulator, disk_image: &[u8], limit: Duration) -> Result<(String, Duration), Error> {
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

/// A scenario × emulator table from several reports: one row per scenario
/// (in first-seen order), one column per emulator, `-` where an emulator
/// did not run the scenario. Failed runs appear as a column of their error.
pub fn matrix(results: &[(Emulator, Result<Report, Error>)]) -> String {
    use std::fmt::Write;
    let mut names: Vec<String> = Vec::new();
    for (_, r) in results {
        if let Ok(rep) = r {
            for s in &rep.parsed.scenarios {
                if !names.contains(&s.name) {
                    names.push(s.name.clone());
                }
            }
        }
    }
    let w = names.iter().map(|n| n.len()).max().unwrap_or(8).max(8);
    let mut t = String::new();
    let _ = write!(t, "{:w$}", "scenario");
    for (emu, _) in results {
        let _ = write!(t, "  {:36}", format!("{emu} ({})", emu.format()));
    }
    t.push('\n');
    for n in &names {
        let _ = write!(t, "{n:w$}");
        for (_, r) in results {
            let cell = match r {
                Ok(rep) => rep
                    .parsed
                    .scenarios
                    .iter()
                    .find(|s| &s.name == n)
                    .map(|s| short(&s.outcome))
                    .unwrap_or_else(|| "-".into()),
                Err(_) => "-".into(),
            };
            let _ = write!(t, "  {cell:36}");
        }
        t.push('\n');
    }
    let _ = write!(t, "{:w$}", "overall");
    for (_, r) in results {
        let cell = match r {
            Ok(rep) if rep.passed() => "PASS".to_string(),
            Ok(_) => "FAIL".to_string(),
            Err(Error::Missing(why)) => format!("SKIP ({why})"),
            Err(e) => format!("ERROR ({})", e.to_string().lines().next().unwrap_or("")),
        };
        let _ = write!(t, "  {cell:36}");
    }
    t.push('\n');
    t.push_str("(PASS*n: passed, with n listed emulator quirks explaining its disagreements)\n");
    t
}

fn short(o: &Outcome) -> String {
    match o {
        Outcome::PassWithQuirks(q) => format!("PASS*{}", q.len()),
        o => o.to_string(),
    }
}

/// Run the suite on every emulator, one after the other.
pub fn run_all() -> Vec<(Emulator, Result<Report, Error>)> {
    Emulator::ALL.iter().map(|&e| (e, run_conformance(e))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(emu: Emulator, out: &str) -> Report {
        Report {
            emulator: emu,
            version: "test".into(),
            parsed: protocol::parse(out),
            elapsed: Duration::ZERO,
            output: out.into(),
        }
    }

    fn all_pass(emu: Emulator) -> String {
        let mut s = String::from("HELLO\n");
        for n in emu.required_scenarios() {
            s += &format!("RESULT {n} PASS\n");
        }
        s + "END PASS\n"
    }

    #[test]
    fn a_complete_passing_run_passes() {
        for emu in Emulator::ALL {
            let r = report(emu, &all_pass(emu));
            assert!(r.passed(), "{}", r.table());
        }
    }

    #[test]
    fn a_skipped_or_missing_required_scenario_fails() {
        let out = all_pass(Emulator::Bochs).replace("RESULT exec-only-4k PASS", "RESULT exec-only-4k SKIP no caps");
        let r = report(Emulator::Bochs, &out);
        assert!(!r.passed());
        assert_eq!(r.missing(), vec!["exec-only-4k"]);
        let out = all_pass(Emulator::Qemu).replace("RESULT map-1g PASS\n", "");
        assert_eq!(report(Emulator::Qemu, &out).missing(), vec!["map-1g"]);
    }

    #[test]
    fn a_diff_or_a_missing_end_fails() {
        let out =
            all_pass(Emulator::Qemu).replace("RESULT map-4k PASS", "DIFF map-4k exit differs\nRESULT map-4k PASS");
        assert!(!report(Emulator::Qemu, &out).passed());
        let out = all_pass(Emulator::Qemu).replace("END PASS\n", "");
        assert!(!report(Emulator::Qemu, &out).passed());
    }

    #[test]
    fn matrix_lists_each_scenario_once() {
        let r = vec![
            (Emulator::Qemu, Ok(report(Emulator::Qemu, &all_pass(Emulator::Qemu)))),
            (Emulator::Bochs, Err(Error::Missing("bochs not found".into()))),
        ];
        let m = matrix(&r);
        assert_eq!(m.lines().filter(|l| l.starts_with("map-4k ")).count(), 1);
        assert!(m.contains("SKIP (bochs not found)"));
    }

    #[test]
    fn emulator_names_round_trip() {
        for e in Emulator::ALL {
            assert_eq!(e.to_string().parse::<Emulator>().unwrap(), e);
        }
        assert!("kvm".parse::<Emulator>().is_err());
    }
}
