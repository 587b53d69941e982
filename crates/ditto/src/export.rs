//! Adapter from the NBD server's `Export` trait to the volume engine.

use std::sync::Arc;

use bytes::Bytes;
use ditto_engine::{BackendError, EngineError, Volume};
use ditto_nbd::{BoxFuture, Export, ExportError, Extent};

pub struct VolumeExport(pub Arc<Volume>);

fn map_err(e: EngineError) -> ExportError {
    match e {
        EngineError::OutOfRange { .. } => ExportError::Invalid(e.to_string()),
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

    /// Zeroing by deallocation (hole punching) is a metadata operation.
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
            // zeroes, which is not fast: say so instead of pretending.
            if fast_only && !may_trim {
                return Err(ExportError::NotSupported(
                    "fast zero without deallocation".into(),
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
