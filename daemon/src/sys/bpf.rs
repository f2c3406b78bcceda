//! The one BPF command aya does not wrap: deleting an entry of an array of maps.

use std::{io, os::fd::AsRawFd, os::fd::BorrowedFd};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The `bpf_attr` layout of the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes entry `index` of an array-of-maps (dropping its inner map's
/// reference). A missing entry is not an error.
pub fn delete_array_entry(map: BorrowedFd<'_>, index: u32) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix for
    // BPF_MAP_DELETE_ELEM whose key pointer refers to a live u32; the kernel
    // only reads `size_of::<MapElemAttr>()` bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as u32,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
    }
    Ok(())
}
