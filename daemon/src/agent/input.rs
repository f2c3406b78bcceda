//! The source's stream of frames, as the agent reads it.
//!
//! Small frames arrive back to back by the thousand, so they are read in
//! large gulps through a buffer, not with a system call (and a wakeup) or
//! two each. A bulk job's payloads are a megabyte each: through the buffer,
//! every byte would be copied once more. So a large payload is read straight
//! into its own buffer, and so is the header of the frame after it, since a
//! gulp there would take (and copy) the head of the next large payload.

use std::io::{self, Read};

use crate::protocol::{self, Message, ProtocolError};

/// Bytes read at a time while frames are small.
const GULP: usize = 256 << 10;

/// Payloads at least this long are read past the buffer.
const DIRECT_FROM: usize = 64 << 10;

/// A buffered reader of frames that reads large payloads, and what follows
/// them, straight from the stream.
pub struct FrameInput<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Unread bytes are `buf[pos..filled]`.
    pos: usize,
    filled: usize,
    /// Read straight from `inner` while the buffer is empty: a large
    /// payload is next, or the frame after one.
    direct: bool,
}

impl<R: Read> FrameInput<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; GULP].into_boxed_slice(),
            pos: 0,
            filled: 0,
            direct: false,
        }
    }

    /// The next frame, a `Data` payload read into `spare`'s buffer (see
    /// [`protocol::read_message_into`]). A `Data` frame sets how its payload
    /// and the next header are read; other frames keep the mode they found
    /// (a Commit between large payloads is read exactly too).
    pub fn read_message(&mut self, spare: &mut Vec<u8>) -> Result<Option<Message>, ProtocolError> {
        protocol::read_message_into(self, spare, |input, len| {
            input.direct = len >= DIRECT_FROM;
        })
    }
}

impl<R: Read> Read for FrameInput<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.filled {
            if self.direct || out.len() >= self.buf.len() {
                return self.inner.read(out);
            }
            self.filled = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode, Codec, Data, DATA_PREFIX_LEN, HEADER_LEN};

    fn data(offset: u64, len: usize) -> Message {
        let payload: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + offset) as u8).collect();
        Message::Data(Data {
            offset,
            raw_len: len as u32,
            codec: Codec::Raw,
            data_hash: crate::hash::data_hash(&payload),
            payload,
        })
    }

    /// Serves a byte stream in reads no longer than `most` bytes, and
    /// records how much each read asked for.
    struct Recorded<'a> {
        rest: &'a [u8],
        most: usize,
        asked: Vec<usize>,
    }

    impl Read for Recorded<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.asked.push(out.len());
            let n = out.len().min(self.most).min(self.rest.len());
            out[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            Ok(n)
        }
    }

    /// Reads every frame, handing each payload's buffer back as the agent
    /// does.
    fn read_all<R: Read>(input: &mut FrameInput<R>) -> Vec<Message> {
        let (mut got, mut spare) = (Vec::new(), Vec::new());
        while let Some(msg) = input.read_message(&mut spare).unwrap() {
            if let Message::Data(d) = &msg {
                spare = d.payload.clone();
            }
            got.push(msg);
        }
        got
    }

    #[test]
    fn frames_of_every_size_come_out_as_they_went_in_whatever_the_reads() {
        let sent = vec![
            data(0, 4096),
            data(4096, 1 << 20),
            Message::Commit { generation: 1 },
            data(1 << 21, 1 << 20),
            data(1 << 22, 100),
            Message::Zero {
                offset: 0,
                len: 8192,
            },
            data(1 << 23, DIRECT_FROM),
            data(1 << 24, DIRECT_FROM - 1),
            Message::Commit { generation: 2 },
        ];
        let stream: Vec<u8> = sent.iter().flat_map(encode).collect();
        for most in [1, 7, 4096, 100_000, usize::MAX] {
            let mut input = FrameInput::new(Recorded {
                rest: &stream,
                most,
                asked: Vec::new(),
            });
            assert_eq!(read_all(&mut input), sent, "reads of at most {most} bytes");
        }
    }

    #[test]
    fn a_large_payload_and_the_header_after_it_skip_the_buffer() {
        let large = 1 << 20;
        let sent = [data(0, large), data(large as u64, 4096), data(0, 4096)];
        let stream: Vec<u8> = sent.iter().flat_map(encode).collect();
        let mut input = FrameInput::new(Recorded {
            rest: &stream,
            most: usize::MAX,
            asked: Vec::new(),
        });
        assert_eq!(read_all(&mut input), sent);
        let asked = &input.inner.asked;
        // The first header: a gulp, which also takes the large frame's
        // fixed fields and the head of its payload. The rest of that
        // payload straight into its buffer; then the next header and fixed
        // fields exactly; then the small payload back through a gulp, which
        // takes the last frame too; then the end of the stream.
        let head = GULP - HEADER_LEN - DATA_PREFIX_LEN;
        assert_eq!(
            asked[..5],
            [GULP, large - head, HEADER_LEN, DATA_PREFIX_LEN, GULP],
            "all reads: {asked:?}"
        );
        assert_eq!(asked.len(), 6, "all reads: {asked:?}");
    }

    #[test]
    fn a_payload_buffer_handed_back_is_the_next_ones() {
        let sent = [data(0, 1 << 20), data(1 << 20, 1 << 20), data(0, 4096)];
        let stream: Vec<u8> = sent.iter().flat_map(encode).collect();
        let mut input = FrameInput::new(&stream[..]);
        let mut spare = Vec::new();
        let mut addresses = Vec::new();
        while let Some(msg) = input.read_message(&mut spare).unwrap() {
            let Message::Data(d) = msg else {
                panic!("not Data: {msg:?}")
            };
            addresses.push(d.payload.as_ptr());
            spare = d.payload;
        }
        assert_eq!(addresses.len(), 3);
        assert!(
            addresses.iter().all(|a| *a == addresses[0]),
            "{addresses:?}"
        );
    }
}
