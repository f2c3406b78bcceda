//! The compressor pool: workers that compress each data run (already hashed
//! by the reader) with zstd, keeping the raw bytes when compression would
//! save less than 5%.
//!
//! Data that does not compress is not compressed again and again:
//! - a long run is tasted first: three 8 KiB samples (start, middle, end)
//!   are compressed, and a run none of whose samples compresses is sent raw
//!   without compressing the rest; after [`LONG_STREAK`] such runs in a row
//!   a worker tastes one sample per long run, at start, middle and end in
//!   turn, and all three again as soon as one compresses;
//! - after [`STREAK`] short runs in a row that did not compress, a worker
//!   sends short runs raw, trying one in every [`RETRY_EVERY`] again, and
//!   every one as soon as one compresses.
//!
//! A read that is one long run, kept in the read ring's buffer, is tasted
//! by the reader with a [`Zstd`] of its own: when no sample compresses it
//! goes straight out raw, and a worker never sees it; when one does, the
//! worker compresses it whole without tasting it again. Other runs are
//! tasted by the worker that takes them.
//!
//! On random or encrypted data this cuts the compressor's work 128-fold
//! for 1 MiB reads and sixteenfold for scattered 4 KiB writes;
//! data that compresses anywhere a sample or a retry lands is compressed.
//! Long runs are always tasted: skipping them after a streak, as short ones
//! are, sent `cargo xtask bench sync`'s disk of mixed files about 15% more
//! bytes at its seed. Three samples a run were still 2.5% of the CPU of a
//! 100% random churn job, source and target together (perf).

use std::{io, sync::Arc};

use crossbeam_channel::Receiver;
use zstd::bulk::Compressor;

use super::{Codec, PanicGuard, Payload, Permit, Piece, PipelineError, Sender, Shared};

/// Compressed output must be below this share of the raw size (in percent)
/// to be worth sending compressed.
const WORTH_PERCENT: u64 = 95;

/// Bytes in each of the three samples a long run is tasted with.
const SAMPLE: usize = 8 << 10;

/// Runs of at least this many bytes are tasted by samples.
const LONG: usize = 8 * SAMPLE;
/// Long runs in a row that did not compress before a worker tastes one
/// sample per run instead of three.
const LONG_STREAK: u32 = 4;
/// Short runs in a row that did not compress before a worker stops trying.
const STREAK: u32 = 8;
/// While it has stopped, a worker still tries one short run in this many.
const RETRY_EVERY: u32 = 16;

/// One worker's compressor and what it learnt about the data.
pub(super) struct Zstd {
    compressor: Compressor<'static>,
    scratch: Vec<u8>,
    /// Short runs in a row that did not compress (or were not tried).
    misses: u32,
    /// Long runs in a row none of whose samples compressed.
    long_misses: u32,
    /// Calls into zstd, samples included.
    squeezes: u64,
}

impl Zstd {
    pub(super) fn new(level: i32) -> io::Result<Self> {
        Ok(Self {
            compressor: Compressor::new(level)?,
            scratch: Vec::new(),
            misses: 0,
            long_misses: 0,
            squeezes: 0,
        })
    }

    /// `raw` compressed, or `None` when that would not save 5%. A long run
    /// already `tasted` (and found worth it) is compressed whole at once.
    fn compress(&mut self, raw: &[u8], tasted: bool) -> io::Result<Option<Vec<u8>>> {
        if raw.len() >= LONG {
            if !tasted && !self.taste(raw)? {
                return Ok(None);
            }
            return self.whole(raw);
        }
        if self.misses >= STREAK && !self.misses.is_multiple_of(RETRY_EVERY) {
            self.misses += 1;
            return Ok(None);
        }
        let out = self.whole(raw)?;
        self.misses = if out.is_some() { 0 } else { self.misses + 1 };
        Ok(out)
    }

    /// Whether long run `raw` is worth compressing whole, by its samples;
    /// the answer counts toward the streak of long runs that were not.
    pub(super) fn taste(&mut self, raw: &[u8]) -> io::Result<bool> {
        let worth = self.samples_compress(raw)?;
        self.long_misses = if worth {
            0
        } else {
            self.long_misses.saturating_add(1)
        };
        Ok(worth)
    }

    fn whole(&mut self, raw: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let n = self.squeeze(raw)?;
        Ok((!too_big(n, raw.len())).then(|| self.scratch[..n].to_vec()))
    }

    /// Whether a sample of a long run compresses: any of three, or during
    /// a streak of long runs that did not, the one whose turn it is.
    fn samples_compress(&mut self, raw: &[u8]) -> io::Result<bool> {
        let middle = (raw.len() / 2) & !(SAMPLE - 1);
        let starts = [0, middle, raw.len() - SAMPLE];
        let starts = if self.long_misses < LONG_STREAK {
            &starts[..]
        } else {
            let turn = (self.long_misses % 3) as usize;
            &starts[turn..=turn]
        };
        for &start in starts {
            if !too_big(self.squeeze(&raw[start..start + SAMPLE])?, SAMPLE) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Compresses `raw` into the scratch buffer; returns the length.
    fn squeeze(&mut self, raw: &[u8]) -> io::Result<usize> {
        self.squeezes += 1;
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        self.compressor.compress_to_buffer(raw, &mut self.scratch)
    }
}

/// Whether `n` compressed bytes of `raw` raw ones save too little.
fn too_big(n: usize, raw: usize) -> bool {
    n as u64 * 100 >= raw as u64 * WORTH_PERCENT
}

/// A run of non-zero chunks on its way to a worker.
pub(super) struct Job {
    pub(super) offset: u64,
    pub(super) raw: Payload,
    /// `xxh3_64` of `raw`.
    pub(super) data_hash: u64,
    pub(super) permit: Permit,
    /// A long run the reader tasted and found worth compressing whole
    /// (the worker does not taste it again).
    pub(super) tasted: bool,
}

pub(super) struct Worker {
    /// 0 = no compression.
    pub(super) level: i32,
    pub(super) jobs: Receiver<Job>,
    pub(super) out: Sender,
    pub(super) shared: Arc<Shared>,
}

impl Worker {
    /// Works until the reader hangs up or the consumer is gone.
    pub(super) fn run(self) {
        let _guard = PanicGuard {
            stage: "compressor",
            out: self.out.clone(),
        };
        let mut zstd = None;
        if self.level != 0 {
            match Zstd::new(self.level) {
                Ok(z) => zstd = Some(z),
                Err(source) => {
                    self.fail(source);
                    return;
                }
            }
        }
        for job in self.jobs.iter() {
            if self.shared.cancelled() {
                // Dropping the job returns its permit.
                continue;
            }
            match encode(zstd.as_mut(), job) {
                Ok(piece) => {
                    self.shared.count(&piece);
                    if self.out.send(Ok(piece)).is_err() {
                        return;
                    }
                }
                Err(source) => {
                    self.fail(source);
                    return;
                }
            }
        }
    }

    /// Reports `source` and stops the pipeline: an error ends the stream.
    fn fail(&self, source: io::Error) {
        self.shared
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.out.send(Err(PipelineError::Compress { source }));
    }
}

/// Makes `job` a `Data` piece, compressed when `zstd` is given and it pays.
pub(super) fn encode(zstd: Option<&mut Zstd>, job: Job) -> io::Result<Piece> {
    let Job {
        offset,
        raw,
        data_hash,
        mut permit,
        tasted,
    } = job;
    let raw_len = u32::try_from(raw.len()).expect("runs are at most one read long");
    let compressed = match zstd {
        Some(zstd) => zstd.compress(&raw, tasted)?,
        None => None,
    };
    let (codec, payload) = match compressed {
        Some(payload) => (Codec::Zstd, Payload::Owned(payload)),
        None => (Codec::Raw, raw),
    };
    // The raw bytes are gone if compressed: hold only what is kept.
    permit.shrink_to(payload.len() as u64);
    Ok(Piece::Data {
        offset,
        raw_len,
        codec,
        data_hash,
        payload,
        permit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Budget;
    use rand::RngCore;

    fn job(budget: &Budget, raw: Vec<u8>) -> Job {
        Job {
            offset: 4096,
            permit: budget.acquire(raw.len() as u64).unwrap(),
            data_hash: xxhash_rust::xxh3::xxh3_64(&raw),
            raw: raw.into(),
            tasted: false,
        }
    }

    #[test]
    fn compressible_data_is_zstd_and_round_trips() {
        let budget = Budget::new(1 << 20);
        let raw: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let mut z = Zstd::new(1).unwrap();
        let piece = encode(Some(&mut z), job(&budget, raw.clone())).unwrap();
        let Piece::Data {
            offset,
            raw_len,
            codec,
            data_hash,
            payload,
            permit,
        } = piece
        else {
            panic!("not data")
        };
        assert_eq!((offset, raw_len, codec), (4096, 65536, Codec::Zstd));
        assert_eq!(data_hash, xxhash_rust::xxh3::xxh3_64(&raw));
        assert_eq!(zstd::bulk::decompress(&payload, raw.len()).unwrap(), raw);
        // Only the compressed bytes stay accounted.
        assert_eq!(permit.bytes(), payload.len() as u64);
        assert_eq!(budget.in_use(), payload.len() as u64);
    }

    #[test]
    fn incompressible_data_is_sent_raw() {
        let budget = Budget::new(1 << 20);
        let mut raw = vec![0; 65536];
        rand::thread_rng().fill_bytes(&mut raw);
        let mut z = Zstd::new(3).unwrap();
        let piece = encode(Some(&mut z), job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!(codec, Codec::Raw);
        assert_eq!(&payload[..], &raw[..]);
    }

    #[test]
    fn a_long_run_compressible_only_in_its_middle_is_compressed() {
        let budget = Budget::new(4 << 20);
        let mut raw = vec![0; 1 << 20];
        rand::thread_rng().fill_bytes(&mut raw);
        let middle = raw.len() / 2 - (64 << 10);
        raw[middle..middle + (128 << 10)].fill(7);
        let mut z = Zstd::new(1).unwrap();
        let piece = encode(Some(&mut z), job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!(codec, Codec::Zstd);
        assert_eq!(zstd::bulk::decompress(&payload, raw.len()).unwrap(), raw);

        // The same run without the compressible part is tasted and sent raw.
        let mut random = vec![0; 1 << 20];
        rand::thread_rng().fill_bytes(&mut random);
        assert!(!z.samples_compress(&random).unwrap());
        let piece = encode(Some(&mut z), job(&budget, random.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!((codec, &payload[..]), (Codec::Raw, &random[..]));
    }

    #[test]
    fn a_streak_of_incompressible_short_runs_stops_the_tries_until_data_compresses() {
        let mut z = Zstd::new(1).unwrap();
        let mut random = vec![0; 4096];
        let mut tried = 0;
        for _ in 0..STREAK + 2 * RETRY_EVERY {
            rand::thread_rng().fill_bytes(&mut random);
            let before = z.squeezes;
            assert!(z.compress(&random, false).unwrap().is_none());
            if z.squeezes > before {
                tried += 1;
            }
        }
        assert_eq!(
            tried,
            STREAK + 2,
            "all until the streak, then one per RETRY_EVERY"
        );
        // Long runs are still tasted during the streak.
        let mut long = vec![0; 4 * LONG];
        rand::thread_rng().fill_bytes(&mut long);
        let before = z.squeezes;
        assert!(z.compress(&long, false).unwrap().is_none());
        assert_eq!(
            z.squeezes - before,
            3,
            "a long run is tasted by three samples"
        );
        // Compressible data is found at the next retry and ends the streak:
        // every short run is tried again.
        let text = vec![b'a'; 4096];
        let found = (0..RETRY_EVERY).find(|_| z.compress(&text, false).unwrap().is_some());
        assert!(found.is_some(), "a retry must land within RETRY_EVERY runs");
        assert_eq!(z.misses, 0);
        let before = z.squeezes;
        assert!(z.compress(&random, false).unwrap().is_none());
        assert!(z.squeezes > before, "tried again after a hit");
    }

    #[test]
    fn a_streak_of_incompressible_long_runs_tastes_one_sample_each_in_turn() {
        let mut z = Zstd::new(1).unwrap();
        let mut random = vec![0; 1 << 20];
        let mut squeezes = Vec::new();
        for _ in 0..LONG_STREAK + 3 {
            rand::thread_rng().fill_bytes(&mut random);
            let before = z.squeezes;
            assert!(z.compress(&random, false).unwrap().is_none());
            squeezes.push(z.squeezes - before);
        }
        let streak = LONG_STREAK as usize;
        assert!(squeezes[..streak].iter().all(|&n| n == 3), "{squeezes:?}");
        assert!(squeezes[streak..].iter().all(|&n| n == 1), "{squeezes:?}");

        // A run compressible only in its middle (or only at its end) is
        // found within three runs: each place has its turn.
        for place in ["middle", "end"] {
            let mut found = None;
            for run in 0..3 {
                rand::thread_rng().fill_bytes(&mut random);
                // 128 KiB around the sample: enough for the whole run to
                // save the 5% it must.
                let at = match place {
                    "middle" => random.len() / 2 - (64 << 10),
                    _ => random.len() - (128 << 10),
                };
                random[at..at + (128 << 10)].fill(b'a');
                if z.compress(&random, false).unwrap().is_some() {
                    found = Some(run);
                    break;
                }
            }
            assert!(found.is_some(), "a compressible {place} was never tasted");
            assert_eq!(z.long_misses, 0, "a hit ends the streak");
            // Back to three samples until the next streak.
            for _ in 0..LONG_STREAK {
                rand::thread_rng().fill_bytes(&mut random);
                let before = z.squeezes;
                assert!(z.compress(&random, false).unwrap().is_none());
                assert_eq!(z.squeezes - before, 3);
            }
        }
    }

    #[test]
    fn a_run_the_reader_tasted_is_compressed_whole_without_tasting_again() {
        let budget = Budget::new(1 << 20);
        let text: Vec<u8> = (0..4 * LONG).map(|i| b"ferry "[i % 6]).collect();
        let mut z = Zstd::new(1).unwrap();
        assert!(z.taste(&text).unwrap());
        let before = z.squeezes;
        let tasted = Job {
            tasted: true,
            ..job(&budget, text.clone())
        };
        let Piece::Data { codec, payload, .. } = encode(Some(&mut z), tasted).unwrap() else {
            panic!("not data")
        };
        assert_eq!(codec, Codec::Zstd);
        assert_eq!(zstd::bulk::decompress(&payload, text.len()).unwrap(), text);
        assert_eq!(z.squeezes - before, 1, "samples were tasted again");
    }

    #[test]
    fn tasting_counts_toward_the_streak_of_long_runs() {
        let mut z = Zstd::new(1).unwrap();
        let mut random = vec![0; 4 * LONG];
        rand::thread_rng().fill_bytes(&mut random);
        assert!(!z.taste(&random).unwrap());
        assert!(!z.taste(&random).unwrap());
        assert_eq!(z.long_misses, 2);
        random[..SAMPLE].fill(b'a');
        assert!(z.taste(&random).unwrap());
        assert_eq!(z.long_misses, 0);
    }

    #[test]
    fn level_zero_is_always_raw() {
        let budget = Budget::new(1 << 20);
        let raw = vec![1; 8192];
        let piece = encode(None, job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!((codec, &payload[..]), (Codec::Raw, &raw[..]));
    }
}
