//! The per-client exclusion protocol (seed 004's `VCS_*` state machine),
//! with the data path made lock-free.
//!
//! Each client has an `active` word that only its owning thread writes, and
//! a `state` word (`HOLD`, `ON_CPU`, `ORPHANED`, `WAITER`) changed with
//! read-modify-writes. The data path (hold, fault, release of a writable
//! hold) *activates* the client by storing `active = 1` and then reading
//! `state`, with a sequentially consistent fence between the two; an
//! administrative change sets `HOLD` and then reads `active`, with the same
//! fence. This is Dekker's pattern: at least one side sees the other, so
//! either the change sees the client active and waits for it to store
//! `active = 0` (a plain release store: the data path pays one fenced
//! operation per activation and nothing to leave), or the client sees
//! `HOLD`, backs out and sleeps on its [`RawLock`] until the change is done.
//! The change waits for `active` by spinning ([`RawLock::relax`]): active
//! sections are a table walk and a compare-and-swap, never a sleep.
//!
//! vCPUs mark guest execution with `ON_CPU` (a read-modify-write on
//! `state`, without blocking: entry happens with interrupts off), then read
//! the table generation. An invalidation bumps the generation, then does a
//! read-modify-write on each client's `state`: the two are totally ordered,
//! so either the vCPU reads the new generation or the invalidation sees
//! `ON_CPU` and kicks it, waiting (sleeping; `WAITER` tells the vCPU's exit
//! to notify) until it has left guest context or re-entered with the new
//! generation.

use alloc::sync::Arc as StdArc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

use crate::error::{Error, Result};
use crate::object::VmObject;
use crate::space::Invalidation;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Cell, Guard, RawLock, dekker_store};

/// Holds whose page a client records (see `ClientShared::held`).
pub(crate) const HELD_SLOTS: usize = 16;
/// The slot of a hold beyond the recorded ones.
pub(crate) const NO_SLOT: u8 = HELD_SLOTS as u8;

pub(crate) const HOLD: u32 = 1 << 1;
pub(crate) const ON_CPU: u32 = 1 << 2;
pub(crate) const ORPHANED: u32 = 1 << 3;
pub(crate) const WAITER: u32 = 1 << 4;

/// An invalidation callback (see `VmClient::set_invalidation`).
pub(crate) type InvalFn = StdArc<dyn Fn(&Invalidation<'_>) + Send + Sync>;
/// A kick hook (see `VmClient::set_kick`).
pub(crate) type KickFn = StdArc<dyn Fn(u32) + Send + Sync>;

/// What a panicking hook (invalidation callback, kick hook) unwound with.
#[cfg(feature = "std")]
pub(crate) type Payload = alloc::boxed::Box<dyn core::any::Any + Send>;
/// Without `std` a hook's panic cannot be caught: it unwinds (or aborts)
/// directly; see [`PanicSlot`].
#[cfg(not(feature = "std"))]
pub(crate) type Payload = core::convert::Infallible;

/// The first panic of a hook during one administrative change (under the
/// space lock). With `std`, hooks run under `catch_unwind`: the change
/// goes on (every remaining client is still kicked, waited for,
/// invalidated, and every client released) and the first panic is
/// propagated once the space lock is dropped. Without `std` the panic
/// unwinds at once; drop guards still release every held client.
#[derive(Default)]
pub(crate) struct PanicSlot {
    #[cfg(feature = "std")]
    first: core::cell::Cell<Option<Payload>>,
}

impl PanicSlot {
    /// Run a hook, keeping its panic (the first one) for later.
    pub(crate) fn call(&self, f: impl FnOnce()) {
        #[cfg(feature = "std")]
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let first = self.first.take().unwrap_or(p);
            self.first.set(Some(first));
        }
        #[cfg(not(feature = "std"))]
        f()
    }

    /// The panic kept, if any.
    pub(crate) fn take(&self) -> Option<Payload> {
        #[cfg(feature = "std")]
        {
            self.first.take()
        }
        #[cfg(not(feature = "std"))]
        None
    }
}

/// Propagate a hook's panic kept by a [`PanicSlot`] (no locks held).
pub(crate) fn resume(p: Option<Payload>) {
    // Not while already unwinding (a space dropped by a panic): that
    // would abort; the hook's panic is dropped then.
    #[cfg(feature = "std")]
    if let Some(p) = p
        && !std::thread::panicking()
    {
        std::panic::resume_unwind(p);
    }
    #[cfg(not(feature = "std"))]
    if let Some(p) = p {
        match p {}
    }
}

/// An object kept alive for holds that were outstanding when its mapping
/// went away.
pub(crate) struct Retired {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The unmap's sequence number: holds taken earlier have a smaller one.
    pub(crate) seq: u64,
    /// The unmap sequence number when the mapping was made: holds taken
    /// earlier (a smaller one) were on an older mapping of the range.
    pub(crate) born: u64,
    pub(crate) _object: StdArc<VmObject>,
}

#[derive(Default)]
pub(crate) struct Callbacks {
    pub(crate) inval: Option<InvalFn>,
    pub(crate) kick: Option<KickFn>,
}

/// Client state shared between the client's owner and the space. Aligned
/// to two cache lines so that clients of different threads never share one.
#[repr(align(128))]
pub(crate) struct ClientShared<L> {
    /// 1 while a data-path operation runs; written by the owning thread.
    active: AtomicU32,
    state: AtomicU32,
    lock: L,
    cpu: AtomicU32,
    cpu_gen: AtomicU64,
    /// Holds taken and not released. Written only by the owning thread.
    outstanding: AtomicUsize,
    /// The pages of outstanding holds, so that an unmap retires its object
    /// only to clients holding a page of its range: slot `i` is in use
    /// when bit `i` of `held_used` is set, and then holds the page's
    /// address. Written only by the owning thread (slots are filled while
    /// active, so a change that holds the client sees every hold taken);
    /// holds beyond the slots are counted in `held_overflow` and their
    /// pages kept in `held_more` (under `lock`: only holds beyond
    /// `HELD_SLOTS` pay for it).
    held: [AtomicU64; HELD_SLOTS],
    held_used: AtomicU32,
    held_overflow: AtomicUsize,
    /// Under `lock`.
    held_more: Cell<Vec<(u64, u64)>>,
    /// The unmap sequence number each slot's hold was taken at.
    held_seq: [AtomicU64; HELD_SLOTS],
    /// Whether `retired` is non-empty (read without the lock).
    retired_any: AtomicBool,
    /// Under `lock`.
    retired: Cell<Vec<Retired>>,
    /// Under `lock`.
    callbacks: Cell<Callbacks>,
}

// SAFETY: the cells are only reached under `lock`; everything else is atomic.
unsafe impl<L: RawLock> Sync for ClientShared<L> {}
// SAFETY: as above; the contents are Send.
unsafe impl<L: RawLock> Send for ClientShared<L> {}

impl<L: RawLock> ClientShared<L> {
    pub(crate) fn new(orphaned: bool) -> Self {
        ClientShared {
            active: AtomicU32::new(0),
            state: AtomicU32::new(if orphaned { ORPHANED } else { 0 }),
            lock: L::new(),
            cpu: AtomicU32::new(u32::MAX),
            cpu_gen: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            held: core::array::from_fn(|_| AtomicU64::new(0)),
            held_used: AtomicU32::new(0),
            held_overflow: AtomicUsize::new(0),
            held_more: Cell::new(Vec::new()),
            held_seq: core::array::from_fn(|_| AtomicU64::new(0)),
            retired_any: AtomicBool::new(false),
            retired: Cell::new(Vec::new()),
            callbacks: Cell::new(Callbacks::default()),
        }
    }

    fn with_locked<R>(&self, f: impl FnOnce(&mut Vec<Retired>, &mut Callbacks) -> R) -> R {
        let _g = Guard::new(&self.lock);
        // SAFETY: both cells are only reached here, under `lock`.
        self.retired.with_mut(|r| self.callbacks.with_mut(|c| f(unsafe { &mut *r }, unsafe { &mut *c })))
    }

    pub(crate) fn set_inval(&self, f: Option<InvalFn>) {
        self.with_locked(|_, c| c.inval = f);
    }

    pub(crate) fn set_kick(&self, f: Option<KickFn>) {
        self.with_locked(|_, c| c.kick = f);
    }

    pub(crate) fn is_on_cpu(&self) -> bool {
        self.state.load(Acquire) & ON_CPU != 0
    }

    pub(crate) fn is_orphaned(&self) -> bool {
        self.state.load(Acquire) & ORPHANED != 0
    }

    /// Take the lock and wake every sleeper (after clearing a bit it may
    /// be waiting on).
    fn wake(&self) {
        let _g = Guard::new(&self.lock);
        self.state.fetch_and(!WAITER, AcqRel);
        self.lock.notify_all();
    }

    /// Sleep until `done(state)` holds.
    fn wait_until(&self, done: impl Fn(u32) -> bool) {
        let mut g = Guard::new(&self.lock);
        loop {
            let s = self.state.fetch_or(WAITER, AcqRel);
            if done(s) {
                return;
            }
            g.wait();
        }
    }

    // ---- data path (owning thread) ----

    /// Store `active = 1` and read the state behind a full fence.
    #[inline(always)]
    fn enter_active(&self) -> u32 {
        dekker_store(&self.active, 1);
        self.state.load(SeqCst)
    }

    /// Mark the client active, sleeping while the space holds it.
    #[inline]
    pub(crate) fn activate(&self) -> Result<()> {
        loop {
            let s = self.enter_active();
            if s & (HOLD | ORPHANED) == 0 {
                return Ok(());
            }
            self.deactivate();
            if s & ORPHANED != 0 {
                return Err(Error::Orphaned);
            }
            self.wait_until(|s| s & (HOLD | ORPHANED) != HOLD);
        }
    }

    /// As [`ClientShared::activate`], but fail instead of sleeping when held
    /// or orphaned.
    #[inline]
    pub(crate) fn try_activate(&self) -> bool {
        if self.enter_active() & (HOLD | ORPHANED) == 0 {
            return true;
        }
        self.deactivate();
        false
    }

    /// Leave the active section: a plain release store (the admin spins).
    #[inline(always)]
    pub(crate) fn deactivate(&self) {
        self.active.store(0, Release);
    }

    /// Count one more hold, of page `gpa` (owning thread only, client
    /// active); returns its slot, to give to the release.
    #[inline]
    pub(crate) fn hold_taken(&self, gpa: u64, seq: u64) -> u8 {
        let n = self.outstanding.load(Relaxed);
        self.outstanding.store(n + 1, Release);
        let used = self.held_used.load(Relaxed);
        let free = !used & ((1u32 << HELD_SLOTS) - 1);
        if free == 0 {
            let _g = Guard::new(&self.lock);
            // SAFETY: `held_more` is only reached under `lock`.
            self.held_more.with_mut(|m| unsafe { &mut *m }.push((gpa, seq)));
            let o = self.held_overflow.load(Relaxed);
            self.held_overflow.store(o + 1, Release);
            return NO_SLOT;
        }
        let i = free.trailing_zeros();
        self.held[i as usize].store(gpa, Relaxed);
        self.held_seq[i as usize].store(seq, Relaxed);
        self.held_used.store(used | 1 << i, Release);
        i as u8
    }

    /// Forget the page of a hold being released (owning thread only);
    /// `locked`: the caller holds `lock`.
    #[inline]
    fn unrecord(&self, slot: u8, gpa: u64, locked: bool) {
        if slot == NO_SLOT {
            let forget = || {
                // SAFETY: under `lock` (taken here or by the caller).
                self.held_more.with_mut(|m| {
                    let m = unsafe { &mut *m };
                    if let Some(i) = m.iter().rposition(|g| g.0 == gpa) {
                        m.swap_remove(i);
                    }
                });
                let o = self.held_overflow.load(Relaxed);
                self.held_overflow.store(o - 1, Release);
            };
            if locked {
                forget();
            } else {
                let _g = Guard::new(&self.lock);
                forget();
            }
        } else {
            let used = self.held_used.load(Relaxed);
            self.held_used.store(used & !(1 << slot), Release);
        }
    }

    /// Whether an outstanding hold is on a page of `[start, end)` of the
    /// mapping made at unmap sequence `born` and unmapped at `seq` (taken
    /// at a sequence number in `born .. seq`); the caller holds `lock`. A
    /// release racing with the caller may still be seen as outstanding:
    /// the answer errs towards "yes".
    fn holds_in(&self, start: u64, end: u64, born: u64, seq: u64) -> bool {
        let on = |g: u64, s: u64| start <= g && g < end && born <= s && s < seq;
        if self.held_overflow.load(Acquire) > 0 {
            // SAFETY: the caller holds `lock`.
            let more = self.held_more.with(|m| unsafe { &*m }.iter().any(|&(g, s)| on(g, s)));
            if more {
                return true;
            }
        }
        let mut used = self.held_used.load(Acquire);
        while used != 0 {
            let i = used.trailing_zeros();
            used &= used - 1;
            let g = self.held[i as usize].load(Relaxed);
            if on(g, self.held_seq[i as usize].load(Relaxed)) {
                return true;
            }
        }
        false
    }

    /// Whether an outstanding hold of this client is on a page of
    /// `[start, end)` (of any mapping there); errs towards "yes" for a
    /// release racing with the caller. Space lock held.
    pub(crate) fn has_holds(&self, start: u64, end: u64) -> bool {
        if self.outstanding.load(Acquire) == 0 {
            return false;
        }
        self.with_locked(|_, _| self.holds_in(start, end, 0, u64::MAX))
    }

    /// Drop the retired objects no outstanding hold needs any more (none
    /// when no hold is left); under the lock. Returns them, to be dropped
    /// outside it.
    fn prune(&self, r: &mut Vec<Retired>) -> Vec<Retired> {
        if self.outstanding.load(Relaxed) == 0 {
            self.retired_any.store(false, Release);
            return core::mem::take(r);
        }
        let mut dead = Vec::new();
        let mut i = 0;
        while i < r.len() {
            if self.holds_in(r[i].start, r[i].end, r[i].born, r[i].seq) {
                i += 1;
            } else {
                dead.push(r.swap_remove(i));
            }
        }
        if r.is_empty() {
            self.retired_any.store(false, Release);
        }
        dead
    }

    /// Count one hold less (owning thread only); drops the retired
    /// objects no remaining hold is on.
    #[inline]
    pub(crate) fn hold_released(&self, slot: u8, gpa: u64) {
        self.unrecord(slot, gpa, false);
        let n = self.outstanding.load(Relaxed) - 1;
        self.outstanding.store(n, Release);
        if self.retired_any.load(Acquire) {
            let dead = self.with_locked(|r, _| self.prune(r));
            drop(dead);
        }
    }

    /// Whether a hold of `gpa` taken at unmap sequence `seq` has lost its
    /// mapping since.
    #[inline]
    pub(crate) fn was_unmapped(&self, gpa: u64, seq: u64) -> bool {
        if !self.retired_any.load(Acquire) {
            return false;
        }
        self.with_locked(|r, _| Self::covered(r, gpa, seq))
    }

    fn covered(r: &[Retired], gpa: u64, seq: u64) -> bool {
        r.iter().any(|e| e.start <= gpa && gpa < e.end && seq < e.seq)
    }

    /// Run `f` under the client lock if the hold is still mapped; report
    /// whether it was unmapped. The slow path of a release while the space
    /// holds the client: the admin retires holds under this same lock
    /// before it clears any entry.
    pub(crate) fn release_locked(&self, gpa: u64, seq: u64, slot: u8, f: impl FnOnce()) -> bool {
        let (unmapped, dead) = self.with_locked(|r, _| {
            let unmapped = Self::covered(r, gpa, seq);
            if !unmapped {
                f();
            }
            self.unrecord(slot, gpa, true);
            let n = self.outstanding.load(Relaxed) - 1;
            self.outstanding.store(n, Release);
            let dead = if r.is_empty() { Vec::new() } else { self.prune(r) };
            (unmapped, dead)
        });
        drop(dead);
        unmapped
    }

    // ---- vCPU ----

    /// Mark guest execution on `cpu`; returns the generation read after
    /// the mark. Never blocks.
    pub(crate) fn enter(&self, cpu: u32, generation: &AtomicU64) -> Result<u64> {
        let s = self.state.fetch_or(ON_CPU, AcqRel);
        if s & (ON_CPU | ORPHANED) != 0 {
            if s & ON_CPU == 0 {
                self.exit();
                return Err(Error::Orphaned);
            }
            return Err(Error::Invalid(crate::error::Invalid::OnCpu));
        }
        self.cpu.store(cpu, Relaxed);
        let g = generation.load(Acquire);
        self.cpu_gen.store(g, Release);
        Ok(g)
    }

    pub(crate) fn exit(&self) {
        let s = self.state.fetch_and(!ON_CPU, AcqRel);
        if s & WAITER != 0 {
            self.wake();
        }
    }

    // ---- administrative side (space lock held) ----

    /// Exclude the data path: set `HOLD`, wait for an in-flight operation.
    pub(crate) fn admin_hold(&self) {
        self.state.fetch_or(HOLD, SeqCst);
        crate::sync::fence_seq_cst();
        while self.active.load(SeqCst) != 0 {
            L::relax();
        }
    }

    /// Let the data path resume.
    pub(crate) fn admin_release(&self) {
        let s = self.state.fetch_and(!HOLD, AcqRel);
        if s & WAITER != 0 {
            self.wake();
        }
    }

    /// Mark orphaned (the space is gone). Called while held.
    pub(crate) fn orphan(&self) {
        self.state.fetch_or(ORPHANED, AcqRel);
    }

    /// Give holds outstanding in `[start, end)` a reference to `object`
    /// (called while held, before any entry of the range is cleared): only
    /// a client with a hold on a page of the range keeps the object, and
    /// only while such a hold is outstanding.
    pub(crate) fn retire(&self, start: u64, end: u64, born: u64, seq: u64, object: &StdArc<VmObject>) {
        if self.outstanding.load(Acquire) == 0 && !self.retired_any.load(Acquire) {
            return;
        }
        let dead = self.with_locked(|r, _| {
            if self.outstanding.load(Acquire) > 0 && self.holds_in(start, end, born, seq) {
                r.push(Retired { start, end, seq, born, _object: object.clone() });
                self.retired_any.store(true, Release);
            }
            self.prune(r)
        });
        drop(dead);
    }

    /// Kick and wait for a vCPU still in guest context with a generation
    /// older than `generation`, then run the invalidation callback outside the
    /// lock. Called with the space lock held, with the client held (unmap,
    /// tracking switch) or not (a harvest: the data path runs on, and
    /// nothing here waits for it).
    pub(crate) fn invalidate(&self, generation: u64, inv: &Invalidation<'_>, hooks: &PanicSlot) {
        let stale = |s: u32| s & ON_CPU != 0 && self.cpu_gen.load(Acquire) < generation;
        // A read-modify-write, so it is ordered against `enter`'s.
        while stale(self.state.fetch_or(0, AcqRel)) {
            let kick = self.with_locked(|_, c| c.kick.clone());
            if let Some(k) = kick {
                hooks.call(|| k(self.cpu.load(Relaxed)));
            }
            let mut g = Guard::new(&self.lock);
            let s = self.state.fetch_or(WAITER, AcqRel);
            if stale(s) {
                g.wait();
            }
        }
        let cb = self.with_locked(|_, c| c.inval.clone());
        if let Some(cb) = cb {
            hooks.call(|| cb(inv));
        }
    }
}

/// The `OnCpu` guards the current thread holds, as (space, client)
/// addresses, so that an administrative change made by a thread in guest
/// context on a client of the same space is refused instead of waiting
/// for itself ([`Error::SelfDeadlock`]). Only with `std` (a thread-local);
/// without it the case is not detected.
#[cfg(all(feature = "std", not(loom)))]
pub(crate) mod on_cpu {
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static HELD: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// The current thread entered guest context on `client` of `space`.
    pub(crate) fn entered(space: usize, client: usize) {
        let _ = HELD.try_with(|h| h.borrow_mut().push((space, client)));
    }

    /// The current thread left guest context on `client` (or dropped it).
    pub(crate) fn left(client: usize) {
        let _ = HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|e| e.1 == client) {
                h.swap_remove(i);
            }
        });
    }

    /// Whether the current thread is in guest context on a client of `space`.
    pub(crate) fn holds(space: usize) -> bool {
        HELD.try_with(|h| h.borrow().iter().any(|e| e.0 == space)).unwrap_or(false)
    }
}

/// Without `std`: nothing recorded, nothing detected.
#[cfg(not(all(feature = "std", not(loom))))]
pub(crate) mod on_cpu {
    pub(crate) fn entered(_space: usize, _client: usize) {}
    pub(crate) fn left(_client: usize) {}
    pub(crate) fn holds(_space: usize) -> bool {
        false
    }
}
