//! PCI configuration space through ECAM, BAR sizing, and a framebuffer BAR
//! backed by a device-memory segment that the guest moves while others
//! keep writing through it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nested_pt::{Caps, HeapPages};
use vmm::devmem::{self, NoExposure};
use vmm::fbuf::{self, Fbuf};
use vmm::pci::CONFIG_SPACE;
use vmm::platform::{BarBacking, ECAM_BASE, Platform};
use vmm::{SegmentKind, Vm, VmConfig};
use vmspace::{Gpa, HeapReservoir, Pfn, Prot, PteFormat, SpaceConfig};

const PG: u64 = 4096;
const FB_SIZE: u64 = 1 << 20;
const FB_DEV: u8 = 3;
const FB_SEG: u32 = 2;

fn setup(test: &str) -> (Vm<HeapPages>, Platform) {
    let ram = Arc::new(HeapReservoir::new(64 * PG, Pfn(0x1000)).unwrap());
    let cfg = VmConfig {
        name: format!("p{}-{test}", std::process::id()),
        space: SpaceConfig::new(1 << 40, PteFormat::npt(Caps::default())),
        devmem_frame_base: Pfn(0x10_0000),
        devmem_frames: 1 << 16,
    };
    let vm = Vm::new(cfg, HeapPages::with_capacity(0, 1024), ram, Arc::new(NoExposure)).unwrap();
    vm.alloc_segment(0, 16 * PG, SegmentKind::SysMem).unwrap();
    vm.map_segment(0, 0, 0, 16 * PG, None).unwrap();
    vm.alloc_segment(FB_SEG, FB_SIZE, SegmentKind::DevMem { name: "framebuffer".into() }).unwrap();
    let mut p = Platform::new(ECAM_BASE);
    p.attach(
        FB_DEV,
        Box::new(Fbuf::new(FB_SIZE, 256, 128).unwrap()),
        &[(fbuf::REG_BAR, BarBacking::Emulated), (fbuf::FB_BAR, BarBacking::Segment { id: FB_SEG, prot: Prot::RW })],
    )
    .unwrap();
    (vm, p)
}

fn cfg_addr(dev: u8, off: u64) -> u64 {
    ECAM_BASE + (u64::from(dev) << 15) + off
}

fn rd32(p: &mut Platform, dev: u8, off: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(p.mmio_read(cfg_addr(dev, off), &mut b));
    u32::from_le_bytes(b)
}

fn wr32(p: &mut Platform, vm: &Vm<HeapPages>, dev: u8, off: u64, v: u32) {
    assert!(p.mmio_write(vm, cfg_addr(dev, off), &v.to_le_bytes()));
}

/// Moves the framebuffer BAR the way an OS does with decoding on: low
/// dword, then high dword.
fn move_bar(p: &mut Platform, vm: &Vm<HeapPages>, to: u64) {
    wr32(p, vm, FB_DEV, 0x14, to as u32);
    wr32(p, vm, FB_DEV, 0x18, (to >> 32) as u32);
}

#[test]
fn config_space_and_bar_sizing() {
    let (vm, mut p) = setup("sizing");
    assert_eq!(rd32(&mut p, 0, 0), 0x29c0_8086, "host bridge at 00.0");
    assert_eq!(rd32(&mut p, 0, 8) >> 8, 0x06_00_00, "class: host bridge");
    assert_eq!(rd32(&mut p, 7, 0), u32::MAX, "no device: all ones");
    assert_eq!(rd32(&mut p, FB_DEV, 0), u32::from(fbuf::VENDOR) | u32::from(fbuf::DEVICE) << 16);
    assert_eq!(rd32(&mut p, FB_DEV, 8) >> 8, 0x03_00_00);
    // Sizing: BAR 0 (32-bit, 4 KiB), BAR 1/2 (64-bit prefetchable, 1 MiB).
    for (off, v) in [(0x10, u32::MAX), (0x14, u32::MAX), (0x18, u32::MAX)] {
        wr32(&mut p, &vm, FB_DEV, off, v);
    }
    assert_eq!(rd32(&mut p, FB_DEV, 0x10), !(PG as u32 - 1));
    assert_eq!(rd32(&mut p, FB_DEV, 0x14), !(FB_SIZE as u32 - 1) | 0b1100);
    assert_eq!(rd32(&mut p, FB_DEV, 0x18), u32::MAX);
    assert_eq!(rd32(&mut p, FB_DEV, 0x1c), 0, "unimplemented BAR reads zero");
    wr32(&mut p, &vm, FB_DEV, 0x1c, u32::MAX);
    assert_eq!(rd32(&mut p, FB_DEV, 0x1c), 0, "and stays zero");
    // Read-only registers ignore writes; the command register keeps only
    // its writable bits.
    wr32(&mut p, &vm, FB_DEV, 0, 0x1234_5678);
    assert_eq!(rd32(&mut p, FB_DEV, 0) & 0xffff, u32::from(fbuf::VENDOR));
    wr32(&mut p, &vm, FB_DEV, 4, 0xffff_ffff);
    assert_eq!(rd32(&mut p, FB_DEV, 4), 0x0407);
    // Sizing patterns with decoding on are not addresses: nothing mapped.
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), None);
    // Byte and word accesses; misaligned ones read all ones.
    let mut b = [0u8; 2];
    assert!(p.mmio_read(cfg_addr(FB_DEV, 2), &mut b));
    assert_eq!(u16::from_le_bytes(b), fbuf::DEVICE);
    assert!(p.mmio_read(cfg_addr(FB_DEV, 1), &mut b));
    assert_eq!(b, [0xff, 0xff]);
    // Interrupt line is writable, pin read-only.
    assert!(p.mmio_write(&vm, cfg_addr(FB_DEV, 0x3c), &[11]));
    assert_eq!(rd32(&mut p, FB_DEV, 0x3c) & 0xffff, 11);
    // Function space beyond 4 KiB of one function is the next function.
    assert_eq!(rd32(&mut p, FB_DEV, CONFIG_SPACE), u32::MAX);
    // Unclaimed addresses: master abort.
    let mut w = [0u8; 4];
    assert!(!p.mmio_read(0xdead_0000, &mut w));
    assert_eq!(w, [0xff; 4]);
    assert!(!p.mmio_write(&vm, 0xdead_0000, &w));
}

#[test]
fn register_bar_is_emulated_and_framebuffer_bar_is_mapped() {
    let (vm, mut p) = setup("regs");
    wr32(&mut p, &vm, FB_DEV, 0x10, 0xc000_0000);
    move_bar(&mut p, &vm, 0x1_0000_0000);
    wr32(&mut p, &vm, FB_DEV, 4, 0x2);
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), Some(0x1_0000_0000));
    let mut b = [0u8; 4];
    assert!(p.mmio_read(0xc000_0000, &mut b));
    assert_eq!(u32::from_le_bytes(b), FB_SIZE as u32);
    assert!(p.mmio_read(0xc000_0004, &mut b));
    assert_eq!(u32::from_le_bytes(b), 256);
    assert!(p.mmio_write(&vm, 0xc000_0004, &320u32.to_le_bytes()));
    assert!(p.mmio_write(&vm, 0xc000_0008, &4096u32.to_le_bytes()), "claimed even if refused");
    assert_eq!((p.fbuf(FB_DEV).unwrap().width(), p.fbuf(FB_DEV).unwrap().height()), (320, 128));
    // The framebuffer itself is a mapping: no trap.
    assert!(!p.claims(0x1_0000_0000));
    let m = vm.mapping_at(0x1_0000_0000).unwrap();
    assert_eq!((m.segment, m.len, m.prot), (FB_SEG, FB_SIZE, Prot::RW));
    // Decoding off unmaps it; on again maps it back.
    wr32(&mut p, &vm, FB_DEV, 4, 0);
    assert_eq!(vm.mapping_at(0x1_0000_0000), None);
    assert!(!p.claims(0xc000_0000));
    wr32(&mut p, &vm, FB_DEV, 4, 2);
    assert!(vm.mapping_at(0x1_0000_0000).is_some());
    // A BAR placed over RAM is refused by the VM and decodes nothing.
    move_bar(&mut p, &vm, 0);
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), None);
    move_bar(&mut p, &vm, 0x2_0000_0000);
    assert_eq!(p.mapped_at(FB_DEV, fbuf::FB_BAR), Some(0x2_0000_0000));
    assert!(vm.mapping_at(0x1_0000_0000).is_none());
}

/// The guest moves the BAR again and again while a writer keeps drawing
/// through it (retrying a pixel whose address was not mapped at that
/// instant, as a driver re-reads the BAR), a device keeps a hold across the
/// moves, and another process's view by name sees every pixel.
#[test]
fn bar_moves_under_writers_lose_nothing() {
    let (vm, mut p) = setup("moves");
    let bases = [0x1_0000_0000u64, 0x3_0000_0000, 0x7f_0000_0000, 0x2_4000_0000];
    wr32(&mut p, &vm, FB_DEV, 4, 2);
    move_bar(&mut p, &vm, bases[0]);
    let current = AtomicU64::new(bases[0]);
    let done = AtomicBool::new(false);
    let pixels = (FB_SIZE / 4) as u32;
    let retries = AtomicU64::new(0);
    let vm = &vm;
    let p = Mutex::new(p);
    // A device hold on the last page, taken before any move.
    let dev = vm.space().client();
    let held = dev.hold(Gpa(bases[0] + FB_SIZE - PG), Prot::RW).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let c = vm.space().client();
            for i in 0..pixels {
                let off = u64::from(i) * 4;
                if off >= FB_SIZE - PG {
                    break; // the held page is the device's
                }
                loop {
                    let base = current.load(Ordering::SeqCst);
                    match c.hold(Gpa((base + off) & !(PG - 1)), Prot::RW) {
                        Ok(h) => {
                            h.write((off % PG) as usize, &(i | 0x0100_0000).to_le_bytes()).unwrap();
                            h.release();
                            break;
                        }
                        Err(vmspace::Error::NoMapping) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("hold: {e}"),
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut k = 1;
        while !done.load(Ordering::SeqCst) {
            let to = bases[k % bases.len()];
            move_bar(&mut p.lock().unwrap(), vm, to);
            current.store(to, Ordering::SeqCst);
            k += 1;
        }
        assert!(k > 2, "the BAR moved while the writer ran");
    });
    // The device's hold survived every move.
    held.write_u64(8, 0xfeed).unwrap();
    assert!(held.release(), "the hold reports that its mapping went away");
    let p = p.into_inner().unwrap();
    assert!(p.stats.bar_moves >= 3, "{:?}", p.stats);
    let view = devmem::open(vm.name(), "framebuffer", false).unwrap();
    let mut all = vec![0u8; FB_SIZE as usize];
    view.read(0, &mut all).unwrap();
    for i in 0..(FB_SIZE - PG) / 4 {
        let px = u32::from_le_bytes(all[(i * 4) as usize..(i * 4 + 4) as usize].try_into().unwrap());
        assert_eq!(px, i as u32 | 0x0100_0000, "pixel {i} lost");
    }
    assert_eq!(u64::from_le_bytes(all[(FB_SIZE - PG + 8) as usize..][..8].try_into().unwrap()), 0xfeed);
    eprintln!("{} BAR moves, {} writer retries", p.stats.bar_moves, retries.load(Ordering::Relaxed));
}

#[test]
fn frames_render_as_png() {
    // 3 × 2 pixels, stride 16 (one pixel of padding per row).
    let mut px = vec![0u8; 32];
    let colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [200, 100, 50], [9, 8, 7]];
    for (i, rgb) in colours.iter().enumerate() {
        let at = (i / 3) * 16 + (i % 3) * 4;
        px[at..at + 4].copy_from_slice(&[rgb[2], rgb[1], rgb[0], 0]);
    }
    let png_bytes = fbuf::render_png(&px, 3, 2, 16).unwrap();
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut r = dec.read_info().unwrap();
    let mut out = vec![0u8; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut out).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (3, 2, png::ColorType::Rgb));
    assert_eq!(out[..18], colours.concat()[..]);
    assert!(fbuf::render_png(&px, 3, 3, 16).is_err(), "too few bytes");
    assert!(fbuf::render_png(&px, 5, 1, 16).is_err(), "stride too small");
    assert!(fbuf::render_png(&px, 0, 1, 16).is_err());
    assert!(fbuf::render_png(&px, u32::MAX, u32::MAX, u32::MAX).is_err());
}
