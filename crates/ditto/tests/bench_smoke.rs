//! `bench/run --smoke`: the benchmark script runs end to end against this
//! build of `ditto` (raw file, qemu-nbd, qemu quorum, ditto 1- and 2-replica
//! volumes on both I/O engines) and fails if any target fails.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn bench_smoke_runs_every_target() {
    for (tool, package) in [
        ("fio", "fio"),
        ("qemu-nbd", "qemu-utils"),
        ("python3", "python3"),
    ] {
        assert!(
            have(tool),
            "`{tool}` is missing: install the Debian package `{package}` (apt-get install {package})"
        );
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = repo.join("bench/run");
    let results = tempfile::tempdir().expect("temp dir");
    let json = results.path().join("smoke.json");
    let mut child = Command::new(&script)
        .arg("--smoke")
        .arg("--json-out")
        .arg(&json)
        .env("DITTO_BIN", env!("CARGO_BIN_EXE_ditto"))
        .current_dir(&repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    // The script stops its own children on SIGTERM; give it a generous bound
    // (a loaded CI machine is slower than the ~30 s it takes here).
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bench/run") {
            break s;
        }
        if Instant::now() > deadline {
            // Ask for a clean stop first, so the script stops what it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(20));
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "bench/run --smoke did not finish in 300 s\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().expect("collect output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "bench/run --smoke failed with {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("results JSON written"))
            .expect("results JSON parses");
    let runs = doc["runs"].as_array().expect("runs");
    for target in ["raw", "qemu-nbd", "qemu-quorum", "ditto-1r", "ditto-2r"] {
        assert!(
            runs.iter()
                .any(|r| r["kind"] == target && r["iops"].as_f64().unwrap_or(0.0) > 0.0),
            "no measurement for {target}\n--- stdout ---\n{stdout}"
        );
    }
    // Both engines run by default; each has its daemon's memory check.
    for engine in ["threadpool", "io_uring"] {
        assert!(
            doc["memory"][engine]["vm_hwm_kib"].as_u64().is_some(),
            "memory check for {engine} missing: {}",
            doc["memory"]
        );
    }
    assert!(stdout.contains("| memory"), "table has the memory row");
    assert!(stdout.contains("| rebuild"), "table has the rebuild row");
}
