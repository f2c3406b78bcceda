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
    agent::BootPointList,
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
    /// The source device, for its mounted filesystems.
    pub dev: DevNum,
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

/// Where convergence left the job, before the commit.
pub(crate) struct Converged {
    pub stats: PipelineStats,
    take: bool,
    summary: BootPointSummary,
}

/// What happened while the filesystems were (to be) frozen.
enum Outcome {
    FreezeFailed(String),
    Read(Result<(RoaringBitmap, (Vec<crate::pipeline::Piece>, PipelineStats)), SyncError>),
}

/// Freeze attempts before giving up on an app-consistent boot point.
const FREEZE_ATTEMPTS: u32 = 3;

/// Ships rounds until the rest is small, then ships the last chunks read at
/// one instant. `take` drains the tracker and returns the chunks taken
/// (already in the target's inflight set).
pub(crate) fn converge(
    bp: &BootPointOptions,
    source: &Source,
    session: &mut Session,
    take: &mut dyn FnMut() -> Result<RoaringBitmap, SyncError>,
    progress: &mut Progress,
) -> Result<Converged, SyncError> {
    let mut stats = PipelineStats::default();
    let mut rounds = Vec::new();
    let ship_round = |set: &RoaringBitmap,
                      session: &mut Session,
                      rounds: &mut Vec<u64>,
                      stats: &mut PipelineStats,
                      progress: &mut Progress|
     -> Result<u64, SyncError> {
        let plan = source.plan(set);
        let bytes = total_bytes(&plan);
        progress.phase("converging", bytes);
        stats.add(&source.ship(session, plan, progress)?);
        rounds.push(bytes);
        Ok(bytes)
    };
    // 1. Rounds.
    loop {
        let more = take()?;
        let bytes = ship_round(&more, session, &mut rounds, &mut stats, progress)?;
        if bytes <= bp.converge_bytes || rounds.len() as u32 >= bp.max_rounds {
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
            let more = take()?;
            ship_round(&more, session, &mut rounds, &mut stats, progress)?;
            summary.rounds = rounds;
            summary.note = Some(format!(
                "pre-snapshot script failed ({why}): no boot point taken; the changes were still shipped"
            ));
            progress.note(&format!(
                "ferry: warning: {}",
                summary.note.as_deref().unwrap_or("")
            ));
            return Ok(Converged {
                stats,
                take: false,
                summary,
            });
        }
    }
    let mounts = freeze::mounts_of(bp.dev.major, bp.dev.minor).unwrap_or_default();
    let mut attempt = 0;
    // 3. The instant.
    let pieces = loop {
        attempt += 1;
        if mounts.is_empty() {
            summary.note = Some("no filesystem is mounted from the device".to_owned());
            let more = take()?;
            let (pieces, st) = source.read_all(source.plan(&more))?;
            stats.add(&st);
            break pieces;
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
            Ok(()) => Outcome::Read(
                take().and_then(|more| source.read_all(source.plan(&more)).map(|r| (more, r))),
            ),
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
                let more = take()?;
                let (pieces, st) = source.read_all(source.plan(&more))?;
                stats.add(&st);
                break pieces;
            }
            Outcome::Read(Err(e)) => return Err(e),
            Outcome::Read(Ok((more, (pieces, st)))) => {
                if still_frozen && held <= bp.max_freeze {
                    stats.add(&st);
                    summary.kind = "app-consistent";
                    summary.frozen = mounts.clone();
                    break pieces;
                }
                // Held too long: what was read goes as one more round.
                drop(pieces);
                ship_round(&more, session, &mut rounds, &mut stats, progress)?;
                if attempt >= FREEZE_ATTEMPTS {
                    summary.rounds = rounds;
                    summary.note = Some(format!(
                        "the last chunks could not be read within --max-freeze {:?} in {attempt} \
                         tries: no boot point taken",
                        bp.max_freeze
                    ));
                    return Ok(Converged {
                        stats,
                        take: false,
                        summary,
                    });
                }
            }
        }
    };
    let bytes: u64 = pieces.iter().map(|p| p.raw_len()).sum();
    rounds.push(bytes);
    for piece in pieces {
        send_piece(session, piece)?;
    }
    summary.rounds = rounds;
    Ok(Converged {
        stats,
        take: true,
        summary,
    })
}

impl Converged {
    /// Bytes the rounds covered.
    pub fn rounds_bytes(&self) -> u64 {
        self.summary.rounds.iter().sum()
    }
}

/// After the commit: asks the agent for the boot point.
pub(crate) fn take(
    out: Converged,
    bp: &BootPointOptions,
    session: &mut Session,
    progress: &mut Progress,
) -> Result<BootPointSummary, SyncError> {
    let mut summary = out.summary;
    if !out.take {
        return Ok(summary);
    }
    let name = boot_point_name(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    progress.phase("taking the boot point", 0);
    session.send(&Message::Manage(Manage {
        op: ManageOp::Create,
        name: name.clone(),
        app_consistent: summary.kind == "app-consistent",
        max_boot_points: bp.max_boot_points,
    }))?;
    let list: BootPointList = session.recv_managed()?;
    summary.merged = list.merged;
    summary.name = Some(name);
    Ok(summary)
}

/// Runs a pre- or post-snapshot script with a timeout; its output goes to
/// stderr so `--json` stays clean.
fn run_script(path: &PathBuf, phase: &str, bp: &BootPointOptions) -> Result<(), String> {
    let mut child = Command::new(path)
        .env("FERRY_PHASE", phase)
        .env("FERRY_DEVICE", bp.dev.to_string())
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
