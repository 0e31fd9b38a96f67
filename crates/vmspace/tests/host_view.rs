//! The host view of memory objects: frame runs, reads and writes by
//! offset across non-contiguous frames, checked against what the guest
//! side (page holds through a mapping) sees.

use std::ptr::NonNull;
use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmspace::*;

const PG: u64 = 4096;

/// A reservoir of 16 frames from 0x200, and an object of 4 pages whose
/// frames are not contiguous: [0x201, 0x200, 0x204, 0x205] (the frames of
/// a freed object are reused last-freed first).
fn fragmented() -> (Arc<HeapReservoir>, Arc<VmObject>) {
    let r = Arc::new(HeapReservoir::new(16 * PG, Pfn(0x200)).unwrap());
    let a = VmObject::ram(r.clone(), 2 * PG).unwrap();
    let _b = VmObject::ram(r.clone(), 2 * PG).unwrap();
    drop(a);
    let c = VmObject::ram(r.clone(), 4 * PG).unwrap();
    (r, c)
}

#[test]
fn frame_runs_are_maximal_and_cover_the_object() {
    let (_r, o) = fragmented();
    let frames: Vec<Pfn> = (0..4).map(|p| o.frame_at(p * PG).unwrap()).collect();
    assert_eq!(frames, [Pfn(0x201), Pfn(0x200), Pfn(0x204), Pfn(0x205)]);
    let runs: Vec<FrameRun> = o.frame_runs().collect();
    assert_eq!(
        runs,
        [
            FrameRun { offset: 0, pfn: Pfn(0x201), pages: 1 },
            FrameRun { offset: PG, pfn: Pfn(0x200), pages: 1 },
            FrameRun { offset: 2 * PG, pfn: Pfn(0x204), pages: 2 },
        ]
    );
    // A fresh object from a fresh reservoir is one run.
    let r = Arc::new(HeapReservoir::new(64 * PG, Pfn(0x1000)).unwrap());
    let big = VmObject::ram(r, 64 * PG).unwrap();
    assert_eq!(big.frame_runs().collect::<Vec<_>>(), [FrameRun { offset: 0, pfn: Pfn(0x1000), pages: 64 }]);
    // MMIO is one run.
    let m = VmObject::mmio(Pfn(0xfee00), 3 * PG).unwrap();
    assert_eq!(m.frame_runs().collect::<Vec<_>>(), [FrameRun { offset: 0, pfn: Pfn(0xfee00), pages: 3 }]);
}

#[test]
fn read_write_cross_pages_and_match_the_guest_view() {
    let (_r, o) = fragmented();
    // A pattern across all four pages, starting and ending mid-page.
    let data: Vec<u8> = (0..3 * PG as usize + 40).map(|i| (i * 7 + 3) as u8).collect();
    o.write(PG - 50, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    o.read(PG - 50, &mut back).unwrap();
    assert_eq!(back, data);
    // Through a guest mapping: each page as a hold sees the same bytes at
    // the same object offset.
    let s: VmSpace<HeapPages> =
        VmSpace::new(SpaceConfig::new(1 << 30, PteFormat::ept(Caps::default())), HeapPages::new()).unwrap();
    s.map(&o, 0, Gpa(0x10_0000), 4 * PG, Prot::RW).unwrap();
    let c = s.client();
    let mut whole = vec![0u8; 4 * PG as usize];
    for p in 0..4u64 {
        let h = c.hold(Gpa(0x10_0000 + p * PG), Prot::READ).unwrap();
        assert_eq!(h.pfn(), o.frame_at(p * PG).unwrap());
        h.read(0, &mut whole[(p * PG) as usize..((p + 1) * PG) as usize]).unwrap();
        h.release();
    }
    assert_eq!(&whole[(PG - 50) as usize..(PG - 50) as usize + data.len()], &data[..]);
    assert!(whole[..(PG - 50) as usize].iter().all(|&b| b == 0));
    // The other way: a guest-side write read through the object.
    let h = c.hold(Gpa(0x10_0000 + 2 * PG), Prot::RW).unwrap();
    h.write(PG as usize - 3, b"abcdef"[..3].as_ref()).unwrap();
    h.release();
    let h = c.hold(Gpa(0x10_0000 + 3 * PG), Prot::RW).unwrap();
    h.write(0, b"def").unwrap();
    h.release();
    let mut six = [0u8; 6];
    o.read(3 * PG - 3, &mut six).unwrap();
    assert_eq!(&six, b"abcdef");
    // Host writes are outside dirty tracking (documented): the harvest
    // sees the holds' pages only.
    s.set_dirty_tracking(true).unwrap();
    let mut bitmap = [0u64; 1];
    s.track_dirty(Gpa(0x10_0000), 4 * PG, &mut bitmap).unwrap();
    o.write(0, &[1, 2, 3]).unwrap();
    assert_eq!(s.track_dirty(Gpa(0x10_0000), 4 * PG, &mut bitmap), Ok(0));
    let h = c.hold(Gpa(0x10_0000), Prot::RW).unwrap();
    h.write(5, &[9]).unwrap();
    h.release();
    assert_eq!(s.track_dirty(Gpa(0x10_0000), 4 * PG, &mut bitmap), Ok(1));
    assert_eq!(bitmap[0], 1);
    let mut first = [0u8; 6];
    o.read(0, &mut first).unwrap();
    assert_eq!(first, [1, 2, 3, 0, 0, 9]);
}

#[test]
fn bounds_and_missing_views_are_refused() {
    let (_r, o) = fragmented();
    o.write(0, &[0xaa; 16]).unwrap();
    let outside = Err(Error::Invalid(Invalid::OutsideObject));
    let mut buf = [0u8; 8];
    assert_eq!(o.read(4 * PG - 4, &mut buf), outside);
    assert_eq!(o.read(4 * PG + 1, &mut []), outside);
    assert_eq!(o.read(u64::MAX, &mut buf), outside);
    assert_eq!(o.read(u64::MAX - 3, &mut buf), outside);
    assert_eq!(o.write(4 * PG - 7, &buf), outside);
    assert_eq!(o.write(u64::MAX, &buf), outside);
    // Empty accesses inside or at the end are fine.
    assert_eq!(o.read(4 * PG, &mut []), Ok(()));
    assert_eq!(o.write(0, &[]), Ok(()));
    // Nothing was written by the refused writes.
    let mut all = vec![0u8; 4 * PG as usize];
    o.read(0, &mut all).unwrap();
    assert!(all[..16].iter().all(|&b| b == 0xaa) && all[16..].iter().all(|&b| b == 0));
    // MMIO without a host view has none.
    let m = VmObject::mmio(Pfn(0xfee00), PG).unwrap();
    assert_eq!(m.read(0, &mut buf), Err(Error::NoHostView));
    assert_eq!(m.write(0, &buf), Err(Error::NoHostView));
    assert_eq!(m.read(2 * PG, &mut buf), outside);
}

#[test]
fn mmio_with_a_view() {
    let mut backing = vec![0u64; 2 * PG as usize / 8];
    let host = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
    // SAFETY: `backing` outlives the object (dropped at the end of the
    // test, after `m`), and is only accessed through the object meanwhile.
    let m = unsafe { VmObject::mmio_with_view(Pfn(0xc0000), 2 * PG, Some(host)) }.unwrap();
    m.write(PG - 2, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    m.read(PG - 2, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    drop(m);
    let bytes: Vec<u8> = backing.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&bytes[PG as usize - 2..PG as usize + 2], &[1, 2, 3, 4]);
}

#[test]
fn table_view_lists_pages_and_reads_entries() {
    let (_r, o) = fragmented();
    let s: VmSpace<HeapPages> =
        VmSpace::new(SpaceConfig::new(1 << 30, PteFormat::ept(Caps::default())), HeapPages::new()).unwrap();
    s.map(&o, 0, Gpa(0x20_0000), 4 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0x20_0000), 4 * PG).unwrap();
    s.with_table(|t| {
        let pages: Vec<_> = t.table_pages_iter().map(|p| (p.level, p.gpa)).collect();
        // Root, PDPT, PD, and the leaf table covering 2 MiB .. 4 MiB.
        assert_eq!(pages, [(4, Gpa(0)), (3, Gpa(0)), (2, Gpa(0)), (1, Gpa(0x20_0000))]);
        assert_eq!(pages.len(), t.table_pages());
        for p in 0..4 {
            let e = t.read_entry(Gpa(0x20_0000 + p * PG), 1).unwrap();
            assert_eq!(t.format().frame(e), o.frame_at(p * PG).unwrap());
        }
        assert_eq!(t.read_entry(Gpa(1 << 40), 1), Err(nested_pt::Error::NotPopulated));
    });
}
