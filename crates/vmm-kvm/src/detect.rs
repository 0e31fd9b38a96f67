//! Start-up detection of how KVM translates our tables on this host.
//!
//! A one-vCPU probe reads a page, the host then points the page's leaf at a
//! different frame *without telling anyone*, and the vCPU reads again:
//!
//! - it still sees the old frame: something caches the translation. The
//!   vCPU is made to reload CR3 (the flush vector) and reads again. If that
//!   shows the new frame, the cache was the vCPU's own TLB: **hardware
//!   nested paging**. If not, KVM shadows our tables: **shadow paging**.
//! - it sees the new frame at once: nothing caches it visibly; the CR3
//!   reload protocol is used (it is correct on any hardware-nested host).
//!
//! On a shadow host the probe goes on to check the two invalidations the
//! runner relies on, and times them: dropping the old frame's KVM view
//! (`MADV_DONTNEED`) must make the new leaf visible, and a slot zap must make
//! a second leaf change visible.

use crate::backend::TableBackend;
use crate::guest::{self, P_MODE, P_PROBE_COUNT, P_PROBES};
use crate::machine::{Action, Event, read_guest_u64, write_guest_u64};
use crate::mem::PAGE;
use crate::runtime;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use crate::workload::Mode;
use nested_pt::{Gpa, MemType, PageSize, Prot};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the start-up probe found.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The mode the runner will use.
    pub mode: PagingMode,
    /// The vCPU kept seeing the old frame after an unannounced leaf change.
    pub stale_after_change: bool,
    /// A CR3 reload in the guest made the change visible.
    pub cr3_reload_fixed: bool,
    /// Shadow hosts: dropping the old frame's KVM view made it visible.
    pub frame_drop_fixed: Option<bool>,
    /// Shadow hosts: a slot zap made a second change visible.
    pub zap_fixed: Option<bool>,
    /// Time of one frame drop.
    pub frame_drop_time: Option<Duration>,
    /// Time of one slot zap.
    pub zap_time: Option<Duration>,
    /// The host's KVM module (sysfs).
    pub module: String,
    /// KVM offers 1 GiB pages to guests.
    pub page_1g: bool,
    /// Guest MAXPHYADDR KVM reports.
    pub phys_bits: u8,
}

const X: u64 = 0x10_0000;
const OLD: u64 = 0x0123_4567_89ab_cdef;
const NEW: u64 = 0x0fed_cba9_8765_4321;

/// Runs the probe on a fresh one-vCPU VM.
pub fn detect() -> Result<Detection> {
    let vm = Arc::new(KvmVm::new()?);
    let module = vm.facts().module.clone();
    let (page_1g, phys_bits) = (vm.facts().page_1g, vm.facts().phys_bits);
    // The backend's own invalidation is not used: the probe drives it.
    let mut be = TableBackend::new(vm.clone(), 4 << 20, 8 << 20, PagingMode::Shadow)?;
    be.map_runtime(&runtime::rom_image(&guest::code(), 1), 1, 1)?;
    let fa = be.alloc_ram(PAGE, PAGE)?;
    let fb = be.alloc_ram(PAGE, PAGE)?;
    be.ram().write_u64(fa, OLD)?;
    be.ram().write_u64(fb, NEW)?;
    be.map_range(X, fa, PAGE, PageSize::Size4K, Prot::READ | Prot::WRITE)?;
    let be = Arc::new(be);
    let mut m = crate::machine::create(&vm, be.clone(), PagingMode::HardwareNested, 1)?;
    let nprobes = 5u64;
    m.set_param(0, P_MODE, Mode::Probe as u64)?;
    m.set_param(0, P_PROBE_COUNT, nprobes)?;
    for k in 0..nprobes {
        let e = runtime::params(0) + P_PROBES + 32 * k;
        write_guest_u64(&*be, e, X).expect("params");
        write_guest_u64(&*be, e + 8, 0).expect("params");
    }
    let seen = Mutex::new(Vec::new());
    let times = Mutex::new((None, None));
    let remap = |to: u64| -> std::result::Result<(), String> {
        be.table().unmap(Gpa(X)).map_err(|e| e.to_string())?;
        be.table()
            .map(Gpa(X), be.ram_pfn(to), PageSize::Size4K, Prot::READ | Prot::WRITE, MemType::WriteBack)
            .map_err(|e| e.to_string())
    };
    m.run(
        |_, ev| match ev {
            Event::Port(guest::PORT_PROBE_STEP, _) => {
                let mut s = seen.lock().expect("seen");
                let k = s.len() as u64;
                let v = read_guest_u64(&*be, runtime::params(0) + P_PROBES + 32 * k + 24).unwrap_or(0);
                s.push(v);
                let r = match k {
                    0 => remap(fb),
                    1 => {
                        be.bump_generation();
                        Ok(())
                    }
                    2 => {
                        let t = Instant::now();
                        let r = be.ram().drop_kvm_view(fa, PAGE).map_err(|e| e.to_string());
                        times.lock().expect("times").0 = Some(t.elapsed());
                        r
                    }
                    3 => remap(fa).and_then(|()| {
                        let t = Instant::now();
                        let r = vm.zap_all().map(|_| ()).map_err(|e| e.to_string());
                        times.lock().expect("times").1 = Some(t.elapsed());
                        r
                    }),
                    _ => Ok(()),
                };
                match r {
                    Ok(()) => Action::Continue,
                    Err(e) => Action::Fatal(format!("detection probe: {e}")),
                }
            }
            Event::Port(guest::PORT_DONE, _) => Action::Stop,
            other => Action::Fatal(format!("detection probe: unexpected {other:?}")),
        },
        |_| Ok::<(), KvmError>(()),
    )?;
    let s = seen.into_inner().expect("seen");
    if s.len() != nprobes as usize || s[0] != OLD {
        return Err(KvmError::Guest(format!("detection probe read {s:x?}")));
    }
    let stale = s[1] == OLD;
    let cr3_fixed = stale && s[2] == NEW;
    let (drop_t, zap_t) = times.into_inner().expect("times");
    let mode = if stale && !cr3_fixed { PagingMode::Shadow } else { PagingMode::HardwareNested };
    let shadow = mode == PagingMode::Shadow;
    Ok(Detection {
        mode,
        stale_after_change: stale,
        cr3_reload_fixed: cr3_fixed,
        frame_drop_fixed: shadow.then_some(s[3] == NEW),
        zap_fixed: shadow.then_some(s[4] == OLD),
        frame_drop_time: shadow.then_some(drop_t).flatten(),
        zap_time: shadow.then_some(zap_t).flatten(),
        module,
        page_1g,
        phys_bits,
    })
}
