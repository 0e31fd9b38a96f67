//! A software model of the hardware's nested walk.
//!
//! [`translate`] does what the processor does with a guest-physical address
//! when the guest touches it: it walks the four levels from the root,
//! checks each entry for reserved bits and misconfiguration, accumulates
//! permissions, stops at a large leaf, checks the access against the
//! accumulated permission, sets accessed and dirty bits as the hardware sets
//! them, and returns the host-physical address, or the exact violation.
//!
//! It is the reference the tests compare the tables and real hardware (KVM,
//! QEMU's SVM, Bochs' VMX) against.
//!
//! Rules modelled, per format:
//!
//! - EPT (Intel SDM vol. 3C, "EPT Translation Mechanism", "EPT
//!   Misconfigurations", "EPT Violations", "Accessed and Dirty Flags for
//!   EPT"): an entry is present when any of bits 2:0 is set. A present entry
//!   is a misconfiguration when it allows write without read, execute
//!   without read on a processor without execute-only support, sets a
//!   reserved bit (address bits at or above MAXPHYADDR; bits 7:3 in a PML4E
//!   and in a PDPTE or PDE that references a table; bit 7 in a PML4E; the
//!   low address bits of a large leaf: 29:12 for 1 GiB, 20:12 for 2 MiB;
//!   bit 7 in a PDPTE without 1 GiB support), or, in a leaf, a reserved
//!   memory type (2, 3, 7). Misconfiguration is checked before
//!   permissions. The effective permission is the AND of bits 2:0 over the
//!   levels. With A/D enabled (EPTP bit 6) a successful walk sets bit 8 in
//!   every entry it used and, for a write, bit 9 in the leaf.
//! - NPT (AMD APM vol. 2, §15.25 "Nested Paging" and §5.3-5.4): the walk
//!   is a user-mode long-mode walk with EFER.NXE=1 and CR0.WP=1. P=0 stops
//!   it (not present). Reserved bits (address bits at or above MAXPHYADDR,
//!   PS in a PML4E, PS in a PDPE without 1 GiB support, and the low address
//!   bits 29:13 / 20:13 of a large leaf) give a reserved-bit fault. A write
//!   needs RW at every level, a fetch needs NX clear at every level, and
//!   every level needs US. A successful walk sets A in every entry and, for
//!   a write, D in the leaf.
//!
//! - VT-d second level (VT-d spec §3.6 "Second-Level Translation", §9.8,
//!   §7.1.3): an entry is present when R or W is set. Reserved bits (bit
//!   11 and bit 62 in legacy mode without snoop control or device IOTLBs,
//!   address bits at or above the host address width, PS in an SL-PML4E,
//!   PS without the matching SLLPS capability, the low address bits of a
//!   large leaf) are checked; a read without R gives fault reason 0x6 and
//!   a write without W 0x5, whether or not the entry is present (legacy
//!   mode has no separate not-present reason), checked at each level
//!   before the reserved fields (a refused access stops at the first level
//!   that refuses it), and 0xC for a reserved field. No accessed or dirty
//!   bits are set.
//! - AMD-Vi (AMD IOMMU spec §2.2.3): PR=0 stops the walk (an
//!   IO_PAGE_FAULT with PR clear). A PDE's Next Level must be the next
//!   lower level or 0 (a page of the PDE's level; 0 in a PML4-level entry
//!   and level skipping are not modelled and count as reserved, as does
//!   Next Level 7, a page of non-default size); address bits at or above
//!   the width are reserved. The permission is the AND of IR/IW over the
//!   levels, checked at each level first; a refused access is an
//!   IO_PAGE_FAULT with PE set.
//!
//! Open points, where the manuals do not settle what hardware does: whether
//! a walk that faults sets accessed bits in the upper entries it used (QEMU
//! does, Bochs does not). This model sets nothing on a faulting walk.

use core::sync::atomic::Ordering;

use crate::format::*;
use crate::pages::TablePages;
use crate::table::{entry_span, index, table_of};
use crate::{Access, FormatKind, Gpa, MemType, PageSize, Pfn, Prot, PteFormat};

/// A successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The host-physical address the guest-physical address maps to.
    pub hpa: u64,
    /// Size of the page the leaf maps.
    pub size: PageSize,
    /// Effective permission of the walk.
    pub prot: Prot,
    /// Memory type of the leaf, where the format encodes one.
    pub mem_type: Option<MemType>,
}

/// What went wrong.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ViolationKind {
    /// An entry on the path is not present.
    NotPresent,
    /// The walk completed but the permission does not allow the access.
    Permission,
    /// EPT: a present entry is misconfigured (an EPT misconfiguration exit,
    /// not an EPT violation).
    Misconfig,
    /// NPT: a reserved bit is set (a nested page fault with RSV=1); the
    /// IOMMU formats: a reserved field is not zero (VT-d reason 0xC,
    /// AMD-Vi IO_PAGE_FAULT with RZ).
    Reserved,
    /// An entry points outside the table pages the model can read; real
    /// hardware would read whatever memory is there.
    OutsideTables,
    /// IOMMU formats: the address is at or above the domain's width
    /// ([`PteFormat::gpa_limit`]; VT-d fault reason 0x4, "address beyond
    /// the adjusted guest address width").
    BeyondWidth,
}

/// A failed translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Violation {
    /// The kind of failure.
    pub kind: ViolationKind,
    /// Level of the entry that stopped the walk (4 = root .. 1 = PTE); for
    /// a permission violation, the leaf's level.
    pub level: u8,
    /// The access that failed.
    pub access: Access,
    /// Permission accumulated over the entries walked so far (for a
    /// not-present violation, over the present entries above it). This is
    /// what the EPT violation qualification reports in bits 5:3.
    pub effective: Prot,
}

impl Violation {
    /// The AMD #VMEXIT(NPF) EXITINFO1 error code for this violation, for
    /// the final translation of a guest access (bit 32; bit 33, "during a
    /// guest page-table walk", depends on guest paging state the model does
    /// not know and is never set): P (bit 0) set unless not present, W (bit 1)
    /// for writes, U (bit 2) always (nested walks are user accesses), RSV
    /// (bit 3) for reserved bits, ID (bit 4) for fetches.
    pub fn npt_error_code(&self) -> u64 {
        let mut ec = 1 << 2 | 1 << 32;
        if self.kind != ViolationKind::NotPresent {
            ec |= 1;
        }
        if self.access == Access::Write {
            ec |= 1 << 1;
        }
        if self.kind == ViolationKind::Reserved {
            ec |= 1 << 3;
        }
        if self.access == Access::Execute {
            ec |= 1 << 4;
        }
        ec
    }

    /// The VT-d fault reason (VT-d spec Appendix A, "Non-Recoverable Fault
    /// Reason Encodings") the remapping hardware records for this
    /// violation of a DMA through second-level tables: 0x5 a write without
    /// W, 0x6 a read without R (legacy mode reports a not-present entry as
    /// these too), 0xC a reserved field in a second-level entry, 0x7 an
    /// entry that could not be read (here: outside the table pages).
    pub fn vtd_fault_reason(&self) -> u8 {
        match self.kind {
            ViolationKind::Reserved | ViolationKind::Misconfig => 0xC,
            ViolationKind::BeyondWidth => 0x4,
            ViolationKind::OutsideTables => 0x7,
            ViolationKind::NotPresent | ViolationKind::Permission => {
                if self.access == Access::Write {
                    0x5
                } else {
                    0x6
                }
            }
        }
    }

    /// The flags of the AMD-Vi IO_PAGE_FAULT event (AMD IOMMU spec §2.5.3,
    /// "IO_PAGE_FAULT Event") for this violation, as bits of the event's
    /// flags field: PR (bit 4: the entry was present), RW (bit 5: a write),
    /// PE (bit 6: permission), RZ (bit 7: a reserved field not zero), TR
    /// (bit 8: a translation request; never set, these are DMA accesses).
    pub fn amd_vi_fault_flags(&self) -> u16 {
        let mut f = 0u16;
        if self.kind != ViolationKind::NotPresent {
            f |= 1 << 4;
        }
        if self.access == Access::Write {
            f |= 1 << 5;
        }
        if self.kind == ViolationKind::Permission {
            f |= 1 << 6;
        }
        if matches!(self.kind, ViolationKind::Reserved | ViolationKind::BeyondWidth) {
            f |= 1 << 7;
        }
        f
    }

    /// The low bits (5:0) of the Intel EPT-violation exit qualification:
    /// bit 0 read, bit 1 write, bit 2 fetch, bits 3-5 the effective read,
    /// write and execute permission of the translation. Bits 7-8 (guest
    /// linear address valid / translation of a linear address) depend on
    /// the guest's paging state and are left to the caller.
    pub fn ept_qualification(&self) -> u64 {
        let mut q = match self.access {
            Access::Read => 1,
            Access::Write => 2,
            Access::Execute => 4,
        };
        if self.effective.contains(Prot::READ) {
            q |= 1 << 3;
        }
        if self.effective.contains(Prot::WRITE) {
            q |= 1 << 4;
        }
        if self.effective.contains(Prot::EXEC) {
            q |= 1 << 5;
        }
        q
    }
}

/// Translates `gpa` for `access` through the table rooted at `root` (the
/// table's [`hw_root`](crate::NestedTable::hw_root)), as the hardware
/// would, setting accessed/dirty bits when `ad_enabled` (EPTP bit 6 for
/// EPT; NPT always sets them, whatever the flag).
pub fn translate<P: TablePages + ?Sized>(
    pages: &P,
    fmt: &PteFormat,
    root: Pfn,
    gpa: Gpa,
    access: Access,
    ad_enabled: bool,
) -> Result<Translation, Violation> {
    let npt = fmt.kind() == FormatKind::Npt;
    let iommu = fmt.is_iommu();
    let ad = npt || (ad_enabled && fmt.kind() == FormatKind::Ept);
    let mut effective = Prot::all();
    let mut used: [Option<&core::sync::atomic::AtomicU64>; 4] = [None; 4];
    let mut pfn = root;
    // `root` is the top table the hardware walks: for a three-level format
    // the level-3 table (`NestedTable::hw_root`).
    let mut level = fmt.levels();
    let fail = |kind, level, effective| Violation { kind, level, access, effective };
    if iommu && gpa.0 >= fmt.gpa_limit() {
        return Err(fail(ViolationKind::BeyondWidth, level, Prot::empty()));
    }
    loop {
        let Some(table) = table_of(pages, pfn) else {
            return Err(fail(ViolationKind::OutsideTables, level, effective));
        };
        let slot = &table[index(level, gpa.0)];
        let e = slot.load(Ordering::Acquire);
        let leaf = if iommu { iommu_leaf(fmt, e, level) } else { fmt.is_leaf(e, level) } && present_hw(fmt, e);
        if !present_hw(fmt, e) {
            // The not-present entry is part of the walk and grants nothing.
            return Err(fail(ViolationKind::NotPresent, level, Prot::empty()));
        }
        if iommu {
            // Both IOMMUs check the entry's permission before its reserved
            // fields, level by level (VT-d spec §7.1.3; QEMU's walkers do
            // the same), so a refused access stops at the first level that
            // refuses it.
            effective &= fmt.prot(e);
            if !effective.contains(access.prot()) {
                return Err(fail(ViolationKind::Permission, level, effective));
            }
            if reserved_iommu(fmt, e, level, leaf) {
                return Err(fail(ViolationKind::Reserved, level, effective));
            }
        } else if npt {
            if reserved_npt(fmt, e, level) {
                return Err(fail(ViolationKind::Reserved, level, effective));
            }
            let mut p = Prot::READ;
            p.set(Prot::WRITE, e & NPT_RW != 0);
            p.set(Prot::EXEC, e & NPT_NX == 0);
            if e & NPT_US == 0 {
                p = Prot::empty();
            }
            effective &= p;
        } else {
            if misconfig_ept(fmt, e, level, leaf) {
                return Err(fail(ViolationKind::Misconfig, level, effective));
            }
            let mut p = Prot::empty();
            p.set(Prot::READ, e & EPT_R != 0);
            p.set(Prot::WRITE, e & EPT_W != 0);
            p.set(Prot::EXEC, e & EPT_X != 0);
            effective &= p;
        }
        used[4 - level as usize] = Some(slot);
        if leaf || level == 1 {
            let size = PageSize::from_level(level).unwrap_or(PageSize::Size4K);
            let allowed = if npt && effective.is_empty() { false } else { effective.contains(access.prot()) };
            if !allowed {
                return Err(fail(ViolationKind::Permission, level, effective));
            }
            if ad {
                let (a, d) = if npt { (NPT_A, NPT_D) } else { (EPT_A, EPT_D) };
                for s in used.iter().flatten() {
                    if s.load(Ordering::Relaxed) & a == 0 {
                        s.fetch_or(a, Ordering::AcqRel);
                    }
                }
                if access == Access::Write {
                    slot.fetch_or(d, Ordering::AcqRel);
                }
            }
            let frame = fmt.frame_at_level(e, level);
            let hpa = frame.addr() + (gpa.0 & (size.bytes() - 1));
            return Ok(Translation { hpa, size, prot: effective, mem_type: fmt.mem_type(e) });
        }
        pfn = fmt.frame(e);
        level -= 1;
    }
}

/// Present as the hardware sees it (for the emulated format, the software
/// bits do not count: hardware R/W/X all clear is "not present").
fn present_hw(fmt: &PteFormat, e: u64) -> bool {
    match fmt.kind() {
        FormatKind::Npt => e & NPT_P != 0,
        FormatKind::VtdSecondLevel => e & (VTD_R | VTD_W) != 0,
        FormatKind::AmdVi => e & AMDVI_PR != 0,
        _ => e & (EPT_R | EPT_W | EPT_X) != 0,
    }
}

/// Whether a present IOMMU entry at `level` maps a page, as the IOMMU
/// decodes it: VT-d's PS bit below the top level; AMD-Vi's Next Level 0.
fn iommu_leaf(fmt: &PteFormat, e: u64, level: u8) -> bool {
    match fmt.kind() {
        FormatKind::AmdVi => level == 1 || (e & AMDVI_NEXT_MASK) >> AMDVI_NEXT_SHIFT == 0,
        _ => level == 1 || (level < 4 && e & VTD_PS != 0),
    }
}

/// Reserved fields of a present IOMMU entry (see the module doc).
fn reserved_iommu(fmt: &PteFormat, e: u64, level: u8, leaf: bool) -> bool {
    if e & high_reserved(fmt) != 0 {
        return true;
    }
    let caps = fmt.caps();
    let large_ok = |level: u8| level == 1 || level == 2 && caps.page_2m || level == 3 && caps.page_1g;
    let low_clear = |level: u8| level == 1 || e & (entry_span(level) - 1) & !0xfff == 0;
    match fmt.kind() {
        FormatKind::AmdVi => {
            let next = ((e & AMDVI_NEXT_MASK) >> AMDVI_NEXT_SHIFT) as u8;
            if leaf { !large_ok(level) || !low_clear(level) } else { next != level - 1 }
        }
        _ => {
            if e & (VTD_SNP | VTD_TM) != 0 || (level == 4 && e & VTD_PS != 0) {
                return true;
            }
            leaf && (!large_ok(level) || !low_clear(level))
        }
    }
}

/// Bits at or above MAXPHYADDR in the address field (bits 51:MAXPHYADDR).
fn high_reserved(fmt: &PteFormat) -> u64 {
    let width = fmt.caps().phys_bits as u32;
    ((1u64 << 52) - 1) & !((1u64 << width) - 1)
}

fn misconfig_ept(fmt: &PteFormat, e: u64, level: u8, leaf: bool) -> bool {
    let caps = fmt.caps();
    if e & EPT_W != 0 && e & EPT_R == 0 {
        return true;
    }
    if e & EPT_X != 0 && e & EPT_R == 0 && !caps.execute_only {
        return true;
    }
    if e & high_reserved(fmt) != 0 {
        return true;
    }
    if leaf {
        if level == 3 && !caps.page_1g || level == 2 && !caps.page_2m {
            return true;
        }
        let low = entry_span(level) - 1;
        if level > 1 && e & low & !0xfff != 0 {
            return true;
        }
        let mt = ((e & EPT_MT_MASK) >> EPT_MT_SHIFT) as u8;
        return matches!(mt, 2 | 3 | 7);
    }
    // Non-leaf: bits 7:3 reserved in PML4Es and in table-referencing
    // PDPTEs; bits 6:3 in table-referencing PDEs (bit 7 is the large bit).
    let rsvd = match level {
        4 | 3 => 0xf8,
        _ => 0x78,
    };
    e & rsvd != 0
}

fn reserved_npt(fmt: &PteFormat, e: u64, level: u8) -> bool {
    if e & high_reserved(fmt) != 0 {
        return true;
    }
    match level {
        4 => e & NPT_PS != 0,
        3 | 2 if e & NPT_PS != 0 => {
            if level == 3 && !fmt.caps().page_1g || level == 2 && !fmt.caps().page_2m {
                return true;
            }
            // Bit 12 is the PAT bit; bits above it up to the page size are
            // reserved.
            let low = entry_span(level) - 1;
            e & low & !0x1fff != 0
        }
        _ => false,
    }
}
