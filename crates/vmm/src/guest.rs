//! The guest code: exception stubs (CPL 0) and the workloads (CPL 3).
//!
//! Everything here is position-independent x86-64 machine code assembled by
//! the standard Rust toolchain (`global_asm!`) into a read-only data section
//! of the host binary. At start-up the bytes between two symbols are copied
//! into the guest's boot ROM; they contain no relocations (every reference is
//! RIP-relative within the blob or goes through the parameter block), so they
//! run wherever the ROM is mapped.
//!
//! ## Protocol with the host (I/O port exits)
//!
//! | port | who | meaning (ports `0x20..` are doorbells) |
//! | --- | --- | --- |
//! | `0x10` | #PF stub | nested page fault: CR2 (from synced sregs) and the error code at `[rsp]` |
//! | `0x20` | workload | finished; verify results are in the parameter block |
//! | `0x22` | workload | paused at a harvest point (host cleared `ctrl` before resuming) |
//! | `0x24` | random read | data error: `rsi` = address, `rdi` = value read |
//! | `0x25` | watch | stale read (value below the epoch): `rax` = value, `rdx` = epoch |
//! | `0x26` | ping | no-op report (round-trip benchmark) |
//! | `0x30` | probe | one probe access done (host compares A/D bits) |
//! | `0x40` | script | device action ([`ScriptOp::Device`]: `rsi`, `rdi`) |
//! | `0x80 + v` | stub | unexpected exception `v` (fatal) |
//!
//! The CPL 3 workload cannot use `out` (IOPL 0), and the shadow-paging host
//! turns `int n` at CPL 3 into #UD, so the workload reports by *ringing a
//! doorbell*: `test byte ptr [r15 + 0x8000 + p], 0` reads byte `p` of a page
//! that is never mapped (r15 = the parameter block). The read takes the
//! ordinary nested-fault path; the host recognises the doorbell address,
//! treats it as report `p` (the ports below), and resumes after the 8-byte
//! instruction. The general registers are the workload's.
//!
//! The #PF stub is three instructions: `out 0x10, al` (exit to the host,
//! which serves the fault), `add rsp, 8` (drop the error code), `iretq`
//! (retry the faulting instruction). The host may rewrite the saved RIP in
//! the interrupt frame to skip an access it will not serve (probe and watch
//! workloads). Vector `0x40` reloads CR3 and returns: the host injects it to
//! flush the vCPU's own translations on hosts with hardware nested paging.
//! Every other vector from `0x20` up is an external interrupt: its stub
//! (CPL 0, IF clear) counts it and logs it in the parameter block
//! ([`P_INTR_SEEN`], [`P_LOG`]) and returns without an EOI; the script
//! mode ([`MODE_SCRIPT`], [`ScriptOp`]) does EOIs and everything else a
//! guest does with interrupt controllers, from CPL 3, through their MMIO
//! pages.
#![allow(unsafe_code)]

use std::arch::global_asm;

// Parameter block offsets (one 4 KiB page per vCPU). Shared with the asm
// below, which uses the numeric values directly.
/// Workload mode (see [`Mode`](crate::workload::Mode)).
pub const P_MODE: u64 = 0x00;
/// Guest address of the vCPU's data region.
pub const P_BASE: u64 = 0x08;
/// Number of 4 KiB pages in the region.
pub const P_NPAGES: u64 = 0x10;
/// Initial generator state (non-zero).
pub const P_SEED: u64 = 0x18;
/// Write threshold out of 256 for the random mix.
pub const P_WRITE_THRESH: u64 = 0x20;
/// Value XORed into each page's header word (page address ^ magic).
pub const P_MAGIC: u64 = 0x28;
/// Guest address of the ledger bitmap (one bit per region page).
pub const P_LEDGER: u64 = 0x30;
/// Control word: 0 run, 1 pause at the next harvest point, 2 stop.
pub const P_CTRL: u64 = 0x38;
/// Operations completed (written by the guest after every operation).
pub const P_OPS: u64 = 0x40;
/// Generator state at the last pause/stop (written by the guest).
pub const P_RNG: u64 = 0x48;
/// Verify pass: checksum over every page (written by the guest).
pub const P_CHECKSUM: u64 = 0x50;
/// Verify pass: pages whose header word is wrong (written by the guest).
pub const P_BAD_PAGES: u64 = 0x58;
/// Watch: epoch published by the host; a read value below the epoch read
/// just before it is stale (a violation).
pub const P_EPOCH: u64 = 0x60;
/// Watch: address read in a loop.
pub const P_WATCH_ADDR: u64 = 0x68;
/// Watch: reads completed.
pub const P_WATCH_READS: u64 = 0x78;
/// Probe: number of probe entries.
pub const P_PROBE_COUNT: u64 = 0x80;
/// Watch: reads that faulted and were skipped by the host.
pub const P_WATCH_FAULTS: u64 = 0x90;
/// Verify pass: pages it covered (written by the guest).
pub const P_VERIFIED: u64 = 0x98;
/// Exec: the guest address the workload jumps to (host-written code; the
/// emulator's differential test).
pub const P_EXEC_ENTRY: u64 = 0xa0;
/// Framebuffer: out, the display geometry the guest read from the register
/// BAR (width | height << 32).
pub const P_FB_GEOMETRY: u64 = 0x70;
/// Framebuffer: pixels to draw (mover: pixels `0..n`; writer: `n/2..n`).
pub const P_FB_PIXELS: u64 = 0x88;
/// Framebuffer: guest address of the function's ECAM configuration space.
pub const P_FB_CONFIG: u64 = 0xa8;
/// Framebuffer role before the workload: 0 none, 1 mover (programs and
/// moves the BAR), 2 writer (draws through the moving BAR).
pub const P_FB_ROLE: u64 = 0xb0;
/// Framebuffer: where the register BAR goes.
pub const P_FB_REGS: u64 = 0xb8;
/// Framebuffer: the two addresses the framebuffer BAR moves between.
pub const P_FB_BASE_A: u64 = 0xc0;
/// Framebuffer: second address.
pub const P_FB_BASE_B: u64 = 0xc8;
/// Framebuffer: at least this many BAR moves (the mover keeps moving until
/// the writer is done).
pub const P_FB_MOVES: u64 = 0xd0;
/// Framebuffer: guest address of the shared words (current base, writer
/// done, mover done), in the mover's parameter block at
/// [`P_FB_SHARED_WORDS`].
pub const P_FB_SHARED: u64 = 0xd8;
/// Offset of the shared words (current base, writer done, mover done) in
/// the mover's parameter block (in the probe area, unused by this mode).
pub const P_FB_SHARED_WORDS: u64 = 0xf00;
/// Framebuffer: out, the BAR size the guest found by sizing.
pub const P_FB_BAR_SIZE: u64 = 0xf0;
/// Framebuffer: out, moves made (mover) or writes retried (writer).
pub const P_FB_COUNT: u64 = 0xf8;

/// Script mode (`P_MODE` = [`MODE_SCRIPT`]): the workload runs the ops
/// at [`P_SCRIPT`] (see [`ScriptOp`]) and logs what it saw at [`P_LOG`].
/// Not a [`Mode`](crate::workload::Mode) of the data workloads: the
/// interrupt tests set it directly.
pub const MODE_SCRIPT: u64 = 7;
/// Script: the ops, 24 bytes each ({op, a, b}), up to [`MAX_SCRIPT_OPS`]
/// (in the probe area, unused by this mode).
pub const P_SCRIPT: u64 = 0x100;
/// Most ops in a script (the last must be [`ScriptOp::End`]).
pub const MAX_SCRIPT_OPS: usize = ((P_INTR_SEEN - P_SCRIPT) / 24) as usize;
/// Script: external interrupts the vCPU took (incremented by the
/// interrupt stub).
pub const P_INTR_SEEN: u64 = 0x700;
/// Script: entries in the log (claimed by `xadd`, by the interrupt stub
/// and the workload alike; may exceed [`LOG_CAPACITY`]: the excess is
/// dropped).
pub const P_LOG_COUNT: u64 = 0x708;
/// Script: the log, [`LOG_CAPACITY`] u64 entries (see [`LogEntry`]).
pub const P_LOG: u64 = 0x800;
/// Entries the log holds.
pub const LOG_CAPACITY: usize = ((4096 - P_LOG) / 8) as usize;
/// First vector with an external-interrupt stub (32; every vector from
/// here to 255 but [`FLUSH_VECTOR`] logs itself and returns).
pub const FIRST_INTR_VECTOR: u8 = 0x20;
/// Doorbell of [`ScriptOp::Device`]: the host's device acts on `rsi`,
/// `rdi` (an MSI in the interrupt tests).
pub const PORT_DEVICE: u16 = 0x40;

/// One op of a script-mode workload (CPL 3). Addresses are guest-linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptOp {
    /// Ring the "done" doorbell (forever).
    End,
    /// A 32-bit store of the value at the address.
    Write32(u64, u32),
    /// A 32-bit load from the address, logged as [`LogEntry::Read`].
    Read32(u64),
    /// Wait until the vCPU has taken `count` interrupts in all; after
    /// `spins` pause-loops without them, log [`LogEntry::Timeout`] and go
    /// on.
    Wait {
        /// Interrupts taken since the start.
        count: u64,
        /// Give up after this many spins.
        spins: u64,
    },
    /// Log [`LogEntry::Mark`] with the value (below 0x1000).
    Mark(u64),
    /// Spin this many pause-loops.
    Spin(u64),
    /// Add one to the u64 at `addr`, wait until it reaches `count`.
    Barrier {
        /// The shared counter.
        addr: u64,
        /// Participants.
        count: u64,
    },
    /// Ring doorbell [`PORT_DEVICE`] with `rsi` = the first value, `rdi` =
    /// the second.
    Device(u64, u64),
    /// Log [`LogEntry::Seen`]: the interrupts taken so far.
    LogSeen,
    /// Wait for one interrupt more than the previous `WaitNext` took (the
    /// first waits for the first), at most `spins` pause-loops, then log
    /// [`LogEntry::Timeout`] and go on.
    WaitNext {
        /// Give up after this many spins.
        spins: u64,
    },
    /// Go back to op `to` (an index in the script) until this op has run
    /// `times` times, then go on: the ops from `to` run `times` times in
    /// all. Loops do not nest.
    Loop {
        /// First op of the body.
        to: u64,
        /// Runs of the body.
        times: u64,
    },
}

impl ScriptOp {
    /// The op's three words.
    pub fn encode(&self) -> [u64; 3] {
        match *self {
            ScriptOp::End => [0, 0, 0],
            ScriptOp::Write32(a, v) => [1, a, u64::from(v)],
            ScriptOp::Read32(a) => [2, a, 0],
            ScriptOp::Wait { count, spins } => [3, count, spins.max(1)],
            ScriptOp::Mark(m) => [4, 0, m & 0xfff],
            ScriptOp::Spin(n) => [5, 0, n],
            ScriptOp::Barrier { addr, count } => [6, addr, count],
            ScriptOp::Device(a, b) => [7, a, b],
            ScriptOp::LogSeen => [8, 0, 0],
            ScriptOp::WaitNext { spins } => [9, 0, spins.max(1)],
            ScriptOp::Loop { to, times } => [10, to.min(MAX_SCRIPT_OPS as u64 - 1), times.max(1)],
        }
    }
}

/// Encodes a script (at most [`MAX_SCRIPT_OPS`] ops; an [`ScriptOp::End`]
/// is appended) as the bytes to write at [`P_SCRIPT`]. `None` if too long.
pub fn encode_script(ops: &[ScriptOp]) -> Option<Vec<u8>> {
    if ops.len() >= MAX_SCRIPT_OPS {
        return None;
    }
    let mut out = Vec::with_capacity((ops.len() + 1) * 24);
    for op in ops.iter().chain([&ScriptOp::End]) {
        for w in op.encode() {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    Some(out)
}

/// One entry of a script's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogEntry {
    /// An external interrupt with this vector was taken.
    Vector(u8),
    /// A [`ScriptOp::Read32`] read this.
    Read(u32),
    /// A [`ScriptOp::Mark`].
    Mark(u64),
    /// A [`ScriptOp::Wait`] gave up.
    Timeout,
    /// A [`ScriptOp::LogSeen`]: interrupts taken so far.
    Seen(u64),
    /// A word no op writes (a corrupted log).
    Unknown(u64),
}

impl LogEntry {
    /// Decodes a log word.
    pub fn decode(w: u64) -> LogEntry {
        match w {
            0..=0xff => LogEntry::Vector(w as u8),
            0xdead => LogEntry::Timeout,
            0x1000..=0x1fff => LogEntry::Mark(w & 0xfff),
            0x2000..=0x2fff => LogEntry::Seen(w & 0xfff),
            _ if w >> 32 == 1 => LogEntry::Read(w as u32),
            _ => LogEntry::Unknown(w),
        }
    }
}

/// The pixel the framebuffer program draws at index `i`.
pub fn fb_pixel(i: u64) -> u32 {
    ((i as u32).wrapping_mul(0x193).wrapping_add(0xa5_a5a5)) & 0xff_ffff
}
/// Probe entries start here: {addr, kind, value, result}, 32 bytes each.
pub const P_PROBES: u64 = 0x100;
/// Maximum number of probe entries in one parameter block.
pub const MAX_PROBES: usize = ((4096 - P_PROBES) / 32) as usize;

/// One access of the probe workload ([`crate::workload::Mode::Probe`]):
/// the guest makes the probes in order, one per step, reporting each on
/// [`PORT_PROBE_STEP`]. The typed form of a probe entry, so that a test
/// with its own guest layout never writes raw parameter-block words
/// (load them with [`crate::machine::Machine::load_probes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOp {
    /// Guest address (guest-linear = vmspace guest-physical).
    pub gpa: u64,
    /// Read (the value read is kept, see [`probe_value_offset`]), write or
    /// instruction fetch (the code at `gpa` must return with `jmp r11`).
    pub access: nested_pt::Access,
}

impl ProbeOp {
    /// The parameter-block words of probe slot `k`: (offset, value) for the
    /// address, the kind code (0 read, 1 write, 2 execute), the tag the
    /// guest writes, and the result slot (cleared). `None` when `k` is not
    /// below [`MAX_PROBES`].
    pub fn encode(&self, k: usize) -> Option<[(u64, u64); 4]> {
        if k >= MAX_PROBES {
            return None;
        }
        let e = P_PROBES + 32 * k as u64;
        let kind = match self.access {
            nested_pt::Access::Read => 0,
            nested_pt::Access::Write => 1,
            nested_pt::Access::Execute => 2,
        };
        Some([(e, self.gpa), (e + 8, kind), (e + 16, 0xabcd_0000 + k as u64), (e + 24, u64::MAX)])
    }
}

/// Parameter-block offset of the value read probe `k` returned.
pub fn probe_value_offset(k: usize) -> Option<u64> {
    (k < MAX_PROBES).then(|| P_PROBES + 32 * k as u64 + 24)
}

/// Port of the nested page fault exit.
pub const PORT_FAULT: u16 = 0x10;
/// Port of the "workload finished" exit.
pub const PORT_DONE: u16 = 0x20;
/// Port of the "paused at a harvest point" exit.
pub const PORT_PAUSE: u16 = 0x22;
/// Port of the data-error exit.
pub const PORT_DATA_ERROR: u16 = 0x24;
/// Port of the watch-violation exit.
pub const PORT_WATCH_VIOLATION: u16 = 0x25;
/// Port of the ping doorbell (exit round-trip benchmark).
pub const PORT_PING: u16 = 0x26;
/// Port of the probe-step exit.
pub const PORT_PROBE_STEP: u16 = 0x30;
/// First port of the unexpected-exception exits (`0x80 + vector`).
pub const PORT_EXCEPTION_BASE: u16 = 0x80;
/// Vector injected to make the vCPU reload CR3.
pub const FLUSH_VECTOR: u8 = 0x40;
/// Offset of the doorbell page from the parameter block: never mapped; a
/// CPL 3 read of doorbell byte `p` is report `p` (see the module docs).
pub const DOORBELL_OFFSET: u64 = 0x8000;
/// Length of the doorbell instruction `test byte ptr [r15 + disp32], 0`.
pub const DOORBELL_INSN_LEN: u64 = 8;
/// Multiplier of the sequential-touch value (`(op + 1) * K`).
pub const TOUCH_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
/// Multiplier of the verify checksum (`c = (c ^ w) * K` per word).
pub const CHECK_MUL: u64 = 0x0000_0100_0000_01B3;
/// Words per page the workloads use: the header and 64 data slots.
pub const USED_WORDS: u64 = 65;

global_asm!(
    r#"
    .pushsection .rodata.vmm_guest_blob,"a"
    .balign 4096
    .globl vmm_guest_blob_start
vmm_guest_blob_start:

    /* ---- CPL 0: exception stubs ---- */
    .balign 16
    .globl vmm_guest_pf_stub
vmm_guest_pf_stub:
    out 0x10, al
    add rsp, 8
    iretq

    .balign 16
    .globl vmm_guest_flush_stub
vmm_guest_flush_stub:
    push rax
    mov rax, cr3
    mov cr3, rax
    pop rax
    iretq

    .balign 16
    .globl vmm_guest_exc_stubs
vmm_guest_exc_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 8
    out (0x80 + \v), al
2:  hlt
    jmp 2b
    .endr

    /* external interrupts 0x20-0xff (but 0x40): log the vector in the
       parameter block (the kernel stack lies inside the vCPU's 64 KiB
       data area, so rsp & -0x10000 is the block) and return; the EOI is
       the workload's business */
    .balign 8
    .globl vmm_guest_intr_stubs
vmm_guest_intr_stubs:
    .irp v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80,81,82,83,84,85,86,87,88,89,90,91,92,93,94,95,96,97,98,99,100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116,117,118,119,120,121,122,123,124,125,126,127,128,129,130,131,132,133,134,135,136,137,138,139,140,141,142,143,144,145,146,147,148,149,150,151,152,153,154,155,156,157,158,159,160,161,162,163,164,165,166,167,168,169,170,171,172,173,174,175,176,177,178,179,180,181,182,183,184,185,186,187,188,189,190,191,192,193,194,195,196,197,198,199,200,201,202,203,204,205,206,207,208,209,210,211,212,213,214,215,216,217,218,219,220,221,222,223,224,225,226,227,228,229,230,231,232,233,234,235,236,237,238,239,240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255
    .balign 8
    push rax
    mov al, \v
    jmp vmm_guest_intr_common
    .endr
    .balign 8
vmm_guest_intr_common:
    push rcx
    push rdx
    movzx edx, al
    mov rcx, rsp
    and rcx, -0x10000
    inc qword ptr [rcx + 0x700]
    mov eax, 1
    xadd [rcx + 0x708], rax
    cmp rax, 256
    jae 1f
    mov [rcx + rax * 8 + 0x800], rdx
1:  pop rdx
    pop rcx
    pop rax
    iretq

    /* ---- CPL 3: workloads; rdi = parameter block ---- */
    .balign 16
    .globl vmm_guest_entry
vmm_guest_entry:
    mov r15, rdi
    mov rax, [r15 + 0xb0]
    cmp rax, 1
    je vmm_guest_fb_mover
    cmp rax, 2
    je vmm_guest_fb_writer
vmm_guest_workload:
    mov rbx, [r15 + 0x00]
    cmp rbx, 3
    je vmm_guest_probe
    cmp rbx, 4
    je vmm_guest_watch
    cmp rbx, 5
    je vmm_guest_ping
    cmp rbx, 7
    je vmm_guest_script
    cmp rbx, 6
    jne 1f
    jmp qword ptr [r15 + 0xa0]
1:
    mov r14, [r15 + 0x08]
    mov r13, [r15 + 0x10]
    mov r12, [r15 + 0x18]
    mov r11, [r15 + 0x28]
    mov r10, [r15 + 0x30]
    mov r9,  [r15 + 0x40]
    mov r8,  [r15 + 0x20]

3:  /* loop: check the control word at every operation boundary */
    mov rax, [r15 + 0x38]
    test rax, rax
    jnz 30f
    cmp rbx, 0
    je 20f
    cmp rbx, 2
    jne 10f
    cmp r9, r13
    jb 20f

10: /* random op: xorshift64, page = mulhi(x, npages) */
    mov rax, r12
    shl rax, 13
    xor r12, rax
    mov rax, r12
    shr rax, 7
    xor r12, rax
    mov rax, r12
    shl rax, 17
    xor r12, rax
    mov rax, r12
    mul r13
    mov rcx, rdx
    shl rcx, 12
    add rcx, r14
    mov rax, r12
    shr rax, 6
    and eax, 0xff
    cmp rax, r8
    jb 12f
    /* read: the header must be 0 or (address ^ magic) */
    mov rax, [rcx]
    test rax, rax
    jz 40f
    mov rsi, rcx
    xor rsi, r11
    cmp rax, rsi
    je 40f
    mov rdi, rax
    mov rsi, rcx
    test byte ptr [r15 + 0x8024], 0
    jmp 40f
12: /* write: ledger bit, header, one data slot */
    bts qword ptr [r10], rdx
    mov rax, rcx
    xor rax, r11
    mov [rcx], rax
    mov rax, r12
    and eax, 63
    inc rax
    mov [rcx + rax * 8], r12
    jmp 40f

20: /* sequential touch: op i -> page i % n, slot 1 + (i / n) % 64 */
    mov rax, r9
    xor edx, edx
    div r13
    mov rcx, rdx
    shl rcx, 12
    add rcx, r14
    bts qword ptr [r10], rdx
    mov rsi, rcx
    xor rsi, r11
    mov [rcx], rsi
    and eax, 63
    inc rax
    mov rsi, r9
    inc rsi
    movabs rdx, 0x9E3779B97F4A7C15
    imul rsi, rdx
    mov [rcx + rax * 8], rsi

40: /* next */
    inc r9
    mov [r15 + 0x40], r9
    jmp 3b

30: /* control: 1 = pause at this harvest point, 2 = stop and verify */
    mov [r15 + 0x48], r12
    cmp rax, 2
    je 50f
    test byte ptr [r15 + 0x8022], 0
    jmp 3b

50: /* verify pass: checksum every page that may have been written (all of
       them, except in a first sequential pass that did not finish: pages
       at or beyond the operation count were never touched), check headers */
    cmp rbx, 1
    je 49f
    cmp r9, r13
    jae 49f
    mov r13, r9
49: mov [r15 + 0x98], r13
    xor r9, r9
    xor r12, r12
    xor r8, r8
    movabs rdi, 0x00000100000001B3
51: cmp r9, r13
    jae 59f
    mov rcx, r9
    shl rcx, 12
    add rcx, r14
    mov rax, [rcx]
    test rax, rax
    jz 52f
    mov rsi, rcx
    xor rsi, r11
    cmp rax, rsi
    je 52f
    inc r8
52: xor edx, edx
53: mov rax, [rcx + rdx * 8]
    xor r12, rax
    imul r12, rdi
    inc rdx
    cmp rdx, 65
    jb 53b
    inc r9
    jmp 51b
59: mov [r15 + 0x50], r12
    mov [r15 + 0x58], r8
58: test byte ptr [r15 + 0x8020], 0
    jmp 58b

    /* probe: for each entry (addr, kind, value, result): one access */
vmm_guest_probe:
    xor r9, r9
61: cmp r9, [r15 + 0x80]
    jae 69f
    mov rcx, r9
    shl rcx, 5
    lea rcx, [r15 + rcx + 0x100]
    mov rsi, [rcx]
    mov rax, [rcx + 8]
    cmp rax, 1
    je 62f
    cmp rax, 2
    je 63f
    mov rax, [rsi]
    mov [rcx + 24], rax
    jmp vmm_guest_probe_step
62: mov rax, [rcx + 16]
    mov [rsi], rax
    jmp vmm_guest_probe_step
63: lea r11, [rip + vmm_guest_probe_step]
    jmp rsi
    .globl vmm_guest_probe_step
vmm_guest_probe_step:
    test byte ptr [r15 + 0x8030], 0
    inc r9
    jmp 61b
69: test byte ptr [r15 + 0x8020], 0
    jmp 69b

    /* watch: read [addr] forever; a value below the epoch read just before is stale */
vmm_guest_watch:
    mov rsi, [r15 + 0x68]
71: mov rax, [r15 + 0x38]
    test rax, rax
    jnz 75f
    mov rdx, [r15 + 0x60]
    mov rax, [rsi]
    cmp rax, rdx
    jae 72f
    test byte ptr [r15 + 0x8025], 0
72: inc qword ptr [r15 + 0x78]
    jmp 71b
    /* ping: ring doorbell 0x26 in a loop (measures the exit round trip) */
vmm_guest_ping:
81: mov rax, [r15 + 0x38]
    test rax, rax
    jnz 69b
    test byte ptr [r15 + 0x8026], 0
    inc qword ptr [r15 + 0x78]
    jmp 81b

    .globl vmm_guest_watch_fault
vmm_guest_watch_fault:
    inc qword ptr [r15 + 0x90]
    jmp 71b
75: cmp rax, 2
    je 69b
    test byte ptr [r15 + 0x8022], 0
    jmp 71b

    /* framebuffer, vCPU 0: size the 64-bit BAR through ECAM, place the
       register BAR and the framebuffer BAR, enable decoding, read the
       geometry from the (emulated) register page, draw its pixels, then
       move the framebuffer BAR back and forth (at least P_FB_MOVES
       times), say so, and wait for the writer */
vmm_guest_fb_mover:
    mov r8, [r15 + 0xa8]
    mov r9, [r15 + 0xb8]
    mov r10, [r15 + 0xd8]
    mov r11, [r15 + 0x88]
    mov r12, [r15 + 0xc0]
    mov r13, [r15 + 0xc8]
    mov r14, [r15 + 0xd0]
    mov dword ptr [r8 + 0x14], 0xffffffff
    mov dword ptr [r8 + 0x18], 0xffffffff
    mov eax, [r8 + 0x14]
    mov edx, [r8 + 0x18]
    shl rdx, 32
    or rax, rdx
    and rax, -16
    neg rax
    mov [r15 + 0xf0], rax
    mov [r8 + 0x10], r9d
    mov [r8 + 0x14], r12d
    mov rax, r12
    shr rax, 32
    mov [r8 + 0x18], eax
    mov word ptr [r8 + 0x04], 2
    mov eax, [r9 + 4]
    mov edx, [r9 + 8]
    shl rdx, 32
    or rax, rdx
    mov [r15 + 0x70], rax
    mov [r10], r12
    xor ecx, ecx
101: cmp rcx, r11
    jae 102f
    imul eax, ecx, 0x193
    add eax, 0xa5a5a5
    and eax, 0xffffff
    mov [r12 + rcx * 4], eax
    inc rcx
    jmp 101b
102: xor ecx, ecx
103: cmp rcx, r14
    jae 106f
    mov rdi, r13
    test cl, 1
    jz 105f
    mov rdi, r12
105: mov [r8 + 0x14], edi
    mov rax, rdi
    shr rax, 32
    mov [r8 + 0x18], eax
    mov [r10], rdi
    inc rcx
    jmp 103b
106: mov [r15 + 0xf8], rcx
    mov qword ptr [r10 + 16], 1
107: mov rax, [r10 + 8]
    test rax, rax
    jz 107b
    jmp vmm_guest_workload

    /* framebuffer, vCPU 1: once the BAR is placed, draw pixels n/2 .. n
       through wherever the BAR is now, pass after pass until a pass that
       began after the mover finished, reading each pixel back: a write to
       an address the BAR just left is dropped and reads all ones (a master
       abort), so it is written again at the new address */
vmm_guest_fb_writer:
    mov r10, [r15 + 0xd8]
    mov r11, [r15 + 0x88]
111: mov rax, [r10]
    test rax, rax
    jz 111b
116: mov r9, [r10 + 16]
    mov rcx, r11
    shr rcx, 1
112: cmp rcx, r11
    jae 117f
    imul edx, ecx, 0x193
    add edx, 0xa5a5a5
    and edx, 0xffffff
113: mov rdi, [r10]
    mov [rdi + rcx * 4], edx
    cmp [rdi + rcx * 4], edx
    je 114f
    inc qword ptr [r15 + 0xf8]
    jmp 113b
114: inc rcx
    jmp 112b
117: test r9, r9
    jz 116b
    mov qword ptr [r10 + 8], 1
    jmp vmm_guest_workload

    /* script (mode 7): ops of 24 bytes (op, a, b) from 0x100; the log
       (u64 entries from 0x800, count at 0x708) gets interrupt vectors
       (by the stub above) and workload entries, each slot claimed by one
       xadd so that an interrupt between claim and store loses nothing */
vmm_guest_script:
    lea r14, [r15 + 0x100]
    xor r12, r12
    xor r13, r13
201: mov rax, [r14]
    mov rsi, [r14 + 8]
    mov rdx, [r14 + 16]
    add r14, 24
    cmp rax, 1
    je 211f
    cmp rax, 2
    je 212f
    cmp rax, 3
    je 213f
    cmp rax, 4
    je 214f
    cmp rax, 5
    je 215f
    cmp rax, 6
    je 216f
    cmp rax, 7
    je 217f
    cmp rax, 8
    je 218f
    cmp rax, 9
    je 219f
    cmp rax, 10
    je 220f
209: test byte ptr [r15 + 0x8020], 0
    jmp 209b
211: /* write32 [a] = b */
    mov [rsi], edx
    jmp 201b
212: /* read32 [a], log (1 << 32) | value */
    mov eax, [rsi]
    bts rax, 32
    mov rdx, rax
    jmp 290f
213: /* wait until a interrupts were seen, at most b spins; log 0xdead on timeout */
    mov rcx, rdx
2131: cmp [r15 + 0x700], rsi
    jae 201b
    pause
    dec rcx
    jnz 2131b
    mov edx, 0xdead
    jmp 290f
214: /* mark: log 0x1000 | b */
    or rdx, 0x1000
    jmp 290f
215: /* spin b times */
    test rdx, rdx
    jz 201b
2151: pause
    dec rdx
    jnz 2151b
    jmp 201b
216: /* barrier: count in at [a], wait until it reaches b */
    lock inc qword ptr [rsi]
2161: cmp [rsi], rdx
    jae 201b
    pause
    jmp 2161b
217: /* doorbell 0x40 (host device action: rsi = a, rdi = b) */
    mov rdi, rdx
    test byte ptr [r15 + 0x8040], 0
    jmp 201b
219: /* wait for one more interrupt than the last wait-next took (r12),
        at most b spins; log 0xdead on timeout */
    mov rcx, rdx
2191: cmp [r15 + 0x700], r12
    ja 2192f
    pause
    dec rcx
    jnz 2191b
    mov edx, 0xdead
    jmp 290f
2192: inc r12
    jmp 201b
220: /* loop: back to op a until this op ran b times (r13 counts down) */
    test r13, r13
    jnz 2201f
    mov r13, rdx
2201: dec r13
    jz 201b
    imul rsi, rsi, 24
    lea r14, [r15 + rsi + 0x100]
    jmp 201b
218: /* log the count of interrupts seen: 0x2000 | count */
    mov rdx, [r15 + 0x700]
    or rdx, 0x2000
290: mov eax, 1
    xadd [r15 + 0x708], rax
    cmp rax, 256
    jae 201b
    mov [r15 + rax * 8 + 0x800], rdx
    jmp 201b

    .balign 16
    .globl vmm_guest_blob_end
vmm_guest_blob_end:
    .popsection
"#
);

unsafe extern "C" {
    static vmm_guest_blob_start: u8;
    static vmm_guest_blob_end: u8;
    static vmm_guest_pf_stub: u8;
    static vmm_guest_flush_stub: u8;
    static vmm_guest_exc_stubs: u8;
    static vmm_guest_intr_stubs: u8;
    static vmm_guest_entry: u8;
    static vmm_guest_probe_step: u8;
    static vmm_guest_watch_fault: u8;
}

/// The assembled guest code and the offsets of its entry points.
#[derive(Debug, Clone, Copy)]
pub struct GuestCode {
    /// The code bytes (lives in the host binary's read-only data).
    pub bytes: &'static [u8],
    /// Offset of the #PF stub.
    pub pf_stub: u64,
    /// Offset of the CR3-reload stub.
    pub flush_stub: u64,
    /// Offset of the 32 unexpected-exception stubs, 8 bytes apart.
    pub exc_stubs: u64,
    /// Offset of the CPL 3 workload entry (rdi = parameter block).
    pub entry: u64,
    /// Offset of the external-interrupt stubs for vectors
    /// [`FIRST_INTR_VECTOR`]`..=255`, 8 bytes apart (the one of
    /// [`FLUSH_VECTOR`] is there but not installed).
    pub intr_stubs: u64,
    /// Offset where a skipped probe access resumes.
    pub probe_step: u64,
    /// Offset where a skipped watch read resumes.
    pub watch_fault: u64,
}

/// Returns the guest code blob and its symbol offsets.
pub fn code() -> GuestCode {
    let start = &raw const vmm_guest_blob_start as usize;
    let end = &raw const vmm_guest_blob_end as usize;
    let off = |p: *const u8| (p as usize - start) as u64;
    // SAFETY: both symbols delimit one contiguous blob in a read-only
    // section of this binary; it is never written.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    GuestCode {
        bytes,
        pf_stub: off(&raw const vmm_guest_pf_stub),
        flush_stub: off(&raw const vmm_guest_flush_stub),
        exc_stubs: off(&raw const vmm_guest_exc_stubs),
        entry: off(&raw const vmm_guest_entry),
        intr_stubs: off(&raw const vmm_guest_intr_stubs),
        probe_step: off(&raw const vmm_guest_probe_step),
        watch_fault: off(&raw const vmm_guest_watch_fault),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_is_laid_out() {
        let c = code();
        assert!(!c.bytes.is_empty() && c.bytes.len() < 4096 * 4);
        // out 0x10, al ; add rsp, 8 ; iretq
        let pf = &c.bytes[c.pf_stub as usize..c.pf_stub as usize + 7];
        assert_eq!(pf, &[0xE6, 0x10, 0x48, 0x83, 0xC4, 0x08, 0x48]);
        for v in 0..32u64 {
            let s = (c.exc_stubs + v * 8) as usize;
            assert_eq!(c.bytes[s], 0xE6, "stub {v}");
            assert_eq!(u64::from(c.bytes[s + 1]), 0x80 + v, "stub {v}");
        }
        assert!(c.entry < c.bytes.len() as u64);
        // push rax ; mov al, v ; jmp (8 bytes a stub)
        for v in u64::from(FIRST_INTR_VECTOR)..256 {
            let s = (c.intr_stubs + (v - u64::from(FIRST_INTR_VECTOR)) * 8) as usize;
            assert_eq!(&c.bytes[s..s + 3], &[0x50, 0xB0, v as u8], "interrupt stub {v:#x}");
        }
    }

    #[test]
    fn script_ops_encode_and_log_entries_decode() {
        let ops = [ScriptOp::Write32(0xfee0_00b0, 0), ScriptOp::Wait { count: 2, spins: 0 }, ScriptOp::Mark(0x1234)];
        let b = encode_script(&ops).expect("short script");
        assert_eq!(b.len(), 4 * 24);
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        assert_eq!([w(0), w(1), w(2)], [1, 0xfee0_00b0, 0]);
        assert_eq!([w(3), w(4), w(5)], [3, 2, 1], "zero spins become one");
        assert_eq!([w(6), w(7), w(8)], [4, 0, 0x234], "marks keep 12 bits");
        assert_eq!([w(9), w(10), w(11)], [0, 0, 0], "End appended");
        assert_eq!(ScriptOp::WaitNext { spins: 0 }.encode(), [9, 0, 1]);
        assert_eq!(ScriptOp::Loop { to: 2, times: 0 }.encode(), [10, 2, 1], "a body runs at least once");
        assert_eq!(ScriptOp::Loop { to: 1000, times: 5 }.encode()[1], MAX_SCRIPT_OPS as u64 - 1, "inside the script");
        assert!(encode_script(&[ScriptOp::LogSeen; MAX_SCRIPT_OPS]).is_none());
        assert!(encode_script(&[ScriptOp::LogSeen; MAX_SCRIPT_OPS - 1]).is_some());
        assert_eq!(LogEntry::decode(0x41), LogEntry::Vector(0x41));
        assert_eq!(LogEntry::decode(0x1005), LogEntry::Mark(5));
        assert_eq!(LogEntry::decode(0x2003), LogEntry::Seen(3));
        assert_eq!(LogEntry::decode(0xdead), LogEntry::Timeout);
        assert_eq!(LogEntry::decode((1 << 32) | 0xffff_ffff), LogEntry::Read(0xffff_ffff));
        assert_eq!(LogEntry::decode(0x300), LogEntry::Unknown(0x300));
    }
}
