//! Chained migration A→B→C: a VM that arrived by migration and leaves
//! again delivers everything, including pages it received and never
//! touched (propolis 232).

use std::time::Duration;

use vmm::migration::fake::{FakeSource, FakeTarget, Residency, WriterConfig, loopback};
use vmm::migration::{Layout, MemRange, PAGE_SIZE, RangeKind, SourceConfig};

fn layout() -> Layout {
    Layout {
        ranges: vec![
            MemRange { gpa: 0, len: 4 << 20, kind: RangeKind::Ram },
            MemRange { gpa: 0xc000_0000, len: 128 << 10, kind: RangeKind::Device },
        ],
    }
}

fn hop(src: &mut FakeSource) -> FakeTarget {
    let cfg =
        SourceConfig { max_bandwidth: Some(400 << 20), downtime_limit: Duration::from_millis(2), ..Default::default() };
    let (res, tres, tgt) = loopback(src, FakeTarget::new(), &cfg);
    res.expect("migrate");
    tres.expect("receive");
    tgt
}

/// Guards **received pages count as written** (propolis 232), for both
/// residency models: B's guest never touches most of what it received;
/// C must still get it. Without `mark_received` in the target engine, B
/// reports nothing resident and C stays empty: this test fails.
#[test]
fn chain_delivers_untouched_received_pages() {
    for residency in [Residency::Populated, Residency::DirtyLog] {
        let mut a = FakeSource::new(layout(), residency);
        a.fill(|gpa, buf| {
            buf[..8].copy_from_slice(&(gpa * 3 + 1).to_le_bytes());
            (gpa / PAGE_SIZE) % 4 != 3
        });
        a.start_writer(WriterConfig { pages: (0..200).map(|i| i * PAGE_SIZE).collect(), rate: Some(30_000), seed: 1 });
        let b_tgt = hop(&mut a);
        a.stop_writer();
        let a_mem = a.snapshot();
        let (x, y) = (&b_tgt.snapshot(), &a_mem);
        assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());

        // B runs without touching memory, then migrates on.
        let mut b = b_tgt.into_source(residency);
        let c = hop(&mut b);
        let (x, y) = (&c.snapshot(), &a_mem);
        assert!(
            x == y,
            "{}; {}",
            vmm::migration::fake::first_difference(x, y).unwrap_or_default(),
            format_args!("{residency:?}: C lost pages B never touched")
        );
    }
}

/// A→B→C with guests writing on every hop, B touching only a few pages.
#[test]
fn chain_with_busy_guests_loses_nothing() {
    let mut a = FakeSource::new(layout(), Residency::Populated);
    a.fill(|gpa, buf| {
        buf[9] = (gpa >> 12) as u8;
        true
    });
    a.start_writer(WriterConfig { pages: (0..512).map(|i| i * PAGE_SIZE).collect(), rate: Some(40_000), seed: 2 });
    let b_tgt = hop(&mut a);
    a.stop_writer();
    let (x, y) = (&b_tgt.snapshot(), &a.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
    let mut b = b_tgt.into_source(Residency::Populated);
    b.start_writer(WriterConfig { pages: (100..140).map(|i| i * PAGE_SIZE).collect(), rate: Some(40_000), seed: 3 });
    let c = hop(&mut b);
    b.stop_writer();
    let mem = c.snapshot();
    let (x, y) = (&mem, &b.snapshot());
    assert!(x == y, "{}", vmm::migration::fake::first_difference(x, y).unwrap_or_default());
    b.check_ledger(&mem).expect("ledger");
}
