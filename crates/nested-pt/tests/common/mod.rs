//! The reference model that the property test (`tests/model.rs`) and the
//! fuzz target (`tests/fuzz.rs`) drive: random sequences of populate /
//! vacate / map (one page or a range, with refused frames injected) /
//! unmap / access / A-D reset / harvest / translate, run against a
//! [`NestedTable`] and a simple map of the leaves it should hold, comparing
//! after every step every lookup of a sample of pages, the full list of
//! leaves (frame, protection, accessed, dirty) and the number of live table
//! pages (no leaks, no double frees).
//!
//! Operations name a region by index and pages by number; out-of-range
//! values wrap, so any generated value is a valid operation.

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use nested_pt::mmu::{self, ViolationKind};
use nested_pt::{
    Access, CountingPages, Error, FormatKind, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat,
    TablePages,
};

/// The model's table-page provider: a checking [`CountingPages`] arena
/// with an allocation budget that operations set through the table's
/// shared reference to its provider.
pub struct Budgeted {
    inner: CountingPages<HeapPages>,
    /// Allocations left before every one fails; `None`: no limit.
    budget: Cell<Option<u64>>,
}

// SAFETY: forwards to `inner`, which upholds the contract; refusing an
// allocation is always allowed.
unsafe impl TablePages for Budgeted {
    fn alloc_zeroed(&mut self) -> Option<Pfn> {
        if let Some(n) = self.budget.get() {
            self.budget.set(Some(n.checked_sub(1)?));
        }
        self.inner.alloc_zeroed()
    }
    fn ptr(&self, pfn: Pfn) -> *mut u64 {
        self.inner.ptr(pfn)
    }
    unsafe fn free(&mut self, pfn: Pfn) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.inner.free(pfn) }
    }
}

pub const K4: u64 = 4096;
pub const M2: u64 = 1 << 21;
pub const G: u64 = 1 << 30;

/// Candidate regions: adjacent ranges sharing a leaf table, one across a
/// 2 MiB leaf-table boundary, one across the 1 GiB boundary, 4 KiB, 2 MiB
/// and 1 GiB leaves across 512 GiB root-slot boundaries (slots 0|1, 1|2,
/// 2|3), and large-page regions.
pub const REGIONS: [(u64, u64, PageSize); 8] = [
    (0, 4 * K4, PageSize::Size4K),
    (4 * K4, M2 + 8 * K4 - 4 * K4, PageSize::Size4K),
    (512 * G - 2 * K4, 4 * K4, PageSize::Size4K),
    (4 * M2, 2 * M2, PageSize::Size2M),
    (2 * G, 2 * G, PageSize::Size1G),
    (G - K4, 2 * K4, PageSize::Size4K),
    (1024 * G - 2 * M2, 4 * M2, PageSize::Size2M),
    (1536 * G - G, 2 * G, PageSize::Size1G),
];

/// One operation; indices wrap into the regions and their pages.
#[derive(Clone, Debug, Arbitrary)]
pub enum Op {
    /// Populate the region, or vacate it when populated.
    Toggle(u8),
    /// Populate the region with only `n % 8` table pages to spare: when it
    /// needs more, it must fail with `NoMemory` and change nothing.
    PopulateLimited(u8, u8),
    /// Map page `p` of region `r` with protection `k`.
    Map(u8, u16, u8),
    /// `map_exclusive` of page `p` of region `r` with protection `k`.
    MapExclusive(u8, u16, u8),
    /// Unmap page `p` of region `r`.
    Unmap(u8, u16),
    /// Unmap the whole region.
    UnmapRegion(u8),
    /// Unmap and vacate the whole region.
    UnmapVacate(u8),
    /// Record access `a` to page `p`.
    Record(u8, u16, u8),
    /// Set or clear the accessed state of page `p`.
    ResetA(u8, u16, bool),
    /// Set or clear the dirty state of page `p`.
    ResetD(u8, u16, bool),
    /// Harvest (or scan) the dirty bits of the whole region.
    Harvest(u8, bool),
    /// Translate an address in page `p` for access `a`, with A/D enabled.
    Translate(u8, u16, u8, bool),
    /// `map_range` over `n` pages from page `first` of a 4 KiB region:
    /// every `skip`-th page gets no frame, and page `bad` (when given) a
    /// frame the format cannot express, which must roll the call back.
    MapRange { r: u8, first: u16, n: u16, skip: u8, bad: Option<u16>, k: u8, exclusive: bool },
    /// Harvest or scan `n` leaves from leaf `first` of the region.
    HarvestSub { r: u8, first: u16, n: u16, clear: bool, exclusive: bool },
    /// Unmap `n` leaves from leaf `first` of the region.
    UnmapSub { r: u8, first: u16, n: u16 },
}

fn access(k: u8) -> Access {
    [Access::Read, Access::Write, Access::Execute][k as usize % 3]
}

/// Protection number `k` as the format can express it (the IOMMU formats
/// have no execute permission: R, RW, R, RW).
fn prot_for(k: u8, fmt: &PteFormat) -> Prot {
    let p = [Prot::READ, Prot::RW, Prot::RX, Prot::RWX][k as usize % 4];
    if fmt.is_iommu() { p - Prot::EXEC } else { p }
}

fn region(r: u8) -> usize {
    r as usize % REGIONS.len()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ent {
    pfn: u64,
    prot: Prot,
    acc: bool,
    /// EPT/NPT: the dirty bit. Emulated: hardware W.
    wbit: bool,
    /// Emulated only: dirty saved in software bit 55.
    sdirty: bool,
}

impl Ent {
    fn dirty(&self) -> bool {
        self.wbit || self.sdirty
    }
}

struct Model {
    fmt: PteFormat,
    populated: [bool; REGIONS.len()],
    leaves: BTreeMap<u64, Ent>,
}

/// Leaves in a region.
fn leaves_in(r: usize) -> u64 {
    let (_, len, size) = REGIONS[r];
    len / size.bytes()
}

impl Model {
    /// Leaf address of leaf `p` of region `r` (wrapped into the region).
    fn page(r: usize, p: u64) -> u64 {
        let (start, _, size) = REGIONS[r];
        start + (p % leaves_in(r)) * size.bytes()
    }

    /// The sub-range of `n` leaves from leaf `first` of region `r`, both
    /// wrapped (at least one leaf, never past the region's end).
    fn sub(r: usize, first: u16, n: u16) -> (u64, u64) {
        let (start, _, size) = REGIONS[r];
        let total = leaves_in(r);
        let first = first as u64 % total;
        let n = 1 + n as u64 % (total - first);
        (start + first * size.bytes(), n * size.bytes())
    }

    fn expected_tables(&self) -> usize {
        let mut set = BTreeSet::new();
        for (i, (start, len, size)) in REGIONS.iter().enumerate() {
            if !self.populated[i] {
                continue;
            }
            for level in size.level()..=3 {
                let cover = 1u64 << (12 + 9 * level as u32); // bytes a level-`level` table covers
                let mut a = start & !(cover - 1);
                while a < start + len {
                    set.insert((level, a));
                    a += cover;
                }
            }
        }
        1 + set.len()
    }

    fn hw_allows(&self, e: &Ent) -> Prot {
        if self.fmt.kind() == FormatKind::EptEmulatedAd {
            let mut p = Prot::empty();
            p.set(Prot::READ, e.acc && e.prot.contains(Prot::READ));
            p.set(Prot::WRITE, e.wbit);
            p.set(Prot::EXEC, e.acc && e.prot.contains(Prot::EXEC));
            p
        } else {
            e.prot
        }
    }

    /// Expected dirty bitmap and count of `[start, start+len)`, clearing
    /// the model's dirty state when `clear`.
    fn harvest(&mut self, start: u64, len: u64, clear: bool) -> (Vec<u64>, u64) {
        let pages = len / K4;
        let mut want = vec![0u64; pages.div_ceil(64) as usize];
        let mut count = 0;
        for (gpa, e) in self.leaves.range_mut(start..start + len) {
            if e.dirty() {
                let size = REGIONS.iter().find(|(s, l, _)| (*s..s + l).contains(gpa)).unwrap().2;
                let first = (gpa - start) / K4;
                for b in first..first + size.pages() {
                    want[(b / 64) as usize] |= 1 << (b % 64);
                }
                count += size.pages();
                if clear {
                    e.wbit = false;
                    e.sdirty = false;
                }
            }
        }
        (want, count)
    }
}

/// Returns an error naming the line when the two sides differ.
macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($ctx:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!(
                "line {}: {} = {:?}, expected {:?} {}",
                line!(),
                stringify!($a),
                a,
                b,
                format_args!($($ctx)+)
            ));
        }
    }};
}

/// Runs `ops` against a fresh table of format `fmt` and the model; the
/// first mismatch is returned as an error.
pub fn run(fmt: PteFormat, ops: &[Op]) -> Result<(), String> {
    let pages =
        Budgeted { inner: CountingPages::new(HeapPages::with_capacity(0x100, 1 << 12)), budget: Cell::new(None) };
    let mut t = NestedTable::new(fmt, pages).unwrap();
    let mut m = Model { fmt, populated: [false; REGIONS.len()], leaves: BTreeMap::new() };
    let emulated = fmt.kind() == FormatKind::EptEmulatedAd;
    let limit = fmt.frame_limit();
    let mut next_pfn = 0x10_0000u64;
    for (step, op) in ops.iter().enumerate() {
        let ctx = || format!("step {step} {op:?}");
        match *op {
            Op::Toggle(r) => {
                let r = region(r);
                let (start, len, size) = REGIONS[r];
                if !m.populated[r] {
                    ensure_eq!(t.populate_region(Gpa(start), len, size), Ok(()), "{}", ctx());
                    m.populated[r] = true;
                } else {
                    let mapped = m.leaves.range(start..start + len).next().is_some();
                    let got = t.vacate_region(Gpa(start), len, size);
                    if mapped {
                        ensure_eq!(got, Err(Error::StillMapped), "{}", ctx());
                    } else {
                        ensure_eq!(got, Ok(()), "{}", ctx());
                        m.populated[r] = false;
                    }
                }
            }
            Op::PopulateLimited(r, n) => {
                let r = region(r);
                if m.populated[r] {
                    continue;
                }
                let (start, len, size) = REGIONS[r];
                let before = m.expected_tables();
                m.populated[r] = true;
                let needed = m.expected_tables() - before;
                let budget = n as usize % 8;
                t.pages().budget.set(Some(budget as u64));
                let got = t.populate_region(Gpa(start), len, size);
                t.pages().budget.set(None);
                if needed > budget {
                    ensure_eq!(got, Err(Error::NoMemory), "needs {needed}; {}", ctx());
                    m.populated[r] = false;
                } else {
                    ensure_eq!(got, Ok(()), "needs {needed}; {}", ctx());
                }
            }
            Op::Map(r, p, k) | Op::MapExclusive(r, p, k) => {
                let r = region(r);
                if !m.populated[r] {
                    continue;
                }
                let size = REGIONS[r].2;
                let gpa = Model::page(r, p as u64);
                let prot = prot_for(k, &fmt);
                next_pfn += size.pages();
                let pfn = next_pfn & !(size.pages() - 1);
                let got = if matches!(op, Op::MapExclusive(..)) {
                    t.map_exclusive(Gpa(gpa), Pfn(pfn), size, prot, MemType::WriteBack)
                } else {
                    t.map(Gpa(gpa), Pfn(pfn), size, prot, MemType::WriteBack)
                };
                match m.leaves.get(&gpa) {
                    _ if pfn >= limit => ensure_eq!(got, Err(Error::OutOfRange), "{}", ctx()),
                    Some(e) => ensure_eq!(got, Err(Error::AlreadyMapped { same_frame: e.pfn == pfn }), "{}", ctx()),
                    None => {
                        ensure_eq!(got, Ok(()), "{}", ctx());
                        m.leaves.insert(gpa, Ent { pfn, prot, acc: false, wbit: false, sdirty: false });
                    }
                }
            }
            Op::MapRange { r, first, n, skip, bad, k, exclusive } => {
                let r = region(r);
                if !m.populated[r] || REGIONS[r].2 != PageSize::Size4K {
                    continue;
                }
                let (start, len) = Model::sub(r, first, n);
                let pages = len / K4;
                let bad = bad.map(|b| b as u64 % pages);
                let skip = skip as u64 % 4;
                let prot = prot_for(k, &fmt);
                let base = next_pfn;
                next_pfn += pages;
                let frame_of = |i: u64| -> Option<u64> {
                    if Some(i) == bad {
                        return Some(limit + i);
                    }
                    if skip != 0 && i.is_multiple_of(skip + 1) {
                        return None;
                    }
                    Some(base + i)
                };
                let mut calls = 0;
                let frame = |g: Gpa| {
                    calls += 1;
                    frame_of((g.0 - start) / K4).map(Pfn)
                };
                let got = if exclusive {
                    t.map_range_exclusive(Gpa(start), len, prot, MemType::WriteBack, frame)
                } else {
                    t.map_range(Gpa(start), len, prot, MemType::WriteBack, frame)
                };
                let refused = (0..pages).find(|&i| frame_of(i).is_some_and(|f| f >= limit));
                match refused {
                    Some(i) => {
                        ensure_eq!(got, Err(Error::OutOfRange), "{}", ctx());
                        ensure_eq!(calls, i + 1, "frame asked up to the refused page; {}", ctx());
                    }
                    None => {
                        ensure_eq!(calls, pages, "{}", ctx());
                        let mut want = 0;
                        for i in 0..pages {
                            let gpa = start + i * K4;
                            if let Some(pfn) = frame_of(i)
                                && !m.leaves.contains_key(&gpa)
                            {
                                m.leaves.insert(gpa, Ent { pfn, prot, acc: false, wbit: false, sdirty: false });
                                want += 1;
                            }
                        }
                        ensure_eq!(got, Ok(want), "{}", ctx());
                    }
                }
            }
            Op::Unmap(r, p) => {
                let gpa = Model::page(region(r), p as u64);
                ensure_eq!(t.unmap(Gpa(gpa)), Ok(m.leaves.remove(&gpa).is_some()), "{}", ctx());
            }
            Op::UnmapRegion(r) => {
                let (start, len, _) = REGIONS[region(r)];
                let got = t.unmap_region(Gpa(start), len);
                ensure_eq!(got, Ok(unmap_model(&mut m, start, len)), "{}", ctx());
            }
            Op::UnmapSub { r, first, n } => {
                let (start, len) = Model::sub(region(r), first, n);
                let got = t.unmap_region(Gpa(start), len);
                ensure_eq!(got, Ok(unmap_model(&mut m, start, len)), "{}", ctx());
            }
            Op::UnmapVacate(r) => {
                let r = region(r);
                let (start, len, size) = REGIONS[r];
                if !m.populated[r] {
                    // Vacating what was never populated is a caller error
                    // the counts cannot always tell apart (see lib docs).
                    continue;
                }
                let got = t.unmap_vacate_region(Gpa(start), len, size);
                let want = unmap_model(&mut m, start, len);
                m.populated[r] = false;
                ensure_eq!(got, Ok(want), "{}", ctx());
            }
            Op::Record(r, p, a) => {
                let gpa = Model::page(region(r), p as u64);
                let a = access(a);
                let got = t.record_access(Gpa(gpa), a);
                match m.leaves.get_mut(&gpa) {
                    None => ensure_eq!(got, Err(Error::NotMapped), "{}", ctx()),
                    Some(e) => {
                        let ok = e.prot.contains(a.prot());
                        ensure_eq!(got, Ok(ok), "{}", ctx());
                        if ok {
                            e.acc = true;
                            e.wbit |= a == Access::Write;
                        }
                    }
                }
            }
            Op::ResetA(r, p, on) => {
                let gpa = Model::page(region(r), p as u64);
                let got = t.reset_accessed(Gpa(gpa), on);
                match m.leaves.get_mut(&gpa) {
                    None => ensure_eq!(got, Err(Error::NotMapped), "{}", ctx()),
                    Some(e) => {
                        ensure_eq!(got, Ok(e.acc), "{}", ctx());
                        if on {
                            e.acc = true;
                        } else {
                            e.acc = false;
                            if emulated {
                                e.sdirty |= e.wbit;
                                e.wbit = false;
                            }
                        }
                    }
                }
            }
            Op::ResetD(r, p, on) => {
                let gpa = Model::page(region(r), p as u64);
                let got = t.reset_dirty(Gpa(gpa), on);
                match m.leaves.get_mut(&gpa) {
                    None => ensure_eq!(got, Err(Error::NotMapped), "{}", ctx()),
                    Some(e) => {
                        ensure_eq!(got, Ok(e.dirty()), "{}", ctx());
                        if on {
                            if emulated {
                                e.sdirty = true;
                            } else {
                                e.wbit = true;
                            }
                        } else {
                            e.wbit = false;
                            e.sdirty = false;
                        }
                    }
                }
            }
            Op::Harvest(r, clear) => {
                let (start, len, _) = REGIONS[region(r)];
                let (want, count) = m.harvest(start, len, clear);
                let mut bm = vec![0u64; want.len()];
                let got = if clear && count % 2 == 1 {
                    t.harvest_dirty_exclusive(Gpa(start), len, &mut bm)
                } else {
                    t.scan_dirty(Gpa(start), len, &mut bm, clear)
                };
                ensure_eq!(got, Ok(count), "{}", ctx());
                ensure_eq!(bm, want, "{}", ctx());
            }
            Op::HarvestSub { r, first, n, clear, exclusive } => {
                let (start, len) = Model::sub(region(r), first, n);
                let (want, count) = m.harvest(start, len, clear);
                // Stale ones in the caller's bitmap are overwritten; words
                // past the range are left alone.
                let mut bm = vec![u64::MAX; want.len() + 1];
                let got = match (clear, exclusive) {
                    (true, true) => t.harvest_dirty_exclusive(Gpa(start), len, &mut bm),
                    (true, false) => t.harvest_dirty(Gpa(start), len, &mut bm),
                    (false, _) => t.scan_dirty(Gpa(start), len, &mut bm, false),
                };
                ensure_eq!(got, Ok(count), "{}", ctx());
                let pages = len / K4;
                let mut want = want;
                if !pages.is_multiple_of(64) {
                    *want.last_mut().unwrap() |= !0u64 << (pages % 64);
                }
                want.push(u64::MAX);
                ensure_eq!(bm, want, "{}", ctx());
            }
            Op::Translate(r, p, a, ad) => {
                let r = region(r);
                let (_, _, size) = REGIONS[r];
                let base = Model::page(r, p as u64);
                let off = (p as u64 * 0x1f8) % size.bytes();
                // DMA has no execute: an IOMMU refuses a fetch at the first
                // present level (tests/iommu.rs checks that); the model
                // walks data accesses.
                let a = match access(a) {
                    Access::Execute if fmt.is_iommu() => Access::Read,
                    a => a,
                };
                let got = mmu::translate(t.pages(), &fmt, t.root(), Gpa(base + off), a, ad);
                let hw_ad = fmt.kind() == FormatKind::Npt || (ad && fmt.kind() == FormatKind::Ept);
                let ent = m.leaves.get(&base).copied();
                match (ent, got) {
                    (None, got) => ensure_eq!(got.map_err(|v| v.kind), Err(ViolationKind::NotPresent), "{}", ctx()),
                    (Some(e), got) if emulated && !e.acc && !e.wbit => {
                        let want = Err((ViolationKind::NotPresent, size.level()));
                        ensure_eq!(got.map_err(|v| (v.kind, v.level)), want, "{}", ctx());
                    }
                    (Some(e), got) => {
                        let allowed = m.hw_allows(&e);
                        if allowed.contains(a.prot()) {
                            let tr = got.map(|tr| (tr.hpa, tr.size));
                            ensure_eq!(tr, Ok(((e.pfn << 12) + off, size)), "{}", ctx());
                            if hw_ad {
                                let e = m.leaves.get_mut(&base).unwrap();
                                e.acc = true;
                                e.wbit |= a == Access::Write;
                            }
                        } else {
                            let v = got.map_err(|v| (v.kind, v.level, v.effective)).map(|_| ());
                            ensure_eq!(v, Err((ViolationKind::Permission, size.level(), allowed)), "{}", ctx());
                        }
                    }
                }
            }
        }
        // The IOMMU formats have no accessed or dirty bits: nothing the
        // step did may have set any.
        if fmt.is_iommu() {
            for e in m.leaves.values_mut() {
                e.acc = false;
                e.wbit = false;
                e.sdirty = false;
            }
        }
        // Every observable after every step.
        ensure_eq!(t.pages().inner.errors(), &[] as &[&str], "{}", ctx());
        ensure_eq!(t.pages().inner.live(), m.expected_tables(), "{}", ctx());
        ensure_eq!(t.table_pages(), m.expected_tables(), "{}", ctx());
        // One lookup cursor across all the probes: consecutive probes in
        // one leaf table take its remembered-table path, the others walk.
        let mut cur = t.lookup_cursor();
        for (r, &(_, _, size)) in REGIONS.iter().enumerate() {
            for i in 0..leaves_in(r).min(6) {
                let gpa = Model::page(r, i * 97);
                let got = t.lookup(Gpa(gpa + 8)).map(|l| (l.gpa, l.size, l.pfn(), l.prot(), l.accessed(), l.dirty()));
                let want = m.leaves.get(&gpa).map(|e| (Gpa(gpa), size, Pfn(e.pfn), e.prot, e.acc, e.dirty()));
                ensure_eq!(got, want, "lookup {gpa:#x}; {}", ctx());
                let got = cur.lookup(Gpa(gpa + 8)).map(|l| (l.gpa, l.size, l.pfn(), l.prot(), l.accessed(), l.dirty()));
                ensure_eq!(got, want, "cursor lookup {gpa:#x}; {}", ctx());
                let got = t.is_mapped(Gpa(gpa + 8));
                let want = m.leaves.get(&gpa).map(|e| (Pfn(e.pfn), e.prot));
                ensure_eq!(got, want, "is_mapped {gpa:#x}; {}", ctx());
                ensure_eq!(cur.is_mapped(Gpa(gpa + 8)), want, "cursor is_mapped {gpa:#x}; {}", ctx());
            }
        }
        let leaves = t.leaves(Gpa(0), 1 << 48).map(|l| (l.gpa.0, l.pfn().0, l.prot(), l.accessed(), l.dirty()));
        let want = m.leaves.iter().map(|(k, e)| (*k, e.pfn, e.prot, e.acc, e.dirty()));
        ensure_eq!(leaves.collect::<Vec<_>>(), want.collect::<Vec<_>>(), "{}", ctx());
    }
    // Tear down: unmap and vacate everything; only the root stays.
    for (r, &(start, len, size)) in REGIONS.iter().enumerate() {
        if m.populated[r] {
            t.unmap_region(Gpa(start), len).map_err(|e| format!("teardown unmap: {e}"))?;
            t.vacate_region(Gpa(start), len, size).map_err(|e| format!("teardown vacate: {e}"))?;
        }
    }
    ensure_eq!(t.pages().inner.live(), 1, "after teardown");
    Ok(())
}

/// Drops the model's leaves in `[start, start+len)`; returns the 4 KiB
/// pages they mapped.
fn unmap_model(m: &mut Model, start: u64, len: u64) -> u64 {
    let gone: Vec<u64> = m.leaves.range(start..start + len).map(|(k, _)| *k).collect();
    let mut pages = 0;
    for k in gone {
        m.leaves.remove(&k);
        pages += REGIONS.iter().find(|(s, l, _)| (*s..s + l).contains(&k)).unwrap().2.pages();
    }
    pages
}
