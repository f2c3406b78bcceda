//! ferry keeps standby copies of a server's disks current by shipping only the
//! blocks that changed.
//!
//! Data flow, and the module for each step:
//! - [`tracker`]: the kernel marks written chunks in per-device bitmaps;
//! - [`dirty`]: drains become persisted roaring sets of chunks, then extents;
//! - [`track`]: the user-facing operations over both, with their invariants;
//! - [`device`]: what a block device is and where it sits on its disk;
//! - [`sys`]: the only code that calls libc.

pub mod device;
pub mod dirty;
pub mod pipeline;
pub mod sys;
pub mod throttle;
pub mod track;
pub mod tracker;
