//! Shared helpers of the end-to-end tests: start a `ditto daemon` on ephemeral
//! ports in its own temporary directory, drive the CLI, find the external
//! tools (qemu-io, nbdinfo, fio, ...) and compare data.
//!
//! Every wait here is bounded in time; every child process is killed on drop.

#![allow(dead_code)]

pub mod nbd;
pub mod proxy;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const DITTO: &str = env!("CARGO_BIN_EXE_ditto");

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// How long a daemon may take to write daemon.json.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one external tool run (qemu-io, nbdcopy, ...) may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------
// Running processes with a time limit

/// What a finished process left behind.
#[derive(Debug)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }

    /// Panics unless the command exited 0.
    pub fn assert_success(self) -> Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }

    /// Panics unless the command failed (non-zero exit) with something on stderr.
    pub fn assert_failure(self) -> Self {
        assert!(
            !self.success(),
            "command should have failed: {}",
            self.describe()
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "command failed but printed no error on stderr: {}",
            self.describe()
        );
        self
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }
}

/// A readable rendering of a command line for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr.
/// Kills it and panics (with what it printed so far) after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let line = cmdline(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout =
                    String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
                let stderr =
                    String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
                panic!(
                    "`{line}` did not finish within {timeout:?}; killed.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
                );
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Output {
        cmdline: line,
        status,
        stdout,
        stderr,
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: i32) {
    let id = i32::try_from(pid).expect("pid fits in i32");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(id, sig) };
    assert_eq!(
        rc,
        0,
        "kill({id}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
    if sig == libc::SIGSTOP {
        wait_stopped(pid);
    }
}

/// Waits (up to 1 s) until every thread of `pid` is stopped: SIGSTOP is
/// delivered asynchronously, and a thread still running could answer one
/// more request.
pub fn wait_stopped(pid: u32) {
    let stopped = |stat: &str| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('T'))
    };
    for _ in 0..200 {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.filter_map(|t| t.ok()).all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).map_or(true, |st| stopped(&st))
                })
            })
            .unwrap_or(true);
        if all {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("process {pid} did not stop within 1 s of SIGSTOP");
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// External tools

/// Finds `name` in PATH (and the sbin directories, which a non-root PATH may
/// lack). FAILS the test, naming the Debian package, when it is missing: the
/// test suite needs these tools and `scripts/test` installs them.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "required tool `{name}` not found in PATH or /usr/sbin, /sbin: install the Debian package \
             `{package}` (apt-get install -y {package}); scripts/test does this when run as root"
        )
    })
}

/// Looks `name` up in PATH and the sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn qemu_img() -> PathBuf {
    require_tool("qemu-img", "qemu-utils")
}
pub fn qemu_io_bin() -> PathBuf {
    require_tool("qemu-io", "qemu-utils")
}
pub fn nbdinfo() -> PathBuf {
    require_tool("nbdinfo", "libnbd-bin")
}
pub fn nbdcopy() -> PathBuf {
    require_tool("nbdcopy", "libnbd-bin")
}

/// Runs qemu-io on a raw NBD URI with one `-c` per command.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new(qemu_io_bin());
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    run_with_timeout(&mut c, TOOL_TIMEOUT)
}

/// Whether a qemu-io run failed: non-zero exit, or a command reported a
/// failure (qemu-io exits 0 after a failed `aio_read -P`, so the output is
/// checked too).
pub fn qemu_io_failed(out: &Output) -> bool {
    let all = format!("{}\n{}", out.stdout, out.stderr);
    !out.success()
        || all.contains("Pattern verification failed")
        || all.to_lowercase().contains("failed")
        || all.contains("error")
}

/// Runs qemu-io and asserts it succeeded (see [`qemu_io_failed`]).
pub fn qemu_io_ok(uri: &str, cmds: &[String]) -> Output {
    let out = qemu_io(uri, cmds);
    assert!(
        !qemu_io_failed(&out),
        "qemu-io reported a failure: {}",
        out.describe()
    );
    out
}

/// Size of an NBD export according to `nbdinfo --size`.
pub fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_with_timeout(Command::new(nbdinfo()).arg("--size").arg(uri), TOOL_TIMEOUT)
        .assert_success();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size printed no number ({e}): {}", out.describe()))
}

/// One extent of `nbdinfo --map --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    /// base:allocation flags: bit 0 = hole, bit 1 = zero.
    pub kind: u64,
}

impl MapExtent {
    pub fn hole(&self) -> bool {
        self.kind & 1 != 0
    }
    pub fn zero(&self) -> bool {
        self.kind & 2 != 0
    }
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The allocation map of an export (`nbdinfo --map --json`), checked to cover
/// `[0, size)` contiguously.
pub fn nbdinfo_map(uri: &str) -> Vec<MapExtent> {
    let out = run_with_timeout(
        Command::new(nbdinfo()).arg("--map").arg("--json").arg(uri),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let v = out.json();
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json is not an array: {}", out.describe()));
    let mut extents = Vec::new();
    let mut next = 0;
    for e in arr {
        let ext = MapExtent {
            offset: e["offset"].as_u64().expect("extent offset"),
            length: e["length"].as_u64().expect("extent length"),
            kind: e["type"].as_u64().expect("extent type"),
        };
        assert_eq!(ext.offset, next, "map is not contiguous: {}", out.stdout);
        next = ext.end();
        extents.push(ext);
    }
    extents
}

/// Extents of `map` overlapping `[off, off+len)`.
pub fn extents_in(map: &[MapExtent], off: u64, len: u64) -> Vec<MapExtent> {
    map.iter()
        .copied()
        .filter(|e| e.offset < off + len && e.end() > off)
        .collect()
}

// ---------------------------------------------------------------------------
// Data

/// Deterministic pseudo-random bytes (xorshift64*), no zero runs to speak of.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        v.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `len` pseudo-random bytes to `path` (in 1 MiB chunks).
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut done = 0;
    let mut chunk_no = 0;
    while done < len {
        let n = (len - done).min(MIB);
        let chunk = random_bytes(n as usize, seed ^ (chunk_no << 32) ^ chunk_no);
        f.write_all(&chunk).expect("write random file");
        done += n;
        chunk_no += 1;
    }
    f.sync_all().expect("sync random file");
}

/// Reads up to `buf.len()` bytes at `offset`; bytes past the end of the file read as 0.
fn read_at_zero_fill(f: &mut File, offset: u64, buf: &mut [u8]) {
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..]).expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    buf[got..].fill(0);
}

/// Asserts two files have identical contents, naming the first difference.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = std::fs::metadata(a).expect("stat a").len();
    let lb = std::fs::metadata(b).expect("stat b").len();
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb} bytes",
        a.display(),
        b.display()
    );
    assert_ranges_equal(a, 0, b, 0, la);
}

/// Asserts `len` bytes at `off_a` in `a` equal `len` bytes at `off_b` in `b`.
pub fn assert_ranges_equal(a: &Path, off_a: u64, b: &Path, off_b: u64, len: u64) {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB) as usize;
        read_at_zero_fill(&mut fa, off_a + done, &mut ba[..n]);
        read_at_zero_fill(&mut fb, off_b + done, &mut bb[..n]);
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).expect("a difference");
            panic!(
                "data differs at byte {} of the compared range: {}@{} has {:#04x}, {}@{} has {:#04x}",
                done + i as u64,
                a.display(),
                off_a + done + i as u64,
                ba[i],
                b.display(),
                off_b + done + i as u64,
                bb[i]
            );
        }
        done += n as u64;
    }
}

/// Reads `len` bytes at `off` of a file (past-EOF bytes read as 0).
pub fn read_file_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    read_at_zero_fill(&mut f, off, &mut buf);
    buf
}

// ---------------------------------------------------------------------------
// Replicas (from `ditto status --json`)

/// A replica as reported by status.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    pub pool: String,
    pub path: PathBuf,
    pub state: String,
    pub data_offset: u64,
}

/// The replicas of a VOLUME status object.
pub fn replicas(volume: &Value) -> Vec<Replica> {
    volume["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("volume has no `replicas` array: {volume:#}"))
        .iter()
        .map(|r| Replica {
            id: match &r["id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            pool: r["pool"].as_str().unwrap_or_default().to_string(),
            path: PathBuf::from(
                r["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("replica has no `path`: {r:#}")),
            ),
            state: r["state"].as_str().unwrap_or_default().to_string(),
            data_offset: r["data_offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("replica has no integer `data_offset`: {r:#}")),
        })
        .collect()
}

/// Reads `len` bytes of volume data at volume offset `off` straight from a replica file.
pub fn read_replica(replica: &Replica, off: u64, len: usize) -> Vec<u8> {
    read_file_range(&replica.path, replica.data_offset + off, len)
}

/// Asserts that the data areas of all replicas of `volume` (a status object)
/// are byte-identical over the whole volume size.
pub fn assert_replicas_identical(volume: &Value) {
    let size = volume["size"].as_u64().expect("volume size");
    let reps = replicas(volume);
    assert!(
        reps.len() >= 2,
        "need at least 2 replicas to compare: {volume:#}"
    );
    for r in &reps[1..] {
        assert_ranges_equal(
            &reps[0].path,
            reps[0].data_offset,
            &r.path,
            r.data_offset,
            size,
        );
    }
}

// ---------------------------------------------------------------------------
// The daemon

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

/// A running `ditto daemon` (or `ditto quickstart`), killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub api: String,
    pub nbd: String,
    pub pid: u32,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The network namespace it runs in (its CLI runs there too).
    pub netns: Option<String>,
}

/// The data area of the one replica file in directory pool `pool`.
pub fn replica_data(pool: &Path) -> Vec<u8> {
    let file = std::fs::read_dir(pool)
        .expect("pool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "replica"))
        .expect("a replica file in the pool");
    let all = std::fs::read(&file).expect("read replica");
    let sb = ditto_format::Superblock::decode_slots(&all).expect("superblock");
    all[sb.layout.data_offset as usize..].to_vec()
}

/// `daemon --data-dir DIR` on ephemeral loopback ports, then `extra`.
fn daemon_args(data_dir: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["daemon".into(), "--data-dir".into(), data_dir.into()];
    args.extend(
        ["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]
            .iter()
            .map(OsString::from),
    );
    args.extend(extra.iter().map(OsString::from));
    args
}

/// `ditto` run in network namespace `netns` when given.
pub fn ditto_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, DITTO]);
            c
        }
        None => Command::new(DITTO),
    }
}

impl Daemon {
    /// `ditto daemon` on ephemeral loopback ports inside network namespace
    /// `netns` (its loopback must be up).
    pub fn start_in_netns(netns: &str, data_dir: &Path, extra: &[&str]) -> Daemon {
        Self::spawn_cmd(Some(netns), None, data_dir, &daemon_args(data_dir, extra))
    }

    /// `ditto daemon --data-dir DIR` on ephemeral loopback ports.
    pub fn start(data_dir: &Path) -> Daemon {
        Self::start_with(data_dir, &[])
    }

    /// Like [`Daemon::start`] with extra daemon arguments.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Daemon {
        let mut args = daemon_args(data_dir, extra);
        // Run the whole suite on another disk I/O engine: DITTO_TEST_IO_ENGINE=io_uring.
        if let Some(engine) = std::env::var_os("DITTO_TEST_IO_ENGINE") {
            args.push("--io-engine".into());
            args.push(engine);
        }
        Self::spawn(data_dir, &args)
    }

    /// Runs `ditto ARGS...` in the background and waits for it to write
    /// `DATA_DIR/daemon.json` with its own pid. Its stdout and stderr go to
    /// files beside the data dir (see [`Daemon::stdout`], [`Daemon::stderr`]).
    pub fn spawn<S: AsRef<OsStr>>(data_dir: &Path, args: &[S]) -> Daemon {
        Self::spawn_in(None, data_dir, args)
    }

    /// Like [`Daemon::spawn`], in working directory `cwd` if given.
    pub fn spawn_in<S: AsRef<OsStr>>(cwd: Option<&Path>, data_dir: &Path, args: &[S]) -> Daemon {
        Self::spawn_cmd(None, cwd, data_dir, args)
    }

    fn spawn_cmd<S: AsRef<OsStr>>(
        netns: Option<&str>,
        cwd: Option<&Path>,
        data_dir: &Path,
        args: &[S],
    ) -> Daemon {
        let n = SPAWNED.fetch_add(1, Ordering::SeqCst);
        let base = data_dir.to_string_lossy().trim_end_matches('/').to_string();
        let stdout_path = PathBuf::from(format!("{base}.{n}.stdout"));
        let stderr_path = PathBuf::from(format!("{base}.{n}.stderr"));
        let mut cmd = ditto_in(netns);
        cmd.args(args)
            .env_remove("DITTO_API")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create daemon stdout file"))
            .stderr(File::create(&stderr_path).expect("create daemon stderr file"));
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let line = cmdline(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let pid = child.id();
        let mut d = Daemon {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            api: String::new(),
            nbd: String::new(),
            pid,
            stdout_path,
            stderr_path,
            netns: netns.map(str::to_string),
        };
        let json_path = data_dir.join("daemon.json");
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_seen = String::new();
        loop {
            if let Some(st) = d
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                d.child = None;
                panic!(
                    "`{line}` exited with {st} before writing {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    json_path.display(),
                    d.stdout(),
                    d.stderr()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&json_path) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(pid)) {
                        d.api = v["api"]
                            .as_str()
                            .unwrap_or_else(|| panic!("daemon.json has no `api`: {text}"))
                            .to_string();
                        d.nbd = v["nbd"]
                            .as_str()
                            .unwrap_or_else(|| panic!("daemon.json has no `nbd`: {text}"))
                            .to_string();
                        for (what, addr) in [("api", &d.api), ("nbd", &d.nbd)] {
                            let port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                            assert!(
                                addr.starts_with("127.0.0.1:") && port.is_some_and(|p| p != 0),
                                "daemon.json `{what}` should be 127.0.0.1:PORT with the bound port, got {addr:?}: {text}"
                            );
                        }
                        return d;
                    }
                }
                last_seen = text;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{line}` did not write {} with pid {pid} within {START_TIMEOUT:?} (last content: {last_seen:?})\n--- stderr ---\n{}",
                    json_path.display(),
                    d.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Sends `sig` and waits up to 30 s for the process to exit; panics if it doesn't.
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        send_signal(child.id(), sig);
        match wait_child(&mut child, Duration::from_secs(30)) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon did not exit within 30 s of signal {sig}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// SIGTERM, and asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        let st = self.stop_with(libc::SIGTERM);
        assert!(
            st.success(),
            "daemon should exit 0 on SIGTERM, exited with {st}\n--- stderr ---\n{}",
            self.stderr()
        );
    }

    /// The CLI with `DITTO_API` pointing at this daemon.
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = ditto_in(self.netns.as_deref());
        c.args(args).env("DITTO_API", &self.api);
        c
    }

    /// Runs `ditto ARGS...` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_with_timeout(&mut self.cli_cmd(args), CLI_TIMEOUT)
    }

    /// Runs `ditto ARGS...` and asserts it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.success(),
            "CLI command failed: {}\n--- daemon stderr ---\n{}",
            out.describe(),
            tail(&self.stderr(), 4000)
        );
        out
    }

    /// Runs `ditto ARGS... --json`, asserts success and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.cli_ok(&a).json()
    }

    /// `ditto status --json`.
    pub fn status(&self) -> Value {
        let v = self.cli_json(&["status"]);
        assert!(
            v["volumes"].is_array() && v["pools"].is_array(),
            "status --json should be an object with `volumes` and `pools` arrays: {v:#}"
        );
        v
    }

    /// The status object of volume `name` (from `ditto status --json`); panics if absent.
    pub fn volume(&self, name: &str) -> Value {
        self.find_volume(name)
            .unwrap_or_else(|| panic!("volume {name:?} not in status: {:#}", self.status()))
    }

    /// The status object of volume `name`, if it exists.
    pub fn find_volume(&self, name: &str) -> Option<Value> {
        self.status()["volumes"]
            .as_array()
            .expect("volumes array")
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    }

    /// Names in `ditto volume list --json`.
    pub fn volume_names(&self) -> Vec<String> {
        names(&self.cli_json(&["volume", "list"]))
    }

    /// Names in `ditto pool list --json`.
    pub fn pool_names(&self) -> Vec<String> {
        names(&self.cli_json(&["pool", "list"]))
    }

    /// Waits (up to 60 s) until volume `name` is "healthy" with every replica "in_sync".
    pub fn wait_healthy(&self, name: &str) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.find_volume(name) {
                let reps_ok = v["replicas"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["state"] == "in_sync"));
                if v["state"] == "healthy" && reps_ok {
                    return v;
                }
                last = v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "volume {name:?} not healthy with all replicas in_sync after 60 s: {last:#}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// nbd://HOST:PORT/NAME for a volume of this daemon.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.nbd, name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- daemon {} stderr (tail) ---\n{}",
                self.pid,
                tail(&self.stderr(), 8000)
            );
        }
    }
}

/// The last `n` bytes (about) of `s`.
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The `name` fields of a JSON array of objects.
pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a JSON array: {v:#}"))
        .iter()
        .map(|o| {
            o["name"]
                .as_str()
                .unwrap_or_else(|| panic!("object has no `name`: {o:#}"))
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A node: tempdir + daemon + pools

/// A temporary directory with a running daemon (data dir `TMP/data`) and pools
/// `p0..pN` in `TMP/pool0..poolN`. Fields drop in order: daemon, then the directory.
pub struct Node {
    pub daemon: Daemon,
    pub pools: Vec<(String, PathBuf)>,
    pub dir: TempDir,
}

impl Node {
    /// A daemon with no pools.
    pub fn new() -> Node {
        Self::with_pools(0)
    }

    /// A daemon with `n` pools created through the CLI.
    pub fn with_pools(n: usize) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("ditto-e2e-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        let daemon = Daemon::start(&data);
        let mut node = Node {
            daemon,
            pools: Vec::new(),
            dir,
        };
        for i in 0..n {
            node.add_pool(&format!("p{i}"));
        }
        node
    }

    /// Creates directory TMP/NAME and `ditto pool create NAME --path` it.
    pub fn add_pool(&mut self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("mkdir pool");
        let p = path.to_str().expect("utf-8 path").to_string();
        let created = self
            .daemon
            .cli_json(&["pool", "create", name, "--path", &p]);
        assert_eq!(
            created["name"], name,
            "pool create --json output: {created:#}"
        );
        self.pools.push((name.to_string(), path.clone()));
        path
    }

    /// `ditto volume create NAME --size SIZE --replicas N`, then waits until it is
    /// healthy and checks its size; returns its status object.
    pub fn create_volume(&self, name: &str, size: u64, replicas: usize) -> Value {
        let size_s = size.to_string();
        let reps = replicas.to_string();
        let created = self.daemon.cli_json(&[
            "volume",
            "create",
            name,
            "--size",
            &size_s,
            "--replicas",
            &reps,
        ]);
        assert_eq!(
            created["name"], name,
            "volume create --json output: {created:#}"
        );
        assert_eq!(
            created["size"].as_u64(),
            Some(size),
            "volume create --json output: {created:#}"
        );
        let v = self.daemon.wait_healthy(name);
        assert_eq!(
            v["size"].as_u64(),
            Some(size),
            "volume size in status: {v:#}"
        );
        assert_eq!(
            v["replicas"].as_array().map(Vec::len),
            Some(replicas),
            "replica count in status: {v:#}"
        );
        v
    }

    /// A path inside the node's temporary directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn uri(&self, volume: &str) -> String {
        self.daemon.uri(volume)
    }
}

/// Path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes `len` pseudo-random bytes to `path`, then zeroes the given
/// `(offset, length)` ranges (to exercise zero detection in copy tools).
pub fn write_random_file_with_zeroes(path: &Path, len: u64, seed: u64, zeroes: &[(u64, u64)]) {
    write_random_file(path, len, seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("reopen random file");
    for &(off, n) in zeroes {
        assert!(off + n <= len, "zero range past the end of the file");
        f.seek(SeekFrom::Start(off)).expect("seek");
        let mut left = n;
        let zero = vec![0u8; MIB as usize];
        while left > 0 {
            let k = left.min(MIB);
            f.write_all(&zero[..k as usize]).expect("write zeroes");
            left -= k;
        }
    }
    f.sync_all().expect("sync");
}

/// Lower-cased `s` contains any of `needles` (lower-cased).
pub fn mentions_any(s: &str, needles: &[&str]) -> bool {
    let s = s.to_lowercase();
    needles.iter().any(|n| s.contains(&n.to_lowercase()))
}
