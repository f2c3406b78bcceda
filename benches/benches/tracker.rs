//! Dirty-set hot paths at 1 Mi dirty chunks: draining the kernel-shared
//! bitmap, turning bitmap words into a roaring set, and coalescing a roaring
//! set into extents.
//!
//! The bitmap covers 16 Mi chunks (a 1 TiB device at 64 KiB chunks). Two
//! layouts bracket what a drain sees: chunks scattered at random, which fills
//! few words and leaves most bits alone in theirs, and long runs of consecutive
//! chunks, which fill whole words and take the `insert_range` path.

use std::hint::black_box;
use std::sync::atomic::AtomicU64;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry::dirty::extents::extents;
use ferry::tracker::bitmap::{peek, push_word, take};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roaring::RoaringBitmap;

/// Chunks the bitmap covers.
const CHUNKS: u64 = 1 << 24;
/// `u64` words in the bitmap.
const WORDS: usize = (CHUNKS / 64) as usize;
/// Dirty chunks in every benchmark.
const DIRTY: u64 = 1 << 20;
/// Runs in the clustered layout, each `DIRTY / RUNS` chunks long.
const RUNS: u64 = 1024;

const CHUNK_SIZE: u64 = 64 << 10;
const DEVICE_SIZE: u64 = CHUNKS * CHUNK_SIZE;
const MAX_EXTENT: u64 = 8 << 20;

/// Fixed ("ferry" in ASCII) so every run measures the same set.
const SEED: u64 = 0x0066_6572_7279;

fn set_bit(words: &mut [u64], chunk: u64) -> bool {
    let word = &mut words[(chunk / 64) as usize];
    let bit = 1 << (chunk % 64);
    let was_clear = *word & bit == 0;
    *word |= bit;
    was_clear
}

/// `DIRTY` distinct chunks chosen uniformly at random.
fn random_words() -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut words = vec![0; WORDS];
    let mut dirty = 0;
    while dirty < DIRTY {
        if set_bit(&mut words, rng.gen_range(0..CHUNKS)) {
            dirty += 1;
        }
    }
    words
}

/// `RUNS` runs of consecutive chunks, spread evenly over the device.
fn clustered_words() -> Vec<u64> {
    let run_len = DIRTY / RUNS;
    let stride = CHUNKS / RUNS;
    let mut words = vec![0; WORDS];
    for run in 0..RUNS {
        let first = run * stride;
        for chunk in first..first + run_len {
            set_bit(&mut words, chunk);
        }
    }
    words
}

fn atomics(words: &[u64]) -> Vec<AtomicU64> {
    words.iter().copied().map(AtomicU64::new).collect()
}

fn roaring_from_words(words: &[u64]) -> RoaringBitmap {
    let mut out = RoaringBitmap::new();
    for (index, &word) in words.iter().enumerate() {
        push_word(&mut out, index, word);
    }
    out
}

/// Checks a layout before it is measured, so a bench cannot quietly run on
/// the wrong number of chunks.
fn checked(words: Vec<u64>) -> Vec<u64> {
    let dirty: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(dirty, DIRTY, "layout has the wrong number of dirty chunks");
    words
}

fn drain(c: &mut Criterion) {
    let mut group = c.benchmark_group("drain");
    group.throughput(Throughput::Elements(DIRTY));
    for (name, words) in [
        ("1M_dirty_of_16M", checked(random_words())),
        ("1M_dirty_clustered", checked(clustered_words())),
    ] {
        group.bench_function(name, |b| {
            // `take` clears what it drains, so each iteration gets a freshly
            // filled bitmap. Returning the input hands its deallocation to
            // criterion, outside the timed region.
            b.iter_batched(
                || atomics(&words),
                |bitmap| (take(black_box(&bitmap)), bitmap),
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

fn bitmap_to_roaring(c: &mut Criterion) {
    let words = checked(random_words());
    let bitmap = atomics(&words);
    let mut group = c.benchmark_group("bitmap_to_roaring");
    group.throughput(Throughput::Elements(DIRTY));
    group.bench_function("1M_random", |b| b.iter(|| peek(black_box(&bitmap))));
    group.bench_function("push_word_1M", |b| {
        b.iter(|| roaring_from_words(black_box(&words)));
    });
    group.finish();
}

fn coalesce(c: &mut Criterion) {
    let mut group = c.benchmark_group("extents");
    group.throughput(Throughput::Elements(DIRTY));
    for (name, words) in [
        ("1M_random_64K", checked(random_words())),
        ("1M_runs_64K", checked(clustered_words())),
    ] {
        let set = roaring_from_words(&words);
        group.bench_function(name, |b| {
            b.iter(|| {
                extents(
                    black_box(&set),
                    black_box(CHUNK_SIZE),
                    black_box(DEVICE_SIZE),
                    black_box(MAX_EXTENT),
                )
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).noise_threshold(0.03);
    targets = drain, bitmap_to_roaring, coalesce
}
criterion_main!(benches);
