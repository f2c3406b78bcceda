//! The source-side read pipeline: dirty extents in, pieces ready to send out.
//!
//! ```text
//!  extents ──▶ reader thread ───── Data runs ─────▶ zstd pool ──┐
//!              (io_uring, O_DIRECT,  (bounded)      (N threads,  ├─▶ Pipeline::recv
//!               throttles, zero  ───── Zero runs, errors ───────┘   (bounded)
//!               detection)
//! ```
//!
//! Invariants:
//! - the pieces cover exactly the requested extents, each byte once, in any
//!   order; a `Zero` piece covers only chunks that read as all zeroes, and a
//!   `Data` piece never contains a whole all-zero chunk;
//! - bytes of data in flight (read buffers handed to the pipeline, jobs,
//!   pieces the consumer still holds) never exceed `mem_cap`: a [`Permit`]
//!   taken before each read travels with its data to the consumer;
//! - the stream ends with `None` only when everything was read; a failure
//!   (including a stage that panicked) arrives as an `Err` and ends it;
//! - [`Pipeline::finish`] and drop stop every stage and join its thread
//!   whatever the consumer did.
//!
//! Fixed per-pipeline memory outside the budget: `queue_depth` read buffers
//! of `max_io` bytes (fewer if the budget cannot fill them), plus spare ones
//! that long reads are leased from rather than copied (as many as can wait
//! to be sent, within the budget; none for a job of short reads; past them
//! leases take the read-ahead buffers but the last), all in one mapping
//! rounded up to whole 2 MiB huge pages, one zstd context and
//! compression scratch buffer per compressor thread (and a context on the
//! reader, which tastes its leased runs), and the queues' slots
//! (at most 4096 pieces and 256 jobs, without their data, a few hundred
//! KiB).

pub mod budget;
mod compress;
mod reader;
#[cfg(test)]
mod tests;

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crossbeam_channel::Receiver;

pub use budget::{Budget, Permit};

use crate::{
    dirty::Extent,
    sys::uring::Lease,
    throttle::{IoPrio, RateLimiter},
};

/// Bytes of leased payloads a link may hold until its peer has read them:
/// its socket's send buffer (2 MiB) with the kernel's bookkeeping.
const LINK_HOLDS: u64 = 4 << 20;

/// How a `Data` piece's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    Raw,
    Zstd,
}

/// A data run's bytes: copied out of the read ring or compressed, or the
/// ring's own buffer, leased until the piece is dropped.
#[derive(Debug)]
pub enum Payload {
    Owned(Vec<u8>),
    Leased(Lease),
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Owned(bytes) => bytes,
            Payload::Leased(lease) => lease,
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Owned(bytes)
    }
}

/// A run of the device, ready to send.
pub enum Piece {
    /// `payload` is zstd-compressed or raw; `raw_len` bytes at `offset` of
    /// the device.
    Data {
        offset: u64,
        raw_len: u32,
        codec: Codec,
        /// `xxh3_64` of the raw bytes.
        data_hash: u64,
        payload: Payload,
        /// Holds the piece's share of the memory budget until dropped.
        permit: Permit,
    },
    /// `len` bytes of zeroes at `offset` (coalesced runs of all-zero chunks).
    Zero { offset: u64, len: u64 },
}

impl Piece {
    /// Bytes of the device this piece covers.
    pub fn raw_len(&self) -> u64 {
        match self {
            Piece::Data { raw_len, .. } => u64::from(*raw_len),
            Piece::Zero { len, .. } => *len,
        }
    }

    /// Device offset of the first byte this piece covers.
    pub fn offset(&self) -> u64 {
        match self {
            Piece::Data { offset, .. } | Piece::Zero { offset, .. } => *offset,
        }
    }
}

impl fmt::Debug for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Piece::Data {
                offset,
                raw_len,
                codec,
                data_hash,
                payload,
                permit,
            } => f
                .debug_struct("Data")
                .field("offset", offset)
                .field("raw_len", raw_len)
                .field("codec", codec)
                .field("data_hash", &format_args!("{data_hash:#018x}"))
                .field("payload_len", &payload.len())
                .field("permit", permit)
                .finish(),
            Piece::Zero { offset, len } => f
                .debug_struct("Zero")
                .field("offset", offset)
                .field("len", len)
                .finish(),
        }
    }
}

/// How to read.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Zero-detection granularity (the tracker's chunk size, 4 KiB–1 MiB).
    pub chunk_size: u64,
    /// Largest single read; extents are split and coalesced up to this
    /// (rounded down to whole chunks, at least one chunk).
    pub max_io: u32,
    /// io_uring reads in flight.
    pub queue_depth: u32,
    /// zstd level; 0 = no compression.
    pub zstd_level: i32,
    pub compress_threads: usize,
    /// Bytes of data in flight across all stages and unsent pieces.
    pub mem_cap: u64,
    /// Read bytes per second (`--read-limit`).
    pub read_bytes: Option<Arc<RateLimiter>>,
    /// Read operations per second (`--read-iops`).
    pub read_ops: Option<Arc<RateLimiter>>,
    /// Applied to each read and to the reader thread.
    pub ioprio: Option<IoPrio>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64 << 10,
            max_io: 1 << 20,
            queue_depth: 16,
            zstd_level: 1,
            compress_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_cap: 256 << 20,
            read_bytes: None,
            read_ops: None,
            ioprio: None,
        }
    }
}

impl PipelineStats {
    /// Adds another run's figures (the peak is the larger of the two).
    pub fn add(&mut self, other: &PipelineStats) {
        self.bytes_read += other.bytes_read;
        self.read_ops += other.read_ops;
        self.zero_bytes += other.zero_bytes;
        self.data_bytes += other.data_bytes;
        self.payload_bytes += other.payload_bytes;
        self.mem_peak = self.mem_peak.max(other.mem_peak);
    }
}

/// What a pipeline did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub bytes_read: u64,
    pub read_ops: u64,
    pub zero_bytes: u64,
    /// Raw bytes of `Data` pieces.
    pub data_bytes: u64,
    /// Bytes of `Data` payloads after compression.
    pub payload_bytes: u64,
    /// Most bytes of the memory budget held at once.
    pub mem_peak: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: cannot open for reading")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: read of {len} bytes failed at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: device ends at offset {offset}, inside an extent to read")]
    ShortRead { path: PathBuf, offset: u64 },
    #[error("io_uring {op} failed")]
    Uring {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("zstd compression failed")]
    Compress {
        #[source]
        source: io::Error,
    },
    #[error("invalid pipeline configuration: {reason}")]
    Config { reason: String },
    #[error(
        "extent at offset {offset} ({len} bytes) is invalid for a {device_size}-byte device: {reason}"
    )]
    Extent {
        offset: u64,
        len: u64,
        device_size: u64,
        reason: &'static str,
    },
    #[error("cannot start the {stage} thread")]
    Spawn {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {stage} thread panicked")]
    Panicked { stage: &'static str },
}

impl From<crate::sys::uring::RingError> for PipelineError {
    fn from(e: crate::sys::uring::RingError) -> Self {
        PipelineError::Uring {
            op: e.op,
            source: e.source,
        }
    }
}

type Sender = crossbeam_channel::Sender<Result<Piece, PipelineError>>;

/// State shared by the stages and the handle.
#[derive(Default)]
struct Shared {
    cancel: AtomicBool,
    bytes_read: AtomicU64,
    read_ops: AtomicU64,
    zero_bytes: AtomicU64,
    data_bytes: AtomicU64,
    payload_bytes: AtomicU64,
}

impl Shared {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a `Data` piece's raw and payload bytes as it is sent on.
    fn count(&self, piece: &Piece) {
        if let Piece::Data {
            raw_len, payload, ..
        } = piece
        {
            Self::add(&self.data_bytes, u64::from(*raw_len));
            Self::add(&self.payload_bytes, payload.len() as u64);
        }
    }
}

/// Sends an `Err(Panicked)` down the stream if its thread unwinds, so a
/// crashed stage can never look like a finished one.
struct PanicGuard {
    stage: &'static str,
    out: Sender,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .out
                .send(Err(PipelineError::Panicked { stage: self.stage }));
        }
    }
}

/// The running stages reading one device.
pub struct Pipeline {
    rx: Receiver<Result<Piece, PipelineError>>,
    shared: Arc<Shared>,
    budget: Budget,
    threads: Vec<(&'static str, JoinHandle<()>)>,
    ended: AtomicBool,
    stopped: bool,
}

/// Checks the configuration; returns the read size (whole chunks).
fn check_config(cfg: &PipelineConfig) -> Result<u64, PipelineError> {
    let bad = |reason: String| Err(PipelineError::Config { reason });
    if cfg.chunk_size == 0 || !cfg.chunk_size.is_multiple_of(512) {
        return bad(format!(
            "chunk size {} is not a positive multiple of 512",
            cfg.chunk_size
        ));
    }
    if cfg.max_io == 0 {
        return bad("max_io must be positive".into());
    }
    let chunks = (u64::from(cfg.max_io) / cfg.chunk_size).max(1);
    let read_size = chunks * cfg.chunk_size;
    if read_size > crate::sys::uring::MAX_BUF_LEN as u64 {
        return bad(format!("reads of {read_size} bytes exceed 1 GiB"));
    }
    if !(1..=4096).contains(&cfg.queue_depth) {
        return bad(format!(
            "queue depth {} is not within 1..=4096",
            cfg.queue_depth
        ));
    }
    if cfg.compress_threads == 0 {
        return bad("compress_threads must be at least 1".into());
    }
    if cfg.mem_cap == 0 {
        return bad("mem_cap must be positive".into());
    }
    let levels = zstd::compression_level_range();
    if cfg.zstd_level != 0 && !levels.contains(&cfg.zstd_level) {
        return bad(format!(
            "zstd level {} is not 0 (off) or within {}..={}",
            cfg.zstd_level,
            levels.start(),
            levels.end()
        ));
    }
    Ok(read_size)
}

/// Checks that `extents` are sorted, disjoint, 512-aligned and inside the
/// device (an end off the 512 grid is allowed only at the device's end).
fn check_extents(extents: &[Extent], device_size: u64) -> Result<(), PipelineError> {
    let mut prev_end = 0;
    for e in extents {
        let bad = |reason| {
            Err(PipelineError::Extent {
                offset: e.offset,
                len: e.len,
                device_size,
                reason,
            })
        };
        let Some(end) = e.offset.checked_add(e.len) else {
            return bad("its end overflows");
        };
        if e.len == 0 {
            return bad("it is empty");
        }
        if e.offset < prev_end {
            return bad("extents are not sorted and disjoint");
        }
        if !e.offset.is_multiple_of(512) {
            return bad("its offset is not a multiple of 512");
        }
        if end > device_size {
            return bad("it ends past the device");
        }
        if !end.is_multiple_of(512) && end != device_size {
            return bad("its end is not a multiple of 512");
        }
        prev_end = end;
    }
    Ok(())
}

impl Pipeline {
    /// Starts reading `extents` (byte ranges of `device`, sorted,
    /// chunk-aligned except possibly at the device end) from `device`, a
    /// block device or regular file, opened `O_DIRECT` by the pipeline (or,
    /// on a filesystem that refuses `O_DIRECT` such as tmpfs, through the
    /// page cache, with a warning).
    pub fn start(
        device: &Path,
        device_size: u64,
        extents: Vec<Extent>,
        cfg: PipelineConfig,
    ) -> Result<Pipeline, PipelineError> {
        let read_size = check_config(&cfg)?;
        check_extents(&extents, device_size)?;
        let budget = Budget::new(cfg.mem_cap);
        let shared = Arc::new(Shared::default());
        let queue = reader::queue_len(&extents, read_size);
        let (out_tx, out_rx) = crossbeam_channel::bounded(queue);
        let jobs = (queue / 16).max(cfg.compress_threads * 2);
        let (job_tx, job_rx) = crossbeam_channel::bounded(jobs);
        let mut pipeline = Pipeline {
            rx: out_rx,
            shared: shared.clone(),
            budget: budget.clone(),
            threads: Vec::new(),
            ended: AtomicBool::new(false),
            stopped: false,
        };

        for i in 0..cfg.compress_threads {
            let worker = compress::Worker {
                level: cfg.zstd_level,
                jobs: job_rx.clone(),
                out: out_tx.clone(),
                shared: shared.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-zstd-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(handle) => pipeline.threads.push(("compressor", handle)),
                Err(source) => {
                    // Let go of the channels before `pipeline`'s drop
                    // waits for every sender to be gone.
                    drop((job_tx, out_tx));
                    return Err(PipelineError::Spawn {
                        stage: "compressor",
                        source,
                    });
                }
            }
        }
        drop(job_rx);

        // Buffers beyond what the budget lets be in flight would sit idle.
        let depth = cfg
            .queue_depth
            .min(u32::try_from((cfg.mem_cap / read_size).max(1)).unwrap_or(u32::MAX));
        // Spare buffers to lease long reads from: as many as can wait
        // downstream (queued, with the compressors, with the consumer, in
        // the link until its peer has read them), within the budget, and no
        // more than there are long reads.
        let long_reads = reader::Reads::new(extents.iter().copied(), read_size)
            .filter(|r| r.len >= reader::LEASE_MIN)
            .count();
        let in_link = usize::try_from(LINK_HOLDS / read_size).unwrap_or(0) + 1;
        let spare = (queue + jobs + cfg.compress_threads + 1 + in_link)
            .min(
                usize::try_from(cfg.mem_cap / read_size)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(depth as usize),
            )
            .min(long_reads)
            .min(usize::from(u16::MAX) - depth as usize);
        let taster = match cfg.zstd_level {
            0 => None,
            level => Some(
                compress::Zstd::new(level).map_err(|source| PipelineError::Compress { source })?,
            ),
        };
        let reader = reader::Reader {
            path: device.to_owned(),
            reads: reader::Reads::new(extents, read_size),
            depth: depth as u16,
            spare: spare as u16,
            buf_len: read_size.next_multiple_of(crate::sys::uring::BUF_ALIGN as u64) as usize,
            chunk_size: cfg.chunk_size,
            ioprio: cfg.ioprio,
            read_bytes: cfg.read_bytes,
            read_ops: cfg.read_ops,
            budget,
            shared,
            runs: Vec::new(),
            taster,
            out: out_tx,
            jobs: job_tx,
        };
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let spawned = std::thread::Builder::new()
            .name("ferry-read".into())
            .spawn(move || reader.run(ready_tx));
        match spawned {
            Ok(handle) => pipeline.threads.push(("reader", handle)),
            Err(source) => {
                return Err(PipelineError::Spawn {
                    stage: "reader",
                    source,
                })
            }
        }
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(pipeline),
            Ok(Err(e)) => Err(e),
            // The reader panicked before it was ready; finish says so.
            Err(_) => Err(pipeline
                .finish()
                .err()
                .unwrap_or(PipelineError::Panicked { stage: "reader" })),
        }
    }

    /// Whether a piece (or the end) is ready without waiting.
    pub fn ready(&self) -> bool {
        self.ended.load(Ordering::Relaxed) || !self.rx.is_empty()
    }

    /// The next piece, in any order; `None` when everything was read. An
    /// `Err` ends the stream: after it, this returns `None`.
    pub fn recv(&self) -> Option<Result<Piece, PipelineError>> {
        if self.ended.load(Ordering::Relaxed) {
            return None;
        }
        match self.rx.recv() {
            Ok(Ok(piece)) => Some(Ok(piece)),
            Ok(Err(e)) => {
                self.ended.store(true, Ordering::Relaxed);
                Some(Err(e))
            }
            Err(_) => {
                self.ended.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// The stream itself, for `select!`. Disconnected when everything was
    /// read; after an `Err`, stop reading it.
    pub fn receiver(&self) -> &Receiver<Result<Piece, PipelineError>> {
        &self.rx
    }

    /// Counters so far.
    pub fn stats(&self) -> PipelineStats {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PipelineStats {
            bytes_read: get(&s.bytes_read),
            read_ops: get(&s.read_ops),
            zero_bytes: get(&s.zero_bytes),
            data_bytes: get(&s.data_bytes),
            payload_bytes: get(&s.payload_bytes),
            mem_peak: self.budget.peak(),
        }
    }

    /// The memory budget the pipeline takes its permits from.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Stops all stages and joins their threads (also done on drop), even if
    /// the consumer stopped early. Fails only if a stage panicked; read and
    /// compression errors are reported through [`recv`](Self::recv).
    pub fn finish(mut self) -> Result<PipelineStats, PipelineError> {
        let panicked = self.stop();
        match panicked {
            Some(stage) => Err(PipelineError::Panicked { stage }),
            None => Ok(self.stats()),
        }
    }

    /// Cancels, drains the stream (returning its permits) until every stage
    /// has let go of it, and joins the threads. Returns a stage that panicked.
    fn stop(&mut self) -> Option<&'static str> {
        if self.stopped {
            return None;
        }
        self.stopped = true;
        self.shared.cancel.store(true, Ordering::Relaxed);
        self.budget.close();
        // Every stage drops its sender when its thread ends.
        while self.rx.recv().is_ok() {}
        let mut panicked = None;
        for (stage, handle) in self.threads.drain(..) {
            if handle.join().is_err() {
                panicked.get_or_insert(stage);
            }
        }
        panicked
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(stage) = self.stop() {
            tracing::error!(stage, "pipeline stage panicked");
        }
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
