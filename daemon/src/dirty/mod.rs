//! Dirty sets: chunk numbers in a roaring bitmap, persisted until shipped, and
//! turned into byte extents for readers.

pub mod extents;
pub mod store;
pub mod targets;

pub use extents::{extents, Extent};
