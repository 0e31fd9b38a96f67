//! Seeded generator of differential test cases for [`super::emulate`].
//!
//! For every supported memory form ([`FORMS`]) it draws random operands,
//! widths, addressing modes (base, base+index*scale, disp8/disp32,
//! RIP-relative, moffs, address-size 67 when the pages lie below 4 GiB, FS/GS
//! overrides), LOCK where legal, REP/REPE/REPNE, DF, the status flags and
//! register values, and encodes the instruction with iced's `Encoder`.
//!
//! Each [`Case`] holds the instruction bytes (to be placed at
//! [`Layout::code`]), the initial [`Regs`], and the initial contents of the
//! two consecutive data pages at [`Layout::data`] and of the stack page at
//! [`Layout::stack`]. Every access of the case lands in those pages (data
//! operands sometimes straddle the boundary between the two data pages on
//! purpose); RSP always points into the stack page. Nothing in a case is
//! privileged: a CPL-3 64-bit guest (or a host process) can execute it, so
//! the same case can run natively on RAM and emulated on MMIO and the
//! results be compared (GPRs, RFLAGS masked to [`super::FLAGS_ARITH`],
//! RIP = code + len, the pages). MOVBE forms need CPUID.MOVBE and
//! CMPXCHG16B needs CX16 on the CPU that runs them natively; skip those
//! forms where it lacks them.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register, RepPrefixKind};

use super::{PAGE_SIZE, Regs, alu::STATUS, gpr};

/// Where a case's code, data and stack live (linear addresses).
///
/// The code page, the two data pages and the stack page must not overlap.
/// RIP-relative operands are drawn only when the data pages lie within
/// 1 GiB of `code`, RSP-based ones only within 2 GiB of the stack page,
/// and address-size (67) forms only when the data pages end below 4 GiB;
/// otherwise those draws are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// RIP of the instruction (RIP-relative operands are computed from it).
    pub code: u64,
    /// First of two consecutive, page-aligned data pages.
    pub data: u64,
    /// One page-aligned stack page.
    pub stack: u64,
    /// FS base the case runs with (FS-overridden operands account for it).
    pub fs_base: u64,
    /// GS base the case runs with.
    pub gs_base: u64,
}

/// Which string instruction a [`Shape::Str`] form is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrOp {
    /// MOVS.
    Movs,
    /// STOS.
    Stos,
    /// LODS.
    Lods,
    /// CMPS.
    Cmps,
    /// SCAS.
    Scas,
}

/// Operand shape of a form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `op m, r`.
    MemReg,
    /// `op r, m`.
    RegMem,
    /// `op m, imm`.
    MemImm,
    /// `op m`.
    Mem,
    /// `bt* m, r`: bit-string addressing.
    BtReg,
    /// `mov acc, moffs`.
    LoadMoffs,
    /// `mov moffs, acc`.
    StoreMoffs,
    /// `push m`.
    Push,
    /// `pop m`.
    Pop,
    /// A string instruction.
    Str(StrOp),
    /// `shift m, 1`.
    ShiftOne,
    /// `shift m, cl`.
    ShiftCl,
    /// `shld/shrd m, r, imm8`.
    DShImm,
    /// `shld/shrd m, r, cl`.
    DShCl,
    /// `imul r, m, imm`.
    RegMemImm,
    /// `mul/imul/div/idiv m` (DIV operands are drawn so as not to fault).
    MulDiv,
}

/// One instruction form the generator produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Form {
    /// The iced code.
    pub code: Code,
    /// Operand shape.
    pub shape: Shape,
    /// Register operand width in bytes (0: none).
    pub reg_w: u8,
    /// Memory operand width in bytes.
    pub mem_w: u8,
    /// Immediate width in bytes (0: none).
    pub imm_w: u8,
    /// Whether LOCK is legal.
    pub lockable: bool,
}

/// Every form the generator covers.
pub const FORMS: &[Form] = &[
    Form { code: Code::Add_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Add_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Add_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Add_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Add_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Add_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Add_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Add_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Add_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Add_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Add_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Add_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Add_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Add_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Add_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Or_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Or_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Or_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Or_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Or_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Or_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Or_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Or_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Or_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Or_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Or_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Or_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Or_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Or_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Or_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Adc_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Adc_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Adc_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Adc_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Adc_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Adc_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Adc_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Adc_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Adc_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Adc_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Adc_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Adc_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Adc_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Adc_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Adc_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Sbb_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Sbb_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Sbb_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Sbb_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Sbb_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Sbb_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Sbb_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Sbb_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sbb_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Sbb_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Sbb_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Sbb_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Sbb_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Sbb_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Sbb_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::And_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::And_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::And_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::And_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::And_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::And_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::And_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::And_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::And_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::And_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::And_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::And_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::And_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::And_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::And_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Sub_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Sub_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Sub_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Sub_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Sub_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Sub_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Sub_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Sub_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sub_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Sub_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Sub_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Sub_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Sub_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Sub_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Sub_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Xor_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Xor_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Xor_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Xor_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Xor_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Xor_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Xor_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Xor_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Xor_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: true },
    Form { code: Code::Xor_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: true },
    Form { code: Code::Xor_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: true },
    Form { code: Code::Xor_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: true },
    Form { code: Code::Xor_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Xor_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Xor_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Cmp_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Cmp_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Cmp_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: false },
    Form { code: Code::Cmp_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: false },
    Form { code: Code::Cmp_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: false },
    Form { code: Code::Cmp_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Cmp_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Cmp_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Test_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Test_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Test_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Test_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Test_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Test_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: false },
    Form { code: Code::Test_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: false },
    Form { code: Code::Test_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: false },
    Form { code: Code::Mov_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Mov_r8_rm8, shape: Shape::RegMem, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Mov_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Mov_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Mov_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Mov_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Mov_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Mov_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Mov_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Mov_rm16_imm16, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 2, lockable: false },
    Form { code: Code::Mov_rm32_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 4, lockable: false },
    Form { code: Code::Mov_rm64_imm32, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 4, lockable: false },
    Form { code: Code::Mov_AL_moffs8, shape: Shape::LoadMoffs, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Mov_moffs8_AL, shape: Shape::StoreMoffs, reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Mov_AX_moffs16, shape: Shape::LoadMoffs, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Mov_moffs16_AX, shape: Shape::StoreMoffs, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Mov_EAX_moffs32, shape: Shape::LoadMoffs, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Mov_moffs32_EAX, shape: Shape::StoreMoffs, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Mov_RAX_moffs64, shape: Shape::LoadMoffs, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Mov_moffs64_RAX, shape: Shape::StoreMoffs, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r16_rm8, shape: Shape::RegMem, reg_w: 2, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r32_rm8, shape: Shape::RegMem, reg_w: 4, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r64_rm8, shape: Shape::RegMem, reg_w: 8, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r32_rm16, shape: Shape::RegMem, reg_w: 4, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movzx_r64_rm16, shape: Shape::RegMem, reg_w: 8, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r16_rm8, shape: Shape::RegMem, reg_w: 2, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r32_rm8, shape: Shape::RegMem, reg_w: 4, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r64_rm8, shape: Shape::RegMem, reg_w: 8, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r32_rm16, shape: Shape::RegMem, reg_w: 4, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsx_r64_rm16, shape: Shape::RegMem, reg_w: 8, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsxd_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsxd_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Movsxd_r64_rm32, shape: Shape::RegMem, reg_w: 8, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Neg_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Neg_rm16, shape: Shape::Mem, reg_w: 0, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Neg_rm32, shape: Shape::Mem, reg_w: 0, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Neg_rm64, shape: Shape::Mem, reg_w: 0, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Not_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Not_rm16, shape: Shape::Mem, reg_w: 0, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Not_rm32, shape: Shape::Mem, reg_w: 0, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Not_rm64, shape: Shape::Mem, reg_w: 0, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Inc_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Inc_rm16, shape: Shape::Mem, reg_w: 0, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Inc_rm32, shape: Shape::Mem, reg_w: 0, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Inc_rm64, shape: Shape::Mem, reg_w: 0, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Dec_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Dec_rm16, shape: Shape::Mem, reg_w: 0, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Dec_rm32, shape: Shape::Mem, reg_w: 0, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Dec_rm64, shape: Shape::Mem, reg_w: 0, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Xchg_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Xchg_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Xchg_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Xchg_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Cmpxchg_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Cmpxchg_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Cmpxchg_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Cmpxchg_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Xadd_rm8_r8, shape: Shape::MemReg, reg_w: 1, mem_w: 1, imm_w: 0, lockable: true },
    Form { code: Code::Xadd_rm16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Xadd_rm32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Xadd_rm64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Bt_rm16_r16, shape: Shape::BtReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Bt_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Bt_rm32_r32, shape: Shape::BtReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Bt_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Bt_rm64_r64, shape: Shape::BtReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Bt_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Bts_rm16_r16, shape: Shape::BtReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Bts_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Bts_rm32_r32, shape: Shape::BtReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Bts_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Bts_rm64_r64, shape: Shape::BtReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Bts_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Btr_rm16_r16, shape: Shape::BtReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Btr_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Btr_rm32_r32, shape: Shape::BtReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Btr_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Btr_rm64_r64, shape: Shape::BtReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Btr_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Btc_rm16_r16, shape: Shape::BtReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: true },
    Form { code: Code::Btc_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: true },
    Form { code: Code::Btc_rm32_r32, shape: Shape::BtReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: true },
    Form { code: Code::Btc_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: true },
    Form { code: Code::Btc_rm64_r64, shape: Shape::BtReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Btc_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: true },
    Form { code: Code::Seto_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovo_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovo_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovo_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setno_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovno_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovno_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovno_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setb_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovb_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovb_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovb_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setae_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovae_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovae_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovae_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sete_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmove_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmove_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmove_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setne_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovne_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovne_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovne_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setbe_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovbe_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovbe_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovbe_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Seta_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmova_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmova_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmova_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sets_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovs_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovs_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovs_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setns_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovns_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovns_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovns_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setp_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovp_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovp_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovp_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setnp_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovnp_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovnp_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovnp_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setl_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovl_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovl_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovl_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setge_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovge_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovge_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovge_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setle_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovle_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovle_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovle_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Setg_rm8, shape: Shape::Mem, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmovg_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmovg_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmovg_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Push_rm16, shape: Shape::Push, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Push_rm64, shape: Shape::Push, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Pop_rm16, shape: Shape::Pop, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Pop_rm64, shape: Shape::Pop, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Movsb_m8_m8, shape: Shape::Str(StrOp::Movs), reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Movsw_m16_m16, shape: Shape::Str(StrOp::Movs), reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movsd_m32_m32, shape: Shape::Str(StrOp::Movs), reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Movsq_m64_m64, shape: Shape::Str(StrOp::Movs), reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Stosb_m8_AL, shape: Shape::Str(StrOp::Stos), reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Stosw_m16_AX, shape: Shape::Str(StrOp::Stos), reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Stosd_m32_EAX, shape: Shape::Str(StrOp::Stos), reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Stosq_m64_RAX, shape: Shape::Str(StrOp::Stos), reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Lodsb_AL_m8, shape: Shape::Str(StrOp::Lods), reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Lodsw_AX_m16, shape: Shape::Str(StrOp::Lods), reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Lodsd_EAX_m32, shape: Shape::Str(StrOp::Lods), reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Lodsq_RAX_m64, shape: Shape::Str(StrOp::Lods), reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Cmpsb_m8_m8, shape: Shape::Str(StrOp::Cmps), reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Cmpsw_m16_m16, shape: Shape::Str(StrOp::Cmps), reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Cmpsd_m32_m32, shape: Shape::Str(StrOp::Cmps), reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Cmpsq_m64_m64, shape: Shape::Str(StrOp::Cmps), reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Scasb_AL_m8, shape: Shape::Str(StrOp::Scas), reg_w: 1, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Scasw_AX_m16, shape: Shape::Str(StrOp::Scas), reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Scasd_EAX_m32, shape: Shape::Str(StrOp::Scas), reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Scasq_RAX_m64, shape: Shape::Str(StrOp::Scas), reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Rol_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Rol_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Rol_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rol_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Ror_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Ror_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Ror_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Ror_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Ror_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Rcl_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Rcl_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Rcl_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Rcl_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rcl_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Rcr_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Rcr_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Rcr_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Rcr_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Rcr_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Shl_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Shl_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Shl_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Shl_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Shl_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Shr_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Shr_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Shr_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Shr_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Shr_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Sar_rm8_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm8_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm8_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 1, imm_w: 1, lockable: false },
    Form { code: Code::Sar_rm16_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm16_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm16_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Sar_rm32_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm32_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm32_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Sar_rm64_1, shape: Shape::ShiftOne, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm64_CL, shape: Shape::ShiftCl, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Sar_rm64_imm8, shape: Shape::MemImm, reg_w: 0, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Shld_rm16_r16_imm8, shape: Shape::DShImm, reg_w: 2, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Shld_rm16_r16_CL, shape: Shape::DShCl, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shld_rm32_r32_imm8, shape: Shape::DShImm, reg_w: 4, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Shld_rm32_r32_CL, shape: Shape::DShCl, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shld_rm64_r64_imm8, shape: Shape::DShImm, reg_w: 8, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Shld_rm64_r64_CL, shape: Shape::DShCl, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Shrd_rm16_r16_imm8, shape: Shape::DShImm, reg_w: 2, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Shrd_rm16_r16_CL, shape: Shape::DShCl, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Shrd_rm32_r32_imm8, shape: Shape::DShImm, reg_w: 4, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Shrd_rm32_r32_CL, shape: Shape::DShCl, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Shrd_rm64_r64_imm8, shape: Shape::DShImm, reg_w: 8, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Shrd_rm64_r64_CL, shape: Shape::DShCl, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Imul_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Imul_r16_rm16_imm8, shape: Shape::RegMemImm, reg_w: 2, mem_w: 2, imm_w: 1, lockable: false },
    Form { code: Code::Imul_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Imul_r32_rm32_imm8, shape: Shape::RegMemImm, reg_w: 4, mem_w: 4, imm_w: 1, lockable: false },
    Form { code: Code::Imul_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Imul_r64_rm64_imm8, shape: Shape::RegMemImm, reg_w: 8, mem_w: 8, imm_w: 1, lockable: false },
    Form { code: Code::Imul_r16_rm16_imm16, shape: Shape::RegMemImm, reg_w: 2, mem_w: 2, imm_w: 2, lockable: false },
    Form { code: Code::Imul_r32_rm32_imm32, shape: Shape::RegMemImm, reg_w: 4, mem_w: 4, imm_w: 4, lockable: false },
    Form { code: Code::Imul_r64_rm64_imm32, shape: Shape::RegMemImm, reg_w: 8, mem_w: 8, imm_w: 4, lockable: false },
    Form { code: Code::Mul_rm8, shape: Shape::MulDiv, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Mul_rm16, shape: Shape::MulDiv, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Mul_rm32, shape: Shape::MulDiv, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Mul_rm64, shape: Shape::MulDiv, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Imul_rm8, shape: Shape::MulDiv, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Imul_rm16, shape: Shape::MulDiv, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Imul_rm32, shape: Shape::MulDiv, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Imul_rm64, shape: Shape::MulDiv, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Div_rm8, shape: Shape::MulDiv, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Div_rm16, shape: Shape::MulDiv, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Div_rm32, shape: Shape::MulDiv, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Div_rm64, shape: Shape::MulDiv, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Idiv_rm8, shape: Shape::MulDiv, reg_w: 0, mem_w: 1, imm_w: 0, lockable: false },
    Form { code: Code::Idiv_rm16, shape: Shape::MulDiv, reg_w: 0, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Idiv_rm32, shape: Shape::MulDiv, reg_w: 0, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Idiv_rm64, shape: Shape::MulDiv, reg_w: 0, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Movnti_m32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Movnti_m64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_r16_m16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_r32_m32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_r64_m64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_m16_r16, shape: Shape::MemReg, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_m32_r32, shape: Shape::MemReg, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Movbe_m64_r64, shape: Shape::MemReg, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Bsf_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Bsf_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Bsf_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Bsr_r16_rm16, shape: Shape::RegMem, reg_w: 2, mem_w: 2, imm_w: 0, lockable: false },
    Form { code: Code::Bsr_r32_rm32, shape: Shape::RegMem, reg_w: 4, mem_w: 4, imm_w: 0, lockable: false },
    Form { code: Code::Bsr_r64_rm64, shape: Shape::RegMem, reg_w: 8, mem_w: 8, imm_w: 0, lockable: false },
    Form { code: Code::Cmpxchg8b_m64, shape: Shape::Mem, reg_w: 0, mem_w: 8, imm_w: 0, lockable: true },
    Form { code: Code::Cmpxchg16b_m128, shape: Shape::Mem, reg_w: 0, mem_w: 16, imm_w: 0, lockable: true },
];

/// A generated case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The form it instantiates.
    pub form: Form,
    /// Instruction bytes, to be placed at [`Layout::code`].
    pub bytes: Vec<u8>,
    /// Initial registers (`rip` = [`Layout::code`]).
    pub regs: Regs,
    /// Initial contents of the two data pages (8 KiB).
    pub data: Vec<u8>,
    /// Initial contents of the stack page (4 KiB).
    pub stack: Vec<u8>,
}

/// The generator: a seeded SplitMix64 stream and a [`Layout`].
#[derive(Clone, Debug)]
pub struct Generator {
    state: u64,
    layout: Layout,
}

const DATA_LEN: u64 = 2 * PAGE_SIZE;
const RSP_IDX: usize = gpr::RSP;

fn gpr_reg(w: u8, i: usize) -> Register {
    let base = match w {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    let i = if w == 1 && i >= 4 { i + 4 } else { i };
    Register::values().nth(base as usize + i).unwrap_or(Register::None)
}

impl Generator {
    /// A generator for `layout` seeded with `seed`.
    pub fn new(seed: u64, layout: Layout) -> Self {
        Generator { state: seed, layout }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    /// An "interesting" 64-bit value: edges, small, sign boundaries, random.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => !0,
            2 => self.below(256),
            3 => [0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 63]
                [self.below(10) as usize],
            4 => self.next() & 0xffff,
            _ => self.next(),
        }
    }

    /// A case for the form `FORMS[index % FORMS.len()]`.
    ///
    /// # Panics
    ///
    /// If the layout leaves no encodable instance (e.g. RIP-relative and
    /// other modes all failing), which is a generator bug.
    pub fn case(&mut self, index: usize) -> Case {
        let form = FORMS[index % FORMS.len()];
        for _ in 0..10_000 {
            if let Some(c) = self.try_case(form) {
                return c;
            }
        }
        panic!("cases: no encodable instance of {:?} for {:?}", form.code, self.layout);
    }

    /// Picks a GPR index not in `avoid` and not RSP.
    fn pick_reg(&mut self, avoid: &[usize]) -> usize {
        loop {
            let i = self.below(16) as usize;
            if i != RSP_IDX && !avoid.contains(&i) {
                return i;
            }
        }
    }

    /// A data offset for a `w`-byte access, sometimes straddling the page
    /// boundary inside the data area.
    fn data_off(&mut self, w: u8) -> u64 {
        let w = u64::from(w);
        if w > 1 && self.chance(4) { PAGE_SIZE - 1 - self.below(w - 1) } else { self.below(DATA_LEN - w + 1) }
    }

    fn try_case(&mut self, form: Form) -> Option<Case> {
        let l = self.layout;
        let mut regs = Regs { rip: l.code, fs_base: l.fs_base, gs_base: l.gs_base, ..Regs::default() };
        for g in regs.gpr.iter_mut() {
            *g = self.value();
        }
        regs.rflags = 2 | (self.next() & (STATUS | super::FLAG_DF));
        regs.gpr[RSP_IDX] =
            l.stack + 256 + 8 * self.below((PAGE_SIZE - 512) / 8) + if self.chance(8) { self.below(8) } else { 0 };
        let mut data: Vec<u8> = (0..DATA_LEN).map(|_| self.next() as u8).collect();
        match self.below(6) {
            0 => data.fill(self.next() as u8),
            1 => data.fill(0),
            _ => {}
        }
        let stack: Vec<u8> = (0..PAGE_SIZE).map(|_| self.next() as u8).collect();
        let low = l.data.checked_add(DATA_LEN).is_some_and(|e| e <= 1 << 32);

        let mut insn = if let Shape::Str(op) = form.shape {
            self.string(form, op, &mut regs, &data, low)?
        } else {
            self.modrm(form, &mut regs, &mut data, low)?
        };
        if form.lockable && self.chance(3) {
            insn.set_has_lock_prefix(true);
        }
        let mut enc = Encoder::new(64);
        enc.encode(&insn, l.code).ok()?;
        let bytes = enc.take_buffer();
        Some(Case { form, bytes, regs, data, stack })
    }

    fn string(&mut self, form: Form, op: StrOp, regs: &mut Regs, data: &[u8], low: bool) -> Option<Instruction> {
        let l = self.layout;
        let w = u64::from(form.mem_w);
        let a32 = low && self.chance(4);
        let seg = if a32 {
            Register::None
        } else {
            [Register::None, Register::None, Register::FS, Register::GS, Register::ES, Register::DS]
                [self.below(6) as usize]
        };
        let compares = matches!(op, StrOp::Cmps | StrOp::Scas);
        let rep = match self.below(4) {
            0 => RepPrefixKind::None,
            1 if compares => RepPrefixKind::Repne,
            1 => RepPrefixKind::None,
            2 if !compares && self.chance(4) => RepPrefixKind::Repne,
            _ => RepPrefixKind::Repe,
        };
        let count = if self.chance(8) { 0 } else { self.below(13) };
        let iters = if rep == RepPrefixKind::None { 1 } else { count.max(1) };
        let df = regs.rflags & super::FLAG_DF != 0;
        let span = iters * w;
        let start = |g: &mut Self| {
            let lo = if df { span - w } else { 0 };
            let hi = if df { DATA_LEN - w } else { DATA_LEN - span };
            l.data + lo + g.below(hi - lo + 1)
        };
        let src = start(self);
        let dst = start(self);
        let seg_base = match seg {
            Register::FS => l.fs_base,
            Register::GS => l.gs_base,
            _ => 0,
        };
        let hi_bits = |g: &mut Self| if a32 { g.next() & !0xffff_ffff } else { 0 };
        regs.gpr[gpr::RSI] = src.wrapping_sub(seg_base) | hi_bits(self);
        regs.gpr[gpr::RDI] = dst | hi_bits(self);
        regs.gpr[gpr::RCX] = count | hi_bits(self);
        if compares && self.chance(2) {
            // Make SCAS see equal values sometimes.
            let off = (dst - l.data) as usize;
            let mut b = [0u8; 8];
            b[..w as usize].copy_from_slice(&data[off..off + w as usize]);
            regs.gpr[gpr::RAX] = u64::from_le_bytes(b) | (regs.gpr[gpr::RAX] & !super::alu::mask(form.mem_w));
        }
        let asz = if a32 { 32 } else { 64 };
        let r = match (op, form.mem_w) {
            (StrOp::Movs, 1) => Instruction::with_movsb(asz, seg, rep),
            (StrOp::Movs, 2) => Instruction::with_movsw(asz, seg, rep),
            (StrOp::Movs, 4) => Instruction::with_movsd(asz, seg, rep),
            (StrOp::Movs, _) => Instruction::with_movsq(asz, seg, rep),
            (StrOp::Stos, 1) => Instruction::with_stosb(asz, rep),
            (StrOp::Stos, 2) => Instruction::with_stosw(asz, rep),
            (StrOp::Stos, 4) => Instruction::with_stosd(asz, rep),
            (StrOp::Stos, _) => Instruction::with_stosq(asz, rep),
            (StrOp::Lods, 1) => Instruction::with_lodsb(asz, seg, rep),
            (StrOp::Lods, 2) => Instruction::with_lodsw(asz, seg, rep),
            (StrOp::Lods, 4) => Instruction::with_lodsd(asz, seg, rep),
            (StrOp::Lods, _) => Instruction::with_lodsq(asz, seg, rep),
            (StrOp::Cmps, 1) => Instruction::with_cmpsb(asz, seg, rep),
            (StrOp::Cmps, 2) => Instruction::with_cmpsw(asz, seg, rep),
            (StrOp::Cmps, 4) => Instruction::with_cmpsd(asz, seg, rep),
            (StrOp::Cmps, _) => Instruction::with_cmpsq(asz, seg, rep),
            (StrOp::Scas, 1) => Instruction::with_scasb(asz, rep),
            (StrOp::Scas, 2) => Instruction::with_scasw(asz, rep),
            (StrOp::Scas, 4) => Instruction::with_scasd(asz, rep),
            (StrOp::Scas, _) => Instruction::with_scasq(asz, rep),
        };
        r.ok()
    }

    fn modrm(&mut self, form: Form, regs: &mut Regs, data: &mut [u8], low: bool) -> Option<Instruction> {
        let l = self.layout;
        let mw = form.mem_w;
        let wide = matches!(form.code, Code::Cmpxchg8b_m64 | Code::Cmpxchg16b_m128);
        // CMPXCHG16B needs a 16-byte aligned operand (else #GP).
        let off = if mw == 16 { self.below(DATA_LEN / 16) * 16 } else { self.data_off(mw) };
        let target = l.data + off;
        let mut avoid: Vec<usize> = Vec::new();
        let is_cmpxchg = matches!(
            form.code,
            Code::Cmpxchg_rm8_r8 | Code::Cmpxchg_rm16_r16 | Code::Cmpxchg_rm32_r32 | Code::Cmpxchg_rm64_r64
        );
        if is_cmpxchg {
            avoid.push(gpr::RAX);
        }
        if matches!(form.shape, Shape::ShiftCl | Shape::DShCl) {
            avoid.push(gpr::RCX);
            let c = if self.chance(2) { self.below(u64::from(8 * mw) + 3) } else { self.next() & 0xff };
            regs.gpr[gpr::RCX] = (regs.gpr[gpr::RCX] & !0xff) | c;
        }
        if form.shape == Shape::MulDiv {
            avoid.extend([gpr::RAX, gpr::RDX]);
        }
        if wide {
            avoid.extend([gpr::RAX, gpr::RDX, gpr::RCX, gpr::RBX]);
            if self.chance(2) {
                // EDX:EAX (RDX:RAX) equal to memory.
                let h = usize::from(mw / 2);
                let m = super::alu::mask(mw / 2);
                let part = |k: usize| {
                    let mut b = [0u8; 8];
                    b[..h].copy_from_slice(&data[off as usize + k * h..][..h]);
                    u64::from_le_bytes(b)
                };
                regs.gpr[gpr::RAX] = (regs.gpr[gpr::RAX] & !m) | part(0);
                regs.gpr[gpr::RDX] = (regs.gpr[gpr::RDX] & !m) | part(1);
            }
        }
        // The register operand.
        let mut reg = Register::None;
        if matches!(
            form.shape,
            Shape::MemReg | Shape::RegMem | Shape::BtReg | Shape::DShImm | Shape::DShCl | Shape::RegMemImm
        ) {
            let i = self.pick_reg(&[]);
            avoid.push(i);
            reg = gpr_reg(form.reg_w, i);
            if form.reg_w == 1 && i < 4 && self.chance(3) {
                // AH CH DH BH (encodable only without REX).
                reg = Register::values().nth(Register::AH as usize + i).unwrap_or(reg);
            }
        }
        let acc = gpr_reg(form.reg_w.max(1), 0);
        // The effective address the ModRM operand must produce.
        let mut ea = target;
        if form.shape == Shape::BtReg {
            let bits = 8 * i64::from(mw);
            let k = self.below(129) as i64 - 64;
            let bit = self.below(bits as u64) as i64;
            ea = target.wrapping_sub((k * i64::from(mw)) as u64);
            let v = (k * bits + bit) as u64 & super::alu::mask(mw);
            let i = avoid[avoid.len() - 1];
            regs.gpr[i] = (regs.gpr[i] & !super::alu::mask(mw)) | v;
        }
        if is_cmpxchg && self.chance(2) {
            let mut b = [0u8; 8];
            b[..usize::from(mw)].copy_from_slice(&data[off as usize..off as usize + usize::from(mw)]);
            let m = super::alu::mask(mw);
            regs.gpr[gpr::RAX] = (regs.gpr[gpr::RAX] & !m) | u64::from_le_bytes(b);
        }
        if form.shape == Shape::MulDiv {
            self.no_divide_error(form, off as usize, regs, data);
        }
        let a32 = low && self.chance(6);
        let seg = if a32 {
            Register::None
        } else {
            // ES/CS/SS/DS overrides are ignored in 64-bit mode (base 0).
            [
                Register::None,
                Register::None,
                Register::None,
                Register::FS,
                Register::GS,
                Register::ES,
                Register::CS,
                Register::SS,
                Register::DS,
            ][self.below(9) as usize]
        };
        let seg_base = match seg {
            Register::FS => l.fs_base,
            Register::GS => l.gs_base,
            _ => 0,
        };
        let offset = ea.wrapping_sub(seg_base);
        let mem = if matches!(form.shape, Shape::LoadMoffs | Shape::StoreMoffs) {
            let mut m = MemoryOperand::with_base_displ_size(Register::None, offset as i64, if a32 { 4 } else { 8 });
            m.segment_prefix = seg;
            m
        } else {
            // RSP as it is when the address is formed: POP forms it after
            // the increment.
            let rsp = regs.gpr[RSP_IDX].wrapping_add(if form.shape == Shape::Pop { u64::from(mw) } else { 0 });
            self.mem_operand(offset, a32, seg, &avoid, regs, rsp)?
        };
        let imm = match form.imm_w {
            1 => self.below(256) as i32 - 128,
            2 => self.below(1 << 16) as i32 - (1 << 15),
            _ => self.next() as i32,
        };
        let r = match form.shape {
            Shape::MemReg | Shape::BtReg => Instruction::with2(form.code, mem, reg),
            Shape::RegMem => Instruction::with2(form.code, reg, mem),
            Shape::ShiftOne => Instruction::with2(form.code, mem, 1u32),
            Shape::ShiftCl => Instruction::with2(form.code, mem, Register::CL),
            Shape::DShImm => Instruction::with3(form.code, mem, reg, imm as u32 & 0xff),
            Shape::DShCl => Instruction::with3(form.code, mem, reg, Register::CL),
            Shape::RegMemImm => Instruction::with3(form.code, reg, mem, imm),
            Shape::MulDiv => Instruction::with1(form.code, mem),
            Shape::MemImm => {
                if form.code_is_bt() {
                    Instruction::with2(form.code, mem, imm as u32 & 0xff)
                } else {
                    Instruction::with2(form.code, mem, imm)
                }
            }
            Shape::Mem | Shape::Push | Shape::Pop => Instruction::with1(form.code, mem),
            Shape::LoadMoffs => Instruction::with2(form.code, acc, mem),
            Shape::StoreMoffs => Instruction::with2(form.code, mem, acc),
            Shape::Str(_) => return None,
        };
        r.ok()
    }

    /// Makes a DIV/IDIV case not fault: a non-zero divisor in memory and a
    /// high dividend half that keeps the quotient in range.
    fn no_divide_error(&mut self, form: Form, off: usize, regs: &mut Regs, data: &mut [u8]) {
        use iced_x86::Mnemonic;
        let w = usize::from(form.mem_w);
        let m = super::alu::mask(form.mem_w);
        let bits = 8 * u32::from(form.mem_w);
        let signed = match form.code.mnemonic() {
            Mnemonic::Div => false,
            Mnemonic::Idiv => true,
            _ => return,
        };
        let mut b = [0u8; 8];
        b[..w].copy_from_slice(&data[off..off + w]);
        let mut d = u64::from_le_bytes(b) & m;
        if d == 0 || (signed && d == m) {
            d = 1 + self.below(m.min(1 << 20));
            data[off..off + w].copy_from_slice(&d.to_le_bytes()[..w]);
        }
        let lo = if form.mem_w == 1 { regs.gpr[gpr::RAX] & 0xff } else { regs.gpr[gpr::RAX] & m };
        let hi = if signed {
            // Sign-extend the low half: |quotient| <= |dividend| fits.
            if lo >> (bits - 1) & 1 == 1 { m } else { 0 }
        } else {
            self.below(d)
        };
        if form.mem_w == 1 {
            regs.gpr[gpr::RAX] = (regs.gpr[gpr::RAX] & !0xff00) | (hi << 8);
        } else {
            regs.gpr[gpr::RDX] = (regs.gpr[gpr::RDX] & !m) | hi;
        }
    }

    /// A ModRM memory operand whose offset (before the segment base) is
    /// `offset`; sets the base/index registers it uses.
    fn mem_operand(
        &mut self,
        offset: u64,
        a32: bool,
        seg: Register,
        avoid: &[usize],
        regs: &mut Regs,
        rsp: u64,
    ) -> Option<MemoryOperand> {
        let l = self.layout;
        let w = if a32 { 4 } else { 8 };
        let disp: i64 = match self.below(3) {
            0 => 0,
            1 => self.below(256) as i64 - 128,
            _ => self.next() as i32 as i64,
        };
        // iced's displacement size is the address size for disp32 (8 in
        // 64-bit addressing).
        let d32 = if a32 { 4 } else { 8 };
        let (displ_size, disp) = match disp {
            0 => (0, 0),
            -128..=127 => (1, disp),
            _ => (d32, disp),
        };
        match self.below(8) {
            // RIP-relative.
            0 if !a32 && seg == Register::None => {
                let target = offset;
                let dist = target.wrapping_sub(l.code) as i64;
                if !(-(1 << 30)..(1 << 30)).contains(&dist) {
                    return None;
                }
                Some(MemoryOperand::with_base_displ_size(Register::RIP, target as i64, 4))
            }
            // base + index*scale + disp
            1..=3 => {
                let b = self.pick_reg(avoid);
                let mut avoid2 = avoid.to_vec();
                avoid2.push(b);
                let x = self.pick_reg(&avoid2);
                let scale = 1u64 << self.below(4);
                let xv = self.value();
                let bv = offset.wrapping_sub(xv.wrapping_mul(scale)).wrapping_sub(disp as u64);
                regs.gpr[x] = xv;
                regs.gpr[b] = if a32 { (bv & 0xffff_ffff) | (self.next() & !0xffff_ffff) } else { bv };
                Some(MemoryOperand::new(gpr_reg(w, b), gpr_reg(w, x), scale as u32, disp, displ_size, false, seg))
            }
            // RSP + disp32 (kept in the stack page, so the displacement
            // reaches the data pages only when they are within 2 GiB).
            5 if !a32 && (offset.wrapping_sub(rsp) as i64).unsigned_abs() < (1 << 31) - 1 => {
                let d = offset.wrapping_sub(rsp) as i64;
                Some(MemoryOperand::new(Register::RSP, Register::None, 1, d, 8, false, seg))
            }
            // index*scale + disp32, no base.
            4 => {
                let x = self.pick_reg(avoid);
                let scale = 1u64 << self.below(4);
                let mut disp = self.next() as i32 as i64 & !0x7;
                disp += (offset.wrapping_sub(disp as u64) % scale) as i64;
                let xv = offset.wrapping_sub(disp as u64) / scale;
                // The top bits lost by the division come back via wrapping.
                let xv =
                    xv.wrapping_add(if scale > 1 { self.below(scale) << (64 - scale.trailing_zeros()) } else { 0 });
                regs.gpr[x] = if a32 { (xv & 0xffff_ffff) | (self.next() & !0xffff_ffff) } else { xv };
                Some(MemoryOperand::new(Register::None, gpr_reg(w, x), scale as u32, disp, d32, false, seg))
            }
            // base + disp
            _ => {
                let b = self.pick_reg(avoid);
                let bv = offset.wrapping_sub(disp as u64);
                regs.gpr[b] = if a32 { (bv & 0xffff_ffff) | (self.next() & !0xffff_ffff) } else { bv };
                Some(MemoryOperand::new(gpr_reg(w, b), Register::None, 1, disp, displ_size, false, seg))
            }
        }
    }
}

impl Form {
    /// Forms whose imm8 is an unsigned count or bit index.
    fn code_is_bt(&self) -> bool {
        use iced_x86::Mnemonic::*;
        matches!(self.code.mnemonic(), Bt | Bts | Btr | Btc | Rol | Ror | Rcl | Rcr | Shl | Shr | Sar)
    }
}
