//! The guest runtime: where it lives in the vmspace and what it contains.
//!
//! The runtime is a boot ROM mapped read-only and executable (GDT, the TSSes,
//! the IDT and the code of [`guest`](crate::guest)), plus per-vCPU data pages
//! mapped read-write and non-executable (parameter block, user stack, kernel
//! stack) and per-vCPU ledger bitmaps. All of it sits in the second 512 GiB
//! of the vmspace (PML4 slot 1), so the guest's data range (slot 0) shares no
//! table page with it: the accessed bits the runtime's own accesses set never
//! land on an entry a test inspects.
//!
//! The CPU never writes the ROM: segment descriptors are created with their
//! accessed bit set and the TSS descriptor busy, and the vCPU's segment and
//! task registers are loaded directly with `KVM_SET_SREGS` (no `ltr`).

use crate::guest::{DOORBELL_OFFSET, FIRST_INTR_VECTOR, FLUSH_VECTOR, GuestCode};
/// Bytes in a page.
const PAGE: u64 = 4096;

/// Base of the runtime in the vmspace (512 GiB: PML4 slot 1).
pub const RT_BASE: u64 = 0x80_0000_0000;
/// GDT page.
pub const GDT: u64 = RT_BASE;
/// Two pages of TSSes, 128 bytes apart.
pub const TSS_AREA: u64 = RT_BASE + PAGE;
/// IDT page.
pub const IDT: u64 = RT_BASE + 3 * PAGE;
/// First code page.
pub const CODE: u64 = RT_BASE + 4 * PAGE;
/// ROM size (GDT, TSS, IDT, code).
pub const ROM_PAGES: u64 = 8;
/// Where a VM's boot ROM goes: just below 4 GiB, as bhyve maps its
/// "bootrom" device-memory segment (the ROM is position-independent: the
/// GDT, TSSes, IDT and code are placed relative to its base).
pub const BOOTROM_BASE: u64 = (1 << 32) - ROM_PAGES * PAGE;
/// Where `vmm run` maps guest RAM: from 4 GiB up, clear of the boot ROM,
/// the ECAM window and the 32-bit PCI window below 4 GiB.
pub const RAM_BASE: u64 = 1 << 32;
/// Offset of the TSS area in the ROM.
pub const TSS_OFF: u64 = PAGE;
/// Offset of the IDT in the ROM.
pub const IDT_OFF: u64 = 3 * PAGE;
/// Offset of the first code page in the ROM.
pub const CODE_OFF: u64 = 4 * PAGE;
/// Most vCPUs the runtime has room for.
pub const MAX_VCPUS: usize = 64;
/// Per-vCPU data area base.
pub const DATA_BASE: u64 = RT_BASE + 0x10_0000;
/// Pages of per-vCPU data: parameter block, 3 user stack, 4 kernel stack.
pub const DATA_PAGES: u64 = 8;
/// Stride between vCPUs' data areas: the data pages, then the doorbell
/// page (never mapped) and a gap.
pub const DATA_STRIDE: u64 = 16 * PAGE;
/// Per-vCPU ledger area base.
pub const LEDGER_BASE: u64 = RT_BASE + 0x1000_0000;
/// IDT limit: all 256 vectors (exceptions, the flush vector, and the
/// external-interrupt stubs of [`FIRST_INTR_VECTOR`]`..=255`).
pub const IDT_LIMIT: u16 = 256 * 16 - 1;

/// Guest address of vCPU `i`'s parameter block.
pub fn params(i: usize) -> u64 {
    DATA_BASE + i as u64 * DATA_STRIDE
}

/// Guest address of vCPU `i`'s doorbell page.
pub fn doorbell(i: usize) -> u64 {
    params(i) + DOORBELL_OFFSET
}

/// Top of vCPU `i`'s user stack.
pub fn user_stack_top(i: usize) -> u64 {
    params(i) + 4 * PAGE
}

/// Top of vCPU `i`'s kernel stack (TSS.RSP0).
pub fn kernel_stack_top(i: usize) -> u64 {
    params(i) + DATA_PAGES * PAGE
}

/// Guest address of vCPU `i`'s TSS in a ROM at `rom_base`.
pub fn tss_at(rom_base: u64, i: usize) -> u64 {
    rom_base + TSS_OFF + i as u64 * 128
}

/// Guest address of vCPU `i`'s TSS (ROM at [`RT_BASE`]).
pub fn tss(i: usize) -> u64 {
    TSS_AREA + i as u64 * 128
}

/// Bytes of one vCPU's ledger bitmap for `npages` region pages (whole pages).
pub fn ledger_bytes(npages: u64) -> u64 {
    npages.div_ceil(8).div_ceil(PAGE).max(1) * PAGE
}

/// Guest address of vCPU `i`'s ledger when each has `npages` pages.
pub fn ledger(i: usize, npages: u64) -> u64 {
    LEDGER_BASE + i as u64 * ledger_bytes(npages)
}

/// GDT limit for `n` vCPUs.
pub fn gdt_limit(n: usize) -> u16 {
    (0x28 + 16 * n as u64 - 1) as u16
}

fn put(img: &mut [u8], off: u64, bytes: &[u8]) {
    img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
}

/// Builds the ROM image for `nvcpus` vCPUs to be mapped at [`RT_BASE`]
/// (read-only and executable): [`rom_image_at`] with that base.
pub fn rom_image(code: &GuestCode, nvcpus: usize) -> Vec<u8> {
    rom_image_at(code, nvcpus, RT_BASE)
}

/// Builds the ROM image (`ROM_PAGES` pages: GDT, TSSes, IDT, code) for
/// `nvcpus` vCPUs, to be mapped read-only and executable at `base`.
pub fn rom_image_at(code: &GuestCode, nvcpus: usize, base: u64) -> Vec<u8> {
    assert!(nvcpus <= MAX_VCPUS);
    assert!(code.bytes.len() as u64 <= (ROM_PAGES - 4) * PAGE, "guest code too large");
    let code_at = base + CODE_OFF;
    let mut img = vec![0u8; (ROM_PAGES * PAGE) as usize];
    // GDT: null, kernel code, kernel data, user data, user code; accessed set.
    let gdt: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        put(&mut img, (i * 8) as u64, &d.to_le_bytes());
    }
    for i in 0..nvcpus {
        let tss = tss_at(base, i);
        let limit = 0x67u64;
        // 64-bit TSS descriptor, type 0xB (busy), present.
        let lo = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        let hi = tss >> 32;
        let off = 0x28 + 16 * i as u64;
        put(&mut img, off, &lo.to_le_bytes());
        put(&mut img, off + 8, &hi.to_le_bytes());
        // TSS: RSP0 at +4, I/O map base at +0x66 beyond the limit.
        let t = tss - base;
        put(&mut img, t + 4, &kernel_stack_top(i).to_le_bytes());
        put(&mut img, t + 0x66, &0x68u16.to_le_bytes());
    }
    // IDT: exceptions to their stubs, #PF to the fault stub, 0x40 to flush.
    let gate = |img: &mut [u8], v: u64, target: u64| {
        // Interrupt gate, DPL 0, present.
        let lo = (target & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((target >> 16) & 0xffff) << 48);
        let hi = target >> 32;
        put(img, IDT_OFF + v * 16, &lo.to_le_bytes());
        put(img, IDT_OFF + v * 16 + 8, &hi.to_le_bytes());
    };
    for v in 0..32u64 {
        let target = if v == 14 { code_at + code.pf_stub } else { code_at + code.exc_stubs + v * 8 };
        gate(&mut img, v, target);
    }
    // External interrupts: each vector's logging stub (interrupt gates, so
    // IF is clear in the stub).
    for v in u64::from(FIRST_INTR_VECTOR)..256 {
        if v != u64::from(FLUSH_VECTOR) {
            gate(&mut img, v, code_at + code.intr_stubs + (v - u64::from(FIRST_INTR_VECTOR)) * 8);
        }
    }
    gate(&mut img, u64::from(FLUSH_VECTOR), code_at + code.flush_stub);
    put(&mut img, CODE_OFF, code.bytes);
    img
}

/// The long-mode set-up of vCPU `i` of `nvcpus` with the ROM at
/// `rom_base`: CPL 3 at the workload entry with this vCPU's stack,
/// parameter block and TSS, CR3 = `cr3`.
pub fn long_mode_setup(code: &GuestCode, i: usize, nvcpus: usize, cr3: u64, rom_base: u64) -> crate::hv::LongModeSetup {
    crate::hv::LongModeSetup {
        cr3,
        gdt: (rom_base, gdt_limit(nvcpus)),
        idt: (rom_base + IDT_OFF, IDT_LIMIT),
        tss: tss_at(rom_base, i),
        index: i as u16,
        rip: rom_base + CODE_OFF + code.entry,
        rsp: user_stack_top(i),
        rdi: params(i),
    }
}
