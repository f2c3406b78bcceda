//! The reader stage: one thread owning the io_uring ring.
//!
//! It walks the extents in reads of at most the read size (contiguous
//! extents coalesced), and for each read, in this order: waits for the
//! throttles, takes the read's bytes from the memory budget, submits. A
//! finished read is cut on the device's chunk grid: runs of all-zero chunks
//! go straight out as `Zero` pieces, runs of other chunks go to the
//! compressor pool, each with its share of the read's permit. A read that
//! is one long run of data is tasted here (see [`super::compress`]), and
//! goes straight out raw when no sample compresses: random or encrypted
//! data then costs no hand-over to a compressor thread and back.
//!
//! It never blocks on the budget or a throttle while reads are in flight:
//! their permits would only come back once it reaps them, so with the budget
//! it tries and falls back to reaping, and for a throttle it waits for
//! completions with a timeout.

use std::{collections::HashMap, iter::Peekable, path::PathBuf, sync::Arc, time::Duration};

use super::{
    compress::{self, Job, Zstd},
    Budget, PanicGuard, Payload, Permit, Piece, PipelineError, Sender, Shared,
};
use crate::{
    dirty::Extent,
    sys::{
        prio,
        uring::{self, Completed, Lease, ReadReq, ReadResult, ReadRing},
    },
    throttle::{IoPrio, RateLimiter, Ticket},
};

/// Longest sleep or wait, so cancellation and rate changes are noticed.
const SLICE: Duration = Duration::from_millis(50);

/// `O_DIRECT` transfer granularity; device sizes are multiples of it.
const SECTOR: u64 = 512;

/// The reads covering a list of extents: contiguous extents are coalesced,
/// then cut into pieces of at most `read_size` bytes from each run's start.
pub(super) struct Reads<I: Iterator<Item = Extent> = std::vec::IntoIter<Extent>> {
    extents: Peekable<I>,
    cur: u64,
    end: u64,
    read_size: u64,
}

impl<I: Iterator<Item = Extent>> Reads<I> {
    pub(super) fn new(extents: impl IntoIterator<IntoIter = I>, read_size: u64) -> Self {
        Self {
            extents: extents.into_iter().peekable(),
            cur: 0,
            end: 0,
            read_size,
        }
    }
}

impl<I: Iterator<Item = Extent>> Iterator for Reads<I> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.cur == self.end {
            let first = self.extents.next()?;
            self.cur = first.offset;
            self.end = first.offset + first.len;
            while let Some(next) = self.extents.next_if(|e| e.offset == self.end) {
                self.end += next.len;
            }
        }
        let len = (self.end - self.cur).min(self.read_size);
        let read = Extent {
            offset: self.cur,
            len,
        };
        self.cur += len;
        Some(read)
    }
}

/// Bytes of data the queue of finished pieces holds, about. It is what the
/// job reads ahead while the connection to the target is still being made.
/// Long runs are leased from the read ring, which has a buffer for each
/// place in the queue, and every buffer is faulted in and pinned when the
/// ring starts. So long runs are held to 16 MiB: at 64 MiB a 100% churn
/// job pinned 92 MiB (now 42) and spent about 0.1 CPU seconds more per
/// 4 GiB (11 alternating pairs, ferry's own time 0.60 against 0.50 s;
/// `perf` showed the kernel clearing those pages at registration); at
/// `mem_cap` (256 MiB) its page faults doubled again. Once connected,
/// the link sets the pace and the queue only needs to keep it fed.
const QUEUED: u64 = 16 << 20;

/// Pieces the queue of finished pieces holds: [`QUEUED`] bytes of this
/// job's average read, between 16 (long runs, 1 MiB reads) and 4096
/// (scattered 4 KiB writes, which would otherwise fill 16 places with
/// 64 KiB and stop the reading ahead).
pub(super) fn queue_len(extents: &[Extent], read_size: u64) -> usize {
    let (bytes, reads) = Reads::new(extents.iter().copied(), read_size)
        .fold((0u64, 0u64), |(bytes, reads), read| {
            (bytes + read.len, reads + 1)
        });
    let average = (bytes / reads.max(1)).max(1);
    usize::try_from(QUEUED / average)
        .unwrap_or(usize::MAX)
        .clamp(16, 4096)
}

/// Why the read loop stopped early.
enum Halt {
    /// Report this down the stream.
    Failed(PipelineError),
    /// The pipeline is being stopped; nobody listens any more.
    Gone,
}

impl<E: Into<PipelineError>> From<E> for Halt {
    fn from(e: E) -> Self {
        Halt::Failed(e.into())
    }
}

/// The next read, with its places in the throttles' queues.
struct Planned {
    read: Extent,
    bytes: Option<Ticket>,
    ops: Option<Ticket>,
}

/// A run of a read: start, end (bytes into the read) and whether its
/// chunks are all zero.
pub(super) type Run = (usize, usize, bool);

/// A read the ring holds.
struct InFlight {
    permit: Permit,
    len: u64,
}

pub(super) struct Reader {
    pub(super) path: PathBuf,
    pub(super) reads: Reads,
    pub(super) depth: u16,
    /// Buffers beyond `depth` that long reads are leased from.
    pub(super) spare: u16,
    pub(super) buf_len: usize,
    pub(super) chunk_size: u64,
    pub(super) ioprio: Option<IoPrio>,
    pub(super) read_bytes: Option<Arc<RateLimiter>>,
    pub(super) read_ops: Option<Arc<RateLimiter>>,
    pub(super) budget: Budget,
    pub(super) shared: Arc<Shared>,
    /// Scratch for each read's runs, kept from read to read.
    pub(super) runs: Vec<Run>,
    /// Tastes leased long runs; `None` when compression is off.
    pub(super) taster: Option<Zstd>,
    pub(super) out: Sender,
    pub(super) jobs: crossbeam_channel::Sender<Job>,
}

impl Reader {
    /// Sets up, tells `ready` how that went, then reads everything.
    pub(super) fn run(mut self, ready: crossbeam_channel::Sender<Result<(), PipelineError>>) {
        let _guard = PanicGuard {
            stage: "reader",
            out: self.out.clone(),
        };
        let mut ring = match self.setup() {
            Ok(ring) => {
                let _ = ready.send(Ok(()));
                ring
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if let Err(Halt::Failed(e)) = self.read_all(&mut ring) {
            let _ = self.out.send(Err(e));
        }
        // Dropping the ring waits for reads still in flight.
    }

    fn setup(&self) -> Result<ReadRing, PipelineError> {
        if let Some(p) = self.ioprio {
            if let Err(e) = prio::set_thread_ioprio(0, p.raw()) {
                tracing::warn!(ioprio = %p, error = %e, "cannot set the reader's I/O priority");
            }
        }
        let (file, direct) =
            uring::open_for_reading(&self.path).map_err(|source| PipelineError::Open {
                path: self.path.clone(),
                source,
            })?;
        if !direct {
            tracing::warn!(
                path = %self.path.display(),
                "O_DIRECT refused by the filesystem; reading through the page cache"
            );
        }
        let block = if direct { SECTOR as u32 } else { 1 };
        Ok(ReadRing::new(
            file,
            self.depth,
            self.spare,
            self.buf_len,
            block,
            true,
        )?)
    }

    fn plan(&self, read: Extent) -> Planned {
        Planned {
            read,
            bytes: self.read_bytes.as_ref().map(|l| l.reserve(read.len)),
            ops: self.read_ops.as_ref().map(|l| l.reserve(1)),
        }
    }

    /// How long `next` must still wait for the throttles.
    fn throttle_wait(&self, next: &Planned) -> Duration {
        let wait = |l: &Option<Arc<RateLimiter>>, t: Option<Ticket>| match (l, t) {
            (Some(l), Some(t)) => l.wait_time(t),
            _ => Duration::ZERO,
        };
        wait(&self.read_bytes, next.bytes).max(wait(&self.read_ops, next.ops))
    }

    fn read_all(&mut self, ring: &mut ReadRing) -> Result<(), Halt> {
        let ioprio = self.ioprio.map_or(0, IoPrio::raw);
        let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
        let mut next_tag = 0u64;
        let mut next: Option<Planned> = None;
        loop {
            if self.shared.cancelled() {
                return Err(Halt::Gone);
            }
            let mut throttled = None;
            while ring.has_free_buffer() {
                if next.is_none() {
                    if let Some(read) = self.reads.next() {
                        next = Some(self.plan(read));
                    }
                }
                let Some(planned) = &next else { break };
                let wait = self.throttle_wait(planned);
                if !wait.is_zero() {
                    throttled = Some(wait.min(SLICE));
                    break;
                }
                let len = planned.read.len;
                let permit = if ring.busy() == 0 {
                    // Nothing of ours to reap: what the budget lacks is held
                    // downstream, so waiting is safe.
                    self.budget.acquire(len).ok_or(Halt::Gone)?
                } else {
                    match self.budget.try_acquire(len) {
                        Some(permit) => permit,
                        None => break,
                    }
                };
                let read = next.take().expect("planned read").read;
                ring.push(ReadReq {
                    tag: next_tag,
                    offset: read.offset,
                    len: read.len.next_multiple_of(SECTOR) as u32,
                    need: read.len as u32,
                    ioprio,
                })?;
                in_flight.insert(next_tag, InFlight { permit, len });
                next_tag += 1;
            }
            ring.submit()?;
            if ring.busy() == 0 {
                match throttled {
                    Some(wait) => std::thread::sleep(wait),
                    None if next.is_none() => return Ok(()),
                    None => {}
                }
                continue;
            }
            ring.wait(throttled)?;
            let mut result = Ok(());
            ring.reap(|done| {
                if result.is_ok() {
                    result = self.complete(done, &mut in_flight);
                }
            });
            result?;
        }
    }

    fn complete(
        &mut self,
        mut done: Completed<'_>,
        in_flight: &mut HashMap<u64, InFlight>,
    ) -> Result<(), Halt> {
        let InFlight { permit, len } = in_flight
            .remove(&done.tag)
            .expect("completion of a read in flight");
        match done.result {
            ReadResult::Data(data) => {
                Shared::add(&self.shared.bytes_read, len);
                Shared::add(&self.shared.read_ops, 1);
                let mut runs = std::mem::take(&mut self.runs);
                self.cut(done.offset, data, &mut runs);
                let lease = match runs[..] {
                    [(0, end, false)] if end as u64 >= LEASE_MIN => done.lease(),
                    _ => None,
                };
                let sent = match lease {
                    // One run of data, kept where it was read.
                    Some(lease) => self.send_leased(done.offset, lease, permit),
                    None => self.split(done.offset, data, &runs, permit),
                };
                self.runs = runs;
                sent
            }
            ReadResult::Eof { at } => Err(Halt::Failed(PipelineError::ShortRead {
                path: self.path.clone(),
                offset: at,
            })),
            ReadResult::Failed { at, error } => Err(Halt::Failed(PipelineError::Read {
                path: self.path.clone(),
                offset: at,
                len: done.offset + len - at,
                source: error,
            })),
        }
    }

    /// Cuts `data` (read at `offset`) on the chunk grid into runs of zero
    /// and of data chunks: `(start, end, zero)`, in order, into `runs`.
    fn cut(&self, offset: u64, data: &[u8], runs: &mut Vec<Run>) {
        runs.clear();
        let mut pos = 0;
        while pos < data.len() {
            let chunk_end = ((offset + pos as u64) / self.chunk_size + 1) * self.chunk_size;
            let end = ((chunk_end - offset) as usize).min(data.len());
            let zero = is_zero(&data[pos..end]);
            match runs.last_mut() {
                Some(run) if run.2 == zero => run.1 = end,
                _ => runs.push((pos, end, zero)),
            }
            pos = end;
        }
    }

    /// Sends each of `runs` of `data` (read at `offset`) on.
    fn split(
        &self,
        offset: u64,
        data: &[u8],
        runs: &[Run],
        mut permit: Permit,
    ) -> Result<(), Halt> {
        for &(start, end, zero) in runs {
            self.emit(offset, &data[start..end], start, zero, &mut permit)?;
        }
        Ok(())
    }

    fn emit(
        &self,
        read_offset: u64,
        run: &[u8],
        at: usize,
        zero: bool,
        permit: &mut Permit,
    ) -> Result<(), Halt> {
        let offset = read_offset + at as u64;
        let len = run.len() as u64;
        if zero {
            Shared::add(&self.shared.zero_bytes, len);
            self.out
                .send(Ok(Piece::Zero { offset, len }))
                .map_err(|_| Halt::Gone)
        } else {
            let (raw, data_hash) = copy_hashed(run);
            self.send_job(offset, Payload::Owned(raw), data_hash, permit.split(len))
        }
    }

    fn send_job(
        &self,
        offset: u64,
        raw: Payload,
        data_hash: u64,
        permit: Permit,
    ) -> Result<(), Halt> {
        let job = Job {
            offset,
            raw,
            data_hash,
            permit,
            tasted: false,
        };
        self.jobs.send(job).map_err(|_| Halt::Gone)
    }

    /// Sends on a read that is one long run of data, kept in its leased
    /// buffer: to the compressors if a sample of it compresses, else
    /// straight out, raw.
    fn send_leased(&mut self, offset: u64, lease: Lease, permit: Permit) -> Result<(), Halt> {
        let data_hash = crate::hash::data_hash(&lease);
        let worth = match self.taster.as_mut() {
            Some(taster) => taster
                .taste(&lease)
                .map_err(|source| PipelineError::Compress { source })?,
            None => false,
        };
        let job = Job {
            offset,
            raw: Payload::Leased(lease),
            data_hash,
            permit,
            tasted: worth,
        };
        if worth {
            return self.jobs.send(job).map_err(|_| Halt::Gone);
        }
        let piece =
            compress::encode(None, job).map_err(|source| PipelineError::Compress { source })?;
        self.shared.count(&piece);
        self.out.send(Ok(piece)).map_err(|_| Halt::Gone)
    }
}

/// Reads of at least this many bytes that hold no zero chunk are sent on in
/// the ring's buffer (leased) rather than copied out, while the ring has a
/// buffer left to read into. Shorter ones are copied: cheap, and they would
/// tie up a whole buffer each.
pub(super) const LEASE_MIN: u64 = 64 << 10;

/// Bytes copied and then hashed at a time: small enough that the hash
/// reads what the copy just wrote from the core's cache.
const HASH_BLOCK: usize = 64 << 10;

/// `run` copied out of the ring's buffer, and its `xxh3_64`, in one pass
/// over memory: the run was just written by the device (or the kernel, on
/// another core), and hashing it later on a compressor thread would read it
/// from memory a second time.
pub(super) fn copy_hashed(run: &[u8]) -> (Vec<u8>, u64) {
    let mut raw = Vec::with_capacity(run.len());
    let mut hasher = crate::hash::data_hasher();
    for block in run.chunks(HASH_BLOCK) {
        let at = raw.len();
        raw.extend_from_slice(block);
        hasher.update(&raw[at..]);
    }
    (raw, hasher.digest())
}

/// Whether every byte is zero; ORs 64-byte blocks, which vectorises.
pub(super) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    #[test]
    fn reads_coalesce_touching_extents_and_split_at_read_size() {
        let extents = vec![e(0, 4096), e(4096, 8192), e(65536, 4096), e(69632, 1000)];
        let reads: Vec<Extent> = Reads::new(extents, 8192).collect();
        assert_eq!(reads, vec![e(0, 8192), e(8192, 4096), e(65536, 5096)]);
        assert_eq!(Reads::new(vec![], 8192).count(), 0);
    }

    #[test]
    fn the_queue_holds_about_16_mib_of_the_average_read() {
        const MIB: u64 = 1 << 20;
        // Long runs in 1 MiB reads: 16 of them.
        assert_eq!(queue_len(&[e(0, 512 * MIB)], MIB), 16);
        // Touching extents are one run.
        let touching: Vec<Extent> = (0..1024).map(|i| e(i * MIB, MIB)).collect();
        assert_eq!(queue_len(&touching, MIB), 16);
        // Scattered 4 KiB writes: as many places as 16 MiB of them needs,
        // at most 4096.
        let scattered: Vec<Extent> = (0..10_000).map(|i| e(i * 8192, 4096)).collect();
        assert_eq!(queue_len(&scattered, MIB), 4096);
        let scattered: Vec<Extent> = (0..100).map(|i| e(i * 2 * MIB, 64 << 10)).collect();
        assert_eq!(queue_len(&scattered, MIB), 256);
        let scattered: Vec<Extent> = (0..10_000).map(|i| e(i * (64 << 10), 8 << 10)).collect();
        assert_eq!(queue_len(&scattered, MIB), 2048);
        assert_eq!(queue_len(&[], MIB), 4096);
    }

    #[test]
    fn a_copy_hashed_block_by_block_hashes_as_the_whole() {
        use rand::RngCore;
        let lens = [
            0,
            1,
            240,
            241,
            4096,
            HASH_BLOCK - 1,
            HASH_BLOCK,
            3 * HASH_BLOCK + 17,
        ];
        for len in lens {
            let mut run = vec![0; len];
            rand::thread_rng().fill_bytes(&mut run);
            let (copy, hash) = copy_hashed(&run);
            assert_eq!(copy, run, "length {len}");
            assert_eq!(hash, xxhash_rust::xxh3::xxh3_64(&run), "length {len}");
        }
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 4096 + 7];
        assert!(is_zero(&buf));
        assert!(is_zero(&[]));
        buf[4100] = 1;
        assert!(!is_zero(&buf));
        assert!(is_zero(&buf[..4096]));
    }
}
