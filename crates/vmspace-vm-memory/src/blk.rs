//! A virtio-blk device over a host file, on any vm-memory [`GuestMemory`]
//! (written for [`VmMemory`](crate::VmMemory)).
//!
//! Requests (virtio 1.2 §5.2.6): a 16-byte header (type, reserved,
//! sector) in device-readable buffers, then data buffers, then one status
//! byte, the last byte of the last device-writable buffer. Supported:
//! `IN` (read), `OUT` (write), `FLUSH`, `GET_ID`; anything else completes
//! with `UNSUPP`. Every length and address comes from the guest: sums are
//! computed in `u64` (at most 2^16 descriptors of 2^32 bytes each, so they
//! cannot overflow), sector offsets with checked arithmetic, and data is
//! copied through a fixed 64 KiB bounce buffer one piece at a time, so no
//! guest value sizes an allocation or the number of holds taken at once
//! (virtio-queue's `Reader`/`Writer` make every slice of a chain up front,
//! which over [`VmMemory`](crate::VmMemory) would mean a hold per page of
//! the whole chain).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Request type: read sectors into the driver's buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write the driver's buffers to sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make earlier writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: read the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: device or driver error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the device id string.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: the device supports `FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature bit: `used_event`/`avail_event` notification suppression
/// (virtio-queue's `Queue::set_event_idx`).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature bit: virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Bytes of the request header.
const HEADER_LEN: u64 = 16;
/// Size of the bounce buffer.
const BOUNCE: usize = 64 * 1024;

/// What one call of [`Block::process_queue`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Chains completed (put in the used ring).
    pub chains: u32,
    /// Whether the driver must be notified (interrupt), per
    /// `Queue::needs_notification`.
    pub notify: bool,
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Status byte written (`None`: the chain had no writable byte, or
    /// writing it failed, so nothing could be reported).
    pub status: Option<u8>,
    /// Bytes written into the chain's writable buffers (the used length).
    pub used_len: u32,
}

/// A virtio-blk device backed by a host file.
#[derive(Debug)]
pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    bounce: Vec<u8>,
}

/// A list of guest buffers read or written as one stream.
struct Segments {
    segs: Vec<(GuestAddress, u64)>,
    /// Index of the current segment and offset in it.
    at: usize,
    off: u64,
}

impl Segments {
    fn new() -> Self {
        Segments { segs: Vec::new(), at: 0, off: 0 }
    }

    fn total(&self) -> u64 {
        self.segs.iter().map(|s| s.1).sum()
    }

    /// Visit the next `len` bytes of the stream as (guest address, byte
    /// range in the caller's buffer) pieces, advancing. Stops at the end.
    fn advance<E>(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut done = 0usize;
        while done < len && self.at < self.segs.len() {
            let (addr, seg_len) = self.segs[self.at];
            let avail = seg_len - self.off;
            if avail == 0 {
                self.at += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min((len - done) as u64) as usize;
            // `off < seg_len` and the descriptor was accepted by the queue,
            // but the address itself is the guest's: check the sum.
            let Some(a) = addr.0.checked_add(self.off) else {
                self.at = self.segs.len();
                break;
            };
            f(GuestAddress(a), done..done + n)?;
            done += n;
            self.off += n as u64;
            if self.off == seg_len {
                self.at += 1;
                self.off = 0;
            }
        }
        Ok(done)
    }

    fn read<M: GuestMemory + ?Sized>(&mut self, mem: &M, buf: &mut [u8]) -> Result<usize, vm_memory::GuestMemoryError> {
        let len = buf.len();
        self.advance(len, |a, r| mem.read_slice(&mut buf[r], a))
    }

    fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &[u8],
        written: &mut u64,
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        self.advance(buf.len(), |a, r| {
            let n = r.len() as u64;
            mem.write_slice(&buf[r], a)?;
            *written += n;
            Ok(())
        })
    }
}

impl Block {
    /// A device over `file`, whose capacity is its length rounded down to
    /// whole sectors; `id` is the `GET_ID` string (truncated to 20 bytes,
    /// padded with NULs).
    pub fn new(file: File, read_only: bool, id: &[u8]) -> io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut buf = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        buf[..n].copy_from_slice(&id[..n]);
        Ok(Block { file, sectors, read_only, id: buf, bounce: vec![0; BOUNCE] })
    }

    /// The device features to offer: `VERSION_1`, `FLUSH`, `EVENT_IDX`,
    /// and `RO` for a read-only disk. (After negotiation, call
    /// `Queue::set_event_idx` if the driver accepted `EVENT_IDX`.)
    pub fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_EVENT_IDX | ro
    }

    /// The first 8 bytes of the configuration space: `capacity`, little
    /// endian (the rest of `struct virtio_blk_config` is optional and
    /// not offered).
    pub fn config(&self) -> [u8; 8] {
        self.sectors.to_le_bytes()
    }

    /// Capacity in 512-byte sectors (the `capacity` config field).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Serve every available chain of `queue`: complete each in the used
    /// ring, with notifications disabled meanwhile and re-enabled at the
    /// end (looping if the driver added chains in between), then say
    /// whether the driver must be notified. Errors are the queue's own
    /// (its rings not reachable in `mem`); a bad request completes with
    /// an error status instead.
    pub fn process_queue<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<Served, virtio_queue::Error> {
        let mut served = Served::default();
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let done = self.process_chain(mem, chain);
                queue.add_used(mem, head, done.used_len)?;
                served.chains += 1;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if served.chains > 0 {
            served.notify = queue.needs_notification(mem)?;
        }
        Ok(served)
    }

    /// Serve one request chain.
    pub fn process_chain<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> Completion {
        let mut readable = Segments::new();
        let mut writable = Segments::new();
        for d in chain {
            let d: Descriptor = d;
            if d.len() == 0 {
                continue;
            }
            if d.is_write_only() { &mut writable } else { &mut readable }.segs.push((d.addr(), u64::from(d.len())));
        }
        // The status byte: the last byte of the last writable buffer.
        let Some(last) = writable.segs.last_mut() else {
            return Completion { status: None, used_len: 0 };
        };
        last.1 -= 1;
        let Some(status_addr) = last.0.0.checked_add(last.1) else {
            return Completion { status: None, used_len: 0 };
        };
        let mut written = 0u64;
        let status = self.execute(mem, &mut readable, &mut writable, &mut written);
        if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
            return Completion { status: None, used_len: written.min(u64::from(u32::MAX)) as u32 };
        }
        written += 1;
        // At most 2^16 descriptors of 2^32 bytes: clamp (a driver cannot
        // make a request whose used length does not fit anyway).
        Completion { status: Some(status), used_len: written.min(u64::from(u32::MAX)) as u32 }
    }

    /// Run the request; returns the status.
    fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        rd: &mut Segments,
        wr: &mut Segments,
        written: &mut u64,
    ) -> u8 {
        let mut header = [0u8; HEADER_LEN as usize];
        match rd.read(mem, &mut header) {
            Ok(n) if n == header.len() => {}
            _ => return VIRTIO_BLK_S_IOERR,
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = wr.total();
                let Some(off) = self.range(sector, len) else { return VIRTIO_BLK_S_IOERR };
                self.read_disk(mem, wr, off, len, written)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return VIRTIO_BLK_S_IOERR;
                }
                let len = rd.total().saturating_sub(HEADER_LEN);
                let Some(off) = self.range(sector, len) else { return VIRTIO_BLK_S_IOERR };
                self.write_disk(mem, rd, off, len)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.file.sync_data().is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (wr.total() as usize).min(VIRTIO_BLK_ID_BYTES);
                let id = self.id;
                match wr.write(mem, &id[..n], written) {
                    Ok(_) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        }
    }

    /// Byte offset of `len` bytes at `sector`, if whole sectors inside
    /// the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.sectors).then_some(sector * SECTOR_SIZE)
    }

    fn read_disk<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        wr: &mut Segments,
        mut off: u64,
        len: u64,
        written: &mut u64,
    ) -> u8 {
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(BOUNCE);
            let buf = &mut self.bounce[..n];
            if self.file.read_exact_at(buf, off).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            match wr.write(mem, buf, written) {
                Ok(m) if m == n => {}
                _ => return VIRTIO_BLK_S_IOERR,
            }
            off += n as u64;
            left -= n as u64;
        }
        VIRTIO_BLK_S_OK
    }

    fn write_disk<M: GuestMemory + ?Sized>(&mut self, mem: &M, rd: &mut Segments, mut off: u64, len: u64) -> u8 {
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(BOUNCE);
            let buf = &mut self.bounce[..n];
            match rd.read(mem, buf) {
                Ok(m) if m == n => {}
                _ => return VIRTIO_BLK_S_IOERR,
            }
            if self.file.write_all_at(buf, off).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            off += n as u64;
            left -= n as u64;
        }
        VIRTIO_BLK_S_OK
    }
}
