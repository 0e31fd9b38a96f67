//! The memory of a real `vmm::Vm` through the migration engine over TCP
//! loopback, without KVM: what is sent (resident pages, device memory,
//! nothing for untouched pages), and what a VM that arrived by migration
//! sends on.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmm::devmem::NoExposure;
use vmm::migration::vm::VmMemory;
use vmm::migration::{
    HostError, Layout, MemRange, MigrationSource, MigrationTarget, SourceConfig, StateBlob, StateKind, TargetConfig,
};
use vmm::{SegmentKind, Vm, VmConfig};
use vmspace::{HeapReservoir, Pfn, PteFormat, SpaceConfig};

const PG: u64 = 4096;

fn vm(test: &str) -> Arc<Vm<HeapPages>> {
    let ram = Arc::new(HeapReservoir::new(256 * PG, Pfn(0x1000)).unwrap());
    let mut space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    space.track_dirty = true;
    let cfg = VmConfig {
        name: format!("m{}-{test}", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 4096,
    };
    let vm = Vm::new(cfg, HeapPages::with_capacity(0, 256), ram, Arc::new(NoExposure)).unwrap();
    vm.alloc_segment(0, 64 * PG, SegmentKind::SysMem).unwrap();
    vm.map_segment(0, 0, 0, 64 * PG, None).unwrap();
    vm.alloc_segment(1, 4 * PG, SegmentKind::DevMem { name: "rom".into() }).unwrap();
    vm.map_segment(0x10_0000, 1, 0, 4 * PG, Some(vmspace::Prot::READ)).unwrap();
    Arc::new(vm)
}

/// A VM with no vCPUs as a source: nothing to pause.
struct Src(VmMemory<HeapPages>);

impl MigrationSource for Src {
    fn layout(&self) -> Layout {
        self.0.layout().unwrap()
    }
    fn resident(&mut self, r: &MemRange, b: &mut [u64]) -> Result<(), HostError> {
        self.0.resident(r, b)
    }
    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.0.read_page(gpa, buf)
    }
    fn harvest(&mut self, r: &MemRange, b: &mut [u64]) -> Result<(), HostError> {
        self.0.harvest(r, b)
    }
    fn set_dirty(&mut self, r: &MemRange, b: &[u64]) -> Result<(), HostError> {
        self.0.set_dirty(r, b)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn state(&mut self) -> Result<Vec<StateBlob>, HostError> {
        Ok(vec![StateBlob { kind: StateKind::VmLayout, instance: 0, data: self.0.layout_blob() }])
    }
}

/// The same VM as a target; tracking off while pages arrive, as the KVM
/// target does (so only the received mask remembers them).
struct Tgt(VmMemory<HeapPages>);

impl MigrationTarget for Tgt {
    fn prepare(&mut self, l: &Layout) -> Result<(), HostError> {
        self.0.prepare(l)?;
        self.0.vm().set_dirty_tracking(false).map_err(|e| HostError::new("prepare", e.to_string()))
    }
    fn write_page(&mut self, gpa: u64, d: &[u8]) -> Result<(), HostError> {
        self.0.write_page(gpa, d)
    }
    fn zero_page(&mut self, gpa: u64) -> Result<(), HostError> {
        self.0.zero_page(gpa)
    }
    fn mark_received(&mut self, r: &MemRange, b: &[u64]) -> Result<(), HostError> {
        self.0.mark_received(r, b)
    }
    fn apply_state(&mut self, blobs: Vec<StateBlob>) -> Result<(), HostError> {
        for b in blobs {
            self.0.check_layout_blob(&b.data)?;
        }
        self.0.vm().set_dirty_tracking(true).map_err(|e| HostError::new("apply_state", e.to_string()))
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.0.finish();
        Ok(())
    }
    fn discard(&mut self) {
        self.0.discard();
    }
}

fn migrate(src: &mut Src, dst: &mut Tgt) -> vmm::migration::MigrationSummary {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            let (c, _) = l.accept().unwrap();
            vmm::migration::receive_tcp(dst, &c, &TargetConfig::default(), None).unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        let sum = vmm::migration::migrate_tcp(src, &c, &SourceConfig::default(), None, &mut |_| {}).unwrap();
        t.join().unwrap();
        sum
    })
}

fn page(vm: &Vm<HeapPages>, seg: u32, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PG as usize];
    vm.read_segment(seg, p * PG, &mut v).unwrap();
    v
}

#[test]
fn host_writes_and_device_memory_travel_and_untouched_pages_cost_nothing() {
    let (a, b, c) = (vm("a"), vm("b"), vm("c"));
    a.write_segment(0, 3 * PG, &[7u8; 4096]).unwrap();
    a.write_segment(0, 10 * PG + 100, b"hello").unwrap();
    a.write_segment(1, 2 * PG, &[9u8; 4096]).unwrap();
    let mut src = Src(VmMemory::new(a.clone(), None));
    let mut tb = Tgt(VmMemory::new(b.clone(), None));
    let sum = migrate(&mut src, &mut tb);
    // Two RAM pages (host writes mark them dirty, so they are resident)
    // and the one non-zero ROM page: nothing for the other 65.
    assert_eq!(sum.resident_pages, 3, "{sum:?}");
    assert_eq!(sum.pages_sent, 3, "{sum:?}");
    assert_eq!(page(&b, 0, 3), vec![7u8; 4096]);
    assert_eq!(&page(&b, 0, 10)[100..105], b"hello");
    assert_eq!(page(&b, 1, 2), vec![9u8; 4096]);
    // B never touches them; migrated on, it still delivers them.
    assert_eq!(tb.0.received_pages(), 3);
    let mut sb = Src(tb.0);
    let mut tc = Tgt(VmMemory::new(c.clone(), None));
    let sum = migrate(&mut sb, &mut tc);
    assert_eq!(sum.pages_sent, 3, "{sum:?}");
    assert_eq!(page(&c, 0, 3), vec![7u8; 4096]);
    assert_eq!(&page(&c, 0, 10)[100..105], b"hello");
    assert_eq!(page(&c, 1, 2), vec![9u8; 4096]);
}

#[test]
fn put_back_bits_come_out_of_the_next_harvest_once() {
    let a = vm("put");
    let mut m = VmMemory::new(a.clone(), None);
    let l = m.layout().unwrap();
    let ram = l.ranges[0];
    let mut bm = vec![0u64; ram.bitmap_words()];
    m.harvest(&ram, &mut bm).unwrap();
    assert!(bm.iter().all(|&w| w == 0));
    let mut back = vec![0u64; ram.bitmap_words()];
    back[0] = 0b1010;
    m.set_dirty(&ram, &back).unwrap();
    m.harvest_fresh(&ram, &mut bm).unwrap();
    assert_eq!(bm[0], 0, "a harvest that is not a migration's leaves put-back bits alone");
    m.harvest(&ram, &mut bm).unwrap();
    assert_eq!(bm[0], 0b1010);
    m.harvest(&ram, &mut bm).unwrap();
    assert_eq!(bm[0], 0, "handed out once");
    // A device-memory write through the host is found by comparison.
    let rom = l.ranges[1];
    let mut d = vec![0u64; rom.bitmap_words()];
    m.resident(&rom, &mut d).unwrap();
    a.write_segment(1, PG, b"x").unwrap();
    m.harvest(&rom, &mut d).unwrap();
    assert_eq!(d[0], 0b10);
}

#[test]
fn a_target_of_another_layout_refuses() {
    let a = vm("lay-a");
    let b = vm("lay-b");
    b.alloc_segment(2, PG, SegmentKind::SysMem).unwrap();
    let mut src = Src(VmMemory::new(a, None));
    let mut tb = Tgt(VmMemory::new(b, None));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            let (c, _) = l.accept().unwrap();
            vmm::migration::receive_tcp(&mut tb, &c, &TargetConfig::default(), None).is_err()
        });
        let c = TcpStream::connect(addr).unwrap();
        let e = vmm::migration::migrate_tcp(&mut src, &c, &SourceConfig::default(), None, &mut |_| {}).unwrap_err();
        assert!(matches!(e, vmm::migration::MigrationError::LayoutMismatch(_)), "{e:?}");
        assert!(t.join().unwrap());
    });
}
