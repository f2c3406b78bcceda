//! File access confined to a directory, and the few file syscalls std lacks.
//!
//! Every path the agent opens goes through [`open_beneath`]: `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` relative to a directory fd, so
//! `..`, absolute paths and symlinks that lead out of the directory fail with
//! `EXDEV` (or `ELOOP` for magic links) inside the kernel, with no
//! check-then-use race. [`rename_in`] and [`unlink_in`] take single names
//! relative to such a directory, so they cannot leave it either.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// How [`open_beneath`] opens a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// An existing file, read-only.
    Read,
    /// An existing file, read-write.
    ReadWrite,
    /// A new file, read-write; fails with `EEXIST` if the name exists (even as
    /// a dangling symlink).
    CreateNew { mode: u32 },
    /// An existing directory as a path-only handle (`O_PATH`), to resolve
    /// names beneath it.
    DirPath,
    /// An existing directory, read-only, so it can be fsynced.
    Dir,
}

impl Open {
    fn flags_and_mode(self) -> (libc::c_int, u32) {
        let common = libc::O_CLOEXEC | libc::O_NOCTTY;
        match self {
            Self::Read => (common | libc::O_RDONLY, 0),
            Self::ReadWrite => (common | libc::O_RDWR, 0),
            Self::CreateNew { mode } => (
                common | libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                mode & 0o7777,
            ),
            // openat2 refuses any flag O_PATH ignores, O_NOCTTY included.
            Self::DirPath => (libc::O_CLOEXEC | libc::O_PATH | libc::O_DIRECTORY, 0),
            Self::Dir => (common | libc::O_RDONLY | libc::O_DIRECTORY, 0),
        }
    }
}

/// `struct open_how` of `linux/openat2.h`. libc's is `#[non_exhaustive]`, so
/// it cannot be built field by field; the kernel ABI is these three u64s.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens a directory by path as an `O_PATH` handle, the root the other
/// functions here resolve beneath.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c_path = c_string(path)?;
    loop {
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
        // call; open allocates a new fd and touches no other memory.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by open, is valid and owned by
            // nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Opens `path` relative to `dir` without leaving it: `..`, absolute paths,
/// and symlinks resolving outside `dir` fail with `EXDEV`, magic links
/// (`/proc/self/fd/…`) with `ELOOP`.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path, how: Open) -> io::Result<File> {
    let c_path = c_string(path)?;
    let (flags, mode) = how.flags_and_mode();
    let how = OpenHow {
        flags: u64::from(flags.cast_unsigned()),
        mode: u64::from(mode),
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // EAGAIN means the kernel saw a concurrent rename and could not prove
    // that a `..` stayed beneath `dir`; the man page says to retry.
    let mut again = 0;
    loop {
        // SAFETY: `c_path` is NUL-terminated and `how` is a live, initialised
        // `open_how` whose size we pass; both outlive the call, and openat2
        // only reads them. `dir` is a valid fd for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if rc >= 0 {
            let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
            // SAFETY: openat2 returned a new fd that nothing else owns.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) if again < 16 => again += 1,
            Some(libc::ENOSYS) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "openat2 is not available (Linux 5.6 or later is needed)",
                ))
            }
            _ => return Err(err),
        }
    }
}

/// Whether an error from [`open_beneath`] means the path tried to leave the
/// directory (`..`, an absolute path, a symlink out, a magic link).
pub fn is_escape(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EXDEV | libc::ELOOP))
}

/// Whether an error means the filesystem or the quota is full.
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Renames `from` to `to`, both single names in `dir`, replacing `to`.
pub fn rename_in(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    let from = single_name(from)?;
    let to = single_name(to)?;
    // SAFETY: both names are NUL-terminated strings that outlive the call;
    // `dir` is a valid fd for its duration.
    let rc =
        unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the file `name` (a single name) from `dir`.
pub fn unlink_in(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let name = single_name(name)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; `dir`
    // is a valid fd for its duration.
    let rc = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes an exclusive `flock` on `file`, waiting for the holder to let go.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_EX).map(drop)
}

/// Takes an exclusive `flock` on `file` without waiting: `Ok(false)` if
/// another open file description holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    flock(file, libc::LOCK_EX | libc::LOCK_NB)
}

/// Releases a `flock` on `file`'s open file description. Closing is not
/// enough when a child forked by another thread still holds a copy of the fd
/// on its way to `exec`: the lock would outlive the close for that moment.
pub fn unlock(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_UN).map(drop)
}

/// `flock(2)`, retried when a signal interrupts it; `Ok(false)` when
/// `LOCK_NB` finds the lock held.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Deallocates `[offset, offset + len)` of `file`, which then reads as zeros,
/// keeping its size. Fails with `EOPNOTSUPP` where the filesystem cannot.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| too_big("offset"))?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big("length"))?;
    loop {
        // SAFETY: fallocate on a valid fd owned by `file`; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether an error means the operation is not supported here.
pub fn is_unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// The `O_DIRECT` flag, for `OpenOptionsExt::custom_flags`.
pub const O_DIRECT: libc::c_int = libc::O_DIRECT;

fn c_string(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn single_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    c_string(Path::new(name))
}

fn too_big(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{what} out of range"))
}

/// Makes `dst` share `src`'s blocks (FICLONE). Fails with EOPNOTSUPP or
/// EXDEV where the filesystem cannot.
pub fn reflink(dst: &File, src: &File) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd by value; both fds are open for
    // the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::EXDEV) => {
                io::Error::from_raw_os_error(libc::EOPNOTSUPP)
            }
            _ => e,
        });
    }
    Ok(())
}

/// Copies `src` into `dst` (empty), keeping holes: only the data ranges
/// (SEEK_DATA/SEEK_HOLE) are copied, and `dst` gets `src`'s length.
pub fn copy_sparse(src: &File, dst: &mut File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a valid fd; no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut at, end) = (data as u64, (hole as u64).min(len));
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    dst.set_len(len)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::fd::AsFd,
        os::unix::fs::FileExt,
    };

    use super::*;

    use crate::testutil::TempDir;

    #[test]
    fn open_beneath_stays_inside() {
        let tmp = TempDir::new("fs-beneath");
        let root = tmp.0.join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(tmp.0.join("outside"), b"secret").unwrap();
        std::fs::write(root.join("inside"), b"ok").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("link-out")).unwrap();
        std::os::unix::fs::symlink("inside", root.join("link-in")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link-abs")).unwrap();
        let dir = open_dir(&root).unwrap();

        let mut s = String::new();
        open_beneath(dir.as_fd(), Path::new("link-in"), Open::Read)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "ok");
        for bad in ["../outside", "/etc/passwd", "link-out", "link-abs"] {
            let err = open_beneath(dir.as_fd(), Path::new(bad), Open::Read).unwrap_err();
            assert!(is_escape(&err), "{bad}: {err}");
        }
        let err =
            open_beneath(dir.as_fd(), Path::new("/proc/self/fd/0"), Open::ReadWrite).unwrap_err();
        assert!(is_escape(&err), "{err}");
        // Creating through a symlink is refused, even one that points inside.
        let err = open_beneath(
            dir.as_fd(),
            Path::new("link-out"),
            Open::CreateNew { mode: 0o600 },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(tmp.0.join("outside")).unwrap(), b"secret");
    }

    #[test]
    fn rename_and_unlink_take_single_names() {
        let tmp = TempDir::new("fs-rename");
        let dir = open_dir(&tmp.0).unwrap();
        let mut f =
            open_beneath(dir.as_fd(), Path::new("a"), Open::CreateNew { mode: 0o600 }).unwrap();
        f.write_all(b"x").unwrap();
        rename_in(dir.as_fd(), "a", "b").unwrap();
        assert!(tmp.0.join("b").exists() && !tmp.0.join("a").exists());
        assert!(rename_in(dir.as_fd(), "b", "../b").is_err());
        assert!(unlink_in(dir.as_fd(), "..").is_err());
        unlink_in(dir.as_fd(), "b").unwrap();
        assert!(!tmp.0.join("b").exists());
    }

    #[test]
    fn lock_is_exclusive_between_opens() {
        let tmp = TempDir::new("fs-lock");
        let path = tmp.0.join("f");
        std::fs::write(&path, b"").unwrap();
        let a = File::open(&path).unwrap();
        let b = File::open(&path).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    #[test]
    fn punched_hole_reads_as_zeros() {
        let tmp = TempDir::new("fs-punch");
        let path = tmp.0.join("f");
        std::fs::write(&path, vec![0xAB; 64 << 10]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        match punch_hole(&f, 4096, 8192) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                eprintln!("skipping: /var/tmp cannot punch holes: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let mut buf = vec![0; 64 << 10];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xAB));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 0xAB));
        assert_eq!(f.metadata().unwrap().len(), 64 << 10);
    }
}
