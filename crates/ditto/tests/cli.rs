//! CLI behaviour and validation: pools, volumes, status fields, sizes, and
//! every rejected request leaves nothing behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Pools as (name, path) and volumes as (name, size), sorted: what a rejected
/// command must not change. (Free-space figures move with the file system.)
type Snapshot = (Vec<(String, String)>, Vec<(String, u64)>);

fn snapshot(node: &Node) -> Snapshot {
    let mut pools: Vec<(String, String)> = node
        .daemon
        .cli_json(&["pool", "list"])
        .as_array()
        .expect("pool list --json is an array")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("pool name").to_string(),
                p["path"].as_str().expect("pool path").to_string(),
            )
        })
        .collect();
    pools.sort();
    let mut vols: Vec<(String, u64)> = node
        .daemon
        .cli_json(&["volume", "list"])
        .as_array()
        .expect("volume list --json is an array")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("volume name").to_string(),
                v["size"].as_u64().expect("volume size"),
            )
        })
        .collect();
    vols.sort();
    (pools, vols)
}

/// Runs a CLI command that must be refused: non-zero exit, stderr mentions one
/// of `mentions`, pool and volume lists unchanged.
fn expect_rejected(node: &Node, args: &[&str], mentions: &[&str]) -> Output {
    let before = snapshot(node);
    let out = node.daemon.cli(args).assert_failure();
    assert!(
        mentions_any(&out.stderr, mentions),
        "error message should mention one of {mentions:?}: {}",
        out.describe()
    );
    let after = snapshot(node);
    assert_eq!(
        before,
        after,
        "a rejected `ditto {}` changed the pool or volume list",
        args.join(" ")
    );
    out
}

#[test]
fn pools_volumes_and_status_fields() {
    let node = Node::with_pools(2);

    // pool list --json
    let pools = node.daemon.cli_json(&["pool", "list"]);
    let arr = pools.as_array().expect("pool list --json is an array");
    assert_eq!(arr.len(), 2, "{pools:#}");
    for (i, p) in arr.iter().enumerate() {
        let name = p["name"].as_str().expect("pool name");
        let (want_name, want_path) = node
            .pools
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("unexpected pool {name} in {pools:#}"));
        assert_eq!(name, want_name);
        let path = p["path"].as_str().expect("pool path");
        assert_eq!(
            std::fs::canonicalize(path).expect("pool path exists"),
            std::fs::canonicalize(want_path).expect("canonical"),
            "pool {i} path"
        );
        let total = p["total_bytes"].as_u64().expect("total_bytes integer");
        let free = p["free_bytes"].as_u64().expect("free_bytes integer");
        assert!(total > 0 && free <= total, "pool sizes: {p:#}");
    }

    // volume create with a size suffix, default replicas (2)
    node.daemon
        .cli_ok(&["volume", "create", "vol1", "--size", "64M"]);
    let v = node.daemon.wait_healthy("vol1");
    assert_eq!(v["name"], "vol1");
    assert_eq!(v["size"].as_u64(), Some(64 * MIB), "64M is 64 MiB: {v:#}");
    assert!(v["generation"].is_u64(), "generation is an integer: {v:#}");
    assert_eq!(
        v["export"].as_str(),
        Some(node.uri("vol1").as_str()),
        "export URI: {v:#}"
    );
    assert_eq!(
        v["clients"].as_array().map(Vec::len),
        Some(0),
        "no clients yet: {v:#}"
    );
    let reps = replicas(&v);
    assert_eq!(reps.len(), 2, "default is 2 replicas: {v:#}");
    assert_ne!(
        reps[0].pool, reps[1].pool,
        "replicas on distinct pools: {v:#}"
    );
    assert_ne!(reps[0].id, reps[1].id, "replica ids differ: {v:#}");
    for r in &reps {
        assert!(
            node.pools.iter().any(|(n, _)| *n == r.pool),
            "replica pool {} is one of ours: {v:#}",
            r.pool
        );
        assert_eq!(r.state, "in_sync");
        let pool_path = &node
            .pools
            .iter()
            .find(|(n, _)| *n == r.pool)
            .expect("pool")
            .1;
        let canon = std::fs::canonicalize(&r.path)
            .unwrap_or_else(|e| panic!("replica file {} exists: {e}", r.path.display()));
        assert!(
            canon.starts_with(std::fs::canonicalize(pool_path).expect("canonical")),
            "replica {} lies inside its pool {}",
            r.path.display(),
            pool_path.display()
        );
        let len = std::fs::metadata(&r.path).expect("stat replica").len();
        assert!(
            len >= r.data_offset + 64 * MIB,
            "replica file is {len} bytes, shorter than data_offset {} + size",
            r.data_offset
        );
    }

    // explicit pools, other size spellings
    node.daemon.cli_ok(&[
        "volume", "create", "vol2", "--size", "1048576", "--pool", "p1",
    ]);
    let v2 = node.daemon.wait_healthy("vol2");
    assert_eq!(v2["size"].as_u64(), Some(MIB));
    let r2 = replicas(&v2);
    assert_eq!(r2.len(), 1, "--pool p1 alone gives one replica: {v2:#}");
    assert_eq!(r2[0].pool, "p1");

    node.daemon.cli_ok(&[
        "volume", "create", "vol3", "--size", "1GiB", "--pool", "p0", "--pool", "p1",
    ]);
    let v3 = node.daemon.wait_healthy("vol3");
    assert_eq!(v3["size"].as_u64(), Some(GIB));
    let mut p3: Vec<String> = replicas(&v3).into_iter().map(|r| r.pool).collect();
    p3.sort();
    assert_eq!(p3, ["p0", "p1"]);

    node.daemon.cli_ok(&[
        "volume",
        "create",
        "vol4",
        "--size",
        "1G",
        "--replicas",
        "1",
    ]);
    let v4 = node.daemon.wait_healthy("vol4");
    assert_eq!(v4["size"].as_u64(), Some(GIB), "1G is 1 GiB: {v4:#}");
    assert_eq!(replicas(&v4).len(), 1);

    let mut names = node.daemon.volume_names();
    names.sort();
    assert_eq!(names, ["vol1", "vol2", "vol3", "vol4"]);

    // status VOLUME shows that volume
    let one = node.daemon.cli_json(&["status", "vol2"]);
    let vols = one["volumes"]
        .as_array()
        .expect("status VOLUME has volumes");
    assert!(
        vols.iter().any(|v| v["name"] == "vol2"),
        "status vol2 shows vol2: {one:#}"
    );
    assert!(
        vols.iter().all(|v| v["name"] == "vol2"),
        "status vol2 shows only vol2: {one:#}"
    );

    // human output works too and names the volumes
    let human = node.daemon.cli_ok(&["status"]);
    assert!(human.stdout.contains("vol1"), "{}", human.describe());

    // delete: gone from the lists, and its replica files are removed
    let deleted = node.daemon.cli_ok(&["volume", "delete", "vol2", "--json"]);
    deleted.json(); // --json prints JSON here too
    assert!(
        !r2[0].path.exists(),
        "replica file {} of a deleted volume is left behind",
        r2[0].path.display()
    );
    let mut names = node.daemon.volume_names();
    names.sort();
    assert_eq!(names, ["vol1", "vol3", "vol4"]);
    assert!(node.daemon.find_volume("vol2").is_none());
}

#[test]
fn api_flag_and_unreachable_daemon() {
    let node = Node::with_pools(1);
    // --api instead of DITTO_API
    let out = run_with_timeout(
        Command::new(DITTO).env_remove("DITTO_API").args([
            "--api",
            &node.daemon.api,
            "pool",
            "list",
            "--json",
        ]),
        CLI_TIMEOUT,
    )
    .assert_success();
    assert_eq!(names(&out.json()), ["p0"]);

    // nothing listening there: a clean error, not a hang or a panic
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let out = run_with_timeout(
        Command::new(DITTO)
            .env("DITTO_API", &dead)
            .args(["pool", "list"]),
        CLI_TIMEOUT,
    )
    .assert_failure();
    assert!(
        !out.stderr.contains("panicked"),
        "CLI panicked instead of reporting the error: {}",
        out.describe()
    );
}

#[test]
fn pool_path_must_exist() {
    let node = Node::with_pools(1);
    let missing = node.path("no-such-dir");
    expect_rejected(
        &node,
        &["pool", "create", "ghost", "--path", s(&missing)],
        &["no-such-dir"],
    );
    assert!(
        !missing.exists(),
        "the missing pool dir must not be created"
    );
}

#[test]
fn duplicate_pool_name_is_rejected() {
    let node = Node::with_pools(1);
    let other = node.path("other");
    std::fs::create_dir(&other).expect("mkdir");
    expect_rejected(
        &node,
        &["pool", "create", "p0", "--path", s(&other)],
        &["p0"],
    );
}

#[test]
fn duplicate_volume_name_is_rejected() {
    let node = Node::with_pools(2);
    node.create_volume("v", 64 * MIB, 2);
    expect_rejected(
        &node,
        &["volume", "create", "v", "--size", "128M"],
        &[
            "\"v\"",
            "'v'",
            "`v`",
            " v ",
            "v:",
            "already exists",
            "exists",
        ],
    );
    assert_eq!(node.daemon.volume("v")["size"].as_u64(), Some(64 * MIB));
}

#[test]
fn more_replicas_than_pools_is_rejected() {
    let node = Node::with_pools(2);
    expect_rejected(
        &node,
        &["volume", "create", "v", "--size", "64M", "--replicas", "3"],
        &["replica", "pool"],
    );
}

#[test]
fn volume_larger_than_free_space_is_rejected() {
    let node = Node::with_pools(2);
    expect_rejected(
        &node,
        &["volume", "create", "huge", "--size", "1000T"],
        &["space", "free", "1000T", "large", "big", "capacity"],
    );
}

#[test]
fn bad_size_string_is_rejected() {
    let node = Node::with_pools(2);
    expect_rejected(&node, &["volume", "create", "v", "--size", "12X"], &["12X"]);
    expect_rejected(
        &node,
        &["volume", "create", "v", "--size", "0"],
        &["size", "0"],
    );
}

#[test]
fn unknown_pool_is_rejected() {
    let node = Node::with_pools(2);
    expect_rejected(
        &node,
        &[
            "volume",
            "create",
            "v",
            "--size",
            "64M",
            "--pool",
            "nosuchpool",
        ],
        &["nosuchpool"],
    );
    expect_rejected(&node, &["volume", "delete", "nosuchvol"], &["nosuchvol"]);
}

#[test]
fn invalid_volume_names_are_rejected() {
    let node = Node::with_pools(2);
    for bad in ["a/b", "has space", "..", ""] {
        let shown = if bad.is_empty() { "name" } else { bad };
        expect_rejected(
            &node,
            &["volume", "create", bad, "--size", "64M"],
            &[shown, "name"],
        );
    }
}

#[test]
fn unknown_config_field_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let cfg = dir.path().join("ditto.toml");
    std::fs::write(
        &cfg,
        "# ditto configuration used by the tests\n\n  nbd_lisen_adress = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let mut cmd = Command::new(DITTO);
    cmd.args(["daemon", "--data-dir", s(&data), "--config", s(&cfg)])
        .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).assert_failure();
    assert!(
        out.stderr.contains("nbd_lisen_adress"),
        "error should name the unknown field: {}",
        out.describe()
    );
    assert!(
        mentions_any(&out.stderr, &["line 3", ":3:"]),
        "error should give the line (3) of the unknown field: {}",
        out.describe()
    );
    assert!(
        mentions_any(&out.stderr, &["column", ":3:3"]),
        "error should give the column of the unknown field: {}",
        out.describe()
    );
    assert!(
        !data.join("daemon.json").exists(),
        "a daemon that refused its config must not write daemon.json"
    );
}

#[test]
fn config_file_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cfg = dir.path().join("ditto.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nnbd_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nio_timeout_secs = 10\n",
            s(&data)
        ),
    )
    .expect("write config");
    // everything comes from the file: no --data-dir, no listen flags
    let mut d = Daemon::spawn(&data, &["daemon", "--config", s(&cfg)]);
    assert!(d.pool_names().is_empty());
    d.stop();
}

#[test]
fn bad_config_value_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cfg = dir.path().join("ditto.toml");
    std::fs::write(&cfg, "io_timeout_secs = 0\n").expect("write config");
    let mut cmd = Command::new(DITTO);
    cmd.args(["daemon", "--data-dir", s(&data), "--config", s(&cfg)])
        .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).assert_failure();
    assert!(
        out.stderr.contains("io_timeout_secs"),
        "error should name the bad field: {}",
        out.describe()
    );
    assert!(!data.join("daemon.json").exists());
}

/// `--api` is the client's flag; given to `ditto daemon` (before or after the
/// subcommand) it used to be ignored, and the daemon listened on its default
/// API address instead. It must be refused at once, naming `--api-listen`,
/// with nothing created in the data directory.
#[test]
fn daemon_refuses_the_clients_api_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let placements: [&[&str]; 2] = [
        &["daemon", "--data-dir", s(&data), "--api", &addr],
        &["--api", &addr, "daemon", "--data-dir", s(&data)],
    ];
    for args in placements {
        let mut cmd = Command::new(DITTO);
        cmd.env_remove("DITTO_API")
            .args(args)
            .args(["--nbd-listen", "127.0.0.1:0"]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).assert_failure();
        assert!(
            out.stderr.contains("--api-listen") && out.stderr.contains(&addr),
            "the refusal should name --api-listen and the address: {}",
            out.describe()
        );
        assert!(
            !data.join("daemon.json").exists(),
            "a refused start left state behind"
        );
    }
}

/// `ditto cert ca` and `ditto cert node` make a cluster CA and a node
/// certificate issued by it; existing files are never overwritten, and a
/// name that cannot be a certificate's DNS name is refused, creating nothing.
#[test]
fn cert_commands_make_a_ca_and_node_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, node) = (dir.path().join("ca"), dir.path().join("node-a"));
    let cert = |args: &[&str]| {
        let mut cmd = Command::new(DITTO);
        cmd.args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    };
    let out = cert(&["cert", "ca", "--out", s(&ca)]).assert_success();
    assert!(out.stdout.contains("ca.pem"), "{}", out.describe());
    let pem = std::fs::read_to_string(ca.join("ca.pem")).expect("ca.pem");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let key = std::fs::read_to_string(ca.join("ca.key")).expect("ca.key");
    let out = cert(&["cert", "ca", "--out", s(&ca)]).assert_failure();
    assert!(out.stderr.contains("exists"), "{}", out.describe());
    assert_eq!(
        std::fs::read_to_string(ca.join("ca.key")).unwrap(),
        key,
        "the CA key changed"
    );

    let out = cert(&["cert", "node", "Node_A", "--ca", s(&ca), "--out", s(&node)]).assert_failure();
    assert!(out.stderr.contains("lowercase"), "{}", out.describe());
    assert!(
        !node.join("node.pem").exists(),
        "a refused name left a certificate"
    );
    cert(&["cert", "node", "a", "--ca", s(&ca), "--out", s(&node)]).assert_success();
    let node_pem = std::fs::read_to_string(node.join("node.pem")).expect("node.pem");
    assert!(node_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_ne!(node_pem, pem, "the node certificate is the CA's");
    let out = cert(&["cert", "node", "a", "--ca", s(&ca), "--out", s(&node)]).assert_failure();
    assert!(out.stderr.contains("exists"), "{}", out.describe());
}
