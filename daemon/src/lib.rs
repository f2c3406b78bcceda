//! ferry keeps standby copies of a server's disks current by shipping only the
//! blocks that changed.
//!
//! Data flow, and the module for each step:
//! - [`tracker`]: the kernel marks written chunks in per-device bitmaps;
//! - [`dirty`]: drains become persisted roaring sets of chunks, then extents;
//! - [`track`]: the user-facing operations over both, with their invariants;
//! - [`device`]: what a block device is and where it sits on its disk;
//! - [`protocol`]: the frames between source and target;
//! - [`agent`]: the target side, applying frames to a standby image;
//! - [`hash`]: block hashes for checksum resync and frame content;
//! - [`image`]: standby images in raw, qcow2, VMDK and VHDX, with boot points;
//! - [`sync`]: one job that brings a target image up to date, and `verify`;
//! - [`boottest`]: boots a standby or a boot point under qemu to prove it boots;
//! - [`pipeline`]: io_uring reads, zero detection and the zstd pool;
//! - [`throttle`]: rate limits and I/O priority;
//! - [`transport`]: reaching the agent, locally or over SSH;
//! - [`sys`]: the only code that calls libc.

pub mod agent;
pub mod boottest;
pub mod device;
pub mod dirty;
pub mod export;
pub mod hash;
pub mod image;
pub mod pipeline;
pub mod protocol;
pub mod sync;
pub mod sys;
#[cfg(test)]
pub(crate) mod testutil;
pub mod throttle;
pub mod track;
pub mod tracker;
pub mod transport;

/// `bytes` for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A Unix time as a UTC calendar date and clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u64,
    pub minute: u64,
    pub second: u64,
}

impl Utc {
    pub fn at(unix_secs: u64) -> Self {
        let (year, month, day) = civil_from_days((unix_secs / 86_400) as i64);
        let rem = unix_secs % 86_400;
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }
}

impl std::fmt::Display for Utc {
    /// `2026-11-22 09:01:19 UTC`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How long ago `then` (Unix seconds) was, for people: `40 s`, `12 min`,
/// `3 h`, `5 days`.
pub fn ago(then: u64, now: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_and_ages() {
        assert_eq!(Utc::at(0).to_string(), "1970-01-01 00:00:00 UTC");
        assert_eq!(Utc::at(951_782_400).to_string(), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            Utc::at(1_795_297_625).to_string(),
            "2026-11-21 21:47:05 UTC"
        );
        assert_eq!(ago(100, 100), "0 s");
        assert_eq!(ago(0, 119), "119 s");
        assert_eq!(ago(0, 120), "2 min");
        assert_eq!(ago(0, 7200), "2 h");
        assert_eq!(ago(0, 3 * 86_400), "3 days");
        assert_eq!(ago(200, 100), "0 s", "a clock set back is not negative");
    }
}
