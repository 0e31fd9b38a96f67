//! Random accesses around every boundary of the test layout (pages,
//! contiguous mappings, holes, a read-only mapping) against a plain byte
//! array: results, errors, bytes and harvested dirty pages must agree.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use common::*;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use vmspace_vm_memory::VmMemory;

const SPAN: u64 = 16 * MIB;

/// `Some(writable)` for a mapped byte.
fn mapped(gpa: u64) -> Option<bool> {
    let inside = |(s, l): (u64, u64)| gpa >= s && gpa < s + l;
    if inside(A) || inside(B) || inside(C) {
        Some(true)
    } else if inside(R) {
        Some(false)
    } else {
        None
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done(usize),
    NoMapping(u64),
    Denied,
    Partial(usize),
    Other,
}

fn outcome<T>(r: Result<T, GuestMemoryError>, n: impl FnOnce(T) -> usize) -> Outcome {
    match r {
        Ok(v) => Outcome::Done(n(v)),
        Err(GuestMemoryError::InvalidGuestAddress(a)) => Outcome::NoMapping(a.0),
        Err(GuestMemoryError::IOError(e)) if e.kind() == ErrorKind::PermissionDenied => Outcome::Denied,
        Err(GuestMemoryError::PartialBuffer { completed, .. }) => Outcome::Partial(completed),
        Err(_) => Outcome::Other,
    }
}

struct Model {
    bytes: Vec<u8>,
    dirty: BTreeSet<u64>,
}

impl Model {
    /// Bytes accessible from `addr` for `len` (stopping at the first page
    /// that is unmapped or refuses), or the error on the first page.
    fn reach(&self, addr: u64, len: usize, write: bool) -> Result<usize, Outcome> {
        let mut n = 0usize;
        while n < len {
            let a = addr + n as u64;
            match mapped(a) {
                None if n == 0 => return Err(Outcome::NoMapping(a)),
                Some(false) if write && n == 0 => return Err(Outcome::Denied),
                None => break,
                Some(false) if write => break,
                _ => {}
            }
            n += ((PG - a % PG) as usize).min(len - n);
        }
        Ok(n)
    }

    fn write(&mut self, addr: u64, buf: &[u8]) -> Result<usize, Outcome> {
        let n = self.reach(addr, buf.len(), true)?;
        self.bytes[addr as usize..addr as usize + n].copy_from_slice(&buf[..n]);
        if n > 0 {
            self.dirty.extend(addr / PG..=(addr + n as u64 - 1) / PG);
        }
        Ok(n)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    WriteSlice(u64, usize, u8),
    Read(u64, usize),
    Store(u64, u32),
    Harvest,
}

fn addr() -> impl Strategy<Value = u64> {
    let anchors = vec![A.0, A.0 + A.1, B.0, B.0 + PG, C.0, C.0 + C.1, R.0, R.0 + R.1, C.0 + 5 * PG];
    (proptest::sample::select(anchors), -9000i64..9000)
        .prop_map(|(a, d)| (a as i64 + d).clamp(0, SPAN as i64 - 1) as u64)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (addr(), 0usize..10000, any::<u8>()).prop_map(|(a, l, s)| Op::Write(a, l, s)),
        2 => (addr(), 1usize..10000, any::<u8>()).prop_map(|(a, l, s)| Op::WriteSlice(a, l, s)),
        3 => (addr(), 0usize..10000).prop_map(|(a, l)| Op::Read(a, l)),
        2 => (addr(), any::<u32>()).prop_map(|(a, v)| Op::Store(a, v)),
        1 => Just(Op::Harvest),
    ]
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn accesses_match_model(ops in proptest::collection::vec(op(), 1..60)) {
        let g = guest();
        let mem = VmMemory::new(&g.space);
        let mut m = Model { bytes: vec![0; SPAN as usize], dirty: BTreeSet::new() };
        for op in ops {
            match op {
                Op::Write(a, l, s) => {
                    let buf = data(l, s);
                    let want = m.write(a, &buf).map_or_else(|e| e, Outcome::Done);
                    prop_assert_eq!(outcome(mem.write(&buf, GuestAddress(a)), |n| n), want);
                }
                Op::WriteSlice(a, l, s) => {
                    let buf = data(l, s);
                    let want = match m.write(a, &buf) {
                        Ok(n) if n == l => Outcome::Done(0),
                        Ok(n) => Outcome::Partial(n),
                        Err(e) => e,
                    };
                    prop_assert_eq!(outcome(mem.write_slice(&buf, GuestAddress(a)), |()| 0), want);
                }
                Op::Read(a, l) => {
                    let mut buf = vec![0u8; l];
                    let want = m.reach(a, l, false);
                    let got = outcome(mem.read(&mut buf, GuestAddress(a)), |n| n);
                    match want {
                        Ok(n) => {
                            prop_assert_eq!(got, Outcome::Done(n));
                            prop_assert!(buf[..n] == m.bytes[a as usize..a as usize + n]);
                        }
                        Err(e) => prop_assert_eq!(got, e),
                    }
                }
                Op::Store(a, v) => {
                    let got = outcome(mem.store(v, GuestAddress(a), Ordering::Relaxed), |()| 0);
                    if a % 4 == 0 && mapped(a) == Some(true) {
                        prop_assert_eq!(got, Outcome::Done(0));
                        m.write(a, &v.to_ne_bytes()).unwrap();
                    } else if mapped(a).is_none() {
                        prop_assert_eq!(got, Outcome::NoMapping(a));
                    } else if mapped(a) == Some(false) {
                        prop_assert_eq!(got, Outcome::Denied);
                    } else {
                        prop_assert_eq!(got, Outcome::Other, "unaligned");
                    }
                }
                Op::Harvest => {
                    let got: BTreeSet<u64> = harvest(&g.space).into_iter().collect();
                    prop_assert_eq!(&got, &m.dirty);
                    m.dirty.clear();
                }
            }
        }
        let got: BTreeSet<u64> = harvest(&g.space).into_iter().collect();
        prop_assert_eq!(&got, &m.dirty);
        prop_assert_eq!(mem.stray_writes(), 0);
    }
}
