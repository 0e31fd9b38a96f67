//! Unmap and remap while vCPUs run (need /dev/kvm): once the call returns,
//! no vCPU may see the old frame; the guests check it themselves.

mod common;

use std::time::Duration;
use vmm_kvm::detect::detect;
use vmm_kvm::watch::run_watch;

#[test]
fn unmap_while_running_leaves_no_stale_translation() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect().expect("detect").mode;
    let r = run_watch(2, 1, true, Duration::from_millis(30), mode).expect("watch run");
    eprintln!("{r:?}");
    assert_eq!(r.violations, 0, "a vCPU read the unmapped frame after unmap returned");
    for (i, f) in r.faults.iter().enumerate() {
        assert!(*f > 0, "vCPU {i} never faulted on the unmapped page");
    }
    // Whether a vCPU was in guest context at the instant of the unmap (and
    // so was kicked) is timing; the remap test below checks that kicks
    // happen over many changes.
    eprintln!("kicks: {}", r.kicks);
}

#[test]
fn remap_while_running_shows_only_new_contents() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect().expect("detect").mode;
    let r = run_watch(2, 40, false, Duration::from_millis(3), mode).expect("watch run");
    eprintln!("{r:?}");
    assert_eq!(r.changes, 40);
    assert_eq!(r.violations, 0, "a vCPU saw an old object's contents after remap returned");
    assert!(r.reads.iter().all(|&n| n > 1000), "watchers made too little progress: {:?}", r.reads);
    assert!(r.kicks > 0, "40 remaps under running vCPUs and not one kick");
}
