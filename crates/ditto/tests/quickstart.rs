//! `ditto quickstart`: starts a node with two pools and a 1 GiB mirrored
//! volume `demo`, prints how to connect, and reuses everything on a second run.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn run_quickstart(cwd: Option<&Path>, data_dir: &Path, with_data_dir_flag: bool) -> Daemon {
    let mut args = vec!["quickstart".to_string()];
    if with_data_dir_flag {
        args.push("--data-dir".into());
        args.push(s(data_dir).into());
    }
    args.extend(
        ["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]
            .iter()
            .map(|a| a.to_string()),
    );
    Daemon::spawn_in(cwd, data_dir, &args)
}

/// Checks the node quickstart set up; returns demo's sorted replica paths.
fn check_demo(d: &Daemon) -> Vec<String> {
    let demo = d.wait_healthy("demo");
    assert_eq!(demo["size"].as_u64(), Some(GIB), "demo is 1 GiB: {demo:#}");
    let reps = replicas(&demo);
    assert_eq!(reps.len(), 2, "demo has 2 replicas: {demo:#}");
    assert!(reps.iter().all(|r| r.state == "in_sync"));
    assert_ne!(reps[0].pool, reps[1].pool, "on distinct pools: {demo:#}");
    assert_eq!(d.volume_names(), ["demo"], "exactly one volume");
    assert_eq!(d.pool_names().len(), 2, "two pools");
    assert_eq!(nbdinfo_size(&d.uri("demo")), GIB, "demo is served over NBD");
    // stdout: status and a connect example with the URI
    let want = d.uri("demo");
    let stdout = wait_until(
        "quickstart to print the nbd:// URI",
        Duration::from_secs(30),
        || {
            let o = d.stdout();
            o.contains(&want).then_some(o)
        },
    );
    assert!(stdout.contains("nbd://"), "{stdout}");
    let mut paths: Vec<String> = reps.iter().map(|r| r.path.display().to_string()).collect();
    paths.sort();
    paths
}

#[test]
fn quickstart_creates_then_reuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("qs");

    let mut d = run_quickstart(None, &data, true);
    let first = check_demo(&d);
    let st = d.stop_with(libc::SIGINT);
    assert!(
        st.success(),
        "quickstart should exit 0 on Ctrl-C, got {st}\n{}",
        d.stderr()
    );

    let mut d = run_quickstart(None, &data, true);
    let second = check_demo(&d);
    assert_eq!(first, second, "second run reuses the same replicas");
    let st = d.stop_with(libc::SIGINT);
    assert!(
        st.success(),
        "quickstart should exit 0 on Ctrl-C, got {st}\n{}",
        d.stderr()
    );
}

#[test]
fn quickstart_default_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    // no --data-dir: ./ditto-data in the working directory
    let data = dir.path().join("ditto-data");
    let mut d = run_quickstart(Some(dir.path()), &data, false);
    check_demo(&d);
    let st = d.stop_with(libc::SIGINT);
    assert!(st.success(), "quickstart should exit 0 on Ctrl-C, got {st}");
}
