//! What the scenarios need from a virtualization extension, so that one
//! scenario list runs on SVM (QEMU) and VMX (Bochs).

/// Guest general-purpose registers that travel across a run.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct GuestRegs {
    /// RAX (offset 0; the asm stubs rely on this layout).
    pub rax: u64,
    /// RBX (offset 8).
    pub rbx: u64,
    /// RCX (offset 16).
    pub rcx: u64,
    /// RDX (offset 24).
    pub rdx: u64,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest executed HLT at `rip`: its access completed.
    Hlt {
        /// Guest RIP of the HLT.
        rip: u64,
    },
    /// SVM #VMEXIT(NPF).
    Npf {
        /// EXITINFO1: the nested page fault error code.
        info1: u64,
        /// EXITINFO2: the faulting guest-physical address.
        gpa: u64,
    },
    /// VMX EPT violation (exit reason 48).
    EptViolation {
        /// Exit qualification.
        qual: u64,
        /// Guest-physical address.
        gpa: u64,
        /// Guest linear address (valid when qualification bit 7 is set;
        /// with guest paging off and flat segments it equals `gpa`).
        gla: u64,
    },
    /// VMX EPT misconfiguration (exit reason 49).
    EptMisconfig {
        /// Guest-physical address.
        gpa: u64,
    },
    /// A guest exception was intercepted.
    Exception {
        /// Vector.
        vector: u8,
        /// Error code (or exit interruption information on VMX).
        error_code: u64,
        /// Guest RIP.
        rip: u64,
    },
    /// VM entry failed (SVM VMEXIT_INVALID, VMX VMfail or entry-failure exit).
    EntryFailed {
        /// Exit code / reason.
        code: u64,
        /// VM-instruction error or qualification.
        detail: u64,
    },
    /// Any other exit.
    Other {
        /// Exit code / reason.
        code: u64,
        /// Extra detail (qualification, EXITINFO1 or RIP).
        detail: u64,
    },
}

/// TLB invalidation before a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidate {
    /// None: whatever the CPU cached stays.
    None,
    /// Everything cached for this guest (SVM TLB_CONTROL=1, VMX INVEPT
    /// all-context).
    All,
    /// The translation of one guest-physical page (SVM INVLPGA in the
    /// guest's ASID, VMX single-context INVEPT for the current EPTP, the
    /// narrowest architectural EPT invalidation).
    Page(u64),
}

/// A virtualization extension running the test guest.
pub trait Hv {
    /// Install a nested root pointer (nCR3 or EPTP).
    fn set_root(&mut self, root_pointer: u64);
    /// Start the guest at `rip` with `regs` after invalidating `inv`.
    fn run(&mut self, rip: u64, regs: GuestRegs, inv: Invalidate) -> Exit;
    /// Continue the guest where it stopped (retrying a faulting access).
    fn resume(&mut self) -> Exit;
    /// The guest registers at the last exit.
    fn regs(&self) -> GuestRegs;
    /// Invalidate cached translations now (or on the next run for SVM).
    fn invalidate(&mut self, inv: Invalidate);
}
