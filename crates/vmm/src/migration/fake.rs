//! In-memory fakes of a source and a target VM, for the migration tests
//! and the bench (not for production use).
//!
//! [`FakeSource`] keeps guest memory in chunks behind locks, with atomic
//! dirty and resident bitmaps; a guest write takes the page's chunk lock,
//! stores, then sets the dirty bit before unlocking, so a harvest that
//! cleared the bit is followed by a read that sees the write. A writer
//! thread ([`FakeSource::start_writer`]) keeps dirtying pages, recording
//! in a ledger the last value it wrote to each page; pausing stops it and
//! waits until it is parked.
//!
//! [`FakeTarget`] models a VMM whose host writes into guest memory bypass
//! dirty tracking (as propolis's did in bug 232): only
//! [`MigrationTarget::mark_received`] makes a received page count for the
//! next migration ([`FakeTarget::into_source`]).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{HostError, Layout, MemRange, MigrationSource, MigrationTarget, PAGE_SIZE, StateBlob};

const PS: usize = PAGE_SIZE as usize;
const CHUNK_PAGES: u64 = 64;

/// How a [`FakeSource`] answers [`MigrationSource::resident`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Pages ever written (or marked received): a populated-pages bitmap.
    Populated,
    /// The dirty log read without clearing (bhyve's `GET_DIRTY` on a VM
    /// that never reset it): a failed attempt that does not put its bits
    /// back makes the next attempt lose pages.
    DirtyLog,
}

/// What the writer thread does.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The pages it writes (their addresses); chosen at random.
    pub pages: Vec<u64>,
    /// Pages written per second (`None`: as fast as it can).
    pub rate: Option<u64>,
    /// The random seed.
    pub seed: u64,
}

struct Guest {
    layout: Layout,
    base: Vec<u64>,
    total_pages: u64,
    chunks: Vec<Mutex<Vec<u8>>>,
    dirty: Vec<Vec<AtomicU64>>,
    resident: Vec<Vec<AtomicU64>>,
    ledger: Vec<AtomicU64>,
    counter: AtomicU64,
    paused: AtomicBool,
    pause_gen: AtomicU64,
    ack_gen: AtomicU64,
    writer_running: AtomicBool,
    stop: AtomicBool,
    throttle: AtomicU8,
    max_throttle: AtomicU8,
    reads: AtomicU64,
    fail_reads_after: AtomicU64,
}

impl Guest {
    fn locate(&self, gpa: u64) -> Option<(usize, u64, u64)> {
        let (ri, idx) = self.layout.locate(gpa)?;
        Some((ri, idx, self.base[ri] + idx))
    }

    /// A guest write of `bytes` at `off` in the page at `gpa`.
    fn write(&self, gpa: u64, off: usize, bytes: &[u8]) -> Option<()> {
        let (ri, idx, p) = self.locate(gpa)?;
        let ci = (p / CHUNK_PAGES) as usize;
        let po = ((p % CHUNK_PAGES) as usize) * PS;
        let mut chunk = self.chunks[ci].lock().unwrap_or_else(|e| e.into_inner());
        chunk.get_mut(po + off..po + off + bytes.len())?.copy_from_slice(bytes);
        let (w, b) = ((idx / 64) as usize, 1u64 << (idx % 64));
        self.dirty[ri][w].fetch_or(b, Ordering::Release);
        self.resident[ri][w].fetch_or(b, Ordering::Release);
        drop(chunk);
        Some(())
    }

    fn read(&self, p: u64, buf: &mut [u8]) {
        let ci = (p / CHUNK_PAGES) as usize;
        let po = ((p % CHUNK_PAGES) as usize) * PS;
        let chunk = self.chunks[ci].lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&chunk[po..po + PS]);
    }

    /// Whether page `p` is all zero now (under its chunk's lock, as a
    /// read).
    fn is_zero(&self, p: u64) -> bool {
        let ci = (p / CHUNK_PAGES) as usize;
        let po = ((p % CHUNK_PAGES) as usize) * PS;
        let chunk = self.chunks[ci].lock().unwrap_or_else(|e| e.into_inner());
        chunk[po..po + PS].iter().all(|&b| b == 0)
    }

    fn writer(self: Arc<Self>, cfg: WriterConfig) {
        let mut x = cfg.seed | 1;
        let start = Instant::now();
        let mut due = 0f64;
        while !self.stop.load(Ordering::SeqCst) {
            if self.paused.load(Ordering::SeqCst) {
                self.ack_gen.store(self.pause_gen.load(Ordering::SeqCst), Ordering::SeqCst);
                while self.paused.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(50));
                }
                continue;
            }
            let batch = Instant::now();
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let gpa = cfg.pages[(x % cfg.pages.len() as u64) as usize];
                let c = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
                let off = ((c % 512) * 8) as usize;
                if let Some((_, _, p)) = self.locate(gpa) {
                    // The ledger entry is stored under the page lock's
                    // protection order: after the write, before the next.
                    if self.write(gpa, off, &c.to_le_bytes()).is_some() {
                        self.ledger[p as usize].store(c, Ordering::Relaxed);
                    }
                }
            }
            let pct = u32::from(self.throttle.load(Ordering::SeqCst).min(99));
            match cfg.rate {
                Some(rate) => {
                    // Pace to rate * (100 - pct) / 100 pages per second.
                    let eff = (rate as f64 * f64::from(100 - pct) / 100.0).max(1.0);
                    due += 64.0 / eff;
                    let el = start.elapsed().as_secs_f64();
                    if el - due > 0.01 {
                        due = el;
                    } else if due > el {
                        std::thread::sleep(Duration::from_secs_f64(due - el));
                    }
                }
                None if pct > 0 => std::thread::sleep(batch.elapsed() * pct / (100 - pct)),
                None => {}
            }
        }
        self.ack_gen.store(u64::MAX, Ordering::SeqCst);
    }
}

fn bitmaps(layout: &Layout) -> Vec<Vec<AtomicU64>> {
    layout.ranges.iter().map(|r| (0..r.bitmap_words()).map(|_| AtomicU64::new(0)).collect()).collect()
}

fn bases(layout: &Layout) -> (Vec<u64>, u64) {
    let mut base = Vec::new();
    let mut t = 0;
    for r in &layout.ranges {
        base.push(t);
        t += r.pages();
    }
    (base, t)
}

/// An in-memory source VM (see the module doc).
pub struct FakeSource {
    g: Arc<Guest>,
    residency: Residency,
    writer: Option<JoinHandle<()>>,
    state: Vec<StateBlob>,
}

impl FakeSource {
    /// A guest with `layout` (validated by the caller), all pages zero and
    /// untouched.
    pub fn new(layout: Layout, residency: Residency) -> FakeSource {
        let (base, total_pages) = bases(&layout);
        let chunks = (0..total_pages.div_ceil(CHUNK_PAGES))
            .map(|c| {
                let n = (total_pages - c * CHUNK_PAGES).min(CHUNK_PAGES) as usize;
                Mutex::new(vec![0u8; n * PS])
            })
            .collect();
        let g = Guest {
            dirty: bitmaps(&layout),
            resident: bitmaps(&layout),
            ledger: (0..total_pages).map(|_| AtomicU64::new(0)).collect(),
            layout,
            base,
            total_pages,
            chunks,
            counter: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            pause_gen: AtomicU64::new(0),
            ack_gen: AtomicU64::new(0),
            writer_running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            max_throttle: AtomicU8::new(0),
            reads: AtomicU64::new(0),
            fail_reads_after: AtomicU64::new(u64::MAX),
        };
        FakeSource { g: Arc::new(g), residency, writer: None, state: Vec::new() }
    }

    /// A guest write (dirty and resident bits set); `None` if out of range.
    pub fn write(&self, gpa: u64, off: usize, bytes: &[u8]) -> Option<()> {
        self.g.write(gpa, off, bytes)
    }

    /// A handle that writes to this guest from anywhere (a progress
    /// callback, another thread) while the engine holds the source.
    pub fn handle(&self) -> GuestHandle {
        GuestHandle(self.g.clone())
    }

    /// Fill every page for which `f` returns true after writing its
    /// contents into the page buffer (as guest writes).
    pub fn fill(&self, mut f: impl FnMut(u64, &mut [u8]) -> bool) {
        let mut buf = vec![0u8; PS];
        for r in &self.g.layout.ranges {
            for i in 0..r.pages() {
                let gpa = r.gpa + i * PAGE_SIZE;
                buf.fill(0);
                if f(gpa, &mut buf) {
                    self.g.write(gpa, 0, &buf);
                }
            }
        }
    }

    /// The state blobs [`MigrationSource::state`] returns.
    pub fn set_state(&mut self, blobs: Vec<StateBlob>) {
        self.state = blobs;
    }

    /// Make `read_page` fail after `n` more successful reads.
    pub fn fail_reads_after(&self, n: u64) {
        let r = self.g.reads.load(Ordering::SeqCst);
        self.g.fail_reads_after.store(r.saturating_add(n), Ordering::SeqCst);
    }

    /// Stop failing reads.
    pub fn heal(&self) {
        self.g.fail_reads_after.store(u64::MAX, Ordering::SeqCst);
    }

    /// Start the writer thread (one at a time).
    pub fn start_writer(&mut self, cfg: WriterConfig) {
        assert!(self.writer.is_none() && !cfg.pages.is_empty());
        self.g.stop.store(false, Ordering::SeqCst);
        self.g.ack_gen.store(0, Ordering::SeqCst);
        self.g.writer_running.store(true, Ordering::SeqCst);
        let g = self.g.clone();
        self.writer = Some(std::thread::spawn(move || g.writer(cfg)));
    }

    /// Stop the writer thread; returns the number of writes so far.
    pub fn stop_writer(&mut self) -> u64 {
        self.g.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        self.g.writer_running.store(false, Ordering::SeqCst);
        self.g.counter.load(Ordering::SeqCst)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.g.paused.load(Ordering::SeqCst)
    }

    /// The throttle now and the highest applied (percent).
    pub fn throttle_pct(&self) -> (u8, u8) {
        (self.g.throttle.load(Ordering::SeqCst), self.g.max_throttle.load(Ordering::SeqCst))
    }

    /// Guest writes so far.
    pub fn writes(&self) -> u64 {
        self.g.counter.load(Ordering::SeqCst)
    }

    /// Pages whose dirty bit is set now.
    pub fn dirty_pages(&self) -> u64 {
        self.g.dirty.iter().flatten().map(|w| u64::from(w.load(Ordering::SeqCst).count_ones())).sum()
    }

    /// The whole memory, ranges in order.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; (self.g.total_pages as usize) * PS];
        for (p, page) in out.chunks_mut(PS).enumerate() {
            self.g.read(p as u64, page);
        }
        out
    }

    /// Check a memory image (as [`FakeSource::snapshot`]) against the
    /// writer's ledger: each page holds the last value written to it.
    pub fn check_ledger(&self, mem: &[u8]) -> Result<(), String> {
        for (p, l) in self.g.ledger.iter().enumerate() {
            let c = l.load(Ordering::SeqCst);
            if c == 0 {
                continue;
            }
            let off = p * PS + ((c % 512) * 8) as usize;
            let got = mem.get(off..off + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
            if got != Some(c) {
                return Err(format!("page {p}: ledger says {c} at {}, memory has {got:?}", off % PS));
            }
        }
        Ok(())
    }
}

/// Writes to a [`FakeSource`]'s guest memory (see [`FakeSource::handle`]).
#[derive(Clone)]
pub struct GuestHandle(Arc<Guest>);

impl GuestHandle {
    /// A guest write (dirty and resident bits set); `None` if out of range.
    pub fn write(&self, gpa: u64, off: usize, bytes: &[u8]) -> Option<()> {
        self.0.write(gpa, off, bytes)
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

impl MigrationSource for FakeSource {
    fn layout(&self) -> Layout {
        self.g.layout.clone()
    }

    fn resident(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        let ri =
            self.g.layout.ranges.iter().position(|r| r == range).ok_or(HostError::new("resident", "no such range"))?;
        let src = match self.residency {
            Residency::Populated => &self.g.resident[ri],
            Residency::DirtyLog => &self.g.dirty[ri],
        };
        for (b, s) in bitmap.iter_mut().zip(src) {
            *b = s.load(Ordering::Acquire);
        }
        Ok(())
    }

    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let n = self.g.reads.fetch_add(1, Ordering::SeqCst);
        if n >= self.g.fail_reads_after.load(Ordering::SeqCst) {
            return Err(HostError::new("read_page", "injected failure"));
        }
        let (_, _, p) = self.g.locate(gpa).ok_or(HostError::new("read_page", "outside the layout"))?;
        self.g.read(p, buf);
        Ok(())
    }

    /// Checked page by page under the chunk locks, so a guest write
    /// racing the check either is seen or sets the dirty bit after it.
    fn zero_mask(&mut self, gpa: u64, n: usize) -> Result<Option<u64>, HostError> {
        let (ri, idx, p) = self.g.locate(gpa).ok_or(HostError::new("zero_mask", "outside the layout"))?;
        if n > 64 || n as u64 > self.g.layout.ranges[ri].pages() - idx {
            return Err(HostError::new("zero_mask", "outside the range"));
        }
        let mut mask = 0u64;
        for i in 0..n as u64 {
            if self.g.is_zero(p + i) {
                mask |= 1 << i;
            }
        }
        Ok(Some(mask))
    }

    fn harvest(&mut self, range: &MemRange, bitmap: &mut [u64]) -> Result<(), HostError> {
        let ri =
            self.g.layout.ranges.iter().position(|r| r == range).ok_or(HostError::new("harvest", "no such range"))?;
        for (b, d) in bitmap.iter_mut().zip(&self.g.dirty[ri]) {
            *b = d.swap(0, Ordering::AcqRel);
        }
        Ok(())
    }

    fn set_dirty(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError> {
        let ri =
            self.g.layout.ranges.iter().position(|r| r == range).ok_or(HostError::new("set_dirty", "no such range"))?;
        for (b, d) in bitmap.iter().zip(&self.g.dirty[ri]) {
            d.fetch_or(*b, Ordering::AcqRel);
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), HostError> {
        let gen_ = self.g.pause_gen.fetch_add(1, Ordering::SeqCst) + 1;
        self.g.paused.store(true, Ordering::SeqCst);
        while self.writer.is_some() && self.g.ack_gen.load(Ordering::SeqCst) < gen_ {
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.g.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn throttle(&mut self, pct: u8) -> Result<(), HostError> {
        let pct = pct.min(99);
        self.g.throttle.store(pct, Ordering::SeqCst);
        self.g.max_throttle.fetch_max(pct, Ordering::SeqCst);
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<StateBlob>, HostError> {
        Ok(self.state.clone())
    }
}

/// An in-memory target VM (see the module doc).
#[derive(Default)]
pub struct FakeTarget {
    expect: Option<Layout>,
    layout: Option<Layout>,
    base: Vec<u64>,
    mem: Vec<u8>,
    valid: Vec<u64>,
    received: Vec<Vec<u64>>,
    state: Vec<StateBlob>,
    resumed: bool,
    discards: u32,
    writes: u64,
    fail_writes_after: Option<u64>,
    fail_apply_state: bool,
    in_place_pages: u64,
}

impl FakeTarget {
    /// A target that takes any layout.
    pub fn new() -> FakeTarget {
        FakeTarget::default()
    }

    /// A target that refuses any layout but `layout`.
    pub fn expecting(layout: Layout) -> FakeTarget {
        FakeTarget { expect: Some(layout), ..Default::default() }
    }

    /// Make `write_page` fail after `n` page writes.
    pub fn fail_writes_after(&mut self, n: u64) {
        self.fail_writes_after = Some(n);
    }

    /// Make `apply_state` fail (the attempt fails after the end record,
    /// with the source paused).
    pub fn fail_apply_state(&mut self) {
        self.fail_apply_state = true;
    }

    /// Pages received in place ([`MigrationTarget::receive_pages`]) over
    /// this target's life.
    pub fn in_place_pages(&self) -> u64 {
        self.in_place_pages
    }

    /// Whether the guest was resumed here.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// How many times an attempt was discarded.
    pub fn discards(&self) -> u32 {
        self.discards
    }

    /// Whether any memory is set up (false after a discard).
    pub fn prepared(&self) -> bool {
        self.layout.is_some()
    }

    /// The state blobs applied.
    pub fn state(&self) -> &[StateBlob] {
        &self.state
    }

    fn page_index(&self, gpa: u64) -> Result<u64, HostError> {
        let layout = self.layout.as_ref().ok_or(HostError::new("target", "not prepared"))?;
        let (ri, idx) = layout.locate(gpa).ok_or(HostError::new("target", "outside the layout"))?;
        Ok(self.base[ri] + idx)
    }

    /// The whole memory, ranges in order.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.valid.len() * 64 * PS];
        let pages = self.layout.as_ref().map(|l| l.bytes() / PAGE_SIZE).unwrap_or(0) as usize;
        out.truncate(pages * PS);
        for p in 0..pages {
            if self.valid[p / 64] >> (p % 64) & 1 == 1 {
                out[p * PS..(p + 1) * PS].copy_from_slice(&self.mem[p * PS..(p + 1) * PS]);
            }
        }
        out
    }

    /// The VM, as the source of its next migration: its memory, and as
    /// resident (or dirty) exactly the pages marked received.
    pub fn into_source(self, residency: Residency) -> FakeSource {
        let layout = self.layout.clone().unwrap_or_default();
        let mem = self.snapshot();
        let src = FakeSource::new(layout, residency);
        for (ci, c) in src.g.chunks.iter().enumerate() {
            let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
            let off = ci * CHUNK_PAGES as usize * PS;
            let n = c.len();
            c.copy_from_slice(&mem[off..off + n]);
        }
        for (ri, bits) in self.received.iter().enumerate() {
            for (wi, &b) in bits.iter().enumerate() {
                src.g.resident[ri][wi].store(b, Ordering::SeqCst);
                if residency == Residency::DirtyLog {
                    src.g.dirty[ri][wi].store(b, Ordering::SeqCst);
                }
            }
        }
        src
    }
}

impl MigrationTarget for FakeTarget {
    fn prepare(&mut self, layout: &Layout) -> Result<(), HostError> {
        if let Some(e) = &self.expect
            && e != layout
        {
            return Err(HostError::new("prepare", format!("layout mismatch: expected {e:?}, got {layout:?}")));
        }
        let (base, total) = bases(layout);
        let bytes = (total as usize) * PS;
        if self.mem.len() != bytes {
            self.mem = vec![0u8; bytes];
        }
        self.valid = vec![0u64; (total as usize).div_ceil(64)];
        self.base = base;
        self.received = layout.ranges.iter().map(|r| vec![0u64; r.bitmap_words()]).collect();
        self.layout = Some(layout.clone());
        self.writes = 0;
        self.resumed = false;
        Ok(())
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), HostError> {
        if let Some(n) = self.fail_writes_after
            && self.writes >= n
        {
            return Err(HostError::new("write_page", "injected failure"));
        }
        self.writes += 1;
        let p = self.page_index(gpa)? as usize;
        self.mem[p * PS..(p + 1) * PS].copy_from_slice(data);
        self.valid[p / 64] |= 1 << (p % 64);
        Ok(())
    }

    /// In place, into its memory buffer, page by page as `write_page`
    /// counts; a run that would reach an injected write failure goes the
    /// buffered way (which fails at its page).
    #[allow(unsafe_code)]
    fn receive_pages(
        &mut self,
        gpa: u64,
        len: usize,
        recv: &mut dyn FnMut(&[super::RawDest]),
    ) -> Result<bool, HostError> {
        let count = (len / PS) as u64;
        if let Some(n) = self.fail_writes_after
            && self.writes + count > n
        {
            return Ok(false);
        }
        let p = self.page_index(gpa)? as usize;
        let end = p.checked_add(count as usize).filter(|&e| e * PS <= self.mem.len());
        let Some(end) = end else {
            return Err(HostError::new("receive_pages", "outside the memory"));
        };
        self.writes += count;
        for q in p..end {
            self.valid[q / 64] |= 1 << (q % 64);
        }
        // SAFETY: `[p * PS, end * PS)` lies inside `mem` (checked above),
        // which `&mut self` keeps alive, unmoved and unreferenced while
        // `recv` runs.
        let d = unsafe { super::RawDest::new(self.mem.as_mut_ptr().add(p * PS), len) };
        let d = d.ok_or(HostError::new("receive_pages", "no memory"))?;
        recv(&[d]);
        self.in_place_pages += count;
        Ok(true)
    }

    fn zero_page(&mut self, gpa: u64) -> Result<(), HostError> {
        let p = self.page_index(gpa)? as usize;
        self.valid[p / 64] &= !(1 << (p % 64));
        Ok(())
    }

    fn mark_received(&mut self, range: &MemRange, bitmap: &[u64]) -> Result<(), HostError> {
        let layout = self.layout.as_ref().ok_or(HostError::new("mark_received", "not prepared"))?;
        let ri =
            layout.ranges.iter().position(|r| r == range).ok_or(HostError::new("mark_received", "no such range"))?;
        for (a, b) in self.received[ri].iter_mut().zip(bitmap) {
            *a |= *b;
        }
        Ok(())
    }

    fn apply_state(&mut self, blobs: Vec<StateBlob>) -> Result<(), HostError> {
        if self.fail_apply_state {
            return Err(HostError::new("apply_state", "injected failure"));
        }
        self.state = blobs;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.resumed = true;
        Ok(())
    }

    fn discard(&mut self) {
        self.discards += 1;
        self.layout = None;
        self.valid.clear();
        self.received.clear();
        self.state.clear();
        self.resumed = false;
    }
}

/// The first page at which two memory images differ, with the images'
/// lengths if those differ (`None`: equal). For test messages that do not
/// print gigabytes.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("lengths {} and {}", a.len(), b.len()));
    }
    let p = a.chunks(PS).zip(b.chunks(PS)).position(|(x, y)| x != y)?;
    let off = a[p * PS..].iter().zip(&b[p * PS..]).position(|(x, y)| x != y).unwrap_or(0);
    Some(format!(
        "page {p} (byte {off}): {:?} vs {:?}",
        &a[p * PS + off..][..8.min(PS - off)],
        &b[p * PS + off..][..8.min(PS - off)]
    ))
}

/// Migrate `source` into `target` over loopback TCP: the target runs
/// [`receive_tcp`](super::receive_tcp) on a thread, the source
/// [`migrate_tcp`](super::migrate_tcp) here. Returns both sides' results
/// and the target.
pub fn loopback<S: MigrationSource + ?Sized>(
    source: &mut S,
    target: FakeTarget,
    config: &super::SourceConfig,
) -> (
    Result<super::MigrationSummary, super::MigrationError>,
    Result<super::TargetSummary, super::MigrationError>,
    FakeTarget,
) {
    loopback_with(source, target, config, &mut |_| {})
}

/// [`loopback`] with a progress callback.
pub fn loopback_with<S: MigrationSource + ?Sized>(
    source: &mut S,
    mut target: FakeTarget,
    config: &super::SourceConfig,
    progress: &mut dyn FnMut(&super::Progress),
) -> (
    Result<super::MigrationSummary, super::MigrationError>,
    Result<super::TargetSummary, super::MigrationError>,
    FakeTarget,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let r = super::receive_tcp(&mut target, &s, &super::TargetConfig::default(), Some(Duration::from_secs(20)));
        (r, target)
    });
    let s = std::net::TcpStream::connect(addr).expect("connect");
    let res = super::migrate_tcp(source, &s, config, Some(Duration::from_secs(20)), progress);
    drop(s);
    let (tr, target) = t.join().expect("target thread");
    (res, tr, target)
}
