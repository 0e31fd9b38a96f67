//! Table benchmarks at 1 GiB and 16 GiB of guest space, side by side with
//! two peers over the same kind of table-page arena (a [`HeapPages`], so
//! every implementation gets its pages from the same bump allocator with
//! a free list, and page-to-pointer conversion is an addition):
//!
//! - `ptm`: `page_table_multiarch` 0.6 (`X64PageTable`, a `PagingHandler`
//!   over a global arena), mapping through one cursor;
//! - `x86`: the `x86_64` crate 0.15 (`OffsetPageTable` with a
//!   `FrameAllocator`/`FrameDeallocator` over an arena);
//!
//! and a sequential read of an equal-sized `u64` array (8 bytes per 4 KiB
//! page: the bandwidth reference for the harvest).
//!
//! Workloads (every implementation gets the same addresses in the same
//! order): `populate` (peers have no populate: they map one page per 2 MiB,
//! which creates the same tables), `map_in_order` and `map_random` (per
//! page, into existing tables), `lookup_random` and `lookup_seq` (frame and
//! protection of every page; `ours` is `is_mapped`, `ours_cur` the same
//! through a `lookup_cursor`), `harvest_0pct`, `harvest_1pct`,
//! `harvest_10pct` and `harvest_100pct` (read and clear the dirty bits of
//! a range where no page, every hundredth, every tenth or every page is
//! dirty: `ours` is `harvest_dirty_exclusive`, `ours_sh` `harvest_dirty`,
//! `ours_runs` `harvest_dirty_runs`; `ptm` has no dirty bits, `x86`,
//! at 10% only, walks its tables by hand), `unmap_vacate` (unmap every page
//! and free the tables; `ptm` unmaps per page and frees on drop) and
//! `vacate` (free the tables of an already unmapped range; `ptm`: drop).
//!
//! Run: `cargo bench -p nested-pt --bench tables -- --warm-up-time 1
//! --measurement-time 2` (a filter such as `harvest` for a subset;
//! `NPT_BENCH_GIB=1` for the 1 GiB size only). Each workload's
//! implementations are measured by criterion one after the other, then
//! again in `NPT_BENCH_ROUNDS` (default 11) interleaved rounds, every
//! implementation once per round in a rotating order, so that all of them
//! meet the same load on a shared machine. At the end two tables of
//! medians in ns per page are printed (criterion's, then the rounds'),
//! with the ratio of our form to the best peer; the harvest rows carry the
//! bandwidth reference measured beside them (`bw_ref`, warmed by one
//! untimed read before each timed one, so that in the interleaved rounds
//! it does not read its array cold after another implementation, as the
//! harvests read entries their setup has just touched; and `bw_ref_w`,
//! the same read after the elements of the dirty pages were written, the
//! state the harvest's setup leaves its entries in), the harvests' ratios
//! to it, and what the shared form costs beyond the exclusive one per
//! dirty page (its locked ANDs).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use nested_pt::{Caps, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot, PteFormat, TablePages};

use memory_addr as ma;
use page_table_multiarch::x86_64::X64PageTable;
use page_table_multiarch::{MappingFlags, PageSize as PtmSize, PagingHandler};
use x86_64::structures::paging::mapper::{CleanUp, TranslateResult};
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
    Translate,
};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Frames of the guest memory the benchmarks map (never touched).
const GUEST_PFN: u64 = 0x100_0000;

// ---------------------------------------------------------------------
// Result collection: medians of ns per page, printed at the end.
// ---------------------------------------------------------------------

static RESULTS: Mutex<BTreeMap<(String, String, String), Vec<f64>>> = Mutex::new(BTreeMap::new());

fn record(size: &str, work: &str, who: &str, d: Duration, iters: u64, pages: u64) {
    let ns = d.as_nanos() as f64 / iters as f64 / pages as f64;
    RESULTS.lock().unwrap().entry((size.into(), work.into(), who.into())).or_default().push(ns);
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn report(title: &str, r: &BTreeMap<(String, String, String), Vec<f64>>) {
    let mut rows: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    for ((size, work, who), v) in r.iter() {
        rows.entry((work.clone(), size.clone())).or_default().insert(who.clone(), median(v));
    }
    println!(
        "\n{title}: median ns/page (ratio = ours / best peer, in brackets the cursor form; harvest: bandwidth reference / ours)"
    );
    println!(
        "{:<16} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  ratio (cursor)",
        "workload", "size", "ours", "ours_sh", "ours_cur", "ptm", "x86", "bw_ref"
    );
    let bw: BTreeMap<String, f64> = rows
        .iter()
        .filter(|((w, _), _)| w == "bandwidth")
        .filter_map(|((_, s), m)| Some((s.clone(), *m.get("ref")?)))
        .collect();
    for ((work, size), m) in &rows {
        if work == "bandwidth" {
            continue;
        }
        let f = |k: &str| m.get(k).map_or("-".to_string(), |v| format!("{v:.3}"));
        let ours = m.get("ours").copied();
        // `ptm`'s vacate is its `Drop`, which frees the tables without
        // looking at a leaf: not the same operation, so vacate is compared
        // with `x86` alone.
        let ptm = if work == "vacate" { None } else { m.get("ptm") };
        let peer = [ptm, m.get("x86")].into_iter().flatten().copied().reduce(f64::min);
        let ratio = match (ours, peer) {
            (Some(o), Some(p)) => format!("{:.2}", o / p),
            _ => "-".into(),
        };
        // The reference measured beside the harvest, else on its own.
        let bw_here = m.get("bw_ref").or(bw.get(size));
        let bwr = if work.starts_with("harvest") {
            match (bw_here, ours, m.get("ours_sh")) {
                (Some(b), Some(o), Some(s)) => {
                    let mut t = format!("  bw {:.0}% excl, {:.0}% shared", b / o * 100.0, b / s * 100.0);
                    if let Some(r) = m.get("ours_runs") {
                        t += &format!(", {:.0}% runs", b / r * 100.0);
                    }
                    if let Some(bw) = m.get("bw_ref_wide") {
                        t += &format!(
                            "; vs the widest-vector read ({bw:.3}): {:.0}% / {:.0}%",
                            bw / o * 100.0,
                            bw / s * 100.0
                        );
                    }
                    if let Some(bw) = m.get("bw_ref_w") {
                        t += &format!(
                            "; vs the read after the same writes ({bw:.3}): {:.0}% / {:.0}%",
                            bw / o * 100.0,
                            bw / s * 100.0
                        );
                    }
                    // What the shared form costs beyond the exclusive one,
                    // per dirty page (its locked ANDs).
                    let density = work.trim_start_matches("harvest_").trim_end_matches("pct").parse::<f64>();
                    if let Ok(d) = density
                        && d > 0.0
                    {
                        t += &format!("; shared - excl = {:.2} ns/dirty page", (s - o) * 100.0 / d);
                    }
                    t
                }
                _ => String::new(),
            }
        } else {
            String::new()
        };
        let bws = bw_here.map_or("-".to_string(), |v| format!("{v:.3}"));
        let cur = match (m.get("ours_cur"), peer) {
            (Some(c), Some(p)) => format!(" ({:.2})", c / p),
            _ => String::new(),
        };
        println!(
            "{work:<16} {size:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {ratio}{cur}{bwr}",
            f("ours"),
            f("ours_sh"),
            f("ours_cur"),
            f("ptm"),
            f("x86"),
            bws
        );
    }
}

/// The implementations of one workload at one size. Each is measured twice
/// in the same run: by criterion, one after the other (`add` order), and
/// then in `rounds` interleaved rounds, each round running every
/// implementation once in a rotating order, so that all of them meet the
/// same machine load (the machine these figures come from is shared); the
/// second table printed at the end holds the medians of those rounds.
struct Work<'a> {
    size: String,
    work: String,
    pages: u64,
    impls: Vec<(String, Box<dyn FnMut() -> Duration + 'a>)>,
}

static PAIRED: Mutex<BTreeMap<(String, String, String), Vec<f64>>> = Mutex::new(BTreeMap::new());

impl<'a> Work<'a> {
    fn new(size: &str, work: &str, pages: u64) -> Self {
        Work { size: size.into(), work: work.into(), pages, impls: Vec::new() }
    }

    /// An implementation: `routine` on a fresh `setup()` per iteration,
    /// timing only the routine (its output is dropped untimed).
    fn add<I, O>(&mut self, who: &str, mut setup: impl FnMut() -> I + 'a, mut routine: impl FnMut(I) -> O + 'a) {
        self.impls.push((
            who.into(),
            Box::new(move || {
                let input = setup();
                let start = Instant::now();
                let out = black_box(routine(black_box(input)));
                let d = start.elapsed();
                drop(out);
                d
            }),
        ));
    }

    fn run(mut self, g: &mut BenchmarkGroup<'_, WallTime>) {
        let (size, work, pages) = (self.size.clone(), self.work.clone(), self.pages);
        for (who, f) in &mut self.impls {
            g.bench_function(format!("{work}/{who}"), |b| {
                b.iter_custom(|iters| {
                    let total = (0..iters).map(|_| f()).sum();
                    record(&size, &work, who, total, iters, pages);
                    total
                })
            });
        }
        // Only the workloads the filter selected (criterion ran them).
        let selected: Vec<usize> = {
            let r = RESULTS.lock().unwrap();
            (0..self.impls.len())
                .filter(|&i| r.contains_key(&(size.clone(), work.clone(), self.impls[i].0.clone())))
                .collect()
        };
        let rounds: usize = std::env::var("NPT_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
        for r in 0..rounds {
            for k in 0..selected.len() {
                let i = selected[(r + k) % selected.len()];
                let (who, f) = &mut self.impls[i];
                let ns = f().as_nanos() as f64 / pages as f64;
                PAIRED.lock().unwrap().entry((size.clone(), work.clone(), who.clone())).or_default().push(ns);
            }
        }
    }
}

// ---------------------------------------------------------------------
// Ours.
// ---------------------------------------------------------------------

fn fmt() -> PteFormat {
    PteFormat::ept(Caps::default())
}

/// Table pages a 4 KiB mapping of `bytes` needs, with room to spare.
fn arena_pages(bytes: u64) -> u64 {
    bytes / M2 + bytes / (1 << 30) + 64
}

fn new_table(bytes: u64) -> NestedTable<HeapPages> {
    let pages = arena_pages(bytes);
    let mut arena = HeapPages::with_capacity(0x100, pages);
    arena.prefault(pages);
    NestedTable::new(fmt(), arena).unwrap()
}

fn populated(bytes: u64) -> NestedTable<HeapPages> {
    let mut t = new_table(bytes);
    t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
    t
}

fn mapped(bytes: u64) -> NestedTable<HeapPages> {
    let mut t = populated(bytes);
    t.map_range_exclusive(Gpa(0), bytes, Prot::RW, MemType::WriteBack, |g| Some(Pfn(GUEST_PFN + (g.0 >> 12)))).unwrap();
    t
}

/// Sets the dirty state (accessed and dirty bits) of every `step`-th
/// page of `[0, bytes)` (none for `step` 0), straight in the leaf tables,
/// then reads every leaf entry once: the setup of the harvests, cheap
/// beside them at every density. The read leaves the entries as warm as
/// `bw_ref`'s untimed read leaves its array, whatever ran before (in the
/// interleaved rounds each implementation always follows the same one,
/// and the form after a reference would otherwise find the entries
/// evicted by the reference's array while the forms after it find them
/// in cache).
fn dirty_every(t: &NestedTable<HeapPages>, bytes: u64, step: u64) {
    t.for_each_leaf_table(Gpa(0), bytes, |_, entries, _| {
        black_box(entries.iter().fold(0u64, |a, e| a | e.load(Ordering::Relaxed)));
    });
    if step == 0 {
        return;
    }
    let bits = t.format().set_dirty_bits() | t.format().accessed_mask();
    t.for_each_leaf_table(Gpa(0), bytes, |base, entries, _| {
        let first = (base.0 / K4).next_multiple_of(step) - base.0 / K4;
        for e in entries.iter().skip(first as usize).step_by(step as usize) {
            e.store(e.load(Ordering::Relaxed) | bits, Ordering::Relaxed);
        }
    });
}

// ---------------------------------------------------------------------
// page_table_multiarch: a global arena behind a `PagingHandler`.
// ---------------------------------------------------------------------

static PTM_PAGES: Mutex<Option<HeapPages>> = Mutex::new(None);
/// Virtual address of physical address 0 in the `ptm` arena.
static PTM_OFFSET: AtomicUsize = AtomicUsize::new(0);

struct PtmHandler;

impl PagingHandler for PtmHandler {
    fn alloc_frames(num: usize, _align: usize) -> Option<ma::PhysAddr> {
        assert_eq!(num, 1);
        let pfn = PTM_PAGES.lock().unwrap().as_mut()?.alloc_zeroed()?;
        Some(ma::PhysAddr::from((pfn.0 << 12) as usize))
    }
    fn dealloc_frames(paddr: ma::PhysAddr, _num: usize) {
        let pfn = Pfn(paddr.as_usize() as u64 >> 12);
        // SAFETY: the page table frees only frames it allocated and no
        // longer points at.
        unsafe { PTM_PAGES.lock().unwrap().as_mut().unwrap().free(pfn) }
    }
    #[inline(always)]
    fn phys_to_virt(paddr: ma::PhysAddr) -> ma::VirtAddr {
        ma::VirtAddr::from(PTM_OFFSET.load(Ordering::Relaxed).wrapping_add(paddr.as_usize()))
    }
}

type Ptm = X64PageTable<PtmHandler>;

/// Sets up the global arena, big enough for two 16 GiB tables at once.
fn ptm_init() {
    let mut g = PTM_PAGES.lock().unwrap();
    if g.is_none() {
        let pages = 2 * arena_pages(16 * GIB) + 64;
        let mut h = HeapPages::with_capacity(0x100, pages);
        h.prefault(pages);
        let pfn = h.alloc_zeroed().unwrap();
        PTM_OFFSET.store((h.ptr(pfn) as usize).wrapping_sub((pfn.0 << 12) as usize), Ordering::Relaxed);
        // SAFETY: just allocated, nothing points at it.
        unsafe { h.free(pfn) };
        *g = Some(h);
    }
}

const PTM_FLAGS: MappingFlags = MappingFlags::READ.union(MappingFlags::WRITE);

fn ptm_va(gpa: u64) -> ma::VirtAddr {
    ma::VirtAddr::from(gpa as usize)
}
fn ptm_pa(pfn: u64) -> ma::PhysAddr {
    ma::PhysAddr::from((pfn << 12) as usize)
}

/// Creates the tables of `[0, bytes)` by mapping one page per 2 MiB.
fn ptm_populate(pt: &mut Ptm, bytes: u64) {
    let mut c = pt.cursor();
    for a in (0..bytes).step_by(M2 as usize) {
        c.map(ptm_va(a), ptm_pa(GUEST_PFN + (a >> 12)), PtmSize::Size4K, PTM_FLAGS).unwrap();
    }
}

/// A table whose tables for `[0, bytes)` exist, with nothing mapped.
fn ptm_populated(bytes: u64) -> Ptm {
    ptm_init();
    let mut pt = Ptm::try_new().unwrap();
    ptm_populate(&mut pt, bytes);
    let mut c = pt.cursor();
    for a in (0..bytes).step_by(M2 as usize) {
        c.unmap(ptm_va(a)).unwrap();
    }
    drop(c);
    pt
}

fn ptm_mapped(bytes: u64) -> Ptm {
    let mut pt = ptm_populated(bytes);
    let mut c = pt.cursor();
    for p in 0..bytes / K4 {
        c.map(ptm_va(p * K4), ptm_pa(GUEST_PFN + p), PtmSize::Size4K, PTM_FLAGS).unwrap();
    }
    drop(c);
    pt
}

// ---------------------------------------------------------------------
// x86_64: an `OffsetPageTable` over its own arena.
// ---------------------------------------------------------------------

struct X86 {
    pages: HeapPages,
    root: Pfn,
    offset: u64,
}

struct X86Frames<'a>(&'a mut HeapPages);

// SAFETY: the arena hands out each frame once until it is freed.
unsafe impl FrameAllocator<Size4KiB> for X86Frames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        let pfn = self.0.alloc_zeroed()?;
        Some(PhysFrame::containing_address(x86_64::PhysAddr::new(pfn.0 << 12)))
    }
}

impl FrameDeallocator<Size4KiB> for X86Frames<'_> {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame) {
        // SAFETY: the mapper frees only tables it allocated and unlinked.
        unsafe { self.0.free(Pfn(frame.start_address().as_u64() >> 12)) }
    }
}

const X86_FLAGS: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

impl X86 {
    fn new(bytes: u64) -> X86 {
        let n = arena_pages(bytes);
        let mut pages = HeapPages::with_capacity(0x100, n);
        pages.prefault(n);
        let root = pages.alloc_zeroed().unwrap();
        let offset = (pages.ptr(root) as u64).wrapping_sub(root.0 << 12);
        X86 { pages, root, offset }
    }
    /// The mapper and a frame allocator, both over this arena.
    fn parts(&mut self) -> (OffsetPageTable<'static>, X86Frames<'_>) {
        let l4 = self.pages.ptr(self.root).cast::<PageTable>();
        // SAFETY: the root page is live for the arena's life and only one
        // mapper at a time is made from it (`&mut self`).
        let mapper = unsafe { OffsetPageTable::new(&mut *l4, x86_64::VirtAddr::new(self.offset)) };
        (mapper, X86Frames(&mut self.pages))
    }
    fn map(m: &mut OffsetPageTable<'_>, f: &mut X86Frames<'_>, gpa: u64, pfn: u64) {
        let page = Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(gpa));
        let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(pfn << 12));
        // SAFETY: the frames are never accessed through this table.
        unsafe { m.map_to(page, frame, X86_FLAGS, f) }.unwrap().ignore();
    }
    fn unmap(m: &mut OffsetPageTable<'_>, gpa: u64) {
        m.unmap(Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(gpa))).unwrap().1.ignore();
    }
    fn populate(&mut self, bytes: u64) {
        let (mut m, mut f) = self.parts();
        for a in (0..bytes).step_by(M2 as usize) {
            Self::map(&mut m, &mut f, a, GUEST_PFN + (a >> 12));
        }
    }
    fn populated(bytes: u64) -> X86 {
        let mut x = X86::new(bytes);
        x.populate(bytes);
        let (mut m, _) = x.parts();
        for a in (0..bytes).step_by(M2 as usize) {
            Self::unmap(&mut m, a);
        }
        x
    }
    fn mapped(bytes: u64) -> X86 {
        let mut x = X86::populated(bytes);
        let (mut m, mut f) = x.parts();
        for p in 0..bytes / K4 {
            Self::map(&mut m, &mut f, p * K4, GUEST_PFN + p);
        }
        x
    }
    fn clean_up(&mut self, bytes: u64) {
        let (mut m, mut f) = self.parts();
        let range = Page::range_inclusive(
            Page::containing_address(x86_64::VirtAddr::new(0)),
            Page::containing_address(x86_64::VirtAddr::new(bytes - 1)),
        );
        // SAFETY: every table frame is used once, in this table only.
        unsafe { m.clean_up_addr_range(range, &mut f) };
    }
    /// Calls `f` with the index of the first page of each leaf table and
    /// the table, walking the tree by hand (what a dirty harvest with the
    /// crate's types looks like).
    fn leaf_tables(&mut self, mut f: impl FnMut(u64, &mut PageTable)) {
        let off = self.offset;
        // SAFETY: every table address in the tree is a live arena page.
        let table = |e: &x86_64::structures::paging::page_table::PageTableEntry| unsafe {
            &mut *((off + e.addr().as_u64()) as *mut PageTable)
        };
        // SAFETY: the root page is live.
        let l4 = unsafe { &mut *self.pages.ptr(self.root).cast::<PageTable>() };
        for (i4, e4) in l4.iter().enumerate() {
            if e4.is_unused() {
                continue;
            }
            for (i3, e3) in table(e4).iter().enumerate() {
                if e3.is_unused() {
                    continue;
                }
                for (i2, e2) in table(e3).iter().enumerate() {
                    if e2.is_unused() {
                        continue;
                    }
                    f(((i4 as u64) << 27) | ((i3 as u64) << 18) | ((i2 as u64) << 9), table(e2));
                }
            }
        }
    }
    fn dirty_10pct(&mut self) {
        self.leaf_tables(|first, t| {
            for (i, e) in t.iter_mut().enumerate() {
                if (first + i as u64).is_multiple_of(10) && !e.is_unused() {
                    e.set_flags(e.flags() | PageTableFlags::DIRTY);
                }
            }
        });
    }
    fn harvest(&mut self, bitmap: &mut [u64]) -> u64 {
        let mut n = 0;
        self.leaf_tables(|first, t| {
            for (i, e) in t.iter_mut().enumerate() {
                let p = (first + i as u64) as usize;
                let fl = e.flags();
                if fl.contains(PageTableFlags::DIRTY) {
                    e.set_flags(fl - PageTableFlags::DIRTY);
                    bitmap[p / 64] |= 1 << (p % 64);
                    n += 1;
                } else {
                    bitmap[p / 64] &= !(1 << (p % 64));
                }
            }
        });
        n
    }
}

// ---------------------------------------------------------------------
// The workloads.
// ---------------------------------------------------------------------

fn shuffled(n: u64, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Not timed: what the tables cost, in real bytes (pages at 4 KiB each plus
/// the software shadow), per GiB mapped.
fn table_memory(sizes: &[u64]) {
    for &gib in sizes {
        let bytes = gib * GIB;
        let t = mapped(bytes);
        let share = t.table_bytes() as f64 / bytes as f64 * 100.0;
        println!(
            "table memory, {gib} GiB of 4 KiB pages: {} bytes ({} pages), {:.4}% of mapped memory",
            t.table_bytes(),
            t.table_pages(),
            share
        );
    }
}

fn benches(c: &mut Criterion) {
    // `NPT_BENCH_GIB=1` (or `16`, or `1,16`, the default) picks the sizes.
    let sizes: Vec<u64> = std::env::var("NPT_BENCH_GIB")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    table_memory(&sizes);
    for &gib in &sizes {
        let (sz, bytes) = (format!("{gib}GiB"), gib * GIB);
        let sz = sz.as_str();
        let pages = bytes / K4;
        let mut g = c.benchmark_group(format!("tables/{sz}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(pages));
        let g = &mut g;

        // Bandwidth reference: read 8 bytes per page sequentially.
        let array: Vec<u64> = (0..pages).collect();
        let mut w = Work::new(sz, "bandwidth", pages);
        w.add("ref", || (), |_| black_box(&array).iter().fold(0u64, |a, x| a.wrapping_add(*x)));
        w.run(g);

        // Populate (peers: map one page per 2 MiB, creating the tables).
        let mut w = Work::new(sz, "populate", pages);
        w.add(
            "ours",
            || new_table(bytes),
            |mut t| {
                t.populate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                t
            },
        );
        w.add(
            "ptm",
            || {
                ptm_init();
                Ptm::try_new().unwrap()
            },
            |mut pt| {
                ptm_populate(&mut pt, bytes);
                pt
            },
        );
        w.add(
            "x86",
            || X86::new(bytes),
            |mut x| {
                x.populate(bytes);
                x
            },
        );
        w.run(g);

        // Per-page map into existing tables, in order and at random.
        let order = shuffled(pages, 0x9e37_79b9_7f4a_7c15);
        let in_order: Vec<u32> = (0..pages as u32).collect();
        for (work, ord) in [("map_in_order", &in_order), ("map_random", &order)] {
            let mut w = Work::new(sz, work, pages);
            w.add(
                "ours",
                || populated(bytes),
                |mut t| {
                    for &p in ord {
                        let p = p as u64;
                        t.map_exclusive(
                            Gpa(p * K4),
                            Pfn(GUEST_PFN + p),
                            PageSize::Size4K,
                            Prot::RW,
                            MemType::WriteBack,
                        )
                        .unwrap();
                    }
                    t
                },
            );
            w.add(
                "ours_sh",
                || populated(bytes),
                |t| {
                    for &p in ord {
                        let p = p as u64;
                        t.map(Gpa(p * K4), Pfn(GUEST_PFN + p), PageSize::Size4K, Prot::RW, MemType::WriteBack).unwrap();
                    }
                    t
                },
            );
            w.add(
                "ptm",
                || ptm_populated(bytes),
                |mut pt| {
                    let mut c = pt.cursor();
                    for &p in ord {
                        let p = p as u64;
                        c.map(ptm_va(p * K4), ptm_pa(GUEST_PFN + p), PtmSize::Size4K, PTM_FLAGS).unwrap();
                    }
                    drop(c);
                    pt
                },
            );
            w.add(
                "x86",
                || X86::populated(bytes),
                |mut x| {
                    let (mut m, mut f) = x.parts();
                    for &p in ord {
                        let p = p as u64;
                        X86::map(&mut m, &mut f, p * K4, GUEST_PFN + p);
                    }
                    x
                },
            );
            w.run(g);
        }

        // Lookups: frame and protection of every page.
        {
            let t = mapped(bytes);
            let pt = ptm_mapped(bytes);
            let mut x = X86::mapped(bytes);
            let (xm, _) = x.parts();
            for (work, ord) in [("lookup_random", &order), ("lookup_seq", &in_order)] {
                let mut w = Work::new(sz, work, pages);
                w.add(
                    "ours",
                    || (),
                    |_| {
                        let mut acc = 0u64;
                        for &p in ord {
                            let (pfn, prot) = t.is_mapped(Gpa(p as u64 * K4)).unwrap();
                            acc = acc.wrapping_add(pfn.0 ^ prot.bits() as u64);
                        }
                        acc
                    },
                );
                w.add(
                    "ours_cur",
                    || (),
                    |_| {
                        let mut acc = 0u64;
                        let mut c = t.lookup_cursor();
                        for &p in ord {
                            let (pfn, prot) = c.is_mapped(Gpa(p as u64 * K4)).unwrap();
                            acc = acc.wrapping_add(pfn.0 ^ prot.bits() as u64);
                        }
                        acc
                    },
                );
                w.add(
                    "ptm",
                    || (),
                    |_| {
                        let mut acc = 0u64;
                        for &p in ord {
                            let (pa, fl, _) = pt.query(ptm_va(p as u64 * K4)).unwrap();
                            acc = acc.wrapping_add(pa.as_usize() as u64 ^ fl.bits() as u64);
                        }
                        acc
                    },
                );
                w.add(
                    "x86",
                    || (),
                    |_| {
                        let mut acc = 0u64;
                        for &p in ord {
                            match xm.translate(x86_64::VirtAddr::new(p as u64 * K4)) {
                                TranslateResult::Mapped { frame, flags, .. } => {
                                    acc = acc.wrapping_add(frame.start_address().as_u64() ^ flags.bits())
                                }
                                _ => panic!("not mapped"),
                            }
                        }
                        acc
                    },
                );
                w.run(g);
            }
        }
        drop(order);
        drop(in_order);

        // Harvest at several dirty densities: none, every hundredth page,
        // every tenth (`harvest_10pct`, with the `x86` peer), every page.
        for (density, step) in [(0u64, 0u64), (1, 100), (10, 10), (100, 1)] {
            let bitmap = RefCell::new(vec![0u64; (pages / 64) as usize]);
            let written = RefCell::new(array.clone());
            let want = if step == 0 { 0 } else { pages.div_ceil(step) };
            let t = RefCell::new(mapped(bytes));
            let x = RefCell::new((density == 10).then(|| X86::mapped(bytes)));
            let mut w = Work::new(sz, &format!("harvest_{density}pct"), pages);
            // The reference, warmed by one untimed read (so that in the
            // interleaved rounds it does not read its array cold after
            // another implementation's run, as the harvests read entries
            // their setup just touched) ...
            w.add(
                "bw_ref",
                || black_box(black_box(&array).iter().fold(0u64, |a, x| a.wrapping_add(*x))),
                |_| black_box(&array).iter().fold(0u64, |a, x| a.wrapping_add(*x)),
            );
            // The same read compiled for the widest vectors this CPU has
            // (the harvest's own scan uses AVX-512 where it exists, while
            // `bw_ref` is built for baseline x86-64, SSE2): with the
            // entries in cache the read is bound by instructions, not by
            // memory, and this is the stricter limit.
            if wide_read_available() {
                w.add("bw_ref_wide", || black_box(wide_read(black_box(&array))), |_| black_box(wide_read(&array)));
            }
            // ... and the same read after the setup the harvests get:
            // every `step`-th element written (as `dirty_every` writes
            // every `step`-th entry), so its lines are in the state the
            // harvest finds its entries in.
            if step != 0 {
                w.add(
                    "bw_ref_w",
                    || {
                        let mut a = written.borrow_mut();
                        for i in (0..a.len()).step_by(step as usize) {
                            a[i] = black_box(a[i]);
                        }
                    },
                    |_| black_box(&*written.borrow()).iter().fold(0u64, |a, x| a.wrapping_add(*x)),
                );
            }
            w.add(
                "ours",
                || dirty_every(&t.borrow(), bytes, step),
                |_| {
                    let n = t.borrow_mut().harvest_dirty_exclusive(Gpa(0), bytes, &mut bitmap.borrow_mut()).unwrap();
                    assert_eq!(n, want)
                },
            );
            w.add(
                "ours_sh",
                || dirty_every(&t.borrow(), bytes, step),
                |_| assert_eq!(t.borrow().harvest_dirty(Gpa(0), bytes, &mut bitmap.borrow_mut()).unwrap(), want),
            );
            w.add(
                "ours_runs",
                || dirty_every(&t.borrow(), bytes, step),
                |_| {
                    let mut runs = 0u64;
                    assert_eq!(t.borrow().harvest_dirty_runs(Gpa(0), bytes, true, |_, _| runs += 1).unwrap(), want);
                    runs
                },
            );
            if density == 10 {
                w.add(
                    "x86",
                    || x.borrow_mut().as_mut().unwrap().dirty_10pct(),
                    |_| assert_eq!(x.borrow_mut().as_mut().unwrap().harvest(&mut bitmap.borrow_mut()), want),
                );
            }
            w.run(g);
        }
        drop(array);

        // Unmap every page and free the tables.
        let mut w = Work::new(sz, "unmap_vacate", pages);
        w.add(
            "ours",
            || mapped(bytes),
            |mut t| {
                assert_eq!(t.unmap_vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap(), pages);
                t
            },
        );
        w.add(
            "ours_sh",
            || mapped(bytes),
            |mut t| {
                assert_eq!(t.unmap_region(Gpa(0), bytes).unwrap(), pages);
                t.vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                t
            },
        );
        w.add(
            "ptm",
            || ptm_mapped(bytes),
            |mut pt| {
                pt.cursor().unmap_region(ptm_va(0), bytes as usize).unwrap();
                drop(pt);
            },
        );
        w.add(
            "x86",
            || X86::mapped(bytes),
            |mut x| {
                let (mut m, _) = x.parts();
                for p in 0..pages {
                    X86::unmap(&mut m, p * K4);
                }
                x.clean_up(bytes);
                x
            },
        );
        w.run(g);

        // Free the tables of an unmapped range.
        let mut w = Work::new(sz, "vacate", pages);
        w.add(
            "ours",
            || {
                let t = mapped(bytes);
                t.unmap_region(Gpa(0), bytes).unwrap();
                t
            },
            |mut t| {
                t.vacate_region(Gpa(0), bytes, PageSize::Size4K).unwrap();
                t
            },
        );
        w.add(
            "ptm",
            || {
                let mut pt = ptm_mapped(bytes);
                pt.cursor().unmap_region(ptm_va(0), bytes as usize).unwrap();
                pt
            },
            drop,
        );
        w.add(
            "x86",
            || {
                let mut x = X86::mapped(bytes);
                let (mut m, _) = x.parts();
                for p in 0..pages {
                    X86::unmap(&mut m, p * K4);
                }
                x
            },
            |mut x| {
                x.clean_up(bytes);
                x
            },
        );
        w.run(g);
    }
    report("criterion, one implementation after the other", &RESULTS.lock().unwrap());
    report("interleaved rounds", &PAIRED.lock().unwrap());
}

criterion_group!(tables, benches);
criterion_main!(tables);

/// Whether [`wide_read`] can use AVX-512 here.
fn wide_read_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bandwidth reference's sum, vectorised with AVX-512 (call only
/// where [`wide_read_available`]).
fn wide_read(a: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn sum(a: &[u64]) -> u64 {
            a.iter().fold(0u64, |s, x| s.wrapping_add(*x))
        }
        assert!(wide_read_available());
        // SAFETY: AVX-512F is present (checked above).
        unsafe { sum(a) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        a.iter().fold(0u64, |s, x| s.wrapping_add(*x))
    }
}
