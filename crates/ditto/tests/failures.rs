//! Failure and recovery end to end: a daemon killed during writes, a replica
//! failed and re-added, a stale replica refused, a split brain, the
//! degraded-start policy, a replica added under load, scrub and repair, the
//! refusals of the recovery commands, and kill -9 in the middle of a rebuild,
//! of a catch-up and of degraded operation. Data read back is always compared
//! with what was written, through NBD and in the replica files.
//!
//! Volumes are small (64–128 MiB, sparse) and every wait is bounded.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::nbd::NbdClient;
use common::*;
use serde_json::{json, Value};

const SIZE: u64 = 64 * MIB;
/// The dirty-map region size (one bit per region).
const REGION: u64 = MIB;
/// `ditto volume wait --timeout`.
const WAIT_SECS: &str = "90";

// ---------------------------------------------------------------------------
// Helpers of this file

/// A node (daemon + temporary directory) with directory pools `a` and `b`
/// (and more if asked), created through the CLI.
fn node_with(pools: &[&str]) -> Node {
    let mut node = Node::new();
    for p in pools {
        node.add_pool(p);
    }
    node
}

/// `ditto volume create NAME --size SIZE --pool P...`, then waits until healthy.
fn create_on(node: &Node, name: &str, size: u64, pools: &[&str]) -> Value {
    let size_s = size.to_string();
    let mut args = vec!["volume", "create", name, "--size", &size_s];
    for p in pools {
        args.push("--pool");
        args.push(p);
    }
    let created = node.daemon.cli_json(&args);
    assert_eq!(created["name"], name, "volume create --json: {created:#}");
    let mut got: Vec<String> = replicas(&created).into_iter().map(|r| r.pool).collect();
    got.sort();
    let mut want: Vec<String> = pools.iter().map(|p| p.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "replica pools of {name}: {created:#}");
    node.daemon.wait_healthy(name)
}

/// The replica of `volume` (a status object) in pool `pool`.
fn replica_in(volume: &Value, pool: &str) -> Replica {
    replicas(volume)
        .into_iter()
        .find(|r| r.pool == pool)
        .unwrap_or_else(|| panic!("no replica in pool {pool:?}: {volume:#}"))
}

/// The status JSON object of replica in `pool` (works while stopped too).
fn replica_json<'a>(volume: &'a Value, pool: &str) -> &'a Value {
    volume["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas array: {volume:#}"))
        .iter()
        .find(|r| r["pool"] == pool)
        .unwrap_or_else(|| panic!("no replica in pool {pool:?}: {volume:#}"))
}

/// Polls the status of volume `name` every 100 ms until `pred` holds; panics
/// with the last status after `timeout`.
fn wait_volume(
    d: &Daemon,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = d.volume(name);
        if pred(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("volume {name:?}: timed out after {timeout:?} waiting for {what}; last status: {v:#}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the dirty map of `name` is empty (it is cleared 5 s after the
/// last write when every replica is in sync), so a later catch-up can be
/// measured exactly.
fn wait_dirty_clear(d: &Daemon, name: &str) -> Value {
    wait_volume(
        d,
        name,
        "dirty_regions == 0",
        Duration::from_secs(30),
        |v| v["dirty_regions"].as_u64() == Some(0),
    )
}

/// `ditto volume wait NAME --timeout S`.
fn volume_wait(d: &Daemon, name: &str) -> Output {
    d.cli(&["volume", "wait", name, "--timeout", WAIT_SECS])
}

/// `ditto volume wait` must succeed and leave the volume healthy.
fn volume_wait_healthy(d: &Daemon, name: &str) -> Value {
    let out = volume_wait(d, name);
    assert!(
        out.success(),
        "`ditto volume wait {name}` should exit 0 once redundant: {}\n--- daemon stderr ---\n{}",
        out.describe(),
        tail(&d.stderr(), 4000)
    );
    let v = d.volume(name);
    assert_eq!(v["state"], "healthy", "after `volume wait`: {v:#}");
    for r in v["replicas"].as_array().expect("replicas") {
        assert_eq!(r["state"], "in_sync", "after `volume wait`: {v:#}");
    }
    let job_running = v["job"].is_object() && v["job"]["finished"] == false;
    assert!(!job_running, "a job still runs after `volume wait`: {v:#}");
    v
}

/// `ditto volume scrub NAME ARGS... --wait --json`: the `last_scrub` object.
fn scrub(d: &Daemon, name: &str, extra: &[&str]) -> Value {
    let mut args = vec!["volume", "scrub", name];
    args.extend_from_slice(extra);
    args.push("--wait");
    let v = d.cli_json(&args);
    assert!(
        v.is_object(),
        "`volume scrub --wait --json` should print the scrub result: {v:#}"
    );
    assert_eq!(v["finished"], true, "scrub did not finish: {v:#}");
    assert!(v["error"].is_null(), "scrub error: {v:#}");
    v
}

/// Writes `data` at `offset` of a file (a replica, behind the daemon's back).
fn poke(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().expect("sync");
}

/// Renames `path` to `path.away` (the disk is gone) and returns the new path.
fn take_away(path: &Path) -> PathBuf {
    let away = PathBuf::from(format!("{}.away", path.display()));
    std::fs::rename(path, &away).unwrap_or_else(|e| panic!("rename {} away: {e}", path.display()));
    away
}

/// Puts back a file moved by [`take_away`].
fn bring_back(original: &Path) {
    let away = PathBuf::from(format!("{}.away", original.display()));
    std::fs::rename(&away, original)
        .unwrap_or_else(|e| panic!("rename {} back: {e}", away.display()));
}

/// Writes a daemon config file into the node's directory.
fn config(node: &Node, name: &str, text: &str) -> PathBuf {
    let p = node.path(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// Restarts the (already stopped) daemon of `node` on the same data dir.
fn restart(node: &mut Node, extra: &[&str]) {
    let data = node.daemon.data_dir.clone();
    node.daemon = Daemon::start_with(&data, extra);
}

/// qemu-io commands `write -P PAT OFF LEN` for each (offset, length, pattern).
fn writes(spec: &[(u64, u64, u8)]) -> Vec<String> {
    spec.iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect()
}

/// qemu-io commands `read -P PAT OFF LEN` for each (offset, length, pattern).
fn reads(spec: &[(u64, u64, u8)]) -> Vec<String> {
    spec.iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect()
}

/// Asserts `len` bytes at volume offset `off` of a replica file are all `byte`.
fn assert_replica_bytes(r: &Replica, off: u64, len: usize, byte: u8, what: &str) {
    let data = read_replica(r, off, len);
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{what}: replica {} ({}) has {:#04x} at volume offset {}, expected {byte:#04x}",
            r.pool,
            r.path.display(),
            data[i],
            off + i as u64
        );
    }
}

/// Status reduced to what a refused command must not change: volume states,
/// generations and replicas, pool replica counts, and the files in the pools.
fn snapshot(node: &Node) -> Value {
    let st = node.daemon.status();
    let vols: Vec<Value> = st["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            json!({
                "name": v["name"],
                "state": v["state"],
                "generation": v["generation"],
                "size": v["size"],
                "replicas": v["replicas"].as_array().expect("replicas").iter().map(|r| json!({
                    "id": r["id"], "pool": r["pool"], "path": r["path"],
                    "state": r["state"], "generation": r["generation"],
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let pools: Vec<Value> = st["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .map(|p| json!({"name": p["name"], "replicas": p["replicas"]}))
        .collect();
    let mut files: Vec<String> = Vec::new();
    for (_, dir) in &node.pools {
        for e in std::fs::read_dir(dir).expect("read pool dir") {
            files.push(e.expect("dir entry").path().display().to_string());
        }
    }
    files.sort();
    json!({"volumes": vols, "pools": pools, "files": files})
}

// ---------------------------------------------------------------------------
// 1. kill -9 during writes

/// Content of the 4 KiB block at volume offset `off` in the kill -9 test.
fn block_data(off: u64) -> Vec<u8> {
    random_bytes(4096, off ^ 0x005e_ed0f_b10c)
}

/// What one writer thread did before the daemon died.
#[derive(Default)]
struct WriterLog {
    /// Blocks whose write was acknowledged before an acknowledged FLUSH.
    flushed: Vec<u64>,
    /// Blocks written (or in flight) with no acknowledged FLUSH after them.
    unflushed: Vec<u64>,
    error: Option<String>,
}

/// Writes each block of `blocks` once, with a FLUSH after every 8, until an
/// error (the daemon died), `stop`, or 60 s.
fn writer(
    addr: String,
    volume: String,
    blocks: Vec<u64>,
    flushed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut c = match NbdClient::connect(&addr, &volume) {
        Ok(c) => c,
        Err(e) => {
            log.error = Some(format!("connect: {e}"));
            return log;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending = Vec::new();
    for off in blocks {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            break;
        }
        // Counted before sending: once sent it may have reached the disk.
        pending.push(off);
        if let Err(e) = c.write(off, &block_data(off)) {
            log.error = Some(format!("write at {off}: {e}"));
            break;
        }
        if pending.len() == 8 {
            match c.flush() {
                Ok(()) => {
                    flushed.fetch_add(pending.len() as u64, Ordering::SeqCst);
                    log.flushed.append(&mut pending);
                }
                Err(e) => {
                    log.error = Some(format!("flush: {e}"));
                    break;
                }
            }
        }
    }
    log.unflushed = pending;
    log
}

#[test]
fn kill9_during_writes_keeps_flushed_data_and_resyncs_only_dirty_regions() {
    let mut node = node_with(&["a", "b"]);
    let before = create_on(&node, "crash", SIZE, &["a", "b"]);
    let uri = node.uri("crash");

    // Region set A: written and FLUSHed (acknowledged) through qemu-io.
    let a_spec: &[(u64, u64, u8)] = &[
        (REGION, REGION, 0xa1),
        (5 * REGION + 4096, 64 * KIB, 0xa2),
        (9 * REGION + 512 * KIB, 512 * KIB, 0xa3),
    ];
    let mut cmds = writes(a_spec);
    cmds.push("flush".into());
    qemu_io_ok(&uri, &cmds);

    // Region set B: 8 regions, 4 writers on their own connections, each
    // writing its blocks once in a scattered order, FLUSH every 8 writes.
    let b_regions: Vec<u64> = (20..28).collect();
    let flushed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut all_b_blocks = Vec::new();
    for w in 0..4u64 {
        let mut blocks = Vec::new();
        for &r in &b_regions[(w as usize * 2)..(w as usize * 2 + 2)] {
            for i in 0..256u64 {
                // 97 is odd, so this is a permutation of the 256 blocks.
                blocks.push(r * REGION + ((i * 97) % 256) * 4096);
            }
        }
        all_b_blocks.extend(blocks.iter().copied());
        let (addr, vol, f, s) = (
            node.daemon.nbd.clone(),
            "crash".to_string(),
            flushed.clone(),
            stop.clone(),
        );
        threads.push(thread::spawn(move || writer(addr, vol, blocks, f, s)));
    }
    // Kill -9 once writes are well under way (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    while flushed.load(Ordering::SeqCst) < 200 {
        assert!(
            Instant::now() < deadline,
            "writers did not get 200 flushed writes in 60 s ({} so far)",
            flushed.load(Ordering::SeqCst)
        );
        thread::sleep(Duration::from_millis(2));
    }
    let st = node.daemon.stop_with(libc::SIGKILL);
    assert!(
        !st.success(),
        "SIGKILL should not look like a clean exit: {st}"
    );
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<WriterLog> = threads
        .into_iter()
        .map(|t| t.join().expect("writer thread"))
        .collect();
    let n_flushed: usize = logs.iter().map(|l| l.flushed.len()).sum();
    let n_unflushed: usize = logs.iter().map(|l| l.unflushed.len()).sum();
    eprintln!("killed with {n_flushed} flushed and {n_unflushed} unflushed block writes");
    assert!(
        logs.iter().any(|l| l.error.is_some()),
        "no writer saw the daemon die: the writes were not running at the kill"
    );
    assert!(
        n_flushed + n_unflushed < all_b_blocks.len(),
        "every block was written before the kill; the test did not kill during writes"
    );

    // Restart on the same data dir: unclean, so a resync of the dirty regions.
    restart(&mut node, &[]);
    let first = node.daemon.volume("crash");
    assert_eq!(
        first["job"]["kind"], "resync",
        "the first status after an unclean restart should show the resync job: {first:#}"
    );
    let after = volume_wait_healthy(&node.daemon, "crash");
    assert_eq!(after["job"]["kind"], "resync", "{after:#}");
    assert_eq!(after["job"]["finished"], true, "{after:#}");
    assert!(after["job"]["error"].is_null(), "resync error: {after:#}");
    let copied = after["copied_bytes"].as_u64().expect("copied_bytes");
    let total = after["job"]["total_bytes"]
        .as_u64()
        .expect("job.total_bytes");
    // Only the dirty regions: at most A's 3 and B's 8 regions.
    let most = (3 + b_regions.len() as u64) * REGION;
    assert!(
        copied > 0 && copied <= most,
        "resync copied {copied} bytes; expected some, at most the {most} bytes of the dirty regions: {after:#}"
    );
    assert!(
        total >= copied && total <= most && total.is_multiple_of(REGION),
        "resync total_bytes {total} should be the dirty regions (≤ {most}): {after:#}"
    );
    assert!(
        copied < SIZE / 4,
        "resync copied {copied} of a {SIZE}-byte volume"
    );
    assert_eq!(
        replicas(&after)
            .iter()
            .map(|r| (r.id.clone(), r.path.clone()))
            .collect::<Vec<_>>(),
        replicas(&before)
            .iter()
            .map(|r| (r.id.clone(), r.path.clone()))
            .collect::<Vec<_>>(),
        "replicas changed across the crash"
    );

    // Everything acknowledged before a FLUSH is there (A through qemu-io).
    qemu_io_ok(&node.uri("crash"), &reads(a_spec));
    // B through NBD: each block is its data if flushed, its data or zeroes if
    // in flight, zeroes if never written.
    let check_blocks = |read: &mut dyn FnMut(u64) -> Vec<u8>, whence: &str| {
        let mut flushed_set = std::collections::HashSet::new();
        let mut maybe_set = std::collections::HashSet::new();
        for l in &logs {
            flushed_set.extend(l.flushed.iter().copied());
            maybe_set.extend(l.unflushed.iter().copied());
        }
        let zero = vec![0u8; 4096];
        let mut new_in_flight = 0;
        for &off in &all_b_blocks {
            let got = read(off);
            let want = block_data(off);
            if flushed_set.contains(&off) {
                assert!(
                    got == want,
                    "{whence}: block at {off} was written and FLUSHed before the kill but is lost"
                );
            } else if maybe_set.contains(&off) {
                assert!(
                    got == want || got == zero,
                    "{whence}: block at {off} (in flight at the kill) is neither its data nor zeroes (torn or foreign)"
                );
                new_in_flight += usize::from(got == want);
            } else {
                assert!(
                    got == zero,
                    "{whence}: block at {off} was never written but is not zero"
                );
            }
        }
        new_in_flight
    };
    let mut c = NbdClient::connect(&node.daemon.nbd, "crash").expect("connect");
    let landed = check_blocks(&mut |off| c.read(off, 4096).expect("NBD read"), "NBD");
    c.disconnect();
    eprintln!("{landed} of the unflushed writes landed");

    let sc = scrub(&node.daemon, "crash", &[]);
    assert_eq!(sc["mismatches"], 0, "scrub after the crash resync: {sc:#}");
    assert_eq!(
        sc["bytes"].as_u64(),
        Some(2 * SIZE),
        "scrub should read both replicas whole: {sc:#}"
    );

    node.daemon.cli_ok(&["volume", "stop", "crash"]);
    assert_replicas_identical(&after);
    let ra = replica_in(&after, "a");
    let in_file = check_blocks(&mut |off| read_replica(&ra, off, 4096), "replica file a");
    assert_eq!(in_file, landed, "the replica file and NBD disagree");
    for (o, l, p) in a_spec {
        assert_replica_bytes(
            &ra,
            *o,
            *l as usize,
            *p,
            "acknowledged write of region set A",
        );
    }
}

// ---------------------------------------------------------------------------
// 2. A replica failed, written around, re-added: only dirty regions copied

#[test]
fn failed_replica_readded_copies_only_the_dirty_regions() {
    let node = node_with(&["a", "b"]);
    create_on(&node, "cu", SIZE, &["a", "b"]);
    let uri = node.uri("cu");
    // 8 MiB of data at the start, in sync on both.
    qemu_io_ok(&uri, &writes(&[(0, 8 * MIB, 0x11)]));
    let v = wait_dirty_clear(&node.daemon, "cu");
    assert_eq!(v["copied_bytes"], 0, "nothing copied yet: {v:#}");
    let b = replica_in(&v, "b");

    let out = node.daemon.cli_json(&["replica", "fail", "cu", "b"]);
    eprintln!("replica fail: {out}");
    let v = node.daemon.volume("cu");
    assert_eq!(v["state"], "degraded", "{v:#}");
    assert_eq!(replica_json(&v, "b")["state"], "failed", "{v:#}");
    assert_eq!(replica_json(&v, "a")["state"], "in_sync", "{v:#}");
    assert!(
        v["actions"].as_array().expect("actions").iter().any(|a| a
            .as_str()
            .is_some_and(|s| s.contains("ditto replica readd cu"))),
        "a failed replica should come with a `ditto replica readd` action: {v:#}"
    );

    // Three regions written while b is out: a 4 KiB write into region 2
    // (already fully allocated), and two whole fresh regions.
    let spec: &[(u64, u64, u8)] = &[
        (2 * REGION + 8 * KIB, 4 * KIB, 0x22),
        (20 * REGION, REGION, 0x33),
        (40 * REGION, REGION, 0x44),
    ];
    qemu_io_ok(&uri, &writes(spec));
    let v = node.daemon.volume("cu");
    assert_eq!(
        v["dirty_regions"], 3,
        "three regions written while b was out: {v:#}"
    );
    // b really missed them.
    assert_replica_bytes(
        &b,
        20 * REGION,
        REGION as usize,
        0,
        "failed replica b before readd",
    );
    assert_replica_bytes(
        &b,
        2 * REGION + 8 * KIB,
        4096,
        0x11,
        "failed replica b before readd",
    );

    let plan = node.daemon.cli_json(&["replica", "readd", "cu", "b"]);
    assert_eq!(plan["plan"], "catch_up", "readd --json: {plan:#}");
    assert_eq!(plan["dirty_regions"], 3, "readd --json: {plan:#}");
    let v = volume_wait_healthy(&node.daemon, "cu");
    assert_eq!(v["job"]["kind"], "catch_up", "{v:#}");
    assert_eq!(v["job"]["total_bytes"].as_u64(), Some(3 * REGION), "{v:#}");
    assert_eq!(
        v["copied_bytes"].as_u64(),
        Some(3 * REGION),
        "catch-up should copy exactly the 3 dirty regions (3 MiB), not the volume: {v:#}"
    );

    let mut check = reads(spec);
    check.extend(reads(&[
        (0, 2 * REGION + 8 * KIB, 0x11),
        (2 * REGION + 12 * KIB, 6 * MIB - 12 * KIB, 0x11),
        (8 * MIB, 12 * MIB, 0),
        (41 * REGION, SIZE - 41 * REGION, 0),
    ]));
    qemu_io_ok(&uri, &check);
    assert_replicas_identical(&v);
    // And through each replica alone: fail a, read from b only.
    node.daemon.cli_ok(&["replica", "fail", "cu", "a"]);
    qemu_io_ok(&uri, &check);
    node.daemon.cli_ok(&["replica", "readd", "cu", "a"]);
    volume_wait_healthy(&node.daemon, "cu");
}

// ---------------------------------------------------------------------------
// 3. A stale replica is refused at start and never read from

#[test]
fn stale_replica_is_refused_and_never_read_until_readded() {
    let mut node = node_with(&["a", "b"]);
    let v0 = create_on(&node, "st", SIZE, &["a", "b"]);
    let b = replica_in(&v0, "b");
    let uri = node.uri("st");
    qemu_io_ok(&uri, &writes(&[(0, 4 * MIB, 0x10)]));
    node.daemon.cli_ok(&["replica", "fail", "st", "b"]);
    let spec: &[(u64, u64, u8)] = &[(MIB, MIB, 0x5a), (30 * MIB, 2 * MIB, 0x5b)];
    qemu_io_ok(&uri, &writes(spec));
    node.daemon.stop();

    restart(&mut node, &[]);
    let v = wait_volume(
        &node.daemon,
        "st",
        "the volume running",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_eq!(
        v["state"], "degraded",
        "a stale replica must not count as in sync: {v:#}"
    );
    let rb = replica_json(&v, "b");
    assert!(
        rb["state"] == "stale" || rb["state"] == "failed",
        "b missed writes and must come back stale (or failed): {v:#}"
    );
    assert_eq!(replica_json(&v, "a")["state"], "in_sync", "{v:#}");
    let actions: Vec<&str> = v["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        actions.iter().any(|a| a.contains("ditto replica readd st")),
        "actions should say how to bring b back: {v:#}"
    );
    let reads_b_before = rb["reads"].as_u64().unwrap_or(0);

    // Corrupt b where the new data is: reads must still return a's data.
    for (o, l, _) in spec {
        poke(&b.path, b.data_offset + o, &vec![0xee; *l as usize]);
    }
    let mut cmds = Vec::new();
    for i in 0..16u64 {
        cmds.push(format!("read -P 0x5a {} {}", MIB + i * 64 * KIB, 64 * KIB));
        cmds.push(format!(
            "read -P 0x5b {} {}",
            30 * MIB + i * 128 * KIB,
            128 * KIB
        ));
    }
    cmds.extend(reads(spec));
    qemu_io_ok(&node.uri("st"), &cmds);
    let v = node.daemon.volume("st");
    assert_eq!(
        replica_json(&v, "b")["reads"].as_u64().unwrap_or(0),
        reads_b_before,
        "the stale replica was read from: {v:#}"
    );

    let out = volume_wait(&node.daemon, "st");
    assert!(
        !out.success(),
        "`volume wait` must fail while b is stale: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("ditto replica readd st"),
        "`volume wait` should say to readd: {}",
        out.describe()
    );

    let plan = node.daemon.cli_json(&["replica", "readd", "st", "b"]);
    eprintln!("readd: {plan}");
    let v = volume_wait_healthy(&node.daemon, "st");
    let mut check = reads(spec);
    check.push(format!("read -P 0x10 0 {MIB}"));
    check.push(format!("read -P 0x10 {} {}", 2 * MIB, 2 * MIB));
    qemu_io_ok(&node.uri("st"), &check);
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 4. Split brain

#[test]
fn split_brain_is_refused_until_resolved() {
    let mut node = node_with(&["a", "b"]);
    let v0 = create_on(&node, "sb", SIZE, &["a", "b"]);
    let (ra, rb) = (replica_in(&v0, "a"), replica_in(&v0, "b"));
    qemu_io_ok(&node.uri("sb"), &writes(&[(0, MIB, 0x01)]));
    let cfg = config(&node, "ditto.toml", "degraded_wait_secs = 1\n");
    let cfg = s(&cfg).to_string();
    node.daemon.stop();

    // Only a: write X.
    take_away(&rb.path);
    restart(&mut node, &["--config", &cfg, "--degraded"]);
    let v = wait_volume(
        &node.daemon,
        "sb",
        "a degraded start on a",
        Duration::from_secs(30),
        |v| v["state"] == "degraded",
    );
    assert_eq!(replica_json(&v, "a")["state"], "in_sync", "{v:#}");
    assert_eq!(replica_json(&v, "b")["state"], "missing", "{v:#}");
    let x: &[(u64, u64, u8)] = &[(3 * MIB, 2 * MIB, 0x58)];
    qemu_io_ok(&node.uri("sb"), &writes(x));
    node.daemon.stop();

    // Only b: write Y, over X's place and where a has nothing. b alone is
    // stale by the node's record, so even a degraded start refuses it; the
    // operator forces it, which is how a split brain is made.
    take_away(&ra.path);
    bring_back(&rb.path);
    restart(&mut node, &["--config", &cfg, "--degraded"]);
    let v = wait_volume(
        &node.daemon,
        "sb",
        "the start decision on b",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_eq!(v["state"], "stopped", "b alone is stale: {v:#}");
    node.daemon
        .cli_json(&["volume", "start", "sb", "--degraded", "--force-stale"]);
    let v = wait_volume(
        &node.daemon,
        "sb",
        "a forced degraded start on b",
        Duration::from_secs(30),
        |v| v["state"] == "degraded",
    );
    assert_eq!(replica_json(&v, "b")["state"], "in_sync", "{v:#}");
    assert_eq!(replica_json(&v, "a")["state"], "missing", "{v:#}");
    let y: &[(u64, u64, u8)] = &[(3 * MIB, 2 * MIB, 0x59), (30 * MIB, MIB, 0x59)];
    qemu_io_ok(&node.uri("sb"), &writes(y));
    node.daemon.stop();

    // Both back: the volume must not start.
    bring_back(&ra.path);
    restart(&mut node, &["--config", &cfg]);
    let v = wait_volume(
        &node.daemon,
        "sb",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_eq!(
        v["state"], "stopped",
        "a split-brained volume must not start: {v:#}"
    );
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        mentions_any(reason, &["split brain"]),
        "reason should name the split brain: {v:#}"
    );
    let actions: Vec<&str> = v["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        actions
            .iter()
            .any(|a| a.contains("ditto volume resolve sb")),
        "actions should say `ditto volume resolve`: {v:#}"
    );
    let out = qemu_io(&node.uri("sb"), &[format!("read 0 {MIB}")]);
    assert!(
        qemu_io_failed(&out),
        "a stopped volume must not be served: {}",
        out.describe()
    );
    let out = volume_wait(&node.daemon, "sb");
    assert!(
        !out.success(),
        "`volume wait` must fail on a split brain: {}",
        out.describe()
    );
    let out = node.daemon.cli(&["volume", "start", "sb"]);
    assert!(
        !out.success(),
        "`volume start` must not start a split brain: {}",
        out.describe()
    );
    assert_eq!(node.daemon.volume("sb")["state"], "stopped");

    let out = node
        .daemon
        .cli(&["volume", "resolve", "sb", "--keep", "nosuch"])
        .assert_failure();
    assert!(out.stderr.contains("no replica"), "{}", out.describe());
    assert_eq!(node.daemon.volume("sb")["state"], "stopped");

    // Keep a: X wins; b's Y everywhere is discarded.
    let resolved = node
        .daemon
        .cli_json(&["volume", "resolve", "sb", "--keep", "a"]);
    assert_ne!(resolved["state"], "stopped", "resolve --json: {resolved:#}");
    volume_wait_healthy(&node.daemon, "sb");
    let mut check = reads(x);
    check.extend(reads(&[
        (0, MIB, 0x01),
        (MIB, 2 * MIB, 0),
        (5 * MIB, 25 * MIB, 0),
        (30 * MIB, MIB, 0),
    ]));
    // Served by both replicas in turn: first as assembled, then by b alone
    // (a failed out), which must not bring back anything of Y.
    qemu_io_ok(&node.uri("sb"), &check);
    node.daemon.cli_ok(&["replica", "fail", "sb", "a"]);
    let out = qemu_io(&node.uri("sb"), &check);
    assert!(
        !qemu_io_failed(&out),
        "after `volume resolve sb --keep a` and the rebuild of b, reading through b alone \
         must return a's data, not the discarded Y: {}",
        out.describe()
    );
    node.daemon.cli_ok(&["replica", "readd", "sb", "a"]);
    let v = volume_wait_healthy(&node.daemon, "sb");
    let rb = replica_in(&v, "b");
    assert_replica_bytes(
        &rb,
        3 * MIB,
        2 * MIB as usize,
        0x58,
        "b after resolve --keep a (X's place)",
    );
    assert_replica_bytes(
        &rb,
        30 * MIB,
        MIB as usize,
        0,
        "b after resolve --keep a (where only b had written Y)",
    );
    assert_replicas_identical(&v);
    let sc = scrub(&node.daemon, "sb", &[]);
    assert_eq!(sc["mismatches"], 0, "{sc:#}");
}

// ---------------------------------------------------------------------------
// 5. Degraded start policy

/// A node with pools a and b and volumes `names` (64 MiB on a and b, each
/// with 1 MiB of pattern 0x60+i at 0), then stopped with the replica in b
/// of each of `missing` moved away. Returns the statuses before the stop.
fn stopped_with_missing(names: &[&str], missing: &[&str]) -> (Node, Vec<Value>) {
    let mut node = node_with(&["a", "b"]);
    let mut vols = Vec::new();
    for (i, n) in names.iter().enumerate() {
        vols.push(create_on(&node, n, SIZE, &["a", "b"]));
        qemu_io_ok(&node.uri(n), &writes(&[(0, MIB, 0x60 + i as u8)]));
    }
    node.daemon.stop();
    for (n, v) in names.iter().zip(&vols) {
        if missing.contains(n) {
            take_away(&replica_in(v, "b").path);
        }
    }
    (node, vols)
}

fn assert_stopped_for_missing(v: &Value, name: &str) {
    assert_eq!(
        v["state"], "stopped",
        "volume {name} with a replica missing must stay stopped: {v:#}"
    );
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        mentions_any(reason, &["missing"]),
        "reason should say a replica is missing: {v:#}"
    );
    assert!(
        reason.contains("--degraded"),
        "reason should name --degraded: {v:#}"
    );
    let actions: Vec<&str> = v["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        actions
            .iter()
            .any(|a| a.contains(&format!("ditto volume start {name}"))),
        "{v:#}"
    );
}

fn assert_degraded_on_a(v: &Value) {
    assert_eq!(v["state"], "degraded", "{v:#}");
    assert_eq!(replica_json(v, "a")["state"], "in_sync", "{v:#}");
    assert_eq!(replica_json(v, "b")["state"], "missing", "{v:#}");
}

#[test]
fn degraded_start_default_refuses_then_start_degraded_and_readd() {
    let (mut node, vols) = stopped_with_missing(&["d1"], &["d1"]);
    let cfg = config(&node, "ditto.toml", "degraded_wait_secs = 1\n");
    restart(&mut node, &["--config", s(&cfg)]);
    let v = wait_volume(
        &node.daemon,
        "d1",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_stopped_for_missing(&v, "d1");
    let out = qemu_io(&node.uri("d1"), &[format!("read 0 {MIB}")]);
    assert!(
        qemu_io_failed(&out),
        "a stopped volume must not be served: {}",
        out.describe()
    );

    let started = node
        .daemon
        .cli_json(&["volume", "start", "d1", "--degraded"]);
    assert_degraded_on_a(&started);
    let v = node.daemon.volume("d1");
    assert_degraded_on_a(&v);
    let uri = node.uri("d1");
    qemu_io_ok(&uri, &reads(&[(0, MIB, 0x60)]));
    qemu_io_ok(&uri, &writes(&[(10 * MIB, MIB, 0x61)]));
    // Degraded with a replica missing: `volume wait` cannot succeed, says what to do.
    let out = volume_wait(&node.daemon, "d1");
    assert!(
        !out.success() && out.stderr.contains("ditto replica readd d1"),
        "`volume wait` on a volume missing a replica should fail and point at readd: {}",
        out.describe()
    );
    // Still missing: readd is refused with the way out.
    let out = node
        .daemon
        .cli(&["replica", "readd", "d1", "b"])
        .assert_failure();
    assert!(
        out.stderr.contains("ditto replica remove d1"),
        "readd of a replica whose file is gone should suggest remove + add: {}",
        out.describe()
    );
    assert_degraded_on_a(&node.daemon.volume("d1"));

    // The disk is back: readd catches it up.
    bring_back(&replica_in(&vols[0], "b").path);
    let plan = node.daemon.cli_json(&["replica", "readd", "d1", "b"]);
    eprintln!("readd: {plan}");
    let v = volume_wait_healthy(&node.daemon, "d1");
    qemu_io_ok(&uri, &reads(&[(0, MIB, 0x60), (10 * MIB, MIB, 0x61)]));
    assert_replicas_identical(&v);
}

#[test]
fn degraded_start_by_config_and_no_degraded_flag_wins() {
    let (mut node, _) = stopped_with_missing(&["d2"], &["d2"]);
    let cfg = config(
        &node,
        "ditto.toml",
        "start_degraded = true\ndegraded_wait_secs = 1\n",
    );
    let cfg = s(&cfg).to_string();

    // (b) start_degraded = true: starts degraded by itself.
    restart(&mut node, &["--config", &cfg]);
    let v = wait_volume(
        &node.daemon,
        "d2",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_degraded_on_a(&v);
    qemu_io_ok(&node.uri("d2"), &reads(&[(0, MIB, 0x60)]));
    node.daemon.stop();

    // (c) the same config, but `daemon --no-degraded` for this start: stopped.
    restart(&mut node, &["--config", &cfg, "--no-degraded"]);
    let v = wait_volume(
        &node.daemon,
        "d2",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_stopped_for_missing(&v, "d2");
    // `volume start --no-degraded` keeps it stopped too.
    let v = node
        .daemon
        .cli_json(&["volume", "start", "d2", "--no-degraded"]);
    assert_stopped_for_missing(&v, "d2");
}

#[test]
fn per_volume_degraded_policy_touches_only_its_volume() {
    let (mut node, vols) = stopped_with_missing(&["v1", "v2", "v3"], &["v1", "v2"]);
    let cfg = config(
        &node,
        "ditto.toml",
        "degraded_wait_secs = 1\nstart_degraded = false\n[volumes.v1]\nstart_degraded = true\n",
    );
    restart(&mut node, &["--config", s(&cfg)]);
    // v3 has every replica: healthy at once, serving while the others wait.
    let v3 = node.daemon.volume("v3");
    assert_eq!(
        v3["state"], "healthy",
        "a volume with every replica must not wait: {v3:#}"
    );
    assert_eq!(
        v3["generation"], vols[2]["generation"],
        "v3 was reassembled differently: {v3:#}"
    );
    let uri3 = node.uri("v3");
    qemu_io_ok(&uri3, &reads(&[(0, MIB, 0x62)]));

    let v1 = wait_volume(
        &node.daemon,
        "v1",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_degraded_on_a(&v1);
    qemu_io_ok(&node.uri("v1"), &reads(&[(0, MIB, 0x60)]));
    let v2 = wait_volume(
        &node.daemon,
        "v2",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_stopped_for_missing(&v2, "v2");

    let v3 = node.daemon.wait_healthy("v3");
    assert_eq!(v3["generation"], vols[2]["generation"], "{v3:#}");
    qemu_io_ok(&uri3, &writes(&[(2 * MIB, MIB, 0x63)]));
    qemu_io_ok(&uri3, &reads(&[(0, MIB, 0x62), (2 * MIB, MIB, 0x63)]));
    assert_replicas_identical(&v3);
}

#[test]
fn replica_returning_within_the_wait_starts_healthy() {
    let (mut node, vols) = stopped_with_missing(&["w1"], &["w1"]);
    let cfg = config(
        &node,
        "ditto.toml",
        "degraded_wait_secs = 5\nstart_degraded = true\n",
    );
    let t0 = Instant::now();
    restart(&mut node, &["--config", s(&cfg)]);
    let v = node.daemon.volume("w1");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "daemon start took too long to test the wait"
    );
    assert_eq!(
        v["state"], "starting",
        "while waiting for a missing replica: {v:#}"
    );
    assert!(
        v["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "starting should say why: {v:#}"
    );
    let out = qemu_io(&node.uri("w1"), &[format!("read 0 {MIB}")]);
    assert!(
        qemu_io_failed(&out),
        "a starting volume must not be served yet: {}",
        out.describe()
    );

    bring_back(&replica_in(&vols[0], "b").path);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let v = loop {
        let v = node.daemon.volume("w1");
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "healthy" || Instant::now() >= deadline {
            break v;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["state"], "healthy", "states seen {seen:?}; last: {v:#}");
    assert!(
        !seen.iter().any(|s| s == "degraded" || s == "stopped"),
        "the replica came back within the wait; the volume must not have started degraded: states seen {seen:?}"
    );
    assert_eq!(
        v["generation"], vols[0]["generation"],
        "a full start keeps the generation: {v:#}"
    );
    let v = node.daemon.wait_healthy("w1");
    qemu_io_ok(&node.uri("w1"), &reads(&[(0, MIB, 0x60)]));
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 6. replica add to a single-copy volume while a client writes

#[test]
fn replica_add_rebuilds_allocated_data_while_a_client_writes() {
    const BIG: u64 = 128 * MIB;
    // 8 MiB of data: 4 MiB at 0 and 4 MiB at 64 MiB.
    const AREAS: [(u64, u64); 2] = [(0, 4 * MIB), (64 * MIB, 4 * MIB)];
    let node = node_with(&["a", "b"]);
    create_on(&node, "grow", BIG, &["a"]);
    let mut model: Vec<Vec<u8>> = Vec::new();
    {
        let mut c = NbdClient::connect(&node.daemon.nbd, "grow").expect("connect");
        for (i, (off, len)) in AREAS.iter().enumerate() {
            let data = random_bytes(*len as usize, 100 + i as u64);
            for k in 0..(*len / MIB) {
                c.write(
                    off + k * MIB,
                    &data[(k * MIB) as usize..((k + 1) * MIB) as usize],
                )
                .expect("write");
            }
            model.push(data);
        }
        c.flush().expect("flush");
        c.disconnect();
    }

    // A client writing (and checking its reads) during the add, bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (addr, stop) = (node.daemon.nbd.clone(), stop.clone());
        let mut model = model.clone();
        thread::spawn(move || {
            let mut c = NbdClient::connect(&addr, "grow").expect("connect");
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 5000 {
                let area = (n % 2) as usize;
                let (off, len) = AREAS[area];
                let blocks = (len - 64 * KIB) / 4096;
                let at = ((n * 7919) % blocks) * 4096;
                let data = random_bytes(64 * KIB as usize, 1000 + n);
                c.write(off + at, &data)
                    .expect("client write during the rebuild");
                model[area][at as usize..(at + 64 * KIB) as usize].copy_from_slice(&data);
                let rat = ((n * 104_729 + 13) % blocks) * 4096;
                let got = c
                    .read(off + rat, 64 * KIB as u32)
                    .expect("client read during the rebuild");
                assert!(
                    got[..] == model[area][rat as usize..(rat + 64 * KIB) as usize],
                    "client read at {} returned other data than written during the rebuild",
                    off + rat
                );
                n += 1;
                thread::sleep(Duration::from_millis(3));
            }
            c.flush().expect("flush");
            c.disconnect();
            (model, n)
        })
    };
    thread::sleep(Duration::from_millis(300));
    let added = node
        .daemon
        .cli_json(&["replica", "add", "grow", "--pool", "b"]);
    assert_eq!(
        added["replicas"].as_array().map(Vec::len),
        Some(2),
        "replica add --json: {added:#}"
    );
    // Watch the job while it runs.
    let mut seen_rebuild = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let v = node.daemon.volume("grow");
        if v["job"]["kind"] == "rebuild" {
            seen_rebuild = Some(v["job"].clone());
        }
        if v["state"] == "healthy" {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let v = volume_wait_healthy(&node.daemon, "grow");
    stop.store(true, Ordering::SeqCst);
    let (model, n) = client.join().expect("client thread");
    eprintln!("client did {n} write+read rounds; job seen during the add: {seen_rebuild:?}");
    assert!(n > 0, "the client did no I/O");
    let job = &v["job"];
    assert_eq!(job["kind"], "rebuild", "{v:#}");
    let total = job["total_bytes"].as_u64().expect("total_bytes");
    assert!(
        (8 * MIB..32 * MIB).contains(&total),
        "the rebuild should copy the allocated 8 MiB, not the 128 MiB volume: total_bytes {total}: {v:#}"
    );
    let copied = v["copied_bytes"].as_u64().expect("copied_bytes");
    assert!(
        (8 * MIB..32 * MIB).contains(&copied),
        "copied_bytes {copied}: {v:#}"
    );

    // The data, through NBD (read from either replica) and in both files.
    let mut c = NbdClient::connect(&node.daemon.nbd, "grow").expect("connect");
    for (i, (off, len)) in AREAS.iter().enumerate() {
        for k in 0..(*len / MIB) {
            let got = c.read(off + k * MIB, MIB as u32).expect("read");
            assert!(
                got[..] == model[i][(k * MIB) as usize..((k + 1) * MIB) as usize],
                "volume data at {} differs from what was written",
                off + k * MIB
            );
        }
    }
    c.disconnect();
    node.daemon.cli_ok(&["volume", "stop", "grow"]);
    assert_replicas_identical(&v);
    let rb = replica_in(&v, "b");
    for (i, (off, len)) in AREAS.iter().enumerate() {
        assert!(
            read_replica(&rb, *off, *len as usize) == model[i],
            "new replica b differs from the written data at {off}"
        );
    }
    // Sparse: the new replica holds about the data, not the whole volume.
    let blocks = std::fs::metadata(&rb.path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("stat");
    assert!(
        blocks < 40 * MIB,
        "new replica allocates {blocks} bytes for 8 MiB of data"
    );
}

// ---------------------------------------------------------------------------
// 7. Scrub finds a corruption, repairs it from the chosen source

#[test]
fn scrub_finds_and_repairs_a_corrupted_replica() {
    let node = node_with(&["a", "b"]);
    let v = create_on(&node, "scr", SIZE, &["a", "b"]);
    let uri = node.uri("scr");
    let spec: &[(u64, u64, u8)] = &[(0, 8 * MIB, 0x31), (40 * MIB, 2 * MIB, 0x32)];
    qemu_io_ok(&uri, &writes(spec));
    let sc = scrub(&node.daemon, "scr", &[]);
    assert_eq!(sc["mismatches"], 0, "clean volume: {sc:#}");

    node.daemon.cli_ok(&["volume", "stop", "scr"]);
    let b = replica_in(&v, "b");
    let bad_off = 5 * MIB + 1234;
    poke(&b.path, b.data_offset + bad_off, b"\xde\xad\xbe\xef");
    let started = node.daemon.cli_json(&["volume", "start", "scr"]);
    assert_eq!(started["state"], "healthy", "{started:#}");

    let sc = scrub(&node.daemon, "scr", &[]);
    assert_eq!(sc["mismatches"], 1, "one corrupted region: {sc:#}");
    assert_eq!(
        sc["mismatched_offsets"],
        json!([5 * MIB]),
        "the corrupted region's offset: {sc:#}"
    );
    assert_eq!(
        sc["repaired"], 0,
        "a scrub without --repair must not repair: {sc:#}"
    );
    let v1 = node.daemon.volume("scr");
    assert_eq!(
        v1["last_scrub"]["mismatches"], 1,
        "status last_scrub: {v1:#}"
    );
    // Still corrupt on b after a plain scrub.
    assert_eq!(read_replica(&b, bad_off, 4), b"\xde\xad\xbe\xef");

    let sc = scrub(&node.daemon, "scr", &["--repair", "--source", "a"]);
    assert_eq!(sc["mismatches"], 1, "{sc:#}");
    assert_eq!(
        sc["repaired"], 1,
        "the region should be rewritten from a: {sc:#}"
    );
    assert_replica_bytes(&b, 5 * MIB, MIB as usize, 0x31, "b after the repair");

    let sc = scrub(&node.daemon, "scr", &[]);
    assert_eq!(sc["mismatches"], 0, "after the repair: {sc:#}");
    qemu_io_ok(&uri, &reads(spec));
    assert_replicas_identical(&node.daemon.wait_healthy("scr"));
}

// ---------------------------------------------------------------------------
// 8. Bad input to the recovery commands: refused, informative, nothing changed

#[test]
fn bad_recovery_commands_are_refused_and_change_nothing() {
    let node = node_with(&["a", "b", "c"]);
    create_on(&node, "two", SIZE, &["a", "b"]);
    create_on(&node, "one", SIZE, &["a"]);
    qemu_io_ok(&node.uri("two"), &writes(&[(0, MIB, 0x21)]));

    let refused = |args: &[&str], needles: &[&str]| {
        let before = snapshot(&node);
        let out = node.daemon.cli(args).assert_failure();
        assert!(
            mentions_any(&out.stderr, needles),
            "the refusal should mention one of {needles:?}: {}",
            out.describe()
        );
        let after = snapshot(&node);
        assert_eq!(
            after,
            before,
            "`ditto {}` changed something although refused",
            args.join(" ")
        );
        out
    };

    refused(&["replica", "readd", "two", "nosuch"], &["no replica"]);
    let out = refused(&["replica", "readd", "two", "zzzz"], &["no replica"]);
    assert!(
        out.stderr.contains("pool a") || out.stderr.contains("(pool"),
        "should list the replicas: {}",
        out.describe()
    );
    refused(
        &["replica", "readd", "two", "a"],
        &["already", "in_sync", "in sync"],
    );
    refused(
        &["replica", "add", "two", "--pool", "a"],
        &["already has a replica in pool"],
    );
    refused(
        &["replica", "add", "two", "--pool", "nosuchpool"],
        &["nosuchpool"],
    );
    refused(&["replica", "fail", "one", "a"], &["last in-sync"]);
    refused(&["replica", "remove", "one", "a"], &["last in-sync"]);
    refused(&["replica", "fail", "two", "nosuch"], &["no replica"]);
    refused(&["volume", "resolve", "two", "--keep", "a"], &["running"]);
    refused(
        &["volume", "scrub", "one"],
        &["two in-sync", "at least two"],
    );
    refused(
        &["volume", "scrub", "two", "--repair", "--source", "c"],
        &["no replica"],
    );
    refused(&["volume", "start", "two"], &["already running"]);
    refused(&["replica", "readd", "nosuchvol", "a"], &["nosuchvol"]);
    refused(&["volume", "wait", "nosuchvol"], &["nosuchvol"]);

    // Failing the last in-sync replica of a degraded mirror.
    node.daemon.cli_ok(&["replica", "fail", "two", "b"]);
    refused(&["replica", "fail", "two", "a"], &["last in-sync"]);
    refused(
        &["volume", "scrub", "two"],
        &["two in-sync", "at least two"],
    );
    qemu_io_ok(&node.uri("two"), &reads(&[(0, MIB, 0x21)]));
    node.daemon.cli_ok(&["replica", "readd", "two", "b"]);
    let v = volume_wait_healthy(&node.daemon, "two");
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 9. kill -9 during a rebuild: it resumes from its checkpoint, at the configured rate

#[test]
fn rebuild_killed_midway_resumes_and_honours_the_rate_limit() {
    let mut node = node_with(&["a", "b"]);
    create_on(&node, "rb", SIZE, &["a"]);
    // 8 MiB, one pattern per MiB.
    let spec: Vec<(u64, u64, u8)> = (0..8u64).map(|i| (i * MIB, MIB, 0x40 + i as u8)).collect();
    qemu_io_ok(&node.uri("rb"), &writes(&spec));
    node.daemon.stop();
    let cfg = config(
        &node,
        "ditto.toml",
        "resync_min_rate = \"1M\"\nresync_max_rate = \"2M\"\n",
    );
    let cfg = s(&cfg).to_string();
    restart(&mut node, &["--config", &cfg]);
    node.daemon.wait_healthy("rb");
    wait_dirty_clear(&node.daemon, "rb");

    node.daemon
        .cli_json(&["replica", "add", "rb", "--pool", "b"]);
    // Past the first checkpoint (written every 2 s), well before the end.
    let v = wait_volume(
        &node.daemon,
        "rb",
        "the rebuild to pass 5 MiB",
        Duration::from_secs(30),
        |v| {
            v["job"]["kind"] == "rebuild" && v["job"]["done_bytes"].as_u64().unwrap_or(0) >= 5 * MIB
        },
    );
    let job = &v["job"];
    assert_eq!(
        job["finished"], false,
        "the rebuild should still run at 2 MiB/s: {v:#}"
    );
    assert_eq!(job["total_bytes"].as_u64(), Some(8 * MIB), "{v:#}");
    let rate = job["rate_bytes_per_sec"].as_u64().expect("rate");
    assert!(
        rate <= 3 * MIB,
        "resync_max_rate = 2M, but the rebuild runs at {rate} bytes/s: {v:#}"
    );
    assert_eq!(replica_json(&v, "b")["state"], "rebuilding", "{v:#}");
    let st = node.daemon.stop_with(libc::SIGKILL);
    assert!(!st.success());

    restart(&mut node, &["--config", &cfg]);
    let v = node.daemon.volume("rb");
    assert_eq!(v["state"], "degraded", "b is not complete yet: {v:#}");
    assert_eq!(
        replica_json(&v, "b")["state"],
        "rebuilding",
        "the half-rebuilt replica must come back rebuilding, never in sync: {v:#}"
    );
    assert_eq!(replica_json(&v, "a")["state"], "in_sync", "{v:#}");
    // Reads while it rebuilds come from a.
    qemu_io_ok(&node.uri("rb"), &reads(&spec));
    let v = volume_wait_healthy(&node.daemon, "rb");
    let job = &v["job"];
    assert_eq!(job["kind"], "rebuild", "{v:#}");
    let total = job["total_bytes"].as_u64().expect("total");
    assert!(
        total < 8 * MIB,
        "the rebuild should resume from its checkpoint, not copy all 8 MiB again (total_bytes {total}): {v:#}"
    );
    qemu_io_ok(&node.uri("rb"), &reads(&spec));
    node.daemon.cli_ok(&["volume", "stop", "rb"]);
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 10. kill -9 while degraded: the dirty map survives, the re-add catches up

#[test]
fn dirty_map_survives_a_crash_while_degraded() {
    let mut node = node_with(&["a", "b"]);
    create_on(&node, "dg", SIZE, &["a", "b"]);
    let uri = node.uri("dg");
    qemu_io_ok(&uri, &writes(&[(0, 4 * MIB, 0x10)]));
    wait_dirty_clear(&node.daemon, "dg");
    node.daemon.cli_ok(&["replica", "fail", "dg", "b"]);
    let spec: &[(u64, u64, u8)] = &[(10 * MIB, 2 * MIB, 0x71), (MIB + 4096, 4096, 0x72)];
    let mut cmds = writes(spec);
    cmds.push("flush".into());
    qemu_io_ok(&uri, &cmds);
    assert_eq!(node.daemon.volume("dg")["dirty_regions"], 3);
    let st = node.daemon.stop_with(libc::SIGKILL);
    assert!(!st.success());

    restart(&mut node, &[]);
    let v = wait_volume(
        &node.daemon,
        "dg",
        "the volume running",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_eq!(v["state"], "degraded", "{v:#}");
    let rb = replica_json(&v, "b");
    assert!(
        rb["state"] == "stale" || rb["state"] == "failed",
        "b missed writes: {v:#}"
    );
    assert_eq!(
        v["dirty_regions"], 3,
        "the regions written while b was out must still be marked after the crash: {v:#}"
    );
    qemu_io_ok(&node.uri("dg"), &reads(spec));

    let plan = node.daemon.cli_json(&["replica", "readd", "dg", "b"]);
    assert_eq!(plan["plan"], "catch_up", "{plan:#}");
    assert_eq!(plan["dirty_regions"], 3, "{plan:#}");
    let v = volume_wait_healthy(&node.daemon, "dg");
    assert_eq!(v["copied_bytes"].as_u64(), Some(3 * MIB), "{v:#}");
    let mut check = reads(spec);
    check.extend(reads(&[
        (0, MIB + 4096, 0x10),
        (MIB + 8192, 3 * MIB - 8192, 0x10),
    ]));
    qemu_io_ok(&node.uri("dg"), &check);
    node.daemon.cli_ok(&["volume", "stop", "dg"]);
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 11. A dead disk replaced: remove its replica, add one on another pool

#[test]
fn dead_replica_replaced_on_another_pool() {
    let mut node = node_with(&["a", "b", "c"]);
    let v0 = create_on(&node, "rp", SIZE, &["a", "b"]);
    let uri = node.uri("rp");
    let spec: &[(u64, u64, u8)] = &[(0, 2 * MIB, 0x81), (50 * MIB, MIB, 0x82)];
    qemu_io_ok(&uri, &writes(spec));
    node.daemon.cli_ok(&["replica", "fail", "rp", "b"]);
    let v = node.daemon.volume("rp");
    let actions: Vec<&str> = v["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        actions
            .iter()
            .any(|a| a.contains("ditto replica remove rp") && a.contains("ditto replica add rp")),
        "a failed replica's actions should offer remove + add: {v:#}"
    );
    let old_b = replica_in(&v0, "b").path;
    node.daemon.cli_ok(&["replica", "remove", "rp", "b"]);
    let v = node.daemon.volume("rp");
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert_eq!(
        v["state"], "healthy",
        "a 1-replica volume with its replica in sync: {v:#}"
    );
    assert!(
        !old_b.exists(),
        "the removed replica file should be renamed"
    );
    assert!(
        old_b.with_extension("removed").exists(),
        "the removed replica is kept as .removed"
    );

    node.daemon
        .cli_json(&["replica", "add", "rp", "--pool", "c"]);
    let v = volume_wait_healthy(&node.daemon, "rp");
    let mut pools: Vec<String> = replicas(&v).into_iter().map(|r| r.pool).collect();
    pools.sort();
    assert_eq!(pools, ["a", "c"], "{v:#}");
    qemu_io_ok(&uri, &reads(spec));

    // And it stays that way across a restart.
    node.daemon.stop();
    restart(&mut node, &[]);
    let v = node.daemon.wait_healthy("rp");
    let mut pools: Vec<String> = replicas(&v).into_iter().map(|r| r.pool).collect();
    pools.sort();
    assert_eq!(pools, ["a", "c"], "{v:#}");
    qemu_io_ok(&node.uri("rp"), &reads(spec));
    node.daemon.cli_ok(&["volume", "stop", "rp"]);
    assert_replicas_identical(&v);
}

// ---------------------------------------------------------------------------
// 12. kill -9 during a catch-up that includes a discard

#[test]
fn catch_up_killed_midway_does_not_resurrect_discarded_data() {
    let mut node = node_with(&["a", "b"]);
    create_on(&node, "cd", SIZE, &["a", "b"]);
    // Region 30 holds D on both replicas.
    qemu_io_ok(
        &node.uri("cd"),
        &writes(&[(0, MIB, 0x90), (30 * MIB, MIB, 0x91)]),
    );
    node.daemon.stop();
    let cfg = config(
        &node,
        "ditto.toml",
        "resync_min_rate = \"1M\"\nresync_max_rate = \"2M\"\n",
    );
    let cfg = s(&cfg).to_string();
    restart(&mut node, &["--config", &cfg]);
    node.daemon.wait_healthy("cd");
    wait_dirty_clear(&node.daemon, "cd");

    // While b is out: 6 MiB written (regions 2..8) and region 30 discarded.
    node.daemon.cli_ok(&["replica", "fail", "cd", "b"]);
    let spec: Vec<(u64, u64, u8)> = (2..8u64).map(|i| (i * MIB, MIB, 0xa0 + i as u8)).collect();
    let mut cmds = writes(&spec);
    cmds.push(format!("discard {} {}", 30 * MIB, MIB));
    cmds.push("flush".into());
    qemu_io_ok(&node.uri("cd"), &cmds);
    qemu_io_ok(&node.uri("cd"), &reads(&[(30 * MIB, MIB, 0)]));
    assert_eq!(node.daemon.volume("cd")["dirty_regions"], 7);

    let plan = node.daemon.cli_json(&["replica", "readd", "cd", "b"]);
    assert_eq!(plan["plan"], "catch_up", "{plan:#}");
    wait_volume(
        &node.daemon,
        "cd",
        "the catch-up to pass 1 MiB",
        Duration::from_secs(30),
        |v| v["job"]["kind"] == "catch_up" && v["job"]["done_bytes"].as_u64().unwrap_or(0) >= MIB,
    );
    let v = node.daemon.volume("cd");
    assert_eq!(
        v["job"]["finished"], false,
        "the catch-up should still run at 2 MiB/s: {v:#}"
    );
    let st = node.daemon.stop_with(libc::SIGKILL);
    assert!(!st.success());

    restart(&mut node, &["--config", &cfg]);
    let v = node.daemon.volume("cd");
    assert_ne!(
        replica_json(&v, "b")["state"],
        "in_sync",
        "b was not caught up: {v:#}"
    );
    let v = volume_wait_healthy(&node.daemon, "cd");
    eprintln!("job after the restart: {}", v["job"]);
    let mut check = reads(&spec);
    check.extend(reads(&[(0, MIB, 0x90), (30 * MIB, MIB, 0)]));
    qemu_io_ok(&node.uri("cd"), &check);
    // Through b alone: the discarded region must read as zeroes there too.
    node.daemon.cli_ok(&["replica", "fail", "cd", "a"]);
    let out = qemu_io(&node.uri("cd"), &check);
    assert!(
        !qemu_io_failed(&out),
        "after a catch-up interrupted by kill -9 and finished after the restart, reading through b \
         alone must return the volume's data (region 30 was discarded while b was out): {}",
        out.describe()
    );
    node.daemon.cli_ok(&["replica", "readd", "cd", "a"]);
    let v = volume_wait_healthy(&node.daemon, "cd");
    node.daemon.cli_ok(&["volume", "stop", "cd"]);
    assert_replicas_identical(&v);
}

/// Issue 9, sequence 7: b is failed out, writes go on to a; at the next
/// start only b is present and the config allows degraded starts. b's own
/// superblock never learnt it was failed, but the node's record did: b is
/// refused, the reason names --force-stale, and forcing it starts from b.
#[test]
fn lone_stale_replica_is_refused_even_when_degraded_starts_are_allowed() {
    let mut node = node_with(&["a", "b"]);
    let v0 = create_on(&node, "ls", SIZE, &["a", "b"]);
    let uri = node.uri("ls");
    qemu_io_ok(&uri, &writes(&[(0, MIB, 0x21)]));
    node.daemon.cli_ok(&["replica", "fail", "ls", "b"]);
    qemu_io_ok(&uri, &writes(&[(0, MIB, 0x22)]));
    node.daemon.stop();
    take_away(&replica_in(&v0, "a").path);
    let cfg = config(
        &node,
        "ditto.toml",
        "start_degraded = true\ndegraded_wait_secs = 0\n",
    );
    restart(&mut node, &["--config", s(&cfg)]);
    let v = wait_volume(
        &node.daemon,
        "ls",
        "the start decision",
        Duration::from_secs(30),
        |v| v["state"] != "starting",
    );
    assert_eq!(
        v["state"], "stopped",
        "a lone stale replica must not be served: {v:#}"
    );
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stale") && reason.contains("--force-stale"),
        "the refusal says why and how to override: {v:#}"
    );
    let out = qemu_io(&node.uri("ls"), &[format!("read 0 {MIB}")]);
    assert!(
        qemu_io_failed(&out),
        "a refused volume is not served: {}",
        out.describe()
    );
    // Plain `volume start` is refused the same way; --force-stale starts from b.
    let out = node.daemon.cli(&["volume", "start", "ls"]).assert_failure();
    assert!(out.stderr.contains("--force-stale"), "{}", out.describe());
    node.daemon
        .cli_json(&["volume", "start", "ls", "--force-stale"]);
    qemu_io_ok(&node.uri("ls"), &reads(&[(0, MIB, 0x21)]));
}
