//! `cargo xtask bench tracker-overhead`: what tracking costs a fast disk.
//!
//! fio writes 4 KiB blocks at random to a loop device over a RAM-backed file,
//! alternately without and with ferry tracking it. Runs are noisy (±15% here),
//! so without/with runs alternate and the median of the per-pair ratios is
//! reported. During tracked runs the kernel's BPF statistics
//! (`kernel.bpf_stats_enabled`) give the time spent per program run, read
//! through `ferry track stats --json`. Goals are printed, not asserted.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::rig::Rig;
use crate::setup;
use crate::util::{self, say, Cmd};

#[derive(clap::Args)]
pub struct TrackerOverheadArgs {
    /// Number of without/with run pairs
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pairs: u32,
    /// Seconds each fio run measures, after 2 s of ramp-up
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runtime: u32,
    /// Size of the RAM-backed disk (in /dev/shm), MiB
    #[arg(long, value_name = "M", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    size_mib: u64,
}

const CHUNK_SIZE: &str = "64K";
const GOAL_IOPS_RATIO: f64 = 0.97;
const GOAL_NS_PER_RUN: f64 = 150.0;
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Pair {
    without: f64,
    with: f64,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.with / self.without
    }
}

/// Program run time and run count, summed or per program.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct RunStats {
    run_time_ns: u64,
    run_count: u64,
}

pub fn tracker_overhead(args: &TrackerOverheadArgs) -> Result<()> {
    setup::require_root("xtask bench")?;
    setup::run()?;
    let ferry = util::build_release_binary("ferry", "ferry")?;

    let pid = std::process::id();
    let mut rig = Rig::new(
        ferry,
        &std::env::temp_dir().join(format!("ferry-bench-{pid}")),
        PathBuf::from(format!("/sys/fs/bpf/ferry-bench-{pid}")),
    )?;
    util::step(&format!(
        "making a {} MiB RAM-backed loop device",
        args.size_mib
    ));
    let image = PathBuf::from(format!("/dev/shm/ferry-bench-{pid}.img"));
    let bytes = args
        .size_mib
        .checked_mul(1 << 20)
        .context("--size-mib is too large")?;
    rig.create_file(&image, bytes)?;
    // Allocate every page up front: otherwise the first, untracked run would
    // pay for tmpfs allocation and flatter the tracker.
    Cmd::new("fallocate")
        .args(["-l", &bytes.to_string()])
        .arg(&image)
        .run()?;
    let device = rig.attach_loop(&image, true)?;
    let _bpf_stats = BpfStatsEnabled::enable()?;

    let mut pairs = Vec::new();
    let mut tracked = RunStats::default();
    for pair in 1..=args.pairs {
        util::step(&format!("pair {pair}/{}: without tracking", args.pairs));
        let without = fio(&device, args.runtime)?;
        say!("IOPS without tracking: {without:.0}");

        util::step(&format!("pair {pair}/{}: with tracking", args.pairs));
        rig.track_add(&["--chunk-size", CHUNK_SIZE])?;
        let before = program_stats(&rig)?;
        let with = fio(&device, args.runtime)?;
        let after = program_stats(&rig)?;
        rig.track_remove()?;
        let delta = stats_delta(&before, &after);
        say!(
            "IOPS with tracking: {with:.0}; programs ran {} times, {} ns in all",
            delta.run_count,
            delta.run_time_ns
        );
        tracked.run_time_ns += delta.run_time_ns;
        tracked.run_count += delta.run_count;
        pairs.push(Pair { without, with });
    }
    report(&pairs, tracked)
}

fn fio(device: &str, runtime: u32) -> Result<f64> {
    let output = Cmd::new("fio")
        .args([
            "--name=randw",
            &format!("--filename={device}"),
            "--rw=randwrite",
            "--bs=4k",
            "--ioengine=io_uring",
            "--iodepth=32",
            "--direct=1",
            "--time_based",
            &format!("--runtime={runtime}"),
            "--ramp_time=2",
            "--numjobs=1",
            "--group_reporting",
            "--output-format=json",
        ])
        .output()?;
    parse_fio_iops(&output.stdout)
}

/// `jobs[0].write.iops` from fio's JSON report, which may follow other lines.
fn parse_fio_iops(stdout: &str) -> Result<f64> {
    fio_job(stdout)?["write"]["iops"]
        .as_f64()
        .context("fio's JSON report has no jobs[0].write.iops")
}

/// `jobs[0]` of fio's JSON report (which may follow other lines), checked for
/// a job error.
pub fn fio_job(stdout: &str) -> Result<Value> {
    let start = if stdout.starts_with('{') {
        0
    } else {
        stdout.find("\n{").context("fio printed no JSON report")? + 1
    };
    let mut report: Value = serde_json::Deserializer::from_str(&stdout[start..])
        .into_iter()
        .next()
        .context("fio printed no JSON report")?
        .context("parsing fio's JSON report failed")?;
    let job = report
        .get_mut("jobs")
        .and_then(|jobs| jobs.get_mut(0))
        .map(Value::take)
        .context("fio's JSON report has no jobs[0]")?;
    let error = job["error"].as_i64().unwrap_or(0);
    if error != 0 {
        bail!("fio reported error {error} for its job");
    }
    Ok(job)
}

fn program_stats(rig: &Rig) -> Result<BTreeMap<String, RunStats>> {
    let output = rig.ferry().args(["track", "stats", "--json"]).output()?;
    parse_program_stats(&output.stdout).context("reading `ferry track stats --json` failed")
}

/// Parses `{"programs":[{"name":"bio_queue","run_time_ns":N,"run_count":N},…]}`.
fn parse_program_stats(stdout: &str) -> Result<BTreeMap<String, RunStats>> {
    let json: Value = serde_json::from_str(stdout.trim()).context("invalid JSON")?;
    let programs = json["programs"]
        .as_array()
        .context("no \"programs\" array")?;
    let mut stats = BTreeMap::new();
    for program in programs {
        let name = program["name"]
            .as_str()
            .context("a program has no \"name\" string")?;
        let field = |key: &str| {
            program[key]
                .as_u64()
                .with_context(|| format!("program {name} has no unsigned \"{key}\""))
        };
        let run = RunStats {
            run_time_ns: field("run_time_ns")?,
            run_count: field("run_count")?,
        };
        stats.insert(name.to_owned(), run);
    }
    Ok(stats)
}

/// What all programs added between two readings; a program missing from the
/// first reading counts from zero.
fn stats_delta(
    before: &BTreeMap<String, RunStats>,
    after: &BTreeMap<String, RunStats>,
) -> RunStats {
    let mut total = RunStats::default();
    for (name, now) in after {
        let then = before.get(name).copied().unwrap_or_default();
        total.run_time_ns += now.run_time_ns.saturating_sub(then.run_time_ns);
        total.run_count += now.run_count.saturating_sub(then.run_count);
    }
    total
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn report(pairs: &[Pair], tracked: RunStats) -> Result<()> {
    util::step("results");
    say!(
        "{:>4}  {:>12}  {:>12}  {:>12}",
        "pair",
        "IOPS without",
        "IOPS with",
        "with/without"
    );
    for (i, pair) in pairs.iter().enumerate() {
        say!(
            "{:>4}  {:>12.0}  {:>12.0}  {:>12.3}",
            i + 1,
            pair.without,
            pair.with,
            pair.ratio()
        );
    }
    let ratio = median(pairs.iter().map(Pair::ratio).collect());
    say!(
        "median IOPS without: {:.0}, with: {:.0}",
        median(pairs.iter().map(|p| p.without).collect()),
        median(pairs.iter().map(|p| p.with).collect())
    );
    say!("median IOPS ratio (with/without): {ratio:.3}");
    say!(
        "goal: IOPS ratio >= {GOAL_IOPS_RATIO}: {}",
        met(ratio >= GOAL_IOPS_RATIO)
    );
    if tracked.run_count == 0 {
        say!("ns per program run: n/a (no program runs were counted)");
        say!("goal: ns per program run <= {GOAL_NS_PER_RUN}: NOT met");
        bail!(
            "ferry's programs reported no runs during tracked fio runs; \
             are they attached, and is kernel.bpf_stats_enabled honoured?"
        );
    }
    // Lossy above 2^53 ns (104 days of program time): fine for a bench.
    let ns_per_run = tracked.run_time_ns as f64 / tracked.run_count as f64;
    say!(
        "ns per program run: {ns_per_run:.1} ({} runs)",
        tracked.run_count
    );
    say!(
        "goal: ns per program run <= {GOAL_NS_PER_RUN}: {}",
        met(ns_per_run <= GOAL_NS_PER_RUN)
    );
    Ok(())
}

/// Turns on the kernel's per-program run time accounting; restores the old
/// setting on drop.
struct BpfStatsEnabled {
    previous: String,
}

impl BpfStatsEnabled {
    fn enable() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL} failed"))?
            .trim()
            .to_owned();
        util::step(&format!(
            "enabling kernel.bpf_stats_enabled (was {previous})"
        ));
        fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL} failed"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        match fs::write(BPF_STATS_SYSCTL, &self.previous) {
            Ok(()) => say!("restored kernel.bpf_stats_enabled={}", self.previous),
            Err(err) => util::warn(format_args!(
                "clean-up: restoring kernel.bpf_stats_enabled={} failed: {err}",
                self.previous
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_iops_after_leading_noise() {
        let stdout = "note: something\n{\"jobs\":[{\"error\":0,\"write\":{\"iops\":301234.5}}]}\n";
        assert_eq!(parse_fio_iops(stdout).ok(), Some(301_234.5));
    }

    #[test]
    fn fio_job_error_is_an_error() {
        let stdout = "{\"jobs\":[{\"error\":5,\"write\":{\"iops\":0.0}}]}";
        assert!(parse_fio_iops(stdout).is_err());
        assert!(parse_fio_iops("no json here").is_err());
    }

    #[test]
    fn stats_delta_sums_programs_and_counts_new_ones_from_zero() {
        let before = parse_program_stats(
            r#"{"programs":[{"name":"bio_queue","run_time_ns":1000,"run_count":10}]}"#,
        )
        .ok()
        .unwrap_or_default();
        let after = parse_program_stats(
            r#"{"programs":[{"name":"bio_queue","run_time_ns":5000,"run_count":60},
                            {"name":"bio_complete","run_time_ns":700,"run_count":7}]}"#,
        )
        .ok()
        .unwrap_or_default();
        assert_eq!(after.len(), 2);
        assert_eq!(
            stats_delta(&before, &after),
            RunStats {
                run_time_ns: 4700,
                run_count: 57
            }
        );
    }

    #[test]
    fn stats_with_missing_fields_are_rejected() {
        assert!(parse_program_stats(r#"{"programs":[{"name":"x","run_count":1}]}"#).is_err());
        assert!(parse_program_stats(r#"{"progs":[]}"#).is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
