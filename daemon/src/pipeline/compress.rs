//! The compressor pool: workers that hash each data run and compress it with
//! zstd, keeping the raw bytes when compression would save less than 5%.
//!
//! Long runs are tasted first: three small samples (start, middle, end) are
//! compressed, and a run none of whose samples compresses is sent raw
//! without compressing the rest. On random or encrypted data this cuts the
//! compressor's work about fortyfold; a run that compresses anywhere a
//! sample lands is compressed whole.

use std::{io, sync::Arc};

use crossbeam_channel::Receiver;
use zstd::bulk::Compressor;

use super::{Codec, PanicGuard, Permit, Piece, PipelineError, Sender, Shared};

/// Compressed output must be below this share of the raw size (in percent)
/// to be worth sending compressed.
const WORTH_PERCENT: u64 = 95;

/// Bytes in each of the three samples a long run is tasted with.
const SAMPLE: usize = 8 << 10;

/// Whether `raw` is worth compressing: short runs always are tried; long
/// ones when at least one sample compresses.
fn worth_trying(zstd: &mut Compressor<'_>, scratch: &mut Vec<u8>, raw: &[u8]) -> io::Result<bool> {
    if raw.len() < 8 * SAMPLE {
        return Ok(true);
    }
    let middle = (raw.len() / 2) & !(SAMPLE - 1);
    for start in [0, middle, raw.len() - SAMPLE] {
        let sample = &raw[start..start + SAMPLE];
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(SAMPLE));
        let n = zstd.compress_to_buffer(sample, scratch)?;
        if (n as u64) * 100 < SAMPLE as u64 * WORTH_PERCENT {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A run of non-zero chunks on its way to a worker.
pub(super) struct Job {
    pub(super) offset: u64,
    pub(super) raw: Vec<u8>,
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
            match Compressor::new(self.level) {
                Ok(c) => zstd = Some(c),
                Err(source) => {
                    self.fail(source);
                    return;
                }
            }
        }
        let mut scratch = Vec::new();
        for job in self.jobs.iter() {
            if self.shared.cancelled() {
                // Dropping the job returns its permit.
                continue;
            }
            match encode(zstd.as_mut(), &mut scratch, job) {
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

/// Hashes and (with `zstd`) compresses `job` into a `Data` piece, using
/// `scratch` as the compression buffer.
pub(super) fn encode(
    zstd: Option<&mut Compressor<'_>>,
    scratch: &mut Vec<u8>,
    job: Job,
) -> io::Result<Piece> {
    let Job {
        offset,
        raw,
        mut permit,
    } = job;
    let data_hash = xxhash_rust::xxh3::xxh3_64(&raw);
    let raw_len = u32::try_from(raw.len()).expect("runs are at most one read long");
    let zstd = match zstd {
        Some(zstd) => worth_trying(zstd, scratch, &raw)?.then_some(zstd),
        None => None,
    };
    let (codec, payload) = match zstd {
        Some(zstd) => {
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(raw.len()));
            let n = zstd.compress_to_buffer(&raw, scratch)?;
            if n as u64 * 100 >= u64::from(raw_len) * WORTH_PERCENT {
                (Codec::Raw, raw)
            } else {
                (Codec::Zstd, scratch[..n].to_vec())
            }
        }
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
            raw,
        }
    }

    #[test]
    fn compressible_data_is_zstd_and_round_trips() {
        let budget = Budget::new(1 << 20);
        let raw: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let mut z = Compressor::new(1).unwrap();
        let piece = encode(Some(&mut z), &mut Vec::new(), job(&budget, raw.clone())).unwrap();
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
        let mut z = Compressor::new(3).unwrap();
        let piece = encode(Some(&mut z), &mut Vec::new(), job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!(codec, Codec::Raw);
        assert_eq!(payload, raw);
    }

    #[test]
    fn a_long_run_compressible_only_in_its_middle_is_compressed() {
        let budget = Budget::new(4 << 20);
        let mut raw = vec![0; 1 << 20];
        rand::thread_rng().fill_bytes(&mut raw);
        let middle = raw.len() / 2 - (64 << 10);
        raw[middle..middle + (128 << 10)].fill(7);
        let mut z = Compressor::new(1).unwrap();
        let piece = encode(Some(&mut z), &mut Vec::new(), job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!(codec, Codec::Zstd);
        assert_eq!(zstd::bulk::decompress(&payload, raw.len()).unwrap(), raw);

        // The same run without the compressible part is tasted and sent raw.
        let mut random = vec![0; 1 << 20];
        rand::thread_rng().fill_bytes(&mut random);
        let mut scratch = Vec::new();
        assert!(!worth_trying(&mut z, &mut scratch, &random).unwrap());
        let piece = encode(Some(&mut z), &mut scratch, job(&budget, random.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!((codec, payload), (Codec::Raw, random));
    }

    #[test]
    fn level_zero_is_always_raw() {
        let budget = Budget::new(1 << 20);
        let raw = vec![1; 8192];
        let piece = encode(None, &mut Vec::new(), job(&budget, raw.clone())).unwrap();
        let Piece::Data { codec, payload, .. } = piece else {
            panic!("not data")
        };
        assert_eq!((codec, payload), (Codec::Raw, raw));
    }
}
