//! A guest layout shared by the tests: RAM at several addresses, with
//! holes, two contiguous mappings of different objects and a read-only
//! mapping.
#![allow(dead_code)]

use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmspace::{Gpa, HeapReservoir, PAGE_SIZE, Pfn, Prot, PteFormat, SpaceConfig, VmObject, VmSpace};

pub const PG: u64 = PAGE_SIZE;
pub const MIB: u64 = 1 << 20;

/// Queue memory: `[0, 1 MiB)`.
pub const A: (u64, u64) = (0, MIB);
/// Data buffers: `[2 MiB, 3 MiB)` and, contiguous but another object,
/// `[3 MiB, 4 MiB)`. `[1 MiB, 2 MiB)` is a hole.
pub const B: (u64, u64) = (2 * MIB, MIB);
pub const C: (u64, u64) = (3 * MIB, MIB);
/// Read-only RAM: `[8 MiB, 8 MiB + 64 KiB)`.
pub const R: (u64, u64) = (8 * MIB, 64 * 1024);
/// Space size.
pub const SIZE: u64 = 1 << 30;

pub type Space = VmSpace<HeapPages>;

pub struct Guest {
    pub space: Space,
    pub reservoir: Arc<HeapReservoir>,
    pub objects: Vec<Arc<VmObject>>,
}

pub fn guest() -> Guest {
    let mut cfg = SpaceConfig::new(SIZE, PteFormat::ept(Caps::default()));
    cfg.track_dirty = true;
    cfg.fault_around = 1;
    let space = VmSpace::new(cfg, HeapPages::with_capacity(0x100, 1 << 12)).unwrap();
    let reservoir = Arc::new(HeapReservoir::new(8 * MIB, Pfn(0x10_0000)).unwrap());
    let mut objects = Vec::new();
    for (gpa, len, prot) in [(A.0, A.1, Prot::RW), (B.0, B.1, Prot::RW), (C.0, C.1, Prot::RW), (R.0, R.1, Prot::READ)] {
        let o = VmObject::ram(reservoir.clone(), len).unwrap();
        space.map(&o, 0, Gpa(gpa), len, prot).unwrap();
        objects.push(o);
    }
    Guest { space, reservoir, objects }
}

/// Harvest (read-and-clear) the dirty pages of `[0, 16 MiB)`, as page
/// numbers.
pub fn harvest(space: &Space) -> Vec<u64> {
    let pages = 16 * MIB / PG;
    let mut bm = vec![0u64; pages.div_ceil(64) as usize];
    space.track_dirty(Gpa(0), 16 * MIB, &mut bm).unwrap();
    (0..pages).filter(|&i| bm[(i / 64) as usize] >> (i % 64) & 1 == 1).collect()
}
