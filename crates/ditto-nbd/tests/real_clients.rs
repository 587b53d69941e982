//! Interoperability: drives the server with the real NBD clients (qemu-img and qemu-io from
//! qemu-utils, nbdinfo and nbdcopy from libnbd-bin) over loopback TCP.
//!
//! A missing client binary fails the test with the Debian package to install:
//! silently skipping would let an interop regression through.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ditto_nbd::memory::{MemExport, MemRegistry};
use ditto_nbd::{Server, ServerConfig};

const SIZE: u64 = 16 << 20;

struct Harness {
    _rt: tokio::runtime::Runtime,
    server: Arc<Server>,
    port: u16,
    disk: Arc<MemExport>,
}

impl Harness {
    fn start() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let disk = Arc::new(MemExport::new(SIZE));
        let ro = Arc::new(MemExport::new(SIZE).read_only(true));
        let reg = Arc::new(MemRegistry::new());
        reg.insert("disk", "scratch disk", disk.clone());
        reg.insert("ro", "read-only disk", ro);
        let server = Server::new(reg, ServerConfig::default());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        rt.spawn(server.clone().serve_tcp(listener));
        Harness {
            _rt: rt,
            server,
            port,
            disk,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Fails (not skips) when `bin` is missing, naming the package to install.
fn require(bin: &str, package: &str) {
    match Command::new(bin).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{bin} --version failed ({}): reinstall the Debian package {package}",
            o.status
        ),
        Err(e) => panic!(
            "{bin} is not installed ({e}); these interoperability tests need it: \
             apt-get install {package}"
        ),
    }
}

/// Runs `cmd`, asserts it succeeded, returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Deterministic pseudo-random image with a zero run in the middle (so
/// sparse-aware copies take their hole paths).
fn make_image(path: &Path) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut img: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    img[(4 << 20)..(7 << 20)].fill(0);
    std::fs::write(path, &img).expect("write image");
    img
}

/// Parses `nbdinfo --map` lines into (offset, length, type).
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    require("nbdinfo", "libnbd-bin");
    let h = Harness::start();
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://127.0.0.1:{}", h.port)));
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("export=\"ro\""), "{list}");
    assert!(list.contains("description: scratch disk"), "{list}");

    let info = run(Command::new("nbdinfo").arg(h.uri("disk")));
    for want in [
        "export-size: 16777216",
        "base:allocation",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_df: true",
        "can_multi_conn: true",
        "can_fast_zero: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "using structured packets",
    ] {
        assert!(info.contains(want), "missing {want:?} in:\n{info}");
    }
    let ro = run(Command::new("nbdinfo").arg(h.uri("ro")));
    assert!(ro.contains("is_read_only: true"), "{ro}");

    let missing = Command::new("nbdinfo")
        .arg(h.uri("nope"))
        .output()
        .expect("spawn nbdinfo");
    assert!(
        !missing.status.success(),
        "nbdinfo on unknown export must fail"
    );
}

#[test]
fn qemu_io_writes_and_reads_back_and_nbdinfo_maps_it() {
    require("qemu-io", "qemu-utils");
    require("nbdinfo", "libnbd-bin");
    let h = Harness::start();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0xab 0 1M"])
        .args(["-c", "read -P 0xab 0 1M"])
        .args(["-c", "write -P 0xcd 3M 64k"])
        .args(["-c", "read -P 0xcd 3M 64k"])
        .args(["-c", "flush"])
        .arg(h.uri("disk")));
    assert!(
        out.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 3145728"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let snap = h.disk.snapshot();
    assert!(snap[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(snap[(3 << 20)..(3 << 20) + 65536]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(snap[1 << 20..3 << 20].iter().all(|&b| b == 0));

    let map = parse_map(&run(Command::new("nbdinfo")
        .arg("--map")
        .arg(h.uri("disk"))));
    assert_eq!(
        map,
        vec![
            (0, 1 << 20, 0),
            (1 << 20, 2 << 20, 3),
            (3 << 20, 65536, 0),
            ((3 << 20) + 65536, SIZE - (3 << 20) - 65536, 3),
        ]
    );

    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the read-only export
    // for writing (the server-side EPERM is covered by tests/protocol.rs).
    let ro = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 4k"])
        .arg(h.uri("ro"))
        .output()
        .expect("spawn qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ro.stdout),
        String::from_utf8_lossy(&ro.stderr)
    );
    assert!(
        !ro.status.success(),
        "write to read-only export succeeded: {text}"
    );
    assert!(text.contains("Permission denied"), "{text}");
    // Reading it is fine.
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0 0 64k"])
        .arg(h.uri("ro")));
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert_eq!(h.disk.out_of_range_calls(), 0);
}

#[test]
fn qemu_img_convert_round_trip() {
    require("qemu-img", "qemu-utils");
    let h = Harness::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let img = make_image(&src);

    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(h.uri("disk")));
    assert!(
        h.disk.snapshot() == img,
        "export differs from source after convert"
    );

    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(h.uri("disk"))
        .arg(&back));
    let got = std::fs::read(&back).expect("read back");
    assert!(got == img, "image read back through NBD differs");

    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(h.uri("disk")));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_eq!(h.disk.out_of_range_calls(), 0);
}

#[test]
fn nbdcopy_round_trip() {
    require("nbdcopy", "libnbd-bin");
    let h = Harness::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let img = make_image(&src);

    run(Command::new("nbdcopy").arg(&src).arg(h.uri("disk")));
    assert!(
        h.disk.snapshot() == img,
        "export differs from source after nbdcopy"
    );

    // Several connections at once, multi-conn being advertised.
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(h.uri("disk"))
        .arg(&back));
    let got = std::fs::read(&back).expect("read back");
    assert!(got == img, "image copied out through NBD differs");
    assert_eq!(h.disk.out_of_range_calls(), 0);
}
