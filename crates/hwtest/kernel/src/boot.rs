//! Boot path shared by both emulators: a BIOS boot sector that loads the rest
//! of the image with INT 13h extended reads, enters 32-bit protected mode,
//! builds an identity map of the first 4 GiB with 2 MiB pages, enters long
//! mode and calls `kmain`. One disk image boots under QEMU (SeaBIOS) and
//! Bochs (its own BIOS), so there is one boot path to trust, not two.
//!
//! Fixed low-memory use: 0x1000-0x6FFF boot page tables (PML4, PDPT, 4 PDs),
//! below 0x7C00 the real-mode stack.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .boot, "ax"
    .code16
    .global boot_start
boot_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7C00, %sp
    ljmp $0, $1f
1:
    movb %dl, boot_drive
    movw $__load_sectors, %ax
    movw %ax, load_left
2:
    movw load_left, %ax
    testw %ax, %ax
    jz 4f
    movw $64, %bx
    cmpw %bx, %ax
    jae 3f
    movw %ax, %bx
3:
    movw %bx, dap_count
    movw $dap, %si
    movb boot_drive, %dl
    movb $0x42, %ah
    int $0x13
    jc disk_error
    movw dap_count, %bx
    subw %bx, load_left
    movzwl %bx, %ebx
    addl %ebx, dap_lba
    shlw $5, %bx
    addw %bx, dap_seg
    jmp 2b
4:
    inb $0x92, %al
    orb $2, %al
    andb $0xFE, %al
    outb %al, $0x92
    lgdtl gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $entry32
disk_error:
    movb $'E', %al
    outb %al, $0xE9
    movw $0x3F8, %dx
    outb %al, %dx
5:  hlt
    jmp 5b

    .balign 8
    .global gdt
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF  /* 0x08: 32-bit code */
    .quad 0x00CF93000000FFFF  /* 0x10: data */
    .quad 0x00AF9B000000FFFF  /* 0x18: 64-bit code */
    .quad 0x00CF93000000FFFF  /* 0x20: data (64-bit use) */
    .quad 0, 0                /* 0x28: TSS, filled in by kmain */
gdt_end:
    .balign 4
    .global gdt_desc
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0
dap:
    .byte 0x10, 0
dap_count:
    .word 0
    .word 0           /* offset */
dap_seg:
    .word 0x07E0
dap_lba:
    .quad 1
load_left:
    .word 0
boot_drive:
    .byte 0
    .org 510
    .byte 0x55, 0xAA

    .section .text.entry32, "ax"
    .code32
entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $0x7C00, %esp
    /* zero 0x1000..0x7000 */
    movl $0x1000, %edi
    movl $(0x6000 / 4), %ecx
    xorl %eax, %eax
    rep stosl
    movl $0x2003, 0x1000          /* PML4[0] -> PDPT */
    movl $0x3003, 0x2000          /* PDPT[0..4] -> PD0..PD3 */
    movl $0x4003, 0x2008
    movl $0x5003, 0x2010
    movl $0x6003, 0x2018
    movl $0x3000, %edi
    xorl %ecx, %ecx
6:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax               /* P | RW | PS */
    movl %eax, (%edi)
    movl %ecx, %eax
    shrl $11, %eax                /* high dword: bits 32+ of the address */
    movl %eax, 4(%edi)
    addl $8, %edi
    incl %ecx
    cmpl $2048, %ecx
    jb 6b
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax              /* LME | NXE */
    wrmsr
    movl %cr0, %eax
    andl $~(1 << 2), %eax                          /* no EM */
    orl $((1 << 31) | (1 << 1) | (1 << 5) | 1), %eax /* PG | MP | NE | PE */
    movl %eax, %cr0
    ljmpl $0x18, $entry64

    .code64
entry64:
    movw $0x20, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $__bss_start, %rdi
    movabsq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movabsq $boot_stack_top, %rsp
    call kmain
7:  hlt
    jmp 7b

    .section .bss.boot_stack, "aw", @nobits
    .balign 16
boot_stack:
    .skip 0x10000
boot_stack_top:
"#,
    options(att_syntax)
);
