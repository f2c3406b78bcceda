//! The target agent: applies one source's frames to a standby image beneath
//! a root directory and acknowledges commits once they are durable.
//!
//! It runs as `ferry agent` at the end of an SSH exec channel, and in-process
//! over pipes for `file://` targets; [`serve`] is the same in both. The
//! protocol and the session's state machine are in [`crate::protocol`].
//!
//! Invariants:
//! - nothing is written outside the root (see [`image`]);
//! - an image belongs to one source: its commit record names it, and another
//!   source is refused unless it asks to take the image over. A session that
//!   finds no record claims the image at once (a record of generation 0), so
//!   two sources cannot interleave even before the first commit;
//! - an `Ack` is sent only after the image is fsynced and the commit record
//!   durably replaced: the record is the only statement that data is durable;
//! - nothing from a bad frame is written, and after any `Error` nothing more
//!   is applied: the agent reads and discards until the source closes its end
//!   (so a source still writing never blocks on a full pipe), and returns
//!   `Err`. A source must therefore close its side once it sees an `Error`.

mod bootpoints;
mod image;
mod input;
pub mod kept;
mod record;
pub mod task;

use std::{
    io::{self, Read, Write},
    path::Path,
};

pub use bootpoints::{BootPointInfo, BootPointList};
pub use record::{commit_record_name, CommitRecord};

use self::image::Image;
use self::input::FrameInput;
use crate::{
    hash,
    image::{Format, ImageError, Standby},
    protocol::{
        write_message, Codec, Data, ErrorCode, Hello, Message, ProtocolError, Welcome, FORMATS,
        MAX_HASHES, MAX_PAYLOAD, VERSION,
    },
};

/// An image format's error as the source should see it.
fn image_error(e: ImageError) -> AgentError {
    let code = match &e {
        ImageError::Io { source, .. } if crate::sys::fs::is_no_space(source) => ErrorCode::DiskFull,
        ImageError::NoSuchBootPoint { .. } => ErrorCode::NoSuchBootPoint,
        ImageError::BootPointExists { .. } => ErrorCode::Exists,
        ImageError::OutOfRange { .. } => ErrorCode::Malformed,
        ImageError::TooManyBootPoints { .. } => ErrorCode::Malformed,
        ImageError::Io { .. } | ImageError::Corrupt { .. } | ImageError::Unsupported { .. } => {
            ErrorCode::Io
        }
    };
    let message = match &e {
        ImageError::Io { file, op, source } if crate::sys::fs::is_no_space(source) => {
            format!("{file}: no space left during {op}")
        }
        _ => e.to_string(),
    };
    // The message already says what `e` says: only its cause goes on.
    match e {
        ImageError::Io { source, .. } => AgentError::refused_by(code, message, source),
        _ => AgentError::refused(code, message),
    }
}

/// Longest message text put in an `Error` frame.
const MAX_ERROR_TEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent refused or stopped the session and told the source why with
    /// an `Error {code, message}`.
    #[error("{message}")]
    Refused {
        code: ErrorCode,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The source sent an `Error` and gave up.
    #[error("the source stopped the session: {code}: {message}")]
    Source { code: ErrorCode, message: String },
    #[error("the source closed the session without a Hello")]
    NoHello,
    #[error("sending a reply to the source failed")]
    Reply {
        #[source]
        source: io::Error,
    },
}

impl AgentError {
    fn refused(code: ErrorCode, message: String) -> Self {
        Self::Refused {
            code,
            message,
            source: None,
        }
    }

    fn refused_by(
        code: ErrorCode,
        message: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Refused {
            code,
            message,
            source: Some(source.into()),
        }
    }

    /// The code sent to (or received from) the source, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } | Self::Source { code, .. } => Some(*code),
            Self::NoHello | Self::Reply { .. } => None,
        }
    }

    /// The text for the source: the message and its cause on one line, since
    /// the source cannot see our error chain.
    fn wire_text(&self) -> String {
        let mut text = chain_text(self);
        if text.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }
}

/// An error and its causes on one line.
fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What a session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// Commits acknowledged.
    pub commits: u64,
    /// Bytes applied (data and zero), committed or not.
    pub bytes_written: u64,
}

/// Serves one session: reads frames from `input`, writes replies to `output`,
/// applies them to the image under `root`.
///
/// Returns when the source closes `input` at a frame boundary. On any error
/// the source is sent an `Error` frame, `input` is read to its end, and the
/// error is returned.
pub fn serve<R: Read, W: Write>(
    root: &Path,
    input: R,
    mut output: W,
) -> Result<SessionSummary, AgentError> {
    let mut input = FrameInput::new(input);
    let err = match run(root, &mut input, &mut output) {
        Ok(summary) => return Ok(summary),
        Err(err) => err,
    };
    if let AgentError::Refused { code, .. } = &err {
        tracing::debug!("refusing the session: {}", err.wire_text());
        let reply = Message::Error {
            code: *code,
            message: err.wire_text(),
        };
        if let Err(e) = write_message(&mut output, &reply).and_then(|()| output.flush()) {
            tracing::debug!("sending the error to the source failed: {e}");
        }
    }
    // Frame boundaries may be lost, so discard bytes, not frames.
    if let Err(e) = io::copy(&mut input, &mut io::sink()) {
        tracing::debug!("draining the source after an error failed: {e}");
    }
    Err(err)
}

fn run<R: Read, W: Write>(
    root: &Path,
    input: &mut FrameInput<R>,
    output: &mut W,
) -> Result<SessionSummary, AgentError> {
    let hello = match input.read_message(&mut Vec::new()).map_err(frame_error)? {
        Some(Message::Hello(hello)) => hello,
        Some(other) => {
            return Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("expected Hello, got {:?}", other.kind()),
            ))
        }
        None => return Err(AgentError::NoHello),
    };
    if hello.version != VERSION {
        return Err(version_mismatch(hello.version));
    }
    let (mut session, welcome) = Session::open(root, &hello)?;
    tracing::debug!(
        image = %hello.image,
        generation = welcome.generation,
        created = welcome.created,
        "session accepted"
    );
    send(output, &Message::Welcome(welcome))?;
    while let Some(msg) = input
        .read_message(&mut session.spare)
        .map_err(frame_error)?
    {
        if let Some(reply) = session.apply(msg)? {
            send(output, &reply)?;
        }
    }
    session.finish()?;
    Ok(session.summary)
}

fn send<W: Write>(output: &mut W, msg: &Message) -> Result<(), AgentError> {
    write_message(output, msg)
        .and_then(|()| output.flush())
        .map_err(|source| AgentError::Reply { source })
}

fn version_mismatch(found: u16) -> AgentError {
    AgentError::refused(
        ErrorCode::Version,
        format!("agent speaks protocol {VERSION}, source speaks {found}"),
    )
}

fn frame_error(e: ProtocolError) -> AgentError {
    let code = match &e {
        ProtocolError::Version { found } => return version_mismatch(*found),
        ProtocolError::Checksum { .. } => ErrorCode::Checksum,
        ProtocolError::Io { .. } => ErrorCode::Io,
        ProtocolError::BadMagic { .. }
        | ProtocolError::UnknownKind { .. }
        | ProtocolError::TooLarge { .. }
        | ProtocolError::Malformed { .. }
        | ProtocolError::Truncated => ErrorCode::Malformed,
    };
    AgentError::refused_by(code, "bad frame from the source".to_owned(), e)
}

/// An accepted session: the locked image and what is owed to the next Ack.
struct Session {
    image: Image,
    source_id: [u8; 16],
    device_size: u64,
    chunk_size: u32,
    /// Last committed generation.
    generation: u64,
    bytes_since_commit: u64,
    summary: SessionSummary,
    threads: usize,
    scratch: Vec<u8>,
    /// The last `Data` payload's buffer, for the next one to be read into.
    spare: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// A `verify` session: hash requests only.
    read_only: bool,
    /// A `boot-points` session: boot point requests only.
    manage: bool,
    format: Format,
    /// The image through its format.
    standby: Box<dyn Standby>,
    /// The boot point this session took, which it may delete again (a
    /// multi-disk job undoing one that another disk could not take).
    created_boot_point: Option<String>,
    /// The record's stamp matched the image when this session began, or
    /// this session committed: the session's own later writes (boot points,
    /// metadata on close) may be stamped. Never otherwise, or a `boot-points
    /// list` would hide a change made outside ferry from the next sync.
    vouched: bool,
}

impl Session {
    /// Checks a Hello against the image and its record, claiming the image
    /// for the source when needed. A refused Hello changes nothing.
    fn open(root: &Path, hello: &Hello) -> Result<(Self, Welcome), AgentError> {
        if !hello.chunk_size.is_power_of_two() {
            return Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("chunk size {} is not a power of two", hello.chunk_size),
            ));
        }
        let format = match hello.format {
            0 => Format::from_name(&hello.image),
            n => FORMATS[usize::from(n) - 1]
                .parse()
                .expect("FORMATS holds format names"),
        };
        let mut image = if hello.read_only {
            Image::open_read_only(root, &hello.image)?
        } else if hello.manage {
            let mut image = Image::open_existing(root, &hello.image)?;
            image.lock_session()?;
            image
        } else {
            Image::open(root, &hello.image)?
        };
        let welcome = if hello.read_only || hello.manage {
            Self::existing_welcome(&image, format)
        } else {
            Self::welcome(&mut image, hello, format)
        };
        // A sync session removed the stamp at its handshake; others find
        // the image as the last commit left it, or not.
        let vouched = (hello.read_only || hello.manage)
            && match image.read_record() {
                Ok(Some(CommitRecord {
                    stamp: Some(was), ..
                })) => image.stamp().is_ok_and(|now| now == was),
                _ => false,
            };
        let opened = welcome.and_then(|welcome| {
            let standby = crate::image::open(format, image.dir_handle()?, image.file_name())
                .map_err(image_error)?;
            Ok((welcome, standby))
        });
        match opened {
            Ok((welcome, standby)) => Ok((
                Self {
                    image,
                    source_id: hello.source_id,
                    device_size: hello.device_size,
                    chunk_size: hello.chunk_size,
                    generation: welcome.generation,
                    bytes_since_commit: 0,
                    summary: SessionSummary::default(),
                    threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
                    scratch: Vec::new(),
                    spare: Vec::new(),
                    zstd: None,
                    read_only: hello.read_only,
                    manage: hello.manage,
                    format,
                    standby,
                    created_boot_point: None,
                    vouched,
                },
                welcome,
            )),
            Err(e) => {
                image.discard_created();
                Err(e)
            }
        }
    }

    /// The size of the disk an existing image holds.
    fn disk_size(image: &Image, format: Format) -> Result<u64, AgentError> {
        match format {
            Format::Raw => image.len(),
            _ => crate::image::open(format, image.dir_handle()?, image.file_name())
                .map(|s| s.size())
                .map_err(image_error),
        }
    }

    /// A comparison or boot point session: the image and its record are
    /// left as they are.
    fn existing_welcome(image: &Image, format: Format) -> Result<Welcome, AgentError> {
        let rec = image.read_record()?;
        Ok(Welcome {
            version: VERSION,
            generation: rec.as_ref().map_or(0, |r| r.generation),
            source_id: rec.as_ref().and_then(CommitRecord::source_bytes),
            image_size: Self::disk_size(image, format)?,
            created: false,
            altered: false,
        })
    }

    fn welcome(image: &mut Image, hello: &Hello, format: Format) -> Result<Welcome, AgentError> {
        // Taking over an image: its record is treated as absent.
        let found = if hello.force_new_source {
            None
        } else {
            image.read_record()?
        };
        if let Some(rec) = &found {
            if rec.source_bytes() != Some(hello.source_id) {
                return Err(AgentError::refused(
                    ErrorCode::SourceMismatch,
                    format!(
                        "image {} belongs to source {}; this is source {}",
                        image.name,
                        rec.source_id,
                        uuid::Uuid::from_bytes(hello.source_id).hyphenated()
                    ),
                ));
            }
        }
        // An empty file holds no data, whoever made it: it is taken as new.
        // This also covers a session that died between creating the image
        // and giving it its size, or lost a race to create it.
        let fresh = image.created || image.len()? == 0;
        let len = if fresh {
            0
        } else {
            Self::disk_size(image, format)?
        };
        // A source that grew: its raw or qcow2 image grows with it (below,
        // under the lock). Only an image of the size this source last had,
        // so a wrong image is still refused.
        let grow = !fresh
            && len < hello.device_size
            && format.grows()
            && found.as_ref().is_some_and(|r| r.device_size == len);
        if !fresh && len < hello.device_size && !grow {
            return Err(AgentError::refused(
                ErrorCode::ImageTooSmall,
                format!(
                    "image {} is {len} bytes, smaller than the source's {} bytes",
                    image.name, hello.device_size
                ),
            ));
        }
        // A record found next to a new image describes data that is gone, so
        // it is replaced too, before the image gets its size: a crash in
        // between leaves an empty image, never a full-size one under a stale
        // generation.
        let claim = found.is_none() || fresh;
        image.lock_session()?;
        // Written since its last commit by something other than ferry: the
        // record stops vouching for that generation at once, so a resync
        // cut short is followed by another.
        let altered = match found.as_ref().and_then(|r| r.stamp) {
            Some(was) if !claim => was != image.stamp()?,
            _ => false,
        };
        if claim {
            image.write_record(&CommitRecord::new(
                hello.source_id,
                0,
                0,
                hello.device_size,
                hello.chunk_size,
            ))?;
        } else if let Some(rec) = found.as_ref().filter(|r| r.stamp.is_some()) {
            // This session may write: until its commit, the image is not
            // what the record describes, and a change by this session (or
            // one cut short) is no sign of anyone else.
            image.write_record(&CommitRecord {
                generation: if altered { 0 } else { rec.generation },
                stamp: None,
                ..rec.clone()
            })?;
        }
        if fresh {
            match format {
                Format::Raw => image.set_len(hello.device_size)?,
                _ => image.recreate(format, hello.device_size)?,
            }
        } else if grow {
            crate::image::grow(
                format,
                image.dir_handle()?,
                image.file_name(),
                hello.device_size,
            )
            .map_err(image_error)?;
        }
        Ok(Welcome {
            version: VERSION,
            generation: match (&found, claim || altered) {
                (Some(rec), false) => rec.generation,
                _ => 0,
            },
            source_id: found.as_ref().and_then(CommitRecord::source_bytes),
            image_size: Self::disk_size(image, format)?,
            created: fresh,
            altered,
        })
    }

    /// Applies one frame; returns the reply to send, if any.
    fn apply(&mut self, msg: Message) -> Result<Option<Message>, AgentError> {
        if self.read_only
            && !matches!(
                msg,
                Message::HashRequest { .. } | Message::Error { .. } | Message::Manage(_)
            )
        {
            return Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("{:?} in a read-only session", msg.kind()),
            ));
        }
        if self.manage
            && !matches!(
                msg,
                Message::Manage(_) | Message::Task { .. } | Message::Error { .. }
            )
        {
            return Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("{:?} in a boot point session", msg.kind()),
            ));
        }
        match msg {
            Message::Data(d) => {
                self.data(d)?;
                Ok(None)
            }
            Message::Zero { offset, len } => {
                self.check_range("Zero", offset, len)?;
                self.standby
                    .write_zeroes(offset, len)
                    .map_err(image_error)?;
                self.count(len);
                Ok(None)
            }
            Message::Manage(req) => {
                if self.read_only && req.op != crate::protocol::ManageOp::List {
                    return Err(AgentError::refused(
                        ErrorCode::Malformed,
                        "only List in a read-only session".to_owned(),
                    ));
                }
                let rights = bootpoints::Rights {
                    committed: (self.summary.commits > 0 && self.bytes_since_commit == 0)
                        .then_some(self.generation),
                    manage: self.manage,
                    created: self.created_boot_point.clone(),
                };
                let dir = self.image.dir_handle()?;
                let list = bootpoints::apply(
                    &req,
                    &rights,
                    &dir,
                    self.image.file_name(),
                    self.standby.as_mut(),
                    self.format,
                )?;
                self.created_boot_point = match req.op {
                    crate::protocol::ManageOp::Create => Some(req.name.clone()),
                    crate::protocol::ManageOp::Delete => None,
                    _ => self.created_boot_point.take(),
                };
                if req.op == crate::protocol::ManageOp::Revert {
                    // The working image is no longer any generation this
                    // source committed: its next sync must compare checksums.
                    let mut rec = self.image.read_record()?.ok_or_else(|| {
                        AgentError::refused(
                            ErrorCode::Io,
                            format!("{} has no commit record", self.image.name),
                        )
                    })?;
                    rec.generation = 0;
                    rec.stamp = None;
                    self.image.write_record(&rec)?;
                    self.vouched = false;
                } else if req.op != crate::protocol::ManageOp::List {
                    // Boot points are ferry's own writes: the image is still
                    // the committed one.
                    self.standby.flush().map_err(image_error)?;
                    self.restamp()?;
                }
                Ok(Some(Message::Managed {
                    json: serde_json::to_string(&list).expect("lists always serialise"),
                }))
            }
            Message::Task { json } => {
                if !self.manage {
                    return Err(AgentError::refused(
                        ErrorCode::Malformed,
                        "a Task outside a boot point session".to_owned(),
                    ));
                }
                let task: task::Task = serde_json::from_str(&json).map_err(|e| {
                    AgentError::refused(ErrorCode::Malformed, format!("unreadable task: {e}"))
                })?;
                let json = task::run(
                    &task,
                    &task::Beside {
                        dir_path: &self.image.dir_path,
                        dir: self.image.dir_handle()?,
                        name: self.image.file_name(),
                        format: self.format,
                        standby: self.standby.as_ref(),
                    },
                )?;
                Ok(Some(Message::Managed { json }))
            }
            Message::HashRequest { offset, len, block } => self.hash(offset, len, block).map(Some),
            Message::Commit { generation } => self.commit(generation).map(Some),
            Message::Error { code, message } => Err(AgentError::Source { code, message }),
            other @ (Message::Hello(_)
            | Message::Welcome(_)
            | Message::Ack { .. }
            | Message::HashReply { .. }
            | Message::Managed { .. }) => Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("unexpected {:?} during a session", other.kind()),
            )),
        }
    }

    fn count(&mut self, len: u64) {
        self.bytes_since_commit += len;
        self.summary.bytes_written += len;
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), AgentError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.device_size => Ok(()),
            _ => Err(AgentError::refused(
                ErrorCode::Malformed,
                format!(
                    "{what} of {len} bytes at offset {offset} is beyond the {}-byte device",
                    self.device_size
                ),
            )),
        }
    }

    fn data(&mut self, d: Data) -> Result<(), AgentError> {
        let applied = self.apply_data(&d);
        self.spare = d.payload;
        applied
    }

    fn apply_data(&mut self, d: &Data) -> Result<(), AgentError> {
        let len = u64::from(d.raw_len);
        self.check_range("Data", d.offset, len)?;
        let raw: &[u8] = match d.codec {
            Codec::Raw => &d.payload,
            Codec::Zstd => {
                if self.zstd.is_none() {
                    let z = zstd::bulk::Decompressor::new().map_err(|e| {
                        AgentError::refused_by(
                            ErrorCode::Internal,
                            "creating a zstd decompressor failed".to_owned(),
                            e,
                        )
                    })?;
                    self.zstd = Some(z);
                }
                let zstd = self.zstd.as_mut().expect("set just above");
                // The output is capped at raw_len: a payload that decodes to
                // more fails instead of growing the buffer.
                self.scratch.resize(d.raw_len as usize, 0);
                let n = zstd
                    .decompress_to_buffer(&d.payload, &mut self.scratch[..])
                    .map_err(|e| {
                        AgentError::refused_by(
                            ErrorCode::Malformed,
                            format!(
                                "Data at offset {} does not decode to {} bytes",
                                d.offset, d.raw_len
                            ),
                            e,
                        )
                    })?;
                if n != d.raw_len as usize {
                    return Err(AgentError::refused(
                        ErrorCode::Malformed,
                        format!(
                            "Data at offset {} decodes to {n} bytes, not {}",
                            d.offset, d.raw_len
                        ),
                    ));
                }
                &self.scratch[..n]
            }
        };
        // A raw payload was checked against its hash as the frame was read.
        if d.codec != Codec::Raw && hash::data_hash(raw) != d.data_hash {
            return Err(AgentError::refused(
                ErrorCode::Checksum,
                format!(
                    "Data of {} bytes at offset {} fails its content hash",
                    d.raw_len, d.offset
                ),
            ));
        }
        self.standby.write_at(d.offset, raw).map_err(image_error)?;
        self.count(len);
        Ok(())
    }

    fn hash(&mut self, offset: u64, len: u64, block: u32) -> Result<Message, AgentError> {
        self.check_range("HashRequest", offset, len)?;
        let bad = |why: &str| {
            Err(AgentError::refused(
                ErrorCode::Malformed,
                format!("HashRequest (offset {offset}, len {len}, block {block}) {why}"),
            ))
        };
        if block == 0 || !block.is_multiple_of(4096) || block > MAX_PAYLOAD {
            return bad("needs a block that is a multiple of 4096, at most 16 MiB");
        }
        if !offset.is_multiple_of(4096) || !len.is_multiple_of(512) {
            return bad("needs a 4096-aligned offset and a length in 512-byte units");
        }
        if len.div_ceil(u64::from(block)) > u64::from(MAX_HASHES) {
            return bad("asks for more hashes than one reply carries");
        }
        let hashes = match self.format {
            // A raw image is its own disk: hash the file in parallel.
            Format::Raw => hash::hash_blocks(&self.image.file, offset, len, block, self.threads)
                .map_err(|e| {
                    self.image
                        .io_err(&format!("hashing {len} bytes at offset {offset}"), e)
                })?,
            _ => {
                let mut buf = vec![0u8; len as usize];
                self.standby
                    .read_at(offset, &mut buf)
                    .map_err(image_error)?;
                hash::hash_buffer(&buf, block, self.threads)
            }
        };
        Ok(Message::HashReply {
            offset,
            block,
            hashes,
        })
    }

    /// Ends a session the source closed cleanly. What the format still
    /// writes on the way out (metadata, a descriptor) is ferry's own: a
    /// record that vouches for the image gets the image's stamp as left.
    fn finish(&mut self) -> Result<(), AgentError> {
        if self.read_only {
            return Ok(());
        }
        self.standby.flush().map_err(image_error)?;
        self.restamp()
    }

    /// Gives a record that vouches for the image the image's stamp now,
    /// after writes of ferry's own that change no data; only in a session
    /// that found the image as committed, or committed itself.
    fn restamp(&self) -> Result<(), AgentError> {
        if !self.vouched {
            return Ok(());
        }
        if let Some(mut rec) = self.image.read_record()? {
            if rec.stamp.is_some() {
                rec.stamp = Some(self.image.stamp()?);
                self.image.write_record(&rec)?;
            }
        }
        Ok(())
    }

    fn commit(&mut self, generation: u64) -> Result<Message, AgentError> {
        if generation == 0 || generation < self.generation {
            return Err(AgentError::refused(
                ErrorCode::Malformed,
                format!(
                    "Commit of generation {generation} after generation {}",
                    self.generation
                ),
            ));
        }
        self.standby.flush().map_err(image_error)?;
        self.image.write_record(&CommitRecord {
            stamp: Some(self.image.stamp()?),
            ..CommitRecord::new(
                self.source_id,
                generation,
                self.bytes_since_commit,
                self.device_size,
                self.chunk_size,
            )
        })?;
        self.vouched = true;
        let ack = Message::Ack {
            generation,
            bytes_written: self.bytes_since_commit,
        };
        tracing::debug!(
            image = %self.image.name,
            generation,
            bytes = self.bytes_since_commit,
            "committed"
        );
        self.generation = generation;
        self.bytes_since_commit = 0;
        self.summary.commits += 1;
        Ok(ack)
    }
}

#[cfg(test)]
mod tests;
