//! Shared set-up of the swappable-memory tests.

use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmm::devmem::NoExposure;
use vmm::{Vm, VmConfig};
use vmspace::{HeapReservoir, Pfn, PteFormat, SpaceConfig};

/// Bytes of a page.
pub const PG: u64 = 4096;

/// A VM named after `test` over a heap reservoir of `ram_pages` frames,
/// dirty tracking on, fault-around 1.
pub fn new_vm(test: &str, ram_pages: u64) -> (Vm<HeapPages>, Arc<HeapReservoir>) {
    let ram = Arc::new(HeapReservoir::new(ram_pages * PG, Pfn(0x1000)).unwrap());
    let mut space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    space.track_dirty = true;
    space.fault_around = 1;
    let cfg = VmConfig {
        name: format!("t{}-{test}", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 4096,
    };
    let vm = Vm::new(cfg, HeapPages::with_capacity(0, 256), ram.clone(), Arc::new(NoExposure)).unwrap();
    (vm, ram)
}
