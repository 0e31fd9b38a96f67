//! Migrate a 1 GiB fake guest over loopback TCP at three dirty rates, and
//! in the same run copy the same number of bytes over the same kind of
//! socket with plain `write_all`/`read` (the physical limit here).
//!
//! Memory: the plain copy runs first with two 1 GiB buffers, which are
//! dropped before the engine runs with a 1 GiB source and a 1 GiB target;
//! the target's memory is allocated once and reused (warm); one last
//! migration into fresh target memory, 12 s after the old one was freed,
//! is reported as the cold figure. Every page of
//! the source holds data except one in 16, which is zero.
//!
//! Besides criterion's times the bench prints, per dirty rate, the medians
//! of total time, downtime (pause on the source to resume on the target,
//! one clock), bytes sent per byte of guest memory and rounds, and the
//! engine's throughput as a fraction of the plain copy's.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use vmm::migration::fake::{FakeSource, FakeTarget, Residency, WriterConfig, loopback};
use vmm::migration::{Layout, MemRange, MigrationSource, MigrationSummary, PAGE_SIZE, RangeKind, SourceConfig};

const GUEST: u64 = 1 << 30;

static SUMMARIES: Mutex<Vec<(String, MigrationSummary)>> = Mutex::new(Vec::new());
static PLAIN: Mutex<Vec<f64>> = Mutex::new(Vec::new());

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// One plain copy of `src` into `dst` over a fresh loopback connection.
fn plain_copy(src: &[u8], dst: &mut [u8]) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut off = 0;
            while off < dst.len() {
                let end = (off + (1 << 20)).min(dst.len());
                match c.read(&mut dst[off..end]) {
                    Ok(0) => break,
                    Ok(k) => off += k,
                    Err(e) => panic!("{e}"),
                }
            }
            c.write_all(&[1]).expect("ack");
        });
        let t = Instant::now();
        let mut c = TcpStream::connect(a).expect("connect");
        for chunk in src.chunks(256 << 10) {
            c.write_all(chunk).expect("send");
        }
        let mut ack = [0u8; 1];
        c.read_exact(&mut ack).expect("ack");
        let el = t.elapsed();
        h.join().expect("receiver");
        el
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("migration_1GiB");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_secs(10)).throughput(Throughput::Bytes(GUEST));

    {
        let mut src = vec![0u8; GUEST as usize];
        for (i, p) in src.chunks_mut(PAGE_SIZE as usize).enumerate() {
            if i % 16 != 15 {
                p[..8].copy_from_slice(&(i as u64).to_le_bytes());
                p[2048] = 0xa5;
            }
        }
        let mut dst = vec![0u8; GUEST as usize];
        dst.fill(1);
        g.bench_function("plain_copy", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let d = plain_copy(&src, &mut dst);
                    PLAIN.lock().unwrap().push(d.as_secs_f64());
                    t += d;
                }
                t
            })
        });
    }

    let layout = Layout { ranges: vec![MemRange { gpa: 0, len: GUEST, kind: RangeKind::Ram }] };
    let mut src = FakeSource::new(layout, Residency::Populated);
    src.fill(|gpa, p| {
        let i = gpa / PAGE_SIZE;
        p[..8].copy_from_slice(&i.to_le_bytes());
        p[2048] = 0xa5;
        i % 16 != 15
    });
    let mut target = Some(FakeTarget::new());
    let cfg = SourceConfig { shared_clock: true, ..Default::default() };
    // (name, pages per second, hot set in pages)
    let rates: [(&str, Option<u64>, u64); 3] = [
        ("dirty_0", None, 0),
        ("dirty_low_40MBps", Some(10_000), 16_384),
        ("dirty_high_800MBps", Some(200_000), 65_536),
    ];
    for (name, rate, hot) in rates {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for i in 0..iters {
                    if let Some(rate) = rate {
                        src.start_writer(WriterConfig {
                            pages: (0..hot).map(|p| p * PAGE_SIZE).collect(),
                            rate: Some(rate),
                            seed: i + 1,
                        });
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let start = Instant::now();
                    let (res, tres, tgt) = loopback(&mut src, target.take().expect("target"), &cfg);
                    t += start.elapsed();
                    target = Some(tgt);
                    src.stop_writer();
                    let sum = res.expect("migrate");
                    tres.expect("receive");
                    src.resume().expect("resume");
                    SUMMARIES.lock().unwrap().push((name.to_string(), sum));
                }
                t
            })
        });
    }
    g.finish();

    // One migration into fresh target memory, after the old target's
    // memory has had time to go back to the outer hypervisor (DESIGN.md
    // §6: touching it again costs about 2.2 s per GiB here).
    drop(target);
    std::thread::sleep(Duration::from_secs(12));
    let (res, tres, _fresh) = loopback(&mut src, FakeTarget::new(), &cfg);
    let cold = res.expect("cold migrate");
    tres.expect("cold receive");

    let plain = median(PLAIN.lock().unwrap().clone());
    println!("\nmigration of a 1 GiB guest over loopback (medians; target memory warm)");
    println!("cold target (fresh memory, once): total {:.1} ms, downtime {:.2} ms", cold.total_ms, cold.downtime_ms);
    println!("plain copy: {:.1} ms, {:.2} GB/s", plain * 1e3, GUEST as f64 / plain / 1e9);
    // time_vs_plain: plain copy time / migration time for the same guest;
    // wire_vs_plain: the engine's bytes per second / the plain copy's.
    println!(
        "rate                 total_ms  downtime_ms  bytes/guest  rounds  final_pages  GB/s  time_vs_plain  wire_vs_plain"
    );
    let sums = SUMMARIES.lock().unwrap();
    for (name, _, _) in rates {
        let s: Vec<&MigrationSummary> = sums.iter().filter(|(n, _)| n == name).map(|(_, s)| s).collect();
        let total = median(s.iter().map(|s| s.total_ms).collect());
        let down = median(s.iter().map(|s| s.downtime_ms).collect());
        let bpg = median(s.iter().map(|s| s.bytes_per_guest_byte).collect());
        let rounds = median(s.iter().map(|s| f64::from(s.rounds)).collect());
        let fin = median(s.iter().map(|s| s.final_round_pages as f64).collect());
        let gbps = median(s.iter().map(|s| s.bytes_sent as f64 / (s.total_ms / 1e3) / 1e9).collect());
        println!(
            "{name:<20} {total:>8.1} {down:>12.2} {bpg:>12.3} {rounds:>7} {fin:>12} {gbps:>5.2} {:>14.2} {:>14.2}",
            plain * 1e3 / total,
            gbps / (GUEST as f64 / plain / 1e9)
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
