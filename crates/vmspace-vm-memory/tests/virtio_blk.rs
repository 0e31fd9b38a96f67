//! virtio-queue's own test utilities (`MockSplitQueue`) driving the
//! split virtqueue and the virtio-blk device over `VmMemory`, with an
//! exact dirty-page check.

mod common;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use vmspace::Gpa;

use common::*;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmspace_vm_memory::VmMemory;
use vmspace_vm_memory::blk::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const DISK: u64 = MIB;

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, len: u64) -> (Self, File) {
        let path = std::env::temp_dir().join(format!("vmspace-vm-memory-{}-{name}", std::process::id()));
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&disk_byte_range(0, len)).unwrap();
        (Scratch(path), f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn disk_byte(i: u64) -> u8 {
    (i ^ (i >> 9) ^ (i >> 17)).wrapping_mul(0x9e) as u8
}

fn disk_byte_range(off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(disk_byte).collect()
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Pages covering `[gpa, gpa + len)`.
fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    gpa / PG..(gpa + len).div_ceil(PG)
}

/// A chain under construction: descriptors (addr, len, flags) and, for
/// the test's bookkeeping, what the device is expected to write.
struct Chains {
    descs: Vec<RawDescriptor>,
}

impl Chains {
    fn new() -> Self {
        Chains { descs: Vec::new() }
    }

    /// Append a chain of `(addr, len, writable)` buffers; returns its head.
    fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.descs.len() as u16;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if w { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            let next = if last { 0 } else { self.descs.len() as u16 + 1 };
            self.descs.push(RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
        }
        head
    }
}

#[test]
fn virtio_blk_over_vmspace_with_exact_dirty_pages() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let (_scratch, file) = Scratch::new("blk", DISK);
    let mut dev = Block::new(file.try_clone().unwrap(), false, b"vmspace-blk-0").unwrap();
    assert_eq!(dev.sectors(), DISK / SECTOR_SIZE);

    // The rings: a 256-entry queue at 64 KiB (descriptor table on page
    // 0x10, avail and used rings on page 0x11).
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 256);
    let used = mock.used_addr().raw_value();

    // Buffers in B and C (contiguous mappings of different objects); some
    // cross page and mapping boundaries.
    let hdr = |i: u64| B.0 + 0x1000 + i * 0x20;
    let in_data = [(C.0 - 500, 1000u32), (B.0 + 0x8000 + 4090, 536)]; // 3 sectors, across B/C and a page
    let in_status = B.0 + 0x9800 + 5;
    let out_data = (B.0 + 0xA000 + 3000, 1024u32); // 2 sectors, readable
    let out_status = B.0 + 0xB000 + 4095;
    let flush_status = C.0 + 0x2000;
    let id_buf = C.0 + 0x5000 - 7; // 20 id bytes + status, across a page
    let unsupp_status = C.0 + 0x3000;
    let beyond_status = C.0 + 0x3001;
    let hole_data = A.0 + A.1 + 0x100; // in the hole after A
    let hole_status = C.0 + 0x4000;

    let mut c = Chains::new();
    let kinds = [
        (VIRTIO_BLK_T_IN, 3u64),
        (VIRTIO_BLK_T_OUT, 100),
        (VIRTIO_BLK_T_FLUSH, 0),
        (VIRTIO_BLK_T_GET_ID, 0),
        (42, 0),
        (VIRTIO_BLK_T_IN, DISK / SECTOR_SIZE - 1), // 2 sectors from the last: beyond the end
        (VIRTIO_BLK_T_IN, 0),                      // data buffer in a hole
    ];
    for (i, &(k, s)) in kinds.iter().enumerate() {
        mem.write_slice(&header(k, s), GuestAddress(hdr(i as u64))).unwrap();
    }
    let out_src: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    mem.write_slice(&out_src, GuestAddress(out_data.0)).unwrap();
    let heads = [
        c.add(&[
            (hdr(0), 16, false),
            (in_data[0].0, in_data[0].1, true),
            (in_data[1].0, in_data[1].1, true),
            (in_status, 1, true),
        ]),
        c.add(&[(hdr(1), 16, false), (out_data.0, out_data.1, false), (out_status, 1, true)]),
        c.add(&[(hdr(2), 16, false), (flush_status, 1, true)]),
        c.add(&[(hdr(3), 16, false), (id_buf, 21, true)]),
        c.add(&[(hdr(4), 16, false), (unsupp_status, 1, true)]),
        c.add(&[(hdr(5), 16, false), (B.0 + 0x20000, 1024, true), (beyond_status, 1, true)]),
        c.add(&[(hdr(6), 16, false), (hole_data, 512, true), (hole_status, 1, true)]),
    ];
    mock.add_desc_chains(&c.descs, 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    assert!(queue.is_valid(&mem));

    // Everything so far was the driver's doing: clear it.
    harvest(&g.space);

    let served = dev.process_queue(&mut queue, &mem).unwrap();
    assert_eq!(served.chains, heads.len() as u32);
    assert!(served.notify);
    assert_eq!(mem.stray_writes(), 0);

    // The used ring: heads in order, with the used lengths.
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(used_idx, heads.len() as u16);
    let want_len = [1536 + 1, 1, 1, 21, 1, 1, 1];
    for (i, (&h, &l)) in heads.iter().zip(&want_len).enumerate() {
        let id: u32 = mem.read_obj(GuestAddress(used + 4 + 8 * i as u64)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(used + 8 + 8 * i as u64)).unwrap();
        assert_eq!((id, len), (u32::from(h), l), "used element {i}");
    }

    // Results against the file.
    let status = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..1000], GuestAddress(in_data[0].0)).unwrap();
    mem.read_slice(&mut got[1000..], GuestAddress(in_data[1].0)).unwrap();
    let want_in = disk_byte_range(3 * 512, 1536);
    let first_diff = got.iter().zip(&want_in).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "IN data differs from the file");
    assert_eq!(status(in_status), VIRTIO_BLK_S_OK);
    let mut on_disk = vec![0u8; 1024];
    file.read_exact_at(&mut on_disk, 100 * 512).unwrap();
    assert_eq!(on_disk, out_src);
    assert_eq!(status(out_status), VIRTIO_BLK_S_OK);
    assert_eq!(status(flush_status), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(id_buf)).unwrap();
    assert_eq!(&id[..13], b"vmspace-blk-0");
    assert!(id[13..].iter().all(|&b| b == 0));
    assert_eq!(status(id_buf + 20), VIRTIO_BLK_S_OK);
    assert_eq!(status(unsupp_status), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(status(beyond_status), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(hole_status), VIRTIO_BLK_S_IOERR);

    // Exactly the pages the device wrote: data, status bytes, used ring.
    let mut want = BTreeSet::new();
    want.extend(pages(in_data[0].0, 1000));
    want.extend(pages(in_data[1].0, 536));
    for s in [in_status, out_status, flush_status, unsupp_status, beyond_status, hole_status] {
        want.insert(s / PG);
    }
    want.extend(pages(id_buf, 21));
    want.extend(pages(used, 4 + 8 * heads.len() as u64));
    let got: BTreeSet<u64> = harvest(&g.space).into_iter().collect();
    assert_eq!(got, want);
    // The descriptor table's page, the headers' and the OUT source's stay clean.
    assert!(!got.contains(&(0x10000 / PG)));
    assert!(!got.contains(&(hdr(0) / PG)));
    assert!(!got.contains(&(out_data.0 / PG)));

    // Nothing new: nothing served, no notification, nothing dirty.
    let served = dev.process_queue(&mut queue, &mem).unwrap();
    assert_eq!(served, Served { chains: 0, notify: false });
    let again = harvest(&g.space);
    assert!(again.iter().all(|p| pages(used, 4).any(|u| u == *p)), "{again:?}");
}

#[test]
fn queue_pop_add_used_needs_notification() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let mock = MockSplitQueue::new(&mem, 16);
    let mut c = Chains::new();
    let h0 = c.add(&[(B.0, 100, false), (C.0 - 50, 100, true)]);
    let h1 = c.add(&[(B.0 + PG, 8, true)]);
    mock.add_desc_chains(&c.descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(q.is_valid(&mem));

    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(chain.head_index(), h0);
    let descs: Vec<Descriptor> = chain.clone().collect();
    assert_eq!(descs.len(), 2);
    assert!(!descs[0].is_write_only() && descs[1].is_write_only());
    // virtio-queue's Reader/Writer over the chain.
    mem.write_slice(&[5u8; 100], GuestAddress(B.0)).unwrap();
    harvest(&g.space);
    let mut r = chain.clone().reader(&mem).unwrap();
    let mut buf = [0u8; 100];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [5u8; 100]);
    let mut w = chain.writer(&mem).unwrap();
    assert_eq!(w.available_bytes(), 100);
    w.write_all(&[9u8; 100]).unwrap();
    drop(w);
    assert_eq!(harvest(&g.space), [(C.0 - 50) / PG, C.0 / PG]);
    q.add_used(&mem, h0, 100).unwrap();
    assert!(q.needs_notification(&mem).unwrap());

    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(chain.head_index(), h1);
    q.add_used(&mem, h1, 8).unwrap();
    assert!(q.pop_descriptor_chain(&mem).is_none());
    assert_eq!(q.used_idx(&mem, std::sync::atomic::Ordering::Acquire).unwrap().0, 2);
    // The used ring is where the mock put it, and only it was written.
    assert_eq!(harvest(&g.space), [mock.used_addr().raw_value() / PG]);
}

#[test]
fn queue_validity_is_permission_aware() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let mock = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(q.is_valid(&mem));
    // Used ring in read-only memory: the device could not write it.
    q.set_used_ring_address(Some(R.0 as u32), Some(0));
    assert!(!q.is_valid(&mem));
    // Avail ring in read-only memory is fine (the device only reads it).
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_avail_ring_address(Some(R.0 as u32), Some(0));
    assert!(q.is_valid(&mem));
    // Descriptor table in a hole.
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_desc_table_address(Some((A.0 + A.1) as u32), Some(0));
    assert!(!q.is_valid(&mem));
    assert!(harvest(&g.space).iter().all(|&p| p < A.1 / PG), "only the mock's writes");
}

#[test]
fn iterator_and_indirect_chains() {
    let g = guest();
    // The mock puts indirect tables at 768 MiB: map RAM there.
    let o = vmspace::VmObject::ram(g.reservoir.clone(), 64 * 1024).unwrap();
    g.space.map(&o, 0, Gpa(0x3000_0000), 64 * 1024, vmspace::Prot::RW).unwrap();
    let mem = VmMemory::new(&g.space);
    let mut mock = MockSplitQueue::new(&mem, 16);
    // (The mock reuses descriptor indices across `add_*` calls, so one
    // chain per queue.)
    mock.add_indirect_chain(4).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let lens: Vec<usize> = q.iter(&mem).unwrap().map(|chain| chain.count()).collect();
    assert_eq!(lens, [4]);
    let mut mock = MockSplitQueue::new(&mem, 16);
    mock.add_chain(3).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let lens: Vec<usize> = q.iter(&mem).unwrap().map(|chain| chain.count()).collect();
    assert_eq!(lens, [3]);
}

/// Serve `chains` (each a list of `(addr, len, writable)`) on a fresh
/// 64-entry queue at 64 KiB; returns the completions' used lengths.
fn serve_chains(mem: &VmMemory<nested_pt::HeapPages>, dev: &mut Block, chains: &[&[(u64, u32, bool)]]) -> Vec<u32> {
    let mock = MockSplitQueue::create(mem, GuestAddress(0x10000), 64);
    let mut c = Chains::new();
    for ch in chains {
        c.add(ch);
    }
    mock.add_desc_chains(&c.descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let served = dev.process_queue(&mut q, mem).unwrap();
    assert_eq!(served.chains as usize, chains.len());
    let used = mock.used_addr().raw_value();
    (0..chains.len() as u64).map(|i| mem.read_obj::<u32>(GuestAddress(used + 8 + 8 * i)).unwrap()).collect()
}

#[test]
fn malformed_requests_complete_with_errors() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let (_scratch, file) = Scratch::new("bad", DISK);
    let mut dev = Block::new(file, false, b"an-id-longer-than-twenty-bytes").unwrap();
    let h = |i: u64| B.0 + 0x100 * i;
    let st = |i: u64| C.0 + 0x100 * i;
    let hdrs = [
        header(VIRTIO_BLK_T_IN, 0),        // 0: header split over two descriptors
        header(VIRTIO_BLK_T_IN, 0),        // 1: 1000 bytes: not whole sectors
        header(VIRTIO_BLK_T_IN, u64::MAX), // 2: sector overflows
        header(VIRTIO_BLK_T_IN, 0),        // 3: a 2 GiB buffer: beyond the disk
        header(VIRTIO_BLK_T_GET_ID, 0),    // 4: 8-byte id buffer
        header(VIRTIO_BLK_T_OUT, 0),       // 5: no status byte at all
        header(VIRTIO_BLK_T_OUT, 1),       // 6: OUT data in the hole
        header(VIRTIO_BLK_T_GET_ID, 0),    // 7: 20 + status, truncated id
    ];
    for (i, hd) in hdrs.iter().enumerate() {
        mem.write_slice(hd, GuestAddress(h(i as u64))).unwrap();
    }
    let used = serve_chains(
        &mem,
        &mut dev,
        &[
            &[(h(0), 5, false), (h(0) + 5, 11, false), (B.0 + 0x4000, 512, true), (st(0), 1, true)],
            &[(h(1), 16, false), (B.0 + 0x4000, 1000, true), (st(1), 1, true)],
            &[(h(2), 16, false), (B.0 + 0x4000, 512, true), (st(2), 1, true)],
            &[(h(3), 16, false), (B.0, 0x8000_0000, true), (st(3), 1, true)],
            &[(h(4), 16, false), (st(4) + 8, 8, true), (st(4), 1, true)],
            &[(h(5), 16, false), (B.0 + 0x4000, 512, false)],
            &[(h(6), 16, false), (A.0 + A.1, 512, false), (st(6), 1, true)],
            &[(h(7), 16, false), (st(7) + 8, 21, true)],
            &[(h(0), 8, false), (st(8), 1, true)], // 8: header too short
            // 9: more than 4 GiB in one chain: virtio-queue ends the chain
            // early; the status byte cannot be found (the last writable byte
            // left lies in a hole), nothing is reported.
            &[(h(3), 16, false), (B.0, u32::MAX, true), (st(9), 1, true)],
        ],
    );
    assert_eq!(used, [513, 1, 1, 1, 9, 0, 1, 21, 1, 0]);
    let status = |i: u64| mem.read_obj::<u8>(GuestAddress(st(i))).unwrap();
    assert_eq!(status(0), VIRTIO_BLK_S_OK);
    let mut sector0 = vec![0u8; 512];
    mem.read_slice(&mut sector0, GuestAddress(B.0 + 0x4000)).unwrap();
    assert!(sector0 == disk_byte_range(0, 512));
    for i in [1, 2, 3, 6, 8] {
        assert_eq!(status(i), VIRTIO_BLK_S_IOERR, "request {i}");
    }
    assert_eq!(status(4), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 8];
    mem.read_slice(&mut id, GuestAddress(st(4) + 8)).unwrap();
    assert_eq!(&id, b"an-id-lo");
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(st(7) + 8)).unwrap();
    assert_eq!(&id[..20], b"an-id-longer-than-tw");
    assert_eq!(id[20], VIRTIO_BLK_S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st(9))).unwrap(), 0);
    assert_eq!(mem.stray_writes(), 0);
}

#[test]
fn read_only_disk_refuses_out() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let (_scratch, file) = Scratch::new("ro", DISK);
    let mut dev = Block::new(file.try_clone().unwrap(), true, b"ro").unwrap();
    mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(B.0)).unwrap();
    mem.write_slice(&[0xEE; 512], GuestAddress(B.0 + 0x1000)).unwrap();
    let used = serve_chains(&mem, &mut dev, &[&[(B.0, 16, false), (B.0 + 0x1000, 512, false), (C.0, 1, true)]]);
    assert_eq!(used, [1]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(C.0)).unwrap(), VIRTIO_BLK_S_IOERR);
    let mut first = vec![0u8; 512];
    file.read_exact_at(&mut first, 0).unwrap();
    assert!(first == disk_byte_range(0, 512));
}

#[test]
fn event_idx_suppresses_notifications_and_dirties_only_the_used_ring() {
    let g = guest();
    let mem = VmMemory::new(&g.space);
    let (_scratch, file) = Scratch::new("evidx", DISK);
    let mut dev = Block::new(file, false, b"evidx").unwrap();
    assert_ne!(dev.features() & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(dev.config(), (DISK / SECTOR_SIZE).to_le_bytes());
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 256);
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_event_idx(true);
    let used = mock.used_addr().raw_value();
    mem.write_slice(&header(VIRTIO_BLK_T_GET_ID, 0), GuestAddress(B.0)).unwrap();
    // used_event = 0 (the mock zeroed it): notify after the first entry only.
    for (round, want_notify) in [(0u64, true), (1, false)] {
        let buf = C.0 + 0x10000 * round;
        let mut c = Chains::new();
        c.add(&[(B.0, 16, false), (buf, 21, true)]);
        mock.add_desc_chains(&c.descs, 0).unwrap();
        harvest(&g.space);
        let served = dev.process_queue(&mut q, &mem).unwrap();
        assert_eq!(served, Served { chains: 1, notify: want_notify }, "round {round}");
        let mut want: BTreeSet<u64> = pages(buf, 21).collect();
        want.extend(pages(used, 4 + 8 * 256 + 2)); // elements, idx, avail_event
        let got: BTreeSet<u64> = harvest(&g.space).into_iter().collect();
        assert_eq!(got, want, "round {round}");
        let avail_event: u16 = mem.read_obj(GuestAddress(used + 4 + 8 * 256)).unwrap();
        assert_eq!(avail_event, round as u16 + 1);
    }
}

/// A "BAR move" racing the device: the data buffers' mapping is unmapped
/// and mapped again at another address and back, on another thread,
/// while the device thread serves requests. Nothing crashes, every
/// request completes, each with `OK` or `IOERR`, and once the mapping
/// stays put the reads have the file's bytes.
#[test]
fn mapping_moves_while_device_serves() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    let g = guest();
    let driver = VmMemory::new(&g.space);
    let (_scratch, file) = Scratch::new("move", DISK);
    let dev = Block::new(file, false, b"move").unwrap();
    let obj = vmspace::VmObject::ram(g.reservoir.clone(), 64 * 1024).unwrap();
    let (d0, d1, dlen) = (12 * MIB, 14 * MIB, 64 * 1024);
    g.space.map(&obj, 0, Gpa(d0), dlen, vmspace::Prot::RW).unwrap();

    let mock = MockSplitQueue::create(&driver, GuestAddress(0x10000), 256);
    let mut queue: Queue = mock.create_queue().unwrap();
    // The mock's used ring overlaps the second half of its avail ring
    // (`SplitQueueRing::end` counts elements, not bytes); 1600 requests
    // wrap the ring, so move the used ring out of the way.
    queue.set_used_ring_address(Some(0x20000), Some(0));
    let device_mem = VmMemory::new(&g.space);
    let (kick_tx, kick_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<u32>();
    let device = std::thread::spawn(move || {
        let (mem, mut q, mut dev) = (device_mem, queue, dev);
        for () in kick_rx {
            done_tx.send(dev.process_queue(&mut q, &mem).unwrap().chains).unwrap();
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let stop = stop.clone();
        let space = &g.space;
        let obj = obj.clone();
        move || {
            let mut moves = 0u32;
            while !stop.load(Ordering::Relaxed) {
                space.unmap(Gpa(d0), dlen).unwrap();
                space.map(&obj, 0, Gpa(d1), dlen, vmspace::Prot::RW).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(30));
                space.unmap(Gpa(d1), dlen).unwrap();
                space.map(&obj, 0, Gpa(d0), dlen, vmspace::Prot::RW).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(30));
                moves += 1;
            }
            moves
        }
    };
    // One round: 8 reads of 6 KiB each into the moving mapping (crossing
    // pages), status bytes in A; returns the statuses.
    let run_round = |round: u64| {
        let mut c = Chains::new();
        for i in 0..8u64 {
            let h = 0x40000 + 0x100 * i;
            driver.write_slice(&header(VIRTIO_BLK_T_IN, (round * 8 + i) % 2000), GuestAddress(h)).unwrap();
            c.add(&[(h, 16, false), (d0 + 0x2000 * i + 7, 0x1800, true), (0x50000 + i, 1, true)]);
        }
        mock.add_desc_chains(&c.descs, 0).unwrap();
        kick_tx.send(()).unwrap();
        assert_eq!(done_rx.recv().unwrap(), 8);
        let mut st = [0u8; 8];
        driver.read_slice(&mut st, GuestAddress(0x50000)).unwrap();
        st
    };
    let (mut ok, mut err) = (0u32, 0u32);
    /// Stops the mover even if the driver panics (else the scope hangs).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let mover = s.spawn(mover);
        let _stop = StopOnDrop(stop.clone());
        for round in 0..200u64 {
            for st in run_round(round) {
                match st {
                    VIRTIO_BLK_S_OK => ok += 1,
                    VIRTIO_BLK_S_IOERR => err += 1,
                    other => panic!("status {other}"),
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(mover.join().unwrap() > 0);
    });
    // The mover left the mapping at d0: a last round succeeds entirely and
    // reads the file's bytes.
    assert_eq!(run_round(200), [VIRTIO_BLK_S_OK; 8]);
    for i in 0..8u64 {
        let mut got = vec![0u8; 0x1800];
        driver.read_slice(&mut got, GuestAddress(d0 + 0x2000 * i + 7)).unwrap();
        assert!(got == disk_byte_range(((200 * 8 + i) % 2000) * 512, 0x1800), "request {i}");
    }
    drop(kick_tx);
    device.join().unwrap();
    assert_eq!(ok + err, 1600);
    eprintln!("requests during moves: {ok} OK, {err} IOERR");
}
