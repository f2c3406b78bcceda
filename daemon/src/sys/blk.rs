//! Block device queries: is it a block device, its device number, its size.

use std::{fs::File, io, os::fd::AsRawFd, os::unix::fs::FileTypeExt, path::Path};

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Major and minor number of a device special file, `None` if the path is not
/// a block device.
pub fn block_dev_numbers(path: &Path) -> io::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    Ok(Some((libc::major(rdev), libc::minor(rdev))))
}

/// Size in bytes of an open block device.
pub fn size_bytes(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live, aligned u64; the fd is valid for the life of `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
