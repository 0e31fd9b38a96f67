//! Emulator quirks: disagreements with the architecture that we accept, by
//! name, with the evidence. Each quirk is a hypothesis about what the
//! emulator does instead; a disagreement is attributed to a quirk only if
//! recomputing the model's prediction under that hypothesis reproduces the
//! emulator's exit and every table word exactly. Anything else is a `DIFF`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use nested_pt::mmu::{Violation, ViolationKind};

use crate::guest::Op;
use crate::hv::Exit;
use crate::suite::{Arch, Env, Suite, exit_for, hex_list, snap};

/// A named quirk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Quirk {
    /// Name printed in `QUIRK` lines and the report.
    pub name: &'static str,
    /// Which emulator shows it.
    pub emulator: &'static str,
    /// What the emulator does, against which rule.
    pub what: &'static str,
}

/// QEMU (7.2, target/i386 nested walk) reports a reserved-bit nested page
/// fault with EXITINFO1.P = 0. AMD APM vol. 2 §15.25.6 says the error code
/// is that of a #PF, and a #PF for a reserved bit has P = 1 (the entry was
/// present); Bochs' SVM gives P = 1 too.
pub const QEMU_NPF_RSV_WITHOUT_P: Quirk = Quirk {
    name: "QEMU_NPF_RSV_WITHOUT_P",
    emulator: "qemu",
    what: "reserved-bit #NPF reported with EXITINFO1.P=0 (APM: P=1)",
};

/// QEMU sets the accessed bit in the upper-level nested entries it walked
/// even when the walk ends in a fault; neither manual settles whether a
/// faulting walk may set A (Bochs sets none, the model sets none).
pub const QEMU_FAULT_WALK_SETS_A: Quirk = Quirk {
    name: "QEMU_FAULT_WALK_SETS_A",
    emulator: "qemu",
    what: "a faulting nested walk sets A in the upper entries it used",
};

/// Bochs 2.7 ignores bit 12 of a 2 MiB / 1 GiB EPT leaf. Intel SDM vol. 3C
/// ("EPT Misconfigurations"): bits 20:12 of a 2 MiB leaf and 29:12 of a
/// 1 GiB leaf are reserved and must give an EPT misconfiguration; Bochs
/// catches bit 13 but translates as if bit 12 were clear, on the Skylake-X
/// and Ivy Bridge models alike and with EPTP bit 6 set or clear (it masks
/// bit 12 out of the large frame before its reserved-offset check, as for
/// the PAT bit of ordinary paging).
pub const BOCHS_EPT_LARGE_LEAF_BIT12_IGNORED: Quirk = Quirk {
    name: "BOCHS_EPT_LARGE_LEAF_BIT12_IGNORED",
    emulator: "bochs",
    what: "bit 12 of a 2M/1G EPT leaf is not treated as reserved (SDM: misconfiguration)",
};

/// QEMU sets A in a 1 GiB nested leaf (a PDPTE with PS) right after its
/// present and address reserved-bit checks, before it checks the page's
/// low reserved bits (29:13) and the access permission; a 2 MiB or 4 KiB
/// leaf gets A only when the access succeeds. The model sets A only on a
/// successful walk; as for upper entries, the manuals do not settle whether
/// a faulting walk may set it, so this is listed rather than accepted
/// silently.
pub const QEMU_1G_LEAF_A_ON_FAULT: Quirk = Quirk {
    name: "QEMU_1G_LEAF_A_ON_FAULT",
    emulator: "qemu",
    what: "a 1 GiB nested leaf gets A even when its permission or low reserved-bit check faults",
};

/// Every quirk, for the INFO listing.
pub const ALL: [Quirk; 6] = [
    QEMU_NPF_RSV_WITHOUT_P,
    QEMU_FAULT_WALK_SETS_A,
    QEMU_1G_LEAF_A_ON_FAULT,
    BOCHS_EPT_LARGE_LEAF_BIT12_IGNORED,
    QEMU_VTD_IOTLB_HIT_NO_FAULT_RECORD,
    QEMU_AMDVI_NO_EVENT_LOGGED,
];

/// QEMU 7.2's AMD-Vi (`hw/i386/amd_iommu.c`) refuses a DMA whose walk
/// fails (nothing reaches memory, and its `amdvi_page_fault` trace event
/// fires once per 4-byte access) but no IO_PAGE_FAULT entry reaches the
/// event log, although the status register shows the log running
/// (EventLogRun) without overflow. AMD IOMMU spec §2.5.3: a faulting
/// untranslated request is logged as IO_PAGE_FAULT. Evidence: the
/// `-trace amdvi_*` output of a `qemu-amdvi` run. Accepted where the model
/// predicts a fault and (for writes) the memory stayed untouched.
pub const QEMU_AMDVI_NO_EVENT_LOGGED: Quirk = Quirk {
    name: "QEMU_AMDVI_NO_EVENT_LOGGED",
    emulator: "qemu-amdvi",
    what: "a faulting DMA is refused but no IO_PAGE_FAULT event is logged (spec: logged)",
};

/// QEMU's VT-d (7.2, `hw/i386/intel_iommu.c`) records a fault only when its
/// page walk fails; a DMA whose translation comes from its IOTLB with too
/// little permission (a write through a cached read-only translation) is
/// refused without a fault record. VT-d spec §7.1.3: a request that lacks
/// the permission is a non-recoverable fault (reason 0x5 for a write) and
/// is recorded whether or not the translation was cached. The iommu suite
/// (`iommu.rs`) accepts it only where the write reached no memory.
pub const QEMU_VTD_IOTLB_HIT_NO_FAULT_RECORD: Quirk = Quirk {
    name: "QEMU_VTD_IOTLB_HIT_NO_FAULT_RECORD",
    emulator: "qemu-vtd",
    what: "a DMA refused by a cached IOTLB translation records no fault (VT-d: reason 0x5)",
};

/// What a quirk check needs to see.
pub struct Ctx<'a> {
    /// Architecture.
    pub arch: Arch,
    /// The table.
    pub env: &'a Env,
    /// The guest operation.
    pub op: Op,
    /// Its target.
    pub gpa: u64,
    /// The hardware's exit.
    pub exit: &'a Exit,
    /// The model's exit.
    pub want: &'a Exit,
    /// The model's fault, if it predicted one.
    pub pred_fault: Option<(Violation, u64)>,
    /// Table words where hardware and model differ.
    pub diffs: &'a [(u64, u64, u64)],
}

const NPT_A: u64 = 1 << 5;

/// Find the quirks that explain the disagreement exactly (empty: none do).
pub fn explain(c: &Ctx) -> Vec<(Quirk, String)> {
    match c.arch {
        Arch::Svm => explain_qemu(c),
        Arch::Vmx => explain_bochs_bit12(c).map(|q| alloc::vec![q]),
    }
    .unwrap_or_default()
}

fn explain_qemu(c: &Ctx) -> Option<Vec<(Quirk, String)>> {
    let (v, fault_gpa) = c.pred_fault?;
    let mut out = Vec::new();
    // Exit: exact, or exactly the P=0 quirk on a reserved-bit fault.
    if !Suite::exit_matches(c.exit, c.want) {
        match (c.exit, c.want) {
            (Exit::Npf { info1, gpa }, Exit::Npf { info1: w1, gpa: wg })
                if v.kind == ViolationKind::Reserved && *info1 == w1 & !1 && gpa == wg =>
            {
                out.push((QEMU_NPF_RSV_WITHOUT_P, format!("hw {:x?} model {:x?}", c.exit, c.want)));
            }
            _ => return None,
        }
    }
    if c.diffs.is_empty() {
        return Some(out);
    }
    // Tables: A set in the present entries above the faulting level (H1),
    // and also in a faulting 1 GiB leaf (H2). Each must match exactly.
    let level = v.level;
    let steps: Vec<_> = c.env.table.walk(nested_pt::Gpa(fault_gpa)).steps().to_vec();
    let addr_of = |lvl: u8| steps.iter().find(|s| s.level == lvl).map(|s| s.table.addr() + s.index as u64 * 8);
    let set_a = |env: &Env, with_leaf: bool| {
        for s in steps.iter().filter(|s| s.level > level || (with_leaf && s.level == level)) {
            let e = env.entry(fault_gpa, s.level);
            if e & 1 != 0 {
                env.set_entry(fault_gpa, s.level, e | NPT_A);
            }
        }
    };
    let _ = snap::replay(c.env, c.op, c.gpa, |env| set_a(env, false));
    let mut leaf_too = false;
    if !snap::diffs_vs_hypothesis(c.env).is_empty() {
        let leaf_1g = level == 3 && c.env.entry(fault_gpa, 3) & (1 << 7) != 0;
        if !leaf_1g {
            return None;
        }
        let _ = snap::replay(c.env, c.op, c.gpa, |env| set_a(env, true));
        if !snap::diffs_vs_hypothesis(c.env).is_empty() {
            return None;
        }
        leaf_too = true;
    }
    let leaf_addr = addr_of(level);
    let upper: Vec<_> = c.diffs.iter().copied().filter(|d| Some(d.0) != leaf_addr).collect();
    if !upper.is_empty() {
        out.push((QEMU_FAULT_WALK_SETS_A, format!("{:?} fault at level {level}: {}", v.kind, hex_list(&upper))));
    }
    if leaf_too {
        let leaf: Vec<_> = c.diffs.iter().copied().filter(|d| Some(d.0) == leaf_addr).collect();
        out.push((QEMU_1G_LEAF_A_ON_FAULT, format!("{:?} fault on the 1G leaf: {}", v.kind, hex_list(&leaf))));
    }
    Some(out)
}

fn explain_bochs_bit12(c: &Ctx) -> Option<(Quirk, String)> {
    let (v, fault_gpa) = c.pred_fault?;
    if v.kind != ViolationKind::Misconfig || !(v.level == 2 || v.level == 3) {
        return None;
    }
    let entry_addr = {
        let w = c.env.table.walk(nested_pt::Gpa(fault_gpa));
        let s = w.steps().iter().find(|s| s.level == v.level)?;
        s.table.addr() + s.index as u64 * 8
    };
    let pre = snap::pre_word(c.env, entry_addr);
    if pre & (1 << 12) == 0 {
        return None;
    }
    let level = v.level;
    let hyp = snap::replay(c.env, c.op, c.gpa, |env| {
        env.set_entry(fault_gpa, level, pre & !(1 << 12));
    });
    if !Suite::exit_matches(c.exit, &exit_for(Arch::Vmx, hyp)) {
        return None;
    }
    // The hypothesis cleared bit 12; the hardware did not touch it.
    let rest = snap::diffs_vs_hypothesis(c.env);
    if rest.iter().all(|&(a, hw, m)| a == entry_addr && hw ^ m == 1 << 12) {
        Some((
            BOCHS_EPT_LARGE_LEAF_BIT12_IGNORED,
            format!(
                "level-{level} leaf {pre:#x}: hw {:x?} = model with bit 12 clear; A/D {}",
                c.exit,
                hex_list(c.diffs)
            ),
        ))
    } else {
        None
    }
}
