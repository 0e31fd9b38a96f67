//! Bit-level checks of every entry-format field against the manuals.

use nested_pt::{Caps, Error, FormatKind, MemType, PageSize, Pfn, Prot, PteFormat};

fn caps() -> Caps {
    Caps { page_2m: true, page_1g: true, execute_only: true, phys_bits: 46 }
}

#[test]
fn ept_leaf_bits() {
    let f = PteFormat::ept(caps());
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(e & 0b111, 0b001, "R only");
    assert_eq!((e >> 3) & 7, 6, "memory type WB in bits 5:3");
    assert_ne!(e & (1 << 6), 0, "ignore-PAT bit 6");
    assert_eq!(e & (1 << 7), 0, "no large bit on a 4K leaf");
    assert_eq!(e & (3 << 8), 0, "A (8) and D (9) start clear");
    assert_eq!(e & 0x000f_ffff_ffff_f000, 0x1234 << 12, "address bits 12+");
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::RW, MemType::Uncacheable).unwrap();
    assert_eq!(e & 0b111, 0b011);
    assert_eq!((e >> 3) & 7, 0, "UC");
    let e = f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Prot::RWX, MemType::WriteCombining).unwrap();
    assert_eq!(e & 0b111, 0b111);
    assert_eq!((e >> 3) & 7, 1, "WC");
    let e = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Prot::RX, MemType::WriteThrough).unwrap();
    assert_eq!(e & 0b111, 0b101, "non-writable, executable");
    assert_ne!(e & (1 << 7), 0, "large bit 7");
    assert_eq!((e >> 3) & 7, 4, "WT");
    let e = f.leaf_entry(Pfn(0x40000), PageSize::Size1G, Prot::RW, MemType::WriteProtected).unwrap();
    assert_ne!(e & (1 << 7), 0);
    assert_eq!((e >> 3) & 7, 5, "WP");
    assert_eq!(e & 0b100, 0, "non-executable");
    // Execute-only exists where the capability says so.
    let e = f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::EXEC, MemType::WriteBack).unwrap();
    assert_eq!(e & 0b111, 0b100);
    let no_xo = PteFormat::ept(Caps { execute_only: false, ..caps() });
    assert_eq!(no_xo.leaf_entry(Pfn(1), PageSize::Size4K, Prot::EXEC, MemType::WriteBack), Err(Error::BadProt));
}

#[test]
fn ept_table_entry_and_eptp() {
    let f = PteFormat::ept(caps());
    assert_eq!(f.table_entry(Pfn(0x5555)), Ok((0x5555 << 12) | 7));
    assert_eq!(f.root_pointer(Pfn(0x777), false), (0x777 << 12) | (3 << 3) | 6);
    assert_eq!(f.root_pointer(Pfn(0x777), true), (0x777 << 12) | (1 << 6) | (3 << 3) | 6);
    assert_eq!(f.accessed_mask(), 1 << 8);
    assert_eq!(f.dirty_mask(), 1 << 9);
    assert!(f.hw_ad());
    assert_eq!(f.kind(), FormatKind::Ept);
}

#[test]
fn ept_emulated_ad_bits() {
    let f = PteFormat::ept_emulated_ad(caps());
    let e = f.leaf_entry(Pfn(0x42), PageSize::Size4K, Prot::RWX, MemType::WriteBack).unwrap();
    assert_eq!(e & 0b111, 0, "hardware R/W/X clear: the first access faults");
    assert_ne!(e & (1 << 52), 0, "software valid/readable bit 52");
    assert_ne!(e & (1 << 53), 0, "software writable bit 53");
    assert_ne!(e & (1 << 54), 0, "software executable bit 54");
    assert!(f.is_present(e));
    assert_eq!(f.prot(e), Prot::RWX);
    assert!(!f.accessed(e) && !f.dirty(e));
    // Recording a read sets R (and X, which the mapping allows).
    let bits = f.access_bits(e, nested_pt::Access::Read).unwrap();
    assert_eq!(bits, 0b101);
    // Recording a write sets R and W together: write without read would be a
    // misconfiguration.
    let bits = f.access_bits(e, nested_pt::Access::Write).unwrap();
    assert_eq!(bits & 0b011, 0b011);
    assert!(f.accessed(e | bits) && f.dirty(e | bits));
    let ro = f.leaf_entry(Pfn(0x42), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(f.access_bits(ro, nested_pt::Access::Write), None);
    assert_eq!(f.access_bits(ro, nested_pt::Access::Execute), None);
    assert_eq!(f.root_pointer(Pfn(1), true) & (1 << 6), 0, "no EPTP A/D bit for emulation");
    assert!(!f.hw_ad());
}

#[test]
fn npt_bits() {
    let f = PteFormat::npt(caps());
    assert_eq!(f.table_entry(Pfn(0x99)), Ok((0x99 << 12) | 0b111), "P, RW, US at every level");
    let e = f.leaf_entry(Pfn(0x99), PageSize::Size4K, Prot::READ, MemType::WriteBack).unwrap();
    assert_eq!(e & 0b111, 0b101, "P and US, not RW");
    assert_ne!(e & (1 << 63), 0, "NX bit 63 for non-executable");
    assert_eq!(e & (3 << 3), 0, "WB: PWT and PCD clear");
    let e = f.leaf_entry(Pfn(0x99), PageSize::Size4K, Prot::RWX, MemType::Uncacheable).unwrap();
    assert_eq!(e & 0b111, 0b111);
    assert_eq!(e & (1 << 63), 0);
    assert_eq!(e & (3 << 3), 3 << 3, "UC: PWT and PCD");
    let e = f.leaf_entry(Pfn(0x99), PageSize::Size4K, Prot::RW, MemType::WriteThrough).unwrap();
    assert_eq!(e & (3 << 3), 1 << 3, "WT: PWT");
    let e = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Prot::RW, MemType::WriteBack).unwrap();
    assert_ne!(e & (1 << 7), 0, "PS bit 7");
    assert_eq!(f.accessed_mask(), 1 << 5);
    assert_eq!(f.dirty_mask(), 1 << 6);
    assert_eq!(f.root_pointer(Pfn(0x1000), true), 0x1000 << 12, "nCR3");
    assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::EXEC, MemType::WriteBack), Err(Error::BadProt));
    assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::RW, MemType::WriteCombining), Err(Error::BadMemType));
    assert!(!f.caps().execute_only, "NPT never offers execute-only");
}

#[test]
fn bad_leaf_arguments() {
    for f in [PteFormat::ept(caps()), PteFormat::ept_emulated_ad(caps()), PteFormat::npt(caps())] {
        assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size2M, Prot::RW, MemType::WriteBack), Err(Error::Unaligned));
        assert_eq!(f.leaf_entry(Pfn(1 << 40), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::OutOfRange));
        assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::WRITE, MemType::WriteBack), Err(Error::BadProt));
        assert_eq!(f.leaf_entry(Pfn(1), PageSize::Size4K, Prot::empty(), MemType::WriteBack), Err(Error::BadProt));
        assert_eq!(f.leaf_entry(Pfn(u64::MAX), PageSize::Size4K, Prot::RW, MemType::WriteBack), Err(Error::OutOfRange));
        let small = Caps { page_1g: false, page_2m: false, ..caps() };
        let g = match f.kind() {
            FormatKind::Ept => PteFormat::ept(small),
            FormatKind::EptEmulatedAd => PteFormat::ept_emulated_ad(small),
            FormatKind::Npt => PteFormat::npt(small),
            FormatKind::VtdSecondLevel => PteFormat::vtd(small),
            FormatKind::AmdVi => PteFormat::amd_vi(small),
        };
        assert_eq!(g.leaf_entry(Pfn(0), PageSize::Size1G, Prot::RW, MemType::WriteBack), Err(Error::UnsupportedSize));
        assert_eq!(g.leaf_entry(Pfn(0), PageSize::Size2M, Prot::RW, MemType::WriteBack), Err(Error::UnsupportedSize));
    }
}

#[test]
fn round_trip_frame_prot() {
    for f in [PteFormat::ept(caps()), PteFormat::ept_emulated_ad(caps()), PteFormat::npt(caps())] {
        for (size, pfn) in
            [(PageSize::Size4K, 0x3fff_ffff_u64), (PageSize::Size2M, 0x200 * 7), (PageSize::Size1G, 0x40000 * 3)]
        {
            for prot in [Prot::READ, Prot::RW, Prot::RX, Prot::RWX] {
                let e = f.leaf_entry(Pfn(pfn), size, prot, MemType::WriteBack).unwrap();
                assert!(f.is_present(e));
                assert!(f.is_leaf(e, size.level()));
                assert_eq!(f.frame_at_level(e, size.level()), Pfn(pfn));
                assert_eq!(f.prot(e), prot, "{:?} {:?}", f.kind(), prot);
                assert_eq!(f.mem_type(e), Some(MemType::WriteBack));
            }
        }
        assert!(!f.is_present(0));
        let t = f.table_entry(Pfn(5)).unwrap();
        assert!(f.is_present(t));
        assert!(!f.is_leaf(t, 2) && !f.is_leaf(t, 3) && !f.is_leaf(t, 4));
    }
}
