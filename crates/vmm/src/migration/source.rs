//! The source side: pre-copy, switch-over, and the clean-up that keeps a
//! failed attempt from losing anything.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{CorruptKind, MigrationError};
use super::wire::{self, Record, RecordReader, RecordWriter, Refusal, tag};
use super::{Layout, MigrationSource, PAGE_SIZE, empty_bitmaps, trim_bitmap};

/// How the source runs an attempt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceConfig {
    /// The downtime to aim for: switch over when the remaining dirty bytes
    /// fit in it at the measured throughput (300 ms, as QEMU and
    /// cloud-hypervisor).
    pub downtime_limit: Duration,
    /// The most pre-copy rounds after the first pass; then the engine
    /// switches over whatever remains (30).
    pub max_rounds: u32,
    /// Throttle the vCPUs when the guest dirties faster than the link
    /// carries (QEMU's auto-converge: from 20% in 10% steps to 99%). Off
    /// by default, as in QEMU.
    pub auto_converge: bool,
    /// Cap the send rate (bytes per second; QEMU's max-bandwidth); `None`
    /// sends as fast as the connection takes it.
    pub max_bandwidth: Option<u64>,
    /// The size of one write (bytes; 256 KiB).
    pub batch_bytes: usize,
    /// Whether the target reads the same clock as the source (one host):
    /// then the downtime is measured from pause here to resume there.
    pub shared_clock: bool,
}

impl Default for SourceConfig {
    fn default() -> SourceConfig {
        SourceConfig {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            auto_converge: false,
            max_bandwidth: None,
            batch_bytes: 256 << 10,
            shared_clock: false,
        }
    }
}

/// Progress after each harvest (and once after the final round).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The round just harvested (0 is the first pass).
    pub round: u32,
    /// Pages sent in the round before this harvest (zero runs counted page
    /// by page).
    pub pages_sent: u64,
    /// Pages sent in all rounds so far.
    pub total_pages_sent: u64,
    /// Dirty pages waiting to be sent.
    pub remaining_dirty: u64,
    /// Cumulative throughput (bytes per second).
    pub throughput: f64,
    /// Pages dirtied per second since the previous harvest.
    pub dirty_rate: f64,
    /// The vCPU throttle in force (percent).
    pub throttle_pct: u8,
    /// Whether the vCPUs are paused (the final round).
    pub paused: bool,
}

/// What a successful migration did, for `--json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// From the start of the attempt to the final ack (ms).
    pub total_ms: f64,
    /// The guest's downtime (ms): pause here to resume on the target when
    /// `downtime_shared_clock`, else pause to final ack.
    pub downtime_ms: f64,
    /// Whether `downtime_ms` was measured on one clock across both sides.
    pub downtime_shared_clock: bool,
    /// Pause to final ack on the source's clock (ms).
    pub pause_to_ack_ms: f64,
    /// Bytes of guest memory in the layout.
    pub guest_bytes: u64,
    /// Pages the first pass found resident.
    pub resident_pages: u64,
    /// Bytes written to the connection (header, records).
    pub bytes_sent: u64,
    /// `bytes_sent / guest_bytes`.
    pub bytes_per_guest_byte: f64,
    /// Pre-copy rounds (the first pass included, the final round not).
    pub rounds: u32,
    /// Pages delivered in all (zero runs page by page).
    pub pages_sent: u64,
    /// Of them, zero pages.
    pub zero_pages: u64,
    /// Pages sent while paused.
    pub final_round_pages: u64,
    /// Whether the dirty set fit the downtime limit before the round limit.
    pub converged: bool,
    /// The highest vCPU throttle applied (percent).
    pub max_throttle_pct: u8,
    /// Cumulative pre-copy throughput (bytes per second).
    pub throughput: f64,
    /// Pages dirtied per second in the last pre-copy round.
    pub dirty_rate: f64,
    /// Bytes of state blobs.
    pub state_bytes: u64,
    /// Where the time went.
    #[serde(default)]
    pub timings: SourceTimings,
}

/// Where a source's time went (ms, from `Instant` counters; the phases
/// overlap nothing, their sum is at most `total_ms`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceTimings {
    /// Header sent to header ack (the target's `prepare` included).
    pub handshake_ms: f64,
    /// Residency of the first pass.
    pub resident_ms: f64,
    /// Every harvest (pausing the vCPUs at a harvest point included).
    pub harvest_ms: f64,
    /// Pause for the switch-over.
    pub pause_ms: f64,
    /// Reading pages out of guest memory (checking them for zero in
    /// place, [`MigrationSource::zero_mask`], included).
    pub read_pages_ms: f64,
    /// Zero checks, checksums and record framing (sending minus reading
    /// minus socket writes).
    pub encode_ms: f64,
    /// Socket writes and flushes.
    pub socket_write_ms: f64,
    /// Saving and encoding the state blobs.
    pub state_ms: f64,
    /// End record flushed to final ack (the target's last pages, state
    /// and resume).
    pub final_ack_wait_ms: f64,
    /// CPU time of the engine's thread over the attempt (its harvests
    /// included; [`super::thread_cpu_time`]).
    #[serde(default)]
    pub cpu_ms: f64,
}

/// What the clean-up must undo if the attempt fails.
struct Undo {
    harvested: Vec<Vec<u64>>,
    paused: bool,
    throttle: u8,
}

/// Accumulated phase times of one attempt.
#[derive(Default)]
struct Clock {
    harvest: Duration,
    read: Duration,
    send: Duration,
}

/// Migrate `source` over a connection (`reader` and `writer` are its two
/// directions; `&TcpStream` serves as both). `progress` is called after
/// every harvest.
///
/// On success the source stays paused: the VM now runs on the target and
/// the caller tears the source down. On any failure before the target's
/// final ack the source is resumed (if paused), the throttle lifted, and
/// every dirty bit the attempt harvested put back, before the error is
/// returned; the target is told to abort where the connection still works.
pub fn migrate<S: MigrationSource + ?Sized, R: Read, W: Write>(
    source: &mut S,
    reader: R,
    writer: W,
    config: &SourceConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationSummary, MigrationError> {
    let layout = source.layout();
    layout.validate().map_err(MigrationError::Invalid)?;
    let mut undo = Undo { harvested: empty_bitmaps(&layout), paused: false, throttle: 0 };
    let mut w = RecordWriter::new(writer, config.batch_bytes);
    let mut r = RecordReader::new(reader, 64 << 10);
    let res =
        Engine { source: &mut *source, layout: &layout, config, undo: &mut undo, w: &mut w, clock: Clock::default() }
            .run(&mut r, progress);
    let err = match res {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let peer_refused = matches!(
        err,
        MigrationError::VersionMismatch { .. }
            | MigrationError::PageSizeMismatch { .. }
            | MigrationError::LayoutMismatch(_)
            | MigrationError::Refused(_)
    );
    if !err.is_peer_gone() && !peer_refused {
        let _ = w.abort(&err.to_string());
        let _ = w.flush();
    }
    let mut failed = Vec::new();
    if undo.throttle > 0
        && let Err(e) = source.throttle(0)
    {
        failed.push(e.to_string());
    }
    for (range, bits) in layout.ranges.iter().zip(&undo.harvested) {
        if bits.iter().any(|&b| b != 0)
            && let Err(e) = source.set_dirty(range, bits)
        {
            failed.push(e.to_string());
        }
    }
    if undo.paused
        && let Err(e) = source.resume()
    {
        failed.push(e.to_string());
    }
    if failed.is_empty() {
        Err(err)
    } else {
        Err(MigrationError::Source(super::HostError::new("clean-up", format!("{} (after: {err})", failed.join("; ")))))
    }
}

/// [`migrate`] over a TCP connection: sets `TCP_NODELAY` and a read
/// timeout for the acks (`ack_timeout`), and shuts the connection down on
/// failure so that the target notices at once.
pub fn migrate_tcp<S: MigrationSource + ?Sized>(
    source: &mut S,
    stream: &std::net::TcpStream,
    config: &SourceConfig,
    ack_timeout: Option<Duration>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationSummary, MigrationError> {
    let io = |during| move |error| MigrationError::Io { during, error };
    stream.set_nodelay(true).map_err(io("socket setup"))?;
    stream.set_read_timeout(ack_timeout).map_err(io("socket setup"))?;
    let _policy = super::priority::StreamGuard::enter(super::priority::Side::Source);
    let res = migrate(source, stream, stream, config, progress);
    if res.is_err() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    res
}

struct Engine<'a, S: MigrationSource + ?Sized, W: Write> {
    source: &'a mut S,
    layout: &'a Layout,
    config: &'a SourceConfig,
    undo: &'a mut Undo,
    w: &'a mut RecordWriter<W>,
    clock: Clock,
}

/// The indices of the set bits of a bitmap, in increasing order.
struct BitRuns<'a> {
    bits: &'a [u64],
    word: usize,
    cur: u64,
}

impl<'a> BitRuns<'a> {
    fn new(bits: &'a [u64]) -> BitRuns<'a> {
        BitRuns { bits, word: 0, cur: bits.first().copied().unwrap_or(0) }
    }

    fn next(&mut self) -> Option<u64> {
        while self.cur == 0 {
            self.word += 1;
            self.cur = *self.bits.get(self.word)?;
        }
        let bit = u64::from(self.cur.trailing_zeros());
        self.cur &= self.cur - 1;
        Some(self.word as u64 * 64 + bit)
    }
}

fn popcount(maps: &[Vec<u64>]) -> u64 {
    maps.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl<S: MigrationSource + ?Sized, W: Write> Engine<'_, S, W> {
    /// Harvest every range into `into` (overwriting), accumulating what
    /// was harvested for the clean-up.
    fn harvest(&mut self, into: &mut [Vec<u64>]) -> Result<(), MigrationError> {
        let t = Instant::now();
        let r = self.harvest_inner(into);
        self.clock.harvest += t.elapsed();
        r
    }

    fn harvest_inner(&mut self, into: &mut [Vec<u64>]) -> Result<(), MigrationError> {
        for ((range, bits), acc) in self.layout.ranges.iter().zip(into.iter_mut()).zip(self.undo.harvested.iter_mut()) {
            bits.fill(0);
            self.source.harvest(range, bits).map_err(MigrationError::Source)?;
            trim_bitmap(bits, range.pages());
            for (a, b) in acc.iter_mut().zip(bits.iter()) {
                *a |= *b;
            }
        }
        Ok(())
    }

    /// Send the pages set in `maps`; returns (pages, zero pages).
    fn send(&mut self, round: u64, maps: &[Vec<u64>]) -> Result<(u64, u64), MigrationError> {
        let t = Instant::now();
        let r = self.send_inner(round, maps);
        self.clock.send += t.elapsed();
        r
    }

    fn send_inner(&mut self, round: u64, maps: &[Vec<u64>]) -> Result<(u64, u64), MigrationError> {
        self.w.record(tag::ROUND, round, &[]).map_err(wire::send_err)?;
        let (mut pages, mut zeros) = (0u64, 0u64);
        let start = Instant::now();
        let start_bytes = self.w.bytes();
        let max_run = self.w.max_run_pages() as u64;
        for (range, bits) in self.layout.ranges.iter().zip(maps) {
            // Runs of consecutive dirty pages, at most `max_run` long: one
            // read and (where not zero) one record each.
            let mut run: Option<(u64, u64)> = None;
            let mut runs = BitRuns::new(bits);
            loop {
                let next = runs.next();
                let flush = match (run, next) {
                    (Some((first, n)), Some(p)) if p == first + n && n < max_run => {
                        run = Some((first, n + 1));
                        false
                    }
                    (Some(_), _) => true,
                    (None, _) => false,
                };
                if flush && let Some((first, n)) = run.take() {
                    let z = self.send_run(range.gpa + first * PAGE_SIZE, n)?;
                    pages += n;
                    zeros += z;
                    if let Some(bw) = self.config.max_bandwidth {
                        let due = (self.w.bytes() - start_bytes) as f64 / bw.max(1) as f64;
                        let el = start.elapsed().as_secs_f64();
                        if due > el {
                            std::thread::sleep(Duration::from_secs_f64(due - el));
                        }
                    }
                }
                match next {
                    Some(p) if run.is_none() => run = Some((p, 1)),
                    Some(_) => {}
                    None => break,
                }
            }
            self.w.end_zero_run().map_err(wire::send_err)?;
        }
        Ok((pages, zeros))
    }

    /// Send `n` pages from `gpa` (one range): the pages the source finds
    /// zero in place ([`MigrationSource::zero_mask`]) as zero records,
    /// each run of the others with one read into the batch buffer; returns
    /// how many were zero.
    ///
    /// Checking before copying loses nothing: the harvest that reported
    /// these pages cleared their dirty bits before the check, so a guest
    /// write racing it either lands before the check (the page is found
    /// non-zero and copied, or copied later still) or sets the bit again
    /// and the page goes in a later round (the final one runs paused).
    fn send_run(&mut self, gpa: u64, n: u64) -> Result<u64, MigrationError> {
        let t = Instant::now();
        let mask = if n <= 64 { self.source.zero_mask(gpa, n as usize).map_err(MigrationError::Source)? } else { None };
        self.clock.read += t.elapsed();
        let Some(mask) = mask else {
            return self.copy_run(gpa, n);
        };
        let mask = if n == 64 { mask } else { mask & ((1u64 << n) - 1) };
        let mut zeros = 0;
        let mut i = 0u64;
        while i < n {
            let z = mask >> i & 1 == 1;
            let mut j = i + 1;
            while j < n && (mask >> j & 1 == 1) == z {
                j += 1;
            }
            let at = gpa + i * PAGE_SIZE;
            if z {
                self.w.zeros(at, j - i).map_err(wire::send_err)?;
                zeros += j - i;
            } else {
                zeros += self.copy_run(at, j - i)?;
            }
            i = j;
        }
        Ok(zeros)
    }

    /// Send `n` pages from `gpa` (one range) with one read into the batch
    /// buffer; returns how many of the copies were zero.
    fn copy_run(&mut self, gpa: u64, n: u64) -> Result<u64, MigrationError> {
        let source = &mut *self.source;
        let read = &mut self.clock.read;
        self.w.pages(gpa, n as usize, |buf| {
            let t = Instant::now();
            let r = source.read_pages(gpa, buf).map_err(MigrationError::Source);
            *read += t.elapsed();
            r
        })
    }

    fn run(
        &mut self,
        r: &mut RecordReader<impl Read>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationSummary, MigrationError> {
        let t0 = Instant::now();
        let cpu0 = super::thread_cpu_time();
        let mut sum = MigrationSummary { guest_bytes: self.layout.bytes(), ..Default::default() };
        self.w.raw(&wire::encode_header(self.layout)).map_err(wire::send_err)?;
        self.w.flush().map_err(wire::send_err)?;
        let th = Instant::now();
        let ack = r.next("header ack");
        sum.timings.handshake_ms = ms(th.elapsed());
        match ack? {
            Record::HeaderAck(Ok(())) => {}
            Record::HeaderAck(Err((why, high, msg))) => return Err(refusal(why, high, msg)),
            Record::Refusal(why, msg) => return Err(refusal(why, 0, msg)),
            _ => return Err(MigrationError::Corrupt(CorruptKind::Unexpected("record other than the header ack"))),
        }

        // First pass: resident, then harvest, send the union.
        let mut send = empty_bitmaps(self.layout);
        let mut fresh = empty_bitmaps(self.layout);
        let tr = Instant::now();
        for (range, bits) in self.layout.ranges.iter().zip(send.iter_mut()) {
            self.source.resident(range, bits).map_err(MigrationError::Source)?;
            trim_bitmap(bits, range.pages());
        }
        sum.timings.resident_ms = ms(tr.elapsed());
        self.harvest(&mut fresh)?;
        for (s, f) in send.iter_mut().zip(&fresh) {
            for (a, b) in s.iter_mut().zip(f) {
                *a |= *b;
            }
        }
        sum.resident_pages = popcount(&send);
        let pre_start = Instant::now();
        let mut last_harvest = Instant::now();
        let (mut sent, mut zeros) = self.send(0, &send)?;
        sum.pages_sent += sent;
        sum.zero_pages += zeros;
        let mut round: u32 = 0;
        let mut high_count = 0u32;
        let mut bytes_before_round = 0u64;
        loop {
            let round_bytes = self.w.bytes() - bytes_before_round;
            bytes_before_round = self.w.bytes();
            self.harvest(&mut send)?;
            let now = Instant::now();
            let dirty = popcount(&send);
            let throughput = self.w.bytes() as f64 / pre_start.elapsed().as_secs_f64().max(1e-9);
            let dirty_rate = dirty as f64 / now.duration_since(last_harvest).as_secs_f64().max(1e-9);
            last_harvest = now;
            sum.dirty_rate = dirty_rate;
            sum.throughput = throughput;
            progress(&Progress {
                round,
                pages_sent: sent,
                total_pages_sent: sum.pages_sent,
                remaining_dirty: dirty,
                throughput,
                dirty_rate,
                throttle_pct: self.undo.throttle,
                paused: false,
            });
            let remaining = dirty * (PAGE_SIZE + wire::RECORD_HEADER as u64);
            if remaining as f64 <= throughput * self.config.downtime_limit.as_secs_f64() {
                sum.converged = true;
                break;
            }
            if round >= self.config.max_rounds {
                break;
            }
            if self.config.auto_converge {
                // QEMU: dirtied bytes above 50% of the bytes sent, twice
                // in a row, raise the throttle.
                if dirty * PAGE_SIZE > round_bytes / 2 {
                    high_count += 1;
                    if high_count >= 2 {
                        high_count = 0;
                        let next = if self.undo.throttle == 0 { 20 } else { (self.undo.throttle + 10).min(99) };
                        if next != self.undo.throttle && self.source.throttle(next).is_ok() {
                            self.undo.throttle = next;
                            sum.max_throttle_pct = sum.max_throttle_pct.max(next);
                        }
                    }
                } else {
                    high_count = 0;
                }
            }
            round += 1;
            (sent, zeros) = self.send(u64::from(round), &send)?;
            sum.pages_sent += sent;
            sum.zero_pages += zeros;
        }
        sum.rounds = round + 1;

        // Switch-over: pause, final harvest, pending and last pages.
        let tp = Instant::now();
        self.source.pause().map_err(MigrationError::Source)?;
        sum.timings.pause_ms = ms(tp.elapsed());
        let paused_at = Instant::now();
        let paused_wall = SystemTime::now();
        self.undo.paused = true;
        self.harvest(&mut fresh)?;
        for (s, f) in send.iter_mut().zip(&fresh) {
            for (a, b) in s.iter_mut().zip(f) {
                *a |= *b;
            }
        }
        (sent, zeros) = self.send(u64::from(round) + 1, &send)?;
        sum.pages_sent += sent;
        sum.zero_pages += zeros;
        sum.final_round_pages = sent;
        let ts = Instant::now();
        let blobs = self.source.state().map_err(MigrationError::Source)?;
        sum.timings.state_ms = ms(ts.elapsed());
        for blob in blobs {
            if blob.data.len() > wire::MAX_STATE_BLOB as usize {
                return Err(MigrationError::Invalid(format!("state blob of {} bytes", blob.data.len())));
            }
            sum.state_bytes += blob.data.len() as u64;
            self.w.state(&blob).map_err(wire::send_err)?;
        }
        self.w.record(tag::END, sum.pages_sent, &[]).map_err(wire::send_err)?;
        self.w.flush().map_err(wire::send_err)?;
        let ta = Instant::now();
        let ack = r.next("final ack");
        sum.timings.final_ack_wait_ms = ms(ta.elapsed());
        let resume_ns = match ack? {
            Record::FinalAck { resume_unix_ns } => resume_unix_ns,
            Record::Refusal(why, msg) => return Err(refusal(why, 0, msg)),
            _ => return Err(MigrationError::Corrupt(CorruptKind::Unexpected("record other than the final ack"))),
        };
        let acked = paused_at.elapsed();
        sum.pause_to_ack_ms = ms(acked);
        sum.downtime_ms = sum.pause_to_ack_ms;
        if self.config.shared_clock {
            let p = unix_ns(paused_wall);
            if let Some(d) = resume_ns.checked_sub(p)
                && d <= acked.as_nanos() as u64
            {
                sum.downtime_ms = d as f64 / 1e6;
                sum.downtime_shared_clock = true;
            }
        }
        sum.bytes_sent = self.w.bytes();
        sum.bytes_per_guest_byte = sum.bytes_sent as f64 / sum.guest_bytes.max(1) as f64;
        sum.total_ms = ms(t0.elapsed());
        let (send, read, write) = (self.clock.send, self.clock.read, self.w.write_time());
        sum.timings.harvest_ms = ms(self.clock.harvest);
        sum.timings.read_pages_ms = ms(read);
        sum.timings.socket_write_ms = ms(write);
        sum.timings.encode_ms = ms(send.saturating_sub(read).saturating_sub(write));
        sum.timings.cpu_ms = ms(super::thread_cpu_time().saturating_sub(cpu0));
        progress(&Progress {
            round: round + 1,
            pages_sent: sent,
            total_pages_sent: sum.pages_sent,
            remaining_dirty: 0,
            throughput: sum.throughput,
            dirty_rate: sum.dirty_rate,
            throttle_pct: self.undo.throttle,
            paused: true,
        });
        Ok(sum)
    }
}

fn refusal(why: Refusal, high: u32, msg: String) -> MigrationError {
    match why {
        Refusal::Version => MigrationError::VersionMismatch { ours: wire::VERSION, theirs: high },
        Refusal::PageSize => MigrationError::PageSizeMismatch { ours: PAGE_SIZE as u32, theirs: high },
        Refusal::Layout => MigrationError::LayoutMismatch(msg),
        _ => MigrationError::Refused(msg),
    }
}
