//! The README's example: a `Vm` with a RAM segment mapped at two guest
//! addresses, a host write into the segment read back through a page hold
//! at either alias, and the dirty harvest of a guest-side write. Runs
//! without `/dev/kvm` (no hypervisor backend is involved).

use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmm::devmem::NoExposure;
use vmm::{SegmentKind, Vm, VmConfig};
use vmspace::{Gpa, HeapReservoir, Pfn, Prot, PteFormat, SpaceConfig};

#[test]
fn readme_example() -> Result<(), Box<dyn std::error::Error>> {
    // --- README example starts here ---
    let ram = Arc::new(HeapReservoir::new(64 << 20, Pfn(0x1000))?);
    let mut space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    space.track_dirty = true;
    let config = VmConfig {
        name: format!("readme-{}", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 4096,
    };
    let vm = Vm::new(config, HeapPages::new(), ram, Arc::new(NoExposure))?;

    // Segment 0: 2 MiB of guest RAM, mapped at 0 and again at 4 GiB.
    vm.alloc_segment(0, 2 << 20, SegmentKind::SysMem)?;
    vm.map_segment(0, 0, 0, 2 << 20, None)?;
    vm.map_segment(1 << 32, 0, 0, 2 << 20, Some(Prot::READ))?;

    // The host loads an image; a vCPU or device sees it at both addresses.
    vm.write_segment(0, 0x3000, b"boot")?;
    let client = vm.space().client();
    let mut seen = [0u8; 4];
    for gpa in [0x3000, (1 << 32) + 0x3000] {
        let hold = client.hold(Gpa(gpa), Prot::READ)?;
        hold.read(0, &mut seen)?;
        hold.release();
        assert_eq!(&seen, b"boot");
    }

    // A device write through a writable hold is dirty-tracked.
    let mut bitmap = vec![0u64; 8];
    vm.harvest_dirty(0, 2 << 20, &mut bitmap)?; // start clean
    let hold = client.hold(Gpa(0x7000), Prot::RW)?;
    hold.write(0, b"data")?;
    hold.release();
    assert_eq!(vm.harvest_dirty(0, 2 << 20, &mut bitmap)?, 1);
    assert_eq!(bitmap[0], 1 << 7);
    // --- README example ends here ---
    Ok(())
}

/// The README shows exactly the example above (its lines, unindented, in
/// one code block), so the two cannot drift apart.
#[test]
fn readme_shows_the_tested_example() {
    let this = include_str!("readme.rs");
    let readme = include_str!("../README.md");
    let start = this.find("// --- README example starts here ---\n").unwrap();
    let end = this.find("    // --- README example ends here ---").unwrap();
    let body = &this[start..end];
    let body = &body[body.find('\n').unwrap() + 1..];
    let unindented: String = body.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
    assert!(readme.contains(&unindented), "README.md does not show tests/readme.rs's example:\n{unindented}");
}
