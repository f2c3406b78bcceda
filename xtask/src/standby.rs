//! Running `ferry sync` and `ferry verify` against a standby image for the
//! demo and the sync bench, and reading their one-line JSON reports.

use std::ffi::OsString;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::rig::Rig;
use crate::util::say;

/// What one `ferry sync --json` did.
#[derive(Debug, PartialEq)]
pub struct SyncReport {
    /// `seed`, `incremental` or `resync`.
    pub mode: String,
    /// Bytes of the device the run brought up to date.
    pub changed_bytes: u64,
    /// Bytes written to the link, after compression.
    pub sent_bytes: u64,
    /// Bytes of all-zero chunks, sent as short records.
    pub zero_bytes: u64,
    pub compression_ratio: f64,
    /// Wall-clock time of the whole command, connecting included: what a
    /// user waits for, and what the baselines are timed by too.
    pub wall_secs: f64,
}

impl SyncReport {
    fn parse(stdout: &str, wall_secs: f64) -> Result<Self> {
        let json: Value = serde_json::from_str(stdout.trim()).context("invalid JSON")?;
        let count = |key: &str| {
            json[key]
                .as_u64()
                .with_context(|| format!("no unsigned \"{key}\""))
        };
        Ok(Self {
            mode: json["mode"]
                .as_str()
                .context("no \"mode\" string")?
                .to_owned(),
            changed_bytes: count("changed_bytes")?,
            sent_bytes: count("sent_bytes")?,
            zero_bytes: count("zero_bytes")?,
            compression_ratio: json["compression_ratio"]
                .as_f64()
                .context("no number \"compression_ratio\"")?,
            wall_secs,
        })
    }

    /// One line for a reader: what was covered, what crossed the link.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} brought up to date, {} sent ({} of zeros skipped, compression {:.2}x), \
             in {:.2} s",
            self.mode,
            mib(self.changed_bytes),
            mib(self.sent_bytes),
            mib(self.zero_bytes),
            self.compression_ratio,
            self.wall_secs
        )
    }
}

/// `ferry sync DEVICE TARGET --json EXTRA...`, timed; prints what it did.
pub fn sync(rig: &Rig, device: &str, target: &str, extra: &[OsString]) -> Result<SyncReport> {
    let cmd = rig
        .ferry()
        .args(["sync", device, target, "--json"])
        .args(extra);
    let start = Instant::now();
    let output = cmd.output()?;
    let wall_secs = start.elapsed().as_secs_f64();
    let report = SyncReport::parse(&output.stdout, wall_secs)
        .context("reading `ferry sync --json` output failed")?;
    say!("{}", report.describe());
    Ok(report)
}

/// What `ferry verify --json` found.
#[derive(Debug, PartialEq)]
pub struct VerifyReport {
    pub identical: bool,
    pub compared_bytes: Option<u64>,
    pub differing_bytes: u64,
    /// The first differing ranges, `[offset, length]`, and how many in all.
    pub first_ranges: Vec<[u64; 2]>,
    pub range_count: usize,
}

impl VerifyReport {
    fn parse(stdout: &str) -> Result<Self> {
        const SHOWN: usize = 5;
        let json: Value = serde_json::from_str(stdout.trim()).context("invalid JSON")?;
        let ranges = json["ranges"].as_array().context("no \"ranges\" array")?;
        let first_ranges = ranges
            .iter()
            .take(SHOWN)
            .map(|range| {
                let field = |i: usize| range.get(i).and_then(Value::as_u64);
                field(0)
                    .zip(field(1))
                    .map(|(offset, len)| [offset, len])
                    .context("a range is not [offset, length]")
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            identical: json["identical"]
                .as_bool()
                .context("no \"identical\" boolean")?,
            compared_bytes: json["compared_bytes"].as_u64(),
            differing_bytes: json["differing_bytes"]
                .as_u64()
                .context("no unsigned \"differing_bytes\"")?,
            first_ranges,
            range_count: ranges.len(),
        })
    }

    /// An error naming what differs, unless identical.
    pub fn require_identical(&self) -> Result<()> {
        if self.identical {
            return Ok(());
        }
        let ranges: Vec<String> = self
            .first_ranges
            .iter()
            .map(|[offset, len]| format!("{len} bytes at {offset}"))
            .collect();
        bail!(
            "the standby image differs from the device: {} bytes in {} ranges ({}{})",
            self.differing_bytes,
            self.range_count,
            ranges.join(", "),
            if self.range_count > ranges.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
}

/// `ferry verify DEVICE TARGET --json EXTRA...`: whether the image matches
/// the device (exit 0 identical, 1 different); an error only if it could
/// not compare.
pub fn verify(rig: &Rig, device: &str, target: &str, extra: &[OsString]) -> Result<VerifyReport> {
    let output = rig
        .ferry()
        .args(["verify", device, target, "--json"])
        .args(extra)
        .output_unchecked()?;
    if !matches!(output.status.code(), Some(0 | 1)) {
        bail!("`ferry verify` failed: {}", output.failure_detail());
    }
    let report =
        VerifyReport::parse(&output.stdout).context("reading `ferry verify --json` failed")?;
    if report.identical != output.status.success() {
        bail!(
            "`ferry verify` said identical={} but exited with {}",
            report.identical,
            output.status
        );
    }
    match (report.identical, report.compared_bytes) {
        (true, Some(bytes)) => say!("identical ({} compared)", mib(bytes)),
        (true, None) => say!("identical"),
        (false, _) => say!(
            "DIFFERENT: {} bytes in {} ranges",
            report.differing_bytes,
            report.range_count
        ),
    }
    Ok(report)
}

/// `bytes` in MiB, for people.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_report_reads_ferry_json() {
        let stdout = r#"{"device":"/dev/loop7","target":"file:///t/a.img","mode":"incremental",
            "resync":false,"changed_bytes":655360,"sent_bytes":600000,"read_bytes":655360,
            "zero_bytes":0,"data_bytes":655360,"compression_ratio":1.09,"duration_secs":0.2,
            "throughput_bytes_per_sec":3276800.0,"generation":2}"#;
        let report = SyncReport::parse(stdout, 0.5).ok();
        assert_eq!(
            report,
            Some(SyncReport {
                mode: "incremental".to_owned(),
                changed_bytes: 655_360,
                sent_bytes: 600_000,
                zero_bytes: 0,
                compression_ratio: 1.09,
                wall_secs: 0.5,
            })
        );
    }

    #[test]
    fn sync_report_without_counts_is_rejected() {
        assert!(SyncReport::parse(r#"{"mode":"seed"}"#, 1.0).is_err());
        assert!(SyncReport::parse("seeded /dev/loop7", 1.0).is_err());
    }

    #[test]
    fn verify_report_names_the_first_differences() {
        let stdout = r#"{"identical":false,"compared_bytes":1048576,"differing_bytes":8192,
            "ranges":[[0,4096],[65536,4096]]}"#;
        let report = VerifyReport::parse(stdout);
        let err = report
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|r| r.require_identical().map_err(|e| e.to_string()))
            .err()
            .unwrap_or_default();
        assert!(err.contains("8192 bytes in 2 ranges"), "{err}");
        assert!(err.contains("4096 bytes at 65536"), "{err}");
    }

    #[test]
    fn identical_verify_report_passes() {
        let report = VerifyReport::parse(r#"{"identical":true,"differing_bytes":0,"ranges":[]}"#);
        assert!(report.is_ok_and(|r| r.require_identical().is_ok()));
    }
}
