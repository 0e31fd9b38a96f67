//! DMA through Intel VT-d second-level tables built by nested-pt, checked
//! against the software model (`nested_pt::mmu::translate`).
//!
//! Under `qemu-system-x86_64 -machine q35 -device intel-iommu,aw-bits=48
//! -device edu`, the kernel finds QEMU's `edu` device on PCI bus 0, builds
//! a root table and a context table (legacy mode) whose entry for `edu`
//! points at a second-level table made by `NestedTable` in the VT-d format,
//! turns translation on, and has `edu`'s DMA engine copy between its
//! buffer and I/O virtual addresses. For every transfer the model predicts
//! where the bytes land (or the fault); the kernel checks the bytes at the
//! predicted host address (and that nothing reached memory on a fault) and,
//! for faults, the fault-recording register: reason, faulting page, source
//! id, request type. The remapping unit's registers are at QEMU's q35
//! address (0xFED9_0000); their layout is VT-d spec chapter 10.

use core::ptr::{read_volatile, write_volatile};

use nested_pt::mmu;
use nested_pt::{Access, Caps, Gpa, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat};

use crate::arena::ArenaPages;
use crate::io::{inl, outl};
use crate::kprintln;
use crate::layout::TEST_BASE;

/// VT-d remapping registers on QEMU's q35.
const DMAR: u64 = 0xFED9_0000;
const VER: u64 = 0x00;
const CAP: u64 = 0x08;
const ECAP: u64 = 0x10;
const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1C;
const RTADDR: u64 = 0x20;
const CCMD: u64 = 0x28;
const FECTL: u64 = 0x38;
/// GCMD/GSTS: translation enable, set root table pointer.
const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;

/// Root and context tables (one page each), clear of the nested-pt arena
/// and the test frames.
const ROOT_TABLE: u64 = 0x00F0_0000;
const CONTEXT_TABLE: u64 = 0x00F0_1000;
/// Domain id of the `edu` device's context entry.
const DOMAIN: u16 = 1;

/// `edu` (QEMU `hw/misc/edu.c`): DMA registers and its 4 KiB buffer.
const EDU_VENDOR_DEVICE: u32 = 0x11E8_1234;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_CNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
const EDU_BUF: u64 = 0x40000;

/// I/O virtual addresses (below `edu`'s 28-bit DMA mask).
const IOVA_4K: u64 = 0x0010_0000;
const IOVA_2M: u64 = 0x0040_0000;
const IOVA_HOLE: u64 = 0x0080_0000;
/// Host frames behind the mappings: the test region's first 4 KiB pages
/// and its second 2 MiB.
const HOST_4K: u64 = TEST_BASE;
const HOST_2M: u64 = TEST_BASE + 0x0020_0000;

fn mmio32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register (identity-mapped below 4 GiB).
    unsafe { read_volatile(addr as *const u32) }
}
fn mmio64(addr: u64) -> u64 {
    // SAFETY: as for `mmio32`.
    unsafe { read_volatile(addr as *const u64) }
}
fn wmmio32(addr: u64, v: u32) {
    // SAFETY: as for `mmio32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}
fn wmmio64(addr: u64, v: u64) {
    // SAFETY: as for `mmio32`.
    unsafe { write_volatile(addr as *mut u64, v) }
}
fn peek(addr: u64) -> u8 {
    // SAFETY: test frames and the tables are identity-mapped RAM the kernel
    // owns; DMA into them is what is being observed.
    unsafe { read_volatile(addr as *const u8) }
}
fn poke(addr: u64, v: u8) {
    // SAFETY: as for `peek`.
    unsafe { write_volatile(addr as *mut u8, v) }
}

fn pci_read(bdf: u16, off: u8) -> u32 {
    outl(0xCF8, 0x8000_0000 | (u32::from(bdf) << 8) | u32::from(off & 0xFC));
    inl(0xCFC)
}
fn pci_write(bdf: u16, off: u8, v: u32) {
    outl(0xCF8, 0x8000_0000 | (u32::from(bdf) << 8) | u32::from(off & 0xFC));
    outl(0xCFC, v);
}

/// The `edu` device on bus 0: (bus/device/function, BAR 0 address).
pub fn find_edu() -> Option<(u16, u64)> {
    (0..32u16).map(|d| d << 3).find(|&bdf| pci_read(bdf, 0) == EDU_VENDOR_DEVICE).map(|bdf| {
        let bar = u64::from(pci_read(bdf, 0x10) & !0xF);
        (bdf, bar)
    })
}

/// Whether a VT-d remapping unit answers at QEMU's q35 address.
fn vtd_present() -> bool {
    let v = mmio32(DMAR + VER);
    v != 0 && v != 0xFFFF_FFFF
}

/// Polls `done` a bounded number of times (a register the unit clears or
/// sets when a command completes).
fn wait(what: &str, done: impl Fn() -> bool) -> bool {
    for _ in 0..1_000_000 {
        if done() {
            return true;
        }
    }
    kprintln!("INFO timeout waiting for {what}");
    false
}

struct Vtd {
    iotlb: u64,
    frcd: u64,
}

impl Vtd {
    fn new() -> Vtd {
        let cap = mmio64(DMAR + CAP);
        let ecap = mmio64(DMAR + ECAP);
        Vtd { iotlb: DMAR + ((ecap >> 8) & 0x3FF) * 16 + 8, frcd: DMAR + ((cap >> 24) & 0x3FF) * 16 }
    }

    /// Global context-cache and IOTLB invalidation (VT-d spec §6.5).
    fn invalidate(&self) -> bool {
        wmmio64(DMAR + CCMD, 1 << 63 | 1 << 61);
        let a = wait("context invalidation", || mmio64(DMAR + CCMD) & (1 << 63) == 0);
        wmmio64(self.iotlb, 1 << 63 | 1 << 60);
        let b = wait("IOTLB invalidation", || mmio64(self.iotlb) & (1 << 63) == 0);
        a && b
    }

    /// The first fault-recording register: (reason, faulting page, source
    /// id, read) if one is recorded; clears it.
    fn take_fault(&self) -> Option<(u8, u64, u16, bool)> {
        let hi = mmio64(self.frcd + 8);
        if hi & (1 << 63) == 0 {
            return None;
        }
        let lo = mmio64(self.frcd);
        wmmio32(self.frcd + 12, 1 << 31);
        Some((((hi >> 32) & 0xFF) as u8, lo & !0xFFF, hi as u16, hi & (1 << 62) != 0))
    }
}

/// AMD-Vi registers on QEMU (its `amd-iommu` maps them at a fixed address).
const AMDVI: u64 = 0xFED8_0000;
const AMDVI_DEVTAB: u64 = 0x00;
const AMDVI_CMDBUF: u64 = 0x08;
const AMDVI_EVTLOG: u64 = 0x10;
const AMDVI_CONTROL: u64 = 0x18;
const AMDVI_EFR: u64 = 0x30;
const AMDVI_CMD_HEAD: u64 = 0x2000;
const AMDVI_CMD_TAIL: u64 = 0x2008;
const AMDVI_EVT_HEAD: u64 = 0x2010;
const AMDVI_EVT_TAIL: u64 = 0x2018;
/// Device table (two pages: device ids 0-255), command buffer and event
/// log (one page, 256 entries each).
const DEV_TABLE: u64 = 0x00F0_2000;
const CMD_BUF: u64 = 0x00F0_4000;
const EVT_LOG: u64 = 0x00F0_5000;

/// Whether an AMD-Vi unit answers at QEMU's address.
fn amdvi_present() -> bool {
    let v = mmio64(AMDVI + AMDVI_EFR);
    v != 0 && v != u64::MAX
}

struct AmdVi {
    cmd_tail: u64,
}

impl AmdVi {
    /// Queues INVALIDATE_IOMMU_PAGES for the whole of `DOMAIN` (AMD IOMMU
    /// spec §2.4.3; QEMU runs the command buffer when the tail moves).
    fn invalidate(&mut self) -> bool {
        let at = CMD_BUF + self.cmd_tail;
        // SAFETY: the command buffer is reserved RAM the kernel owns.
        unsafe {
            write_volatile(at as *mut u64, 0x3 << 60 | u64::from(DOMAIN) << 32);
            write_volatile((at + 8) as *mut u64, 0x7FFF_FFFF_FFFF_F000 | 0b11);
        }
        self.cmd_tail = (self.cmd_tail + 16) % 4096;
        wmmio64(AMDVI + AMDVI_CMD_TAIL, self.cmd_tail);
        wait("AMD-Vi command buffer", || mmio64(AMDVI + AMDVI_CMD_HEAD) == self.cmd_tail)
    }

    /// The next IO_PAGE_FAULT event, if one was logged: (event code and
    /// flags, address, device id).
    fn take_event(&self) -> Option<(u16, u64, u16)> {
        let head = mmio64(AMDVI + AMDVI_EVT_HEAD);
        if head == mmio64(AMDVI + AMDVI_EVT_TAIL) {
            return None;
        }
        // SAFETY: the event log is reserved RAM the IOMMU writes into.
        let (lo, hi) = unsafe {
            (read_volatile((EVT_LOG + head) as *const u64), read_volatile((EVT_LOG + head + 8) as *const u64))
        };
        wmmio64(AMDVI + AMDVI_EVT_HEAD, (head + 16) % 4096);
        Some(((lo >> 48) as u16, hi, lo as u16))
    }
}

/// The remapping unit under test.
enum Unit {
    Vtd(Vtd),
    AmdVi(AmdVi),
}

/// A recorded fault, as the unit reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rec {
    /// VT-d fault record: reason, faulting page, source id, read request.
    Vtd(u8, u64, u16, bool),
    /// AMD-Vi event: code (bits 15:12) and flags (11:0), address, device id.
    AmdVi(u16, u64, u16),
}

impl Unit {
    fn prefix(&self) -> &'static str {
        match self {
            Unit::Vtd(_) => "vtd",
            Unit::AmdVi(_) => "amdvi",
        }
    }
    fn invalidate(&mut self) -> bool {
        match self {
            Unit::Vtd(v) => v.invalidate(),
            Unit::AmdVi(a) => a.invalidate(),
        }
    }
    fn take_fault(&mut self) -> Option<Rec> {
        match self {
            Unit::Vtd(v) => v.take_fault().map(|(r, p, s, read)| Rec::Vtd(r, p, s, read)),
            Unit::AmdVi(a) => a.take_event().map(|(i, addr, d)| Rec::AmdVi(i, addr, d)),
        }
    }
}

struct Edu {
    bar: u64,
}

impl Edu {
    /// One DMA of `len` bytes between the device's buffer and `iova`:
    /// buffer to memory (`to_ram`) or memory to buffer. The buffer is
    /// reachable by DMA only (edu decodes registers, not the buffer, on its
    /// BAR).
    fn dma(&self, iova: u64, len: u64, to_ram: bool) -> bool {
        let (src, dst) = if to_ram { (EDU_BUF, iova) } else { (iova, EDU_BUF) };
        wmmio64(self.bar + EDU_DMA_SRC, src);
        wmmio64(self.bar + EDU_DMA_DST, dst);
        wmmio64(self.bar + EDU_DMA_CNT, len);
        wmmio64(self.bar + EDU_DMA_CMD, 1 | if to_ram { 2 } else { 0 });
        // The device runs the transfer from a 100 ms timer.
        for _ in 0..20_000_000u64 {
            if mmio64(self.bar + EDU_DMA_CMD) & 1 == 0 {
                return true;
            }
        }
        false
    }
}

/// A staging page mapped read-write, through which the device's buffer is
/// loaded and read back.
const IOVA_STAGE: u64 = IOVA_4K + 0xF000;
const HOST_STAGE: u64 = HOST_4K + 0xF000;

fn pattern(seed: u8, i: u64) -> u8 {
    seed ^ (i as u8).wrapping_mul(7)
}

struct Run {
    unit: Unit,
    edu: Edu,
    bdf: u16,
    table: NestedTable<ArenaPages>,
    failed: u32,
}

impl Run {
    fn predict(&self, iova: u64, write: bool) -> Result<u64, mmu::Violation> {
        let a = if write { Access::Write } else { Access::Read };
        mmu::translate(self.table.pages(), self.table.format(), self.table.hw_root(), Gpa(iova), a, false)
            .map(|t| t.hpa)
    }

    fn result(&mut self, name: &str, diffs: u32) {
        if diffs == 0 {
            kprintln!("RESULT {name} PASS");
        } else {
            self.failed += 1;
            kprintln!("RESULT {name} FAIL {diffs} disagreement(s)");
        }
    }

    /// A DMA through the staging page that must succeed (loading or
    /// reading back the device's buffer).
    fn stage(&mut self, name: &str, len: u64, to_ram: bool) -> bool {
        if self.edu.dma(IOVA_STAGE, len, to_ram) && self.unit.take_fault().is_none() {
            return true;
        }
        kprintln!("DIFF {name} the staging transfer failed");
        false
    }

    /// Compares a recorded fault with the model's prediction: the whole
    /// VT-d fault record, or the whole AMD-Vi event (code, flags, address,
    /// device id).
    fn check_fault(&self, name: &str, v: mmu::Violation, rec: Rec, iova: u64, read: bool) -> u32 {
        let want = match rec {
            Rec::Vtd(..) => Rec::Vtd(v.vtd_fault_reason(), iova & !0xFFF, self.bdf, read),
            Rec::AmdVi(..) => Rec::AmdVi(0x2 << 12 | v.amd_vi_fault_flags(), iova, self.bdf),
        };
        match (rec, want) {
            (r, w) if r == w => {
                kprintln!("CHECK {name} {iova:#x} fault {rec:x?} as predicted");
                0
            }
            _ => {
                kprintln!("DIFF {name} fault record {rec:x?}, model {want:x?}");
                1
            }
        }
    }

    /// AMD-Vi under QEMU 7.2 refuses a faulting DMA (nothing reaches
    /// memory; its `amdvi_page_fault` trace fires) but no IO_PAGE_FAULT
    /// entry reaches the event log (see `QEMU_AMDVI_NO_EVENT_LOGGED`): a
    /// predicted fault with no event is accepted under that name, with the
    /// write cases also checking that memory stayed untouched.
    fn amdvi_silent(&self, v: &mmu::Violation) -> bool {
        matches!(self.unit, Unit::AmdVi(_))
            && matches!(v.kind, mmu::ViolationKind::NotPresent | mmu::ViolationKind::Permission)
    }

    /// The device writes `len` bytes to `iova` (its buffer loaded first
    /// through the staging page); compared with the model: the bytes at the
    /// predicted host address, or the recorded fault and untouched memory
    /// at `watch`. `invalidate`: flush the IOTLB first (the clean case).
    fn write_case(&mut self, name: &str, iova: u64, len: u64, watch: u64, seed: u8) {
        self.write_case_with(name, iova, len, watch, seed, true)
    }

    fn write_case_with(&mut self, name: &str, iova: u64, len: u64, watch: u64, seed: u8, invalidate: bool) {
        for i in 0..len {
            poke(HOST_STAGE + i, pattern(seed, i));
        }
        if invalidate {
            self.unit.invalidate();
        }
        if !self.stage(name, len, false) {
            return self.result(name, 1);
        }
        for i in 0..len {
            poke(watch + i, 0xA5);
        }
        let pred = self.predict(iova, true);
        if !self.edu.dma(iova, len, true) {
            kprintln!("DIFF {name} DMA did not complete");
            return self.result(name, 1);
        }
        let mut diffs = 0;
        match (pred, self.unit.take_fault()) {
            (Ok(hpa), None) => {
                if let Some(i) = (0..len).find(|&i| peek(hpa + i) != pattern(seed, i)) {
                    kprintln!(
                        "DIFF {name} byte {i} at {:#x} is {:#x}, the device wrote {:#x}",
                        hpa + i,
                        peek(hpa + i),
                        pattern(seed, i)
                    );
                    diffs += 1;
                } else {
                    kprintln!("CHECK {name} write {iova:#x} landed at {hpa:#x} as predicted");
                }
            }
            (Err(v), Some(rec)) => {
                diffs += self.check_fault(name, v, rec, iova, false);
                if (0..len).any(|i| peek(watch + i) != 0xA5) {
                    kprintln!("DIFF {name} a faulting DMA changed memory at {watch:#x}");
                    diffs += 1;
                }
            }
            (Err(v), None) if self.amdvi_silent(&v) && (0..len).all(|i| peek(watch + i) == 0xA5) => {
                kprintln!(
                    "QUIRK {name} QEMU_AMDVI_NO_EVENT_LOGGED write refused, no event logged (model: {:?} at level {})",
                    v.kind,
                    v.level
                );
            }
            (Err(v), None)
                if matches!(self.unit, Unit::Vtd(_)) && !invalidate && (0..len).all(|i| peek(watch + i) == 0xA5) =>
            {
                // The write was refused (nothing reached memory) but no
                // fault was recorded: the translation came from the IOTLB.
                kprintln!(
                    "QUIRK {name} QEMU_VTD_IOTLB_HIT_NO_FAULT_RECORD write refused by a cached read-only translation, \
                     no fault recorded (model: reason {:#x})",
                    v.vtd_fault_reason()
                );
            }
            (p, f) => {
                kprintln!("DIFF {name} model {:?}, remapping unit recorded {f:x?}", p.map_err(|v| (v.kind, v.level)));
                diffs += 1;
            }
        }
        self.result(name, diffs);
    }

    /// The device reads `len` bytes from `iova` (then its buffer is read
    /// back through the staging page) and the bytes are compared with the
    /// memory at the predicted host address; or the recorded fault.
    fn read_case(&mut self, name: &str, iova: u64, len: u64, seed: u8) {
        let pred = self.predict(iova, false);
        if let Ok(hpa) = pred {
            for i in 0..len {
                poke(hpa + i, pattern(seed, i));
            }
        }
        self.unit.invalidate();
        if !self.edu.dma(iova, len, false) {
            kprintln!("DIFF {name} DMA did not complete");
            return self.result(name, 1);
        }
        let mut diffs = 0;
        match (pred, self.unit.take_fault()) {
            (Ok(hpa), None) => {
                for i in 0..len {
                    poke(HOST_STAGE + i, 0x5A);
                }
                if !self.stage(name, len, true) {
                    return self.result(name, 1);
                }
                if let Some(i) = (0..len).find(|&i| peek(HOST_STAGE + i) != pattern(seed, i)) {
                    kprintln!(
                        "DIFF {name} device read {:#x} at byte {i}, memory at {:#x} holds {:#x}",
                        peek(HOST_STAGE + i),
                        hpa + i,
                        pattern(seed, i)
                    );
                    diffs += 1;
                } else {
                    kprintln!("CHECK {name} read {iova:#x} came from {hpa:#x} as predicted");
                }
            }
            (Err(v), Some(rec)) => diffs += self.check_fault(name, v, rec, iova, true),
            (Err(v), None) if self.amdvi_silent(&v) => {
                kprintln!(
                    "QUIRK {name} QEMU_AMDVI_NO_EVENT_LOGGED read refused, no event logged (model: {:?} at level {})",
                    v.kind,
                    v.level
                );
            }
            (p, f) => {
                kprintln!("DIFF {name} model {:?}, remapping unit recorded {f:x?}", p.map_err(|v| (v.kind, v.level)));
                diffs += 1;
            }
        }
        self.result(name, diffs);
    }

    /// Sets `bits` in the leaf mapping `iova` for one write case, then
    /// restores it.
    fn with_leaf_bits(&mut self, name: &str, iova: u64, bits: u64, watch: u64) {
        let step = *self.table.walk(Gpa(iova)).steps().last().expect("walk has steps");
        let set = |t: &NestedTable<ArenaPages>, f: &dyn Fn(u64) -> u64| {
            let slot = t.entry(&step).expect("leaf slot");
            let v = slot.load(core::sync::atomic::Ordering::Relaxed);
            slot.store(f(v), core::sync::atomic::Ordering::Relaxed);
            v
        };
        let good = set(&self.table, &|v| v | bits);
        self.write_case(name, iova, 64, watch, 0x40);
        set(&self.table, &|_| good);
    }

    /// ANDs the entry at `level` on the walk of `iova` with `keep` for one
    /// read case (reads stage after the transfer, so the staging page's
    /// walk may share the entry), then restores it.
    fn with_table_entry(&mut self, name: &str, iova: u64, level: u8, keep: u64) {
        let w = self.table.walk(Gpa(iova));
        let step = *w.steps().iter().find(|s| s.level == level).expect("level on the walk");
        let slot = self.table.entry(&step).expect("table slot");
        let good = slot.load(core::sync::atomic::Ordering::Relaxed);
        slot.store(good & keep, core::sync::atomic::Ordering::Relaxed);
        self.read_case(name, iova, 64, 0x5C);
        let slot = self.table.entry(&step).expect("table slot");
        slot.store(good, core::sync::atomic::Ordering::Relaxed);
        self.unit.invalidate();
    }
}

/// Turns VT-d remapping on for `edu` through `table` (root entry for bus
/// 0, context entry for `edu`: VT-d spec §9.1, §9.3, §10.4).
fn enable_vtd(fmt: &PteFormat, table: &NestedTable<ArenaPages>, bdf: u16) -> Option<Vtd> {
    for a in (ROOT_TABLE..CONTEXT_TABLE + 0x1000).step_by(8) {
        // SAFETY: the two table pages are reserved RAM the kernel owns.
        unsafe { write_volatile(a as *mut u64, 0) };
    }
    let ce = fmt.vtd_context_entry(table.root(), DOMAIN);
    // SAFETY: as above; entries are 16 bytes, devfn < 256.
    unsafe {
        write_volatile(ROOT_TABLE as *mut u64, CONTEXT_TABLE | 1);
        let at = CONTEXT_TABLE + u64::from(bdf & 0xFF) * 16;
        write_volatile(at as *mut u64, ce[0]);
        write_volatile((at + 8) as *mut u64, ce[1]);
    }
    let vtd = Vtd::new();
    // Fault interrupts masked: faults are read from the recording register.
    wmmio32(DMAR + FECTL, 1 << 31);
    wmmio64(DMAR + RTADDR, ROOT_TABLE);
    wmmio32(DMAR + GCMD, SRTP);
    let ok = wait("root table pointer", || mmio32(DMAR + GSTS) & SRTP != 0) && vtd.invalidate();
    wmmio32(DMAR + GCMD, TE);
    if !ok || !wait("translation enable", || mmio32(DMAR + GSTS) & TE != 0) {
        kprintln!("PANIC cannot enable DMA remapping (GSTS {:#x})", mmio32(DMAR + GSTS));
        return None;
    }
    Some(vtd)
}

/// Turns AMD-Vi translation on for `edu` through `table`: its device-table
/// entry (AMD IOMMU spec §2.2.2), the command buffer and the event log
/// (§3.3.x registers), then the control register's IOMMU, event-log and
/// command-buffer enables.
fn enable_amdvi(fmt: &PteFormat, table: &NestedTable<ArenaPages>, bdf: u16) -> Option<AmdVi> {
    for a in (DEV_TABLE..EVT_LOG + 0x1000).step_by(8) {
        // SAFETY: device table, command buffer and event log are reserved
        // RAM the kernel owns.
        unsafe { write_volatile(a as *mut u64, 0) };
    }
    let dte = fmt.amd_vi_device_table_entry(table.root(), DOMAIN);
    for (k, q) in dte.iter().enumerate() {
        // SAFETY: as above; 32-byte entries, device id < 256.
        unsafe { write_volatile((DEV_TABLE + u64::from(bdf) * 32 + k as u64 * 8) as *mut u64, *q) };
    }
    wmmio64(AMDVI + AMDVI_DEVTAB, DEV_TABLE | 1);
    wmmio64(AMDVI + AMDVI_CMDBUF, CMD_BUF | 8 << 56);
    wmmio64(AMDVI + AMDVI_EVTLOG, EVT_LOG | 8 << 56);
    wmmio64(AMDVI + AMDVI_CMD_HEAD, 0);
    wmmio64(AMDVI + AMDVI_CMD_TAIL, 0);
    wmmio64(AMDVI + AMDVI_EVT_HEAD, 0);
    wmmio64(AMDVI + AMDVI_EVT_TAIL, 0);
    wmmio64(AMDVI + AMDVI_CONTROL, 1 | 1 << 2 | 1 << 12);
    let mut a = AmdVi { cmd_tail: 0 };
    if !a.invalidate() {
        kprintln!("PANIC the AMD-Vi command buffer does not run");
        return None;
    }
    Some(a)
}

/// Runs the DMA scenarios if this machine has `edu` and a VT-d or AMD-Vi
/// unit. Returns the number of failed scenarios, or `None` when not
/// applicable (no `edu`: the nested-paging suite runs instead).
pub fn run() -> Option<u32> {
    let (bdf, bar) = find_edu()?;
    // Memory space and bus mastering on.
    pci_write(bdf, 0x04, pci_read(bdf, 0x04) | 0x6);
    let (fmt, caps) = if vtd_present() {
        let cap = mmio64(DMAR + CAP);
        let sllps = (cap >> 34) & 0xF;
        let mgaw = ((cap >> 16) & 0x3F) + 1;
        let sagaw = (cap >> 8) & 0x1F;
        kprintln!(
            "INFO arch=vtd version={:#x} cap={cap:#x} ecap={:#x} mgaw={mgaw} sagaw={sagaw:#x} sllps={sllps:#x} edu={bdf:#x} bar={bar:#x}",
            mmio32(DMAR + VER),
            mmio64(DMAR + ECAP)
        );
        if sagaw & 0b100 == 0 {
            kprintln!("PANIC the remapping unit has no 4-level (48-bit) walk (start QEMU with aw-bits=48)");
            return Some(1);
        }
        let caps =
            Caps { page_2m: sllps & 1 != 0, page_1g: sllps & 2 != 0, execute_only: false, phys_bits: mgaw as u8 };
        (PteFormat::vtd(caps), caps)
    } else if amdvi_present() {
        kprintln!("INFO arch=amdvi efr={:#x} edu={bdf:#x} bar={bar:#x}", mmio64(AMDVI + AMDVI_EFR));
        let caps = Caps { page_2m: true, page_1g: true, execute_only: false, phys_bits: 48 };
        (PteFormat::amd_vi(caps), caps)
    } else {
        kprintln!("PANIC edu found but no VT-d unit at {DMAR:#x} and no AMD-Vi unit at {AMDVI:#x}");
        return Some(1);
    };
    let mut table = NestedTable::new(fmt, ArenaPages::new()).expect("I/O page table");
    table.populate_region(Gpa(0), 2 << 20, PageSize::Size4K).expect("populate 4K");
    table.map(Gpa(IOVA_4K), Pfn(HOST_4K >> 12), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("map rw");
    table
        .map(Gpa(IOVA_4K + 0x1000), Pfn((HOST_4K >> 12) + 1), PageSize::Size4K, Prot::READ, MemType::WriteBack)
        .expect("map ro");
    table
        .map(Gpa(IOVA_STAGE), Pfn(HOST_STAGE >> 12), PageSize::Size4K, Prot::RW, MemType::WriteBack)
        .expect("map the staging page");
    if caps.page_2m {
        table.populate_region(Gpa(IOVA_2M), 2 << 20, PageSize::Size2M).expect("populate 2M");
        table.map(Gpa(IOVA_2M), Pfn(HOST_2M >> 12), PageSize::Size2M, Prot::RW, MemType::WriteBack).expect("map 2M");
    }
    let unit = if fmt.kind() == nested_pt::FormatKind::VtdSecondLevel {
        Unit::Vtd(enable_vtd(&fmt, &table, bdf)?)
    } else {
        Unit::AmdVi(enable_amdvi(&fmt, &table, bdf)?)
    };
    let p = unit.prefix();
    let mut r = Run { unit, edu: Edu { bar }, bdf, table, failed: 0 };
    if let Some(stale) = r.unit.take_fault() {
        kprintln!("INFO a fault was recorded before the first transfer: {stale:x?}");
    }
    let n = |what: &str| alloc::format!("{p}-{what}");

    r.write_case(&n("dma-write-4k"), IOVA_4K + 0x100, 256, HOST_4K + 0x100, 0x11);
    r.read_case(&n("dma-read-4k"), IOVA_4K + 0x300, 128, 0x22);
    r.read_case(&n("dma-read-ro-4k"), IOVA_4K + 0x1040, 64, 0x33);
    // Right after the read: the read-only translation is in the IOTLB.
    r.write_case_with(&n("write-ro-after-cached-read"), IOVA_4K + 0x1080, 64, HOST_4K + 0x1080, 0x34, false);
    r.write_case(&n("fault-write-ro-4k"), IOVA_4K + 0x1080, 64, HOST_4K + 0x1080, 0x44);
    r.write_case(&n("fault-write-not-present-l1"), IOVA_4K + 0x2000, 64, HOST_4K + 0x2000, 0x55);
    r.read_case(&n("fault-read-not-present-l1"), IOVA_4K + 0x2000, 64, 0x66);
    r.write_case(&n("fault-write-not-present-l2"), IOVA_HOLE, 64, HOST_4K + 0x3000, 0x77);
    r.read_case(&n("fault-read-not-present-l4"), 1 << 40, 64, 0x88);
    if caps.page_2m {
        r.write_case(&n("dma-write-2m"), IOVA_2M + 0x12_3400, 256, HOST_2M + 0x12_3400, 0x99);
        r.read_case(&n("dma-read-2m"), IOVA_2M + 0x1F_F000, 64, 0xAA);
    } else {
        kprintln!("RESULT {p}-dma-write-2m SKIP the unit offers no 2 MiB pages");
        kprintln!("RESULT {p}-dma-read-2m SKIP the unit offers no 2 MiB pages");
    }
    // A present table entry made not present by clearing only its present
    // bits (VT-d R/W, AMD-Vi PR): a non-zero entry the walk must refuse.
    r.with_table_entry(&n("fault-pde-not-present"), IOVA_4K + 0x5000, 2, !fmt.present_mask());
    if matches!(r.unit, Unit::Vtd(_)) {
        r.with_leaf_bits(&n("fault-rsv-bit11"), IOVA_4K + 0x400, 1 << 11, HOST_4K + 0x400);
        r.with_leaf_bits(&n("fault-rsv-high-addr"), IOVA_4K + 0x500, 1 << 50, HOST_4K + 0x500);
    } else {
        // QEMU 7.2's AMD-Vi walk checks no reserved field; without a
        // refusal to compare there is nothing to run.
        kprintln!("RESULT {p}-fault-rsv-high-addr SKIP QEMU's AMD-Vi does not check reserved fields");
    }
    // Unmap, invalidate the IOTLB, and the next transfer faults.
    r.write_case(&n("unmap-before"), IOVA_4K + 0x600, 64, HOST_4K + 0x600, 0xBB);
    r.table.unmap(Gpa(IOVA_4K)).expect("unmap");
    r.write_case(&n("unmap-invalidate"), IOVA_4K + 0x700, 64, HOST_4K + 0x700, 0xCC);
    if matches!(r.unit, Unit::Vtd(_)) {
        vtd_three_level(&mut r, bdf, caps);
    }
    Some(r.failed)
}

/// The same device through a three-level (39-bit) second-level table:
/// the context entry's AW field and pointer switch to the table's
/// `hw_root`, the level-3 table.
fn vtd_three_level(r: &mut Run, bdf: u16, caps: Caps) {
    let fmt = PteFormat::vtd_3level(caps);
    let mut t = NestedTable::new(fmt, ArenaPages::new()).expect("three-level table");
    t.populate_region(Gpa(0), 2 << 20, PageSize::Size4K).expect("populate");
    t.map(Gpa(IOVA_4K), Pfn((HOST_4K >> 12) + 8), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("map");
    t.map(Gpa(IOVA_STAGE), Pfn(HOST_STAGE >> 12), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("stage");
    let ce = fmt.vtd_context_entry(t.hw_root(), DOMAIN);
    let at = CONTEXT_TABLE + u64::from(bdf & 0xFF) * 16;
    // SAFETY: the context table is reserved RAM the kernel owns.
    unsafe {
        write_volatile(at as *mut u64, 0);
        write_volatile((at + 8) as *mut u64, ce[1]);
        write_volatile(at as *mut u64, ce[0]);
    }
    kprintln!("INFO vtd three-level table: top {:#x}, context entry {:x?}", t.hw_root().addr(), ce);
    r.table = t;
    r.write_case("vtd39-dma-write-4k", IOVA_4K + 0x100, 128, HOST_4K + 0x8100, 0x71);
    r.read_case("vtd39-dma-read-4k", IOVA_4K + 0x200, 128, 0x72);
    r.read_case("vtd39-fault-read-not-present-l3", 0x40_0000_0000, 64, 0x73);
    r.read_case("vtd39-fault-beyond-width", 1 << 40, 64, 0x74);
}
