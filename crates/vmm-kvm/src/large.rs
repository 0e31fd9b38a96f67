//! Large leaves under a running guest: a vmspace whose RAM is mapped with
//! 2 MiB leaves (dirty tracking off when it is mapped), a guest that
//! writes every page (the touch workload), and between passes, with the
//! vCPU paused, the eager split (tracking switched on), an exact harvest
//! of what the guest wrote after it, and a promotion back to 2 MiB leaves
//! (tracking off); the guest's memory is compared with the host's replay
//! of its writes after every step.
//!
//! The guests' RAM starts at [`RAM_BASE`] (4 GiB, where `vmm run` maps
//! RAM), clear of the boot ROM just below 4 GiB: RAM of any size fits.

use crate::backend::MemBackend;
use crate::guest::{
    self, P_BASE, P_CTRL, P_LEDGER, P_MAGIC, P_MODE, P_NPAGES, P_OPS, P_SEED, P_WRITE_THRESH, USED_WORDS,
};
use crate::machine::{Action, Event, Machine};
use crate::mem::PAGE;
use crate::runtime;
use crate::space::{FaultOptions, Segment, SpaceBackend};
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use crate::workload::{Mode, Replay, Spec};
use nested_pt::{Gpa, PageSize, Prot};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const MAGIC: u64 = 0x7ac4;

/// Guest-physical base of the RAM of this module's guests:
/// `runtime::RAM_BASE` (4 GiB), as `vmm run` maps it, above the boot ROM
/// (`runtime::BOOTROM_BASE`, just below 4 GiB), so that RAM of 4 GiB and
/// more does not run into it.
pub const RAM_BASE: u64 = runtime::RAM_BASE;

/// What [`large_leaf_rounds`] saw.
#[derive(Debug, Clone, Default)]
pub struct LargeReport {
    /// Pages of guest RAM.
    pub pages: u64,
    /// 2 MiB leaves after the first pass (every 2 MiB of RAM: `pages / 512`).
    pub large_after_touch: u64,
    /// Nested faults of the first pass.
    pub first_pass_faults: u64,
    /// 2 MiB leaves right after tracking went on (eager split: 0).
    pub large_after_split: u64,
    /// Pages the first harvest after the split reported (the large leaves'
    /// dirty state carried to their pages).
    pub harvest_after_split: u64,
    /// Pages written by the guest between the two harvest points.
    pub written: u64,
    /// Pages the harvest reported that the guest did not write since the
    /// previous one.
    pub spurious: u64,
    /// Pages the guest wrote that the harvest missed.
    pub missed: u64,
    /// 2 MiB leaves made by the promotion after tracking went off.
    pub promoted: u64,
    /// Pages (of all checks) whose contents differed from the replay.
    pub bad_pages: u64,
    /// `resident_count` differed from the pages the leaves map.
    pub resident_mismatch: bool,
}

fn handler(i: usize, ev: Event) -> Action {
    match ev {
        Event::Port(guest::PORT_PING, _) => Action::Continue,
        Event::Port(guest::PORT_DONE, _) => Action::Stop,
        other => Action::Fatal(format!("vCPU {i}: unexpected {other:?}")),
    }
}

fn wait_ops(m: &Machine, at_least: u64) -> Result<()> {
    wait_ops_of(m, 0, at_least)
}

/// Waits until vCPU `i` has done `at_least` operations.
fn wait_ops_of(m: &Machine, i: usize, at_least: u64) -> Result<()> {
    let t = Instant::now();
    while m.param(i, P_OPS) < at_least {
        if t.elapsed() > Duration::from_secs(300) || m.control.finished() > 0 {
            return Err(KvmError::Guest("touch workload stalled".into()));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn setup(e: impl std::fmt::Display) -> KvmError {
    KvmError::Setup(e.to_string())
}

/// Pages of `spec`'s region (its first `pages`) whose 65 used words
/// differ from the replay of `ops` operations; the RAM object maps
/// [`RAM_BASE`] at offset 0.
fn bad_pages(be: &SpaceBackend, object: &vmspace::VmObject, spec: Spec, ops: u64, pages: u64) -> Result<u64> {
    let img = Replay::image(spec, ops);
    let mut bad = 0;
    let mut buf = vec![0u8; (USED_WORDS * 8) as usize];
    let at = spec.base.checked_sub(RAM_BASE).ok_or_else(|| setup("region below the RAM"))?;
    for p in 0..pages.min(spec.npages) {
        be.read_object(object, at + p * PAGE, &mut buf)?;
        let b = (p * USED_WORDS) as usize;
        let same = buf
            .chunks_exact(8)
            .zip(&img[b..b + USED_WORDS as usize])
            .all(|(w, want)| u64::from_le_bytes(w.try_into().expect("8 bytes")) == *want);
        bad += !same as u64;
    }
    Ok(bad)
}

/// 2 MiB leaves over the first `mem` bytes of RAM.
fn large_leaves(be: &SpaceBackend, mem: u64) -> u64 {
    be.space().with_table(|t| t.leaves(Gpa(RAM_BASE), mem).filter(|l| l.size == PageSize::Size2M).count() as u64)
}

fn mapped_pages(be: &SpaceBackend) -> u64 {
    be.space().with_table(|t| t.leaves(Gpa(0), be.space().size()).map(|l| l.size.pages()).sum())
}

/// A guest with one vCPU per spec (each over its own region of the RAM:
/// `mem` bytes at [`RAM_BASE`]), dirty tracking off: the RAM mapped with
/// 2 MiB leaves (`large`: tracking switched off before the RAM is mapped,
/// so its 2 MiB ranges are populated for 2 MiB leaves) or with 4 KiB
/// leaves, which stay (mapped while tracking is on, then switched off).
/// Returns the backend, the RAM segment and the machine.
fn guest(mem: u64, mode: PagingMode, large: bool, specs: &[Spec]) -> Result<(Arc<SpaceBackend>, Segment, Machine)> {
    if specs.is_empty() || specs.len() > runtime::MAX_VCPUS {
        return Err(setup(format!("vCPU count must be 1..={}", runtime::MAX_VCPUS)));
    }
    let region = |s: &Spec| s.npages.checked_mul(PAGE).and_then(|b| s.base.checked_add(b));
    if specs.iter().any(|s| s.base < RAM_BASE || region(s).is_none_or(|e| e > RAM_BASE + mem)) {
        return Err(setup("every vCPU's region must lie inside the RAM"));
    }
    let per = specs.iter().map(|s| s.npages).max().unwrap_or(0);
    let vm = Arc::new(KvmVm::new()?);
    let opts = FaultOptions { fault_around: 16, preset_accessed: false, preset_dirty_untracked: false };
    let be = Arc::new(SpaceBackend::create_with(vm.clone(), mem + (4 << 20), mem / 256 + (4 << 20), mode, opts, None)?);
    let ram = be.ram_segment(mem)?;
    if large {
        be.space().set_dirty_tracking(false).map_err(setup)?;
        be.map(&ram, RAM_BASE, mem, Prot::READ | Prot::WRITE)?;
    } else {
        be.map(&ram, RAM_BASE, mem, Prot::READ | Prot::WRITE)?;
        be.space().set_dirty_tracking(false).map_err(setup)?;
    }
    be.map_runtime(specs.len(), per)?;
    let m = crate::machine::create(&vm, be.clone(), mode, specs.len())?;
    for (i, s) in specs.iter().enumerate() {
        m.set_param(i, P_MODE, s.mode as u64)?;
        m.set_param(i, P_BASE, s.base)?;
        m.set_param(i, P_NPAGES, s.npages)?;
        m.set_param(i, P_MAGIC, s.magic)?;
        m.set_param(i, P_SEED, s.seed)?;
        m.set_param(i, P_WRITE_THRESH, s.write_thresh())?;
        m.set_param(i, P_LEDGER, runtime::ledger(i, per))?;
    }
    Ok((be, ram, m))
}

/// The touch workload over `mem` bytes of RAM on one vCPU (one pass
/// writing every page, then the next).
fn touch_spec(mem: u64) -> Spec {
    Spec { mode: Mode::Touch, base: RAM_BASE, npages: mem / PAGE, seed: 1, write_pct: 0, magic: MAGIC }
}

/// The touch workload over `mem` bytes of RAM on `nvcpus` vCPUs, each
/// over its own share (`mem / nvcpus`, whole pages).
fn touch_specs(mem: u64, nvcpus: usize) -> Vec<Spec> {
    let per = mem / PAGE / nvcpus.max(1) as u64;
    (0..nvcpus).map(|i| Spec::for_vcpu(i, Mode::Touch, RAM_BASE, per, 1, 0)).collect()
}

/// What [`touch_start`] saw.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// Pages the guest had written when it was paused (at least the
    /// pages asked for).
    pub written: u64,
    /// Of the pages asked for, those whose contents differ from the
    /// replay of the guest's writes.
    pub bad_pages: u64,
    /// 2 MiB leaves over the RAM after those writes.
    pub large_leaves: u64,
}

/// A one-vCPU guest over `mem` bytes of RAM (at [`RAM_BASE`], mapped with
/// 2 MiB leaves, tracking off) writes its first `pages` pages (the touch
/// workload) and stops: a check that RAM of that size can be set up and
/// runs (it allocates only the memory the writes reach).
pub fn touch_start(mem: u64, mode: PagingMode, pages: u64) -> Result<StartReport> {
    let spec = touch_spec(mem);
    let pages = pages.min(spec.npages);
    let (be, ram, mut m) = guest(mem, mode, true, &[spec])?;
    m.run(handler, |m| -> Result<StartReport> {
        wait_ops(m, pages)?;
        m.pause_all(Duration::from_secs(10))?;
        let ops = m.param(0, P_OPS);
        let r = StartReport {
            written: ops.min(spec.npages),
            bad_pages: bad_pages(&be, &ram.object, spec, ops, pages)?,
            large_leaves: large_leaves(&be, mem),
        };
        m.resume_all()?;
        m.set_param(0, P_CTRL, 2)?;
        m.control.wait_all_paused(1, Duration::from_secs(30))?;
        Ok(r)
    })
}

/// The rounds of the module doc over `mem` bytes (a multiple of 2 MiB)
/// on one vCPU.
pub fn large_leaf_rounds(mem: u64, mode: PagingMode) -> Result<LargeReport> {
    let n = mem / PAGE;
    let spec = touch_spec(mem);
    let (be, ram, mut m) = guest(mem, mode, true, &[spec])?;
    let object = ram.object.clone();
    let mut r = LargeReport { pages: n, ..LargeReport::default() };
    let bitmap_words = n.div_ceil(64) as usize;
    m.run(handler, |m| -> Result<LargeReport> {
        let st = &m.stats[0];
        let check = |r: &mut LargeReport, ops: u64| -> Result<()> {
            r.bad_pages += bad_pages(&be, &object, spec, ops, n)?;
            r.resident_mismatch |= mapped_pages(&be) != be.space().resident_count();
            Ok(())
        };
        // 1. First pass with 2 MiB leaves.
        let f0 = st.faults.load(Ordering::Relaxed);
        wait_ops(m, n)?;
        m.pause_all(Duration::from_secs(10))?;
        r.first_pass_faults = st.faults.load(Ordering::Relaxed) - f0;
        r.large_after_touch = large_leaves(&be, mem);
        let ops1 = m.param(0, P_OPS);
        check(&mut r, ops1)?;
        // 2. Tracking on: the eager split; a harvest clears what the
        // large leaves carried.
        be.space().set_dirty_tracking(true).map_err(setup)?;
        r.large_after_split = large_leaves(&be, mem);
        let mut bm = vec![0u64; bitmap_words];
        r.harvest_after_split = be.harvest(RAM_BASE, mem, &mut bm).map_err(setup)?;
        check(&mut r, ops1)?;
        // 3. Half a pass more, then a harvest: exactly the pages written.
        let ops1 = m.param(0, P_OPS);
        m.resume_all()?;
        wait_ops(m, ops1 + n / 2)?;
        m.pause_all(Duration::from_secs(10))?;
        let ops2 = m.param(0, P_OPS);
        be.harvest(RAM_BASE, mem, &mut bm).map_err(setup)?;
        let mut want = vec![0u64; bitmap_words];
        for i in ops1..ops2.min(ops1 + n) {
            let p = i % n;
            want[(p / 64) as usize] |= 1 << (p % 64);
        }
        r.written = want.iter().map(|w| w.count_ones() as u64).sum();
        r.spurious = bm.iter().zip(&want).map(|(g, w)| (g & !w).count_ones() as u64).sum();
        r.missed = bm.iter().zip(&want).map(|(g, w)| (w & !g).count_ones() as u64).sum();
        check(&mut r, ops2)?;
        // 4. Tracking off, promotion back to 2 MiB leaves, another pass.
        be.space().set_dirty_tracking(false).map_err(setup)?;
        r.promoted = be.space().promote(Gpa(RAM_BASE), mem).map_err(setup)?;
        check(&mut r, ops2)?;
        m.resume_all()?;
        wait_ops(m, ops2 + n)?;
        m.pause_all(Duration::from_secs(10))?;
        let ops3 = m.param(0, P_OPS);
        check(&mut r, ops3)?;
        m.resume_all()?;
        m.set_param(0, P_CTRL, 2)?;
        m.control.wait_all_paused(1, Duration::from_secs(30))?;
        Ok(r.clone())
    })
}

/// What switching dirty tracking on costs with one split policy
/// ([`split_cost`]).
#[derive(Debug, Clone)]
pub struct SplitCost {
    /// `set_dirty_tracking(true)` over the RAM mapped with 2 MiB leaves.
    pub switch_on: Duration,
    /// The guest's next pass writing every page once (from resume until
    /// its operation count shows the pass done).
    pub write_all: Duration,
    /// Nested faults during that pass.
    pub faults: u64,
}

/// Where a write-all's time went ([`split_profile`]): our counters and
/// KVM's, summed over the vCPUs, as differences over the pass.
#[derive(Debug, Clone, Default)]
pub struct WriteAllDetail {
    /// vCPUs writing (each its own share of the RAM).
    pub vcpus: usize,
    /// Pages written (every page of the shares once).
    pub pages: u64,
    /// Exits to our code (all kinds).
    pub exits: u64,
    /// Nanoseconds inside `KVM_RUN` (summed over vCPUs).
    pub run_ns: u64,
    /// Nanoseconds in our fault path.
    pub fault_host_ns: u64,
    /// Full shadow zaps the switch-on made (shadow hosts).
    pub switch_on_zaps: u64,
    /// Nanoseconds of the switch-on spent in those zaps (the rest of it
    /// is the split or the write-protect).
    pub switch_on_zap_ns: u64,
    /// Full shadow zaps during the pass.
    pub zaps: u64,
    /// Nanoseconds spent in those zaps.
    pub zap_ns: u64,
    /// KVM's vCPU counters that changed during the pass (summed over
    /// vCPUs; empty where KVM offers no statistics).
    pub kvm_vcpu: Vec<(String, u64)>,
    /// KVM's VM counters that changed during the pass.
    pub kvm_vm: Vec<(String, u64)>,
}

impl WriteAllDetail {
    /// KVM's vCPU counter `name` over the pass (0 when it did not change
    /// or is not offered).
    pub fn kvm(&self, name: &str) -> u64 {
        self.kvm_vcpu.iter().chain(&self.kvm_vm).find(|c| c.0 == name).map_or(0, |c| c.1)
    }
}

/// The values of every counter of `files`, summed by name.
fn counter_sums(files: &[crate::bench::VcpuCounters]) -> std::collections::BTreeMap<String, u64> {
    let mut sums = std::collections::BTreeMap::new();
    for f in files {
        for name in f.names() {
            *sums.entry(name.to_string()).or_insert(0) += f.get(name).unwrap_or(0);
        }
    }
    sums
}

/// The counters that grew from `before` to `after`, and by how much.
fn grown(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    after.iter().filter_map(|(k, v)| Some((k.clone(), v.checked_sub(*before.get(k)?).filter(|d| *d > 0)?))).collect()
}

/// One vCPU touches `mem` bytes (mapped with 2 MiB leaves, tracking
/// off), then tracking is switched on with `policy` and the guest writes
/// all its memory once more: the cost of each (the eager split against
/// the lazy one, split on the first write to each 2 MiB).
pub fn split_cost(mem: u64, mode: PagingMode, policy: vmspace::SplitPolicy) -> Result<SplitCost> {
    split_profile(mem, mode, policy, 1).map(|(c, _)| c)
}

/// As [`split_cost`] with `nvcpus` vCPUs, each touching and then writing
/// its own share of the RAM (`mem / nvcpus`); the write-all lasts until
/// every vCPU has written its share once more. Also returns where the
/// write-all's time went. The KVM counters are read from this process's
/// KVM files: they are exact when no other VM of this process runs
/// meanwhile.
pub fn split_profile(
    mem: u64,
    mode: PagingMode,
    policy: vmspace::SplitPolicy,
    nvcpus: usize,
) -> Result<(SplitCost, WriteAllDetail)> {
    let specs = touch_specs(mem, nvcpus);
    let (be, _ram, mut m) = guest(mem, mode, true, &specs)?;
    let per = specs[0].npages;
    be.space().set_split_policy(policy);
    let vcpu_files: Vec<_> =
        crate::bench::VcpuCounters::find_all("anon_inode:kvm-vcpu").into_iter().flatten().collect();
    let vm_files: Vec<_> = crate::bench::VcpuCounters::find_all("anon_inode:kvm-vm").into_iter().flatten().collect();
    m.run(handler, |m| -> Result<(SplitCost, WriteAllDetail)> {
        let wait_all = |m: &Machine, at_least: &[u64]| -> Result<()> {
            for (i, &n) in at_least.iter().enumerate() {
                wait_ops_of(m, i, n)?;
            }
            Ok(())
        };
        wait_all(m, &vec![per; nvcpus])?;
        m.pause_all(Duration::from_secs(10))?;
        let ops: Vec<u64> = (0..nvcpus).map(|i| m.param(i, P_OPS)).collect();
        let zaps = || (be.inval_stats().zaps.load(Ordering::Relaxed), be.vm().zap_time().as_nanos() as u64);
        let z0 = zaps();
        let t = Instant::now();
        be.space().set_dirty_tracking(true).map_err(setup)?;
        let switch_on = t.elapsed();
        let z1 = zaps();
        let total = |f: fn(&crate::machine::VcpuStats) -> &std::sync::atomic::AtomicU64| m.total(f);
        let (f0, e0, r0, h0) =
            (total(|s| &s.faults), total(|s| &s.exits), total(|s| &s.run_ns), total(|s| &s.fault_host_ns));
        let (kv0, km0) = (counter_sums(&vcpu_files), counter_sums(&vm_files));
        let t = Instant::now();
        m.resume_all()?;
        let target: Vec<u64> = ops.iter().map(|o| o + per).collect();
        wait_all(m, &target)?;
        let write_all = t.elapsed();
        m.pause_all(Duration::from_secs(10))?;
        let (kv1, km1) = (counter_sums(&vcpu_files), counter_sums(&vm_files));
        let detail = WriteAllDetail {
            vcpus: nvcpus,
            pages: per * nvcpus as u64,
            exits: total(|s| &s.exits) - e0,
            run_ns: total(|s| &s.run_ns) - r0,
            fault_host_ns: total(|s| &s.fault_host_ns) - h0,
            switch_on_zaps: z1.0 - z0.0,
            switch_on_zap_ns: z1.1 - z0.1,
            zaps: zaps().0 - z1.0,
            zap_ns: zaps().1 - z1.1,
            kvm_vcpu: grown(&kv0, &kv1),
            kvm_vm: grown(&km0, &km1),
        };
        let faults = total(|s| &s.faults) - f0;
        m.resume_all()?;
        for i in 0..nvcpus {
            m.set_param(i, P_CTRL, 2)?;
        }
        m.control.wait_all_paused(nvcpus, Duration::from_secs(30))?;
        Ok((SplitCost { switch_on, write_all, faults }, detail))
    })
}

/// The guest's random-access rate over `mem` bytes (one vCPU, the
/// `Mixed` workload: a sequential pass, then random reads and writes, half
/// of them writes), mapped with 2 MiB leaves (`large`) or 4 KiB leaves,
/// dirty tracking off: operations per second over `measure` after the
/// sequential pass, and the nested faults in that time.
pub fn random_rate(mem: u64, mode: PagingMode, large: bool, measure: Duration) -> Result<(f64, u64)> {
    let n = mem / PAGE;
    let spec = Spec { mode: Mode::Mixed, base: RAM_BASE, npages: n, seed: 0x1234_5678, write_pct: 50, magic: MAGIC };
    let (_be, _ram, mut m) = guest(mem, mode, large, &[spec])?;
    m.run(handler, |m| -> Result<(f64, u64)> {
        let st = &m.stats[0];
        wait_ops(m, n)?;
        let (o0, f0, t) = (m.param(0, P_OPS), st.faults.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(measure);
        let (o1, f1, d) = (m.param(0, P_OPS), st.faults.load(Ordering::Relaxed), t.elapsed());
        m.set_param(0, P_CTRL, 2)?;
        m.control.wait_all_paused(1, Duration::from_secs(30))?;
        Ok(((o1 - o0) as f64 / d.as_secs_f64(), f1 - f0))
    })
}
