//! The scenarios. Guest-physical layout (the guest runs with paging off, so
//! every address is below 4 GiB):
//!
//! | GPA                       | what                                   | host frames            |
//! |---------------------------|----------------------------------------|------------------------|
//! | guest code page (~0xD000) | the guest stubs, identity, 4 KiB RWX   | the kernel image       |
//! | 0x0040_0000 + i*4K        | 4 KiB test pages (PDE 2)               | TEST_BASE + i*4K       |
//! | 0x0080_0000 + j*2M        | 2 MiB test pages (PDEs 4..10)          | TEST_BASE + (j+1)*2M   |
//! | 0x0140_0000               | PDE 10: never populated (level-2 hole) | —                      |
//! | 0x4000_0000               | one 1 GiB page (PDPTE 1)               | host 0..1 GiB          |
//! | 0x8000_0000               | PDPTE 2: never populated (level 3 hole)| —                      |
//!
//! The promotion and demotion scenarios (`promote.rs`) run last, in
//! tables of their own.
//!
//! The code page shares only the PML4E and the PDPTE of GiB 0 with the test
//! pages; those entries' A bits are set by every code fetch and the model
//! replays that fetch, so they are compared like every other word.

use nested_pt::mmu::ViolationKind::{Misconfig, NotPresent, Permission, Reserved};
use nested_pt::{Access, Caps, Gpa, MemType, PageSize, Pfn, Prot, PteFormat};

use crate::guest::Op;
use crate::hv::{Exit, Invalidate};
use crate::layout::TEST_BASE;
use crate::suite::{Arch, Env, Expect, Suite};

const T4K: u64 = 0x0040_0000;
const T2M: u64 = 0x0080_0000;
const HOLE_L2: u64 = 0x0140_0000;
const T1G: u64 = 0x4000_0000;
const HOLE_L3: u64 = 0x8000_0000;
/// Offset inside the 1 GiB page whose host frames are test frames.
const G1_OFF: u64 = TEST_BASE + 0x00F0_0000;

const ALL: Invalidate = Invalidate::All;
const OK: Expect = Expect::Ok;

fn fault(k: nested_pt::mmu::ViolationKind) -> Expect {
    Expect::Fault(k)
}

/// The mappings under test, handed out in order.
struct Slots {
    next4k: u64,
    next2m: u64,
}

impl Slots {
    fn page4k(&mut self, env: &Env, prot: Prot) -> u64 {
        let i = self.next4k;
        self.next4k += 1;
        assert!(i < 256, "out of 4K test slots");
        let gpa = T4K + i * 4096;
        env.table
            .map(Gpa(gpa), Pfn((TEST_BASE >> 12) + i), PageSize::Size4K, prot, MemType::WriteBack)
            .expect("map 4K test page");
        gpa
    }
    fn page2m(&mut self, env: &Env, prot: Prot) -> u64 {
        let j = self.next2m;
        self.next2m += 1;
        assert!(j < 6, "out of 2M test slots");
        let gpa = T2M + j * (2 << 20);
        let host = TEST_BASE + (j + 1) * (2 << 20);
        env.table.map(Gpa(gpa), Pfn(host >> 12), PageSize::Size2M, prot, MemType::WriteBack).expect("map 2M test page");
        gpa
    }
}

fn map1g(env: &Env, prot: Prot) -> u64 {
    let _ = env.table.unmap(Gpa(T1G));
    env.table.map(Gpa(T1G), Pfn(0), PageSize::Size1G, prot, MemType::WriteBack).expect("map 1G test page");
    T1G
}

/// Clear the accessed bit in every present entry on the walk of `gpa`
/// (the code fetch sets the shared upper ones again, and the model replays
/// it), so that what a faulting walk sets becomes visible.
fn clear_walk_a(env: &Env, gpa: u64) {
    let a = env.table.format().accessed_mask();
    for s in env.table.walk(Gpa(gpa)).steps() {
        if env.table.format().is_present(s.entry) {
            env.set_entry(gpa, s.level, s.entry & !a);
        }
    }
}

fn populate(env: &mut Env, caps: &Caps) {
    let t = &mut env.table;
    t.populate_region(Gpa(T4K), 2 << 20, PageSize::Size4K).expect("populate 4K region");
    t.populate_region(Gpa(T2M), 12 << 20, PageSize::Size2M).expect("populate 2M region");
    if caps.page_1g {
        t.populate_region(Gpa(T1G), 1 << 30, PageSize::Size1G).expect("populate 1G region");
    }
}

/// Run every scenario for `arch` with the capabilities `caps`.
pub fn run(suite: &mut Suite, caps: Caps, ept_ad: bool) {
    let arch = suite.arch;
    let fmt = match arch {
        Arch::Svm => PteFormat::npt(caps),
        Arch::Vmx => PteFormat::ept(caps),
    };
    // Hardware A/D on (EPTP bit 6 for EPT; always for NPT).
    let mut env = Env::new(fmt, arch == Arch::Svm || ept_ad);
    populate(&mut env, &caps);
    let mut slots = Slots { next4k: 0, next2m: 0 };

    // ---- mappings of each size: read, write, fetch; A/D after each.
    for (name, size) in [("map-4k", PageSize::Size4K), ("map-2m", PageSize::Size2M), ("map-1g", PageSize::Size1G)] {
        if size == PageSize::Size1G && !caps.page_1g {
            suite.skip(name, "CPU model has no 1 GiB pages");
            continue;
        }
        let mut s = suite.begin(name);
        let (a, b, c) = match size {
            PageSize::Size4K => {
                (slots.page4k(&env, Prot::RWX), slots.page4k(&env, Prot::RWX), slots.page4k(&env, Prot::RWX))
            }
            PageSize::Size2M => {
                let g = slots.page2m(&env, Prot::RWX);
                (g + 0x1000, g + 0x2000, g + 0x3000)
            }
            PageSize::Size1G => {
                let g = map1g(&env, Prot::RWX);
                (g + G1_OFF, g + G1_OFF + 0x1000, g + G1_OFF + 0x2000)
            }
        };
        // Three pages of 4K, or three offsets in one large page (whose A/D
        // bits are shared): expectations follow the leaf.
        let large = size != PageSize::Size4K;
        suite.access(&mut s, &env, Op::Read, a, ALL, OK);
        suite.expect_ad(&mut s, &env, a, true, false);
        suite.access(&mut s, &env, Op::Write, a, ALL, OK);
        suite.expect_ad(&mut s, &env, a, true, true);
        suite.access(&mut s, &env, Op::Exec, b, ALL, OK);
        suite.expect_ad(&mut s, &env, b, true, large);
        suite.access(&mut s, &env, Op::Write, c, ALL, OK);
        suite.expect_ad(&mut s, &env, c, true, true);
        suite.end(s);
    }

    // ---- read-only and non-executable, at each size.
    for (name, size, prot, bad, good) in [
        ("ro-4k", PageSize::Size4K, Prot::RX, Op::Write, Op::Read),
        ("ro-2m", PageSize::Size2M, Prot::RX, Op::Write, Op::Read),
        ("ro-1g", PageSize::Size1G, Prot::RX, Op::Write, Op::Read),
        ("nx-4k", PageSize::Size4K, Prot::RW, Op::Exec, Op::Read),
        ("nx-2m", PageSize::Size2M, Prot::RW, Op::Exec, Op::Read),
        ("nx-1g", PageSize::Size1G, Prot::RW, Op::Exec, Op::Write),
    ] {
        if size == PageSize::Size1G && !caps.page_1g {
            suite.skip(name, "CPU model has no 1 GiB pages");
            continue;
        }
        let mut s = suite.begin(name);
        let g = match size {
            PageSize::Size4K => slots.page4k(&env, prot),
            PageSize::Size2M => slots.page2m(&env, prot) + 0x5000,
            PageSize::Size1G => map1g(&env, prot) + G1_OFF + 0x5000,
        };
        // The fault first, on a fresh leaf, with A clear in every entry
        // of the walk: what a faulting walk sets is compared too.
        clear_walk_a(&env, g);
        suite.access(&mut s, &env, bad, g, ALL, fault(Permission));
        suite.access(&mut s, &env, good, g, ALL, OK);
        suite.expect_ad(&mut s, &env, g, true, good == Op::Write);
        suite.access(&mut s, &env, bad, g, ALL, fault(Permission));
        suite.end(s);
    }
    if caps.page_1g {
        let _ = env.table.unmap(Gpa(T1G));
    }

    // ---- not present at levels 1, 2, 3 (data), and 4 (the code fetch).
    {
        let mut s = suite.begin("not-present-l1");
        let g = T4K + 511 * 4096; // populated table, empty slot
        for op in [Op::Read, Op::Write, Op::Exec] {
            clear_walk_a(&env, g);
            suite.access(&mut s, &env, op, g, ALL, fault(NotPresent));
        }
        suite.end(s);
        let mut s = suite.begin("not-present-l2");
        for op in [Op::Read, Op::Write, Op::Exec] {
            clear_walk_a(&env, HOLE_L2);
            suite.access(&mut s, &env, op, HOLE_L2, ALL, fault(NotPresent));
        }
        suite.end(s);
        let mut s = suite.begin("not-present-l3");
        for op in [Op::Read, Op::Write, Op::Exec] {
            clear_walk_a(&env, HOLE_L3);
            suite.access(&mut s, &env, op, HOLE_L3, ALL, fault(NotPresent));
        }
        suite.end(s);
        let mut s = suite.begin("not-present-l4");
        let empty = Env::empty(fmt, env.ad);
        suite.access(&mut s, &empty, Op::Read, T4K, ALL, fault(NotPresent));
        suite.end(s);
    }

    // ---- reserved bits (NPT) / misconfigurations (EPT), injected into
    // entries nested-pt built, restored afterwards.
    let high = 1u64 << (caps.phys_bits.min(51));
    let inject = |suite: &mut Suite,
                  name: &'static str,
                  env: &Env,
                  gpa: u64,
                  level: u8,
                  set: u64,
                  clear: u64,
                  expect: Expect| {
        let old = env.entry(gpa, level);
        env.set_entry(gpa, level, (old & !clear) | set);
        let mut s = suite.begin(name);
        suite.access(&mut s, env, Op::Read, gpa, ALL, expect);
        env.set_entry(gpa, level, old);
        suite.end(s);
    };
    match arch {
        Arch::Svm => {
            let g = slots.page4k(&env, Prot::RWX);
            inject(suite, "rsv-4k-high-addr", &env, g, 1, high, 0, fault(Reserved));
            inject(suite, "rsv-pde-high-addr", &env, g, 2, high, 0, fault(Reserved));
            let g2 = slots.page2m(&env, Prot::RWX) + 0x7000;
            inject(suite, "rsv-2m-bit13", &env, g2, 2, 1 << 13, 0, fault(Reserved));
            // Bit 12 of a large NPT leaf is the PAT bit, not reserved.
            inject(suite, "pat-2m-bit12-ok", &env, g2, 2, 1 << 12, 0, OK);
            if caps.page_1g {
                let g1 = map1g(&env, Prot::RWX) + G1_OFF + 0x7000;
                inject(suite, "rsv-1g-bit13", &env, g1, 3, 1 << 13, 0, fault(Reserved));
                inject(suite, "rsv-1g-bit29", &env, g1, 3, 1 << 29, 0, fault(Reserved));
                let _ = env.table.unmap(Gpa(T1G));
            }
            // PS in the PML4E: the guest's own code fetch faults.
            inject(suite, "rsv-pml4e-ps", &env, g, 4, 1 << 7, 0, fault(Reserved));
        }
        Arch::Vmx => {
            let g = slots.page4k(&env, Prot::RWX);
            inject(suite, "mis-4k-high-addr", &env, g, 1, high, 0, fault(Misconfig));
            inject(suite, "mis-4k-memtype-2", &env, g, 1, 2 << 3, 7 << 3, fault(Misconfig));
            inject(suite, "mis-4k-memtype-7", &env, g, 1, 7 << 3, 0, fault(Misconfig));
            inject(suite, "mis-4k-write-no-read", &env, g, 1, 0, 1, fault(Misconfig));
            inject(suite, "mis-pde-bit3", &env, g, 2, 1 << 3, 0, fault(Misconfig));
            inject(suite, "mis-pdpte-bit7-table", &env, g, 3, 1 << 7, 0, fault(Misconfig));
            let g2 = slots.page2m(&env, Prot::RWX) + 0x7000;
            inject(suite, "mis-2m-bit13", &env, g2, 2, 1 << 13, 0, fault(Misconfig));
            inject(suite, "mis-2m-bit12", &env, g2, 2, 1 << 12, 0, fault(Misconfig));
            // The same with EPTP bit 6 clear: does the emulator's handling of
            // bit 12 depend on A/D being enabled?
            if env.ad {
                env.ad = false;
                inject(suite, "mis-2m-bit12-ad-off", &env, g2, 2, 1 << 12, 0, fault(Misconfig));
                env.ad = true;
            }
            if caps.page_1g {
                let g1 = map1g(&env, Prot::RWX) + G1_OFF + 0x7000;
                inject(suite, "mis-1g-bit13", &env, g1, 3, 1 << 13, 0, fault(Misconfig));
                inject(suite, "mis-1g-bit12", &env, g1, 3, 1 << 12, 0, fault(Misconfig));
                if env.ad {
                    env.ad = false;
                    inject(suite, "mis-1g-bit12-ad-off", &env, g1, 3, 1 << 12, 0, fault(Misconfig));
                    env.ad = true;
                }
                let _ = env.table.unmap(Gpa(T1G));
            }
            if !caps.execute_only {
                inject(suite, "mis-4k-exec-only", &env, g, 1, 4, 3, fault(Misconfig));
            }
        }
    }

    // ---- A/D: a write after a read the TLB may have cached must still
    // set D (no invalidation between the two runs).
    {
        let mut s = suite.begin("ad-write-after-cached-read");
        let g = slots.page4k(&env, Prot::RW);
        suite.access(&mut s, &env, Op::Read, g, ALL, OK);
        suite.expect_ad(&mut s, &env, g, true, false);
        suite.access(&mut s, &env, Op::Write, g, Invalidate::None, OK);
        suite.expect_ad(&mut s, &env, g, true, true);
        suite.end(s);
    }

    // ---- dirty harvest and accessed reset through nested-pt against the
    // bits the CPU set; after clearing, the architectural invalidation of
    // the page makes the next access set the bit again.
    if !env.ad {
        for n in ["harvest-dirty-4k", "harvest-dirty-2m"] {
            suite.skip(n, "CPU model has no EPT A/D: dirty tracking uses the emulated format (ept-emulated-ad)");
        }
    } else {
        let mut s = suite.begin("harvest-dirty-4k");
        let base = slots.page4k(&env, Prot::RW);
        for _ in 1..8 {
            slots.page4k(&env, Prot::RW);
        }
        for i in [1u64, 3, 6] {
            suite.access(&mut s, &env, Op::Write, base + i * 4096, ALL, OK);
        }
        suite.access(&mut s, &env, Op::Read, base + 2 * 4096, ALL, OK);
        let mut bm = [0u64; 1];
        let n = env.table.harvest_dirty(Gpa(base), 8 * 4096, &mut bm);
        if n != Ok(3) || bm[0] != 0b0100_1010 {
            suite.diff(&mut s, format_args!("harvest after writes to pages 1,3,6: {n:?} bitmap {:#b}", bm[0]));
        }
        suite.expect_ad(&mut s, &env, base + 3 * 4096, true, false);
        suite.access(&mut s, &env, Op::Write, base + 3 * 4096, Invalidate::Page(base + 3 * 4096), OK);
        suite.expect_ad(&mut s, &env, base + 3 * 4096, true, true);
        let mut bm = [0u64; 1];
        let n = env.table.harvest_dirty(Gpa(base), 8 * 4096, &mut bm);
        if n != Ok(1) || bm[0] != 0b1000 {
            suite.diff(&mut s, format_args!("second harvest after a write to page 3: {n:?} bitmap {:#b}", bm[0]));
        }
        let g = base + 2 * 4096;
        if env.table.reset_accessed(Gpa(g), false) != Ok(true) {
            suite.diff(&mut s, format_args!("reset_accessed({g:#x}) did not see the A bit the CPU set"));
        }
        suite.expect_ad(&mut s, &env, g, false, false);
        suite.access(&mut s, &env, Op::Read, g, Invalidate::Page(g), OK);
        suite.expect_ad(&mut s, &env, g, true, false);
        suite.end(s);

        let mut s = suite.begin("harvest-dirty-2m");
        let g = slots.page2m(&env, Prot::RW);
        suite.access(&mut s, &env, Op::Write, g + 0x3000, ALL, OK);
        let mut bm = [0u64; 8];
        let n = env.table.harvest_dirty(Gpa(g), 2 << 20, &mut bm);
        if n != Ok(512) || bm.iter().any(|w| *w != u64::MAX) {
            suite.diff(&mut s, format_args!("harvest of a written 2M page: {n:?}, bitmap not all ones"));
        }
        suite.expect_ad(&mut s, &env, g, true, false);
        suite.end(s);
    }

    // ---- EPT with A/D disabled (EPTP bit 6 clear): same table, no bits.
    if arch == Arch::Vmx {
        if ept_ad {
            let mut s = suite.begin("ept-ad-disabled");
            let g = slots.page4k(&env, Prot::RWX);
            env.ad = false;
            suite.access(&mut s, &env, Op::Read, g, ALL, OK);
            suite.access(&mut s, &env, Op::Write, g, ALL, OK);
            suite.access(&mut s, &env, Op::Exec, g + 0x10, ALL, OK);
            suite.expect_ad(&mut s, &env, g, false, false);
            env.ad = true;
            suite.end(s);
        } else {
            suite.skip("ept-ad-disabled", "CPU model has no EPT A/D (every run is A/D-disabled)");
        }
    } else {
        suite.skip("ept-ad-disabled", "NPT always tracks A/D");
    }

    // ---- execute-only (EPT with the capability).
    if arch == Arch::Vmx && caps.execute_only {
        let mut s = suite.begin("exec-only-4k");
        let g = slots.page4k(&env, Prot::EXEC);
        suite.access(&mut s, &env, Op::Read, g, ALL, fault(Permission));
        suite.access(&mut s, &env, Op::Write, g, ALL, fault(Permission));
        suite.access(&mut s, &env, Op::Exec, g, ALL, OK);
        suite.expect_ad(&mut s, &env, g, true, false);
        suite.end(s);
    } else {
        suite.skip(
            "exec-only-4k",
            if arch == Arch::Svm { "NPT has no execute-only" } else { "CPU model lacks execute-only EPT" },
        );
    }

    // ---- unmap, then the architectural invalidation: the guest faults.
    {
        let mut s = suite.begin("unmap-invalidate-4k");
        let g = slots.page4k(&env, Prot::RW);
        suite.access(&mut s, &env, Op::Read, g, ALL, OK);
        let was = env.table.unmap(Gpa(g)).expect("unmap");
        if !was {
            suite.diff(&mut s, format_args!("unmap of {g:#x} found no leaf"));
        }
        // INVLPGA (SVM) / single-context INVEPT (VMX), not a full flush.
        suite.access(&mut s, &env, Op::Read, g, Invalidate::Page(g), fault(NotPresent));
        suite.end(s);

        let mut s = suite.begin("unmap-invalidate-2m");
        let g = slots.page2m(&env, Prot::RW) + 0x3000;
        suite.access(&mut s, &env, Op::Write, g, ALL, OK);
        env.table.unmap(Gpa(g & !0x1F_FFFF)).expect("unmap 2M");
        suite.access(&mut s, &env, Op::Write, g, Invalidate::Page(g), fault(NotPresent));
        suite.end(s);
    }

    // ---- EPT with emulated A/D: the first access and the first write
    // exit, the kernel records them through nested-pt, the guest retries
    // and the next accesses do not exit.
    if arch == Arch::Vmx {
        let mut s = suite.begin("ept-emulated-ad");
        let efmt = PteFormat::ept_emulated_ad(caps);
        let mut emu = Env::new(efmt, false);
        populate(&mut emu, &caps);
        // The code page is accessed through the same path first.
        let code = crate::guest::code_page();
        for a in [Access::Execute, Access::Read] {
            if emu.table.record_access(Gpa(code), a) != Ok(true) {
                suite.diff(&mut s, format_args!("record_access on the code page refused"));
            }
        }
        let g = T4K + 200 * 4096;
        emu.table
            .map(Gpa(g), Pfn((TEST_BASE >> 12) + 200), PageSize::Size4K, Prot::RW, MemType::WriteBack)
            .expect("map emulated-A/D page");
        suite.expect_ad(&mut s, &emu, g, false, false);
        for (op, acc, first) in
            [(Op::Read, Access::Read, fault(NotPresent)), (Op::Write, Access::Write, fault(Permission))]
        {
            let e = suite.access(&mut s, &emu, op, g, ALL, first);
            if matches!(e, Exit::EptViolation { .. }) {
                if emu.table.record_access(Gpa(g), acc) != Ok(true) {
                    suite.diff(&mut s, format_args!("record_access({acc:?}) refused"));
                }
                suite.resume(&mut s, &emu, op, g, OK);
            }
            suite.expect_ad(&mut s, &emu, g, true, op == Op::Write);
            // The next access of the same kind runs without an exit.
            suite.access(&mut s, &emu, op, g, Invalidate::None, OK);
        }
        suite.access(&mut s, &emu, Op::Read, g, ALL, OK);
        // Harvest clears the emulated dirty state (hardware W): after the
        // single-context INVEPT the next write exits again and is recorded
        // again; clearing accessed makes the next read exit too.
        let mut bm = [0u64; 1];
        let n = emu.table.harvest_dirty(Gpa(g), 4096, &mut bm);
        if n != Ok(1) || bm[0] != 1 {
            suite.diff(&mut s, format_args!("emulated harvest: {n:?} bitmap {:#b}", bm[0]));
        }
        suite.expect_ad(&mut s, &emu, g, true, false);
        let e = suite.access(&mut s, &emu, Op::Write, g, Invalidate::Page(g), fault(Permission));
        if matches!(e, Exit::EptViolation { .. }) {
            let _ = emu.table.record_access(Gpa(g), Access::Write);
            suite.resume(&mut s, &emu, Op::Write, g, OK);
        }
        suite.expect_ad(&mut s, &emu, g, true, true);
        if emu.table.reset_accessed(Gpa(g), false) != Ok(true) {
            suite.diff(&mut s, format_args!("emulated reset_accessed did not report A"));
        }
        let e = suite.access(&mut s, &emu, Op::Read, g, Invalidate::Page(g), fault(NotPresent));
        if matches!(e, Exit::EptViolation { .. }) {
            let _ = emu.table.record_access(Gpa(g), Access::Read);
            suite.resume(&mut s, &emu, Op::Read, g, OK);
        }
        // Clearing A saved the dirty state in software (write without read
        // is not expressible in EPT): the page still reads as dirty.
        suite.expect_ad(&mut s, &emu, g, true, true);
        suite.end(s);
    } else {
        suite.skip("ept-emulated-ad", "EPT only");
    }

    // ---- promotion and demotion of 2 MiB leaves (`promote.rs`).
    crate::promote::run(suite, caps, fmt, env.ad);
}
