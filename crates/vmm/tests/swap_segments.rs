//! Swappable system-memory segments: larger than the reservoir, host
//! reads and writes through the swap file, dirty marking of host writes,
//! guest access through holds, and the refusals (wiring, DMA mirrors).

use std::sync::{Arc, Mutex};

use vmm::{DmaMirror, Error, SegmentKind};
use vmspace::{Gpa, Prot, Reservoir, VmObject, swap_file_in};

mod common;

use common::{PG, new_vm};

fn file() -> std::fs::File {
    swap_file_in(&std::env::temp_dir()).unwrap()
}

#[test]
fn swappable_segment_larger_than_the_reservoir() {
    let (vm, ram) = new_vm("swapseg", 16);
    assert_eq!(vm.alloc_swappable_segment(64, PG, file()).unwrap_err(), Error::BadSegmentId(64));
    assert_eq!(vm.alloc_swappable_segment(0, PG + 1, file()).unwrap_err(), Error::BadLength);
    vm.alloc_swappable_segment(0, 64 * PG, file()).unwrap();
    assert_eq!(vm.alloc_swappable_segment(0, PG, file()).unwrap_err(), Error::DuplicateSegment(0));
    assert_eq!(vm.segment(0).unwrap().kind, SegmentKind::SysMem);
    assert_eq!(ram.stats().allocated, 0);
    vm.map_segment(0, 0, 0, 64 * PG, Some(Prot::RW)).unwrap();
    // Host writes to pages without frames go to the swap file, and are
    // marked dirty for a migration.
    let img: Vec<u8> = (0..64 * PG).map(|i| (i * 7 % 251) as u8).collect();
    vm.write_segment(0, 0, &img).unwrap();
    assert_eq!(ram.stats().allocated, 0);
    let mut bm = [0u64; 1];
    assert_eq!(vm.space().track_dirty(Gpa(0), 64 * PG, &mut bm).unwrap(), 64);
    assert_eq!(bm[0], u64::MAX);
    // The guest reads every page through holds: each swaps in, the
    // reservoir never holds more than its 16 frames.
    let c = vm.space().client();
    for p in 0..64 {
        let h = c.hold(Gpa(p * PG), Prot::READ).unwrap();
        let mut b = [0u8; 16];
        h.read(100, &mut b).unwrap();
        assert_eq!(b[..], img[(p * PG + 100) as usize..][..16]);
    }
    assert!(ram.stats().allocated <= 16 * PG);
    assert!(vm.space().swap_stats().swapped_out >= 48);
    // Read-only holds left nothing dirty.
    assert_eq!(vm.space().track_dirty(Gpa(0), 64 * PG, &mut bm).unwrap(), 0);
    let mut back = vec![0u8; img.len()];
    vm.read_segment(0, 0, &mut back).unwrap();
    assert_eq!(back, img);
}

struct Mirror(Mutex<u32>);

impl DmaMirror for Mirror {
    fn map(&self, _gpa: u64, _object: &VmObject, _offset: u64, _len: u64, _prot: Prot) -> vmm::Result<()> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
    fn unmap(&self, _gpa: u64, _len: u64) {}
}

#[test]
fn swappable_memory_is_never_wired_or_mirrored() {
    let (vm, _ram) = new_vm("swapwire", 16);
    vm.alloc_swappable_segment(0, 8 * PG, file()).unwrap();
    vm.map_segment(0, 0, 0, 8 * PG, None).unwrap();
    assert!(matches!(vm.wire_memory(), Err(Error::Backend(_))));
    assert!(!vm.is_wired());
    let mirror = Arc::new(Mirror(Mutex::new(0)));
    assert!(matches!(vm.attach_dma_mirror(mirror.clone()), Err(Error::Backend(_))));
    assert_eq!(*mirror.0.lock().unwrap(), 0, "the mirror was given nothing");
    // The other way round: no swappable segment once wired or mirrored.
    let (vm2, _r2) = new_vm("swapwire2", 16);
    vm2.wire_memory().unwrap();
    assert!(matches!(vm2.alloc_swappable_segment(0, PG, file()), Err(Error::Backend(_))));
    assert!(vm2.segments().is_empty());
    let (vm3, _r3) = new_vm("swapwire3", 16);
    vm3.attach_dma_mirror(mirror).unwrap();
    assert!(matches!(vm3.alloc_swappable_segment(0, PG, file()), Err(Error::Backend(_))));
}
