//! The table oracle: real vCPU accesses against `nested_pt::mmu::translate`.
//!
//! A fixed layout in the first 512 GiB of a bare table (4 KiB and 2 MiB
//! pages; read-only, non-executable, not-present and unmapped ranges) is
//! built twice: once in KVM memory, walked by the vCPU, and once in a heap
//! model. The probe workload makes one access per step; after each step the
//! host compares what the vCPU saw (the value read, or the fault's address
//! and error code) and the accessed/dirty bits on the walked path with what
//! the software MMU predicts for the model.
//!
//! Known, documented difference: on a walk that faults, the software MMU
//! may set accessed bits in the upper entries it walked (as QEMU does) while
//! KVM's shadow walker sets none (as Bochs); upper-level A bits are compared
//! for successful walks only, leaf A/D always.

use crate::backend::{RAM_KVM_BASE, TableBackend};
use crate::guest;
use crate::machine::{Action, Event, FaultInfo};
use crate::mem::PAGE;
use crate::runtime;
use crate::vm::{KvmError, KvmVm, PagingMode, Result};
use nested_pt::mmu::{self, Violation};
use nested_pt::{Access, Gpa, HeapPages, MemType, NestedTable, PageSize, Pfn, Prot};
use std::sync::{Arc, Mutex};

/// One probe: an access the guest makes (the VM layer's typed probe).
pub use vmm::guest::ProbeOp as Probe;

/// What happened on one probe, and what the model said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe.
    pub probe: Probe,
    /// Fault seen by the guest: (address, error code & 0x1f).
    pub fault: Option<(u64, u64)>,
    /// Fault the model predicts.
    pub predicted_fault: Option<(u64, u64)>,
    /// Value the guest read (reads only).
    pub value: Option<u64>,
    /// Value the model predicts for a read.
    pub predicted_value: Option<u64>,
    /// Differences in A/D bits along the walk: (level, real entry, model entry).
    pub ad_mismatches: Vec<(u8, u64, u64)>,
}

impl ProbeResult {
    /// True when the vCPU did exactly what the model predicted.
    pub fn agrees(&self) -> bool {
        self.fault == self.predicted_fault && self.value == self.predicted_value && self.ad_mismatches.is_empty()
    }
}

/// One mapped range of an oracle layout: `len` bytes at `gpa` in leaves of
/// `size`, with `prot`. Its RAM is filled with a pattern (a read returns
/// `address ^ 0x5a5a << 48`) and `jmp r11` every 256 bytes, so execute
/// probes return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First guest address (aligned to `size`).
    pub gpa: u64,
    /// Bytes (a multiple of `size`).
    pub len: u64,
    /// Leaf size.
    pub size: PageSize,
    /// Protection.
    pub prot: Prot,
}

const fn r(gpa: u64, len: u64, size: PageSize, prot: Prot) -> Region {
    Region { gpa, len, size, prot }
}

/// The layout of the standard oracle run: 4 KiB pages of every
/// protection, 2 MiB pages, and a 1 GiB page where `page_1g`.
pub fn standard_layout(page_1g: bool) -> Vec<Region> {
    layout(page_1g)
}

fn layout(page_1g: bool) -> Vec<Region> {
    let rw = Prot::READ.union(Prot::WRITE);
    let rwx = rw.union(Prot::EXEC);
    let mut v = vec![
        r(0x10_0000, 4 * PAGE, PageSize::Size4K, rwx),
        r(0x10_4000, 2 * PAGE, PageSize::Size4K, Prot::READ),
        r(0x10_6000, PAGE, PageSize::Size4K, rw),
        r(0x10_7000, PAGE, PageSize::Size4K, Prot::READ.union(Prot::EXEC)),
        r(0x20_0000, 2 << 20, PageSize::Size2M, rw),
        r(0x40_0000, 2 << 20, PageSize::Size2M, Prot::READ.union(Prot::EXEC)),
    ];
    if page_1g {
        v.push(r(GIG, 1 << 30, PageSize::Size1G, rw));
    }
    v
}

/// A 1 GiB page (read-write, non-executable) when the host offers them.
const GIG: u64 = 0x4000_0000;

/// Addresses populated (tables exist) but with no leaf: not-present.
const HOLE: u64 = 0x10_8000;
/// Far from anything: no tables at all.
const UNMAPPED: u64 = 0x70_0000_0000;

/// Probes of the 1 GiB page (use only where the host offers 1 GiB pages).
pub fn probes_1g() -> Vec<Probe> {
    use Access::*;
    let p = |gpa, access| Probe { gpa, access };
    vec![
        p((GIG + 0x1234_5678) & !7, Read),
        p(GIG + 0x3fff_f008, Write),
        p(GIG + 0x2000_0000, Execute),
        p(GIG + 0x3fff_f008, Read),
    ]
}

/// The probes of the standard oracle run.
pub fn standard_probes() -> Vec<Probe> {
    use Access::*;
    let p = |gpa, access| Probe { gpa, access };
    vec![
        p(0x10_0008, Read),
        p(0x10_0010, Write),
        p(0x10_0010, Read),
        p(0x10_1000, Execute),
        p(0x10_2018, Write),
        p(0x10_4000, Read),
        p(0x10_4008, Write),
        p(0x10_5000, Execute),
        p(0x10_6000, Read),
        p(0x10_6100, Execute),
        p(0x10_6200, Write),
        p(0x10_7000, Execute),
        p(0x10_7008, Write),
        p(HOLE, Read),
        p(HOLE + 8, Write),
        p(UNMAPPED, Read),
        p(UNMAPPED, Execute),
        p(0x20_0040, Read),
        p(0x21_3008, Write),
        p(0x3f_f000, Execute),
        p(0x40_0000, Execute),
        p(0x41_0000, Read),
        p(0x41_0008, Write),
        p(0x10_3ff8, Read),
        p(0x10_3ff8, Write),
    ]
}

/// Runs `probes` on a fresh VM with one vCPU and compares each with the
/// software MMU. `mode` is the host's paging mode.
pub fn run_oracle(probes: &[Probe], mode: PagingMode) -> Result<Vec<ProbeResult>> {
    let page_1g = kvm_page_1g() && probes.iter().any(|p| (GIG..2 * GIG).contains(&p.gpa));
    run_oracle_with(&layout(page_1g), &[HOLE], probes, mode)
}

fn kvm_page_1g() -> bool {
    KvmVm::new().map(|vm| vm.facts().page_1g).unwrap_or(false)
}

/// Runs `probes` over a custom `layout` (plus `holes`: 4 KiB pages whose
/// tables exist but which map nothing) on a fresh one-vCPU VM, and
/// compares each with the software MMU: the typed form of a custom oracle
/// run (no raw parameter-block offsets). Regions must lie in the first
/// 512 GiB and not overlap; large regions are filled only where probed.
pub fn run_oracle_with(
    layout: &[Region],
    holes: &[u64],
    probes: &[Probe],
    mode: PagingMode,
) -> Result<Vec<ProbeResult>> {
    if probes.len() > guest::MAX_PROBES {
        return Err(KvmError::Setup(format!("{} probes, at most {}", probes.len(), guest::MAX_PROBES)));
    }
    let vm = Arc::new(KvmVm::new()?);
    // RAM is a sparse memfd: a 1 GiB page needs a 1 GiB-aligned gigabyte.
    let needs_1g = layout.iter().any(|r| r.size == PageSize::Size1G);
    let ram = if needs_1g {
        3 << 30
    } else {
        (layout.iter().map(|r| r.len.max(2 << 20)).sum::<u64>() + (8 << 20)).next_multiple_of(2 << 20)
    };
    let mut be = TableBackend::new(vm.clone(), 8 << 20, ram, mode)?;
    let rom = runtime::rom_image(&guest::code(), 1);
    be.map_runtime(&rom, 1, 1)?;
    let fmt = *be.table().format();
    let mut model =
        NestedTable::new(fmt, HeapPages::with_capacity(0x10, 4096)).map_err(|e| KvmError::Setup(e.to_string()))?;
    // Lay the regions out in RAM, 2 MiB aligned, filled with a pattern and
    // `jmp r11` at every 256-byte boundary (so execute probes return).
    for reg in layout.iter().copied() {
        let off = be.alloc_ram(reg.len, reg.size.bytes().max(2 << 20))?;
        // Small regions are filled whole; a 1 GiB page only where probed.
        let pages: Vec<u64> = if reg.len <= 4 << 20 {
            (0..reg.len / PAGE).collect()
        } else {
            probes
                .iter()
                .filter(|p| (reg.gpa..reg.gpa + reg.len).contains(&p.gpa))
                .map(|p| (p.gpa - reg.gpa) / PAGE)
                .collect()
        };
        for pg in pages {
            for w in (0..PAGE).step_by(8) {
                let a = pg * PAGE + w;
                be.ram().write_u64(off + a, (reg.gpa + a) ^ 0x5a5a_0000_0000_0000)?;
            }
            for c in (0..PAGE).step_by(256) {
                be.ram().write_bytes(off + pg * PAGE + c, &[0x41, 0xff, 0xe3])?;
            }
        }
        be.map_range(reg.gpa, off, reg.len, reg.size, reg.prot)?;
        model.populate_region(Gpa(reg.gpa), reg.len, reg.size).map_err(|e| KvmError::Setup(e.to_string()))?;
        let mut a = 0;
        while a < reg.len {
            model
                .map(Gpa(reg.gpa + a), be.ram_pfn(off + a), reg.size, reg.prot, MemType::WriteBack)
                .map_err(|e| KvmError::Setup(e.to_string()))?;
            a += reg.size.bytes();
        }
    }
    for &hole in holes {
        be.table_mut()
            .populate_region(Gpa(hole), PAGE, PageSize::Size4K)
            .map_err(|e| KvmError::Setup(e.to_string()))?;
        model.populate_region(Gpa(hole), PAGE, PageSize::Size4K).map_err(|e| KvmError::Setup(e.to_string()))?;
    }

    let be = Arc::new(be);
    let mut m = crate::machine::create(&vm, be.clone(), mode, 1)?;
    m.load_probes(0, probes)?;

    struct St {
        step: usize,
        fault: Option<FaultInfo>,
        results: Vec<ProbeResult>,
        model: NestedTable<HeapPages>,
    }
    let st = Mutex::new(St { step: 0, fault: None, results: Vec::new(), model });
    let resume = m.code_addr(m.code.probe_step);
    let be2 = be.clone();
    let probes_v = probes.to_vec();
    m.run(
        |_, ev| {
            let mut s = st.lock().expect("oracle state");
            match ev {
                Event::Unserved(f, _) => {
                    s.fault = Some(f);
                    Action::Skip(resume)
                }
                Event::Port(guest::PORT_PROBE_STEP, _) => {
                    let k = s.step;
                    s.step += 1;
                    let probe = probes_v[k];
                    let fault = s.fault.take().map(|f| (f.gpa, f.err & 0x1f));
                    let pred =
                        mmu::translate(s.model.pages(), &fmt, s.model.root(), Gpa(probe.gpa), probe.access, true);
                    let (predicted_fault, predicted_value) = match pred {
                        Err(v) => (Some((probe.gpa, error_code(&v))), None),
                        Ok(t) => {
                            let val = (probe.access == Access::Read)
                                .then(|| be2.ram().read_u64(t.hpa.wrapping_sub(RAM_KVM_BASE)).ok())
                                .flatten();
                            (None, val)
                        }
                    };
                    let value = if probe.access == Access::Read && fault.is_none() {
                        let e = runtime::params(0) + guest::probe_value_offset(k).unwrap_or(0);
                        crate::machine::read_guest_u64(&*be2, e)
                    } else {
                        None
                    };
                    let walk_ok = pred.is_ok();
                    let real = be2.table().walk(Gpa(probe.gpa));
                    let modl = s.model.walk(Gpa(probe.gpa));
                    let mut ad = Vec::new();
                    for (a, b) in real.steps().iter().zip(modl.steps()) {
                        let leaf = fmt.is_leaf(a.entry, a.level);
                        let mask = if leaf {
                            (1 << 5) | (1 << 6)
                        } else if walk_ok {
                            1 << 5
                        } else {
                            0
                        };
                        if a.entry & mask != b.entry & mask {
                            ad.push((a.level, a.entry, b.entry));
                        }
                    }
                    s.results.push(ProbeResult {
                        probe,
                        fault,
                        predicted_fault,
                        value,
                        predicted_value,
                        ad_mismatches: ad,
                    });
                    Action::Continue
                }
                Event::Port(guest::PORT_DONE, _) => Action::Stop,
                Event::Port(p, r) => Action::Fatal(format!("unexpected port {p:#x} {r:x?}")),
                Event::EmulationFailed(f, e) => Action::Fatal(format!("emulation at {:#x}: {e}", f.gpa)),
            }
        },
        |_| Ok::<(), KvmError>(()),
    )?;
    let s = st.into_inner().expect("oracle state");
    if s.results.len() != probes.len() {
        return Err(KvmError::Guest(format!("{} of {} probes ran", s.results.len(), probes.len())));
    }
    Ok(s.results)
}

/// The guest #PF error code the model predicts (P, W, U, RSVD, I/D bits).
pub fn error_code(v: &Violation) -> u64 {
    v.npt_error_code() & 0x1f
}

/// Pfn helper for tests.
pub fn pfn_of(kvm_gpa: u64) -> Pfn {
    Pfn(kvm_gpa / PAGE)
}
