//! nbdinfo against a ditto daemon: size, export list, allocation map.

mod common;

use std::process::Command;

use common::*;

const SIZE: u64 = 64 * MIB;

fn assert_all_holes(map: &[MapExtent], off: u64, len: u64, when: &str) {
    let ext = extents_in(map, off, len);
    assert!(
        !ext.is_empty() && ext.iter().all(|e| e.hole() && e.zero()),
        "{when}: [{off}, {}) should be hole,zero; map: {map:?}",
        off + len
    );
}

#[test]
fn nbdinfo_size_list_and_map() {
    let node = Node::with_pools(2);
    node.create_volume("info", SIZE, 2);
    node.create_volume("second", 16 * MIB, 1);
    let uri = node.uri("info");

    assert_eq!(nbdinfo_size(&uri), SIZE);
    assert_eq!(nbdinfo_size(&node.uri("second")), 16 * MIB);

    // nbdinfo --json: the export's properties
    let out = run_with_timeout(Command::new(nbdinfo()).args(["--json", &uri]), TOOL_TIMEOUT)
        .assert_success();
    let v = out.json();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "info", "{}", out.describe());
    assert_eq!(e["export-size"].as_u64(), Some(SIZE));
    assert_eq!(e["is_read_only"], false, "{}", out.describe());
    assert_eq!(e["can_flush"], true, "{}", out.describe());
    assert_eq!(e["can_trim"], true, "{}", out.describe());
    assert_eq!(e["can_zero"], true, "{}", out.describe());
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "base:allocation offered: {}",
        out.describe()
    );

    // nbdinfo --list shows both volumes
    let out = run_with_timeout(
        Command::new(nbdinfo()).args(["--list", "--json", &format!("nbd://{}", node.daemon.nbd)]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let listed: Vec<String> = out.json()["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name").to_string())
        .collect();
    for want in ["info", "second"] {
        assert!(
            listed.iter().any(|n| n == want),
            "nbdinfo --list lacks {want}: {}",
            out.describe()
        );
    }

    // fresh volume: all holes
    let map = nbdinfo_map(&uri);
    assert_eq!(
        map.last().map(MapExtent::end),
        Some(SIZE),
        "map covers the volume"
    );
    assert_all_holes(&map, 0, SIZE, "fresh volume");

    // write 1 MiB at 32 MiB: data there, holes far from it
    qemu_io_ok(&uri, &[format!("write -P 0x5c {} {}", 32 * MIB, MIB)]);
    let map = nbdinfo_map(&uri);
    let written = extents_in(&map, 32 * MIB, MIB);
    assert!(
        written.iter().all(|e| !e.hole() && !e.zero()),
        "written range should be data; map: {map:?}"
    );
    assert_all_holes(&map, 0, 16 * MIB, "after a write at 32 MiB");
    assert_all_holes(&map, 48 * MIB, 16 * MIB, "after a write at 32 MiB");

    // discard it: holes again
    qemu_io_ok(&uri, &[format!("discard {} {}", 32 * MIB, MIB)]);
    let map = nbdinfo_map(&uri);
    assert_all_holes(&map, 32 * MIB, MIB, "after discard");
    qemu_io_ok(&uri, &[format!("read -P 0 {} {}", 32 * MIB, MIB)]);

    // write-zeroes that may unmap: reads as zero, and the map says so
    qemu_io_ok(&uri, &[format!("write -P 0x5d {} {}", 40 * MIB, 2 * MIB)]);
    qemu_io_ok(&uri, &[format!("write -z -u {} {}", 40 * MIB, 2 * MIB)]);
    let map = nbdinfo_map(&uri);
    let zeroed = extents_in(&map, 40 * MIB, 2 * MIB);
    assert!(
        zeroed.iter().all(|e| e.zero()),
        "after write -z -u, [40 MiB, 42 MiB) should be zero; map: {map:?}"
    );
    qemu_io_ok(&uri, &[format!("read -P 0 {} {}", 40 * MIB, 2 * MIB)]);

    // a nonexistent export is refused
    let out = run_with_timeout(
        Command::new(nbdinfo()).arg(node.uri("nosuch")),
        TOOL_TIMEOUT,
    );
    assert!(
        !out.success(),
        "nbdinfo on a missing export: {}",
        out.describe()
    );
}
