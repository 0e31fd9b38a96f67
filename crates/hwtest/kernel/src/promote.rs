//! Promotion and demotion of 2 MiB leaves (`NestedTable::promote_2m` /
//! `demote_2m`) under the emulator's nested paging: a range translates
//! identically before and after, and the accessed/dirty state moves with it.
//!
//! The scenarios share one table of their own (`Env::new`: its own
//! sub-arena, the guest code page mapped as in the main table), each in its
//! own 2 MiB range. Page `i` of a range holds `value(tag, i)` (consecutive
//! within the range) at offset `8 * i`, put there in host memory or written
//! by the guest through the table (host memory then holds a decoy first),
//! and a contiguous run is mapped onto a host run that is not the identity.
//! Single guest accesses carry chosen data (`Data::Read` plants nothing, so
//! the guest must find the value already there); "the guest reads every
//! page" is one run of the scan stub (`Suite::scan`), which reads the 512
//! words in turn and stops at the first that is not the page's value. So
//! a scan that completes read every page through the frame it was given
//! before the change. Every run is also compared with the model (exit, and
//! every table word, freed leaf-table pages included: a walk through a
//! stale paging-structure cache would set A/D in the old table and show
//! there).
//!
//! Guest-physical layout (PDPTE 0, beside the code page's PDE 0):
//!
//! | GPA          | scenario                  | host frames          |
//! |--------------|---------------------------|----------------------|
//! | 0x0200_0000  | promote-2m                | TEST_BASE + 1*2M     |
//! | 0x0240_0000  | promote-2m-clean          | TEST_BASE + 2*2M     |
//! | 0x0280_0000  | demote-2m                 | TEST_BASE + 3*2M     |
//! | 0x02C0_0000  | demote-2m-clean           | TEST_BASE + 4*2M     |
//! | 0x0300_0000  | promote-2m-refused        | TEST_BASE + 5*2M (one page from 6*2M) |
//! | 0x0200_0000  | promote-demote-emulated-ad (own table) | TEST_BASE + 7*2M |
//! | 0x4000_0000  | demote-1g (a 1 GiB leaf, PDPTE 1; the guest uses its pages at TEST_BASE..+4M) | host 0..1 GiB |
//! | 0x4000_0000  | promote-1g (the same range, after demote-1g) | host 0..1 GiB |
//!
//! After a promotion or demotion the kernel invalidates before the next
//! run, as a hypervisor must before the freed leaf table is reused: on VMX
//! a single-context INVEPT (it covers the whole EPTP context), on SVM a
//! flush of the guest's TLB (TLB_CONTROL; INVLPGA covers one page only).
//! Later runs in the same phase invalidate nothing, so the translation
//! cached by the first one is used, as a guest touching the range would.
//!
//! Without EPT A/D (Ivy Bridge model, or EPTP bit 6 clear) the CPU sets no
//! accessed or dirty bit: `Suite::expect_ad` then expects none, and the
//! harvests must report no page. The translation checks are the same.

use alloc::vec::Vec;
use nested_pt::mmu::ViolationKind::{NotPresent, Permission};
use nested_pt::{Access, Caps, Gpa, MemType, PageSize, Pfn, PromoteRefusal, Prot, PteFormat};

use crate::guest::{Op, SCAN_STRIDE};
use crate::hv::{Exit, Invalidate};
use crate::layout::{TEST_BASE, TEST_SIZE};
use crate::suite::{Arch, Data, Env, Expect, Scenario, Suite};

const M2: u64 = 2 << 20;
const PAGES: u64 = 512;

const G_PROMOTE: u64 = 0x0200_0000;
const G_PROMOTE_CLEAN: u64 = 0x0240_0000;
const G_DEMOTE: u64 = 0x0280_0000;
const G_DEMOTE_CLEAN: u64 = 0x02C0_0000;
const G_REFUSED: u64 = 0x0300_0000;
const G_1G: u64 = 0x4000_0000;
const G1: u64 = 1 << 30;

/// Host run `k` (0..8) of the test-frame region.
fn run_base(k: u64) -> u64 {
    let h = TEST_BASE + k * M2;
    assert!(h + M2 <= TEST_BASE + TEST_SIZE, "host run outside the test frames");
    h
}

/// Guest-physical address of page `i`'s word in the range at `g`: offset
/// `8 * i` in the page, a distinct offset for each page, and exactly where
/// the guest's scan stub reads it.
fn word(g: u64, i: u64) -> u64 {
    g + i * SCAN_STRIDE
}

/// The value page `i` of scenario `tag` must hold: consecutive within a
/// range, as the scan stub checks, distinct across scenarios.
fn value(tag: u32, i: u64) -> u32 {
    0xA000_0000 | (tag << 16) | i as u32
}

/// What host memory holds instead where the guest is to write `value`
/// (or where a wrong translation would lead), so that a read can tell.
fn decoy(tag: u32, i: u64) -> u32 {
    value(tag, i) ^ 0x0F00_0000
}

fn poke(hpa: u64, v: u32) {
    assert!((TEST_BASE..TEST_BASE + TEST_SIZE - 4).contains(&hpa));
    // SAFETY: hpa lies in the test-frame region (checked), identity-mapped
    // and used only by the guest's test accesses and the scenarios; the
    // guest is not running.
    unsafe { (hpa as *mut u32).write_volatile(v) }
}

/// The invalidation after a change of the range's translation structure.
fn inv_range(arch: Arch, gpa: u64) -> Invalidate {
    match arch {
        Arch::Vmx => Invalidate::Page(gpa),
        Arch::Svm => Invalidate::All,
    }
}

/// Map the range `g` with 512 small leaves onto host run `host` (RW, WB).
fn map_small(env: &mut Env, g: u64, host: u64) {
    env.table.populate_region(Gpa(g), M2, PageSize::Size4K).expect("populate 4K range");
    for i in 0..PAGES {
        env.table
            .map(Gpa(g + i * 4096), Pfn((host >> 12) + i), PageSize::Size4K, Prot::RW, MemType::WriteBack)
            .expect("map 4K leaf");
    }
}

/// Give every page of host run `host` its value, or the decoy where the
/// guest is to write the value.
fn fill(tag: u32, host: u64, guest_writes: &dyn Fn(u64) -> bool) {
    for i in 0..PAGES {
        poke(word(host, i), if guest_writes(i) { decoy(tag, i) } else { value(tag, i) });
    }
}

/// The guest reads pages `from..to` of the range at `g` in one run and
/// must find each page's value.
#[allow(clippy::too_many_arguments)]
fn scan(suite: &mut Suite, s: &mut Scenario, env: &Env, g: u64, tag: u32, from: u64, to: u64, inv: Invalidate) {
    suite.scan(s, env, word(g, from), (to - from) as u32, value(tag, from), inv);
}

/// Every page of `[g, g+2M)` translates (in software) to frame `host + i`
/// through a leaf of `size`.
fn check_leaves(suite: &mut Suite, s: &mut Scenario, env: &Env, g: u64, host: u64, size: PageSize) {
    for i in 0..PAGES {
        let gpa = g + i * 4096;
        match env.table.lookup(Gpa(gpa)) {
            Some(l) if l.size == size && l.pfn_of(Gpa(gpa)) == Some(Pfn((host >> 12) + i)) => {}
            other => {
                suite.diff(s, format_args!("{gpa:#x}: leaf {other:x?}, expected a {size:?} leaf onto {host:#x}+{i}*4K"));
                return;
            }
        }
    }
}

/// Harvest the range and compare with the pages expected dirty.
fn harvest(suite: &mut Suite, s: &mut Scenario, env: &Env, g: u64, dirty: &dyn Fn(u64) -> bool, what: &str) {
    let mut bm = [0u64; (PAGES / 64) as usize];
    let n = env.table.harvest_dirty(Gpa(g), M2, &mut bm);
    let mut want = [0u64; (PAGES / 64) as usize];
    let mut count = 0;
    if env.ad {
        for i in (0..PAGES).filter(|&i| dirty(i)) {
            want[(i / 64) as usize] |= 1 << (i % 64);
            count += 1;
        }
    }
    if n != Ok(count) || bm != want {
        // The pages on which the bitmap is wrong (the first few).
        let wrong: Vec<u64> =
            (0..PAGES).filter(|&i| (bm[(i / 64) as usize] ^ want[(i / 64) as usize]) & (1 << (i % 64)) != 0).collect();
        suite.diff(
            s,
            format_args!(
                "harvest {what}: {n:?}, expected Ok({count}); {} page(s) wrong in the bitmap, first {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(8)]
            ),
        );
    }
}

/// Run the promotion and demotion scenarios on a table of `fmt` (EPTP bit
/// 6 = `ad`); on VMX also in the emulated-A/D format of `caps`.
pub fn run(suite: &mut Suite, caps: Caps, fmt: PteFormat, ad: bool) {
    const NAMES: [&str; 8] = [
        "promote-2m",
        "promote-2m-clean",
        "demote-2m",
        "demote-2m-clean",
        "promote-2m-refused",
        "promote-demote-emulated-ad",
        "demote-1g",
        "promote-1g",
    ];
    if !fmt.supports(PageSize::Size2M) {
        for n in NAMES {
            suite.skip(n, "CPU model has no 2 MiB nested pages");
        }
        return;
    }
    if !ad {
        crate::kprintln!(
            "INFO promote/demote: EPT without A/D: the CPU sets no A/D bits, so the carried state is checked as none \
             (promote-demote-emulated-ad checks it in the emulated-A/D format)"
        );
    }
    let mut env = Env::new(fmt, ad);
    promote(suite, &mut env, false);
    promote(suite, &mut env, true);
    demote(suite, &mut env, false);
    demote(suite, &mut env, true);
    refused(suite, &mut env);
    if fmt.supports(PageSize::Size1G) {
        demote_1g(suite, &mut env);
        promote_1g(suite, &mut env);
    } else {
        suite.skip("demote-1g", "CPU model has no 1 GiB nested pages");
        suite.skip("promote-1g", "CPU model has no 1 GiB nested pages");
    }
    if suite.arch == Arch::Vmx {
        emulated(suite, caps);
    } else {
        suite.skip("promote-demote-emulated-ad", "EPT only (NPT always has hardware A/D)");
    }
}

/// `promote-2m` (`clean` false): the guest writes every 32nd page and
/// reads the two after each, the other 464 pages stay untouched; the 2 MiB
/// leaf must be accessed and dirty. `promote-2m-clean`: reads of every 64th
/// page only; the leaf must be accessed and clean, and the guest's first
/// write after the promotion (through the 2 MiB translation it has just
/// cached) must set D on it.
fn promote(suite: &mut Suite, env: &mut Env, clean: bool) {
    let (name, g, host, tag) = if clean {
        ("promote-2m-clean", G_PROMOTE_CLEAN, run_base(2), 2)
    } else {
        ("promote-2m", G_PROMOTE, run_base(1), 1)
    };
    let mut s = suite.begin(name);
    map_small(env, g, host);
    let writes = |i: u64| !clean && i.is_multiple_of(32);
    let reads = |i: u64| if clean { i.is_multiple_of(64) } else { (1..3).contains(&(i % 32)) };
    fill(tag, host, &writes);
    // Before: through the small leaves.
    let mut inv = Invalidate::All;
    for i in 0..PAGES {
        if writes(i) {
            suite.access_data(&mut s, env, Op::Write, word(g, i), inv, Expect::Ok, Data::Write(value(tag, i)));
        } else if reads(i) {
            suite.access_data(&mut s, env, Op::Read, word(g, i), inv, Expect::Ok, Data::Read(value(tag, i)));
        } else {
            continue;
        }
        inv = Invalidate::None;
    }
    // The A/D state of each small leaf, and what the large one must carry.
    let (mut any_a, mut any_d) = (false, false);
    for i in 0..PAGES {
        let gpa = g + i * 4096;
        suite.expect_ad(&mut s, env, gpa, writes(i) || reads(i), writes(i));
        if let Some(l) = env.table.lookup(Gpa(gpa)) {
            any_a |= l.accessed();
            any_d |= l.dirty();
        }
    }
    let leaf_table = env.table.walk(Gpa(g)).steps().iter().find(|st| st.level == 1).map(|st| st.table);
    let tables = env.table.table_pages();
    match env.table.promote_2m(Gpa(g)) {
        Ok(freed) if Some(freed) == leaf_table && env.table.table_pages() + 1 == tables => {}
        r => suite.diff(
            &mut s,
            format_args!("promote_2m: {r:?}, expected Ok({leaf_table:?}) and one table page fewer than {tables}"),
        ),
    }
    check_leaves(suite, &mut s, env, g, host, PageSize::Size2M);
    match env.table.lookup(Gpa(g)) {
        Some(l) if l.accessed() == any_a && l.dirty() == any_d => {}
        l => suite.diff(&mut s, format_args!("2M leaf {l:x?}: A/D must be the small leaves' OR {any_a}/{any_d}")),
    }
    suite.expect_ad(&mut s, env, g, true, !clean);
    // After: the same values through the 2 MiB leaf, every page.
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(suite.arch, g));
    suite.expect_ad(&mut s, env, g, true, !clean);
    let k = 5;
    let v = decoy(tag, k) ^ 0x00F0_0000;
    if clean {
        // The scan cached the 2 MiB translation without D.
        suite.access_data(&mut s, env, Op::Write, word(g, k), Invalidate::None, Expect::Ok, Data::Write(v));
    } else {
        // The large leaf is dirty: harvest it (all 512 pages), then the
        // write after the page's invalidation must set D again.
        harvest(suite, &mut s, env, g, &|_| true, "of the promoted dirty leaf");
        suite.expect_ad(&mut s, env, g, true, false);
        suite.access_data(&mut s, env, Op::Write, word(g, k), Invalidate::Page(word(g, k)), Expect::Ok, {
            Data::Write(v)
        });
    }
    suite.expect_ad(&mut s, env, g, true, true);
    suite.access_data(&mut s, env, Op::Read, word(g, k), Invalidate::None, Expect::Ok, Data::Read(v));
    harvest(suite, &mut s, env, g, &|_| true, "after the write through the 2M leaf");
    suite.end(s);
}

/// `demote-2m` (`clean` false): the guest writes every 64th page through a
/// 2 MiB leaf (accessed and dirty); `demote-2m-clean`: it reads one page
/// (accessed, clean). After `demote_2m` each of the 512 small leaves must
/// carry the large leaf's A/D, the guest reads the same values through
/// them, and after a harvest a guest write to one page makes the next
/// harvest report exactly that page.
fn demote(suite: &mut Suite, env: &mut Env, clean: bool) {
    let (name, g, host, tag) = if clean {
        ("demote-2m-clean", G_DEMOTE_CLEAN, run_base(4), 4)
    } else {
        ("demote-2m", G_DEMOTE, run_base(3), 3)
    };
    let mut s = suite.begin(name);
    env.table.populate_region(Gpa(g), M2, PageSize::Size2M).expect("populate 2M range");
    env.table.map(Gpa(g), Pfn(host >> 12), PageSize::Size2M, Prot::RW, MemType::WriteBack).expect("map 2M leaf");
    let writes = |i: u64| !clean && i.is_multiple_of(64);
    fill(tag, host, &writes);
    if clean {
        suite.access_data(&mut s, env, Op::Read, word(g, 3), Invalidate::All, Expect::Ok, Data::Read(value(tag, 3)));
    } else {
        for i in (0..PAGES).filter(|&i| writes(i)) {
            let inv = if i == 0 { Invalidate::All } else { Invalidate::None };
            suite.access_data(&mut s, env, Op::Write, word(g, i), inv, Expect::Ok, Data::Write(value(tag, i)));
        }
    }
    suite.expect_ad(&mut s, env, g, true, !clean);
    let (large_a, large_d) = env.table.lookup(Gpa(g)).map(|l| (l.accessed(), l.dirty())).unwrap_or_default();
    let tables = env.table.table_pages();
    match env.table.demote_2m(Gpa(g)) {
        Ok(()) if env.table.table_pages() == tables + 1 => {}
        r => suite.diff(&mut s, format_args!("demote_2m: {r:?}, table pages {} (were {tables})", env.table.table_pages())),
    }
    check_leaves(suite, &mut s, env, g, host, PageSize::Size4K);
    // Each small leaf carries the large leaf's state.
    for i in 0..PAGES {
        let gpa = g + i * 4096;
        match env.table.lookup(Gpa(gpa)) {
            Some(l) if l.accessed() == large_a && l.dirty() == large_d => {}
            l => {
                suite.diff(&mut s, format_args!("{gpa:#x}: {l:x?} must carry the 2M leaf's A/D {large_a}/{large_d}"));
                break;
            }
        }
        suite.expect_ad(&mut s, env, gpa, true, !clean);
    }
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(suite.arch, g));
    // A dirty large leaf made every small one dirty: the harvest cannot
    // tell which 4 KiB were written.
    harvest(suite, &mut s, env, g, &|_| !clean, "after the demotion");
    let k = if clean { 300 } else { 77 };
    // Clean case: the scan cached page k without D. Dirty case: it cached
    // it with D, which the harvest cleared, so invalidate the page.
    let inv = if clean { Invalidate::None } else { Invalidate::Page(word(g, k)) };
    let v = decoy(tag, k);
    suite.access_data(&mut s, env, Op::Write, word(g, k), inv, Expect::Ok, Data::Write(v));
    for i in [k - 1, k, k + 1] {
        suite.expect_ad(&mut s, env, g + i * 4096, true, i == k);
    }
    harvest(suite, &mut s, env, g, &|i| i == k, "after a write to one page");
    suite.access_data(&mut s, env, Op::Read, word(g, k), Invalidate::None, Expect::Ok, Data::Read(v));
    suite.end(s);
}

/// `demote-1g`: a 1 GiB leaf onto host 0..1 GiB; the guest writes every
/// 64th page of the 2 MiB at TEST_BASE through it and reads one. After
/// `demote_1g` each of the 512 2 MiB leaves must map its part of the run
/// with the 1 GiB leaf's A/D, the guest reads the same values through
/// them, a harvest of that 2 MiB and of the next one (never touched)
/// reports every page when the 1 GiB leaf was dirty (the dirty bit is
/// carried to each part). Then `demote_2m` of the first one: its small
/// leaves carry its (now clean) state, and after a guest write to page 77
/// the next harvest reports exactly that page: translations and A/D stay
/// exact down the whole 1 GiB → 2 MiB → 4 KiB chain.
fn demote_1g(suite: &mut Suite, env: &mut Env) {
    let tag = 8;
    let host = run_base(0);
    let g = G_1G + host;
    let arch = suite.arch;
    let mut s = suite.begin("demote-1g");
    env.table.populate_region(Gpa(G_1G), G1, PageSize::Size1G).expect("populate 1G range");
    env.table.map(Gpa(G_1G), Pfn(0), PageSize::Size1G, Prot::RW, MemType::WriteBack).expect("map 1G leaf");
    let writes = |i: u64| i.is_multiple_of(64);
    fill(tag, host, &writes);
    // The next 2 MiB holds its values for the scan after the demotion.
    fill(tag + 1, host + M2, &|_| false);
    for i in (0..PAGES).filter(|&i| writes(i)) {
        let inv = if i == 0 { Invalidate::All } else { Invalidate::None };
        suite.access_data(&mut s, env, Op::Write, word(g, i), inv, Expect::Ok, Data::Write(value(tag, i)));
    }
    suite.access_data(&mut s, env, Op::Read, word(g, 3), Invalidate::None, Expect::Ok, Data::Read(value(tag, 3)));
    suite.expect_ad(&mut s, env, g, true, true);
    let (large_a, large_d) = env.table.lookup(Gpa(G_1G)).map(|l| (l.accessed(), l.dirty())).unwrap_or_default();
    let tables = env.table.table_pages();
    match env.table.demote_1g(Gpa(G_1G)) {
        Ok(()) if env.table.table_pages() == tables + 1 => {}
        r => suite.diff(&mut s, format_args!("demote_1g: {r:?}, table pages {} (were {tables})", env.table.table_pages())),
    }
    // Every 2 MiB part: a 2 MiB leaf onto its part of host 0..1 GiB with
    // the 1 GiB leaf's A/D.
    for k in 0..PAGES {
        let gpa = G_1G + k * M2;
        match env.table.lookup(Gpa(gpa)) {
            Some(l)
                if l.size == PageSize::Size2M
                    && l.pfn_of(Gpa(gpa)) == Some(Pfn(k * PAGES))
                    && l.accessed() == large_a
                    && l.dirty() == large_d => {}
            l => {
                suite.diff(
                    &mut s,
                    format_args!("{gpa:#x}: {l:x?}, expected a 2M leaf onto {:#x} with A/D {large_a}/{large_d}", k * M2),
                );
                break;
            }
        }
    }
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(arch, g));
    scan(suite, &mut s, env, g + M2, tag + 1, 0, PAGES, Invalidate::None);
    harvest(suite, &mut s, env, g, &|_| true, "of a part of the demoted dirty 1G leaf");
    harvest(suite, &mut s, env, g + M2, &|_| true, "of an untouched part of the demoted dirty 1G leaf");
    suite.expect_ad(&mut s, env, g, true, false);
    // Down to 4 KiB.
    let tables = env.table.table_pages();
    match env.table.demote_2m(Gpa(g)) {
        Ok(()) if env.table.table_pages() == tables + 1 => {}
        r => suite.diff(&mut s, format_args!("demote_2m: {r:?}, table pages {} (were {tables})", env.table.table_pages())),
    }
    check_leaves(suite, &mut s, env, g, host, PageSize::Size4K);
    for i in [0, 76, 77, 78, 511] {
        suite.expect_ad(&mut s, env, g + i * 4096, true, false);
    }
    let k = 77;
    let v = decoy(tag, k) ^ 0x00F0_0000;
    suite.access_data(&mut s, env, Op::Write, word(g, k), inv_range(arch, g), Expect::Ok, Data::Write(v));
    for i in [k - 1, k, k + 1] {
        suite.expect_ad(&mut s, env, g + i * 4096, true, i == k);
    }
    harvest(suite, &mut s, env, g, &|i| i == k, "after a write to one page of the 4K leaves");
    suite.access_data(&mut s, env, Op::Read, word(g, k), Invalidate::None, Expect::Ok, Data::Read(v));
    // The rest of the 1 GiB still translates through its 2 MiB leaves.
    check_leaves(suite, &mut s, env, g + M2, host + M2, PageSize::Size2M);
    suite.end(s);
}

/// `promote-1g`, on the state `demote-1g` leaves (the 2 MiB at TEST_BASE
/// in 4 KiB leaves, page 77 rewritten, the other 511 parts 2 MiB leaves):
/// `promote_1g` is refused with `Hole` while one part is a leaf table, and
/// changes no table word; `promote_2m` of that part and then `promote_1g`
/// make one 1 GiB leaf onto host 0..1 GiB again, the level-2 table freed.
/// Before, every 2 MiB leaf is made clean and not accessed, and the guest
/// reads one page of the second part: the 1 GiB leaf must be accessed and
/// clean. After the invalidation the guest reads every page of both parts
/// through it (the same translation), a write sets D on the 1 GiB leaf and
/// a harvest of the GiB reports all of its pages (one dirty bit stands for
/// the whole leaf) and leaves it clean.
fn promote_1g(suite: &mut Suite, env: &mut Env) {
    let (tag, host) = (8, run_base(0));
    let g = G_1G + host;
    let arch = suite.arch;
    let mut s = suite.begin("promote-1g");
    let k77 = decoy(tag, 77) ^ 0x00F0_0000;
    let tables = env.table.table_pages();
    match env.table.promote_1g(Gpa(G_1G)) {
        Err(PromoteRefusal::Hole) if env.table.table_pages() == tables => {}
        r => suite.diff(&mut s, format_args!("promote_1g over a leaf table: {r:?}, expected Err(Hole)")),
    }
    check_leaves(suite, &mut s, env, g, host, PageSize::Size4K);
    if let Err(r) = env.table.promote_2m(Gpa(g)) {
        suite.diff(&mut s, format_args!("promote_2m of the 4 KiB part: {r:?}"));
    }
    // Every 2 MiB leaf clean and not accessed, then one read.
    for k in 0..PAGES {
        if let Some(l) = env.table.lookup(Gpa(G_1G + k * M2)) {
            l.reset_accessed(false);
            l.reset_dirty(false);
        }
    }
    suite.access_data(&mut s, env, Op::Read, word(g + M2, 5), Invalidate::All, Expect::Ok, Data::Read(value(tag + 1, 5)));
    suite.expect_ad(&mut s, env, g + M2, true, false);
    suite.expect_ad(&mut s, env, g, false, false);
    let tables = env.table.table_pages();
    match env.table.promote_1g(Gpa(G_1G)) {
        Ok(_) if env.table.table_pages() + 1 == tables => {}
        r => suite.diff(&mut s, format_args!("promote_1g: {r:?}, table pages {} (were {tables})", env.table.table_pages())),
    }
    match env.table.lookup(Gpa(g + 300 * 4096)) {
        Some(l) if l.size == PageSize::Size1G && l.gpa == Gpa(G_1G) && l.pfn_of(Gpa(G_1G)) == Some(Pfn(0)) => {}
        l => suite.diff(&mut s, format_args!("after promote_1g: {l:x?}, expected a 1G leaf onto host 0")),
    }
    suite.expect_ad(&mut s, env, g, true, false);
    // The same values through the 1 GiB leaf.
    scan(suite, &mut s, env, g, tag, 0, 77, inv_range(arch, g));
    suite.access_data(&mut s, env, Op::Read, word(g, 77), Invalidate::None, Expect::Ok, Data::Read(k77));
    scan(suite, &mut s, env, g, tag, 78, PAGES, Invalidate::None);
    scan(suite, &mut s, env, g + M2, tag + 1, 0, PAGES, Invalidate::None);
    suite.expect_ad(&mut s, env, g, true, false);
    let v = value(tag, 9) ^ 0x0A00_0000;
    suite.access_data(&mut s, env, Op::Write, word(g, 9), Invalidate::None, Expect::Ok, Data::Write(v));
    suite.expect_ad(&mut s, env, g, true, true);
    // A harvest takes the large leaf whole: all 262,144 pages.
    let mut bm = alloc::vec![0u64; (G1 / 4096 / 64) as usize];
    let n = env.table.harvest_dirty(Gpa(G_1G), G1, &mut bm);
    let want = if env.ad { G1 / 4096 } else { 0 };
    let ones = bm.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    if n != Ok(want) || ones != want {
        suite.diff(&mut s, format_args!("harvest of the written 1G leaf: {n:?} ({ones} bits), expected Ok({want})"));
    }
    suite.expect_ad(&mut s, env, g, true, false);
    suite.access_data(&mut s, env, Op::Read, word(g, 9), inv_range(arch, g), Expect::Ok, Data::Read(v));
    suite.end(s);
}

/// `promote-2m-refused`: promotion of a range whose run is not contiguous
/// (page 7 maps a frame of another run), then with a hole (page 300
/// unmapped), then with mixed protection (page 300 read-only) must be
/// refused with the matching reason and change no table word; the guest
/// reads every page the same before and after each (for page 7, the other
/// run's frame: the contiguous one holds a decoy). With the range made
/// uniform the promotion then succeeds and the values are still the same
/// (the refused write to the read-only page changed nothing).
fn refused(suite: &mut Suite, env: &mut Env) {
    let (g, host, tag) = (G_REFUSED, run_base(5), 5);
    let arch = suite.arch;
    let odd = run_base(6) + 7 * 4096;
    let mut s = suite.begin("promote-2m-refused");
    map_small(env, g, host);
    fill(tag, host, &|i| i == 7);
    // Page 7 onto a frame of another run, holding page 7's value.
    let p7 = g + 7 * 4096;
    env.table.unmap(Gpa(p7)).expect("unmap page 7");
    env.table.map(Gpa(p7), Pfn(odd >> 12), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("map page 7");
    poke(word(odd - 7 * 4096, 7), value(tag, 7));

    scan(suite, &mut s, env, g, tag, 0, PAGES, Invalidate::All);
    attempt(suite, &mut s, env, g, PromoteRefusal::NotContiguous);
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(arch, g));

    // Page 7 back in the run (its frame now holding the value), page 300
    // unmapped.
    poke(word(host, 7), value(tag, 7));
    env.table.unmap(Gpa(p7)).expect("unmap page 7");
    env.table.map(Gpa(p7), Pfn((host >> 12) + 7), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("map 7");
    let p300 = g + 300 * 4096;
    env.table.unmap(Gpa(p300)).expect("unmap page 300");
    suite.access(&mut s, env, Op::Read, word(g, 300), inv_range(arch, g), Expect::Fault(NotPresent));
    attempt(suite, &mut s, env, g, PromoteRefusal::Hole);
    suite.access(&mut s, env, Op::Read, word(g, 300), inv_range(arch, g), Expect::Fault(NotPresent));
    scan(suite, &mut s, env, g, tag, 0, 300, Invalidate::None);
    scan(suite, &mut s, env, g, tag, 301, PAGES, Invalidate::None);

    // Page 300 back, read-only.
    env.table.map(Gpa(p300), Pfn((host >> 12) + 300), PageSize::Size4K, Prot::READ, MemType::WriteBack).expect("RO");
    attempt(suite, &mut s, env, g, PromoteRefusal::Mixed);
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(arch, g));
    let w = Data::Write(decoy(tag, 300));
    suite.access_data(&mut s, env, Op::Write, word(g, 300), Invalidate::None, Expect::Fault(Permission), w);

    // Uniform again: the promotion goes through, same values.
    env.table.unmap(Gpa(p300)).expect("unmap page 300");
    env.table.map(Gpa(p300), Pfn((host >> 12) + 300), PageSize::Size4K, Prot::RW, MemType::WriteBack).expect("RW");
    if let Err(r) = env.table.promote_2m(Gpa(g)) {
        suite.diff(&mut s, format_args!("promote_2m of the repaired range refused: {r:?}"));
    }
    check_leaves(suite, &mut s, env, g, host, PageSize::Size2M);
    scan(suite, &mut s, env, g, tag, 0, PAGES, inv_range(arch, g));
    suite.expect_ad(&mut s, env, g, true, false);
    suite.end(s);
}

/// Try to promote `[g, g+2M)`, which must be refused with `want` without
/// changing any table word.
fn attempt(suite: &mut Suite, s: &mut Scenario, env: &mut Env, g: u64, want: PromoteRefusal) {
    let before = env.table_words();
    let r = env.table.promote_2m(Gpa(g));
    if r != Err(want) {
        suite.diff(s, format_args!("promote_2m: {r:?}, expected Err({want:?})"));
    }
    if env.table_words() != before {
        suite.diff(s, format_args!("refused promotion ({want:?}) changed table words"));
    }
}

/// One guest access in the emulated-A/D format: when it exits (the first
/// access, or the first write, since the leaf was last cleared), the kernel
/// records it with `record_access` as a hypervisor's fault handler would
/// and resumes the guest, which must then complete. `first` is what the
/// first run must do.
#[allow(clippy::too_many_arguments)]
fn emu_access(
    suite: &mut Suite,
    s: &mut Scenario,
    env: &Env,
    op: Op,
    gpa: u64,
    inv: Invalidate,
    first: Expect,
    data: Data,
) {
    let e = suite.access_data(s, env, op, gpa, inv, first, data);
    if matches!(e, Exit::EptViolation { .. }) {
        let acc = if op == Op::Write { Access::Write } else { Access::Read };
        if env.table.record_access(Gpa(gpa), acc) != Ok(true) {
            suite.diff(s, format_args!("record_access({gpa:#x}, {acc:?}) refused"));
        }
        suite.resume(s, env, op, gpa, Expect::Ok);
    }
}

/// `promote-demote-emulated-ad` (EPT, both CPU models): the same in the
/// emulated-A/D format, where accessed is the hardware R/X bits and dirty
/// the hardware W bit or software bit 55, so A/D carried over is visible
/// on the Ivy Bridge model too. The guest writes pages 0 and 64 and reads
/// pages 1 and 200 of 512 small leaves (each first access exits and is
/// recorded); after `promote_2m` the 2 MiB leaf must read accessed and
/// dirty and the guest scans every page without an exit (its R bit
/// carried). A write through it may exit once (dirty is carried in
/// software bit 55, hardware W is granted by the next recorded write).
/// Then `demote_2m` of that leaf: each small leaf must be accessed and
/// dirty, the scan runs without an exit, a harvest reports all 512 pages,
/// and after a write to page 77 (which exits: the harvest took W away) the
/// next harvest reports exactly page 77.
fn emulated(suite: &mut Suite, caps: Caps) {
    let (g, host, tag) = (G_PROMOTE, run_base(7), 7);
    let mut s = suite.begin("promote-demote-emulated-ad");
    let mut env = Env::new(PteFormat::ept_emulated_ad(caps), false);
    let code = crate::guest::code_page();
    for a in [Access::Execute, Access::Read] {
        if env.table.record_access(Gpa(code), a) != Ok(true) {
            suite.diff(&mut s, format_args!("record_access on the code page refused"));
        }
    }
    map_small(&mut env, g, host);
    let writes = |i: u64| i == 0 || i == 64;
    let reads = |i: u64| i == 1 || i == 200;
    fill(tag, host, &writes);
    for i in (0..PAGES).filter(|&i| writes(i)) {
        let d = Data::Write(value(tag, i));
        emu_access(suite, &mut s, &env, Op::Write, word(g, i), Invalidate::All, Expect::Fault(NotPresent), d);
    }
    for i in (0..PAGES).filter(|&i| reads(i)) {
        let d = Data::Read(value(tag, i));
        emu_access(suite, &mut s, &env, Op::Read, word(g, i), Invalidate::None, Expect::Fault(NotPresent), d);
    }
    for i in 0..PAGES {
        suite.expect_ad(&mut s, &env, g + i * 4096, writes(i) || reads(i), writes(i));
    }
    if let Err(r) = env.table.promote_2m(Gpa(g)) {
        suite.diff(&mut s, format_args!("promote_2m refused: {r:?}"));
    }
    check_leaves(suite, &mut s, &env, g, host, PageSize::Size2M);
    suite.expect_ad(&mut s, &env, g, true, true);
    scan(suite, &mut s, &env, g, tag, 0, PAGES, Invalidate::Page(g));
    let k = 5;
    let v = decoy(tag, k) ^ 0x00F0_0000;
    let e = suite.access_data(&mut s, &env, Op::Write, word(g, k), Invalidate::None, Expect::Fault(Permission), {
        Data::Write(v)
    });
    if matches!(e, Exit::EptViolation { .. }) {
        let _ = env.table.record_access(Gpa(word(g, k)), Access::Write);
        suite.resume(&mut s, &env, Op::Write, word(g, k), Expect::Ok);
    }
    suite.expect_ad(&mut s, &env, g, true, true);
    // Put page 5's value back for the scans.
    poke(word(host, k), value(tag, k));

    if let Err(e) = env.table.demote_2m(Gpa(g)) {
        suite.diff(&mut s, format_args!("demote_2m: {e:?}"));
    }
    check_leaves(suite, &mut s, &env, g, host, PageSize::Size4K);
    for i in 0..PAGES {
        suite.expect_ad(&mut s, &env, g + i * 4096, true, true);
    }
    scan(suite, &mut s, &env, g, tag, 0, PAGES, Invalidate::Page(g));
    let mut bm = [0u64; (PAGES / 64) as usize];
    let n = env.table.harvest_dirty(Gpa(g), M2, &mut bm);
    if n != Ok(PAGES) || bm.iter().any(|w| *w != u64::MAX) {
        suite.diff(&mut s, format_args!("emulated harvest after the demotion: {n:?}, expected all 512"));
    }
    let k = 77;
    let d = Data::Write(decoy(tag, k));
    emu_access(suite, &mut s, &env, Op::Write, word(g, k), Invalidate::Page(g), Expect::Fault(Permission), d);
    let mut bm = [0u64; (PAGES / 64) as usize];
    let n = env.table.harvest_dirty(Gpa(g), M2, &mut bm);
    let mut want = [0u64; (PAGES / 64) as usize];
    want[(k / 64) as usize] = 1 << (k % 64);
    if n != Ok(1) || bm != want {
        suite.diff(&mut s, format_args!("emulated harvest after a write to page {k}: {n:?} {bm:x?}"));
    }
    suite.end(s);
}
