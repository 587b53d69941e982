//! NBD over TLS (NBD_OPT_STARTTLS) with the cluster's certificates, as real
//! clients use it: nbdinfo and nbdcopy with `nbds://`, qemu-io with
//! `tls-creds-x509`. With `nbd_require_tls`, plain clients and clients with
//! a certificate from another CA get nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const SIZE: u64 = 16 * MIB;

fn ditto(args: &[&str]) {
    let mut cmd = Command::new(DITTO);
    cmd.args(args);
    run_with_timeout(&mut cmd, CLI_TIMEOUT).assert_success();
}

/// A client directory as libnbd and qemu expect it, signed by the CA in `ca`.
fn client_dir(dir: &Path, ca: &Path, name: &str) -> std::path::PathBuf {
    let made = dir.join(format!("{name}-made"));
    ditto(&["cert", "node", name, "--ca", s(ca), "--out", s(&made)]);
    let client = dir.join(name);
    std::fs::create_dir_all(&client).unwrap();
    std::fs::copy(ca.join("ca.pem"), client.join("ca-cert.pem")).unwrap();
    std::fs::copy(made.join("node.pem"), client.join("client-cert.pem")).unwrap();
    std::fs::copy(made.join("node.key"), client.join("client-key.pem")).unwrap();
    client
}

struct TlsNode {
    node: Node,
    client: std::path::PathBuf,
    stranger: std::path::PathBuf,
}

fn tls_node() -> TlsNode {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::Builder::new()
        .prefix("ditto-tls-")
        .tempdir()
        .expect("tempdir");
    let ca = dir.path().join("ca");
    ditto(&["cert", "ca", "--out", s(&ca)]);
    let server = dir.path().join("server");
    ditto(&[
        "cert",
        "node",
        "n1",
        "--san",
        "127.0.0.1",
        "--ca",
        s(&ca),
        "--out",
        s(&server),
    ]);
    let client = client_dir(dir.path(), &ca, "client1");
    let other_ca = dir.path().join("other-ca");
    ditto(&["cert", "ca", "--out", s(&other_ca)]);
    let stranger = client_dir(dir.path(), &other_ca, "stranger");
    let config = dir.path().join("ditto.toml");
    std::fs::write(
        &config,
        format!(
            "nbd_require_tls = true\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.join("ca.pem").display(),
            server.join("node.pem").display(),
            server.join("node.key").display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let daemon = Daemon::start_with(&data, &["--config", s(&config)]);
    let mut node = Node {
        daemon,
        pools: Vec::new(),
        dir,
    };
    node.add_pool("p0");
    node.add_pool("p1");
    node.create_volume("vm1", SIZE, 2);
    TlsNode {
        node,
        client,
        stranger,
    }
}

fn nbds(n: &TlsNode, certs: &Path) -> String {
    format!(
        "nbds://{}/vm1?tls-certificates={}",
        n.node.daemon.nbd,
        certs.display()
    )
}

#[test]
fn nbdinfo_nbdcopy_and_qemu_io_reach_a_volume_over_tls() {
    let n = tls_node();
    assert_eq!(nbdinfo_size(&nbds(&n, &n.client)), SIZE);

    // qemu-io writes a pattern over TLS.
    let (host, port) = n.node.daemon.nbd.rsplit_once(':').unwrap();
    let tls_obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        n.client.display()
    );
    let image = format!("driver=nbd,host={host},port={port},export=vm1,tls-creds=tls0");
    let out = run_with_timeout(
        Command::new(qemu_io_bin()).args([
            "--object",
            &tls_obj,
            "--image-opts",
            &image,
            "-c",
            "write -P 0xa5 1M 256k",
            "-c",
            "read -P 0xa5 1M 256k",
        ]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert!(!qemu_io_failed(&out), "{}", out.describe());

    // nbdcopy reads the whole volume back over TLS: the pattern is there.
    let copy = n.node.path("copy.raw");
    run_with_timeout(
        Command::new(nbdcopy()).args([&nbds(&n, &n.client), s(&copy)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(data.len() as u64, SIZE);
    assert!(data[1 << 20..(1 << 20) + (256 << 10)]
        .iter()
        .all(|b| *b == 0xa5));
    assert!(data[..1 << 20].iter().all(|b| *b == 0));
    // And the replicas hold it too.
    assert_replicas_identical(&n.node.daemon.wait_healthy("vm1"));
}

#[test]
fn plain_clients_and_other_cas_are_refused() {
    let n = tls_node();
    let plain = n.node.uri("vm1");
    // libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not supported".
    let out = run_with_timeout(Command::new(nbdinfo()).arg(&plain), TOOL_TIMEOUT).assert_failure();
    assert!(
        out.stdout.contains("without TLS") || out.stderr.contains("not supported"),
        "a plain client should get nothing: {}",
        out.describe()
    );
    let out = run_with_timeout(
        Command::new(nbdinfo()).arg(nbds(&n, &n.stranger)),
        TOOL_TIMEOUT,
    )
    .assert_failure();
    assert!(
        out.stderr.to_lowercase().contains("tls") || out.stderr.contains("certificate"),
        "{}",
        out.describe()
    );
    // The volume is untouched and still served to the right client.
    assert_eq!(nbdinfo_size(&nbds(&n, &n.client)), SIZE);
}
