//! Change tracking: which chunks of a tracked block device were written.
//!
//! [`Tracker`] is the seam between the kernel side and the rest of ferry: the
//! Linux backend ([`linux::LinuxTracker`]) drives the eBPF program; the
//! Windows shim will plug in behind the same trait. A tracker only knows the
//! kernel's bits; the persisted, not-yet-shipped set lives in [`crate::dirty`].

pub mod bitmap;
pub mod btf;
pub mod linux;

use roaring::RoaringBitmap;
use serde::Serialize;

use crate::device::{BlockDevice, DevNum};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("tracking needs root (CAP_BPF and CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("BPF is unavailable: {reason}")]
    BpfUnavailable { reason: String },
    #[error("{dev} is already tracked")]
    AlreadyTracked { dev: DevNum },
    #[error("{dev} is not tracked")]
    NotTracked { dev: DevNum },
    #[error("too many tracked devices (at most {max})")]
    TooManyDevices { max: u32 },
    #[error("{dev}: {chunks} chunks of {chunk_size} bytes exceed the 2^32 a bitmap can hold; use a larger --chunk-size")]
    TooLarge {
        dev: DevNum,
        chunks: u64,
        chunk_size: u64,
    },
    #[error("cannot load the tracker program")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("BPF map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinned tracker state at {path}: {op} failed")]
    Pin {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
}

/// A chunk size: a power of two from 4 KiB to 1 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSize(u32);

impl ChunkSize {
    pub const DEFAULT: Self = Self(tracker_common::DEFAULT_CHUNK_SHIFT);

    pub fn from_shift(shift: u32) -> Option<Self> {
        (tracker_common::MIN_CHUNK_SHIFT..=tracker_common::MAX_CHUNK_SHIFT)
            .contains(&shift)
            .then_some(Self(shift))
    }

    pub fn from_bytes(bytes: u64) -> Option<Self> {
        if !bytes.is_power_of_two() {
            return None;
        }
        Self::from_shift(bytes.trailing_zeros())
    }

    pub fn shift(self) -> u32 {
        self.0
    }

    pub fn bytes(self) -> u64 {
        1 << self.0
    }
}

impl std::str::FromStr for ChunkSize {
    type Err = String;

    /// Accepts `65536`, `64K`, `64k`, `64KiB`, `1M`, `1MiB`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let (digits, mult) = if let Some(d) = lower.strip_suffix("kib").or(lower.strip_suffix('k'))
        {
            (d, 1024)
        } else if let Some(d) = lower.strip_suffix("mib").or(lower.strip_suffix('m')) {
            (d, 1024 * 1024)
        } else {
            (lower.as_str(), 1)
        };
        let bad = || format!("bad chunk size '{t}': use a power of two from 4K to 1M, e.g. 64K");
        let n: u64 = digits.trim().parse().map_err(|_| bad())?;
        Self::from_bytes(n.checked_mul(mult).ok_or_else(bad)?).ok_or_else(bad)
    }
}

impl std::fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.bytes();
        if b >= 1 << 20 {
            write!(f, "{}M", b >> 20)
        } else {
            write!(f, "{}K", b >> 10)
        }
    }
}

/// What to track: a device and its chunk size.
#[derive(Clone, Debug)]
pub struct TrackSpec {
    pub device: BlockDevice,
    pub chunk: ChunkSize,
}

impl TrackSpec {
    pub fn nr_chunks(&self) -> u64 {
        self.device.size_bytes().div_ceil(self.chunk.bytes())
    }
}

/// Identifies one load of the tracker: if it differs from what a device
/// recorded, the device's bits since then are unknown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Epoch {
    pub boot_id: String,
    /// Kernel id of the loaded program (unique within a boot).
    pub program_id: u32,
    /// When the program was loaded, ns since the Unix epoch. Informational:
    /// the kernel reports it relative to boot, so it jitters by a few
    /// microseconds between reads and is not part of the identity.
    pub loaded_at_ns: u64,
}

impl Epoch {
    /// Whether both name the same load of the tracker.
    pub fn same_load(&self, other: &Epoch) -> bool {
        self.boot_id == other.boot_id && self.program_id == other.program_id
    }
}

/// Counters of one tracked device, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub events: u64,
    pub writes: u64,
    pub completions: u64,
    pub overflows: u64,
    pub wide: u64,
}

/// A device as the kernel side sees it.
#[derive(Clone, Debug)]
pub struct SlotStatus {
    pub dev: DevNum,
    pub disk: DevNum,
    pub start_sector: u64,
    pub nr_sectors: u64,
    pub chunk: ChunkSize,
    pub slot: u32,
    pub counters: Counters,
    /// Kernel memory held by this device's bitmap.
    pub bitmap_bytes: u64,
}

/// What a device's old bitmap held when [`Tracker::resize`] retired it.
#[derive(Clone, Debug, Default)]
pub struct Resized {
    /// Chunks marked and not drained yet.
    pub bits: RoaringBitmap,
    /// The old slot's lost-mark count, as [`Counters::overflows`].
    pub overflows: u64,
}

/// Cost of the tracker programs (needs `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramStats {
    pub name: String,
    pub id: u32,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// The kernel half of change tracking.
pub trait Tracker {
    /// Starts tracking; returns the epoch the device is tracked under.
    fn add(&mut self, spec: &TrackSpec) -> Result<Epoch, TrackerError>;
    /// Tracks a device again at the size `spec` gives it now (a grown or
    /// shrunk volume), with no moment untracked: marks go to a new bitmap
    /// from one instant on. Returns what the old bitmap held until then.
    fn resize(&mut self, spec: &TrackSpec) -> Result<Resized, TrackerError>;
    /// Stops tracking and frees the bitmap; unloads the program with the last device.
    fn remove(&mut self, dev: DevNum) -> Result<(), TrackerError>;
    /// Every tracked device.
    fn list(&mut self) -> Result<Vec<SlotStatus>, TrackerError>;
    /// The current epoch, `None` when nothing is loaded.
    fn epoch(&mut self) -> Result<Option<Epoch>, TrackerError>;
    /// The dirty chunks, without clearing them.
    fn peek(&mut self, dev: DevNum) -> Result<RoaringBitmap, TrackerError>;
    /// Takes and clears the dirty chunks atomically: a bit set concurrently is
    /// either returned or left for the next drain.
    fn drain(&mut self, dev: DevNum) -> Result<RoaringBitmap, TrackerError>;
    /// Puts chunks taken by a drain back (the drain could not be kept), so a
    /// failed hand-over never loses a bit.
    fn reclaim(&mut self, dev: DevNum, set: &RoaringBitmap) -> Result<(), TrackerError>;
    /// Cost of the programs.
    fn stats(&mut self) -> Result<Vec<ProgramStats>, TrackerError>;
    /// Program runs the kernel skipped since the load (a tracepoint that
    /// fired again while the program ran on that CPU): marks that may be
    /// missing on any device.
    fn missed_runs(&mut self) -> Result<u64, TrackerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_parses_and_rejects() {
        assert_eq!("64K".parse::<ChunkSize>().unwrap().bytes(), 65536);
        assert_eq!("64KiB".parse::<ChunkSize>().unwrap().bytes(), 65536);
        assert_eq!("4096".parse::<ChunkSize>().unwrap().bytes(), 4096);
        assert_eq!("1M".parse::<ChunkSize>().unwrap().bytes(), 1 << 20);
        for bad in ["2K", "2M", "48K", "", "K", "-4K", "99999999999999999999K"] {
            assert!(bad.parse::<ChunkSize>().is_err(), "{bad}");
        }
        assert_eq!(ChunkSize::DEFAULT.to_string(), "64K");
    }
}
