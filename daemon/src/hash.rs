//! Block hashes both sides compare to find what differs (checksum resync), and
//! the hash that guards each `Data` frame's content end to end.
//!
//! [`hash_blocks`] reads with `pread` into 4096-aligned buffers in multiples
//! of 512 bytes, so it works on a file or block device opened with
//! `O_DIRECT`, which is how the source reads its disks.

use std::{
    alloc::{self, Layout},
    fs::File,
    io,
    os::unix::fs::FileExt,
    ptr::NonNull,
    sync::atomic::{AtomicBool, Ordering},
};

use twox_hash::{XxHash3_128, XxHash3_64};

/// Alignment of buffers handed to `O_DIRECT` reads: a page, which covers
/// every logical block size in use (512 and 4096).
pub const DIRECT_ALIGN: usize = 4096;

/// Hash of a `Data` frame's raw (uncompressed) bytes: xxh3-64, which also
/// names a target's state files (so it must never change).
pub fn data_hash(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// [`data_hash`] of bytes that come in pieces: `update` with each in turn.
pub fn data_hasher() -> Streamed {
    Streamed(XxHash3_64::new())
}

/// xxh3-64 with `seed` of bytes that come in pieces (a frame's checksum).
pub fn seeded_hasher(seed: u64) -> Streamed {
    Streamed(XxHash3_64::with_seed(seed))
}

/// An xxh3-64 being fed.
pub struct Streamed(XxHash3_64);

impl Streamed {
    pub fn update(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.0, bytes);
    }

    pub fn digest(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// xxh3-128 of one block, as both sides of a checksum resync hash them.
fn block_hash(bytes: &[u8]) -> u128 {
    XxHash3_128::oneshot(bytes)
}

/// xxh3-128 of each `block`-sized piece of `[offset, offset + len)` of
/// `file`, the last piece possibly shorter, computed by `threads` workers.
///
/// xxh3-128 of each `block`-sized piece of `buf` (the last may be shorter),
/// on `threads` threads; the same values [`hash_blocks`] gives for the same
/// bytes.
pub fn hash_buffer(buf: &[u8], block: u32, threads: usize) -> Vec<u128> {
    let pieces: Vec<&[u8]> = buf.chunks(block as usize).collect();
    let mut out = vec![0u128; pieces.len()];
    let per = pieces.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (outs, ins) in out.chunks_mut(per).zip(pieces.chunks(per)) {
            s.spawn(move || {
                for (o, i) in outs.iter_mut().zip(ins) {
                    *o = block_hash(i);
                }
            });
        }
    });
    out
}

/// `offset` and `block` must be multiples of 4096 and `len` a multiple of 512
/// (what `O_DIRECT` needs). A file that ends before `offset + len` is an
/// error (`UnexpectedEof`), not zeros.
pub fn hash_blocks(
    file: &File,
    offset: u64,
    len: u64,
    block: u32,
    threads: usize,
) -> io::Result<Vec<u128>> {
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("hash_blocks: {what} (offset {offset}, len {len}, block {block})"),
        )
    };
    if block == 0 || !block.is_multiple_of(4096) {
        return Err(invalid("block must be a non-zero multiple of 4096"));
    }
    if !offset.is_multiple_of(4096) {
        return Err(invalid("offset must be a multiple of 4096"));
    }
    if !len.is_multiple_of(512) {
        return Err(invalid("len must be a multiple of 512"));
    }
    if offset.checked_add(len).is_none() {
        return Err(invalid("range overflows"));
    }
    let pieces =
        usize::try_from(len.div_ceil(u64::from(block))).map_err(|_| invalid("too many blocks"))?;
    let mut out = vec![0u128; pieces];
    if pieces == 0 {
        return Ok(out);
    }
    let workers = threads.clamp(1, pieces);
    // Contiguous runs per worker keep each worker's reads sequential.
    let per_worker = pieces.div_ceil(workers);
    let block_len = usize::try_from(block).map_err(|_| invalid("block too large"))?;
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(per_worker)
            .enumerate()
            .map(|(w, run)| {
                let failed = &failed;
                s.spawn(move || -> io::Result<()> {
                    let mut buf = AlignedBuf::new(block_len);
                    let first = (w * per_worker) as u64;
                    for (i, slot) in run.iter_mut().enumerate() {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let start = (first + i as u64) * u64::from(block);
                        // Fits in usize: at most `block`, itself a usize.
                        let n = (len - start).min(u64::from(block)) as usize;
                        let pos = offset + start;
                        let bytes = &mut buf.as_mut_slice()[..n];
                        if let Err(e) = file.read_exact_at(bytes, pos) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                                io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!(
                                        "file ends before {} (reading {n} bytes at {pos})",
                                        offset + len
                                    ),
                                )
                            } else {
                                io::Error::new(e.kind(), format!("read at {pos}: {e}"))
                            });
                        }
                        *slot = block_hash(bytes);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(out)
}

/// A zeroed heap buffer aligned to [`DIRECT_ALIGN`], for `O_DIRECT` I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one page is allocated).
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least DIRECT_ALIGN).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).expect("buffer size overflows")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` bytes,
        // zero-initialised at creation, owned by `self` and alive as long as
        // the returned borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and
        // is freed once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    use crate::testutil::TempFile;

    fn pattern(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn naive(bytes: &[u8], offset: u64, len: u64, block: u32) -> Vec<u128> {
        bytes[offset as usize..(offset + len) as usize]
            .chunks(block as usize)
            .map(xxhash_rust::xxh3::xxh3_128)
            .collect()
    }

    /// Both ends hash, and older builds' state files and frames carry the
    /// values: they must be the reference xxh3's, whatever vector unit this
    /// machine picked, at every length (xxh3 has separate paths up to 16,
    /// 128 and 240 bytes, and for whole and partial stripes and blocks).
    #[test]
    fn hashes_are_the_reference_xxh3s() {
        let bytes = pattern(3 << 16);
        for len in [
            0,
            1,
            3,
            4,
            8,
            9,
            16,
            17,
            128,
            129,
            240,
            241,
            1023,
            1024,
            1025,
            4096,
            65536,
            65537,
            3 << 16,
        ] {
            let b = &bytes[..len];
            assert_eq!(data_hash(b), xxhash_rust::xxh3::xxh3_64(b), "length {len}");
            assert_eq!(
                block_hash(b),
                xxhash_rust::xxh3::xxh3_128(b),
                "length {len}"
            );
            for seed in [0, 77, u64::MAX] {
                let mut h = seeded_hasher(seed);
                let (head, tail) = b.split_at(len / 3);
                h.update(head);
                h.update(tail);
                assert_eq!(
                    h.digest(),
                    xxhash_rust::xxh3::xxh3_64_with_seed(b, seed),
                    "length {len}, seed {seed}"
                );
            }
            let mut h = data_hasher();
            for piece in b.chunks(1000) {
                h.update(piece);
            }
            assert_eq!(h.digest(), data_hash(b), "length {len} in pieces");
        }
    }

    #[test]
    fn matches_a_naive_computation_for_any_thread_count() {
        let bytes = pattern(1 << 20);
        let tmp = TempFile::new("hash", &bytes);
        let f = File::open(&tmp.0).unwrap();
        for (offset, len, block) in [
            (0, 1 << 20, 65536),
            (4096, (1 << 20) - 4096, 65536),
            (8192, 65536 * 3 + 512, 65536),
            (0, 4096, 4096),
            (0, 0, 4096),
            (0, 1 << 20, 1 << 20),
        ] {
            let want = naive(&bytes, offset, len, block);
            for threads in [0, 1, 2, 3, 8, 64] {
                assert_eq!(
                    hash_blocks(&f, offset, len, block, threads).unwrap(),
                    want,
                    "offset {offset} len {len} block {block} threads {threads}"
                );
            }
        }
    }

    #[test]
    fn works_on_an_o_direct_file() {
        let bytes = pattern(3 << 20);
        let tmp = TempFile::new("hash", &bytes);
        let f = match File::options()
            .read(true)
            .custom_flags(crate::sys::fs::O_DIRECT)
            .open(&tmp.0)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipping: /var/tmp refuses O_DIRECT: {e}");
                return;
            }
        };
        // A probe read tells whether O_DIRECT reads work here at all.
        let mut probe = AlignedBuf::new(4096);
        if let Err(e) = f.read_exact_at(probe.as_mut_slice(), 0) {
            eprintln!("skipping: O_DIRECT reads fail on /var/tmp: {e}");
            return;
        }
        let len = (3 << 20) - 4096 - 512;
        assert_eq!(
            hash_blocks(&f, 4096, len, 65536, 4).unwrap(),
            naive(&bytes, 4096, len, 65536)
        );
    }

    #[test]
    fn a_short_file_is_an_error_not_zeros() {
        let tmp = TempFile::new("hash", &pattern(10_000));
        let f = File::open(&tmp.0).unwrap();
        let err = hash_blocks(&f, 0, 16384, 4096, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("ends before 16384"), "{err}");
    }

    #[test]
    fn misaligned_arguments_are_refused() {
        let tmp = TempFile::new("hash", &pattern(8192));
        let f = File::open(&tmp.0).unwrap();
        for (offset, len, block) in [
            (0, 8192, 0),
            (0, 8192, 1000),
            (512, 4096, 4096),
            (0, 100, 4096),
        ] {
            let err = hash_blocks(&f, offset, len, block, 1).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "{offset} {len} {block}"
            );
        }
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [0, 1, 4096, 65536 + 512] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
        }
    }
}
