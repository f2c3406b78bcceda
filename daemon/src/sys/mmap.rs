//! A shared, writable mapping of a BPF array map's values, seen as atomic words.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

/// `len` `u64` words of an mmappable BPF array, shared with the kernel.
#[derive(Debug)]
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    map_len: usize,
}

impl SharedWords {
    /// Maps the first `len` words of the array behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let page = page_size();
        let map_len = (len.max(1) * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a valid fd; the kernel checks that
        // the map is mmappable and at least `map_len` long and fails otherwise.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len, map_len })
    }

    /// The words. The kernel sets bits in them concurrently with atomic ORs,
    /// so they are only ever touched through atomics.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (so u64-aligned), at least
        // `len * 8` bytes long, lives until `self` drops, and AtomicU64 has
        // the layout of u64, so any bit pattern is valid.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`; no reference from
        // `words` can outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
