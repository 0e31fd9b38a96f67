//! The built-in guest workloads, described and replayed on the host.
//!
//! Every vCPU owns a disjoint range of guest pages. Operation `i` of a vCPU
//! is a pure function of its parameters and `i` (the random mix draws from a
//! seeded xorshift64 generator), so the host can replay a vCPU's operations
//! and predict the exact final contents of its pages: any lost or misplaced
//! write shows up as a mismatch. Each page's word 0 is a header
//! (`page address ^ magic`); data goes to one of 64 slots (words 1..=64).
//!
//! The guest also keeps a ledger: one bit per page it wrote since the last
//! harvest point. Harvest points are cooperative (the host asks through the
//! control word; the guest stops at an operation boundary), so the ledger
//! and the dirty bits describe exactly the same writes.

use crate::guest::{CHECK_MUL, TOUCH_MUL, USED_WORDS};

/// What a vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sequential touch: operation `i` writes page `i % n`.
    Touch = 0,
    /// Random read/write mix from a seeded generator.
    Random = 1,
    /// One sequential pass, then the random mix.
    Mixed = 2,
    /// Probe accesses listed in the parameter block (oracle tests).
    Probe = 3,
    /// Read one address in a loop (unmap/remap tests).
    Watch = 4,
    /// Ring a no-op doorbell in a loop (exit round-trip benchmark).
    Ping = 5,
    /// Jump to host-written code at the parameter block's exec entry
    /// (instruction-emulation checks against the CPU).
    Exec = 6,
}

/// Parameters of one vCPU's data workload.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Workload mode (Touch, Random or Mixed).
    pub mode: Mode,
    /// Guest address of the vCPU's region.
    pub base: u64,
    /// Pages in the region.
    pub npages: u64,
    /// Initial generator state (non-zero).
    pub seed: u64,
    /// Percentage of random operations that write.
    pub write_pct: u32,
    /// Header magic.
    pub magic: u64,
}

impl Spec {
    /// vCPU `i`'s workload in the standard layout: its own `npages`-page
    /// region after those of the vCPUs before it from `ram_base`, a
    /// generator seed derived from `seed` and `i` (distinct and non-zero
    /// per vCPU), and a header magic naming the vCPU.
    pub fn for_vcpu(i: usize, mode: Mode, ram_base: u64, npages: u64, seed: u64, write_pct: u32) -> Spec {
        Spec {
            mode,
            base: ram_base + i as u64 * npages * 4096,
            npages,
            seed: (seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            write_pct,
            magic: 0xc0de_0000_0000_0000 | ((i as u64) << 40),
        }
    }

    /// The write threshold out of 256 the guest compares against.
    pub fn write_thresh(&self) -> u64 {
        (u64::from(self.write_pct.min(100)) * 256).div_ceil(100)
    }
}

/// One step of the guest's generator.
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What operation `i` does, given the generator state before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Page index.
    pub page: u64,
    /// Slot written (1..=64), or `None` for a read.
    pub slot: Option<u64>,
    /// Value written.
    pub value: u64,
}

/// Replays a vCPU's operations on the host.
#[derive(Debug, Clone)]
pub struct Replay {
    spec: Spec,
    /// Operations replayed.
    pub ops: u64,
    /// Generator state.
    pub rng: u64,
}

impl Replay {
    /// A replay at operation 0.
    pub fn new(spec: Spec) -> Self {
        Replay { spec, ops: 0, rng: spec.seed }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let s = &self.spec;
        let i = self.ops;
        self.ops += 1;
        let touch = s.mode == Mode::Touch || (s.mode == Mode::Mixed && i < s.npages);
        if touch {
            let page = i % s.npages;
            let pass = i / s.npages;
            Op { page, slot: Some(1 + (pass & 63)), value: (i + 1).wrapping_mul(TOUCH_MUL) }
        } else {
            self.rng = xorshift(self.rng);
            let x = self.rng;
            let page = ((u128::from(x) * u128::from(s.npages)) >> 64) as u64;
            if (x >> 6) & 0xff < s.write_thresh() {
                Op { page, slot: Some(1 + (x & 63)), value: x }
            } else {
                Op { page, slot: None, value: 0 }
            }
        }
    }

    /// The expected image of the region after `ops` operations: 65 words per
    /// page (header + 64 slots), zero where never written; and the set of
    /// pages written in each of the intervals cut at `cuts` (ascending
    /// operation counts).
    pub fn image(spec: Spec, ops: u64) -> Vec<u64> {
        let mut img = vec![0u64; (spec.npages * USED_WORDS) as usize];
        let mut r = Replay::new(spec);
        for _ in 0..ops {
            let op = r.next_op();
            if let Some(slot) = op.slot {
                let b = (op.page * USED_WORDS) as usize;
                img[b] = (spec.base + op.page * 4096) ^ spec.magic;
                img[b + slot as usize] = op.value;
            }
        }
        img
    }
}

/// Pages the guest's verify pass covers after `ops` operations: every page,
/// except during a first sequential pass (pages at or beyond `ops` were
/// never touched).
pub fn verified_pages(spec: &Spec, ops: u64) -> u64 {
    if spec.mode != Mode::Random && ops < spec.npages { ops } else { spec.npages }
}

/// The verify pass's checksum over an image (same as the guest computes).
pub fn checksum(img: &[u64]) -> u64 {
    img.iter().fold(0u64, |c, w| (c ^ w).wrapping_mul(CHECK_MUL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: Mode) -> Spec {
        Spec { mode, base: 0x10_0000, npages: 10, seed: 7, write_pct: 50, magic: 0xabc }
    }

    #[test]
    fn touch_visits_pages_in_order_then_wraps() {
        let mut r = Replay::new(spec(Mode::Touch));
        let pages: Vec<u64> = (0..12).map(|_| r.next_op().page).collect();
        assert_eq!(pages, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
        let mut r = Replay::new(spec(Mode::Touch));
        let op = r.next_op();
        assert_eq!((op.slot, op.value), (Some(1), TOUCH_MUL));
    }

    #[test]
    fn mixed_switches_to_random_after_one_pass() {
        let mut r = Replay::new(spec(Mode::Mixed));
        for p in 0..10 {
            assert_eq!(r.next_op().page, p);
        }
        assert_eq!(r.rng, 7, "the generator is untouched during the pass");
        r.next_op();
        assert_eq!(r.rng, xorshift(7));
    }

    #[test]
    fn image_and_checksum_follow_the_ops() {
        let s = spec(Mode::Touch);
        let img = Replay::image(s, 3);
        assert_eq!(img[0], s.base ^ s.magic);
        assert_eq!(img[1], TOUCH_MUL);
        assert_eq!(img[65], (s.base + 4096) ^ s.magic);
        assert_eq!(img[3 * 65], 0, "page 3 untouched");
        assert_ne!(checksum(&img), checksum(&Replay::image(s, 2)));
        assert_eq!(verified_pages(&s, 3), 3);
        assert_eq!(verified_pages(&s, 30), 10);
        assert_eq!(verified_pages(&spec(Mode::Random), 3), 10);
    }

    #[test]
    fn write_share_matches_the_percentage() {
        let mut s = spec(Mode::Random);
        s.npages = 1000;
        s.write_pct = 30;
        let mut r = Replay::new(s);
        let writes = (0..100_000).filter(|_| r.next_op().slot.is_some()).count();
        assert!((28_000..32_000).contains(&writes), "{writes}");
        s.write_pct = 100;
        let mut r = Replay::new(s);
        assert!((0..1000).all(|_| r.next_op().slot.is_some()));
    }
}
