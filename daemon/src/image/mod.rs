//! Standby images in each hypervisor's own format, with boot points.
//!
//! | format | working image | boot points |
//! |---|---|---|
//! | raw | sparse file | reflink clones (xfs, btrfs), else full copies |
//! | qcow2 | qcow2 | internal snapshots `VYYYYMMDD_hhmmss` |
//! | vmdk | monolithicFlat base + `.vmx` | sparse delta chain, read-only once taken |
//! | vhdx | dynamic VHDX | AVHDX differencing chain, read-only once taken |
//!
//! Every format sits behind [`Standby`]; the agent never knows which one it
//! writes. Every file a format touches is opened through [`Dir`], which
//! resolves names beneath the image's directory only (`openat2` with
//! `RESOLVE_BENEATH`), so no format can write outside the agent's root.
//!
//! Invariant 4: a boot point never changes once taken. Retention merges the
//! two oldest into one that holds the newer one's content, and leaves every
//! other boot point as it was.

pub mod qcow2;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    str::FromStr,
};

use crate::sys::fs::{self as sysfs, Open};

pub mod raw;
pub mod vhdx;
pub mod vmdk;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{file}: {op} failed")]
    Io {
        file: String,
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: corrupt {format} image: {reason}")]
    Corrupt {
        file: String,
        format: &'static str,
        reason: String,
    },
    #[error("{file}: {format} feature not supported: {what}")]
    Unsupported {
        file: String,
        format: &'static str,
        what: String,
    },
    #[error("no boot point named {name:?}")]
    NoSuchBootPoint { name: String },
    #[error("a boot point named {name:?} already exists")]
    BootPointExists { name: String },
    #[error("{format} images keep at most {max} boot points")]
    TooManyBootPoints { format: &'static str, max: usize },
    #[error("write of {len} bytes at offset {offset} is beyond the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl ImageError {
    pub fn io(file: &str, op: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let file = file.to_owned();
        let op = op.into();
        move |source| ImageError::Io { file, op, source }
    }

    pub fn corrupt(format: &'static str, file: &str, reason: impl Into<String>) -> ImageError {
        ImageError::Corrupt {
            file: file.to_owned(),
            format,
            reason: reason.into(),
        }
    }

    pub fn unsupported(format: &'static str, file: &str, what: impl Into<String>) -> ImageError {
        ImageError::Unsupported {
            file: file.to_owned(),
            format,
            what: what.into(),
        }
    }
}

/// `OutOfRange` unless `len` bytes at `offset` lie within a `size`-byte disk.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// The on-disk format of a standby image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
        }
    }

    /// The format an image name implies: `.qcow2`, `.vmdk`, `.vhdx`, and raw
    /// for anything else (`.img`, `.raw`, no extension).
    pub fn from_name(name: &str) -> Format {
        match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => Format::Qcow2,
            Some(e) if e.eq_ignore_ascii_case("vmdk") => Format::Vmdk,
            Some(e) if e.eq_ignore_ascii_case("vhdx") => Format::Vhdx,
            _ => Format::Raw,
        }
    }

    /// Whether ferry can grow an image of this format with its source
    /// ([`grow`]).
    pub fn grows(self) -> bool {
        matches!(self, Format::Raw | Format::Qcow2)
    }

    /// Most boot points the format keeps (qcow2: what KVM tooling handles
    /// comfortably; the others: the product limit).
    pub fn max_boot_points(self) -> usize {
        match self {
            Format::Qcow2 => 22,
            _ => 30,
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(format!(
                "unknown image format {other:?} (known: raw, qcow2, vmdk, vhdx)"
            )),
        }
    }
}

/// A standby image: the working copy the source writes into, and its boot
/// points, oldest first.
pub trait Standby: Send {
    /// Size of the disk the image holds, in bytes.
    fn size(&self) -> u64;
    /// Writes `data` at `offset` of the working image.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError>;
    /// Makes `[offset, offset + len)` of the working image read as zeroes,
    /// freeing space where the format can.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// Reads the working image (unallocated ranges read as zeroes).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// Makes everything written so far durable (data and metadata).
    fn flush(&mut self) -> Result<(), ImageError>;
    /// Freezes the working image's current content as boot point `name`.
    /// Later writes never change it.
    fn create_boot_point(&mut self, name: &str) -> Result<(), ImageError>;
    /// Names of the boot points, oldest first.
    fn boot_points(&self) -> Vec<String>;
    /// Makes the working image equal boot point `name` (which stays).
    fn revert_to(&mut self, name: &str) -> Result<(), ImageError>;
    /// Removes boot point `name`; the working image and the others keep
    /// their content.
    fn delete_boot_point(&mut self, name: &str) -> Result<(), ImageError>;
    /// Merges the two oldest boot points into one with the newer one's name
    /// and content; the other boot points and the working image keep theirs.
    fn merge_oldest(&mut self) -> Result<(), ImageError>;
    /// The file qemu opens to boot the working image (`None`) or boot point
    /// `point`. `NoSuchBootPoint` if there is none by that name;
    /// `Unsupported` where qemu cannot read what the hypervisor would open
    /// (a VHDX differencing disk).
    fn boot_file(&self, point: Option<&str>) -> Result<BootFile, ImageError>;
}

/// What a hypervisor opens to boot a standby image or one of its boot points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFile {
    /// The file, relative to the image's directory. A VMDK delta names its
    /// parents itself.
    pub path: String,
    /// qemu's name for the file's format (`-drive format=`).
    pub format: &'static str,
    /// The internal snapshot of `path` that holds the boot point (qcow2);
    /// `None` when the file's current content is what boots.
    pub snapshot: Option<String>,
}

impl BootFile {
    pub fn new(path: impl Into<String>, format: &'static str) -> Self {
        Self {
            path: path.into(),
            format,
            snapshot: None,
        }
    }
}

/// The directory an image and its companion files live in. Every name is
/// resolved beneath it; `..`, absolute names and symlinks that lead out
/// are refused by the kernel.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            fd: sysfs::open_dir(path)?,
        })
    }

    /// An existing file, for reading.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        sysfs::open_beneath(self.fd.as_fd(), Path::new(name), Open::Read)
    }

    /// An existing file, for reading and writing.
    pub fn open_rw(&self, name: &str) -> io::Result<File> {
        sysfs::open_beneath(self.fd.as_fd(), Path::new(name), Open::ReadWrite)
    }

    /// A new file (mode 0600); fails if `name` exists.
    pub fn create(&self, name: &str) -> io::Result<File> {
        sysfs::open_beneath(
            self.fd.as_fd(),
            Path::new(name),
            Open::CreateNew { mode: 0o600 },
        )
    }

    pub fn exists(&self, name: &str) -> bool {
        self.open_read(name).is_ok()
    }

    /// Renames within the directory, replacing `to`.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        sysfs::rename_in(self.fd.as_fd(), from, to)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        sysfs::unlink_in(self.fd.as_fd(), name)
    }

    /// Makes renames and removals durable.
    pub fn sync(&self) -> io::Result<()> {
        sysfs::open_beneath(self.fd.as_fd(), Path::new("."), Open::Dir)?.sync_all()
    }

    /// Names of the entries in the directory.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let dir = sysfs::open_beneath(self.fd.as_fd(), Path::new("."), Open::Dir)?;
        use std::os::fd::AsRawFd;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Replaces `name` with `bytes` so that a crash leaves the old or the new
    /// content (temp file, fsync, rename, fsync of the directory).
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        match self.remove(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = self.create(&tmp)?;
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        if let Err(e) = written.and_then(|()| self.rename(&tmp, name)) {
            let _ = self.remove(&tmp);
            return Err(e);
        }
        self.sync()
    }

    /// A copy of `from` named `to` (a new file): a reflink clone where the
    /// filesystem shares blocks (xfs, btrfs), else a full copy. Returns
    /// whether it was a clone.
    pub fn clone_file(&self, from: &str, to: &str) -> io::Result<bool> {
        let src = self.open_read(from)?;
        let mut dst = self.create(to)?;
        let done = match sysfs::reflink(&dst, &src) {
            Ok(()) => Ok(true),
            Err(e) if sysfs::is_unsupported(&e) => {
                sysfs::copy_sparse(&src, &mut dst).map(|()| false)
            }
            Err(e) => Err(e),
        }
        .and_then(|cloned| dst.sync_all().map(|()| cloned));
        if done.is_err() {
            let _ = self.remove(to);
        }
        done
    }
}

/// Creates a new image of `format` named `name` in `dir` holding a disk of
/// `size` bytes. The name must not exist.
pub fn create(format: Format, dir: &Dir, name: &str, size: u64) -> Result<(), ImageError> {
    match format {
        Format::Raw => {
            let f = dir.create(name).map_err(ImageError::io(name, "create"))?;
            f.set_len(size)
                .map_err(ImageError::io(name, format!("extend to {size} bytes")))
        }
        Format::Qcow2 => qcow2::Qcow2::create(dir, name, size).map(drop),
        Format::Vmdk => vmdk::Vmdk::create(dir, name, size).map(drop),
        Format::Vhdx => vhdx::Vhdx::create(dir, name, size).map(drop),
    }
}

/// Opens the existing image `name` of `format` in `dir`.
pub fn open(format: Format, dir: Dir, name: &str) -> Result<Box<dyn Standby>, ImageError> {
    match format {
        Format::Raw => Ok(Box::new(raw::Raw::open(dir, name)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2::open(&dir, name)?)),
        Format::Vmdk => Ok(Box::new(vmdk::Vmdk::open(&dir, name)?)),
        Format::Vhdx => Ok(Box::new(vhdx::Vhdx::open(&dir, name)?)),
    }
}

/// Grows the disk of image `name` to `size` bytes; the new space reads as
/// zeroes. Raw and qcow2 only ([`Format::grows`]).
pub fn grow(format: Format, dir: Dir, name: &str, size: u64) -> Result<(), ImageError> {
    match format {
        Format::Raw => dir
            .open_rw(name)
            .and_then(|f| f.set_len(size))
            .map_err(ImageError::io(name, format!("extend to {size} bytes"))),
        Format::Qcow2 => qcow2::Qcow2::open(&dir, name)?.grow(size),
        Format::Vmdk | Format::Vhdx => Err(ImageError::Unsupported {
            file: name.to_owned(),
            format: format.name(),
            what: "growing the disk".to_owned(),
        }),
    }
}

/// Opens (making it if needed) `IMAGE.ferry.lock` beside `image` and tries
/// to lock it: the lock every session that changes or reads the image's
/// files as a whole holds. `None` when another session holds it. The lock
/// has its own file because formats replace the image file itself (a
/// revert, a new delta on top), which would drop a lock held on it.
pub fn try_lock_session(dir: &Dir, image: &str) -> io::Result<Option<File>> {
    let name = format!("{image}.ferry.lock");
    let file = match dir.open_rw(&name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match dir.create(&name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => dir.open_rw(&name),
            other => other,
        },
        other => other,
    }?;
    Ok(sysfs::try_lock_exclusive(&file)?.then_some(file))
}

/// Whether `name` is a boot point name (`VYYYYMMDD_hhmmss`).
pub fn is_boot_point_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 16
        && b[0] == b'V'
        && b[9] == b'_'
        && b[1..9].iter().chain(&b[10..]).all(u8::is_ascii_digit)
}

/// The boot point name for a Unix time: `VYYYYMMDD_hhmmss` (UTC), as KVM
/// admins know it from `qemu-img snapshot -l`.
pub fn boot_point_name(unix_secs: u64) -> String {
    let t = crate::Utc::at(unix_secs);
    format!(
        "V{:04}{:02}{:02}_{:02}{:02}{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_point_names_are_utc_timestamps() {
        assert_eq!(boot_point_name(0), "V19700101_000000");
        // 2026-11-21 21:47:05 UTC
        assert_eq!(boot_point_name(1_795_297_625), "V20261121_214705");
        // A leap day.
        assert_eq!(boot_point_name(951_782_400), "V20000229_000000");
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(Format::from_name("web.qcow2"), Format::Qcow2);
        assert_eq!(Format::from_name("a/b/web.VMDK"), Format::Vmdk);
        assert_eq!(Format::from_name("web.vhdx"), Format::Vhdx);
        assert_eq!(Format::from_name("web.img"), Format::Raw);
        assert_eq!(Format::from_name("web"), Format::Raw);
        assert!("qcow3".parse::<Format>().is_err());
    }
}
