//! The target side: check the header, apply records, mark what arrived,
//! resume and ack; discard on any failure.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{CorruptKind, MigrationError};
use super::wire::{self, Record, RecordReader, Refusal, tag};
use super::{Layout, MigrationTarget, PAGE_SIZE, StateBlob, empty_bitmaps};

/// How the target reads the stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetConfig {
    /// The read buffer (bytes; 1 MiB).
    pub buffer_bytes: usize,
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig { buffer_bytes: 1 << 20 }
    }
}

/// What the target received, for `--json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetSummary {
    /// Pages applied from page records (a record carries a run of them).
    pub pages: u64,
    /// Zero pages applied (runs counted page by page).
    pub zero_pages: u64,
    /// Distinct pages received (and marked).
    pub distinct_pages: u64,
    /// Bytes read from the connection.
    pub bytes_received: u64,
    /// Round markers seen.
    pub rounds: u64,
    /// State blobs applied.
    pub state_blobs: u64,
    /// When the guest resumed here (ns since the Unix epoch).
    pub resume_unix_ns: u64,
    /// Whether the final ack was written to the connection (if not, the
    /// source will resume its copy: see the module's known gaps).
    pub ack_sent: bool,
    /// Where the time went.
    #[serde(default)]
    pub timings: TargetTimings,
}

/// Where a target's time went (ms, from `Instant` counters).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetTimings {
    /// Header read to the end record (everything below but `finish_ms`).
    pub total_ms: f64,
    /// [`MigrationTarget::prepare`].
    pub prepare_ms: f64,
    /// Socket reads (waiting for the source included).
    pub socket_read_ms: f64,
    /// Verifying record checksums.
    pub checksum_ms: f64,
    /// Writing pages into guest memory (for a run received in place: the
    /// copy of what the read buffer held of it and the target's
    /// bookkeeping; its socket reads and checksum are counted above).
    pub write_pages_ms: f64,
    /// Applying zero-page runs.
    pub zero_pages_ms: f64,
    /// Marking received pages, applying the state, resuming.
    pub finish_ms: f64,
    /// CPU time of the receiving thread from the header to the final ack
    /// ([`super::thread_cpu_time`]).
    #[serde(default)]
    pub cpu_ms: f64,
}

/// Receive a migration into `target` over a connection (`reader` and
/// `writer` are its two directions).
///
/// The header is checked first: a version, page size or layout the target
/// cannot take is refused with a typed answer to the source, and returned.
/// Every error after [`MigrationTarget::prepare`] succeeded calls
/// [`MigrationTarget::discard`] (and tells the source, if the connection
/// still works); the guest is resumed only after the end record arrived
/// with the right page count, every received page was marked and the state
/// applied.
///
/// After an error the caller must close the connection (or use
/// [`receive_tcp`], which does): a source still sending blocks on a full
/// socket buffer until it is closed.
pub fn receive<T: MigrationTarget + ?Sized, R: Read, W: Write>(
    target: &mut T,
    reader: R,
    writer: W,
    config: &TargetConfig,
) -> Result<TargetSummary, MigrationError> {
    receive_with(target, reader, writer, config, None)
}

/// [`receive`], with page payloads received in place from `fd` (the
/// descriptor `reader` reads) where the target takes them
/// ([`MigrationTarget::receive_pages`]).
fn receive_with<T: MigrationTarget + ?Sized, R: Read, W: Write>(
    target: &mut T,
    reader: R,
    mut writer: W,
    config: &TargetConfig,
    fd: Option<std::os::fd::RawFd>,
) -> Result<TargetSummary, MigrationError> {
    let cpu0 = super::thread_cpu_time();
    let mut r = RecordReader::new(reader, config.buffer_bytes);
    if let Some(fd) = fd {
        r.set_in_place(fd);
    }
    let layout = match r.header() {
        Ok(l) => l,
        Err(e) => {
            let answer = match &e {
                MigrationError::VersionMismatch { ours, .. } => Some((Refusal::Version, *ours)),
                MigrationError::PageSizeMismatch { ours, .. } => Some((Refusal::PageSize, *ours)),
                MigrationError::Corrupt(_) => Some((Refusal::Corrupt, 0)),
                _ => None,
            };
            if let Some((why, high)) = answer {
                let _ = writer.write_all(&wire::encode_header_ack(Err((why, high, &e.to_string()))));
                let _ = writer.flush();
            }
            return Err(e);
        }
    };
    let t0 = Instant::now();
    let prep = target.prepare(&layout);
    let prepare_ms = ms(t0.elapsed());
    if let Err(h) = prep {
        let _ = writer.write_all(&wire::encode_header_ack(Err((Refusal::Layout, 0, &h.to_string()))));
        let _ = writer.flush();
        return Err(MigrationError::LayoutMismatch(h.to_string()));
    }
    let res = (|| {
        writer.write_all(&wire::encode_header_ack(Ok(()))).map_err(wire::send_err)?;
        writer.flush().map_err(wire::send_err)?;
        apply(target, &layout, &mut r)
    })();
    let mut sum = match res {
        Ok(s) => s,
        Err(e) => {
            target.discard();
            if !e.is_peer_gone() && !matches!(e, MigrationError::Aborted(_)) {
                let why = match e {
                    MigrationError::Corrupt(_) => Refusal::Corrupt,
                    MigrationError::Target(_) => Refusal::Target,
                    _ => Refusal::Other,
                };
                let _ = writer.write_all(&wire::encode_refusal(why, 0, &e.to_string()));
                let _ = writer.flush();
            }
            return Err(e);
        }
    };
    sum.timings.prepare_ms = prepare_ms;
    sum.timings.total_ms = ms(t0.elapsed()) - sum.timings.finish_ms;
    sum.timings.socket_read_ms = ms(r.read_time());
    sum.timings.checksum_ms = ms(r.check_time());
    sum.bytes_received = r.bytes();
    sum.resume_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    sum.ack_sent = writer
        .write_all(&wire::encode_record(tag::FINAL_ACK, sum.resume_unix_ns, &[]))
        .and_then(|()| writer.flush())
        .is_ok();
    sum.timings.cpu_ms = ms(super::thread_cpu_time().saturating_sub(cpu0));
    Ok(sum)
}

/// [`receive`] over a TCP connection: sets a read timeout (a source that
/// stalls longer fails the attempt), and shuts the connection down on
/// failure, so that a source still sending fails at once instead of
/// blocking on a full socket buffer. Page payloads are received in place
/// where the target takes them ([`MigrationTarget::receive_pages`]): read
/// from the socket straight into guest memory and checked there, instead
/// of into the read buffer and copied (a bad checksum fails the attempt,
/// which discards what arrived).
pub fn receive_tcp<T: MigrationTarget + ?Sized>(
    target: &mut T,
    stream: &std::net::TcpStream,
    config: &TargetConfig,
    read_timeout: Option<std::time::Duration>,
) -> Result<TargetSummary, MigrationError> {
    stream.set_read_timeout(read_timeout).map_err(|error| MigrationError::Io { during: "socket setup", error })?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let _policy = super::priority::StreamGuard::enter(super::priority::Side::Target);
    let res = receive_with(target, stream, stream, config, Some(fd));
    if res.is_err() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    res
}

/// Apply records up to the end, mark, apply state, resume.
fn apply<T: MigrationTarget + ?Sized>(
    target: &mut T,
    layout: &Layout,
    r: &mut RecordReader<impl Read>,
) -> Result<TargetSummary, MigrationError> {
    let mut received = empty_bitmaps(layout);
    let mut blobs: Vec<StateBlob> = Vec::new();
    let mut sum = TargetSummary::default();
    let mut state_bytes = 0u64;
    let (mut write_t, mut zero_t) = (Duration::ZERO, Duration::ZERO);
    loop {
        if r.in_place()
            && let Some((gpa, len)) = r.peek_page("stream record")?
            && let Some((ri, idx)) = page_run(layout, gpa, len as u64 / PAGE_SIZE)
        {
            let (t, before) = (Instant::now(), r.read_time() + r.check_time());
            let mut got = None;
            let used = target
                .receive_pages(gpa, len, &mut |d| got = Some(r.page_in_place(d)))
                .map_err(MigrationError::Target)?;
            if used {
                got.unwrap_or_else(|| {
                    Err(MigrationError::Target(super::HostError::new(
                        "receive_pages",
                        "took the run but did not read it",
                    )))
                })?;
                // The socket reads and the checksum are counted apart.
                write_t += t.elapsed().saturating_sub(r.read_time() + r.check_time() - before);
                let count = len as u64 / PAGE_SIZE;
                for p in idx..idx + count {
                    received[ri][(p / 64) as usize] |= 1 << (p % 64);
                }
                sum.pages += count;
                continue;
            }
            // Declined: read into the buffer from now on.
            r.stop_in_place();
        }
        match r.next("stream record")? {
            Record::Page { gpa, data } => {
                // The reader checked the length: 1 to MAX_RUN_PAGES pages.
                let count = data.len() as u64 / PAGE_SIZE;
                let bad = MigrationError::Corrupt(CorruptKind::BadAddress { gpa, count });
                if gpa % PAGE_SIZE != 0 {
                    return Err(bad);
                }
                let (ri, idx) = layout.locate(gpa).ok_or(bad)?;
                if count > layout.ranges[ri].pages() - idx {
                    return Err(MigrationError::Corrupt(CorruptKind::BadAddress { gpa, count }));
                }
                let t = Instant::now();
                target.write_pages(gpa, data).map_err(MigrationError::Target)?;
                write_t += t.elapsed();
                for p in idx..idx + count {
                    received[ri][(p / 64) as usize] |= 1 << (p % 64);
                }
                sum.pages += count;
            }
            Record::Zero { gpa, count } => {
                let bad = MigrationError::Corrupt(CorruptKind::BadAddress { gpa, count });
                if gpa % PAGE_SIZE != 0 {
                    return Err(bad);
                }
                let (ri, idx) = layout.locate(gpa).ok_or(bad)?;
                let range = &layout.ranges[ri];
                if count > range.pages() - idx {
                    return Err(MigrationError::Corrupt(CorruptKind::BadAddress { gpa, count }));
                }
                let t = Instant::now();
                target.zero_pages(gpa, count).map_err(MigrationError::Target)?;
                zero_t += t.elapsed();
                for p in idx..idx + count {
                    received[ri][(p / 64) as usize] |= 1 << (p % 64);
                }
                sum.zero_pages += count;
            }
            Record::State(b) => {
                state_bytes += b.data.len() as u64;
                if state_bytes > wire::MAX_STATE_TOTAL {
                    return Err(MigrationError::Corrupt(CorruptKind::BadLength { tag: tag::STATE, len: state_bytes }));
                }
                blobs.push(b);
            }
            Record::Round(_) => sum.rounds += 1,
            Record::End { pages } => {
                let got = sum.pages + sum.zero_pages;
                if pages != got {
                    return Err(MigrationError::Corrupt(CorruptKind::CountMismatch { carried: pages, received: got }));
                }
                break;
            }
            Record::Abort(m) => return Err(MigrationError::Aborted(m)),
            Record::HeaderAck(_) | Record::FinalAck { .. } | Record::Refusal(..) => {
                return Err(MigrationError::Corrupt(CorruptKind::Unexpected("an ack from the source")));
            }
        }
    }
    sum.timings.write_pages_ms = ms(write_t);
    sum.timings.zero_pages_ms = ms(zero_t);
    let tf = Instant::now();
    for (range, bits) in layout.ranges.iter().zip(&received) {
        sum.distinct_pages += bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        target.mark_received(range, bits).map_err(MigrationError::Target)?;
    }
    sum.state_blobs = blobs.len() as u64;
    target.apply_state(blobs).map_err(MigrationError::Target)?;
    target.resume().map_err(MigrationError::Target)?;
    sum.timings.finish_ms = ms(tf.elapsed());
    Ok(sum)
}

/// The range index and first page index of a run of `count` pages at
/// `gpa`, if it is page-aligned and lies inside one range.
fn page_run(layout: &Layout, gpa: u64, count: u64) -> Option<(usize, u64)> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let (ri, idx) = layout.locate(gpa)?;
    (count <= layout.ranges[ri].pages() - idx).then_some((ri, idx))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
