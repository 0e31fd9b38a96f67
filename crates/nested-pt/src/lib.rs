//! Second-level page tables (Intel EPT and AMD NPT, and the I/O page tables
//! of Intel VT-d and AMD-Vi) for hypervisors.
//!
//! # What this crate owns
//!
//! The bit formats of nested page-table entries, the four-level table tree
//! that hardware walks to turn guest-physical addresses into host-physical
//! ones, the operations a hypervisor performs on that tree (populate a range,
//! map and unmap pages, look up, harvest accessed/dirty bits), and a software
//! model of what the hardware does when it walks the tree ([`mmu::translate`]).
//! It knows nothing of memory objects, clients or vCPUs: that is `vmspace`.
//!
//! # Formats are values
//!
//! The same tree code serves five entry formats chosen at run time through a
//! [`PteFormat`] value: Intel EPT with hardware accessed/dirty bits, Intel EPT
//! with accessed/dirty bits *emulated* in software (for processors without
//! them: the hardware read and write bits double as "accessed" and
//! "modified", and the permission lives in ignored bits 52-54), and AMD NPT
//! (the x86-64 long-mode format); and for DMA, the IOMMUs' I/O page tables:
//! Intel VT-d second-level tables and AMD-Vi tables (four levels, read and
//! write permission only, no accessed/dirty bits; [`mmu::translate`] returns
//! the fault reason VT-d records or the flags of AMD-Vi's IO_PAGE_FAULT
//! event, see [`mmu::Violation::vtd_fault_reason`]). At the API, masks such as "the dirty bit"
//! are read from the format value, not build-time constants, so one table
//! type serves every format and the choice is made at run time. Inside, the
//! hot paths (map, lookup, the dirty harvest) read the value's kind once
//! per call and run a copy of the walker specialized for that kind, with
//! its present, dirty and permission bits as immediates; widths that depend
//! on the processor (the physical-address mask) stay run-time values.
//! Every format can express a non-executable mapping (the IOMMU formats
//! express no other).
//!
//! # The tree and its invariants
//!
//! [`NestedTable`] keeps the hardware table pages (obtained from a
//! [`TablePages`] provider, so the same code runs in a kernel, in a user
//! process, or inside a KVM memory slot) and a small software shadow of the
//! tree that holds reference counts. A range is *populated* before pages are
//! mapped into it and *vacated* after they are unmapped; populate counts, in
//! each table at the level of the range's page size, the entries the range
//! covers, and each table also counts its child tables. A table whose count
//! drops to zero is freed, bottom-up; the root is never freed. Structural
//! changes (populate, vacate) take `&mut self`. Entry changes (map, unmap,
//! accessed/dirty reset, harvest) take `&self` and are single atomic
//! operations on the entries, so many threads (vCPU fault handlers, device
//! emulation) can work on one table at once, and hardware may set accessed
//! and dirty bits concurrently. Mapping is a compare-and-swap from an empty
//! entry: two racing faults for the same page both succeed (one reports
//! [`Error::AlreadyMapped`] with `same_frame: true`). A caller that owns the
//! table (`&mut`) maps with [`NestedTable::map_exclusive`] instead: the same
//! checks and results, with a plain store where `map` needs a locked
//! compare-and-swap (the same pairing as `map_range`/`map_range_exclusive`
//! and `harvest_dirty`/`harvest_dirty_exclusive`).
//!
//! Bulk operations (unmap of a range, harvest of dirty bits, the [`Leaves`]
//! iterator) visit each leaf table once, descending from the root only when
//! they cross into a new table, never walking from the root for each page.
//! The harvest scans a leaf table eight entries (one cache line) at a
//! step with AVX-512F where the processor has it, chosen once from
//! `cpuid` without `std` (sixteen at a step with SSE2, the x86-64
//! baseline, otherwise; one at a time off x86-64): one load ANDed with
//! the format's dirty mask, broadcast into a vector register once per
//! table, gives the step's eight bits of the bitmap word, built in
//! registers (each aligned quadword of a vector load is read atomically
//! on x86, so this is equivalent to relaxed atomic loads); a whole leaf
//! table that starts at a word of the bitmap is scanned straight into the
//! bitmap, each word stored once and counted on the way. Only entries
//! that read dirty are written: the exclusive form
//! (`harvest_dirty_exclusive`) clears them in the same pass with a masked
//! store that writes those quadwords alone and skips a clean line
//! entirely. The concurrent forms (`harvest_dirty`, `scan_dirty`,
//! `harvest_dirty_runs`) do the same scan-and-clear over a whole leaf
//! table inside one hardware transaction where the processor has RTM
//! (Intel TSX: `xbegin`/`xend`, detected from `cpuid`): the transaction
//! makes each entry's read and its store one atomic step, since any other
//! writer of its lines (a vCPU thread's atomic OR, an unmap's compare and
//! swap, the hardware's A/D update) aborts it and discards its stores.
//! A table whose transaction aborts three times, a slice of a table, and
//! every table on a processor without RTM are cleared with one atomic AND
//! of the dirty bit per dirty entry after the scan (a pass that sees eight
//! tables in a row abort stops trying); either way no dirty bit set after
//! the read is lost and no unmapped entry is written back.
//! Each bitmap bit is written once (whole words stored, gaps cleared in
//! address order). Every path gives the same bitmap and entries (a
//! property test compares them with the scalar path and a model). Without
//! RTM the concurrent form's floor is that one locked AND per dirty page
//! (about 2.1-4.5 ns each): at 100% dirty it takes 8-16 times as long as a
//! sequential read of the same entries; with it, every density runs at
//! about the read's speed (see README's performance figures).
//!
//! # Lookups
//!
//! A lookup walks from the root with the format's bits as immediates and
//! reads the leaf once, decoding frame and protection from that one value.
//! Table pointers read from entries are still checked against the provider
//! at each step (for [`HeapPages`] a subtraction and one compare on the
//! entry's address field, beside the walk's critical path): safe code can
//! store any value into a table entry through [`NestedTable::entry`] or the
//! entry of a large [`Leaf`], so an entry is not trusted to name a table
//! page; the root is, since it lives as long as the table. A
//! [`LookupCursor`] ([`NestedTable::lookup_cursor`]) remembers the leaf
//! table of its last 4 KiB hit and skips the walk while lookups stay in
//! its 2 MiB; it borrows the table, so that leaf table cannot be freed
//! while the cursor lives (what it does not see is a table entry its user
//! rewrites through `entry` meanwhile).
//!
//! # Errors change nothing
//!
//! Every public operation either does all it was asked or returns a typed
//! [`Error`] and leaves the tree as it found it; no argument of any public
//! function can make it panic (addresses and lengths near `u64::MAX`, short
//! or huge bitmaps, frames past the format's width are refused, and bounds
//! checks are written so that they cannot wrap). Multi-step operations roll
//! back: a populate that runs out of table pages, meets a table page whose
//! frame the format cannot address ([`Error::OutOfRange`]) or would
//! overflow a count ([`Error::CountOverflow`]) frees what it allocated and
//! restores the counts; a [`NestedTable::map_range`] that meets a frame the
//! format cannot express clears the entries it installed before returning
//! [`Error::OutOfRange`]. Entries are shared with hardware, so a rolled-back
//! entry may have been used by a vCPU in the moment it existed: it mapped
//! the frame the caller asked for, and any accessed/dirty bits it gathered
//! are dropped with it.
//!
//! # Example
//!
//! A table for a guest with 2 MiB of RAM in 4 KiB pages, one 2 MiB page
//! above it, a lookup, a guest write recorded and the dirty harvest a
//! live migration runs:
//!
//! ```
//! use nested_pt::{Access, Caps, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat};
//!
//! let mut table = NestedTable::new(PteFormat::ept(Caps::default()), HeapPages::new())?;
//! // Tables first (populate), then leaves (map).
//! table.populate_region(Gpa(0), 2 << 20, PageSize::Size4K)?;
//! table.populate_region(Gpa(2 << 20), 2 << 20, PageSize::Size2M)?;
//! table.map(Gpa(0x1000), Pfn(0x8_0001), PageSize::Size4K, Prot::RW, MemType::WriteBack)?;
//! table.map(Gpa(0x2000), Pfn(0x8_0002), PageSize::Size4K, Prot::READ, MemType::WriteBack)?;
//! table.map(Gpa(2 << 20), Pfn(0x9_0000), PageSize::Size2M, Prot::RWX, MemType::WriteBack)?;
//!
//! let leaf = table.lookup(Gpa(0x1234)).expect("mapped");
//! assert_eq!((leaf.gpa, leaf.size, leaf.pfn()), (Gpa(0x1000), PageSize::Size4K, Pfn(0x8_0001)));
//! assert_eq!(table.is_mapped(Gpa((2 << 20) + 0x5000)), Some((Pfn(0x9_0005), Prot::RWX)));
//! assert!(table.lookup(Gpa(0x3000)).is_none());
//!
//! // Hardware sets the dirty bit when the guest writes; device emulation
//! // records the write in software.
//! table.record_access(Gpa(0x1008), Access::Write)?;
//! let mut bitmap = [0u64; 8]; // one bit per 4 KiB page of the 2 MiB
//! assert_eq!(table.harvest_dirty(Gpa(0), 2 << 20, &mut bitmap)?, 1);
//! assert_eq!(bitmap[0], 1 << 1); // page 1 (0x1000)
//! assert_eq!(table.harvest_dirty(Gpa(0), 2 << 20, &mut bitmap)?, 0); // cleared
//!
//! // The value for the VMCS EPT pointer: root frame, write-back walks,
//! // four levels, accessed/dirty bits on.
//! assert_eq!(table.root_pointer(true) & !0xfff, table.root().addr());
//! # Ok::<(), nested_pt::Error>(())
//! ```
//!
//! Over memory the hypervisor owns (a bare-metal kernel), the provider is
//! a [`PhysPages`] instead of a [`HeapPages`]; `examples/ept_baremetal.rs`
//! shows it.
//!
//! # Working from outside the crate
//!
//! For tools that export, check or copy tables:
//! [`NestedTable::table_pages_iter`] lists the table pages (frame, level,
//! first address covered); [`NestedTable::read_entry`],
//! [`NestedTable::write_entry`] and [`NestedTable::entry_at`] reach the
//! raw entry at an address and level (writes keep the tree's structure:
//! no table pointer is overwritten or planted);
//! [`NestedTable::copy_into`] copies a table into another provider,
//! remapping the table pages; [`NestedTable::harvest_dirty_runs`]
//! reports dirty memory as runs (a dirty 1 GiB leaf is one run) instead
//! of a bitmap.
//!
//! # How it is tested
//!
//! Besides unit and scenario tests, `tests/common` holds a reference model
//! (a map of the leaves the tree should hold) that `tests/model.rs`
//! (proptest) and `tests/fuzz.rs` (stable-Rust fuzzing with `arbitrary`;
//! `FUZZ_SECONDS=600 cargo test --release -p nested-pt --test fuzz --
//! --nocapture` for a long run) drive with random operation sequences on
//! all three formats, comparing every observable after every step, and
//! `tests/hostile.rs` calls every public function with hostile arguments.
//! The harvest's vector paths (AVX-512, SSE2) are compared with its
//! scalar path and a model over random entries of every format, at
//! densities from 0 to 100% and on ranges that start and end anywhere
//! (`table::harvest` unit tests); `tests/table.rs` races harvests against
//! a writer dirtying pages, against each other, and against a writer
//! unmapping dirty pages (which a concurrent harvest with plain stores
//! outside a transaction fails: it maps pages again).
//!
//! # Known gaps
//!
//! [`NestedTable::vacate_region`] reads every leaf entry of the range to
//! refuse one that still maps pages, so it runs at the memory bandwidth of
//! those entries (about the x86_64 crate's clean-up, not several times
//! faster); [`NestedTable::unmap_vacate_region`] is the fast form when the
//! caller is about to unmap anyway.
//!
//! Without RTM (AMD processors, and Intel ones that have it disabled) the
//! dirty harvest in its concurrent forms pays one locked AND per
//! dirty page, which bounds it at high dirty densities: at 100% dirty it
//! runs at 6-12% of the speed of a sequential read of the same entries
//! (1 and 16 GiB; at 0-10% dirty it is above 50%, and the exclusive form
//! is above 50% at every density); a caller that owns the table uses
//! [`NestedTable::harvest_dirty_exclusive`]. There is no AVX2 path, and
//! the transactional one needs AVX-512 beside RTM. [`NestedTable::harvest_dirty_runs`]
//! has no exclusive form. Without AVX-512 the exclusive clears are one
//! load and store per dirty entry after an SSE2 scan (and the emulated
//! A/D format, whose dirty state is two bits, is scanned one entry at a
//! time there).
//!
//! Large pages are mapped and unmapped whole: a partial unmap of a large
//! leaf is refused with [`Error::WouldSplit`]. The caller can promote 512
//! contiguous small leaves to a 2 MiB leaf and demote one back
//! ([`NestedTable::promote_2m`], [`NestedTable::demote_2m`] or
//! [`NestedTable::demote_2m_as`] with another protection for the small
//! leaves: one store of the parent entry, accessed/dirty state carried),
//! and give an empty slot counted for a 2 MiB leaf an empty leaf table
//! ([`NestedTable::split_empty_2m`]); `vmspace` uses them for transparent
//! 2 MiB pages. A 1 GiB leaf is demoted to 512 2 MiB leaves
//! ([`NestedTable::demote_1g_as`], [`NestedTable::split_empty_1g`] for an
//! empty slot) and 512 qualifying 2 MiB leaves are promoted back to one
//! ([`NestedTable::promote_1g`]). The IOMMU formats walk
//! four levels (VT-d also three); AMD-Vi level skipping and VT-d 5-level
//! walks are not modelled. Overlapping populates of the same range are the
//! caller's responsibility (`vmspace` prevents overlapping mappings): the
//! counts stay consistent, but the tree does not record which entry belongs
//! to which range.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

mod format;
pub mod mmu;
mod pages;
mod table;

pub use format::{Caps, FormatKind, PteFormat};
pub use pages::{CountingPages, HeapPages, PhysPages, TablePages};
pub use table::export::{TablePage, TablePagesIter};
pub use table::large::PromoteRefusal;
pub use table::{Leaf, Leaves, LookupCursor, NestedTable, Walk, WalkStep};

use core::fmt;

/// Size of the smallest page, in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// Entries in one table page.
pub const ENTRIES: usize = 512;
/// The guest-physical space a four-level table covers: 2^48 bytes.
pub const GPA_LIMIT: u64 = 1 << 48;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

impl fmt::Debug for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpa({:#x})", self.0)
    }
}

impl Gpa {
    /// The address `bytes` further on, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }
    /// True when the address is a multiple of `size`.
    pub fn is_aligned(self, size: PageSize) -> bool {
        self.0 & (size.bytes() - 1) == 0
    }
}

/// A host frame number: a host-physical address divided by 4096.
///
/// What "host-physical" means is the table-page provider's business: a real
/// physical frame in a kernel, a KVM guest-physical page in the KVM runner,
/// an index into an arena in user-space tests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

impl Pfn {
    /// The host-physical address of the frame's first byte. A frame at or
    /// past 2^52 has no 64-bit address and loses its top bits here; every
    /// table operation refuses frames the format cannot express
    /// ([`PteFormat::frame_fits`]) before it forms an address.
    pub fn addr(self) -> u64 {
        self.0 << 12
    }
}

/// The size of a page a leaf entry maps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry (PTE).
    Size4K,
    /// 2 MiB, mapped by a level-2 entry (PDE) with the large-page bit.
    Size2M,
    /// 1 GiB, mapped by a level-3 entry (PDPTE) with the large-page bit.
    Size1G,
}

impl PageSize {
    /// Bytes the page covers.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
    /// The table level whose entries map pages of this size (1 = PTE).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The page size a leaf at `level` maps, if a leaf can live there.
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
    /// Number of 4 KiB pages in a page of this size.
    pub const fn pages(self) -> u64 {
        self.bytes() >> 12
    }
}

bitflags::bitflags! {
    /// Access a mapping allows.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Prot: u8 {
        /// Data reads.
        const READ = 1;
        /// Data writes.
        const WRITE = 2;
        /// Instruction fetches.
        const EXEC = 4;
    }
}

impl Prot {
    /// Read, write and execute.
    pub const RWX: Prot = Prot::all();
    /// Read and write.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);
    /// Read and execute.
    pub const RX: Prot = Prot::READ.union(Prot::EXEC);
}

/// Memory type of a mapping (Intel SDM vol. 3, "Memory Types"; the EPT
/// memory-type field uses these encodings).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum MemType {
    /// UC: uncacheable (device memory, MMIO).
    Uncacheable = 0,
    /// WC: write combining (frame buffers).
    WriteCombining = 1,
    /// WT: write through.
    WriteThrough = 4,
    /// WP: write protected.
    WriteProtected = 5,
    /// WB: write back (guest RAM).
    WriteBack = 6,
}

impl MemType {
    /// The type for an EPT memory-type field value, if the value is valid.
    pub fn from_bits(bits: u8) -> Option<MemType> {
        match bits {
            0 => Some(MemType::Uncacheable),
            1 => Some(MemType::WriteCombining),
            4 => Some(MemType::WriteThrough),
            5 => Some(MemType::WriteProtected),
            6 => Some(MemType::WriteBack),
            _ => None,
        }
    }
}

/// One kind of memory access, as the hardware performs it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

impl Access {
    /// The permission the access needs.
    pub fn prot(self) -> Prot {
        match self {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
            Access::Execute => Prot::EXEC,
        }
    }
}

/// Why an operation on a table was refused. A refused operation changes
/// nothing: operations of several steps (populate, map of a range) undo the
/// steps they took before returning the error.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Error {
    /// An address or length is not a multiple of the page size it needs.
    Unaligned,
    /// A range of zero bytes.
    ZeroLength,
    /// Address plus length overflows 64 bits.
    Overflow,
    /// The range reaches past the 48-bit guest-physical space, or a frame
    /// number past the format's physical-address width.
    OutOfRange,
    /// The format instance cannot map pages of this size.
    UnsupportedSize,
    /// The format cannot express this protection (write without read,
    /// execute-only without the capability, no access at all).
    BadProt,
    /// The format cannot express this memory type.
    BadMemType,
    /// No table exists at the level the operation needs: populate first.
    NotPopulated,
    /// The entry is already in use. `same_frame` says whether it maps the
    /// frame that was asked for (a benign race between two faults).
    AlreadyMapped {
        /// The existing entry maps the same frame.
        same_frame: bool,
    },
    /// No present leaf maps the address.
    NotMapped,
    /// The operation would split a large page (not supported yet).
    WouldSplit,
    /// Pages are still mapped in a range being vacated.
    StillMapped,
    /// The table-page provider is out of pages.
    NoMemory,
    /// A bitmap is too short for the range.
    BitmapTooSmall,
    /// A table's count of the entries populated ranges reserve in it would
    /// overflow (about 8.4 million overlapping populates of one leaf
    /// table's whole span).
    CountOverflow,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::Unaligned => "address or length not aligned to the page size",
            Error::ZeroLength => "zero-length range",
            Error::Overflow => "address plus length overflows",
            Error::OutOfRange => "address or frame out of range",
            Error::UnsupportedSize => "page size not supported by this format",
            Error::BadProt => "protection not expressible in this format",
            Error::BadMemType => "memory type not expressible in this format",
            Error::NotPopulated => "range not populated",
            Error::AlreadyMapped { same_frame: true } => "already mapped (same frame)",
            Error::AlreadyMapped { same_frame: false } => "already mapped (other frame)",
            Error::NotMapped => "not mapped",
            Error::WouldSplit => "operation would split a large page",
            Error::StillMapped => "pages still mapped in range",
            Error::NoMemory => "out of table pages",
            Error::BitmapTooSmall => "bitmap too small for range",
            Error::CountOverflow => "table reservation count would overflow",
        };
        f.write_str(s)
    }
}

impl core::error::Error for Error {}

/// Checks a range: non-empty, aligned to `align`, no overflow, inside the
/// 48-bit guest-physical space. Returns the end address.
pub(crate) fn check_range(gpa: Gpa, len: u64, align: PageSize) -> Result<u64, Error> {
    if len == 0 {
        return Err(Error::ZeroLength);
    }
    let mask = align.bytes() - 1;
    if gpa.0 & mask != 0 || len & mask != 0 {
        return Err(Error::Unaligned);
    }
    let end = gpa.0.checked_add(len).ok_or(Error::Overflow)?;
    if end > GPA_LIMIT {
        return Err(Error::OutOfRange);
    }
    Ok(end)
}

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
