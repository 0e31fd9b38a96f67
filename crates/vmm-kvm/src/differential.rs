//! The instruction emulator checked against the CPU itself.
//!
//! For every case from `vmm::emul::cases` (each supported instruction form
//! with random operands, widths, prefixes, flags and registers), a KVM vCPU
//! at CPL 3 executes the same instruction bytes three times:
//!
//! 1. **native**: both data pages are RAM, so the CPU executes it;
//! 2. **emulated**: both data pages are unmapped and claimed by a device
//!    whose model is plain memory, so every data access is a nested fault,
//!    and `vmm::emul` emulates the instruction (fetching its bytes through
//!    page holds) against the device and the RAM stack;
//! 3. **mixed**: the first data page is the device, the second RAM, so
//!    operands that straddle the two pages straddle MMIO and RAM.
//!
//! Each run starts from the same registers, flags and page contents; the
//! general registers, the arithmetic flags (CF PF AF ZF SF OF DF), the data
//! pages and the stack pages afterwards must be identical in all three. RIP
//! is checked implicitly: the host-written epilogue right after the
//! instruction saves the registers and rings the doorbell, which only
//! happens if execution resumed exactly after the instruction.
//!
//! The case page (read-write-execute RAM) holds a prologue that loads the
//! flags and all sixteen registers from a state block with RIP-relative
//! loads, the instruction, an epilogue that stores them back and rings the
//! "done" doorbell, and a jump back to the prologue; the host loads the
//! next case while the vCPU waits in the doorbell exit.

use crate::machine::{Action, Event, Machine, MmioDevices};
use crate::mem::PAGE;
use crate::runtime;
use crate::space::SpaceBackend;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use nested_pt::Prot;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::emul::cases::{Case, Generator, Layout};
use vmm::emul::{FLAGS_ARITH, gpr::RSP};
use vmm::guest::{self, P_EXEC_ENTRY, P_MODE};
use vmm::workload::Mode;

/// Guest address of the case page (below 4 GiB, so address-size-prefixed
/// forms are generated too).
pub const CASE_PAGE: u64 = 0x4000_0000;
/// Offset of the instruction in the case page.
const INSN_OFF: u64 = 0x100;
/// Offset of the state block: registers in, flags in, registers out, flags out.
const STATE_OFF: u64 = 0x800;
const IN_REGS: u64 = STATE_OFF;
const IN_FLAGS: u64 = STATE_OFF + 0x80;
const OUT_REGS: u64 = STATE_OFF + 0x100;
const OUT_FLAGS: u64 = STATE_OFF + 0x180;
/// The two data pages.
pub const DATA: u64 = 0x4001_0000;
/// A guard page below the stack page (pushes below RSP land there), then
/// the stack page.
pub const STACK_GUARD: u64 = 0x4002_0000;
/// The case's stack page.
pub const STACK: u64 = STACK_GUARD + PAGE;

/// The three ways a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Data pages are RAM: the CPU executes the instruction.
    Native,
    /// Data pages are a plain-memory device: the instruction is emulated.
    Emulated,
    /// First data page a device, second RAM.
    Mixed,
}

/// What one run of a case left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The sixteen general registers.
    pub gpr: [u64; 16],
    /// RFLAGS masked to the arithmetic flags and DF.
    pub flags: u64,
    /// The two data pages.
    pub data: Vec<u8>,
    /// The guard page and the stack page.
    pub stack: Vec<u8>,
}

/// A case whose runs disagree.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Index of the case.
    pub index: usize,
    /// The phase that disagreed with the native run.
    pub phase: Phase,
    /// The instruction's iced code name and bytes.
    pub form: String,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// What differed (registers by name, flags, pages).
    pub what: String,
}

/// The result of a differential run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Distinct instruction forms covered.
    pub forms: usize,
    /// Cases run (each in all three phases).
    pub cases: usize,
    /// Nested faults on the device (MMIO exits) in the emulated phases.
    pub mmio_exits: u64,
    /// Instructions emulated.
    pub emulated: u64,
    /// Time spent in fetch + decode + emulate (including the device model).
    pub emul_time: Duration,
    /// Wall time of each phase.
    pub phase_time: [Duration; 3],
    /// Every disagreement.
    pub divergences: Vec<Divergence>,
}

/// The plain-memory device behind the data pages in the emulated phases.
struct PlainMemory {
    /// First claimed address and bytes claimed.
    range: Mutex<(u64, u64)>,
    bytes: Mutex<Vec<u8>>,
}

impl MmioDevices for PlainMemory {
    fn claims(&self, gpa: u64) -> bool {
        let (base, len) = *self.range.lock().expect("device range");
        gpa.wrapping_sub(base) < len
    }
    fn read(&self, _vcpu: usize, gpa: u64, data: &mut [u8]) {
        let at = (gpa - DATA) as usize;
        data.copy_from_slice(&self.bytes.lock().expect("device bytes")[at..at + data.len()]);
    }
    fn write(&self, _vcpu: usize, gpa: u64, data: &[u8]) {
        let at = (gpa - DATA) as usize;
        self.bytes.lock().expect("device bytes")[at..at + data.len()].copy_from_slice(data);
    }
}

/// Encodes `mov r64, [rip + target]` or `mov [rip + target], r64` placed at
/// `at` (page offset), appending to `code`.
fn mov_rip(code: &mut Vec<u8>, at: u64, reg: usize, target: u64, store: bool) {
    let rex = 0x48 | if reg >= 8 { 0x04 } else { 0 };
    let modrm = ((reg as u8 & 7) << 3) | 0b101;
    let next = at + 7;
    let disp = (target as i64 - next as i64) as i32;
    code.extend_from_slice(&[rex, if store { 0x89 } else { 0x8b }, modrm]);
    code.extend_from_slice(&disp.to_le_bytes());
}

/// Offset of the fixed tail (doorbell and jump back): the same for every
/// case, so that the vCPU, stopped in one case's doorbell, resumes in code
/// that the next case did not move.
const TAIL_OFF: u64 = 0x700;
/// Top of a scratch stack inside the case page, for the prologue's flag
/// load (the case's own stack must not be touched before it starts).
const SCRATCH_TOP: u64 = 0xff0;

/// The fixed code of the case page: the prologue at offset 0 (a scratch
/// stack, flags, registers, jump to the instruction) and the tail at
/// [`TAIL_OFF`] (ring the "done" doorbell, jump back to the prologue).
fn fixed_code(doorbell: u64) -> Vec<u8> {
    let mut c = Vec::new();
    // lea rsp, [rip + SCRATCH_TOP]
    c.extend_from_slice(&[0x48, 0x8d, 0x25]);
    c.extend_from_slice(&((SCRATCH_TOP as i64 - 7) as i32).to_le_bytes());
    // push qword [rip + IN_FLAGS]; popfq
    let at = c.len() as i64;
    c.extend_from_slice(&[0xff, 0x35]);
    c.extend_from_slice(&((IN_FLAGS as i64 - (at + 6)) as i32).to_le_bytes());
    c.push(0x9d);
    for r in (0..16).filter(|&r| r != RSP).chain([RSP]) {
        let at = c.len() as u64;
        mov_rip(&mut c, at, r, IN_REGS + 8 * r as u64, false);
    }
    let at = c.len() as u64;
    c.push(0xe9);
    c.extend_from_slice(&((INSN_OFF as i64 - (at as i64 + 5)) as i32).to_le_bytes());
    assert!(c.len() as u64 <= INSN_OFF);
    c.resize(TAIL_OFF as usize, 0xcc);
    // movabs rax, doorbell; test byte [rax], 0; 5 x nop (8 bytes: the
    // doorbell instruction length the host skips); jmp rel32 to 0.
    assert_eq!(guest::DOORBELL_INSN_LEN, 8);
    c.extend_from_slice(&[0x48, 0xb8]);
    c.extend_from_slice(&doorbell.to_le_bytes());
    c.extend_from_slice(&[0xf6, 0x00, 0x00, 0x90, 0x90, 0x90, 0x90, 0x90]);
    let at = c.len() as i64;
    c.push(0xe9);
    c.extend_from_slice(&((-(at + 5)) as i32).to_le_bytes());
    c
}

/// The instruction and the epilogue at `INSN_OFF`: store the registers
/// and flags, jump to the tail.
fn body(insn: &[u8]) -> Vec<u8> {
    let mut c = insn.to_vec();
    let base = INSN_OFF;
    for r in 0..16 {
        let at = base + c.len() as u64;
        mov_rip(&mut c, at, r, OUT_REGS + 8 * r as u64, true);
    }
    // pushfq; pop qword [rip + OUT_FLAGS]
    c.push(0x9c);
    let at = base + c.len() as u64;
    c.extend_from_slice(&[0x8f, 0x05]);
    c.extend_from_slice(&((OUT_FLAGS as i64 - (at as i64 + 6)) as i32).to_le_bytes());
    let at = base + c.len() as u64;
    c.push(0xe9);
    c.extend_from_slice(&((TAIL_OFF as i64 - (at as i64 + 5)) as i32).to_le_bytes());
    assert!(INSN_OFF + c.len() as u64 <= TAIL_OFF);
    c
}

struct Rig {
    be: Arc<SpaceBackend>,
    case_obj: Arc<vmspace::VmObject>,
    data_obj: [Arc<vmspace::VmObject>; 2],
    stack_obj: Arc<vmspace::VmObject>,
    dev: Arc<PlainMemory>,
}

impl Rig {
    fn write(&self, obj: &vmspace::VmObject, off: u64, bytes: &[u8]) -> Result<()> {
        self.be.write_object(obj, off, bytes)
    }

    fn read(&self, obj: &vmspace::VmObject, off: u64, out: &mut [u8]) -> Result<()> {
        // The vCPU is stopped in the doorbell exit.
        self.be.read_object(obj, off, out)
    }

    /// Loads case `c` (the same initial state for every phase).
    fn load(&self, c: &Case) -> Result<()> {
        let mut regs = [0u8; 0x80];
        for (r, v) in c.regs.gpr.iter().enumerate() {
            regs[8 * r..8 * r + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.write(&self.case_obj, IN_REGS, &regs)?;
        self.write(&self.case_obj, IN_FLAGS, &c.regs.rflags.to_le_bytes())?;
        self.write(&self.case_obj, INSN_OFF, &body(&c.bytes))?;
        // Data: RAM pages get the contents in every phase (a RAM page
        // unused by the phase is simply not mapped); the device too.
        self.write(&self.data_obj[0], 0, &c.data[..PAGE as usize])?;
        self.write(&self.data_obj[1], 0, &c.data[PAGE as usize..])?;
        self.dev.bytes.lock().expect("device bytes").copy_from_slice(&c.data);
        let mut stack = vec![0u8; 2 * PAGE as usize];
        stack[PAGE as usize..].copy_from_slice(&c.stack);
        self.write(&self.stack_obj, 0, &stack)?;
        Ok(())
    }

    /// What the case left behind in `phase`.
    fn outcome(&self, phase: Phase) -> Result<Outcome> {
        let mut out = [0u8; 0x88];
        self.read(&self.case_obj, OUT_REGS, &mut out[..0x80])?;
        self.read(&self.case_obj, OUT_FLAGS, &mut out[0x80..])?;
        let mut gpr = [0u64; 16];
        for (r, g) in gpr.iter_mut().enumerate() {
            *g = u64::from_le_bytes(out[8 * r..8 * r + 8].try_into().expect("8 bytes"));
        }
        let flags = u64::from_le_bytes(out[0x80..].try_into().expect("8 bytes")) & FLAGS_ARITH;
        let mut data = vec![0u8; 2 * PAGE as usize];
        let dev = self.dev.bytes.lock().expect("device bytes").clone();
        let (p0, p1) = data.split_at_mut(PAGE as usize);
        match phase {
            Phase::Native => {
                self.read(&self.data_obj[0], 0, p0)?;
                self.read(&self.data_obj[1], 0, p1)?;
            }
            Phase::Emulated => data.copy_from_slice(&dev),
            Phase::Mixed => {
                p0.copy_from_slice(&dev[..PAGE as usize]);
                self.read(&self.data_obj[1], 0, p1)?;
            }
        }
        let mut stack = vec![0u8; 2 * PAGE as usize];
        self.read(&self.stack_obj, 0, &mut stack)?;
        Ok(Outcome { gpr, flags, data, stack })
    }
}

const GPR_NAMES: [&str; 16] =
    ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

fn diff(a: &Outcome, b: &Outcome) -> Option<String> {
    let mut what = Vec::new();
    for (r, name) in GPR_NAMES.iter().enumerate() {
        if a.gpr[r] != b.gpr[r] {
            what.push(format!("{name} {:#x} vs {:#x}", a.gpr[r], b.gpr[r]));
        }
    }
    if a.flags != b.flags {
        what.push(format!("flags {:#x} vs {:#x}", a.flags, b.flags));
    }
    for (name, x, y) in [("data", &a.data, &b.data), ("stack", &a.stack, &b.stack)] {
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            let lo = i.saturating_sub(8);
            let hi = (i + 8).min(x.len());
            what.push(format!(
                "{name} byte {i:#x}: {:#x} vs {:#x} ({:02x?} vs {:02x?})",
                x[i],
                y[i],
                &x[lo..hi],
                &y[lo..hi]
            ));
        }
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// Runs `cases` generated cases from `seed` in all three phases and
/// compares them.
pub fn run_differential(cases: usize, seed: u64, mode: PagingMode) -> Result<Report> {
    let layout = Layout { code: CASE_PAGE + INSN_OFF, data: DATA, stack: STACK, fs_base: 0, gs_base: 0 };
    let mut generator = Generator::new(seed, layout);
    let list: Vec<Case> = (0..cases).map(|i| generator.case(i)).collect();
    let vm = Arc::new(KvmVm::new()?);
    let be = Arc::new(SpaceBackend::with_fault_around(vm.clone(), 16 << 20, 4 << 20, mode, 1)?);
    be.map_runtime(1, 1)?;
    let doorbell = runtime::doorbell(0) + u64::from(guest::PORT_DONE);
    let case_obj = be.map_bytes(CASE_PAGE, &fixed_code(doorbell), PAGE, Prot::RWX)?;
    let d0 = be.ram_segment(PAGE)?;
    let d1 = be.ram_segment(PAGE)?;
    let stack_obj = be.map_bytes(STACK_GUARD, &[], 2 * PAGE, Prot::READ | Prot::WRITE)?;
    be.map(&d0, DATA, PAGE, Prot::READ | Prot::WRITE)?;
    be.map(&d1, DATA + PAGE, PAGE, Prot::READ | Prot::WRITE)?;
    let dev = Arc::new(PlainMemory { range: Mutex::new((DATA, 0)), bytes: Mutex::new(vec![0; 2 * PAGE as usize]) });
    let rig = Rig {
        be: be.clone(),
        case_obj: case_obj.object,
        data_obj: [d0.object.clone(), d1.object.clone()],
        stack_obj: stack_obj.object,
        dev: dev.clone(),
    };
    let mut m: Machine = crate::machine::create(&vm, be.clone(), mode, 1)?;
    m.set_param(0, P_MODE, Mode::Exec as u64)?;
    m.set_param(0, P_EXEC_ENTRY, CASE_PAGE)?;
    m.mmio = Some(dev.clone());
    let mut report = Report { cases, forms: vmm::emul::cases::FORMS.len().min(cases), ..Report::default() };
    let mut native: Vec<Outcome> = Vec::with_capacity(cases);
    for (k, phase) in [Phase::Native, Phase::Emulated, Phase::Mixed].into_iter().enumerate() {
        match phase {
            Phase::Native => {}
            Phase::Emulated => {
                be.unmap(DATA, PAGE)?;
                be.unmap(DATA + PAGE, PAGE)?;
                *dev.range.lock().expect("device range") = (DATA, 2 * PAGE);
            }
            Phase::Mixed => {
                be.map(&d1, DATA + PAGE, PAGE, Prot::READ | Prot::WRITE)?;
                *dev.range.lock().expect("device range") = (DATA, PAGE);
            }
        }
        if cases == 0 {
            break;
        }
        rig.load(&list[0])?;
        let next = Mutex::new(0usize);
        let results: Mutex<Vec<std::result::Result<Outcome, String>>> = Mutex::new(Vec::new());
        let t = Instant::now();
        let handler = |_i: usize, ev: Event| -> Action {
            match ev {
                Event::Port(guest::PORT_DONE, _) => {
                    let mut n = next.lock().expect("case index");
                    let r = rig.outcome(phase).map_err(|e| e.to_string());
                    results.lock().expect("results").push(r);
                    *n += 1;
                    if *n == list.len() {
                        return Action::Stop;
                    }
                    match rig.load(&list[*n]) {
                        Ok(()) => Action::Continue,
                        Err(e) => Action::Fatal(format!("loading case {}: {e}", *n)),
                    }
                }
                Event::EmulationFailed(f, e) => {
                    let n = *next.lock().expect("case index");
                    Action::Fatal(format!("case {n} ({:?}): emulation at {:#x} failed: {e}", list[n].form.code, f.gpa))
                }
                Event::Unserved(f, e) => {
                    let n = *next.lock().expect("case index");
                    Action::Fatal(format!(
                        "case {n} ({:?}): unserved fault at {:#x} (rip {:#x}): {e:?}",
                        list[n].form.code, f.gpa, f.rip
                    ))
                }
                Event::Port(p, r) => Action::Fatal(format!("unexpected report {p:#x} {r:x?}")),
            }
        };
        m.run(handler, |_| Ok::<(), KvmError>(()))?;
        report.phase_time[k] = t.elapsed();
        let results = results.into_inner().expect("results");
        for (index, r) in results.into_iter().enumerate() {
            let out = r.map_err(KvmError::Setup)?;
            if phase == Phase::Native {
                native.push(out);
            } else if let Some(what) = diff(&native[index], &out) {
                report.divergences.push(Divergence {
                    index,
                    phase,
                    form: format!("{:?}", list[index].form.code),
                    bytes: list[index].bytes.clone(),
                    what,
                });
            }
        }
    }
    report.mmio_exits = m.total(|s| &s.mmio_exits);
    report.emulated = m.total(|s| &s.emulated);
    report.emul_time = Duration::from_nanos(m.stats[0].emul_ns.load(Ordering::Relaxed));
    Ok(report)
}
