//! The guest: a few 32-bit instructions in their own page-aligned section,
//! run with paging off so that only the nested table translates. Each entry
//! point does one access to the guest-physical address in EBX, then HLT
//! (intercepted on both SVM and VMX) ends the run. For an instruction fetch
//! the kernel writes a HLT at the target first, so a successful fetch also
//! ends in a HLT exit, at the target. One more entry point reads a run of
//! pages in a loop and checks each value ([`scan_entry`]).

use core::arch::global_asm;

global_asm!(
    r#"
    .section .guest, "ax"
    .code32
    .balign 4096
    .global guest_page
/* Each access instruction is 2 bytes long, so its HLT is at entry + 2. */
guest_page:
    .global guest_read
guest_read:
    movl (%ebx), %eax
    hlt
    .global guest_write
guest_write:
    movl %eax, (%ebx)
    hlt
    .global guest_exec
guest_exec:
    jmp *%ebx
/* Scan: ECX reads from EBX on, EBX advancing by SCAN_STRIDE, the value read
   at step i must be EDX + i; stops at the first mismatch (ECX then counts
   the reads left, EBX is the address read, EAX the value). */
    .global guest_scan
guest_scan:
1:  movl (%ebx), %eax
    cmpl %edx, %eax
    jne 2f
    addl $4104, %ebx
    incl %edx
    decl %ecx
    jnz 1b
2:
    .global guest_scan_hlt
guest_scan_hlt:
    hlt
    .balign 4096
    .code64
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static guest_page: u8;
    static guest_read: u8;
    static guest_write: u8;
    static guest_exec: u8;
    static guest_scan: u8;
    static guest_scan_hlt: u8;
}

/// Distance between two reads of the scan stub: one page and 8 bytes, so
/// read `i` of a scan from a page start is at offset `8 * i` of page `i`
/// (a distinct offset for each of 512 pages). Must match the stub.
pub const SCAN_STRIDE: u64 = 4096 + 8;

/// Guest-physical entry point of the scan stub.
pub fn scan_entry() -> u64 {
    &raw const guest_scan as u64
}

/// Guest-physical address of the scan stub's HLT.
pub fn scan_hlt() -> u64 {
    &raw const guest_scan_hlt as u64
}

/// One guest-side access kind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    /// `mov eax, [ebx]`.
    Read,
    /// `mov [ebx], eax`.
    Write,
    /// `jmp ebx` (then HLT at the target).
    Exec,
}

/// Physical address of the guest code page (identity-mapped as GPA).
pub fn code_page() -> u64 {
    &raw const guest_page as u64
}

/// Guest-physical entry point for `op`.
pub fn entry(op: Op) -> u64 {
    match op {
        Op::Read => &raw const guest_read as u64,
        Op::Write => &raw const guest_write as u64,
        Op::Exec => &raw const guest_exec as u64,
    }
}
