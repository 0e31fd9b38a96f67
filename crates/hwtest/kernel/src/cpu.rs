//! CPU primitives: CPUID, MSRs, control registers.

use core::arch::asm;

/// CPUID leaf/subleaf; returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Read a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers only read MSRs whose existence they checked (or that
    // every CPU model we boot on has); a #GP would stop the run visibly.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Write a model-specific register.
///
/// # Safety
/// The write must keep the machine in a state the kernel expects (it is used
/// for EFER.SVME, VM_HSAVE_PA and IA32_FEATURE_CONTROL only).
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller upholds this function's contract.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) }
}

/// Read CR0.
pub fn cr0() -> u64 {
    let v;
    // SAFETY: reading a control register at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) }
    v
}

/// Read CR3.
pub fn cr3() -> u64 {
    let v;
    // SAFETY: as for `cr0`.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) }
    v
}

/// Read CR4.
pub fn cr4() -> u64 {
    let v;
    // SAFETY: as for `cr0`.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) }
    v
}

/// Write CR0.
///
/// # Safety
/// The new value must keep paging and protection as the kernel set them up.
pub unsafe fn set_cr0(v: u64) {
    // SAFETY: the caller upholds this function's contract.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack)) }
}

/// Write CR4.
///
/// # Safety
/// The new value must keep PAE and the SSE enables set.
pub unsafe fn set_cr4(v: u64) {
    // SAFETY: the caller upholds this function's contract.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack)) }
}

/// CPU vendor string from CPUID leaf 0.
pub fn vendor() -> [u8; 12] {
    let (_, b, c, d) = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&b.to_le_bytes());
    v[4..8].copy_from_slice(&d.to_le_bytes());
    v[8..12].copy_from_slice(&c.to_le_bytes());
    v
}

/// MAXPHYADDR from CPUID 0x8000_0008 (36 if the leaf is missing).
pub fn phys_bits() -> u8 {
    let (max, ..) = cpuid(0x8000_0000, 0);
    if max >= 0x8000_0008 { (cpuid(0x8000_0008, 0).0 & 0xFF) as u8 } else { 36 }
}

/// A 4 KiB-aligned page in .bss for the architecture's control structures.
#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

impl Page {
    /// A zeroed page.
    pub const fn zeroed() -> Self {
        Page([0; 4096])
    }
}
