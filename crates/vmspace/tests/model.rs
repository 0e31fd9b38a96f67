//! Model-based property test: random sequences of map / unmap / populate /
//! fault / hold / release / dirty operations against a simple reference
//! model; every observable is compared after every step (results and
//! errors, lookups of every page, resident count, bitmaps, hold frames and
//! contents, release reports, generation changes).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use vmspace::*;

const SPACE_PAGES: u64 = 64;
const GPA_PAGES: u64 = 72;
const OBJ_PAGES: u64 = 16;
const FAULT_AROUND: u64 = 4;

#[derive(Clone, Debug)]
enum Op {
    Map { obj: usize, off: u64, gpa: u64, len: u64, write: bool },
    Unmap { gpa: u64, len: u64 },
    Populate { gpa: u64, len: u64 },
    Fault { gpa: u64, write: bool },
    Hold { gpa: u64, write: bool, defer: bool, mark: bool },
    Release { idx: usize },
    Dirty { op: u8, gpa: u64, len: u64, select: Option<u64> },
    Tracking { on: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..18u64, 0..GPA_PAGES, 0..20u64, any::<bool>())
            .prop_map(|(obj, off, gpa, len, write)| Op::Map { obj, off, gpa, len, write }),
        2 => (0..GPA_PAGES, 0..20u64).prop_map(|(gpa, len)| Op::Unmap { gpa, len }),
        1 => (0..GPA_PAGES, 0..8u64).prop_map(|(gpa, len)| Op::Populate { gpa, len }),
        3 => (0..GPA_PAGES, any::<bool>()).prop_map(|(gpa, write)| Op::Fault { gpa, write }),
        4 => (0..GPA_PAGES, any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(gpa, write, defer, mark)| Op::Hold { gpa, write, defer, mark }),
        3 => (0..8usize).prop_map(|idx| Op::Release { idx }),
        3 => (0..3u8, 0..GPA_PAGES, 0..24u64, proptest::option::of(any::<u64>()))
            .prop_map(|(op, gpa, len, select)| Op::Dirty { op, gpa, len, select }),
        1 => any::<bool>().prop_map(|on| Op::Tracking { on }),
    ]
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
    unmapped_ids: BTreeSet<u64>,
    /// Contents: (object, page) -> last value written at offset 0.
    content: HashMap<(usize, u64), u64>,
}

impl Model {
    fn mapping(&self, page: u64) -> Option<(u64, MMap)> {
        let (s, m) = self.maps.range(..=page).next_back()?;
        (page < s + m.len).then_some((*s, *m))
    }

    fn fault_in(&mut self, page: u64) {
        let (s, m) = self.mapping(page).unwrap();
        let lo = (page / FAULT_AROUND * FAULT_AROUND).max(s);
        let hi = (page / FAULT_AROUND * FAULT_AROUND + FAULT_AROUND).min(s + m.len);
        if !self.present.contains(&page) {
            self.present.extend(lo..hi);
        }
    }

    fn access(&mut self, page: u64, prot: Prot) -> Result<MMap> {
        let (_, m) = self.mapping(page).ok_or(Error::NoMapping)?;
        if !m.prot.contains(prot) {
            return Err(Error::Protection);
        }
        self.fault_in(page);
        Ok(m)
    }
}

struct ModelHold {
    page: u64,
    write: bool,
    defer: bool,
    map_id: u64,
}

fn run(ops: Vec<Op>) -> std::result::Result<(), TestCaseError> {
    let s = space_with(SPACE_PAGES * PG, npt(), true, FAULT_AROUND as u32);
    let r = reservoir(3 * OBJ_PAGES);
    let objs: Vec<Arc<VmObject>> = (0..3).map(|_| ram(&r, OBJ_PAGES)).collect();
    let c = s.client();
    let mut m = Model { tracking: true, ..Default::default() };
    let mut holds: Vec<(PageHold<'_, Pages>, ModelHold)> = Vec::new();
    let mut counter = 0u64;

    for op in ops {
        let gen_before = s.table_gen();
        let mut gen_rule: Option<(u64, bool)> = Some((0, true)); // (bump, exact)
        match op {
            Op::Map { obj, off, gpa, len, write } => {
                let prot = if write { Prot::RW } else { Prot::READ };
                let got = s.map(&objs[obj], off * PG, gpa * PG, len * PG, prot);
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
                prop_assert_eq!(got, want);
            }
            Op::Unmap { gpa, len } => {
                let got = s.unmap(gpa * PG, len * PG);
                let want = if len == 0 {
                    Err(Error::Invalid(Invalid::ZeroLength))
                } else if m.maps.get(&gpa).is_some_and(|mm| mm.len == len) {
                    let mm = m.maps.remove(&gpa).unwrap();
                    m.unmapped_ids.insert(mm.id);
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
                prop_assert_eq!(got, want);
            }
            Op::Populate { gpa, len } => {
                let got = s.populate(gpa * PG, len * PG);
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
                prop_assert_eq!(got, want);
            }
            Op::Fault { gpa, write } => {
                let prot = if write { Prot::WRITE } else { Prot::READ };
                let got = c.fault(gpa * PG + 17, prot);
                let want = m.access(gpa, prot).map(|_| ());
                prop_assert_eq!(got, want);
            }
            Op::Hold { gpa, write, defer, mark } => {
                let prot = if write { Prot::RW } else { Prot::READ };
                let got = c.hold_ext(gpa * PG, prot, defer);
                let want = m.access(gpa, prot);
                match (got, want) {
                    (Ok(h), Ok(mm)) => {
                        let st = m.mapping(gpa).unwrap().0;
                        let opage = mm.off + (gpa - st);
                        prop_assert_eq!(h.pfn(), objs[mm.obj].frame_at(opage * PG).unwrap());
                        let expect = m.content.get(&(mm.obj, opage)).copied().unwrap_or(0);
                        prop_assert_eq!(h.read_u64(0).unwrap(), expect);
                        if write {
                            counter += 1;
                            h.write_u64(0, counter).unwrap();
                            m.content.insert((mm.obj, opage), counter);
                            if mark {
                                h.mark_dirty().unwrap();
                            }
                        }
                        let defer = defer && !(write && mark);
                        if holds.len() < 8 {
                            holds.push((h, ModelHold { page: gpa, write, defer, map_id: mm.id }));
                        } else {
                            // Release at once.
                            let unmapped = h.release();
                            prop_assert!(!unmapped);
                            if write && !defer && m.tracking {
                                m.dirty.insert(gpa);
                            }
                        }
                    }
                    (Err(e), Err(w)) => prop_assert_eq!(e, w),
                    (g, w) => prop_assert!(false, "hold: got {:?} want {:?}", g.map(|_| ()), w.map(|_| ())),
                }
            }
            Op::Release { idx } => {
                if !holds.is_empty() {
                    let (h, mh) = holds.remove(idx % holds.len());
                    let unmapped = h.release();
                    let want = m.unmapped_ids.contains(&mh.map_id);
                    prop_assert_eq!(unmapped, want);
                    if !want && mh.write && !mh.defer && m.tracking {
                        m.dirty.insert(mh.page);
                    }
                }
            }
            Op::Dirty { op, gpa, len, select } => {
                let dop = [DirtyOp::Get, DirtyOp::Set, DirtyOp::Reset][op as usize];
                let sel = select.map(|v| [v]);
                let mut out = [0xa5a5_5a5a_0f0f_f0f0u64];
                let before = out[0];
                let got = s.dirty_op(dop, gpa * PG, len * PG, sel.as_ref().map(|s| &s[..]), &mut out);
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
                    gen_rule = Some((1, true));
                    prop_assert_eq!(out[0], expect, "bitmap of {:?}", dop);
                    Ok(n)
                };
                prop_assert_eq!(got, want);
            }
            Op::Tracking { on } => {
                s.set_dirty_tracking(on).unwrap();
                m.tracking = on;
                gen_rule = Some((1, true));
            }
        }
        // Observables.
        prop_assert_eq!(s.resident_count(), m.present.len() as u64);
        for p in 0..GPA_PAGES {
            let want = if m.present.contains(&p) {
                let (st, mm) = m.mapping(p).unwrap();
                Some((objs[mm.obj].frame_at((mm.off + p - st) * PG).unwrap(), mm.prot))
            } else {
                None
            };
            prop_assert_eq!(s.lookup(p * PG), want, "lookup of page {}", p);
        }
        let gen_after = s.table_gen();
        match gen_rule {
            Some((bump, true)) => prop_assert_eq!(gen_after, gen_before + bump),
            Some((bump, false)) => prop_assert!(gen_after >= gen_before + bump),
            None => prop_assert!(gen_after >= gen_before),
        }
    }
    // Everything dirty according to the model, and nothing else.
    drop(holds);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn space_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
