//! Chunk numbers to byte extents: coalesced runs, clipped to the device, split
//! at a maximum length so each extent is one bounded read.

use roaring::RoaringBitmap;

/// A byte range of a device: `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Extents covering `set` (chunks of `chunk_size` bytes) on a device of
/// `device_size` bytes, each at most `max_len` bytes (rounded down to whole
/// chunks, at least one chunk). Sorted, non-overlapping, and adjacent runs are
/// merged unless the split demands otherwise.
pub fn extents(
    set: &RoaringBitmap,
    chunk_size: u64,
    device_size: u64,
    max_len: u64,
) -> Vec<Extent> {
    let max_chunks = (max_len / chunk_size).max(1);
    let mut out = Vec::new();
    let mut run: Option<(u64, u64)> = None; // (first chunk, chunk count)
    let flush = |first: u64, count: u64, out: &mut Vec<Extent>| {
        let offset = first * chunk_size;
        if offset >= device_size {
            return;
        }
        let end = ((first + count) * chunk_size).min(device_size);
        out.push(Extent {
            offset,
            len: end - offset,
        });
    };
    for chunk in set.iter().map(u64::from) {
        run = match run {
            Some((first, count)) if first + count == chunk && count < max_chunks => {
                Some((first, count + 1))
            }
            Some((first, count)) => {
                flush(first, count, &mut out);
                Some((chunk, 1))
            }
            None => Some((chunk, 1)),
        };
    }
    if let Some((first, count)) = run {
        flush(first, count, &mut out);
    }
    out
}

/// Total bytes in `extents`.
pub fn total_bytes(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn coalesces_and_clips() {
        let set: RoaringBitmap = [0, 1, 2, 5, 9].into_iter().collect();
        let e = extents(&set, 4096, 9 * 4096 + 100, u64::MAX);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 0,
                    len: 3 * 4096
                },
                Extent {
                    offset: 5 * 4096,
                    len: 4096
                },
                Extent {
                    offset: 9 * 4096,
                    len: 100
                },
            ]
        );
        assert_eq!(total_bytes(&e), 4 * 4096 + 100);
    }

    #[test]
    fn splits_long_runs() {
        let set: RoaringBitmap = (0..10).collect();
        let e = extents(&set, 1024, 1 << 20, 4096);
        assert_eq!(e.len(), 3);
        assert!(e.iter().all(|x| x.len <= 4096));
        assert_eq!(total_bytes(&e), 10 * 1024);
    }

    proptest! {
        /// Against a naive model: every chunk below the device end is covered
        /// exactly once, nothing else is, and extents respect the limit.
        #[test]
        fn matches_naive_model(
            chunks in proptest::collection::btree_set(0u32..2000, 0..400),
            shift in 12u32..17,
            max_chunks in 1u64..40,
            tail in 0u64..5000,
        ) {
            let chunk = 1u64 << shift;
            let device = 1500 * chunk + tail;
            let set: RoaringBitmap = chunks.iter().copied().collect();
            let ext = extents(&set, chunk, device, max_chunks * chunk);
            let mut covered = Vec::new();
            let mut last_end = 0;
            for (i, e) in ext.iter().enumerate() {
                prop_assert!(e.len > 0 && e.len <= max_chunks * chunk);
                prop_assert!(i == 0 || e.offset >= last_end);
                last_end = e.offset + e.len;
                prop_assert!(last_end <= device);
                let mut off = e.offset;
                while off < e.offset + e.len {
                    covered.push((off / chunk) as u32);
                    off = (off / chunk + 1) * chunk;
                }
            }
            let want: Vec<u32> = chunks.into_iter().filter(|&c| u64::from(c) * chunk < device).collect();
            prop_assert_eq!(covered, want);
        }
    }
}
