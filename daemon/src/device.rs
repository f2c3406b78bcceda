//! What ferry needs to know about a block device: its numbers, its whole disk,
//! where it starts on that disk and how long it is. All read from sysfs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracker_common::kernel_dev;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: not a block device")]
    NotBlockDevice { path: PathBuf },
    #[error("{path}: cannot read {what}")]
    Sysfs {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A `major:minor` pair with both encodings ferry needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    /// The kernel's internal `dev_t` (`MKDEV`), as the tracker sees it.
    pub fn kernel(self) -> u32 {
        kernel_dev(self.major, self.minor)
    }

    pub fn from_kernel(dev: u32) -> Self {
        Self {
            major: dev >> 20,
            minor: dev & 0xf_ffff,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A block device (whole disk or partition) and where it sits on its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The path the user named, canonicalised.
    pub path: PathBuf,
    pub dev: DevNum,
    /// The whole disk (equal to `dev` for a whole disk).
    pub disk: DevNum,
    /// First sector on the whole disk (0 for a whole disk).
    pub start_sector: u64,
    /// Length in 512-byte sectors.
    pub nr_sectors: u64,
    /// Zone size in sectors for zoned disks, 0 otherwise.
    pub zone_sectors: u32,
    /// The disk is blk-mq (request-based), as opposed to bio-based.
    pub request_based: bool,
    /// The whole disk's media sequence number (`diskseq`, Linux 5.15 on).
    /// The kernel gives a disk a new one whenever it may hold other data:
    /// a loop device detached or attached to a file, a medium changed, the
    /// same number reused for another disk. `None` where there is none.
    pub diskseq: Option<u64>,
}

impl BlockDevice {
    /// Resolves `path` (e.g. `/dev/loop7` or `/dev/loop7p1`).
    pub fn resolve(path: &Path) -> Result<Self, DeviceError> {
        let canon = path.canonicalize().map_err(|_| DeviceError::NotFound {
            path: path.to_owned(),
        })?;
        let (major, minor) = sys::blk::block_dev_numbers(&canon)
            .map_err(|source| DeviceError::Open {
                path: canon.clone(),
                source,
            })?
            .ok_or_else(|| DeviceError::NotBlockDevice {
                path: path.to_owned(),
            })?;
        let dev = DevNum { major, minor };
        let sysdir = PathBuf::from(format!("/sys/dev/block/{dev}"));
        let read = |file: &Path, what: &str| -> Result<String, DeviceError> {
            fs::read_to_string(file).map_err(|source| DeviceError::Sysfs {
                path: canon.clone(),
                what: what.to_owned(),
                source,
            })
        };
        let num = |file: &Path, what: &str| -> Result<u64, DeviceError> {
            read(file, what)?
                .trim()
                .parse()
                .map_err(|_| DeviceError::Sysfs {
                    path: canon.clone(),
                    what: what.to_owned(),
                    source: std::io::Error::other("not a number"),
                })
        };
        let nr_sectors = num(&sysdir.join("size"), "size")?;
        let (disk, start_sector, diskdir) = if sysdir.join("partition").exists() {
            let start = num(&sysdir.join("start"), "partition start")?;
            let parent = sysdir.join("..");
            let disk =
                DevNum::parse(&read(&parent.join("dev"), "parent disk")?).ok_or_else(|| {
                    DeviceError::Sysfs {
                        path: canon.clone(),
                        what: "parent disk".into(),
                        source: std::io::Error::other("malformed dev"),
                    }
                })?;
            (disk, start, parent)
        } else {
            (dev, 0, sysdir.clone())
        };
        let zoned = fs::read_to_string(diskdir.join("queue/zoned")).unwrap_or_default();
        let zone_sectors = if zoned.trim().is_empty() || zoned.trim() == "none" {
            0
        } else {
            fs::read_to_string(diskdir.join("queue/chunk_sectors"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let request_based = diskdir.join("mq").exists();
        let diskseq = fs::read_to_string(diskdir.join("diskseq"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Self {
            request_based,
            diskseq,
            path: canon,
            dev,
            disk,
            start_sector,
            nr_sectors,
            zone_sectors,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.nr_sectors * 512
    }

    /// Write bios in flight on the whole disk, as the block layer counts them.
    pub fn writes_in_flight(&self) -> Option<u64> {
        let text = fs::read_to_string(format!("/sys/dev/block/{}/inflight", self.disk)).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_num_round_trips_kernel_encoding() {
        let d = DevNum {
            major: 259,
            minor: 70_000,
        };
        assert_eq!(DevNum::from_kernel(d.kernel()), d);
        assert_eq!(d.to_string(), "259:70000");
        assert_eq!(DevNum::parse("7:3\n"), Some(DevNum { major: 7, minor: 3 }));
        assert_eq!(DevNum::parse("junk"), None);
    }

    #[test]
    fn resolve_refuses_a_regular_file() {
        let err = BlockDevice::resolve(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, DeviceError::NotBlockDevice { .. }), "{err}");
        let err = BlockDevice::resolve(Path::new("/nonexistent/ferry")).unwrap_err();
        assert!(matches!(err, DeviceError::NotFound { .. }), "{err}");
    }
}
