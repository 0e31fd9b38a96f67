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

/// A VM with no vCPUs as a source: nothing to pause. Zero pages are found
/// in place; the pages it copies out are counted.
struct Src(VmMemory<HeapPages>, u64);

impl Src {
    fn new(m: VmMemory<HeapPages>) -> Src {
        Src(m, 0)
    }
}

impl MigrationSource for Src {
    fn layout(&self) -> Layout {
        self.0.layout().unwrap()
    }
    fn resident(&mut self, r: &MemRange, b: &mut [u64]) -> Result<(), HostError> {
        self.0.resident(r, b)
    }
    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.1 += 1;
        self.0.read_page(gpa, buf)
    }
    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.1 += buf.len() as u64 / PG;
        self.0.read_pages(gpa, buf)
    }
    fn zero_mask(&mut self, gpa: u64, n: usize) -> Result<Option<u64>, HostError> {
        self.0.zero_mask(gpa, n)
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
/// target does (so only the received mask remembers them). Page runs are
/// received in place (counted).
struct Tgt(VmMemory<HeapPages>, u64);

impl Tgt {
    fn new(m: VmMemory<HeapPages>) -> Tgt {
        Tgt(m, 0)
    }
}

impl MigrationTarget for Tgt {
    fn prepare(&mut self, l: &Layout) -> Result<(), HostError> {
        self.0.prepare(l)?;
        self.0.vm().set_dirty_tracking(false).map_err(|e| HostError::new("prepare", e.to_string()))
    }
    fn write_page(&mut self, gpa: u64, d: &[u8]) -> Result<(), HostError> {
        self.0.write_page(gpa, d)
    }
    fn receive_pages(
        &mut self,
        gpa: u64,
        len: usize,
        recv: &mut dyn FnMut(&[vmm::migration::RawDest]),
    ) -> Result<bool, HostError> {
        let done = self.0.receive_pages(gpa, len, recv)?;
        self.1 += u64::from(done) * len as u64 / PG;
        Ok(done)
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
    let mut src = Src::new(VmMemory::new(a.clone(), None));
    let mut tb = Tgt::new(VmMemory::new(b.clone(), None));
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
    let mut sb = Src::new(tb.0);
    let mut tc = Tgt::new(VmMemory::new(c.clone(), None));
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
    let mut src = Src::new(VmMemory::new(a, None));
    let mut tb = Tgt::new(VmMemory::new(b, None));
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

/// Pages the source finds zero in place are sent as zero records without
/// being copied out; the others are copied once and land in place in the
/// target's segment memory.
#[test]
fn zero_pages_are_found_in_place_and_runs_land_in_place() {
    let (a, b) = (vm("zin-a"), vm("zin-b"));
    for p in 0..8u64 {
        a.write_segment(0, p * PG, &[p as u8 + 1; 4096]).unwrap();
    }
    // Resident (a host write marks them) but zero.
    a.write_segment(0, 8 * PG, &[0u8; 8 * 4096]).unwrap();
    // One non-zero byte at the end of a page.
    a.write_segment(0, 21 * PG - 1, &[0xee]).unwrap();
    // Zero again in the target, written before: the zero record clears it.
    b.write_segment(0, 9 * PG, &[5u8; 4096]).unwrap();
    let mut src = Src::new(VmMemory::new(a.clone(), None));
    let mut tb = Tgt::new(VmMemory::new(b.clone(), None));
    let sum = migrate(&mut src, &mut tb);
    assert_eq!(sum.pages_sent, 17, "{sum:?}");
    assert_eq!(sum.zero_pages, 8, "{sum:?}");
    assert_eq!(src.1, 9, "only the non-zero pages are copied out");
    assert_eq!(tb.1, 9, "every page run landed in place");
    for p in 0..32u64 {
        assert_eq!(page(&b, 0, p), page(&a, 0, p), "page {p}");
    }
}

/// A stream whose page run fails its checksum after landing in place in a
/// real VM's memory: the attempt fails and the target zeroes what landed.
#[test]
fn a_corrupt_run_received_in_place_is_discarded() {
    use std::io::{Cursor, Read, Write};
    use vmm::migration::wire::{self, tag};
    let (a, b) = (vm("zc-a"), vm("zc-b"));
    a.write_segment(0, 0, &[3u8; 4 * 4096]).unwrap();
    let mut src = Src::new(VmMemory::new(a.clone(), None));
    let mut acks = wire::encode_header_ack(Ok(()));
    acks.extend(wire::encode_record(tag::FINAL_ACK, 1, &[]));
    let mut full = Vec::new();
    vmm::migration::migrate(&mut src, Cursor::new(acks), &mut full, &SourceConfig::default(), &mut |_| {}).unwrap();
    // The header, the round marker, then the run's header: a byte near the
    // end of its 16 KiB payload (past what is read ahead with the header).
    let run = wire::encode_header(&src.layout()).len() + 2 * wire::RECORD_HEADER;
    assert_eq!(full[run - wire::RECORD_HEADER], tag::PAGE);
    full[run + 4 * 4096 - 5] ^= 1;
    let mut tb = Tgt::new(VmMemory::new(b.clone(), None));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let r = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let (c, _) = l.accept().unwrap();
            vmm::migration::receive_tcp(&mut tb, &c, &TargetConfig::default(), None)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = c.write_all(&full);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = c.read_to_end(&mut Vec::new());
        t.join().unwrap()
    });
    let e = r.unwrap_err();
    assert!(matches!(e, vmm::migration::MigrationError::Corrupt(_)), "{e}");
    assert_eq!(tb.1, 4, "the run was received in place");
    for p in 0..4 {
        assert_eq!(page(&b, 0, p), vec![0u8; 4096], "page {p} kept after the discard");
    }
}

// ---- device models: the PCI platform with a framebuffer ----

use std::sync::Mutex;
use vmm::fbuf::{self, Fbuf};
use vmm::platform::{BarBacking, ECAM_BASE, PCI_WINDOW_32, Platform};

const FB_DEV: u8 = 3;
const FB_SEG: u32 = 2;
const FB_SIZE: u64 = 1 << 20;
/// Two placements of the framebuffer BAR (1 MiB aligned, inside the
/// test VM's 64 GiB space).
const BAR_A: u64 = PCI_WINDOW_32.0;
const BAR_B: u64 = PCI_WINDOW_32.0 + (16 << 20);

/// [`vm`] with a framebuffer segment behind BAR 1 of a framebuffer at
/// 03.0 (its register BAR emulated), not programmed yet.
fn vm_fb(test: &str) -> (Arc<Vm<HeapPages>>, Arc<Mutex<Platform>>) {
    let v = vm(test);
    v.alloc_segment(FB_SEG, FB_SIZE, SegmentKind::DevMem { name: "framebuffer".into() }).unwrap();
    let mut p = Platform::new(ECAM_BASE);
    p.attach(
        FB_DEV,
        Box::new(Fbuf::new(FB_SIZE, 256, 128).unwrap()),
        &[
            (fbuf::REG_BAR, BarBacking::Emulated),
            (fbuf::FB_BAR, BarBacking::Segment { id: FB_SEG, prot: vmspace::Prot::RW }),
        ],
    )
    .unwrap();
    (v, Arc::new(Mutex::new(p)))
}

/// A guest's configuration write of a dword at `off` of 03.0.
fn cfg_write(p: &Mutex<Platform>, v: &Vm<HeapPages>, off: u64, val: u32) {
    let gpa = ECAM_BASE + (u64::from(FB_DEV) << 15) + off;
    assert!(p.lock().unwrap().mmio_write(v, gpa, &val.to_le_bytes()));
}

fn cfg_read(p: &Mutex<Platform>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(p.lock().unwrap().mmio_read(ECAM_BASE + (u64::from(FB_DEV) << 15) + off, &mut b));
    u32::from_le_bytes(b)
}

/// Places the framebuffer BAR at `at` with decoding on, as an OS does
/// (low dword, then high).
fn place_bar(p: &Mutex<Platform>, v: &Vm<HeapPages>, at: u64) {
    cfg_write(p, v, 0x14, at as u32);
    cfg_write(p, v, 0x18, (at >> 32) as u32);
}

/// A VM with its platform as a source: the platform's state travels.
struct SrcP(Src, Arc<Mutex<Platform>>);

impl MigrationSource for SrcP {
    fn layout(&self) -> Layout {
        self.0.layout()
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
        let mut blobs = self.0.state()?;
        blobs.push(vmm::migration::devices::save_platform(&mut self.1.lock().unwrap()));
        Ok(blobs)
    }
}

/// The same as a target: the platform first (it maps the BARs), then the
/// layout check (which compares the mappings).
struct TgtP(Tgt, Arc<Mutex<Platform>>);

impl MigrationTarget for TgtP {
    fn prepare(&mut self, l: &Layout) -> Result<(), HostError> {
        self.0.prepare(l)
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
        let (dev, rest): (Vec<_>, Vec<_>) = blobs.into_iter().partition(|b| b.kind == StateKind::Device);
        for b in &dev {
            let vm = self.0.0.vm().clone();
            vmm::migration::devices::restore_platform(&mut self.1.lock().unwrap(), &vm, &b.data)?;
        }
        self.0.apply_state(rest)
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.0.resume()
    }
    fn discard(&mut self) {
        self.0.discard();
    }
}

fn migrate_p(src: &mut SrcP, dst: &mut TgtP, progress: &mut dyn FnMut(&vmm::migration::Progress)) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            let (c, _) = l.accept().unwrap();
            vmm::migration::receive_tcp(dst, &c, &TargetConfig::default(), None)
        });
        let c = TcpStream::connect(addr).unwrap();
        let sum = vmm::migration::migrate_tcp(src, &c, &SourceConfig::default(), None, progress);
        let got = t.join().unwrap();
        sum.unwrap();
        got.unwrap();
    });
}

/// The framebuffer's state travels: BAR placement and decoding, interrupt
/// line, the guest-programmed mode, and the pixels; the target's BAR is
/// mapped where the source's was (without the platform blob the target's
/// layout check refuses: the source has a mapping the target lacks).
#[test]
fn framebuffer_bar_config_space_and_mode_travel() {
    let ((a, pa), (b, pb)) = (vm_fb("fb-a"), vm_fb("fb-b"));
    place_bar(&pa, &a, BAR_A);
    cfg_write(&pa, &a, 0x3c, 11);
    cfg_write(&pa, &a, 0x04, u32::from(vmm::pci::COMMAND_MEMORY));
    assert_eq!(pa.lock().unwrap().mapped_at(FB_DEV, fbuf::FB_BAR), Some(BAR_A));
    pa.lock().unwrap().fbuf(FB_DEV).unwrap().reg_write(4, &128u32.to_le_bytes());
    let pixels: Vec<u8> = (0..3 * PG as usize).map(|i| (i * 13 + 1) as u8).collect();
    a.write_segment(FB_SEG, 5 * PG, &pixels).unwrap();
    let mut src = SrcP(Src::new(VmMemory::new(a.clone(), None)), pa.clone());
    let mut dst = TgtP(Tgt::new(VmMemory::new(b.clone(), None)), pb.clone());
    migrate_p(&mut src, &mut dst, &mut |_| {});
    let mut p = pb.lock().unwrap();
    assert_eq!(p.pci.bar_address(FB_DEV, 0, fbuf::FB_BAR), Some(BAR_A));
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), Some(BAR_A));
    assert_eq!(b.mapping_at(BAR_A).map(|m| m.segment), Some(FB_SEG));
    assert_eq!(p.fbuf(FB_DEV).unwrap().width(), 128);
    drop(p);
    assert_eq!(cfg_read(&pb, 0x3c) & 0xff, 11);
    assert_eq!(cfg_read(&pb, 0x04) & 0xffff, u32::from(vmm::pci::COMMAND_MEMORY));
    let mut got = vec![0u8; pixels.len()];
    b.read_segment(FB_SEG, 5 * PG, &mut got).unwrap();
    assert_eq!(got, pixels);
}

/// A BAR moved while the migration runs (after the first pass) composes:
/// the stream addresses the segment, not the guest-physical range, so the
/// pixels written after the move arrive, and the placement at pause (the
/// new one) is the target's; nothing is left at the old address.
#[test]
fn a_bar_moved_during_the_attempt_lands_at_its_new_place() {
    let ((a, pa), (b, pb)) = (vm_fb("mv-a"), vm_fb("mv-b"));
    place_bar(&pa, &a, BAR_A);
    cfg_write(&pa, &a, 0x04, u32::from(vmm::pci::COMMAND_MEMORY));
    a.write_segment(FB_SEG, 0, &[1u8; 4096]).unwrap();
    let mut src = SrcP(Src::new(VmMemory::new(a.clone(), None)), pa.clone());
    let mut dst = TgtP(Tgt::new(VmMemory::new(b.clone(), None)), pb.clone());
    let mut moved = false;
    let (a2, pa2) = (a.clone(), pa.clone());
    migrate_p(&mut src, &mut dst, &mut |p| {
        if !moved && !p.paused {
            place_bar(&pa2, &a2, BAR_B);
            // Written after the first pass: only a later round finds it.
            a2.write_segment(FB_SEG, PG, &[2u8; 4096]).unwrap();
            moved = true;
        }
    });
    assert!(moved);
    let p = pb.lock().unwrap();
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), Some(BAR_B));
    assert!(b.mapping_at(BAR_A).is_none(), "a mapping left at the old address");
    assert_eq!(b.mapping_at(BAR_B).map(|m| m.segment), Some(FB_SEG));
    assert_eq!(page(&b, FB_SEG, 0), vec![1u8; 4096]);
    assert_eq!(page(&b, FB_SEG, 1), vec![2u8; 4096]);
}

/// A target whose platform differs (no framebuffer) refuses the state.
#[test]
fn platform_state_for_other_functions_is_refused() {
    let (_, pa) = vm_fb("pf-a");
    let blob = vmm::migration::devices::save_platform(&mut pa.lock().unwrap());
    let b = vm("pf-b");
    let mut bare = Platform::new(ECAM_BASE);
    let e = vmm::migration::devices::restore_platform(&mut bare, &b, &blob.data).unwrap_err();
    assert!(e.message.contains("functions"), "{e}");
    // Truncated and foreign blobs are typed errors, never panics.
    for n in 0..blob.data.len() {
        assert!(vmm::migration::devices::restore_platform(&mut bare, &b, &blob.data[..n]).is_err());
    }
    assert!(vmm::migration::devices::restore_platform(&mut bare, &b, b"not a blob at all").is_err());
}
