//! Failed attempts: typed errors on both sides, the source keeps running
//! with every harvested dirty bit put back, the target discards, and a
//! second attempt delivers everything.

use std::io::{Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use vmm::migration::fake::{FakeSource, FakeTarget, Residency, WriterConfig, loopback};
use vmm::migration::wire::{self, Refusal, tag};
use vmm::migration::{
    CorruptKind, Layout, MemRange, MigrationError, MigrationSource, PAGE_SIZE, RangeKind, SourceConfig, TargetConfig,
    receive,
};

fn layout() -> Layout {
    Layout {
        ranges: vec![
            MemRange { gpa: 0, len: 4 << 20, kind: RangeKind::Ram },
            MemRange { gpa: 0x1000_0000, len: 256 << 10, kind: RangeKind::Device },
        ],
    }
}

fn guest(residency: Residency) -> FakeSource {
    let src = FakeSource::new(layout(), residency);
    src.fill(|gpa, buf| {
        let p = gpa / PAGE_SIZE;
        buf[..8].copy_from_slice(&(gpa ^ 0x5a5a).to_le_bytes());
        buf[100] = p as u8;
        !p.is_multiple_of(5)
    });
    src
}

fn cfg() -> SourceConfig {
    SourceConfig { batch_bytes: 64 << 10, ..Default::default() }
}

/// A complete valid stream, captured by running the source against canned
/// acks.
fn capture(src: &mut FakeSource) -> Vec<u8> {
    let mut acks = wire::encode_header_ack(Ok(()));
    acks.extend(wire::encode_record(tag::FINAL_ACK, 1, &[]));
    let mut out = Vec::new();
    vmm::migration::migrate(src, Cursor::new(acks), &mut out, &cfg(), &mut |_| {}).expect("capture");
    // A successful migration leaves the source paused; this one goes on.
    src.resume().expect("resume");
    out
}

/// Run a raw peer on a loopback socket: returns the source-side stream.
fn raw_peer(f: impl FnOnce(TcpStream) + Send + 'static) -> (TcpStream, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        f(s)
    });
    let s = TcpStream::connect(a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    (s, h)
}

fn second_attempt_delivers(src: &mut FakeSource) {
    let (res, tres, tgt) = loopback(src, FakeTarget::new(), &cfg());
    res.expect("second attempt");
    tres.expect("second target");
    let (x, y) = (&tgt.snapshot(), &src.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
}

/// A target of another version: the source gets `VersionMismatch` with the
/// target's version, keeps running, and a second attempt succeeds.
#[test]
fn version_mismatch_source_side() {
    let mut src = guest(Residency::Populated);
    let (s, h) = raw_peer(|mut s| {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).expect("header");
        s.write_all(&wire::encode_header_ack(Err((Refusal::Version, 7, "I speak 7")))).expect("ack");
    });
    let e = vmm::migration::migrate(&mut src, &s, &s, &cfg(), &mut |_| {}).expect_err("must fail");
    h.join().expect("peer");
    assert!(matches!(e, MigrationError::VersionMismatch { ours: wire::VERSION, theirs: 7 }), "{e}");
    assert!(!src.is_paused());
    second_attempt_delivers(&mut src);
}

/// A stream of another version (here version 1, whose page records carry
/// one page each) reaching our target: typed error, refusal ack carrying
/// our version, nothing prepared.
#[test]
fn version_mismatch_target_side() {
    assert_eq!(wire::VERSION, 2);
    let stream = wire::encode_header_with(1, 4096, &layout());
    let mut tgt = FakeTarget::new();
    let mut answer = Vec::new();
    let e = receive(&mut tgt, Cursor::new(stream), &mut answer, &TargetConfig::default()).expect_err("must fail");
    assert!(matches!(e, MigrationError::VersionMismatch { ours: 2, theirs: 1 }), "{e}");
    assert!(!tgt.prepared());
    let mut r = wire::RecordReader::new(Cursor::new(answer), 4096);
    match r.next("ack").expect("ack") {
        wire::Record::HeaderAck(Err((Refusal::Version, 2, _))) => {}
        other => panic!("{other:?}"),
    }
    let stream = wire::encode_header_with(wire::VERSION, 8192, &layout());
    let e = receive(&mut tgt, Cursor::new(stream), &mut Vec::new(), &TargetConfig::default()).expect_err("page size");
    assert!(matches!(e, MigrationError::PageSizeMismatch { ours: 4096, theirs: 8192 }), "{e}");
}

/// A target that expects another layout refuses it; the source gets
/// `LayoutMismatch`, keeps running, and a second attempt succeeds.
#[test]
fn layout_mismatch() {
    let mut src = guest(Residency::Populated);
    let mut other = layout();
    other.ranges[0].len = 8 << 20;
    let (res, tres, tgt) = loopback(&mut src, FakeTarget::expecting(other), &cfg());
    assert!(matches!(res, Err(MigrationError::LayoutMismatch(_))), "{res:?}");
    assert!(matches!(tres, Err(MigrationError::LayoutMismatch(_))), "{tres:?}");
    assert!(!tgt.resumed() && !src.is_paused());
    second_attempt_delivers(&mut src);
}

/// Every prefix of a valid stream is refused as truncated (mid-record) or
/// closed (at a record boundary); the target discards and never resumes.
#[test]
fn truncated_stream() {
    let mut src = guest(Residency::Populated);
    let full = capture(&mut src);
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((64..full.len()).step_by(997));
    cuts.push(full.len() - 1);
    let (mut trunc, mut closed) = (0, 0);
    for cut in cuts {
        let mut tgt = FakeTarget::new();
        let e = receive(&mut tgt, Cursor::new(&full[..cut]), &mut Vec::new(), &TargetConfig::default())
            .expect_err("truncated");
        match e {
            MigrationError::Truncated { .. } => trunc += 1,
            MigrationError::PeerClosed { .. } => closed += 1,
            e => panic!("cut {cut}: {e}"),
        }
        assert!(!tgt.resumed(), "cut {cut}");
    }
    assert!(trunc > 0 && closed > 0);
    let mut tgt = FakeTarget::new();
    receive(&mut tgt, Cursor::new(&full[..]), &mut Vec::new(), &TargetConfig::default()).expect("full");
    let (x, y) = (&tgt.snapshot(), &src.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
}

/// A flipped byte in a page payload: `BadChecksum`; over TCP through a
/// corrupting proxy the source gets the target's refusal, resumes, and a
/// second attempt succeeds.
#[test]
fn corrupt_checksum() {
    let mut src = guest(Residency::Populated);
    let mut full = capture(&mut src);
    let hdr = wire::encode_header(&layout()).len();
    // First record is the round marker (20 bytes); then the first page.
    let at = hdr + 20 + 20 + 100;
    full[at] ^= 0x10;
    let mut tgt = FakeTarget::new();
    let e = receive(&mut tgt, Cursor::new(&full[..]), &mut Vec::new(), &TargetConfig::default()).expect_err("bad");
    assert!(matches!(e, MigrationError::Corrupt(CorruptKind::BadChecksum { tag: 1, .. })), "{e}");
    assert!(!tgt.resumed() && tgt.discards() == 1);

    // Through a proxy that flips one byte of the 50th KiB.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut tgt = FakeTarget::new();
        let r = receive(&mut tgt, &s, &s, &TargetConfig::default());
        (r, tgt)
    });
    let (up, proxy) = raw_peer(move |down| {
        let target = TcpStream::connect(a).expect("proxy connect");
        let mut t2 = target.try_clone().expect("clone");
        let mut d2 = down.try_clone().expect("clone");
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut t2, &mut d2);
            let _ = d2.shutdown(std::net::Shutdown::Write);
        });
        let mut buf = vec![0u8; 8192];
        let mut n = 0usize;
        let (mut down, mut target) = (down, target);
        loop {
            let k = match down.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => k,
            };
            if n <= 50_000 && n + k > 50_000 {
                buf[50_000 - n] ^= 1;
            }
            n += k;
            if target.write_all(&buf[..k]).is_err() {
                break;
            }
        }
        let _ = target.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    });
    let e = vmm::migration::migrate(&mut src, &up, &up, &cfg(), &mut |_| {}).expect_err("corrupted");
    drop(up);
    let (tr, tgt) = t.join().expect("target");
    proxy.join().expect("proxy");
    assert!(matches!(tr, Err(MigrationError::Corrupt(CorruptKind::BadChecksum { .. }))), "{tr:?}");
    assert!(!tgt.resumed());
    assert!(matches!(e, MigrationError::Refused(_)) || e.is_peer_gone(), "{e}");
    assert!(!src.is_paused());
    second_attempt_delivers(&mut src);
}

/// Guards **put back on failure** (propolis 387/616/682): a source whose
/// residency is its dirty log fails half-way (the target closes the
/// connection after 1 MiB); the guest writes nothing more, so only the
/// put-back bits make the second attempt deliver the pages the first one
/// harvested. Without `set_dirty` in the clean-up this test fails.
#[test]
fn target_closed_mid_stream_nothing_lost() {
    let mut src = guest(Residency::DirtyLog);
    let before = src.dirty_pages();
    let (s, h) = raw_peer(|mut s| {
        let mut buf = vec![0u8; 1 << 20];
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).expect("magic");
        let mut rest = vec![0u8; u32::from_le_bytes(hdr[12..16].try_into().unwrap()) as usize + 4];
        s.read_exact(&mut rest).expect("header");
        s.write_all(&wire::encode_header_ack(Ok(()))).expect("ack");
        s.read_exact(&mut buf).expect("1 MiB");
        // Dropped with unread data: the source sees a reset.
    });
    let e = vmm::migration::migrate(&mut src, &s, &s, &cfg(), &mut |_| {}).expect_err("killed");
    h.join().expect("peer");
    assert!(e.is_peer_gone(), "{e}");
    assert!(!src.is_paused());
    assert_eq!(src.dirty_pages(), before, "every harvested bit is back");
    second_attempt_delivers(&mut src);
}

/// The target fails a page write and closes; a busy source keeps running
/// (its writer goes on writing), and the second attempt loses nothing.
#[test]
fn target_fails_mid_stream_busy_source() {
    let mut src = guest(Residency::DirtyLog);
    src.start_writer(WriterConfig { pages: (0..300).map(|i| i * PAGE_SIZE).collect(), rate: Some(50_000), seed: 5 });
    let mut tgt = FakeTarget::new();
    tgt.fail_writes_after(200);
    let (res, tres, tgt) = loopback(&mut src, tgt, &cfg());
    assert!(res.is_err() && matches!(tres, Err(MigrationError::Target(_))), "{res:?} {tres:?}");
    assert!(!tgt.resumed() && tgt.discards() == 1);
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!src.is_paused() && src.writes() > w, "the guest runs on");
    let (res, tres, tgt) = loopback(&mut src, FakeTarget::new(), &cfg());
    res.expect("second");
    tres.expect("second target");
    src.stop_writer();
    let mem = tgt.snapshot();
    let (x, y) = (&mem, &src.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
    src.check_ledger(&mem).expect("ledger");
}

/// Guards **resume on failure after pause**: the target fails after the
/// end record (applying state), with the source paused awaiting the final
/// ack; the source must resume its vCPUs. Without the resume in the
/// clean-up this test fails.
#[test]
fn failure_after_pause_resumes_the_source() {
    let mut src = guest(Residency::DirtyLog);
    src.start_writer(WriterConfig { pages: (0..100).map(|i| i * PAGE_SIZE).collect(), rate: Some(20_000), seed: 9 });
    let mut tgt = FakeTarget::new();
    tgt.fail_apply_state();
    let (res, tres, tgt) = loopback(&mut src, tgt, &cfg());
    assert!(matches!(res, Err(MigrationError::Refused(_))), "{res:?}");
    assert!(matches!(tres, Err(MigrationError::Target(_))), "{tres:?}");
    assert!(!tgt.resumed() && !tgt.prepared());
    assert!(!src.is_paused());
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(20));
    assert!(src.writes() > w, "the guest runs on");
    let (res, _, tgt) = loopback(&mut src, FakeTarget::new(), &cfg());
    res.expect("second");
    src.stop_writer();
    let (x, y) = (&tgt.snapshot(), &src.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
}

/// The source fails reading a page: it sends an abort, the target
/// discards with `Aborted`, and the source's bits are back. Guards **the
/// target discards on failure** (without `discard` in `receive` this test
/// and the other `discards() == 1` checks fail) and, for a source whose
/// residency is its dirty log, **put back on failure**.
#[test]
fn source_failure_aborts_the_target() {
    let mut src = guest(Residency::DirtyLog);
    let before = src.dirty_pages();
    src.fail_reads_after(300);
    let (res, tres, tgt) = loopback(&mut src, FakeTarget::new(), &cfg());
    assert!(matches!(res, Err(MigrationError::Source(_))), "{res:?}");
    assert!(matches!(tres, Err(MigrationError::Aborted(_))), "{tres:?}");
    assert!(!tgt.resumed() && tgt.discards() == 1);
    assert_eq!(src.dirty_pages(), before);
    src.heal();
    second_attempt_delivers(&mut src);
}

/// Feeds `bytes` to `receive_tcp` into a fresh [`FakeTarget`] over a
/// loopback socket (the path that receives page runs in place): returns
/// its result and the target.
fn receive_over_tcp(bytes: Vec<u8>) -> (Result<vmm::migration::TargetSummary, MigrationError>, FakeTarget) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut tgt = FakeTarget::new();
        let r = vmm::migration::receive_tcp(&mut tgt, &s, &TargetConfig::default(), Some(Duration::from_secs(10)));
        (r, tgt)
    });
    let mut s = TcpStream::connect(a).expect("connect");
    // The target stops reading at an error and shuts the socket down:
    // the rest of the write may fail.
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut s, &mut std::io::sink());
    t.join().expect("target thread")
}

/// The offsets of the page records' payloads in a captured stream (after
/// the stream header), with their lengths.
fn page_payloads(full: &[u8]) -> Vec<(usize, usize)> {
    let mut at = wire::encode_header(&layout()).len();
    let mut out = Vec::new();
    while at + wire::RECORD_HEADER <= full.len() {
        let len = u32::from_le_bytes(full[at + 4..at + 8].try_into().unwrap()) as usize;
        if full[at] == tag::PAGE {
            out.push((at + wire::RECORD_HEADER, len));
        }
        at += wire::RECORD_HEADER + len;
    }
    out
}

/// Over TCP the target receives page runs in place (straight into its
/// memory, checked there): a valid stream arrives whole that way; a flipped
/// byte anywhere in a run's payload (the part read ahead into the buffer
/// and the part read in place) or in its header's address fails the
/// checksum, and a stream cut inside a payload is truncated; each failure
/// discards, never resumes.
#[test]
fn in_place_receive_checks_what_landed() {
    let mut src = guest(Residency::Populated);
    let full = capture(&mut src);
    let (ok, tgt) = receive_over_tcp(full.clone());
    let sum = ok.expect("valid stream");
    assert!(tgt.resumed());
    assert_eq!(tgt.in_place_pages(), sum.pages, "every page run was received in place");
    assert!(sum.pages > 100, "{sum:?}");
    let (x, y) = (&tgt.snapshot(), &src.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());

    let runs = page_payloads(&full);
    assert!(runs.len() > 4 && runs.iter().any(|&(_, n)| n > 4096), "{} runs", runs.len());
    let (first, mid) = (runs[0], runs[runs.len() / 2]);
    // Early in a payload (read ahead with its header), deep in it (read
    // in place), its last byte, and the header's address.
    for at in [first.0 + 3, mid.0 + mid.1 / 2 + 7, mid.0 + mid.1 - 1, mid.0 - wire::RECORD_HEADER + 9] {
        let mut bad = full.clone();
        bad[at] ^= 0x40;
        let (r, tgt) = receive_over_tcp(bad);
        let e = r.expect_err("corrupt");
        assert!(matches!(e, MigrationError::Corrupt(CorruptKind::BadChecksum { tag: 1, .. })), "byte {at}: {e}");
        assert!(!tgt.resumed() && tgt.discards() == 1 && !tgt.prepared(), "byte {at}");
    }
    for cut in [first.0 + 10, mid.0 + mid.1 / 2, mid.0 + mid.1 - 1] {
        let (r, tgt) = receive_over_tcp(full[..cut].to_vec());
        let e = r.expect_err("truncated");
        assert!(matches!(e, MigrationError::Truncated { .. }), "cut {cut}: {e}");
        assert!(!tgt.resumed() && tgt.discards() == 1, "cut {cut}");
    }
}

/// A target that fails a write mid-run declines to receive that run in
/// place, and the buffered path fails at the exact page, as before.
#[test]
fn in_place_receive_leaves_injected_write_failures_to_the_buffered_path() {
    let mut src = guest(Residency::Populated);
    let full = capture(&mut src);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut tgt = FakeTarget::new();
        tgt.fail_writes_after(70);
        let r = vmm::migration::receive_tcp(&mut tgt, &s, &TargetConfig::default(), Some(Duration::from_secs(10)));
        (r, tgt)
    });
    let mut s = TcpStream::connect(a).expect("connect");
    let _ = s.write_all(&full);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut s, &mut std::io::sink());
    let (r, tgt) = t.join().expect("target");
    assert!(matches!(r, Err(MigrationError::Target(_))), "{r:?}");
    assert!(tgt.in_place_pages() > 0 && tgt.in_place_pages() <= 70, "{}", tgt.in_place_pages());
    assert!(tgt.discards() == 1 && !tgt.resumed());
}
