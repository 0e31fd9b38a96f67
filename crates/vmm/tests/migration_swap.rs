//! Live migration of a `vmm::Vm` whose system memory is swappable (a
//! reservoir smaller than the guest), over TCP loopback without KVM: the
//! first pass sends resident and swapped-out pages alike (and nothing for
//! pages never touched), later rounds send a page swapped out dirty after
//! the first pass, and the target may back its memory either way.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use nested_pt::{Caps, HeapPages};
use vmm::devmem::NoExposure;
use vmm::migration::vm::VmMemory;
use vmm::migration::{
    HostError, Layout, MemRange, MigrationSource, MigrationSummary, MigrationTarget, SourceConfig, StateBlob,
    StateKind, TargetConfig,
};
use vmm::{SegmentKind, Vm, VmConfig};
use vmspace::{Gpa, HeapReservoir, Pfn, Prot, PteFormat, SpaceConfig, swap_file_in};

const PG: u64 = 4096;
const PAGES: u64 = 64;

fn new_vm(test: &str, ram_pages: u64, swappable: bool) -> Arc<Vm<HeapPages>> {
    let ram = Arc::new(HeapReservoir::new(ram_pages * PG, Pfn(0x1000)).unwrap());
    let mut space = SpaceConfig::new(1 << 36, PteFormat::npt(Caps::default()));
    space.track_dirty = true;
    space.fault_around = 1;
    let cfg = VmConfig {
        name: format!("ms{}-{test}", std::process::id()),
        space,
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 4096,
    };
    let vm = Vm::new(cfg, HeapPages::with_capacity(0, 256), ram, Arc::new(NoExposure)).unwrap();
    if swappable {
        vm.alloc_swappable_segment(0, PAGES * PG, swap_file_in(&std::env::temp_dir()).unwrap()).unwrap();
    } else {
        vm.alloc_segment(0, PAGES * PG, SegmentKind::SysMem).unwrap();
    }
    vm.map_segment(0, 0, 0, PAGES * PG, Some(Prot::RW)).unwrap();
    Arc::new(vm)
}

/// A VM with no vCPUs as a source; `hook` runs before the `n`-th harvest
/// (1 is the first pass's own harvest).
struct Src<'a> {
    mem: VmMemory<HeapPages>,
    harvests: u32,
    hook: &'a mut dyn FnMut(u32, &Vm<HeapPages>),
}

impl MigrationSource for Src<'_> {
    fn layout(&self) -> Layout {
        self.mem.layout().unwrap()
    }
    fn resident(&mut self, r: &MemRange, b: &mut [u64]) -> Result<(), HostError> {
        self.mem.resident(r, b)
    }
    fn read_page(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.mem.read_page(gpa, buf)
    }
    fn harvest(&mut self, r: &MemRange, b: &mut [u64]) -> Result<(), HostError> {
        self.harvests += 1;
        (self.hook)(self.harvests, self.mem.vm());
        self.mem.harvest(r, b)
    }
    fn set_dirty(&mut self, r: &MemRange, b: &[u64]) -> Result<(), HostError> {
        self.mem.set_dirty(r, b)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn state(&mut self) -> Result<Vec<StateBlob>, HostError> {
        Ok(vec![StateBlob { kind: StateKind::VmLayout, instance: 0, data: self.mem.layout_blob() }])
    }
}

/// The target; tracking off while pages arrive, as the KVM target does.
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

fn migrate(
    src: &Arc<Vm<HeapPages>>,
    dst: &Arc<Vm<HeapPages>>,
    hook: &mut dyn FnMut(u32, &Vm<HeapPages>),
) -> MigrationSummary {
    let mut s = Src { mem: VmMemory::new(src.clone(), None), harvests: 0, hook };
    let mut t = Tgt(VmMemory::new(dst.clone(), None));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|sc| {
        let th = sc.spawn(move || {
            let (c, _) = l.accept().unwrap();
            vmm::migration::receive_tcp(&mut t, &c, &TargetConfig::default(), None).unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        let sum = vmm::migration::migrate_tcp(&mut s, &c, &SourceConfig::default(), None, &mut |_| {}).unwrap();
        th.join().unwrap();
        sum
    })
}

fn pattern(p: u64, salt: u8) -> Vec<u8> {
    (0..PG).map(|i| ((i * 13 + p * 7) as u8) ^ salt).collect()
}

fn page(vm: &Vm<HeapPages>, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PG as usize];
    vm.read_segment(0, p * PG, &mut v).unwrap();
    v
}

/// Pages 0..40 written by the guest (through holds), 40..44 by the host,
/// 44..64 never touched; everything swapped out that can be, and the
/// dirty bits harvested away (as by an earlier dirty-log reader), so the
/// first pass alone must find the content.
fn populate(vm: &Vm<HeapPages>) {
    let c = vm.space().client();
    for p in 0..40 {
        let h = c.hold(Gpa(p * PG), Prot::RW).unwrap();
        h.write(0, &pattern(p, 0)).unwrap();
    }
    drop(c);
    for p in 40..44 {
        vm.write_segment(0, p * PG, &pattern(p, 0)).unwrap();
    }
    vm.space().swap_out(PAGES).unwrap();
    let mut bm = vec![0u64; PAGES.div_ceil(64) as usize];
    vm.space().track_dirty(Gpa(0), PAGES * PG, &mut bm).unwrap();
    assert_eq!(vm.space().track_dirty(Gpa(0), PAGES * PG, &mut bm).unwrap(), 0, "no dirty bit left");
    let st = vm.space().swap_stats();
    assert!(st.swapped >= 40, "most written pages are in the swap file: {st:?}");
    let obj = vm.segment_object(0).unwrap();
    assert!((0..44).all(|p| obj.page_has_content(p * PG) == Some(true)));
    assert!((44..PAGES).all(|p| obj.page_has_content(p * PG) == Some(false)));
    assert!((0..44).any(|p| obj.frame_at(p * PG).is_none()), "some written page is swapped out");
    assert_eq!(obj.page_has_content(PAGES * PG), None, "past the end");
}

fn check_target(src: &Vm<HeapPages>, dst: &Vm<HeapPages>) {
    for p in 0..PAGES {
        let want = if p < 44 { pattern(p, 0) } else { vec![0u8; PG as usize] };
        assert_eq!(page(src, p), want, "source page {p}");
        assert_eq!(page(dst, p), want, "target page {p}");
    }
}

#[test]
fn swapped_out_pages_go_in_the_first_pass_to_a_plain_target() {
    let src = new_vm("plain-src", 16, true);
    populate(&src);
    let dst = new_vm("plain-dst", 256, false);
    assert_eq!(dst.segment_object(0).unwrap().page_has_content(0), None, "not swappable");
    let sum = migrate(&src, &dst, &mut |_, _| {});
    // Exactly the pages with content: resident or swapped, none untouched.
    assert_eq!(sum.resident_pages, 44);
    check_target(&src, &dst);
    // The first pass read swapped pages from the swap file without
    // swapping them in: the source's reservoir still holds at most 16.
    assert!(src.space().swap_stats().resident <= 16);
}

#[test]
fn swapped_out_pages_go_in_the_first_pass_to_a_swappable_target() {
    let src = new_vm("swap-src", 16, true);
    populate(&src);
    // A target whose reservoir is smaller still: pages it receives go to
    // its own swap file.
    let dst = new_vm("swap-dst", 8, true);
    let sum = migrate(&src, &dst, &mut |_, _| {});
    assert_eq!(sum.resident_pages, 44);
    check_target(&src, &dst);
    // And the target, swappable, migrates on to a plain VM.
    let third = new_vm("swap-third", 256, false);
    migrate(&dst, &third, &mut |_, _| {});
    check_target(&src, &third);
}

#[test]
fn a_page_swapped_out_dirty_after_the_first_pass_is_sent_again() {
    let src = new_vm("later-src", 16, true);
    populate(&src);
    let dst = new_vm("later-dst", 256, false);
    let obj = src.segment_object(0).unwrap();
    let mut fired = false;
    let sum = migrate(&src, &dst, &mut |n, vm| {
        // Before the first harvest after the first pass was sent: the
        // guest rewrites page 5, then it is swapped out dirty.
        if n == 2 {
            let c = vm.space().client();
            c.hold(Gpa(5 * PG), Prot::RW).unwrap().write(0, &pattern(5, 0xa5)).unwrap();
            drop(c);
            vm.space().swap_out(PAGES).unwrap();
            assert!(obj.frame_at(5 * PG).is_none(), "page 5 is swapped out");
            assert!(vm.space().swap_stats().swapped_dirty >= 1);
            fired = true;
        }
    });
    assert!(fired);
    assert!(sum.pages_sent > 44, "page 5 was sent again: {} pages", sum.pages_sent);
    assert_eq!(page(&dst, 5), pattern(5, 0xa5));
    for p in (0..PAGES).filter(|&p| p != 5) {
        assert_eq!(page(&dst, p), page(&src, p), "page {p}");
    }
}
