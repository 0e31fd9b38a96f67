//! The swapper thread: keeps a VM's RAM reservoir above a low-water mark
//! by swapping cold pages out in the background.
//!
//! # Design
//!
//! A [`Swapper`] owns one thread per VM. Every [`SwapperConfig::interval`]
//! (or at once after [`Swapper::kick`]) it looks at the reservoir
//! ([`Vm::ram_stats`]); when its free frames are below the low-water mark
//! (`limit / low_water_divisor` frames, at least
//! [`SwapperConfig::min_low_water`]) it asks the space to swap out enough
//! cold pages to bring them to twice the mark
//! ([`vmspace::VmSpace::swap_out`]: the accessed-bit clock, leaves
//! cleared with invalidation, each page written to the swap file before
//! its frame is freed). It is the kernel's `kswapd` to the fault path's
//! direct reclaim: a fault that finds the reservoir exhausted still
//! reclaims by itself, so the swapper only keeps that rare.
//!
//! The thread is not a vCPU and holds nothing between steps, so it can
//! run beside vCPUs, harvest rounds and migration passes: each swap-out
//! is one administrative change on the space lock, as a harvest is.
//!
//! # Errors and shutdown
//!
//! A failing swap-out (for example the VM's space destroyed under it)
//! stops the thread and is kept: [`Swapper::error`] says so while the
//! owner runs, [`Swapper::stop`] returns it. Swap-file write failures are
//! not errors here (the page stays resident; [`vmspace::SwapStats`]
//! counts them). Dropping a `Swapper` stops and joins its thread.
//!
//! # Known gaps
//!
//! The low-water mark is a fixed fraction: no feedback from the fault
//! path's direct reclaims, no rate limit on swap-file writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Error, Result, Vm};

const PAGE: u64 = 4096;

/// When the swapper runs and how much it frees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapperConfig {
    /// Time between two looks at the reservoir.
    pub interval: Duration,
    /// The low-water mark is the reservoir's frame limit divided by this
    /// (at least 1).
    pub low_water_divisor: u64,
    /// The low-water mark is at least this many frames.
    pub min_low_water: u64,
}

impl Default for SwapperConfig {
    /// Every 5 ms; low water at 1/16 of the reservoir, at least 64
    /// frames (what `vmm run`'s coordinator used to do in its loop).
    fn default() -> Self {
        SwapperConfig { interval: Duration::from_millis(5), low_water_divisor: 16, min_low_water: 64 }
    }
}

impl SwapperConfig {
    /// The low-water mark in frames for a reservoir of `limit_frames`.
    pub fn low_water(&self, limit_frames: u64) -> u64 {
        (limit_frames / self.low_water_divisor.max(1)).max(self.min_low_water)
    }
}

/// What a swapper did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapperStats {
    /// Looks at the reservoir.
    pub steps: u64,
    /// Steps that found it below the low-water mark and swapped out.
    pub swap_calls: u64,
    /// Pages those calls swapped out.
    pub pages_out: u64,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    swap_calls: AtomicU64,
    pages_out: AtomicU64,
}

struct Ctl {
    stop: bool,
    kicked: bool,
    error: Option<Error>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    wake: Condvar,
    counters: Counters,
}

/// A background thread that swaps a VM's cold pages out (see the module
/// doc). Stopped and joined on drop.
pub struct Swapper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Swapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swapper").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// One step: swap out when the reservoir's free frames are below the
/// mark. Returns pages swapped out, or `None` when nothing was needed.
fn step<P: nested_pt::TablePages + Send + Sync + 'static>(vm: &Vm<P>, cfg: &SwapperConfig) -> Result<Option<u64>> {
    let st = vm.ram_stats();
    let low = cfg.low_water(st.limit / PAGE);
    let free = st.free / PAGE;
    if free >= low {
        return Ok(None);
    }
    let want = 2 * low - free;
    vm.space().swap_out(want).map(Some).map_err(Error::Space)
}

impl Swapper {
    /// Starts the swapper thread of `vm`. A VM without swappable memory
    /// gets a thread that never finds anything to swap (its reservoir
    /// holds all of guest memory).
    pub fn spawn<P>(vm: Arc<Vm<P>>, cfg: SwapperConfig) -> Result<Swapper>
    where
        P: nested_pt::TablePages + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl { stop: false, kicked: false, error: None }),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-swapper".into())
            .spawn(move || {
                loop {
                    {
                        let mut g = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
                        if !g.stop && !g.kicked {
                            g = s.wake.wait_timeout(g, cfg.interval).unwrap_or_else(|e| e.into_inner()).0;
                        }
                        if g.stop {
                            return;
                        }
                        g.kicked = false;
                    }
                    s.counters.steps.fetch_add(1, Ordering::Relaxed);
                    match step(&vm, &cfg) {
                        Ok(None) => {}
                        Ok(Some(n)) => {
                            s.counters.swap_calls.fetch_add(1, Ordering::Relaxed);
                            s.counters.pages_out.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            s.ctl.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::Io("spawn swapper thread", e.kind(), e.raw_os_error()))?;
        Ok(Swapper { shared, thread: Some(thread) })
    }

    /// Runs a step now rather than at the next interval.
    pub fn kick(&self) {
        self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner()).kicked = true;
        self.shared.wake.notify_one();
    }

    /// What it did so far.
    pub fn stats(&self) -> SwapperStats {
        let c = &self.shared.counters;
        SwapperStats {
            steps: c.steps.load(Ordering::Relaxed),
            swap_calls: c.swap_calls.load(Ordering::Relaxed),
            pages_out: c.pages_out.load(Ordering::Relaxed),
        }
    }

    /// The error that stopped the thread, if one did.
    pub fn error(&self) -> Option<Error> {
        self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner()).error.clone()
    }

    /// Stops and joins the thread: its counters, or the error that
    /// stopped it earlier.
    pub fn stop(mut self) -> Result<SwapperStats> {
        self.halt();
        match self.error() {
            Some(e) => Err(e),
            None => Ok(self.stats()),
        }
    }

    fn halt(&mut self) {
        self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // The thread catches nothing that could panic but a poisoned
            // lock, handled above; a panic there would be a bug to report.
            if t.join().is_err() {
                self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner()).error =
                    Some(Error::Backend("swapper thread panicked".into()));
            }
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.halt();
    }
}
