//! EPT tables for a bare-metal hypervisor, the way a kernel builds them:
//! table pages from a physical region the hypervisor owns ([`PhysPages`]),
//! guest RAM mapped with 2 MiB pages, the first 2 MiB in 4 KiB pages with
//! the legacy VGA hole left unmapped (so that guest accesses there exit to
//! the hypervisor as EPT violations) and the BIOS area read-execute, an
//! uncached APIC-access page, the EPT pointer for the VMCS, and a dirty
//! harvest for live migration.
//!
//! In a kernel, the region is a range of physical memory reserved at boot
//! and reachable through the direct map; here a page-aligned heap buffer
//! stands for it, and the software MMU (`nested_pt::mmu::translate`) plays
//! the processor's EPT walk.
//!
//! `cargo run --release -p nested-pt --example ept_baremetal`

use std::alloc::{Layout, alloc_zeroed, dealloc};

use nested_pt::mmu::{ViolationKind, translate};
use nested_pt::{Access, Caps, Gpa, MemType, NestedTable, PageSize, Pfn, PhysPages, Prot, PteFormat};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// Guest RAM: 64 MiB at guest-physical 0.
const GUEST_RAM: u64 = 64 << 20;
/// Where the guest's RAM lives in host-physical memory (2 MiB aligned, so
/// that 2 MiB guest pages map 2 MiB host pages).
const HOST_RAM: u64 = 0x2_0000_0000;
/// The physical region reserved for EPT table pages, and its size.
const TABLES_PHYS: u64 = 0x1_0000_0000;
const TABLE_PAGES: u64 = 64;
/// The legacy VGA window (emulated by the hypervisor: not mapped).
const VGA: std::ops::Range<u64> = 0xa_0000..0xc_0000;
/// The BIOS area (read and execute only).
const BIOS: std::ops::Range<u64> = 0xc_0000..0x10_0000;
/// The guest's local APIC page and the host's APIC-access page.
const APIC_GPA: u64 = 0xfee0_0000;
const APIC_ACCESS_PFN: Pfn = Pfn(0x1_2345);

/// The stand-in for the kernel's reserved region: page-aligned, zeroed,
/// owned by this value.
struct Region {
    virt: *mut u8,
    layout: Layout,
}

impl Region {
    fn new(pages: u64) -> Region {
        let layout = Layout::from_size_align((pages * K4) as usize, K4 as usize).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let virt = unsafe { alloc_zeroed(layout) };
        assert!(!virt.is_null(), "out of memory");
        Region { virt, layout }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the table built on
        // it is dropped before the region (see `main`).
        unsafe { dealloc(self.virt, self.layout) }
    }
}

/// The host-physical address a guest address of RAM maps to.
fn host_of(gpa: u64) -> u64 {
    HOST_RAM + gpa
}

fn main() -> Result<(), nested_pt::Error> {
    let region = Region::new(TABLE_PAGES);
    // SAFETY: `region` is writable memory of TABLE_PAGES pages, used by
    // nothing else, and outlives the table (dropped after it). In a kernel,
    // `virt` is the direct-map address of TABLES_PHYS.
    let pages = unsafe { PhysPages::new(TABLES_PHYS, region.virt, TABLE_PAGES) }.expect("aligned region");

    // A processor with EPT A/D bits, 2 MiB and 1 GiB pages, 46-bit
    // physical addresses (read these from IA32_VMX_EPT_VPID_CAP and CPUID).
    let fmt = PteFormat::ept(Caps::default());
    let mut ept = NestedTable::new(fmt, pages)?;

    // The first 2 MiB in 4 KiB pages: RAM, except the VGA hole (left
    // unmapped) and the BIOS area (read-execute).
    ept.populate_region(Gpa(0), M2, PageSize::Size4K)?;
    let mapped = ept.map_range_exclusive(Gpa(0), M2, Prot::RWX, MemType::WriteBack, |g| {
        (!VGA.contains(&g.0) && !BIOS.contains(&g.0)).then(|| Pfn(host_of(g.0) >> 12))
    })?;
    let bios = ept.map_range_exclusive(Gpa(BIOS.start), BIOS.end - BIOS.start, Prot::RX, MemType::WriteBack, |g| {
        Some(Pfn(host_of(g.0) >> 12))
    })?;
    assert_eq!(mapped + bios, (M2 - (VGA.end - VGA.start)) / K4);
    // The rest of guest RAM in 2 MiB pages.
    ept.populate_region(Gpa(M2), GUEST_RAM - M2, PageSize::Size2M)?;
    for gpa in (M2..GUEST_RAM).step_by(M2 as usize) {
        ept.map_exclusive(Gpa(gpa), Pfn(host_of(gpa) >> 12), PageSize::Size2M, Prot::RWX, MemType::WriteBack)?;
    }
    // The APIC-access page, uncached.
    ept.populate_region(Gpa(APIC_GPA), K4, PageSize::Size4K)?;
    ept.map_exclusive(Gpa(APIC_GPA), APIC_ACCESS_PFN, PageSize::Size4K, Prot::RW, MemType::Uncacheable)?;

    // Every table page lies in the region the hypervisor reserved.
    println!("{} table pages:", ept.table_pages());
    for p in ept.table_pages_iter() {
        let phys = p.pfn.addr();
        assert!((TABLES_PHYS..TABLES_PHYS + TABLE_PAGES * K4).contains(&phys));
        println!("  level {} at {phys:#x}, covering from {:#x}", p.level, p.gpa.0);
    }
    assert_eq!(ept.pages().live(), ept.table_pages() as u64);

    // The VMCS EPT pointer: root address, memory type WB (6), 4-level walk
    // (3 << 3), A/D enabled (bit 6). Write it with VMWRITE to field 0x201A
    // and run INVEPT (single context) after changes that remove access.
    let eptp = ept.root_pointer(true);
    println!("EPTP = {eptp:#x}");
    assert_eq!(eptp, TABLES_PHYS | 6 | (3 << 3) | (1 << 6));

    // What the processor will do with guest accesses.
    let walk = |gpa: u64, access| translate(ept.pages(), &fmt, ept.root(), Gpa(gpa), access, true);
    for (gpa, access, expect) in [
        (0x7c00, Access::Execute, Some(host_of(0x7c00))),
        (0xf_fff0, Access::Execute, Some(host_of(0xf_fff0))),
        (0xf_0000, Access::Write, None), // BIOS is read-only: violation
        (0xb_8000, Access::Write, None), // VGA: violation, emulate it
        (0x123_4567, Access::Write, Some(host_of(0x123_4567))),
        (APIC_GPA + 0x300, Access::Write, Some(APIC_ACCESS_PFN.addr() + 0x300)),
        (GUEST_RAM, Access::Read, None), // past RAM: violation
    ] {
        match walk(gpa, access) {
            Ok(t) => {
                println!("{access:?} {gpa:#x} -> {:#x} ({:?}, {:?})", t.hpa, t.size, t.mem_type);
                assert_eq!(Some(t.hpa), expect);
            }
            Err(v) => {
                println!("{access:?} {gpa:#x} -> EPT violation, qualification {:#x}", v.ept_qualification());
                assert_eq!(expect, None);
            }
        }
    }
    assert_eq!(walk(0xb_8000, Access::Read).unwrap_err().kind, ViolationKind::NotPresent);
    assert_eq!(walk(0xf_0000, Access::Write).unwrap_err().kind, ViolationKind::Permission);

    // Live migration: the walks above set dirty bits for their writes;
    // the harvest reports them as runs (a dirty 2 MiB page is one run).
    ept.harvest_dirty_runs(Gpa(0), GUEST_RAM, true, |_, _| {})?;
    for gpa in [0x5000, 0x6000, 0x9000, 0x40_0008] {
        walk(gpa, Access::Write).expect("RAM is writable");
    }
    let mut runs = Vec::new();
    let pages = ept.harvest_dirty_runs(Gpa(0), GUEST_RAM, true, |g, len| runs.push((g.0, len)))?;
    println!("dirty after four guest writes: {pages} pages in runs {runs:x?}");
    assert_eq!(runs, [(0x5000, 2 * K4), (0x9000, K4), (0x40_0000, M2)]);
    // The harvest cleared the bits: INVEPT now, so that the next write
    // sets them again.

    // Tear down: unmap and free the tables (the caller then runs INVEPT
    // before reusing the frames).
    ept.unmap_vacate_region(Gpa(0), M2, PageSize::Size4K)?;
    ept.unmap_vacate_region(Gpa(M2), GUEST_RAM - M2, PageSize::Size2M)?;
    ept.unmap_vacate_region(Gpa(APIC_GPA), K4, PageSize::Size4K)?;
    assert_eq!(ept.table_pages(), 1);
    assert_eq!(ept.pages().live(), 1);
    drop(ept);
    drop(region);
    println!("ok");
    Ok(())
}
