//! Several NBD clients at once, the `clients` list in status, and deleting a
//! volume that has a client connected.

mod common;

use std::process::Command;
use std::thread;
use std::time::Duration;

use common::nbd::NbdClient;
use common::*;
use serde_json::Value;

const SIZE: u64 = 64 * MIB;

fn clients(d: &Daemon, vol: &str) -> Vec<Value> {
    d.volume(vol)["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("volume {vol} has no clients array"))
        .clone()
}

/// Waits until status lists exactly `n` clients on `vol`.
fn wait_clients(d: &Daemon, vol: &str, n: usize) -> Vec<Value> {
    wait_until(
        &format!("{n} client(s) on {vol} in status"),
        Duration::from_secs(20),
        || {
            let c = clients(d, vol);
            (c.len() == n).then_some(c)
        },
    )
}

#[test]
fn two_qemu_io_clients_at_once() {
    let node = Node::with_pools(2);
    node.create_volume("shared", SIZE, 2);
    let uri = node.uri("shared");

    // Two writers on disjoint 16 MiB regions, at the same time.
    let region = |base: u64, pat: u8| -> Vec<String> {
        (0..64u64)
            .map(|i| format!("write -P {pat:#x} {} {}", base + i * 256 * KIB, 256 * KIB))
            .collect()
    };
    let (u1, u2) = (uri.clone(), uri.clone());
    let a = thread::spawn(move || qemu_io_ok(&u1, &region(0, 0xa5)));
    let b = thread::spawn(move || qemu_io_ok(&u2, &region(32 * MIB, 0x5a)));
    a.join().expect("writer a");
    b.join().expect("writer b");

    // Two verifying readers at the same time, each reading the other's region.
    let (u1, u2) = (uri.clone(), uri.clone());
    let a = thread::spawn(move || {
        qemu_io_ok(&u1, &[format!("read -P 0x5a {} {}", 32 * MIB, 16 * MIB)])
    });
    let b = thread::spawn(move || qemu_io_ok(&u2, &[format!("read -P 0xa5 0 {}", 16 * MIB)]));
    a.join().expect("reader a");
    b.join().expect("reader b");
    qemu_io_ok(&uri, &[format!("read -P 0 {} {}", 16 * MIB, 16 * MIB)]);

    // Raw clients: status lists each peer; a write on one is seen by the other.
    let mut c1 = NbdClient::connect(&node.daemon.nbd, "shared").expect("client 1");
    let mut c2 = NbdClient::connect(&node.daemon.nbd, "shared").expect("client 2");
    assert_eq!(c1.size, SIZE, "handshake export size");
    let listed = wait_clients(&node.daemon, "shared", 2);
    for c in [&c1, &c2] {
        let port = c.local_addr().port().to_string();
        assert!(
            listed.iter().any(|l| l["peer"]
                .as_str()
                .is_some_and(|p| p.ends_with(&format!(":{port}")))),
            "status clients should list peer 127.0.0.1:{port}: {listed:?}"
        );
    }
    let data = random_bytes(128 * 1024, 99);
    c1.write(50 * MIB + 512, &data).expect("write via client 1");
    c1.flush().expect("flush via client 1");
    assert_eq!(
        c2.read(50 * MIB + 512, data.len() as u32)
            .expect("read via client 2"),
        data,
        "client 2 reads what client 1 wrote"
    );
    c1.disconnect();
    c2.disconnect();
    wait_clients(&node.daemon, "shared", 0);
    qemu_io_ok(&uri, &["flush".into()]);
    assert_replicas_identical(&node.daemon.wait_healthy("shared"));
}

#[test]
fn delete_is_refused_while_a_client_is_connected() {
    let node = Node::with_pools(2);
    node.create_volume("busy", SIZE, 2);
    node.create_volume("bystander", 16 * MIB, 2);
    let mut c = NbdClient::connect(&node.daemon.nbd, "busy").expect("connect");
    c.write(MIB, &[0xeeu8; 4096]).expect("write");
    c.flush().expect("flush");
    wait_clients(&node.daemon, "busy", 1);

    let out = node
        .daemon
        .cli(&["volume", "delete", "busy"])
        .assert_failure();
    assert!(
        mentions_any(&out.stderr, &["client", "connect", "in use", "busy"]),
        "refusal should say a client is connected: {}",
        out.describe()
    );
    let mut names = node.daemon.volume_names();
    names.sort();
    assert_eq!(names, ["busy", "bystander"], "nothing deleted");
    assert_eq!(
        c.read(MIB, 4096).expect("client still served"),
        vec![0xeeu8; 4096]
    );

    node.daemon.cli_ok(&["volume", "delete", "busy", "--force"]);
    assert_eq!(node.daemon.volume_names(), ["bystander"], "busy is gone");
    assert!(node.daemon.find_volume("busy").is_none());
    assert!(
        c.wait_closed_by_server(Duration::from_secs(10)),
        "--force should disconnect the client"
    );
    let out = run_with_timeout(Command::new(nbdinfo()).arg(node.uri("busy")), TOOL_TIMEOUT);
    assert!(
        !out.success(),
        "export of a deleted volume still served: {}",
        out.describe()
    );

    // A new volume of the same name starts out zeroed, not with the old data.
    node.create_volume("busy", SIZE, 2);
    let mut c = NbdClient::connect(&node.daemon.nbd, "busy").expect("connect new");
    assert_eq!(
        c.read(MIB, 4096).expect("read new"),
        vec![0u8; 4096],
        "recreated volume must not expose the deleted volume's data"
    );
    c.disconnect();
}

#[test]
fn sigterm_with_a_connected_client_stops_cleanly() {
    let mut node = Node::with_pools(2);
    node.create_volume("held", SIZE, 2);
    let mut c = NbdClient::connect(&node.daemon.nbd, "held").expect("connect");
    let data = random_bytes(64 * 1024, 5);
    c.write(3 * MIB, &data).expect("write");
    c.flush().expect("flush");
    wait_clients(&node.daemon, "held", 1);

    // The idle client must not keep the daemon from stopping.
    node.daemon.stop();
    assert!(
        c.wait_closed_by_server(Duration::from_secs(10)),
        "the client's connection should be closed when the daemon stops"
    );

    let data_dir = node.daemon.data_dir.clone();
    node.daemon = Daemon::start(&data_dir);
    node.daemon.wait_healthy("held");
    let mut c = NbdClient::connect(&node.daemon.nbd, "held").expect("reconnect");
    assert_eq!(c.read(3 * MIB, data.len() as u32).expect("read"), data);
    c.disconnect();
}
