//! The reference model shared by the model-based property test
//! (`tests/model.rs`, proptest) and the fuzz test (`tests/fuzz.rs`, seeded
//! random bytes through `arbitrary`): operation sequences against the real
//! space and a simple model, every observable compared after every step
//! (results and errors, lookups of every page, resident count against the
//! model and against the leaves actually present, bitmaps, hold frames and
//! contents, release reports, generation changes).
//!
//! A configuration chooses the format, the number of clients and where
//! the 72-page window of guest addresses lies (across a leaf-table and a
//! 512 GiB boundary, or not).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::common::*;
use nested_pt::FormatKind;
use vmspace::*;

/// Pages of the space above `base` (mappings must end below).
pub const SPACE_PAGES: u64 = 64;
/// Pages addressed by operations (some beyond the space's end).
pub const GPA_PAGES: u64 = 72;
const OBJ_PAGES: u64 = 16;
const FAULT_AROUND: u64 = 4;
const MAX_HOLDS: usize = 8;

/// One operation; fields are reduced modulo their ranges when run, so any
/// value is valid (for `arbitrary`).
#[derive(Clone, Debug, arbitrary::Arbitrary)]
pub enum Op {
    /// Map `len` pages of object `obj` from page `off` at page `gpa`.
    Map { obj: u8, off: u8, gpa: u8, len: u8, write: bool },
    /// Unmap.
    Unmap { gpa: u8, len: u8 },
    /// Populate.
    Populate { gpa: u8, len: u8 },
    /// A vCPU fault through a client.
    Fault { client: u8, gpa: u8, write: bool },
    /// A hold through a client (kept, up to a few, or released at once).
    Hold { client: u8, gpa: u8, write: bool, defer: bool, mark: bool },
    /// Release one of the kept holds.
    Release { idx: u8 },
    /// A dirty operation (Get, Set, Reset), optionally with a selection.
    Dirty { op: u8, gpa: u8, len: u8, select: Option<u64> },
    /// Switch dirty tracking.
    Tracking { on: bool },
    /// Unmap part of a mapping (`unmap_range`).
    UnmapRange { gpa: u8, len: u8 },
    /// Change the protection of part of a mapping.
    Protect { gpa: u8, len: u8, write: bool },
}

/// What a run is made of.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The table format.
    pub format: PteFormat,
    /// Guest-physical address of page 0 of the window.
    pub base: u64,
    /// Clients taking holds and faulting.
    pub clients: usize,
}

/// Every combination the tests cover: three formats, one or three
/// clients, a window at 0 (inside one leaf table) and one straddling the
/// 512 GiB root boundary (and so a 2 MiB leaf-table boundary).
pub fn configs() -> Vec<Config> {
    let mut v = Vec::new();
    for format in formats() {
        for (base, clients) in [(0, 1), (0x20_0000 - 20 * PG, 3), ((512u64 << 30) - 32 * PG, 3)] {
            v.push(Config { format, base, clients });
        }
    }
    v
}

#[derive(Clone, Copy)]
struct MMap {
    obj: usize,
    off: u64,
    len: u64,
    prot: Prot,
    id: u64,
}

#[derive(Default)]
struct Model {
    maps: BTreeMap<u64, MMap>,
    present: BTreeSet<u64>,
    dirty: BTreeSet<u64>,
    tracking: bool,
    next_id: u64,
    /// Unmapped ranges `(mapping id, first page, end page)`: a hold on a
    /// page of one, taken on that mapping, reports the unmap.
    unmapped: Vec<(u64, u64, u64)>,
    /// Contents: (object, page) -> last value written at offset 0.
    content: HashMap<(usize, u64), u64>,
}

impl Model {
    fn was_unmapped(&self, id: u64, page: u64) -> bool {
        self.unmapped.iter().any(|&(i, lo, hi)| i == id && lo <= page && page < hi)
    }

    /// Cut the mapping at `st` around `[gpa, end)` (inside it): the
    /// pieces before and after stay; the middle is returned, removed.
    fn cut(&mut self, st: u64, gpa: u64, end: u64) -> MMap {
        let mm = self.maps.remove(&st).unwrap();
        if gpa > st {
            self.maps.insert(st, MMap { len: gpa - st, ..mm });
        }
        if end < st + mm.len {
            self.maps.insert(end, MMap { off: mm.off + (end - st), len: st + mm.len - end, ..mm });
        }
        MMap { off: mm.off + (gpa - st), len: end - gpa, ..mm }
    }

    /// Merge the mapping at `at` with neighbouring pieces of the same
    /// mapping and protection (as the space does after `protect`).
    fn coalesce(&mut self, at: u64) {
        let same = |a: &MMap, a_st: u64, b: &MMap, b_st: u64| {
            a.id == b.id && a.obj == b.obj && a.prot == b.prot && a_st + a.len == b_st && a.off + a.len == b.off
        };
        let mut at = at;
        if let Some((&l, lm)) = self.maps.range(..at).next_back()
            && same(lm, l, &self.maps[&at], at)
        {
            let m = self.maps.remove(&at).unwrap();
            self.maps.get_mut(&l).unwrap().len += m.len;
            at = l;
        }
        let m = self.maps[&at];
        let next = at + m.len;
        if let Some(r) = self.maps.get(&next).copied()
            && same(&m, at, &r, next)
        {
            self.maps.remove(&next);
            self.maps.get_mut(&at).unwrap().len += r.len;
        }
    }

    fn mapping(&self, page: u64) -> Option<(u64, MMap)> {
        let (s, m) = self.maps.range(..=page).next_back()?;
        (page < s + m.len).then_some((*s, *m))
    }

    fn fault_in(&mut self, page: u64, base: u64) {
        let (s, m) = self.mapping(page).unwrap();
        // The window is aligned on absolute addresses.
        let abs = base / PG + page;
        let lo = (abs / FAULT_AROUND * FAULT_AROUND - base / PG).max(s);
        let hi = (abs / FAULT_AROUND * FAULT_AROUND + FAULT_AROUND - base / PG).min(s + m.len);
        if !self.present.contains(&page) {
            self.present.extend(lo..hi);
        }
    }

    fn access(&mut self, page: u64, prot: Prot, base: u64) -> Result<MMap> {
        let (_, m) = self.mapping(page).ok_or(Error::NoMapping)?;
        if !m.prot.contains(prot) {
            return Err(Error::Protection);
        }
        self.fault_in(page, base);
        Ok(m)
    }
}

struct ModelHold {
    page: u64,
    write: bool,
    defer: bool,
    map_id: u64,
}

macro_rules! check {
    ($c:expr, $($fmt:tt)+) => {
        if !$c {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! check_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{:?} != {:?}: {}", a, b, format!($($fmt)+)));
        }
    }};
}

/// Run `ops` from a fresh space; `Err` describes the first mismatch.
pub fn run(cfg: &Config, ops: &[Op]) -> std::result::Result<(), String> {
    let base = cfg.base;
    let emulated = cfg.format.kind() == FormatKind::EptEmulatedAd;
    let s = space_with(base + SPACE_PAGES * PG, cfg.format, true, FAULT_AROUND as u32);
    let r = reservoir(3 * OBJ_PAGES);
    let objs: Vec<Arc<VmObject>> = (0..3).map(|_| ram(&r, OBJ_PAGES)).collect();
    let clients: Vec<_> = (0..cfg.clients.max(1)).map(|_| s.client()).collect();
    let mut m = Model { tracking: true, ..Default::default() };
    let mut holds: Vec<(PageHold<'_, Pages>, ModelHold)> = Vec::new();
    let mut counter = 0u64;
    let at = |p: u64| base + p * PG;

    for (step, op) in ops.iter().enumerate() {
        let gen_before = s.table_gen();
        let mut gen_rule: Option<(u64, bool)> = Some((0, true)); // (bump, exact)
        match *op {
            Op::Map { obj, off, gpa, len, write } => {
                let (obj, off, gpa, len) =
                    (obj as usize % objs.len(), off as u64 % 18, gpa as u64 % GPA_PAGES, len as u64 % 20);
                let prot = if write { Prot::RW } else { Prot::READ };
                let got = s.map(&objs[obj], off * PG, Gpa(at(gpa)), len * PG, prot);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else if off + len > OBJ_PAGES {
                    Err(Error::Invalid(Invalid::OutsideObject))
                } else if gpa + len >= SPACE_PAGES {
                    Err(Error::NoSpace(NoSpace::BeyondEnd))
                } else if m.maps.iter().any(|(s, mm)| *s < gpa + len && gpa < s + mm.len) {
                    Err(Error::NoSpace(NoSpace::Overlap))
                } else {
                    m.next_id += 1;
                    m.maps.insert(gpa, MMap { obj, off, len, prot, id: m.next_id });
                    Ok(())
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Unmap { gpa, len } => {
                let (gpa, len) = (gpa as u64 % GPA_PAGES, len as u64 % 20);
                let got = s.unmap(Gpa(at(gpa)), len * PG);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else if m.maps.get(&gpa).is_some_and(|mm| mm.len == len) {
                    let mm = m.maps.remove(&gpa).unwrap();
                    m.unmapped.push((mm.id, gpa, gpa + len));
                    let had = (gpa..gpa + len).any(|p| m.present.contains(&p));
                    for p in gpa..gpa + len {
                        m.present.remove(&p);
                        m.dirty.remove(&p);
                    }
                    // Table pages may be freed too, which also bumps.
                    gen_rule = if had { Some((1, false)) } else { None };
                    Ok(())
                } else {
                    Err(Error::NotFound)
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Populate { gpa, len } => {
                let (gpa, len) = (gpa as u64 % GPA_PAGES, len as u64 % 8);
                let got = s.populate(Gpa(at(gpa)), len * PG);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else {
                    match m.mapping(gpa) {
                        Some((st, mm)) if gpa + len <= st + mm.len => {
                            let new = (gpa..gpa + len).filter(|p| !m.present.contains(p)).count() as u64;
                            m.present.extend(gpa..gpa + len);
                            Ok(new)
                        }
                        _ => Err(Error::NotFound),
                    }
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Fault { client, gpa, write } => {
                let (c, gpa) = (&clients[client as usize % clients.len()], gpa as u64 % GPA_PAGES);
                let prot = if write { Prot::WRITE } else { Prot::READ };
                let got = c.fault(Gpa(at(gpa) + 17), prot);
                let want = m.access(gpa, prot, base).map(|_| ());
                // Emulated A/D: a vCPU's write fault grants hardware W,
                // the format's dirty bit (whether tracking is on or not).
                if want.is_ok() && write && emulated {
                    m.dirty.insert(gpa);
                }
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Hold { client, gpa, write, defer, mark } => {
                let (c, gpa) = (&clients[client as usize % clients.len()], gpa as u64 % GPA_PAGES);
                let prot = if write { Prot::RW } else { Prot::READ };
                let got = c.hold_ext(Gpa(at(gpa)), prot, defer);
                let want = m.access(gpa, prot, base);
                match (got, want) {
                    (Ok(h), Ok(mm)) => {
                        let st = m.mapping(gpa).unwrap().0;
                        let opage = mm.off + (gpa - st);
                        check_eq!(h.pfn(), objs[mm.obj].frame_at(opage * PG).unwrap(), "step {step}: hold frame");
                        let expect = m.content.get(&(mm.obj, opage)).copied().unwrap_or(0);
                        check_eq!(h.read_u64(0).unwrap(), expect, "step {step}: hold contents");
                        if write {
                            counter += 1;
                            h.write_u64(0, counter).unwrap();
                            m.content.insert((mm.obj, opage), counter);
                            if mark {
                                h.mark_dirty().unwrap();
                            }
                        }
                        let defer = defer && !(write && mark);
                        if holds.len() < MAX_HOLDS {
                            holds.push((h, ModelHold { page: gpa, write, defer, map_id: mm.id }));
                        } else {
                            // Release at once.
                            check!(!h.release(), "step {step}: fresh hold reported unmapped");
                            if write && !defer && m.tracking {
                                m.dirty.insert(gpa);
                            }
                        }
                    }
                    (Err(e), Err(w)) => check_eq!(e, w, "step {step}: {op:?}"),
                    (g, w) => check!(false, "step {step}: hold: got {:?} want {:?}", g.map(|_| ()), w.map(|_| ())),
                }
            }
            Op::Release { idx } => {
                if !holds.is_empty() {
                    let (h, mh) = holds.remove(idx as usize % holds.len());
                    let unmapped = h.release();
                    let want = m.was_unmapped(mh.map_id, mh.page);
                    check_eq!(unmapped, want, "step {step}: release report");
                    if !want && mh.write && !mh.defer && m.tracking {
                        m.dirty.insert(mh.page);
                    }
                }
            }
            Op::Dirty { op: dop, gpa, len, select } => {
                let (gpa, len) = (gpa as u64 % GPA_PAGES, len as u64 % 24);
                let dop = [DirtyOp::Get, DirtyOp::Set, DirtyOp::Reset][dop as usize % 3];
                let sel = select.map(|v| [v]);
                let mut out = [0xa5a5_5a5a_0f0f_f0f0u64];
                let before = out[0];
                let got = s.dirty_op(dop, Gpa(at(gpa)), len * PG, sel.as_ref().map(|s| &s[..]), &mut out);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else if !m.tracking {
                    Err(Error::NotPermitted)
                } else {
                    let mut expect = before;
                    let mut n = 0;
                    for i in 0..len {
                        let p = gpa + i;
                        if sel.is_some_and(|s| s[0] >> i & 1 == 0) {
                            // Unselected pages of the range report 0.
                            expect &= !(1 << i);
                            continue;
                        }
                        let v = match dop {
                            DirtyOp::Get => m.dirty.contains(&p),
                            DirtyOp::Reset => m.dirty.remove(&p),
                            DirtyOp::Set => match m.mapping(p) {
                                Some((_, mm)) if mm.prot.contains(Prot::WRITE) => {
                                    m.present.insert(p);
                                    m.dirty.insert(p);
                                    true
                                }
                                _ => false,
                            },
                        };
                        expect = (expect & !(1 << i)) | (v as u64) << i;
                        n += v as u64;
                    }
                    // Only a Reset that cleared a bit invalidates (one
                    // bump); Get and Set never do.
                    gen_rule = Some(((dop == DirtyOp::Reset && n > 0) as u64, true));
                    check_eq!(out[0], expect, "step {step}: bitmap of {op:?}");
                    Ok(n)
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Tracking { on } => {
                s.set_dirty_tracking(on).unwrap();
                m.tracking = on;
                gen_rule = Some((1, true));
            }
            Op::UnmapRange { gpa, len } => {
                let (gpa, len) = (gpa as u64 % GPA_PAGES, len as u64 % 12);
                let got = s.unmap_range(Gpa(at(gpa)), len * PG);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else {
                    match m.mapping(gpa) {
                        Some((st, mm)) if gpa + len <= st + mm.len => {
                            let piece = m.cut(st, gpa, gpa + len);
                            m.unmapped.push((piece.id, gpa, gpa + len));
                            let had = (gpa..gpa + len).any(|p| m.present.contains(&p));
                            for p in gpa..gpa + len {
                                m.present.remove(&p);
                                m.dirty.remove(&p);
                            }
                            gen_rule = if had { Some((1, false)) } else { None };
                            Ok(())
                        }
                        _ => Err(Error::NotFound),
                    }
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
            Op::Protect { gpa, len, write } => {
                let (gpa, len) = (gpa as u64 % GPA_PAGES, len as u64 % 12);
                let prot = if write { Prot::RW } else { Prot::READ };
                let got = s.protect(Gpa(at(gpa)), len * PG, prot);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else {
                    match m.mapping(gpa) {
                        Some((st, mm)) if gpa + len <= st + mm.len => {
                            let held = holds.iter().any(|(_, h)| gpa <= h.page && h.page < gpa + len);
                            if !prot.contains(mm.prot) && held {
                                Err(Error::Held)
                            } else {
                                let piece = m.cut(st, gpa, gpa + len);
                                m.maps.insert(gpa, MMap { prot, ..piece });
                                m.coalesce(gpa);
                                gen_rule = Some((1, true));
                                Ok(())
                            }
                        }
                        _ => Err(Error::NotFound),
                    }
                };
                check_eq!(got, want, "step {step}: {op:?}");
            }
        }
        // Observables.
        check_eq!(s.resident_count(), m.present.len() as u64, "step {step}: resident count after {op:?}");
        check_eq!(present_leaves(&s), m.present.len() as u64, "step {step}: leaves present after {op:?}");
        for p in 0..GPA_PAGES {
            let want = if m.present.contains(&p) {
                let (st, mm) = m.mapping(p).unwrap();
                Some((objs[mm.obj].frame_at((mm.off + p - st) * PG).unwrap(), mm.prot))
            } else {
                None
            };
            check_eq!(s.lookup(Gpa(at(p))), want, "step {step}: lookup of page {p} after {op:?}");
        }
        let gen_after = s.table_gen();
        match gen_rule {
            Some((bump, true)) => check_eq!(gen_after, gen_before + bump, "step {step}: generation"),
            Some((bump, false)) => check!(gen_after >= gen_before + bump, "step {step}: generation"),
            None => check!(gen_after >= gen_before, "step {step}: generation"),
        }
    }
    // Releases left: their reports.
    for (h, mh) in holds {
        check_eq!(h.release(), m.was_unmapped(mh.map_id, mh.page), "final release report");
    }
    Ok(())
}

/// Decode a sequence of operations from raw bytes.
pub fn ops_from(bytes: &[u8]) -> Vec<Op> {
    let mut u = arbitrary::Unstructured::new(bytes);
    let mut ops = Vec::new();
    while let Ok(op) = u.arbitrary::<Op>() {
        if u.is_empty() {
            break;
        }
        ops.push(op);
    }
    ops
}
