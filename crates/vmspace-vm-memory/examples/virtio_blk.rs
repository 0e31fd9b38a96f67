//! A virtio-blk device served over a vmspace guest address space, with a
//! dirty-page harvest after every round, as a live-migration pre-copy
//! loop would do it.
//!
//! ```text
//! cargo run -p vmspace-vm-memory --example virtio_blk [DISK_IMAGE]
//! ```
//!
//! What a hypervisor copies from here:
//!
//! 1. the guest's memory: a `VmSpace` with RAM objects mapped where the
//!    machine model puts them (here with a hole, as below/above a PCI
//!    window), dirty tracking on;
//! 2. the device thread: its own `VmMemory` (one client per thread), a
//!    `virtio_queue::Queue` configured from what the driver wrote in the
//!    transport registers, and `Block::process_queue` on every queue
//!    notification (an ioeventfd in a real VMM), raising the interrupt
//!    when it says so;
//! 3. the harvest: `VmSpace::track_dirty` over each RAM range; every page
//!    the device wrote (data, status bytes, used ring) is in it.
//!
//! The guest driver is played by virtio-queue's `MockSplitQueue` (it
//! writes descriptors and the available ring into guest memory, as a
//! guest kernel would).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc;

use nested_pt::{Caps, HeapPages};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmspace::{Gpa, HeapReservoir, PAGE_SIZE, Pfn, Prot, PteFormat, SpaceConfig, VmObject, VmSpace};
use vmspace_vm_memory::VmMemory;
use vmspace_vm_memory::blk::{
    Block, SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const MIB: u64 = 1 << 20;
/// Guest RAM: low memory below a hole, and high memory above it.
const LOW: (u64, u64) = (0, 8 * MIB);
const HIGH: (u64, u64) = (16 * MIB, 8 * MIB);
/// Where the driver puts its queue and request buffers.
const QUEUE: u64 = 0x10000;
const BUFS: u64 = HIGH.0 + MIB;
const DISK_LEN: u64 = 4 * MIB;

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
    let flags = if write { 2 } else { 0 } | if next.is_some() { 1 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, next.unwrap_or(0)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Guest memory.
    let mut cfg = SpaceConfig::new(1 << 30, PteFormat::ept(Caps::default()));
    cfg.track_dirty = true;
    let space: VmSpace<HeapPages> = VmSpace::new(cfg, HeapPages::with_capacity(0x100, 1 << 12))?;
    let reservoir = Arc::new(HeapReservoir::new(LOW.1 + HIGH.1, Pfn(0x10_0000))?);
    for (gpa, len) in [LOW, HIGH] {
        let ram = VmObject::ram(reservoir.clone(), len)?;
        space.map(&ram, 0, Gpa(gpa), len, Prot::RW)?;
    }

    // The disk: a file given on the command line, or a scratch one.
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vmspace-vm-memory-example-{}.img", std::process::id())));
    let scratch = std::env::args().nth(1).is_none();
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(scratch).open(&path)?;
    if scratch {
        file.write_all(&vec![0u8; DISK_LEN as usize])?;
    }
    let disk = Block::new(file, false, b"vmspace-example")?;
    println!("disk {} ({} sectors)", path.display(), disk.sectors());

    // The guest driver sets up a 256-entry queue.
    let driver_mem = VmMemory::new(&space);
    let driver = MockSplitQueue::create(&driver_mem, GuestAddress(QUEUE), 256);
    let queue: Queue = driver.create_queue()?;

    // 2. The device thread, with its own memory (client) of the space.
    let device_mem = VmMemory::new(&space);
    let (kick_tx, kick_rx) = mpsc::channel::<()>();
    let (irq_tx, irq_rx) = mpsc::channel::<u32>();
    let device = std::thread::spawn(move || {
        let (mem, mut queue, mut disk) = (device_mem, queue, disk);
        for () in kick_rx {
            // A real device thread waits on its ioeventfd here.
            match disk.process_queue(&mut queue, &mem) {
                Ok(served) if served.notify => irq_tx.send(served.chains).unwrap(), // inject the interrupt
                Ok(_) => {}
                // The rings are not reachable (the guest moved them into a
                // hole, say): a real device sets DEVICE_NEEDS_RESET.
                Err(e) => eprintln!("virtio-blk: queue error: {e}; device needs reset"),
            }
        }
    });

    // 3. Rounds of guest I/O, each followed by a harvest.
    let ram_pages = (HIGH.0 + HIGH.1) / PAGE_SIZE;
    let mut bitmap = vec![0u64; ram_pages.div_ceil(64) as usize];
    space.track_dirty(Gpa(0), HIGH.0 + HIGH.1, &mut bitmap)?; // start clean
    for round in 0..4u64 {
        // The driver: write 8 sectors of a pattern at sector 64*round,
        // read them back into another buffer, flush.
        let sector = 64 * round;
        let data = BUFS + round * 0x10000;
        let back = data + 0x8000 + 100; // deliberately not page aligned
        let status = data + 0xF000;
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ (round as u8)).collect();
        driver_mem.write_slice(&pattern, GuestAddress(data))?;
        for (i, (k, s)) in
            [(VIRTIO_BLK_T_OUT, sector), (VIRTIO_BLK_T_IN, sector), (VIRTIO_BLK_T_FLUSH, 0)].into_iter().enumerate()
        {
            driver_mem.write_slice(&header(k, s), GuestAddress(status + 0x100 + 16 * i as u64))?;
        }
        let hdr = |i: u64| status + 0x100 + 16 * i;
        let descs = [
            desc(hdr(0), 16, false, Some(1)),
            desc(data, 4096, false, Some(2)),
            desc(status, 1, true, None),
            desc(hdr(1), 16, false, Some(4)),
            desc(back, 4096, true, Some(5)),
            desc(status + 1, 1, true, None),
            desc(hdr(2), 16, false, Some(7)),
            desc(status + 2, 1, true, None),
        ];
        driver.add_desc_chains(&descs, 0)?;
        // Harvest what the driver (the "guest") did, to see the device's
        // writes alone below.
        space.track_dirty(Gpa(0), HIGH.0 + HIGH.1, &mut bitmap)?;

        kick_tx.send(())?; // the guest's queue notification
        let chains = irq_rx.recv()?; // the device's interrupt

        // The migration thread's harvest.
        let dirty = space.track_dirty(Gpa(0), HIGH.0 + HIGH.1, &mut bitmap)?;
        let pages: Vec<String> = (0..ram_pages)
            .filter(|&p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .map(|p| format!("{:#x}", p * PAGE_SIZE))
            .collect();
        let mut readback = vec![0u8; 4096];
        driver_mem.read_slice(&mut readback, GuestAddress(back))?;
        let mut st = [0u8; 3];
        driver_mem.read_slice(&mut st, GuestAddress(status))?;
        assert_eq!(st, [VIRTIO_BLK_S_OK; 3]);
        assert!(readback == pattern, "read back what was written");
        println!(
            "round {round}: {chains} chains, sectors {sector}..{}, {dirty} dirty pages {pages:?}",
            sector + 4096 / SECTOR_SIZE
        );
    }
    drop(kick_tx);
    device.join().expect("device thread");
    if scratch {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}
