//! Host-executed ALU operations: each operation runs on the host CPU with
//! the guest's arithmetic flags loaded (`popfq`) and the resulting flags
//! read back (`pushfq`), so every flag, including those the SDM calls
//! "undefined", is what the CPU under the guest produces (bhyve's approach).
//!
//! Only the six status flags (CF PF AF ZF SF OF) plus the reserved bit 1
//! are ever loaded; DF, TF, IF and AC stay as the host ABI has them.
//!
//! This is the one module of the crate allowed `unsafe` (the crate root
//! denies it): one `asm!` block per operation and width, each with its
//! SAFETY note.
#![allow(unsafe_code)]

use core::arch::asm;

/// The arithmetic status flags: CF PF AF ZF SF OF.
pub(crate) const STATUS: u64 = 0x8d5;

/// A two-operand operation `a = a OP b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bin {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Bt,
    Bts,
    Btr,
    Btc,
}

/// A one-operand operation `a = OP a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Un {
    Neg,
    Inc,
    Dec,
}

macro_rules! bin4 {
    ($name:ident, $m:literal) => {
        fn $name(w: u8, a: u64, b: u64, f: u64) -> (u64, u64) {
            let mut a = a;
            let mut f = f;
            // SAFETY: the block touches only the named registers and pushes
            // and pops one quadword below RSP (allowed: `nostack` is not
            // given). The popped flags hold only status bits and bit 1.
            unsafe {
                match w {
                    1 => asm!("push {f}", "popfq", concat!($m, " {a:l}, {b:l}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                    2 => asm!("push {f}", "popfq", concat!($m, " {a:x}, {b:x}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                    4 => asm!("push {f}", "popfq", concat!($m, " {a:e}, {b:e}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                    _ => asm!("push {f}", "popfq", concat!($m, " {a:r}, {b:r}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                }
            }
            (a, f)
        }
    };
}

macro_rules! bin3 {
    ($name:ident, $m:literal) => {
        fn $name(w: u8, a: u64, b: u64, f: u64) -> (u64, u64) {
            let mut a = a;
            let mut f = f;
            // SAFETY: as for `bin4`: named registers and one quadword of
            // stack only.
            unsafe {
                match w {
                    2 => asm!("push {f}", "popfq", concat!($m, " {a:x}, {b:x}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                    4 => asm!("push {f}", "popfq", concat!($m, " {a:e}, {b:e}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                    _ => asm!("push {f}", "popfq", concat!($m, " {a:r}, {b:r}"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
                }
            }
            (a, f)
        }
    };
}

macro_rules! un4 {
    ($name:ident, $m:literal) => {
        fn $name(w: u8, a: u64, f: u64) -> (u64, u64) {
            let mut a = a;
            let mut f = f;
            // SAFETY: as for `bin4`: named registers and one quadword of
            // stack only.
            unsafe {
                match w {
                    1 => asm!("push {f}", "popfq", concat!($m, " {a:l}"), "pushfq", "pop {f}",
                        a = inout(reg) a, f = inout(reg) f),
                    2 => asm!("push {f}", "popfq", concat!($m, " {a:x}"), "pushfq", "pop {f}",
                        a = inout(reg) a, f = inout(reg) f),
                    4 => asm!("push {f}", "popfq", concat!($m, " {a:e}"), "pushfq", "pop {f}",
                        a = inout(reg) a, f = inout(reg) f),
                    _ => asm!("push {f}", "popfq", concat!($m, " {a:r}"), "pushfq", "pop {f}",
                        a = inout(reg) a, f = inout(reg) f),
                }
            }
            (a, f)
        }
    };
}

bin4!(add, "add");
bin4!(or, "or");
bin4!(adc, "adc");
bin4!(sbb, "sbb");
bin4!(and, "and");
bin4!(sub, "sub");
bin4!(xor, "xor");
bin3!(bt, "bt");
bin3!(bts, "bts");
bin3!(btr, "btr");
bin3!(btc, "btc");
un4!(neg, "neg");
un4!(inc, "inc");
un4!(dec, "dec");

/// A shift or rotate `a = a OP count` (count from CL/imm; the CPU masks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sh {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
}

macro_rules! sh4 {
    ($name:ident, $m:literal) => {
        fn $name(w: u8, a: u64, c: u8, f: u64) -> (u64, u64) {
            let mut a = a;
            let mut f = f;
            // SAFETY: as for `bin4`: named registers (CL as the count) and
            // one quadword of stack only.
            unsafe {
                match w {
                    1 => asm!("push {f}", "popfq", concat!($m, " {a:l}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, in("cl") c, f = inout(reg) f),
                    2 => asm!("push {f}", "popfq", concat!($m, " {a:x}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, in("cl") c, f = inout(reg) f),
                    4 => asm!("push {f}", "popfq", concat!($m, " {a:e}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, in("cl") c, f = inout(reg) f),
                    _ => asm!("push {f}", "popfq", concat!($m, " {a:r}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, in("cl") c, f = inout(reg) f),
                }
            }
            (a, f)
        }
    };
}

macro_rules! dsh3 {
    ($name:ident, $m:literal) => {
        fn $name(w: u8, a: u64, b: u64, c: u8, f: u64) -> (u64, u64) {
            let mut a = a;
            let mut f = f;
            // SAFETY: as for `bin4`: named registers (CL as the count) and
            // one quadword of stack only.
            unsafe {
                match w {
                    2 => asm!("push {f}", "popfq", concat!($m, " {a:x}, {b:x}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, in("cl") c, f = inout(reg) f),
                    4 => asm!("push {f}", "popfq", concat!($m, " {a:e}, {b:e}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, in("cl") c, f = inout(reg) f),
                    _ => asm!("push {f}", "popfq", concat!($m, " {a:r}, {b:r}, cl"), "pushfq", "pop {f}",
                        a = inout(reg) a, b = in(reg) b, in("cl") c, f = inout(reg) f),
                }
            }
            (a, f)
        }
    };
}

sh4!(rol, "rol");
sh4!(ror, "ror");
sh4!(rcl, "rcl");
sh4!(rcr, "rcr");
sh4!(shl, "shl");
sh4!(shr, "shr");
sh4!(sar, "sar");
dsh3!(shld, "shld");
dsh3!(shrd, "shrd");

/// `a OP count` at width `w`; as [`bin`].
pub(crate) fn shift(op: Sh, w: u8, a: u64, count: u8, rflags: u64) -> (u64, u64) {
    let f = (rflags & STATUS) | 2;
    let (r, f) = match op {
        Sh::Rol => rol(w, a, count, f),
        Sh::Ror => ror(w, a, count, f),
        Sh::Rcl => rcl(w, a, count, f),
        Sh::Rcr => rcr(w, a, count, f),
        Sh::Shl => shl(w, a, count, f),
        Sh::Shr => shr(w, a, count, f),
        Sh::Sar => sar(w, a, count, f),
    };
    (r & mask(w), f & STATUS)
}

/// SHLD (`left`) or SHRD of `a` with bits from `b`, at width 2, 4 or 8.
pub(crate) fn double_shift(left: bool, w: u8, a: u64, b: u64, count: u8, rflags: u64) -> (u64, u64) {
    let f = (rflags & STATUS) | 2;
    let w = w.max(2);
    let (r, f) = if left { shld(w, a, b, count, f) } else { shrd(w, a, b, count, f) };
    (r & mask(w), f & STATUS)
}

/// Two-operand IMUL `a = a * b` at width 2, 4 or 8.
pub(crate) fn imul2(w: u8, a: u64, b: u64, rflags: u64) -> (u64, u64) {
    let mut a = a;
    let mut f = (rflags & STATUS) | 2;
    // SAFETY: as for `bin4`: named registers and one quadword of stack.
    unsafe {
        match w {
            2 => asm!("push {f}", "popfq", "imul {a:x}, {b:x}", "pushfq", "pop {f}",
                a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
            4 => asm!("push {f}", "popfq", "imul {a:e}, {b:e}", "pushfq", "pop {f}",
                a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
            _ => asm!("push {f}", "popfq", "imul {a:r}, {b:r}", "pushfq", "pop {f}",
                a = inout(reg) a, b = in(reg) b, f = inout(reg) f),
        }
    }
    (a & mask(w), f & STATUS)
}

/// One-operand MUL (`signed`: IMUL) of the accumulator by `b`: returns
/// (new RAX, new RDX, flags). RAX/RDX are the full registers; the CPU
/// semantics of each width (AX = AL*b; DX:AX; EDX:EAX zero-extended;
/// RDX:RAX) come from running the instruction itself.
pub(crate) fn mul1(signed: bool, w: u8, rax: u64, rdx: u64, b: u64, rflags: u64) -> (u64, u64, u64) {
    let (mut rax, mut rdx) = (rax, rdx);
    let mut f = (rflags & STATUS) | 2;
    macro_rules! m {
        ($t:literal) => {
            // SAFETY: as for `bin4`; RAX/RDX are declared in/out.
            unsafe {
                asm!("push {f}", "popfq", $t, "pushfq", "pop {f}",
                    b = in(reg) b, f = inout(reg) f, inout("rax") rax, inout("rdx") rdx)
            }
        };
    }
    match (signed, w) {
        (false, 1) => m!("mul {b:l}"),
        (false, 2) => m!("mul {b:x}"),
        (false, 4) => m!("mul {b:e}"),
        (false, _) => m!("mul {b:r}"),
        (true, 1) => m!("imul {b:l}"),
        (true, 2) => m!("imul {b:x}"),
        (true, 4) => m!("imul {b:e}"),
        (true, _) => m!("imul {b:r}"),
    }
    (rax, rdx, f & STATUS)
}

/// One-operand DIV (`signed`: IDIV) of the accumulator pair by `b`, or
/// None where the CPU raises #DE (zero divisor, quotient overflow): the
/// checks come first, so the host instruction never faults.
pub(crate) fn div1(signed: bool, w: u8, rax: u64, rdx: u64, b: u64, rflags: u64) -> Option<(u64, u64, u64)> {
    let m = mask(w);
    let bits = 8 * u32::from(w);
    let d = b & m;
    if d == 0 {
        return None;
    }
    // The dividend: AX for bytes, else DX:AX / EDX:EAX / RDX:RAX.
    let (hi, lo) = if w == 1 { ((rax >> 8) & 0xff, rax & 0xff) } else { (rdx & m, rax & m) };
    let dividend = (u128::from(hi) << bits) | u128::from(lo);
    if signed {
        let sh = 128 - 2 * bits;
        let n = ((dividend << sh) as i128) >> sh;
        let dsh = 64 - bits;
        let dv = i128::from(((d << dsh) as i64) >> dsh);
        let q = n.checked_div(dv)?;
        let lim = 1i128 << (bits - 1);
        if q < -lim || q >= lim {
            return None;
        }
    } else if dividend / u128::from(d) > u128::from(m) {
        return None;
    }
    let (mut rax, mut rdx) = (rax, rdx);
    let mut f = (rflags & STATUS) | 2;
    macro_rules! v {
        ($t:literal) => {
            // SAFETY: as for `bin4`; RAX/RDX are declared in/out, and the
            // checks above exclude #DE.
            unsafe {
                asm!("push {f}", "popfq", $t, "pushfq", "pop {f}",
                    b = in(reg) d, f = inout(reg) f, inout("rax") rax, inout("rdx") rdx)
            }
        };
    }
    match (signed, w) {
        (false, 1) => v!("div {b:l}"),
        (false, 2) => v!("div {b:x}"),
        (false, 4) => v!("div {b:e}"),
        (false, _) => v!("div {b:r}"),
        (true, 1) => v!("idiv {b:l}"),
        (true, 2) => v!("idiv {b:x}"),
        (true, 4) => v!("idiv {b:e}"),
        (true, _) => v!("idiv {b:r}"),
    }
    Some((rax, rdx, f & STATUS))
}

/// BSF (`reverse` false) or BSR of `src` into a register whose full
/// 64-bit value is `dst`, at width 2, 4 or 8: returns the register's full
/// new value (what the host CPU leaves there, also for a zero source) and
/// the flags.
pub(crate) fn bit_scan(reverse: bool, w: u8, dst: u64, src: u64, rflags: u64) -> (u64, u64) {
    let mut a = dst;
    let mut f = (rflags & STATUS) | 2;
    macro_rules! s {
        ($t:literal) => {
            // SAFETY: as for `bin4`: named registers and one quadword of
            // stack only.
            unsafe { asm!("push {f}", "popfq", $t, "pushfq", "pop {f}", a = inout(reg) a, b = in(reg) src, f = inout(reg) f) }
        };
    }
    match (reverse, w) {
        (false, 2) => s!("bsf {a:x}, {b:x}"),
        (false, 4) => s!("bsf {a:e}, {b:e}"),
        (false, _) => s!("bsf {a:r}, {b:r}"),
        (true, 2) => s!("bsr {a:x}, {b:x}"),
        (true, 4) => s!("bsr {a:e}, {b:e}"),
        (true, _) => s!("bsr {a:r}, {b:r}"),
    }
    (a, f & STATUS)
}

/// The value mask of a `w`-byte operand (`w` in 1, 2, 4, 8).
#[inline]
pub(crate) fn mask(w: u8) -> u64 {
    if w >= 8 { !0 } else { (1u64 << (8 * w)) - 1 }
}

/// `a OP b` at width `w` bytes, flags in from `rflags`; returns the result
/// (masked to `w`) and the new status flags (only `STATUS` bits set).
/// For the bit-test operations `b` must already be the bit index within
/// the operand and `w` must be 2, 4 or 8.
pub(crate) fn bin(op: Bin, w: u8, a: u64, b: u64, rflags: u64) -> (u64, u64) {
    let f = (rflags & STATUS) | 2;
    let (r, f) = match op {
        Bin::Add => add(w, a, b, f),
        Bin::Or => or(w, a, b, f),
        Bin::Adc => adc(w, a, b, f),
        Bin::Sbb => sbb(w, a, b, f),
        Bin::And => and(w, a, b, f),
        Bin::Sub => sub(w, a, b, f),
        Bin::Xor => xor(w, a, b, f),
        Bin::Bt => bt(w.max(2), a, b, f),
        Bin::Bts => bts(w.max(2), a, b, f),
        Bin::Btr => btr(w.max(2), a, b, f),
        Bin::Btc => btc(w.max(2), a, b, f),
    };
    (r & mask(w), f & STATUS)
}

/// `OP a` at width `w`; as [`bin`].
pub(crate) fn un(op: Un, w: u8, a: u64, rflags: u64) -> (u64, u64) {
    let f = (rflags & STATUS) | 2;
    let (r, f) = match op {
        Un::Neg => neg(w, a, f),
        Un::Inc => inc(w, a, f),
        Un::Dec => dec(w, a, f),
    };
    (r & mask(w), f & STATUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_basics() {
        // 0xff + 1 at 8 bits: CF ZF AF PF set.
        let (r, f) = bin(Bin::Add, 1, 0xff, 1, 0);
        assert_eq!(r, 0);
        assert_eq!(f, 0x1 | 0x4 | 0x10 | 0x40);
        // INC keeps CF.
        let (_, f) = un(Un::Inc, 4, 5, 1);
        assert_eq!(f & 1, 1);
        // ADC uses CF.
        assert_eq!(bin(Bin::Adc, 8, 1, 1, 1).0, 3);
        assert_eq!(bin(Bin::Bts, 2, 0, 15, 0).0, 0x8000);
    }
}
