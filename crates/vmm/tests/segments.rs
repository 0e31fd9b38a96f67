//! Memory segments: bhyve's memseg semantics, every error case, aliases,
//! device-memory nodes seen by other processes, and dirty tracking of host
//! writes.

use std::process::Command;
use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmm::devmem::{self, NoExposure};
use vmm::{BadName, Error, SegmentKind, Vm, VmConfig};
use vmspace::{DirtyOp, Gpa, HeapReservoir, Pfn, Prot, PteFormat, Reservoir, SpaceConfig};

const PG: u64 = 4096;
const SPACE: u64 = 1 << 36;

fn name(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

fn vm_with(test: &str, ram_pages: u64, track: bool) -> (Vm<HeapPages>, Arc<HeapReservoir>) {
    let ram = Arc::new(HeapReservoir::new(ram_pages * PG, Pfn(0x1000)).unwrap());
    let mut space = SpaceConfig::new(SPACE, PteFormat::npt(Caps::default()));
    space.track_dirty = track;
    let cfg = VmConfig { name: name(test), space, devmem_frame_base: Pfn(0x10_0000), devmem_frames: 4096 };
    let vm = Vm::new(cfg, HeapPages::with_capacity(0, 256), ram.clone(), Arc::new(NoExposure)).unwrap();
    (vm, ram)
}

fn devmem(name: &str) -> SegmentKind {
    SegmentKind::DevMem { name: name.into() }
}

/// Everything observable about the VM's memory layout.
fn layout(vm: &Vm<HeapPages>, ram: &HeapReservoir) -> String {
    format!("{:?} {:?} {:?} {:?}", vm.segments(), vm.mappings(), vm.space().mappings().len(), ram.stats())
}

#[test]
fn segment_errors_change_nothing() {
    let (vm, ram) = vm_with("errors", 64, false);
    vm.alloc_segment(0, 8 * PG, SegmentKind::SysMem).unwrap();
    vm.alloc_segment(1, 4 * PG, devmem("fb")).unwrap();
    vm.map_segment(0, 0, 0, 8 * PG, None).unwrap();
    let before = layout(&vm, &ram);
    let long = "x".repeat(devmem::MAX_NAME + 1);
    type Case<'a> = (Error, Box<dyn Fn() -> vmm::Result<()> + 'a>);
    let cases: Vec<Case<'_>> = vec![
        // allocation
        (Error::DuplicateSegment(0), Box::new(|| vm.alloc_segment(0, PG, SegmentKind::SysMem))),
        (Error::BadSegmentId(64), Box::new(|| vm.alloc_segment(64, PG, SegmentKind::SysMem))),
        (Error::BadSegmentId(u32::MAX), Box::new(|| vm.alloc_segment(u32::MAX, PG, SegmentKind::SysMem))),
        (Error::BadLength, Box::new(|| vm.alloc_segment(2, 0, SegmentKind::SysMem))),
        (Error::BadLength, Box::new(|| vm.alloc_segment(2, PG + 1, SegmentKind::SysMem))),
        (Error::BadLength, Box::new(|| vm.alloc_segment(2, !(PG - 1), devmem("huge")))),
        (Error::Space(vmspace::Error::ReservoirFull), Box::new(|| vm.alloc_segment(2, 1 << 30, SegmentKind::SysMem))),
        (Error::BadName(BadName::Empty), Box::new(|| vm.alloc_segment(2, PG, devmem("")))),
        (Error::BadName(BadName::TooLong), Box::new(|| vm.alloc_segment(2, PG, devmem(&long)))),
        (Error::BadName(BadName::Characters), Box::new(|| vm.alloc_segment(2, PG, devmem("a/b")))),
        (Error::BadName(BadName::Characters), Box::new(|| vm.alloc_segment(2, PG, devmem("..")))),
        (Error::NameInUse, Box::new(|| vm.alloc_segment(2, PG, devmem("fb")))),
        // mapping
        (Error::UnknownSegment(9), Box::new(|| vm.map_segment(1 << 30, 9, 0, PG, None))),
        (Error::BadLength, Box::new(|| vm.map_segment(1 << 30, 0, 0, 0, None))),
        (Error::Unaligned, Box::new(|| vm.map_segment((1 << 30) + 1, 0, 0, PG, None))),
        (Error::Unaligned, Box::new(|| vm.map_segment(1 << 30, 0, 1, PG, None))),
        (Error::Unaligned, Box::new(|| vm.map_segment(1 << 30, 0, 0, PG - 1, None))),
        (Error::Overflow, Box::new(|| vm.map_segment(!(PG - 1), 0, 0, 2 * PG, None))),
        (Error::Overflow, Box::new(|| vm.map_segment(1 << 30, 0, !(PG - 1), 2 * PG, None))),
        (Error::OutsideSegment, Box::new(|| vm.map_segment(1 << 30, 0, 4 * PG, 8 * PG, None))),
        (Error::OutsideSegment, Box::new(|| vm.map_segment(1 << 30, 1, 0, 8 * PG, None))),
        (Error::NoSpace, Box::new(|| vm.map_segment(4 * PG, 0, 0, PG, None))),
        (Error::NoSpace, Box::new(|| vm.map_segment(SPACE, 0, 0, PG, None))),
        (Error::BadProt, Box::new(|| vm.map_segment(1 << 30, 0, 0, PG, Some(Prot::empty())))),
        (Error::BadProt, Box::new(|| vm.map_segment(1 << 30, 0, 0, PG, Some(Prot::WRITE)))),
        (Error::BadProt, Box::new(|| vm.map_segment(1 << 30, 1, 0, PG, Some(Prot::RWX)))),
        (Error::BadProt, Box::new(|| vm.map_segment(1 << 30, 1, 0, PG, Some(Prot::EXEC)))),
        (Error::BadProt, Box::new(|| vm.map_segment(1 << 30, 1, 0, PG, Some(Prot::WRITE | Prot::EXEC)))),
        // unmap and free
        (Error::NotMapped, Box::new(|| vm.unmap(0, 4 * PG))),
        (Error::NotMapped, Box::new(|| vm.unmap(PG, 7 * PG))),
        (Error::NotMapped, Box::new(|| vm.unmap(1 << 30, PG))),
        (Error::SegmentMapped(0), Box::new(|| vm.free_segment(0))),
        (Error::UnknownSegment(7), Box::new(|| vm.free_segment(7))),
        // host access
        (Error::OutsideSegment, Box::new(|| vm.write_segment(0, 8 * PG - 1, &[1, 2]))),
        (Error::OutsideSegment, Box::new(|| vm.write_segment(0, u64::MAX, &[1]))),
        (Error::UnknownSegment(5), Box::new(|| vm.write_segment(5, 0, &[1]))),
    ];
    for (k, (want, f)) in cases.iter().enumerate() {
        assert_eq!(f().as_ref().err(), Some(want), "case {k}");
        assert_eq!(layout(&vm, &ram), before, "case {k} changed something");
    }
    assert_eq!(vm.segment(3).unwrap_err(), Error::UnknownSegment(3));
}

#[test]
fn segment_lifecycle_and_iteration() {
    let (vm, ram) = vm_with("life", 64, false);
    vm.alloc_segment(3, 16 * PG, SegmentKind::SysMem).unwrap();
    assert_eq!(ram.stats().allocated, 16 * PG, "RAM comes from the reservoir");
    vm.alloc_segment(1, 2 * PG, devmem("bootrom")).unwrap();
    vm.map_segment(0x10_0000, 3, 0, 8 * PG, None).unwrap();
    vm.map_segment(0x20_0000, 3, 8 * PG, 8 * PG, Some(Prot::RW)).unwrap();
    vm.map_segment(0xFFFF_E000, 1, 0, 2 * PG, Some(Prot::RX)).unwrap();
    let m = vm.mappings();
    assert_eq!(m.len(), 3);
    assert_eq!((m[0].gpa, m[0].prot, m[0].segment), (Gpa(0x10_0000), Prot::RWX, 3), "sysmem defaults to RWX");
    assert_eq!((m[1].offset, m[1].prot), (8 * PG, Prot::RW));
    assert_eq!((m[2].gpa, m[2].prot), (Gpa(0xFFFF_E000), Prot::RX));
    // bhyve's getnext iteration.
    let mut seen = Vec::new();
    let mut at = 0;
    while let Some(x) = vm.mapping_next(at) {
        seen.push(x.gpa.0);
        at = x.gpa.0 + x.len;
    }
    assert_eq!(seen, [0x10_0000, 0x20_0000, 0xFFFF_E000]);
    assert_eq!(vm.mapping_at(0x10_0000 + 8 * PG - 1).map(|x| x.gpa), Some(Gpa(0x10_0000)));
    assert_eq!(vm.mapping_at(0x10_0000 + 8 * PG), None);
    let s = vm.segment(3).unwrap();
    assert_eq!((s.len, s.mappings, s.node.is_none()), (16 * PG, 2, true));
    let b = vm.segment(1).unwrap();
    assert!(b.node.as_ref().unwrap().ends_with("bootrom") && b.node.as_ref().unwrap().exists());
    // Unmap both aliases, then free: the memory goes back.
    vm.unmap(0x10_0000, 8 * PG).unwrap();
    assert_eq!(vm.free_segment(3), Err(Error::SegmentMapped(3)));
    vm.unmap(0x20_0000, 8 * PG).unwrap();
    vm.free_segment(3).unwrap();
    assert_eq!(ram.stats().allocated, 0);
    assert_eq!(vm.segment(3).unwrap_err(), Error::UnknownSegment(3));
    // The id can be used again.
    vm.alloc_segment(3, PG, SegmentKind::SysMem).unwrap();
}

#[test]
fn aliases_reach_the_same_memory() {
    let (vm, _ram) = vm_with("alias", 64, false);
    vm.alloc_segment(0, 4 * PG, SegmentKind::SysMem).unwrap();
    vm.alloc_segment(1, 4 * PG, devmem("fb")).unwrap();
    vm.map_segment(0x1000_0000, 0, 0, 4 * PG, None).unwrap();
    vm.map_segment(0x2000_0000, 0, PG, 2 * PG, None).unwrap();
    vm.map_segment(0x3000_0000, 1, 0, 4 * PG, None).unwrap();
    vm.map_segment(0x4000_0000, 1, 0, 4 * PG, Some(Prot::READ)).unwrap();
    let c = vm.space().client();
    // A write through one alias is read through the other and by the host.
    c.hold(Gpa(0x1000_0000 + PG), Prot::RW).unwrap().write_u64(8, 0xfeed).unwrap();
    assert_eq!(c.hold(Gpa(0x2000_0000), Prot::READ).unwrap().read_u64(8), Ok(0xfeed));
    let mut b = [0u8; 8];
    vm.read_segment(0, PG + 8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xfeed);
    // Device memory: guest, host node and read-only alias agree.
    c.hold(Gpa(0x3000_0000 + 3 * PG), Prot::RW).unwrap().write_u64(0, 0xabcd).unwrap();
    let view = devmem::open(vm.name(), "fb", false).unwrap();
    view.read(3 * PG, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xabcd);
    assert_eq!(view.write(0, &[1]), Err(Error::ReadOnlyView));
    let rw = devmem::open(vm.name(), "fb", true).unwrap();
    rw.write(16, &7u64.to_le_bytes()).unwrap();
    assert_eq!(c.hold(Gpa(0x4000_0000), Prot::READ).unwrap().read_u64(16), Ok(7));
    assert_eq!(c.hold(Gpa(0x4000_0000), Prot::RW).err(), Some(vmspace::Error::Protection));
    assert_eq!(rw.read(4 * PG - 4, &mut b), Err(Error::OutsideSegment));
    assert_eq!(rw.read(u64::MAX, &mut b), Err(Error::OutsideSegment));
}

#[test]
fn nodes_are_seen_by_other_processes_and_removed_with_the_vm() {
    let (vm, _ram) = vm_with("proc", 16, false);
    vm.alloc_segment(1, 2 * PG, devmem("fb")).unwrap();
    vm.map_segment(0x8000_0000, 1, 0, 2 * PG, None).unwrap();
    let c = vm.space().client();
    c.hold(Gpa(0x8000_0000 + PG), Prot::RW).unwrap().write(100, b"written by the guest").unwrap();
    let path = vm.segment(1).unwrap().node.unwrap();
    // Another process reads it by name...
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["bs=1", "skip=4196", "count=20", "status=none"])
        .output()
        .expect("run dd");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"written by the guest");
    // ...and writes it; the guest sees the write.
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("printf 'from another process' | dd of={} bs=1 seek=200 conv=notrunc status=none", path.display()))
        .status()
        .expect("run sh");
    assert!(st.success());
    let mut b = [0u8; 20];
    c.hold(Gpa(0x8000_0000), Prot::READ).unwrap().read(200, &mut b).unwrap();
    assert_eq!(&b, b"from another process");
    // A second VM of the same name is refused while this one lives.
    let ram2 = Arc::new(HeapReservoir::new(PG, Pfn(0x1000)).unwrap());
    let cfg = VmConfig {
        name: vm.name().into(),
        space: SpaceConfig::new(SPACE, PteFormat::npt(Caps::default())),
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 16,
    };
    let e = Vm::new(cfg.clone(), HeapPages::with_capacity(0, 16), ram2.clone(), Arc::new(NoExposure)).unwrap_err();
    assert_eq!(e, Error::VmNameInUse);
    let dir = vm.node_dir().to_path_buf();
    drop(c);
    drop(vm);
    assert!(!path.exists() && !dir.exists(), "nodes and directory removed with the VM");
    assert_eq!(devmem::open(&cfg.name, "fb", false).unwrap_err(), Error::NoSuchNode);
    // A directory left by a dead process is reclaimed.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pid"), "999999999\n").unwrap();
    std::fs::write(dir.join("fb"), "stale").unwrap();
    let vm2 = Vm::new(cfg, HeapPages::with_capacity(0, 16), ram2, Arc::new(NoExposure)).unwrap();
    assert!(!dir.join("fb").exists());
    drop(vm2);
}

#[test]
fn held_memory_outlives_unmap_and_free() {
    let (vm, ram) = vm_with("held", 16, false);
    vm.alloc_segment(0, 2 * PG, SegmentKind::SysMem).unwrap();
    vm.map_segment(0x10_0000, 0, 0, 2 * PG, None).unwrap();
    let c = vm.space().client();
    let h = c.hold(Gpa(0x10_0000), Prot::RW).unwrap();
    vm.unmap(0x10_0000, 2 * PG).unwrap();
    vm.free_segment(0).unwrap();
    assert_eq!(ram.stats().allocated, 2 * PG, "the hold keeps the segment's memory");
    h.write_u64(0, 5).unwrap();
    assert!(h.release(), "the release reports the unmap");
    assert_eq!(ram.stats().allocated, 0);
}

#[test]
fn host_writes_and_node_writes_are_dirty_tracked() {
    let (vm, _ram) = vm_with("dirty", 64, true);
    vm.alloc_segment(0, 8 * PG, SegmentKind::SysMem).unwrap();
    vm.alloc_segment(1, 4 * PG, devmem("fb")).unwrap();
    vm.map_segment(0, 0, 0, 8 * PG, None).unwrap();
    vm.map_segment(0x10_0000, 0, 4 * PG, 4 * PG, None).unwrap(); // alias of pages 4..8
    vm.map_segment(0x20_0000, 1, 0, 4 * PG, None).unwrap();
    let mut bm = [0u64; 1];
    vm.set_dirty_tracking(true).unwrap();
    // Host write spanning pages 3 and 4 of the sysmem segment: dirty in
    // both aliases that cover them.
    vm.write_segment(0, 4 * PG - 2, &[1, 2, 3, 4]).unwrap();
    assert_eq!(vm.harvest_dirty(0, 8 * PG, &mut bm), Ok(2));
    assert_eq!(bm[0], 0b11000);
    // (Bits past the range's 4 pages keep what they had: clear them.)
    bm[0] = 0;
    assert_eq!(vm.harvest_dirty(0x10_0000, 4 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 0b1);
    // Another process writes the framebuffer node: the harvest reports it,
    // once.
    let rw = devmem::open(vm.name(), "fb", true).unwrap();
    rw.write(2 * PG + 5, b"x").unwrap();
    assert_eq!(vm.harvest_dirty(0x20_0000, 4 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 0b100);
    assert_eq!(vm.harvest_dirty(0x20_0000, 4 * PG, &mut bm), Ok(0));
    // A guest-style write through a hold is reported by the table bit.
    vm.space().client().hold(Gpa(0x20_0000 + 3 * PG), Prot::RW).unwrap().write_u64(0, 1).unwrap();
    assert_eq!(vm.harvest_dirty(0x20_0000, 4 * PG, &mut bm), Ok(1));
    assert_eq!(bm[0], 0b1000);
    // Nothing else was dirty.
    let mut all = [0u64; 1];
    assert_eq!(vm.space().dirty_op(DirtyOp::Get, Gpa(0), 8 * PG, None, &mut all), Ok(0));
}
