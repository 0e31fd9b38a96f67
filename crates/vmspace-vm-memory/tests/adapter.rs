//! The adapter itself: boundaries, holes, protection, dirty marking,
//! `check_range`, and an unmap racing a device access.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};
use vmspace::{Gpa, Prot, VmObject};
use vmspace_vm_memory::VmMemory;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Read `len` bytes at `gpa` with plain holds (not through the adapter).
fn read_direct(g: &Guest, gpa: u64, len: usize) -> Vec<u8> {
    let c = g.space.client();
    let chain = c.hold_range(Gpa(gpa), len as u64, Prot::READ).unwrap();
    let mut out = vec![0; len];
    chain.read(0, &mut out).unwrap();
    out
}

fn is_permission_denied(e: &GuestMemoryError) -> bool {
    matches!(e, GuestMemoryError::IOError(io) if io.kind() == ErrorKind::PermissionDenied)
}

#[test]
fn crosses_pages_of_one_mapping() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let at = B.0 + 5 * PG - 50;
    let data = pattern(100, 1);
    mem.write_slice(&data, GuestAddress(at)).unwrap();
    assert_eq!(read_direct(&g, at, 100), data);
    let mut back = vec![0; 100];
    mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert_eq!(back, data);
    // Two slices, split at the page boundary.
    let lens: Vec<usize> =
        mem.get_slices(GuestAddress(at), 100, Permissions::Read).unwrap().map(|s| s.unwrap().len()).collect();
    assert_eq!(lens, [50, 50]);
    // A multi-page buffer.
    let big = pattern(3 * PG as usize + 123, 7);
    mem.write_slice(&big, GuestAddress(B.0 + 77)).unwrap();
    assert_eq!(read_direct(&g, B.0 + 77, big.len()), big);
    assert_eq!(mem.stray_writes(), 0);
}

#[test]
fn crosses_contiguous_mappings() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let at = C.0 - 10; // last 10 bytes of B, first 10 of C
    let data = pattern(20, 3);
    mem.write_slice(&data, GuestAddress(at)).unwrap();
    assert_eq!(read_direct(&g, at, 20), data);
    let v: u64 = 0x1122_3344_5566_7788;
    mem.write_obj(v, GuestAddress(C.0 - 4)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(C.0 - 4)).unwrap(), v);
    assert!(mem.check_range(GuestAddress(at), 20, Permissions::ReadWrite));
}

#[test]
fn hole_is_an_error() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let hole = A.0 + A.1;
    // Entirely in the hole.
    match mem.read_obj::<u32>(GuestAddress(hole + 8)) {
        Err(GuestMemoryError::InvalidGuestAddress(a)) => assert_eq!(a, GuestAddress(hole + 8)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(mem.write_obj(1u32, GuestAddress(hole)), Err(GuestMemoryError::InvalidGuestAddress(_))));
    // Running into the hole: vm-memory's partial semantics.
    let data = pattern(20, 9);
    assert_eq!(mem.write(&data, GuestAddress(hole - 10)).unwrap(), 10);
    match mem.write_slice(&data, GuestAddress(hole - 10)) {
        Err(GuestMemoryError::PartialBuffer { expected: 20, completed: 10 }) => {}
        other => panic!("{other:?}"),
    }
    let mut back = [0u8; 20];
    assert!(matches!(
        mem.read_slice(&mut back, GuestAddress(hole - 10)),
        Err(GuestMemoryError::PartialBuffer { expected: 20, completed: 10 })
    ));
    assert_eq!(back[..10], data[..10]);
    // The slice iterator reports the hole and stops.
    let items: Vec<_> = mem.get_slices(GuestAddress(hole - 10), 20, Permissions::Read).unwrap().collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok());
    assert!(matches!(&items[1], Err(GuestMemoryError::InvalidGuestAddress(a)) if *a == GuestAddress(hole)));
    // Beyond the space, and wrapping past the top of the address space.
    assert!(mem.read_obj::<u8>(GuestAddress(SIZE + PG)).is_err());
    assert!(matches!(
        mem.get_slices(GuestAddress(u64::MAX - 3), 8, Permissions::Read).map(|_| ()),
        Err(GuestMemoryError::GuestAddressOverflow)
    ));
    assert!(mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
}

#[test]
fn read_only_mapping_refuses_writes() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let at = GuestAddress(R.0 + 16);
    assert_eq!(mem.read_obj::<u64>(at).unwrap(), 0);
    let e = mem.write_obj(7u64, at).unwrap_err();
    assert!(is_permission_denied(&e), "{e:?}");
    let e = mem.store(7u32, at, Ordering::Relaxed).unwrap_err();
    assert!(is_permission_denied(&e), "{e:?}");
    // A write that starts in RW memory and runs into read-only memory
    // does not exist in this layout; a slice iterator for write refuses
    // the first page.
    let mut it = mem.get_slices(at, 8, Permissions::Write).unwrap();
    assert!(is_permission_denied(&it.next().unwrap().unwrap_err()));
    assert!(it.next().is_none());
    assert_eq!(mem.read_obj::<u64>(at).unwrap(), 0);
    assert!(harvest(&g.space).is_empty());
}

#[test]
fn check_range_and_permissions() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let rw = GuestAddress(B.0);
    let ro = GuestAddress(R.0);
    for p in [Permissions::No, Permissions::Read, Permissions::Write, Permissions::ReadWrite] {
        assert!(mem.check_range(rw, 2 * MIB as usize, p), "{p:?}");
        assert!(!mem.check_range(GuestAddress(A.1 - PG), 2 * PG as usize, p), "into the hole {p:?}");
    }
    assert!(mem.check_range(ro, R.1 as usize, Permissions::Read));
    assert!(!mem.check_range(ro, R.1 as usize, Permissions::Write));
    assert!(!mem.check_range(ro, R.1 as usize, Permissions::ReadWrite));
    // One byte past the read-only mapping is a hole.
    assert!(!mem.check_range(ro, R.1 as usize + 1, Permissions::Read));
    assert!(mem.check_range(GuestAddress(A.1), 0, Permissions::Read), "empty range");
    assert!(!mem.check_range(GuestAddress(u64::MAX), 2, Permissions::Read));
    // check_range marks nothing.
    assert!(harvest(&g.space).is_empty());
}

#[test]
fn dirty_marking_is_exact() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    // Fault things in and clear.
    mem.read_obj::<u64>(GuestAddress(B.0)).unwrap();
    assert!(harvest(&g.space).is_empty());

    let page = |gpa: u64| gpa / PG;
    mem.write_obj(1u64, GuestAddress(B.0 + 3 * PG + 8)).unwrap(); // write_obj
    mem.store(2u32, GuestAddress(B.0 + 5 * PG), Ordering::Release).unwrap(); // store
    let _: u64 = mem.read_obj(GuestAddress(B.0 + 6 * PG)).unwrap(); // read: clean
    let _: u32 = mem.load(GuestAddress(B.0 + 7 * PG), Ordering::Acquire).unwrap(); // load: clean
    // Held for write but never written: clean.
    let untouched: Vec<_> =
        mem.get_slices(GuestAddress(B.0 + 8 * PG), PG as usize, Permissions::Write).unwrap().collect();
    drop(untouched);
    // A write spanning the B/C boundary dirties both pages.
    mem.write_slice(&[0xAA; 16], GuestAddress(C.0 - 8)).unwrap();
    // read_volatile_from: a device DMA from a host source.
    let src = pattern(2 * PG as usize, 5);
    mem.read_exact_volatile_from(GuestAddress(B.0 + 20 * PG + 100), &mut &src[..], src.len()).unwrap();
    // write_volatile_to: DMA to a host sink reads only.
    let mut sink = Vec::new();
    mem.write_all_volatile_to(GuestAddress(B.0 + 30 * PG), &mut sink, 100).unwrap();

    let mut want = vec![
        page(B.0 + 3 * PG),
        page(B.0 + 5 * PG),
        page(C.0 - 8),
        page(C.0),
        page(B.0 + 20 * PG),
        page(B.0 + 21 * PG),
        page(B.0 + 22 * PG),
    ];
    want.sort();
    assert_eq!(harvest(&g.space), want);
    assert!(harvest(&g.space).is_empty());
    assert_eq!(mem.stray_writes(), 0);
}

#[test]
fn live_slice_writes_are_marked_when_made() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let slices: Vec<_> = mem
        .get_slices(GuestAddress(B.0 + 40 * PG), PG as usize, Permissions::Write)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(harvest(&g.space).is_empty());
    slices[0].write_obj(5u32, 0).unwrap();
    assert!(slices[0].bitmap().dirty_at(0));
    // Seen by a harvest while the slice is still alive ...
    assert_eq!(harvest(&g.space), [(B.0 + 40 * PG) / PG]);
    // ... and not again after its release.
    drop(slices);
    assert!(harvest(&g.space).is_empty());
    // Subslices and refs share the hold and mark it too.
    let s = mem.get_slices(GuestAddress(B.0 + 41 * PG), 64, Permissions::Write).unwrap().next().unwrap().unwrap();
    let sub = s.offset(8).unwrap();
    drop(s);
    sub.write_obj(9u16, 0).unwrap();
    drop(sub);
    assert_eq!(harvest(&g.space), [(B.0 + 41 * PG) / PG]);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(B.0 + 41 * PG + 8)).unwrap(), 9);
}

#[test]
fn slice_outlives_unmap_safely() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let obj = VmObject::ram(g.reservoir.clone(), 4 * PG).unwrap();
    let at = 12 * MIB;
    g.space.map(&obj, 0, Gpa(at), 4 * PG, Prot::RW).unwrap();
    let s = mem.get_slices(GuestAddress(at + PG), 16, Permissions::Write).unwrap().next().unwrap().unwrap();
    harvest(&g.space);
    g.space.unmap(Gpa(at), 4 * PG).unwrap();
    // The hold keeps the object's memory: the write lands in it, and is not
    // reported (the mapping is gone, its dirty bits with it).
    s.write_obj(0xfeed_u32, 0).unwrap();
    drop(s);
    assert!(harvest(&g.space).is_empty());
    assert!(mem.read_obj::<u32>(GuestAddress(at + PG)).is_err());
    // Map the object elsewhere: the write is there.
    g.space.map(&obj, 0, Gpa(13 * MIB), 4 * PG, Prot::RW).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(13 * MIB + PG)).unwrap(), 0xfeed);
}

#[test]
fn unmap_races_device_access() {
    let g = guest();
    let obj = VmObject::ram(g.reservoir.clone(), 16 * PG).unwrap();
    let at = 12 * MIB;
    let len = 16 * PG;
    g.space.map(&obj, 0, Gpa(at), len, Prot::RW).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let dev_mem = VmMemory::new(&g.space);
    let stop2 = stop.clone();
    let device = std::thread::spawn(move || {
        let mem = dev_mem;
        let (mut ok, mut failed) = (0u64, 0u64);
        let buf = pattern(3 * PG as usize, 11);
        let mut back = vec![0u8; buf.len()];
        let mut i = 0u64;
        while !stop2.load(Ordering::Relaxed) || ok + failed < 1000 {
            let gpa = GuestAddress(at + (i % 12) * PG + 17);
            i += 1;
            let r = mem
                .write_slice(&buf, gpa)
                .and_then(|()| mem.read_slice(&mut back, gpa))
                .and_then(|()| mem.store(i as u32, GuestAddress(at), Ordering::Release));
            match r {
                Ok(()) => ok += 1,
                Err(GuestMemoryError::InvalidGuestAddress(_) | GuestMemoryError::PartialBuffer { .. }) => failed += 1,
                Err(e) => panic!("unexpected error {e:?}"),
            }
            // A slice kept across an unmap stays usable.
            if let Some(Ok(s)) = mem.get_slices(gpa, 64, Permissions::Write).unwrap().next() {
                std::thread::yield_now();
                s.write_slice(&buf[..64], 0).unwrap();
            }
        }
        (ok, failed)
    });
    for _ in 0..300 {
        g.space.unmap(Gpa(at), len).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(20));
        g.space.map(&obj, 0, Gpa(at), len, Prot::RW).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = device.join().unwrap();
    assert!(ok + failed >= 1000);
    assert!(ok > 0 && failed > 0, "both outcomes seen: {ok} completed, {failed} refused");
    eprintln!("device accesses: {ok} completed, {failed} refused");
}

#[test]
fn one_memory_per_thread() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let other = mem.clone();
    let h = std::thread::spawn(move || other.write_obj(42u64, GuestAddress(B.0 + 100 * PG)).unwrap());
    h.join().unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(B.0 + 100 * PG)).unwrap(), 42);
    assert!(mem.physical_memory().is_none());
}
