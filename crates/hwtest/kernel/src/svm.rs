//! AMD SVM: EFER.SVME, the host save area, one VMCB with nested paging, and
//! VMRUN / #VMEXIT. The guest runs in 32-bit protected mode with CR0.PG=0,
//! so every guest access is a final guest-physical access translated by the
//! nested table at nCR3 alone.

use core::arch::global_asm;

use crate::cpu::{self, Page};
use crate::hv::{Exit, GuestRegs, Hv, Invalidate};

const MSR_EFER: u32 = 0xC000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
const MSR_VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const EFER_SVME: u64 = 1 << 12;

// VMCB control area offsets (AMD APM vol. 2, appendix B).
const C_INTERCEPT_EXC: usize = 0x008;
const C_INTERCEPT_MISC1: usize = 0x00C;
const C_INTERCEPT_MISC2: usize = 0x010;
const C_ASID: usize = 0x058;
const C_TLB_CONTROL: usize = 0x05C;
const C_EXITCODE: usize = 0x070;
const C_EXITINFO1: usize = 0x078;
const C_EXITINFO2: usize = 0x080;
const C_NP_ENABLE: usize = 0x090;
const C_NCR3: usize = 0x0B0;
const C_CLEAN: usize = 0x0C0;
// State save area.
const S_ES: usize = 0x400;
const S_CS: usize = 0x410;
const S_SS: usize = 0x420;
const S_DS: usize = 0x430;
const S_FS: usize = 0x440;
const S_GS: usize = 0x450;
const S_GDTR: usize = 0x460;
const S_LDTR: usize = 0x470;
const S_IDTR: usize = 0x480;
const S_TR: usize = 0x490;
const S_CPL: usize = 0x4CB;
const S_EFER: usize = 0x4D0;
const S_CR4: usize = 0x548;
const S_CR3: usize = 0x550;
const S_CR0: usize = 0x558;
const S_DR7: usize = 0x560;
const S_DR6: usize = 0x568;
const S_RFLAGS: usize = 0x570;
const S_RIP: usize = 0x578;
const S_RSP: usize = 0x5D8;
const S_RAX: usize = 0x5F8;
const S_GPAT: usize = 0x668;

/// #VMEXIT codes used here.
const VMEXIT_EXCP_BASE: u64 = 0x40;
const VMEXIT_HLT: u64 = 0x78;
const VMEXIT_SHUTDOWN: u64 = 0x7F;
const VMEXIT_NPF: u64 = 0x400;
const VMEXIT_INVALID: u64 = u64::MAX;

/// The guest's address-space identifier (non-zero, as VMRUN requires).
const ASID: u32 = 1;

static mut HSAVE: Page = Page::zeroed();
static mut VMCB: Page = Page::zeroed();

global_asm!(
    r#"
    .section .text.svm_vmrun, "ax"
    .global svm_vmrun
/* svm_vmrun(vmcb_pa: rdi, regs: rsi) — loads guest RBX/RCX/RDX from regs,
   runs the guest until #VMEXIT, stores them back. RAX travels in the VMCB. */
svm_vmrun:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rsi
    movq %rdi, %rax
    movq 8(%rsi), %rbx
    movq 16(%rsi), %rcx
    movq 24(%rsi), %rdx
    clgi
    vmrun %rax
    stgi
    movq (%rsp), %rax
    movq %rbx, 8(%rax)
    movq %rcx, 16(%rax)
    movq %rdx, 24(%rax)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
"#,
    options(att_syntax)
);

unsafe extern "C" {
    fn svm_vmrun(vmcb_pa: u64, regs: *mut GuestRegs);
}

/// SVM with nested paging on this CPU.
pub struct Svm {
    vmcb: *mut u8,
    regs: GuestRegs,
}

/// Whether CPUID reports SVM and nested paging.
pub fn supported() -> bool {
    let (max, ..) = cpu::cpuid(0x8000_0000, 0);
    if max < 0x8000_000A {
        return false;
    }
    let svm = cpu::cpuid(0x8000_0001, 0).2 & (1 << 2) != 0;
    let npt = cpu::cpuid(0x8000_000A, 0).3 & 1 != 0;
    svm && npt
}

impl Svm {
    /// Enable SVM and prepare the VMCB for a flat 32-bit guest without paging.
    pub fn new() -> Result<Svm, &'static str> {
        if cpu::rdmsr(MSR_VM_CR) & VM_CR_SVMDIS != 0 {
            return Err("SVM disabled by VM_CR.SVMDIS");
        }
        // SAFETY: SVM support was checked by the caller (`supported`); setting
        // EFER.SVME and the host save area is how SVM is turned on. The
        // static pages are used by this (single) instance only.
        let vmcb = unsafe {
            cpu::wrmsr(MSR_EFER, cpu::rdmsr(MSR_EFER) | EFER_SVME);
            cpu::wrmsr(MSR_VM_HSAVE_PA, &raw mut HSAVE as u64);
            &raw mut VMCB as *mut u8
        };
        let mut s = Svm { vmcb, regs: GuestRegs::default() };
        s.w32(C_INTERCEPT_EXC, 0xFFFF_FFFF);
        // HLT (bit 24) and SHUTDOWN (bit 31).
        s.w32(C_INTERCEPT_MISC1, (1 << 24) | (1 << 31));
        // VMRUN (bit 0, required) and VMMCALL (bit 1).
        s.w32(C_INTERCEPT_MISC2, 0b11);
        s.w32(C_ASID, ASID);
        s.w64(C_NP_ENABLE, 1);
        let code = |off: usize, s: &mut Svm, attr: u16| {
            s.w16(off, 0);
            s.w16(off + 2, attr);
            s.w32(off + 4, 0xFFFF_FFFF);
            s.w64(off + 8, 0);
        };
        code(S_CS, &mut s, 0xC9B);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            code(off, &mut s, 0xC93);
        }
        for off in [S_GDTR, S_IDTR] {
            s.w32(off + 4, 0xFFFF);
        }
        s.w16(S_LDTR + 2, 0x82);
        s.w16(S_TR + 2, 0x8B);
        s.w32(S_TR + 4, 0x67);
        s.w8(S_CPL, 0);
        s.w64(S_EFER, EFER_SVME);
        s.w64(S_CR0, 0x11); // PE | ET, paging off
        s.w64(S_CR3, 0);
        s.w64(S_CR4, 0);
        s.w64(S_DR6, 0xFFFF_0FF0);
        s.w64(S_DR7, 0x400);
        s.w64(S_RFLAGS, 2);
        s.w64(S_RSP, 0);
        s.w64(S_GPAT, 0x0007_0406_0007_0406);
        Ok(s)
    }

    fn w8(&mut self, off: usize, v: u8) {
        // SAFETY: off is a VMCB field offset inside the 4 KiB page we own.
        unsafe { self.vmcb.add(off).write_volatile(v) }
    }
    fn w16(&mut self, off: usize, v: u16) {
        // SAFETY: as for w8; every field offset is naturally aligned.
        unsafe { (self.vmcb.add(off) as *mut u16).write_volatile(v) }
    }
    fn w32(&mut self, off: usize, v: u32) {
        // SAFETY: as for w16.
        unsafe { (self.vmcb.add(off) as *mut u32).write_volatile(v) }
    }
    fn w64(&mut self, off: usize, v: u64) {
        // SAFETY: as for w16.
        unsafe { (self.vmcb.add(off) as *mut u64).write_volatile(v) }
    }
    fn r64(&self, off: usize) -> u64 {
        // SAFETY: as for w16.
        unsafe { (self.vmcb.add(off) as *const u64).read_volatile() }
    }

    fn vmrun(&mut self) -> Exit {
        self.w32(C_CLEAN, 0);
        // SAFETY: the VMCB is fully initialised (`new`), SVM is enabled and
        // the host save area set; the asm preserves callee-saved registers.
        unsafe { svm_vmrun(self.vmcb as u64, &mut self.regs) };
        self.w8(C_TLB_CONTROL, 0);
        self.regs.rax = self.r64(S_RAX);
        let code = self.r64(C_EXITCODE);
        let (i1, i2, rip) = (self.r64(C_EXITINFO1), self.r64(C_EXITINFO2), self.r64(S_RIP));
        match code {
            VMEXIT_HLT => Exit::Hlt { rip },
            VMEXIT_NPF => Exit::Npf { info1: i1, gpa: i2 },
            c if (VMEXIT_EXCP_BASE..VMEXIT_EXCP_BASE + 32).contains(&c) => {
                Exit::Exception { vector: (c - VMEXIT_EXCP_BASE) as u8, error_code: i1, rip }
            }
            VMEXIT_SHUTDOWN => Exit::Other { code, detail: rip },
            VMEXIT_INVALID => Exit::EntryFailed { code, detail: 0 },
            _ => Exit::Other { code, detail: i1 },
        }
    }
}

impl Hv for Svm {
    fn set_root(&mut self, root_pointer: u64) {
        self.w64(C_NCR3, root_pointer);
    }

    fn run(&mut self, rip: u64, regs: GuestRegs, inv: Invalidate) -> Exit {
        self.regs = regs;
        self.w64(S_RIP, rip);
        self.w64(S_RAX, regs.rax);
        self.invalidate(inv);
        self.vmrun()
    }

    fn resume(&mut self) -> Exit {
        self.w64(S_RAX, self.regs.rax);
        self.vmrun()
    }

    fn regs(&self) -> GuestRegs {
        self.regs
    }

    fn invalidate(&mut self, inv: Invalidate) {
        match inv {
            Invalidate::None => {}
            // TLB_CONTROL 1: flush the whole TLB on the next VMRUN.
            Invalidate::All => self.w8(C_TLB_CONTROL, 1),
            Invalidate::Page(gpa) => {
                // INVLPGA invalidates the mapping of a guest virtual address
                // in one ASID; with guest paging off, virtual = physical.
                // SAFETY: INVLPGA only drops TLB entries; SVM is enabled.
                unsafe { core::arch::asm!("invlpga rax, ecx", in("rax") gpa, in("ecx") ASID, options(nostack)) }
            }
        }
    }
}
