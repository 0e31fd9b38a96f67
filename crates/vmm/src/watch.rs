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
use crate::host::{Host, HostMemory, MemorySpec, PagingMode};
use crate::hv::{MachineError, Result};
use crate::machine::{Action, Event};
use crate::workload::Mode;
use nested_pt::Prot;
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

const PAGE: u64 = 4096;

/// Runs `nvcpus` watchers on `host` while the host side makes `changes`
/// remaps (or one unmap when `unmap_only`), `gap` apart.
pub fn run_watch<H: Host>(
    host: &mut H,
    nvcpus: usize,
    changes: u64,
    unmap_only: bool,
    gap: Duration,
    mode: PagingMode,
) -> Result<WatchReport> {
    let mode = host.paging_mode(Some(mode))?;
    let be = host.create_memory(&MemorySpec {
        reservoir_bytes: 16 << 20,
        table_bytes: 4 << 20,
        fault_around: 16,
        name: None,
        mode,
        zap_threshold: crate::host::DEFAULT_ZAP_THRESHOLD,
    })?;
    let vm = be.vm();
    crate::host::install_runtime(vm, nvcpus, 1)?;
    let objs = (1..=changes + 1)
        .map(|k| {
            let id = vm.free_segment_id().ok_or_else(|| setup("no free segment id"))?;
            vm.alloc_segment(id, PAGE, crate::SegmentKind::SysMem).map_err(|e| setup(e.to_string()))?;
            vm.write_segment(id, 0, &k.to_le_bytes()).map_err(|e| setup(e.to_string()))?;
            Ok(id)
        })
        .collect::<Result<Vec<_>>>()?;
    let map = |id: u32| {
        vm.map_segment(WATCHED, id, 0, PAGE, Some(Prot::READ | Prot::WRITE)).map_err(|e| setup(e.to_string()))
    };
    map(objs[0])?;
    let mut m = crate::host::machine(host, &be, mode, nvcpus)?;
    for i in 0..nvcpus {
        m.set_param(i, P_MODE, Mode::Watch as u64)?;
        m.set_param(i, P_WATCH_ADDR, WATCHED)?;
        m.set_param(i, P_EPOCH, 1)?;
    }
    let violations = AtomicU64::new(0);
    let resume = m.code_addr(m.code.watch_fault);
    let mut times = Vec::new();
    m.run::<_, _, _, MachineError>(
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
                    return Err(MachineError::Guest("watchers did not start".into()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let n = if unmap_only { 1 } else { changes };
            for k in 0..n as usize {
                let t = Instant::now();
                vm.unmap(WATCHED, PAGE).map_err(|e| setup(e.to_string()))?;
                let epoch = if unmap_only {
                    u64::MAX
                } else {
                    map(objs[k + 1])?;
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
    let st = be.invalidation_stats();
    Ok(WatchReport {
        changes: times.len() as u64,
        violations: violations.load(Ordering::Relaxed),
        reads: (0..nvcpus).map(|i| m.param(i, P_WATCH_READS)).collect(),
        faults: (0..nvcpus).map(|i| m.param(i, P_WATCH_FAULTS)).collect(),
        kicks: m.kicks(),
        change_times: times,
        frames_dropped: st.frames_dropped,
        zaps: st.zaps,
    })
}

fn setup(msg: impl Into<String>) -> MachineError {
    MachineError::Setup(msg.into())
}
