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
