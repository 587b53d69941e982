//! Replicas on a real block device (a loop device over a sparse file), through
//! every I/O engine. Needs root and losetup; skipped with a printed reason
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use ditto_engine::io::IoEngine;
use ditto_engine::uring::UringEngine;
use ditto_engine::{FileReplica, ReplicaBackend, ThreadPoolEngine};
use ditto_format::Layout;
use uuid::Uuid;

const DEVICE_SIZE: u64 = 64 << 20;

/// A loop device, detached when dropped (whether the test passed or not).
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device, or says why it cannot.
    fn attach(backing: &Path) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions and only reads process state.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: attaching a loop device needs root".into());
        }
        let out = Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup unavailable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("warning: could not detach {}", self.path.display());
        }
    }
}

fn loop_device(dir: &tempfile::TempDir) -> Option<LoopDevice> {
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(DEVICE_SIZE))
        .unwrap();
    match LoopDevice::attach(&backing) {
        Ok(d) => Some(d),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

fn engines() -> Vec<Arc<dyn IoEngine>> {
    let mut engines: Vec<Arc<dyn IoEngine>> = vec![Arc::new(ThreadPoolEngine)];
    let uring = UringEngine::new();
    match uring.unavailable() {
        None => engines.push(Arc::new(uring)),
        Some(why) => eprintln!("io_uring engine not tested here: {why}"),
    }
    engines
}

/// Both engines see the device's real size (a block device's metadata length
/// is 0), and a replica can be formatted on it, opened again, and written and
/// read through it.
#[tokio::test]
async fn replica_on_a_loop_device_through_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let Some(dev) = loop_device(&dir) else {
        return;
    };
    let layout = Layout::new(DEVICE_SIZE / 2, 64 * 1024).unwrap();
    for engine in engines() {
        let name = engine.name();
        let file = engine.open(&dev.path, false).unwrap();
        assert_eq!(
            file.len().unwrap(),
            DEVICE_SIZE,
            "{name}: length of {}",
            dev.path.display()
        );
        let volume = Uuid::new_v4();
        let location = dev.path.display().to_string();
        let created = FileReplica::format_on(
            file.clone(),
            location.clone(),
            volume,
            Uuid::new_v4(),
            layout,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: format a replica on the device: {e}"));
        let block = Bytes::from(
            (0..8192u32)
                .map(|i| (i % 251) as u8 ^ name.len() as u8)
                .collect::<Vec<u8>>(),
        );
        created.write(4096, block.clone()).await.unwrap();
        created.flush().await.unwrap();
        drop(created);
        drop(file);

        let reopened = engine.open(&dev.path, false).unwrap();
        let opened = FileReplica::open_on(reopened, location, volume)
            .await
            .unwrap_or_else(|e| panic!("{name}: open the replica on the device: {e}"));
        assert_eq!(opened.superblock().volume_uuid, volume, "{name}");
        let back = opened.read(4096, block.len()).await.unwrap();
        assert_eq!(back, block, "{name}: data read back from the device");
        // Wipe the superblock so the next engine formats a fresh device.
        let wipe = engine.open(&dev.path, false).unwrap();
        wipe.write_at(0, Bytes::from(vec![0u8; 8192]))
            .await
            .unwrap();
        wipe.sync_data().await.unwrap();
    }
}
