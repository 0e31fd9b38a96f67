//! Fetch, decode and execute.

use iced_x86::{Code, ConditionCode, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::alu::{self, Bin, STATUS, Sh, Un, mask};
use super::{
    Emulated, Error, FLAG_DF, Fault, LOCK_RETRIES, MAX_INSN_LEN, MAX_REP_ITERATIONS, MemError, MemErrorKind, Memory,
    PAGE_SIZE, Regs, gpr,
};

/// Fetches and decodes the instruction at `rip`: first only up to the end
/// of RIP's page, then the next page only if the decoder needs more bytes.
/// Returns the instruction and its bytes (the first `len()` are valid).
pub fn decode<M: Memory + ?Sized>(rip: u64, mem: &mut M) -> Result<(Instruction, [u8; MAX_INSN_LEN]), Error> {
    let mut bytes = [0u8; MAX_INSN_LEN];
    let mut have = fetch_into(mem, rip, &mut bytes)?;
    loop {
        let mut decoder = Decoder::with_ip(64, &bytes[..have], rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        let error = decoder.last_error();
        if error == DecoderError::None && !insn.is_invalid() {
            return Ok((insn, bytes));
        }
        if error == DecoderError::InvalidInstruction {
            // Invalid as decoded strictly: a misplaced LOCK is #UD, the
            // rest a decode error.
            let mut lax = Decoder::with_ip(64, &bytes[..have], rip, DecoderOptions::NO_INVALID_CHECK);
            let l = lax.decode();
            if lax.last_error() == DecoderError::None && l.has_lock_prefix() {
                return Err(Error::Fault { rip, fault: Fault::InvalidOpcode });
            }
        }
        if error == DecoderError::NoMoreBytes && have < MAX_INSN_LEN {
            have += fetch_into(mem, rip.wrapping_add(have as u64), &mut bytes[have..])?;
            debug_assert!(have <= MAX_INSN_LEN);
            continue;
        }
        return Err(Error::Decode { rip, bytes, len: have as u8, error });
    }
}

/// One fetch at `addr` into the start of `buf`, asking at most up to the
/// end of `addr`'s page.
fn fetch_into<M: Memory + ?Sized>(mem: &mut M, addr: u64, buf: &mut [u8]) -> Result<usize, Error> {
    let to_page_end = (PAGE_SIZE - (addr & (PAGE_SIZE - 1))) as usize;
    let len = to_page_end.min(buf.len());
    let buf = &mut buf[..len];
    let n = mem.fetch(addr, buf).map_err(Error::Memory)?;
    if n == 0 {
        return Err(Error::Memory(MemError { addr, kind: MemErrorKind::Unmapped }));
    }
    Ok(n.min(buf.len()))
}

/// Fetches, decodes and executes the instruction at `regs.rip`, updating
/// `regs` (GPRs, status flags, RIP) and memory.
pub fn emulate<M: Memory + ?Sized>(regs: &mut Regs, mem: &mut M) -> Result<Emulated, Error> {
    let (insn, bytes) = decode(regs.rip, mem)?;
    execute(&insn, &bytes, regs, mem)
}

/// Executes an already decoded instruction (`bytes` are its bytes, used
/// only for error reports). `insn` must have been decoded in 64-bit mode
/// at `regs.rip`.
pub fn execute<M: Memory + ?Sized>(
    insn: &Instruction,
    bytes: &[u8; MAX_INSN_LEN],
    regs: &mut Regs,
    mem: &mut M,
) -> Result<Emulated, Error> {
    let mut cx = Cx { r: *regs, mem, insn, bytes };
    let string = string_kind(insn.code());
    let res = match string {
        Some((kind, w)) => cx.string(kind, w),
        None => cx.exec().map(|()| (true, 1)),
    };
    if res.is_ok() || string.is_some() {
        *regs = cx.r;
    }
    let (complete, iterations) = res?;
    if complete {
        regs.rip = regs.rip.wrapping_add(insn.len() as u64);
    }
    Ok(Emulated { len: insn.len() as u8, mnemonic: insn.mnemonic(), complete, iterations })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Str {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

fn string_kind(code: Code) -> Option<(Str, u8)> {
    Some(match code {
        Code::Movsb_m8_m8 => (Str::Movs, 1),
        Code::Movsw_m16_m16 => (Str::Movs, 2),
        Code::Movsd_m32_m32 => (Str::Movs, 4),
        Code::Movsq_m64_m64 => (Str::Movs, 8),
        Code::Stosb_m8_AL => (Str::Stos, 1),
        Code::Stosw_m16_AX => (Str::Stos, 2),
        Code::Stosd_m32_EAX => (Str::Stos, 4),
        Code::Stosq_m64_RAX => (Str::Stos, 8),
        Code::Lodsb_AL_m8 => (Str::Lods, 1),
        Code::Lodsw_AX_m16 => (Str::Lods, 2),
        Code::Lodsd_EAX_m32 => (Str::Lods, 4),
        Code::Lodsq_RAX_m64 => (Str::Lods, 8),
        Code::Cmpsb_m8_m8 => (Str::Cmps, 1),
        Code::Cmpsw_m16_m16 => (Str::Cmps, 2),
        Code::Cmpsd_m32_m32 => (Str::Cmps, 4),
        Code::Cmpsq_m64_m64 => (Str::Cmps, 8),
        Code::Scasb_AL_m8 => (Str::Scas, 1),
        Code::Scasw_AX_m16 => (Str::Scas, 2),
        Code::Scasd_EAX_m32 => (Str::Scas, 4),
        Code::Scasq_RAX_m64 => (Str::Scas, 8),
        _ => return None,
    })
}

/// `(index in Regs::gpr, width in bytes, is AH/CH/DH/BH)` of a GPR.
fn reg_slot(reg: Register) -> Option<(usize, u8, bool)> {
    let n = reg as u32;
    let in_range = |lo: Register, hi: Register| n >= lo as u32 && n <= hi as u32;
    if in_range(Register::AL, Register::R15L) {
        let off = (n - Register::AL as u32) as usize;
        return Some(match off {
            0..4 => (off, 1, false),
            4..8 => (off - 4, 1, true),
            _ => (off - 4, 1, false),
        });
    }
    if in_range(Register::AX, Register::R15W) {
        return Some(((n - Register::AX as u32) as usize, 2, false));
    }
    if in_range(Register::EAX, Register::R15D) {
        return Some(((n - Register::EAX as u32) as usize, 4, false));
    }
    if in_range(Register::RAX, Register::R15) {
        return Some(((n - Register::RAX as u32) as usize, 8, false));
    }
    None
}

fn cond(cc: ConditionCode, f: u64) -> bool {
    let cf = f & 1 != 0;
    let pf = f & 4 != 0;
    let zf = f & 0x40 != 0;
    let sf = f & 0x80 != 0;
    let of = f & 0x800 != 0;
    match cc {
        ConditionCode::None => false,
        ConditionCode::o => of,
        ConditionCode::no => !of,
        ConditionCode::b => cf,
        ConditionCode::ae => !cf,
        ConditionCode::e => zf,
        ConditionCode::ne => !zf,
        ConditionCode::be => cf || zf,
        ConditionCode::a => !cf && !zf,
        ConditionCode::s => sf,
        ConditionCode::ns => !sf,
        ConditionCode::p => pf,
        ConditionCode::np => !pf,
        ConditionCode::l => sf != of,
        ConditionCode::ge => sf == of,
        ConditionCode::le => zf || sf != of,
        ConditionCode::g => !zf && sf == of,
    }
}

fn lockable(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Add
            | Mnemonic::Adc
            | Mnemonic::And
            | Mnemonic::Btc
            | Mnemonic::Btr
            | Mnemonic::Bts
            | Mnemonic::Cmpxchg
            | Mnemonic::Cmpxchg8b
            | Mnemonic::Cmpxchg16b
            | Mnemonic::Dec
            | Mnemonic::Inc
            | Mnemonic::Neg
            | Mnemonic::Not
            | Mnemonic::Or
            | Mnemonic::Sbb
            | Mnemonic::Sub
            | Mnemonic::Xor
            | Mnemonic::Xadd
            | Mnemonic::Xchg
    )
}

fn alu_of(m: Mnemonic) -> Option<(Bin, bool)> {
    // (operation, stores its result)
    Some(match m {
        Mnemonic::Add => (Bin::Add, true),
        Mnemonic::Or => (Bin::Or, true),
        Mnemonic::Adc => (Bin::Adc, true),
        Mnemonic::Sbb => (Bin::Sbb, true),
        Mnemonic::And => (Bin::And, true),
        Mnemonic::Sub => (Bin::Sub, true),
        Mnemonic::Xor => (Bin::Xor, true),
        Mnemonic::Cmp => (Bin::Sub, false),
        Mnemonic::Test => (Bin::And, false),
        _ => return None,
    })
}

fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Seto | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
    )
}

fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
    )
}

struct Cx<'a, M: ?Sized> {
    r: Regs,
    mem: &'a mut M,
    insn: &'a Instruction,
    bytes: &'a [u8; MAX_INSN_LEN],
}

type Res<T> = Result<T, Error>;

impl<M: Memory + ?Sized> Cx<'_, M> {
    fn unsupported(&self) -> Error {
        Error::Unsupported { rip: self.r.rip, bytes: *self.bytes, len: self.insn.len() as u8 }
    }

    fn fault(&self, fault: Fault) -> Error {
        Error::Fault { rip: self.r.rip, fault }
    }

    fn get_reg(&self, reg: Register) -> Res<u64> {
        let (i, w, high) = reg_slot(reg).ok_or_else(|| self.unsupported())?;
        let v = self.r.gpr[i];
        Ok(if high { (v >> 8) & 0xff } else { v & mask(w) })
    }

    fn set_reg(&mut self, reg: Register, v: u64) -> Res<()> {
        let (i, w, high) = reg_slot(reg).ok_or_else(|| self.unsupported())?;
        let old = self.r.gpr[i];
        self.r.gpr[i] = match (w, high) {
            (1, true) => (old & !0xff00) | ((v & 0xff) << 8),
            (1, false) => (old & !0xff) | (v & 0xff),
            (2, _) => (old & !0xffff) | (v & 0xffff),
            (4, _) => v & 0xffff_ffff,
            _ => v,
        };
        Ok(())
    }

    fn seg_base(&self, seg: Register) -> u64 {
        match seg {
            Register::FS => self.r.fs_base,
            Register::GS => self.r.gs_base,
            _ => 0,
        }
    }

    /// Linear address of the instruction's (single, ModRM/moffs) memory
    /// operand. Wrapping arithmetic on purpose: addresses are modulo 2^64.
    fn ea(&self) -> Res<u64> {
        let insn = self.insn;
        let base = insn.memory_base();
        let offset = if base == Register::RIP || base == Register::EIP {
            insn.ip_rel_memory_address()
        } else {
            let index = insn.memory_index();
            let mut a = insn.memory_displacement64();
            let mut addr32 = false;
            if base != Register::None {
                a = a.wrapping_add(self.get_reg(base)?);
                addr32 |= base.is_gpr32();
            }
            if index != Register::None {
                let scale = u64::from(insn.memory_index_scale());
                a = a.wrapping_add(self.get_reg(index)?.wrapping_mul(scale));
                addr32 |= index.is_gpr32();
            }
            if addr32 { a & 0xffff_ffff } else { a }
        };
        Ok(self.seg_base(insn.memory_segment()).wrapping_add(offset))
    }

    fn read_mem(&mut self, addr: u64, w: u8) -> Res<u64> {
        let mut b = [0u8; 8];
        self.mem.read(addr, &mut b[..usize::from(w)]).map_err(Error::Memory)?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_mem(&mut self, addr: u64, w: u8, v: u64) -> Res<()> {
        let b = v.to_le_bytes();
        self.mem.write(addr, &b[..usize::from(w)]).map_err(Error::Memory)
    }

    /// Width in bytes of operand `i` (register or memory).
    fn width(&self, i: u32) -> Res<u8> {
        let w = match self.insn.op_kind(i) {
            OpKind::Register => reg_slot(self.insn.op_register(i)).map(|s| s.1),
            OpKind::Memory => match self.insn.memory_size().size() {
                s @ (1 | 2 | 4 | 8) => Some(s as u8),
                _ => None,
            },
            _ => None,
        };
        w.ok_or_else(|| self.unsupported())
    }

    fn read_op(&mut self, i: u32, w: u8) -> Res<u64> {
        let insn = self.insn;
        let v = match insn.op_kind(i) {
            OpKind::Register => self.get_reg(insn.op_register(i))?,
            OpKind::Memory => {
                let a = self.ea()?;
                self.read_mem(a, w)?
            }
            OpKind::Immediate8 => u64::from(insn.immediate8()),
            OpKind::Immediate16 => u64::from(insn.immediate16()),
            OpKind::Immediate32 => u64::from(insn.immediate32()),
            OpKind::Immediate64 => insn.immediate64(),
            OpKind::Immediate8to16 => insn.immediate8to16() as u64,
            OpKind::Immediate8to32 => insn.immediate8to32() as u64,
            OpKind::Immediate8to64 => insn.immediate8to64() as u64,
            OpKind::Immediate32to64 => insn.immediate32to64() as u64,
            _ => return Err(self.unsupported()),
        };
        Ok(v & mask(w))
    }

    fn write_op(&mut self, i: u32, w: u8, v: u64) -> Res<()> {
        match self.insn.op_kind(i) {
            OpKind::Register => self.set_reg(self.insn.op_register(i), v),
            OpKind::Memory => {
                let a = self.ea()?;
                self.write_mem(a, w, v)
            }
            _ => Err(self.unsupported()),
        }
    }

    fn set_flags(&mut self, f: u64) {
        self.r.rflags = (self.r.rflags & !STATUS) | (f & STATUS);
    }

    /// Read-modify-write of `w` bytes at `addr`: `f` maps the old value to
    /// the new one (None: nothing to store). Locked: compare-exchange and
    /// retry while memory changed under us.
    fn rmw(&mut self, addr: u64, w: u8, locked: bool, mut f: impl FnMut(&mut Self, u64) -> Option<u64>) -> Res<()> {
        let n = usize::from(w);
        for _ in 0..LOCK_RETRIES {
            let old = self.read_mem(addr, w)?;
            let Some(new) = f(self, old) else { return Ok(()) };
            if !locked {
                return self.write_mem(addr, w, new);
            }
            let (ob, nb) = (old.to_le_bytes(), new.to_le_bytes());
            if self.mem.compare_exchange(addr, &ob[..n], &nb[..n]).map_err(Error::Memory)? {
                return Ok(());
            }
        }
        Err(Error::LockContention { addr })
    }

    fn exec(&mut self) -> Res<()> {
        let insn = self.insn;
        let m = insn.mnemonic();
        let count = insn.op_count();
        let has_mem = (0..count).any(|i| insn.op_kind(i) == OpKind::Memory);
        if !has_mem {
            return Err(if insn.has_lock_prefix() { self.fault(Fault::InvalidOpcode) } else { self.unsupported() });
        }
        let mem_dst = count >= 1 && insn.op_kind(0) == OpKind::Memory;
        let locked = insn.has_lock_prefix();
        if locked && !(mem_dst && lockable(m)) {
            return Err(self.fault(Fault::InvalidOpcode));
        }
        if let Some((op, store)) = alu_of(m) {
            if count != 2 {
                return Err(self.unsupported());
            }
            let w = self.width(0)?;
            let b = self.read_op(1, w)?;
            if mem_dst {
                let addr = self.ea()?;
                let mut flags = 0;
                let rf = self.r.rflags;
                self.rmw(addr, w, locked, |_, a| {
                    let (r, f) = alu::bin(op, w, a, b, rf);
                    flags = f;
                    store.then_some(r)
                })?;
                self.set_flags(flags);
            } else {
                let a = self.read_op(0, w)?;
                let (r, f) = alu::bin(op, w, a, b, self.r.rflags);
                if store {
                    self.write_op(0, w, r)?;
                }
                self.set_flags(f);
            }
            return Ok(());
        }
        match m {
            Mnemonic::Mov if count == 2 => {
                let w = self.width(0)?;
                let v = self.read_op(1, w)?;
                self.write_op(0, w, v)
            }
            Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd if count == 2 => {
                let (wd, ws) = (self.width(0)?, self.width(1)?);
                let mut v = self.read_op(1, ws)?;
                if m != Mnemonic::Movzx && ws < 8 {
                    let sh = 64 - 8 * u32::from(ws);
                    v = (((v << sh) as i64) >> sh) as u64;
                }
                self.write_op(0, wd, v & mask(wd))
            }
            Mnemonic::Neg | Mnemonic::Not | Mnemonic::Inc | Mnemonic::Dec if count == 1 && mem_dst => {
                let w = self.width(0)?;
                let addr = self.ea()?;
                let rf = self.r.rflags;
                let mut flags = None;
                self.rmw(addr, w, locked, |_, a| {
                    Some(match m {
                        Mnemonic::Not => !a & mask(w),
                        _ => {
                            let op = match m {
                                Mnemonic::Neg => Un::Neg,
                                Mnemonic::Inc => Un::Inc,
                                _ => Un::Dec,
                            };
                            let (r, f) = alu::un(op, w, a, rf);
                            flags = Some(f);
                            r
                        }
                    })
                })?;
                if let Some(f) = flags {
                    self.set_flags(f);
                }
                Ok(())
            }
            Mnemonic::Xchg if count == 2 => {
                // Either operand order; XCHG with memory is always locked.
                let ri = if mem_dst { 1 } else { 0 };
                if insn.op_kind(ri) != OpKind::Register {
                    return Err(self.unsupported());
                }
                let w = self.width(ri)?;
                let reg = insn.op_register(ri);
                let v = self.get_reg(reg)?;
                let addr = self.ea()?;
                let mut old = 0;
                self.rmw(addr, w, true, |_, a| {
                    old = a;
                    Some(v)
                })?;
                self.set_reg(reg, old)
            }
            Mnemonic::Cmpxchg if count == 2 && mem_dst => {
                let w = self.width(1)?;
                let src = self.read_op(1, w)?;
                let acc_reg = [Register::None, Register::AL, Register::AX, Register::None, Register::EAX]
                    .get(usize::from(w))
                    .copied()
                    .unwrap_or(Register::RAX);
                let acc = self.get_reg(acc_reg)?;
                let addr = self.ea()?;
                let rf = self.r.rflags;
                let (mut flags, mut old) = (0, 0);
                self.rmw(addr, w, locked, |_, d| {
                    let (_, f) = alu::bin(Bin::Sub, w, acc, d, rf);
                    flags = f;
                    old = d;
                    (d == acc).then_some(src)
                })?;
                self.set_flags(flags);
                if old != acc {
                    self.set_reg(acc_reg, old)?;
                }
                Ok(())
            }
            Mnemonic::Xadd if count == 2 && mem_dst => {
                let w = self.width(1)?;
                let src = self.read_op(1, w)?;
                let addr = self.ea()?;
                let rf = self.r.rflags;
                let (mut flags, mut old) = (0, 0);
                self.rmw(addr, w, locked, |_, d| {
                    let (r, f) = alu::bin(Bin::Add, w, d, src, rf);
                    flags = f;
                    old = d;
                    Some(r)
                })?;
                self.set_flags(flags);
                self.set_reg(insn.op_register(1), old)
            }
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc if count == 2 && mem_dst => {
                let w = self.width(0)?;
                let bits = 8 * u32::from(w);
                let mut addr = self.ea()?;
                let bit = if insn.op_kind(1) == OpKind::Register {
                    // Bit-string addressing: the signed offset selects the
                    // operand-sized word at ea + w * (offset >> log2(bits)).
                    let raw = self.get_reg(insn.op_register(1))?;
                    let sh = 64 - bits;
                    let off = ((raw << sh) as i64) >> sh;
                    let word = off >> bits.trailing_zeros();
                    addr = addr.wrapping_add((word as u64).wrapping_mul(u64::from(w)));
                    (off as u64) & u64::from(bits - 1)
                } else {
                    self.read_op(1, 1)? & u64::from(bits - 1)
                };
                let op = match m {
                    Mnemonic::Bt => Bin::Bt,
                    Mnemonic::Bts => Bin::Bts,
                    Mnemonic::Btr => Bin::Btr,
                    _ => Bin::Btc,
                };
                let rf = self.r.rflags;
                let mut flags = 0;
                self.rmw(addr, w, locked, |_, a| {
                    let (r, f) = alu::bin(op, w, a, bit, rf);
                    flags = f;
                    (op != Bin::Bt).then_some(r)
                })?;
                self.set_flags(flags);
                Ok(())
            }
            _ if is_setcc(m) && count == 1 && mem_dst => {
                let v = u64::from(cond(insn.condition_code(), self.r.rflags));
                self.write_op(0, 1, v)
            }
            _ if is_cmovcc(m) && count == 2 => {
                let w = self.width(0)?;
                let v = self.read_op(1, w)?;
                if cond(insn.condition_code(), self.r.rflags) {
                    self.write_op(0, w, v)
                } else if w == 4 {
                    // 32-bit destination is zero-extended even when false.
                    let cur = self.get_reg(insn.op_register(0))?;
                    self.write_op(0, w, cur)
                } else {
                    Ok(())
                }
            }
            Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
                if count == 2 && mem_dst =>
            {
                let w = self.width(0)?;
                let c = self.read_op(1, 1)? as u8;
                let op = match m {
                    Mnemonic::Rol => Sh::Rol,
                    Mnemonic::Ror => Sh::Ror,
                    Mnemonic::Rcl => Sh::Rcl,
                    Mnemonic::Rcr => Sh::Rcr,
                    Mnemonic::Shl | Mnemonic::Sal => Sh::Shl,
                    Mnemonic::Shr => Sh::Shr,
                    _ => Sh::Sar,
                };
                let addr = self.ea()?;
                let rf = self.r.rflags;
                let mut flags = 0;
                self.rmw(addr, w, false, |_, a| {
                    let (r, f) = alu::shift(op, w, a, c, rf);
                    flags = f;
                    Some(r)
                })?;
                self.set_flags(flags);
                Ok(())
            }
            Mnemonic::Shld | Mnemonic::Shrd if count == 3 && mem_dst => {
                let w = self.width(0)?;
                let b = self.read_op(1, w)?;
                let c = self.read_op(2, 1)? as u8;
                let addr = self.ea()?;
                let rf = self.r.rflags;
                let mut flags = 0;
                self.rmw(addr, w, false, |_, a| {
                    let (r, f) = alu::double_shift(m == Mnemonic::Shld, w, a, b, c, rf);
                    flags = f;
                    Some(r)
                })?;
                self.set_flags(flags);
                Ok(())
            }
            Mnemonic::Imul if count == 2 || count == 3 => {
                let w = self.width(0)?;
                let (a, b) = if count == 2 {
                    (self.read_op(0, w)?, self.read_op(1, w)?)
                } else {
                    (self.read_op(1, w)?, self.read_op(2, w)?)
                };
                let (r, f) = alu::imul2(w, a, b, self.r.rflags);
                self.write_op(0, w, r)?;
                self.set_flags(f);
                Ok(())
            }
            Mnemonic::Mul | Mnemonic::Imul | Mnemonic::Div | Mnemonic::Idiv if count == 1 && mem_dst => {
                let w = self.width(0)?;
                let b = self.read_op(0, w)?;
                let (rax, rdx, rf) = (self.r.gpr[gpr::RAX], self.r.gpr[gpr::RDX], self.r.rflags);
                let (rax, rdx, f) = match m {
                    Mnemonic::Mul => alu::mul1(false, w, rax, rdx, b, rf),
                    Mnemonic::Imul => alu::mul1(true, w, rax, rdx, b, rf),
                    _ => alu::div1(m == Mnemonic::Idiv, w, rax, rdx, b, rf)
                        .ok_or_else(|| self.fault(Fault::DivideError))?,
                };
                self.r.gpr[gpr::RAX] = rax;
                self.r.gpr[gpr::RDX] = rdx;
                self.set_flags(f);
                Ok(())
            }
            Mnemonic::Movnti if count == 2 && mem_dst => {
                let w = self.width(0)?;
                let v = self.read_op(1, w)?;
                self.write_op(0, w, v)
            }
            Mnemonic::Movbe if count == 2 => {
                let w = self.width(0)?;
                let v = self.read_op(1, w)?.swap_bytes() >> (64 - 8 * u32::from(w));
                self.write_op(0, w, v)
            }
            Mnemonic::Bsf | Mnemonic::Bsr if count == 2 && !mem_dst => {
                let w = self.width(0)?;
                let src = self.read_op(1, w)?;
                let (i, _, _) = reg_slot(insn.op_register(0)).ok_or_else(|| self.unsupported())?;
                let (v, f) = alu::bit_scan(m == Mnemonic::Bsr, w, self.r.gpr[i], src, self.r.rflags);
                self.r.gpr[i] = v;
                self.set_flags(f);
                Ok(())
            }
            Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b if count == 1 && mem_dst => self.cmpxchg_wide(locked),
            Mnemonic::Push if count == 1 && mem_dst => {
                let w = self.width(0)?;
                let v = self.read_op(0, w)?;
                let rsp = self.r.gpr[gpr::RSP].wrapping_sub(u64::from(w));
                self.write_mem(rsp, w, v)?;
                self.r.gpr[gpr::RSP] = rsp;
                Ok(())
            }
            Mnemonic::Pop if count == 1 && mem_dst => {
                let w = self.width(0)?;
                let rsp = self.r.gpr[gpr::RSP];
                let v = self.read_mem(rsp, w)?;
                // The destination address uses the incremented RSP.
                self.r.gpr[gpr::RSP] = rsp.wrapping_add(u64::from(w));
                self.write_op(0, w, v)
            }
            _ => Err(self.unsupported()),
        }
    }

    /// CMPXCHG8B / CMPXCHG16B: compare EDX:EAX (RDX:RAX) with the memory
    /// operand; equal: ZF=1 and store ECX:EBX (RCX:RBX); else ZF=0 and load
    /// the operand into EDX:EAX (RDX:RAX). Only ZF changes.
    fn cmpxchg_wide(&mut self, locked: bool) -> Res<()> {
        let wide = self.insn.mnemonic() == Mnemonic::Cmpxchg16b;
        let (n, half) = if wide { (16usize, 8u8) } else { (8, 4) };
        let addr = self.ea()?;
        if wide && addr % 16 != 0 {
            return Err(self.fault(Fault::GeneralProtection));
        }
        let m = u128::from(mask(half));
        let sh = 8 * u32::from(half);
        let g = |i: usize| u128::from(self.r.gpr[i]) & m;
        let expected = (g(gpr::RDX) << sh) | g(gpr::RAX);
        let new = (g(gpr::RCX) << sh) | g(gpr::RBX);
        for _ in 0..LOCK_RETRIES {
            let mut b = [0u8; 16];
            self.mem.read(addr, &mut b[..n]).map_err(Error::Memory)?;
            let old = u128::from_le_bytes(b);
            if old != expected {
                self.r.rflags &= !super::FLAG_ZF;
                // 32-bit halves are register writes: zero-extended.
                self.r.gpr[gpr::RAX] = (old & m) as u64;
                self.r.gpr[gpr::RDX] = ((old >> sh) & m) as u64;
                return Ok(());
            }
            let nb = new.to_le_bytes();
            let stored = if locked {
                self.mem.compare_exchange(addr, &b[..n], &nb[..n]).map_err(Error::Memory)?
            } else {
                self.mem.write(addr, &nb[..n]).map_err(Error::Memory)?;
                true
            };
            if stored {
                self.r.rflags |= super::FLAG_ZF;
                return Ok(());
            }
        }
        Err(Error::LockContention { addr })
    }

    /// One string instruction; returns (complete, iterations).
    fn string(&mut self, kind: Str, w: u8) -> Res<(bool, u64)> {
        let insn = self.insn;
        if insn.has_lock_prefix() {
            return Err(self.fault(Fault::InvalidOpcode));
        }
        let a32 = (0..insn.op_count()).any(|i| matches!(insn.op_kind(i), OpKind::MemorySegESI | OpKind::MemoryESEDI));
        let amask = if a32 { 0xffff_ffff } else { !0u64 };
        let compares = matches!(kind, Str::Cmps | Str::Scas);
        let (repe, repne) = if compares {
            (insn.has_repe_prefix(), insn.has_repne_prefix())
        } else {
            (insn.has_rep_prefix() || insn.has_repne_prefix(), false)
        };
        let rep = repe || repne;
        let step = if self.r.rflags & FLAG_DF != 0 { u64::from(w).wrapping_neg() } else { u64::from(w) };
        let src_base = self.seg_base(insn.memory_segment());
        let acc = self.r.gpr[gpr::RAX] & mask(w);
        let mut iterations = 0u64;
        loop {
            let count = self.r.gpr[gpr::RCX] & amask;
            if rep {
                if count == 0 {
                    return Ok((true, iterations));
                }
                if iterations == MAX_REP_ITERATIONS {
                    return Ok((false, iterations));
                }
            }
            let rsi = self.r.gpr[gpr::RSI] & amask;
            let rdi = self.r.gpr[gpr::RDI] & amask;
            let next = |v: u64| v.wrapping_add(step) & amask;
            let mut flags = None;
            match kind {
                Str::Movs => {
                    let v = self.read_mem(src_base.wrapping_add(rsi), w)?;
                    self.write_mem(rdi, w, v)?;
                    self.r.gpr[gpr::RSI] = next(rsi);
                    self.r.gpr[gpr::RDI] = next(rdi);
                }
                Str::Stos => {
                    self.write_mem(rdi, w, acc)?;
                    self.r.gpr[gpr::RDI] = next(rdi);
                }
                Str::Lods => {
                    let v = self.read_mem(src_base.wrapping_add(rsi), w)?;
                    let reg = [Register::None, Register::AL, Register::AX, Register::None, Register::EAX]
                        .get(usize::from(w))
                        .copied()
                        .unwrap_or(Register::RAX);
                    self.set_reg(reg, v)?;
                    self.r.gpr[gpr::RSI] = next(rsi);
                }
                Str::Cmps => {
                    let a = self.read_mem(src_base.wrapping_add(rsi), w)?;
                    let b = self.read_mem(rdi, w)?;
                    flags = Some(alu::bin(Bin::Sub, w, a, b, self.r.rflags).1);
                    self.r.gpr[gpr::RSI] = next(rsi);
                    self.r.gpr[gpr::RDI] = next(rdi);
                }
                Str::Scas => {
                    let b = self.read_mem(rdi, w)?;
                    flags = Some(alu::bin(Bin::Sub, w, acc, b, self.r.rflags).1);
                    self.r.gpr[gpr::RDI] = next(rdi);
                }
            }
            if let Some(f) = flags {
                self.set_flags(f);
            }
            iterations += 1;
            if !rep {
                return Ok((true, iterations));
            }
            self.r.gpr[gpr::RCX] = count.wrapping_sub(1) & amask;
            if let Some(f) = flags {
                let zf = f & super::FLAG_ZF != 0;
                if (repe && !zf) || (repne && zf) {
                    return Ok((true, iterations));
                }
            }
        }
    }
}
