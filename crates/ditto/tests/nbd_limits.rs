//! The daemon's NBD limits come from its config file: a connection beyond
//! `nbd_max_connections` is refused with a log line that names the setting,
//! and unfinished handshakes are closed after `nbd_handshake_timeout_secs`,
//! releasing the daemon's descriptors (counted in /proc/PID/fd).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Reads the 18-byte greeting, or says the server closed without one.
fn greeted(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).is_ok() && g[..8] == *b"NBDMAGIC"
}

fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn daemon_applies_nbd_connection_limit_and_handshake_timeout() {
    const LIMIT: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cfg = dir.path().join("ditto.toml");
    std::fs::write(
        &cfg,
        format!("nbd_max_connections = {LIMIT}\nnbd_handshake_timeout_secs = 1\n"),
    )
    .expect("write config");
    let mut d = Daemon::start_with(&data, &["--config", s(&cfg)]);
    let before = daemon_fds(d.pid);

    let mut held: Vec<TcpStream> = (0..LIMIT)
        .map(|_| {
            let mut c = TcpStream::connect(&d.nbd).expect("connect");
            assert!(greeted(&mut c), "served below the limit");
            c
        })
        .collect();
    let with_held = daemon_fds(d.pid);
    assert!(
        with_held >= before + LIMIT,
        "daemon descriptors: {before} before, {with_held} with {LIMIT} connections"
    );
    let mut extra = TcpStream::connect(&d.nbd).expect("connect");
    let start = Instant::now();
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(2)),
        "a connection beyond nbd_max_connections must be refused"
    );
    assert!(start.elapsed() < Duration::from_secs(1), "refused promptly");
    wait_until("the refusal in the log", Duration::from_secs(5), || {
        d.stderr().contains("nbd_max_connections").then_some(())
    });

    // None of the held connections finishes its handshake: closed after 1 s.
    for (i, c) in held.iter_mut().enumerate() {
        assert!(
            closed_by_server(c, Duration::from_secs(5)),
            "unfinished handshake {i} still open"
        );
    }
    wait_until(
        "the daemon's descriptors to be released",
        Duration::from_secs(5),
        || (daemon_fds(d.pid) <= before).then_some(()),
    );
    eprintln!(
        "daemon descriptors: {before} before, {with_held} with {LIMIT} unfinished handshakes, {} after the timeout",
        daemon_fds(d.pid)
    );
    d.stop();
}
