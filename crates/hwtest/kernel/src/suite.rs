//! The comparison engine: run one guest access on the emulator, replay it on
//! `nested_pt::mmu::translate`, and compare the exit and every table entry.
//!
//! For each access:
//! 1. snapshot the table pages (`pre`);
//! 2. run the guest (one instruction fetch of the stub, then the access);
//! 3. snapshot again (`hw`: what the emulator did to A/D bits), put `pre`
//!    back, replay the same fetch and access on the software MMU, snapshot
//!    (`model`), and put `hw` back so the tables continue from what the
//!    emulator really did;
//! 4. compare the exit (kind, EXITINFO1 or qualification, guest-physical
//!    address) and every 64-bit word of the table pages, `hw` against
//!    `model`.
//!
//! A difference is a `DIFF` unless a listed quirk (`quirks.rs`) explains it
//! exactly; the quirk checks recompute the prediction under the quirk's
//! hypothesis and require the emulator to match it bit for bit.

use core::fmt::Write as _;

use alloc::string::String;
use alloc::vec::Vec;
use nested_pt::mmu::{self, Translation, Violation, ViolationKind};
use nested_pt::{Access, FormatKind, Gpa, NestedTable, Pfn, PteFormat, TablePages};

use crate::arena::{ArenaPages, SLOT_PAGES};
use crate::guest::{self, Op};
use crate::hv::{Exit, GuestRegs, Hv, Invalidate};
use crate::layout::{SNAP_BASE, TEST_BASE, TEST_SIZE};
use crate::quirks::{self, Quirk};
use crate::{kprint, kprintln};

/// Which virtualization extension runs the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arch {
    /// AMD SVM + NPT.
    Svm,
    /// Intel VMX + EPT.
    Vmx,
}

/// One nested table and how it is installed.
pub struct Env {
    /// The table, built by nested-pt.
    pub table: NestedTable<ArenaPages>,
    /// EPTP bit 6 (EPT); NPT always tracks A/D.
    pub ad: bool,
}

impl Env {
    /// A table of `fmt` with the guest code page mapped (identity, RWX).
    pub fn new(fmt: PteFormat, ad: bool) -> Env {
        let mut table = NestedTable::new(fmt, ArenaPages::new()).expect("root table");
        let code = guest::code_page();
        table.populate_region(Gpa(code), 4096, nested_pt::PageSize::Size4K).expect("populate code");
        table
            .map(
                Gpa(code),
                Pfn(code >> 12),
                nested_pt::PageSize::Size4K,
                nested_pt::Prot::RWX,
                nested_pt::MemType::WriteBack,
            )
            .expect("map code");
        Env { table, ad }
    }

    /// A table with nothing but its root (every walk stops at level 4).
    pub fn empty(fmt: PteFormat, ad: bool) -> Env {
        Env { table: NestedTable::new(fmt, ArenaPages::new()).expect("root table"), ad }
    }

    /// The root pointer to install (nCR3 or EPTP with bit 6 = `ad`).
    pub fn root_pointer(&self) -> u64 {
        self.table.root_pointer(self.ad)
    }

    /// Pointer to the entry at `level` on the walk of `gpa`.
    pub fn entry_ptr(&self, gpa: u64, level: u8) -> *mut u64 {
        let w = self.table.walk(Gpa(gpa));
        let s = w.steps().iter().find(|s| s.level == level).expect("walk reaches level");
        let p = self.table.pages().ptr(s.table);
        assert!(!p.is_null());
        p.wrapping_add(s.index as usize)
    }

    /// Read an entry on the walk of `gpa`.
    pub fn entry(&self, gpa: u64, level: u8) -> u64 {
        // SAFETY: entry_ptr points into a live table page of this table.
        unsafe { self.entry_ptr(gpa, level).read_volatile() }
    }

    /// Overwrite an entry on the walk of `gpa` (fault injection only: the
    /// entry was built by nested-pt and is restored afterwards).
    pub fn set_entry(&self, gpa: u64, level: u8, v: u64) {
        // SAFETY: as for `entry`; the guest is not running.
        unsafe { self.entry_ptr(gpa, level).write_volatile(v) }
    }
}

/// What a scenario expects of one access, independently of the model: the
/// check that the scenario exercises what its name says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Expect {
    /// The access completes.
    Ok,
    /// The access faults with this kind of violation.
    Fault(ViolationKind),
}

/// The data of one guest access.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Data {
    /// A fresh marker: planted where the table maps the address before a
    /// read (the guest must read it), written by the guest on a write.
    Marker,
    /// Plant nothing: the guest must read this value, which the scenario
    /// put in the frame earlier (through an earlier translation, or
    /// directly in host memory). A translation that changed would read
    /// another frame.
    Read(u32),
    /// The guest writes this value.
    Write(u32),
}

/// What the model predicts for one run.
#[derive(Clone, Copy, Debug)]
enum Prediction {
    Ok(Translation),
    Fault(Violation, u64),
}

impl Env {
    /// A copy of every word of the table's pages (the whole sub-arena
    /// handed out so far, freed pages included): to show that an operation
    /// changed nothing.
    pub fn table_words(&self) -> Vec<u64> {
        let (base, len) = self.table.pages().used();
        let mut v = alloc::vec![0u64; len as usize / 8];
        // SAFETY: [base, base+len) is the table's identity-mapped sub-arena
        // (see `snapshot`); the guest is not running; `v` has len/8 words.
        unsafe { core::ptr::copy_nonoverlapping(base as *const u64, v.as_mut_ptr(), v.len()) }
        v
    }
}

/// Per-scenario bookkeeping.
pub struct Scenario {
    name: &'static str,
    diffs: u32,
    quirks: Vec<Quirk>,
}

/// The suite: the hypervisor, the architecture, and the tally.
pub struct Suite<'h> {
    /// The virtualization extension.
    pub hv: &'h mut dyn Hv,
    /// Which one it is.
    pub arch: Arch,
    /// Scenarios that failed.
    pub failed: u32,
    /// Scenarios run.
    pub ran: u32,
    marker: u32,
    /// What the last access expected to read and wrote (for `resume`).
    last: (u32, u32),
}

const SNAP_WORDS: usize = (SLOT_PAGES * 512) as usize;

fn snap_buf(i: usize) -> *mut u64 {
    (SNAP_BASE as usize + i * SNAP_WORDS * 8) as *mut u64
}

fn snapshot(env: &Env, buf: usize) {
    let (base, len) = env.table.pages().used();
    // SAFETY: [base, base+len) is the table's sub-arena (identity-mapped,
    // owned by this table); the snapshot buffers are reserved in layout.rs
    // and large enough for a whole sub-arena. The guest is not running.
    unsafe { core::ptr::copy_nonoverlapping(base as *const u64, snap_buf(buf), len as usize / 8) }
}

fn restore(env: &Env, buf: usize) {
    let (base, len) = env.table.pages().used();
    // SAFETY: as for `snapshot`, in the other direction; only A/D bits
    // differ between the copies, so nested-pt's bookkeeping stays valid.
    unsafe { core::ptr::copy_nonoverlapping(snap_buf(buf), base as *mut u64, len as usize / 8) }
}

fn snap_word(buf: usize, i: usize) -> u64 {
    // SAFETY: i < SNAP_WORDS, inside the reserved buffer.
    unsafe { snap_buf(buf).add(i).read() }
}

fn access_of(op: Op) -> Access {
    match op {
        Op::Read => Access::Read,
        Op::Write => Access::Write,
        Op::Exec => Access::Execute,
    }
}

fn in_test_region(hpa: u64) -> bool {
    (TEST_BASE..TEST_BASE + TEST_SIZE - 8).contains(&hpa)
}

/// Word-level differences between two snapshots: (address, hw, model).
fn table_diffs(env: &Env, a: usize, b: usize) -> Vec<(u64, u64, u64)> {
    let (base, len) = env.table.pages().used();
    (0..len as usize / 8)
        .filter_map(|i| {
            let (x, y) = (snap_word(a, i), snap_word(b, i));
            (x != y).then_some((base + i as u64 * 8, x, y))
        })
        .collect()
}

/// Level of the entry at physical address `addr` on the walk of `gpa`.
fn level_on_walk(env: &Env, gpa: u64, addr: u64) -> Option<u8> {
    env.table.walk(Gpa(gpa)).steps().iter().find(|s| s.table.addr() + s.index as u64 * 8 == addr).map(|s| s.level)
}

impl<'h> Suite<'h> {
    /// A suite on `hv`.
    pub fn new(hv: &'h mut dyn Hv, arch: Arch) -> Suite<'h> {
        Suite { hv, arch, failed: 0, ran: 0, marker: 0x5EED_0000, last: (0, 0) }
    }

    /// Start a scenario.
    pub fn begin(&mut self, name: &'static str) -> Scenario {
        Scenario { name, diffs: 0, quirks: Vec::new() }
    }

    /// Finish a scenario and print its verdict.
    pub fn end(&mut self, s: Scenario) {
        self.ran += 1;
        if s.diffs == 0 {
            kprintln!("RESULT {} PASS", s.name);
        } else {
            self.failed += 1;
            kprintln!("RESULT {} FAIL {} disagreement(s)", s.name, s.diffs);
        }
    }

    /// Report a scenario that does not apply to this CPU model.
    pub fn skip(&mut self, name: &str, why: &str) {
        kprintln!("RESULT {name} SKIP {why}");
    }

    /// Record an unexplained disagreement.
    pub fn diff(&mut self, s: &mut Scenario, args: core::fmt::Arguments) {
        s.diffs += 1;
        kprint!("DIFF {} ", s.name);
        kprintln!("{}", args);
    }

    fn quirk(&mut self, s: &mut Scenario, q: Quirk, what: &str) {
        kprintln!("QUIRK {} {} {}", s.name, q.name, what);
        if !s.quirks.contains(&q) {
            s.quirks.push(q);
        }
    }

    /// Model prediction for running `op` on `gpa` from the current table
    /// state (which it modifies: A/D bits, as hardware would).
    fn predict(&self, env: &Env, op: Op, gpa: u64) -> Prediction {
        let t = &env.table;
        let run = |g: u64, a: Access| mmu::translate(t.pages(), t.format(), t.root(), Gpa(g), a, env.ad);
        let code = guest::entry(op);
        if let Err(v) = run(code, Access::Execute) {
            return Prediction::Fault(v, code);
        }
        match run(gpa, access_of(op)) {
            Ok(tr) => Prediction::Ok(tr),
            Err(v) => Prediction::Fault(v, gpa),
        }
    }

    fn expected_exit(&self, p: &Prediction) -> Exit {
        match *p {
            Prediction::Ok(tr) => exit_for(self.arch, Ok(tr)),
            Prediction::Fault(v, g) => exit_for(self.arch, Err((v, g))),
        }
    }

    /// Whether the hardware exit matches the expected one (RIP of a HLT is
    /// not compared; VMX qualification bits above 12 are ignored).
    pub fn exit_matches(hw: &Exit, want: &Exit) -> bool {
        match (hw, want) {
            (Exit::Hlt { .. }, Exit::Hlt { .. }) => true,
            (Exit::EptViolation { qual: q, gpa: g, gla: l }, Exit::EptViolation { qual: wq, gpa: wg, gla: wl }) => {
                q & 0x1FFF == *wq && g == wg && l == wl
            }
            _ => hw == want,
        }
    }

    /// Run `op` on `gpa` after invalidating `inv`; compare with the model.
    /// Returns the hardware exit.
    pub fn access(&mut self, s: &mut Scenario, env: &Env, op: Op, gpa: u64, inv: Invalidate, expect: Expect) -> Exit {
        self.access_data(s, env, op, gpa, inv, expect, Data::Marker)
    }

    /// [`access`](Self::access) with the data the guest moves chosen by the
    /// scenario (see [`Data`]).
    #[allow(clippy::too_many_arguments)]
    pub fn access_data(
        &mut self,
        s: &mut Scenario,
        env: &Env,
        op: Op,
        gpa: u64,
        inv: Invalidate,
        expect: Expect,
        data: Data,
    ) -> Exit {
        self.hv.set_root(env.root_pointer());
        self.marker = self.marker.wrapping_add(0x1_0001);
        let marker = match data {
            Data::Marker => self.marker,
            Data::Read(v) => {
                assert!(op == Op::Read, "Data::Read is for reads");
                v
            }
            Data::Write(v) => {
                assert!(op == Op::Write, "Data::Write is for writes");
                v ^ 0xFFFF
            }
        };
        // Put a marker (read) or a HLT (fetch) where the table maps gpa.
        if let Some((pfn, _)) = env.table.is_mapped(Gpa(gpa)).filter(|_| data == Data::Marker) {
            let host = pfn.addr() + (gpa & 0xFFF);
            if in_test_region(host) {
                // SAFETY: host lies in the test-frame region, which only the
                // guest's test accesses and this code use.
                unsafe {
                    match op {
                        Op::Exec => (host as *mut u8).write_volatile(0xF4),
                        _ => (host as *mut u32).write_volatile(marker),
                    }
                }
            }
        }
        snapshot(env, 0);
        let regs = GuestRegs {
            rax: if op == Op::Write { u64::from(marker) ^ 0xFFFF } else { 0 },
            rbx: gpa,
            ..GuestRegs::default()
        };
        let exit = self.hv.run(guest::entry(op), regs, inv);
        self.last = (marker, regs.rax as u32);
        self.compare(s, env, op, gpa, exit, expect, marker, regs.rax as u32);
        exit
    }

    /// Continue the guest after the kernel handled an exit, and compare the
    /// retried access with the model. The guest retries the same
    /// instruction; the model replays its code fetch too, which changes
    /// nothing since the code page is already accessed.
    pub fn resume(&mut self, s: &mut Scenario, env: &Env, op: Op, gpa: u64, expect: Expect) -> Exit {
        snapshot(env, 0);
        let exit = self.hv.resume();
        let (marker, wrote) = self.last;
        self.compare(s, env, op, gpa, exit, expect, marker, wrote);
        exit
    }

    #[allow(clippy::too_many_arguments)]
    fn compare(
        &mut self,
        s: &mut Scenario,
        env: &Env,
        op: Op,
        gpa: u64,
        exit: Exit,
        expect: Expect,
        marker: u32,
        wrote: u32,
    ) {
        snapshot(env, 1);
        restore(env, 0);
        let pred = self.predict(env, op, gpa);
        snapshot(env, 2);
        restore(env, 1);
        let mut want = self.expected_exit(&pred);
        if let Exit::Hlt { rip } = &mut want {
            // Where the guest must stop: the HLT after the access stub, or
            // the HLT written at a fetched target.
            *rip = if op == Op::Exec { gpa } else { guest::entry(op) + 2 };
        }
        kprintln!("CHECK {} {:?} {:#x} hw={:x?} model={:x?}", s.name, op, gpa, exit, want);

        // The scenario's own expectation, checked on the model's verdict
        // (the hardware is compared with the model below).
        match (expect, &pred) {
            (Expect::Ok, Prediction::Ok(_)) => {}
            (Expect::Fault(k), Prediction::Fault(v, _)) if v.kind == k => {}
            _ => self.diff(s, format_args!("expectation {expect:?} not met by the model: {pred:x?}")),
        }

        let mut diffs = table_diffs(env, 1, 2);
        let exit_ok = Self::exit_matches(&exit, &want);
        if !exit_ok || !diffs.is_empty() {
            // Try the listed quirks: each one recomputes the prediction under
            // its hypothesis and must match the hardware exactly.
            let ctx = quirks::Ctx {
                arch: self.arch,
                env,
                op,
                gpa,
                exit: &exit,
                want: &want,
                pred_fault: match pred {
                    Prediction::Fault(v, g) => Some((v, g)),
                    Prediction::Ok(_) => None,
                },
                diffs: &diffs,
            };
            let explained = quirks::explain(&ctx);
            if !explained.is_empty() {
                for (q, why) in explained {
                    self.quirk(s, q, &why);
                }
                diffs.clear();
            } else {
                if !exit_ok {
                    self.diff(s, format_args!("{op:?} {gpa:#x}: exit hw={exit:x?} model={want:x?}"));
                }
                for (addr, hw, model) in diffs.drain(..) {
                    let lvl = level_on_walk(env, gpa, addr).or_else(|| level_on_walk(env, guest::entry(op), addr));
                    self.diff(
                        s,
                        format_args!(
                            "{op:?} {gpa:#x}: entry @{addr:#x} (level {lvl:?}) hw={hw:#x} model={model:#x} xor={:#x}",
                            hw ^ model
                        ),
                    );
                }
            }
        }

        // The guest stopped at the HLT after its access (a fetch runs the
        // HLT written at the target), and the data really went through the
        // predicted frame.
        if let (Prediction::Ok(tr), Exit::Hlt { rip }, Exit::Hlt { rip: want_rip }) = (pred, exit, want) {
            if rip != want_rip {
                self.diff(s, format_args!("{op:?} {gpa:#x}: HLT at {rip:#x}, expected {want_rip:#x}"));
            }
            match op {
                Op::Read if in_test_region(tr.hpa) => {
                    let got = self.hv.regs().rax as u32;
                    if got != marker {
                        self.diff(
                            s,
                            format_args!(
                                "read {gpa:#x}: guest got {got:#x}, expected {marker:#x} (predicted frame {:#x})",
                                tr.hpa
                            ),
                        );
                    }
                }
                Op::Write if in_test_region(tr.hpa) => {
                    // SAFETY: tr.hpa lies in the test-frame region.
                    let got = unsafe { (tr.hpa as *const u32).read_volatile() };
                    if got != wrote {
                        self.diff(
                            s,
                            format_args!(
                                "write {gpa:#x}: frame at {:#x} holds {got:#x}, guest wrote {wrote:#x}",
                                tr.hpa
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// The guest reads `count` words, the `i`-th at `gpa + i *
    /// SCAN_STRIDE`, in one run (after invalidating `inv`), and checks in
    /// the guest that the `i`-th holds `first + i`; it stops at the first
    /// that does not. Compared with the model replaying the code fetch and
    /// every read: each read must succeed, the guest must halt after the
    /// last one with every value as expected, and every table word must be
    /// what the model's reads leave. Much cheaper under an emulator than
    /// `count` separate runs (one VM entry, one comparison).
    pub fn scan(&mut self, s: &mut Scenario, env: &Env, gpa: u64, count: u32, first: u32, inv: Invalidate) {
        assert!(count > 0);
        self.hv.set_root(env.root_pointer());
        snapshot(env, 0);
        let regs = GuestRegs { rax: 0, rbx: gpa, rcx: u64::from(count), rdx: u64::from(first) };
        let exit = self.hv.run(guest::scan_entry(), regs, inv);
        let got = self.hv.regs();
        snapshot(env, 1);
        restore(env, 0);
        let t = &env.table;
        let run = |g: u64, a: Access| mmu::translate(t.pages(), t.format(), t.root(), Gpa(g), a, env.ad);
        let mut fault = run(guest::scan_entry(), Access::Execute).err().map(|v| (v, guest::scan_entry()));
        for i in 0..u64::from(count) {
            if fault.is_some() {
                break;
            }
            let g = gpa + i * guest::SCAN_STRIDE;
            fault = run(g, Access::Read).err().map(|v| (v, g));
        }
        snapshot(env, 2);
        restore(env, 1);
        kprintln!("CHECK {} Scan {gpa:#x}x{count} hw={exit:x?} left={} model-fault={fault:x?}", s.name, got.rcx);
        if let Some((v, g)) = fault {
            self.diff(s, format_args!("scan {gpa:#x}x{count}: the model faults at {g:#x}: {v:x?}"));
            return;
        }
        let mut complete = false;
        match exit {
            Exit::Hlt { rip } if rip == guest::scan_hlt() => {
                complete = got.rcx == 0;
                if !complete {
                    let i = u64::from(count) - got.rcx;
                    self.diff(
                        s,
                        format_args!(
                            "scan {gpa:#x}: read {i} ({:#x}) got {:#x}, expected {:#x}",
                            got.rbx,
                            got.rax as u32,
                            got.rdx as u32
                        ),
                    );
                }
            }
            e => self.diff(s, format_args!("scan {gpa:#x}x{count}: exit {e:x?}, expected HLT at {:#x}", guest::scan_hlt())),
        }
        let diffs = table_diffs(env, 1, 2);
        if !complete && !diffs.is_empty() {
            // The model read every page; the guest stopped early.
            self.diff(s, format_args!("scan {gpa:#x}x{count}: {} table word(s) differ after the early stop", diffs.len()));
            return;
        }
        for (addr, hw, model) in diffs {
            self.diff(
                s,
                format_args!("scan {gpa:#x}x{count}: entry @{addr:#x} hw={hw:#x} model={model:#x} xor={:#x}", hw ^ model),
            );
        }
    }

    /// Check the leaf's accessed and dirty state (as nested-pt reads it)
    /// against what the scenario expects after its accesses.
    ///
    /// EPT with A/D disabled (EPTP bit 6 clear, or a CPU without EPT A/D)
    /// sets no bits at all, so there the expectation is always clear/clear.
    pub fn expect_ad(&mut self, s: &mut Scenario, env: &Env, gpa: u64, accessed: bool, dirty: bool) {
        let (accessed, dirty) =
            if env.table.format().kind() == FormatKind::Ept && !env.ad { (false, false) } else { (accessed, dirty) };
        match env.table.lookup(Gpa(gpa)) {
            None => self.diff(s, format_args!("{gpa:#x}: no leaf to read A/D from")),
            Some(l) => {
                if l.accessed() != accessed || l.dirty() != dirty {
                    self.diff(
                        s,
                        format_args!(
                            "{gpa:#x}: A/D = {}/{} expected {}/{} (entry {:#x})",
                            l.accessed() as u8,
                            l.dirty() as u8,
                            accessed as u8,
                            dirty as u8,
                            l.value()
                        ),
                    );
                }
            }
        }
    }
}

/// The exit the hardware should produce for a model result.
pub fn exit_for(arch: Arch, r: Result<Translation, (Violation, u64)>) -> Exit {
    match (r, arch) {
        (Ok(_), _) => Exit::Hlt { rip: 0 },
        (Err((v, g)), Arch::Svm) => Exit::Npf { info1: v.npt_error_code(), gpa: g },
        (Err((v, g)), Arch::Vmx) if v.kind == ViolationKind::Misconfig => Exit::EptMisconfig { gpa: g },
        // Bits 7 and 8: the guest-linear-address field is valid and the
        // access was to the translation of a linear address (the guest has
        // paging off, so it never walks its own tables).
        (Err((v, g)), Arch::Vmx) => Exit::EptViolation { qual: v.ept_qualification() | 0x180, gpa: g, gla: g },
    }
}

/// Format helper used by the quirk evidence strings.
pub fn hex_list(v: &[(u64, u64, u64)]) -> String {
    let mut s = String::new();
    for (a, hw, m) in v {
        let _ = write!(s, "[@{a:#x} hw={hw:#x} model={m:#x}]");
    }
    s
}

/// Snapshot/restore access for the quirk checks.
pub mod snap {
    use super::*;

    /// Put the pre-run tables back, apply `f`, replay the model, snapshot
    /// into buffer 3, then put the hardware state back. Returns the
    /// prediction under the hypothesis.
    pub fn replay(env: &Env, op: Op, gpa: u64, f: impl FnOnce(&Env)) -> Result<Translation, (Violation, u64)> {
        restore(env, 0);
        f(env);
        let t = &env.table;
        let run = |g: u64, a: Access| mmu::translate(t.pages(), t.format(), t.root(), Gpa(g), a, env.ad);
        let code = guest::entry(op);
        let r = match run(code, Access::Execute) {
            Err(v) => Err((v, code)),
            Ok(_) => run(gpa, access_of(op)).map_err(|v| (v, gpa)),
        };
        snapshot(env, 3);
        restore(env, 1);
        r
    }

    /// Word differences between the hardware snapshot and buffer 3.
    pub fn diffs_vs_hypothesis(env: &Env) -> Vec<(u64, u64, u64)> {
        table_diffs(env, 1, 3)
    }

    /// The pre-run value of the word at physical address `addr`.
    pub fn pre_word(env: &Env, addr: u64) -> u64 {
        let (base, _) = env.table.pages().used();
        snap_word(0, ((addr - base) / 8) as usize)
    }
}
