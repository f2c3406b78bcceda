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
//! - [`sys`]: the only code that calls libc.

pub mod agent;
pub mod device;
pub mod dirty;
pub mod hash;
pub mod protocol;
pub mod pipeline;
pub mod sys;
pub mod throttle;
pub mod track;
pub mod tracker;
