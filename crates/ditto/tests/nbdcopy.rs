//! nbdcopy into and out of a ditto volume.

mod common;

use std::process::Command;

use common::*;

const SIZE: u64 = 64 * MIB;

fn nbdcopy_ok(args: &[&str]) {
    run_with_timeout(Command::new(nbdcopy()).args(args), TOOL_TIMEOUT).assert_success();
}

#[test]
fn nbdcopy_both_ways() {
    let node = Node::with_pools(2);
    node.create_volume("copy", SIZE, 2);
    let uri = node.uri("copy");

    let a = node.path("a.raw");
    write_random_file(&a, SIZE, 11);
    nbdcopy_ok(&[s(&a), &uri]);
    let a_back = node.path("a.back");
    nbdcopy_ok(&[&uri, s(&a_back)]);
    assert_files_equal(&a, &a_back);

    // --flush, and a source with zero runs (sent as zero requests) over old data
    let b = node.path("b.raw");
    write_random_file_with_zeroes(
        &b,
        SIZE,
        12,
        &[
            (MIB, 2 * MIB),
            (20 * MIB + 4096, 64 * KIB),
            (SIZE - 4 * MIB, 4 * MIB),
        ],
    );
    nbdcopy_ok(&["--flush", s(&b), &uri]);
    let b_back = node.path("b.back");
    nbdcopy_ok(&["--flush", &uri, s(&b_back)]);
    assert_files_equal(&b, &b_back);

    // more connections and requests in flight
    let c = node.path("c.raw");
    write_random_file(&c, SIZE, 13);
    nbdcopy_ok(&["-C", "4", "-R", "16", "--request-size=65536", s(&c), &uri]);
    let c_back = node.path("c.back");
    nbdcopy_ok(&["-C", "4", &uri, s(&c_back)]);
    assert_files_equal(&c, &c_back);

    let vol = node.daemon.wait_healthy("copy");
    for r in replicas(&vol) {
        assert_ranges_equal(&c, 0, &r.path, r.data_offset, SIZE);
    }
}
