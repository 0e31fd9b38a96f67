//! Intel VMX: VMXON, one VMCS, EPT with unrestricted guest so the guest can
//! run in 32-bit protected mode with CR0.PG=0 (only EPT translates), and
//! VMLAUNCH / VMRESUME / VM exit.

use core::arch::{asm, global_asm};

use crate::cpu::{self, Page};
use crate::hv::{Exit, GuestRegs, Hv, Invalidate};

const MSR_FEATURE_CONTROL: u32 = 0x3A;
const MSR_VMX_BASIC: u32 = 0x480;
const MSR_VMX_PINBASED: u32 = 0x481;
const MSR_VMX_PROCBASED: u32 = 0x482;
const MSR_VMX_EXIT: u32 = 0x483;
const MSR_VMX_ENTRY: u32 = 0x484;
const MSR_VMX_CR0_FIXED0: u32 = 0x486;
const MSR_VMX_CR0_FIXED1: u32 = 0x487;
const MSR_VMX_CR4_FIXED0: u32 = 0x488;
const MSR_VMX_CR4_FIXED1: u32 = 0x489;
const MSR_VMX_PROCBASED2: u32 = 0x48B;
const MSR_VMX_EPT_VPID_CAP: u32 = 0x48C;
const MSR_VMX_TRUE_PINBASED: u32 = 0x48D;
const MSR_VMX_TRUE_PROCBASED: u32 = 0x48E;
const MSR_VMX_TRUE_EXIT: u32 = 0x48F;
const MSR_VMX_TRUE_ENTRY: u32 = 0x490;

// VMCS field encodings (Intel SDM vol. 3, appendix B).
const GUEST_ES_SEL: u64 = 0x800;
const HOST_ES_SEL: u64 = 0xC00;
const HOST_CS_SEL: u64 = 0xC02;
const HOST_SS_SEL: u64 = 0xC04;
const HOST_DS_SEL: u64 = 0xC06;
const HOST_FS_SEL: u64 = 0xC08;
const HOST_GS_SEL: u64 = 0xC0A;
const HOST_TR_SEL: u64 = 0xC0C;
const EPT_POINTER: u64 = 0x201A;
const GUEST_PHYS_ADDR: u64 = 0x2400;
const VMCS_LINK_POINTER: u64 = 0x2800;
const GUEST_DEBUGCTL: u64 = 0x2802;
const PIN_CONTROLS: u64 = 0x4000;
const PROC_CONTROLS: u64 = 0x4002;
const EXCEPTION_BITMAP: u64 = 0x4004;
const EXIT_CONTROLS: u64 = 0x400C;
const ENTRY_CONTROLS: u64 = 0x4012;
const PROC2_CONTROLS: u64 = 0x401E;
const VM_INSTRUCTION_ERROR: u64 = 0x4400;
const EXIT_REASON: u64 = 0x4402;
const EXIT_INTR_INFO: u64 = 0x4404;
const GUEST_ES_LIMIT: u64 = 0x4800;
const GUEST_GDTR_LIMIT: u64 = 0x4810;
const GUEST_IDTR_LIMIT: u64 = 0x4812;
const GUEST_ES_AR: u64 = 0x4814;
const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
const GUEST_ACTIVITY: u64 = 0x4826;
const EXIT_QUALIFICATION: u64 = 0x6400;
const GUEST_LINEAR_ADDR: u64 = 0x640A;
const GUEST_CR0: u64 = 0x6800;
const GUEST_CR3: u64 = 0x6802;
const GUEST_CR4: u64 = 0x6804;
const GUEST_ES_BASE: u64 = 0x6806;
const GUEST_GDTR_BASE: u64 = 0x6816;
const GUEST_IDTR_BASE: u64 = 0x6818;
const GUEST_DR7: u64 = 0x681A;
const GUEST_RIP: u64 = 0x681E;
const GUEST_RFLAGS: u64 = 0x6820;
const HOST_CR0: u64 = 0x6C00;
const HOST_CR3: u64 = 0x6C02;
const HOST_CR4: u64 = 0x6C04;
const HOST_TR_BASE: u64 = 0x6C0A;
const HOST_GDTR_BASE: u64 = 0x6C0C;

const EXIT_REASON_EXCEPTION: u64 = 0;
const EXIT_REASON_HLT: u64 = 12;
const EXIT_REASON_EPT_VIOLATION: u64 = 48;
const EXIT_REASON_EPT_MISCONFIG: u64 = 49;

const GDT_TSS_SEL: u16 = 0x28;

/// EPT capabilities read from IA32_VMX_EPT_VPID_CAP.
#[derive(Clone, Copy, Debug)]
pub struct EptCaps {
    /// Execute-only translations (bit 0).
    pub execute_only: bool,
    /// 2 MiB pages (bit 16).
    pub page_2m: bool,
    /// 1 GiB pages (bit 17).
    pub page_1g: bool,
    /// Accessed and dirty flags (bit 21).
    pub ad: bool,
    /// Single-context INVEPT (bit 25).
    pub invept_single: bool,
    /// All-context INVEPT (bit 26).
    pub invept_all: bool,
}

static mut VMXON_REGION: Page = Page::zeroed();
static mut VMCS_REGION: Page = Page::zeroed();
#[repr(C, align(16))]
struct Tss([u8; 0x68]);
static mut HOST_TSS: Tss = Tss([0; 0x68]);

unsafe extern "C" {
    static mut gdt: [u64; 7];
    fn vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64;
}

global_asm!(
    r#"
    .section .text.vmx_enter, "ax"
    .global vmx_enter
/* vmx_enter(regs: rdi, launched: rsi) -> rax: 0 after a VM exit,
   1 VMfailInvalid, 2 VMfailValid. HOST_RSP/HOST_RIP are set here so the exit
   lands at vmx_exit_point with regs at (%rsp). */
vmx_enter:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi
    movq $0x6C14, %rax
    vmwrite %rsp, %rax
    leaq vmx_exit_point(%rip), %rdx
    movq $0x6C16, %rax
    vmwrite %rdx, %rax
    testq %rsi, %rsi
    movq 8(%rdi), %rbx
    movq 16(%rdi), %rcx
    movq 24(%rdi), %rdx
    movq 0(%rdi), %rax
    jz 1f
    vmresume
    jmp 2f
1:  vmlaunch
2:  movl $1, %eax
    jc 3f
    movl $2, %eax
3:  addq $8, %rsp
    jmp 4f
vmx_exit_point:
    xchgq %rax, (%rsp)
    movq %rbx, 8(%rax)
    movq %rcx, 16(%rax)
    movq %rdx, 24(%rax)
    popq %rbx
    movq %rbx, 0(%rax)
    xorl %eax, %eax
4:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
"#,
    options(att_syntax)
);

/// Whether CPUID reports VMX.
pub fn supported() -> bool {
    cpu::cpuid(1, 0).2 & (1 << 5) != 0
}

fn vmwrite(field: u64, v: u64) {
    let ok: u8;
    // SAFETY: a VMCS is current (VMPTRLD in `Vmx::new`); VMWRITE only changes
    // that VMCS. Failure is reported through the flags and checked.
    unsafe {
        asm!("vmwrite {f}, {v}", "setna {ok}", f = in(reg) field, v = in(reg) v, ok = out(reg_byte) ok, options(nostack))
    }
    if ok != 0 {
        panic!("VMWRITE {field:#x} = {v:#x} failed, error {}", vmread(VM_INSTRUCTION_ERROR));
    }
}

fn vmread(field: u64) -> u64 {
    let v: u64;
    // SAFETY: a VMCS is current; VMREAD has no side effects.
    unsafe { asm!("vmread {v}, {f}", f = in(reg) field, v = out(reg) v, options(nostack)) }
    v
}

/// Apply a VMX capability MSR: bits set in the low half must be 1, bits clear
/// in the high half must be 0.
fn adjust(msr: u32, want: u32) -> u32 {
    let v = cpu::rdmsr(msr);
    (want | v as u32) & (v >> 32) as u32
}

/// VMX with EPT on this CPU.
pub struct Vmx {
    regs: GuestRegs,
    launched: bool,
    eptp: u64,
    /// What the CPU offers for EPT.
    pub caps: EptCaps,
}

impl Vmx {
    /// Enter VMX operation and build the VMCS.
    pub fn new() -> Result<Vmx, &'static str> {
        let basic = cpu::rdmsr(MSR_VMX_BASIC);
        let rev = (basic & 0x7FFF_FFFF) as u32;
        let true_ctls = basic & (1 << 55) != 0;
        let cap = cpu::rdmsr(MSR_VMX_EPT_VPID_CAP);
        let caps = EptCaps {
            execute_only: cap & 1 != 0,
            page_2m: cap & (1 << 16) != 0,
            page_1g: cap & (1 << 17) != 0,
            ad: cap & (1 << 21) != 0,
            invept_single: cap & (1 << 25) != 0,
            invept_all: cap & (1 << 26) != 0,
        };
        crate::kprintln!("INFO vmx basic={basic:#x} ept_vpid_cap={cap:#x}");
        // SAFETY: VMX support was checked by the caller. The sequence is the
        // SDM's: IA32_FEATURE_CONTROL enabled and locked if the BIOS left it
        // unlocked, fixed CR0/CR4 bits, VMXON on a
        // revision-stamped region, VMCLEAR/VMPTRLD of a stamped VMCS. The
        // regions are statics used by this single instance only; the GDT
        // slot 0x28 was reserved for the TSS in boot.rs.
        unsafe {
            let fc = cpu::rdmsr(MSR_FEATURE_CONTROL);
            if fc & 1 == 0 {
                cpu::wrmsr(MSR_FEATURE_CONTROL, fc | 0b101);
            } else if fc & 0b100 == 0 {
                return Err("VMX disabled by IA32_FEATURE_CONTROL");
            }
            let cr0 = (cpu::cr0() | cpu::rdmsr(MSR_VMX_CR0_FIXED0)) & cpu::rdmsr(MSR_VMX_CR0_FIXED1);
            cpu::set_cr0(cr0);
            let cr4 = (cpu::cr4() | (1 << 13) | cpu::rdmsr(MSR_VMX_CR4_FIXED0)) & cpu::rdmsr(MSR_VMX_CR4_FIXED1);
            cpu::set_cr4(cr4);
            // Host TSS (the VMCS host-state checks want a non-null TR).
            let tss = &raw mut HOST_TSS as u64;
            let g = &raw mut gdt as *mut u64;
            g.add(5).write(0x67 | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | (((tss >> 24) & 0xFF) << 56));
            g.add(6).write(tss >> 32);
            asm!("ltr {0:x}", in(reg) GDT_TSS_SEL, options(nostack));

            let vmxon = &raw mut VMXON_REGION;
            (vmxon as *mut u32).write(rev);
            let vmcs = &raw mut VMCS_REGION;
            (vmcs as *mut u32).write(rev);
            let (pa_on, pa_cs) = (vmxon as u64, vmcs as u64);
            let fail: u8;
            asm!("vmxon [{0}]", "setna {1}", in(reg) &pa_on, out(reg_byte) fail, options(nostack));
            if fail != 0 {
                return Err("VMXON failed");
            }
            let fail: u8;
            asm!("vmclear [{0}]", "setna {1}", in(reg) &pa_cs, out(reg_byte) fail, options(nostack));
            if fail != 0 {
                return Err("VMCLEAR failed");
            }
            let fail: u8;
            asm!("vmptrld [{0}]", "setna {1}", in(reg) &pa_cs, out(reg_byte) fail, options(nostack));
            if fail != 0 {
                return Err("VMPTRLD failed");
            }
        }
        let pick = |t: u32, n: u32| if true_ctls { t } else { n };
        let pin = adjust(pick(MSR_VMX_TRUE_PINBASED, MSR_VMX_PINBASED), 0);
        // HLT exiting (7), secondary controls (31).
        let proc = adjust(pick(MSR_VMX_TRUE_PROCBASED, MSR_VMX_PROCBASED), (1 << 7) | (1 << 31));
        // Enable EPT (1), unrestricted guest (7).
        let proc2 = adjust(MSR_VMX_PROCBASED2, (1 << 1) | (1 << 7));
        if proc & (1 << 31) == 0 || proc2 & 0x82 != 0x82 {
            return Err("CPU model lacks EPT or unrestricted guest");
        }
        // Host address-space size (9).
        let exit = adjust(pick(MSR_VMX_TRUE_EXIT, MSR_VMX_EXIT), 1 << 9);
        let entry = adjust(pick(MSR_VMX_TRUE_ENTRY, MSR_VMX_ENTRY), 0);
        vmwrite(PIN_CONTROLS, pin.into());
        vmwrite(PROC_CONTROLS, proc.into());
        vmwrite(PROC2_CONTROLS, proc2.into());
        vmwrite(EXIT_CONTROLS, exit.into());
        vmwrite(ENTRY_CONTROLS, entry.into());
        vmwrite(EXCEPTION_BITMAP, 0xFFFF_FFFF);

        // Host state: the current long-mode kernel.
        vmwrite(HOST_CR0, cpu::cr0());
        vmwrite(HOST_CR3, cpu::cr3());
        vmwrite(HOST_CR4, cpu::cr4());
        vmwrite(HOST_CS_SEL, 0x18);
        for f in [HOST_ES_SEL, HOST_SS_SEL, HOST_DS_SEL, HOST_FS_SEL, HOST_GS_SEL] {
            vmwrite(f, 0x20);
        }
        vmwrite(HOST_TR_SEL, GDT_TSS_SEL.into());
        vmwrite(HOST_TR_BASE, &raw mut HOST_TSS as u64);
        vmwrite(HOST_GDTR_BASE, &raw mut gdt as u64);

        // Guest state: flat 32-bit protected mode, paging off.
        let g_cr0 = (0x31 | cpu::rdmsr(MSR_VMX_CR0_FIXED0)) & !(1u64 << 31) & cpu::rdmsr(MSR_VMX_CR0_FIXED1);
        vmwrite(GUEST_CR0, g_cr0);
        vmwrite(GUEST_CR3, 0);
        vmwrite(GUEST_CR4, cpu::rdmsr(MSR_VMX_CR4_FIXED0) | (1 << 13));
        for i in 0..8u64 {
            // ES CS SS DS FS GS LDTR TR
            vmwrite(GUEST_ES_SEL + 2 * i, 0);
            vmwrite(GUEST_ES_BASE + 2 * i, 0);
            let (limit, ar) = match i {
                1 => (0xFFFF_FFFF, 0xC09B),
                6 => (0, 0x1_0000),
                7 => (0x67, 0x8B),
                _ => (0xFFFF_FFFF, 0xC093),
            };
            vmwrite(GUEST_ES_LIMIT + 2 * i, limit);
            vmwrite(GUEST_ES_AR + 2 * i, ar);
        }
        vmwrite(GUEST_GDTR_BASE, 0);
        vmwrite(GUEST_IDTR_BASE, 0);
        vmwrite(GUEST_GDTR_LIMIT, 0xFFFF);
        vmwrite(GUEST_IDTR_LIMIT, 0xFFFF);
        vmwrite(GUEST_DR7, 0x400);
        vmwrite(GUEST_RFLAGS, 2);
        vmwrite(GUEST_INTERRUPTIBILITY, 0);
        vmwrite(GUEST_ACTIVITY, 0);
        vmwrite(VMCS_LINK_POINTER, u64::MAX);
        vmwrite(GUEST_DEBUGCTL, 0);
        Ok(Vmx { regs: GuestRegs::default(), launched: false, eptp: 0, caps })
    }

    fn enter(&mut self) -> Exit {
        // SAFETY: the VMCS is current and complete; the asm preserves the
        // callee-saved registers and returns to the host on exit or failure.
        let r = unsafe { vmx_enter(&mut self.regs, self.launched as u64) };
        if r != 0 {
            let err = if r == 2 { vmread(VM_INSTRUCTION_ERROR) } else { u64::MAX };
            return Exit::EntryFailed { code: r, detail: err };
        }
        self.launched = true;
        let reason = vmread(EXIT_REASON);
        if reason & (1 << 31) != 0 {
            return Exit::EntryFailed { code: reason, detail: vmread(EXIT_QUALIFICATION) };
        }
        let rip = vmread(GUEST_RIP);
        match reason & 0xFFFF {
            EXIT_REASON_HLT => Exit::Hlt { rip },
            EXIT_REASON_EPT_VIOLATION => Exit::EptViolation {
                qual: vmread(EXIT_QUALIFICATION),
                gpa: vmread(GUEST_PHYS_ADDR),
                gla: vmread(GUEST_LINEAR_ADDR),
            },
            EXIT_REASON_EPT_MISCONFIG => Exit::EptMisconfig { gpa: vmread(GUEST_PHYS_ADDR) },
            EXIT_REASON_EXCEPTION => {
                let info = vmread(EXIT_INTR_INFO);
                Exit::Exception { vector: info as u8, error_code: info, rip }
            }
            r => Exit::Other { code: r, detail: vmread(EXIT_QUALIFICATION) },
        }
    }

    fn invept(&self, kind: u64) {
        let desc: [u64; 2] = [self.eptp, 0];
        let fail: u8;
        // SAFETY: INVEPT only drops cached EPT translations; the descriptor
        // lives on the stack for the duration of the instruction.
        unsafe {
            asm!("invept {k}, [{d}]", "setna {f}", k = in(reg) kind, d = in(reg) &desc, f = out(reg_byte) fail, options(nostack))
        }
        if fail != 0 {
            panic!("INVEPT type {kind} failed");
        }
    }
}

impl Hv for Vmx {
    fn set_root(&mut self, root_pointer: u64) {
        self.eptp = root_pointer;
        vmwrite(EPT_POINTER, root_pointer);
    }

    fn run(&mut self, rip: u64, regs: GuestRegs, inv: Invalidate) -> Exit {
        self.regs = regs;
        vmwrite(GUEST_RIP, rip);
        self.invalidate(inv);
        self.enter()
    }

    fn resume(&mut self) -> Exit {
        self.enter()
    }

    fn regs(&self) -> GuestRegs {
        self.regs
    }

    fn invalidate(&mut self, inv: Invalidate) {
        match inv {
            Invalidate::None => {}
            Invalidate::All => self.invept(if self.caps.invept_all { 2 } else { 1 }),
            Invalidate::Page(_) => self.invept(1),
        }
    }
}
