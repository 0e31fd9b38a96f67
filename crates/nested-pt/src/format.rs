//! Entry formats: Intel EPT (hardware or emulated accessed/dirty bits),
//! AMD NPT, and the I/O page tables of the two IOMMUs (Intel VT-d second
//! level, AMD-Vi), described by values so one walker serves all of them.
//!
//! Sources. Intel: SDM vol. 3C, chapter "VMX Support for Address
//! Translation", section "EPT Translation Mechanism" (the tables "Format of
//! an EPT PML4 Entry" through "Format of an EPT Page-Table Entry"), section
//! "Accessed and Dirty Flags for EPT", section "EPT and Memory Typing", and
//! the VMCS field "Extended-Page-Table Pointer (EPTP)". AMD: APM vol. 2,
//! section 15.25 "Nested Paging" (nested walks are user-level accesses in the
//! host's long-mode format) and section 5.4 "Page-Translation-Table Entry
//! Fields". Intel VT-d: "Intel Virtualization Technology for Directed I/O
//! Architecture Specification" (rev. 3.x), section 9.8 "Second-Level Paging
//! Entries" (legacy-mode remapping: the context entry of section 9.3 points
//! at a second-level table), section 3.6 "Second-Level Translation" and
//! section 7.1.3 with Appendix A for the fault reasons. AMD-Vi: "AMD I/O
//! Virtualization Technology (IOMMU) Specification" (pub. 48882), section
//! 2.2.3 "I/O Page Tables for Host Translations" (the PDE and PTE formats)
//! and section 2.2.2 "Device Table Entry Format".
//!
//! The IOMMU formats are walked with four levels (VT-d with a 48-bit
//! adjusted guest address width, AMD-Vi in paging mode 4); they have no
//! execute permission and, in the modes used here (VT-d legacy mode,
//! AMD-Vi host page tables without HA/HD), no accessed or dirty bits.

use crate::{Error, MemType, PageSize, Pfn, Prot};

// ---- Intel EPT (SDM vol. 3C, "EPT Translation Mechanism") ----

/// EPT bit 0: read access allowed.
pub(crate) const EPT_R: u64 = 1 << 0;
/// EPT bit 1: write access allowed.
pub(crate) const EPT_W: u64 = 1 << 1;
/// EPT bit 2: instruction fetch allowed (supervisor fetches when
/// mode-based execute control is on; we do not enable it).
pub(crate) const EPT_X: u64 = 1 << 2;
/// EPT bits 5:3 of a leaf: the memory type (SDM "EPT and Memory Typing").
pub(crate) const EPT_MT_SHIFT: u32 = 3;
/// EPT memory-type field mask.
pub(crate) const EPT_MT_MASK: u64 = 7 << EPT_MT_SHIFT;
/// EPT bit 6 of a leaf: ignore the guest PAT, use the EPT memory type alone.
pub(crate) const EPT_IPAT: u64 = 1 << 6;
/// EPT bit 7 of a PDPTE/PDE: the entry maps a 1 GiB / 2 MiB page.
pub(crate) const EPT_LARGE: u64 = 1 << 7;
/// EPT bit 8: accessed (set by hardware when EPTP bit 6 enables A/D).
pub(crate) const EPT_A: u64 = 1 << 8;
/// EPT bit 9 of a leaf: dirty (set by hardware when A/D is enabled).
pub(crate) const EPT_D: u64 = 1 << 9;
/// EPTP bits 2:0: memory type for the paging structures (6 = write-back).
const EPTP_MT_WB: u64 = 6;
/// EPTP bits 5:3: page-walk length minus one (3 for four levels).
const EPTP_WALK4: u64 = 3 << 3;
/// EPTP bit 6: enable accessed and dirty flags.
pub(crate) const EPTP_AD: u64 = 1 << 6;

// ---- EPT with emulated A/D (software bits in the ignored range 52-62) ----

/// Software bit 52: the mapping allows reads (and is present).
pub(crate) const SW_R: u64 = 1 << 52;
/// Software bit 53: the mapping allows writes.
pub(crate) const SW_W: u64 = 1 << 53;
/// Software bit 54: the mapping allows instruction fetches.
pub(crate) const SW_X: u64 = 1 << 54;
/// Software bit 55: the page was written, saved when "accessed" was reset
/// (clearing hardware R forces clearing hardware W, which records writes).
pub(crate) const SW_DIRTY: u64 = 1 << 55;

// ---- AMD NPT (APM vol. 2 §5.4, long-mode entries) ----

/// Bit 0: present.
pub(crate) const NPT_P: u64 = 1 << 0;
/// Bit 1: read/write (writes allowed when set at every level).
pub(crate) const NPT_RW: u64 = 1 << 1;
/// Bit 2: user/supervisor; nested walks are user accesses, so it is set at
/// every level (APM §15.25.5).
pub(crate) const NPT_US: u64 = 1 << 2;
/// Bit 3: page-level write-through (PAT index bit 0).
pub(crate) const NPT_PWT: u64 = 1 << 3;
/// Bit 4: page-level cache disable (PAT index bit 1).
pub(crate) const NPT_PCD: u64 = 1 << 4;
/// Bit 5: accessed.
pub(crate) const NPT_A: u64 = 1 << 5;
/// Bit 6 of a leaf: dirty.
pub(crate) const NPT_D: u64 = 1 << 6;
/// Bit 7 of a PDPE/PDE: page size (1 GiB / 2 MiB leaf).
pub(crate) const NPT_PS: u64 = 1 << 7;
/// Bit 63: no-execute (with EFER.NXE, which the hypervisor sets).
pub(crate) const NPT_NX: u64 = 1 << 63;

// ---- Intel VT-d second-level paging entries (VT-d spec §9.8) ----

/// VT-d bit 0 (R): DMA reads allowed; a second-level entry is present when
/// R or W is set.
pub(crate) const VTD_R: u64 = 1 << 0;
/// VT-d bit 1 (W): DMA writes allowed.
pub(crate) const VTD_W: u64 = 1 << 1;
/// VT-d bit 7 (PS) of an SL-PDPE / SL-PDE: the entry maps a 1 GiB / 2 MiB
/// page (reserved in an SL-PML4E; allowed per the SLLPS field of the
/// capability register).
pub(crate) const VTD_PS: u64 = 1 << 7;
/// VT-d bit 11: SNP (snoop) in revisions 1.x-2.x, reserved in legacy mode
/// from revision 3.0 and without snoop control (ECAP.SC); never set here,
/// checked as reserved by the model.
pub(crate) const VTD_SNP: u64 = 1 << 11;
/// VT-d bit 62: TM (transient mapping) in revisions 1.x-2.x, for device
/// IOTLBs (ECAP.DT); reserved otherwise; never set here, checked as
/// reserved by the model.
pub(crate) const VTD_TM: u64 = 1 << 62;

// ---- AMD-Vi I/O page-table entries (AMD IOMMU spec §2.2.3) ----

/// AMD-Vi bit 0 (PR): present.
pub(crate) const AMDVI_PR: u64 = 1 << 0;
/// AMD-Vi bits 8:7 are ignored by the IOMMU; bit 7 marks a large leaf for
/// the walker (which finds large leaves by bit 7 in every format). The
/// hardware meaning of a large leaf is Next Level = 0 in a PDE.
pub(crate) const AMDVI_SW_LARGE: u64 = 1 << 7;
/// AMD-Vi bits 11:9 (Next Level): the level of the table the entry points
/// at, 0 for a page (PTE; a page of the entry's level size in a PDE), 7 for
/// a page of non-default size (not used here).
pub(crate) const AMDVI_NEXT_SHIFT: u32 = 9;
/// Next Level field mask (bit 60, FC "force coherent", is never set here).
pub(crate) const AMDVI_NEXT_MASK: u64 = 7 << AMDVI_NEXT_SHIFT;
/// AMD-Vi bit 61 (IR): DMA reads allowed (ANDed over the levels).
pub(crate) const AMDVI_IR: u64 = 1 << 61;
/// AMD-Vi bit 62 (IW): DMA writes allowed (ANDed over the levels).
pub(crate) const AMDVI_IW: u64 = 1 << 62;

/// The constant facts of one entry format, for code specialized per format.
///
/// The public API keeps formats as run-time values ([`PteFormat`]); the hot
/// paths read the value's kind once per call and run a copy of the walker
/// specialized for it (see `with_kind!`), so the present, dirty and
/// permission bits are immediates there instead of fields reloaded from the
/// value. Widths that depend on the processor (the address mask) stay
/// run-time values.
pub(crate) trait Kind {
    /// The bits of which any one makes an entry present.
    const PRESENT: u64;
    /// The bits that mean "dirty" in a leaf.
    const DIRTY: u64;
    /// 1 when the leaf `e` is dirty, else 0.
    #[inline(always)]
    fn dirty_bit(e: u64) -> u64 {
        if Self::DIRTY.count_ones() == 1 {
            (e >> Self::DIRTY.trailing_zeros()) & 1
        } else {
            (e & Self::DIRTY != 0) as u64
        }
    }
    /// The protection a present leaf grants.
    fn prot(e: u64) -> Prot;
    /// The permission and memory-type bits of a leaf for a protection the
    /// format accepted ([`PteFormat::check_prot`]), with the large-page bit
    /// when `large`.
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error>;
}

/// Intel EPT with hardware accessed/dirty bits.
pub(crate) struct EptK;
/// Intel EPT with emulated accessed/dirty bits.
pub(crate) struct EptEmuK;
/// AMD NPT.
pub(crate) struct NptK;
/// Intel VT-d second-level tables.
pub(crate) struct VtdK;
/// AMD-Vi I/O page tables.
pub(crate) struct AmdViK;

/// Only write-back: neither IOMMU format encodes a memory type in the
/// modes used here (DMA is snooped; VT-d's EMT bits apply to nested
/// translation only).
#[inline(always)]
fn iommu_mem_type(mt: MemType) -> Result<(), Error> {
    if mt == MemType::WriteBack { Ok(()) } else { Err(Error::BadMemType) }
}

impl Kind for VtdK {
    const PRESENT: u64 = VTD_R | VTD_W;
    const DIRTY: u64 = 0;
    #[inline(always)]
    fn prot(e: u64) -> Prot {
        // Bits 0-1 are R and W, the order of `Prot`'s bits; no execute.
        Prot::from_bits_truncate((e & 3) as u8)
    }
    #[inline(always)]
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error> {
        iommu_mem_type(mt)?;
        Ok((prot.bits() as u64 & 3) | if large { VTD_PS } else { 0 })
    }
}

impl Kind for AmdViK {
    const PRESENT: u64 = AMDVI_PR;
    const DIRTY: u64 = 0;
    #[inline(always)]
    fn prot(e: u64) -> Prot {
        // IR and IW are bits 61 and 62: READ and WRITE.
        Prot::from_bits_truncate(((e >> 61) & 3) as u8)
    }
    #[inline(always)]
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error> {
        const _: () = assert!(AMDVI_IR == 1 << 61 && AMDVI_IW == 1 << 62);
        iommu_mem_type(mt)?;
        // Next Level 0: a page of this entry's level.
        Ok(AMDVI_PR | (prot.bits() as u64 & 3) << 61 | if large { AMDVI_SW_LARGE } else { 0 })
    }
}

/// The EPT memory-type, ignore-PAT and large-page bits of a leaf.
#[inline(always)]
fn ept_leaf_bits(mt: MemType, large: bool) -> u64 {
    ((mt as u64) << EPT_MT_SHIFT) | EPT_IPAT | if large { EPT_LARGE } else { 0 }
}

impl Kind for EptK {
    const PRESENT: u64 = EPT_R | EPT_W | EPT_X;
    const DIRTY: u64 = EPT_D;
    #[inline(always)]
    fn prot(e: u64) -> Prot {
        // Bits 0-2 are R, W, X, the order of `Prot`'s bits.
        Prot::from_bits_truncate((e & 7) as u8)
    }
    #[inline(always)]
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error> {
        Ok(ept_leaf_bits(mt, large) | (prot.bits() as u64 & 7))
    }
}

impl Kind for EptEmuK {
    const PRESENT: u64 = EPT_R | EPT_W | EPT_X | SW_R | SW_X;
    const DIRTY: u64 = EPT_W | SW_DIRTY;
    #[inline(always)]
    fn prot(e: u64) -> Prot {
        // Bits 52-54 are R, W, X, the order of `Prot`'s bits.
        Prot::from_bits_truncate(((e >> 52) & 7) as u8)
    }
    #[inline(always)]
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error> {
        const _: () = assert!(SW_R == 1 << 52 && SW_W == 1 << 53 && SW_X == 1 << 54);
        Ok(ept_leaf_bits(mt, large) | (prot.bits() as u64 & 7) << 52)
    }
}

impl Kind for NptK {
    const PRESENT: u64 = NPT_P;
    const DIRTY: u64 = NPT_D;
    #[inline(always)]
    fn prot(e: u64) -> Prot {
        let mut p = Prot::empty();
        p.set(Prot::READ, e & NPT_P != 0);
        p.set(Prot::WRITE, e & NPT_RW != 0);
        p.set(Prot::EXEC, e & NPT_NX == 0);
        p
    }
    #[inline(always)]
    fn leaf_bits(prot: Prot, mt: MemType, large: bool) -> Result<u64, Error> {
        let mut e = NPT_P | NPT_US;
        if prot.contains(Prot::WRITE) {
            e |= NPT_RW;
        }
        if !prot.contains(Prot::EXEC) {
            e |= NPT_NX;
        }
        // With the power-on PAT (index 0 WB, 1 WT, 3 UC).
        e |= match mt {
            MemType::WriteBack => 0,
            MemType::WriteThrough => NPT_PWT,
            MemType::Uncacheable => NPT_PWT | NPT_PCD,
            MemType::WriteCombining | MemType::WriteProtected => {
                return Err(Error::BadMemType);
            }
        };
        if large {
            e |= NPT_PS;
        }
        Ok(e)
    }
}

/// Runs `$body` with the type `$K` bound to the [`Kind`] of `$fmt`'s
/// format: one `match` per call, and a copy of `$body` specialized for
/// each format.
macro_rules! with_kind {
    ($fmt:expr, $K:ident => $body:expr) => {
        match $fmt.kind() {
            $crate::FormatKind::Ept => {
                type $K = $crate::format::EptK;
                $body
            }
            $crate::FormatKind::EptEmulatedAd => {
                type $K = $crate::format::EptEmuK;
                $body
            }
            $crate::FormatKind::Npt => {
                type $K = $crate::format::NptK;
                $body
            }
            $crate::FormatKind::VtdSecondLevel => {
                type $K = $crate::format::VtdK;
                $body
            }
            $crate::FormatKind::AmdVi => {
                type $K = $crate::format::AmdViK;
                $body
            }
        }
    };
}
pub(crate) use with_kind;

/// Which entry format a [`PteFormat`] describes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FormatKind {
    /// Intel EPT; accessed/dirty bits 8/9 set by hardware when EPTP bit 6
    /// is set.
    Ept,
    /// Intel EPT on a processor without EPT A/D: software bits 52-54 hold
    /// the permission, hardware R/W double as accessed/modified, and the
    /// first access and first write of a page fault to software.
    EptEmulatedAd,
    /// AMD NPT: the x86-64 long-mode entry format walked as user accesses.
    Npt,
    /// Intel VT-d second-level I/O page tables (legacy-mode remapping,
    /// four levels: a 48-bit adjusted guest address width): R and W bits,
    /// PS for large pages, no execute, no accessed/dirty bits.
    VtdSecondLevel,
    /// AMD-Vi I/O page tables (paging mode 4): PR, IR/IW, the Next Level
    /// field in every entry, no execute, no accessed/dirty bits.
    AmdVi,
}

/// What the processor (or emulator) offers for a format.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Caps {
    /// 2 MiB leaves (PDE with the large-page bit).
    pub page_2m: bool,
    /// 1 GiB leaves (PDPTE with the large-page bit).
    pub page_1g: bool,
    /// EPT entries with execute but not read permission (Intel: IA32_VMX_EPT_VPID_CAP
    /// bit 0). Never offered by NPT, where present implies readable.
    pub execute_only: bool,
    /// Host physical-address width (MAXPHYADDR), 36..=52.
    pub phys_bits: u8,
}

impl Default for Caps {
    /// Everything a current processor offers: 2 MiB and 1 GiB pages,
    /// execute-only EPT, 46-bit physical addresses.
    fn default() -> Self {
        Caps { page_2m: true, page_1g: true, execute_only: true, phys_bits: 46 }
    }
}

/// One entry format with its capabilities; masks are fields, not constants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PteFormat {
    kind: FormatKind,
    /// Levels the hardware walks (4; 3 for a 39-bit VT-d domain).
    levels: u8,
    /// `1 << (12 + 9 * levels)`, kept so that a walk's range check is one
    /// compare with a field (see [`gpa_limit`](Self::gpa_limit)).
    limit: u64,
    caps: Caps,
    addr_mask: u64,
    present: u64,
    accessed: u64,
    dirty: u64,
}

impl PteFormat {
    fn new(kind: FormatKind, mut caps: Caps) -> Self {
        caps.phys_bits = caps.phys_bits.clamp(36, 52);
        if kind != FormatKind::Ept && kind != FormatKind::EptEmulatedAd {
            caps.execute_only = false;
        }
        let addr_mask = ((1u64 << caps.phys_bits) - 1) & !0xfff;
        let (accessed, dirty) = match kind {
            FormatKind::Ept => (EPT_A, EPT_D),
            FormatKind::EptEmulatedAd => (EPT_R | EPT_X, EPT_W | SW_DIRTY),
            FormatKind::Npt => (NPT_A, NPT_D),
            FormatKind::VtdSecondLevel | FormatKind::AmdVi => (0, 0),
        };
        let present = match kind {
            FormatKind::Ept => EPT_R | EPT_W | EPT_X,
            FormatKind::EptEmulatedAd => EPT_R | EPT_W | EPT_X | SW_R | SW_X,
            FormatKind::Npt => NPT_P,
            FormatKind::VtdSecondLevel => VTD_R | VTD_W,
            FormatKind::AmdVi => AMDVI_PR,
        };
        PteFormat { kind, levels: 4, limit: 1 << 48, caps, addr_mask, present, accessed, dirty }
    }

    /// Intel EPT with hardware accessed/dirty bits.
    pub fn ept(caps: Caps) -> Self {
        Self::new(FormatKind::Ept, caps)
    }
    /// Intel EPT with software-emulated accessed/dirty bits.
    pub fn ept_emulated_ad(caps: Caps) -> Self {
        Self::new(FormatKind::EptEmulatedAd, caps)
    }
    /// AMD NPT (execute-only is never available).
    pub fn npt(caps: Caps) -> Self {
        Self::new(FormatKind::Npt, caps)
    }
    /// Intel VT-d second-level I/O page tables, four levels. `caps.page_2m`
    /// and `page_1g` are the SLLPS bits of the capability register,
    /// `phys_bits` the host address width; execute-only does not apply.
    pub fn vtd(caps: Caps) -> Self {
        Self::new(FormatKind::VtdSecondLevel, caps)
    }
    /// Intel VT-d second-level tables walked with **three** levels (an
    /// adjusted guest address width of 39 bits, SAGAW bit 1): I/O virtual
    /// addresses below 512 GiB. The tree keeps its four-level shape; the
    /// level-3 table under the root's entry 0 is the top table the
    /// remapping unit walks ([`NestedTable::hw_root`](crate::NestedTable::hw_root)),
    /// created with the table and never freed, and every operation refuses
    /// addresses at or above [`gpa_limit`](Self::gpa_limit).
    pub fn vtd_3level(caps: Caps) -> Self {
        let mut f = Self::new(FormatKind::VtdSecondLevel, caps);
        f.levels = 3;
        f.limit = 1 << 39;
        f
    }
    /// Levels the hardware walks: 4, or 3 for [`vtd_3level`](Self::vtd_3level).
    pub fn levels(&self) -> u8 {
        self.levels
    }
    /// The first address the hardware walk cannot translate: 2^48 for four
    /// levels, 2^39 for three.
    #[inline(always)]
    pub fn gpa_limit(&self) -> u64 {
        self.limit
    }
    /// AMD-Vi I/O page tables, paging mode 4 (four levels); execute-only
    /// does not apply.
    pub fn amd_vi(caps: Caps) -> Self {
        Self::new(FormatKind::AmdVi, caps)
    }
    /// True for the IOMMU formats (tables walked by an IOMMU for DMA, not
    /// by a processor).
    pub fn is_iommu(&self) -> bool {
        matches!(self.kind, FormatKind::VtdSecondLevel | FormatKind::AmdVi)
    }
    /// The format's kind.
    pub fn kind(&self) -> FormatKind {
        self.kind
    }
    /// The capabilities this instance was created with.
    pub fn caps(&self) -> Caps {
        self.caps
    }
    /// True when hardware sets accessed/dirty bits itself (EPT with A/D
    /// enabled in the EPTP, NPT). With emulated A/D, software records them
    /// on faults; the IOMMU formats have none.
    pub fn hw_ad(&self) -> bool {
        matches!(self.kind, FormatKind::Ept | FormatKind::Npt)
    }
    /// True when the format can report dirty pages at all: the processor
    /// formats can (the emulated one through write faults); the IOMMU
    /// formats cannot (no dirty bits, and a DMA fault cannot be retried).
    pub fn can_track_dirty(&self) -> bool {
        !self.is_iommu()
    }
    /// True when leaves of `size` can be mapped.
    pub fn supports(&self, size: PageSize) -> bool {
        match size {
            PageSize::Size4K => true,
            PageSize::Size2M => self.caps.page_2m,
            PageSize::Size1G => self.caps.page_1g,
        }
    }
    /// Mask of the address field of an entry (bits 12..MAXPHYADDR).
    pub fn addr_mask(&self) -> u64 {
        self.addr_mask
    }
    /// Frame numbers this format can express: `0 .. frame_limit()` (the
    /// address field is bits 12..MAXPHYADDR). A frame at or above the limit
    /// would be masked into another frame, so every operation that puts a
    /// frame into an entry refuses it with [`Error::OutOfRange`], and users
    /// that hand frames to the table (memory objects, table-page providers)
    /// check them against this first.
    pub fn frame_limit(&self) -> u64 {
        1u64 << (self.caps.phys_bits - 12)
    }
    /// Whether `pfn` (and so every byte of its page) is expressible:
    /// `pfn < frame_limit()`.
    pub fn frame_fits(&self, pfn: Pfn) -> bool {
        pfn.0 < self.frame_limit()
    }
    /// The bits of which any one makes an entry present.
    pub fn present_mask(&self) -> u64 {
        self.present
    }
    /// The bits that mean "accessed" in a leaf.
    pub fn accessed_mask(&self) -> u64 {
        self.accessed
    }
    /// The bits that mean "dirty" in a leaf.
    pub fn dirty_mask(&self) -> u64 {
        self.dirty
    }

    /// A non-leaf entry pointing at the table page `table`, or
    /// [`Error::OutOfRange`] when the frame does not fit the address field
    /// ([`frame_fits`](Self::frame_fits)): the frame is never masked into
    /// another one.
    ///
    /// The entry is one at the top level (4): only AMD-Vi entries name the
    /// level of the table they point at; [`table_entry_at`](Self::table_entry_at)
    /// gives the entry for any level.
    pub fn table_entry(&self, table: Pfn) -> Result<u64, Error> {
        self.table_entry_at(table, 4)
    }

    /// A non-leaf entry at `level` (2 to 4) pointing at the table page
    /// `table` (a table of level `level - 1`): full permission, as the
    /// permission of a walk is the AND over its levels. AMD-Vi writes
    /// `level - 1` into the Next Level field; the other formats do not
    /// depend on the level. Errors as [`table_entry`](Self::table_entry),
    /// and [`Error::OutOfRange`] for a level outside 2 to 4.
    pub fn table_entry_at(&self, table: Pfn, level: u8) -> Result<u64, Error> {
        if !self.frame_fits(table) || !(2..=4).contains(&level) {
            return Err(Error::OutOfRange);
        }
        let addr = table.addr();
        Ok(match self.kind {
            FormatKind::Ept | FormatKind::EptEmulatedAd => addr | EPT_R | EPT_W | EPT_X,
            FormatKind::Npt => addr | NPT_P | NPT_RW | NPT_US,
            FormatKind::VtdSecondLevel => addr | VTD_R | VTD_W,
            FormatKind::AmdVi => addr | AMDVI_PR | AMDVI_IR | AMDVI_IW | (u64::from(level - 1) << AMDVI_NEXT_SHIFT),
        })
    }

    /// A leaf entry mapping `pfn` as a page of `size` with `prot` and memory
    /// type `mt`. Accessed and dirty start clear; in the emulated format the
    /// hardware bits start clear too, so the first access faults.
    #[inline]
    pub fn leaf_entry(&self, pfn: Pfn, size: PageSize, prot: Prot, mt: MemType) -> Result<u64, Error> {
        with_kind!(self, K => self.leaf_entry_k::<K>(pfn, size, prot, mt))
    }

    /// [`leaf_entry`](Self::leaf_entry) for the format kind `K` (which must
    /// be this format's).
    #[inline(always)]
    pub(crate) fn leaf_entry_k<K: Kind>(
        &self,
        pfn: Pfn,
        size: PageSize,
        prot: Prot,
        mt: MemType,
    ) -> Result<u64, Error> {
        if !self.supports(size) {
            return Err(Error::UnsupportedSize);
        }
        if pfn.0 & (size.pages() - 1) != 0 {
            return Err(Error::Unaligned);
        }
        // `pfn < frame_limit()` is exactly "pfn * 4096 fits the address
        // field" (and excludes the multiplication overflowing).
        if !self.frame_fits(pfn) {
            return Err(Error::OutOfRange);
        }
        self.check_prot(prot)?;
        Ok((pfn.0 << 12) | K::leaf_bits(prot, mt, size != PageSize::Size4K)?)
    }

    /// Checks that the format can express `prot`.
    /// The IOMMU formats have no execute permission: a protection with
    /// [`Prot::EXEC`] is refused there.
    pub fn check_prot(&self, prot: Prot) -> Result<(), Error> {
        if prot.is_empty() || (prot.contains(Prot::WRITE) && !prot.contains(Prot::READ)) {
            return Err(Error::BadProt);
        }
        if self.is_iommu() && prot.contains(Prot::EXEC) {
            return Err(Error::BadProt);
        }
        if !prot.contains(Prot::READ) && !self.caps.execute_only {
            return Err(Error::BadProt);
        }
        Ok(())
    }

    /// True when the entry is present: it maps a page or points at a table.
    /// For the emulated format a leaf is present when software says so,
    /// whatever the hardware bits.
    #[inline(always)]
    pub fn is_present(&self, e: u64) -> bool {
        e & self.present != 0
    }

    /// True when a present entry at `level` (1 = PTE .. 4 = PML4E) is a leaf.
    /// For AMD-Vi this is the walker's marker (bit 7, ignored by the
    /// IOMMU), which every large leaf this crate writes carries beside
    /// Next Level = 0; the software MMU decodes Next Level itself.
    #[inline(always)]
    pub fn is_leaf(&self, e: u64, level: u8) -> bool {
        // EPT's large-page bit, NPT's PS bit, VT-d's PS bit and our AMD-Vi
        // marker are all bit 7.
        const _: () = assert!(EPT_LARGE == NPT_PS && EPT_LARGE == VTD_PS && EPT_LARGE == AMDVI_SW_LARGE);
        match level {
            1 => true,
            2 | 3 => e & EPT_LARGE != 0,
            _ => false,
        }
    }

    /// The frame the entry points at (its first 4 KiB frame for a leaf).
    #[inline(always)]
    pub fn frame(&self, e: u64) -> Pfn {
        Pfn((e & self.addr_mask) >> 12)
    }

    /// The frame a leaf at `level` maps, ignoring the low address bits that
    /// are reserved or PAT in large leaves.
    #[inline(always)]
    pub fn frame_at_level(&self, e: u64, level: u8) -> Pfn {
        let low = match level {
            3 => (1u64 << 30) - 1,
            2 => (1u64 << 21) - 1,
            _ => 0xfff,
        };
        Pfn((e & self.addr_mask & !low) >> 12)
    }

    /// The protection a present leaf grants (the software permission for
    /// the emulated format).
    #[inline]
    pub fn prot(&self, e: u64) -> Prot {
        with_kind!(self, K => K::prot(e))
    }

    /// The memory type of a leaf (NPT: decoded from PWT/PCD with the
    /// power-on PAT; the IOMMU formats encode none).
    pub fn mem_type(&self, e: u64) -> Option<MemType> {
        match self.kind {
            FormatKind::VtdSecondLevel | FormatKind::AmdVi => None,
            FormatKind::Npt => Some(match e & (NPT_PWT | NPT_PCD) {
                0 => MemType::WriteBack,
                NPT_PWT => MemType::WriteThrough,
                _ => MemType::Uncacheable,
            }),
            _ => MemType::from_bits(((e & EPT_MT_MASK) >> EPT_MT_SHIFT) as u8),
        }
    }

    /// True when the leaf's accessed state is set.
    #[inline(always)]
    pub fn accessed(&self, e: u64) -> bool {
        e & self.accessed != 0
    }
    /// True when the leaf's dirty state is set.
    #[inline(always)]
    pub fn dirty(&self, e: u64) -> bool {
        e & self.dirty != 0
    }

    /// The bits to OR into a leaf to record `access` as the hardware would
    /// (accessed, plus dirty for writes), or `None` when the leaf's
    /// permission does not allow the access. For the emulated format these
    /// are the hardware permission bits that stop the next access from
    /// faulting.
    pub fn access_bits(&self, e: u64, access: crate::Access) -> Option<u64> {
        if !self.prot(e).contains(access.prot()) {
            return None;
        }
        let write = access == crate::Access::Write;
        Some(match self.kind {
            FormatKind::Ept => EPT_A | if write { EPT_D } else { 0 },
            FormatKind::Npt => NPT_A | if write { NPT_D } else { 0 },
            FormatKind::VtdSecondLevel | FormatKind::AmdVi => 0,
            FormatKind::EptEmulatedAd => {
                let mut b = 0;
                if e & SW_R != 0 {
                    b |= EPT_R;
                }
                if e & SW_X != 0 {
                    b |= EPT_X;
                }
                if write {
                    b |= EPT_W;
                }
                b
            }
        })
    }

    /// The bits to OR into a leaf to mark it dirty without granting access
    /// the mapping does not have (for the emulated format, software bit 55
    /// rather than the hardware W bit).
    pub fn set_dirty_bits(&self) -> u64 {
        match self.kind {
            FormatKind::Ept => EPT_D,
            FormatKind::EptEmulatedAd => SW_DIRTY,
            FormatKind::Npt => NPT_D,
            FormatKind::VtdSecondLevel | FormatKind::AmdVi => 0,
        }
    }

    /// The leaf value after clearing "accessed". For the emulated format,
    /// clearing hardware R forces clearing hardware W and X (write without
    /// read is a misconfiguration), so a set W is saved in the software
    /// dirty bit.
    pub(crate) fn clear_accessed(&self, e: u64) -> u64 {
        match self.kind {
            FormatKind::EptEmulatedAd => {
                let saved = if e & EPT_W != 0 { SW_DIRTY } else { 0 };
                (e & !(EPT_R | EPT_W | EPT_X)) | saved
            }
            _ => e & !self.accessed,
        }
    }

    /// The bits set in a leaf to mark it accessed without the access itself
    /// (emulated format: the permission's hardware read/execute bits).
    pub(crate) fn set_accessed_bits(&self, e: u64) -> u64 {
        match self.kind {
            FormatKind::EptEmulatedAd => {
                (if e & SW_R != 0 { EPT_R } else { 0 }) | (if e & SW_X != 0 { EPT_X } else { 0 })
            }
            _ => self.accessed,
        }
    }

    /// The root pointer hardware is given: the EPTP (write-back paging
    /// structures, four-level walk, A/D enable bit 6 when `track_dirty` and
    /// the format has hardware A/D) or nCR3 (the root's address).
    ///
    /// `root` must fit the format ([`frame_fits`](Self::frame_fits)); the
    /// root of a [`NestedTable`](crate::NestedTable) always does (`new`
    /// refuses any other). Address bits of a frame that does not fit are
    /// dropped, so such a pointer names another page.
    pub fn root_pointer(&self, root: Pfn, track_dirty: bool) -> u64 {
        let addr = root.addr() & self.addr_mask;
        match self.kind {
            FormatKind::Ept => addr | EPTP_MT_WB | EPTP_WALK4 | if track_dirty { EPTP_AD } else { 0 },
            FormatKind::EptEmulatedAd => addr | EPTP_MT_WB | EPTP_WALK4,
            FormatKind::Npt | FormatKind::VtdSecondLevel | FormatKind::AmdVi => addr,
        }
    }

    /// A VT-d legacy-mode context entry (VT-d spec §9.3) translating the
    /// function's untranslated requests through the second-level table at
    /// `root` (the table's [`hw_root`](crate::NestedTable::hw_root)) for
    /// domain `domain`: low qword = SLPTPTR | TT 00b | P, high qword =
    /// DID << 8 | AW (010b: 48-bit, four-level walk; 001b: 39-bit,
    /// three-level).
    pub fn vtd_context_entry(&self, root: Pfn, domain: u16) -> [u64; 2] {
        let aw = u64::from(self.levels.saturating_sub(2));
        [(root.addr() & self.addr_mask) | 1, (u64::from(domain) << 8) | aw]
    }

    /// An AMD-Vi device-table entry (AMD IOMMU spec §2.2.2) translating
    /// the device's DMA through the I/O page table at `root` for domain
    /// `domain`: V, TV, paging mode 4, the root pointer, IR and IW; the
    /// domain id in the second qword. Interrupt remapping is left off.
    pub fn amd_vi_device_table_entry(&self, root: Pfn, domain: u16) -> [u64; 4] {
        let lo = (root.addr() & self.addr_mask) | 1 | 1 << 1 | 4 << 9 | AMDVI_IR | AMDVI_IW;
        [lo, u64::from(domain), 0, 0]
    }
}
