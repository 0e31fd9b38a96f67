//! 2 MiB leaves under a running guest (need /dev/kvm): first touch maps
//! them, the eager split when tracking goes on keeps every translation
//! and the next harvest is exact, promotion back keeps the data.

mod common;

use vmm_kvm::detect::detect;
use vmm_kvm::large::{large_leaf_rounds, split_profile, touch_start};
use vmspace::SplitPolicy;

#[test]
fn guest_data_and_harvest_across_split_and_promotion() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect().expect("detect").mode;
    let mem = 16 << 20;
    let r = large_leaf_rounds(mem, mode).expect("large-leaf rounds");
    eprintln!("{r:#?}");
    assert_eq!(r.large_after_touch, mem >> 21, "every 2 MiB mapped with one leaf");
    assert!(r.first_pass_faults <= 2 * (mem >> 21) + 64, "a fault per 2 MiB, not per page: {}", r.first_pass_faults);
    assert_eq!(r.large_after_split, 0, "the eager split left no large leaf");
    assert!(r.written > 0);
    assert_eq!(r.missed, 0, "written pages missed by the harvest after the split");
    assert_eq!(r.spurious, 0, "pages reported that the guest did not write");
    assert_eq!(r.promoted, mem >> 21, "every 2 MiB promoted back");
    assert_eq!(r.bad_pages, 0, "guest memory differs from the replay");
    assert!(!r.resident_mismatch, "resident_count differs from the leaves");
}

/// RAM of 4 GiB and more (here 4 GiB + 2 MiB) sets up and runs: it lies
/// above the boot ROM (below 4 GiB), not over it.
#[test]
fn ram_of_4_gib_and_more_clears_the_boot_rom() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect().expect("detect").mode;
    let mem = (4 << 30) + (2 << 20);
    let r = touch_start(mem, mode, 1024).expect("a guest with 4 GiB + 2 MiB of RAM");
    eprintln!("{r:#?}");
    assert!(r.written >= 1024);
    assert_eq!(r.bad_pages, 0, "guest memory differs from the replay");
    assert!(r.large_leaves >= 2, "the first 4 MiB written through 2 MiB leaves: {}", r.large_leaves);
}

/// The split cost with two vCPUs, each writing its half: the eager split
/// leaves no nested fault to the write-all, the lazy one takes one per
/// 2 MiB leaf; on a shadow host the eager switch-on zaps once and the
/// write-all never, the lazy write-all zaps once per split, and KVM's
/// page faults show KVM's prefetch working for the eager split only.
#[test]
fn split_profile_with_two_vcpus_counts_what_each_policy_does() {
    if common::skip_without_kvm() {
        return;
    }
    let mode = detect().expect("detect").mode;
    let mem = 8 << 20;
    let leaves = mem >> 21;
    assert!(split_profile(mem, mode, SplitPolicy::Eager, 0).is_err(), "no vCPU: refused");
    let (ec, ed) = split_profile(mem, mode, SplitPolicy::Eager, 2).expect("eager");
    let (lc, ld) = split_profile(mem, mode, SplitPolicy::Lazy, 2).expect("lazy");
    eprintln!("{ec:?} {ed:?}\n{lc:?} {ld:?}");
    assert_eq!((ed.vcpus, ed.pages, ld.pages), (2, mem >> 12, mem >> 12));
    assert_eq!(ec.faults, 0, "the eager split left the write-all nothing to fault on");
    assert_eq!(lc.faults, leaves, "one split fault per 2 MiB leaf");
    if mode == vmm_kvm::PagingMode::Shadow {
        assert_eq!((ed.switch_on_zaps, ed.zaps), (1, 0));
        assert_eq!(ld.zaps, leaves, "a zap per lazy split");
        let (e, l) = (ed.kvm("pf_taken"), ld.kvm("pf_taken"));
        if e > 0 {
            assert!(e * 4 < l, "KVM faults: eager {e}, lazy {l}");
        }
    }
}
