//! Real faults on NBD-backed replicas, end to end through the daemon.
//!
//! Each test runs a `ditto daemon` with a directory pool `a` and a pool `r`
//! on a remote NBD export served by nbdkit on a Unix socket in the test's
//! temporary directory (`-f --exit-with-parent`, killed on drop, like
//! `crates/ditto-engine/tests/nbd_replica.rs`). nbdkit filters inject the
//! faults a real remote disk shows:
//!
//! 1. `fio_survives_erroring_replica`: the `error` filter starts returning EIO
//!    on every request while fio writes with crc32c verification. fio sees
//!    no error, r is failed out (reason names the I/O error), the volume is
//!    degraded, a `replica_failed` event is recorded and the `event_program`
//!    ran for it. After the fault is gone, `replica readd` brings r back and
//!    the data areas of a and of the export are identical.
//! 2. `hanging_replica_is_failed_out_by_io_timeout`: the `delay` filter makes
//!    every write take 5 s; with `io_timeout_secs = 2` a client write
//!    completes long before that and r is failed ("did not answer within 2 s").
//!    After the server is back without the delay, a catch-up restores it.
//! 3. `replica_that_comes_back_catches_up_only_what_it_missed`: nbdkit killed
//!    while the volume serves, writes go on, nbdkit restarted on the same
//!    socket and file, `replica readd` copies exactly the two 1 MiB regions
//!    written while it was gone.
//! 4. `read_errors_are_served_from_the_other_replica`: only reads fail on r;
//!    every client read returns the right data, the failed regions are
//!    rewritten (`read_error_repaired`) and r stays in sync.
//! 5. `failed_dirty_map_clear_keeps_what_r_misses`: r gets EIO when the
//!    background clear of the dirty map writes to it (a's map is already
//!    cleared); a region rewritten while r is out must still be caught up
//!    after `volume stop` + `volume start` and `replica readd`.
//! 6. `hanging_reads_fail_the_replica_out`: reads on r never answer within
//!    `io_timeout_secs`; as documented for that setting, r must be failed out
//!    rather than make clients wait the timeout on every read that lands there.
//!
//! Needs nbdkit (Debian package nbdkit), fio, qemu-io (qemu-utils) and
//! nbdcopy (libnbd-bin). The tests of this file run one at a time (a mutex),
//! so their time bounds hold on a small machine.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tempfile::TempDir;

/// Volume size in every test.
const VOL_SIZE: u64 = 64 * MIB;
/// Size of the NBD export holding r (volume plus metadata fits).
const EXPORT_SIZE: u64 = 128 * MIB;

/// The tests of this file share two cores with everything else: run them one
/// at a time so the time bounds of the hang test stay meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// nbdkit

/// One nbdkit process serving on a Unix socket, killed on drop.
struct Nbdkit {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Nbdkit {
    /// Runs `nbdkit -f --exit-with-parent --unix SOCK ARGS...` and waits
    /// (at most 10 s) until it accepts connections.
    fn start(sock: &Path, args: &[&str]) -> Nbdkit {
        let nbdkit = require_tool("nbdkit", "nbdkit");
        // A socket left by a killed server would make bind fail.
        let _ = std::fs::remove_file(sock);
        let log = sock.with_extension("log");
        let stderr = File::create(&log).expect("create nbdkit log");
        let mut cmd = Command::new(nbdkit);
        cmd.args(["-f", "--exit-with-parent", "--unix"])
            .arg(sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let line = cmdline(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let mut k = Nbdkit {
            child: Some(child),
            sock: sock.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = k.child.as_mut().expect("child").try_wait() {
                k.child = None;
                panic!("`{line}` exited with {st}: {}", k.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&k.sock).is_ok() {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "`{line}` did not listen on {} within 10 s: {}",
                k.sock.display(),
                k.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn uri(&self) -> String {
        nbd_unix_uri(&self.sock)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGSTOP: the server stops answering with its connections still open,
    /// as a hung disk does (a restart would drop the connection, and an NBD
    /// replica never resumes a lost one). SIGKILL still ends it.
    fn hang(&self) {
        let c = self.child.as_ref().expect("nbdkit is running");
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: kill only sends a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP nbdkit"
        );
        wait_stopped(c.id());
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nbd_unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

// ---------------------------------------------------------------------------
// A daemon with pool a (directory) and pool r (the nbdkit export)

/// Fields drop in order: the daemon, then nbdkit, then the directory.
struct Setup {
    daemon: Daemon,
    kit: Nbdkit,
    /// Where the event program appends "$1 $2 $3" per event.
    event_log: PathBuf,
    dir: TempDir,
}

impl Setup {
    /// Starts nbdkit with `kit_args` on TMP/r.sock (after `prepare` ran with
    /// the temporary directory), a daemon with `io_timeout_secs` and an event
    /// program, creates pools a and r and volume v on both, healthy.
    fn new(
        io_timeout_secs: u64,
        prepare: impl FnOnce(&Path),
        kit_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("ditto-faults-")
            .tempdir()
            .expect("tempdir");
        prepare(dir.path());
        let args = kit_args(dir.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let kit = Nbdkit::start(&dir.path().join("r.sock"), &args);

        let event_log = dir.path().join("events.log");
        let prog = dir.path().join("notify.sh");
        std::fs::write(
            &prog,
            format!(
                "#!/bin/sh\necho \"$1 $2 $3\" >> '{}'\n",
                event_log.display()
            ),
        )
        .expect("write event program");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755))
                .expect("chmod event program");
        }
        let cfg = dir.path().join("ditto.toml");
        std::fs::write(
            &cfg,
            format!(
                "io_timeout_secs = {io_timeout_secs}\nevent_program = {:?}\n",
                s(&prog)
            ),
        )
        .expect("write config");

        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        let daemon = Daemon::start_with(&data, &["--config", s(&cfg)]);
        let pool_a = dir.path().join("a");
        std::fs::create_dir(&pool_a).expect("mkdir pool a");
        daemon.cli_json(&["pool", "create", "a", "--path", s(&pool_a)]);
        let created = daemon.cli_json(&["pool", "create", "r", "--nbd", &kit.uri()]);
        assert_eq!(created["name"], "r", "pool create --json: {created:#}");
        let size = VOL_SIZE.to_string();
        daemon.cli_json(&[
            "volume", "create", "v", "--size", &size, "--pool", "a", "--pool", "r",
        ]);
        daemon.wait_healthy("v");
        Setup {
            daemon,
            kit,
            event_log,
            dir,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn uri(&self) -> String {
        self.daemon.uri("v")
    }

    fn volume(&self) -> Value {
        self.daemon.volume("v")
    }

    /// The status object of the replica on pool `pool`.
    fn replica(&self, pool: &str) -> Value {
        replica_on(&self.volume(), pool)
    }

    /// Waits (up to 30 s) until no dirty region is left (the map is cleared
    /// 5 s after the last write when every replica is in sync).
    fn wait_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.volume();
            if v["dirty_regions"].as_u64() == Some(0) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("dirty_regions not 0 after 30 s: {v:#}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Events of volume v (`ditto events --json --volume v`).
    fn events(&self) -> Vec<Value> {
        let out = self.daemon.cli_ok(&["events", "--json", "--volume", "v"]);
        out.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("event line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Lines the event program wrote so far.
    fn program_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.event_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `volume stop v`, then asserts that the data area of a (a file) equals
    /// the data area of r as read through NBD from the export itself.
    fn stop_and_compare(&self, kit_uri: &str) {
        let v = self.volume();
        let a = replica_on(&v, "a");
        let r = replica_on(&v, "r");
        let a_path = PathBuf::from(a["path"].as_str().expect("a path"));
        let a_off = a["data_offset"].as_u64().expect("a data_offset");
        let r_off = r["data_offset"].as_u64().expect("r data_offset");
        self.daemon.cli_ok(&["volume", "stop", "v"]);
        let copy = self.path("r-export.img");
        let _ = std::fs::remove_file(&copy);
        run_with_timeout(
            Command::new(nbdcopy()).arg(kit_uri).arg(&copy),
            TOOL_TIMEOUT,
        )
        .assert_success();
        assert_ranges_equal(&a_path, a_off, &copy, r_off, VOL_SIZE);
    }
}

/// The replica of a volume status object on pool `pool`.
fn replica_on(volume: &Value, pool: &str) -> Value {
    volume["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["pool"] == pool))
        .cloned()
        .unwrap_or_else(|| panic!("no replica on pool {pool}: {volume:#}"))
}

/// Creates a sparse file of `len` bytes (a disk image for nbdkit's file plugin).
fn sparse_image(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Runs qemu-io on `uri` and returns the output and the wall time it took.
fn timed_qemu_io(uri: &str, cmds: &[String]) -> (Output, Duration) {
    let t = Instant::now();
    let out = qemu_io(uri, cmds);
    (out, t.elapsed())
}

// ---------------------------------------------------------------------------
// 1. EIO on every request while fio writes

#[test]
fn fio_survives_erroring_replica() {
    let _serial = serial();
    let fio = require_tool("fio", "fio");
    let t0 = Instant::now();
    let setup = Setup::new(
        10,
        |_| {},
        |dir| {
            vec![
                "--filter=error".into(),
                "memory".into(),
                format!("{EXPORT_SIZE}"),
                "error-rate=100%".into(),
                format!("error-file={}", dir.join("TRIGGER").display()),
            ]
        },
    );
    let trigger = setup.path("TRIGGER");

    // fio: 32 MiB of 4 KiB random writes at queue depth 16, paced (2500
    // IOPS, about 3.3 s of writing) so the fault lands in the middle of the
    // write phase, then every block read back and checked (crc32c).
    let json_path = setup.path("fio.json");
    let fio_err = setup.path("fio.stderr");
    let mut cmd = Command::new(fio);
    cmd.args([
        "--name=t",
        "--ioengine=nbd",
        &format!("--uri={}", setup.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--rate_iops=2500",
        "--runtime=60",
        "--time_based=0",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--randseed=4321",
        "--output-format=json",
        &format!("--output={}", s(&json_path)),
    ])
    // fio leaves a verify state file in its working directory.
    .current_dir(setup.dir.path())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(&fio_err).expect("fio stderr file"));
    let line = cmdline(&cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    thread::sleep(Duration::from_secs(1));
    let still_running = child.try_wait().expect("try_wait").is_none();
    File::create(&trigger).expect("create trigger");
    let status = wait_child(&mut child, TOOL_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let fio_stderr = std::fs::read_to_string(&fio_err).unwrap_or_default();
    let text = std::fs::read_to_string(&json_path).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("`{line}` did not finish within {TOOL_TIMEOUT:?}"));
    assert!(
        still_running,
        "fio finished within 1 s, before the fault was injected: {text}"
    );
    assert!(
        status.success(),
        "fio failed ({status}) although a healthy replica was left: {fio_stderr}\n--- json ---\n{text}"
    );
    assert!(
        !mentions_any(
            &fio_stderr,
            &[
                "verify: bad",
                "bad magic",
                "bad header",
                "verify failed",
                "error"
            ]
        ),
        "fio reported errors: {fio_stderr}"
    );
    let start = text.find('{').expect("fio wrote JSON");
    let fio_json: Value = serde_json::from_str(&text[start..]).expect("fio JSON parses");
    let job = &fio_json["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "fio job error: {job:#}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio wrote its whole size: {job:#}"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(32 * MIB),
        "fio read back (verified) all it wrote: {job:#}"
    );

    // r is out, with the reason; the volume serves degraded.
    let v = setup.volume();
    let r = replica_on(&v, "r");
    assert_eq!(r["state"], "failed", "r should be failed: {v:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        mentions_any(reason, &["EIO", "input/output error", "I/O error"]),
        "r's reason should name the I/O error: {reason:?} in {v:#}"
    );
    assert!(
        mentions_any(reason, &["write"]),
        "r should have been failed by a client write during fio's write phase: {reason:?}"
    );
    assert_eq!(v["state"], "degraded", "volume state: {v:#}");
    assert_eq!(replica_on(&v, "a")["state"], "in_sync", "a: {v:#}");

    let failed = setup.events_of("replica_failed");
    assert!(
        failed
            .iter()
            .any(|e| e["replica"].as_str() == Some(setup.kit.uri().as_str())),
        "a replica_failed event for r ({}) should exist: {failed:#?}",
        setup.kit.uri()
    );
    let want = format!("replica_failed v {}", setup.kit.uri());
    wait_until(
        "the event program to record `replica_failed v R`",
        Duration::from_secs(15),
        || {
            setup
                .program_lines()
                .iter()
                .any(|l| l == &want)
                .then_some(())
        },
    );

    // While degraded, a write beyond fio's range, read back later.
    qemu_io_ok(
        &setup.uri(),
        &[format!("write -P 0x5e {} {}", 48 * MIB, 2 * MIB)],
    );

    // The fault goes away; r comes back and catches up.
    std::fs::remove_file(&trigger).expect("remove trigger");
    let out = setup.daemon.cli_ok(&["replica", "readd", "v", "r"]);
    assert!(
        out.stdout.contains("copying only"),
        "readd after a failure covered by the dirty map should be a catch-up: {}",
        out.describe()
    );
    setup
        .daemon
        .cli_ok(&["volume", "wait", "v", "--timeout", "60"]);
    let v = setup.daemon.wait_healthy("v");
    assert_eq!(v["state"], "healthy", "{v:#}");
    qemu_io_ok(
        &setup.uri(),
        &[format!("read -P 0x5e {} {}", 48 * MIB, 2 * MIB)],
    );
    let kinds: Vec<String> = setup
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    for k in ["resync_started", "resync_finished"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event: {kinds:?}");
    }

    setup.stop_and_compare(&setup.kit.uri());
    eprintln!("fio_survives_erroring_replica: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// 2. A replica that hangs is failed out by the I/O timeout

#[test]
fn hanging_replica_is_failed_out_by_io_timeout() {
    let _serial = serial();
    let t0 = Instant::now();
    // Created on a plain server, which then stops answering (SIGSTOP).
    let mut setup = Setup::new(
        2,
        |dir| sparse_image(&dir.join("r.img"), EXPORT_SIZE),
        |dir| {
            vec![
                "file".into(),
                format!("file={}", dir.join("r.img").display()),
            ]
        },
    );
    let img = setup.path("r.img");
    let sock = setup.path("r.sock");
    qemu_io_ok(&setup.uri(), &["write -P 0x11 0 1M".into()]);
    setup.wait_clean();
    setup.kit.hang();

    // The write needs a dirty bit on r first; r does not answer within 2 s
    // and is failed out; the write completes on a. Without the timeout it
    // would never complete.
    let (out, took) = timed_qemu_io(&setup.uri(), &["write -P 0x22 2M 1M".into()]);
    assert!(
        !qemu_io_failed(&out),
        "the write should succeed: {}",
        out.describe()
    );
    assert!(
        took < Duration::from_millis(4500),
        "the write took {took:?}: the 2 s I/O timeout should have failed the hanging r"
    );
    let v = setup.volume();
    let r = replica_on(&v, "r");
    assert_eq!(r["state"], "failed", "r should be failed: {v:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        mentions_any(reason, &["did not answer within 2 s"]),
        "r's reason should say it did not answer within 2 s: {reason:?}"
    );
    assert_eq!(v["state"], "degraded", "{v:#}");
    assert!(
        setup
            .events_of("replica_failed")
            .iter()
            .any(|e| mentions_any(
                e["message"].as_str().unwrap_or_default(),
                &["did not answer"]
            )),
        "a replica_failed event naming the timeout: {:#?}",
        setup.events()
    );
    // Served from a alone now: the data is there.
    let (out, took2) = timed_qemu_io(&setup.uri(), &["read -P 0x22 2M 1M".into()]);
    assert!(!qemu_io_failed(&out), "{}", out.describe());
    eprintln!("hang: write with r hanging took {took:?}, then a read took {took2:?}");

    // The disk stops hanging: the same file served without the delay, r re-added.
    setup.kit.kill();
    setup.kit = Nbdkit::start(&sock, &["file", &format!("file={}", img.display())]);
    let out = setup.daemon.cli_ok(&["replica", "readd", "v", "r"]);
    assert!(out.stdout.contains("copying only"), "{}", out.describe());
    setup
        .daemon
        .cli_ok(&["volume", "wait", "v", "--timeout", "60"]);
    setup.daemon.wait_healthy("v");
    setup.stop_and_compare(&setup.kit.uri());
    eprintln!(
        "hanging_replica_is_failed_out_by_io_timeout: {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. The remote disk goes away and comes back

#[test]
fn replica_that_comes_back_catches_up_only_what_it_missed() {
    let _serial = serial();
    let t0 = Instant::now();
    let mut setup = Setup::new(
        10,
        |dir| sparse_image(&dir.join("r.img"), EXPORT_SIZE),
        |dir| {
            vec![
                "file".into(),
                format!("file={}", dir.join("r.img").display()),
            ]
        },
    );
    let img = setup.path("r.img");
    let sock = setup.path("r.sock");
    let uri = setup.uri();
    // Data on both replicas, then wait until the dirty map is empty, so what
    // is dirty later is exactly what r misses.
    qemu_io_ok(&uri, &["write -P 0x31 0 8M".into()]);
    setup.wait_clean();
    let copied_before = setup.volume()["copied_bytes"]
        .as_u64()
        .expect("copied_bytes");

    // The server dies while the volume serves; a client holds a connection
    // (qemu-io runs all commands on one connection) and keeps writing.
    setup.kit.kill();
    qemu_io_ok(
        &uri,
        &[
            format!("write -P 0x41 {} {}", 3 * MIB, MIB),
            format!("write -P 0x42 {} {}", 40 * MIB, MIB),
            format!("write -P 0x43 {} {}", 40 * MIB + 64 * KIB, 128 * KIB),
            "flush".into(),
            format!("read -P 0x41 {} {}", 3 * MIB, MIB),
        ],
    );
    let v = setup.volume();
    let r = replica_on(&v, "r");
    assert_eq!(r["state"], "failed", "r should be failed: {v:#}");
    assert_eq!(v["state"], "degraded", "{v:#}");
    assert_eq!(
        v["dirty_regions"].as_u64(),
        Some(2),
        "two regions written while r was gone: {v:#}"
    );

    // While the server is still down, readd fails with a clear message and
    // changes nothing.
    let out = setup
        .daemon
        .cli(&["replica", "readd", "v", "r"])
        .assert_failure();
    assert!(
        mentions_any(
            &out.stderr,
            &["reconnect", "connect", "refused", "No such file"]
        ),
        "readd with the server down should say it cannot reach it: {}",
        out.describe()
    );
    assert_eq!(setup.replica("r")["state"], "failed");

    // The server comes back on the same socket with the same file.
    setup.kit = Nbdkit::start(&sock, &["file", &format!("file={}", img.display())]);
    let out = setup.daemon.cli_ok(&["replica", "readd", "v", "r"]);
    assert!(
        out.stdout.contains("copying only the 2 region(s)"),
        "readd should plan a catch-up of the 2 dirty regions: {}",
        out.describe()
    );
    setup
        .daemon
        .cli_ok(&["volume", "wait", "v", "--timeout", "60"]);
    let v = setup.daemon.wait_healthy("v");
    let copied = v["copied_bytes"].as_u64().expect("copied_bytes") - copied_before;
    assert_eq!(
        copied,
        2 * MIB,
        "the catch-up should copy exactly the 2 dirty 1 MiB regions: {v:#}"
    );
    let kinds: Vec<String> = setup
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    for k in ["replica_failed", "resync_started", "resync_finished"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event: {kinds:?}");
    }
    // Straight from the image file too: r has the data written while it was gone.
    let r_off = replica_on(&v, "r")["data_offset"]
        .as_u64()
        .expect("data_offset");
    let mut want = vec![0x42u8; MIB as usize];
    want[64 * KIB as usize..192 * KIB as usize].fill(0x43);
    assert!(
        read_file_range(&img, r_off + 40 * MIB, MIB as usize) == want,
        "r's image lacks the region written while it was gone"
    );
    setup.stop_and_compare(&setup.kit.uri());
    eprintln!(
        "replica_that_comes_back_catches_up_only_what_it_missed: {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 4. Read errors on r are answered from a and repaired

#[test]
fn read_errors_are_served_from_the_other_replica() {
    let _serial = serial();
    let t0 = Instant::now();
    let setup = Setup::new(
        10,
        |_| {},
        |dir| {
            vec![
                "--filter=error".into(),
                "memory".into(),
                format!("{EXPORT_SIZE}"),
                "error-pread-rate=100%".into(),
                format!("error-pread-file={}", dir.join("TRIGGER").display()),
            ]
        },
    );
    let trigger = setup.path("TRIGGER");
    let uri = setup.uri();
    // 16 MiB of patterns: 1 MiB at k MiB holds byte 0x60+k.
    let writes: Vec<String> = (0..16u64)
        .map(|k| format!("write -P {:#x} {} {}", 0x60 + k, k * MIB, MIB))
        .collect();
    qemu_io_ok(&uri, &writes);
    File::create(&trigger).expect("create trigger");

    // Concurrent reads (aio) on one connection, so both replicas serve some:
    // every read must return the right bytes. Bounded: at most 10 rounds,
    // stopping once a read error on r has been repaired.
    let mut rounds = 0;
    let mut repaired = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rounds < 10 && Instant::now() < deadline {
        rounds += 1;
        let mut cmds = Vec::new();
        for i in 0..64u64 {
            // 64 KiB pieces spread over the 16 MiB, a different order each round.
            let k = (i * 7 + rounds * 3) % 16;
            let off = k * MIB + ((i * 5 + rounds) % 16) * 64 * KIB;
            cmds.push(format!("aio_read -P {:#x} {off} 64k", 0x60 + k));
        }
        cmds.push("aio_flush".into());
        for k in 0..16u64 {
            cmds.push(format!("read -P {:#x} {} {}", 0x60 + k, k * MIB, MIB));
        }
        qemu_io_ok(&uri, &cmds);
        repaired = setup.events_of("read_error_repaired");
        if !repaired.is_empty() {
            break;
        }
    }
    let v = setup.volume();
    let r = replica_on(&v, "r");
    assert!(
        r["errors"].as_u64().unwrap_or(0) > 0,
        "after {rounds} rounds of concurrent reads none reached r (no errors counted), the test proves nothing: {v:#}"
    );
    assert!(
        !repaired.is_empty(),
        "read errors on r ({} counted) should have been answered from a and rewritten (read_error_repaired): {:#?}",
        r["errors"],
        setup.events()
    );
    assert!(
        repaired
            .iter()
            .all(|e| e["replica"].as_str() == Some(setup.kit.uri().as_str())),
        "read_error_repaired names r: {repaired:#?}"
    );
    // Only reads fail there, so the rewrite succeeded: r stays in sync.
    assert_eq!(r["state"], "in_sync", "r should stay in sync: {v:#}");
    assert_eq!(v["state"], "healthy", "{v:#}");
    assert!(
        setup.events_of("replica_failed").is_empty(),
        "no replica should have failed: {:#?}",
        setup.events()
    );
    eprintln!(
        "read errors: {rounds} round(s), r errors {}, {} repaired event(s)",
        r["errors"],
        repaired.len()
    );

    // The fault goes away: the two copies are identical.
    std::fs::remove_file(&trigger).expect("remove trigger");
    setup.stop_and_compare(&setup.kit.uri());
    eprintln!(
        "read_errors_are_served_from_the_other_replica: {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 5. The background dirty-map clear fails on r

/// The dirty map is cleared 5 s after the last write. If clearing fails on r
/// (its map write gets EIO) after a's on-disk map was already cleared, r is
/// failed out; a region rewritten afterwards must still be caught up when r
/// comes back, also after the volume was stopped and started again.
#[test]
fn failed_dirty_map_clear_keeps_what_r_misses() {
    let _serial = serial();
    let t0 = Instant::now();
    let setup = Setup::new(
        10,
        |_| {},
        |dir| {
            vec![
                "--filter=error".into(),
                "memory".into(),
                format!("{EXPORT_SIZE}"),
                "error-rate=100%".into(),
                format!("error-file={}", dir.join("TRIGGER").display()),
            ]
        },
    );
    let trigger = setup.path("TRIGGER");
    let uri = setup.uri();
    // Region 5 written on both; the fault starts before its dirty bit is cleared.
    qemu_io_ok(&uri, &[format!("write -P 0x71 {} {}", 5 * MIB, MIB)]);
    File::create(&trigger).expect("create trigger");
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = setup.volume();
        if replica_on(&v, "r")["state"] == "failed" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "r not failed 30 s after its dirty-map clear should have hit EIO: {v:#}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let reason = replica_on(&v, "r")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "dirty-map clear: r failed: {reason}; dirty_regions {}",
        v["dirty_regions"]
    );
    assert_eq!(v["state"], "degraded", "{v:#}");

    // The same region rewritten while r is out: only a has it.
    qemu_io_ok(&uri, &[format!("write -P 0x72 {} {}", 5 * MIB, MIB)]);
    let dirty_running = setup.volume()["dirty_regions"].as_u64();

    // The disk recovers; the volume is stopped and started (an upgrade, a reboot).
    std::fs::remove_file(&trigger).expect("remove trigger");
    setup.daemon.cli_ok(&["volume", "stop", "v"]);
    let out = setup.daemon.cli(&["volume", "start", "v"]);
    if !out.success() {
        eprintln!(
            "volume start refused ({}), starting --degraded",
            out.stderr.trim()
        );
        setup.daemon.cli_ok(&["volume", "start", "v", "--degraded"]);
    }
    let v = setup.volume();
    let mut context = format!(
        "r failed by the clear ({reason}); region 5 rewritten while r was out \
         (dirty_regions {dirty_running:?}); after volume stop + start: state {}, r {}, dirty_regions {}",
        v["state"],
        replica_on(&v, "r")["state"],
        v["dirty_regions"]
    );
    if replica_on(&v, "r")["state"] != "in_sync" {
        let out = setup.daemon.cli_ok(&["replica", "readd", "v", "r"]);
        context.push_str(&format!("; readd: {}", out.stdout.trim()));
        setup
            .daemon
            .cli_ok(&["volume", "wait", "v", "--timeout", "60"]);
    }
    setup.daemon.wait_healthy("v");
    eprintln!("{context}");
    // The daemon's own comparison first, then the bytes.
    setup.daemon.cli_ok(&["volume", "scrub", "v", "--wait"]);
    let scrub = setup.volume()["last_scrub"].clone();
    assert_eq!(
        scrub["mismatches"].as_u64(),
        Some(0),
        "replicas differ after r was brought back healthy: {context}; scrub: {scrub:#}"
    );
    setup.stop_and_compare(&setup.kit.uri());
    eprintln!(
        "failed_dirty_map_clear_keeps_what_r_misses: {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 6. Reads that hang on r

/// Reads on r never answer in time (5 s delay, `io_timeout_secs = 2`). The
/// config promises that a replica that does not complete an operation within
/// the timeout is failed out: clients must not keep waiting 2 s on r.
#[test]
fn hanging_reads_fail_the_replica_out() {
    let _serial = serial();
    let t0 = Instant::now();
    let setup = Setup::new(
        2,
        |dir| sparse_image(&dir.join("r.img"), EXPORT_SIZE),
        |dir| {
            vec![
                "file".into(),
                format!("file={}", dir.join("r.img").display()),
            ]
        },
    );
    let uri = setup.uri();
    let writes: Vec<String> = (0..8u64)
        .map(|k| format!("write -P {:#x} {} {}", 0x80 + k, k * MIB, MIB))
        .collect();
    qemu_io_ok(&uri, &writes);
    setup.wait_clean();
    setup.kit.hang();

    // Concurrent reads so some reach r. At most 4 rounds.
    let mut timings = Vec::new();
    for round in 0..4u64 {
        let mut cmds = Vec::new();
        for i in 0..32u64 {
            let k = (i * 3 + round) % 8;
            let off = k * MIB + ((i * 5 + round) % 16) * 64 * KIB;
            cmds.push(format!("aio_read -P {:#x} {off} 64k", 0x80 + k));
        }
        cmds.push("aio_flush".into());
        let (out, took) = timed_qemu_io(&uri, &cmds);
        assert!(
            !qemu_io_failed(&out),
            "reads must succeed: {}",
            out.describe()
        );
        timings.push(took);
        if replica_on(&setup.volume(), "r")["state"] != "in_sync" {
            break;
        }
    }
    let v = setup.volume();
    let r = replica_on(&v, "r");
    let repaired = setup.events_of("read_error_repaired").len();
    eprintln!(
        "hanging reads: rounds took {timings:?}; r state {} reason {:?}, errors {}, {repaired} read_error_repaired event(s)",
        r["state"], r["reason"], r["errors"]
    );
    assert!(
        r["errors"].as_u64().unwrap_or(0) > 0,
        "no read reached r, the test proves nothing: {v:#}"
    );
    assert_eq!(
        r["state"], "failed",
        "r timed out on reads ({} errors, {repaired} `read_error_repaired` events, client read rounds took {timings:?}) \
         but stays in sync: io_timeout_secs should fail it out: {v:#}",
        r["errors"]
    );
    assert!(
        mentions_any(
            r["reason"].as_str().unwrap_or_default(),
            &["did not answer within 2 s"]
        ),
        "{v:#}"
    );
    eprintln!("hanging_reads_fail_the_replica_out: {:?}", t0.elapsed());
}

/// Issue 9, sequence 6: a write given up at the timeout may still land
/// when the hung disk wakes. A stopped volume whose old instance still
/// holds such an operation is not started again on the same files until
/// it completed; then it starts.
#[test]
fn restart_waits_for_operations_abandoned_on_a_hung_disk() {
    let _serial = serial();
    let mut setup = Setup::new(
        2,
        |dir| sparse_image(&dir.join("r.img"), EXPORT_SIZE),
        |dir| {
            vec![
                "file".into(),
                format!("file={}", dir.join("r.img").display()),
            ]
        },
    );
    qemu_io_ok(&setup.uri(), &["write -P 0x11 0 1M".into()]);
    setup.wait_clean();
    setup.kit.hang();
    let (out, _) = timed_qemu_io(&setup.uri(), &["write -P 0x22 2M 1M".into()]);
    assert!(!qemu_io_failed(&out), "{}", out.describe());
    assert_eq!(replica_on(&setup.volume(), "r")["state"], "failed");

    setup.daemon.cli_ok(&["volume", "stop", "v", "--force"]);
    let out = setup
        .daemon
        .cli(&["volume", "start", "v", "--degraded"])
        .assert_failure();
    assert!(
        out.stderr.contains("given up at a timeout"),
        "the refusal says why: {}",
        out.describe()
    );
    assert_eq!(setup.volume()["state"], "stopped");

    // The hung server dies: its operations end (with an error), the old
    // instance has nothing left in flight, and the volume starts on a.
    setup.kit.kill();
    let mut started = None;
    for _ in 0..50 {
        let out = setup.daemon.cli(&["volume", "start", "v", "--degraded"]);
        if out.success() {
            started = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.is_some(), "the volume never started again");
    qemu_io_ok(
        &setup.uri(),
        &["read -P 0x22 2M 1M".into(), "read -P 0x11 0 1M".into()],
    );
}
