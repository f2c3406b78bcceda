//! `ferry sync`: one job that brings a target image up to date with a
//! tracked source device.
//!
//! ```text
//! connect, handshake (on a thread)  ║ an expected incremental meanwhile:
//!                                   ║ lock the target, drain, freeze,
//!                                   ║ start reading (bounded by the memory cap)
//!   ─▶ otherwise: track the device if new, lock the target
//!   ─▶ drain kernel bits into every target's pending set
//!   ─▶ pending → inflight (persisted)
//!   ─▶ choose: seed | incremental | checksum resync
//!   ─▶ read (io_uring) → zstd → frames → agent
//!   ─▶ record "committing g+1" ─▶ Commit g+1 ─▶ Ack ─▶ record g+1, clear inflight
//! ```
//!
//! The login is most of a short job, so a job this host expects to be an
//! incremental (the target is known, seeded and owes no resync) does its
//! local work while it connects. A job that is not what was expected stops
//! reading and goes on as the target says; a refused one leaves the frozen
//! chunks in the inflight set for the next job. Other jobs change nothing
//! here until the target has accepted the session.
//!
//! The state lock is held only around the short updates, so other ferry
//! commands are not held up by a long transfer. A job over several disks
//! ([`run_all`]) runs these steps per disk, with one convergence and one
//! instant for all of them when it ends with a boot point.
//!
//! Invariants:
//! - **Clear only after acknowledgement.** The chunks a job ships sit in the
//!   target's persisted `inflight` set until the agent acknowledges the
//!   commit, which it sends only after fsync. A job killed at any point
//!   leaves them there and the next job ships them again.
//! - **Never trust a bitmap that may have gaps.** A device or target in
//!   `needs-resync`, a target image of another source, or a target at a
//!   generation this source never committed gets a checksum resync.
//! - **Tracking starts before the seed reads.** Writes made during a seed
//!   are in the kernel bitmap and go with the next job.

pub mod bootpoint;
mod compare;
pub mod manage;
mod progress;
pub mod session;
pub mod verify;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use roaring::RoaringBitmap;
use serde::Serialize;

use crate::{
    device::{BlockDevice, DevNum},
    dirty::{
        extents::{extents, total_bytes},
        store::{Intent, Store, StoreError},
        targets::{target_id, Set, TargetLock, TargetRecord},
    },
    pipeline::{self, Payload, Piece, Pipeline, PipelineConfig, PipelineError, PipelineStats},
    protocol::{self, ErrorCode, Hello, Message, ProtocolError, Welcome},
    throttle::RateLimiter,
    track::{TrackError, Tracking},
    tracker::{ChunkSize, Tracker},
    transport::{self, ConnectOptions, TargetUrl, TransportError},
};
use progress::Progress;
use session::Session;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Track(#[from] TrackError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("another ferry sync to {target} is running")]
    Busy { target: String },
    #[error("{peer} refused: {code}: {message}{}", refusal_hint(*.code))]
    Refused {
        peer: String,
        code: ErrorCode,
        message: String,
    },
    #[error("bad reply from {peer}")]
    Protocol {
        peer: String,
        #[source]
        source: ProtocolError,
    },
    #[error("{peer} sent {got} where {wanted} was expected")]
    Unexpected {
        peer: String,
        wanted: &'static str,
        got: String,
    },
    #[error("reading the source failed")]
    Pipeline(#[from] PipelineError),
    #[error("source: {op} at offset {offset} failed")]
    Source {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the target image is {image} bytes, smaller than the source ({source_size} bytes){}",
        refusal_hint(ErrorCode::ImageTooSmall)
    )]
    ImageTooSmall { image: u64, source_size: u64 },
    #[error("device too large for its chunk size (more than 2^32 chunks)")]
    TooLarge,
    #[error(
        "boot point {name} not taken on every disk: {source}; the data is committed, and \
         {}",
        if .stuck.is_empty() {
            "the disks that had taken it had it deleted again, so no disk has it".to_owned()
        } else {
            format!("it could not be deleted again from {}: delete it there with \
                     `ferry boot-points delete`", .stuck.join(", "))
        }
    )]
    BootPointPartial {
        name: String,
        /// Targets that keep the boot point: deleting it again failed.
        stuck: Vec<String>,
        source: Box<SyncError>,
    },
}

/// What to do about a refusal, where there is something to say.
fn refusal_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::SourceMismatch => {
            " (if this device should own the image now, for example after `ferry track \
             remove` and tracking it again, run `ferry sync --force-new-source`: it \
             compares checksums and ships only what differs)"
        }
        ErrorCode::ImageTooSmall => {
            " (if the source disk grew: ferry grows raw and qcow2 images by itself, but \
             only from the size this source last left them at; a VMDK or VHDX image cannot \
             grow: move it away and sync again to seed a new one. The changes wait on this \
             host until then)"
        }
        _ => "",
    }
}

/// What one job does, from the command line.
pub struct SyncOptions {
    pub device: PathBuf,
    pub target: TargetUrl,
    pub state_dir: PathBuf,
    /// Chunk size when `sync` has to start tracking the device; `None`
    /// for the default.
    pub chunk: Option<ChunkSize>,
    /// Force a checksum resync.
    pub resync: bool,
    /// Let this source take over an image another source wrote.
    pub force_new_source: bool,
    pub connect: ConnectOptions,
    pub pipeline: PipelineConfig,
    /// Wire bytes per second; 0 = unlimited.
    pub bwlimit: u64,
    /// Draw a progress bar (a terminal); otherwise log progress lines.
    pub progress_bar: bool,
    /// End with a boot point (`--boot-point`).
    pub boot_point: Option<bootpoint::BootPointOptions>,
}

/// How the job brought the target up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// First full copy (all-zero chunks skipped).
    Seed,
    /// Only the chunks the tracker drained.
    Incremental,
    /// Compared checksums of both sides and shipped what differed.
    Resync,
}

/// The job's final report (`--json` prints it as is).
#[derive(Clone, Debug, Serialize)]
pub struct SyncSummary {
    pub device: PathBuf,
    pub target: String,
    pub mode: Mode,
    pub resync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_reason: Option<String>,
    /// Bytes of the device the job covered (dirty extents, or the whole
    /// device for a seed).
    pub changed_bytes: u64,
    /// Bytes a resync found different (resync only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differing_bytes: Option<u64>,
    /// Bytes written to the link (frames, after compression).
    pub sent_bytes: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes of all-zero chunks sent as zero records.
    pub zero_bytes: u64,
    /// Non-zero bytes shipped, before compression.
    pub data_bytes: u64,
    /// `data_bytes` over the bytes of their payloads.
    pub compression_ratio: f64,
    pub duration_secs: f64,
    /// `changed_bytes` per second.
    pub throughput_bytes_per_sec: f64,
    /// The generation the target acknowledged.
    pub generation: u64,
    /// The boot point taken at the end (`--boot-point`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_point: Option<bootpoint::BootPointSummary>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs one job. `open` gives access to tracking state; it is called only
/// for short updates, so other ferry commands are not held up by a long
/// transfer.
pub fn run<T: Tracker>(
    opts: &SyncOptions,
    open: impl FnMut() -> Result<Tracking<T>, SyncError>,
) -> Result<SyncSummary, SyncError> {
    let mut all = run_all(std::slice::from_ref(opts), open)?;
    Ok(all.remove(0))
}

/// Runs one job over several disks of a server, each to its own target.
/// Each disk is brought up to date as [`run`] describes, one after the
/// other; with a boot point (the first disk's `boot_point` options), the
/// convergence rounds and the instant cover every disk: one freeze of every
/// filesystem on any of them, and one name for every disk's boot point.
/// Each disk commits on its own, so a job that fails on one disk loses
/// nothing on any (each keeps its inflight set until acknowledged); boot
/// points are asked for only once every disk has committed.
pub fn run_all<T: Tracker>(
    jobs: &[SyncOptions],
    mut open: impl FnMut() -> Result<Tracking<T>, SyncError>,
) -> Result<Vec<SyncSummary>, SyncError> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let mut progress = Progress::new(first.progress_bar);
    let mut disks = Vec::with_capacity(jobs.len());
    for opts in jobs {
        if jobs.len() > 1 {
            progress.note(&format!("{} -> {}", opts.device.display(), opts.target));
        }
        disks.push(Disk::start(opts, &mut open, &mut progress)?);
    }

    // 5b. Rounds until the rest is small, then one instant for a boot point.
    let converged = match &first.boot_point {
        Some(bp) => {
            let ids: Vec<String> = disks.iter().map(|d| d.id.clone()).collect();
            let mut take = |i: usize| take_more(&mut open, &jobs[i].device, &ids[i]);
            let mut members: Vec<_> = disks
                .iter_mut()
                .map(|d| bootpoint::Member {
                    source: &d.source,
                    session: &mut d.session,
                })
                .collect();
            let out = bootpoint::converge(bp, &mut members, &mut take, &mut progress)?;
            for (i, d) in disks.iter_mut().enumerate() {
                d.stats.add(&out.stats[i]);
                d.changed_bytes += out.rounds_bytes(i);
            }
            Some((out, bp))
        }
        None => None,
    };

    // 6, 7. Every disk commits.
    let mut generations = Vec::with_capacity(disks.len());
    for d in &mut disks {
        generations.push(d.commit(&mut progress)?);
    }

    // 8. The boot points, of exactly what was just committed.
    let boot_points: Vec<Option<bootpoint::BootPointSummary>> = match converged {
        Some((out, bp)) => {
            let mut sessions: Vec<(&str, &mut Session)> = disks
                .iter_mut()
                .map(|d| (d.url.as_str(), &mut d.session))
                .collect();
            bootpoint::take(out, bp, &mut sessions, &mut progress)?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => vec![None; disks.len()],
    };
    let mut summaries = Vec::with_capacity(disks.len());
    for ((d, generation), boot_point) in disks.into_iter().zip(generations).zip(boot_points) {
        summaries.push(d.finish(generation, boot_point)?);
    }
    progress.finish();
    Ok(summaries)
}

/// One disk of a job between its start and its commit.
struct Disk<'o> {
    opts: &'o SyncOptions,
    started: Instant,
    url: String,
    device: BlockDevice,
    /// The target's id in the state directory.
    id: String,
    target: TargetRecord,
    /// The generation the agent said the image holds.
    welcome_generation: u64,
    session: Session,
    source: Source,
    mode: Mode,
    reason: Option<String>,
    differing_bytes: Option<u64>,
    changed_bytes: u64,
    stats: PipelineStats,
    /// Held until the job ends: one job per target at a time.
    _lock: TargetLock,
}

impl<'o> Disk<'o> {
    /// Connects, makes sure the device is tracked, decides how to bring the
    /// target up to date, and ships that.
    fn start<T: Tracker>(
        opts: &'o SyncOptions,
        open: &mut impl FnMut() -> Result<Tracking<T>, SyncError>,
        progress: &mut Progress,
    ) -> Result<Self, SyncError> {
        let started = Instant::now();
        let url = opts.target.to_string();
        // 1. Where things stand here.
        let device = BlockDevice::resolve(&opts.device).map_err(TrackError::from)?;
        let dev = device.dev;
        let id = target_id(dev, &url);
        let (known, target, source_id, intent) = {
            let mut tracking = open()?;
            let known = match tracking.record(&opts.device) {
                Ok(rec) => Some(rec),
                Err(TrackError::NotTracked { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let target = tracking.store().target(&id)?;
            let (source_id, intent) = match known.as_ref().and_then(|r| r.source_id.clone()) {
                Some(id) => (id, None),
                None => intended_source(tracking.store(), &device)?,
            };
            (known, target, source_id, intent)
        };
        let asked = opts.chunk.unwrap_or(ChunkSize::DEFAULT);
        let chunk = known.as_ref().map_or(asked.bytes(), |r| r.chunk_size);
        if opts.chunk.is_some() && chunk != asked.bytes() {
            tracing::warn!(
                "{} is already tracked in {} chunks; --chunk-size {asked} applies only when \
                 sync starts tracking (to change it: ferry track remove, then sync \
                 --chunk-size {asked} --force-new-source, which compares checksums)",
                opts.device.display(),
                ChunkSize::from_bytes(chunk).map_or(format!("{chunk}-byte"), |c| c.to_string()),
            );
        }
        let size = device.size_bytes();
        let nchunks = size.div_ceil(chunk);
        if nchunks > u64::from(u32::MAX) {
            return Err(SyncError::TooLarge);
        }

        // 2. Connect on a thread: the login is most of a short job, so this
        //    host gets ready meanwhile (below).
        let hello = Hello {
            version: protocol::VERSION,
            source_id: parse_uuid(&source_id),
            device_size: size,
            chunk_size: chunk as u32,
            image: opts.target.image.clone(),
            force_new_source: opts.force_new_source,
            read_only: false,
            manage: false,
            format: format_code(&opts.target),
        };
        // A target this host knows as seeded, with nothing asking for a
        // resync, is most likely due an incremental: take the job's lock
        // before connecting (a busy target costs no login), then freeze the
        // dirty set and start reading it while the login runs.
        let expect_incremental = !opts.resync
            && known.is_some()
            && target
                .as_ref()
                .is_some_and(|t| t.seeded && t.needs_resync.is_none());
        let early_lock = if expect_incremental {
            Some(lock_target(&open()?, &id, &url)?)
        } else {
            None
        };
        let wire = (opts.bwlimit > 0).then(|| Arc::new(RateLimiter::new(opts.bwlimit)));
        let connecting = {
            let (target_url, connect) = (opts.target.clone(), opts.connect.clone());
            std::thread::Builder::new()
                .name("ferry-connect".into())
                .spawn(move || -> Result<(Session, Welcome), SyncError> {
                    let link = transport::connect(&target_url, &connect)?;
                    let mut session = Session::new(link, wire);
                    let welcome = session.handshake(hello)?;
                    Ok((session, welcome))
                })
                .map_err(|source| TransportError::Io {
                    op: "start the connecting thread",
                    source,
                })?
        };
        let source = Source {
            path: device.path.clone(),
            size,
            chunk,
            pipeline: opts.pipeline.clone(),
        };
        let ahead =
            early_lock.map(|lock| Ahead::prepare(open, opts, &id, &source_id, lock, &source));
        let (mut session, welcome) = connecting.join().map_err(|_| TransportError::Io {
            op: "connect",
            source: std::io::Error::other("the connecting thread panicked"),
        })??;
        let ahead = ahead.transpose()?.flatten();
        // The target accepted the identity and may have recorded it: keep
        // it until the device is tracked (a refused job leaves nothing).
        if let Some(intent) = &intent {
            open()?.store().save_intent(dev, intent)?;
        }
        if welcome.image_size < size {
            return Err(SyncError::ImageTooSmall {
                image: welcome.image_size,
                source_size: size,
            });
        }

        // 3. Tracking before anything is read, so no write from here on is
        //    missed; then drain into every target's pending set and freeze
        //    ours (done above when an incremental was expected).
        let (lock, frozen, target, mut early_pipe) = match ahead {
            Some(a) => (a.lock, a.frozen, a.target, Some(a.pipe)),
            None => {
                let (lock, frozen, target) =
                    track_and_freeze(open, opts, &id, &source_id, dev, chunk, target)?;
                (lock, frozen, target, None)
            }
        };

        let ours = Some(parse_uuid(&source_id));
        let known_generation = welcome.generation == target.generation
            || Some(welcome.generation) == target.committing;
        let reason = if opts.resync {
            Some("requested with --resync".to_owned())
        } else if !target.seeded && welcome.generation == 0 && welcome.created {
            None // a seed into a new image
        } else if !target.seeded && welcome.generation == 0 {
            // A seed cut short, a copy made some other way, or an image
            // taken over: what already matches is not sent again.
            Some("the image already holds data that this source did not commit".to_owned())
        } else if !target.seeded {
            Some(format!(
                "the image already holds generation {} of this source",
                welcome.generation
            ))
        } else if let Some(r) = &target.needs_resync {
            Some(r.clone())
        } else if welcome.source_id != ours {
            Some("the image was taken over from another source".to_owned())
        } else if welcome.altered {
            Some(format!(
                "something other than ferry wrote to the image after generation {} (a VM \
                 booted on it, a read-write mount?)",
                target.generation
            ))
        } else if !known_generation {
            Some(format!(
                "the target is at generation {}, this source last committed {}",
                welcome.generation, target.generation
            ))
        } else {
            None
        };
        let mode = match (&reason, target.seeded) {
            (Some(_), _) => Mode::Resync,
            (None, false) => Mode::Seed,
            (None, true) => Mode::Incremental,
        };
        if let Some(r) = &reason {
            progress.note(&format!("checksum resync of {url}: {r}"));
        }
        if mode != Mode::Incremental {
            // Not the job expected: stop reading ahead and free its memory.
            early_pipe = None;
        }

        // 4. Decide what to ship.
        let mut ship = frozen.clone();
        let mut differing_bytes = None;
        match mode {
            Mode::Seed => {
                ship.insert_range(0..nchunks as u32);
            }
            Mode::Incremental => {}
            Mode::Resync => {
                let file = crate::sys::uring::open_direct(&device.path).map_err(|source| {
                    SyncError::Open {
                        path: device.path.clone(),
                        source,
                    }
                })?;
                progress.phase("comparing checksums", size);
                let differ =
                    compare::differing_chunks(&mut session, &file, size, chunk as u32, |d| {
                        progress.set(d)
                    })?;
                differing_bytes = Some(total_bytes(&extents(&differ, chunk, size, u64::MAX)));
                ship |= differ;
                // What differs is owed to the target from now on: a job cut
                // short after this point must not forget it, even when the
                // next job is an incremental (a resync asked for with --resync).
                let store = Store::open(&opts.state_dir)?;
                let mut inflight = store.target_set(&id, Set::Inflight)?;
                inflight |= &ship;
                store.save_target_set(&id, Set::Inflight, &inflight)?;
            }
        }
        let plan = source.plan(&ship);
        let changed_bytes = total_bytes(&plan);

        // 5. Ship.
        progress.phase(
            match mode {
                Mode::Seed => "seeding",
                Mode::Incremental => "shipping changes",
                Mode::Resync => "shipping differences",
            },
            changed_bytes,
        );
        let pipe = match early_pipe {
            // Read from the same frozen set as `plan`.
            Some(pipe) => pipe,
            None => source.start(plan)?,
        };
        let stats = source.send(&mut session, pipe, progress)?;

        Ok(Self {
            opts,
            started,
            url,
            device,
            id,
            target,
            welcome_generation: welcome.generation,
            session,
            source,
            mode,
            reason,
            differing_bytes,
            changed_bytes,
            stats,
            _lock: lock,
        })
    }

    /// Commits what was shipped and, once acknowledged, forgets it; returns
    /// the generation. Recorded as under way first, so a job killed before
    /// the acknowledgement is recorded knows the target may be one ahead.
    fn commit(&mut self, progress: &mut Progress) -> Result<u64, SyncError> {
        let generation = self.target.generation.max(self.welcome_generation) + 1;
        let (id, target, session) = (&self.id, &mut self.target, &mut self.session);
        {
            let store = Store::open(&self.opts.state_dir)?;
            target.committing = Some(generation);
            store.save_target(id, target)?;
        }
        progress.phase("committing", 0);
        session.send(&Message::Commit { generation })?;
        match session.recv()? {
            Message::Ack { generation: g, .. } if g == generation => {}
            other => {
                return Err(SyncError::Unexpected {
                    peer: session.peer.clone(),
                    wanted: "Ack of the commit",
                    got: if matches!(other, Message::Ack { .. }) {
                        "Ack of another generation"
                    } else {
                        "another reply"
                    }
                    .into(),
                })
            }
        }

        // Acknowledged: only now forget what was shipped.
        let store = Store::open(&self.opts.state_dir)?;
        let mut fresh = store.target(id)?.unwrap_or(target.clone());
        fresh.generation = generation;
        fresh.committing = None;
        fresh.seeded = true;
        fresh.last_sync = Some(now_secs());
        // A reason that arrived while the job ran (a drain found tracking
        // lost) still stands; the one this job resolved does not.
        if fresh.needs_resync == target.needs_resync || self.mode == Mode::Seed {
            fresh.needs_resync = None;
        }
        store.save_target(id, &fresh)?;
        store.save_target_set(id, Set::Inflight, &RoaringBitmap::new())?;
        Ok(generation)
    }

    /// Closes the session; the disk's report.
    fn finish(
        self,
        generation: u64,
        boot_point: Option<bootpoint::BootPointSummary>,
    ) -> Result<SyncSummary, SyncError> {
        let sent_bytes = self.session.bytes_sent;
        self.session.close()?;
        let secs = self.started.elapsed().as_secs_f64();
        let (stats, changed_bytes) = (self.stats, self.changed_bytes);
        Ok(SyncSummary {
            device: self.device.path,
            target: self.url,
            mode: self.mode,
            resync: self.mode == Mode::Resync,
            resync_reason: self.reason,
            changed_bytes,
            differing_bytes: self.differing_bytes,
            sent_bytes,
            read_bytes: stats.bytes_read,
            zero_bytes: stats.zero_bytes,
            data_bytes: stats.data_bytes,
            compression_ratio: if stats.payload_bytes == 0 {
                1.0
            } else {
                stats.data_bytes as f64 / stats.payload_bytes as f64
            },
            duration_secs: secs,
            throughput_bytes_per_sec: if secs > 0.0 {
                changed_bytes as f64 / secs
            } else {
                0.0
            },
            generation,
            boot_point,
        })
    }
}

/// For a job that did not freeze its dirty set while connecting: makes
/// sure the device is tracked (tracking it now if it is new, so the seed
/// misses no write), takes the target's job lock and record, and freezes
/// the dirty set. Returns the lock, the frozen set and the target record.
/// The identity to offer for a device not tracked yet: the one a job that
/// failed before tracking it offered already (its target may hold it now),
/// while the device holds the same media; otherwise a new one, with the
/// intent to keep once a target accepts it.
fn intended_source(
    store: &Store,
    device: &BlockDevice,
) -> Result<(String, Option<Intent>), SyncError> {
    if let Some(intent) = store.intent(device.dev)? {
        if intent.diskseq == device.diskseq {
            return Ok((intent.source_id, None));
        }
    }
    let source_id = uuid::Uuid::new_v4().to_string();
    let intent = Intent {
        source_id: source_id.clone(),
        diskseq: device.diskseq,
    };
    Ok((source_id, Some(intent)))
}

fn track_and_freeze<T: Tracker>(
    open: &mut impl FnMut() -> Result<Tracking<T>, SyncError>,
    opts: &SyncOptions,
    id: &str,
    source_id: &str,
    dev: DevNum,
    chunk: u64,
    mut target: Option<TargetRecord>,
) -> Result<(TargetLock, RoaringBitmap, TargetRecord), SyncError> {
    let url = opts.target.to_string();
    let mut tracking = open()?;
    let mut rec = match tracking.record(&opts.device) {
        Ok(rec) => rec,
        Err(TrackError::NotTracked { .. }) => {
            let asked = opts.chunk.unwrap_or(ChunkSize::DEFAULT);
            let r = tracking.add_as(&opts.device, asked, source_id.to_owned())?;
            tracing::info!("started tracking {} (chunk {asked})", r.device.display());
            tracking.record(&opts.device)?
        }
        Err(e) => return Err(e.into()),
    };
    if tracking.source_id(&mut rec)? != source_id || rec.chunk_size != chunk {
        // Another command re-added the device while we connected.
        return Err(SyncError::Busy {
            target: url.clone(),
        });
    }
    let lock = lock_target(&tracking, id, &url)?;
    if target.is_none() {
        let t = TargetRecord {
            url: url.clone(),
            dev: dev.to_string(),
            generation: 0,
            committing: None,
            seeded: false,
            needs_resync: None,
            last_sync: None,
        };
        tracking.store().save_target(id, &t)?;
    }
    let (_, frozen) = freeze_pending(&mut tracking, &opts.device, id)?;
    let target = tracking
        .store()
        .target(id)?
        .or(target.take())
        .expect("the target record was just saved");
    Ok((lock, frozen, target))
}

/// Takes the job lock of target `id`; another job holding it is `Busy`.
fn lock_target<T: Tracker>(
    tracking: &Tracking<T>,
    id: &str,
    url: &str,
) -> Result<TargetLock, SyncError> {
    tracking.store().lock_target(id).map_err(|e| match e {
        StoreError::Busy { .. } => SyncError::Busy { target: url.into() },
        e => e.into(),
    })
}

/// What this host readies while the login runs, for a job expected to be
/// an incremental: the target locked, its dirty set frozen (drained from
/// the kernel and moved to the persisted inflight set, as the job does
/// anyway), and the reader started on it. The memory cap bounds what is
/// read ahead. If the target turns out to want something else, the reader
/// is stopped and the frozen set is shipped by that job instead; if the
/// session is refused, the frozen set waits in the inflight set for the
/// next job. Either way nothing is lost.
struct Ahead {
    lock: TargetLock,
    frozen: RoaringBitmap,
    target: TargetRecord,
    pipe: Pipeline,
}

impl Ahead {
    /// `None` when the device's record changed since the job looked (the
    /// job then goes the ordinary way, which reports it).
    fn prepare<T: Tracker>(
        open: &mut impl FnMut() -> Result<Tracking<T>, SyncError>,
        opts: &SyncOptions,
        id: &str,
        source_id: &str,
        lock: TargetLock,
        source: &Source,
    ) -> Result<Option<Self>, SyncError> {
        let mut tracking = open()?;
        let rec = match tracking.record(&opts.device) {
            Ok(rec) => rec,
            Err(TrackError::NotTracked { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if rec.source_id.as_deref() != Some(source_id) || rec.chunk_size != source.chunk {
            return Ok(None);
        }
        let (_, frozen) = freeze_pending(&mut tracking, &opts.device, id)?;
        let Some(target) = tracking.store().target(id)? else {
            return Ok(None);
        };
        drop(tracking);
        let pipe = source.start(source.plan(&frozen))?;
        Ok(Some(Self {
            lock,
            frozen,
            target,
            pipe,
        }))
    }
}

/// The source device as the pipeline reads it.
pub(crate) struct Source {
    pub path: PathBuf,
    pub size: u64,
    pub chunk: u64,
    pub pipeline: PipelineConfig,
}

impl Source {
    /// Byte extents of a set of chunks, cut for reading.
    pub fn plan(&self, set: &RoaringBitmap) -> Vec<crate::dirty::Extent> {
        extents(set, self.chunk, self.size, u64::from(self.pipeline.max_io))
    }

    fn start(&self, plan: Vec<crate::dirty::Extent>) -> Result<Pipeline, SyncError> {
        let mut cfg = self.pipeline.clone();
        cfg.chunk_size = self.chunk;
        Ok(Pipeline::start(&self.path, self.size, plan, cfg)?)
    }

    /// Reads `plan` and sends it; each piece's memory is released once it is
    /// on the wire.
    pub fn ship(
        &self,
        session: &mut Session,
        plan: Vec<crate::dirty::Extent>,
        progress: &mut Progress,
    ) -> Result<PipelineStats, SyncError> {
        let pipe = self.start(plan)?;
        self.send(session, pipe, progress)
    }

    /// Sends what `pipe` reads, as it comes.
    fn send(
        &self,
        session: &mut Session,
        pipe: Pipeline,
        progress: &mut Progress,
    ) -> Result<PipelineStats, SyncError> {
        let mut done = 0;
        loop {
            if !pipe.ready() {
                // The reader is behind: what is gathered goes out meanwhile.
                session.flush()?;
            }
            let Some(piece) = pipe.recv() else { break };
            let piece = piece?;
            done += piece.raw_len();
            send_piece(session, piece)?;
            progress.set(done);
        }
        Ok(pipe.finish()?)
    }

    /// Reads `plan` into memory (for the instant of a boot point, while the
    /// source's filesystems are frozen).
    pub fn read_all(
        &self,
        plan: Vec<crate::dirty::Extent>,
    ) -> Result<(Vec<Piece>, PipelineStats), SyncError> {
        let pipe = self.start(plan)?;
        let mut pieces = Vec::new();
        while let Some(piece) = pipe.recv() {
            pieces.push(piece?);
        }
        Ok((pieces, pipe.finish()?))
    }
}

pub(crate) fn send_piece(session: &mut Session, piece: Piece) -> Result<(), SyncError> {
    match piece {
        Piece::Data {
            offset,
            raw_len,
            codec,
            data_hash,
            payload,
            permit,
        } => {
            let codec = match codec {
                pipeline::Codec::Raw => protocol::Codec::Raw,
                pipeline::Codec::Zstd => protocol::Codec::Zstd,
            };
            match payload {
                // The read ring's own buffer: spliced into the link, and
                // back to the ring once the peer has read it.
                Payload::Leased(lease) if codec == protocol::Codec::Raw => {
                    session.send_leased(offset, raw_len, data_hash, lease)?;
                }
                payload => session.send_data(&protocol::DataRef {
                    offset,
                    raw_len,
                    codec,
                    data_hash,
                    payload: &payload,
                })?,
            }
            drop(permit);
            Ok(())
        }
        Piece::Zero { offset, len } => session.send(&Message::Zero { offset, len }),
    }
}

/// Drains the kernel's bits into every target's pending set and moves this
/// target's into its inflight set; returns what was moved.
fn take_more<T: Tracker>(
    open: &mut impl FnMut() -> Result<Tracking<T>, SyncError>,
    device: &std::path::Path,
    id: &str,
) -> Result<RoaringBitmap, SyncError> {
    freeze_pending(&mut open()?, device, id).map(|(more, _)| more)
}

/// Drains the kernel's bits into every target's pending set, then moves
/// target `id`'s pending set into its inflight set (the successor becomes
/// part of the frozen set). Returns what was moved and the whole inflight set.
fn freeze_pending<T: Tracker>(
    tracking: &mut Tracking<T>,
    device: &std::path::Path,
    id: &str,
) -> Result<(RoaringBitmap, RoaringBitmap), SyncError> {
    tracking.drain_to_targets(device)?;
    let store = tracking.store();
    let more = store.target_set(id, Set::Pending)?;
    let mut inflight = store.target_set(id, Set::Inflight)?;
    inflight |= &more;
    store.save_target_set(id, Set::Inflight, &inflight)?;
    store.save_target_set(id, Set::Pending, &RoaringBitmap::new())?;
    Ok((more, inflight))
}

/// [`Hello::format`] for a target: its `?format=`, or 0 to let the agent
/// go by the image name.
pub fn format_code(target: &TargetUrl) -> u8 {
    target.format.map_or(0, |f| {
        protocol::FORMATS
            .iter()
            .position(|n| *n == f.name())
            .map_or(0, |i| i as u8 + 1)
    })
}

/// The 16 bytes of a hyphenated UUID (records always hold valid ones).
pub fn parse_uuid(s: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(s).map_or([0; 16], |u| *u.as_bytes())
}
