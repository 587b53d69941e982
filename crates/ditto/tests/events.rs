//! `ditto events` and `GET /v1/events` against a real daemon: empty log,
//! history reloaded from `events.jsonl`, filters, paging, long poll, `--follow`
//! (Ctrl-C, daemon gone), strict query and config checking.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A plain HTTP/1.1 GET (the CLI cannot send malformed queries): (status, body).
fn http_get(api: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).unwrap_or_else(|e| panic!("connect {api}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn record(seq: u64, kind: &str, volume: &str, replica: Option<&str>) -> Value {
    json!({
        "v": 1, "seq": seq, "time_unix_ms": 1_700_000_000_000u64 + seq * 1000,
        "kind": kind, "volume": volume, "replica": replica,
        "message": format!("{kind} on {volume}"), "progress": null,
    })
}

/// Writes `lines` as DATA_DIR/events.jsonl, as an earlier run would have.
fn seed(data: &Path, lines: &[Value], torn_tail: bool) {
    std::fs::create_dir_all(data).expect("mkdir data");
    let mut f = File::create(data.join("events.jsonl")).expect("create events.jsonl");
    for l in lines {
        writeln!(f, "{l}").expect("write event line");
    }
    if torn_tail {
        // A crash in the middle of an append.
        write!(f, r#"{{"v":1,"seq":99999,"kind":"repl"#).expect("write torn line");
    }
}

fn json_lines(out: &Output) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{}", out.describe()))
        })
        .collect()
}

fn seqs(v: &[Value]) -> Vec<u64> {
    v.iter().map(|e| e["seq"].as_u64().expect("seq")).collect()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ditto-events-")
        .tempdir()
        .expect("tempdir")
}

/// `ditto events ARGS` in the background against `d`, stdout and stderr to files.
struct Follower {
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Follower {
    fn start(d: &Daemon, dir: &Path, args: &[&str]) -> Follower {
        let stdout = dir.join("follow.out");
        let stderr = dir.join("follow.err");
        let child = d
            .cli_cmd(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create follow.out"))
            .stderr(File::create(&stderr).expect("create follow.err"))
            .spawn()
            .expect("spawn ditto events --follow");
        Follower {
            child,
            stdout,
            stderr,
        }
    }

    fn out(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_output(&self, what: &str, f: impl Fn(&str) -> bool) {
        wait_until(what, Duration::from_secs(30), || {
            f(&self.out()).then_some(())
        });
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn empty_log() {
    let node = Node::new();
    let out = node.daemon.cli_ok(&["events", "--json"]);
    assert_eq!(out.stdout, "", "no events, no lines: {}", out.describe());
    let out = node.daemon.cli_ok(&["events"]);
    assert_eq!(out.stdout.trim(), "no events");
    let (status, body) = http_get(&node.daemon.api, "/v1/events");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v, json!({"events": [], "next": 0}));
}

#[test]
fn strict_query_and_long_poll() {
    let node = Node::new();
    let api = &node.daemon.api;
    for bad in [
        "/v1/events?bogus=1",
        "/v1/events?since=1&folow=1",
        "/v1/events?since=-1",
        "/v1/events?limit=0",
        "/v1/events?volume=../x",
    ] {
        let (status, body) = http_get(api, bad);
        assert_eq!(status, 400, "{bad} should be refused: {body}");
        let v: Value = serde_json::from_str(&body).expect("error body is JSON");
        assert!(v["error"].is_string() && v["code"].is_string(), "{body}");
    }
    let (_, body) = http_get(api, "/v1/events?bogus=1");
    assert!(
        body.contains("bogus"),
        "the error names the parameter: {body}"
    );

    // Nothing happens: the long poll ends after wait_ms with nothing.
    let t = Instant::now();
    let (status, body) = http_get(api, "/v1/events?since=0&wait_ms=400&limit=5");
    assert_eq!(status, 200, "{body}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"events": [], "next": 0})
    );

    let (_, doc) = http_get(api, "/v1/openapi.json");
    let doc: Value = serde_json::from_str(&doc).expect("OpenAPI JSON");
    assert!(doc["paths"]["/v1/events"]["get"].is_object(), "{doc:#}");
}

#[test]
fn history_survives_restart_and_filters_work() {
    let dir = tempdir();
    let data = dir.path().join("data");
    seed(
        &data,
        &[
            record(1, "volume_started", "alpha", None),
            record(
                2,
                "replica_failed",
                "alpha",
                Some("/pools/p1/alpha.replica"),
            ),
            record(3, "degraded_start", "beta", Some("/pools/p2/beta.replica")),
        ],
        true,
    );
    let d = Daemon::start(&data);

    let all = json_lines(&d.cli_ok(&["events", "--json"]));
    assert_eq!(seqs(&all), [1, 2, 3], "the torn last line is skipped");
    assert_eq!(all[1]["kind"], "replica_failed");
    assert_eq!(all[1]["replica"], "/pools/p1/alpha.replica");
    assert_eq!(all[1]["v"], 1);

    let alpha = json_lines(&d.cli_ok(&["events", "--json", "--volume", "alpha"]));
    assert_eq!(seqs(&alpha), [1, 2]);
    let after = json_lines(&d.cli_ok(&["events", "--json", "--since", "2"]));
    assert_eq!(seqs(&after), [3]);
    d.cli(&["events", "--volume", "no/such"]).assert_failure();

    let table = d.cli_ok(&["events"]).stdout;
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    for col in ["TIME", "SEQ", "KIND", "VOLUME", "REPLICA", "MESSAGE"] {
        assert!(header.contains(col), "{table}");
    }
    let row = lines.nth(1).expect("second row");
    assert!(row.starts_with("2023-11-14T22:13:22.000Z"), "{table}");
    assert!(
        row.contains("replica_failed") && row.contains("/pools/p1/alpha.replica"),
        "{table}"
    );
}

#[test]
fn only_the_newest_thousand_are_kept_and_paged() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let lines: Vec<Value> = (1..=1200)
        .map(|i| record(i, "volume_started", &format!("v{}", i % 7), None))
        .collect();
    seed(&data, &lines, false);
    let d = Daemon::start(&data);
    let all = json_lines(&d.cli_ok(&["events", "--json"]));
    assert_eq!(all.len(), 1000);
    assert_eq!(seqs(&all).first(), Some(&201));
    assert_eq!(seqs(&all).last(), Some(&1200));
    let (_, body) = http_get(&d.api, "/v1/events?since=1100&limit=30");
    let page: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(30));
    assert_eq!(page["next"], 1130);
}

#[test]
fn follow_shows_the_latest_and_exits_0_on_ctrl_c() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let lines: Vec<Value> = (1..=15)
        .map(|i| record(i, "scrub_finished", "vol", None))
        .collect();
    seed(&data, &lines, false);
    let d = Daemon::start(&data);

    // Without --since, the last 10, as `tail -f` does.
    let f = Follower::start(&d, dir.path(), &["events", "--follow", "--json"]);
    f.wait_output("the last 10 events", |o| o.lines().count() >= 10);
    std::thread::sleep(Duration::from_millis(200));
    let shown: Vec<Value> = f
        .out()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(seqs(&shown), (6..=15).collect::<Vec<_>>());
    let mut f = f;
    send_signal(f.child.id(), libc::SIGINT);
    let st = wait_child(&mut f.child, Duration::from_secs(30)).expect("follower exits on SIGINT");
    assert!(st.success(), "exit status {st}, stderr: {}", f.err());

    // The table form prints its header once, then rows.
    let f = Follower::start(&d, dir.path(), &["events", "--follow", "--since", "13"]);
    f.wait_output("header and two rows", |o| o.lines().count() >= 3);
    let out = f.out();
    assert!(out.starts_with("TIME"), "{out}");
    assert!(
        out.lines().nth(2).is_some_and(|l| l.contains(" 15 ")),
        "{out}"
    );
}

#[test]
fn follow_fails_when_the_daemon_goes_away() {
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut d = Daemon::start(&data);
    let mut f = Follower::start(&d, dir.path(), &["events", "--follow"]);
    f.wait_output("the header", |o| o.starts_with("TIME"));
    // The follower is now in a long poll; a clean daemon stop must not wait for it.
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    let st = wait_child(&mut f.child, Duration::from_secs(60))
        .expect("follower exits when the daemon is gone");
    assert!(!st.success(), "should fail, exited {st}");
    assert!(f.err().contains("error"), "stderr: {}", f.err());
}

#[test]
fn event_program_in_config_is_checked() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let daemon = |cfg: &str| {
        let path = dir.path().join("ditto.toml");
        std::fs::write(&path, cfg).expect("write config");
        let mut c = Command::new(DITTO);
        c.arg("daemon")
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(&data)
            .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
        run_with_timeout(&mut c, Duration::from_secs(60))
    };

    let out =
        daemon("event_program = \"/bin/true\"\nevent_programm = \"/bin/true\"\n").assert_failure();
    for want in ["event_programm", "line 2", "column"] {
        assert!(out.stderr.contains(want), "{want}: {}", out.describe());
    }
    let out = daemon("event_program = \"notify.sh\"\n").assert_failure();
    assert!(out.stderr.contains("absolute"), "{}", out.describe());
    let missing = dir.path().join("no-such-program");
    let out = daemon(&format!(
        "event_program = {:?}\n",
        missing.display().to_string()
    ))
    .assert_failure();
    assert!(out.stderr.contains("no-such-program"), "{}", out.describe());

    // A good one: the daemon starts and serves events.
    let prog = dir.path().join("notify.sh");
    std::fs::write(&prog, "#!/bin/sh\nexit 0\n").expect("write program");
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let cfg = dir.path().join("good.toml");
    std::fs::write(
        &cfg,
        format!("event_program = {:?}\n", prog.display().to_string()),
    )
    .expect("write config");
    let mut d = Daemon::start_with(&data, &["--config", s(&cfg)]);
    d.cli_ok(&["events", "--json"]);
    d.stop();
}
