#![allow(dead_code)]

use std::sync::Arc;

use nested_pt::{Caps, CountingPages, HeapPages};
use vmspace::*;

pub const PG: u64 = PAGE_SIZE;

pub type Pages = CountingPages<HeapPages>;
pub type Space = VmSpace<Pages>;

pub fn pages() -> Pages {
    CountingPages::new(HeapPages::with_capacity(0x100, 1 << 14))
}

pub fn npt() -> PteFormat {
    PteFormat::npt(Caps::default())
}

pub fn space_with(size: u64, format: PteFormat, track: bool, fault_around: u32) -> Space {
    let mut cfg = SpaceConfig::new(size, format);
    cfg.track_dirty = track;
    cfg.fault_around = fault_around;
    VmSpace::new(cfg, pages()).unwrap()
}

pub fn space(size: u64, track: bool) -> Space {
    space_with(size, npt(), track, 1)
}

pub fn reservoir(pages: u64) -> Arc<HeapReservoir> {
    Arc::new(HeapReservoir::new(pages * PG, Pfn(0x10_0000)).unwrap())
}

pub fn ram(r: &Arc<HeapReservoir>, pages: u64) -> Arc<VmObject> {
    VmObject::ram(r.clone(), pages * PG).unwrap()
}

pub fn table_pages(s: &Space) -> usize {
    s.with_table(|t| t.table_pages())
}

pub fn bit(b: &[u64], i: u64) -> bool {
    b[(i / 64) as usize] >> (i % 64) & 1 == 1
}

/// The leaves actually present in the table (what `resident_count` must be).
pub fn present_leaves<P: nested_pt::TablePages + Send + Sync, L: RawLock>(s: &VmSpace<P, L>) -> u64 {
    s.with_table(|t| t.leaves(nested_pt::Gpa(0), s.size()).count() as u64)
}

/// The three table formats, with the default capabilities (46-bit frames).
pub fn formats() -> [PteFormat; 3] {
    [npt(), PteFormat::ept(Caps::default()), PteFormat::ept_emulated_ad(Caps::default())]
}
