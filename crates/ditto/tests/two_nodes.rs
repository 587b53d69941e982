//! A volume replicated to a second node (two real daemons on loopback,
//! plain peer protocol): `--pool b:p0` creates the replica on node b through
//! its daemon, writes reach both machines, a kill -9 of node b fails its
//! replica out without losing an acknowledged write, and a re-add after it
//! comes back catches up only what it missed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SIZE: u64 = 32 * MIB;

/// A port for a daemon's peer listener (which must be known before the
/// daemon starts, for the others' configs), below the kernel's ephemeral
/// range (32768 and up on Linux). An ephemeral port picked here was free
/// only until the daemon bound it: meanwhile another test's
/// `--nbd-listen 127.0.0.1:0` or outgoing connection could take it, and
/// the daemon failed with "Address already in use" (1 run in 5 of this
/// file once it had 15 tests). Ports here are unique within the process
/// (a counter) and spread across processes (the pid).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = (std::process::id() % 400) as u16 * 30;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base + n) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
}

/// A node's files under the test's directory: NAME.toml, NAME-data, NAME-p0.
struct NodeFiles {
    cfg: PathBuf,
    data: PathBuf,
    pool: PathBuf,
}

/// Write node `name`'s config, start its daemon and create its pool `p0`.
fn start_node(dir: &Path, name: &str, config: &str) -> (Daemon, NodeFiles) {
    let files = NodeFiles {
        cfg: dir.join(format!("{name}.toml")),
        data: dir.join(format!("{name}-data")),
        pool: dir.join(format!("{name}-p0")),
    };
    std::fs::write(&files.cfg, config).expect("write config");
    std::fs::create_dir(&files.data).expect("data dir");
    std::fs::create_dir(&files.pool).expect("pool dir");
    let d = Daemon::start_with(&files.data, &["--config", s(&files.cfg)]);
    d.cli_ok(&["pool", "create", "p0", "--path", s(&files.pool)]);
    (d, files)
}

fn qemu_write(uri: &str, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern:#x} {offset} {len}");
    let out = qemu_io_ok(uri, &[cmd]);
    assert!(!qemu_io_failed(&out), "{}", out.describe());
}

#[test]
fn a_volume_replicated_to_another_node_survives_its_death() {
    two_nodes(false);
}

/// The same, without the operator: the primary reconnects by itself once
/// node b answers again (`peer_reconnect_secs`) and catches it up.
#[test]
fn a_returning_node_is_reconnected_and_caught_up_by_itself() {
    two_nodes(true);
}

/// Node b hangs (SIGSTOP: its connections stay open, nothing answers). The
/// primary fails its replica out within io_timeout and acknowledges writes
/// with its own replica; when node b wakes (SIGCONT), requests it still had
/// from the old connection cannot land over the catch-up (each hello makes
/// the new connection the only one), and it is caught up by itself.
#[test]
fn a_hung_node_is_failed_out_within_io_timeout_and_caught_up() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-hang-")
        .tempdir()
        .expect("tempdir");
    let peer_port = free_port();
    let (b, b_files) = start_node(
        dir.path(),
        "b",
        &format!("node_name = \"b\"\npeer_listen = \"127.0.0.1:{peer_port}\"\n"),
    );
    let (a, _a_files) = start_node(dir.path(), "a", &format!(
            "node_name = \"a\"\nio_timeout_secs = 2\npeer_reconnect_secs = 1\n[nodes.b]\naddress = \"127.0.0.1:{peer_port}\"\n"
        ));
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");
    let uri = a.uri("vm1");
    qemu_write(&uri, 0x01, 0, MIB);

    send_signal(b.pid, libc::SIGSTOP);
    let started = std::time::Instant::now();
    qemu_write(&uri, 0x02, 0, MIB);
    let took = started.elapsed();
    let v = a.volume("vm1");
    let remote = replicas(&v)
        .into_iter()
        .find(|r| r.pool == "b:p0")
        .expect("remote replica");
    assert_eq!(remote.state, "failed", "{v:#}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "the write waited {took:?}"
    );
    qemu_write(&uri, 0x03, 8 * MIB, MIB);
    // Newer data over the range whose write node b still holds, unanswered.
    qemu_write(&uri, 0x04, 0, MIB);

    send_signal(b.pid, libc::SIGCONT);
    a.wait_healthy("vm1");
    let copy = dir.path().join("copy.raw");
    run_with_timeout(Command::new(nbdcopy()).args([&uri, s(&copy)]), TOOL_TIMEOUT).assert_success();
    let data = std::fs::read(&copy).unwrap();
    assert!(
        data[..MIB as usize].iter().all(|x| *x == 0x04),
        "an acknowledged write was lost"
    );
    assert!(data[8 * MIB as usize..9 * MIB as usize]
        .iter()
        .all(|x| *x == 0x03));
    assert!(
        replica_data(&b_files.pool)[..SIZE as usize] == data[..],
        "node b's replica differs after the catch-up (a late write from the hung connection?)"
    );
}

fn two_nodes(auto_reconnect: bool) {
    let reconnect = if auto_reconnect {
        "peer_reconnect_secs = 1\n"
    } else {
        "peer_reconnect_secs = 0\n"
    };
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-")
        .tempdir()
        .expect("tempdir");
    let peer_port = free_port();
    // Node b: holds a replica for node a.
    let (mut b, b_files) = start_node(
        dir.path(),
        "b",
        &format!(
            "node_name = \"b\"\npeer_listen = \"127.0.0.1:{peer_port}\"\nio_timeout_secs = 2\n"
        ),
    );

    // Node a: the primary, one local replica and one on b.
    let (a, a_files) = start_node(dir.path(), "a", &format!(
            "node_name = \"a\"\nio_timeout_secs = 2\n{reconnect}[nodes.b]\naddress = \"127.0.0.1:{peer_port}\"\n"
        ));
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    let v = a.wait_healthy("vm1");
    let reps = replicas(&v);
    assert!(
        reps.iter()
            .any(|r| r.pool == "b:p0" && r.path.to_string_lossy().starts_with("peer://")),
        "the replica on node b: {v:#}"
    );
    let uri = a.uri("vm1");
    // Node b is the secondary: it says who the primary is, and does not
    // serve the volume itself.
    let held = b.status();
    assert_eq!(held["held"][0]["volume"], "vm1", "{held:#}");
    assert_eq!(held["held"][0]["primary"], "a", "{held:#}");
    let shown = b.cli_ok(&["status"]);
    assert!(
        shown.stdout.contains("primary: node a"),
        "{}",
        shown.describe()
    );
    // Its pool counts the held replica: reserved room, one replica, and
    // it cannot be deleted from under it.
    let pools = b.cli_json(&["pool", "list"]);
    assert_eq!(pools[0]["replicas"], 1, "{pools:#}");
    assert!(
        pools[0]["reserved_bytes"]
            .as_u64()
            .is_some_and(|r| r >= SIZE - MIB),
        "the held replica reserves no room: {pools:#}"
    );
    let out = b.cli(&["pool", "delete", "p0"]).assert_failure();
    assert!(out.stderr.contains("held for node a"), "{}", out.describe());
    let out = run_with_timeout(Command::new(nbdinfo()).arg(b.uri("vm1")), TOOL_TIMEOUT);
    assert!(
        !out.status.success(),
        "node b served the volume: {}",
        out.describe()
    );

    // Writes reach node b's disk.
    qemu_write(&uri, 0x11, 0, MIB);
    assert!(
        replica_data(&b_files.pool)[..MIB as usize]
            .iter()
            .all(|x| *x == 0x11),
        "node b lacks the write"
    );

    // Node b dies; writes go on (acknowledged by a alone); b is failed out.
    b.stop_with(libc::SIGKILL);
    qemu_write(&uri, 0x22, 4 * MIB, MIB);
    qemu_write(&uri, 0x33, 0, 4096);
    let v = a.volume("vm1");
    let remote = replicas(&v)
        .into_iter()
        .find(|r| r.pool == "b:p0")
        .expect("remote replica");
    assert_eq!(remote.state, "failed", "{v:#}");
    let shown = a.cli_ok(&["status", "vm1"]);
    assert!(
        shown.stdout.contains("node b unreachable or failed since"),
        "status says since when node b is out: {}",
        shown.describe()
    );

    // Node b comes back; a re-add reconnects and catches up.
    let b2 = Daemon::start_with(&b_files.data, &["--config", s(&b_files.cfg)]);
    if auto_reconnect {
        // No command: node a finds node b again and catches it up.
        let v = a.wait_healthy("vm1");
        let events = a.cli_ok(&["events", "--volume", "vm1"]);
        assert!(
            events.stdout.contains("catch"),
            "a short absence is caught up, not rebuilt: {}\n{v:#}",
            events.describe()
        );
    } else {
        let readd = a.cli_ok(&["replica", "readd", "vm1", "b:p0"]);
        assert!(
            readd.stdout.contains("copying only the"),
            "a short absence is caught up, not rebuilt: {}",
            readd.describe()
        );
    }
    let v = a.wait_healthy("vm1");
    assert!(replicas(&v).iter().all(|r| r.state == "in_sync"), "{v:#}");

    // Every acknowledged write is on both machines, and they agree.
    let copy = dir.path().join("copy.raw");
    run_with_timeout(Command::new(nbdcopy()).args([&uri, s(&copy)]), TOOL_TIMEOUT).assert_success();
    let data = std::fs::read(&copy).unwrap();
    assert!(data[..4096].iter().all(|x| *x == 0x33));
    assert!(data[4096..MIB as usize].iter().all(|x| *x == 0x11));
    assert!(data[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|x| *x == 0x22));
    let local = reps.iter().find(|r| r.pool == "p0").expect("local replica");
    let local_data = read_replica(local, 0, SIZE as usize);
    assert!(
        local_data == data,
        "the local replica differs from what the volume serves"
    );
    assert!(
        replica_data(&b_files.pool)[..SIZE as usize] == data[..],
        "node b's replica differs after the catch-up"
    );

    // Node a restarts: it reconnects to node b at start, both in sync.
    let mut a = a;
    a.stop();
    let a = Daemon::start_with(&a_files.data, &["--config", s(&a_files.cfg)]);
    let v = a.wait_healthy("vm1");
    assert!(replicas(&v).iter().all(|r| r.state == "in_sync"), "{v:#}");
    let again = dir.path().join("again.raw");
    run_with_timeout(
        Command::new(nbdcopy()).args([&a.uri("vm1"), s(&again)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert!(
        std::fs::read(&again).unwrap() == data,
        "data changed across a restart"
    );

    // Deleting the volume deletes its replica on node b too.
    a.cli_ok(&["volume", "delete", "vm1"]);
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let files = std::fs::read_dir(&b_files.pool).unwrap().count();
        files == 0
    });
    assert!(gone, "node b kept the deleted volume's replica file");
    let held = b2.status();
    assert!(
        held["held"].as_array().is_some_and(Vec::is_empty),
        "node b still lists the replica: {held:#}"
    );
}

#[test]
fn a_pool_on_an_unknown_node_is_refused_and_nothing_is_created() {
    let node = Node::with_pools(1);
    let out = node.daemon.cli(&[
        "volume", "create", "vm1", "--size", "16M", "--pool", "p0", "--pool", "zz:p0",
    ]);
    let out = out.assert_failure();
    assert!(
        out.stderr.contains("zz") && out.stderr.contains("[nodes.zz]"),
        "the refusal should name the node and the fix: {}",
        out.describe()
    );
    assert!(node.daemon.volume_names().is_empty());
}

/// Two nodes with the cluster's certificates (mutual TLS on the peer
/// protocol): the replicated volume works, and a node whose certificate is
/// from another CA cannot create or reach replicas on node b.
#[test]
fn nodes_with_cluster_certificates_replicate_over_tls() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-tls-")
        .tempdir()
        .expect("tempdir");
    let cert = |args: &[&str]| {
        run_with_timeout(Command::new(DITTO).args(args), CLI_TIMEOUT).assert_success();
    };
    let ca = dir.path().join("ca");
    cert(&["cert", "ca", "--out", s(&ca)]);
    let other_ca = dir.path().join("other-ca");
    cert(&["cert", "ca", "--out", s(&other_ca)]);
    for n in ["a", "b"] {
        let out = dir.path().join(format!("cert-{n}"));
        cert(&[
            "cert",
            "node",
            n,
            "--san",
            "127.0.0.1",
            "--ca",
            s(&ca),
            "--out",
            s(&out),
        ]);
    }
    let evil = dir.path().join("cert-evil");
    cert(&["cert", "node", "a", "--ca", s(&other_ca), "--out", s(&evil)]);
    let tls = |ca_dir: &Path, node_dir: &Path| {
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca_dir.join("ca.pem").display(),
            node_dir.join("node.pem").display(),
            node_dir.join("node.key").display()
        )
    };
    let peer_port = free_port();
    let (b, b_files) = start_node(dir.path(), "b", &format!(
            "node_name = \"b\"\npeer_listen = \"127.0.0.1:{peer_port}\"\n[nodes.a]\naddress = \"127.0.0.1:1\"\n{}",
            tls(&ca, &dir.path().join("cert-b"))
        ));

    let node_a = |name: &str, node_dir: &Path, ca_dir: &Path| {
        let config = format!(
            "node_name = \"a\"\nio_timeout_secs = 2\n[nodes.b]\naddress = \"127.0.0.1:{peer_port}\"\n{}",
            tls(ca_dir, node_dir)
        );
        start_node(dir.path(), name, &config).0
    };
    // An impostor "a" with a certificate from another CA gets nothing.
    let impostor = node_a("evil", &evil, &other_ca);
    let out = impostor
        .cli(&[
            "volume", "create", "vm0", "--size", "16M", "--pool", "p0", "--pool", "b:p0",
        ])
        .assert_failure();
    assert!(out.stderr.contains("TLS"), "{}", out.describe());
    assert!(
        b.status()["held"].as_array().is_some_and(Vec::is_empty),
        "node b created a replica for an impostor"
    );

    let events = b.cli_ok(&["events"]);
    assert!(
        events.stdout.contains("peer refused") && events.stdout.contains("TLS"),
        "node b's events should say it refused the impostor: {}",
        events.describe()
    );
    let nodes = impostor.cli_json(&["node", "list"]);
    assert_eq!(nodes[0]["name"], "b", "{nodes:#}");
    assert_eq!(nodes[0]["connected"], false, "{nodes:#}");
    assert!(
        nodes[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("TLS")),
        "{nodes:#}"
    );

    let a = node_a("a", &dir.path().join("cert-a"), &ca);
    let nodes = a.cli_json(&["node", "list"]);
    assert_eq!(nodes[0]["connected"], true, "{nodes:#}");
    assert_eq!(nodes[0]["protocol"], 1, "{nodes:#}");
    assert!(
        nodes[0]["rtt_ms"].as_f64().is_some_and(|r| r >= 0.0),
        "{nodes:#}"
    );
    let shown = a.cli_ok(&["node", "list"]);
    assert!(shown.stdout.contains("yes"), "{}", shown.describe());
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x5a, 0, MIB);
    assert!(
        replica_data(&b_files.pool)[..MIB as usize]
            .iter()
            .all(|x| *x == 0x5a),
        "node b lacks the write"
    );
}

/// `replica add --pool NODE:POOL` gives an existing volume a copy on
/// another node: it is rebuilt there in full and joins in sync.
#[test]
fn an_existing_volume_gets_a_replica_on_another_node() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-add-")
        .tempdir()
        .expect("tempdir");
    let peer_port = free_port();
    let (_b, b_files) = start_node(
        dir.path(),
        "b",
        &format!("node_name = \"b\"\npeer_listen = \"127.0.0.1:{peer_port}\"\n"),
    );
    let (a, _a_files) = start_node(
        dir.path(),
        "a",
        &format!("node_name = \"a\"\n[nodes.b]\naddress = \"127.0.0.1:{peer_port}\"\n"),
    );
    let size = SIZE.to_string();
    a.cli_ok(&["volume", "create", "vm1", "--size", &size, "--pool", "p0"]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x77, 3 * MIB, 2 * MIB);
    a.cli_ok(&["replica", "add", "vm1", "--pool", "b:p0"]);
    let v = a.wait_healthy("vm1");
    assert_eq!(replicas(&v).len(), 2, "{v:#}");
    let data = replica_data(&b_files.pool);
    assert!(data[3 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|x| *x == 0x77));
    assert!(data[..3 * MIB as usize].iter().all(|x| *x == 0));
    // A second copy on the same node is refused.
    let out = a
        .cli(&["replica", "add", "vm1", "--pool", "b:p1"])
        .assert_failure();
    assert!(out.stderr.contains("node b"), "{}", out.describe());
}

/// A planned switch-over: `volume promote` on node b makes it the primary
/// (node a hands the volume over, with b's replica in sync, and holds its
/// own replica for b), and promoting on a again switches back. Nothing
/// written on either side is lost, and only the primary serves NBD.
#[test]
fn promote_switches_the_primary_over_and_back() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-promote-")
        .tempdir()
        .expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let start = |me: &str, port: u16, other: &str, other_port: u16| {
        let config = format!(
            "node_name = \"{me}\"\npeer_listen = \"127.0.0.1:{port}\"\nio_timeout_secs = 2\n[nodes.{other}]\naddress = \"127.0.0.1:{other_port}\"\n"
        );
        start_node(dir.path(), me, &config)
    };
    let (a, a_files) = start("a", pa, "b", pb);
    let (b, b_files) = start("b", pb, "a", pa);
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x11, 0, MIB);

    // Refused while a client is connected to the primary (qemu-io holds
    // its connection for 3 s).
    let mut client = Command::new(qemu_io_bin())
        .args(["-f", "raw", "-c", "sleep 3000", &a.uri("vm1")])
        .spawn()
        .expect("qemu-io");
    wait_until(
        "the client to connect",
        std::time::Duration::from_secs(10),
        || {
            let v = a.volume("vm1");
            v["clients"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
                .then_some(())
        },
    );
    let out = b.cli(&["volume", "promote", "vm1"]).assert_failure();
    assert!(
        out.stderr.contains("connected NBD client"),
        "{}",
        out.describe()
    );
    let _ = client.wait();
    let out = b
        .cli(&["volume", "promote", "vm1", "--force"])
        .assert_failure();
    // While node a answers, the override is refused: a planned
    // switch-over loses nothing.
    assert!(out.stderr.contains("without --force"), "{}", out.describe());
    b.cli_ok(&["volume", "promote", "vm1"]);
    let v = b.wait_healthy("vm1");
    assert!(
        replicas(&v).iter().any(|r| r.pool == "a:p0"),
        "node a's replica is a member on b: {v:#}"
    );
    let held = a.status();
    assert_eq!(held["held"][0]["primary"], "b", "{held:#}");
    let out = run_with_timeout(Command::new(nbdinfo()).arg(a.uri("vm1")), TOOL_TIMEOUT);
    assert!(
        !out.status.success(),
        "node a still serves the volume: {}",
        out.describe()
    );

    qemu_write(&b.uri("vm1"), 0x22, MIB, MIB);
    let copy = dir.path().join("on-b.raw");
    run_with_timeout(
        Command::new(nbdcopy()).args([&b.uri("vm1"), s(&copy)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let data = std::fs::read(&copy).unwrap();
    assert!(
        data[..MIB as usize].iter().all(|x| *x == 0x11),
        "a's write lost in the switch-over"
    );
    assert!(data[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|x| *x == 0x22));
    assert!(
        replica_data(&a_files.pool)[..SIZE as usize] == data[..],
        "node a's replica is not mirrored from b"
    );

    // And back, pushed from the primary this time: `demote --to`.
    let out = b
        .cli(&["volume", "demote", "vm1", "--to", "zz"])
        .assert_failure();
    assert!(
        out.stderr.contains("holds no replica"),
        "{}",
        out.describe()
    );
    b.cli_ok(&["volume", "demote", "vm1", "--to", "a"]);
    a.wait_healthy("vm1");
    let back = dir.path().join("on-a.raw");
    run_with_timeout(
        Command::new(nbdcopy()).args([&a.uri("vm1"), s(&back)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data changed switching back"
    );
    assert!(replica_data(&b_files.pool)[..SIZE as usize] == data[..]);
    let out = run_with_timeout(Command::new(nbdinfo()).arg(b.uri("vm1")), TOOL_TIMEOUT);
    assert!(
        !out.status.success(),
        "node b still serves the volume: {}",
        out.describe()
    );

    // A node holding no replica of it cannot promote it.
    let out = b.cli(&["volume", "promote", "nosuch"]).assert_failure();
    assert!(
        out.stderr.contains("holds no replica"),
        "{}",
        out.describe()
    );
}

/// Config of node `me` (peer port `port`) knowing node `other` at `addr`.
fn peer_config(me: &str, port: u16, other: &str, addr: &str) -> String {
    format!(
        "node_name = \"{me}\"\npeer_listen = \"127.0.0.1:{port}\"\nio_timeout_secs = 2\npeer_reconnect_secs = 1\n[nodes.{other}]\naddress = \"{addr}\"\n"
    )
}

/// Nodes a and b on loopback, each the other's peer (node b started
/// first); `a_extra` goes at the top of a's config.
fn pair(
    prefix: &str,
    a_extra: &str,
) -> (tempfile::TempDir, (Daemon, NodeFiles), (Daemon, NodeFiles)) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let b = start_node(
        dir.path(),
        "b",
        &peer_config("b", pb, "a", &format!("127.0.0.1:{pa}")),
    );
    let a = start_node(
        dir.path(),
        "a",
        &format!(
            "{a_extra}{}",
            peer_config("a", pa, "b", &format!("127.0.0.1:{pb}"))
        ),
    );
    (dir, a, b)
}

/// The volume as node `d` serves it, copied to a file and read back.
fn read_all(d: &Daemon, dir: &Path, name: &str) -> Vec<u8> {
    let copy = dir.join(format!("{name}-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&copy);
    run_with_timeout(
        Command::new(nbdcopy()).args([&d.uri(name), s(&copy)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let data = std::fs::read(&copy).expect("read copy");
    let _ = std::fs::remove_file(&copy);
    data
}

fn assert_pattern(data: &[u8], off: u64, len: u64, pattern: u8, what: &str) {
    let r = &data[off as usize..(off + len) as usize];
    let bad = r.iter().position(|x| *x != pattern);
    assert!(
        bad.is_none(),
        "{what}: byte {} of [{off}, +{len}) is {:#x}, not {pattern:#x}",
        bad.unwrap_or(0),
        r[bad.unwrap_or(0)]
    );
}

fn serves(d: &Daemon, name: &str) -> bool {
    run_with_timeout(Command::new(nbdinfo()).arg(d.uri(name)), TOOL_TIMEOUT)
        .status
        .success()
}

/// The primary dies by kill -9 while a client writes and flushes. `volume
/// promote` on node b is refused (a cannot hand over), `--force` takes the
/// volume over: every acknowledged write is there, and b serves on. Node a
/// comes back: it is fenced (b's epoch is newer), does not serve the
/// volume, holds its replica for b, and b catches it up by its dirty map,
/// not a full copy. Then a switch-over back to a shows a holds it all.
#[test]
fn forced_failover_fences_the_old_primary_and_catches_it_up() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-failover-")
        .tempdir()
        .expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let a_cfg = peer_config("a", pa, "b", &format!("127.0.0.1:{pb}"));
    let (mut a, a_files) = start_node(dir.path(), "a", &a_cfg);
    let (b, _b_files) = start_node(
        dir.path(),
        "b",
        &peer_config("b", pb, "a", &format!("127.0.0.1:{pa}")),
    );
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");

    // A client writes 64 KiB blocks, each acknowledged (qemu-io flushes
    // before it exits 0) before the next; node a is killed mid-way.
    const BLOCK: u64 = 64 * KIB;
    let uri = a.uri("vm1");
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..200u64 {
            let pattern = (i % 250 + 1) as u8;
            let out = qemu_io(
                &uri,
                &[
                    format!("write -P {pattern:#x} {} {BLOCK}", i * BLOCK),
                    "flush".into(),
                ],
            );
            if qemu_io_failed(&out) {
                break;
            }
            acked.push(i);
        }
        acked
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    a.stop_with(libc::SIGKILL);
    let acked = writer.join().expect("writer");
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    let out = b.cli(&["volume", "promote", "vm1"]).assert_failure();
    assert!(out.stderr.contains("--force"), "{}", out.describe());
    b.cli_ok(&["volume", "promote", "vm1", "--force"]);
    let data = read_all(&b, dir.path(), "vm1");
    for i in &acked {
        assert_pattern(
            &data,
            i * BLOCK,
            BLOCK,
            (i % 250 + 1) as u8,
            &format!("acknowledged block {i} after failover"),
        );
    }
    let events = b.cli_ok(&["events", "--volume", "vm1"]);
    assert!(events.stdout.contains("by force"), "{}", events.describe());
    // b goes on taking writes while a is away.
    let new_off = 20 * MIB;
    qemu_write(&b.uri("vm1"), 0xEE, new_off, 2 * MIB);

    // Node a comes back: fenced, it stops being the primary.
    let mut a2 = Daemon::start_with(&a_files.data, &["--config", s(&a_files.cfg)]);
    wait_until(
        "node a to step down",
        std::time::Duration::from_secs(30),
        || {
            let st = a2.status();
            (st["held"][0]["primary"] == "b").then_some(())
        },
    );
    assert!(
        !serves(&a2, "vm1"),
        "the fenced old primary still serves vm1"
    );
    let events = a2.cli_ok(&["events", "--volume", "vm1"]);
    assert!(
        events.stdout.contains("superseded"),
        "{}",
        events.describe()
    );

    // b catches a up by itself, copying what a missed, not the whole volume.
    let v = b.wait_healthy("vm1");
    let copied = v["copied_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        copied < SIZE / 2,
        "a full copy ({copied} bytes) where a catch-up was due: {v:#}"
    );
    let data = read_all(&b, dir.path(), "vm1");
    assert_pattern(
        &data,
        new_off,
        2 * MIB,
        0xEE,
        "b's write after the failover",
    );
    assert!(
        replica_data(&a_files.pool)[..SIZE as usize] == data[..],
        "node a's replica differs from the volume after the catch-up"
    );

    // And a planned switch-over back to a serves the same bytes.
    a2.cli_ok(&["volume", "promote", "vm1"]);
    a2.wait_healthy("vm1");
    assert!(
        read_all(&a2, dir.path(), "vm1") == data,
        "data changed switching back"
    );
    assert!(!serves(&b, "vm1"));
    a2.stop();
}

/// A partition (a proxy between the nodes is cut) with writes on both
/// sides: node a fails b's replica out and goes on, node b is promoted by
/// force and takes writes too. When the link heals, the old primary steps
/// down, and the reconnect is a split brain: reported in status and
/// events, never merged. `volume resolve vm1 --keep a` on node a keeps a's
/// side; b's replica is rebuilt from it, and b's writes are gone.
#[test]
fn a_partition_with_writes_on_both_sides_is_a_split_brain_resolved_by_keep() {
    use common::proxy::Proxy;
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-split-")
        .tempdir()
        .expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let to_a = Proxy::start(&format!("127.0.0.1:{pa}"));
    let to_b = Proxy::start(&format!("127.0.0.1:{pb}"));
    let (a, a_files) = start_node(dir.path(), "a", &peer_config("a", pa, "b", &to_b.addr));
    let (b, b_files) = start_node(dir.path(), "b", &peer_config("b", pb, "a", &to_a.addr));
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x11, 0, MIB);

    to_a.cut();
    to_b.cut();
    // Node a fails b out and acknowledges the write with its own replica.
    qemu_write(&a.uri("vm1"), 0x22, MIB, MIB);
    b.cli_ok(&["volume", "promote", "vm1", "--force"]);
    qemu_write(&b.uri("vm1"), 0x33, 2 * MIB, MIB);

    to_a.heal();
    to_b.heal();
    wait_until(
        "node a to step down",
        std::time::Duration::from_secs(30),
        || (a.status()["held"][0]["primary"] == "b").then_some(()),
    );
    assert!(
        !serves(&a, "vm1"),
        "two primaries serve vm1 after the partition healed"
    );
    let v = wait_until(
        "the split brain to be reported",
        std::time::Duration::from_secs(30),
        || {
            let v = b.volume("vm1");
            let split = v["replicas"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["state"] == "split-brain"));
            split.then_some(v)
        },
    );
    assert!(
        v["actions"].to_string().contains("resolve vm1 --keep"),
        "the fix is named: {v:#}"
    );
    let events = b.cli_ok(&["events", "--volume", "vm1"]);
    assert!(
        events.stdout.contains("split brain"),
        "{}",
        events.describe()
    );
    // Not merged: b's data is its own, a's write is not there.
    let on_b = read_all(&b, dir.path(), "vm1");
    assert_pattern(&on_b, 2 * MIB, MIB, 0x33, "b's write during the partition");
    assert_pattern(&on_b, MIB, MIB, 0, "a's write must not be merged into b");

    // The losing side cannot resolve it; the kept side does.
    let out = b
        .cli(&["volume", "resolve", "vm1", "--keep", "a"])
        .assert_failure();
    assert!(out.stderr.contains("on node a"), "{}", out.describe());
    a.cli_ok(&["volume", "resolve", "vm1", "--keep", "a"]);
    a.wait_healthy("vm1");
    let on_a = read_all(&a, dir.path(), "vm1");
    assert_pattern(&on_a, 0, MIB, 0x11, "the write before the partition");
    assert_pattern(
        &on_a,
        MIB,
        MIB,
        0x22,
        "a's write during the partition (kept)",
    );
    assert_pattern(
        &on_a,
        2 * MIB,
        MIB,
        0,
        "b's write during the partition (discarded)",
    );
    assert!(
        replica_data(&b_files.pool)[..SIZE as usize] == on_a[..],
        "node b's replica was not rebuilt from a"
    );
    assert!(
        replica_data(&a_files.pool)[..SIZE as usize] == on_a[..],
        "node a's own replica differs from what it serves"
    );
    assert!(!serves(&b, "vm1"));
    let events = a.cli_ok(&["events", "--volume", "vm1"]);
    assert!(events.stdout.contains("resolved"), "{}", events.describe());
}

/// Three nodes, each dialing the others through its own proxies, with
/// `quorum = "majority"`: node X is isolated by cutting every proxy to and
/// from it.
struct ThreeNodes {
    _dir: tempfile::TempDir,
    nodes: Vec<(Daemon, NodeFiles)>,
    /// proxies[(from, to)]: how node `from` reaches node `to`.
    proxies: std::collections::BTreeMap<(usize, usize), common::proxy::Proxy>,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

impl ThreeNodes {
    fn start() -> ThreeNodes {
        let dir = tempfile::Builder::new()
            .prefix("ditto-3n-")
            .tempdir()
            .expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut proxies = std::collections::BTreeMap::new();
        for from in 0..3 {
            for (to, port) in ports.iter().enumerate() {
                if from != to {
                    proxies.insert(
                        (from, to),
                        common::proxy::Proxy::start(&format!("127.0.0.1:{port}")),
                    );
                }
            }
        }
        let mut nodes = Vec::new();
        for me in 0..3 {
            let mut cfg = format!(
                "node_name = \"{}\"\npeer_listen = \"127.0.0.1:{}\"\nio_timeout_secs = 2\npeer_reconnect_secs = 1\nquorum = \"majority\"\non_no_quorum = \"error\"\n",
                NAMES[me], ports[me]
            );
            for other in (0..3).filter(|o| *o != me) {
                cfg.push_str(&format!(
                    "[nodes.{}]\naddress = \"{}\"\n",
                    NAMES[other],
                    proxies[&(me, other)].addr
                ));
            }
            nodes.push(start_node(dir.path(), NAMES[me], &cfg));
        }
        ThreeNodes {
            _dir: dir,
            nodes,
            proxies,
        }
    }

    fn node(&self, i: usize) -> &Daemon {
        &self.nodes[i].0
    }

    fn isolate(&self, i: usize) {
        for ((from, to), p) in &self.proxies {
            if *from == i || *to == i {
                p.cut();
            }
        }
    }

    fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// Whether node `i` acknowledges a write of `pattern` at `offset`.
    fn write_acked(&self, i: usize, pattern: u8, offset: u64) -> bool {
        let out = qemu_io(
            &self.node(i).uri("vm1"),
            &[
                format!("write -P {pattern:#x} {offset} 65536"),
                "flush".into(),
            ],
        );
        !qemu_io_failed(&out)
    }
}

/// Three nodes with majority quorum. The primary is cut off: it refuses
/// writes (no quorum) instead of acknowledging what the others cannot see.
/// `volume promote` on b needs no --force: b and c are a majority and hold
/// every acknowledged write. Only b accepts writes. When the link heals,
/// the old primary steps down, its replica (which took no acknowledged
/// write) is rebuilt without operator action, and all three agree.
#[test]
fn three_nodes_with_majority_quorum_never_have_two_writing_primaries() {
    let t = ThreeNodes::start();
    let (a, b) = (t.node(0), t.node(1));
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0", "--pool",
        "c:p0",
    ]);
    let v = a.wait_healthy("vm1");
    assert!(
        v["quorum"].as_str().is_some_and(|q| q.contains("3 of 3")),
        "{v:#}"
    );
    assert!(
        t.write_acked(0, 0x11, 0),
        "a healthy primary refused a write"
    );

    t.isolate(0);
    // The isolated primary fails b and c out, and then has no quorum.
    assert!(
        !t.write_acked(0, 0x22, 64 * KIB),
        "the isolated primary acknowledged a write without quorum"
    );
    let v = a.volume("vm1");
    assert!(
        v["quorum"].as_str().is_some_and(|q| q.starts_with("LOST")),
        "{v:#}"
    );
    // b reaches c: a majority, so no --force is needed.
    b.cli_ok(&["volume", "promote", "vm1"]);
    assert!(
        t.write_acked(1, 0x33, 128 * KIB),
        "the new primary refused a write"
    );
    assert!(
        !t.write_acked(0, 0x44, 192 * KIB),
        "two primaries accept writes"
    );

    t.heal();
    wait_until(
        "node a to step down",
        std::time::Duration::from_secs(30),
        || (a.status()["held"][0]["primary"] == "b").then_some(()),
    );
    let v = b.wait_healthy("vm1");
    assert!(
        v["quorum"].as_str().is_some_and(|q| q.contains("3 of 3")),
        "{v:#}"
    );
    let data = read_all(b, t._dir.path(), "vm1");
    assert_pattern(&data, 0, 64 * KIB, 0x11, "the write before the partition");
    assert_pattern(&data, 128 * KIB, 64 * KIB, 0x33, "the new primary's write");
    assert_pattern(
        &data,
        64 * KIB,
        64 * KIB,
        0,
        "a refused write must not appear",
    );
    assert_pattern(
        &data,
        192 * KIB,
        64 * KIB,
        0,
        "a refused write must not appear",
    );
    for (_, files) in &t.nodes {
        assert!(
            replica_data(&files.pool)[..SIZE as usize] == data[..],
            "a replica differs after the heal ({})",
            files.pool.display()
        );
    }
}

impl ThreeNodes {
    /// The nodes that run vm1 as its primary.
    fn primaries(&self) -> Vec<usize> {
        (0..3)
            .filter(|i| self.node(*i).find_volume("vm1").is_some())
            .collect()
    }
}

/// Random partitions (seeded, bounded: 6 rounds) with majority quorum:
/// each round isolates one node or none, every node that is not primary
/// tries `volume promote`, then every node tries a write. At most one node
/// acknowledges a write in a round, and after the last heal one healthy
/// primary is left, from which every acknowledged write reads back.
/// It did not converge in 4 of 20 runs before a quorum start that finds
/// no current replica waited for the absent nodes (a takeover whose own
/// replica was half rebuilt stayed stopped for good), and a stale replica
/// on the primary's own node was caught up by itself.
#[test]
fn three_nodes_under_random_partitions_acknowledge_writes_on_one_side_only() {
    let t = ThreeNodes::start();
    let size = SIZE.to_string();
    t.node(0).cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0", "--pool",
        "c:p0",
    ]);
    t.node(0).wait_healthy("vm1");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut acked: Vec<(u64, u8)> = Vec::new();
    for round in 0..6u64 {
        t.heal();
        let isolated = next(4) as usize; // 3: none
        if isolated < 3 {
            t.isolate(isolated);
        }
        for i in 0..3 {
            if !t.primaries().contains(&i) {
                let _ = t.node(i).cli(&["volume", "promote", "vm1"]);
            }
        }
        let mut acks = Vec::new();
        for i in 0..3 {
            let offset = (round * 3 + i as u64) * 64 * KIB;
            let pattern = (round * 3 + i as u64 + 1) as u8;
            if t.primaries().contains(&i) && t.write_acked(i, pattern, offset) {
                acks.push(i);
                acked.push((offset, pattern));
            }
        }
        assert!(
            acks.len() <= 1,
            "round {round} (isolated {isolated}): nodes {acks:?} all acknowledged writes"
        );
    }
    t.heal();
    assert!(!acked.is_empty(), "no round acknowledged any write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let primary = loop {
        let p = t.primaries();
        if p.len() == 1 && t.node(p[0]).volume("vm1")["state"] == "healthy" {
            break Some(p[0]);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let Some(primary) = primary else {
        let all: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "node {}: {}",
                    NAMES[i],
                    t.node(i).cli_ok(&["events"]).stdout
                )
            })
            .collect();
        panic!(
            "no single healthy primary within 60 s of the last heal (primaries {:?}):\n{}",
            t.primaries(),
            all.join("\n")
        );
    };
    let data = read_all(t.node(primary), t._dir.path(), "vm1");
    for (offset, pattern) in &acked {
        assert_pattern(
            &data,
            *offset,
            64 * KIB,
            *pattern,
            "an acknowledged write after the partitions",
        );
    }
    for (_, files) in &t.nodes {
        assert!(
            replica_data(&files.pool)[..SIZE as usize] == data[..],
            "a replica differs from the volume after the partitions healed ({})",
            files.pool.display()
        );
    }
}

impl ThreeNodes {
    /// SIGTERM node `i`'s daemon and start it again on its data and config.
    fn restart(&mut self, i: usize) {
        let (daemon, files) = &mut self.nodes[i];
        daemon.stop();
        *daemon = Daemon::start_with(&files.data, &["--config", s(&files.cfg)]);
    }
}

/// A rolling restart of every node (secondaries first, then the primary)
/// with majority quorum, under a writer that never stops: every write
/// acknowledged reads back afterwards, from the volume and from every
/// replica. With quorum every start of the volume takes an epoch of its
/// own, claimed at the other nodes; before that was done in the daemon,
/// the primary's restart was refused ("every start takes a new epoch")
/// and the volume stayed down.
#[test]
fn a_rolling_restart_of_every_node_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut t = ThreeNodes::start();
    let size = SIZE.to_string();
    t.node(0).cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0", "--pool",
        "c:p0",
    ]);
    let epoch_before = t.node(0).wait_healthy("vm1")["epoch"].as_u64();
    let uri = Arc::new(Mutex::new(t.node(0).uri("vm1")));
    let done = Arc::new(AtomicBool::new(false));
    // The load: 64 KiB writes, each flushed, to slots of their own (at most
    // 500 of the volume's 512, and for as long as the restarts take).
    let writer = {
        let (uri, done) = (uri.clone(), done.clone());
        std::thread::spawn(move || {
            let mut acked: Vec<(u64, u8)> = Vec::new();
            let mut tried = 0u64;
            while !done.load(Ordering::SeqCst) && tried < 500 {
                let (offset, pattern) = (tried * 64 * KIB, (tried % 250 + 1) as u8);
                let target = uri.lock().expect("uri").clone();
                let out = qemu_io(
                    &target,
                    &[
                        format!("write -P {pattern:#x} {offset} 65536"),
                        "flush".into(),
                    ],
                );
                if qemu_io_failed(&out) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                } else {
                    acked.push((offset, pattern));
                }
                tried += 1;
            }
            (acked, tried)
        })
    };
    let acked_so_far = |t: &ThreeNodes| {
        // Some writes land while the node is away.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        t.node(0).wait_healthy("vm1")
    };
    for i in [1, 2, 0] {
        t.restart(i);
        if i == 0 {
            *uri.lock().expect("uri") = t.node(0).uri("vm1");
        }
        acked_so_far(&t);
    }
    done.store(true, Ordering::SeqCst);
    let (acked, tried) = writer.join().expect("writer thread");
    eprintln!(
        "rolling restart: {} of {tried} writes acknowledged",
        acked.len()
    );
    let v = t.node(0).wait_healthy("vm1");
    assert!(
        v["epoch"].as_u64() > epoch_before,
        "the primary's restart took no new epoch: {v:#}"
    );
    assert!(
        acked.len() >= 6,
        "only {} of {tried} writes were acknowledged during the rolling restart",
        acked.len()
    );
    let data = read_all(t.node(0), t._dir.path(), "vm1");
    for (offset, pattern) in &acked {
        assert_pattern(
            &data,
            *offset,
            64 * KIB,
            *pattern,
            "a write acknowledged during the rolling restart",
        );
    }
    for (_, files) in &t.nodes {
        assert!(
            replica_data(&files.pool)[..SIZE as usize] == data[..],
            "a replica differs from the volume after the rolling restart ({})",
            files.pool.display()
        );
    }
}

/// `ditto node add`: only a node that answers at the address under the
/// name given is recorded (kept across restarts); a duplicate name, the
/// node's own name, a bad or silent address, or a node answering as
/// another are refused and change nothing. A node in use cannot be removed.
#[test]
fn nodes_are_added_only_when_they_answer_as_themselves() {
    let dir = tempfile::Builder::new()
        .prefix("ditto-2n-nodeadd-")
        .tempdir()
        .expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let cfg = |me: &str, port: u16| {
        format!("node_name = \"{me}\"\npeer_listen = \"127.0.0.1:{port}\"\nio_timeout_secs = 2\n")
    };
    let (mut a, a_files) = start_node(dir.path(), "a", &cfg("a", pa));
    let (b, _) = start_node(dir.path(), "b", &cfg("b", pb));
    let b_addr = format!("127.0.0.1:{pb}");
    let refused = |d: &Daemon, args: &[&str], why: &str| {
        let out = d.cli(args).assert_failure();
        assert!(out.stderr.contains(why), "{}", out.describe());
    };
    refused(
        &a,
        &["node", "add", "c", "--address", &b_addr],
        "says it is node \"b\"",
    );
    refused(
        &a,
        &["node", "add", "c", "--address", "127.0.0.1:1"],
        "does not answer",
    );
    refused(
        &a,
        &["node", "add", "c", "--address", "nope"],
        "not HOST:PORT",
    );
    refused(&a, &["node", "add", "a", "--address", &b_addr], "own name");
    refused(
        &a,
        &["node", "add", "B_", "--address", &b_addr],
        "node name",
    );
    assert_eq!(
        a.cli_json(&["node", "list"]),
        serde_json::json!([]),
        "a refused add changed the list"
    );

    a.cli_ok(&["node", "add", "b", "--address", &b_addr]);
    b.cli_ok(&["node", "add", "a", "--address", &format!("127.0.0.1:{pa}")]);
    refused(
        &a,
        &["node", "add", "b", "--address", &b_addr],
        "known already",
    );
    let list = a.cli_json(&["node", "list"]);
    assert_eq!(list[0]["name"], "b", "{list:#}");
    assert_eq!(list[0]["connected"], true, "{list:#}");
    assert_eq!(list[0]["source"], "added", "{list:#}");

    // --nodes: one replica per node, in the pool with the most room there.
    let size = SIZE.to_string();
    refused(
        &a,
        &["volume", "create", "vm1", "--size", &size, "--nodes", "a,a"],
        "named twice",
    );
    refused(
        &a,
        &[
            "volume", "create", "vm1", "--size", &size, "--nodes", "a,zz",
        ],
        "not known",
    );
    refused(
        &a,
        &[
            "volume", "create", "vm1", "--size", "100T", "--nodes", "a,b",
        ],
        "no pool with room",
    );
    assert!(
        a.volume_names().is_empty(),
        "a refused create left a volume"
    );
    a.cli_ok(&["volume", "create", "vm1", "--size", &size, "--nodes", "a,b"]);
    let v = a.wait_healthy("vm1");
    let mut pools: Vec<String> = replicas(&v).iter().map(|r| r.pool.clone()).collect();
    pools.sort();
    assert_eq!(pools, ["b:p0", "p0"], "{v:#}");
    refused(&a, &["node", "remove", "b"], "holds replicas of vm1");

    // Kept across a restart.
    a.stop();
    let a = Daemon::start_with(&a_files.data, &["--config", s(&a_files.cfg)]);
    a.wait_healthy("vm1");
    assert_eq!(a.cli_json(&["node", "list"])[0]["name"], "b");

    a.cli_ok(&["volume", "delete", "vm1"]);
    a.cli_ok(&["node", "remove", "b"]);
    assert_eq!(a.cli_json(&["node", "list"]), serde_json::json!([]));
    refused(&a, &["node", "remove", "b"], "not known");
}

/// `resync_checksums = true` (DRBD's csums-alg): the catch-up of node b's
/// replica, failed out while 4 MiB were rewritten with the bytes they held
/// and 2 MiB with new ones, asks b for digests and sends only what
/// differs: the 4 MiB are skipped, the 2 MiB copied, and b's replica equals
/// the volume afterwards.
#[test]
fn a_catch_up_with_checksums_sends_only_what_differs() {
    let (dir, (a, _), (_b, bf)) = pair(
        "ditto-csums-",
        "resync_checksums = true\ndirty_clear_delay_ms = 300\n",
    );
    let size = SIZE.to_string();
    a.cli_ok(&[
        "volume", "create", "vm1", "--size", &size, "--pool", "p0", "--pool", "b:p0",
    ]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x11, 0, 8 * MIB);
    wait_until(
        "the dirty map to clear",
        std::time::Duration::from_secs(30),
        || (a.volume("vm1")["dirty_regions"] == 0).then_some(()),
    );
    let v = a.volume("vm1");
    let id = v["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["pool"] == "b:p0"))
        .and_then(|r| r["id"].as_str())
        .expect("node b's replica")
        .to_string();
    a.cli_ok(&["replica", "fail", "vm1", &id]);
    qemu_write(&a.uri("vm1"), 0x11, 0, 4 * MIB);
    qemu_write(&a.uri("vm1"), 0x22, 4 * MIB, 2 * MIB);
    let before = a.volume("vm1");
    a.cli_ok(&["replica", "readd", "vm1", &id]);
    let after = a.wait_healthy("vm1");
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    let (copied, skipped) = (delta("copied_bytes"), delta("skipped_bytes"));
    assert_eq!(
        skipped,
        4 * MIB,
        "the rewritten-but-equal 4 MiB should be skipped (copied {copied})"
    );
    assert_eq!(
        copied,
        2 * MIB,
        "only the 2 MiB of new bytes should be sent (skipped {skipped})"
    );
    let data = read_all(&a, dir.path(), "vm1");
    assert_pattern(&data, 0, 4 * MIB, 0x11, "the rewritten region");
    assert_pattern(&data, 4 * MIB, 2 * MIB, 0x22, "the new bytes");
    assert!(
        replica_data(&bf.pool)[..SIZE as usize] == data[..],
        "node b's replica differs from the volume after the catch-up"
    );
}

/// A volume whose only replica is on another node: when that node is
/// killed, the one in-sync replica's connection is gone for good (the last
/// replica is kept in service, not failed, so the reconnect loop had
/// nothing to re-add and the volume stayed unusable even after node b
/// came back, while status called it "healthy"). Now status says
/// "failed" with why, the instance is stranded, and the node starts the
/// volume again once b answers: it serves again, with every write it
/// acknowledged before. Without the restart the volume is not healthy
/// after 60 s; without the status fix the wait below returns at once and
/// the next write fails.
#[test]
fn a_volume_stranded_by_its_only_remote_replica_starts_again_when_the_node_returns() {
    let (dir, (a, _), (mut b, bf)) = pair("ditto-strand-", "");
    let size = SIZE.to_string();
    a.cli_ok(&["volume", "create", "vm1", "--size", &size, "--pool", "b:p0"]);
    a.wait_healthy("vm1");
    qemu_write(&a.uri("vm1"), 0x3c, 0, 2 * MIB);

    b.stop_with(libc::SIGKILL);
    let out = qemu_io(
        &a.uri("vm1"),
        &[format!("write -P 0x4d {} 65536", 4 * MIB), "flush".into()],
    );
    assert!(
        qemu_io_failed(&out),
        "a write with no replica reachable was acknowledged: {}",
        out.describe()
    );
    b = Daemon::start_with(&bf.data, &["--config", s(&bf.cfg)]);
    let _keep = &b;
    let v = a.wait_healthy("vm1");
    assert_eq!(v["state"], "healthy", "{v:#}");
    qemu_write(&a.uri("vm1"), 0x5e, 8 * MIB, MIB);
    let data = read_all(&a, dir.path(), "vm1");
    assert_pattern(&data, 0, 2 * MIB, 0x3c, "the write before node b died");
    assert_pattern(&data, 8 * MIB, MIB, 0x5e, "a write after it came back");
}

/// Two data nodes and a diskless tiebreaker (DRBD's layout for two
/// machines with quorum). Node b is cut off: a goes on taking writes with
/// c's vote (two data nodes alone would have no majority), and c records
/// that only a's replica is in sync. Then a is cut off and b, with c, is
/// promoted: b and c are a majority, but c's record proves b's replica
/// missed acknowledged writes, so the promote is refused up front (the
/// engine would refuse to start from it too), and a, alone, loses c's vote
/// and stops. When the links heal, a serves again with every write, b is
/// caught up, and a planned switch-over to b works.
#[test]
fn a_diskless_tiebreaker_keeps_two_nodes_writing_and_never_starts_the_stale_one() {
    let t = ThreeNodes::start();
    let (a, b, c) = (t.node(0), t.node(1), t.node(2));
    let size = SIZE.to_string();
    // A tiebreaker holding a replica, or an unknown one, is refused.
    for (bad, why) in [("b", "holds a replica"), ("zz", "not known")] {
        let out = a
            .cli(&[
                "volume",
                "create",
                "vm1",
                "--size",
                &size,
                "--pool",
                "p0",
                "--pool",
                "b:p0",
                "--tiebreaker",
                bad,
            ])
            .assert_failure();
        assert!(out.stderr.contains(why), "{}", out.describe());
    }
    assert!(a.status()["volumes"]
        .as_array()
        .is_some_and(|v| v.is_empty()));
    a.cli_ok(&[
        "volume",
        "create",
        "vm1",
        "--size",
        &size,
        "--pool",
        "p0",
        "--pool",
        "b:p0",
        "--tiebreaker",
        "c",
    ]);
    let v = a.wait_healthy("vm1");
    assert!(
        v["quorum"]
            .as_str()
            .is_some_and(|q| q.contains("3 of 3") && q.contains("tiebreaker c voting")),
        "{v:#}"
    );
    let witness = &c.status()["tiebreaker_of"][0];
    assert_eq!(witness["volume"], "vm1", "{witness:#}");
    assert_eq!(witness["primary"], "a", "{witness:#}");
    assert!(
        c.status()["held"].as_array().is_some_and(|h| h.is_empty()),
        "the tiebreaker holds data"
    );
    // Heartbeats that change nothing do not rewrite the tiebreaker's store
    // (each was a commit with an fsync, every second per volume): the
    // record's time is that of its last change.
    let changed = c.status()["tiebreaker_of"][0]["updated_unix"].clone();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        c.status()["tiebreaker_of"][0]["updated_unix"],
        changed,
        "an idle volume's heartbeats rewrote the tiebreaker's record"
    );
    assert!(
        t.write_acked(0, 0x11, 0),
        "a healthy primary refused a write"
    );

    // b is cut off: a fails it out and goes on with c's vote.
    t.isolate(1);
    assert!(
        t.write_acked(0, 0x22, 64 * KIB),
        "a refused a write with the tiebreaker's vote"
    );
    let v = a.volume("vm1");
    assert!(
        v["quorum"]
            .as_str()
            .is_some_and(|q| q.starts_with("majority: 2 of 3")),
        "{v:#}"
    );
    let witness = &c.status()["tiebreaker_of"][0];
    assert_eq!(
        witness["in_sync"].as_array().map(Vec::len),
        Some(1),
        "the tiebreaker did not record that only a is in sync: {witness:#}"
    );

    // Now a is cut off and b comes back to c: b and c are a majority, but
    // c's record proves b's replica lacks the write a acknowledged with
    // c's vote: the promote is refused before it claims anything.
    t.heal();
    t.isolate(0);
    let out = b.cli(&["volume", "promote", "vm1"]).assert_failure();
    assert!(
        out.stderr.contains("tiebreaker c recorded")
            && out
                .stderr
                .contains("node a acknowledged writes this node lacks"),
        "{}",
        out.describe()
    );
    assert!(
        !serves(b, "vm1"),
        "node b serves vm1 from a replica that missed an acknowledged write"
    );
    assert_eq!(
        c.status()["tiebreaker_of"][0]["primary"],
        "a",
        "the refused promote moved the tiebreaker"
    );
    // a alone (its heartbeat to c is cut too) loses c's vote and stops.
    // (Until its next heartbeat it still holds the vote, rightly: c follows
    // it and records only a in sync, so no other start can serve.)
    wait_until(
        "node a to refuse writes without the tiebreaker",
        std::time::Duration::from_secs(20),
        || (!t.write_acked(0, 0x33, 128 * KIB)).then_some(()),
    );

    // The links heal: a gets c's vote back and catches b up.
    t.heal();
    let v = a.wait_healthy("vm1");
    assert!(
        v["quorum"]
            .as_str()
            .is_some_and(|q| q.contains("3 of 3") && q.contains("tiebreaker c voting")),
        "{v:#}"
    );
    assert!(!serves(b, "vm1"), "two nodes serve vm1");
    let data = read_all(a, t._dir.path(), "vm1");
    assert_pattern(&data, 0, 64 * KIB, 0x11, "the write before the partitions");
    assert_pattern(
        &data,
        64 * KIB,
        64 * KIB,
        0x22,
        "the write acknowledged with the tiebreaker's vote",
    );
    for (_, files) in &t.nodes[..2] {
        assert!(
            replica_data(&files.pool)[..SIZE as usize] == data[..],
            "a replica differs after the heal ({})",
            files.pool.display()
        );
    }
    // With both data nodes in sync, a planned switch-over to b works.
    b.cli_ok(&["volume", "promote", "vm1"]);
    b.wait_healthy("vm1");
    assert!(
        read_all(b, t._dir.path(), "vm1") == data,
        "data changed switching over"
    );
    assert_eq!(c.status()["tiebreaker_of"][0]["primary"], "b");
}
