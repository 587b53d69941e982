//! qemu-io against a ditto export: patterns at aligned and unaligned offsets,
//! large requests, async I/O, write-zeroes and discard; then the replica files.

mod common;

use common::*;

const SIZE: u64 = 64 * MIB;

/// (offset, length, pattern): disjoint, several unaligned, one > 4 MiB.
const PATTERNS: &[(u64, u64, u8)] = &[
    (0, 4096, 0x11),
    (8192 + 512, 512, 0x22),
    (64 * KIB + 512, 3 * 512, 0x33),
    (MIB - 512, 1024, 0x44), // crosses a 1 MiB boundary
    (5 * MIB + 512, 5 * MIB, 0x55),
    (30001 * 512, 7 * 512, 0x66),
    (32 * MIB - 1536, 3072, 0x77),
    (SIZE - 4096, 4096, 0x88), // last block
];

fn w(p: u8, off: u64, len: u64) -> String {
    format!("write -P {p:#x} {off} {len}")
}
fn r(p: u8, off: u64, len: u64) -> String {
    format!("read -P {p:#x} {off} {len}")
}

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    let node = Node::with_pools(2);
    node.create_volume("qio", SIZE, 2);
    let uri = node.uri("qio");

    // Fresh volume reads as zeroes.
    qemu_io_ok(&uri, &[r(0, 0, 2 * MIB), r(0, SIZE - MIB, MIB)]);

    // Synchronous writes, then read back in a new connection.
    let writes: Vec<String> = PATTERNS.iter().map(|&(o, l, p)| w(p, o, l)).collect();
    qemu_io_ok(&uri, &writes);
    let mut reads: Vec<String> = PATTERNS.iter().map(|&(o, l, p)| r(p, o, l)).collect();
    // gaps between patterns are still zero
    reads.push(r(0, 4096, 8192 + 512 - 4096));
    reads.push(r(0, 8192 + 1024, 64 * KIB - 8192 - 512));
    reads.push(r(0, MIB + 512, 4 * MIB));
    reads.push(r(0, 20 * MIB, MIB));
    let out = qemu_io_ok(&uri, &reads);
    assert_eq!(
        out.stdout.matches("read ").count(),
        reads.len(),
        "every read ran: {}",
        out.describe()
    );

    // The data lands in every replica file at data_offset + offset.
    let vol = node.daemon.wait_healthy("qio");
    for rep in replicas(&vol) {
        for &(o, l, p) in PATTERNS {
            let got = read_replica(&rep, o, l as usize);
            assert!(
                got.iter().all(|&b| b == p),
                "replica {} ({}) lacks pattern {p:#x} at volume offset {o} (+{l}); data_offset {}",
                rep.id,
                rep.path.display(),
                rep.data_offset
            );
        }
    }

    // Concurrent async I/O: 16 writes in flight, then 16 reads in flight.
    let base = 40 * MIB;
    let mut aio: Vec<String> = (0..16u64)
        .map(|i| {
            format!(
                "aio_write -P {:#x} {} {}",
                0xa0 + i,
                base + i * 64 * KIB,
                64 * KIB
            )
        })
        .collect();
    aio.push("aio_flush".into());
    aio.extend((0..16u64).map(|i| {
        format!(
            "aio_read -P {:#x} {} {}",
            0xa0 + i,
            base + i * 64 * KIB,
            64 * KIB
        )
    }));
    aio.push("aio_flush".into());
    let out = qemu_io_ok(&uri, &aio);
    assert_eq!(
        out.stdout.matches("read ").count(),
        16,
        "{}",
        out.describe()
    );

    // Write zeroes inside the 0x55 area: aligned and unaligned.
    qemu_io_ok(
        &uri,
        &[
            format!("write -z {} {}", 6 * MIB, MIB),
            format!("write -z {} {}", 8 * MIB + 512, 1024),
        ],
    );
    qemu_io_ok(
        &uri,
        &[
            r(0x55, 5 * MIB + 512, MIB - 512),
            r(0, 6 * MIB, MIB),
            r(0x55, 7 * MIB, MIB + 512),
            r(0, 8 * MIB + 512, 1024),
            r(0x55, 8 * MIB + 1536, 2 * MIB - 1024),
        ],
    );

    // FUA writes
    qemu_io_ok(
        &uri,
        &[
            format!("write -f -P 0xcc {} {}", 42 * MIB, 64 * KIB),
            format!("write -f -P 0xcd {} {}", 42 * MIB + 64 * KIB + 512, 512),
        ],
    );
    qemu_io_ok(
        &uri,
        &[
            r(0xcc, 42 * MIB, 64 * KIB),
            r(0, 42 * MIB + 64 * KIB, 512),
            r(0xcd, 42 * MIB + 64 * KIB + 512, 512),
        ],
    );

    // Discard (trim) a written area; it reads back as zeroes.
    qemu_io_ok(&uri, &[w(0xbb, 44 * MIB, 4 * MIB)]);
    qemu_io_ok(&uri, &[r(0xbb, 44 * MIB, 4 * MIB)]);
    qemu_io_ok(&uri, &[format!("discard {} {}", 44 * MIB, 4 * MIB)]);
    qemu_io_ok(&uri, &[r(0, 44 * MIB, 4 * MIB), r(0x11, 0, 4096)]);

    qemu_io_ok(&uri, &["flush".into()]);
    assert_replicas_identical(&node.daemon.wait_healthy("qio"));
}

/// The checks above can fail: a wrong pattern is reported (sync and async),
/// and a replica changed behind the daemon's back is caught by the replica
/// comparison.
#[test]
fn harness_detects_bad_data() {
    let node = Node::with_pools(2);
    node.create_volume("bad", 16 * MIB, 2);
    let uri = node.uri("bad");
    qemu_io_ok(&uri, &[w(0x11, 0, 64 * KIB), "flush".into()]);

    let out = qemu_io(&uri, &[r(0x12, 0, 4096)]);
    assert!(
        qemu_io_failed(&out),
        "wrong pattern not detected: {}",
        out.describe()
    );
    let out = qemu_io(
        &uri,
        &["aio_read -P 0x12 0 4096".into(), "aio_flush".into()],
    );
    assert!(
        qemu_io_failed(&out),
        "wrong pattern (aio) not detected: {}",
        out.describe()
    );

    let vol = node.daemon.wait_healthy("bad");
    assert_replicas_identical(&vol);
    let rep = &replicas(&vol)[1];
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&rep.path)
            .expect("open replica");
        f.seek(SeekFrom::Start(rep.data_offset + 4096 + 7))
            .expect("seek");
        f.write_all(&[0x99]).expect("corrupt one byte");
        f.sync_all().expect("sync");
    }
    let caught = std::panic::catch_unwind(|| assert_replicas_identical(&vol));
    assert!(caught.is_err(), "a corrupted replica byte was not detected");
}
