//! The migration stream: header and records, a batching writer and a
//! buffered, bounds-checked reader (format table in the module above).
//!
//! The header and the header-ack record keep their shape in every version,
//! so that two sides of different versions can always tell each other so.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::error::{CorruptKind, MigrationError};
use super::{Layout, MemRange, PAGE_SIZE, RangeKind, StateBlob, StateKind};

/// The stream's magic bytes.
pub const MAGIC: [u8; 8] = *b"VMMIGRAT";
/// The stream version this code speaks (2: a page record carries a run of
/// pages; version 1 carried exactly one).
pub const VERSION: u32 = 2;
/// The largest header body accepted (bytes).
pub const MAX_HEADER_BODY: u32 = 1 << 20;
/// The largest state blob accepted (bytes).
pub const MAX_STATE_BLOB: u32 = 64 << 20;
/// The most state bytes a target accepts in one stream (all blobs).
pub const MAX_STATE_TOTAL: u64 = 1 << 30;
/// The largest reason string in an abort, ack or refusal (bytes).
pub const MAX_MESSAGE: u32 = 4096;
/// The size of a record header.
pub const RECORD_HEADER: usize = 20;
/// The most pages one page record carries.
pub const MAX_RUN_PAGES: usize = 64;
/// The largest page-record payload accepted (bytes).
pub const MAX_PAGES_PAYLOAD: u32 = (MAX_RUN_PAGES as u32) * PAGE_SIZE as u32;

/// Record tags.
pub mod tag {
    /// A run of pages at consecutive addresses.
    pub const PAGE: u8 = 1;
    /// A run of zero pages.
    pub const ZERO: u8 = 2;
    /// A state blob.
    pub const STATE: u8 = 3;
    /// A round marker.
    pub const ROUND: u8 = 4;
    /// The end of the stream.
    pub const END: u8 = 5;
    /// The source gives up.
    pub const ABORT: u8 = 6;
    /// The target accepts (argument 0) or refuses the header.
    pub const HEADER_ACK: u8 = 16;
    /// The target resumed the guest.
    pub const FINAL_ACK: u8 = 17;
    /// The target gives up.
    pub const REFUSAL: u8 = 18;
}

/// Why a target refused, the low 32 bits of a refusal's argument (the
/// high 32 bits of a version refusal carry the target's version).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Refusal {
    /// The stream version.
    Version = 1,
    /// The page size.
    PageSize = 2,
    /// The layout (the target's `prepare` refused it).
    Layout = 3,
    /// The stream was corrupt.
    Corrupt = 4,
    /// The target VM failed an operation.
    Target = 5,
    /// Anything else.
    Other = 6,
}

impl Refusal {
    fn from_code(c: u32) -> Refusal {
        match c {
            1 => Refusal::Version,
            2 => Refusal::PageSize,
            3 => Refusal::Layout,
            4 => Refusal::Corrupt,
            5 => Refusal::Target,
            _ => Refusal::Other,
        }
    }
}

/// One decoded record; a page borrows the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A run of pages from `gpa`.
    Page {
        /// The first page's address.
        gpa: u64,
        /// Their contents: a non-zero whole number of pages, at most
        /// [`MAX_PAGES_PAYLOAD`] bytes.
        data: &'a [u8],
    },
    /// `count` zero pages from `gpa`.
    Zero {
        /// The first page's address.
        gpa: u64,
        /// How many (at least 1).
        count: u64,
    },
    /// A state blob.
    State(StateBlob),
    /// The start of pre-copy round `n` (0 is the first pass; the last
    /// round, after pause, is marked too).
    Round(u64),
    /// The end of the stream; `pages` pages were delivered in all.
    End {
        /// Pages delivered (page records plus zero pages).
        pages: u64,
    },
    /// The source gave up.
    Abort(String),
    /// The target's answer to the header.
    HeaderAck(Result<(), (Refusal, u32, String)>),
    /// The target resumed at `resume_unix_ns`.
    FinalAck {
        /// Resume time, ns since the Unix epoch on the target's clock.
        resume_unix_ns: u64,
    },
    /// The target gave up.
    Refusal(Refusal, String),
}

fn crc_of(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

fn record_head(t: u8, len: u32, arg: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = t;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&arg.to_le_bytes());
    h
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn io_err(during: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
    move |error| MigrationError::Io { during, error }
}

/// The encoded stream header for `layout`.
pub fn encode_header(layout: &Layout) -> Vec<u8> {
    encode_header_with(VERSION, PAGE_SIZE as u32, layout)
}

/// The encoded stream header with a given version and page size (tests
/// build foreign headers with it).
pub fn encode_header_with(version: u32, page_size: u32, layout: &Layout) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + 20 * layout.ranges.len());
    body.extend_from_slice(&page_size.to_le_bytes());
    body.extend_from_slice(&(layout.ranges.len() as u32).to_le_bytes());
    for r in &layout.ranges {
        body.extend_from_slice(&r.gpa.to_le_bytes());
        body.extend_from_slice(&r.len.to_le_bytes());
        let k: u32 = match r.kind {
            RangeKind::Ram => 0,
            RangeKind::Device => 1,
        };
        body.extend_from_slice(&k.to_le_bytes());
    }
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&MAGIC);
    let mut vl = [0u8; 8];
    vl[..4].copy_from_slice(&version.to_le_bytes());
    vl[4..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&vl);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc_of(&vl, &body).to_le_bytes());
    out
}

/// One encoded record (acks, tests).
pub fn encode_record(t: u8, arg: u64, payload: &[u8]) -> Vec<u8> {
    let head = record_head(t, payload.len() as u32, arg);
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&crc_of(&head, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn message(s: &str) -> &[u8] {
    let mut n = s.len().min(MAX_MESSAGE as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// A zero-page record: header and the page count.
const ZERO_RECORD: usize = RECORD_HEADER + 8;

/// A writer that batches records into one buffer and writes it with one
/// call when full; runs of non-zero pages become one page record, runs of
/// zero pages one zero-page record.
///
/// The buffer is allocated (and zeroed) once: a run of pages is read
/// straight into its slot after the slot's header, with no clearing and no
/// second copy (a non-zero run after zero pages is moved down once), and a
/// zero-page record that must precede it is written into room reserved in
/// front of the slot.
pub struct RecordWriter<W: Write> {
    inner: W,
    buf: Box<[u8]>,
    used: usize,
    zero_run: Option<(u64, u64)>,
    written: u64,
    write_time: Duration,
}

impl<W: Write> RecordWriter<W> {
    /// A writer over `inner` that writes in batches of about `batch` bytes.
    pub fn new(inner: W, batch: usize) -> RecordWriter<W> {
        let batch = batch.max(ZERO_RECORD + RECORD_HEADER + PAGE_SIZE as usize);
        RecordWriter {
            inner,
            buf: vec![0u8; batch].into_boxed_slice(),
            used: 0,
            zero_run: None,
            written: 0,
            write_time: Duration::ZERO,
        }
    }

    /// Bytes handed to the connection or buffered so far.
    pub fn bytes(&self) -> u64 {
        self.written
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Time spent in the connection's `write_all` and `flush` so far.
    pub fn write_time(&self) -> Duration {
        self.write_time
    }

    /// Write out what is buffered.
    fn drain(&mut self) -> io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let r = self.inner.write_all(&self.buf[..self.used]);
        self.write_time += t.elapsed();
        self.used = 0;
        r
    }

    /// Write `bytes` straight to the connection (after draining).
    fn direct(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.drain()?;
        let t = Instant::now();
        let r = self.inner.write_all(bytes);
        self.write_time += t.elapsed();
        r
    }

    /// Make room for `n` more bytes (`n` at most the batch size).
    fn make_room(&mut self, n: usize) -> io::Result<()> {
        if self.used + n > self.buf.len() { self.drain() } else { Ok(()) }
    }

    /// Append bytes, through the buffer when they fit in it.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.buf.len() {
            return self.direct(bytes);
        }
        self.make_room(bytes.len())?;
        self.buf[self.used..self.used + bytes.len()].copy_from_slice(bytes);
        self.used += bytes.len();
        Ok(())
    }

    fn push(&mut self, t: u8, arg: u64, payload: &[u8]) -> io::Result<()> {
        let head = record_head(t, payload.len() as u32, arg);
        let mut h = [0u8; RECORD_HEADER];
        h[..16].copy_from_slice(&head);
        h[16..].copy_from_slice(&crc_of(&head, payload).to_le_bytes());
        if RECORD_HEADER + payload.len() <= self.buf.len() {
            self.make_room(RECORD_HEADER + payload.len())?;
        }
        self.append(&h)?;
        self.append(payload)?;
        self.written += (RECORD_HEADER + payload.len()) as u64;
        Ok(())
    }

    /// Write a zero-page record for `run` at `at` in the buffer (room for
    /// it is there).
    fn put_zero_record(&mut self, at: usize, run: (u64, u64)) {
        let count = run.1.to_le_bytes();
        let head = record_head(tag::ZERO, 8, run.0);
        self.buf[at..at + 16].copy_from_slice(&head);
        self.buf[at + 16..at + 20].copy_from_slice(&crc_of(&head, &count).to_le_bytes());
        self.buf[at + 20..at + ZERO_RECORD].copy_from_slice(&count);
        self.written += ZERO_RECORD as u64;
    }

    /// End a pending run of zero pages (runs never cross a range).
    pub fn end_zero_run(&mut self) -> io::Result<()> {
        if let Some(run) = self.zero_run.take() {
            self.make_room(ZERO_RECORD)?;
            self.put_zero_record(self.used, run);
            self.used += ZERO_RECORD;
        }
        Ok(())
    }

    /// Append `count` zero pages from `gpa` without their contents (a
    /// source found them zero in place): they extend the pending zero-page
    /// run where they follow it, else they start one. Runs never cross a
    /// range: the caller ends them with [`end_zero_run`](Self::end_zero_run)
    /// at a range's end.
    pub fn zeros(&mut self, gpa: u64, count: u64) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        match &mut self.zero_run {
            Some((g, c)) if c.checked_mul(PAGE_SIZE).and_then(|b| g.checked_add(b)) == Some(gpa) => *c += count,
            _ => {
                self.end_zero_run()?;
                self.zero_run = Some((gpa, count));
            }
        }
        Ok(())
    }

    /// Append a record (a pending run of zero pages goes first).
    pub fn record(&mut self, t: u8, arg: u64, payload: &[u8]) -> io::Result<()> {
        self.end_zero_run()?;
        self.push(t, arg, payload)
    }

    /// The most pages one [`pages`](Self::pages) call takes: a record of
    /// them and a pending zero-page record fit in the batch buffer.
    pub fn max_run_pages(&self) -> usize {
        let room = self.buf.len() - ZERO_RECORD - RECORD_HEADER;
        (room / PAGE_SIZE as usize).clamp(1, MAX_RUN_PAGES)
    }

    /// Append a page: [`pages`](Self::pages) with one page; returns whether
    /// it was zero.
    pub fn page<E: From<io::Error>>(
        &mut self,
        gpa: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        Ok(self.pages(gpa, 1, fill)? == 1)
    }

    /// Append `n` pages at consecutive addresses from `gpa` (`n` from 1 to
    /// [`max_run_pages`](Self::max_run_pages)): `fill` writes their
    /// contents straight into the batch buffer (the slot holds stale
    /// bytes: `fill` must write all of it). Each maximal run of non-zero
    /// pages becomes one page record, each run of zero pages (part of) a
    /// zero-page run. Returns how many of the pages were zero. On an error
    /// of `fill` nothing was appended.
    ///
    /// The pages are read once, into place: the first run of non-zero
    /// pages stays where it was read; a later one (after zero pages, whose
    /// 4 KiB each leave room for its header and a zero record) is moved
    /// down once.
    pub fn pages<E: From<io::Error>>(
        &mut self,
        gpa: u64,
        n: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let ps = PAGE_SIZE as usize;
        if n == 0 || n > self.max_run_pages() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a run of {n} pages")).into());
        }
        // Room for the pending zero run's record in front of the pages.
        let zr = if self.zero_run.is_some() { ZERO_RECORD } else { 0 };
        self.make_room(zr + RECORD_HEADER + n * ps)?;
        let start = self.used;
        let data0 = start + zr + RECORD_HEADER;
        fill(&mut self.buf[data0..data0 + n * ps])?;
        let mut zero_mask = 0u64;
        for (i, page) in self.buf[data0..data0 + n * ps].chunks_exact(ps).enumerate() {
            if is_zero(page) {
                zero_mask |= 1 << i;
            }
        }
        let is_z = |i: usize| zero_mask & (1 << i) != 0;
        // `out` never passes the bytes still to be moved: each zero page
        // frees a page and costs at most two zero records and a header.
        let mut out = start;
        let mut i = 0;
        while i < n {
            let z = is_z(i);
            let mut j = i + 1;
            while j < n && is_z(j) == z {
                j += 1;
            }
            let at = gpa + (i * ps) as u64;
            let count = (j - i) as u64;
            if z {
                match &mut self.zero_run {
                    Some((g, c)) if g.checked_add(*c * PAGE_SIZE) == Some(at) => *c += count,
                    _ => {
                        if let Some(run) = self.zero_run.take() {
                            self.put_zero_record(out, run);
                            out += ZERO_RECORD;
                        }
                        self.zero_run = Some((at, count));
                    }
                }
            } else {
                if let Some(run) = self.zero_run.take() {
                    self.put_zero_record(out, run);
                    out += ZERO_RECORD;
                }
                let len = (j - i) * ps;
                let (src, dst) = (data0 + i * ps, out + RECORD_HEADER);
                if src != dst {
                    self.buf.copy_within(src..src + len, dst);
                }
                let head = record_head(tag::PAGE, len as u32, at);
                let crc = crc_of(&head, &self.buf[dst..dst + len]);
                self.buf[out..out + 16].copy_from_slice(&head);
                self.buf[out + 16..out + 20].copy_from_slice(&crc.to_le_bytes());
                out = dst + len;
                self.written += (RECORD_HEADER + len) as u64;
            }
            i = j;
        }
        self.used = out;
        Ok(u64::from(zero_mask.count_ones()))
    }

    /// Append a state blob.
    pub fn state(&mut self, blob: &StateBlob) -> io::Result<()> {
        let arg = (u64::from(blob.kind.code()) << 32) | u64::from(blob.instance);
        self.record(tag::STATE, arg, &blob.data)
    }

    /// Append an abort with a reason.
    pub fn abort(&mut self, reason: &str) -> io::Result<()> {
        self.record(tag::ABORT, 0, message(reason))
    }

    /// Write out everything buffered and flush the connection.
    pub fn flush(&mut self) -> io::Result<()> {
        self.end_zero_run()?;
        self.drain()?;
        let t = Instant::now();
        let r = self.inner.flush();
        self.write_time += t.elapsed();
        r
    }

    /// Write raw bytes (the header), after what is buffered.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.end_zero_run()?;
        self.append(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Encode a refusal record.
pub fn encode_refusal(r: Refusal, high: u32, reason: &str) -> Vec<u8> {
    encode_record(tag::REFUSAL, (u64::from(high) << 32) | r as u64, message(reason))
}

/// Encode a header ack: `Ok` accepts, `Err` refuses.
pub fn encode_header_ack(answer: Result<(), (Refusal, u32, &str)>) -> Vec<u8> {
    match answer {
        Ok(()) => encode_record(tag::HEADER_ACK, 0, &[]),
        Err((r, high, reason)) => encode_record(tag::HEADER_ACK, (u64::from(high) << 32) | r as u64, message(reason)),
    }
}

/// A buffered reader of the stream that checks every length and checksum
/// and never panics on what it reads.
pub struct RecordReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    read: u64,
    read_time: Duration,
    check_time: Duration,
    /// The connection's descriptor, when page payloads may be received in
    /// place ([`RecordReader::page_in_place`]).
    fd: Option<std::os::fd::RawFd>,
    /// Whether reads into the buffer stop shortly past what is needed (so
    /// that a page payload is left in the socket, for reading in place).
    short_reads: bool,
}

/// How far past the bytes it needs a reader that receives in place reads
/// into its buffer: small records after a header come with it, and at most
/// this much of a page payload is copied from the buffer rather than read
/// in place.
const LOOKAHEAD: usize = 4096;

/// The most `iovec`s one `readv` is given (Linux's `IOV_MAX`).
const MAX_IOV: usize = 1024;

/// The most bytes one `readv` of a page run received in place takes, so
/// that each chunk is checksummed while it is still in the cache (128 KiB:
/// well inside a core's L2).
const IN_PLACE_CHUNK: usize = 128 << 10;

/// The pieces of bytes `from .. from + len` of the concatenation of
/// `dests`, as (address, length) in order; ends early where the
/// destinations do.
fn spans(dests: &[super::RawDest], from: usize, len: usize) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
    let mut skip = from;
    let mut left = len;
    dests.iter().filter_map(move |d| {
        if left == 0 {
            return None;
        }
        if skip >= d.len() {
            skip -= d.len();
            return None;
        }
        let k = (d.len() - skip).min(left);
        // `skip < d.len()`: the address stays inside `d` (wrapping_add
        // only avoids an unsafe block; it cannot wrap here).
        let at = d.as_ptr().wrapping_add(skip);
        skip = 0;
        left -= k;
        Some((at, k))
    })
}

/// Adds `len` bytes of the destinations `dests`, from byte `from` of
/// their concatenation, to the checksum `c`.
#[allow(unsafe_code)]
fn crc_dests(c: &mut crc32fast::Hasher, dests: &[super::RawDest], from: usize, len: usize) {
    for (at, k) in spans(dests, from, len) {
        // SAFETY: `spans` gives `k` bytes inside one destination, which the
        // kernel has just filled and which, by `RawDest`'s contract, nobody
        // else writes or mutably references while the receive runs: a
        // shared slice over them for the checksum, dropped at once.
        c.update(unsafe { std::slice::from_raw_parts(at, k) });
    }
}

impl<R: Read> RecordReader<R> {
    /// A reader over `inner` with a buffer of `cap` bytes (grown only for
    /// a state blob larger than that, as its bytes arrive).
    pub fn new(inner: R, cap: usize) -> RecordReader<R> {
        RecordReader {
            inner,
            buf: vec![0; cap.max(2 * (RECORD_HEADER + PAGE_SIZE as usize))],
            pos: 0,
            end: 0,
            read: 0,
            read_time: Duration::ZERO,
            check_time: Duration::ZERO,
            fd: None,
            short_reads: false,
        }
    }

    /// Receive page payloads in place from `fd`, the descriptor `inner`
    /// reads (a socket: its reads and `readv` on `fd` consume one byte
    /// stream, with nothing buffered in between).
    pub(crate) fn set_in_place(&mut self, fd: std::os::fd::RawFd) {
        self.fd = Some(fd);
        self.short_reads = true;
    }

    /// Whether page payloads may be received in place.
    pub(crate) fn in_place(&self) -> bool {
        self.fd.is_some()
    }

    /// Stop receiving in place (the target declined a run): reads fill the
    /// buffer again.
    pub(crate) fn stop_in_place(&mut self) {
        self.fd = None;
        self.short_reads = false;
    }

    /// Bytes consumed so far.
    pub fn bytes(&self) -> u64 {
        self.read
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Time spent in the connection's `read` so far (waiting for the peer
    /// included).
    pub fn read_time(&self) -> Duration {
        self.read_time
    }

    /// Time spent verifying record checksums so far.
    pub fn check_time(&self) -> Duration {
        self.check_time
    }

    /// Make `n` bytes available at `pos`; `boundary` says whether a clean
    /// end before any of them is a peer going away rather than truncation.
    fn fill(&mut self, n: usize, during: &'static str, boundary: bool) -> Result<(), MigrationError> {
        if self.end - self.pos >= n {
            return Ok(());
        }
        if self.buf.len() - self.pos < n {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while self.end - self.pos < n {
            if self.end == self.buf.len() {
                let grown = self.buf.len().saturating_mul(2).min(n);
                self.buf.resize(grown.max(self.buf.len()), 0);
            }
            let lim = if self.short_reads {
                let want = (n - (self.end - self.pos)).saturating_add(LOOKAHEAD);
                self.buf.len().min(self.end.saturating_add(want))
            } else {
                self.buf.len()
            };
            let t = Instant::now();
            let got = self.inner.read(&mut self.buf[self.end..lim]);
            self.read_time += t.elapsed();
            match got {
                Ok(0) => {
                    let got = self.end - self.pos;
                    return Err(if got == 0 && boundary {
                        MigrationError::PeerClosed { during }
                    } else {
                        MigrationError::Truncated { during, expected: n, got }
                    });
                }
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(MigrationError::Truncated { during, expected: n, got: self.end - self.pos });
                }
                Err(error) => return Err(MigrationError::Io { during, error }),
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        self.read += n as u64;
        s
    }

    /// Read and check the stream header; returns the layout.
    pub fn header(&mut self) -> Result<Layout, MigrationError> {
        self.fill(16, "stream header", true)?;
        let h = self.take(16);
        if h[..8] != MAGIC {
            return Err(MigrationError::Corrupt(CorruptKind::BadMagic));
        }
        let vl: [u8; 8] = h[8..16].try_into().unwrap_or([0; 8]);
        let version = u32::from_le_bytes(vl[..4].try_into().unwrap_or([0; 4]));
        if version != VERSION {
            return Err(MigrationError::VersionMismatch { ours: VERSION, theirs: version });
        }
        let body_len = u32::from_le_bytes(vl[4..].try_into().unwrap_or([0; 4]));
        if !(8..=MAX_HEADER_BODY).contains(&body_len) {
            return Err(MigrationError::Corrupt(CorruptKind::BadLength { tag: 0, len: u64::from(body_len) }));
        }
        let n = body_len as usize;
        self.fill(n + 4, "stream header", false)?;
        let all = self.take(n + 4);
        let (body, crc) = all.split_at(n);
        let carried = u32::from_le_bytes(crc.try_into().unwrap_or([0; 4]));
        let computed = crc_of(&vl, body);
        if carried != computed {
            return Err(MigrationError::Corrupt(CorruptKind::BadChecksum { tag: 0, carried, computed }));
        }
        let page_size = u32::from_le_bytes(body[..4].try_into().unwrap_or([0; 4]));
        if u64::from(page_size) != PAGE_SIZE {
            return Err(MigrationError::PageSizeMismatch { ours: PAGE_SIZE as u32, theirs: page_size });
        }
        let count = u32::from_le_bytes(body[4..8].try_into().unwrap_or([0; 4])) as usize;
        if count.checked_mul(20).and_then(|x| x.checked_add(8)) != Some(n) {
            return Err(MigrationError::Corrupt(CorruptKind::BadHeader(format!(
                "{count} ranges in a body of {n} bytes"
            ))));
        }
        let mut ranges = Vec::with_capacity(count);
        for c in body[8..].chunks_exact(20) {
            let gpa = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
            let len = u64::from_le_bytes(c[8..16].try_into().unwrap_or([0; 8]));
            let kind = match u32::from_le_bytes(c[16..20].try_into().unwrap_or([0; 4])) {
                0 => RangeKind::Ram,
                1 => RangeKind::Device,
                k => return Err(MigrationError::Corrupt(CorruptKind::BadHeader(format!("range kind {k}")))),
            };
            ranges.push(MemRange { gpa, len, kind });
        }
        let layout = Layout { ranges };
        layout.validate().map_err(|m| MigrationError::Corrupt(CorruptKind::BadHeader(m)))?;
        Ok(layout)
    }

    /// The address and payload length of the next record if it is a page
    /// record of a valid length, without consuming it (`None` for any other
    /// record, or a header that [`next`](Self::next) will refuse).
    pub(crate) fn peek_page(&mut self, during: &'static str) -> Result<Option<(u64, usize)>, MigrationError> {
        self.fill(RECORD_HEADER, during, true)?;
        let h = &self.buf[self.pos..self.pos + RECORD_HEADER];
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap_or([0; 4]));
        let ok = h[0] == tag::PAGE
            && h[1..4] == [0, 0, 0]
            && len != 0
            && u64::from(len).is_multiple_of(PAGE_SIZE)
            && len <= MAX_PAGES_PAYLOAD;
        Ok(ok.then(|| (u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8])), len as usize)))
    }

    /// Consume the page record [`peek_page`](Self::peek_page) found,
    /// receiving its payload into `dests` (which must cover exactly its
    /// length, in order): the bytes already buffered are copied, the rest
    /// read straight from the connection with `readv`; then the record's
    /// checksum is verified over the bytes where they landed. On any error
    /// the destinations hold partial or unverified bytes (the caller's
    /// attempt fails and discards them).
    #[allow(unsafe_code)]
    pub(crate) fn page_in_place(&mut self, dests: &[super::RawDest]) -> Result<(), MigrationError> {
        let during = "stream record";
        let Some(fd) = self.fd else {
            return Err(MigrationError::Invalid("a page received in place without a descriptor".into()));
        };
        let h: [u8; RECORD_HEADER] = self.buf[self.pos..self.pos + RECORD_HEADER].try_into().unwrap_or([0; 20]);
        let n = u32::from_le_bytes(h[4..8].try_into().unwrap_or([0; 4])) as usize;
        let carried = u32::from_le_bytes(h[16..20].try_into().unwrap_or([0; 4]));
        let total = dests.iter().try_fold(0usize, |a, d| a.checked_add(d.len()));
        if total != Some(n) {
            return Err(MigrationError::Invalid(format!(
                "the target gave {total:?} bytes of destinations for a run of {n}"
            )));
        }
        self.pos += RECORD_HEADER;
        self.read += RECORD_HEADER as u64;
        let mut c = crc32fast::Hasher::new();
        c.update(&h[..16]);
        // What the buffer holds of the payload: copied.
        let mut have = (self.end - self.pos).min(n);
        let mut off = 0usize;
        for (at, k) in spans(dests, 0, have) {
            // SAFETY: `k` bytes from the buffer (inside `pos..end`) into `k`
            // bytes inside one destination (`spans`), valid for writes by
            // `RawDest`'s contract; a heap buffer and guest memory do not
            // overlap.
            unsafe { std::ptr::copy_nonoverlapping(self.buf[self.pos + off..].as_ptr(), at, k) };
            off += k;
        }
        let t0 = Instant::now();
        c.update(&self.buf[self.pos..self.pos + have]);
        self.check_time += t0.elapsed();
        self.pos += have;
        self.read += have as u64;
        // The rest: straight from the connection, at most `IN_PLACE_CHUNK`
        // bytes a call, each chunk checksummed as soon as it has landed,
        // while it is still in the cache (one pass over a whole run after
        // its last byte arrived would read most of it back from memory).
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(dests.len().min(MAX_IOV));
        let mut failed = None;
        while have < n {
            let t = Instant::now();
            iov.clear();
            iov.extend(
                spans(dests, have, (n - have).min(IN_PLACE_CHUNK))
                    .take(MAX_IOV)
                    .map(|(at, k)| libc::iovec { iov_base: at.cast(), iov_len: k }),
            );
            // SAFETY: every iovec lies inside one destination past the
            // bytes already received (valid for writes, `RawDest`); the
            // kernel writes at most their total.
            let k = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) };
            self.read_time += t.elapsed();
            if k < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                failed = Some(MigrationError::Io { during, error: e });
                break;
            }
            if k == 0 {
                failed =
                    Some(MigrationError::Truncated { during, expected: RECORD_HEADER + n, got: RECORD_HEADER + have });
                break;
            }
            let t0 = Instant::now();
            crc_dests(&mut c, dests, have, k as usize);
            self.check_time += t0.elapsed();
            have += k as usize;
            self.read += k as u64;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let t0 = Instant::now();
        let computed = c.finalize();
        self.check_time += t0.elapsed();
        if computed != carried {
            return Err(MigrationError::Corrupt(CorruptKind::BadChecksum { tag: tag::PAGE, carried, computed }));
        }
        Ok(())
    }

    /// Read the next record. `during` names what is awaited for errors.
    pub fn next(&mut self, during: &'static str) -> Result<Record<'_>, MigrationError> {
        self.fill(RECORD_HEADER, during, true)?;
        let h: [u8; RECORD_HEADER] = self.buf[self.pos..self.pos + RECORD_HEADER].try_into().unwrap_or([0; 20]);
        let t = h[0];
        if h[1..4] != [0, 0, 0] {
            return Err(MigrationError::Corrupt(CorruptKind::Reserved));
        }
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap_or([0; 4]));
        let arg = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
        let carried = u32::from_le_bytes(h[16..20].try_into().unwrap_or([0; 4]));
        let ok_len = match t {
            tag::PAGE => len != 0 && u64::from(len).is_multiple_of(PAGE_SIZE) && len <= MAX_PAGES_PAYLOAD,
            tag::ZERO => len == 8,
            tag::STATE => len <= MAX_STATE_BLOB,
            tag::ROUND | tag::END | tag::FINAL_ACK => len == 0,
            tag::ABORT | tag::HEADER_ACK | tag::REFUSAL => len <= MAX_MESSAGE,
            other => return Err(MigrationError::Corrupt(CorruptKind::UnknownType(other))),
        };
        if !ok_len {
            return Err(MigrationError::Corrupt(CorruptKind::BadLength { tag: t, len: u64::from(len) }));
        }
        let n = len as usize;
        self.fill(RECORD_HEADER + n, during, false)?;
        self.take(RECORD_HEADER);
        let t0 = Instant::now();
        let payload = &self.buf[self.pos..self.pos + n];
        let computed = crc_of(&h[..16], payload);
        self.check_time += t0.elapsed();
        let payload = self.take(n);
        if computed != carried {
            return Err(MigrationError::Corrupt(CorruptKind::BadChecksum { tag: t, carried, computed }));
        }
        let text = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        Ok(match t {
            tag::PAGE => Record::Page { gpa: arg, data: payload },
            tag::ZERO => {
                let count = u64::from_le_bytes(payload.try_into().unwrap_or([0; 8]));
                if count == 0 {
                    return Err(MigrationError::Corrupt(CorruptKind::BadAddress { gpa: arg, count }));
                }
                Record::Zero { gpa: arg, count }
            }
            tag::STATE => {
                let code = (arg >> 32) as u32;
                let kind =
                    StateKind::from_code(code).ok_or(MigrationError::Corrupt(CorruptKind::UnknownStateKind(code)))?;
                Record::State(StateBlob { kind, instance: arg as u32, data: payload.to_vec() })
            }
            tag::ROUND => Record::Round(arg),
            tag::END => Record::End { pages: arg },
            tag::ABORT => Record::Abort(text(payload)),
            tag::HEADER_ACK => {
                if arg == 0 {
                    Record::HeaderAck(Ok(()))
                } else {
                    Record::HeaderAck(Err((Refusal::from_code(arg as u32), (arg >> 32) as u32, text(payload))))
                }
            }
            tag::FINAL_ACK => Record::FinalAck { resume_unix_ns: arg },
            _ => Record::Refusal(Refusal::from_code(arg as u32), text(payload)),
        })
    }
}

/// Turn a write error into a [`MigrationError`].
pub(crate) fn send_err(error: io::Error) -> MigrationError {
    io_err("send")(error)
}
