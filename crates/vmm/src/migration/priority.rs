//! The scheduling priority of the thread that streams a migration.
//!
//! A migration competes for the host's cores with the guest's own vCPU
//! threads, which on an overcommitted host (here: two busy vCPUs and the
//! two migration threads on two cores) take about half the time the
//! stream needs, and a stream that is slowed down converges later or not
//! at all. A VMM may therefore let the source's sender and the target's
//! receiver raise their own thread's priority (a lower nice value; Linux's
//! nice is per thread) for the length of the transfer, and put it back
//! after, so that the vCPUs get what the stream leaves: a throttle that
//! costs the guest only the CPU time the stream actually uses.
//!
//! It is a policy, off by default (as in QEMU and cloud-hypervisor, whose
//! migration threads run at the vCPUs' priority): [`set_stream_boost`]
//! sets it for the process, and [`migrate_tcp`](super::migrate_tcp) and
//! [`receive_tcp`](super::receive_tcp) apply it (`vmm run
//! --migration-boost N`; `vmm bench migrate` runs with
//! [`BENCH_STREAM_BOOST`] unless told otherwise). Raising a priority needs
//! `CAP_SYS_NICE` (or an `RLIMIT_NICE` that allows it): without it the
//! transfer runs at its normal priority, never an error.
//!
//! A benchmark that runs both ends on one host may also pin the two
//! threads to different cores for the transfer ([`set_stream_cpus`]), as
//! two hosts would have them: otherwise the scheduler, which moves a
//! thread woken over loopback next to its waker, often runs sender and
//! receiver on one core while the vCPUs have the other.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// The boost `vmm bench migrate` uses by default (nice steps; the Linux
/// scheduler gives a thread about 1.25 times the share of one a step
/// lower, so 10 steps about 9 times a vCPU thread's share: the stream
/// takes nearly a whole core where it needs one and leaves the rest to
/// the vCPUs).
pub const BENCH_STREAM_BOOST: i32 = 10;

/// The process-wide boost of the migration threads (nice steps; 0: none).
static STREAM_BOOST: AtomicI32 = AtomicI32::new(0);

/// Sets how many nice steps the migration threads of this process raise
/// their priority by while they stream (0, the default: not at all;
/// clamped to 0..=39).
pub fn set_stream_boost(steps: i32) {
    STREAM_BOOST.store(steps.clamp(0, 39), Ordering::Relaxed);
}

/// The boost [`set_stream_boost`] set.
pub fn stream_boost() -> i32 {
    STREAM_BOOST.load(Ordering::Relaxed)
}

/// The host CPUs the source's and the target's migration threads are
/// pinned to while they stream, plus one (0: not pinned).
static STREAM_CPUS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Pins, process-wide, the source's migration thread to `source` and the
/// target's to `target` for the length of each transfer (`None`: not
/// pinned, the default).
pub fn set_stream_cpus(source: Option<usize>, target: Option<usize>) {
    STREAM_CPUS[0].store(source.map_or(0, |c| c.saturating_add(1)), Ordering::Relaxed);
    STREAM_CPUS[1].store(target.map_or(0, |c| c.saturating_add(1)), Ordering::Relaxed);
}

/// The CPUs [`set_stream_cpus`] set: (source, target).
pub fn stream_cpus() -> (Option<usize>, Option<usize>) {
    let get = |i: usize| STREAM_CPUS[i].load(Ordering::Relaxed).checked_sub(1);
    (get(0), get(1))
}

/// Which end of a migration a thread streams for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The sender.
    Source,
    /// The receiver.
    Target,
}

/// The process-wide stream policy ([`set_stream_boost`],
/// [`set_stream_cpus`]) applied to the calling thread until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    _priority: PriorityGuard,
    _affinity: Option<AffinityGuard>,
}

impl StreamGuard {
    /// Applies the policy for `side` to the calling thread.
    pub fn enter(side: Side) -> StreamGuard {
        let (src, tgt) = stream_cpus();
        let cpu = if side == Side::Source { src } else { tgt };
        StreamGuard { _priority: PriorityGuard::boost(stream_boost()), _affinity: cpu.map(AffinityGuard::pin) }
    }
}

/// Restores the calling thread's CPU affinity when dropped.
pub struct AffinityGuard {
    /// The mask before the pin, when the pin took effect.
    old: Option<libc::cpu_set_t>,
    /// Not `Send`: the guard restores the mask of the thread it runs on,
    /// so it must be dropped on the thread that made it.
    _here: std::marker::PhantomData<*const ()>,
}

impl std::fmt::Debug for AffinityGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityGuard").field("pinned", &self.old.is_some()).finish()
    }
}

impl AffinityGuard {
    /// Pins the calling thread to host CPU `cpu` (best effort: a CPU
    /// outside the thread's mask or the set's size leaves it as it was).
    pub fn pin(cpu: usize) -> AffinityGuard {
        let none = AffinityGuard { old: None, _here: std::marker::PhantomData };
        if cpu >= libc::CPU_SETSIZE as usize {
            return none;
        }
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the call writes at most
        // `size` bytes into `old`, which has them.
        if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
            return none;
        }
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET writes inside the set (cpu < CPU_SETSIZE, checked
        // above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: pid 0 is the calling thread; the set is valid for `size`
        // bytes; a refusal (EINVAL for a CPU it may not use) changes
        // nothing.
        let ok = unsafe { libc::sched_setaffinity(0, size, &set) } == 0;
        AffinityGuard { old: ok.then_some(old), _here: std::marker::PhantomData }
    }

    /// Whether the pin took effect.
    pub fn pinned(&self) -> bool {
        self.old.is_some()
    }
}

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: pid 0 is the calling thread, the one that made the
            // guard (it is not `Send`); `old` is the valid mask read
            // before the pin.
            let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// Restores the calling thread's nice value when dropped.
#[derive(Debug)]
pub struct PriorityGuard {
    /// The nice value before the boost, when the boost took effect.
    old: Option<i32>,
}

impl PriorityGuard {
    /// Raises the calling thread's priority by `boost` nice steps (best
    /// effort: see the module doc); dropping the guard restores it.
    pub fn boost(boost: i32) -> PriorityGuard {
        if boost <= 0 {
            return PriorityGuard { old: None };
        }
        let Some(old) = nice() else {
            return PriorityGuard { old: None };
        };
        let want = old.saturating_sub(boost).max(-20);
        if want != old && set_nice(want) { PriorityGuard { old: Some(old) } } else { PriorityGuard { old: None } }
    }

    /// Whether the boost took effect.
    pub fn boosted(&self) -> bool {
        self.old.is_some()
    }
}

impl Drop for PriorityGuard {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            // Lowering one's own priority back needs no privilege.
            let _ = set_nice(old);
        }
    }
}

/// The calling thread's id, which `setpriority(PRIO_PROCESS, tid)` takes
/// on Linux to change that thread alone.
fn tid() -> libc::id_t {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::gettid() as libc::id_t }
}

/// The calling thread's nice value, or `None` if it cannot be read.
fn nice() -> Option<i32> {
    // SAFETY: getpriority reads the scheduling priority of the thread `tid`
    // (this one); it touches no memory of ours. It may legitimately return
    // -1, so errno is cleared first and read after.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid());
        if v == -1 && *libc::__errno_location() != 0 { None } else { Some(v) }
    }
}

/// Sets the calling thread's nice value; whether it took effect.
fn set_nice(v: i32) -> bool {
    // SAFETY: setpriority changes the scheduling priority of the thread
    // `tid` (this one) and touches no memory of ours; a refusal (EPERM,
    // EACCES) returns -1 and changes nothing.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), v) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boost_is_undone_on_drop() {
        // On a thread of its own, so the test leaves no trace on others.
        std::thread::spawn(|| {
            let before = nice().expect("getpriority");
            {
                let g = PriorityGuard::boost(BENCH_STREAM_BOOST);
                let during = nice().unwrap();
                if g.boosted() {
                    assert_eq!(during, (before - BENCH_STREAM_BOOST).max(-20));
                } else {
                    // Without the privilege: nothing changed.
                    assert_eq!(during, before);
                }
            }
            assert_eq!(nice().unwrap(), before);
            assert!(!PriorityGuard::boost(0).boosted(), "no boost asked, none made");
            assert_eq!(nice().unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
