//! Tests of the whole pipeline against plain `pread` of real files under
//! /var/tmp (an `O_DIRECT`-capable filesystem; /dev/shm is tmpfs).

use std::{
    fs::File,
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use proptest::{prelude::*, test_runner::TestRunner};
use rand::{Rng, RngCore, SeedableRng};
use roaring::RoaringBitmap;

use super::*;

/// A file removed on drop, even when the test panics.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(dir: &str, name: &str, data: &[u8]) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "{dir}/ferry-pipeline-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        Self { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Device contents in 4 KiB blocks: zeroes, random bytes, a compressible
/// pattern, or zeroes with a few bytes set (zero only in part).
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    for block in data.chunks_mut(4096) {
        match rng.gen_range(0..10) {
            0..=3 => {}
            4..=6 => rng.fill_bytes(block),
            7..=8 => {
                let k = rng.gen::<u8>() | 1;
                for (i, b) in block.iter_mut().enumerate() {
                    *b = (i as u8 / 16).wrapping_mul(k);
                }
            }
            _ => {
                let at = rng.gen_range(0..block.len());
                block[at] = rng.gen::<u8>() | 1;
            }
        }
    }
    data
}

fn random_data(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    data
}

/// Reads everything, failing on the first error, checking each piece with
/// `check` and dropping it (so its permit goes back, as a consumer that
/// sends pieces on would); returns the ranges covered.
fn drain(p: &Pipeline, mut check: impl FnMut(&Piece)) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    while let Some(piece) = p.recv() {
        let piece = piece.unwrap();
        check(&piece);
        ranges.push((piece.offset(), piece.offset() + piece.raw_len()));
    }
    ranges
}

/// Merges touching ranges.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Checks that `ranges` cover exactly `extents`, each byte once.
fn check_coverage(mut ranges: Vec<(u64, u64)>, extents: &[Extent]) {
    ranges.sort();
    for pair in ranges.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlap: {pair:?}");
    }
    let want = merged(
        extents
            .iter()
            .map(|e| (e.offset, e.offset + e.len))
            .collect(),
    );
    assert_eq!(
        merged(ranges),
        want,
        "pieces do not cover exactly the extents"
    );
}

/// Checks `piece` against `file` read with plain `pread`: data matches
/// (hash too), a zero piece covers zeroes only, and a data piece holds no
/// all-zero chunk.
fn check_piece(file: &File, chunk: u64, piece: &Piece) {
    let mut expected = vec![0; piece.raw_len() as usize];
    file.read_exact_at(&mut expected, piece.offset()).unwrap();
    match piece {
        Piece::Zero { offset, .. } => {
            assert!(
                expected.iter().all(|&b| b == 0),
                "zero piece at {offset} over data"
            );
        }
        Piece::Data {
            offset,
            raw_len,
            codec,
            data_hash,
            payload,
            permit: _,
        } => {
            let raw = match codec {
                Codec::Raw => payload.to_vec(),
                Codec::Zstd => zstd::bulk::decompress(payload, *raw_len as usize).unwrap(),
            };
            assert!(raw == expected, "data at {offset} differs from pread");
            assert_eq!(*data_hash, xxhash_rust::xxh3::xxh3_64(&expected));
            let end = offset + u64::from(*raw_len);
            let mut pos = *offset;
            while pos < end {
                let seg_end = ((pos / chunk + 1) * chunk).min(end);
                let seg = (pos - offset) as usize..(seg_end - offset) as usize;
                assert!(
                    expected[seg].iter().any(|&b| b != 0),
                    "data piece at {offset} holds an all-zero chunk at {pos}"
                );
                pos = seg_end;
            }
        }
    }
}

/// Reads everything, checking each piece against `file` and the coverage
/// against `extents`.
fn read_and_check(p: &Pipeline, file: &File, extents: &[Extent], chunk: u64) {
    check_coverage(drain(p, |piece| check_piece(file, chunk, piece)), extents);
}

fn config(chunk: u64, max_io: u32) -> PipelineConfig {
    PipelineConfig {
        chunk_size: chunk,
        max_io,
        compress_threads: 2,
        ..PipelineConfig::default()
    }
}

/// Runs `f` on another thread and fails if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

#[test]
fn reader_matches_pread_over_random_extents() {
    // Not a multiple of 4096: the last chunk is short.
    let size = (8 << 20) + 1536;
    let tmp = TempFile::new("/var/tmp", "prop", &mixed_data(size, 7));
    let file = File::open(&tmp.path).unwrap();
    let size = size as u64;
    let strategy = (
        prop::sample::select(vec![4096u64, 16 << 10, 64 << 10]),
        prop::sample::select(vec![4096u32, 64 << 10, 256 << 10, 1 << 20]),
        1u32..=16,
        prop::sample::select(vec![4096u64, 2 << 20, 256 << 20]),
        prop::sample::select(vec![0i32, 1, 3]),
        1usize..=3,
        prop::collection::vec(0u32..2060, 0..300),
        prop::sample::select(vec![4096u64, 1 << 20, u64::MAX]),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &strategy,
            |(chunk, max_io, depth, mem_cap, level, threads, chunks, max_len)| {
                let nchunks = size.div_ceil(chunk) as u32;
                let set: RoaringBitmap = chunks.into_iter().map(|c| c % nchunks).collect();
                let extents = crate::dirty::extents(&set, chunk, size, max_len);
                let cfg = PipelineConfig {
                    chunk_size: chunk,
                    max_io,
                    queue_depth: depth,
                    zstd_level: level,
                    compress_threads: threads,
                    mem_cap,
                    ..PipelineConfig::default()
                };
                let p = Pipeline::start(&tmp.path, size, extents.clone(), cfg).unwrap();
                read_and_check(&p, &file, &extents, chunk);
                let total = crate::dirty::extents::total_bytes(&extents);
                let stats = p.finish().unwrap();
                prop_assert_eq!(stats.bytes_read, total);
                prop_assert_eq!(stats.zero_bytes + stats.data_bytes, total);
                prop_assert!(stats.mem_peak <= mem_cap);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn whole_device_compresses_and_counts() {
    let data = mixed_data(4 << 20, 1);
    let tmp = TempFile::new("/var/tmp", "whole", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 4 << 20,
    }];
    let p = Pipeline::start(&tmp.path, 4 << 20, extents.clone(), config(4096, 1 << 20)).unwrap();
    let file = File::open(&tmp.path).unwrap();
    let (mut zstd, mut zero) = (false, false);
    let ranges = drain(&p, |piece| {
        check_piece(&file, 4096, piece);
        zstd |= matches!(
            piece,
            Piece::Data {
                codec: Codec::Zstd,
                ..
            }
        );
        zero |= matches!(piece, Piece::Zero { .. });
    });
    check_coverage(ranges, &extents);
    assert!(zstd && zero);
    let stats = p.finish().unwrap();
    assert_eq!(stats.bytes_read, 4 << 20);
    assert_eq!(stats.read_ops, 4);
    assert!(stats.payload_bytes < stats.data_bytes);
}

#[test]
fn incompressible_data_is_sent_raw() {
    let data = random_data(2 << 20);
    let tmp = TempFile::new("/var/tmp", "random", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 2 << 20,
    }];
    let cfg = PipelineConfig {
        zstd_level: 3,
        ..config(64 << 10, 1 << 20)
    };
    let p = Pipeline::start(&tmp.path, 2 << 20, extents, cfg).unwrap();
    while let Some(piece) = p.recv() {
        let Piece::Data {
            offset,
            codec,
            payload,
            ..
        } = piece.unwrap()
        else {
            panic!("random data read as zeroes");
        };
        assert_eq!(codec, Codec::Raw);
        assert!(payload[..] == data[offset as usize..offset as usize + payload.len()]);
    }
    let stats = p.finish().unwrap();
    assert_eq!(stats.data_bytes, 2 << 20);
    assert_eq!(stats.payload_bytes, stats.data_bytes);
}

/// Long reads of data with no zero chunk are tasted by the reader; one that
/// compresses still reaches a compressor and is compressed whole.
#[test]
fn long_compressible_reads_are_compressed_whole() {
    let data: Vec<u8> = (0..2usize << 20).map(|i| b"standby "[i % 8]).collect();
    let tmp = TempFile::new("/var/tmp", "text", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 2 << 20,
    }];
    let p = Pipeline::start(
        &tmp.path,
        2 << 20,
        extents.clone(),
        config(64 << 10, 1 << 20),
    )
    .unwrap();
    let file = File::open(&tmp.path).unwrap();
    let ranges = drain(&p, |piece| {
        check_piece(&file, 64 << 10, piece);
        let Piece::Data { codec, raw_len, .. } = piece else {
            panic!("text read as zeroes")
        };
        assert_eq!((*codec, *raw_len), (Codec::Zstd, 1 << 20));
    });
    check_coverage(ranges, &extents);
    let stats = p.finish().unwrap();
    assert_eq!(stats.data_bytes, 2 << 20);
    assert!(stats.payload_bytes < stats.data_bytes / 10);
}

#[test]
fn small_mem_cap_completes_and_is_never_exceeded() {
    let data = random_data(16 << 20);
    let tmp = TempFile::new("/var/tmp", "memcap", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 16 << 20,
    }];
    let cap = 2 << 20;
    let cfg = PipelineConfig {
        mem_cap: cap,
        ..config(64 << 10, 1 << 20)
    };
    let p = Pipeline::start(&tmp.path, 16 << 20, extents.clone(), cfg).unwrap();
    // A slow consumer, holding each piece while it "sends" it.
    let mut bytes = 0;
    while let Some(piece) = p.recv() {
        let piece = piece.unwrap();
        bytes += piece.raw_len();
        assert!(p.budget().in_use() <= cap);
        std::thread::sleep(Duration::from_millis(5));
        drop(piece);
    }
    assert_eq!(bytes, 16 << 20);
    let stats = p.finish().unwrap();
    assert!(stats.mem_peak <= cap, "peak {}", stats.mem_peak);
    assert!(stats.mem_peak > 0);
}

#[test]
fn mem_cap_below_one_read_still_makes_progress() {
    let data = mixed_data(4 << 20, 3);
    let tmp = TempFile::new("/var/tmp", "tinycap", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 4 << 20,
    }];
    let cfg = PipelineConfig {
        mem_cap: 100 << 10,
        ..config(4096, 1 << 20)
    };
    let pieces = within(Duration::from_secs(60), move || {
        let p = Pipeline::start(&tmp.path, 4 << 20, extents, cfg).unwrap();
        let total: u64 = drain(&p, |_| {}).iter().map(|(s, e)| e - s).sum();
        assert!(p.finish().unwrap().mem_peak <= 100 << 10);
        total
    });
    assert_eq!(pieces, 4 << 20);
}

#[test]
fn consumer_stopping_early_does_not_hang() {
    let data = random_data(32 << 20);
    let tmp = TempFile::new("/var/tmp", "early", &data);
    let path = tmp.path.clone();
    let extents = vec![Extent {
        offset: 0,
        len: 32 << 20,
    }];
    // Takes one piece and drops the pipeline.
    let (p2, e2) = (path.clone(), extents.clone());
    within(Duration::from_secs(30), move || {
        let p = Pipeline::start(&p2, 32 << 20, e2, config(64 << 10, 1 << 20)).unwrap();
        let first = p.recv().unwrap().unwrap();
        drop(p);
        drop(first);
    });
    // Never receives at all, holds nothing, and calls finish.
    let (p2, e2) = (path.clone(), extents.clone());
    within(Duration::from_secs(30), move || {
        let cfg = PipelineConfig {
            mem_cap: 4 << 20,
            ..config(64 << 10, 1 << 20)
        };
        let p = Pipeline::start(&p2, 32 << 20, e2, cfg).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        p.finish().unwrap();
    });
    // Keeps a piece (and its permit) past the pipeline's end.
    let (p2, e2) = (path.clone(), extents.clone());
    within(Duration::from_secs(30), move || {
        let cfg = PipelineConfig {
            mem_cap: 2 << 20,
            ..config(64 << 10, 1 << 20)
        };
        let p = Pipeline::start(&p2, 32 << 20, e2, cfg).unwrap();
        let kept = p.recv().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        p.finish().unwrap();
        drop(kept);
    });
    // Reader stuck behind a very slow throttle.
    within(Duration::from_secs(30), move || {
        let cfg = PipelineConfig {
            read_bytes: Some(Arc::new(RateLimiter::new(1000))),
            ..config(64 << 10, 1 << 20)
        };
        let p = Pipeline::start(&path, 32 << 20, extents, cfg).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(p);
    });
    drop(tmp);
}

#[test]
fn reading_past_the_end_of_the_file_is_an_error_with_its_offset() {
    let data = mixed_data(1 << 20, 5);
    let tmp = TempFile::new("/var/tmp", "short", &data);
    // The caller believes the device is 2 MiB.
    let extents = vec![Extent {
        offset: 512 << 10,
        len: 1536 << 10,
    }];
    let p = Pipeline::start(&tmp.path, 2 << 20, extents, config(64 << 10, 256 << 10)).unwrap();
    let err = loop {
        match p.recv() {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("stream ended without an error"),
        }
    };
    match &err {
        PipelineError::ShortRead { path, offset } => {
            assert_eq!(path, &tmp.path);
            assert_eq!(*offset, 1 << 20);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("1048576"), "{err}");
    // The error ends the stream.
    assert!(p.recv().is_none());
    p.finish().unwrap();
}

#[test]
fn bad_input_is_refused_at_start() {
    let tmp = TempFile::new("/var/tmp", "bad", &[1; 8192]);
    let start = |extents: Vec<Extent>, cfg: PipelineConfig| {
        Pipeline::start(&tmp.path, 8192, extents, cfg).unwrap_err()
    };
    let e = |offset, len| Extent { offset, len };
    let cfg = || config(4096, 1 << 20);
    assert!(matches!(
        start(vec![e(4096, 8192)], cfg()),
        PipelineError::Extent { offset: 4096, .. }
    ));
    assert!(matches!(
        start(vec![e(4096, 4096), e(0, 4096)], cfg()),
        PipelineError::Extent { offset: 0, .. }
    ));
    assert!(matches!(
        start(vec![e(100, 4096)], cfg()),
        PipelineError::Extent { offset: 100, .. }
    ));
    assert!(matches!(
        start(
            vec![],
            PipelineConfig {
                chunk_size: 1000,
                ..cfg()
            }
        ),
        PipelineError::Config { .. }
    ));
    assert!(matches!(
        start(
            vec![],
            PipelineConfig {
                zstd_level: 99,
                ..cfg()
            }
        ),
        PipelineError::Config { .. }
    ));
    let missing = Path::new("/var/tmp/ferry-pipeline-does-not-exist");
    match Pipeline::start(missing, 8192, vec![], cfg()).unwrap_err() {
        PipelineError::Open { path, .. } => assert_eq!(path, missing),
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn no_extents_is_an_empty_stream() {
    let tmp = TempFile::new("/var/tmp", "empty", &[1; 8192]);
    let p = Pipeline::start(&tmp.path, 8192, vec![], config(4096, 1 << 20)).unwrap();
    assert!(p.recv().is_none());
    assert_eq!(p.finish().unwrap(), PipelineStats::default());
}

#[test]
fn iops_throttle_and_ioprio_apply() {
    let data = mixed_data(1 << 20, 9);
    let tmp = TempFile::new("/var/tmp", "iops", &data);
    let extents = vec![Extent {
        offset: 0,
        len: 1 << 20,
    }];
    // 16 reads of 64 KiB at 20 reads/s, burst 1: about 0.75 s.
    let ops = Arc::new(RateLimiter::new(20));
    let cfg = PipelineConfig {
        read_ops: Some(ops.clone()),
        read_bytes: Some(Arc::new(RateLimiter::new(0))),
        ioprio: Some(IoPrio::Idle),
        ..config(4096, 64 << 10)
    };
    let started = Instant::now();
    let p = Pipeline::start(&tmp.path, 1 << 20, extents.clone(), cfg).unwrap();
    read_and_check(&p, &File::open(&tmp.path).unwrap(), &extents, 4096);
    let took = started.elapsed();
    assert_eq!(p.finish().unwrap().read_ops, 16);
    assert!(took >= Duration::from_millis(600), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn tmpfs_without_o_direct_is_read_through_the_page_cache() {
    let data = mixed_data(1 << 20, 11);
    let tmp = TempFile::new("/dev/shm", "tmpfs", &data);
    let extents = vec![Extent {
        offset: 64 << 10,
        len: 512 << 10,
    }];
    let p = Pipeline::start(&tmp.path, 1 << 20, extents.clone(), config(4096, 1 << 20)).unwrap();
    read_and_check(&p, &File::open(&tmp.path).unwrap(), &extents, 4096);
}

#[test]
fn handles_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pipeline>();
    send_sync::<Piece>();
    send_sync::<PipelineError>();
    send_sync::<RateLimiter>();
}
