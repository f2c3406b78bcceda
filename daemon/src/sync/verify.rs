//! `ferry verify`: compares a source device with its target image by
//! checksums and lists the ranges that differ. Read-only on both sides: the
//! agent neither creates nor locks the image for writing.
//!
//! The source keeps changing while it is verified, so chunks written since
//! the last sync differ as they should; verify a quiet source (or right
//! after a final sync) for a yes-or-no answer.

use std::path::PathBuf;

use serde::Serialize;

use super::{compare, parse_uuid, progress::Progress, session::Session, SyncError};
use crate::{
    device::BlockDevice,
    dirty::extents::extents,
    protocol::{self, Hello},
    track::TrackError,
    transport::{self, ConnectOptions, TargetUrl},
};

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub device: PathBuf,
    pub target: String,
    pub identical: bool,
    pub compared_bytes: u64,
    pub differing_bytes: u64,
    /// `[offset, length]` in bytes.
    pub ranges: Vec<[u64; 2]>,
}

/// Block size of the comparison.
const BLOCK: u32 = 64 << 10;

pub fn verify(
    device: &std::path::Path,
    target: &TargetUrl,
    connect: &ConnectOptions,
    progress_bar: bool,
) -> Result<VerifyReport, SyncError> {
    let dev = BlockDevice::resolve(device).map_err(TrackError::from)?;
    let size = dev.size_bytes();
    let file = crate::sys::uring::open_direct(&dev.path).map_err(|source| SyncError::Open {
        path: dev.path.clone(),
        source,
    })?;
    let link = transport::connect(target, connect)?;
    let mut session = Session::new(link, None);
    let welcome = session.handshake(Hello {
        version: protocol::VERSION,
        source_id: parse_uuid(""),
        device_size: size,
        chunk_size: BLOCK,
        image: target.image.clone(),
        force_new_source: false,
        read_only: true,
        manage: false,
        format: super::format_code(target),
    })?;
    let mut progress = Progress::new(progress_bar);
    let compared = size.min(welcome.image_size);
    progress.phase("comparing checksums", compared);
    let differ =
        compare::differing_chunks(&mut session, &file, compared, BLOCK, |d| progress.set(d))?;
    session.close()?;
    progress.finish();
    let mut ranges: Vec<[u64; 2]> = extents(&differ, u64::from(BLOCK), compared, u64::MAX)
        .iter()
        .map(|e| [e.offset, e.len])
        .collect();
    if welcome.image_size != size {
        // A size difference is a difference too.
        let (lo, hi) = (compared, size.max(welcome.image_size));
        ranges.push([lo, hi - lo]);
    }
    let differing_bytes = ranges.iter().map(|r| r[1]).sum::<u64>();
    Ok(VerifyReport {
        device: dev.path,
        target: target.to_string(),
        identical: ranges.is_empty(),
        compared_bytes: compared,
        differing_bytes,
        ranges,
    })
}
