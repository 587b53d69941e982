//! The daemon restarts into the same pools and volumes, with the data intact.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const SIZE: u64 = 64 * MIB;

/// (offset, length, pattern) written before the restart.
const PATTERNS: &[(u64, u64, u8)] = &[
    (0, 4096, 0x11),
    (512 * 1001, 512 * 3, 0x22),
    (3 * MIB - 512, 1024, 0x33),
    (10 * MIB + 512, 5 * MIB, 0x44),
    (SIZE - 4096, 4096, 0x55),
];

fn write_cmds() -> Vec<String> {
    PATTERNS
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect()
}

fn verify_cmds() -> Vec<String> {
    let mut v: Vec<String> = PATTERNS
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    // untouched areas still read as zeroes
    v.push(format!("read -P 0 {} {}", 4096, 512 * 1001 - 4096));
    v.push(format!("read -P 0 {} {}", 20 * MIB, MIB));
    v
}

/// Pool (name, path, total_bytes) triples, sorted.
fn pool_ids(d: &Daemon) -> Vec<(String, String, u64)> {
    let mut v: Vec<_> = d
        .cli_json(&["pool", "list"])
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_string(),
                p["path"].as_str().expect("path").to_string(),
                p["total_bytes"].as_u64().expect("total"),
            )
        })
        .collect();
    v.sort();
    v
}

/// (id, pool, path, data_offset) of a replica.
type ReplicaId = (String, String, String, u64);

/// The parts of a volume that must survive a restart.
fn identity(v: &Value) -> (String, u64, Vec<ReplicaId>) {
    let mut reps: Vec<_> = replicas(v)
        .into_iter()
        .map(|r| (r.id, r.pool, r.path.display().to_string(), r.data_offset))
        .collect();
    reps.sort();
    (
        v["name"].as_str().expect("name").to_string(),
        v["size"].as_u64().expect("size"),
        reps,
    )
}

#[test]
fn restart_keeps_pools_volumes_and_data() {
    let mut node = Node::with_pools(2);
    let before = node.create_volume("persist", SIZE, 2);
    node.create_volume("other", 16 * MIB, 1);
    let uri = node.uri("persist");

    qemu_io_ok(&uri, &write_cmds());
    // and a full random image through nbdcopy into the second volume
    let img = node.path("other.img");
    write_random_file(&img, 16 * MIB, 7);
    run_with_timeout(
        Command::new(nbdcopy()).arg(&img).arg(node.uri("other")),
        TOOL_TIMEOUT,
    )
    .assert_success();

    let pools_before = pool_ids(&node.daemon);
    let gen_before = before["generation"].as_u64().expect("generation");
    let old_nbd = node.daemon.nbd.clone();
    node.daemon.stop();

    // Second run: same data dir, SIGTERM'd cleanly before.
    let data = node.daemon.data_dir.clone();
    node.daemon = Daemon::start(&data);
    assert_eq!(pool_ids(&node.daemon), pools_before, "pools after restart");
    let mut names = node.daemon.volume_names();
    names.sort();
    assert_eq!(names, ["other", "persist"], "volumes after restart");
    let after = node.daemon.wait_healthy("persist");
    assert_eq!(identity(&after), identity(&before), "volume after restart");
    let gen_after = after["generation"].as_u64().expect("generation");
    assert!(
        gen_after >= gen_before,
        "generation went backwards across a restart: {gen_before} -> {gen_after}"
    );
    eprintln!("nbd address before {old_nbd}, after {}", node.daemon.nbd);

    let uri = node.uri("persist");
    qemu_io_ok(&uri, &verify_cmds());
    let back = node.path("other.back");
    run_with_timeout(
        Command::new(nbdcopy()).arg(node.uri("other")).arg(&back),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert_files_equal(&img, &back);
    assert_replicas_identical(&node.daemon.wait_healthy("persist"));

    // Third run after SIGINT: still there.
    let st = node.daemon.stop_with(libc::SIGINT);
    assert!(st.success(), "daemon should exit 0 on SIGINT, got {st}");
    node.daemon = Daemon::start(&data);
    let again = node.daemon.wait_healthy("persist");
    assert_eq!(identity(&again), identity(&before));
    qemu_io_ok(&node.uri("persist"), &verify_cmds());
}

#[test]
fn flushed_data_survives_sigkill() {
    let mut node = Node::with_pools(2);
    let before = node.create_volume("crashy", SIZE, 2);
    let uri = node.uri("crashy");
    let mut cmds = write_cmds();
    cmds.push("flush".into());
    qemu_io_ok(&uri, &cmds);

    // No clean shutdown.
    let st = node.daemon.stop_with(libc::SIGKILL);
    assert!(!st.success());
    let data = node.daemon.data_dir.clone();
    node.daemon = Daemon::start(&data);
    let after = node.daemon.wait_healthy("crashy");
    assert_eq!(identity(&after), identity(&before));
    qemu_io_ok(&node.uri("crashy"), &verify_cmds());
    assert_replicas_identical(&after);
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let node = Node::with_pools(2);
    node.create_volume("solo", 16 * MIB, 2);
    let first =
        std::fs::read_to_string(node.daemon.data_dir.join("daemon.json")).expect("daemon.json");
    let out = run_with_timeout(
        Command::new(DITTO)
            .args(["daemon", "--data-dir", s(&node.daemon.data_dir)])
            .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]),
        std::time::Duration::from_secs(30),
    )
    .assert_failure();
    assert!(
        mentions_any(&out.stderr, &["lock", "already", "running", "in use"]),
        "the refusal should say the data dir is in use: {}",
        out.describe()
    );
    // the first daemon is unharmed and still owns daemon.json
    assert_eq!(
        std::fs::read_to_string(node.daemon.data_dir.join("daemon.json")).expect("daemon.json"),
        first
    );
    assert_eq!(node.daemon.volume_names(), ["solo"]);
    qemu_io_ok(
        &node.uri("solo"),
        &["write -P 0x42 0 4096".into(), "read -P 0x42 0 4096".into()],
    );
}
