//! Raw standby images: a sparse file. A boot point is a copy of it named
//! `IMAGE.VYYYYMMDD_hhmmss` next to it: a reflink clone where the filesystem
//! shares blocks (xfs, btrfs), so it costs no space until the working image
//! changes; otherwise a full (sparse) copy, with a warning about space.

use std::{fs::File, os::unix::fs::FileExt};

use super::{is_boot_point_name, BootFile, Dir, ImageError, Standby};
use crate::sys::fs as sysfs;

pub struct Raw {
    dir: Dir,
    name: String,
    file: File,
    size: u64,
}

impl Raw {
    /// Opens the raw image `name` in `dir`; its length is the disk size.
    pub fn open(dir: Dir, name: &str) -> Result<Self, ImageError> {
        let file = dir.open_rw(name).map_err(ImageError::io(name, "open"))?;
        let size = file.metadata().map_err(ImageError::io(name, "stat"))?.len();
        Ok(Self {
            dir,
            name: name.to_owned(),
            file,
            size,
        })
    }

    fn point_file(&self, point: &str) -> String {
        format!("{}.{point}", self.name)
    }

    fn require(&self, point: &str) -> Result<(), ImageError> {
        if self.boot_points().iter().any(|p| p == point) {
            Ok(())
        } else {
            Err(ImageError::NoSuchBootPoint {
                name: point.to_owned(),
            })
        }
    }
}

impl Standby for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        super::check_range(offset, data.len() as u64, self.size)?;
        self.file.write_all_at(data, offset).map_err(ImageError::io(
            &self.name,
            format!("write at offset {offset}"),
        ))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_range(offset, len, self.size)?;
        match sysfs::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if sysfs::is_unsupported(&e) => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.write_at(at, &zeros[..n])?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(ImageError::io(
                &self.name,
                format!("zero at offset {offset}"),
            )(e)),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        super::check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(ImageError::io(
            &self.name,
            format!("read at offset {offset}"),
        ))
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.file
            .sync_all()
            .map_err(ImageError::io(&self.name, "fsync"))
    }

    fn create_boot_point(&mut self, point: &str) -> Result<(), ImageError> {
        if self.boot_points().iter().any(|p| p == point) {
            return Err(ImageError::BootPointExists {
                name: point.to_owned(),
            });
        }
        self.flush()?;
        let to = self.point_file(point);
        let cloned = self
            .dir
            .clone_file(&self.name, &to)
            .map_err(ImageError::io(&to, "copy the working image"))?;
        if !cloned {
            tracing::warn!(
                "{to}: the filesystem cannot share blocks (reflink), so this boot point is a \
                 full copy and uses as much space as the data in the image"
            );
        }
        self.dir
            .sync()
            .map_err(ImageError::io(&to, "fsync directory"))
    }

    fn boot_points(&self) -> Vec<String> {
        let prefix = format!("{}.", self.name);
        let mut out: Vec<String> = self
            .dir
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.strip_prefix(&prefix).map(str::to_owned))
            .filter(|p| is_boot_point_name(p))
            .collect();
        out.sort(); // the names are timestamps
        out
    }

    fn revert_to(&mut self, point: &str) -> Result<(), ImageError> {
        self.require(point)?;
        let tmp = format!("{}.reverting", self.name);
        let _ = self.dir.remove(&tmp);
        self.dir
            .clone_file(&self.point_file(point), &tmp)
            .map_err(ImageError::io(&tmp, "copy the boot point"))?;
        self.dir
            .rename(&tmp, &self.name)
            .map_err(ImageError::io(&self.name, "replace the working image"))?;
        self.dir
            .sync()
            .map_err(ImageError::io(&self.name, "fsync directory"))?;
        self.file = self
            .dir
            .open_rw(&self.name)
            .map_err(ImageError::io(&self.name, "open"))?;
        Ok(())
    }

    fn delete_boot_point(&mut self, point: &str) -> Result<(), ImageError> {
        self.require(point)?;
        let file = self.point_file(point);
        self.dir
            .remove(&file)
            .map_err(ImageError::io(&file, "remove"))?;
        self.dir
            .sync()
            .map_err(ImageError::io(&file, "fsync directory"))
    }

    /// Each raw boot point is a whole image, so the newer of the two oldest
    /// already holds its content: the oldest is removed.
    fn merge_oldest(&mut self) -> Result<(), ImageError> {
        let points = self.boot_points();
        if points.len() < 2 {
            return Ok(());
        }
        self.delete_boot_point(&points[0])
    }

    /// The image itself, or the boot point's whole copy beside it.
    fn boot_file(&self, point: Option<&str>) -> Result<BootFile, ImageError> {
        let path = match point {
            None => self.name.clone(),
            Some(p) => {
                self.require(p)?;
                self.point_file(p)
            }
        };
        Ok(BootFile::new(path, "raw"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::TempDir;

    #[test]
    fn boot_points_keep_their_content() {
        let t = TempDir::new("raw");
        let file = std::fs::File::create(t.0.join("web.img")).unwrap();
        file.set_len(1 << 20).unwrap();
        let mut raw = Raw::open(Dir::open(&t.0).unwrap(), "web.img").unwrap();
        raw.write_at(4096, &[1; 4096]).unwrap();
        raw.create_boot_point("V20260101_000000").unwrap();
        raw.write_at(4096, &[2; 4096]).unwrap();
        raw.create_boot_point("V20260102_000000").unwrap();
        raw.write_at(8192, &[3; 4096]).unwrap();
        assert_eq!(raw.boot_points(), ["V20260101_000000", "V20260102_000000"]);
        let read = |name: &str| std::fs::read(t.0.join(name)).unwrap();
        assert_eq!(read("web.img.V20260101_000000")[4096], 1);
        assert_eq!(read("web.img.V20260102_000000")[4096], 2);
        assert_eq!(read("web.img.V20260102_000000")[8192], 0);
        // What qemu boots: the image, or a boot point's copy.
        assert_eq!(
            raw.boot_file(None).unwrap(),
            BootFile::new("web.img", "raw")
        );
        assert_eq!(
            raw.boot_file(Some("V20260101_000000")).unwrap(),
            BootFile::new("web.img.V20260101_000000", "raw")
        );
        assert!(matches!(
            raw.boot_file(Some("V20990101_000000")),
            Err(ImageError::NoSuchBootPoint { .. })
        ));
        // Retention: the newer keeps its content.
        raw.merge_oldest().unwrap();
        assert_eq!(raw.boot_points(), ["V20260102_000000"]);
        assert_eq!(read("web.img.V20260102_000000")[4096], 2);
        // Revert: the working image equals the boot point, which stays.
        raw.revert_to("V20260102_000000").unwrap();
        let mut b = [0u8; 1];
        raw.read_at(8192, &mut b).unwrap();
        assert_eq!(b[0], 0);
        raw.write_at(4096, &[9; 4096]).unwrap();
        assert_eq!(read("web.img.V20260102_000000")[4096], 2);
        assert!(matches!(
            raw.revert_to("V20990101_000000"),
            Err(ImageError::NoSuchBootPoint { .. })
        ));
        assert!(matches!(
            raw.write_at(1 << 20, &[0; 1]),
            Err(ImageError::OutOfRange { .. })
        ));
    }
}
