//! Version 2's page-run records: the writer turns runs of pages (zero and
//! not, in any mix) into page-run and zero-run records that decode to the
//! same contents; a damaged or ill-placed run is refused, and the target
//! never resumes on one.

use std::io::Cursor;

use vmm::migration::fake::{FakeSource, FakeTarget, Residency};
use vmm::migration::wire::{self, Record, RecordReader, RecordWriter, tag};
use vmm::migration::{
    CorruptKind, Layout, MemRange, MigrationError, PAGE_SIZE, RangeKind, SourceConfig, TargetConfig, receive,
};

const PS: usize = PAGE_SIZE as usize;

/// A page whose content says which page it is (never zero).
fn page_of(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    p[..8].copy_from_slice(&(i + 1).to_le_bytes());
    p[PS - 1] = 0xa5;
    p
}

/// (gpa, contents) of each page decoded.
type Pages = Vec<(u64, Vec<u8>)>;
/// (tag, gpa, pages) of each record decoded.
type Recs = Vec<(u8, u64, u64)>;

/// Decode `bytes` (records only) into (gpa, contents) per page and the
/// record tags in order.
fn decode(bytes: &[u8]) -> (Pages, Recs) {
    let mut r = RecordReader::new(Cursor::new(bytes), 4096);
    let mut pages = Vec::new();
    let mut recs = Vec::new();
    loop {
        match r.next("test") {
            Ok(Record::Page { gpa, data }) => {
                recs.push((tag::PAGE, gpa, data.len() as u64 / PAGE_SIZE));
                for (i, p) in data.chunks_exact(PS).enumerate() {
                    pages.push((gpa + i as u64 * PAGE_SIZE, p.to_vec()));
                }
            }
            Ok(Record::Zero { gpa, count }) => {
                recs.push((tag::ZERO, gpa, count));
                for i in 0..count {
                    pages.push((gpa + i * PAGE_SIZE, vec![0u8; PS]));
                }
            }
            Ok(Record::End { .. }) => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("decode: {e}"),
        }
    }
    (pages, recs)
}

/// Every zero/non-zero pattern of short runs, after a pending zero run or
/// not, through a small batch (so runs also meet a full buffer): the
/// decoded pages are exactly the pages given, non-zero runs are one record
/// each, and adjacent zero pages (across calls too) are one zero record.
#[test]
fn runs_of_mixed_pages_round_trip() {
    for pattern in 0u32..(1 << 7) {
        for lead_zero in [false, true] {
            for batch in [16 << 10, 1 << 20] {
                let mut out = Vec::new();
                let mut expect = Vec::new();
                {
                    let mut w = RecordWriter::new(&mut out, batch);
                    let mut gpa = 0u64;
                    if lead_zero {
                        assert!(
                            w.page(gpa, |b: &mut [u8]| -> std::io::Result<()> {
                                b.fill(0);
                                Ok(())
                            })
                            .expect("page")
                        );
                        expect.push((gpa, vec![0u8; PS]));
                        gpa += PAGE_SIZE;
                    }
                    let n = 7.min(w.max_run_pages());
                    let contents: Vec<Vec<u8>> = (0..n as u64)
                        .map(|i| if pattern & (1 << i) != 0 { page_of(i) } else { vec![0u8; PS] })
                        .collect();
                    let zeros = w
                        .pages(gpa, n, |b: &mut [u8]| -> std::io::Result<()> {
                            for (d, c) in b.chunks_exact_mut(PS).zip(&contents) {
                                d.copy_from_slice(c);
                            }
                            Ok(())
                        })
                        .expect("pages");
                    assert_eq!(zeros, contents.iter().filter(|c| c.iter().all(|&b| b == 0)).count() as u64);
                    for (i, c) in contents.into_iter().enumerate() {
                        expect.push((gpa + i as u64 * PAGE_SIZE, c));
                    }
                    // A page after the run, so a trailing zero run is ended
                    // by a record rather than by the flush.
                    gpa += n as u64 * PAGE_SIZE;
                    w.page(gpa, |b: &mut [u8]| -> std::io::Result<()> {
                        b.copy_from_slice(&page_of(99));
                        Ok(())
                    })
                    .expect("page");
                    expect.push((gpa, page_of(99)));
                    w.record(tag::END, 0, &[]).expect("end");
                    w.flush().expect("flush");
                    let bytes = w.bytes();
                    drop(w);
                    assert_eq!(bytes, out.len() as u64, "bytes() counts every byte written");
                }
                let (pages, recs) = decode(&out);
                assert_eq!(pages, expect, "pattern {pattern:#b} lead_zero {lead_zero} batch {batch}");
                // Each maximal non-zero run of the call is one page record
                // (plus the page after it); zero pages in a row, across
                // calls too, are one zero record.
                let n = 7.min(RecordWriter::new(std::io::sink(), batch).max_run_pages());
                let segments = (0..n).filter(|&i| pattern & (1 << i) != 0 && (i == 0 || pattern & (1 << (i - 1)) == 0));
                let page_records = recs.iter().filter(|r| r.0 == tag::PAGE).count();
                assert_eq!(page_records, segments.count() + 1, "pattern {pattern:#b}: {recs:?}");
                for w in recs.windows(2) {
                    assert!(!(w[0].0 == tag::ZERO && w[1].0 == tag::ZERO), "pattern {pattern:#b}: {recs:?}");
                }
            }
        }
    }
}

/// `pages` refuses a run of 0 or more than `max_run_pages` pages without
/// writing anything, and a failing fill appends nothing.
#[test]
fn bad_runs_append_nothing() {
    let mut out = Vec::new();
    let mut w = RecordWriter::new(&mut out, 1 << 20);
    let max = w.max_run_pages();
    assert_eq!(max, wire::MAX_RUN_PAGES);
    let ok = |_: &mut [u8]| -> std::io::Result<()> { Ok(()) };
    assert!(w.pages(0, 0, ok).is_err());
    assert!(w.pages(0, max + 1, ok).is_err());
    let failing = |_: &mut [u8]| -> std::io::Result<()> { Err(std::io::Error::other("injected")) };
    assert!(w.pages(0, 3, failing).is_err());
    assert_eq!(w.bytes(), 0);
    w.flush().expect("flush");
    drop(w);
    assert!(out.is_empty());
}

fn layout(pages: u64) -> Layout {
    Layout { ranges: vec![MemRange { gpa: 0, len: pages * PAGE_SIZE, kind: RangeKind::Ram }] }
}

/// A migration of a guest with long non-zero runs broken by zero pages
/// sends runs (far fewer page records than pages) and arrives intact.
#[test]
fn engine_sends_runs_and_target_applies_them() {
    let mut src = FakeSource::new(layout(1000), Residency::Populated);
    src.fill(|gpa, b| {
        // Zero pages here and there, some in pairs; all resident.
        let p = gpa >> 12;
        if !(p % 37 == 5 || p % 37 == 6 || p % 101 == 0) {
            b[..8].copy_from_slice(&gpa.to_le_bytes());
            b[100] = 1;
        }
        true
    });
    let mem = src.snapshot();
    let mut acks = wire::encode_header_ack(Ok(()));
    acks.extend(wire::encode_record(tag::FINAL_ACK, 1, &[]));
    let mut out = Vec::new();
    let sum = vmm::migration::migrate(&mut src, Cursor::new(acks), &mut out, &SourceConfig::default(), &mut |_| {})
        .expect("migrate");
    assert_eq!(sum.pages_sent, 1000);
    let hdr = wire::encode_header(&layout(1000)).len();
    let mut r = RecordReader::new(Cursor::new(&out[hdr..]), 4096);
    let (mut page_records, mut pages) = (0u64, 0u64);
    loop {
        match r.next("walk").expect("valid") {
            Record::Page { data, .. } => {
                page_records += 1;
                pages += data.len() as u64 / PAGE_SIZE;
            }
            Record::End { .. } => break,
            _ => {}
        }
    }
    assert!(pages > 900 && page_records * 10 < pages, "{page_records} records for {pages} pages");
    let mut tgt = FakeTarget::new();
    let got = receive(&mut tgt, Cursor::new(&out[..]), &mut Vec::new(), &TargetConfig::default()).expect("receive");
    assert!(tgt.resumed());
    assert_eq!(got.pages + got.zero_pages, 1000);
    assert_eq!(got.pages, pages);
    let snap = tgt.snapshot();
    assert!(snap == mem, "{}", vmm::migration::fake::first_difference(&snap, &mem).unwrap_or_default());
}

fn feed(body: &[u8], pages: u64) -> (Result<(), MigrationError>, FakeTarget) {
    let mut d = wire::encode_header(&layout(pages));
    d.extend_from_slice(body);
    let mut tgt = FakeTarget::new();
    let r = receive(&mut tgt, Cursor::new(&d[..]), &mut Vec::new(), &TargetConfig { buffer_bytes: 4096 }).map(|_| ());
    (r, tgt)
}

/// A well-formed multi-page run is applied; the same run damaged (a bit of
/// its last page flipped), of a length that is not a whole number of pages,
/// longer than the bound, misaligned, or running past its range is refused
/// with the right error, and the target does not resume.
#[test]
fn corrupt_or_misplaced_runs_are_refused() {
    let run: Vec<u8> = (0..3).flat_map(page_of).collect();
    let end = |n: u64| wire::encode_record(tag::END, n, &[]);

    let mut ok = wire::encode_record(tag::PAGE, 2 * PAGE_SIZE, &run);
    ok.extend(end(3));
    let (r, tgt) = feed(&ok, 8);
    r.expect("a valid run");
    assert!(tgt.resumed());
    assert_eq!(&tgt.snapshot()[2 * PS..5 * PS], &run[..]);

    let mut flipped = wire::encode_record(tag::PAGE, 0, &run);
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    flipped.extend(end(3));
    let (r, tgt) = feed(&flipped, 8);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::BadChecksum { tag: tag::PAGE, .. }))), "{r:?}");
    assert!(!tgt.resumed());

    let mut ragged = wire::encode_record(tag::PAGE, 0, &run[..2 * PS + 100]);
    ragged.extend(end(3));
    let (r, tgt) = feed(&ragged, 8);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::BadLength { tag: tag::PAGE, .. }))), "{r:?}");
    assert!(!tgt.resumed());

    let long: Vec<u8> = (0..wire::MAX_RUN_PAGES as u64 + 1).flat_map(page_of).collect();
    let mut too_long = wire::encode_record(tag::PAGE, 0, &long);
    too_long.extend(end(wire::MAX_RUN_PAGES as u64 + 1));
    let (r, tgt) = feed(&too_long, 128);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::BadLength { tag: tag::PAGE, .. }))), "{r:?}");
    assert!(!tgt.resumed());

    let mut misaligned = wire::encode_record(tag::PAGE, 100, &run);
    misaligned.extend(end(3));
    let (r, tgt) = feed(&misaligned, 8);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::BadAddress { gpa: 100, count: 3 }))), "{r:?}");
    assert!(!tgt.resumed());

    // Pages 6, 7 are in the range, page 8 is not.
    let mut past = wire::encode_record(tag::PAGE, 6 * PAGE_SIZE, &run);
    past.extend(end(3));
    let (r, tgt) = feed(&past, 8);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::BadAddress { count: 3, .. }))), "{r:?}");
    assert!(!tgt.resumed());
    assert_eq!(tgt.discards(), 1, "the partial attempt is discarded");

    // The end record counts pages, not records: a run of 3 counted as 1
    // is refused.
    let mut miscounted = wire::encode_record(tag::PAGE, 0, &run);
    miscounted.extend(end(1));
    let (r, tgt) = feed(&miscounted, 8);
    assert!(matches!(r, Err(MigrationError::Corrupt(CorruptKind::CountMismatch { carried: 1, received: 3 }))), "{r:?}");
    assert!(!tgt.resumed());
}
