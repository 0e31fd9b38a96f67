//! Unmap and remap while vCPUs run: the guest itself checks that no stale
//! translation survives the call.
//!
//! Every vCPU runs the watch workload: it reads the epoch the host
//! publishes, then the first word of the watched page, and reports a
//! violation if the word is below the epoch. Each object mapped at the
//! watched address holds its own marker (1, 2, 3, ...). The host changes the
//! mapping *while the vCPUs are reading it* and only then publishes the new
//! epoch:
//!
//! - remap: unmap object `k`, map object `k + 1`, publish epoch `k + 1`. A
//!   vCPU that reads epoch `k + 1` and then marker `k` used a translation the
//!   unmap should have removed;
//! - unmap: unmap, publish epoch `u64::MAX`; any read that still succeeds is
//!   stale (reads of the unmapped page fault; the host skips them).

use crate::guest::{self, P_CTRL, P_EPOCH, P_MODE, P_WATCH_ADDR, P_WATCH_FAULTS, P_WATCH_READS};
use crate::machine::{Action, Event};
use crate::mem::PAGE;
use crate::space::SpaceBackend;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use crate::workload::Mode;
use nested_pt::Prot;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Address watched (inside the RAM range, 2 MiB).
pub const WATCHED: u64 = 0x20_0000;

/// What a watch run observed.
#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    /// Mapping changes made while the vCPUs ran.
    pub changes: u64,
    /// Stale reads the guests reported: must be zero.
    pub violations: u64,
    /// Reads per vCPU.
    pub reads: Vec<u64>,
    /// Faulting reads skipped per vCPU (unmapped page).
    pub faults: Vec<u64>,
    /// Kicks sent by the vmspace to vCPUs in guest context.
    pub kicks: u64,
    /// Time of each change (unmap, or unmap + map), as the caller saw it.
    pub change_times: Vec<Duration>,
    /// Frames dropped and zaps done by the invalidations.
    pub frames_dropped: u64,
    /// Zaps.
    pub zaps: u64,
}

/// Runs `nvcpus` watchers while the host makes `changes` remaps (or one
/// unmap when `unmap_only`), `gap` apart.
pub fn run_watch(
    nvcpus: usize,
    changes: u64,
    unmap_only: bool,
    gap: Duration,
    mode: PagingMode,
) -> Result<WatchReport> {
    let vm = Arc::new(KvmVm::new()?);
    let be = Arc::new(SpaceBackend::new(vm.clone(), 16 << 20, 4 << 20, mode)?);
    be.map_runtime(nvcpus, 1)?;
    let objs = (1..=changes + 1)
        .map(|k| {
            let o = be.ram_segment(PAGE)?;
            be.write_object(&o.object, 0, &k.to_le_bytes())?;
            Ok(o)
        })
        .collect::<Result<Vec<_>>>()?;
    be.map(&objs[0], WATCHED, PAGE, Prot::READ | Prot::WRITE)?;
    let mut m = crate::machine::create(&vm, be.clone(), mode, nvcpus)?;
    for i in 0..nvcpus {
        m.set_param(i, P_MODE, Mode::Watch as u64)?;
        m.set_param(i, P_WATCH_ADDR, WATCHED)?;
        m.set_param(i, P_EPOCH, 1)?;
    }
    let violations = AtomicU64::new(0);
    let resume = m.code_addr(m.code.watch_fault);
    let mut times = Vec::new();
    m.run(
        |i, ev| match ev {
            Event::Unserved(f, _) if f.gpa & !(PAGE - 1) == WATCHED => Action::Skip(resume),
            Event::Unserved(f, e) => Action::Fatal(format!("vCPU {i}: fault at {:#x}: {e:?}", f.gpa)),
            Event::Port(guest::PORT_WATCH_VIOLATION, r) => {
                violations.fetch_add(1, Ordering::Relaxed);
                eprintln!("vCPU {i}: stale read {:#x} after epoch {:#x}", r[0], r[1]);
                Action::Continue
            }
            Event::Port(guest::PORT_DONE, _) => Action::Stop,
            other => Action::Fatal(format!("vCPU {i}: unexpected {other:?}")),
        },
        |m| {
            // Let every vCPU read the first object for a while.
            let t = Instant::now();
            while (0..nvcpus).any(|i| m.param(i, P_WATCH_READS) < 1000) {
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(KvmError::Guest("watchers did not start".into()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let n = if unmap_only { 1 } else { changes };
            for k in 0..n as usize {
                let t = Instant::now();
                be.unmap(WATCHED, PAGE)?;
                let epoch = if unmap_only {
                    u64::MAX
                } else {
                    be.map(&objs[k + 1], WATCHED, PAGE, Prot::READ | Prot::WRITE)?;
                    k as u64 + 2
                };
                times.push(t.elapsed());
                for i in 0..nvcpus {
                    m.set_param(i, P_EPOCH, epoch)?;
                }
                std::thread::sleep(gap);
            }
            for i in 0..nvcpus {
                m.set_param(i, P_CTRL, 2)?;
            }
            m.control.wait_all_paused(nvcpus, Duration::from_secs(30))?;
            Ok(())
        },
    )?;
    let st = be.inval_stats();
    Ok(WatchReport {
        changes: times.len() as u64,
        violations: violations.load(Ordering::Relaxed),
        reads: (0..nvcpus).map(|i| m.param(i, P_WATCH_READS)).collect(),
        faults: (0..nvcpus).map(|i| m.param(i, P_WATCH_FAULTS)).collect(),
        kicks: m.kicks(),
        change_times: times,
        frames_dropped: st.frames_dropped.load(Ordering::Relaxed),
        zaps: vm.zap_count(),
    })
}
