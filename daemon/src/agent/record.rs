//! The commit record next to each image, `<image>.ferry.json`: which source
//! the image belongs to and the last generation made durable.
//!
//! It is the only statement that data is durable, so it is written after the
//! image is fsynced, atomically (temp file, fsync, rename, fsync of the
//! directory), and every access is confined beneath the agent's root.

use std::{
    io::{Read, Write},
    os::fd::BorrowedFd,
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::AgentError;
use crate::{
    protocol::ErrorCode,
    sys::fs::{self as sysfs, Open},
};

/// Larger than any record we write; a bigger file is not ours.
const MAX_RECORD_LEN: u64 = 64 << 10;

/// Name of the commit record of `image` (both relative to the agent root).
pub fn commit_record_name(image: &str) -> String {
    format!("{image}.ferry.json")
}

fn temp_name(file_name: &str) -> String {
    format!("{}.tmp", commit_record_name(file_name))
}

/// The image file's inode and modification time, as `fstat` gives them.
/// The record holds one only while the image is exactly as ferry committed
/// it: a later modification time means something else wrote to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub ino: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

/// What the target knows durably about one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The source the image belongs to, a hyphenated UUID.
    pub source_id: String,
    /// Last committed generation; 0 = the image is claimed by `source_id`
    /// but nothing is committed yet.
    pub generation: u64,
    /// Bytes applied (data and zero) in that generation.
    pub bytes: u64,
    /// Unix seconds.
    pub committed_at: u64,
    pub device_size: u64,
    pub chunk_size: u32,
    /// The ferry that wrote the record.
    pub ferry_version: String,
    /// The image as this commit left it; cleared while a session may be
    /// writing to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

impl CommitRecord {
    pub fn new(
        source_id: [u8; 16],
        generation: u64,
        bytes: u64,
        device_size: u64,
        chunk_size: u32,
    ) -> Self {
        Self {
            source_id: uuid::Uuid::from_bytes(source_id).hyphenated().to_string(),
            generation,
            bytes,
            committed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            device_size,
            chunk_size,
            ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
            stamp: None,
        }
    }

    /// The source id as bytes, `None` if it is not a UUID.
    pub fn source_bytes(&self) -> Option<[u8; 16]> {
        uuid::Uuid::parse_str(&self.source_id)
            .ok()
            .map(|u| u.into_bytes())
    }
}

/// Reads the record of `file_name` in `dir`; `shown` names it in messages.
/// A record that cannot be parsed is an error, never taken as absent.
pub(super) fn read(
    dir: BorrowedFd<'_>,
    file_name: &str,
    shown: &str,
) -> Result<Option<CommitRecord>, AgentError> {
    let name = commit_record_name(file_name);
    let shown = commit_record_name(shown);
    let file = match sysfs::open_beneath(dir, Path::new(&name), Open::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if sysfs::is_escape(&e) => {
            return Err(AgentError::refused(
                ErrorCode::PathEscape,
                format!("commit record {shown} leads outside the target root"),
            ))
        }
        Err(e) => {
            return Err(AgentError::refused_by(
                ErrorCode::Io,
                format!("{shown}: open failed"),
                e,
            ))
        }
    };
    let mut text = Vec::new();
    file.take(MAX_RECORD_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| AgentError::refused_by(ErrorCode::Io, format!("{shown}: read failed"), e))?;
    let corrupt = |why: String| {
        AgentError::refused(
            ErrorCode::Io,
            format!(
                "commit record {shown} is corrupt ({why}); move it away, or start over with a new source"
            ),
        )
    };
    if text.len() as u64 > MAX_RECORD_LEN {
        return Err(corrupt(format!("over {MAX_RECORD_LEN} bytes")));
    }
    let record: CommitRecord = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if record.source_bytes().is_none() {
        return Err(corrupt(format!(
            "source id {:?} is not a UUID",
            record.source_id
        )));
    }
    Ok(Some(record))
}

/// Replaces the record of `file_name` in `dir` so that a crash leaves the
/// old or the new one, and the new one is durable when this returns.
pub(super) fn write(
    dir: BorrowedFd<'_>,
    file_name: &str,
    shown: &str,
    record: &CommitRecord,
) -> Result<(), AgentError> {
    let name = commit_record_name(file_name);
    let tmp = temp_name(file_name);
    let shown_tmp = temp_name(shown);
    let fail = |what: &str, shown: &str, e: std::io::Error| {
        let code = if sysfs::is_no_space(&e) {
            ErrorCode::DiskFull
        } else if sysfs::is_escape(&e) {
            ErrorCode::PathEscape
        } else {
            ErrorCode::Io
        };
        AgentError::refused_by(code, format!("{shown}: {what} failed"), e)
    };
    let create = || sysfs::open_beneath(dir, Path::new(&tmp), Open::CreateNew { mode: 0o600 });
    let mut file = match create() {
        // Left by a session that died mid-write; we hold the image lock, so
        // no live session owns it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            sysfs::unlink_in(dir, &tmp)
                .map_err(|e| fail("remove stale temp file", &shown_tmp, e))?;
            create()
        }
        other => other,
    }
    .map_err(|e| fail("create", &shown_tmp, e))?;
    let bytes = serde_json::to_vec_pretty(record).expect("records always serialise");
    let written = file
        .write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| fail("write", &shown_tmp, e))
        .and_then(|()| {
            sysfs::rename_in(dir, &tmp, &name)
                .map_err(|e| fail("rename into place", &commit_record_name(shown), e))
        });
    if let Err(e) = written {
        drop(file);
        let _ = sysfs::unlink_in(dir, &tmp);
        return Err(e);
    }
    sysfs::open_beneath(dir, Path::new("."), Open::Dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("fsync directory", &commit_record_name(shown), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_follow_the_image() {
        assert_eq!(
            commit_record_name("vm/disk0.raw"),
            "vm/disk0.raw.ferry.json"
        );
        assert_eq!(temp_name("disk0.raw"), "disk0.raw.ferry.json.tmp");
    }

    #[test]
    fn source_id_round_trips_through_the_uuid_text() {
        let id = *uuid::Uuid::new_v4().as_bytes();
        let rec = CommitRecord::new(id, 3, 10, 4096, 65536);
        assert_eq!(rec.source_bytes(), Some(id));
        let json = serde_json::to_string(&rec).unwrap();
        let back: CommitRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }
}
