//! The passthrough model: wiring, the IOMMU domain only with a passthrough
//! device (or the force tunable), a domain that mirrors system memory as
//! it changes, BAR containment and alignment, the MSI-X hole at the start,
//! middle and end of a BAR, emulated table entries, a forwarded PBA and
//! forwarded bytes sharing the table's pages.

use std::sync::Arc;

use nested_pt::{Caps, HeapPages, PteFormat};
use vmm::devmem::NoExposure;
use vmm::machine::MmioDevices;
use vmm::passthru::{
    BarSpec, Bdf, DeviceSpec, DmaFault, IommuTunables, MSIX_MASKED, MsixCap, Passthrough, PassthroughError,
    TestDoubleDevice, bar_pieces, msix_hole,
};
use vmm::{SegmentKind, Vm, VmConfig};
use vmspace::{Gpa, HeapReservoir, Pfn, Prot, SpaceConfig};

const PG: u64 = 4096;
const BAR_GPA: u64 = 0xC000_0000;
const BDF: Bdf = Bdf { bus: 0, device: 4, function: 0 };

type Ppt = Passthrough<HeapPages, HeapPages>;

fn vm(test: &str) -> Arc<Vm<HeapPages>> {
    let ram = Arc::new(HeapReservoir::new(256 * PG, Pfn(0x1000)).unwrap());
    let space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    let cfg = VmConfig {
        name: format!("t{}-ppt-{test}", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 1 << 16,
    };
    Arc::new(Vm::new(cfg, HeapPages::with_capacity(0, 256), ram, Arc::new(NoExposure)).unwrap())
}

fn iommu_format() -> PteFormat {
    PteFormat::vtd(Caps::default())
}

fn ppt(vm: &Arc<Vm<HeapPages>>, tunables: IommuTunables) -> Ppt {
    Passthrough::new(vm.clone(), tunables, 7, iommu_format(), HeapPages::with_capacity(0, 64)).unwrap()
}

/// 32 pages of RAM at 0 and 16 more at 1 MiB; none of it touched.
fn with_ram(vm: &Vm<HeapPages>) {
    vm.alloc_segment(0, 32 * PG, SegmentKind::SysMem).unwrap();
    vm.map_segment(0, 0, 0, 32 * PG, None).unwrap();
    vm.alloc_segment(1, 16 * PG, SegmentKind::SysMem).unwrap();
    vm.map_segment(1 << 20, 1, 0, 16 * PG, Some(Prot::READ)).unwrap();
}

fn device(bar0: u64, msix: Option<MsixCap>) -> DeviceSpec {
    DeviceSpec { bdf: BDF, bars: vec![BarSpec { index: 0, size: bar0 }, BarSpec { index: 2, size: 4 * PG }], msix }
}

fn msix_at(table_offset: u64, entries: u16, pba_offset: u64) -> MsixCap {
    MsixCap { entries, table_bar: 0, table_offset, pba_bar: 0, pba_offset }
}

#[test]
fn msix_hole_rounds_to_pages() {
    // Table at the start, in the middle, at the end of a 64 KiB BAR.
    assert_eq!(msix_hole(0, 8, 16 * PG), Some((0, PG)));
    assert_eq!(msix_hole(0x5008, 8, 16 * PG), Some((0x5000, PG)));
    assert_eq!(msix_hole(0x5ff0, 2, 16 * PG), Some((0x5000, 2 * PG)));
    assert_eq!(msix_hole(15 * PG, 256, 16 * PG), Some((15 * PG, PG)));
    assert_eq!(msix_hole(14 * PG, 512, 16 * PG), Some((14 * PG, 2 * PG)));
    // Does not fit, zero entries, too many, misaligned.
    assert_eq!(msix_hole(15 * PG, 257, 16 * PG), None);
    assert_eq!(msix_hole(0, 0, 16 * PG), None);
    assert_eq!(msix_hole(0, 2049, 1 << 20), None);
    assert_eq!(msix_hole(4, 1, 16 * PG), None);
    assert_eq!(msix_hole(u64::MAX - 7, 1, u64::MAX), None);
    // Pieces around the hole.
    assert_eq!(bar_pieces(16 * PG, None), vec![(0, 16 * PG)]);
    assert_eq!(bar_pieces(16 * PG, Some((0, PG))), vec![(PG, 15 * PG)]);
    assert_eq!(bar_pieces(16 * PG, Some((5 * PG, PG))), vec![(0, 5 * PG), (6 * PG, 10 * PG)]);
    assert_eq!(bar_pieces(16 * PG, Some((15 * PG, PG))), vec![(0, 15 * PG)]);
    assert_eq!(bar_pieces(PG, Some((0, PG))), Vec::<(u64, u64)>::new());
}

#[test]
fn domain_exists_only_with_a_device_or_when_forced() {
    let v = vm("domain");
    with_ram(&v);
    let p = ppt(&v, IommuTunables::default());
    assert!(p.domain().is_none(), "no passthrough device, no domain");
    assert!(!v.is_wired());
    assert_eq!(v.space().resident_count(), 0);
    p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).unwrap();
    let d = p.domain().expect("a device brings a domain");
    assert_eq!(d.id(), 7);
    // Wired: all RAM resident; the domain mirrors it page for page.
    assert!(v.is_wired());
    assert_eq!(v.space().resident_count(), 48);
    assert_eq!(d.stats().pages_mapped, 48);
    for gpa in (0..32 * PG).step_by(PG as usize).chain(((1 << 20)..(1 << 20) + 16 * PG).step_by(PG as usize)) {
        let (pfn, _) = v.space().lookup(Gpa(gpa)).unwrap();
        assert_eq!(d.translate(gpa + 0x10, false), Ok(pfn.0 * PG + 0x10), "gpa {gpa:#x}");
    }
    // The read-only mapping refuses DMA writes; nothing maps past RAM; the
    // device's own BAR (device memory) is not in the domain.
    assert_eq!(d.translate(1 << 20, true), Err(DmaFault::WriteDenied));
    assert!(d.translate(5, true).is_ok());
    assert_eq!(d.translate(32 * PG, false), Err(DmaFault::NotPresent));

    // Forced: a domain from the start, no device needed, memory not wired.
    let v2 = vm("forced");
    with_ram(&v2);
    let p2 = ppt(&v2, IommuTunables { enable: true, force: true });
    let d2 = p2.domain().expect("forced domain");
    assert!(!v2.is_wired());
    assert_eq!(d2.stats().pages_mapped, 48, "mirrors the mappings, resident or not");
    assert!(d2.translate(0, true).is_ok());

    // Disabled: no domain, and passthrough is refused.
    let v3 = vm("disabled");
    let p3 = ppt(&v3, IommuTunables { enable: false, force: true });
    assert!(p3.domain().is_none());
    let dev = TestDoubleDevice::create(&v3, device(16 * PG, None)).unwrap();
    assert_eq!(p3.attach(dev), Err(PassthroughError::IommuDisabled));
    assert!(!v3.is_wired());
}

/// The domain works in both IOMMU formats: the same RAM, the same frames.
#[test]
fn domain_tables_in_both_iommu_formats() {
    for (i, fmt) in [PteFormat::vtd(Caps::default()), PteFormat::amd_vi(Caps::default())].into_iter().enumerate() {
        let v = vm(&format!("fmt{i}"));
        with_ram(&v);
        let p: Ppt =
            Passthrough::new(v.clone(), IommuTunables::default(), 3, fmt, HeapPages::with_capacity(0, 64)).unwrap();
        p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).unwrap();
        let d = p.domain().unwrap();
        let (pfn, _) = v.space().lookup(Gpa(7 * PG)).unwrap();
        assert_eq!(d.translate(7 * PG + 1, true), Ok(pfn.0 * PG + 1), "{fmt:?}");
        assert_eq!(d.translate(1 << 20, true), Err(DmaFault::WriteDenied), "{fmt:?}");
    }
}

#[test]
fn domain_follows_later_maps_and_unmaps() {
    let v = vm("follow");
    with_ram(&v);
    let p = ppt(&v, IommuTunables::default());
    p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).unwrap();
    let d = p.domain().unwrap();
    // A new sysmem mapping is wired and mirrored at once.
    v.alloc_segment(9, 8 * PG, SegmentKind::SysMem).unwrap();
    v.map_segment(2 << 20, 9, 0, 8 * PG, None).unwrap();
    let (pfn, _) = v.space().lookup(Gpa((2 << 20) + 3 * PG)).expect("wired at map time");
    assert_eq!(d.translate((2 << 20) + 3 * PG, true), Ok(pfn.0 * PG));
    // An alias of the same segment reaches the same frames.
    v.map_segment(3 << 20, 9, 0, 8 * PG, None).unwrap();
    assert_eq!(d.translate((3 << 20) + 3 * PG, true), Ok(pfn.0 * PG));
    // Unmap: gone from the domain before the VM's tables, IOTLB flushed.
    let flushes = d.stats().iotlb_flushes;
    v.unmap(2 << 20, 8 * PG).unwrap();
    assert_eq!(d.translate((2 << 20) + 3 * PG, true), Err(DmaFault::NotPresent));
    assert_eq!(d.translate((3 << 20) + 3 * PG, true), Ok(pfn.0 * PG), "the alias stays");
    assert_eq!(d.stats().iotlb_flushes, flushes + 1);
    assert_eq!(d.stats().pages_unmapped, 8);
    // Device memory is never mirrored.
    v.alloc_segment(10, PG, SegmentKind::DevMem { name: "rom".into() }).unwrap();
    v.map_segment(4 << 20, 10, 0, PG, Some(Prot::READ)).unwrap();
    assert_eq!(d.translate(4 << 20, false), Err(DmaFault::NotPresent));
    // A refused mapping leaves the domain as it was.
    let mapped = d.stats().pages_mapped;
    assert!(v.map_segment(0, 9, 0, PG, None).is_err(), "overlaps RAM");
    assert_eq!(d.stats().pages_mapped, mapped);
}

#[test]
fn attach_errors_and_detach() {
    let v = vm("attach");
    let p = ppt(&v, IommuTunables::default());
    // Bad device descriptions create nothing.
    let segs = v.segments().len();
    for bad in [
        DeviceSpec { bdf: BDF, bars: vec![BarSpec { index: 0, size: 3 * PG }], msix: None },
        DeviceSpec { bdf: BDF, bars: vec![BarSpec { index: 0, size: 2048 }], msix: None },
        DeviceSpec { bdf: BDF, bars: vec![BarSpec { index: 6, size: PG }], msix: None },
        DeviceSpec { bdf: BDF, bars: vec![BarSpec { index: 1, size: PG }, BarSpec { index: 1, size: PG }], msix: None },
        device(4 * PG, Some(msix_at(3 * PG, 257, 0))),
        device(4 * PG, Some(MsixCap { table_bar: 3, ..msix_at(0, 1, PG) })),
        device(4 * PG, Some(msix_at(0, 8, 4 * PG))),
        device(4 * PG, Some(msix_at(0, 8, 12))),
    ] {
        assert!(TestDoubleDevice::create(&v, bad.clone()).is_err(), "{bad:?}");
        assert_eq!(v.segments().len(), segs, "{bad:?} left a segment");
    }
    p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).unwrap();
    // A second device at the same address: refused (its double's segments
    // would clash by name first).
    assert!(TestDoubleDevice::create(&v, device(16 * PG, None)).is_err());
    p.map_bar(BDF, 0, BAR_GPA).unwrap();
    assert_eq!(p.detach(BDF).unwrap_err(), PassthroughError::BarState(0), "a mapped BAR keeps it attached");
    p.unmap_bar(BDF, 0).unwrap();
    let dev = p.detach(BDF).unwrap();
    assert_eq!(dev.spec().bdf, BDF);
    assert_eq!(p.detach(BDF).unwrap_err(), PassthroughError::UnknownDevice(BDF));
    // The domain stays, and memory stays wired, as on FreeBSD.
    assert!(p.domain().is_some() && v.is_wired());
}

#[test]
fn bar_mapping_checks_alignment_and_state() {
    let v = vm("bars");
    let p = ppt(&v, IommuTunables::default());
    p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).unwrap();
    let before = v.mappings();
    assert_eq!(p.map_bar(BDF, 0, BAR_GPA + 8 * PG), Err(PassthroughError::Misaligned));
    assert_eq!(p.map_bar(BDF, 1, BAR_GPA), Err(PassthroughError::UnknownBar(1)));
    assert_eq!(
        p.map_bar(Bdf { bus: 1, device: 0, function: 0 }, 0, BAR_GPA).unwrap_err().to_string(),
        "no passthrough device 01:00.0"
    );
    assert_eq!(p.unmap_bar(BDF, 0), Err(PassthroughError::BarState(0)));
    assert_eq!(v.mappings(), before);
    p.map_bar(BDF, 0, BAR_GPA).unwrap();
    assert_eq!(p.map_bar(BDF, 0, BAR_GPA + (1 << 20)), Err(PassthroughError::BarState(0)));
    // A BAR that would overlap something mapped: refused, nothing left.
    let before = v.mappings();
    assert!(p.map_bar(BDF, 2, BAR_GPA + 4 * PG).is_err());
    assert_eq!(v.mappings(), before);
    // No hole: one straight-through mapping of the whole BAR, which the
    // host sees through the BAR object.
    let seg = v.mappings().iter().find(|m| m.gpa.0 == BAR_GPA).unwrap().segment;
    assert_eq!(v.mapping_at(BAR_GPA + 15 * PG).unwrap().len, 16 * PG);
    assert!(!p.claims(BAR_GPA));
    v.write_segment(seg, 5 * PG, &[1, 2, 3, 4]).unwrap();
    let client = v.space().client();
    let h = client.hold(Gpa(BAR_GPA + 5 * PG), Prot::READ).unwrap();
    let mut b = [0u8; 4];
    h.read(0, &mut b).unwrap();
    h.release();
    assert_eq!(b, [1, 2, 3, 4]);
}

/// Maps BAR 0 with its MSI-X table at `table_offset` and checks the hole,
/// the pieces around it, table emulation, the PBA and forwarded bytes.
fn check_table_at(test: &str, table_offset: u64, pba_offset: u64) {
    let v = vm(test);
    let p = ppt(&v, IommuTunables::default());
    let cap = msix_at(table_offset, 16, pba_offset);
    let dev = TestDoubleDevice::create(&v, device(16 * PG, Some(cap))).unwrap();
    let seg = dev.bar_segment(0).unwrap();
    p.attach(dev).unwrap();
    p.map_bar(BDF, 0, BAR_GPA).unwrap();
    let (hoff, hlen) = msix_hole(table_offset, 16, 16 * PG).unwrap();
    // The hole is unmapped and claimed; everything else maps straight through.
    for page in 0..16 {
        let gpa = BAR_GPA + page * PG;
        let in_hole = page * PG >= hoff && page * PG < hoff + hlen;
        assert_eq!(v.mapping_at(gpa).is_none(), in_hole, "page {page}");
        assert_eq!(p.claims(gpa), in_hole, "page {page}");
    }
    let pieces: Vec<(u64, u64)> =
        v.mappings().iter().filter(|m| m.segment == seg).map(|m| (m.gpa.0 - BAR_GPA, m.len)).collect();
    assert_eq!(pieces, bar_pieces(16 * PG, Some((hoff, hlen))));

    // Table entries start masked; the guest programs entry 3 with dword
    // and qword writes.
    let t = BAR_GPA + table_offset;
    let mut d = [0u8; 4];
    p.read(0, t + 3 * 16 + 12, &mut d);
    assert_eq!(u32::from_le_bytes(d), MSIX_MASKED);
    p.write(0, t + 3 * 16, &0xFEE0_1000u64.to_le_bytes());
    p.write(0, t + 3 * 16 + 8, &0x4041u32.to_le_bytes());
    // Misaligned or odd-sized writes are dropped.
    p.write(0, t + 3 * 16 + 2, &0xffffu16.to_le_bytes());
    p.write(0, t + 3 * 16 + 9, &[0xff]);
    let e = p.msix_entry(BDF, 3).unwrap();
    assert_eq!((e.addr, e.data, e.control), (0xFEE0_1000, 0x4041, MSIX_MASKED));
    // Raised while masked: pending, visible in the PBA, not delivered.
    assert_eq!(p.raise(BDF, 3), None);
    let pba = |p: &Ppt| {
        let mut q = [0u8; 8];
        p.read(0, BAR_GPA + pba_offset, &mut q);
        u64::from_le_bytes(q)
    };
    if p.claims(BAR_GPA + pba_offset) {
        assert_eq!(pba(&p), 1 << 3, "the PBA shares the table's page: forwarded from the device");
        p.write(0, BAR_GPA + pba_offset, &0u64.to_le_bytes());
        assert_eq!(pba(&p), 1 << 3, "the PBA is read-only");
    }
    // Unmask: the pending message goes out once; then raises deliver.
    p.write(0, t + 3 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(p.take_unmasked(BDF), vec![(3, 0xFEE0_1000, 0x4041)]);
    assert_eq!(p.take_unmasked(BDF), vec![]);
    assert_eq!(p.raise(BDF, 3), Some((0xFEE0_1000, 0x4041)));
    assert_eq!(p.raise(BDF, 16), None, "no such entry");
    // Bytes of the hole's pages outside the table and PBA go to the BAR
    // object (device registers sharing the page).
    let table_end = table_offset + 16 * 16;
    let spare = if table_offset > hoff { hoff } else { table_end };
    if spare < hoff + hlen && (spare < pba_offset || spare >= pba_offset + 8) {
        p.write(0, BAR_GPA + spare, &0xabcd_u32.to_le_bytes());
        let mut b = [0u8; 4];
        v.read_segment(seg, spare, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd, "forwarded to the device");
        let mut r = [0u8; 4];
        p.read(0, BAR_GPA + spare, &mut r);
        assert_eq!(r, b);
    }
    assert!(p.table_accesses() > 0);
    // Unmapping takes every piece away and the claim with it.
    p.unmap_bar(BDF, 0).unwrap();
    assert!(v.mappings().iter().all(|m| m.segment != seg));
    assert!(!p.claims(t));
}

#[test]
fn msix_table_at_the_start_of_a_bar() {
    check_table_at("start", 0, 0x800);
}

#[test]
fn msix_table_in_the_middle_of_a_bar() {
    check_table_at("middle", 7 * PG + 0x100, 7 * PG + 0x10);
}

#[test]
fn msix_table_at_the_end_of_a_bar() {
    check_table_at("end", 15 * PG + 0x700, 2 * PG);
}

/// RAM whose frames the domain's format cannot address: attaching fails,
/// the domain's tables are given back, and no device is attached.
#[test]
fn a_domain_that_cannot_mirror_ram_changes_nothing() {
    let ram = Arc::new(HeapReservoir::new(64 * PG, Pfn(1 << 30)).unwrap());
    let space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    let cfg = VmConfig {
        name: format!("t{}-ppt-narrow", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 1 << 16,
    };
    let v = Arc::new(Vm::new(cfg, HeapPages::with_capacity(0, 256), ram, Arc::new(NoExposure)).unwrap());
    v.alloc_segment(0, 8 * PG, SegmentKind::SysMem).unwrap();
    v.map_segment(0, 0, 0, 8 * PG, None).unwrap();
    let narrow = PteFormat::vtd(Caps { phys_bits: 36, ..Caps::default() });
    let p: Ppt =
        Passthrough::new(v.clone(), IommuTunables::default(), 1, narrow, HeapPages::with_capacity(0, 64)).unwrap();
    assert!(p.attach(TestDoubleDevice::create(&v, device(16 * PG, None)).unwrap()).is_err());
    assert!(p.domain().is_none(), "no domain was brought into being");
    assert_eq!(p.detach(BDF).unwrap_err(), PassthroughError::UnknownDevice(BDF));
}
