//! The `vmm` binary end to end.

use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

#[test]
fn inspect_dumps_the_builtin_layout_without_kvm() {
    let out = vmm().args(["inspect", "--leaves", "2"]).output().expect("run vmm");
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("mappings:") && s.contains("r-x") && s.contains("PML4E[  0]"), "{s}");
    assert!(s.contains("[P US NX]"), "read-only non-executable leaf not decoded: {s}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    for args in [&["run", "--vcpus", "0"][..], &["run", "--mem", "12Q"], &["run", "--duration", "-1s"]] {
        let out = vmm().args(args).output().expect("run vmm");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn short_run_reports_json() {
    if let Err(e) = vmm_kvm::kvm_available() {
        // Without KVM the binary must say so and fail, not panic.
        let out = vmm().args(["run", "--duration", "100ms"]).output().expect("run vmm");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("KVM is not available") && !err.contains("panicked"), "{err}");
        eprintln!("SKIPPED the KVM part: {e}");
        return;
    }
    let out = vmm()
        .args(["run", "--mem", "8M", "--vcpus", "2", "--duration", "300ms", "--rounds", "2", "--json"])
        .output()
        .expect("run vmm");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&s).expect("JSON");
    assert_eq!(v["ok"], true);
    assert_eq!(v["rounds"].as_array().map(|r| r.len()), Some(3));
    assert!(v["nested_faults"].as_u64().unwrap_or(0) > 0);
    assert!(v["invalidation_mode"].is_string());
}

/// Every refused argument exits with status 2 (a usage error, found while
/// parsing, before any set-up) and a message that names what is expected,
/// never parser internals or a Rust debug value.
#[test]
fn hostile_arguments_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--vcpus", "0"], "vCPU count"),
        (&["run", "--vcpus", "-1"], "cannot be negative"),
        (&["run", "--vcpus", "65"], "from 1 to 64"),
        (&["run", "--mem", "-1"], "cannot be negative"),
        (&["run", "--mem", "12Q"], "unknown size suffix"),
        (&["run", "--mem", "1"], "multiple of 4 KiB"),
        (&["run", "--mem", "0"], "multiple of 4 KiB"),
        (&["run", "--duration=nan"], "bad duration"),
        (&["run", "--duration", "1e-3"], "bad duration"),
        (&["run", "--duration", "-1s"], "cannot be negative"),
        (&["run", "--duration", "inf"], "bad duration"),
        (&["run", "--fault-around", "0"], "fault-around"),
        (&["run", "--fault-around", "100000"], "fault-around"),
        (&["run", "--fault-around", "3"], "power of two"),
        (&["run", "--write-pct", "101"], "write percentage"),
        (&["run", "--rounds", "-3"], "cannot be negative"),
        (&["run", "--seed", "0xzz"], "hexadecimal"),
        (&["bench", "--mem", "0"], "multiple of 4 KiB"),
        (&["bench", "--mem", "1"], "multiple of 4 KiB"),
        (&["inspect", "--leaves", "-1"], "cannot be negative"),
    ];
    for (args, expect) in cases {
        let out = vmm().args(*args).output().expect("run vmm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
        for internal in ["panicked", "ParseFloatError", "ParseIntError", "Invalid(", "unexpected argument"] {
            assert!(!err.contains(internal), "{args:?}: {err}");
        }
    }
}

/// SIGTERM during a run stops it cleanly: the summary is printed, every
/// check ran, and the exit status says it was interrupted (130).
#[test]
fn sigterm_stops_a_run_cleanly() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: needs /dev/kvm ({e})");
        return;
    }
    let child = vmm()
        .args(["run", "--mem", "8M", "--duration", "60s", "--rounds", "0", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc_kill(child.id() as i32, 15) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().expect("wait vmm");
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{s}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&s).expect("JSON summary");
    assert_eq!(v["ok"], true);
    assert_eq!(v["interrupted"], true);
    assert!(v["elapsed_s"].as_f64().unwrap() < 30.0);
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Decodes a PNG and checks every pixel against what the guest's
/// framebuffer program draws at that index.
fn assert_png_is_the_guest_drawing(path: &std::path::Path, width: u32, height: u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).expect("open PNG")));
    let mut r = dec.read_info().expect("PNG header");
    let mut buf = vec![0u8; r.output_buffer_size().expect("size")];
    let info = r.next_frame(&mut buf).expect("PNG frame");
    assert_eq!((info.width, info.height, info.color_type), (width, height, png::ColorType::Rgb));
    for i in 0..u64::from(width * height) {
        let want = vmm::guest::fb_pixel(i);
        let want = [(want >> 16) as u8, (want >> 8) as u8, want as u8];
        let at = (i * 3) as usize;
        assert_eq!(buf[at..at + 3], want, "pixel {i}");
    }
}

/// `vmm run --name NAME` is reachable while it runs: `vmm inspect NAME`
/// shows its segments, mappings and vCPU registers; `vmm screenshot NAME`
/// maps its framebuffer by name from this other process and writes a PNG
/// whose pixels are what the guest was asked to draw; SIGTERM stops it
/// cleanly and its nodes are removed.
#[test]
fn named_vm_is_inspected_and_screenshot_from_another_process() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: needs /dev/kvm ({e})");
        return;
    }
    let name = format!("cli-{}", std::process::id());
    let child = vmm()
        .args(["run", "--name", &name, "--mem", "16M", "--duration", "60s", "--rounds", "0", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm run");
    let t = std::time::Instant::now();
    // Wait until the guest has placed, drawn and moved its framebuffer.
    let inspect = loop {
        let out = vmm().args(["inspect", &name]).output().expect("vmm inspect");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && s.contains("5 BAR moves") {
            break s;
        }
        assert!(t.elapsed().as_secs() < 30, "VM not reachable or not drawing: {s}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for want in [
        "segments:",
        "devmem \"bootrom\"",
        "devmem \"framebuffer\"",
        "segment mappings:",
        "vCPU 0: rip",
        "vCPU 1: rip",
        "PML4E[",
    ] {
        assert!(inspect.contains(want), "{want:?} missing from:\n{inspect}");
    }
    let png = std::env::temp_dir().join(format!("{name}.png"));
    let out = vmm().args(["screenshot", &name, png.to_str().unwrap()]).output().expect("vmm screenshot");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_png_is_the_guest_drawing(&png, 320, 200);
    let _ = std::fs::remove_file(&png);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc_kill(child.id() as i32, 15) }, 0);
    let out = child.wait_with_output().expect("wait vmm run");
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{s}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&s).expect("JSON summary");
    assert_eq!(v["ok"], true, "{s}");
    assert_eq!(v["framebuffer"]["bad_pixels"], 0);
    assert!(v["mmio_exits"].as_u64().unwrap() > 0 && v["emulated"].as_u64().unwrap() > 0);
    let node = v["framebuffer"]["node"].as_str().unwrap();
    assert!(!std::path::Path::new(node).exists(), "node removed after the run");
    let out = vmm().args(["inspect", &name]).output().expect("vmm inspect");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no running VM"));
}

/// `--screenshot` at the end of a run, and `--pin` of the vCPU threads.
#[test]
fn run_screenshot_and_pinning() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: needs /dev/kvm ({e})");
        return;
    }
    let png = std::env::temp_dir().join(format!("end-{}.png", std::process::id()));
    let out = vmm()
        .args(["run", "--mem", "8M", "--duration", "1s", "--rounds", "1", "--pin", "0", "--json"])
        .args(["--screenshot", png.to_str().unwrap()])
        .output()
        .expect("vmm run");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_png_is_the_guest_drawing(&png, 320, 200);
    let _ = std::fs::remove_file(&png);
    let v: serde_json::Value = serde_json::from_str(&s).expect("JSON");
    assert_eq!(v["host_cpus"], serde_json::json!([0, 0]), "both vCPU threads pinned to CPU 0: {s}");
    let out = vmm().args(["run", "--pin", "4095"]).output().expect("vmm run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

/// `vmm run --incoming` and `vmm run --migrate-to` in two processes over
/// loopback: the guest continues on the target and passes every check
/// there; both sides report in JSON.
#[test]
fn run_migrates_between_two_processes() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: {e}");
        return;
    }
    // A free port: bind, read it, let it go (the target binds it next).
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let at = format!("127.0.0.1:{port}");
    let common = ["run", "--vcpus", "2", "--mem", "16M", "--write-pct", "80", "--rounds", "2", "--json"];
    let target = vmm()
        .args(common)
        .args(["--duration", "500ms", "--incoming", &at])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn target");
    // Wait until it listens.
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(&at).is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the target never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // (That probe connection was the target's one accept: start again.)
    let target = {
        let out = target.wait_with_output().expect("target");
        assert!(!out.status.success(), "a target fed a closed connection resumed a guest");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("incoming migration") && !err.contains("panicked"), "{err}");
        vmm()
            .args(common)
            .args(["--duration", "500ms", "--incoming", &at])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn target")
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let src = vmm()
        .args(common)
        .args(["--duration", "3s", "--migrate-to", &at, "--migrate-after", "400ms"])
        .output()
        .expect("run source");
    let s = String::from_utf8_lossy(&src.stdout);
    assert!(src.status.success(), "{s}\n{}", String::from_utf8_lossy(&src.stderr));
    let v: serde_json::Value = serde_json::from_str(&s).expect("source JSON");
    assert_eq!(v["migrated"], true, "{s}");
    assert!(v["summary"]["downtime_ms"].as_f64().is_some_and(|d| d > 0.0), "{s}");
    assert!(v["summary"]["bytes_sent"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(!v["progress"].as_array().is_none_or(|p| p.is_empty()), "{s}");
    let out = target.wait_with_output().expect("target");
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{t}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&t).expect("target JSON");
    assert_eq!(v["guest"]["ok"], true, "{t}");
    assert_eq!(v["guest"]["vcpus"].as_array().map(|x| x.len()), Some(2), "{t}");
    assert!(v["received"]["pages"].as_u64().unwrap_or(0) > 0, "{t}");
}

/// `vmm run --reservoir` (swappable guest memory) with live migration: a
/// source whose 16 MiB guest runs over a 6 MiB reservoir (once refused)
/// migrates to a target with its own 8 MiB one; the guest passes every
/// check there (the swapping itself is checked by `vmm-kvm`'s migrate
/// tests).
#[test]
fn run_with_a_reservoir_migrates_between_two_processes() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: {e}");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let at = format!("127.0.0.1:{port}");
    let common = ["run", "--vcpus", "2", "--mem", "16M", "--write-pct", "80", "--rounds", "2", "--json"];
    let target = vmm()
        .args(common)
        .args(["--reservoir", "8M", "--duration", "500ms", "--incoming", &at])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn target");
    // No probe connection (the target accepts once): retry the source
    // while the target is not listening yet.
    let t0 = std::time::Instant::now();
    let src = loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let src = vmm()
            .args(common)
            .args(["--reservoir", "6M", "--duration", "3s", "--migrate-to", &at, "--migrate-after", "400ms"])
            .output()
            .expect("run source");
        let err = String::from_utf8_lossy(&src.stderr).to_lowercase();
        if src.status.success() || !err.contains("refused") || t0.elapsed() > std::time::Duration::from_secs(30) {
            break src;
        }
    };
    let s = String::from_utf8_lossy(&src.stdout);
    assert!(src.status.success(), "{s}\n{}", String::from_utf8_lossy(&src.stderr));
    let v: serde_json::Value = serde_json::from_str(&s).expect("source JSON");
    assert_eq!(v["migrated"], true, "{s}");
    let out = target.wait_with_output().expect("target");
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{t}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&t).expect("target JSON");
    assert_eq!(v["guest"]["ok"], true, "{t}");
    assert!(v["received"]["pages"].as_u64().unwrap_or(0) > 0, "{t}");
}

/// `vmm bench migrate --json` on a small guest: every case passes the
/// target's checks, and the figures the throughput target is judged by
/// (both plain-copy baselines, the memory-to-memory copy, CPU per byte of
/// the stream and of the plain copies) are there and plausible.
#[test]
fn bench_migrate_reports_both_baselines_and_cpu() {
    if let Err(e) = vmm_kvm::kvm_available() {
        eprintln!("SKIPPED: {e}");
        return;
    }
    let out = vmm()
        .args(["bench", "migrate", "--mem", "16M", "--write-pct", "0,80", "--runs", "1", "--warmup", "200ms", "--json"])
        .output()
        .expect("run vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let plain_cpu = j["plain_copy_median_cpu_ns_per_byte"].as_f64().expect("plain CPU");
    assert!(plain_cpu > 0.0 && j["plain_copy_median_bytes_per_s"].as_f64().expect("plain") > 0.0);
    // The memory-to-memory baseline: one copy after each plain copy.
    let mem = j["memory_copy_median_bytes_per_s"].as_f64().expect("memory copy");
    assert!(mem > 0.0 && j["memory_copy_median_cpu_ns_per_byte"].as_f64().expect("memory CPU") > 0.0);
    assert_eq!(j["memory_copy_bytes_per_s"].as_array().expect("memory copies").len(), 3);
    let cases = j["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for c in cases {
        assert_eq!(c["target_ok"], true, "{c}");
        assert!(c["throughput_vs_plain_copy"].as_f64().expect("ratio") > 0.0, "{c}");
        assert!(c["throughput_vs_loaded_plain_copy"].as_f64().expect("loaded ratio") > 0.0, "{c}");
        let vs_mem = c["throughput_vs_memory_copy"].as_f64().expect("memory ratio");
        let tput = c["throughput_bytes_per_s"].as_f64().expect("throughput");
        assert!((vs_mem - tput / mem).abs() < 1e-6 * vs_mem.max(1.0), "{c}");
        let guest_rate = c["guest_bytes_per_s"].as_f64().expect("guest rate");
        let total_s = c["total_ms"].as_f64().expect("total") / 1e3;
        assert!((guest_rate * total_s - j["guest_bytes"].as_f64().expect("guest bytes")).abs() < 1.0, "{c}");
        assert!((c["guest_rate_vs_memory_copy"].as_f64().expect("guest ratio") - guest_rate / mem).abs() < 1e-6, "{c}");
        let cpu = c["cpu_ns_per_byte"].as_f64().expect("CPU");
        assert!(cpu > 0.0 && c["source_timings"]["cpu_ms"].as_f64().expect("source CPU") > 0.0, "{c}");
        assert!(c["target_timings"]["cpu_ms"].as_f64().expect("target CPU") > 0.0, "{c}");
        let eff = c["cpu_efficiency_vs_plain_copy"].as_f64().expect("efficiency");
        assert!((eff - plain_cpu / cpu).abs() < 1e-6 * eff.max(1.0), "{c}");
        assert!(c["pages_sent"].as_u64().expect("pages") >= (16 << 20) / 4096, "{c}");
    }
}
