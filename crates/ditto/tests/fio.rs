//! fio's nbd engine: random writes with crc32c verification at queue depth 16,
//! then the two replicas must be byte-identical.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const SIZE: u64 = 128 * MIB;
const JOB_SIZE: u64 = 48 * MIB;

#[test]
fn fio_random_writes_verify_and_replicas_match() {
    let fio = require_tool("fio", "fio");
    let node = Node::with_pools(2);
    node.create_volume("fio", SIZE, 2);
    let uri = node.uri("fio");
    let json_path = node.path("fio.json");

    let job_size = format!("--size={JOB_SIZE}");
    let mut cmd = Command::new(fio);
    cmd.args([
        "--output-format=json",
        &format!("--output={}", s(&json_path)),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--runtime=300",
        "--randseed=1234",
        // job a: 4 KiB random writes over the first 48 MiB
        "--name=a",
        "--bs=4k",
        "--offset=0",
        &job_size,
        // job b, concurrently on its own connection: 4k..256k blocks at 64 MiB
        "--name=b",
        "--bsrange=4k-256k",
        &format!("--offset={}", 64 * MIB),
        &job_size,
    ]);
    let out = run_with_timeout(&mut cmd, TOOL_TIMEOUT);
    let text = std::fs::read_to_string(&json_path).unwrap_or_default();
    assert!(
        out.success(),
        "fio failed: {}\n--- json ---\n{text}",
        out.describe()
    );
    assert!(
        !mentions_any(
            &out.stderr,
            &["verify: bad", "bad magic", "bad header", "verify failed"]
        ),
        "fio reported verify errors: {}",
        out.describe()
    );
    // fio may print a line before the JSON document
    let start = text.find('{').expect("fio wrote JSON");
    let v: Value = serde_json::from_str(&text[start..]).expect("fio JSON parses");
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "two jobs ran: {text}");
    for j in jobs {
        let name = j["jobname"].as_str().unwrap_or("?");
        assert_eq!(j["error"].as_u64(), Some(0), "job {name} error: {j:#}");
        let written = j["write"]["io_bytes"].as_u64().expect("write io_bytes");
        let read = j["read"]["io_bytes"].as_u64().expect("read io_bytes");
        assert_eq!(written, JOB_SIZE, "job {name} wrote its whole size");
        assert_eq!(
            read, written,
            "job {name} read back (verified) all it wrote"
        );
    }

    // Flush, then the mirror must really mirror.
    qemu_io_ok(&uri, &["flush".into()]);
    let vol = node.daemon.wait_healthy("fio");
    assert_replicas_identical(&vol);
    // and the verified data is there: the replicas are not both empty
    let rep = &replicas(&vol)[0];
    let sample = read_replica(rep, 0, MIB as usize);
    assert!(
        sample.iter().any(|&b| b != 0),
        "replica data area is all zeroes after fio wrote to it"
    );
}
