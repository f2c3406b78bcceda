//! Dirty bitmaps shared with the kernel: one bit per chunk in `u64` words that
//! the tracker sets with atomic ORs. The daemon takes bits with an atomic swap
//! per word, so no bit set concurrently is lost: it lands either before the
//! swap (and is taken) or after it (and stays for the next drain).

use std::sync::atomic::{AtomicU64, Ordering};

use roaring::RoaringBitmap;

/// Adds the set bits of `word` (word number `index`) to `out` as chunk numbers.
#[inline]
pub fn push_word(out: &mut RoaringBitmap, index: usize, word: u64) {
    if word == 0 {
        return;
    }
    let base = (index as u64 * 64) as u32;
    if word == u64::MAX {
        out.insert_range(base..=base + 63);
        return;
    }
    let mut w = word;
    while w != 0 {
        let bit = w.trailing_zeros();
        out.insert(base + bit);
        w &= w - 1;
    }
}

/// Takes and clears every set bit, returning the chunk numbers.
pub fn take(words: &[AtomicU64]) -> RoaringBitmap {
    let mut out = RoaringBitmap::new();
    for (i, w) in words.iter().enumerate() {
        // A cheap load first: most words are clean, and a swap would dirty
        // the cache line the kernel writes to.
        if w.load(Ordering::Relaxed) != 0 {
            push_word(&mut out, i, w.swap(0, Ordering::AcqRel));
        }
    }
    out
}

/// The set bits, left as they are.
pub fn peek(words: &[AtomicU64]) -> RoaringBitmap {
    let mut out = RoaringBitmap::new();
    for (i, w) in words.iter().enumerate() {
        push_word(&mut out, i, w.load(Ordering::Acquire));
    }
    out
}

/// Sets chunks `first..=last` (clipped to the bitmap).
pub fn set_range(words: &[AtomicU64], first: u64, last: u64) {
    let Some(max_chunk) = (words.len() as u64 * 64).checked_sub(1) else {
        return;
    };
    let last = last.min(max_chunk);
    if first > last {
        return;
    }
    for word in first / 64..=last / 64 {
        let mask = tracker_common::word_mask(first, last, word);
        words[word as usize].fetch_or(mask, Ordering::AcqRel);
    }
}

/// Sets every chunk in `set` (used to give back a drain that could not be kept).
pub fn set_all(words: &[AtomicU64], set: &RoaringBitmap) {
    for chunk in set {
        if let Some(w) = words.get(chunk as usize / 64) {
            w.fetch_or(1 << (chunk % 64), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    proptest! {
        #[test]
        fn take_returns_exactly_what_was_set(chunks in proptest::collection::btree_set(0u32..4096, 0..300)) {
            let w = words(64);
            for &c in &chunks {
                w[c as usize / 64].fetch_or(1 << (c % 64), Ordering::Relaxed);
            }
            prop_assert_eq!(peek(&w).iter().collect::<Vec<_>>(), chunks.iter().copied().collect::<Vec<_>>());
            let taken = take(&w);
            prop_assert_eq!(taken.iter().collect::<Vec<_>>(), chunks.into_iter().collect::<Vec<_>>());
            prop_assert!(peek(&w).is_empty());
        }

        #[test]
        fn set_range_matches_model(first in 0u64..5000, len in 0u64..3000) {
            let w = words(64);
            set_range(&w, first, first + len);
            let model: Vec<u32> = (first..=first + len).filter(|&c| c < 4096).map(|c| c as u32).collect();
            prop_assert_eq!(peek(&w).iter().collect::<Vec<_>>(), model);
        }
    }

    #[test]
    fn concurrent_setters_lose_nothing() {
        let w = std::sync::Arc::new(words(16));
        let setter = {
            let w = w.clone();
            std::thread::spawn(move || {
                for c in 0..1024u64 {
                    w[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Relaxed);
                }
            })
        };
        let mut seen = RoaringBitmap::new();
        while !setter.is_finished() {
            seen |= take(&w);
        }
        setter.join().unwrap();
        seen |= take(&w);
        assert_eq!(seen.len(), 1024);
    }
}
