//! Tests adapted from virtio-queue 0.18's own unit tests (`src/queue.rs`,
//! `test_add_used`, `test_enable_disable_notification`,
//! `test_consume_chains_with_notif`, `test_needs_notification`; upstream
//! licence Apache-2.0 AND BSD-3-Clause, Copyright the rust-vmm and
//! Chromium OS authors), run over `VmMemory` instead of `GuestMemoryMmap`.
//! Upstream's versions cannot run unchanged: they are `#[cfg(test)]`
//! modules inside virtio-queue that read and set private fields
//! (`q.next_used`, `q.num_added`, `q.event_idx_enabled`); here the public
//! accessors stand in for them and the checks that need `num_added` are
//! left out.

mod common;

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use common::*;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes};
use vmspace_vm_memory::VmMemory;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

#[test]
fn add_used() {
    let g = guest();
    let mem = &VmMemory::new(&g.space);
    let vq = MockSplitQueue::new(mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();

    assert_eq!(q.used_idx(mem, Ordering::Acquire).unwrap(), Wrapping(0));
    assert_eq!(u16::from_le(vq.used().idx().load()), 0);

    // Index too large.
    assert!(q.add_used(mem, 16, 0x1000).is_err());
    assert_eq!(u16::from_le(vq.used().idx().load()), 0);

    q.add_used(mem, 1, 0x1000).unwrap();
    assert_eq!(q.next_used(), 1);
    assert_eq!(q.used_idx(mem, Ordering::Acquire).unwrap(), Wrapping(1));
    assert_eq!(u16::from_le(vq.used().idx().load()), 1);

    let x = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(x.id(), 1);
    assert_eq!(x.len(), 0x1000);
}

#[test]
fn enable_disable_notification() {
    let g = guest();
    let mem = &VmMemory::new(&g.space);
    let vq = MockSplitQueue::new(mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let used_addr = vq.used_addr();
    assert!(!q.event_idx_enabled());

    q.enable_notification(mem).unwrap();
    assert_eq!(mem.read_obj::<u16>(used_addr).map(u16::from_le).unwrap(), 0);
    q.disable_notification(mem).unwrap();
    assert_eq!(mem.read_obj::<u16>(used_addr).map(u16::from_le).unwrap(), VRING_USED_F_NO_NOTIFY);
    q.enable_notification(mem).unwrap();
    assert_eq!(mem.read_obj::<u16>(used_addr).map(u16::from_le).unwrap(), 0);

    q.set_event_idx(true);
    let avail_addr = vq.avail_addr();
    mem.write_obj::<u16>(u16::to_le(2), avail_addr.unchecked_add(2)).unwrap();
    assert!(q.enable_notification(mem).unwrap());
    q.set_next_avail(2);
    assert!(!q.enable_notification(mem).unwrap());
    mem.write_obj::<u16>(u16::to_le(8), avail_addr.unchecked_add(2)).unwrap();
    assert!(q.enable_notification(mem).unwrap());
    q.set_next_avail(8);
    assert!(!q.enable_notification(mem).unwrap());
}

/// Serve every available chain, in the disable / serve / re-enable loop;
/// returns the number of loop iterations.
fn serve(q: &mut Queue, mem: &VmMemory<nested_pt::HeapPages>, mut between: impl FnMut()) -> u32 {
    let mut i = 0;
    loop {
        i += 1;
        q.disable_notification(mem).unwrap();
        while let Some(chain) = q.iter(mem).unwrap().next() {
            let head_index = chain.head_index();
            let mut desc_len = 0;
            chain.for_each(|d| {
                if d.flags() & VRING_DESC_F_WRITE == VRING_DESC_F_WRITE {
                    desc_len += d.len();
                }
            });
            q.add_used(mem, head_index, desc_len).unwrap();
        }
        between();
        if !q.enable_notification(mem).unwrap() {
            break;
        }
    }
    i
}

#[test]
fn consume_chains_with_notif() {
    let g = guest();
    let mem = &VmMemory::new(&g.space);
    let vq = MockSplitQueue::new(mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(q.is_valid(mem));

    // The chains are (0, 1), (2, 3, 4), (5, 6), (7, 8), (9, 10, 11, 12).
    let descs: Vec<RawDescriptor> = (0..13u16)
        .map(|i| {
            let flags = if matches!(i, 1 | 4 | 6 | 8 | 12) { 0 } else { VRING_DESC_F_NEXT };
            RawDescriptor::from(SplitDescriptor::new(0x1000 * (u64::from(i) + 1), 0x1000, flags, i + 1))
        })
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    vq.avail().idx().store(u16::to_le(2));
    assert_eq!(q.next_avail(), 0);

    assert_eq!(serve(&mut q, mem, || {}), 1);
    assert_eq!((q.next_avail(), q.next_used()), (2, 2));

    vq.avail().idx().store(u16::to_le(3));
    let mut bumped = false;
    let iterations = serve(&mut q, mem, || {
        if !bumped {
            vq.avail().idx().store(u16::to_le(4));
            bumped = true;
        }
    });
    assert_eq!(iterations, 2);
    assert_eq!((q.next_avail(), q.next_used()), (4, 4));

    // An `idx` past the entries added: allowed, with unexpected heads.
    vq.avail().idx().store(u16::to_le(7));
    serve(&mut q, mem, || {});
    assert_eq!((q.next_avail(), q.next_used()), (7, 7));
}

#[test]
fn needs_notification() {
    let g = guest();
    let mem = &VmMemory::new(&g.space);
    let qsize = 16;
    let vq = MockSplitQueue::new(mem, qsize);
    let mut q: Queue = vq.create_queue().unwrap();
    let avail_addr = vq.avail_addr();

    // Always true without EVENT_IDX.
    for i in 0..qsize {
        q.set_next_used(i);
        assert!(q.needs_notification(mem).unwrap());
    }

    // With EVENT_IDX: used_event = 4, so adding the 5th entry notifies.
    // (The mock's used ring overlaps the avail ring's tail, `used_event`
    // included: its `SplitQueueRing::end` counts elements, not bytes. Move
    // the used ring away so that `add_used` leaves `used_event` alone.)
    q.set_used_ring_address(Some(0x1000), Some(0));
    mem.write_obj::<u16>(u16::to_le(4), avail_addr.unchecked_add(4 + u64::from(qsize) * 2)).unwrap();
    q.set_event_idx(true);
    q.set_next_used(0);
    let mut notified = Vec::new();
    for i in 0..8u16 {
        q.add_used(mem, 0, 0).unwrap();
        if q.needs_notification(mem).unwrap() {
            notified.push(i + 1);
        }
    }
    assert_eq!(notified, [5]);
}
