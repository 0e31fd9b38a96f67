//! The IOMMU formats (Intel VT-d second level, AMD-Vi): every field bit by
//! bit, tables built by the one walker, and the software model's DMA
//! translation with the faults the hardware records.

use nested_pt::mmu::{self, ViolationKind};
use nested_pt::{
    Access, Caps, Error, FormatKind, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat,
};

fn caps() -> Caps {
    Caps { page_2m: true, page_1g: true, execute_only: true, phys_bits: 46 }
}

#[test]
fn vtd_entry_bits() {
    let f = PteFormat::vtd(caps());
    assert_eq!(f.kind(), FormatKind::VtdSecondLevel);
    assert!(f.is_iommu() && !f.hw_ad() && !f.can_track_dirty());
    assert!(!f.caps().execute_only, "no execute-only for DMA");
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x1234 << 12 | 1, "R (bit 0), address 51:12, nothing else");
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x1234 << 12 | 3, "R and W (bits 0-1)");
    assert_eq!(e & (1 << 11 | 1 << 62), 0, "SNP (11) and TM (62) never set");
    let e = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x200 << 12 | 1 << 7 | 3, "PS (bit 7) on a 2 MiB leaf");
    let e = f.leaf_entry(Pfn(0x40000), PageSize::Size1G, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x40000 << 12 | 1 << 7 | 1);
    assert!(f.is_present(e) && f.is_leaf(e, 3));
    assert_eq!(f.prot(e), Prot::READ);
    // No execute, no write-only, no memory type but write-back.
    for p in [Prot::RWX, Prot::EXEC, Prot::RX, Prot::WRITE] {
        assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, p, MemType::WriteBack), Err(Error::BadProt), "{p:?}");
    }
    assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::RW, MemType::Uncacheable), Err(Error::BadMemType));
    // Without SLLPS support, no large leaves.
    let small = PteFormat::vtd(Caps { page_2m: false, page_1g: false, ..caps() });
    assert_eq!(
        small.leaf_entry(Pfn(0x200), PageSize::Size2M, Prot::RW, MemType::WriteBack),
        Err(Error::UnsupportedSize)
    );
    // Table entries: R|W whatever the level; the context entry.
    for level in 2..=4 {
        assert_eq!(f.table_entry_at(Pfn(0x5555), level), Ok(0x5555 << 12 | 3));
    }
    assert_eq!(f.table_entry(Pfn(0x5555)), Ok(0x5555 << 12 | 3));
    assert_eq!(f.table_entry_at(Pfn(1), 1), Err(Error::OutOfRange));
    assert_eq!(f.table_entry_at(Pfn(1), 5), Err(Error::OutOfRange));
    assert_eq!(f.root_pointer(Pfn(0x777), true), 0x777 << 12, "no A/D enable");
    assert_eq!(f.vtd_context_entry(Pfn(0x777), 0x2a), [0x777 << 12 | 1, 0x2a << 8 | 2]);
    assert_eq!((f.accessed_mask(), f.dirty_mask()), (0, 0));
    assert_eq!(f.mem_type(e), None);
}

#[test]
fn amd_vi_entry_bits() {
    let f = PteFormat::amd_vi(caps());
    assert_eq!(f.kind(), FormatKind::AmdVi);
    assert!(f.is_iommu() && !f.hw_ad() && !f.can_track_dirty());
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x1234 << 12 | 1 << 61 | 1, "PR (bit 0), IR (61), Next Level 0");
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!(e, 0x1234 << 12 | 3 << 61 | 1, "IR and IW (62)");
    assert_eq!(f.prot(e), Prot::RW);
    let e = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    assert_eq!((e >> 9) & 7, 0, "Next Level 0: a page of the PDE's size");
    assert_ne!(e & (1 << 7), 0, "the walker's large marker in ignored bit 7");
    assert!(f.is_leaf(e, 2));
    // Table entries name the next level; IR and IW set (ANDed over levels).
    for level in 2..=4u64 {
        let t = f.table_entry_at(Pfn(0x5555), level as u8).unwrap();
        assert_eq!(t, 0x5555 << 12 | (level - 1) << 9 | 3 << 61 | 1, "level {level}");
        assert!(!f.is_leaf(t, level as u8));
    }
    assert_eq!(f.table_entry(Pfn(0x5555)), f.table_entry_at(Pfn(0x5555), 4));
    assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::RX, MemType::WriteBack), Err(Error::BadProt));
    let dte = f.amd_vi_device_table_entry(Pfn(0x777), 9);
    assert_eq!(dte[0], 0x777 << 12 | 1 | 1 << 1 | 4 << 9 | 3 << 61, "V, TV, mode 4, root, IR, IW");
    assert_eq!(dte[1], 9, "domain id");
}

/// A table of `f` with RAM-like mappings: 4K read-write at 0x10000, 4K
/// read-only at 0x11000, a 2 MiB leaf at 2 MiB.
fn build(f: PteFormat) -> NestedTable<HeapPages> {
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    t.populate_region(Gpa(0), 2 << 20, PageSize::Size4K).unwrap();
    t.populate_region(Gpa(2 << 20), 2 << 20, PageSize::Size2M).unwrap();
    t.map(Gpa(0x10000), Pfn(0xabc), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    t.map(Gpa(0x11000), Pfn(0xabd), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    t.map(Gpa(2 << 20), Pfn(0x800), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    t
}

#[test]
fn dma_translation_and_faults() {
    for f in [PteFormat::vtd(caps()), PteFormat::amd_vi(caps())] {
        let t = build(f);
        let tr = |gpa: u64, a| mmu::translate(t.pages(), &f, t.root(), Gpa(gpa), a, true);
        let ok = tr(0x10123, Access::Write).unwrap();
        assert_eq!(ok.hpa, 0xabc123);
        assert_eq!(ok.prot, Prot::RW);
        assert_eq!(tr(0x11008, Access::Read).unwrap().hpa, 0xabd008);
        let big = tr((2 << 20) + 0x1_2345, Access::Write).unwrap();
        assert_eq!((big.hpa, big.size), (0x80_0000 + 0x1_2345, PageSize::Size2M));
        // The tables agree with the model.
        assert_eq!(t.is_mapped(Gpa(0x11000)), Some((Pfn(0xabd), Prot::READ)));
        // A write to the read-only page.
        let v = tr(0x11000, Access::Write).unwrap_err();
        assert_eq!((v.kind, v.level), (ViolationKind::Permission, 1));
        assert_eq!(v.vtd_fault_reason(), 0x5);
        assert_eq!(v.amd_vi_fault_flags(), 1 << 4 | 1 << 5 | 1 << 6, "PR, RW, PE");
        // Unmapped: a read and a write.
        let v = tr(0x12000, Access::Read).unwrap_err();
        assert_eq!(v.kind, ViolationKind::NotPresent);
        assert_eq!(v.vtd_fault_reason(), 0x6, "legacy mode: not present reads report 0x6");
        assert_eq!(v.amd_vi_fault_flags(), 0, "PR clear");
        assert_eq!(tr(0x12000, Access::Write).unwrap_err().vtd_fault_reason(), 0x5);
        assert_eq!(tr(1 << 40, Access::Read).unwrap_err().level, 4);
        // DMA has no execute.
        assert_eq!(tr(0x10000, Access::Execute).unwrap_err().kind, ViolationKind::Permission);
        // No accessed or dirty bits are ever set.
        let e = t.lookup(Gpa(0x10000)).unwrap().value();
        assert_eq!(e, f.leaf_entry(Pfn(0xabc), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap());
        let mut bm = [0u64; 8];
        assert_eq!(t.harvest_dirty(Gpa(0), 512 << 12, &mut bm), Ok(0));
    }
}

#[test]
fn reserved_fields_fault() {
    for f in [PteFormat::vtd(caps()), PteFormat::amd_vi(caps())] {
        let t = build(f);
        let leaf = t.walk(Gpa(0x10000)).steps().last().copied().unwrap();
        let slot = t.entry(&leaf).unwrap();
        let good = slot.load(std::sync::atomic::Ordering::Relaxed);
        let tr = || mmu::translate(t.pages(), &f, t.root(), Gpa(0x10000), Access::Read, false);
        let mut bad = vec![good | 1 << 50]; // above the 46-bit width
        if f.kind() == FormatKind::VtdSecondLevel {
            bad.push(good | 1 << 11); // SNP without snoop control
            bad.push(good | 1 << 62); // TM without device IOTLBs
        }
        for b in bad {
            slot.store(b, std::sync::atomic::Ordering::Relaxed);
            let v = tr().unwrap_err();
            assert_eq!(v.kind, ViolationKind::Reserved, "{f:?} {b:#x}");
            assert_eq!(v.vtd_fault_reason(), 0xC);
            assert_ne!(v.amd_vi_fault_flags() & 1 << 7, 0, "RZ");
        }
        slot.store(good, std::sync::atomic::Ordering::Relaxed);
        assert!(tr().is_ok());
        // A non-leaf entry with the wrong Next Level (AMD-Vi) or PS in the
        // top level (VT-d).
        let top = t.walk(Gpa(0x10000)).steps()[0];
        let tslot = t.entry(&top).unwrap();
        let tgood = tslot.load(std::sync::atomic::Ordering::Relaxed);
        let tbad = match f.kind() {
            FormatKind::AmdVi => (tgood & !(7 << 9)) | 2 << 9,
            _ => tgood | 1 << 7,
        };
        tslot.store(tbad, std::sync::atomic::Ordering::Relaxed);
        let v = tr().unwrap_err();
        assert_eq!((v.kind, v.level), (ViolationKind::Reserved, 4), "{f:?}");
        tslot.store(tgood, std::sync::atomic::Ordering::Relaxed);
        assert!(tr().is_ok());
    }
}

/// A three-level VT-d table (39-bit width): the hardware's top table is
/// the level-3 table under the root's entry 0; it exists from the start,
/// survives vacates, and everything at or above 512 GiB is refused.
#[test]
fn vtd_three_level_walk() {
    let f = PteFormat::vtd_3level(caps());
    assert_eq!((f.levels(), f.gpa_limit()), (3, 1 << 39));
    assert_eq!(PteFormat::vtd(caps()).gpa_limit(), 1 << 48);
    let mut t = NestedTable::new(f, HeapPages::new()).unwrap();
    assert_eq!(t.table_pages(), 2, "root and the hardware's top table");
    let top = t.hw_root();
    assert_ne!(top, t.root());
    assert_eq!(t.walk(Gpa(0)).steps()[0].entry, f.table_entry_at(top, 4).unwrap());
    assert_eq!(f.vtd_context_entry(top, 5), [top.0 << 12 | 1, 5 << 8 | 1], "AW 001b: 39-bit, three levels");
    assert_eq!(t.root_pointer(false), top.0 << 12);
    // Mapping and the model's walk from the top table.
    t.populate_region(Gpa(0x20_0000), 2 << 20, PageSize::Size4K).unwrap();
    t.map(Gpa(0x20_3000), Pfn(0x777), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
    let tr = mmu::translate(t.pages(), &f, top, Gpa(0x20_3010), Access::Write, false).unwrap();
    assert_eq!(tr.hpa, 0x777010);
    let v = mmu::translate(t.pages(), &f, top, Gpa(0x20_4000), Access::Read, false).unwrap_err();
    assert_eq!((v.kind, v.level, v.vtd_fault_reason()), (ViolationKind::NotPresent, 1, 0x6));
    let v = mmu::translate(t.pages(), &f, top, Gpa(0x40_0000_0000), Access::Read, false).unwrap_err();
    assert_eq!((v.kind, v.level), (ViolationKind::NotPresent, 3), "the walk starts at level 3");
    let v = mmu::translate(t.pages(), &f, top, Gpa(1 << 39), Access::Read, false).unwrap_err();
    assert_eq!((v.kind, v.vtd_fault_reason()), (ViolationKind::BeyondWidth, 0x4));
    // Nothing at or above 512 GiB.
    assert_eq!(t.populate_region(Gpa((1 << 39) - 0x1000), 0x2000, PageSize::Size4K), Err(Error::OutOfRange));
    assert_eq!(t.populate_region(Gpa(1 << 39), 0x1000, PageSize::Size4K), Err(Error::OutOfRange));
    assert_eq!(t.map(Gpa(1 << 39), Pfn(1), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::OutOfRange));
    assert!(t.lookup(Gpa(1 << 39)).is_none());
    assert_eq!(t.table_pages(), 4, "only the tables below 512 GiB were made");
    // Vacating everything leaves the top table in place.
    assert_eq!(t.unmap_vacate_region(Gpa(0x20_0000), 2 << 20, PageSize::Size4K), Ok(1));
    assert_eq!((t.table_pages(), t.hw_root()), (2, top));
    assert_eq!(t.walk(Gpa(0)).steps()[0].entry, f.table_entry_at(top, 4).unwrap());
}
