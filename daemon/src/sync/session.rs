//! The source's end of one agent session: the handshake, frames out
//! (metered by the wire throttle), replies in on their own thread so an
//! agent's error is seen while data is still going out.

use std::{
    collections::VecDeque,
    io::{self, BufWriter, Write},
    os::{fd::AsFd, unix::net::UnixStream},
    sync::Arc,
    thread::JoinHandle,
};

use crossbeam_channel::{Receiver, TryRecvError};

use super::SyncError;
use crate::{
    protocol::{self, DataRef, Hello, Message, ProtocolError, Welcome},
    sys::{
        splice::{self, Splicer},
        uring::Lease,
    },
    throttle::RateLimiter,
    transport::{Link, LinkEnd, TransportError},
};

/// Environment variable of the corrupt-frame test hook: the 1-based number
/// of the data frame to damage after its checksum was computed. Only tests
/// set it; the agent must detect the damage and apply nothing.
pub const CORRUPT_FRAME_ENV: &str = "FERRY_TEST_CORRUPT_FRAME";

/// Frames are gathered up to this many bytes before they go to the link:
/// thousands of 4 KiB extents then cost a few hundred writes to the pipe
/// (and SSH packets), not two each. Larger payloads go straight through.
const SEND_BUFFER: usize = 256 << 10;

pub struct Session {
    /// Flushed before every wait for a reply ([`Session::recv`]) and
    /// whenever the sender has nothing more ready ([`Session::flush`]).
    tx: Option<BufWriter<UnixStream>>,
    replies: Receiver<Result<Message, ProtocolError>>,
    /// Replies `check` saw early, kept for `recv` in order.
    early: std::collections::VecDeque<Message>,
    reader: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<Result<LinkEnd, TransportError>>>,
    pub peer: String,
    wire: Option<Arc<RateLimiter>>,
    /// Bytes written to the link.
    pub bytes_sent: u64,
    data_frames: u64,
    corrupt_frame: Option<u64>,
    /// Hands held payloads to the link by reference; `None` where no pipe
    /// could be made (they are then written).
    splicer: Option<Splicer>,
    /// Spliced payloads' buffers, each with the link position its payload
    /// ends at, held until the peer has read that far.
    held: VecDeque<(u64, Lease)>,
}

impl Session {
    pub fn new(link: Link, wire: Option<Arc<RateLimiter>>) -> Self {
        let Link {
            tx,
            mut rx,
            worker,
            peer,
        } = link;
        let (reply_tx, replies) = crossbeam_channel::unbounded();
        let reader = std::thread::Builder::new()
            .name("ferry-replies".into())
            .spawn(move || loop {
                match protocol::read_message(&mut rx) {
                    Ok(Some(msg)) => {
                        if reply_tx.send(Ok(msg)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = reply_tx.send(Err(e));
                        return;
                    }
                }
            })
            .ok();
        Self {
            tx: Some(BufWriter::with_capacity(SEND_BUFFER, tx)),
            replies,
            early: std::collections::VecDeque::new(),
            reader,
            worker,
            peer,
            wire,
            bytes_sent: 0,
            data_frames: 0,
            corrupt_frame: std::env::var(CORRUPT_FRAME_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
            splicer: Splicer::new().ok(),
            held: VecDeque::new(),
        }
    }

    /// Sends Hello and waits for Welcome.
    pub fn handshake(&mut self, hello: Hello) -> Result<Welcome, SyncError> {
        self.send(&Message::Hello(hello))?;
        match self.recv()? {
            Message::Welcome(w) => Ok(w),
            other => Err(self.unexpected(other, "Welcome")),
        }
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), SyncError> {
        if let Message::Data(d) = msg {
            return self.send_data(&d.view());
        }
        let frame = protocol::encode(msg);
        self.write(frame.len() as u64, |tx| tx.write_all(&frame))
    }

    /// Sends one `Data` frame.
    pub fn send_data(&mut self, d: &DataRef) -> Result<(), SyncError> {
        self.data_frames += 1;
        if self.corrupt_frame != Some(self.data_frames) {
            // The hot path: header and payload go out as they are, without
            // copying the payload into a frame buffer.
            let len = protocol::HEADER_LEN + protocol::DATA_PREFIX_LEN + d.payload.len();
            return self.write(len as u64, |tx| protocol::write_data(tx, d));
        }
        let mut frame = Vec::new();
        protocol::encode_data_into(&mut frame, d);
        let last = frame.len() - 1;
        frame[last] ^= 0x5a;
        self.write(frame.len() as u64, |tx| tx.write_all(&frame))
    }

    /// Sends one raw `Data` frame whose payload is `lease`'s bytes, by
    /// reference: the payload is spliced into the link, not copied, and
    /// the lease is held until the peer has read it. Leases are long reads
    /// (the reader leases 64 KiB or more), worth a flush each.
    pub fn send_leased(
        &mut self,
        offset: u64,
        raw_len: u32,
        data_hash: u64,
        lease: Lease,
    ) -> Result<(), SyncError> {
        let d = DataRef {
            offset,
            raw_len,
            codec: protocol::Codec::Raw,
            data_hash,
            payload: &lease,
        };
        if self.splicer.is_none() || self.corrupt_frame == Some(self.data_frames + 1) {
            return self.send_data(&d);
        }
        self.data_frames += 1;
        let head = protocol::data_head(&d).map_err(|e| self.lost(e))?;
        let len = (head.len() + d.payload.len()) as u64;
        // `write` borrows the whole session: the splicer goes along apart.
        let mut splicer = self.splicer.take().expect("checked above");
        let sent = self.write(len, |tx| {
            // What is gathered goes first, so the stream keeps its order.
            tx.write_all(&head)?;
            tx.flush()?;
            splicer.send(tx.get_ref().as_fd(), d.payload)
        });
        self.splicer = Some(splicer);
        sent?;
        self.held.push_back((self.bytes_sent, lease));
        self.let_go_of_read();
        Ok(())
    }

    /// Lets go of the held payloads the peer has read.
    fn let_go_of_read(&mut self) {
        let Some(tx) = self.tx.as_ref() else {
            return;
        };
        if self.held.is_empty() {
            return;
        }
        let in_link = self.bytes_sent - tx.buffer().len() as u64;
        // A failed look keeps them until the next one.
        let Ok(unread) = splice::unread(tx.get_ref().as_fd()) else {
            return;
        };
        let read = in_link.saturating_sub(unread as u64);
        while self.held.front().is_some_and(|(end, _)| *end <= read) {
            self.held.pop_front();
        }
    }

    /// Writes `len` bytes to the link through `put`, within the wire limit.
    fn write(
        &mut self,
        len: u64,
        put: impl FnOnce(&mut BufWriter<UnixStream>) -> io::Result<()>,
    ) -> Result<(), SyncError> {
        // An error the agent already sent explains a failed write better.
        self.check()?;
        if let Some(limit) = &self.wire {
            limit.acquire(len);
        }
        let tx = self.tx.as_mut().expect("sending on a closed session");
        if let Err(e) = put(tx) {
            return Err(self.lost(e));
        }
        self.bytes_sent += len;
        Ok(())
    }

    /// Fails if the agent has sent an error (never waits). Other replies
    /// that already arrived (answers to requests sent ahead) are kept for
    /// [`Session::recv`].
    pub fn check(&mut self) -> Result<(), SyncError> {
        loop {
            match self.replies.try_recv() {
                Ok(Ok(Message::Error { code, message })) => {
                    return Err(SyncError::Refused {
                        peer: self.peer.clone(),
                        code,
                        message,
                    })
                }
                Ok(Ok(other)) => self.early.push_back(other),
                Ok(Err(e)) => {
                    return Err(SyncError::Protocol {
                        peer: self.peer.clone(),
                        source: e,
                    })
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Sends what is gathered. Call it before waiting for anything else
    /// than a reply (a reply wait flushes by itself).
    pub fn flush(&mut self) -> Result<(), SyncError> {
        let Some(tx) = self.tx.as_mut() else {
            return Ok(());
        };
        if let Err(e) = tx.flush() {
            return Err(self.lost(e));
        }
        self.let_go_of_read();
        Ok(())
    }

    /// Waits for the next reply; an agent error becomes `Refused`.
    pub fn recv(&mut self) -> Result<Message, SyncError> {
        if let Some(msg) = self.early.pop_front() {
            return Ok(msg);
        }
        self.flush()?;
        let reply = self.replies.recv();
        self.let_go_of_read();
        match reply {
            Ok(Ok(Message::Error { code, message })) => Err(SyncError::Refused {
                peer: self.peer.clone(),
                code,
                message,
            }),
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(e)) => Err(SyncError::Protocol {
                peer: self.peer.clone(),
                source: e,
            }),
            Err(_) => Err(self.lost(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the session",
            ))),
        }
    }

    /// Waits for the answer to a boot point request.
    pub fn recv_managed(&mut self) -> Result<crate::agent::BootPointList, SyncError> {
        self.recv_report("a boot point list")
    }

    /// Waits for a `Managed` answer holding `wanted` as JSON.
    pub fn recv_report<T: serde::de::DeserializeOwned>(
        &mut self,
        wanted: &'static str,
    ) -> Result<T, SyncError> {
        match self.recv()? {
            Message::Managed { json } => {
                serde_json::from_str(&json).map_err(|_| SyncError::Unexpected {
                    peer: self.peer.clone(),
                    wanted,
                    got: "something else".into(),
                })
            }
            other => Err(self.unexpected(other, "Managed")),
        }
    }

    fn unexpected(&self, got: Message, wanted: &'static str) -> SyncError {
        SyncError::Unexpected {
            peer: self.peer.clone(),
            wanted,
            got: format!("{:?}", got.kind()),
        }
    }

    /// Tells the agent the session is over: what is gathered goes out, then
    /// our side of the link is shut (not just closed, as the reply reader
    /// may hold the same socket).
    fn hang_up(&mut self) {
        if let Some(mut tx) = self.tx.take() {
            let _ = tx.flush();
            let _ = tx.get_ref().shutdown(std::net::Shutdown::Write);
        }
    }

    /// The session broke: say why, preferring what the worker saw.
    fn lost(&mut self, e: io::Error) -> SyncError {
        self.hang_up();
        if let Some(worker) = self.worker.take() {
            match worker.join() {
                Ok(Err(t)) => return SyncError::Transport(t),
                Ok(Ok(end)) => {
                    if let Some(status) = end.exit_status.filter(|s| *s != 0) {
                        return SyncError::Transport(TransportError::AgentExited {
                            host: self.peer.clone(),
                            status,
                            stderr: end.stderr,
                        });
                    }
                }
                Err(_) => return SyncError::Transport(TransportError::Panicked),
            }
        }
        SyncError::Transport(TransportError::Lost {
            host: self.peer.clone(),
            source: e,
        })
    }

    /// Ends the session cleanly: the agent sees EOF and exits.
    pub fn close(mut self) -> Result<(), SyncError> {
        self.hang_up();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Err(SyncError::Transport(e)),
            Some(Err(_)) => Err(SyncError::Transport(TransportError::Panicked)),
            _ => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing our side ends the agent's session; the threads then end.
        self.hang_up();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::{
        hash,
        protocol::{read_message, Data, DATA_PREFIX_LEN, HEADER_LEN},
        sys::uring::{open_direct, ReadReq, ReadRing},
        testutil::TempFile,
    };

    #[test]
    fn a_spliced_payload_is_held_until_the_peer_has_read_it() {
        const LEN: usize = 64 << 10;
        let data: Vec<u8> = (0..LEN).map(|i| (i * 13 % 251) as u8).collect();
        let tmp = TempFile::new("session-splice", &data);
        let mut ring = ReadRing::new(open_direct(&tmp.0).unwrap(), 1, 1, LEN, 512, true).unwrap();
        ring.push(ReadReq {
            tag: 0,
            offset: 0,
            len: LEN as u32,
            need: LEN as u32,
            ioprio: 0,
        })
        .unwrap();
        ring.submit().unwrap();
        let mut lease = None;
        while lease.is_none() {
            ring.wait(None).unwrap();
            ring.reap(|mut c| lease = c.lease());
        }
        let lease = lease.unwrap();

        let (tx, mut peer) = UnixStream::pair().unwrap();
        let link = Link {
            tx,
            rx: Box::new(io::empty()),
            worker: None,
            peer: "a test peer".into(),
        };
        let mut session = Session::new(link, None);
        assert!(session.splicer.is_some(), "no pipe to splice through");
        let data_hash = hash::data_hash(&data);
        session
            .send_leased(4096, LEN as u32, data_hash, lease)
            .unwrap();
        session.flush().unwrap();
        // Nothing read yet: the ring's buffer stays with the link.
        assert_eq!(session.held.len(), 1);

        let mut frame = vec![0; HEADER_LEN + DATA_PREFIX_LEN + LEN];
        peer.read_exact(&mut frame[..100]).unwrap();
        session.flush().unwrap();
        assert_eq!(session.held.len(), 1, "let go with most of it unread");
        peer.read_exact(&mut frame[100..]).unwrap();
        session.flush().unwrap();
        assert!(session.held.is_empty(), "still held once read");
        assert_eq!(session.bytes_sent, frame.len() as u64);
        assert_eq!(
            read_message(&mut &frame[..]).unwrap(),
            Some(Message::Data(Data {
                offset: 4096,
                raw_len: LEN as u32,
                codec: protocol::Codec::Raw,
                data_hash,
                payload: data,
            }))
        );
    }
}
