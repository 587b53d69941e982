//! Two nodes on a real network: each daemon runs in a network namespace
//! this test creates (`ip netns add`), joined by a veth pair with addresses
//! only inside them, and talks to the other over mutual TLS (plain TCP is
//! refused off loopback). The link is cut with `ip link set … down`, which
//! sends no reset: the primary must fail the replica out within
//! `io_timeout_secs`, acknowledge writes on its own, and catch node b up by
//! itself when the link comes back. Everything it made is removed at the end.
//!
//! Network namespaces need root. Without them the test says so and stops;
//! `two_nodes.rs` runs the same paths on loopback.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const SIZE: u64 = 32 * MIB;

/// The namespaces and the veth pair, removed on drop (also on panic).
struct Net {
    ns: [String; 2],
    addr: [String; 2],
}

fn ip(args: &[&str]) -> Output {
    run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10))
}

impl Net {
    fn create() -> Option<Net> {
        let tag = std::process::id() % 10000;
        let ns = [format!("dtA{tag}"), format!("dtB{tag}")];
        let subnet = 200 + (tag % 50);
        let addr = [format!("10.{subnet}.7.1"), format!("10.{subnet}.7.2")];
        let net = Net { ns, addr };
        for n in &net.ns {
            if !ip(&["netns", "add", n]).success() {
                return None;
            }
        }
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        let steps: Vec<Vec<String>> = vec![
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &net.ns[0]],
            vec!["link", "set", &vb, "netns", &net.ns[1]],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&args).assert_success();
        }
        for (i, dev) in [va, vb].iter().enumerate() {
            let ns = net.ns[i].as_str();
            let cidr = format!("{}/24", net.addr[i]);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev]).assert_success();
            ip(&["-n", ns, "link", "set", dev, "up"]).assert_success();
            ip(&["-n", ns, "link", "set", "lo", "up"]).assert_success();
        }
        Some(net)
    }

    fn dev(&self, i: usize) -> String {
        let tag = std::process::id() % 10000;
        format!("{}{tag}", ["va", "vb"][i])
    }

    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns[0],
            "link",
            "set",
            &self.dev(0),
            if up { "up" } else { "down" },
        ])
        .assert_success();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// Run `cmd` inside namespace `ns`.
fn in_ns(ns: &str, cmd: &Path, args: &[&str]) -> Output {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(cmd).args(args);
    run_with_timeout(&mut c, TOOL_TIMEOUT)
}

fn write_in(ns: &str, d: &Daemon, pattern: u8, offset: u64, len: u64) -> Output {
    let cmd = format!("write -P {pattern:#x} {offset} {len}");
    in_ns(
        ns,
        &qemu_io_bin(),
        &["-f", "raw", "-c", &cmd, "-c", "flush", &d.uri("vm1")],
    )
}

#[test]
fn a_cut_link_between_namespaces_fails_the_replica_out_and_heals_by_itself() {
    let Some(net) = Net::create() else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip netns`); two_nodes.rs covers these paths on loopback");
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("ditto-netns-")
        .tempdir()
        .expect("tempdir");
    let cert = |args: &[&str]| {
        run_with_timeout(Command::new(DITTO).args(args), CLI_TIMEOUT).assert_success();
    };
    let ca = dir.path().join("ca");
    cert(&["cert", "ca", "--out", s(&ca)]);
    let names = ["a", "b"];
    let mut daemons = Vec::new();
    let mut pools = Vec::new();
    for i in 0..2 {
        let (me, other) = (names[i], names[1 - i]);
        let certs = dir.path().join(format!("cert-{me}"));
        cert(&[
            "cert",
            "node",
            me,
            "--san",
            &net.addr[i],
            "--ca",
            s(&ca),
            "--out",
            s(&certs),
        ]);
        let config = format!(
            "node_name = \"{me}\"\npeer_listen = \"{}:10811\"\nio_timeout_secs = 2\npeer_reconnect_secs = 1\n[nodes.{other}]\naddress = \"{}:10811\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            net.addr[i],
            net.addr[1 - i],
            ca.join("ca.pem").display(),
            certs.join("node.pem").display(),
            certs.join("node.key").display()
        );
        let cfg = dir.path().join(format!("{me}.toml"));
        std::fs::write(&cfg, config).expect("config");
        let data = dir.path().join(format!("{me}-data"));
        let pool = dir.path().join(format!("{me}-p0"));
        std::fs::create_dir(&data).expect("data dir");
        std::fs::create_dir(&pool).expect("pool dir");
        let d = Daemon::start_in_netns(&net.ns[i], &data, &["--config", s(&cfg)]);
        d.cli_ok(&["pool", "create", "p0", "--path", s(&pool)]);
        daemons.push(d);
        pools.push(pool);
    }
    let (a, b) = (&daemons[0], &daemons[1]);
    let list = a.cli_json(&["node", "list"]);
    assert_eq!(
        list[0]["connected"], true,
        "node b over TLS on the veth: {list:#}"
    );

    let size = SIZE.to_string();
    a.cli_ok(&["volume", "create", "vm1", "--size", &size, "--nodes", "a,b"]);
    a.wait_healthy("vm1");
    let out = write_in(&net.ns[0], a, 0x5a, 0, 4 * MIB);
    assert!(!qemu_io_failed(&out), "{}", out.describe());
    assert!(
        replica_data(&pools[1])[..4 * MIB as usize]
            .iter()
            .all(|x| *x == 0x5a),
        "node b's replica lacks the write"
    );

    // Cut: no reset reaches either side; the write waits at most io_timeout.
    net.link(false);
    let started = std::time::Instant::now();
    let out = write_in(&net.ns[0], a, 0x6b, 8 * MIB, 2 * MIB);
    assert!(
        !qemu_io_failed(&out),
        "the primary did not go on alone: {}",
        out.describe()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the cut replica held the write for {:?}",
        started.elapsed()
    );
    let v = a.volume("vm1");
    assert_eq!(v["state"], "degraded", "{v:#}");

    net.link(true);
    let v = a.wait_healthy("vm1");
    let copied = v["copied_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        copied < SIZE / 2,
        "a full copy ({copied} bytes) after a short cut: {v:#}"
    );
    let on_b = replica_data(&pools[1]);
    assert!(on_b[8 * MIB as usize..10 * MIB as usize]
        .iter()
        .all(|x| *x == 0x6b));
    assert!(
        replica_data(&pools[0])[..SIZE as usize] == on_b[..SIZE as usize],
        "the replicas differ after the catch-up"
    );
    let st = b.status();
    assert_eq!(st["held"][0]["primary"], "a", "{st:#}");
}
