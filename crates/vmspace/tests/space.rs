//! Unit tests of the space: every validation rule and error, mappings,
//! populate, faults, holds, dirty operations, clients.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use nested_pt::{Caps, FormatKind};
use vmspace::*;

const GIB: u64 = 1 << 30;

#[test]
fn map_validation() {
    let s = space(GIB, false);
    let r = reservoir(64);
    let o = ram(&r, 8);
    let before = table_pages(&s);
    let inv = |i| Err(Error::Invalid(i));
    assert_eq!(s.map(&o, 0, Gpa(0), 0, Prot::RW), inv(Invalid::ZeroLength));
    assert_eq!(s.map(&o, 0, Gpa(1), PG, Prot::RW), inv(Invalid::Unaligned));
    assert_eq!(s.map(&o, 0, Gpa(0), PG + 1, Prot::RW), inv(Invalid::Unaligned));
    assert_eq!(s.map(&o, 7, Gpa(0), PG, Prot::RW), inv(Invalid::Unaligned));
    assert_eq!(s.map(&o, 0, Gpa(u64::MAX - PG + 1), 2 * PG, Prot::RW), inv(Invalid::Overflow));
    assert_eq!(s.map(&o, u64::MAX - PG + 1, Gpa(0), 2 * PG, Prot::RW), inv(Invalid::Overflow));
    assert_eq!(s.map(&o, 0, Gpa(0), 9 * PG, Prot::RW), inv(Invalid::OutsideObject));
    assert_eq!(s.map(&o, 4 * PG, Gpa(0), 5 * PG, Prot::RW), inv(Invalid::OutsideObject));
    assert_eq!(s.map(&o, 8 * PG, Gpa(0), PG, Prot::RW), inv(Invalid::OutsideObject));
    assert_eq!(s.map(&o, 0, Gpa(0), PG, Prot::empty()), inv(Invalid::BadProt));
    assert_eq!(s.map(&o, 0, Gpa(0), PG, Prot::WRITE), inv(Invalid::BadProt));
    // End at or beyond the size: no space.
    assert_eq!(s.map(&o, 0, Gpa(GIB - PG), PG, Prot::RW), Err(Error::NoSpace(NoSpace::BeyondEnd)));
    assert_eq!(s.map(&o, 0, Gpa(GIB), PG, Prot::RW), Err(Error::NoSpace(NoSpace::BeyondEnd)));
    assert_eq!(s.map(&o, 0, Gpa(GIB - 2 * PG), 2 * PG, Prot::RW), Err(Error::NoSpace(NoSpace::BeyondEnd)));
    // Nothing changed.
    assert!(s.mappings().is_empty());
    assert_eq!(table_pages(&s), before);
    // The last page below the end is fine.
    s.map(&o, 0, Gpa(GIB - 2 * PG), PG, Prot::RW).unwrap();
    s.unmap(Gpa(GIB - 2 * PG), PG).unwrap();
    assert_eq!(table_pages(&s), before);
}

#[test]
fn map_overlap() {
    let s = space(GIB, false);
    let r = reservoir(64);
    let o = ram(&r, 16);
    s.map(&o, 0, Gpa(0x10 * PG), 4 * PG, Prot::RW).unwrap();
    let overlap = Err(Error::NoSpace(NoSpace::Overlap));
    assert_eq!(s.map(&o, 0, Gpa(0x10 * PG), 4 * PG, Prot::RW), overlap, "identical");
    assert_eq!(s.map(&o, 0, Gpa(0x11 * PG), PG, Prot::RW), overlap, "inside");
    assert_eq!(s.map(&o, 0, Gpa(0xe * PG), 3 * PG, Prot::RW), overlap, "over the start");
    assert_eq!(s.map(&o, 0, Gpa(0x13 * PG), 2 * PG, Prot::RW), overlap, "over the end");
    assert_eq!(s.map(&o, 0, Gpa(0xf * PG), 8 * PG, Prot::RW), overlap, "around");
    // Adjacent on both sides is fine, and the same object twice too.
    s.map(&o, 0, Gpa(0xf * PG), PG, Prot::READ).unwrap();
    s.map(&o, 4 * PG, Gpa(0x14 * PG), PG, Prot::RW).unwrap();
    let m: Vec<_> = s.mappings().iter().map(|m| (m.gpa.0, m.len)).collect();
    assert_eq!(m, vec![(0xf * PG, PG), (0x10 * PG, 4 * PG), (0x14 * PG, PG)]);
    let info = s.mapping_at(Gpa(0x12 * PG + 5)).unwrap();
    assert_eq!((info.gpa, info.offset, info.prot), (Gpa(0x10 * PG), 0, Prot::RW));
    assert!(s.mapping_at(Gpa(0x15 * PG)).is_none());
}

#[test]
fn unmap_validation_and_exact_match() {
    let s = space(GIB, false);
    let r = reservoir(64);
    let o = ram(&r, 8);
    s.map(&o, 0, Gpa(0x100 * PG), 8 * PG, Prot::RW).unwrap();
    assert_eq!(s.unmap(Gpa(0x100 * PG), 0), Err(Error::Invalid(Invalid::ZeroLength)));
    assert_eq!(s.unmap(Gpa(0x100 * PG + 1), PG), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(s.unmap(Gpa(0x100 * PG), 3), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(s.unmap(Gpa(u64::MAX - PG + 1), 2 * PG), Err(Error::Invalid(Invalid::Overflow)));
    assert_eq!(s.unmap(Gpa(0x100 * PG), 4 * PG), Err(Error::NotFound), "part");
    assert_eq!(s.unmap(Gpa(0x101 * PG), 7 * PG), Err(Error::NotFound), "tail");
    assert_eq!(s.unmap(Gpa(0x100 * PG), 9 * PG), Err(Error::NotFound), "more");
    assert_eq!(s.unmap(Gpa(0x200 * PG), 8 * PG), Err(Error::NotFound), "elsewhere");
    assert_eq!(s.mappings().len(), 1);
    // Unmap with nothing present: no generation bump, tables vacated...
    let g = s.table_gen();
    s.unmap(Gpa(0x100 * PG), 8 * PG).unwrap();
    assert!(s.mappings().is_empty());
    assert_eq!(table_pages(&s), 1);
    assert_eq!(s.unmap(Gpa(0x100 * PG), 8 * PG), Err(Error::NotFound));
    // ... though freeing table pages bumps it (a vCPU may have cached them).
    assert!(s.table_gen() > g);
    // With pages present it bumps, and the resident count drops.
    s.map(&o, 0, Gpa(0x100 * PG), 8 * PG, Prot::RW).unwrap();
    s.map(&o, 0, Gpa(0x108 * PG), 8 * PG, Prot::RW).unwrap();
    assert_eq!(s.populate(Gpa(0x100 * PG), 8 * PG), Ok(8));
    let g = s.table_gen();
    s.unmap(Gpa(0x108 * PG), 8 * PG).unwrap();
    assert_eq!(s.table_gen(), g, "no page present, no table freed");
    s.unmap(Gpa(0x100 * PG), 8 * PG).unwrap();
    assert_eq!(s.table_gen(), g + 1);
    assert_eq!(s.resident_count(), 0);
    s.with_table(|t| assert_eq!(t.pages().live(), 1));
}

#[test]
fn populate_and_lookup() {
    let s = space(GIB, false);
    let r = reservoir(64);
    let o = ram(&r, 8);
    s.map(&o, 2 * PG, Gpa(0x40 * PG), 4 * PG, Prot::READ).unwrap();
    assert_eq!(s.populate(Gpa(0x40 * PG), 0), Err(Error::Invalid(Invalid::ZeroLength)));
    assert_eq!(s.populate(Gpa(0x40 * PG + 8), PG), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(s.populate(Gpa(0x3f * PG), 2 * PG), Err(Error::NotFound));
    assert_eq!(s.populate(Gpa(0x42 * PG), 4 * PG), Err(Error::NotFound));
    assert_eq!(s.populate(Gpa(0x80 * PG), PG), Err(Error::NotFound));
    assert_eq!(s.resident_count(), 0);
    assert_eq!(s.lookup(Gpa(0x41 * PG)), None);
    assert_eq!(s.populate(Gpa(0x41 * PG), 2 * PG), Ok(2));
    assert_eq!(s.populate(Gpa(0x40 * PG), 4 * PG), Ok(2));
    assert_eq!(s.populate(Gpa(0x40 * PG), 4 * PG), Ok(0));
    assert_eq!(s.resident_count(), 4);
    for i in 0..4 {
        assert_eq!(s.lookup(Gpa((0x40 + i) * PG)), Some((o.frame_at((2 + i) * PG).unwrap(), Prot::READ)));
    }
}

#[test]
fn fault_errors_and_fault_around() {
    let s = space_with(GIB, npt(), false, 16);
    let r = reservoir(64);
    let o = ram(&r, 40);
    s.map(&o, 0, Gpa(0x10 * PG), 40 * PG, Prot::READ).unwrap();
    let c = s.client();
    assert_eq!(c.fault(Gpa(0x9 * PG), Prot::READ), Err(Error::NoMapping));
    assert_eq!(c.fault(Gpa(GIB + PG), Prot::READ), Err(Error::NoMapping));
    assert_eq!(c.fault(Gpa(u64::MAX), Prot::READ), Err(Error::NoMapping));
    assert_eq!(c.fault(Gpa(0x10 * PG), Prot::WRITE), Err(Error::Protection));
    assert_eq!(c.fault(Gpa(0x10 * PG), Prot::READ | Prot::EXEC), Err(Error::Protection));
    assert_eq!(c.fault(Gpa(0x10 * PG), Prot::empty()), Err(Error::Invalid(Invalid::BadProt)));
    assert_eq!(s.resident_count(), 0);
    // Unaligned address, fault-around: the aligned 16-page window [0x10, 0x20).
    c.fault(Gpa(0x13 * PG + 0x123), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), 16);
    assert!(s.lookup(Gpa(0x1f * PG)).is_some());
    assert!(s.lookup(Gpa(0x20 * PG)).is_none());
    // Window clipped by the end of the mapping: [0x30, 0x38).
    c.fault(Gpa(0x37 * PG), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), 24);
    // A present page: nothing new.
    c.fault(Gpa(0x37 * PG), Prot::READ).unwrap();
    assert_eq!(s.resident_count(), 24);
}

#[test]
fn two_mappings_in_one_leaf_table() {
    let s = space(GIB, true);
    let r = reservoir(64);
    let a = ram(&r, 4);
    let b = ram(&r, 4);
    s.map(&a, 0, Gpa(0x200 * PG), 4 * PG, Prot::RW).unwrap();
    s.map(&b, 0, Gpa(0x204 * PG), 4 * PG, Prot::RW).unwrap();
    let tables = table_pages(&s);
    s.populate(Gpa(0x200 * PG), 4 * PG).unwrap();
    s.populate(Gpa(0x204 * PG), 4 * PG).unwrap();
    let c = s.client();
    {
        let h = c.hold(Gpa(0x205 * PG), Prot::RW).unwrap();
        h.write(8, b"before").unwrap();
    }
    s.unmap(Gpa(0x200 * PG), 4 * PG).unwrap();
    assert_eq!(table_pages(&s), tables, "the shared leaf table stays");
    assert_eq!(c.fault(Gpa(0x201 * PG), Prot::READ), Err(Error::NoMapping));
    assert!(s.lookup(Gpa(0x201 * PG)).is_none());
    // B still readable and writable, through the table and through holds.
    assert_eq!(s.lookup(Gpa(0x205 * PG)), Some((b.frame_at(PG).unwrap(), Prot::RW)));
    c.fault(Gpa(0x207 * PG), Prot::WRITE).unwrap();
    let h = c.hold(Gpa(0x205 * PG), Prot::RW).unwrap();
    let mut buf = [0u8; 6];
    h.read(8, &mut buf).unwrap();
    assert_eq!(&buf, b"before");
    h.write(8, b"after!").unwrap();
    assert!(!h.release());
    let mut bm = [0u64; 1];
    s.track_dirty(Gpa(0x204 * PG), 4 * PG, &mut bm).unwrap();
    assert_eq!(bm[0], 0b10);
    assert_eq!(s.resident_count(), 4);
}

#[test]
fn mapping_straddling_the_512_gib_root_boundary() {
    let s = space(2 << 40, true);
    let r = reservoir(64);
    let o = ram(&r, 8);
    let base = (512 << 30) - 4 * PG;
    s.map(&o, 0, Gpa(base), 8 * PG, Prot::RW).unwrap();
    // Root + two 3-level paths below it.
    assert_eq!(table_pages(&s), 7);
    assert_eq!(s.populate(Gpa(base), 8 * PG), Ok(8));
    let c = s.client();
    for i in 0..8 {
        let h = c.hold(Gpa(base + i * PG), Prot::RW).unwrap();
        assert_eq!(h.pfn(), o.frame_at(i * PG).unwrap());
        h.write_u64(0, 0xdead_0000 + i).unwrap();
    }
    for i in 0..8 {
        let h = c.hold(Gpa(base + i * PG), Prot::READ).unwrap();
        assert_eq!(h.read_u64(0), Ok(0xdead_0000 + i));
    }
    let mut bm = [0u64; 1];
    assert_eq!(s.track_dirty(Gpa(base), 8 * PG, &mut bm), Ok(8));
    assert_eq!(bm[0], 0xff);
    s.unmap(Gpa(base), 8 * PG).unwrap();
    assert_eq!(table_pages(&s), 1);
    assert_eq!(s.resident_count(), 0);
    s.with_table(|t| assert!(t.pages().errors().is_empty()));
}

#[test]
fn hold_validation_and_copies() {
    let s = space(GIB, false);
    let r = reservoir(64);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 2 * PG, Prot::RW).unwrap();
    s.map(&o, 2 * PG, Gpa(2 * PG), 2 * PG, Prot::READ).unwrap();
    let c = s.client();
    assert_eq!(c.hold(Gpa(1), Prot::READ).unwrap_err(), Error::Invalid(Invalid::Unaligned));
    assert_eq!(c.hold(Gpa(0), Prot::EXEC).unwrap_err(), Error::Invalid(Invalid::BadProt));
    assert_eq!(c.hold(Gpa(0), Prot::RWX).unwrap_err(), Error::Invalid(Invalid::BadProt));
    assert_eq!(c.hold(Gpa(0), Prot::empty()).unwrap_err(), Error::Invalid(Invalid::BadProt));
    assert_eq!(c.hold(Gpa(2 * PG), Prot::WRITE).unwrap_err(), Error::Protection);
    assert_eq!(c.hold(Gpa(8 * PG), Prot::READ).unwrap_err(), Error::NoMapping);
    let h = c.hold(Gpa(2 * PG), Prot::READ).unwrap();
    assert_eq!(h.write(0, b"x"), Err(Error::Protection));
    assert_eq!(h.mark_dirty(), Err(Error::Protection));
    drop(h);
    let w = c.hold(Gpa(PG), Prot::WRITE).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(w.read(0, &mut b), Err(Error::Protection));
    w.write(4092, b"abcd").unwrap();
    assert_eq!(w.write(4093, b"abcd"), Err(Error::Invalid(Invalid::OutsideHold)));
    assert_eq!(w.write(usize::MAX, b"a"), Err(Error::Invalid(Invalid::OutsideHold)));
    assert_eq!(w.write_u64(4, 1), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(w.write_u64(4096, 1), Err(Error::Invalid(Invalid::OutsideHold)));
    drop(w);
    let rh = c.hold(Gpa(PG), Prot::READ).unwrap();
    rh.read(4092, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
    assert_eq!(rh.gpa(), Gpa(PG));
    assert_eq!(rh.prot(), Prot::READ);
    // The host pointer addresses the object's frame.
    let arena = r.arena();
    assert_eq!(arena.host_ptr(o.frame_at(PG).unwrap()).unwrap().as_ptr(), rh.as_ptr());
}

#[test]
fn hold_chain_crosses_pages() {
    let s = space(GIB, true);
    let r = reservoir(64);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0x10 * PG), 4 * PG, Prot::RW).unwrap();
    let c = s.client();
    let data: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    let start = 0x10 * PG + 4000;
    let chain = c.hold_range(Gpa(start), data.len() as u64, Prot::RW).unwrap();
    assert_eq!(chain.holds().len(), 3);
    assert_eq!(chain.len(), 6000);
    chain.write(0, &data).unwrap();
    assert_eq!(chain.write(1, &data), Err(Error::Invalid(Invalid::OutsideHold)));
    let mut back = vec![0u8; 5000];
    chain.read(1000, &mut back).unwrap();
    assert_eq!(&back[..], &data[1000..]);
    assert!(!chain.release());
    let mut bm = [0u64; 1];
    s.track_dirty(Gpa(0x10 * PG), 4 * PG, &mut bm).unwrap();
    assert_eq!(bm[0], 0b111);
    assert_eq!(c.hold_range(Gpa(0x13 * PG), 2 * PG, Prot::READ).unwrap_err(), Error::NoMapping);
    assert_eq!(c.hold_range(Gpa(0), 0, Prot::READ).unwrap_err(), Error::Invalid(Invalid::ZeroLength));
    assert_eq!(c.hold_range(Gpa(u64::MAX), 2, Prot::READ).unwrap_err(), Error::Invalid(Invalid::Overflow));
    // A chain built by hand.
    let mut ch = HoldChain::new();
    ch.push(c.hold(Gpa(0x11 * PG), Prot::READ).unwrap());
    ch.push(c.hold(Gpa(0x12 * PG), Prot::READ).unwrap());
    let mut two = vec![0u8; 2 * PG as usize];
    ch.read(0, &mut two).unwrap();
    assert_eq!(&two[..6000 - 96], &data[96..]);
}

#[test]
fn hold_across_unmap_keeps_object_alive() {
    let s = space(GIB, true);
    let r = reservoir(64);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0x10 * PG), 4 * PG, Prot::RW).unwrap();
    let c = s.client();
    let other = s.client();
    let w = c.hold(Gpa(0x11 * PG), Prot::RW).unwrap();
    let kept = c.hold(Gpa(0x13 * PG), Prot::READ).unwrap();
    w.write(0, b"survives").unwrap();
    drop(o);
    s.unmap(Gpa(0x10 * PG), 4 * PG).unwrap();
    assert_eq!(r.stats().allocated, 4 * PG, "object alive for the holds");
    // Remap something else at the same place.
    let o2 = ram(&r, 4);
    s.map(&o2, 0, Gpa(0x10 * PG), 4 * PG, Prot::RW).unwrap();
    // A hold taken after the remap is not confused with the old ones.
    let fresh = c.hold(Gpa(0x11 * PG), Prot::RW).unwrap();
    assert_ne!(fresh.pfn(), w.pfn());
    let mut b = [0u8; 8];
    w.read(0, &mut b).unwrap();
    assert_eq!(&b, b"survives");
    assert!(w.release(), "mapping went away");
    assert!(!fresh.release(), "new mapping still there");
    let mut bm = [0u64; 1];
    s.track_dirty(Gpa(0x10 * PG), 4 * PG, &mut bm).unwrap();
    assert_eq!(bm[0], 0b10, "only the fresh hold's page is dirty");
    assert!(kept.release());
    assert_eq!(r.stats().allocated, 4 * PG, "old object freed with the last hold");
    // The other client had no holds and kept nothing.
    drop(other);
    drop(o2);
    s.unmap(Gpa(0x10 * PG), 4 * PG).unwrap();
    assert_eq!(r.stats().allocated, 0);
}

#[test]
fn dirty_validation() {
    let s = space(GIB, false);
    let mut bm = [0u64; 4];
    assert_eq!(s.track_dirty(Gpa(0), PG, &mut bm), Err(Error::NotPermitted));
    for op in [DirtyOp::Get, DirtyOp::Set, DirtyOp::Reset] {
        assert_eq!(s.dirty_op(op, Gpa(0), PG, None, &mut bm), Err(Error::NotPermitted));
    }
    s.set_dirty_tracking(true).unwrap();
    assert_eq!(s.track_dirty(Gpa(1), PG, &mut bm), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(s.track_dirty(Gpa(0), 5, &mut bm), Err(Error::Invalid(Invalid::Unaligned)));
    assert_eq!(s.track_dirty(Gpa(0), 0, &mut bm), Err(Error::Invalid(Invalid::ZeroLength)));
    assert_eq!(s.track_dirty(Gpa(u64::MAX - PG + 1), 2 * PG, &mut bm), Err(Error::Overflow));
    assert_eq!(s.track_dirty(Gpa(0), 257 * PG, &mut bm), Err(Error::Invalid(Invalid::BitmapTooSmall)));
    let sel = [0u64; 1];
    assert_eq!(
        s.dirty_op(DirtyOp::Get, Gpa(0), 65 * PG, Some(&sel), &mut bm),
        Err(Error::Invalid(Invalid::BitmapTooSmall))
    );
    assert_eq!(s.track_dirty(Gpa(0), 256 * PG, &mut bm), Ok(0));
    // Beyond the space (and the 48-bit table): zeros.
    bm = [u64::MAX; 4];
    assert_eq!(s.track_dirty(Gpa((1 << 48) - PG), 2 * PG, &mut bm), Ok(0));
    assert_eq!(bm[0] & 3, 0);
}

#[test]
fn dirty_get_set_reset_with_selection() {
    let s = space(GIB, true);
    let r = reservoir(64);
    let o = ram(&r, 8);
    let ro = ram(&r, 2);
    s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW).unwrap();
    s.map(&ro, 0, Gpa(8 * PG), 2 * PG, Prot::READ).unwrap();
    let c = s.client();
    for p in [1u64, 3, 5] {
        c.hold(Gpa(p * PG), Prot::WRITE).unwrap().write(0, b"d").unwrap();
    }
    // Deferred dirty: not marked...
    c.hold_ext(Gpa(6 * PG), Prot::WRITE, true).unwrap().write(0, b"d").unwrap();
    // ... unless asked.
    let h = c.hold_ext(Gpa(7 * PG), Prot::WRITE, true).unwrap();
    h.mark_dirty().unwrap();
    drop(h);
    let g = s.table_gen();
    let mut bm = [0u64; 1];
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 12 * PG, None, &mut bm), Ok(4));
    assert_eq!(bm[0], 0b1010_1010);
    assert_eq!(s.table_gen(), g, "Get changes nothing: no generation bump");
    // Get does not clear; unselected pages of the range report 0, bits
    // past the range (12..) are left alone.
    let sel = [0b0000_0110u64];
    let mut out = [0xf000u64];
    assert_eq!(s.dirty_op(DirtyOp::Reset, Gpa(0), 12 * PG, Some(&sel), &mut out), Ok(1));
    assert_eq!(out[0], 0xf000 | 0b10, "page 2 clean, page 1 dirty, others 0, past the range untouched");
    assert_eq!(s.table_gen(), g + 1, "a Reset that cleared a bit bumps the generation once");
    // A Reset of selected pages that are all clean clears nothing.
    assert_eq!(s.dirty_op(DirtyOp::Reset, Gpa(0), 12 * PG, Some(&[0b0101]), &mut out), Ok(0));
    assert_eq!(s.table_gen(), g + 1, "a Reset that cleared nothing does not bump");
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 12 * PG, None, &mut bm), Ok(3));
    assert_eq!(bm[0], 0b1010_1000);
    // Selected page without a leaf reports 0.
    let mut out = [u64::MAX];
    s.dirty_op(DirtyOp::Get, Gpa(0), 12 * PG, Some(&[1 << 9]), &mut out).unwrap();
    assert_eq!(out[0], !0xfff, "the range's bits all written, the rest left alone");
    // Set: faults in writable pages, marks them; read-only pages report 0.
    let before = s.resident_count();
    let mut out = [0u64];
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(0), 12 * PG, Some(&[0b11_0000_0001]), &mut out), Ok(1));
    assert_eq!(out[0], 1);
    assert_eq!(s.resident_count(), before + 1, "page 0 faulted in for write");
    assert!(s.lookup(Gpa(8 * PG)).is_none(), "read-only mapping not faulted in by Set");
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(2 * PG), 2 * PG, None, &mut out), Ok(2));
    assert_eq!(out[0] & 0b11, 0b11);
    assert_eq!(s.table_gen(), g + 1, "Set only adds: no generation bump");
    assert_eq!(s.track_dirty(Gpa(0), 12 * PG, &mut bm), Ok(5));
    assert_eq!(bm[0], 0b1010_1101);
    assert_eq!(s.table_gen(), g + 2);
    assert_eq!(s.track_dirty(Gpa(0), 12 * PG, &mut bm), Ok(0));
    assert_eq!(s.table_gen(), g + 2, "a harvest that found nothing dirty does not bump");
}

#[test]
fn tracking_switch_and_invalidation_callbacks() {
    let s = VmSpace::<Pages>::new(SpaceConfig::new(GIB, PteFormat::ept(Caps::default())), pages()).unwrap();
    let r = reservoir(16);
    let o = ram(&r, 4);
    let c = s.client();
    type Log = Vec<(u64, u64, u64, String)>;
    let seen: Arc<Mutex<Log>> = Arc::default();
    let log = seen.clone();
    c.set_invalidation(Some(move |inv: &Invalidation<'_>| {
        let what = match inv.cause {
            Cause::Unmap { object, offset } => format!("unmap {} {:?}", offset, object.frame_at(offset)),
            Cause::Dirty => "dirty".into(),
            Cause::Tracking => "tracking".into(),
            Cause::Remap => "remap".into(),
            Cause::Swap => "swap".into(),
        };
        log.lock().unwrap().push((inv.gpa.0, inv.len, inv.generation, what));
    }));
    let root_off = s.table_root();
    s.set_dirty_tracking(true).unwrap();
    assert!(s.dirty_tracking());
    assert_eq!(s.table_root(), root_off | 1 << 6, "EPTP A/D enable");
    s.map(&o, PG, Gpa(0x40 * PG), 2 * PG, Prot::RW).unwrap();
    c.fault(Gpa(0x40 * PG), Prot::WRITE).unwrap();
    let mut bm = [0u64];
    // Nothing dirty yet (a fault does not set D: hardware does, on the
    // write): no invalidation; nor for a Get or a Set.
    assert_eq!(s.track_dirty(Gpa(0x40 * PG), 2 * PG, &mut bm), Ok(0));
    c.hold(Gpa(0x41 * PG), Prot::RW).unwrap().release();
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0x40 * PG), 2 * PG, None, &mut bm), Ok(1));
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(0x40 * PG), PG, None, &mut bm), Ok(1));
    // Two dirty pages cleared: one invalidation.
    assert_eq!(s.track_dirty(Gpa(0x40 * PG), 2 * PG, &mut bm), Ok(2));
    s.unmap(Gpa(0x40 * PG), 2 * PG).unwrap();
    s.set_dirty_tracking(false).unwrap();
    let g = s.table_gen();
    let seen = seen.lock().unwrap().clone();
    let expect_unmap = format!("unmap {} {:?}", PG, o.frame_at(PG));
    assert_eq!(
        seen,
        vec![
            (0, GIB, g - 3, "tracking".to_string()),
            (0x40 * PG, 2 * PG, g - 2, "dirty".to_string()),
            (0x40 * PG, 2 * PG, g - 1, expect_unmap),
            (0, GIB, g, "tracking".to_string()),
        ]
    );
    c.set_invalidation(None::<fn(&Invalidation<'_>)>);
    s.set_dirty_tracking(true).unwrap();
    assert_eq!(seen.len(), 4);
}

#[test]
fn destroy_orphans_clients() {
    let s = space(GIB, true);
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    let c = s.client();
    let c2 = c.clone();
    let h = c.hold(Gpa(PG), Prot::RW).unwrap();
    drop(o);
    s.destroy();
    assert!(c.is_orphaned() && c2.is_orphaned());
    assert_eq!(c.fault(Gpa(0), Prot::READ), Err(Error::Orphaned));
    assert_eq!(c2.hold(Gpa(0), Prot::READ).unwrap_err(), Error::Orphaned);
    assert_eq!(c.table_enter(0).err(), Some(Error::Orphaned));
    assert!(c.clone().is_orphaned());
    assert!(s.client().is_orphaned());
    let mut b = [0u8];
    assert_eq!(s.map(&ram(&r, 1), 0, Gpa(0), PG, Prot::RW), Err(Error::Orphaned));
    assert_eq!(s.track_dirty(Gpa(0), PG, &mut b.map(|_| 0u64)), Err(Error::Orphaned));
    // The held page is still readable, and the object lives until release.
    h.read(0, &mut b).unwrap();
    assert_eq!(r.stats().allocated, 4 * PG);
    assert!(h.release());
    assert_eq!(r.stats().allocated, 0);
    drop(s);
    drop(c);
}

#[test]
fn vcpu_kick_on_unmap() {
    let s = Arc::new(space(GIB, false));
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0), 4 * PG).unwrap();
    let entered = Arc::new(AtomicBool::new(false));
    let kicked = Arc::new(AtomicUsize::new(0));
    let gens = Arc::new(AtomicU64::new(0));
    let t = {
        let (s, entered, kicked, gens) = (s.clone(), entered.clone(), kicked.clone(), gens.clone());
        std::thread::spawn(move || {
            let c = s.client();
            let k = kicked.clone();
            c.set_kick(Some(move |_cpu: u32| {
                k.fetch_add(1, Ordering::SeqCst);
            }));
            let g = c.table_enter(3).unwrap();
            assert_eq!(c.table_enter(3).err(), Some(Error::Invalid(Invalid::OnCpu)));
            gens.store(g.generation(), Ordering::SeqCst);
            entered.store(true, Ordering::SeqCst);
            // "Guest context" until kicked.
            while kicked.load(Ordering::SeqCst) == 0 {
                std::hint::spin_loop();
            }
            g.exit();
            // Re-entry sees the new generation.
            let g2 = c.table_enter(3).unwrap();
            let n = g2.generation();
            drop(g2);
            n
        })
    };
    while !entered.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let before = s.table_gen();
    assert_eq!(gens.load(Ordering::SeqCst), before);
    s.unmap(Gpa(0), 4 * PG).unwrap();
    assert!(kicked.load(Ordering::SeqCst) >= 1);
    assert_eq!(t.join().unwrap(), before + 1);
}

#[test]
fn mmio_objects() {
    let s = space(8 * GIB, false);
    let o = VmObject::mmio(Pfn(0xfee00), 2 * PG).unwrap();
    s.map(&o, 0, Gpa(0xfee00 * PG), 2 * PG, Prot::RW).unwrap();
    let c = s.client();
    c.fault(Gpa(0xfee01 * PG), Prot::WRITE).unwrap();
    assert_eq!(s.lookup(Gpa(0xfee01 * PG)), Some((Pfn(0xfee01), Prot::RW)));
    s.with_table(|t| {
        let l = t.lookup(Gpa(0xfee01 * PG)).unwrap();
        assert_eq!(t.format().mem_type(l.value), Some(MemType::Uncacheable));
    });
    assert_eq!(c.hold(Gpa(0xfee00 * PG), Prot::READ).unwrap_err(), Error::NoHostView);
    // With a host view, holds work.
    let mut backing = vec![0u64; 1024];
    let view = std::ptr::NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
    // SAFETY: `backing` outlives the object (dropped at the end of the test,
    // after the space and the object).
    let o2 = unsafe { VmObject::mmio_with_view(Pfn(0x1000), PG, Some(view)) }.unwrap();
    s.map(&o2, 0, Gpa(0x2000 * PG), PG, Prot::RW).unwrap();
    c.hold(Gpa(0x2000 * PG), Prot::WRITE).unwrap().write_u64(16, 42).unwrap();
    drop(c);
    drop(s);
    drop(o2);
    assert_eq!(backing[2], 42);
}

#[test]
fn memfd_reservoir_frames_and_holds() {
    let r = Arc::new(MemfdReservoir::new(64 * PG, Pfn(0x8_0000)).unwrap());
    let o = VmObject::ram(r.clone(), 8 * PG).unwrap();
    let s = space(GIB, true);
    s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW).unwrap();
    let c = s.client();
    let h = c.hold(Gpa(3 * PG), Prot::RW).unwrap();
    assert_eq!(h.pfn(), o.frame_at(3 * PG).unwrap());
    assert!(h.pfn().0 >= 0x8_0000 && h.pfn().0 < 0x8_0040);
    h.write(0, b"memfd").unwrap();
    // Visible through a second host view of the same frame.
    let v = r.map_view(h.pfn(), 1, false).unwrap();
    let mut b = [0u8; 5];
    // SAFETY: the view maps one page; read 5 bytes through a raw pointer.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), b.as_mut_ptr(), 5) };
    assert_eq!(&b, b"memfd");
    drop(h);
    assert_eq!(r.stats().allocated, 8 * PG);
}

#[test]
fn emulated_ad_format_records_dirty_on_write_fault() {
    let s = space_with(GIB, PteFormat::ept_emulated_ad(Caps::default()), true, 1);
    assert_eq!(s.format().kind(), FormatKind::EptEmulatedAd);
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    let c = s.client();
    c.fault(Gpa(0), Prot::READ).unwrap();
    c.fault(Gpa(PG), Prot::WRITE).unwrap();
    c.hold(Gpa(2 * PG), Prot::WRITE).unwrap().write(0, b"x").unwrap();
    let mut bm = [0u64];
    assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Ok(2));
    assert_eq!(bm[0], 0b110);
    // After the harvest the write permission is revoked in hardware: a new
    // write faults and is recorded again.
    c.fault(Gpa(PG), Prot::WRITE).unwrap();
    assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 0b10);
}

#[test]
fn space_config_errors() {
    let bad = |size| VmSpace::<Pages>::new(SpaceConfig::new(size, npt()), pages()).err();
    assert_eq!(bad(0), Some(Error::Invalid(Invalid::BadSize)));
    assert_eq!(bad(PG + 1), Some(Error::Invalid(Invalid::BadSize)));
    assert_eq!(bad((1 << 48) + PG), Some(Error::Invalid(Invalid::BadSize)));
    let mut p = pages();
    p.fail_after(Some(0));
    assert_eq!(
        VmSpace::<Pages>::new(SpaceConfig::new(GIB, npt()), p).err(),
        Some(Error::Table(nested_pt::Error::NoMemory))
    );
}

#[test]
fn table_page_exhaustion_is_an_error_and_changes_nothing() {
    let mut p = pages();
    // Root, then PDPT + PD + PT for the first map, a PT for the second.
    p.fail_after(Some(5));
    let s = VmSpace::<Pages>::new(SpaceConfig::new(GIB, npt()), p).unwrap();
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), PG, Prot::RW).unwrap();
    assert_eq!(s.map(&o, 0, Gpa(0x4000_0000 - 0x20_0000), PG, Prot::RW), Ok(()));
    let tables = table_pages(&s);
    assert_eq!(s.map(&o, 0, Gpa(0x2000_0000), PG, Prot::RW), Err(Error::Table(nested_pt::Error::NoMemory)));
    assert_eq!(s.mappings().len(), 2);
    assert_eq!(table_pages(&s), tables, "the failed map changed no table");
    // The mappings that exist work, and the count stays exact.
    s.populate(Gpa(0), PG).unwrap();
    s.client().fault(Gpa(0x4000_0000 - 0x20_0000), Prot::WRITE).unwrap();
    assert_eq!(s.resident_count(), 2);
    assert_eq!(s.resident_count(), present_leaves(&s));
    s.unmap(Gpa(0), PG).unwrap();
    s.unmap(Gpa(0x4000_0000 - 0x20_0000), PG).unwrap();
    assert_eq!(s.resident_count(), 0);
    assert_eq!(present_leaves(&s), 0);
}

#[test]
fn spin_lock_space() {
    // The lock trait with the no_std implementation: blocking paths spin.
    let s = Arc::new(VmSpace::<Pages, SpinLock>::new(SpaceConfig::new(GIB, npt()), pages()).unwrap());
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    let t = {
        let s = s.clone();
        std::thread::spawn(move || {
            let c = s.client();
            for i in 0..2000u64 {
                if let Ok(h) = c.hold(Gpa((i % 4) * PG), Prot::RW) {
                    h.write_u64(0, i).unwrap();
                }
            }
        })
    };
    for _ in 0..50 {
        s.unmap(Gpa(0), 4 * PG).unwrap();
        s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    }
    t.join().unwrap();
    assert_eq!(s.mappings().len(), 1);
}

#[test]
fn unmap_invalidation_says_whether_tables_were_freed() {
    let s = space(GIB, false);
    let r = reservoir(16);
    let (a, b) = (ram(&r, 1), ram(&r, 1));
    let c = s.client();
    let seen: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let log = seen.clone();
    c.set_invalidation(Some(move |inv: &Invalidation<'_>| {
        assert!(matches!(inv.cause, Cause::Unmap { .. }));
        assert!(inv.cleared.is_none());
        log.lock().unwrap().push((inv.gpa.0, inv.tables_freed));
    }));
    // Two mappings sharing one leaf table (and every table above it).
    s.map(&a, 0, Gpa(0x200 * PG), PG, Prot::RW).unwrap();
    s.map(&b, 0, Gpa(0x201 * PG), PG, Prot::RW).unwrap();
    s.populate(Gpa(0x200 * PG), PG).unwrap();
    s.populate(Gpa(0x201 * PG), PG).unwrap();
    let full = table_pages(&s);
    // The first unmap leaves the tables to the other mapping.
    s.unmap(Gpa(0x200 * PG), PG).unwrap();
    assert_eq!(table_pages(&s), full);
    // The second empties them: every table but the root is freed.
    s.unmap(Gpa(0x201 * PG), PG).unwrap();
    assert!(table_pages(&s) < full);
    assert_eq!(*seen.lock().unwrap(), vec![(0x200 * PG, false), (0x201 * PG, true)]);
}

#[test]
fn harvest_reports_the_frames_it_cleared() {
    let s = space(GIB, true);
    let r = reservoir(64);
    let o = ram(&r, 8);
    let base = 0x400 * PG;
    s.map(&o, 0, Gpa(base), 8 * PG, Prot::RW).unwrap();
    s.populate(Gpa(base), 8 * PG).unwrap();
    let c = s.client();
    let seen: Arc<Mutex<Vec<Option<Vec<Pfn>>>>> = Arc::default();
    let log = seen.clone();
    c.set_invalidation(Some(move |inv: &Invalidation<'_>| {
        assert!(matches!(inv.cause, Cause::Dirty));
        assert!(!inv.tables_freed);
        log.lock().unwrap().push(inv.cleared.map(|f| f.to_vec()));
    }));
    let dirty = |pages: &[u64]| {
        for &p in pages {
            c.hold(Gpa(base + p * PG), Prot::RW).unwrap().release();
        }
    };
    let frame = |p: u64| o.frame_at(p * PG).unwrap();
    // Start clean.
    let mut bm = [0u64];
    s.track_dirty(Gpa(base), 8 * PG, &mut bm).unwrap();
    dirty(&[1, 4, 6]);
    // Get: nothing cleared, no frames.
    let mut frames = vec![Pfn(7)];
    assert_eq!(s.dirty_op_frames(DirtyOp::Get, Gpa(base), 8 * PG, None, &mut bm, &mut frames), Ok(3));
    assert_eq!(frames, vec![Pfn(7)]);
    // Reset of the selected pages 4 and 6 only: appended after what was there.
    let sel = [1u64 << 4 | 1 << 6 | 1 << 7];
    assert_eq!(s.dirty_op_frames(DirtyOp::Reset, Gpa(base), 8 * PG, Some(&sel), &mut bm, &mut frames), Ok(2));
    assert_eq!(frames, vec![Pfn(7), frame(4), frame(6)]);
    // The whole range: only page 1 is left dirty.
    frames.clear();
    bm = [u64::MAX];
    assert_eq!(s.track_dirty_frames(Gpa(base), 8 * PG, &mut bm, &mut frames), Ok(1));
    assert_eq!(bm[0], !0xff | 1 << 1, "the range's bits are overwritten, no other");
    assert_eq!(frames, vec![frame(1)]);
    // Nothing dirty now.
    frames.clear();
    assert_eq!(s.track_dirty_frames(Gpa(base), 8 * PG, &mut bm, &mut frames), Ok(0));
    assert!(frames.is_empty());
    assert_eq!(bm[0] & 0xff, 0);
    // Pages without a leaf (past the mapping) report 0 and no frame.
    dirty(&[7]);
    let mut wide = [u64::MAX; 2];
    assert_eq!(s.track_dirty_frames(Gpa(base), 128 * PG, &mut wide, &mut frames), Ok(1));
    assert_eq!(wide, [1 << 7, 0]);
    assert_eq!(frames, vec![frame(7)]);
    let seen = seen.lock().unwrap().clone();
    // Only the harvests that cleared bits invalidated (not the first one,
    // which found the range clean, nor the Get, nor the empty one).
    assert_eq!(seen, vec![Some(vec![frame(4), frame(6)]), Some(vec![frame(1)]), Some(vec![frame(7)])]);
}

/// Objects whose frames the format cannot express are refused at `map`,
/// changing nothing; a range of an object that does fit maps, and every
/// multi-page path counts exactly the leaves it wrote.
#[test]
fn frames_beyond_the_format_width_are_refused_at_map() {
    for fmt in formats() {
        let s = space_with(GIB, fmt, true, 16);
        let limit = fmt.frame_limit();
        let before = table_pages(&s);
        let refused = Err(Error::Invalid(Invalid::FrameOutOfRange));
        // RAM entirely beyond the width.
        let far = Arc::new(HeapReservoir::new(8 * PG, Pfn(1 << 40)).unwrap());
        let o = VmObject::ram(far.clone(), 8 * PG).unwrap();
        assert_eq!(s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW), refused);
        // RAM straddling the limit: frames limit-2 .. limit+6.
        let edge = Arc::new(HeapReservoir::new(8 * PG, Pfn(limit - 2)).unwrap());
        let e = VmObject::ram(edge.clone(), 8 * PG).unwrap();
        assert_eq!(s.map(&e, 0, Gpa(0), 4 * PG, Prot::RW), refused);
        assert_eq!(s.map(&e, PG, Gpa(0), 2 * PG, Prot::RW), refused);
        // MMIO beyond and straddling.
        let m = VmObject::mmio(Pfn(u64::MAX / 2), 4 * PG).unwrap();
        assert_eq!(s.map(&m, 0, Gpa(0x10_0000), 4 * PG, Prot::RW), refused);
        let m2 = VmObject::mmio(Pfn(limit - 1), 2 * PG).unwrap();
        assert_eq!(s.map(&m2, 0, Gpa(0x10_0000), 2 * PG, Prot::RW), refused);
        assert!(s.mappings().is_empty());
        assert_eq!(table_pages(&s), before, "refusals change nothing");
        assert_eq!(s.resident_count(), 0);
        // The parts that fit map, populate, fault, hold and set dirty.
        s.map(&e, 0, Gpa(0), 2 * PG, Prot::RW).unwrap();
        s.map(&m2, 0, Gpa(0x10_0000), PG, Prot::RW).unwrap();
        assert_eq!(s.populate(Gpa(0), 2 * PG), Ok(2));
        let c = s.client();
        c.fault(Gpa(0x10_0000), Prot::WRITE).unwrap();
        assert_eq!(s.resident_count(), present_leaves(&s));
        assert_eq!(s.resident_count(), 3);
        let mut bm = [0u64; 1];
        s.dirty_op(DirtyOp::Set, Gpa(0), 32 * PG, None, &mut bm).unwrap();
        assert_eq!(s.resident_count(), present_leaves(&s));
        drop(c);
        s.unmap(Gpa(0), 2 * PG).unwrap();
        s.unmap(Gpa(0x10_0000), PG).unwrap();
        assert_eq!(s.resident_count(), 0, "never below zero");
        assert_eq!(present_leaves(&s), 0);
    }
}

/// Runs `f` on another thread and fails the test (instead of hanging) if
/// it does not finish within a few seconds.
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(std::time::Duration::from_secs(10)).expect("blocked: a client was left held")
}

/// A panicking invalidation callback: the change completes, every other
/// client is still invalidated and released, the panic comes out after.
#[test]
fn panicking_invalidation_callback_releases_every_client() {
    let s = Arc::new(space(GIB, true));
    let r = reservoir(64);
    let o = ram(&r, 16);
    s.map(&o, 0, Gpa(0), 16 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0), 16 * PG).unwrap();
    let told = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3).map(|_| s.client()).collect();
    clients[0].set_invalidation(Some(|_: &Invalidation<'_>| panic!("callback panics")));
    for c in &clients[1..] {
        let t = told.clone();
        c.set_invalidation(Some(move |_: &Invalidation<'_>| {
            t.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.unmap(Gpa(0), 16 * PG)));
    assert!(r.is_err(), "the panic is propagated");
    assert_eq!(told.load(Ordering::SeqCst), 2, "the other clients were invalidated");
    assert!(s.mappings().is_empty(), "the unmap is complete");
    assert_eq!(s.resident_count(), present_leaves(&s));
    // Clients are released: holds and faults answer at once, and further
    // changes (which hold every client again) go through.
    s.map(&o, 0, Gpa(0), 16 * PG, Prot::RW).unwrap();
    let mut clients = clients.into_iter();
    let first = clients.next().unwrap();
    for c in clients {
        let c = within_seconds(move || {
            c.hold(Gpa(0), Prot::RW).unwrap().release();
            c
        });
        drop(c);
    }
    let mut bm = [0u64; 1];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.track_dirty(Gpa(0), 16 * PG, &mut bm)));
    assert!(r.is_err(), "a harvest's callback panics too");
    first.set_invalidation(None::<fn(&Invalidation<'_>)>);
    let s2 = s.clone();
    within_seconds(move || s2.unmap(Gpa(0), 16 * PG).unwrap());
    drop(first);
}

/// One output rule for every dirty operation, with or without a selection:
/// the range's bits are all written (unselected pages report 0), bits past
/// the range are left alone.
#[test]
fn dirty_output_rule_is_the_same_with_and_without_selection() {
    for op in [DirtyOp::Get, DirtyOp::Reset, DirtyOp::Set] {
        for sel in [None, Some([0u64]), Some([0b1010u64]), Some([u64::MAX])] {
            let s = space(GIB, true);
            let r = reservoir(64);
            let o = ram(&r, 8);
            s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW).unwrap();
            let c = s.client();
            for p in [1u64, 2, 3] {
                c.hold(Gpa(p * PG), Prot::WRITE).unwrap().release();
            }
            let mut out = [u64::MAX, u64::MAX];
            let n = s.dirty_op(op, Gpa(0), 8 * PG, sel.as_ref().map(|s| &s[..]), &mut out).unwrap();
            assert_eq!(out[1], u64::MAX, "{op:?} {sel:?}: past the bitmap's range");
            assert_eq!(out[0] >> 8, u64::MAX >> 8, "{op:?} {sel:?}: past the range");
            let selected = sel.map_or(0xff, |s| s[0] & 0xff);
            let expect = match op {
                DirtyOp::Set => selected,
                _ => 0b1110 & selected,
            };
            assert_eq!(out[0] & 0xff, expect, "{op:?} {sel:?}");
            assert_eq!(n, u64::from(expect.count_ones()));
            assert_eq!(s.resident_count(), present_leaves(&s));
        }
    }
}

/// An unmap retires its object only to clients holding a page of its
/// range, and only while such a hold lives: a long-lived hold elsewhere
/// (a device's ring page) does not keep every later unmapped object alive.
#[test]
fn long_lived_hold_elsewhere_does_not_pin_unmapped_objects() {
    let s = space(GIB, true);
    let r = reservoir(16 + 8);
    let ring = ram(&r, 16);
    s.map(&ring, 0, Gpa(0), 16 * PG, Prot::RW).unwrap();
    let dev = s.client();
    let ring_hold = dev.hold(Gpa(3 * PG), Prot::RW).unwrap();
    let dev2 = s.client();
    let many: Vec<_> = (0..20).map(|i| dev2.hold(Gpa((i % 16) * PG), Prot::READ).unwrap()).collect();
    for round in 0..200u64 {
        let o = ram(&r, 8);
        let gpa = 0x100_0000 + (round % 3) * 0x20_0000;
        s.map(&o, 0, Gpa(gpa), 8 * PG, Prot::RW).unwrap();
        // Holds on the churned range, released before and after the unmap.
        dev.hold(Gpa(gpa), Prot::RW).unwrap().release();
        let h = dev.hold(Gpa(gpa + PG), Prot::RW).unwrap();
        s.unmap(Gpa(gpa), 8 * PG).unwrap();
        assert!(h.release(), "the release reports the unmap");
        drop(o);
        assert_eq!(r.stats().allocated, 16 * PG, "round {round}: the unmapped object was freed");
    }
    assert!(!ring_hold.release());
    drop(many);
}

/// `with_table` hands out a read-only view: what it reads matches the
/// space, and nothing in it can change an entry (the type offers no
/// method that does; `resident_count` stays exact).
#[test]
fn table_view_reads_only() {
    let s = space(GIB, true);
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0x20_0000), 4 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0x20_0000), 2 * PG).unwrap();
    s.with_table(|t| {
        let l = t.lookup(nested_pt::Gpa(0x20_0000)).unwrap();
        assert_eq!(t.format().frame(l.value), o.frame_at(0).unwrap());
        assert_eq!(t.is_mapped(nested_pt::Gpa(0x20_1000)), Some((o.frame_at(PG).unwrap(), Prot::RW)));
        assert_eq!(t.leaves(nested_pt::Gpa(0), GIB).count(), 2);
        let mut seen = 0;
        t.for_each_leaf_table(nested_pt::Gpa(0x20_0000), 4 * PG, |base, entries, _| {
            assert_eq!(base.0, 0x20_0000);
            seen += entries.iter().filter(|e| t.format().is_present(**e)).count();
        });
        assert_eq!(seen, 2);
        assert_eq!(t.walk(nested_pt::Gpa(0x20_0000)).len, 4);
        assert_eq!(t.root(), s.table_root_pfn());
    });
    assert_eq!(s.resident_count(), present_leaves(&s));
}

/// A change asked from guest context on the same space is refused instead
/// of waiting for itself; a leaked guard is undone by dropping the client.
#[test]
fn change_from_guest_context_on_the_same_space_is_refused() {
    let s = Arc::new(space(GIB, true));
    let other = space(GIB, true);
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0), 4 * PG).unwrap();
    let c = s.client();
    let mut bm = [0u64; 1];
    {
        let _on = c.table_enter(0).unwrap();
        assert_eq!(s.unmap(Gpa(0), 4 * PG), Err(Error::SelfDeadlock));
        assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Err(Error::SelfDeadlock));
        assert_eq!(s.set_dirty_tracking(false), Err(Error::SelfDeadlock));
        assert_eq!(s.mappings().len(), 1, "nothing changed");
        // Another space's changes are fine.
        other.set_dirty_tracking(false).unwrap();
    }
    assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Ok(0));
    // A leaked guard: refused on this thread, and dropping the client ends
    // it for everyone.
    std::mem::forget(c.table_enter(1).unwrap());
    assert_eq!(s.unmap(Gpa(0), 4 * PG), Err(Error::SelfDeadlock));
    drop(c);
    let s2 = s.clone();
    within_seconds(move || s2.unmap(Gpa(0), 4 * PG).unwrap());
}

/// Emulated A/D: a hold never grants the hardware W bit (this format's
/// dirty bit); a writable hold marks its page dirty on release (software
/// bit), a deferred one only when marked; a vCPU's write fault is dirty.
#[test]
fn emulated_ad_holds_honour_defer_dirty() {
    let s = space_with(GIB, PteFormat::ept_emulated_ad(Caps::default()), true, 1);
    let r = reservoir(16);
    let o = ram(&r, 8);
    s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW).unwrap();
    let c = s.client();
    let h = c.hold_ext(Gpa(0), Prot::RW, true).unwrap();
    h.write(0, b"unmarked").unwrap();
    drop(h);
    let h = c.hold_ext(Gpa(PG), Prot::RW, true).unwrap();
    h.mark_dirty().unwrap();
    drop(h);
    c.hold(Gpa(2 * PG), Prot::RW).unwrap().release();
    c.hold(Gpa(3 * PG), Prot::READ).unwrap().release();
    c.fault(Gpa(4 * PG), Prot::READ).unwrap();
    c.fault(Gpa(5 * PG), Prot::WRITE).unwrap();
    let w = s.with_table(|t| {
        (0..8).map(|p| t.lookup(nested_pt::Gpa(p * PG)).map_or(0, |l| l.value & (1 << 1))).collect::<Vec<_>>()
    });
    assert_eq!(w, [0, 0, 0, 0, 0, 2, 0, 0], "only the vCPU's write fault got hardware W");
    let mut bm = [0u64];
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm), Ok(3));
    assert_eq!(bm[0], 0b10_0110);
    // With tracking off, holds mark nothing; a write fault still grants W.
    s.set_dirty_tracking(false).unwrap();
    c.hold(Gpa(2 * PG), Prot::RW).unwrap().release();
    c.fault(Gpa(6 * PG), Prot::WRITE).unwrap();
    s.set_dirty_tracking(true).unwrap();
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 1 << 6, "documented: a write fault while off reads dirty");
}

/// A hold on an unmapped object keeps that object only: objects mapped
/// later at the same addresses (which the hold was never on) are freed on
/// their unmap.
#[test]
fn hold_on_an_old_mapping_does_not_pin_later_ones_at_the_same_address() {
    let s = space(GIB, true);
    let r = reservoir(8 + 8);
    let a = ram(&r, 8);
    s.map(&a, 0, Gpa(0x40_0000), 8 * PG, Prot::RW).unwrap();
    let c = s.client();
    let h = c.hold(Gpa(0x40_0000), Prot::RW).unwrap();
    s.unmap(Gpa(0x40_0000), 8 * PG).unwrap();
    drop(a);
    for round in 0..100 {
        let b = ram(&r, 8);
        s.map(&b, 0, Gpa(0x40_0000), 8 * PG, Prot::RW).unwrap();
        // A hold on the new mapping, released before its unmap.
        c.hold(Gpa(0x40_0000 + PG), Prot::RW).unwrap().release();
        s.unmap(Gpa(0x40_0000), 8 * PG).unwrap();
        drop(b);
        assert_eq!(r.stats().allocated, 8 * PG, "round {round}: only the held object lives");
    }
    assert!(h.release());
    assert_eq!(r.stats().allocated, 0);
}

/// A harvest kicks (and waits for) vCPUs in guest context only when it
/// cleared dirty bits: `Get`, `Set` and a `Reset` that finds nothing dirty
/// leave a vCPU on the old generation alone; a `Reset` that clears a bit
/// returns only once the vCPU has left guest context.
#[test]
fn harvest_kicks_vcpus_only_when_it_cleared_bits() {
    let s = Arc::new(space(GIB, true));
    let r = reservoir(16);
    let o = ram(&r, 4);
    s.map(&o, 0, Gpa(0), 4 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0), 4 * PG).unwrap();
    let mut bm = [0u64];
    s.track_dirty(Gpa(0), 4 * PG, &mut bm).unwrap();
    let entered = Arc::new(AtomicBool::new(false));
    let in_guest = Arc::new(AtomicBool::new(false));
    let kicked = Arc::new(AtomicUsize::new(0));
    let t = {
        let (s, entered, in_guest, kicked) = (s.clone(), entered.clone(), in_guest.clone(), kicked.clone());
        std::thread::spawn(move || {
            let c = s.client();
            let k = kicked.clone();
            c.set_kick(Some(move |_cpu: u32| {
                k.fetch_add(1, Ordering::SeqCst);
            }));
            let g = c.table_enter(0).unwrap();
            in_guest.store(true, Ordering::SeqCst);
            entered.store(true, Ordering::SeqCst);
            while kicked.load(Ordering::SeqCst) == 0 {
                std::hint::spin_loop();
            }
            in_guest.store(false, Ordering::SeqCst);
            let old = g.generation();
            g.exit();
            (old, c.table_enter(0).unwrap().generation())
        })
    };
    while !entered.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let g0 = s.table_gen();
    // Nothing dirty: none of these waits for the vCPU or bumps.
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 4 * PG, None, &mut bm), Ok(0));
    assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Ok(0));
    assert_eq!(s.dirty_op(DirtyOp::Set, Gpa(0), PG, None, &mut bm), Ok(1));
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 4 * PG, None, &mut bm), Ok(1));
    assert_eq!(kicked.load(Ordering::SeqCst), 0, "no cleared bit: no kick");
    assert_eq!(s.table_gen(), g0);
    assert!(in_guest.load(Ordering::SeqCst));
    // Page 0 is dirty (Set): clearing it must make the vCPU leave.
    assert_eq!(s.track_dirty(Gpa(0), 4 * PG, &mut bm), Ok(1));
    assert!(kicked.load(Ordering::SeqCst) >= 1);
    assert!(!in_guest.load(Ordering::SeqCst), "harvest returned with the vCPU on the old generation");
    assert_eq!(s.table_gen(), g0 + 1);
    assert_eq!(t.join().unwrap(), (g0, g0 + 1));
}

/// Holds and faults of other clients proceed while a harvest runs: from
/// inside a harvest's invalidation callback (the harvest is still in
/// progress), another thread holds, writes and faults through its own
/// client. Were clients held by the harvest, that thread would sleep
/// until the harvest ended, which waits for the callback.
#[test]
fn holds_and_faults_proceed_while_a_harvest_runs() {
    let s = space(GIB, true);
    let r = reservoir(16);
    let o = ram(&r, 8);
    s.map(&o, 0, Gpa(0), 8 * PG, Prot::RW).unwrap();
    s.populate(Gpa(0), 4 * PG).unwrap();
    let watcher = s.client();
    let other = Arc::new(Mutex::new(Some(s.client())));
    let done = Arc::new(AtomicUsize::new(0));
    {
        let (other, done) = (other.clone(), done.clone());
        watcher.set_invalidation(Some(move |inv: &Invalidation<'_>| {
            assert!(matches!(inv.cause, Cause::Dirty));
            let c = other.lock().unwrap().take().unwrap();
            let c = within_seconds(move || {
                let h = c.hold(Gpa(PG), Prot::RW).unwrap();
                h.write_u64(0, 0x1234).unwrap();
                drop(h);
                c.fault(Gpa(6 * PG), Prot::WRITE).unwrap();
                c
            });
            *other.lock().unwrap() = Some(c);
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    watcher.hold(Gpa(2 * PG), Prot::RW).unwrap().release();
    let mut bm = [0u64];
    assert_eq!(s.track_dirty(Gpa(0), 8 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 1 << 2);
    assert_eq!(done.load(Ordering::SeqCst), 1);
    // What the other client did during the harvest is there.
    assert!(s.lookup(Gpa(6 * PG)).is_some());
    assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 8 * PG, None, &mut bm), Ok(1));
    assert_eq!(bm[0], 1 << 1, "the hold released during the harvest left its page dirty");
}

/// `fault_around_accessed`: a vCPU fault's neighbours come with the
/// accessed bit set (never the dirty bit); the faulting page, pages that
/// were already present, and holds' fault-around are left alone. Off, no
/// neighbour is marked; with emulated A/D the knob has no effect.
#[test]
fn fault_around_accessed_presets_only_new_neighbours() {
    for fmt in formats() {
        for on in [false, true] {
            let mut cfg = SpaceConfig::new(GIB, fmt);
            cfg.track_dirty = true;
            cfg.fault_around = 16;
            cfg.fault_around_accessed = on;
            let s = VmSpace::<Pages>::new(cfg, pages()).unwrap();
            let r = reservoir(64);
            let o = ram(&r, 64);
            s.map(&o, 0, Gpa(0), 64 * PG, Prot::RW).unwrap();
            s.populate(Gpa(3 * PG), PG).unwrap();
            let c = s.client();
            c.fault(Gpa(5 * PG), Prot::WRITE).unwrap();
            // A hold's fault-around (pages 32..48) is never marked.
            c.hold(Gpa(40 * PG), Prot::READ).unwrap().release();
            let (amask, dmask) = (fmt.accessed_mask(), fmt.dirty_mask());
            let emulated = fmt.kind() == FormatKind::EptEmulatedAd;
            s.with_table(|t| {
                for p in (0..16).chain(32..48) {
                    let v = t.lookup(Gpa(p * PG)).unwrap().value;
                    let want = on && !emulated && p < 16 && p != 5 && p != 3;
                    assert_eq!(v & amask == amask, want, "{:?} knob {on}: page {p} accessed", fmt.kind());
                    if !emulated {
                        assert_eq!(v & dmask, 0, "page {p}: dirty never preset");
                    }
                }
                assert!(t.lookup(Gpa(16 * PG)).is_none_or(|l| !t.format().is_present(l.value)));
            });
            // Nothing reads as dirty.
            let mut bm = [0u64];
            let want = if emulated { 1 } else { 0 };
            assert_eq!(s.dirty_op(DirtyOp::Get, Gpa(0), 64 * PG, None, &mut bm), Ok(want), "{:?}", fmt.kind());
        }
    }
}

/// `fault_around_dirty_untracked`: a write fault's new neighbours get the
/// dirty bit as well while tracking is off; a read fault's do not, and
/// nothing gets it while tracking is on (a harvest then reports exactly
/// what was written).
#[test]
fn fault_around_dirty_only_while_untracked() {
    for fmt in [npt(), PteFormat::ept(Caps::default())] {
        for (track, write) in [(false, true), (false, false), (true, true)] {
            let mut cfg = SpaceConfig::new(GIB, fmt);
            cfg.track_dirty = track;
            cfg.fault_around = 16;
            cfg.fault_around_accessed = true;
            cfg.fault_around_dirty_untracked = true;
            let s = VmSpace::<Pages>::new(cfg, pages()).unwrap();
            let r = reservoir(16);
            let o = ram(&r, 16);
            s.map(&o, 0, Gpa(0), 16 * PG, Prot::RW).unwrap();
            let c = s.client();
            c.fault(Gpa(2 * PG), if write { Prot::WRITE } else { Prot::READ }).unwrap();
            let (amask, dmask) = (fmt.accessed_mask(), fmt.dirty_mask());
            s.with_table(|t| {
                for p in 0..16u64 {
                    let v = t.lookup(Gpa(p * PG)).unwrap().value;
                    let neighbour = p != 2;
                    assert_eq!(v & amask != 0, neighbour, "{:?} track {track} write {write}: page {p} A", fmt.kind());
                    let want_d = neighbour && write && !track;
                    assert_eq!(v & dmask != 0, want_d, "{:?} track {track} write {write}: page {p} D", fmt.kind());
                }
            });
            if track {
                let mut bm = [0u64];
                assert_eq!(s.track_dirty(Gpa(0), 16 * PG, &mut bm), Ok(0), "nothing written, nothing reported");
            } else {
                // Switched on later: the first harvest may report the
                // preset neighbours (a superset).
                s.set_dirty_tracking(true).unwrap();
                let mut bm = [0u64];
                let n = s.track_dirty(Gpa(0), 16 * PG, &mut bm).unwrap();
                assert_eq!(n, if write { 15 } else { 0 });
            }
        }
    }
}
