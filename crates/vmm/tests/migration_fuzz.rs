//! The decoder against hostile input: random bytes, every truncation and
//! single-bit flips of a valid stream, random acks to the source. Nothing
//! panics, every bad input is a typed error, a target never resumes on a
//! damaged stream, and a source never stays paused.

use std::io::Cursor;

use vmm::migration::fake::{FakeSource, FakeTarget, Residency};
use vmm::migration::wire::{self, tag};
use vmm::migration::{
    Layout, MemRange, MigrationSource, PAGE_SIZE, RangeKind, SourceConfig, StateBlob, StateKind, TargetConfig, receive,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn small_stream() -> (Vec<u8>, Vec<u8>) {
    let layout = Layout {
        ranges: vec![
            MemRange { gpa: 0, len: 64 << 10, kind: RangeKind::Ram },
            MemRange { gpa: 1 << 30, len: 8 << 10, kind: RangeKind::Device },
        ],
    };
    let mut src = FakeSource::new(layout, Residency::Populated);
    src.fill(|gpa, buf| {
        buf[7] = (gpa >> 12) as u8 | 0x80;
        (gpa >> 12) % 3 != 2
    });
    src.write(0x3000, 0, &[0; 8]);
    src.set_state(vec![StateBlob { kind: StateKind::Vcpu, instance: 0, data: vec![9; 40] }]);
    let mut acks = wire::encode_header_ack(Ok(()));
    acks.extend(wire::encode_record(tag::FINAL_ACK, 1, &[]));
    let mut out = Vec::new();
    vmm::migration::migrate(&mut src, Cursor::new(acks), &mut out, &SourceConfig::default(), &mut |_| {})
        .expect("capture");
    (out, src.snapshot())
}

fn feed(bytes: &[u8]) -> (bool, FakeTarget) {
    let mut tgt = FakeTarget::new();
    let ok = receive(&mut tgt, Cursor::new(bytes), &mut Vec::new(), &TargetConfig { buffer_bytes: 4096 }).is_ok();
    (ok, tgt)
}

#[test]
fn valid_stream_is_accepted() {
    let (s, mem) = small_stream();
    let (ok, tgt) = feed(&s);
    assert!(ok && tgt.resumed());
    let (x, y) = (&tgt.snapshot(), &mem);
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
}

#[test]
fn every_truncation_is_an_error() {
    let (s, _) = small_stream();
    for cut in 0..s.len() {
        let (ok, tgt) = feed(&s[..cut]);
        assert!(!ok && !tgt.resumed(), "cut {cut}");
    }
}

#[test]
fn every_single_bit_flip_is_an_error() {
    let (s, _) = small_stream();
    let mut rng = Rng(0x1234_5678);
    // Every bit of the header and the first records, then random bits.
    let mut positions: Vec<usize> = (0..(400 * 8).min(s.len() * 8)).collect();
    positions.extend((0..3000).map(|_| (rng.next() % (s.len() as u64 * 8)) as usize));
    for bit in positions {
        let mut d = s.clone();
        d[bit / 8] ^= 1 << (bit % 8);
        let (ok, tgt) = feed(&d);
        assert!(!ok && !tgt.resumed(), "bit {bit}");
    }
}

#[test]
fn random_and_spliced_input_never_panics() {
    let (s, _) = small_stream();
    let mut rng = Rng(42);
    for i in 0..3000 {
        let len = (rng.next() % 9000) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if i % 2 == 0 {
            // A valid prefix, then garbage or random records.
            let cut = (rng.next() as usize) % s.len();
            let mut p = s[..cut].to_vec();
            if i % 4 == 0 {
                let t = (rng.next() % 20) as u8;
                let arg = rng.next() % (2 << 30);
                let pl: Vec<u8> = (0..rng.next() % 5000).map(|_| rng.next() as u8).collect();
                p.extend(wire::encode_record(t, arg, &pl));
            }
            p.extend(d);
            d = p;
        }
        let (_, tgt) = feed(&d);
        let _ = tgt.resumed();
    }
}

#[test]
fn well_formed_but_wrong_records_are_refused() {
    let layout = Layout { ranges: vec![MemRange { gpa: 0, len: 8 * PAGE_SIZE, kind: RangeKind::Ram }] };
    let base = wire::encode_header(&layout);
    let cases: Vec<Vec<u8>> = vec![
        wire::encode_record(tag::PAGE, 8 * PAGE_SIZE, &[1; 4096]),
        wire::encode_record(tag::PAGE, 17, &[1; 4096]),
        wire::encode_record(tag::PAGE, 0, &[1; 100]),
        wire::encode_record(tag::ZERO, 4 * PAGE_SIZE, &5u64.to_le_bytes()),
        wire::encode_record(tag::ZERO, 0, &0u64.to_le_bytes()),
        wire::encode_record(tag::ZERO, 0, &u64::MAX.to_le_bytes()),
        wire::encode_record(tag::ZERO, u64::MAX - 4095, &1u64.to_le_bytes()),
        wire::encode_record(tag::STATE, 0xdead << 32, &[]),
        wire::encode_record(tag::END, 1, &[]),
        wire::encode_record(tag::FINAL_ACK, 0, &[]),
        wire::encode_record(99, 0, &[]),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let mut d = base.clone();
        d.extend(c);
        let (ok, tgt) = feed(&d);
        assert!(!ok && !tgt.resumed(), "case {i}");
    }
}

/// Random bytes as the target's answers: the source fails cleanly and is
/// never left paused.
#[test]
fn random_acks_to_the_source() {
    let layout = Layout { ranges: vec![MemRange { gpa: 0, len: 16 * PAGE_SIZE, kind: RangeKind::Ram }] };
    let mut src = FakeSource::new(layout, Residency::Populated);
    src.fill(|_, b| {
        b[0] = 1;
        true
    });
    let mut rng = Rng(7);
    for i in 0..500 {
        let mut acks = if i % 2 == 0 { wire::encode_header_ack(Ok(())) } else { Vec::new() };
        acks.extend((0..rng.next() % 64).map(|_| rng.next() as u8));
        let r = vmm::migration::migrate(
            &mut src,
            Cursor::new(acks),
            std::io::sink(),
            &SourceConfig::default(),
            &mut |_| {},
        );
        if r.is_ok() {
            src.resume().expect("resume");
        }
        assert!(!src.is_paused());
    }
}

/// Guards **the end record's page count**: a stream with one page record
/// cut out (every record still well-formed) is refused, never resumed.
/// Without the count check the target would resume with a page missing.
#[test]
fn dropped_page_record_is_detected() {
    let (s, _) = small_stream();
    let hdr = wire::encode_header(&Layout {
        ranges: vec![
            MemRange { gpa: 0, len: 64 << 10, kind: RangeKind::Ram },
            MemRange { gpa: 1 << 30, len: 8 << 10, kind: RangeKind::Device },
        ],
    })
    .len();
    // Walk the records to find the offsets of the page records.
    let mut r = wire::RecordReader::new(Cursor::new(&s[hdr..]), 4096);
    let mut pages = Vec::new();
    loop {
        let at = r.bytes() as usize;
        match r.next("walk").expect("valid stream") {
            wire::Record::Page { .. } => pages.push((hdr + at, hdr + r.bytes() as usize)),
            wire::Record::End { .. } => break,
            _ => {}
        }
    }
    assert!(pages.len() > 3);
    for &(a, b) in [pages[0], pages[pages.len() / 2], pages[pages.len() - 1]].iter() {
        let mut d = s[..a].to_vec();
        d.extend_from_slice(&s[b..]);
        let mut tgt = FakeTarget::new();
        let e = receive(&mut tgt, Cursor::new(&d[..]), &mut Vec::new(), &TargetConfig::default()).expect_err("count");
        assert!(
            matches!(e, vmm::migration::MigrationError::Corrupt(vmm::migration::CorruptKind::CountMismatch { .. })),
            "{e}"
        );
        assert!(!tgt.resumed());
    }
}
