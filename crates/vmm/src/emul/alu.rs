//! Host-executed ALU operations: each operation runs on the host CPU with
//! the guest's arithmetic flags loaded (`popfq`) and the resulting flags
//! read back (`pushfq`), so every flag, including those the SDM calls
//! "undefined", is what the CPU under the guest produces (bhyve's approach).
//!
//! Only the six status flags (CF PF AF ZF SF OF) plus the reserved bit 1
//! are ever loaded; DF, TF, IF and AC stay as the host ABI has them.
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
