//! MMIO instruction emulation for x86-64 guests.
//!
//! A guest access to an MMIO range reaches the VMM as a nested page fault.
//! [`emulate`] fetches the instruction bytes at RIP through [`Memory`],
//! decodes them with `iced-x86`, executes the instruction against
//! [`Memory`] (which routes every byte range to RAM or to a device) and
//! updates the [`Regs`]: general registers, RFLAGS and RIP. It knows
//! nothing of KVM.
//!
//! # Example
//!
//! ```
//! use vmm::emul::{emulate, gpr, MemError, MemErrorKind, Memory, Regs};
//!
//! /// Code at 0x1000 (`mov dword [rax], ebx`), one device register at 0xfee0_0000.
//! struct Guest { code: [u8; 2], reg: [u8; 4] }
//! impl Memory for Guest {
//!     fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, MemError> {
//!         let off = addr.checked_sub(0x1000).filter(|&o| o < 2)
//!             .ok_or(MemError { addr, kind: MemErrorKind::Unmapped })? as usize;
//!         let n = buf.len().min(2 - off);
//!         buf[..n].copy_from_slice(&self.code[off..off + n]);
//!         Ok(n)
//!     }
//!     fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
//!         Err(MemError { addr, kind: MemErrorKind::Unmapped })
//!     }
//!     fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
//!         if addr != 0xfee0_0000 || data.len() != 4 {
//!             return Err(MemError { addr, kind: MemErrorKind::Unmapped });
//!         }
//!         self.reg.copy_from_slice(data);
//!         Ok(())
//!     }
//! }
//!
//! let mut guest = Guest { code: [0x89, 0x18], reg: [0; 4] };
//! let mut regs = Regs { rip: 0x1000, rflags: 2, ..Regs::default() };
//! regs.gpr[gpr::RAX] = 0xfee0_0000;
//! regs.gpr[gpr::RBX] = 0xdead_beef;
//! let done = emulate(&mut regs, &mut guest).unwrap();
//! assert_eq!((done.len, regs.rip), (2, 0x1002));
//! assert_eq!(u32::from_le_bytes(guest.reg), 0xdead_beef);
//! ```
//!
//! # Design and invariants
//!
//! * **64-bit mode only** (CS.L=1, flat segments): effective addresses are
//!   base + index*scale + displacement (or RIP-relative), computed with
//!   `wrapping_add`/`wrapping_mul` on purpose: linear addresses are modulo
//!   2^64 as on the CPU; with an address-size prefix (67) the offset is
//!   truncated to 32 bits. FS and GS overrides add [`Regs::fs_base`] /
//!   [`Regs::gs_base`]; every other segment has base 0. Canonicality is not
//!   checked (a non-canonical access faults in the guest before an exit).
//! * **Fetch**: the first [`Memory::fetch`] asks only for the bytes up to
//!   the end of RIP's 4 KiB page; the next page is fetched only when the
//!   decoder reports `NoMoreBytes` (bhyve reads 15 bytes blindly and faults
//!   spuriously when the next page is unmapped).
//! * **Memory contract**: one [`Memory::read`]/[`Memory::write`] per operand
//!   access, of the operand's width (1..=8 bytes). The range may straddle a
//!   page boundary (RAM and MMIO, or two devices) and may wrap modulo 2^64;
//!   the implementation splits it. The emulator never holds a reference
//!   into guest memory: everything is copied through the trait.
//! * **Atomicity**: LOCK-prefixed read-modify-writes (and XCHG with memory,
//!   implicitly locked) read the old value, compute, and commit with
//!   [`Memory::compare_exchange`]; when memory changed in between they
//!   retry (up to [`LOCK_RETRIES`] times, then [`Error::LockContention`]).
//! * **Commit**: registers are updated only when the instruction completes;
//!   on any error the caller's [`Regs`] are untouched, except for string
//!   instructions, which commit RSI/RDI/RCX after each finished iteration
//!   (as the CPU does when a REP faults part-way).
//! * **REP**: all iterations run in one call, up to [`MAX_REP_ITERATIONS`];
//!   then [`Emulated::complete`] is false and RIP is *not* advanced, so the
//!   caller re-enters the guest at the same RIP (the REP resumes with the
//!   remaining RCX; interrupts can be taken in between). RCX=0 performs no
//!   access and advances RIP. REPE/REPNE end CMPS/SCAS on ZF. F2 on a
//!   non-comparing string instruction acts as REP (as on hardware).
//! * **Flags** are computed by running the same ALU operation on the host
//!   CPU (inline asm, `popfq` / op / `pushfq`), so even the flags the SDM
//!   leaves undefined match the CPU the guest runs on. Only CF PF AF ZF SF
//!   OF change; RFLAGS.RF/TF handling (single step, resume flag) is left to
//!   the caller and ignored here.
//! * **No panics from guest input**: every byte sequence and register value
//!   yields `Ok` or a typed [`Error`] (fuzzed in the tests). Instructions not
//!   in the table are reported as [`Error::Unsupported`] with their bytes
//!   and RIP, never guessed at; LOCK on a register destination or on a
//!   non-lockable instruction is [`Fault::InvalidOpcode`] (#UD).
//!
//! # Coverage (memory-operand forms only)
//!
//! | group | instructions |
//! |---|---|
//! | moves | MOV r/m↔r (8/16/32/64), MOV r/m,imm (C6/C7), MOV moffs (A0-A3), MOVZX, MOVSX, MOVSXD |
//! | ALU | ADD OR ADC SBB AND SUB XOR CMP (r/m,r; r,r/m; 80/81/83 imm), TEST (84/85, F6/F7 imm) |
//! | unary | NEG NOT INC DEC |
//! | moves (more) | MOVNTI, MOVBE (load and store) |
//! | exchange | XCHG, CMPXCHG, CMPXCHG8B, CMPXCHG16B (16-byte alignment, else #GP), XADD |
//! | bits | BT BTS BTR BTC (reg form with bit-string addressing, imm8 form); BSF BSR (the host CPU decides the zero-source result) |
//! | conditional | SETcc, CMOVcc (memory is read even when the condition is false; 32-bit CMOV zero-extends) |
//! | shifts | ROL ROR RCL RCR SHL/SAL SHR SAR (by 1, CL, imm8), SHLD SHRD (imm8, CL) |
//! | multiply | IMUL r,m and r,m,imm; MUL IMUL DIV IDIV m (#DE detected before the host runs it) |
//! | stack | PUSH r/m (FF /6), POP r/m (8F /0; the address uses the incremented RSP) |
//! | strings | MOVS STOS LODS CMPS SCAS, all widths, REP/REPE/REPNE, DF, 67 (ECX/ESI/EDI) |
//! | LOCK | every lockable form above |
//!
//! # Testing
//!
//! `tests/emul_diff.rs` runs every [`cases`] form natively in the test
//! process (a trampoline in an RWX page) and emulated against a mock
//! [`Memory`] over copies of the same pages, comparing GPRs, RFLAGS
//! ([`FLAGS_ARITH`]), RIP and memory (`EMUL_CASES`, `EMUL_SEED`);
//! `tests/emul_unit.rs` covers the fetch, straddle, REP, LOCK and error
//! paths; `tests/emul_fuzz.rs` feeds random bytes and registers
//! (`EMUL_FUZZ`); `benches/emul.rs` times decode + emulate.
//!
//! # Known gaps
//!
//! Not emulated (reported as [`Error::Unsupported`]): POPCNT/LZCNT/TZCNT
//! and the other BMI forms, CALL/JMP through memory, ENTER/LEAVE,
//! INS/OUTS, SSE/AVX loads and stores (the register file holds no vector
//! state), x87; legacy 16/32-bit modes. Unlocked CMPXCHG* that fails does
//! not write the old value back (the CPU does; the value is unchanged).
//! Alignment checks (#AC), canonical-address checks (#GP/#SS) and
//! segment-limit checks are not made.
#![cfg(target_arch = "x86_64")]
#![deny(missing_docs)]

mod alu;
#[cfg(feature = "cases")]
pub mod cases;
mod exec;

use iced_x86::DecoderError;

pub use exec::{decode, emulate, execute};

/// Size of a guest page: fetches never cross one in a single call.
pub const PAGE_SIZE: u64 = 4096;
/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// Most REP iterations [`emulate`] runs in one call.
pub const MAX_REP_ITERATIONS: u64 = 4096;
/// Most `compare_exchange` attempts of one locked instruction.
pub const LOCK_RETRIES: u32 = 1 << 16;

/// RFLAGS.CF.
pub const FLAG_CF: u64 = 1 << 0;
/// RFLAGS.PF.
pub const FLAG_PF: u64 = 1 << 2;
/// RFLAGS.AF.
pub const FLAG_AF: u64 = 1 << 4;
/// RFLAGS.ZF.
pub const FLAG_ZF: u64 = 1 << 6;
/// RFLAGS.SF.
pub const FLAG_SF: u64 = 1 << 7;
/// RFLAGS.DF.
pub const FLAG_DF: u64 = 1 << 10;
/// RFLAGS.OF.
pub const FLAG_OF: u64 = 1 << 11;
/// The arithmetic flags the emulator computes (CF PF AF ZF SF OF) plus DF.
pub const FLAGS_ARITH: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF | FLAG_DF;

/// Index of each register in [`Regs::gpr`] (the hardware encoding order).
pub mod gpr {
    /// RAX.
    pub const RAX: usize = 0;
    /// RCX.
    pub const RCX: usize = 1;
    /// RDX.
    pub const RDX: usize = 2;
    /// RBX.
    pub const RBX: usize = 3;
    /// RSP.
    pub const RSP: usize = 4;
    /// RBP.
    pub const RBP: usize = 5;
    /// RSI.
    pub const RSI: usize = 6;
    /// RDI.
    pub const RDI: usize = 7;
}

/// The guest register state the emulator reads and updates (64-bit mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    /// RAX RCX RDX RBX RSP RBP RSI RDI R8..R15, the hardware encoding order.
    pub gpr: [u64; 16],
    /// Instruction pointer (linear address of the instruction).
    pub rip: u64,
    /// RFLAGS; the emulator changes only CF PF AF ZF SF OF.
    pub rflags: u64,
    /// FS segment base (added for FS-overridden accesses).
    pub fs_base: u64,
    /// GS segment base (added for GS-overridden accesses).
    pub gs_base: u64,
}

/// Why a [`Memory`] access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemErrorKind {
    /// Nothing is mapped there.
    Unmapped,
    /// Mapped, but this kind of access is not allowed (e.g. a write to ROM).
    Denied,
    /// The device refused or failed the access.
    Device,
    /// The request is outside what the implementation supports (e.g. a
    /// compare-exchange wider than 16 bytes).
    Unsupported,
}

/// A failed [`Memory`] access, with the guest address it failed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemError {
    /// The guest linear address (the first byte that failed, if known).
    pub addr: u64,
    /// What went wrong.
    pub kind: MemErrorKind,
}

/// Guest memory as the emulator sees it: linear addresses (= guest-physical
/// here, 64-bit flat), every byte routed to RAM or to a device.
///
/// Contract: a range `addr..addr+len` (1 to 16 bytes for data, modulo 2^64)
/// may straddle pages, RAM and MMIO; the implementation splits it at page
/// boundaries and routes each part. Data is always copied: nothing is
/// borrowed from guest memory.
pub trait Memory {
    /// Copies instruction bytes at `addr` into `buf`, returning how many it
    /// copied: at least 1 and at most `buf.len()`; it may stop early (at the
    /// end of a page). The emulator never asks across a page boundary.
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, MemError>;
    /// Reads `buf.len()` bytes at `addr`.
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `data` at `addr`.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError>;
    /// Atomically (as far as the implementation can: RAM should use a host
    /// atomic, a device its own lock) replaces `expected` by `new` at `addr`
    /// if memory holds `expected`; returns whether it did. `expected` and
    /// `new` have the same length, at most 16 bytes. The default reads,
    /// compares and writes (not atomic); on a device range that means the
    /// device sees the emulator's read and then this read before the
    /// write: implementations with read side effects should override it.
    fn compare_exchange(&mut self, addr: u64, expected: &[u8], new: &[u8]) -> Result<bool, MemError> {
        let n = expected.len();
        if n > 16 || new.len() != n {
            return Err(MemError { addr, kind: MemErrorKind::Unsupported });
        }
        let mut cur = [0u8; 16];
        self.read(addr, &mut cur[..n])?;
        if cur[..n] != *expected {
            return Ok(false);
        }
        self.write(addr, new)?;
        Ok(true)
    }
}

/// A successfully emulated instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulated {
    /// Instruction length in bytes (RIP advanced by this when `complete`).
    pub len: u8,
    /// The decoded mnemonic.
    pub mnemonic: iced_x86::Mnemonic,
    /// False only for a REP string instruction stopped after
    /// [`MAX_REP_ITERATIONS`]: RIP was not advanced; re-enter the guest.
    pub complete: bool,
    /// String iterations run (1 for other instructions, 0 for REP with
    /// RCX=0).
    pub iterations: u64,
}

/// An exception condition the emulator detected; the caller injects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// #UD, e.g. LOCK on a register destination or a non-lockable
    /// instruction.
    InvalidOpcode,
    /// #GP(0).
    GeneralProtection,
    /// #DE: DIV/IDIV by zero or with a quotient that does not fit.
    DivideError,
}

/// Why an instruction was not emulated. On error the registers are
/// unchanged (see the module doc for string instructions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Decoded, but not in the supported table (or not a memory form).
    Unsupported {
        /// RIP of the instruction.
        rip: u64,
        /// Its bytes (the first `len`).
        bytes: [u8; MAX_INSN_LEN],
        /// Its length.
        len: u8,
    },
    /// The bytes do not decode.
    Decode {
        /// RIP of the instruction.
        rip: u64,
        /// The bytes fetched (the first `len`).
        bytes: [u8; MAX_INSN_LEN],
        /// How many were fetched.
        len: u8,
        /// The decoder's reason.
        error: DecoderError,
    },
    /// An exception condition to inject into the guest.
    Fault {
        /// RIP of the instruction.
        rip: u64,
        /// Which exception.
        fault: Fault,
    },
    /// A fetch or data access failed.
    Memory(MemError),
    /// A locked instruction lost [`LOCK_RETRIES`] compare-exchange races.
    LockContention {
        /// The operand address.
        addr: u64,
    },
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Unsupported { rip, bytes, len } => {
                write!(f, "unsupported instruction at {rip:#x}: {:02x?}", &bytes[..usize::from(*len).min(MAX_INSN_LEN)])
            }
            Error::Decode { rip, bytes, len, error } => write!(
                f,
                "undecodable instruction at {rip:#x} ({error:?}): {:02x?}",
                &bytes[..usize::from(*len).min(MAX_INSN_LEN)]
            ),
            Error::Fault { rip, fault } => write!(f, "{fault:?} at {rip:#x}"),
            Error::Memory(e) => write!(f, "memory access at {:#x} failed: {:?}", e.addr, e.kind),
            Error::LockContention { addr } => write!(f, "locked access at {addr:#x} kept losing races"),
        }
    }
}

impl std::error::Error for Error {}
