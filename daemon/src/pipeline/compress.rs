//! The compressor pool: workers that compress each data run (already hashed
//! by the reader) with zstd, keeping the raw bytes when compression would
//! save less than 5%.
//!
//! Data that does not compress is not compressed again and again:
//! - a long run is tasted first: three 8 KiB samples (start, middle, end)
//!   are compressed, and a run none of whose samples compresses is sent raw
//!   without compressing the rest;
//! - after [`STREAK`] short runs in a row that did not compress, a worker
//!   sends short runs raw, trying one in every [`RETRY_EVERY`] again, and
//!   every one as soon as one compresses.
//!
//! On random or encrypted data this cuts the compressor's work about
//! fortyfold for long runs and sixteenfold for scattered 4 KiB writes; data
//! that compresses anywhere a sample or a retry lands is compressed. Long
//! runs are always tasted: skipping them after a streak, as short ones
//! are, sent `cargo xtask bench sync`'s disk of mixed files about 15% more
//! bytes at its seed, for 1 or 2% less CPU at 100% random churn.

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
    /// Calls into zstd, samples included.
    squeezes: u64,
}

impl Zstd {
    pub(super) fn new(level: i32) -> io::Result<Self> {
        Ok(Self {
            compressor: Compressor::new(level)?,
            scratch: Vec::new(),
            misses: 0,
            squeezes: 0,
        })
    }

    /// `raw` compressed, or `None` when that would not save 5%.
    fn compress(&mut self, raw: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if raw.len() >= LONG {
            if !self.samples_compress(raw)? {
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

    fn whole(&mut self, raw: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let n = self.squeeze(raw)?;
        Ok((!too_big(n, raw.len())).then(|| self.scratch[..n].to_vec()))
    }

    /// Whether at least one of three samples of a long run compresses.
    fn samples_compress(&mut self, raw: &[u8]) -> io::Result<bool> {
        let middle = (raw.len() / 2) & !(SAMPLE - 1);
        for start in [0, middle, raw.len() - SAMPLE] {
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
                    if let Piece::Data {
                        raw_len, payload, ..
                    } = &piece
                    {
                        Shared::add(&self.shared.data_bytes, u64::from(*raw_len));
                        Shared::add(&self.shared.payload_bytes, payload.len() as u64);
                    }
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
    } = job;
    let raw_len = u32::try_from(raw.len()).expect("runs are at most one read long");
    let compressed = match zstd {
        Some(zstd) => zstd.compress(&raw)?,
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
            assert!(z.compress(&random).unwrap().is_none());
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
        assert!(z.compress(&long).unwrap().is_none());
        assert_eq!(
            z.squeezes - before,
            3,
            "a long run is tasted by three samples"
        );
        // Compressible data is found at the next retry and ends the streak:
        // every short run is tried again.
        let text = vec![b'a'; 4096];
        let found = (0..RETRY_EVERY).find(|_| z.compress(&text).unwrap().is_some());
        assert!(found.is_some(), "a retry must land within RETRY_EVERY runs");
        assert_eq!(z.misses, 0);
        let before = z.squeezes;
        assert!(z.compress(&random).unwrap().is_none());
        assert!(z.squeezes > before, "tried again after a hit");
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
