//! Real vCPU accesses against the software MMU (needs /dev/kvm).

mod common;

use vmm_kvm::PagingMode;
use vmm_kvm::oracle::{run_oracle, standard_probes};

#[test]
fn vcpu_agrees_with_software_mmu() {
    if common::skip_without_kvm() {
        return;
    }
    let res = run_oracle(&standard_probes(), PagingMode::Shadow).expect("oracle run");
    let mut bad = 0;
    for r in &res {
        eprintln!("{:x?} fault={:x?} value={:x?}", r.probe, r.fault, r.value);
        if !r.agrees() {
            bad += 1;
            eprintln!("MISMATCH {r:x?}");
        }
    }
    assert_eq!(bad, 0, "{bad} of {} probes disagree with the model", res.len());
    assert!(res.iter().any(|r| r.fault.is_some()), "the layout must produce faults");
    assert!(res.iter().any(|r| r.value.is_some()), "the layout must produce reads");
}

#[test]
fn one_gib_pages_agree_with_software_mmu() {
    if common::skip_without_kvm() {
        return;
    }
    let vm = vmm_kvm::KvmVm::new().expect("vm");
    if !vm.facts().page_1g {
        eprintln!("SKIPPED: KVM does not offer 1 GiB pages on this host");
        return;
    }
    drop(vm);
    let res = run_oracle(&vmm_kvm::oracle::probes_1g(), PagingMode::Shadow).expect("oracle run");
    for r in &res {
        eprintln!("{:x?} fault={:x?} value={:x?}", r.probe, r.fault, r.value);
        assert!(r.agrees(), "MISMATCH {r:x?}");
    }
    assert!(res.iter().any(|r| r.fault.is_some()) && res.iter().any(|r| r.value.is_some()));
}

/// A custom layout through the typed probe API (no parameter-block
/// offsets): a write-only-by-W page, a 2 MiB read-execute page and a hole,
/// probed with every access kind.
#[test]
fn custom_layout_through_the_typed_probe_api() {
    use nested_pt::{Access, PageSize, Prot};
    use vmm_kvm::oracle::{Probe, Region, run_oracle_with};
    if common::skip_without_kvm() {
        return;
    }
    let layout = [
        Region { gpa: 0x30_0000, len: 0x2000, size: PageSize::Size4K, prot: Prot::READ | Prot::WRITE },
        Region { gpa: 0x60_0000, len: 2 << 20, size: PageSize::Size2M, prot: Prot::READ | Prot::EXEC },
    ];
    let p = |gpa, access| Probe { gpa, access };
    let probes = [
        p(0x30_0008, Access::Read),
        p(0x30_1010, Access::Write),
        p(0x30_1010, Access::Read),
        p(0x30_0100, Access::Execute),
        p(0x61_0000, Access::Execute),
        p(0x62_0008, Access::Write),
        p(0x30_5000, Access::Read),
        p(0x30_5008, Access::Write),
    ];
    let res = run_oracle_with(&layout, &[0x30_5000], &probes, PagingMode::Shadow).expect("oracle run");
    assert_eq!(res.len(), probes.len());
    for r in &res {
        assert!(r.agrees(), "{r:x?}");
    }
    // Reads return the pattern, execute of a non-executable page faults,
    // the read-execute 2 MiB page refuses the write, the hole faults.
    assert_eq!(res[0].value, Some(0x30_0008 ^ 0x5a5a_0000_0000_0000));
    assert!(res[3].fault.is_some() && res[4].fault.is_none() && res[5].fault.is_some());
    assert!(res[6].fault.is_some() && res[7].fault.is_some());
    // More probes than a parameter block holds: a typed error.
    let many = vec![p(0x30_0000, Access::Read); vmm::guest::MAX_PROBES + 1];
    assert!(run_oracle_with(&layout, &[], &many, PagingMode::Shadow).is_err());
}
