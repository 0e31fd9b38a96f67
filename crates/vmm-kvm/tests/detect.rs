//! Start-up detection of the host's paging mode (needs /dev/kvm).

mod common;

use vmm_kvm::PagingMode;
use vmm_kvm::detect::detect;

#[test]
fn detection_is_consistent() {
    if common::skip_without_kvm() {
        return;
    }
    let d = detect().expect("detection probe");
    eprintln!("{d:?}");
    match d.mode {
        PagingMode::Shadow => {
            assert!(d.stale_after_change && !d.cr3_reload_fixed);
            // The runner's shadow invalidations must work, or it cannot be correct.
            assert_eq!(d.frame_drop_fixed, Some(true), "dropping the frame's KVM view did not invalidate");
            assert_eq!(d.zap_fixed, Some(true), "a slot zap did not invalidate");
        }
        PagingMode::HardwareNested => assert!(!d.stale_after_change || d.cr3_reload_fixed),
    }
}
