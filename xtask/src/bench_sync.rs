//! `cargo xtask bench sync`: what shipping only changed blocks saves, measured
//! side by side in one run over one real sshd on 127.0.0.1.
//!
//! The source is a loop device over a RAM-backed file holding an ext4
//! filesystem about 60% full of files, half random and half text-like
//! (compressible). ferry seeds a standby image over SSH. Then random 4 KiB
//! O_DIRECT writes change a share of the device (1% by default) and three
//! ways of bringing a copy up to date are timed: a ferry incremental sync;
//! `rsync --inplace --no-whole-file` of the loop device's backing file onto
//! a copy taken before the churn; and a full copy, `ssh 'cat > FILE'`. Then
//! the whole device is overwritten and a ferry incremental sync is set
//! against the physical limit: the slower of reading the source (fio,
//! O_DIRECT) and pushing the same bytes through `ssh 'cat > /dev/null'`.
//! The limit writes nothing on the target; the plainest transfer that does,
//! `dd` of the device piped into `ssh 'dd of=FILE'`, is timed beside it.
//!
//! The machine is shared, so the compared runs go in rounds (`--rounds`, 5):
//! churn, ferry, rsync; and overwrite, ferry, the limit, dd. ferry and its
//! baselines share the same moments, and the medians are reported. The
//! first overwrite is timed on its own: it also fills the thin image's
//! holes.
//!
//! ferry keeps its SSH connection open for the next job (`--ssh-persist`),
//! and its agent on the target with it, so the incremental runs over the
//! seed's connection, on the seed's agent; the same churn is then synced
//! once more over a new connection, to show what logging in and starting
//! an agent cost. The limit and the plain `dd` job also run over one kept
//! connection: a login is no part of what the link carries.
//!
//! The two ends run as two hosts would: the sshd, and all it starts, on
//! half the CPUs, and everything else (ferry and its `ssh`, the baselines'
//! shells, `ssh`, `dd`, `rsync`, `fio`) on the other half; see [`Hosts`].
//! `--shared-cpus` lets both ends run anywhere, as on one box.
//!
//! Everything is timed by wall clock, connecting included. Goals are printed,
//! not asserted. Every copy is checked against the source (the standby with
//! `ferry verify` and with `cmp`, the baselines with `cmp`): a copy that
//! differs is an error, since its time would mean nothing.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench::fio_job;
use crate::cpu::{Meter, Spent};
use crate::hosts::Hosts;
use crate::mount::Mount;
use crate::rig::Rig;
use crate::setup;
use crate::sshd::{Sshd, HOST};
use crate::standby::{self, mib, SyncReport};
use crate::sys::{self, Cpus};
use crate::util::{self, say, shell_quote, Cmd};
use crate::workload::{self, Rng};

#[derive(clap::Args)]
pub struct SyncArgs {
    /// Size of the RAM-backed source disk (in /dev/shm), MiB
    #[arg(long, value_name = "M", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    size_mib: u64,
    /// Share of the device rewritten, in random 4 KiB blocks, before the
    /// timed ferry/rsync/full-copy runs
    #[arg(long, value_name = "PCT", default_value_t = 1.0, value_parser = parse_percent)]
    churn_percent: f64,
    /// ferry's tracking chunk size
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    chunk_size: String,
    /// Rounds of each comparison (churn, ferry, rsync; and overwrite, ferry,
    /// ssh 'cat > /dev/null', dd | ssh dd); the median of each is reported.
    /// Other work on a shared machine can slow any round by a third: five
    /// keep the median clear of two such rounds
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,
    /// When a measurement or check fails, carry on with the rest and fail at
    /// the end
    #[arg(long)]
    keep_going: bool,
    /// Let both ends run on every CPU, as one box. By default the source
    /// side (ferry and its ssh, or a baseline's shell, ssh, dd and rsync)
    /// runs on the first half of the CPUs and the sshd, with all it starts,
    /// on the rest, as two hosts would: the same for ferry and baselines
    #[arg(long)]
    shared_cpus: bool,
}

const FILL_PERCENT: u64 = 60;
const GOAL_RSYNC_RATIO: f64 = 30.0;
const GOAL_LIMIT_RATIO: f64 = 0.80;
/// Fixed, so that runs write the same files and the same churn.
const SEED: u64 = 0x5eed_f322_2024_0001;

fn parse_percent(s: &str) -> Result<f64, String> {
    let percent: f64 = s.trim().parse().map_err(|err| format!("{err}"))?;
    if percent > 0.0 && percent <= 100.0 {
        Ok(percent)
    } else {
        Err("must be above 0 and at most 100".to_owned())
    }
}

pub fn run(args: &SyncArgs) -> Result<()> {
    setup::require_root("xtask bench")?;
    setup::run()?;
    let ferry = util::build_release_binary("ferry", "ferry")?;
    let bytes = args.size_mib << 20;
    check_room(bytes)?;
    let load_before = load_average();

    // Declared in this order so they drop in reverse: sshd stops before the
    // rig detaches the loop device and removes the work dir with every file
    // under it (source, standby image, copies, keys).
    let pid = std::process::id();
    let work = PathBuf::from(format!("/dev/shm/ferry-bench-sync-{pid}"));
    let mut rig = Rig::new(
        ferry.clone(),
        &work,
        PathBuf::from(format!("/sys/fs/bpf/ferry-bench-sync-{pid}")),
    )?;
    let hosts = if args.shared_cpus {
        None
    } else {
        Hosts::split()?
    };
    let placement = match &hosts {
        Some(hosts) => format!(
            "source side on CPU {}, target side (the sshd and all it starts) on CPU {}",
            hosts.source, hosts.target
        ),
        None => format!(
            "source and target sides share all {} CPUs",
            Cpus::allowed()?.list().len()
        ),
    };
    util::step(&format!("placing the two ends: {placement}"));
    let sshd = Sshd::start(
        &work.join("sshd"),
        &ferry,
        hosts.as_ref().map(|h| &h.target),
    )?;
    // Everything this thread starts from here on is the source side.
    if let Some(hosts) = &hosts {
        hosts
            .source
            .pin_this_thread()
            .context("pinning the bench to the source side's CPUs failed")?;
    }
    let target_dir = work.join("target");
    let meter = Meter::new(sshd.pid(), rig.state_dir()).with_kept_agents(&target_dir);

    util::step(&format!(
        "making the source: a {} MiB RAM-backed loop device with ext4, {FILL_PERCENT}% full",
        args.size_mib
    ));
    let source = work.join("source.img");
    rig.create_file(&source, bytes)?;
    let device = rig.attach_loop(&source, true)?;
    make_filesystem(&device, &work.join("mnt"), bytes)?;

    util::step(&format!(
        "tracking {device} (chunk size {})",
        args.chunk_size
    ));
    rig.track_add(&["--chunk-size", &args.chunk_size])?;
    fs::create_dir(&target_dir)
        .with_context(|| format!("creating {} failed", target_dir.display()))?;
    let image = Standby {
        url: sshd.url(&target_dir.join("standby.img")),
        path: target_dir.join("standby.img"),
        ssh_args: sshd.ferry_args(),
    };

    util::step("seeding the standby image over ssh (a full copy; all-zero chunks are skipped)");
    let seed = image.sync(&rig, &device)?;
    expect_mode(&seed, "seed")?;

    let rsync_copy = target_dir.join("rsync.img");
    let mut rng = Rng::new(SEED ^ 0xc4);
    let churn = format!("{}% churn", args.churn_percent);
    let mut runner = Runner {
        keep_going: args.keep_going,
        failures: Vec::new(),
    };
    // In rounds, as the steady state below. Each round repeats the same
    // experiment: rsync updates a fresh copy of the source taken just
    // before that round's churn, as ferry updates its image.
    let (mut ferry_churns, mut rsyncs) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let of = format!("round {round} of {}", args.rounds);
        util::step(&format!(
            "{of}: copying the backing file for rsync to update: the source before the churn"
        ));
        Cmd::new("cp")
            .arg("--sparse=always")
            .arg(&source)
            .arg(&rsync_copy)
            .run()?;
        let blocks = workload::churn_blocks(&mut rng, bytes, args.churn_percent);
        util::step(&format!(
            "{churn}, {of}: writing {} random 4 KiB blocks at random places of {device} \
             (O_DIRECT)",
            blocks.len()
        ));
        workload::write_blocks(&device, &blocks, &mut rng)?;
        util::step(&format!("{churn}, {of}: ferry incremental sync over ssh"));
        let after = format!("the churn of {of}");
        let timed = image.incremental(&mut runner, &rig, &device, &source, &after, None)?;
        ferry_churns.extend(timed);
        util::step(&format!(
            "{churn}, {of}: rsync --inplace --no-whole-file of the backing file over the same \
             sshd"
        ));
        rsyncs.extend(runner.attempt("rsync", || rsync(&sshd, &source, &rsync_copy))?);
        remove_file(&rsync_copy)?;
    }

    util::step(&format!(
        "{churn}: a full copy of the backing file through ssh 'cat > FILE'"
    ));
    let full_copy = target_dir.join("full.img");
    let full = runner.attempt("full copy", || copy_over_ssh(&sshd, &source, &full_copy))?;
    remove_file(&full_copy)?;

    // The incremental above reused the seed's SSH connection, which ferry
    // keeps open for the next job (`--ssh-persist`). The same churn again,
    // synced over a connection of its own, shows what a job pays to log in.
    let blocks = workload::churn_blocks(&mut rng, bytes, args.churn_percent);
    util::step(&format!(
        "{churn} again: {} more random 4 KiB blocks, synced over a new ssh connection",
        blocks.len()
    ));
    workload::write_blocks(&device, &blocks, &mut rng)?;
    let cold = Standby {
        ssh_args: [
            image.ssh_args.clone(),
            vec!["--ssh-persist".into(), "0".into()],
        ]
        .concat(),
        url: image.url.clone(),
        path: image.path.clone(),
    };
    let ferry_cold =
        cold.incremental(&mut runner, &rig, &device, &source, "the last churn", None)?;

    util::step(&format!(
        "100% churn: overwriting all of {device} with random data (O_DIRECT)"
    ));
    workload::overwrite(&device, bytes, &mut rng)?;
    util::step("100% churn: ferry incremental sync over ssh");
    let ferry_all =
        image.incremental(&mut runner, &rig, &device, &source, "the overwrite", None)?;
    // The first overwrite also fills the thin image's holes (the chunks the
    // seed skipped as zeroes), and a fresh tmpfs page costs more to write
    // than a used one. The rounds after it measure the steady state.
    util::step("physical limit: reading the source (fio, O_DIRECT, 1 MiB reads, 16 in flight)");
    let read = runner.attempt("reading the source", || read_device(&device))?;
    // dd writes a file of its own: had it written the standby image, ferry
    // would rightly no longer vouch for the image and compare checksums.
    // Every page of it is written before the rounds, as the standby's are.
    let dd_copy = target_dir.join("dd.img");
    util::step("the same job done plainly: a copy of the source for dd to overwrite");
    fs::copy(&source, &dd_copy).with_context(|| format!("copying {} failed", source.display()))?;
    // The limit and dd run over one kept connection, as ferry's jobs do:
    // a login (0.1 to 0.3 s here) is no part of what the link carries.
    let kept = KeptSsh::open(&sshd, &work.join("baseline-ssh"))?;
    let meter = meter.with_control_dir(&kept.dir);
    let (mut again, mut pipes, mut dds) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let of = format!("round {round} of {}", args.rounds);
        util::step(&format!(
            "100% churn again, {of}: overwriting all of {device} (the image has no holes left)"
        ));
        workload::overwrite(&device, bytes, &mut rng)?;
        let after = format!("the overwrite of {of}");
        let timed = image.incremental(&mut runner, &rig, &device, &source, &after, Some(&meter))?;
        again.extend(timed);
        util::step(&format!(
            "physical limit, {of}: the same bytes through ssh 'cat > /dev/null'"
        ));
        pipes.extend(runner.attempt("ssh throughput", || {
            discard_over_ssh(&kept.command, &source, &meter)
        })?);
        util::step(&format!(
            "the same job done plainly, {of}: dd of the device | ssh 'dd of=FILE' (no checks)"
        ));
        dds.extend(runner.attempt("dd over ssh", || {
            dd_over_ssh(&kept.command, &device, &dd_copy, bytes, &meter)
        })?);
    }
    drop(kept);
    remove_file(&dd_copy)?;

    report(&Results {
        size_mib: args.size_mib,
        chunk_size: &args.chunk_size,
        churn: &churn,
        churn_blocks: blocks.len(),
        load_before,
        load_after: load_average(),
        placement,
        seed: Timed::from(&seed),
        ferry_churn: ferry_churns,
        ferry_cold,
        rsync: rsyncs,
        full,
        ferry_all,
        rounds: args.rounds,
        ferry_again: again,
        read,
        pipe: pipes,
        dd: dds,
    });
    runner.finish()
}

/// The standby image on the bench's sshd (which is this host).
struct Standby {
    url: String,
    path: PathBuf,
    /// ferry's options to log in to the sshd.
    ssh_args: Vec<OsString>,
}

impl Standby {
    fn sync(&self, rig: &Rig, device: &str) -> Result<SyncReport> {
        standby::sync(rig, device, &self.url, &self.ssh_args)
    }

    /// A timed incremental sync after `after` (its CPU time measured too,
    /// with a meter), then the checks.
    fn incremental(
        &self,
        runner: &mut Runner,
        rig: &Rig,
        device: &str,
        source: &Path,
        after: &str,
        meter: Option<&Meter>,
    ) -> Result<Option<Timed>> {
        let timed = runner.attempt(&format!("ferry incremental sync after {after}"), || {
            let (report, cpu) = match meter {
                Some(meter) => {
                    let (report, spent) = meter.measure(|| self.sync(rig, device))?;
                    (report, Some(spent))
                }
                None => (self.sync(rig, device)?, None),
            };
            expect_mode(&report, "incremental")?;
            Ok(Timed {
                cpu,
                ..Timed::from(&report)
            })
        })?;
        if timed.is_some() {
            self.check(runner, rig, device, source, after)?;
        }
        Ok(timed)
    }

    /// Checks the image twice: with `ferry verify`, as a user would, and
    /// with `cmp` against the source's backing file, which shares no code
    /// with ferry.
    fn check(
        &self,
        runner: &mut Runner,
        rig: &Rig,
        device: &str,
        source: &Path,
        after: &str,
    ) -> Result<()> {
        util::step("checking the standby image against the source");
        runner.attempt(&format!("ferry verify after {after}"), || {
            standby::verify(rig, device, &self.url, &self.ssh_args)?.require_identical()
        })?;
        runner.attempt(&format!("cmp after {after}"), || {
            Cmd::new("cmp")
                .arg(source)
                .arg(&self.path)
                .output()
                .context("the standby image does not match the source")?;
            say!("the standby image is byte for byte the source");
            Ok(())
        })?;
        Ok(())
    }
}

/// A ferry run that was not of the expected kind measured something else.
fn expect_mode(report: &SyncReport, mode: &str) -> Result<()> {
    if report.mode != mode {
        bail!(
            "ferry ran a {} sync where a {mode} was expected",
            report.mode
        );
    }
    Ok(())
}

/// Bails unless RAM and /dev/shm have room for the source, the standby
/// image and one baseline copy at once, plus headroom.
fn check_room(bytes: u64) -> Result<()> {
    let need = bytes * 3 + (1 << 30);
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo failed")?;
    let available =
        meminfo_kib(&meminfo, "MemAvailable").context("no MemAvailable in /proc/meminfo")? << 10;
    let df = Cmd::new("df")
        .args(["--output=avail", "-B1", "/dev/shm"])
        .quiet()
        .output()?;
    let shm_free: u64 = df
        .stdout
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .context("could not read the free space of /dev/shm from df")?;
    if available < need || shm_free < need {
        bail!(
            "this bench keeps up to three copies of the disk in RAM and needs about {} of \
             available memory and of free space in /dev/shm; there are {} and {} \
             (try a smaller --size-mib)",
            mib(need),
            mib(available),
            mib(shm_free)
        );
    }
    Ok(())
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The 1, 5 and 15 minute load averages, for judging how noisy a run was.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {} failed", path.display())),
    }
}

/// Carries on past failed measurements with `--keep-going`, remembering
/// them for the end.
struct Runner {
    keep_going: bool,
    failures: Vec<String>,
}

impl Runner {
    fn attempt<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        match f() {
            Ok(value) => Ok(Some(value)),
            Err(err) if self.keep_going && !sys::interrupted() => {
                util::warn(format_args!(
                    "{what} failed: {err:#}; going on (--keep-going)"
                ));
                self.failures.push(format!("{what}: {err:#}"));
                Ok(None)
            }
            Err(err) => Err(err.context(format!("{what} failed"))),
        }
    }

    fn finish(self) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        bail!(
            "{} measurement(s) or check(s) failed: {}",
            self.failures.len(),
            self.failures.join("; ")
        );
    }
}

fn make_filesystem(device: &str, mnt: &Path, bytes: u64) -> Result<()> {
    // Inode tables and journal initialised now: ext4's lazy init would go on
    // writing in the background after mount.
    Cmd::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            device,
        ])
        .run()?;
    fs::create_dir(mnt).with_context(|| format!("creating {} failed", mnt.display()))?;
    let mut mount = Mount::new(device, mnt)?;
    workload::fill(mount.dir(), bytes / 100 * FILL_PERCENT, SEED)?;
    Cmd::new("df")
        .args(["-h", "--output=size,used,avail,pcent"])
        .arg(mount.dir())
        .run()?;
    // Unmounted, the device is quiet while the runs are timed.
    mount.unmount()
}

// ---------------------------------------------------------------------------
// The baselines and the physical limit.

/// One timed transfer: wall-clock seconds, bytes of the disk it covered,
/// bytes it sent (`None` where nothing is sent) and, where measured, the
/// CPU time it cost.
struct Timed {
    secs: f64,
    covered: u64,
    wire: Option<u64>,
    cpu: Option<Spent>,
}

impl Timed {
    fn throughput(&self) -> f64 {
        self.covered as f64 / self.secs
    }
}

/// The physical limit, in bytes per second, and what sets it: the slower of
/// reading the source and pushing bytes through `ssh 'cat > /dev/null'`.
fn physical_limit(read: Option<&Timed>, pipe: Option<&Timed>) -> Option<(f64, &'static str)> {
    let (read, pipe) = (read?.throughput(), pipe?.throughput());
    Some(if read <= pipe {
        (read, "reading the source")
    } else {
        (pipe, "ssh")
    })
}

/// A run's source-side CPU seconds per GiB covered, as printed (`-` where
/// it was not measured).
fn source_cpu_per_gib(run: &Timed) -> String {
    match run.cpu {
        Some(cpu) if run.covered > 0 => {
            format!(
                "{:.2}",
                cpu.source / (run.covered as f64 / f64::from(1 << 30))
            )
        }
        _ => "-".to_owned(),
    }
}

/// The fastest run: the one other work on the machine disturbed least.
fn fastest(runs: &[Timed]) -> Option<&Timed> {
    runs.iter().min_by(|a, b| a.secs.total_cmp(&b.secs))
}

/// The run of median time (the faster middle one of an even count).
fn median(runs: &[Timed]) -> Option<&Timed> {
    let mut runs: Vec<&Timed> = runs.iter().collect();
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let middle = runs.len().checked_sub(1)? / 2;
    Some(runs[middle])
}

impl From<&SyncReport> for Timed {
    fn from(report: &SyncReport) -> Self {
        Self {
            secs: report.wall_secs,
            covered: report.changed_bytes,
            wire: Some(report.sent_bytes),
            cpu: None,
        }
    }
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading the size of {} failed", path.display()))?
        .len())
}

/// rsync's delta transfer of `source` onto `copy` (same size, taken before
/// the churn) through the bench's sshd; then checks the copy.
fn rsync(sshd: &Sshd, source: &Path, copy: &Path) -> Result<Timed> {
    let cmd = Cmd::new("rsync")
        // --ignore-times: always compare blocks, even if size and mtime match.
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg("-e")
        .arg(sshd.ssh_command())
        .arg(source)
        .arg(format!("root@{HOST}:{}", copy.display()));
    let start = Instant::now();
    let output = cmd.output()?;
    let secs = start.elapsed().as_secs_f64();
    let stat = |key: &str| {
        rsync_stat(&output.stdout, key).with_context(|| format!("rsync --stats printed no {key:?}"))
    };
    let (sent, received) = (stat("Total bytes sent")?, stat("Total bytes received")?);
    say!(
        "rsync: {} literal, {} matched; {} sent, {} received, in {secs:.2} s",
        mib(stat("Literal data")?),
        mib(stat("Matched data")?),
        mib(sent),
        mib(received)
    );
    Cmd::new("cmp")
        .arg(source)
        .arg(copy)
        .output()
        .context("rsync's copy does not match the source")?;
    say!("rsync's copy is identical to the source");
    Ok(Timed {
        secs,
        covered: file_size(source)?,
        wire: Some(sent + received),
        cpu: None,
    })
}

/// A number from rsync's `--stats`, e.g. `Total bytes sent: 1,234,567`.
fn rsync_stat(stdout: &str, key: &str) -> Option<u64> {
    stdout.lines().find_map(|line| {
        let value = line.trim().strip_prefix(key)?.strip_prefix(':')?;
        let digits: String = value
            .split_whitespace()
            .next()?
            .chars()
            .filter(|c| *c != ',')
            .collect();
        digits.parse().ok()
    })
}

/// Runs a shell line, printed as it is run so it can be pasted; timed.
fn timed_shell(script: &str) -> Result<f64> {
    say!("$ {script}");
    let start = Instant::now();
    Cmd::new("sh").args(["-c", script]).quiet().output()?;
    Ok(start.elapsed().as_secs_f64())
}

/// `ssh HOST 'cat > DEST' < SOURCE`; then checks the copy.
fn copy_over_ssh(sshd: &Sshd, source: &Path, dest: &Path) -> Result<Timed> {
    let remote = format!("cat > {}", shell_quote(&dest.to_string_lossy()));
    let secs = timed_shell(&format!(
        "{} root@{HOST} {} < {}",
        sshd.ssh_command(),
        shell_quote(&remote),
        shell_quote(&source.to_string_lossy())
    ))?;
    let bytes = file_size(source)?;
    say!(
        "copied {} in {secs:.2} s ({:.0} MiB/s)",
        mib(bytes),
        bytes as f64 / secs / f64::from(1 << 20)
    );
    Cmd::new("cmp")
        .arg(source)
        .arg(dest)
        .output()
        .context("the copy does not match the source")?;
    say!("the copy is identical to the source");
    Ok(Timed {
        secs,
        covered: bytes,
        wire: Some(bytes),
        cpu: None,
    })
}

/// An `ssh` connection to the bench's sshd kept open for the baselines;
/// closed on drop.
struct KeptSsh {
    dir: PathBuf,
    /// `ssh` through it, as one shell line.
    command: String,
}

impl KeptSsh {
    fn open(sshd: &Sshd, dir: &Path) -> Result<Self> {
        fs::create_dir(dir).with_context(|| format!("creating {} failed", dir.display()))?;
        let kept = Self {
            dir: dir.to_owned(),
            command: sshd.kept_ssh_command(&dir.join("control")),
        };
        util::step("logging in once for the baselines' kept ssh connection");
        timed_shell(&format!("{} root@{HOST} true", kept.command))?;
        Ok(kept)
    }
}

impl Drop for KeptSsh {
    fn drop(&mut self) {
        let _ = Cmd::new("sh")
            .args(["-c", &format!("{} -O exit root@{HOST}", self.command)])
            .quiet()
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `ssh HOST 'cat > /dev/null' < SOURCE` over a kept connection: what the
/// SSH link itself carries.
fn discard_over_ssh(ssh: &str, source: &Path, meter: &Meter) -> Result<Timed> {
    let (secs, cpu) = meter.measure(|| {
        timed_shell(&format!(
            "{ssh} root@{HOST} 'cat > /dev/null' < {}",
            shell_quote(&source.to_string_lossy())
        ))
    })?;
    let bytes = file_size(source)?;
    say!(
        "{} in {secs:.2} s ({:.0} MiB/s)",
        mib(bytes),
        bytes as f64 / secs / f64::from(1 << 20)
    );
    Ok(Timed {
        secs,
        covered: bytes,
        wire: Some(bytes),
        cpu: Some(cpu),
    })
}

/// `dd` of the device (O_DIRECT, 1 MiB blocks) piped into `ssh HOST 'dd
/// of=DEST conv=notrunc'`: what a 100% churn sync does (read, ship, write),
/// without checksums, commit or fsync. DEST already has every page written:
/// a fresh file here would time the host handing out new memory. Then
/// checks the copy.
fn dd_over_ssh(ssh: &str, device: &str, dest: &Path, bytes: u64, meter: &Meter) -> Result<Timed> {
    let remote = format!(
        "dd of={} bs=1M iflag=fullblock conv=notrunc status=none",
        shell_quote(&dest.to_string_lossy())
    );
    let (secs, cpu) = meter.measure(|| {
        timed_shell(&format!(
            "dd if={} iflag=direct bs=1M status=none | {ssh} root@{HOST} {}",
            shell_quote(device),
            shell_quote(&remote)
        ))
    })?;
    say!(
        "{} in {secs:.2} s ({:.0} MiB/s)",
        mib(bytes),
        bytes as f64 / secs / f64::from(1 << 20)
    );
    Cmd::new("cmp")
        .arg(device)
        .arg(dest)
        .output()
        .context("dd's copy does not match the source")?;
    say!("dd's copy is identical to the source");
    Ok(Timed {
        secs,
        covered: bytes,
        wire: Some(bytes),
        cpu: Some(cpu),
    })
}

/// Sequential O_DIRECT read of the whole device, as fast as fio can.
fn read_device(device: &str) -> Result<Timed> {
    let output = Cmd::new("fio")
        .args([
            "--name=read",
            &format!("--filename={device}"),
            "--readonly",
            "--rw=read",
            "--bs=1M",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=16",
            "--numjobs=1",
            "--output-format=json",
        ])
        .output()?;
    let job = fio_job(&output.stdout)?;
    let io_bytes = job["read"]["io_bytes"]
        .as_u64()
        .context("fio's JSON report has no jobs[0].read.io_bytes")?;
    let runtime_ms = job["read"]["runtime"]
        .as_u64()
        .filter(|ms| *ms > 0)
        .context("fio's JSON report has no jobs[0].read.runtime")?;
    let secs = runtime_ms as f64 / 1000.0;
    say!(
        "read {} in {secs:.2} s ({:.0} MiB/s)",
        mib(io_bytes),
        io_bytes as f64 / secs / f64::from(1 << 20)
    );
    Ok(Timed {
        secs,
        covered: io_bytes,
        wire: None,
        cpu: None,
    })
}

// ---------------------------------------------------------------------------
// The report.

struct Results<'a> {
    size_mib: u64,
    chunk_size: &'a str,
    churn: &'a str,
    churn_blocks: usize,
    load_before: String,
    load_after: String,
    /// Which CPUs each side ran on.
    placement: String,
    seed: Timed,
    /// Rounds asked for. `ferry_churn`, `rsync`, `ferry_again`, `pipe` and
    /// `dd` hold a run per round (fewer where one failed); the report shows
    /// their medians.
    rounds: u32,
    ferry_churn: Vec<Timed>,
    rsync: Vec<Timed>,
    /// The same churn, over a new SSH connection.
    ferry_cold: Option<Timed>,
    full: Option<Timed>,
    ferry_all: Option<Timed>,
    ferry_again: Vec<Timed>,
    read: Option<Timed>,
    pipe: Vec<Timed>,
    /// `dd | ssh dd`: read, ship and write, plainly.
    dd: Vec<Timed>,
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn report(r: &Results<'_>) {
    let ferry_churn = median(&r.ferry_churn);
    let rsync = median(&r.rsync);
    let ferry_again = median(&r.ferry_again);
    let pipe = median(&r.pipe);
    let dd = median(&r.dd);
    util::step("results");
    say!(
        "source: {} MiB ext4 ({FILL_PERCENT}% full) on a loop device over /dev/shm; \
         ferry chunk size {}; {} = {} random 4 KiB blocks",
        r.size_mib,
        r.chunk_size,
        r.churn,
        r.churn_blocks
    );
    say!(
        "load average (1/5/15 min) before: {}, after: {}; {}",
        r.load_before,
        r.load_after,
        r.placement
    );
    say!("");
    say!(
        "{:<42} {:>9} {:>12} {:>12} {:>10}",
        "run",
        "time s",
        "covers MiB",
        "sends MiB",
        "MiB/s"
    );
    let row = |label: &str, timed: Option<&Timed>| match timed {
        Some(t) => say!(
            "{label:<42} {:>9.2} {:>12.1} {:>12} {:>10.1}",
            t.secs,
            t.covered as f64 / f64::from(1 << 20),
            t.wire.map_or("-".to_owned(), |w| format!(
                "{:.1}",
                w as f64 / f64::from(1 << 20)
            )),
            t.throughput() / f64::from(1 << 20)
        ),
        None => say!("{label:<42} {:>9}", "failed"),
    };
    row("seed: ferry over ssh", Some(&r.seed));
    say!("{}, median of {} rounds:", r.churn, r.rounds);
    row("  ferry incremental", ferry_churn);
    row("  rsync --inplace --no-whole-file", rsync);
    say!("{}, once:", r.churn);
    row("  ferry over a new ssh connection", r.ferry_cold.as_ref());
    row("  full copy, ssh 'cat > FILE'", r.full.as_ref());
    row(
        "100% churn: ferry, filling image holes",
        r.ferry_all.as_ref(),
    );
    row("source read, fio O_DIRECT", r.read.as_ref());
    say!(
        "100% churn again (no holes left), median of {} rounds:",
        r.rounds
    );
    row("  ferry incremental", ferry_again);
    row("  same bytes, ssh 'cat > /dev/null'", pipe);
    row("  same bytes, dd | ssh 'dd of=FILE'", dd);
    say!("");
    say!("seconds of each round:");
    let rounds = [
        (format!("{}, ferry incremental", r.churn), &r.ferry_churn),
        (format!("{}, rsync", r.churn), &r.rsync),
        ("100% churn again, ferry".to_owned(), &r.ferry_again),
        ("ssh 'cat > /dev/null'".to_owned(), &r.pipe),
        ("dd | ssh dd".to_owned(), &r.dd),
    ];
    for (label, runs) in &rounds {
        let secs: Vec<String> = runs.iter().map(|t| format!("{:.2}", t.secs)).collect();
        say!("  {label:<40} {}", secs.join("  "));
    }
    // The source side's CPU per GiB tells a round slowed by other work
    // (its `ssh` costs more per byte, for ferry and the limit alike) from
    // one where ferry's own work took the time.
    say!("source CPU seconds per GiB of each round (ssh, and ferry or the shell):");
    for (label, runs) in [
        ("100% churn again, ferry", &r.ferry_again),
        ("ssh 'cat > /dev/null'", &r.pipe),
    ] {
        let per_gib: Vec<String> = runs.iter().map(source_cpu_per_gib).collect();
        say!("  {label:<40} {}", per_gib.join("  "));
    }
    say!("");
    say!("CPU seconds per GiB, 100% churn again, median run (source: ferry, or the shell,");
    say!("dd and ssh; target: sshd and what it runs; machine: all CPUs busy, kernel threads");
    say!("and other work included):");
    say!(
        "  {:<40} {:>8} {:>8} {:>8} {:>8}",
        "",
        "source",
        "target",
        "machine",
        "wall"
    );
    for (label, timed) in [
        ("ferry incremental", ferry_again),
        ("ssh 'cat > /dev/null'", pipe),
        ("dd | ssh dd", dd),
    ] {
        match timed.and_then(|t| Some((t, t.cpu?))) {
            Some((t, cpu)) => {
                let gib = t.covered as f64 / f64::from(1 << 30);
                say!(
                    "  {label:<40} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    cpu.source / gib,
                    cpu.target / gib,
                    cpu.machine / gib,
                    t.secs / gib
                );
            }
            None => say!("  {label:<40} {:>8}", "-"),
        }
    }
    say!("");

    let time_ratio = |slow: Option<&Timed>| match (slow, ferry_churn) {
        (Some(slow), Some(ferry)) => Some(slow.secs / ferry.secs),
        _ => None,
    };
    match time_ratio(rsync) {
        Some(ratio) => say!(
            "{:<42} {ratio:>8.1}x   goal >= {GOAL_RSYNC_RATIO}x: {}",
            format!("rsync time / ferry time at {}", r.churn),
            met(ratio >= GOAL_RSYNC_RATIO)
        ),
        None => say!("rsync / ferry: not measured   goal >= {GOAL_RSYNC_RATIO}x: NOT met"),
    }
    if let (Some(rsync), Some(cold)) = (rsync, r.ferry_cold.as_ref()) {
        say!(
            "{:<42} {:>8.1}x",
            "the same, ferry over a new ssh connection",
            rsync.secs / cold.secs
        );
    }
    match time_ratio(r.full.as_ref()) {
        Some(ratio) => say!(
            "{:<42} {ratio:>8.1}x",
            format!("full copy time / ferry time at {}", r.churn)
        ),
        None => say!("full copy / ferry: not measured"),
    }
    let limit = physical_limit(r.read.as_ref(), pipe);
    match (ferry_again, limit) {
        (Some(ferry), Some((limit, by))) => {
            let ratio = ferry.throughput() / limit;
            say!(
                "{:<42} {ratio:>9.2}   goal >= {GOAL_LIMIT_RATIO}: {} (ferry {:.0} MiB/s; limit \
                 {:.0} MiB/s, set by {by})",
                "ferry at 100% churn / physical limit",
                met(ratio >= GOAL_LIMIT_RATIO),
                ferry.throughput() / f64::from(1 << 20),
                limit / f64::from(1 << 20)
            );
        }
        _ => say!("ferry at 100% churn / physical limit: not measured   goal >= {GOAL_LIMIT_RATIO}: NOT met"),
    }
    // Other work slows a round now and then, on either side, and a slowed
    // limit flatters ferry as much as a slowed ferry wrongs it: the fastest
    // round of each, the least disturbed, is shown beside the medians (not
    // judged).
    if let (Some(ferry), Some((limit, _))) = (
        fastest(&r.ferry_again),
        physical_limit(r.read.as_ref(), fastest(&r.pipe)),
    ) {
        say!(
            "{:<42} {:>9.2}   (ferry {:.0} MiB/s; limit {:.0} MiB/s)",
            "the same, fastest round of each",
            ferry.throughput() / limit,
            ferry.throughput() / f64::from(1 << 20),
            limit / f64::from(1 << 20)
        );
    }
    // Filling holes writes fresh pages, which the limit (writing nothing)
    // does not: set it beside the full copy, which writes a new file.
    if let (Some(ferry), Some((limit, _))) = (r.ferry_all.as_ref(), limit) {
        let full = r
            .full
            .as_ref()
            .map(|full| {
                format!(
                    "; a full copy into a new file: {:.2}",
                    full.throughput() / limit
                )
            })
            .unwrap_or_default();
        say!(
            "{:<42} {:>9.2}   (writes fresh pages{full})",
            "the same, filling the image's holes",
            ferry.throughput() / limit
        );
    }
    if let (Some(ferry), Some(dd)) = (ferry_again, dd) {
        say!(
            "{:<42} {:>9.2}",
            "ferry at 100% churn / dd | ssh dd",
            ferry.throughput() / dd.throughput()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of `secs` seconds over one byte.
    fn run(secs: f64) -> Timed {
        Timed {
            secs,
            covered: 1,
            wire: None,
            cpu: None,
        }
    }

    #[test]
    fn median_is_the_middle_run_by_time() {
        let secs = |runs: Vec<Timed>| median(&runs).map(|t| t.secs);
        assert_eq!(secs(vec![]), None);
        assert_eq!(secs(vec![run(3.0)]), Some(3.0));
        assert_eq!(secs(vec![run(9.0), run(1.0), run(4.0)]), Some(4.0));
        assert_eq!(
            secs(vec![run(9.0), run(1.0), run(4.0), run(2.0)]),
            Some(2.0)
        );
    }

    #[test]
    fn source_cpu_is_per_gib_covered() {
        let spent = |source| Spent {
            source,
            target: 9.0,
            machine: 9.0,
        };
        let two_gib = |cpu| Timed {
            secs: 1.0,
            covered: 2 << 30,
            wire: None,
            cpu,
        };
        assert_eq!(source_cpu_per_gib(&two_gib(Some(spent(1.5)))), "0.75");
        assert_eq!(source_cpu_per_gib(&two_gib(None)), "-");
        let nothing = Timed {
            covered: 0,
            ..two_gib(Some(spent(1.5)))
        };
        assert_eq!(source_cpu_per_gib(&nothing), "-");
    }

    #[test]
    fn the_physical_limit_is_the_slower_of_reading_and_ssh() {
        // One byte each: the longer run is the slower.
        assert_eq!(
            physical_limit(Some(&run(2.0)), Some(&run(4.0))),
            Some((0.25, "ssh"))
        );
        assert_eq!(
            physical_limit(Some(&run(4.0)), Some(&run(2.0))),
            Some((0.25, "reading the source"))
        );
        assert_eq!(physical_limit(None, Some(&run(2.0))), None);
    }

    #[test]
    fn fastest_is_the_run_of_least_time() {
        let secs = |runs: Vec<Timed>| fastest(&runs).map(|t| t.secs);
        assert_eq!(secs(vec![]), None);
        assert_eq!(secs(vec![run(9.0), run(1.5), run(4.0)]), Some(1.5));
    }

    #[test]
    fn rsync_stats_with_and_without_thousands_separators() {
        let stdout = "Literal data: 681,574,400 bytes\nMatched data: 3,613,392,896 bytes\n\
                      Total bytes sent: 682,041,213\nTotal bytes received: 1048607\n";
        assert_eq!(rsync_stat(stdout, "Literal data"), Some(681_574_400));
        assert_eq!(rsync_stat(stdout, "Total bytes sent"), Some(682_041_213));
        assert_eq!(rsync_stat(stdout, "Total bytes received"), Some(1_048_607));
        assert_eq!(rsync_stat(stdout, "Total file size"), None);
    }

    #[test]
    fn keep_going_notes_failures_and_fails_at_the_end() {
        let mut runner = Runner {
            keep_going: true,
            failures: Vec::new(),
        };
        let failed = runner.attempt("rsync", || -> Result<()> { bail!("boom") });
        assert!(matches!(failed, Ok(None)));
        assert!(matches!(runner.attempt("ferry", || Ok(3)), Ok(Some(3))));
        let err = runner
            .finish()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "1 measurement(s) or check(s) failed: rsync: boom");

        let mut strict = Runner {
            keep_going: false,
            failures: Vec::new(),
        };
        let failed = strict.attempt("rsync", || -> Result<()> { bail!("boom") });
        assert_eq!(
            failed.err().map(|e| format!("{e:#}")).as_deref(),
            Some("rsync failed: boom")
        );
    }

    #[test]
    fn meminfo_is_read_by_key() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   21000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(21_000_000));
        assert_eq!(meminfo_kib(meminfo, "MemFree"), None);
    }

    #[test]
    fn percent_must_be_in_range() {
        assert_eq!(parse_percent("1"), Ok(1.0));
        assert_eq!(parse_percent("100"), Ok(100.0));
        assert!(parse_percent("0").is_err());
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("x").is_err());
    }
}
