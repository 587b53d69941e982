//! An ext4 file system on a ditto volume, through nbdfuse: mkfs, write files
//! (loop mount when possible, debugfs otherwise), then on a new connection
//! fsck and read the files back.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SIZE: u64 = 128 * MIB;

/// `nbdfuse MOUNTPOINT/disk URI` in the background; unmounted and reaped on drop.
struct FuseMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    file: PathBuf,
    log: PathBuf,
}

impl FuseMount {
    fn mount(mountpoint: &Path, uri: &str, log: &Path) -> FuseMount {
        let nbdfuse = require_tool("nbdfuse", "libnbd-bin (nbdfuse on Debian 13+)");
        require_tool("fusermount3", "fuse3");
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the nbdfuse test needs FUSE"
        );
        std::fs::create_dir_all(mountpoint).expect("mkdir mountpoint");
        let file = mountpoint.join("disk");
        let child = Command::new(nbdfuse)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(File::create(log).expect("log"))
            .stderr(File::create(log.with_extension("err")).expect("log"))
            .spawn()
            .expect("spawn nbdfuse");
        let mut m = FuseMount {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            file,
            log: log.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::metadata(&m.file).is_ok_and(|md| md.len() == SIZE) {
                return m;
            }
            if let Some(st) = m
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                m.child = None;
                panic!(
                    "nbdfuse exited with {st} before mounting: {}",
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not present {} with size {SIZE} within 30 s",
                m.file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Unmounts and waits for nbdfuse to exit; asserts it went cleanly.
    fn unmount(mut self) {
        let out = run_with_timeout(
            Command::new(require_tool("fusermount3", "fuse3"))
                .arg("-u")
                .arg(&self.mountpoint),
            Duration::from_secs(60),
        );
        assert!(out.success(), "fusermount3 -u: {}", out.describe());
        let mut child = self.child.take().expect("child");
        let st = wait_child(&mut child, Duration::from_secs(30));
        assert!(st.is_some(), "nbdfuse did not exit after unmount");
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(fm) = find_tool("fusermount3") {
                for flag in ["-u", "-uz"] {
                    let ok = Command::new(&fm)
                        .arg(flag)
                        .arg(&self.mountpoint)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok {
                        break;
                    }
                }
            }
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = &self.log;
        }
    }
}

/// A loop mount of an image file; unmounted on drop.
struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    /// Tries `mount -o loop IMAGE DIR`; None (with the reason printed) when
    /// this machine cannot (not root, no loop devices, ...) or when
    /// DITTO_TEST_NO_LOOP is set (to exercise the debugfs path).
    fn try_mount(image: &Path, dir: &Path) -> Option<LoopMount> {
        if std::env::var_os("DITTO_TEST_NO_LOOP").is_some() {
            eprintln!("DITTO_TEST_NO_LOOP is set: using debugfs instead of a loop mount");
            return None;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
            eprintln!("not root or no /dev/loop-control: using debugfs instead of a loop mount");
            return None;
        }
        let mount = find_tool("mount")?;
        std::fs::create_dir_all(dir).expect("mkdir mnt");
        let out = run_with_timeout(
            Command::new(mount)
                .args(["-t", "ext4", "-o", "loop"])
                .arg(image)
                .arg(dir),
            Duration::from_secs(60),
        );
        if !out.success() {
            eprintln!(
                "loop mount failed, using debugfs instead: {}",
                out.describe()
            );
            return None;
        }
        Some(LoopMount {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(mut self) {
        let out = run_with_timeout(
            Command::new(require_tool("umount", "mount")).arg(&self.dir),
            Duration::from_secs(120),
        );
        assert!(out.success(), "umount: {}", out.describe());
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Some(umount) = find_tool("umount") {
                let ok = Command::new(&umount)
                    .arg(&self.dir)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    let _ = Command::new(&umount).arg("-l").arg(&self.dir).status();
                }
            }
        }
    }
}

/// (name in the file system, local source file).
fn make_sources(node: &Node) -> Vec<(&'static str, PathBuf)> {
    let a = node.path("a.bin");
    write_random_file(&a, 3_000_001, 21);
    let b = node.path("b.txt");
    std::fs::write(&b, "hello from ditto\n".repeat(1000)).expect("write b");
    let c = node.path("c.bin");
    write_random_file(&c, 700 * 1024 + 17, 22);
    vec![("a.bin", a), ("b.txt", b), ("dir/c.bin", c)]
}

#[test]
fn ext4_through_nbdfuse() {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let fsck = require_tool("fsck.ext4", "e2fsprogs");
    let debugfs = require_tool("debugfs", "e2fsprogs");
    if !Path::new("/dev/fuse").exists() {
        // ext4_image_through_volume still puts a real file system through
        // the volume on such machines; this one needs the kernel's FUSE.
        eprintln!("SKIPPED ext4_through_nbdfuse: /dev/fuse is missing on this machine");
        return;
    }
    let node = Node::with_pools(2);
    node.create_volume("fs", SIZE, 2);
    let uri = node.uri("fs");
    let sources = make_sources(&node);
    let fuse_dir = node.path("fuse");
    let mnt = node.path("mnt");

    // Phase 1: mkfs and write the files.
    let fuse = FuseMount::mount(&fuse_dir, &uri, &node.path("nbdfuse1.log"));
    run_with_timeout(
        Command::new(&mkfs).args(["-F", "-q"]).arg(&fuse.file),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let used_mount = match LoopMount::try_mount(&fuse.file, &mnt) {
        Some(lm) => {
            std::fs::create_dir(mnt.join("dir")).expect("mkdir dir");
            for (name, src) in &sources {
                std::fs::copy(src, mnt.join(name)).expect("copy into fs");
            }
            run_with_timeout(&mut Command::new("sync"), TOOL_TIMEOUT).assert_success();
            lm.unmount();
            true
        }
        None => {
            let mut script = String::from("mkdir dir\n");
            for (name, src) in &sources {
                let (dir, base) = match name.rsplit_once('/') {
                    Some((d, b)) => (d, b),
                    None => ("/", *name),
                };
                script.push_str(&format!(
                    "cd /{}\nwrite {} {base}\n",
                    dir.trim_start_matches('/'),
                    s(src)
                ));
            }
            let cmdfile = node.path("debugfs.cmds");
            std::fs::write(&cmdfile, script).expect("write debugfs script");
            let out = run_with_timeout(
                Command::new(&debugfs)
                    .arg("-w")
                    .arg("-f")
                    .arg(&cmdfile)
                    .arg(&fuse.file),
                TOOL_TIMEOUT,
            )
            .assert_success();
            assert!(
                !out.stderr.contains("ould not") && !out.stdout.contains("ould not"),
                "debugfs reported an error: {}",
                out.describe()
            );
            false
        }
    };
    fuse.unmount();

    // Phase 2: a new connection; the file system is clean and holds the files.
    let fuse = FuseMount::mount(&fuse_dir, &uri, &node.path("nbdfuse2.log"));
    run_with_timeout(Command::new(&fsck).arg("-fn").arg(&fuse.file), TOOL_TIMEOUT).assert_success();
    if used_mount {
        let lm = LoopMount::try_mount(&fuse.file, &mnt).expect("second loop mount");
        for (name, src) in &sources {
            assert_files_equal(src, &mnt.join(name));
        }
        lm.unmount();
    } else {
        for (i, (name, src)) in sources.iter().enumerate() {
            let dst = node.path(&format!("back{i}"));
            run_with_timeout(
                Command::new(&debugfs)
                    .arg("-R")
                    .arg(format!("dump /{name} {}", s(&dst)))
                    .arg(&fuse.file),
                TOOL_TIMEOUT,
            )
            .assert_success();
            assert_files_equal(src, &dst);
        }
    }
    // still clean after the read-back (a mount may have replayed the journal)
    run_with_timeout(Command::new(&fsck).arg("-fn").arg(&fuse.file), TOOL_TIMEOUT).assert_success();
    fuse.unmount();

    qemu_io_ok(&uri, &["flush".into()]);
    assert_replicas_identical(&node.daemon.wait_healthy("fs"));
}

/// A real ext4 image (made and filled with e2fsprogs, no kernel help needed)
/// copied into the volume with nbdcopy and back out; the copy that went
/// through the mirror must be a clean file system holding the same files.
#[test]
fn ext4_image_through_volume() {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let fsck = require_tool("fsck.ext4", "e2fsprogs");
    let debugfs = require_tool("debugfs", "e2fsprogs");
    let node = Node::with_pools(2);
    node.create_volume("img", SIZE, 2);
    let uri = node.uri("img");
    let sources = make_sources(&node);
    let image = node.path("fs.img");
    File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .expect("create image");
    run_with_timeout(
        Command::new(&mkfs).args(["-F", "-q"]).arg(&image),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let mut script = String::from("mkdir dir\n");
    for (name, src) in &sources {
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
        script.push_str(&format!("cd /{dir}\nwrite {} {base}\n", s(src)));
    }
    let cmdfile = node.path("debugfs-img.cmds");
    std::fs::write(&cmdfile, script).expect("write debugfs script");
    run_with_timeout(
        Command::new(&debugfs)
            .arg("-w")
            .arg("-f")
            .arg(&cmdfile)
            .arg(&image),
        TOOL_TIMEOUT,
    )
    .assert_success();
    run_with_timeout(
        Command::new(nbdcopy()).arg("--flush").arg(&image).arg(&uri),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let back = node.path("back.img");
    run_with_timeout(Command::new(nbdcopy()).arg(&uri).arg(&back), TOOL_TIMEOUT).assert_success();
    assert_files_equal(&image, &back);
    run_with_timeout(Command::new(&fsck).arg("-fn").arg(&back), TOOL_TIMEOUT).assert_success();
    for (i, (name, src)) in sources.iter().enumerate() {
        let dst = node.path(&format!("img-back{i}"));
        run_with_timeout(
            Command::new(&debugfs)
                .arg("-R")
                .arg(format!("dump /{name} {}", s(&dst)))
                .arg(&back),
            TOOL_TIMEOUT,
        )
        .assert_success();
        assert_files_equal(src, &dst);
    }
    assert_replicas_identical(&node.daemon.wait_healthy("img"));
}
