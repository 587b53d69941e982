//! Adapter from the NBD server's `Export` trait to the volume engine.

use std::sync::Arc;

use bytes::Bytes;
use ditto_engine::{BackendError, EngineError, Volume};
use ditto_nbd::{BoxFuture, Export, ExportError, Extent};

pub struct VolumeExport(pub Arc<Volume>);

fn map_err(e: EngineError) -> ExportError {
    match e {
        EngineError::OutOfRange { .. } => ExportError::Invalid(e.to_string()),
        // The volume is being stopped: NBD_ESHUTDOWN tells the client to
        // disconnect instead of retrying.
        EngineError::Closed { .. } => ExportError::Shutdown,
        EngineError::Backend(BackendError::Io { ref source, .. })
            if source.raw_os_error() == Some(libc::ENOSPC) =>
        {
            ExportError::NoSpace
        }
        other => ExportError::Io(other.to_string()),
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    /// Every connection shares one engine and FLUSH syncs whole replica files,
    /// so a flush on any connection covers writes completed on all of them.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Offered always: whether a given fast-zero request is fast depends on
    /// the replicas it reaches at that moment (see `write_zeroes`), and a
    /// refused one costs the client one round trip.
    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        Box::pin(async move { self.0.read(offset, len as usize).await.map_err(map_err) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move { self.0.write(offset, data, fua).await.map_err(map_err) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move { self.0.flush().await.map_err(map_err) })
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            self.0
                .discard(offset, u64::from(len), fua)
                .await
                .map_err(map_err)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            // Zeroing while keeping the blocks allocated may fall back to writing
            // zeroes, and so does deallocation on a replica that cannot punch
            // holes: not fast. Say so at once, before doing anything, as
            // NBD_CMD_FLAG_FAST_ZERO asks, instead of pretending.
            if fast_only && !may_trim {
                return Err(ExportError::NotSupported(
                    "fast zero without deallocation".into(),
                ));
            }
            if fast_only && !self.0.fast_zero() {
                return Err(ExportError::NotSupported(
                    "fast zero: a replica cannot punch holes, so zeroing would write zeroes".into(),
                ));
            }
            self.0
                .write_zeroes(offset, u64::from(len), may_trim, fua)
                .await
                .map_err(map_err)
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        Box::pin(async move {
            let runs = self
                .0
                .allocation(offset, u64::from(len))
                .await
                .map_err(map_err)?;
            let mut extents: Vec<Extent> = Vec::with_capacity(runs.len());
            for r in runs {
                let (hole, zero) = (!r.allocated, !r.allocated);
                match extents.last_mut() {
                    Some(last) if last.hole == hole && last.zero == zero => last.length += r.length,
                    _ => extents.push(Extent {
                        length: r.length,
                        hole,
                        zero,
                    }),
                }
            }
            Ok(extents)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ditto_engine::{FileReplica, LogSink, Member, ReplicaState, VolumeOptions};
    use ditto_format::{Layout, DEFAULT_REGION_SIZE};
    use uuid::Uuid;

    /// ramfs has no fallocate at all: hole punching falls back to writing
    /// zeroes there. Needs root; None (with the reason printed) otherwise.
    fn ramfs() -> Option<(tempfile::TempDir, impl Drop)> {
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: cannot mount ramfs here (needs root)");
            return None;
        }
        let guard = Unmount(dir.path().to_path_buf());
        Some((dir, guard))
    }

    /// NBD_CMD_FLAG_FAST_ZERO on replicas that cannot punch holes must be
    /// refused with ENOTSUP at once, before anything is written (it used to
    /// run, and on such a filesystem fail every replica); without the flag
    /// the same request zeroes, by writing zeroes.
    #[tokio::test]
    async fn fast_zero_is_refused_where_zeroing_would_write_zeroes() {
        let Some((dir, _mount)) = ramfs() else {
            return;
        };
        const SIZE: u64 = 4 << 20;
        let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
        let vol = Uuid::new_v4();
        let mut members = Vec::new();
        for i in 0..2 {
            let id = Uuid::new_v4();
            let r = FileReplica::create(
                &ditto_engine::ThreadPoolEngine,
                &dir.path().join(format!("r{i}")),
                vol,
                id,
                layout,
            )
            .await
            .unwrap();
            members.push(Member::new(id, format!("p{i}"), r));
        }
        let v = Volume::open(
            "fz",
            vol,
            SIZE,
            members,
            VolumeOptions::default(),
            Arc::new(LogSink),
        )
        .await
        .unwrap();
        let export = VolumeExport(v.clone());
        let data = Bytes::from(vec![0x5au8; 1 << 20]);
        export.write(0, data.clone(), false).await.unwrap();

        let r = export.write_zeroes(0, 1 << 20, false, true, true).await;
        assert!(
            matches!(r, Err(ExportError::NotSupported(_))),
            "fast zero on ramfs: {r:?}"
        );
        assert_eq!(
            r.unwrap_err().nbd_errno(),
            ditto_nbd::proto::NBD_ENOTSUP,
            "sent as ENOTSUP"
        );
        assert_eq!(
            export.read(0, 1 << 20).await.unwrap(),
            data,
            "a refused fast zero changes nothing"
        );

        export
            .write_zeroes(0, 1 << 20, false, true, false)
            .await
            .expect("a plain write-zeroes zeroes by writing zeroes");
        assert!(export
            .read(0, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert!(v.members().iter().all(|m| m.state == ReplicaState::InSync));
        v.close().await.unwrap();
    }
}
