//! Locking behind a small trait, and the atomics the protocol uses.
//!
//! The crate needs exactly one blocking primitive: a mutex with a condition
//! variable attached ([`RawLock`]). A kernel supplies its own (a kernel
//! mutex + condvar pair); with the `std` feature [`StdLock`] builds one from
//! `std::sync`; without it [`SpinLock`] spins. Under `cfg(loom)` the same
//! `StdLock` code is built on loom's primitives, so the models check the real
//! protocol.

#[cfg(not(loom))]
pub(crate) use alloc::sync::Arc;
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};

/// Store `v` into `a`, then a full (StoreLoad) fence: the data-path half of
/// the Dekker pattern in `protocol.rs`. A sequentially consistent swap on
/// x86 is one locked instruction; under loom the fence form is used, which
/// loom models exactly.
#[inline(always)]
pub(crate) fn dekker_store(a: &AtomicU32, v: u32) {
    #[cfg(loom)]
    {
        a.store(v, core::sync::atomic::Ordering::Relaxed);
        fence_seq_cst();
    }
    #[cfg(not(loom))]
    {
        a.swap(v, core::sync::atomic::Ordering::SeqCst);
    }
}

/// A sequentially consistent fence (loom's under `cfg(loom)`).
#[inline(always)]
pub(crate) fn fence_seq_cst() {
    #[cfg(loom)]
    loom::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    #[cfg(not(loom))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// An interior-mutability cell whose accesses loom can check for races.
#[derive(Debug)]
pub(crate) struct Cell<T> {
    #[cfg(loom)]
    inner: loom::cell::UnsafeCell<T>,
    #[cfg(not(loom))]
    inner: core::cell::UnsafeCell<T>,
}

impl<T> Cell<T> {
    pub(crate) fn new(v: T) -> Self {
        Cell {
            #[cfg(loom)]
            inner: loom::cell::UnsafeCell::new(v),
            #[cfg(not(loom))]
            inner: core::cell::UnsafeCell::new(v),
        }
    }

    /// Shared access. Callers argue why no writer runs concurrently.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(loom)]
        {
            self.inner.with(f)
        }
        #[cfg(not(loom))]
        {
            f(self.inner.get())
        }
    }

    /// Exclusive access. Callers argue why no other access runs concurrently.
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(loom)]
        {
            self.inner.with_mut(f)
        }
        #[cfg(not(loom))]
        {
            f(self.inner.get())
        }
    }
}

/// A mutex with one condition variable, the only blocking primitive the
/// crate uses.
///
/// # Safety
///
/// Implementations must provide mutual exclusion between `lock` and
/// `unlock`, and `wait` must release the lock and block the caller such
/// that a `notify_all` issued by a thread that acquired the lock after the
/// waiter released it wakes the waiter (no lost wake-ups); `wait` returns
/// with the lock held again. Spurious wake-ups are allowed: every caller
/// re-checks its condition.
pub unsafe trait RawLock: Send + Sync {
    /// A new, unlocked lock.
    fn new() -> Self;
    /// Acquire the lock, blocking while another thread holds it.
    fn lock(&self);
    /// Release the lock.
    ///
    /// # Safety
    /// The caller holds the lock.
    unsafe fn unlock(&self);
    /// Release the lock, sleep until [`RawLock::notify_all`] (or spuriously),
    /// then re-acquire the lock.
    ///
    /// # Safety
    /// The caller holds the lock.
    unsafe fn wait(&self);
    /// Wake every thread sleeping in [`RawLock::wait`].
    fn notify_all(&self);
    /// One step of a short busy wait (an administrative change waiting for
    /// a client's data-path operation to finish): a pause, or a yield to
    /// the scheduler where one exists.
    fn relax() {
        core::hint::spin_loop();
    }
}

/// RAII guard of a [`RawLock`].
pub(crate) struct Guard<'a, L: RawLock> {
    lock: &'a L,
}

impl<'a, L: RawLock> Guard<'a, L> {
    pub(crate) fn new(lock: &'a L) -> Self {
        lock.lock();
        Guard { lock }
    }

    /// Sleep until notified (see [`RawLock::wait`]).
    pub(crate) fn wait(&mut self) {
        // SAFETY: the guard exists, so this thread holds the lock.
        unsafe { self.lock.wait() }
    }
}

impl<L: RawLock> Drop for Guard<'_, L> {
    fn drop(&mut self) {
        // SAFETY: the guard was created by acquiring the lock.
        unsafe { self.lock.unlock() }
    }
}

#[cfg(any(loom, feature = "std"))]
mod blocking {
    #[cfg(loom)]
    use loom::sync::{Condvar, Mutex, MutexGuard};
    #[cfg(not(loom))]
    use std::sync::{Condvar, Mutex, MutexGuard};

    #[derive(Debug, Default)]
    struct State {
        locked: bool,
        /// Bumped by every `notify_all`; a waiter sleeps until it changes.
        events: u64,
    }

    /// A blocking [`RawLock`](super::RawLock) built from `std::sync` (from
    /// loom's primitives under `cfg(loom)`).
    #[derive(Debug, Default)]
    pub struct StdLock {
        state: Mutex<State>,
        unlocked: Condvar,
        event: Condvar,
    }

    impl StdLock {
        fn state(&self) -> MutexGuard<'_, State> {
            // A panic while the inner mutex was held cannot leave `State`
            // inconsistent (two plain fields), so poisoning is ignored.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    // SAFETY: `locked` is only changed under the inner mutex; `wait`
    // records the event count and releases `locked` under that same mutex,
    // and `notify_all` bumps the count under it, so a notification issued
    // after the release is always seen.
    unsafe impl super::RawLock for StdLock {
        fn new() -> Self {
            StdLock { state: Mutex::new(State::default()), unlocked: Condvar::new(), event: Condvar::new() }
        }

        fn lock(&self) {
            let mut g = self.state();
            while g.locked {
                g = self.unlocked.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.locked = true;
        }

        unsafe fn unlock(&self) {
            let mut g = self.state();
            g.locked = false;
            drop(g);
            self.unlocked.notify_one();
        }

        unsafe fn wait(&self) {
            let mut g = self.state();
            let seen = g.events;
            g.locked = false;
            self.unlocked.notify_one();
            while g.events == seen {
                g = self.event.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            while g.locked {
                g = self.unlocked.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.locked = true;
        }

        fn notify_all(&self) {
            let mut g = self.state();
            g.events = g.events.wrapping_add(1);
            drop(g);
            self.event.notify_all();
        }

        fn relax() {
            #[cfg(loom)]
            loom::thread::yield_now();
            #[cfg(not(loom))]
            std::thread::yield_now();
        }
    }
}

#[cfg(any(loom, feature = "std"))]
pub use blocking::StdLock;

/// A spinning [`RawLock`] for environments without blocking primitives.
/// `wait` spins until the next `notify_all`.
#[derive(Debug)]
pub struct SpinLock {
    locked: core::sync::atomic::AtomicBool,
    events: core::sync::atomic::AtomicU64,
}

// SAFETY: `locked` is taken with an acquiring compare-exchange and released
// with a releasing store; `wait` reads the event count before releasing the
// lock, and `notify_all` increments it, so a notification after the release
// changes the count the waiter compares against.
unsafe impl RawLock for SpinLock {
    fn new() -> Self {
        SpinLock { locked: core::sync::atomic::AtomicBool::new(false), events: core::sync::atomic::AtomicU64::new(0) }
    }

    fn lock(&self) {
        use core::sync::atomic::Ordering::{Acquire, Relaxed};
        while self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            core::hint::spin_loop();
        }
    }

    unsafe fn unlock(&self) {
        self.locked.store(false, core::sync::atomic::Ordering::Release);
    }

    unsafe fn wait(&self) {
        use core::sync::atomic::Ordering::SeqCst;
        let seen = self.events.load(SeqCst);
        // SAFETY: forwarded from the caller, who holds the lock.
        unsafe { self.unlock() };
        while self.events.load(SeqCst) == seen {
            core::hint::spin_loop();
        }
        self.lock();
    }

    fn notify_all(&self) {
        self.events.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    }
}

/// The lock a space uses unless told otherwise: [`StdLock`] with the `std`
/// feature, [`SpinLock`] without.
#[cfg(any(loom, feature = "std"))]
pub type DefaultLock = StdLock;
/// The lock a space uses unless told otherwise: [`StdLock`] with the `std`
/// feature, [`SpinLock`] without.
#[cfg(not(any(loom, feature = "std")))]
pub type DefaultLock = SpinLock;

#[cfg(all(test, not(loom), feature = "std"))]
mod tests {
    use super::*;
    use std::sync::Arc as StdArc;
    use std::sync::atomic::{AtomicBool as StdBool, Ordering};

    fn waits_until_notified<L: RawLock + 'static>() {
        let lock = StdArc::new(L::new());
        let flag = StdArc::new(StdBool::new(false));
        let (l2, f2) = (lock.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let mut g = Guard::new(&*l2);
            while !f2.load(Ordering::SeqCst) {
                g.wait();
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            let _g = Guard::new(&*lock);
            flag.store(true, Ordering::SeqCst);
            lock.notify_all();
        }
        t.join().unwrap();
    }

    fn excludes<L: RawLock + 'static>() {
        let lock = StdArc::new(L::new());
        let counter = StdArc::new(core::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (l, c) = (lock.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let _g = Guard::new(&*l);
                        // A non-atomic read-modify-write made of two
                        // atomics: loses updates unless the lock excludes.
                        let v = c.load(Ordering::Relaxed);
                        c.store(v + 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::SeqCst), 4000);
    }

    #[test]
    fn std_lock_wait_notify() {
        waits_until_notified::<StdLock>();
    }

    #[test]
    fn spin_lock_wait_notify() {
        waits_until_notified::<SpinLock>();
    }

    #[test]
    fn std_lock_excludes() {
        excludes::<StdLock>();
    }

    #[test]
    fn spin_lock_excludes() {
        excludes::<SpinLock>();
    }
}
