//! qemu-img against a ditto export: virtual size, and `convert` in and out.

mod common;

use std::process::Command;

use common::*;

const SIZE: u64 = 64 * MIB;

fn convert(src: &str, dst: &str, existing_target: bool) {
    let mut c = Command::new(qemu_img());
    c.arg("convert");
    if existing_target {
        c.arg("-n");
    }
    c.args(["-f", "raw", "-O", "raw", src, dst]);
    run_with_timeout(&mut c, TOOL_TIMEOUT).assert_success();
}

#[test]
fn qemu_img_info_and_convert_round_trip() {
    let node = Node::with_pools(2);
    let vol = node.create_volume("img", SIZE, 2);
    let uri = node.uri("img");

    let info = run_with_timeout(
        Command::new(qemu_img()).args(["info", "--output=json", &uri]),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert_eq!(
        info.json()["virtual-size"].as_u64(),
        Some(SIZE),
        "qemu-img info virtual size: {}",
        info.describe()
    );

    // 1: a fully random image in and back out.
    let a = node.path("a.raw");
    write_random_file(&a, SIZE, 1);
    convert(s(&a), &uri, true);
    let a_back = node.path("a.back");
    convert(&uri, s(&a_back), false);
    assert_files_equal(&a, &a_back);

    // 2: over it, an image with zero runs: qemu-img turns those into
    // write-zeroes requests, which must really zero the old data.
    let b = node.path("b.raw");
    write_random_file_with_zeroes(
        &b,
        SIZE,
        2,
        &[
            (0, 4 * MIB),
            (9 * MIB + 4096, 3 * MIB),
            (30 * MIB, 512 * 1024),
            (SIZE - 8 * MIB, 8 * MIB),
        ],
    );
    convert(s(&b), &uri, true);
    let b_back = node.path("b.back");
    convert(&uri, s(&b_back), false);
    assert_files_equal(&b, &b_back);

    // Both replicas hold the image at data_offset.
    let vol = node
        .daemon
        .wait_healthy(vol["name"].as_str().expect("name"));
    for r in replicas(&vol) {
        assert_ranges_equal(&b, 0, &r.path, r.data_offset, SIZE);
    }
}
