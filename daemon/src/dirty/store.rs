//! The state directory: one record per tracked device and the dirty set not
//! yet shipped, each written atomically (temp file, fsync, rename, fsync of
//! the directory), so a crash leaves either the old or the new version.
//!
//! Layout (the directory and everything in it is root-only, mode 0700/0600):
//!
//! ```text
//! /var/lib/ferry/
//!   lock                     flock held by every ferry command that changes state
//!   devices/7-0.json         DeviceRecord of /dev/loop0 (dev 7:0)
//!   devices/7-0.pending      roaring bitmap of dirty chunks not yet shipped
//!   devices/7-0.intent       Intent: the identity a sync offered before tracking began
//! ```

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::{device::DevNum, tracker::Epoch};

/// Where state lives unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {op} failed")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt state file")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: another ferry command holds the state lock")]
    Busy { path: PathBuf },
}

pub(super) fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { path, op, source }
}

/// What ferry remembers about one tracked device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub path: PathBuf,
    /// `major:minor`.
    pub dev: String,
    pub disk: String,
    pub start_sector: u64,
    pub nr_sectors: u64,
    pub chunk_size: u64,
    /// The tracker load this device's bits belong to.
    pub epoch: Epoch,
    /// Set when the bits cannot be trusted; the reason. Cleared only by a
    /// checksum resync.
    pub needs_resync: Option<String>,
    /// Overflow counter value already accounted for.
    pub overflows_seen: u64,
    /// The programs' skipped-run count already accounted for.
    #[serde(default)]
    pub missed_runs_seen: u64,
    /// Set while a drain is between taking the kernel's bits and persisting
    /// them; found set, it means a drain was cut short.
    pub draining: bool,
    /// Unix seconds.
    pub added_at: u64,
    /// This device's identity as a replication source (a random UUID made
    /// when tracking began). Targets record it and refuse other sources.
    #[serde(default)]
    pub source_id: Option<String>,
    /// The disk's media sequence number when its bits began to count
    /// ([`crate::device::BlockDevice::diskseq`]); another one means other
    /// media, whose writes were never seen.
    #[serde(default)]
    pub diskseq: Option<u64>,
}

/// The source identity a sync offered a target for a device it had not
/// tracked yet. It is kept until tracking starts, so that a job failing in
/// between offers the same one next time. The target may already have
/// recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub source_id: String,
    /// The device's media sequence number then: other media, another
    /// source.
    pub diskseq: Option<u64>,
}

/// The state directory, locked for the life of this value.
pub struct Store {
    root: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the state directory and takes its lock,
    /// waiting for another ferry command to finish.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("devices"))
            .map_err(io_err(root, "create state directory"))?;
        use std::os::unix::fs::PermissionsExt;
        for dir in [root.to_owned(), root.join("devices")] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(&dir, "restrict permissions"))?;
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "open lock"))?;
        crate::sys::fs::lock_exclusive(&lock).map_err(io_err(&lock_path, "lock"))?;
        Ok(Self {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn base(&self, dev: DevNum) -> PathBuf {
        self.root
            .join("devices")
            .join(format!("{}-{}", dev.major, dev.minor))
    }

    pub fn records(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let dir = self.root.join("devices");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list"))? {
            let path = entry.map_err(io_err(&dir, "list"))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = fs::read(&path).map_err(io_err(&path, "read"))?;
                let rec = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
                out.push(rec);
            }
        }
        out.sort_by(|a: &DeviceRecord, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub fn record(&self, dev: DevNum) -> Result<Option<DeviceRecord>, StoreError> {
        read_json(&self.base(dev).with_extension("json"))
    }

    pub fn save_record(&self, dev: DevNum, rec: &DeviceRecord) -> Result<(), StoreError> {
        write_json(&self.base(dev).with_extension("json"), rec)
    }

    /// The persisted dirty set (empty if none).
    pub fn pending(&self, dev: DevNum) -> Result<RoaringBitmap, StoreError> {
        read_set(&self.base(dev).with_extension("pending"))
    }

    pub fn save_pending(&self, dev: DevNum, set: &RoaringBitmap) -> Result<(), StoreError> {
        write_set(&self.base(dev).with_extension("pending"), set)
    }

    pub fn intent(&self, dev: DevNum) -> Result<Option<Intent>, StoreError> {
        read_json(&self.base(dev).with_extension("intent"))
    }

    pub fn save_intent(&self, dev: DevNum, intent: &Intent) -> Result<(), StoreError> {
        write_json(&self.base(dev).with_extension("intent"), intent)
    }

    /// Drops the intent once the device is tracked (its record holds the
    /// identity from then on).
    pub fn delete_intent(&self, dev: DevNum) -> Result<(), StoreError> {
        remove(&self.base(dev).with_extension("intent"))
    }

    /// Forgets a device entirely.
    pub fn delete(&self, dev: DevNum) -> Result<(), StoreError> {
        for ext in ["pending", "json", "intent"] {
            remove(&self.base(dev).with_extension(ext))?;
        }
        sync_dir(&self.root.join("devices"))
    }
}

/// A JSON file, or `None` if there is none.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: path.to_owned(),
                source: Box::new(e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            op: "read",
            source,
        }),
    }
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).expect("records always serialise");
    atomic_write(path, &bytes)
}

/// A roaring set file; empty if there is none, an error if it is corrupt.
pub(super) fn read_set(path: &Path) -> Result<RoaringBitmap, StoreError> {
    match fs::read(path) {
        Ok(bytes) => RoaringBitmap::deserialize_from(&bytes[..]).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            source: Box::new(e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RoaringBitmap::new()),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            op: "read",
            source,
        }),
    }
}

pub(super) fn write_set(path: &Path, set: &RoaringBitmap) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(set.serialized_size());
    set.serialize_into(&mut bytes)
        .expect("writing to a Vec cannot fail");
    atomic_write(path, &bytes)
}

/// Removes `path`; a missing file is fine.
pub(super) fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            op: "remove",
            source,
        }),
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(source) = written {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io {
            path: tmp,
            op: "write",
            source,
        });
    }
    fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        d
    }

    fn record() -> DeviceRecord {
        DeviceRecord {
            path: "/dev/loop9".into(),
            dev: "7:9".into(),
            disk: "7:9".into(),
            start_sector: 0,
            nr_sectors: 2048,
            chunk_size: 65536,
            epoch: Epoch {
                boot_id: "b".into(),
                program_id: 4,
                loaded_at_ns: 5,
            },
            needs_resync: None,
            overflows_seen: 0,
            missed_runs_seen: 0,
            draining: false,
            added_at: 1,
            diskseq: Some(3),
            source_id: None,
        }
    }

    #[test]
    fn round_trips_records_and_pending_sets() {
        let root = tempdir();
        let store = Store::open(&root).unwrap();
        let dev = DevNum { major: 7, minor: 9 };
        assert!(store.record(dev).unwrap().is_none());
        assert!(store.pending(dev).unwrap().is_empty());
        store.save_record(dev, &record()).unwrap();
        let set: RoaringBitmap = [1, 5, 70_000].into_iter().collect();
        store.save_pending(dev, &set).unwrap();
        assert_eq!(store.record(dev).unwrap(), Some(record()));
        assert_eq!(store.records().unwrap(), vec![record()]);
        assert_eq!(store.pending(dev).unwrap(), set);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(root.join("devices"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        store.delete(dev).unwrap();
        assert!(store.record(dev).unwrap().is_none());
        drop(store);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn corrupt_pending_set_is_an_error_not_an_empty_set() {
        let root = tempdir();
        let store = Store::open(&root).unwrap();
        let dev = DevNum { major: 7, minor: 1 };
        fs::write(root.join("devices/7-1.pending"), b"garbage").unwrap();
        assert!(matches!(
            store.pending(dev),
            Err(StoreError::Corrupt { .. })
        ));
        drop(store);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn state_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempdir();
        let store = Store::open(&root).unwrap();
        store
            .save_record(DevNum { major: 1, minor: 2 }, &record())
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("devices/1-2.json")), 0o600);
        drop(store);
        fs::remove_dir_all(root).unwrap();
    }
}
