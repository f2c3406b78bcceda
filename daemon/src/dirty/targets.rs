//! What each target of a device still needs, kept in the state directory.
//!
//! One device can feed several targets; each has its own sets, so one
//! target's acknowledgement never clears chunks another still needs:
//!
//! ```text
//! targets/7-0-<url hash>.json      TargetRecord: url, last acknowledged generation
//! targets/7-0-<url hash>.pending   drained chunks no job has taken yet (the successor)
//! targets/7-0-<url hash>.inflight  chunks a job took and the target has not acknowledged
//! targets/7-0-<url hash>.lock      flock held by the job syncing this target
//! ```
//!
//! A job moves `pending` into `inflight` before it reads anything, and clears
//! `inflight` only after the target acknowledged the commit. A job that
//! fails or is killed leaves `inflight` behind and the next job ships it
//! again (QEMU's successor/abdicate/reclaim, with the frozen set on disk).

use std::{
    fs::{self, File, OpenOptions},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
};

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::store::{io_err, read_json, read_set, remove, write_json, write_set, Store, StoreError};
use crate::device::DevNum;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// The target address as given (normalised).
    pub url: String,
    /// `major:minor` of the source device.
    pub dev: String,
    /// Last generation the target acknowledged; 0 before the first.
    pub generation: u64,
    /// A generation whose commit was sent but whose acknowledgement was not
    /// recorded: the target may be at it or at `generation`.
    pub committing: Option<u64>,
    /// The first full copy was acknowledged.
    pub seeded: bool,
    /// Set when the target's copy cannot be trusted; the reason. Cleared by
    /// an acknowledged checksum resync or seed.
    pub needs_resync: Option<String>,
    /// Unix seconds of the last acknowledged sync.
    pub last_sync: Option<u64>,
}

/// Which of a target's two sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Set {
    Pending,
    Inflight,
}

impl Set {
    fn ext(self) -> &'static str {
        match self {
            Set::Pending => "pending",
            Set::Inflight => "inflight",
        }
    }
}

/// The file stem of a target of `dev`. It names files in the state
/// directory, so the hash (xxh3-64) must never change.
pub fn target_id(dev: DevNum, url: &str) -> String {
    let h = crate::hash::data_hash(url.as_bytes());
    format!("{}-{}-{h:016x}", dev.major, dev.minor)
}

/// Exclusive right to run a job against one target, for as long as it lives.
pub struct TargetLock {
    _file: File,
}

impl Store {
    fn targets_dir(&self) -> Result<PathBuf, StoreError> {
        let dir = self.root().join("targets");
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir, "create targets directory"))?;
        Ok(dir)
    }

    /// Every target of `dev`, with its id.
    pub fn targets_of(&self, dev: DevNum) -> Result<Vec<(String, TargetRecord)>, StoreError> {
        let dir = self.targets_dir()?;
        let prefix = format!("{}-{}-", dev.major, dev.minor);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list"))? {
            let path = entry.map_err(io_err(&dir, "list"))?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "json") && stem.starts_with(&prefix) {
                let id = stem.to_owned();
                if let Some(rec) = self.target(&id)? {
                    out.push((id, rec));
                }
            }
        }
        out.sort_by(|a, b| a.1.url.cmp(&b.1.url));
        Ok(out)
    }

    pub fn target(&self, id: &str) -> Result<Option<TargetRecord>, StoreError> {
        read_json(&self.targets_dir()?.join(format!("{id}.json")))
    }

    pub fn save_target(&self, id: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        write_json(&self.targets_dir()?.join(format!("{id}.json")), rec)
    }

    pub fn target_set(&self, id: &str, which: Set) -> Result<RoaringBitmap, StoreError> {
        read_set(&self.targets_dir()?.join(format!("{id}.{}", which.ext())))
    }

    pub fn save_target_set(
        &self,
        id: &str,
        which: Set,
        set: &RoaringBitmap,
    ) -> Result<(), StoreError> {
        write_set(
            &self.targets_dir()?.join(format!("{id}.{}", which.ext())),
            set,
        )
    }

    /// Forgets every target of `dev` (the device is no longer tracked).
    pub fn delete_targets_of(&self, dev: DevNum) -> Result<(), StoreError> {
        for (id, _) in self.targets_of(dev)? {
            self.delete_target(&id)?;
        }
        Ok(())
    }

    /// Forgets target `id`: its record and sets, then its lock file.
    pub fn delete_target(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.targets_dir()?;
        for ext in ["pending", "inflight", "json", "lock"] {
            remove(&dir.join(format!("{id}.{ext}")))?;
        }
        Ok(())
    }

    /// Takes the job lock of target `id`, or says another job holds it.
    pub fn lock_target(&self, id: &str) -> Result<TargetLock, StoreError> {
        let path = self.targets_dir()?.join(format!("{id}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path, "open lock"))?;
        match crate::sys::fs::try_lock_exclusive(&file) {
            Ok(true) => Ok(TargetLock { _file: file }),
            Ok(false) => Err(StoreError::Busy { path }),
            Err(source) => Err(StoreError::Io {
                path,
                op: "lock",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_ids_keep_their_names() {
        let dev = DevNum { major: 7, minor: 3 };
        let url = "ssh://backup@kvm1/srv/standby/web.img";
        let h = xxhash_rust::xxh3::xxh3_64(url.as_bytes());
        assert_eq!(target_id(dev, url), format!("7-3-{h:016x}"));
    }

    fn tempdir() -> PathBuf {
        std::env::temp_dir().join(format!(
            "ferry-targets-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ))
    }

    #[test]
    fn each_target_keeps_its_own_sets() {
        let root = tempdir();
        let store = Store::open(&root).unwrap();
        let dev = DevNum { major: 7, minor: 3 };
        let a = target_id(dev, "file:///a.img");
        let b = target_id(dev, "ssh://u@h/b.img");
        assert_ne!(a, b);
        for (id, url) in [(&a, "file:///a.img"), (&b, "ssh://u@h/b.img")] {
            let rec = TargetRecord {
                url: url.into(),
                dev: "7:3".into(),
                generation: 0,
                committing: None,
                seeded: false,
                needs_resync: None,
                last_sync: None,
            };
            store.save_target(id, &rec).unwrap();
        }
        let set: RoaringBitmap = [1, 2, 3].into_iter().collect();
        store.save_target_set(&a, Set::Pending, &set).unwrap();
        assert_eq!(store.target_set(&a, Set::Pending).unwrap(), set);
        assert!(store.target_set(&b, Set::Pending).unwrap().is_empty());
        assert!(store.target_set(&a, Set::Inflight).unwrap().is_empty());
        let ids: Vec<_> = store
            .targets_of(dev)
            .unwrap()
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(store
            .targets_of(DevNum {
                major: 7,
                minor: 30
            })
            .unwrap()
            .is_empty());
        // One job per target at a time.
        let held = store.lock_target(&a).unwrap();
        assert!(matches!(
            store.lock_target(&a),
            Err(StoreError::Busy { .. })
        ));
        drop(held);
        store.lock_target(&a).unwrap();
        store.delete_targets_of(dev).unwrap();
        assert!(store.targets_of(dev).unwrap().is_empty());
        drop(store);
        fs::remove_dir_all(root).unwrap();
    }
}
