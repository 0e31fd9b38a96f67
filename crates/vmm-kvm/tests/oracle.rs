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
