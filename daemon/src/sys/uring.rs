//! io_uring reads into page-aligned buffers that the ring owns.
//!
//! [`ReadRing`] is the only code that talks to io_uring. Its invariants:
//! - every buffer is free, owned by exactly one read in the in-flight table
//!   (keyed by `user_data`, which is the buffer's index), or leased: the
//!   caller sees a buffer's bytes inside [`ReadRing::reap`], after the kernel
//!   has completed the read, and may keep them as a [`Lease`], which gives
//!   the buffer back when dropped. The kernel never writes a leased buffer;
//! - at most `depth` reads are in flight and each buffer has at most one SQE
//!   outstanding, so the completion queue (twice the depth) never
//!   overflows;
//! - dropping the ring waits for every read still in the kernel before the
//!   buffers are freed; if it cannot wait, it leaks them instead. Leased
//!   buffers live on until their leases end.
//!
//! A lease saves copying a read out of the ring: on a long run the copy, and
//! the kernel clearing the fresh pages it goes to, cost the reader more than
//! everything else it does (measured with `perf record` on a 100% churn
//! job).
//!
//! Short reads are resubmitted for the rest and `EINTR`/`EAGAIN` results are
//! retried, so a completion the caller sees is whole, at the end of the file,
//! or a real error.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, register::Probe, types, IoUring};

use super::ringmem::{self, Buf};

/// Alignment of every buffer: enough for `O_DIRECT` on any device.
pub const BUF_ALIGN: usize = 4096;

/// Largest buffer the kernel registers (`IORING_REGISTER_BUFFERS` limit).
pub const MAX_BUF_LEN: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
#[error("io_uring {op} failed")]
pub struct RingError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

fn ring_err(op: &'static str) -> impl FnOnce(io::Error) -> RingError {
    move |source| RingError { op, source }
}

/// Opens `path` read-only with `O_DIRECT`, bypassing the page cache.
pub fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` read-only with `O_DIRECT` or, on a filesystem that refuses
/// it (tmpfs), through the page cache. Returns whether `O_DIRECT` is on.
pub fn open_for_reading(path: &Path) -> io::Result<(File, bool)> {
    match open_direct(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((File::open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// One read: `len` bytes at `offset` into a free buffer. The read counts as
/// whole once `need` (≤ `len`) bytes arrived; `len` may be rounded up past
/// `need` to satisfy `O_DIRECT` at an unaligned end of file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadReq {
    /// Caller's tag, handed back with the completion.
    pub tag: u64,
    pub offset: u64,
    pub len: u32,
    pub need: u32,
    /// `ioprio` field of the SQE (0 = the thread's own priority).
    pub ioprio: u16,
}

/// How a read ended.
#[derive(Debug)]
pub enum ReadResult<'a> {
    /// The `need` bytes asked for.
    Data(&'a [u8]),
    /// The file ended at `at`, before `need` bytes arrived.
    Eof { at: u64 },
    /// The read failed at `at`.
    Failed { at: u64, error: io::Error },
}

/// A finished read, seen by the caller inside [`ReadRing::reap`].
#[derive(Debug)]
pub struct Completed<'a> {
    pub tag: u64,
    pub offset: u64,
    pub result: ReadResult<'a>,
    /// Set when the caller takes the buffer ([`Completed::lease`]).
    lease: Option<LeaseOffer<'a>>,
}

/// What [`Completed::lease`] needs from the ring.
#[derive(Debug)]
struct LeaseOffer<'a> {
    buf: &'a Arc<Buf>,
    idx: u16,
    len: usize,
    home: &'a Sender<u16>,
    taken: &'a mut bool,
}

impl Completed<'_> {
    /// Keeps the read's bytes (`ReadResult::Data`) past `reap`, without
    /// copying them, while the ring keeps a buffer to read on with.
    /// `None` if the read has no data or every other buffer is leased.
    pub fn lease(&mut self) -> Option<Lease> {
        let offer = self.lease.take()?;
        *offer.taken = true;
        Some(Lease {
            buf: Arc::clone(offer.buf),
            idx: offer.idx,
            len: offer.len,
            home: offer.home.clone(),
        })
    }
}

/// The bytes of a finished read, kept out of the ring: the buffer goes
/// back to the ring when the lease is dropped (or is freed, if the ring is
/// gone).
pub struct Lease {
    buf: Arc<Buf>,
    idx: u16,
    len: usize,
    home: Sender<u16>,
}

impl std::ops::Deref for Lease {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: a leased buffer is not in the in-flight table, so the
        // kernel does not write it; the read that filled `len` bytes of it
        // completed before the lease was made.
        unsafe { self.buf.slice(self.len) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A ring that is gone frees the buffer with the last `Arc`.
        let _ = self.home.send(self.idx);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("buffer", &self.idx)
            .field("len", &self.len)
            .finish()
    }
}

enum Outcome {
    Whole,
    Eof,
    Failed(io::Error),
}

/// A read in the in-flight table.
struct Slot {
    req: ReadReq,
    /// Bytes read so far.
    got: u32,
}

/// An io_uring instance reading one file into its own buffers.
pub struct ReadRing {
    // Field order matters: the ring (and with it the buffer registration)
    // must go before the buffers it points into.
    ring: IoUring,
    file: File,
    bufs: Vec<Arc<Buf>>,
    buf_len: usize,
    free: Vec<u16>,
    /// Reads in flight at most.
    depth: usize,
    /// Buffers leased now.
    leased: usize,
    /// Leases that ended send their buffer's index here.
    home: Sender<u16>,
    returned: Receiver<u16>,
    /// The in-flight table: `slots[i]` owns buffer `i` while it is `Some`.
    slots: Vec<Option<Slot>>,
    /// Reads the kernel has finished, waiting for [`ReadRing::reap`].
    done: VecDeque<(u16, Outcome)>,
    /// Reads with an SQE queued or in the kernel.
    in_kernel: usize,
    fixed: bool,
    block: u32,
    closing: bool,
}

impl ReadRing {
    /// A ring with `depth` reads in flight at most, and `depth + spare`
    /// buffers of `buf_len` bytes each, reading `file`. Finished reads may
    /// be leased while a buffer is left to read into: up to `spare` of them
    /// leave `depth` reads in flight, more leave fewer (one at the least).
    ///
    /// `block` is the granularity a read can continue at (512 under
    /// `O_DIRECT`, 1 otherwise): a short read that stops off that grid is the
    /// end of the file. With `register`, the buffers are registered and read
    /// with `READ_FIXED`; if the kernel refuses (e.g. `RLIMIT_MEMLOCK`), the
    /// ring logs it and falls back to plain `READ`.
    pub fn new(
        file: File,
        depth: u16,
        spare: u16,
        buf_len: usize,
        block: u32,
        register: bool,
    ) -> Result<Self, RingError> {
        let invalid = |what: &str| RingError {
            op: "setup",
            source: io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()),
        };
        if depth == 0 {
            return Err(invalid("queue depth must be at least 1"));
        }
        if buf_len == 0 || !buf_len.is_multiple_of(BUF_ALIGN) || buf_len > MAX_BUF_LEN {
            return Err(invalid(
                "buffer length must be a multiple of 4096 up to 1 GiB",
            ));
        }
        let ring = IoUring::new(u32::from(depth)).map_err(ring_err("setup"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(ring_err("probe"))?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(RingError {
                op: "probe",
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel's io_uring lacks IORING_OP_READ",
                ),
            });
        }
        let count = depth
            .checked_add(spare)
            .ok_or_else(|| invalid("too many buffers"))?;
        let bufs: Vec<Arc<Buf>> = ringmem::carve(usize::from(count), buf_len)
            .map_err(ring_err("setup"))?
            .into_iter()
            .map(Arc::new)
            .collect();
        let mut fixed = false;
        if register && probe.is_supported(opcode::ReadFixed::CODE) {
            let iovecs: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.ptr().as_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: each iovec covers one live allocation owned by `bufs`
            // (and by leases), which is stored next to the ring and outlives
            // its registration (the ring field drops first).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => fixed = true,
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot register io_uring buffers; reading with plain READ"
                ),
            }
        } else if register {
            tracing::warn!("io_uring lacks READ_FIXED; reading with plain READ");
        }
        let (home, returned) = crossbeam_channel::unbounded();
        Ok(Self {
            ring,
            file,
            bufs,
            buf_len,
            free: (0..count).rev().collect(),
            depth: usize::from(depth),
            leased: 0,
            home,
            returned,
            slots: (0..count).map(|_| None).collect(),
            done: VecDeque::new(),
            in_kernel: 0,
            fixed,
            block: block.max(1),
            closing: false,
        })
    }

    /// Whether reads go to registered buffers (`READ_FIXED`).
    pub fn fixed_buffers(&self) -> bool {
        self.fixed
    }

    /// Size of each buffer: the longest read.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// Whether [`push`](Self::push) has a buffer to read into.
    pub fn has_free_buffer(&mut self) -> bool {
        self.take_back();
        !self.free.is_empty() && self.busy() < self.depth
    }

    /// Reads not yet handed back by [`reap`](Self::reap).
    pub fn busy(&self) -> usize {
        self.bufs.len() - self.free.len() - self.leased
    }

    /// Takes back the buffers of leases that ended.
    fn take_back(&mut self) {
        while let Ok(idx) = self.returned.try_recv() {
            self.leased -= 1;
            self.free.push(idx);
        }
    }

    /// Queues `req` into a free buffer; [`submit`](Self::submit) or
    /// [`wait`](Self::wait) hands it to the kernel.
    pub fn push(&mut self, req: ReadReq) -> Result<(), RingError> {
        if req.need > req.len || req.len == 0 || req.len as usize > self.buf_len {
            return Err(RingError {
                op: "push",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "read of {} bytes (need {}) does not fit a {}-byte buffer",
                        req.len, req.need, self.buf_len
                    ),
                ),
            });
        }
        let free = if self.has_free_buffer() {
            self.free.pop()
        } else {
            None
        };
        let Some(idx) = free else {
            return Err(RingError {
                op: "push",
                source: io::Error::new(io::ErrorKind::WouldBlock, "no free buffer"),
            });
        };
        self.slots[usize::from(idx)] = Some(Slot { req, got: 0 });
        self.in_kernel += 1;
        self.queue_sqe(idx)
    }

    /// Puts the SQE for the rest of slot `idx`'s read into the SQ.
    fn queue_sqe(&mut self, idx: u16) -> Result<(), RingError> {
        let slot = self.slots[usize::from(idx)]
            .as_ref()
            .expect("queued slot is in flight");
        let buf = &self.bufs[usize::from(idx)];
        let got = slot.got;
        // SAFETY: `got < len <= buf.len`, so the pointer stays inside the
        // buffer.
        let ptr = unsafe { buf.ptr().as_ptr().add(got as usize) };
        let fd = types::Fd(self.file.as_raw_fd());
        let len = slot.req.len - got;
        let offset = slot.req.offset + u64::from(got);
        let entry = if self.fixed {
            opcode::ReadFixed::new(fd, ptr, len, idx)
                .offset(offset)
                .ioprio(slot.req.ioprio)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len)
                .offset(offset)
                .ioprio(slot.req.ioprio)
                .build()
        }
        .user_data(u64::from(idx));
        loop {
            // SAFETY: the SQE points into buffer `idx`, which the in-flight
            // table owns until its completion is reaped; the buffer and the
            // file outlive the ring's use of them (drop waits).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // One SQE per buffer at most, so a full SQ only means entries
            // not yet handed to the kernel.
            self.submit()?;
        }
    }

    /// Hands queued SQEs to the kernel without waiting.
    pub fn submit(&mut self) -> Result<(), RingError> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if busy(&e) => {
                    if self.reap_cq() == 0 {
                        std::thread::yield_now();
                    }
                }
                Err(e) => {
                    return Err(RingError {
                        op: "submit",
                        source: e,
                    })
                }
            }
        }
    }

    /// Submits what is queued and blocks until a read is finished or
    /// `timeout` passed. Returns at once if a finished read awaits
    /// [`reap`](Self::reap) or nothing is in flight.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), RingError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let ext_arg = self.ring.params().is_feature_ext_arg();
        while self.done.is_empty() && self.in_kernel > 0 {
            let res = match deadline {
                Some(deadline) if ext_arg => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return self.submit();
                    }
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                _ => self.ring.submit_and_wait(1),
            };
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    self.reap_cq();
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || busy(&e) => {}
                Err(e) => {
                    return Err(RingError {
                        op: "wait",
                        source: e,
                    })
                }
            }
            self.reap_cq();
        }
        Ok(())
    }

    /// Moves CQEs into the finished list, resubmitting what is incomplete.
    /// Returns how many CQEs it took.
    fn reap_cq(&mut self) -> usize {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for &(user_data, res) in &cqes {
            let Ok(idx) = u16::try_from(user_data) else {
                debug_assert!(false, "unknown user_data {user_data}");
                continue;
            };
            let Some(slot) = self
                .slots
                .get_mut(usize::from(idx))
                .and_then(Option::as_mut)
            else {
                debug_assert!(false, "completion for idle buffer {idx}");
                continue;
            };
            let outcome = if res < 0 {
                let errno = -res;
                if (errno == libc::EINTR || errno == libc::EAGAIN) && !self.closing {
                    None
                } else {
                    Some(Outcome::Failed(io::Error::from_raw_os_error(errno)))
                }
            } else if res == 0 {
                Some(Outcome::Eof)
            } else {
                slot.got += res as u32;
                if slot.got >= slot.req.need {
                    Some(Outcome::Whole)
                } else if !slot.got.is_multiple_of(self.block) || self.closing {
                    Some(Outcome::Eof)
                } else {
                    None
                }
            };
            match outcome {
                Some(outcome) => {
                    self.in_kernel -= 1;
                    self.done.push_back((idx, outcome));
                }
                None => {
                    if let Err(e) = self.queue_sqe(idx) {
                        self.in_kernel -= 1;
                        self.done.push_back((idx, Outcome::Failed(e.source)));
                    }
                }
            }
        }
        cqes.len()
    }

    /// Hands each finished read to `f`, then frees its buffer.
    pub fn reap(&mut self, mut f: impl FnMut(Completed<'_>)) {
        // Leases that ended since the last push count as free again.
        self.take_back();
        self.reap_cq();
        while let Some((idx, outcome)) = self.done.pop_front() {
            let slot = self.slots[usize::from(idx)]
                .take()
                .expect("finished read is in the table");
            let at = slot.req.offset + u64::from(slot.got);
            let buf = &self.bufs[usize::from(idx)];
            let need = slot.req.need as usize;
            let mut taken = false;
            let mut lease = None;
            let result = match outcome {
                Outcome::Whole => {
                    // Past the spare buffers, a lease takes one the ring
                    // would read ahead into: when that many wait to be
                    // sent, reading ahead gains nothing, and copying the
                    // read out would cost the source's CPU for nothing.
                    if self.leased + 1 < self.bufs.len() {
                        lease = Some(LeaseOffer {
                            buf,
                            idx,
                            len: need,
                            home: &self.home,
                            taken: &mut taken,
                        });
                    }
                    // SAFETY: the read's completion was seen and no SQE for
                    // this buffer is outstanding, so the kernel no longer
                    // writes to it.
                    ReadResult::Data(unsafe { buf.slice(need) })
                }
                Outcome::Eof => ReadResult::Eof { at },
                Outcome::Failed(error) => ReadResult::Failed { at, error },
            };
            f(Completed {
                tag: slot.req.tag,
                offset: slot.req.offset,
                result,
                lease,
            });
            if taken {
                self.leased += 1;
            } else {
                self.free.push(idx);
            }
        }
    }
}

fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
}

impl Drop for ReadRing {
    fn drop(&mut self) {
        self.closing = true;
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || busy(&e) => {}
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        in_flight = self.in_kernel,
                        "cannot wait for io_uring reads; leaking their buffers"
                    );
                    for buf in self.bufs.drain(..) {
                        std::mem::forget(buf);
                    }
                    return;
                }
            }
            self.reap_cq();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    use crate::testutil::TempFile;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn read_all(ring: &mut ReadRing, reqs: &[ReadReq]) -> Vec<(u64, Result<Vec<u8>, u64>)> {
        let mut out = Vec::new();
        let mut next = 0;
        while next < reqs.len() || ring.busy() > 0 {
            while next < reqs.len() && ring.has_free_buffer() {
                ring.push(reqs[next]).unwrap();
                next += 1;
            }
            ring.submit().unwrap();
            ring.wait(None).unwrap();
            ring.reap(|c| {
                let r = match c.result {
                    ReadResult::Data(d) => Ok(d.to_vec()),
                    ReadResult::Eof { at } => Err(at),
                    ReadResult::Failed { at, error } => panic!("read at {at}: {error}"),
                };
                out.push((c.tag, r));
            });
        }
        out.sort_by_key(|(tag, _)| *tag);
        out
    }

    fn check_reads(register: bool) {
        let data = pattern(1 << 20);
        let tmp = TempFile::new(&format!("uring-reads-{register}"), &data);
        let file = open_direct(&tmp.0).unwrap();
        let mut ring = ReadRing::new(file, 4, 0, 64 << 10, 512, register).unwrap();
        // Root is not bound by RLIMIT_MEMLOCK, so registration must work.
        if crate::sys::is_root() {
            assert_eq!(ring.fixed_buffers(), register);
        }
        let reqs: Vec<ReadReq> = (0..16u64)
            .map(|i| ReadReq {
                tag: i,
                offset: i * (64 << 10),
                len: 64 << 10,
                need: 64 << 10,
                ioprio: 0,
            })
            .collect();
        for (tag, r) in read_all(&mut ring, &reqs) {
            let off = (tag * (64 << 10)) as usize;
            assert_eq!(r.unwrap(), &data[off..off + (64 << 10)]);
        }
    }

    #[test]
    fn reads_with_fixed_buffers() {
        check_reads(true);
    }

    #[test]
    fn reads_with_plain_read() {
        check_reads(false);
    }

    #[test]
    fn unaligned_end_of_file_is_read_by_rounding_up() {
        let data = pattern(8192 + 100);
        let tmp = TempFile::new("uring-tail", &data);
        let mut ring = ReadRing::new(open_direct(&tmp.0).unwrap(), 2, 0, 8192, 512, true).unwrap();
        let reqs = [
            ReadReq {
                tag: 0,
                offset: 8192,
                len: 512,
                need: 100,
                ioprio: 0,
            },
            // Past the end: the read stops short of `need`.
            ReadReq {
                tag: 1,
                offset: 4096,
                len: 8192,
                need: 8192,
                ioprio: 0,
            },
        ];
        let got = read_all(&mut ring, &reqs);
        assert_eq!(got[0].1.as_deref().unwrap(), &data[8192..]);
        assert_eq!(got[1].1, Err(8192 + 100));
    }

    #[test]
    fn drop_with_reads_in_flight_waits_for_them() {
        let data = pattern(1 << 20);
        let tmp = TempFile::new("uring-drop", &data);
        let mut ring =
            ReadRing::new(open_direct(&tmp.0).unwrap(), 8, 0, 128 << 10, 512, true).unwrap();
        for i in 0..8u64 {
            ring.push(ReadReq {
                tag: i,
                offset: i * (128 << 10),
                len: 128 << 10,
                need: 128 << 10,
                ioprio: 0,
            })
            .unwrap();
        }
        ring.submit().unwrap();
        assert!(!ring.has_free_buffer());
        assert!(ring
            .push(ReadReq {
                tag: 9,
                offset: 0,
                len: 4096,
                need: 4096,
                ioprio: 0
            })
            .is_err());
        drop(ring);
        // The file is still readable and intact afterwards.
        let f = File::open(&tmp.0).unwrap();
        let mut buf = vec![0; 4096];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, &data[..4096]);
    }

    #[test]
    fn leased_reads_keep_their_bytes_while_the_ring_reads_on() {
        const LEN: usize = 64 << 10;
        let data = pattern(16 * LEN);
        let tmp = TempFile::new("uring-lease", &data);
        let mut ring = ReadRing::new(open_direct(&tmp.0).unwrap(), 2, 3, LEN, 512, true).unwrap();
        let req = |i: u64| ReadReq {
            tag: i,
            offset: i * LEN as u64,
            len: LEN as u32,
            need: LEN as u32,
            ioprio: 0,
        };
        let mut leases: Vec<(u64, Lease)> = Vec::new();
        let mut refused = 0;
        let mut released = false;
        let mut next = 0;
        while next < 16 || ring.busy() > 0 {
            while next < 16 && ring.has_free_buffer() {
                ring.push(req(next)).unwrap();
                next += 1;
            }
            // Never more reads in flight than the depth.
            assert!(ring.busy() <= 2);
            ring.submit().unwrap();
            ring.wait(None).unwrap();
            ring.reap(|mut c| match c.lease() {
                Some(lease) => leases.push((c.tag, lease)),
                None => refused += 1,
            });
            // Half way, the first lease ends: its buffer reads again.
            if !released && next >= 8 {
                assert_eq!(leases.len(), 4);
                leases.remove(0);
                released = true;
            }
        }
        // Five buffers: four leases at a time (past the three spare ones,
        // the ring reads on with the one buffer left), then the first went
        // back and made room for one more.
        assert_eq!(leases.len(), 4);
        assert_eq!(refused, 16 - 5);
        drop(ring);
        // Leases outlive the ring, with the bytes their reads brought.
        for (tag, lease) in &leases {
            let off = *tag as usize * LEN;
            assert_eq!(&lease[..], &data[off..off + LEN], "read {tag}");
        }
    }

    #[test]
    fn wait_with_nothing_in_flight_returns_at_once() {
        let tmp = TempFile::new("uring-idle", &pattern(4096));
        let mut ring = ReadRing::new(open_direct(&tmp.0).unwrap(), 1, 0, 4096, 512, true).unwrap();
        // Nothing in flight: returns at once.
        ring.wait(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(ring.busy(), 0);
    }
}
