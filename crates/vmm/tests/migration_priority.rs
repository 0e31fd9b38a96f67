//! The migration threads' priority boost (`vmm::migration::priority`):
//! off by default, and when set, in force on the migrating thread for
//! the length of the transfer and undone after. In a test binary of its
//! own, as the boost is process-wide.

use vmm::migration::fake::{FakeSource, FakeTarget, Residency, loopback_with};
use vmm::migration::priority::{PriorityGuard, set_stream_boost, stream_boost};
use vmm::migration::{Layout, MemRange, PAGE_SIZE, RangeKind, SourceConfig};

/// The calling thread's nice value, from `/proc/thread-self/stat` (field
/// 19; the command name before it is in parentheses and may hold spaces).
fn nice() -> i32 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    let rest = &s[s.rfind(')').expect("comm") + 2..];
    rest.split_whitespace().nth(16).expect("nice field").parse().expect("nice value")
}

fn source() -> FakeSource {
    let layout = Layout { ranges: vec![MemRange { gpa: 0, len: 4 << 20, kind: RangeKind::Ram }] };
    let src = FakeSource::new(layout, Residency::Populated);
    src.fill(|gpa, buf| {
        buf[..8].copy_from_slice(&(gpa / PAGE_SIZE + 1).to_le_bytes());
        true
    });
    src
}

/// What nice values the source's progress callbacks saw (they run on the
/// migrating thread), for a migration with the current boost.
fn nice_during_migration() -> (i32, Vec<i32>, i32) {
    std::thread::spawn(|| {
        let before = nice();
        let mut src = source();
        let mut seen = Vec::new();
        let cfg = SourceConfig { shared_clock: true, ..Default::default() };
        let (res, tres, tgt) = loopback_with(&mut src, FakeTarget::new(), &cfg, &mut |_| seen.push(nice()));
        res.expect("migration");
        tres.expect("target");
        assert!(tgt.resumed());
        (before, seen, nice())
    })
    .join()
    .expect("migrating thread")
}

#[test]
fn the_stream_boost_is_off_by_default_and_in_force_only_while_streaming() {
    assert_eq!(stream_boost(), 0, "off by default");
    let (before, seen, after) = nice_during_migration();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|&n| n == before), "no boost asked: {seen:?} vs {before}");
    assert_eq!(after, before);

    set_stream_boost(7);
    assert_eq!(stream_boost(), 7);
    // Whether this process may raise a priority at all (root or
    // CAP_SYS_NICE); without it the stream runs unboosted, which is what
    // the migration must then show.
    let may = std::thread::spawn(|| PriorityGuard::boost(7).boosted()).join().unwrap();
    let (before, seen, after) = nice_during_migration();
    let want = if may { (before - 7).max(-20) } else { before };
    assert!(seen.iter().all(|&n| n == want), "boost 7 (allowed: {may}): {seen:?}, wanted {want}");
    assert_eq!(after, before, "the boost is undone when the transfer ends");
    set_stream_boost(0);
}
