//! The standby image a session writes, opened beneath the agent's root and
//! locked for the life of the session.
//!
//! Confinement (invariant 5): the image's directory is opened with `openat2`
//! `RESOLVE_BENEATH` relative to the root, and the image and its commit
//! record with single names relative to that directory, so neither `..`, an
//! absolute path nor a symlink can lead a write outside the root. Parent
//! directories are never created.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

use super::{record, AgentError};
use crate::{
    image::Format,
    protocol::ErrorCode,
    sys::fs::{self as sysfs, Open},
};

pub(super) struct Image {
    /// The path the source named, relative to the root, for messages.
    pub name: String,
    /// The directory holding the image and its commit record.
    dir: OwnedFd,
    /// The same directory as a path, for programs that take paths (qemu,
    /// qemu-img). It was resolved beneath the root when `dir` was opened.
    pub dir_path: PathBuf,
    /// The image's name within `dir`.
    file_name: String,
    pub file: File,
    /// This session created the file.
    pub created: bool,
    /// `IMAGE.ferry.lock`, flocked once the session may change anything.
    lock: Option<File>,
}

impl Image {
    /// Opens, or creates empty, the image `name` beneath `root` and takes its
    /// lock. Nothing outside `root` is touched; a refused name creates nothing.
    pub fn open(root: &Path, name: &str) -> Result<Self, AgentError> {
        Self::open_as(root, name, Mode::Write)
    }

    /// Opens an existing image for reading only, without its lock (for
    /// `ferry verify`). Creates nothing.
    pub fn open_read_only(root: &Path, name: &str) -> Result<Self, AgentError> {
        Self::open_as(root, name, Mode::ReadOnly)
    }

    /// Opens an existing image with its lock, creating nothing (for
    /// `ferry boot-points`).
    pub fn open_existing(root: &Path, name: &str) -> Result<Self, AgentError> {
        Self::open_as(root, name, Mode::Existing)
    }

    fn open_as(root: &Path, name: &str, mode: Mode) -> Result<Self, AgentError> {
        let read_only = mode == Mode::ReadOnly;
        let (parent, file_name) = split_name(name)?;
        let root_fd = sysfs::open_dir(root).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                // The usual slip: a directory not made yet on the target.
                return AgentError::refused(
                    ErrorCode::Io,
                    format!(
                        "directory {} does not exist; ferry creates the image, \
                         not the directory it goes in",
                        root.display()
                    ),
                );
            }
            AgentError::refused_by(
                ErrorCode::Io,
                format!("target root {}: open failed", root.display()),
                e,
            )
        })?;
        let escape = || {
            AgentError::refused(
                ErrorCode::PathEscape,
                format!("image {name:?} leads outside the target root"),
            )
        };
        let dir = match parent {
            None => root_fd,
            Some(parent) => {
                let dir =
                    sysfs::open_beneath(root_fd.as_fd(), parent, Open::DirPath).map_err(|e| {
                        if sysfs::is_escape(&e) {
                            escape()
                        } else {
                            AgentError::refused_by(
                                ErrorCode::Io,
                                format!("{}: open directory failed", parent.display()),
                                e,
                            )
                        }
                    })?;
                OwnedFd::from(dir)
            }
        };
        let open_err = |e: io::Error, op: &str| {
            if sysfs::is_escape(&e) {
                escape()
            } else {
                let code = if sysfs::is_no_space(&e) {
                    ErrorCode::DiskFull
                } else {
                    ErrorCode::Io
                };
                AgentError::refused_by(code, format!("{name}: {op} failed"), e)
            }
        };

        let path = Path::new(file_name);
        let mut created = false;
        let file = match sysfs::open_beneath(
            dir.as_fd(),
            path,
            if read_only {
                Open::Read
            } else {
                Open::ReadWrite
            },
        ) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && mode != Mode::Write => {
                return Err(AgentError::refused(
                    ErrorCode::Io,
                    format!("image {name} does not exist"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match sysfs::open_beneath(dir.as_fd(), path, Open::CreateNew { mode: 0o600 }) {
                    Ok(f) => {
                        created = true;
                        f
                    }
                    // Created by someone else in between (or a dangling
                    // symlink): open what is there, which must stay inside.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        sysfs::open_beneath(dir.as_fd(), path, Open::ReadWrite)
                            .map_err(|e| open_err(e, "open"))?
                    }
                    Err(e) => return Err(open_err(e, "create")),
                }
            }
            Err(e) => return Err(open_err(e, "open")),
        };
        let meta = file.metadata().map_err(|e| open_err(e, "stat"))?;
        if !meta.is_file() {
            return Err(AgentError::refused(
                ErrorCode::Io,
                format!("{name}: not a regular file"),
            ));
        }
        if !read_only && !sysfs::try_lock_exclusive(&file).map_err(|e| open_err(e, "lock"))? {
            return Err(AgentError::refused(
                ErrorCode::Busy,
                format!("{name} is in use by another ferry session"),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            dir,
            dir_path: parent.map_or_else(|| root.to_owned(), |p| root.join(p)),
            file_name: file_name.to_owned(),
            file,
            created,
            lock: None,
        })
    }

    /// Removes an image this session created, when the session is refused
    /// before writing anything, so a refusal leaves no trace.
    pub fn discard_created(&self) {
        if self.created {
            if let Err(e) = sysfs::unlink_in(self.dir.as_fd(), &self.file_name) {
                tracing::warn!(image = %self.name, "removing the image created for a refused session failed: {e}");
            }
        }
    }

    /// Takes the session lock, `IMAGE.ferry.lock`, before anything changes.
    /// The image file's own lock (taken at open) cannot be the only one: a
    /// format may replace the image file (a revert, a new delta on top),
    /// and a lock on the old file would no longer exclude anyone. The lock
    /// file is made only here, so a refused session leaves none behind.
    pub fn lock_session(&mut self) -> Result<(), AgentError> {
        if self.lock.is_some() {
            return Ok(());
        }
        let dir = self.dir_handle()?;
        let file = crate::image::try_lock_session(&dir, &self.file_name)
            .map_err(|e| self.io_err("lock the session", e))?
            .ok_or_else(|| {
                AgentError::refused(
                    ErrorCode::Busy,
                    format!("{} is in use by another ferry session", self.name),
                )
            })?;
        self.lock = Some(file);
        Ok(())
    }

    /// The directory the image lives in, for its format's files.
    pub fn dir_handle(&self) -> Result<crate::image::Dir, AgentError> {
        self.dir
            .try_clone()
            .map(crate::image::Dir::new)
            .map_err(|e| self.io_err("duplicate the directory handle", e))
    }

    /// The image's file name within its directory.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Replaces the (empty) image file with a new image of `format` holding
    /// a `size`-byte disk.
    pub fn recreate(&mut self, format: Format, size: u64) -> Result<(), AgentError> {
        let dir = self.dir_handle()?;
        sysfs::unlink_in(self.dir.as_fd(), &self.file_name)
            .map_err(|e| self.io_err("remove the empty image", e))?;
        crate::image::create(format, &dir, &self.file_name, size).map_err(super::image_error)?;
        self.file = dir
            .open_rw(&self.file_name)
            .map_err(|e| self.io_err("open", e))?;
        Ok(())
    }

    pub fn len(&self) -> Result<u64, AgentError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.io_err("stat", e))
    }

    pub fn read_record(&self) -> Result<Option<record::CommitRecord>, AgentError> {
        record::read(self.dir(), &self.file_name, &self.name)
    }

    pub fn write_record(&self, rec: &record::CommitRecord) -> Result<(), AgentError> {
        record::write(self.dir(), &self.file_name, &self.name, rec)
    }

    /// The [`record::Stamp`] of the file the image's name leads to now
    /// (a format may have replaced it since this session opened it).
    pub fn stamp(&self) -> Result<record::Stamp, AgentError> {
        use std::os::unix::fs::MetadataExt;
        let m = sysfs::open_beneath(self.dir.as_fd(), Path::new(&self.file_name), Open::Read)
            .and_then(|f| f.metadata())
            .map_err(|e| self.io_err("stat", e))?;
        Ok(record::Stamp {
            ino: m.ino(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }

    pub fn set_len(&self, len: u64) -> Result<(), AgentError> {
        self.file
            .set_len(len)
            .map_err(|e| self.io_err(&format!("extend to {len} bytes"), e))
    }

    fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    pub fn io_err(&self, op: &str, e: io::Error) -> AgentError {
        AgentError::refused_by(ErrorCode::Io, format!("{}: {op} failed", self.name), e)
    }
}

/// How a session uses the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A sync: created if absent, locked.
    Write,
    /// `verify`: must exist, not locked.
    ReadOnly,
    /// `boot-points`: must exist, locked.
    Existing,
}

impl Drop for Image {
    fn drop(&mut self) {
        // Explicitly: a forked child may still hold a copy of the fds.
        for file in self.lock.iter().chain(std::iter::once(&self.file)) {
            if let Err(e) = sysfs::unlock(file) {
                tracing::warn!(image = %self.name, "unlocking the image failed: {e}");
            }
        }
    }
}

/// Splits an image path into its parent directory (if any) and file name,
/// refusing names that cannot be a file beneath the root.
fn split_name(name: &str) -> Result<(Option<&Path>, &str), AgentError> {
    let malformed = |why: &str| {
        Err(AgentError::refused(
            ErrorCode::Malformed,
            format!("image name {name:?} {why}"),
        ))
    };
    if name.is_empty() {
        return malformed("is empty");
    }
    if name.contains('\0') {
        return malformed("contains a NUL byte");
    }
    let path = Path::new(name);
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(AgentError::refused(
                    ErrorCode::PathEscape,
                    format!("image {name:?} leads outside the target root (absolute or with ..)"),
                ))
            }
        }
    }
    if name.ends_with('/') || name.ends_with("/.") || name == "." {
        return malformed("is not a file name");
    }
    let file_name = name.rsplit('/').next().unwrap_or(name);
    if file_name.ends_with(".ferry.json") || file_name.ends_with(".ferry.json.tmp") {
        return malformed("is reserved for commit records");
    }
    let parent = name[..name.len() - file_name.len()].trim_end_matches('/');
    Ok(((!parent.is_empty()).then(|| Path::new(parent)), file_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<(Option<&Path>, &str), AgentError>) -> Option<ErrorCode> {
        r.err().and_then(|e| e.code())
    }

    #[test]
    fn names_split_into_directory_and_file() {
        assert_eq!(split_name("disk.raw").unwrap(), (None, "disk.raw"));
        assert_eq!(
            split_name("vm/a/disk.raw").unwrap(),
            (Some(Path::new("vm/a")), "disk.raw")
        );
        assert_eq!(
            split_name("./disk.raw").unwrap(),
            (Some(Path::new(".")), "disk.raw")
        );
    }

    #[test]
    fn names_that_cannot_be_a_file_beneath_the_root_are_refused() {
        for bad in ["../x", "/abs", "a/../../x", "a/.."] {
            assert_eq!(code(split_name(bad)), Some(ErrorCode::PathEscape), "{bad}");
        }
        for bad in [
            "",
            ".",
            "dir/",
            "dir/.",
            "x.ferry.json",
            "x.ferry.json.tmp",
            "a\0b",
        ] {
            assert_eq!(code(split_name(bad)), Some(ErrorCode::Malformed), "{bad:?}");
        }
    }
}
