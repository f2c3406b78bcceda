//! Tracking as the user sees it: a [`Tracker`] for the kernel's bits plus the
//! [`Store`] for what has been drained but not yet shipped.
//!
//! Invariants kept here:
//! - **Never a silent empty set.** Each device records the tracker epoch it is
//!   tracked under. A different epoch (reboot, program unloaded, pins lost),
//!   a missing kernel slot, an overflow or a drain cut short puts the device in
//!   `needs-resync` with the reason, and that sticks until a checksum resync.
//!   A device that lost tracking is re-armed at once, so new writes are
//!   tracked again while the resync is pending.
//! - **Drains are crash-safe.** A drain first persists an in-use flag, then
//!   takes the kernel's bits, then persists them merged into the pending set
//!   and drops the flag. A crash between the first and last step leaves the
//!   flag set, which the next command reports as `needs-resync:
//!   interrupted-drain`. If the bits cannot be persisted they go back to the
//!   kernel bitmap.
//! - **A resized device stays tracked.** Every command compares the device's
//!   size with the one it is tracked at. A change moves tracking to a bitmap
//!   of the new size with no moment untracked, keeps what the old one held,
//!   and marks all the space the device gained dirty: writes there went
//!   unseen until now.
//! - **A renumbered partition stays the same source.** A partition the
//!   kernel deleted and added again under another number (same name, same
//!   disk) is tracked under its new number with its identity and targets,
//!   which compare checksums at their next sync.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use roaring::RoaringBitmap;
use serde::Serialize;

use crate::{
    device::{BlockDevice, DevNum, DeviceError},
    dirty::{
        extents,
        store::{DeviceRecord, Intent, Store, StoreError},
        targets::{target_id, Set, TargetLock, TargetRecord},
    },
    tracker::{ChunkSize, Counters, Epoch, TrackSpec, Tracker, TrackerError},
};

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("{path} is already tracked")]
    AlreadyTracked { path: PathBuf },
    #[error("{path} is not tracked")]
    NotTracked { path: PathBuf },
    #[error("{path} does not feed {url} (`ferry track targets` lists what it feeds)")]
    NoSuchTarget { path: PathBuf, url: String },
    #[error("a sync to {url} is running; forget it once that ends")]
    TargetBusy { url: String },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tracking state of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Tracking,
    NeedsResync(String),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Tracking => "tracking",
            State::NeedsResync(_) => "needs-resync",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            State::Tracking => None,
            State::NeedsResync(r) => Some(r),
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Tracking => f.write_str("tracking"),
            State::NeedsResync(r) => write!(f, "needs-resync: {r}"),
        }
    }
}

/// The dirty set of one device, as `ferry track dirty` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct DirtyReport {
    pub device: PathBuf,
    pub chunk_size: u64,
    /// `[offset, length]` in bytes, relative to the device, sorted, coalesced.
    pub extents: Vec<[u64; 2]>,
    pub dirty_bytes: u64,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One line of `ferry track list`.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub device: PathBuf,
    pub dev: String,
    pub size: u64,
    pub chunk_size: u64,
    pub dirty_chunks: u64,
    pub dirty_bytes: u64,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub counters: Counters,
    /// Kernel memory held by the device's bitmap.
    pub bitmap_bytes: u64,
    pub epoch: Epoch,
}

/// One standby target of a tracked device, as `ferry track targets` prints
/// it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub device: PathBuf,
    pub target: String,
    /// Bytes written on the device that this target has not acknowledged:
    /// its own sets and the kernel's marks not drained yet, in chunks; the
    /// whole device before its seed is acknowledged.
    pub behind_bytes: u64,
    pub behind_chunks: u64,
    /// Last generation the target acknowledged.
    pub generation: u64,
    /// Unix seconds of the last acknowledged sync.
    pub last_sync: Option<u64>,
    /// `ok`, `needs-resync` (its next sync compares checksums) or
    /// `not-seeded` (no full copy acknowledged yet).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How long `add` waits for writes submitted before tracking began to finish.
const QUIESCE_WAIT: Duration = Duration::from_secs(2);

pub struct Tracking<T: Tracker> {
    tracker: T,
    store: Store,
}

impl<T: Tracker> Tracking<T> {
    pub fn new(tracker: T, store: Store) -> Self {
        Self { tracker, store }
    }

    pub fn tracker_mut(&mut self) -> &mut T {
        &mut self.tracker
    }

    /// Starts tracking `path`.
    pub fn add(&mut self, path: &Path, chunk: ChunkSize) -> Result<DeviceReport, TrackError> {
        self.follow_renumbered()?;
        self.add_as(path, chunk, uuid::Uuid::new_v4().to_string())
    }

    /// Starts tracking `path` as the replication source `source_id` (a
    /// hyphenated UUID).
    pub fn add_as(
        &mut self,
        path: &Path,
        chunk: ChunkSize,
        source_id: String,
    ) -> Result<DeviceReport, TrackError> {
        let device = BlockDevice::resolve(path)?;
        if self.store.record(device.dev)?.is_some() {
            return Err(TrackError::AlreadyTracked { path: device.path });
        }
        let spec = TrackSpec {
            device: device.clone(),
            chunk,
        };
        let epoch = match self.tracker.add(&spec) {
            // A slot with no record is left over from a state directory that
            // was lost: its bits mean nothing without the record.
            Err(TrackerError::AlreadyTracked { .. }) => {
                self.tracker.remove(device.dev)?;
                self.tracker.add(&spec)?
            }
            other => other?,
        };
        // Writes submitted just before the slot existed are not in the
        // in-flight table; they are safe once the disk has none in flight.
        let quiet = wait_for_quiet(&device);
        let rec = DeviceRecord {
            path: device.path.clone(),
            dev: device.dev.to_string(),
            disk: device.disk.to_string(),
            start_sector: device.start_sector,
            nr_sectors: device.nr_sectors,
            chunk_size: chunk.bytes(),
            epoch,
            needs_resync: (!quiet).then(|| "writes in flight when tracking began".to_owned()),
            overflows_seen: 0,
            missed_runs_seen: self.tracker.missed_runs()?,
            draining: false,
            added_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source_id: Some(source_id),
            diskseq: device.diskseq,
        };
        let saved = self
            .store
            .save_pending(device.dev, &RoaringBitmap::new())
            .and_then(|()| self.store.save_record(device.dev, &rec))
            .and_then(|()| self.store.delete_intent(device.dev));
        if let Err(e) = saved {
            // Leave no half-added device behind.
            let _ = self.tracker.remove(device.dev);
            let _ = self.store.delete(device.dev);
            return Err(e.into());
        }
        self.report(&rec)
    }

    /// Stops tracking `path` and forgets its pending set.
    pub fn remove(&mut self, path: &Path) -> Result<(), TrackError> {
        let rec = self.find(path)?;
        self.forget(dev_of(&rec))
    }

    /// Drops `dev`'s kernel slot, record, pending set and targets.
    fn forget(&mut self, dev: DevNum) -> Result<(), TrackError> {
        match self.tracker.remove(dev) {
            Ok(()) | Err(TrackerError::NotTracked { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.delete_targets_of(dev)?;
        self.store.delete(dev)?;
        Ok(())
    }

    /// Takes target `id`'s job lock, or says a sync to `url` holds it.
    fn lock_target(&self, id: &str, url: &str) -> Result<TargetLock, TrackError> {
        self.store.lock_target(id).map_err(|e| match e {
            StoreError::Busy { .. } => TrackError::TargetBusy {
                url: url.to_owned(),
            },
            e => e.into(),
        })
    }

    pub fn list(&mut self) -> Result<Vec<DeviceReport>, TrackError> {
        self.follow_renumbered()?;
        let mut out = Vec::new();
        for rec in self.store.records()? {
            out.push(self.report(&rec)?);
        }
        Ok(out)
    }

    /// The targets of `path`, or of every tracked device: how far behind
    /// each is.
    pub fn targets(&mut self, path: Option<&Path>) -> Result<Vec<TargetReport>, TrackError> {
        let records = match path {
            Some(p) => vec![self.find(p)?],
            None => self.store.records()?,
        };
        let mut out = Vec::new();
        for mut rec in records {
            // Hands reasons found on the device to its targets first.
            self.reconcile(&mut rec)?;
            let dev = dev_of(&rec);
            let kernel = self.tracker.peek(dev).unwrap_or_default();
            let size = rec.nr_sectors * 512;
            for (id, t) in self.store.targets_of(dev)? {
                let mut set = self.store.target_set(&id, Set::Pending)?;
                set |= self.store.target_set(&id, Set::Inflight)?;
                set |= &kernel;
                let (state, reason) = match (&t.needs_resync, t.seeded) {
                    (Some(r), _) => ("needs-resync", Some(r.clone())),
                    (None, false) => ("not-seeded", None),
                    (None, true) => ("ok", None),
                };
                if !t.seeded {
                    // The seed copies all of it.
                    set.insert_range(
                        0..u32::try_from(size.div_ceil(rec.chunk_size)).unwrap_or(u32::MAX),
                    );
                }
                out.push(TargetReport {
                    device: rec.path.clone(),
                    target: t.url,
                    behind_bytes: extents::total_bytes(&extents(
                        &set,
                        rec.chunk_size,
                        size,
                        u64::MAX,
                    )),
                    behind_chunks: set.len(),
                    generation: t.generation,
                    last_sync: t.last_sync,
                    state,
                    reason,
                });
            }
        }
        Ok(out)
    }

    /// Stops `path` feeding `url`: forgets what that target still lacks
    /// and its generation. Waits for no job: one running on it is an error.
    /// The image is not touched; a later sync to it compares checksums.
    pub fn forget_target(&mut self, path: &Path, url: &str) -> Result<(), TrackError> {
        let rec = self.find(path)?;
        let id = target_id(dev_of(&rec), url);
        if self.store.target(&id)?.is_none() {
            return Err(TrackError::NoSuchTarget {
                path: path.to_owned(),
                url: url.to_owned(),
            });
        }
        let _lock = self.lock_target(&id, url)?;
        self.store.delete_target(&id)?;
        Ok(())
    }

    /// The dirty set (persisted and kernel), left in place.
    pub fn dirty(&mut self, path: &Path) -> Result<DirtyReport, TrackError> {
        let mut rec = self.find(path)?;
        let state = self.reconcile(&mut rec)?;
        let dev = dev_of(&rec);
        let mut set = self.store.pending(dev)?;
        if let Ok(kernel) = self.tracker.peek(dev) {
            set |= kernel;
        }
        Ok(dirty_report(&rec, &set, &state))
    }

    /// The dirty set, then cleared. What it takes still goes to every
    /// target of the device: only a target's acknowledgement clears its set.
    pub fn drain(&mut self, path: &Path) -> Result<DirtyReport, TrackError> {
        let mut rec = self.find(path)?;
        let state = self.reconcile(&mut rec)?;
        let set = self.take(&mut rec, &state)?;
        let report = dirty_report(&rec, &set, &state);
        self.store
            .save_pending(dev_of(&rec), &RoaringBitmap::new())?;
        Ok(report)
    }

    /// Drains the kernel's bits into every target's pending set, for a sync
    /// job. Returns the device's record and state.
    pub fn drain_to_targets(&mut self, path: &Path) -> Result<(DeviceRecord, State), TrackError> {
        let mut rec = self.find(path)?;
        let state = self.reconcile(&mut rec)?;
        self.take(&mut rec, &state)?;
        let dev = dev_of(&rec);
        if !self.store.targets_of(dev)?.is_empty() {
            self.store.save_pending(dev, &RoaringBitmap::new())?;
        }
        Ok((rec, state))
    }

    /// Takes the kernel's bits and persists them, merged into the device's
    /// pending set and into each target's. The in-use flag brackets the
    /// window where the bits exist only in this process. Returns the
    /// device's whole pending set.
    fn take(&mut self, rec: &mut DeviceRecord, state: &State) -> Result<RoaringBitmap, TrackError> {
        let dev = dev_of(rec);
        let mut set = self.store.pending(dev)?;
        let kernel = match state {
            State::NeedsResync(_) if self.tracker.peek(dev).is_err() => RoaringBitmap::new(),
            _ => {
                rec.draining = true;
                self.store.save_record(dev, rec)?;
                self.tracker.drain(dev)?
            }
        };
        set |= &kernel;
        self.persist(rec, &set, &kernel)?;
        if rec.draining {
            rec.draining = false;
            self.store.save_record(dev, rec)?;
        }
        Ok(set)
    }

    /// Saves `set` as the device's pending set and merges `taken` (the bits
    /// just taken from the kernel) into every target's. If that fails,
    /// `taken` goes back to the kernel (bits some target may already hold
    /// are harmless twice) and the in-use flag is dropped.
    fn persist(
        &mut self,
        rec: &mut DeviceRecord,
        set: &RoaringBitmap,
        taken: &RoaringBitmap,
    ) -> Result<(), TrackError> {
        let dev = dev_of(rec);
        let saved = self.store.save_pending(dev, set).and_then(|()| {
            for (id, _) in self.store.targets_of(dev)? {
                let mut t = self.store.target_set(&id, Set::Pending)?;
                t |= taken;
                self.store.save_target_set(&id, Set::Pending, &t)?;
            }
            Ok(())
        });
        if let Err(e) = saved {
            self.tracker.reclaim(dev, taken)?;
            rec.draining = false;
            let _ = self.store.save_record(dev, rec);
            return Err(e.into());
        }
        Ok(())
    }

    /// Follows `device` if its size changed since it was tracked (a grown
    /// volume, a loop device's file extended): tracks it at its new size
    /// with no gap, keeps what the old bitmap held, and marks the space it
    /// gained (from the chunk the old end fell in) dirty. Bracketed by the
    /// in-use flag like a drain: the old bits exist only here meanwhile.
    /// Returns a reason to resync if the partition moved or the old bitmap
    /// lost marks.
    fn follow_resize(
        &mut self,
        rec: &mut DeviceRecord,
        device: BlockDevice,
    ) -> Result<Option<String>, TrackError> {
        let dev = dev_of(rec);
        if device.nr_sectors == rec.nr_sectors && device.start_sector == rec.start_sector {
            return Ok(None);
        }
        // A partition that starts elsewhere holds data its bits never saw.
        let moved = (device.start_sector != rec.start_sector).then(|| {
            format!(
                "the partition moved (start sector {}, now {})",
                rec.start_sector, device.start_sector
            )
        });
        let chunk = ChunkSize::from_bytes(rec.chunk_size).unwrap_or(ChunkSize::DEFAULT);
        let (was, now) = (rec.nr_sectors * 512, device.size_bytes());
        let start_sector = device.start_sector;
        rec.draining = true;
        self.store.save_record(dev, rec)?;
        let resized = match self.tracker.resize(&TrackSpec { device, chunk }) {
            Ok(r) => r,
            Err(e) => {
                // Tracking stays at the old size (or was cut mid-move, which
                // the in-use flag left set reports): either way its bits no
                // longer cover the device, and every sync compares checksums
                // until the device is tracked again.
                return Ok(Some(format!(
                    "the device is now {} and tracking cannot follow: {e} (after `ferry \
                     track remove`)",
                    crate::human(now)
                )));
            }
        };
        let mut taken = resized.bits;
        if now > was {
            taken.insert_range(
                u32::try_from(was / chunk.bytes()).unwrap_or(u32::MAX)
                    ..u32::try_from(now.div_ceil(chunk.bytes())).unwrap_or(u32::MAX),
            );
        }
        let mut set = self.store.pending(dev)?;
        set |= &taken;
        self.persist(rec, &set, &taken)?;
        let lost = moved.or_else(|| {
            (resized.overflows > rec.overflows_seen).then(|| {
                let n = resized.overflows - rec.overflows_seen;
                format!("overflow ({n} marks could not be recorded)")
            })
        });
        if now != was {
            tracing::info!(
                "{}: size changed from {} to {}; tracking follows{}",
                rec.path.display(),
                crate::human(was),
                crate::human(now),
                if now > was {
                    ", and the next sync ships the new space"
                } else {
                    ""
                },
            );
        }
        rec.nr_sectors = now / 512;
        rec.start_sector = start_sector;
        rec.overflows_seen = 0;
        rec.draining = false;
        self.store.save_record(dev, rec)?;
        Ok(lost)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The record of a tracked device.
    pub fn record(&mut self, path: &Path) -> Result<DeviceRecord, TrackError> {
        self.find(path)
    }

    /// The device's source identity, made now for records from before
    /// identities existed.
    pub fn source_id(&mut self, rec: &mut DeviceRecord) -> Result<String, TrackError> {
        if let Some(id) = &rec.source_id {
            return Ok(id.clone());
        }
        let id = uuid::Uuid::new_v4().to_string();
        rec.source_id = Some(id.clone());
        self.store.save_record(dev_of(rec), rec)?;
        Ok(id)
    }

    fn find(&mut self, path: &Path) -> Result<DeviceRecord, TrackError> {
        let not_tracked = || TrackError::NotTracked {
            path: path.to_owned(),
        };
        self.follow_renumbered()?;
        match BlockDevice::resolve(path) {
            // A record under this number whose device had another name is
            // not this device's: the number was handed to another device.
            Ok(device) => self
                .store
                .record(device.dev)?
                .filter(|r| r.path == device.path)
                .ok_or_else(not_tracked),
            // The device may be gone (a detached loop device): find it by
            // the path it was added under, so it can still be removed.
            Err(DeviceError::NotFound { .. }) => self
                .store
                .records()?
                .into_iter()
                .find(|r| r.path == path)
                .ok_or_else(not_tracked),
            Err(e) => Err(e.into()),
        }
    }

    /// Follows tracked partitions the kernel now knows under another device
    /// number (deleted and added again, as `partx -u` or a partition editor
    /// does when a partition moves): same name, same disk, a number no record
    /// holds. Each is tracked under its new number as the same source, and
    /// its targets compare checksums at their next sync: its bits counted
    /// writes to the sectors it had, which it may no longer have. One whose
    /// targets have a job running is left for a later command.
    fn follow_renumbered(&mut self) -> Result<(), TrackError> {
        for rec in self.store.records()? {
            let Ok(device) = BlockDevice::resolve(&rec.path) else {
                continue;
            };
            let was = dev_of(&rec);
            if device.dev == was
                || device.disk.to_string() != rec.disk
                || self.store.record(device.dev)?.is_some()
            {
                continue;
            }
            match self.renumber(&rec, &device) {
                Err(TrackError::TargetBusy { url }) => tracing::warn!(
                    "{} is now device {}, but a sync to {url} is running; tracking follows it \
                     at a later command",
                    rec.path.display(),
                    device.dev
                ),
                other => other?,
            }
        }
        Ok(())
    }

    /// Moves `rec` to `device`'s number. Crash-safe in this order: the new
    /// number's target records and identity (an intent) first, then the old
    /// record goes, then the device is tracked under its new number; a crash
    /// before the old record goes repeats the move, and one after it leaves
    /// the intent, which the next sync offers as the identity.
    fn renumber(&mut self, rec: &DeviceRecord, device: &BlockDevice) -> Result<(), TrackError> {
        let was = dev_of(rec);
        let mut reason = format!(
            "the partition was deleted and added again (device {was}, now {}",
            device.dev
        );
        if device.start_sector != rec.start_sector {
            reason += &format!(
                "; start sector {}, now {}",
                rec.start_sector, device.start_sector
            );
        }
        reason.push(')');
        let targets = self.store.targets_of(was)?;
        let locks = targets
            .iter()
            .map(|(id, t)| self.lock_target(id, &t.url))
            .collect::<Result<Vec<_>, _>>()?;
        for (_, t) in &targets {
            let moved = TargetRecord {
                dev: device.dev.to_string(),
                needs_resync: Some(t.needs_resync.clone().unwrap_or_else(|| reason.clone())),
                ..t.clone()
            };
            self.store
                .save_target(&target_id(device.dev, &t.url), &moved)?;
        }
        let source_id = rec
            .source_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.store.save_intent(
            device.dev,
            &Intent {
                source_id: source_id.clone(),
                diskseq: device.diskseq,
            },
        )?;
        self.forget(was)?;
        drop(locks);
        let chunk = ChunkSize::from_bytes(rec.chunk_size).unwrap_or(ChunkSize::DEFAULT);
        self.add_as(&device.path, chunk, source_id)?;
        if targets.is_empty() {
            // No target to hand the reason to: the device keeps it.
            if let Some(mut now) = self.store.record(device.dev)? {
                now.needs_resync = Some(rec.needs_resync.clone().unwrap_or(reason.clone()));
                self.store.save_record(device.dev, &now)?;
            }
        }
        tracing::info!(
            "{}: {reason}; tracking follows it, and its next sync compares checksums",
            rec.path.display()
        );
        Ok(())
    }

    /// Checks that the device's bits can still be trusted; records why not
    /// otherwise, and re-arms tracking where the kernel lost it.
    fn reconcile(&mut self, rec: &mut DeviceRecord) -> Result<State, TrackError> {
        let dev = dev_of(rec);
        let epoch = self.tracker.epoch()?;
        let slot = self.tracker.list()?.into_iter().find(|s| s.dev == dev);
        let mut reason = rec.needs_resync.clone();
        if rec.draining {
            reason.get_or_insert_with(|| "interrupted-drain".to_owned());
            rec.draining = false;
        }
        let lost = !epoch.as_ref().is_some_and(|e| e.same_load(&rec.epoch)) || slot.is_none();
        if lost {
            reason.get_or_insert_with(|| "tracking-lost".to_owned());
        }
        if let Some(slot) = &slot {
            if !lost && slot.counters.overflows > rec.overflows_seen {
                let n = slot.counters.overflows - rec.overflows_seen;
                reason.get_or_insert_with(|| format!("overflow ({n} marks could not be recorded)"));
                rec.overflows_seen = slot.counters.overflows;
            }
        }
        if !lost {
            let missed = self.tracker.missed_runs()?;
            if missed > rec.missed_runs_seen {
                let n = missed - rec.missed_runs_seen;
                reason.get_or_insert_with(|| {
                    format!("missed marks ({n} tracker runs skipped by the kernel)")
                });
                rec.missed_runs_seen = missed;
            }
        }
        // The device as it is now, if the path still names it.
        let current = BlockDevice::resolve(&rec.path)
            .ok()
            .filter(|d| d.dev == dev);
        let seq_before = rec.diskseq;
        if let Some(r) = current.as_ref().and_then(|d| media_changed(rec, d)) {
            reason.get_or_insert(r);
        }
        if lost {
            self.rearm(rec)?;
        } else if let Some(r) = match current {
            Some(d) => self.follow_resize(rec, d)?,
            None => None,
        } {
            reason.get_or_insert(r);
        }
        // Each target resyncs on its own: hand the reason to every target,
        // and keep it on the device only while there is none.
        let mut targets = self.store.targets_of(dev)?;
        if let Some(r) = &reason {
            for (id, t) in &mut targets {
                if t.needs_resync.is_none() {
                    t.needs_resync = Some(r.clone());
                    self.store.save_target(id, t)?;
                }
            }
            if !targets.is_empty() {
                reason = None;
            }
        }
        if reason != rec.needs_resync || lost || rec.diskseq != seq_before {
            rec.needs_resync = reason;
            self.store.save_record(dev, rec)?;
        }
        if let Some(r) = &rec.needs_resync {
            return Ok(State::NeedsResync(r.clone()));
        }
        for (_, t) in targets {
            if let Some(r) = t.needs_resync {
                return Ok(State::NeedsResync(format!("{r} (target {})", t.url)));
            }
        }
        Ok(State::Tracking)
    }

    /// Tracks a device again after the kernel lost it (its bits are gone;
    /// the caller has already marked it `needs-resync`).
    fn rearm(&mut self, rec: &mut DeviceRecord) -> Result<(), TrackError> {
        let dev = dev_of(rec);
        let Ok(device) = BlockDevice::resolve(&rec.path) else {
            return Ok(()); // gone: nothing to track until it comes back
        };
        if device.dev != dev {
            return Ok(()); // the path now names another device
        }
        // A size change while untracked (a disk grown across a reboot) is
        // taken as it is: the pending resync covers the whole device.
        rec.nr_sectors = device.nr_sectors;
        rec.start_sector = device.start_sector;
        rec.diskseq = device.diskseq;
        let chunk = ChunkSize::from_bytes(rec.chunk_size).unwrap_or(ChunkSize::DEFAULT);
        let _ = self.tracker.remove(dev);
        rec.epoch = self.tracker.add(&TrackSpec { device, chunk })?;
        rec.overflows_seen = 0;
        rec.missed_runs_seen = self.tracker.missed_runs()?;
        Ok(())
    }

    fn report(&mut self, rec: &DeviceRecord) -> Result<DeviceReport, TrackError> {
        let mut rec = rec.clone();
        let state = self.reconcile(&mut rec)?;
        let dev = dev_of(&rec);
        let slot = self.tracker.list()?.into_iter().find(|s| s.dev == dev);
        let mut set = self.store.pending(dev)?;
        if slot.is_some() {
            set |= self.tracker.peek(dev)?;
        }
        let size = rec.nr_sectors * 512;
        let dirty_bytes = extents::total_bytes(&extents(&set, rec.chunk_size, size, u64::MAX));
        Ok(DeviceReport {
            device: rec.path.clone(),
            dev: rec.dev.clone(),
            size,
            chunk_size: rec.chunk_size,
            dirty_chunks: set.len(),
            dirty_bytes,
            state: state.name(),
            reason: state.reason().map(str::to_owned),
            counters: slot.as_ref().map(|s| s.counters).unwrap_or_default(),
            bitmap_bytes: slot.as_ref().map_or(0, |s| s.bitmap_bytes),
            epoch: rec.epoch.clone(),
        })
    }
}

/// Why the device's bits cannot describe what `device` holds now, if the
/// kernel says it holds other media than when they began to count (a loop
/// device detached and attached again, a disk swapped under the same
/// number): the writes that made the difference were never seen. Records
/// the new media sequence number; the caller saves the record.
fn media_changed(rec: &mut DeviceRecord, device: &BlockDevice) -> Option<String> {
    let now = device.diskseq?;
    match rec.diskseq.replace(now) {
        Some(was) if was != now => Some(format!(
            "other media in the device (disk sequence number {was}, now {now})"
        )),
        // Records from before media numbers were kept adopt this one.
        _ => None,
    }
}

fn dev_of(rec: &DeviceRecord) -> DevNum {
    let (major, minor) = rec.dev.split_once(':').unwrap_or(("0", "0"));
    DevNum {
        major: major.parse().unwrap_or(0),
        minor: minor.parse().unwrap_or(0),
    }
}

fn dirty_report(rec: &DeviceRecord, set: &RoaringBitmap, state: &State) -> DirtyReport {
    let ext = extents(set, rec.chunk_size, rec.nr_sectors * 512, u64::MAX);
    DirtyReport {
        device: rec.path.clone(),
        chunk_size: rec.chunk_size,
        dirty_bytes: extents::total_bytes(&ext),
        extents: ext.iter().map(|e| [e.offset, e.len]).collect(),
        state: state.name(),
        reason: state.reason().map(str::to_owned),
    }
}

fn wait_for_quiet(device: &BlockDevice) -> bool {
    let deadline = Instant::now() + QUIESCE_WAIT;
    loop {
        match device.writes_in_flight() {
            Some(0) | None => return true,
            Some(_) if Instant::now() >= deadline => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
