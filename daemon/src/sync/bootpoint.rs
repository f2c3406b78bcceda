//! `ferry sync --boot-point`: one instant of the source, committed and kept.
//!
//! There is no kernel snapshot on the source, so the instant comes from
//! pre-copy convergence, as live migration does it:
//!
//! 1. ship in rounds while writes go on, until what is left is under
//!    `--converge` or `--max-rounds` is reached;
//! 2. run `--pre-snapshot` (quiesce the application); if it fails, no boot
//!    point is taken, and the job still ships and commits;
//! 3. FIFREEZE every filesystem mounted from the device, drain, read the
//!    last dirty chunks into memory, FITHAW, run `--post-snapshot`;
//! 4. ship them, commit, and ask the agent for a boot point of exactly that
//!    commit.
//!
//! A job over several disks of one server (`--disk`) does each step for all
//! of them: a round ships every disk's chunks and converges on their total;
//! the freeze holds every filesystem on any of the disks at once, and every
//! disk is drained and read inside it; the boot points, asked for once every
//! disk has committed, share one name. So the disks' boot points are one
//! instant of the whole server, even for a filesystem or application that
//! spans disks.
//!
//! The freeze is held at most `--max-freeze`: a watchdog thaws at the
//! deadline, and the job then ships what it read as one more round and
//! tries again. Signals that end ferry thaw first ([`crate::sys::freeze`]).
//! Every chunk taken from the tracker is shipped before the commit, whatever
//! path the job takes, so nothing taken is ever dropped.
//!
//! A device with no mounted filesystem gets a crash-consistent boot point,
//! and the summary says so. Nothing holds its writers still: writes that
//! land while the last chunks are read can make it a mix of two instants, so
//! a pre-snapshot script should pause them.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use roaring::RoaringBitmap;
use serde::Serialize;

use super::{progress::Progress, send_piece, session::Session, Source, SyncError};
use crate::{
    device::DevNum,
    dirty::extents::total_bytes,
    image::boot_point_name,
    pipeline::PipelineStats,
    protocol::{Manage, ManageOp, Message},
    sys::freeze,
};

/// Environment variable of the freeze test hook: milliseconds to wait with
/// the filesystems frozen, so a test can signal ferry mid-freeze. Only tests
/// set it.
pub const HOLD_FREEZE_ENV: &str = "FERRY_TEST_HOLD_FREEZE_MS";

/// The freeze test hook ([`HOLD_FREEZE_ENV`]): says that the filesystems
/// are frozen, then waits.
fn hold_freeze_for_tests() {
    let Some(ms) = std::env::var(HOLD_FREEZE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    eprintln!("ferry: test hook: holding the freeze for {ms} ms");
    std::thread::sleep(Duration::from_millis(ms));
}

/// How to take the boot point.
#[derive(Clone, Debug)]
pub struct BootPointOptions {
    /// Keep at most this many; the two oldest are merged at the limit.
    pub max_boot_points: u16,
    pub pre_snapshot: Option<PathBuf>,
    pub post_snapshot: Option<PathBuf>,
    /// How long a script may run.
    pub script_timeout: Duration,
    /// Longest the source's filesystems stay frozen.
    pub max_freeze: Duration,
    /// Stop the rounds once a round has at most this many bytes to ship.
    pub converge_bytes: u64,
    /// Stop the rounds after this many, converged or not.
    pub max_rounds: u32,
    /// The source devices (every disk of the job), for their mounted
    /// filesystems.
    pub devs: Vec<DevNum>,
}

/// What the boot point part of a job did (`--json`: `boot_point`).
#[derive(Clone, Debug, Serialize)]
pub struct BootPointSummary {
    /// The boot point taken; absent when none was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `app-consistent` (filesystems frozen) or `crash-consistent`.
    pub kind: &'static str,
    /// Mount points that were frozen.
    pub frozen: Vec<PathBuf>,
    /// How long they stayed frozen, in milliseconds (the last freeze).
    pub freeze_ms: f64,
    /// Bytes shipped by each round after the first pass.
    pub rounds: Vec<u64>,
    /// A boot point merged away to stay within `--max-boot-points`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<String>,
    /// Why no boot point was taken, or what went differently.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One disk of the job, as convergence drives it.
pub(crate) struct Member<'a> {
    pub source: &'a Source,
    pub session: &'a mut Session,
}

/// Where convergence left the job, before the commits.
pub(crate) struct Converged {
    /// What each disk read, in the order of the members.
    pub stats: Vec<PipelineStats>,
    /// Bytes each disk shipped per round after the first pass.
    rounds: Vec<Vec<u64>>,
    take: bool,
    /// What the disks share: kind, freeze, note.
    summary: BootPointSummary,
}

/// What happened while the filesystems were (to be) frozen.
enum Outcome {
    FreezeFailed(String),
    Read(Result<Vec<Taken>, SyncError>),
}

/// One disk's chunks taken at the instant, and what reading them gave.
type Taken = (RoaringBitmap, (Vec<crate::pipeline::Piece>, PipelineStats));

/// Freeze attempts before giving up on an app-consistent boot point.
const FREEZE_ATTEMPTS: u32 = 3;

/// The job's disks and what convergence has done to them so far.
struct Rounds<'m, 'a> {
    members: &'m mut [Member<'a>],
    stats: Vec<PipelineStats>,
    rounds: Vec<Vec<u64>>,
}

impl Rounds<'_, '_> {
    /// Ships `sets[i]` to disk `i`; returns the bytes of the round.
    fn ship(&mut self, sets: &[RoaringBitmap], progress: &mut Progress) -> Result<u64, SyncError> {
        let mut total = 0;
        for (i, set) in sets.iter().enumerate() {
            let m = &mut self.members[i];
            let plan = m.source.plan(set);
            let bytes = total_bytes(&plan);
            progress.phase("converging", bytes);
            self.stats[i].add(&m.source.ship(m.session, plan, progress)?);
            self.rounds[i].push(bytes);
            total += bytes;
        }
        Ok(total)
    }

    fn done(self, take: bool, summary: BootPointSummary) -> Converged {
        Converged {
            stats: self.stats,
            rounds: self.rounds,
            take,
            summary,
        }
    }
}

/// Ships rounds until the rest is small, then ships the last chunks read at
/// one instant of every disk. `take(i)` drains the tracker and returns the
/// chunks taken for disk `i` (already in its target's inflight set).
pub(crate) fn converge(
    bp: &BootPointOptions,
    members: &mut [Member],
    take: &mut dyn FnMut(usize) -> Result<RoaringBitmap, SyncError>,
    progress: &mut Progress,
) -> Result<Converged, SyncError> {
    let n = members.len();
    let mut take_all = || (0..n).map(&mut *take).collect::<Result<Vec<_>, _>>();
    let mut job = Rounds {
        members,
        stats: vec![PipelineStats::default(); n],
        rounds: vec![Vec::new(); n],
    };
    // 1. Rounds.
    loop {
        let more = take_all()?;
        let bytes = job.ship(&more, progress)?;
        if bytes <= bp.converge_bytes || job.rounds[0].len() as u32 >= bp.max_rounds {
            break;
        }
    }
    let mut summary = BootPointSummary {
        name: None,
        kind: "crash-consistent",
        frozen: Vec::new(),
        freeze_ms: 0.0,
        rounds: Vec::new(),
        merged: None,
        note: None,
    };
    // 2. Quiesce the application.
    if let Some(pre) = &bp.pre_snapshot {
        if let Err(why) = run_script(pre, "pre", bp) {
            let more = take_all()?;
            job.ship(&more, progress)?;
            summary.note = Some(format!(
                "pre-snapshot script failed ({why}): no boot point taken; the changes were still shipped"
            ));
            progress.note(&format!(
                "ferry: warning: {}",
                summary.note.as_deref().unwrap_or("")
            ));
            return Ok(job.done(false, summary));
        }
    }
    let mut mounts = Vec::new();
    for dev in &bp.devs {
        mounts.extend(freeze::mounts_of(dev.major, dev.minor).unwrap_or_default());
    }
    mounts.sort();
    mounts.dedup();
    let read_all = |job: &Rounds, more: Vec<RoaringBitmap>| {
        more.into_iter()
            .enumerate()
            .map(|(i, set)| {
                let source = job.members[i].source;
                source.read_all(source.plan(&set)).map(|r| (set, r))
            })
            .collect::<Result<Vec<_>, SyncError>>()
    };
    let mut attempt = 0;
    // 3. The instant.
    let read = loop {
        attempt += 1;
        if mounts.is_empty() {
            summary.note = Some(if n == 1 {
                "no filesystem is mounted from the device".to_owned()
            } else {
                "no filesystem is mounted from the devices".to_owned()
            });
            let more = take_all()?;
            break read_all(&job, more)?;
        }
        let started = Instant::now();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let max = bp.max_freeze;
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(max).is_err() {
                freeze::thaw_all();
            }
        });
        let mut froze = Ok(());
        for m in &mounts {
            if let Err(e) = freeze::freeze(m) {
                froze = Err(format!("cannot freeze {}: {e}", m.display()));
                break;
            }
        }
        if froze.is_ok() {
            hold_freeze_for_tests();
        }
        let outcome = match froze {
            Err(why) => Outcome::FreezeFailed(why),
            Ok(()) => Outcome::Read(take_all().and_then(|more| read_all(&job, more))),
        };
        let held = started.elapsed();
        let still_frozen = freeze::any_frozen();
        for (point, e) in freeze::thaw_all() {
            progress.note(&format!(
                "ferry: warning: cannot thaw {}: {e}",
                point.display()
            ));
        }
        let _ = done_tx.send(());
        let _ = watchdog.join();
        summary.freeze_ms = held.as_secs_f64() * 1000.0;
        if let Some(post) = &bp.post_snapshot {
            if let Err(why) = run_script(post, "post", bp) {
                progress.note(&format!(
                    "ferry: warning: post-snapshot script failed ({why})"
                ));
                summary.note = Some(format!("post-snapshot script failed ({why})"));
            }
        }
        match outcome {
            Outcome::FreezeFailed(why) => {
                summary.note = Some(format!("{why}; the boot point is crash-consistent"));
                let more = take_all()?;
                break read_all(&job, more)?;
            }
            Outcome::Read(Err(e)) => return Err(e),
            Outcome::Read(Ok(read)) => {
                if still_frozen && held <= bp.max_freeze {
                    summary.kind = "app-consistent";
                    summary.frozen = mounts.clone();
                    break read;
                }
                // Held too long: what was taken goes as one more round.
                let more: Vec<RoaringBitmap> = read.into_iter().map(|(set, _)| set).collect();
                job.ship(&more, progress)?;
                if attempt >= FREEZE_ATTEMPTS {
                    summary.note = Some(format!(
                        "the last chunks could not be read within --max-freeze {:?} in {attempt} \
                         tries: no boot point taken",
                        bp.max_freeze
                    ));
                    return Ok(job.done(false, summary));
                }
            }
        }
    };
    for (i, (_, (pieces, st))) in read.into_iter().enumerate() {
        job.stats[i].add(&st);
        job.rounds[i].push(pieces.iter().map(|p| p.raw_len()).sum());
        for piece in pieces {
            send_piece(job.members[i].session, piece)?;
        }
    }
    Ok(job.done(true, summary))
}

impl Converged {
    /// Bytes the rounds covered on disk `i`.
    pub fn rounds_bytes(&self, i: usize) -> u64 {
        self.rounds[i].iter().sum()
    }
}

/// After every disk's commit: asks each agent for the boot point, under one
/// name. Returns each disk's summary.
pub(crate) fn take(
    out: Converged,
    bp: &BootPointOptions,
    sessions: &mut [(&str, &mut Session)],
    progress: &mut Progress,
) -> Result<Vec<BootPointSummary>, SyncError> {
    let summaries = out.rounds.into_iter().map(|rounds| BootPointSummary {
        rounds,
        ..out.summary.clone()
    });
    if !out.take {
        return Ok(summaries.collect());
    }
    let name = boot_point_name(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    progress.phase("taking the boot point", 0);
    let mut taken = Vec::new();
    for (i, mut summary) in summaries.enumerate() {
        let manage = |op| {
            Message::Manage(Manage {
                op,
                name: name.clone(),
                app_consistent: summary.kind == "app-consistent",
                max_boot_points: bp.max_boot_points,
            })
        };
        let session = &mut *sessions[i].1;
        let made = session
            .send(&manage(ManageOp::Create))
            .and_then(|()| session.recv_managed());
        match made {
            Ok(list) => {
                summary.merged = list.merged;
                summary.name = Some(name.clone());
                taken.push(summary);
            }
            // All disks or none: a server whose disks do not all have the
            // boot point cannot boot from it.
            Err(e) if i > 0 => {
                let mut stuck = Vec::new();
                for (url, earlier) in sessions[..i].iter_mut() {
                    let undone = earlier
                        .send(&manage(ManageOp::Delete))
                        .and_then(|()| earlier.recv_managed());
                    if undone.is_err() {
                        stuck.push((*url).to_owned());
                    }
                }
                return Err(SyncError::BootPointPartial {
                    name,
                    stuck,
                    source: Box::new(e),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(taken)
}

/// Runs a pre- or post-snapshot script with a timeout; its output goes to
/// stderr so `--json` stays clean.
fn run_script(path: &PathBuf, phase: &str, bp: &BootPointOptions) -> Result<(), String> {
    let mut child = Command::new(path)
        .env("FERRY_PHASE", phase)
        .env(
            "FERRY_DEVICE",
            bp.devs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        )
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .spawn()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let deadline = Instant::now() + bp.script_timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{} exited with {status}", path.display())),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not finish within {:?}",
                    path.display(),
                    bp.script_timeout
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}
