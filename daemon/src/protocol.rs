//! The wire protocol between a source (the daemon shipping changed blocks)
//! and a target agent (which applies them to a standby image).
//!
//! The same frames flow over an SSH exec channel or, for `file://` targets,
//! over in-process pipes to the same agent code.
//!
//! # Frames
//!
//! Every frame is a fixed 24-byte header, all little-endian, then the payload:
//!
//! ```text
//! offset size field
//!      0    4 magic        "FRRY"
//!      4    2 kind         Kind
//!      6    2 flags        0
//!      8    4 payload_len  at most MAX_PAYLOAD
//!     12    4 reserved     0
//!     16    8 checksum     xxh3_64 of the payload, seeded with bytes 4..12
//! ```
//!
//! The checksum is seeded with the kind, flags and length, so a damaged header
//! cannot turn a frame into a different valid one (a `Zero` and an `Ack` have
//! payloads of the same shape). The other header fields are constants and
//! must match exactly. A `Data` frame additionally carries the hash of its
//! raw bytes, checked after decompression, so corruption anywhere between
//! the source's read and the target's write is caught.
//!
//! A raw `Data` frame's bytes are hashed once, not twice: its checksum covers
//! the fixed fields (which hold the raw bytes' hash), and reading the frame
//! checks the bytes against that hash. Either way no byte goes unchecked, and
//! a bulk transfer pays for one hash pass per side instead of two.
//!
//! # A session
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source
//!     participant A as agent
//!     S->>A: Hello {version, source_id, device_size, chunk_size, image}
//!     A->>S: Welcome {version, generation, source_id, image_size, created, altered}
//!     opt checksum resync
//!         S->>A: HashRequest {offset, len, block}
//!         A->>S: HashReply {offset, block, hashes}
//!     end
//!     opt boot point session (Hello.manage: no data)
//!         S->>A: Manage {op, name} or Task {json}
//!         A->>S: Managed {json}
//!     end
//!     loop each round
//!         S->>A: Data {offset, raw_len, codec, data_hash, payload}
//!         S->>A: Zero {offset, len}
//!         S->>A: Commit {generation}
//!         Note over A: fsync image, write commit record, fsync
//!         A->>S: Ack {generation, bytes_written}
//!     end
//!     S-->>A: EOF
//!     Note over S,A: on any failure the agent sends Error {code, message},<br/>applies nothing more and reads until EOF
//! ```
//!
//! # The agent's states
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitHello
//!     AwaitHello --> Applying: Hello accepted / Welcome
//!     AwaitHello --> Draining: bad frame, version, path, source, size, busy / Error
//!     Applying --> Applying: Data, Zero (write) / HashRequest (HashReply)
//!     Applying --> Applying: Commit / fsync, record, Ack
//!     Applying --> Draining: bad frame, checksum, I/O, disk full / Error
//!     Applying --> [*]: EOF (Ok)
//!     Draining --> [*]: EOF (Err)
//! ```
//!
//! An Ack is the only statement that data is durable: it is sent after the
//! image was fsynced and the commit record renamed into place and its
//! directory fsynced. Data not followed by an Ack may or may not be there.

use std::io::{self, Read, Write};

/// `"FRRY"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRRY");
/// The protocol version this build speaks.
pub const VERSION: u16 = 4;
/// Largest payload of one frame; anything larger is malformed.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Size of the frame header.
pub const HEADER_LEN: usize = 24;
/// Size of a `Data` payload's fixed fields, before its bytes.
pub const DATA_PREFIX_LEN: usize = 24;
/// Most raw (uncompressed) bytes one `Data` frame may carry, whatever its
/// codec, so that an incompressible piece still fits in a `Raw` frame.
pub const MAX_DATA_LEN: u32 = MAX_PAYLOAD - DATA_PREFIX_LEN as u32;
/// Most hashes one `HashReply` can carry.
pub const MAX_HASHES: u32 = (MAX_PAYLOAD - 12) / 16;

/// What a frame carries.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Data = 3,
    Zero = 4,
    Commit = 5,
    Ack = 6,
    HashRequest = 7,
    HashReply = 8,
    Error = 9,
    Manage = 10,
    Managed = 11,
    Task = 12,
}

impl TryFrom<u16> for Kind {
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Data,
            4 => Self::Zero,
            5 => Self::Commit,
            6 => Self::Ack,
            7 => Self::HashRequest,
            8 => Self::HashReply,
            9 => Self::Error,
            10 => Self::Manage,
            11 => Self::Managed,
            12 => Self::Task,
            _ => return Err(v),
        })
    }
}

/// How a `Data` payload is encoded.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl TryFrom<u8> for Codec {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(Self::Raw),
            1 => Ok(Self::Zstd),
            _ => Err(v),
        }
    }
}

/// Why the agent refused or stopped a session.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Version = 1,
    Malformed = 2,
    Checksum = 3,
    SourceMismatch = 4,
    PathEscape = 5,
    ImageTooSmall = 6,
    DiskFull = 7,
    Io = 8,
    Busy = 9,
    Internal = 10,
    NoSuchBootPoint = 11,
    /// A file the request would create is already there.
    Exists = 12,
    /// A program the agent ran for a task (qemu, qemu-img) failed.
    Tool = 13,
}

impl TryFrom<u16> for ErrorCode {
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Version,
            2 => Self::Malformed,
            3 => Self::Checksum,
            4 => Self::SourceMismatch,
            5 => Self::PathEscape,
            6 => Self::ImageTooSmall,
            7 => Self::DiskFull,
            8 => Self::Io,
            9 => Self::Busy,
            10 => Self::Internal,
            11 => Self::NoSuchBootPoint,
            12 => Self::Exists,
            13 => Self::Tool,
            _ => return Err(v),
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Version => "protocol version mismatch",
            Self::Malformed => "malformed message",
            Self::Checksum => "checksum mismatch",
            Self::SourceMismatch => "image belongs to another source",
            Self::PathEscape => "path outside the target root",
            Self::ImageTooSmall => "image too small",
            Self::DiskFull => "disk full",
            Self::Io => "I/O error",
            Self::Busy => "image busy",
            Self::Internal => "internal error",
            Self::NoSuchBootPoint => "no such boot point",
            Self::Exists => "already exists",
            Self::Tool => "a program on the target failed",
        })
    }
}

/// First frame of a session, source to agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub source_id: [u8; 16],
    pub device_size: u64,
    pub chunk_size: u32,
    /// Image path relative to the agent's root.
    pub image: String,
    /// Take over an image whose commit record names another source.
    pub force_new_source: bool,
    /// Only compare (`ferry verify`): the agent creates, locks and changes
    /// nothing, checks no source identity, and answers only hash requests.
    pub read_only: bool,
    /// Manage boot points (`ferry boot-points`): the image must exist, no
    /// source identity is checked or claimed, and no data is accepted.
    pub manage: bool,
    /// Image format: 0 = as the image name's extension says, else
    /// [`FORMATS`]`[format - 1]`.
    pub format: u8,
}

/// Format names in the order of [`Hello::format`] (1-based).
pub const FORMATS: [&str; 4] = ["raw", "qcow2", "vmdk", "vhdx"];

/// What a [`Message::Manage`] asks for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManageOp {
    /// Reply with the boot points.
    List = 1,
    /// Take a boot point of the last committed generation.
    Create = 2,
    /// Make the working image equal a boot point.
    Revert = 3,
    Delete = 4,
}

impl TryFrom<u8> for ManageOp {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => Self::List,
            2 => Self::Create,
            3 => Self::Revert,
            4 => Self::Delete,
            _ => return Err(v),
        })
    }
}

/// A boot point request (source to agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manage {
    pub op: ManageOp,
    /// The boot point (Create, Revert, Delete).
    pub name: String,
    /// Create: the source's filesystems were frozen (app-consistent).
    pub app_consistent: bool,
    /// Create: the most boot points to keep; the two oldest are merged
    /// first when there are that many.
    pub max_boot_points: u16,
}

/// The agent's answer to an accepted `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// Last committed generation; 0 = none.
    pub generation: u64,
    /// Source named by the commit record, if there is one.
    pub source_id: Option<[u8; 16]>,
    pub image_size: u64,
    /// The image file was created by this session.
    pub created: bool,
    /// Something other than ferry wrote to the image after its last commit
    /// (a standby VM booted on it, a read-write mount): the agent no longer
    /// vouches for any generation (`generation` is 0).
    pub altered: bool,
}

/// Bytes to write at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub offset: u64,
    /// Length once decoded; at most [`MAX_DATA_LEN`].
    pub raw_len: u32,
    pub codec: Codec,
    /// [`crate::hash::data_hash`] of the raw (uncompressed) bytes.
    pub data_hash: u64,
    pub payload: Vec<u8>,
}

/// A `Data` frame's fields with its payload borrowed: what the sender
/// writes from wherever the payload is.
#[derive(Clone, Copy, Debug)]
pub struct DataRef<'a> {
    pub offset: u64,
    pub raw_len: u32,
    pub codec: Codec,
    pub data_hash: u64,
    pub payload: &'a [u8],
}

impl Data {
    pub fn view(&self) -> DataRef<'_> {
        DataRef {
            offset: self.offset,
            raw_len: self.raw_len,
            codec: self.codec,
            data_hash: self.data_hash,
            payload: &self.payload,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Data(Data),
    Zero {
        offset: u64,
        len: u64,
    },
    Commit {
        generation: u64,
    },
    Ack {
        generation: u64,
        /// Bytes applied (data and zero) since the previous commit.
        bytes_written: u64,
    },
    HashRequest {
        offset: u64,
        len: u64,
        block: u32,
    },
    HashReply {
        offset: u64,
        block: u32,
        hashes: Vec<u128>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Manage(Manage),
    /// The agent's answer to `Manage`: the boot points afterwards, as JSON
    /// (`agent::BootPointList`); and to `Task`: the task's report, as JSON.
    Managed {
        json: String,
    },
    /// Work the agent does on the target host, beside the image, in a boot
    /// point session: an `agent::Task` as JSON (a boot test, an export).
    Task {
        json: String,
    },
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::Welcome(_) => Kind::Welcome,
            Self::Data(_) => Kind::Data,
            Self::Zero { .. } => Kind::Zero,
            Self::Commit { .. } => Kind::Commit,
            Self::Ack { .. } => Kind::Ack,
            Self::HashRequest { .. } => Kind::HashRequest,
            Self::HashReply { .. } => Kind::HashReply,
            Self::Error { .. } => Kind::Error,
            Self::Manage(_) => Kind::Manage,
            Self::Managed { .. } => Kind::Managed,
            Self::Task { .. } => Kind::Task,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("reading a frame failed")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("bad frame magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("frame payload of {len} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: u32 },
    #[error("{kind:?} frame fails its checksum")]
    Checksum { kind: Kind },
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed { kind: Kind, reason: &'static str },
    #[error("stream ends in the middle of a frame")]
    Truncated,
    /// A `Hello` or `Welcome` of another protocol version, whose payload this
    /// version cannot parse.
    #[error("peer speaks protocol version {found}, this side speaks {VERSION}")]
    Version { found: u16 },
}

/// Encodes `msg` as one frame (header and payload).
///
/// # Panics
/// If the payload would exceed [`MAX_PAYLOAD`] (a `Data` over
/// [`MAX_DATA_LEN`], more than [`MAX_HASHES`] hashes, a huge string): the
/// caller must split its work; [`write_message`] returns an error instead.
pub fn encode(msg: &Message) -> Vec<u8> {
    if let Message::Data(d) = msg {
        let mut buf = Vec::with_capacity(HEADER_LEN + DATA_PREFIX_LEN + d.payload.len());
        encode_data_into(&mut buf, &d.view());
        return buf;
    }
    let mut buf = vec![0; HEADER_LEN];
    encode_payload(msg, &mut buf);
    let payload_len = checked_len(buf.len() - HEADER_LEN).expect("frame payload too large");
    let header = header(msg.kind(), payload_len, &[&buf[HEADER_LEN..]]);
    buf[..HEADER_LEN].copy_from_slice(&header);
    buf
}

/// Appends a `Data` frame to `buf`, copying the payload once.
///
/// # Panics
/// As [`encode`].
pub fn encode_data_into(buf: &mut Vec<u8>, d: &DataRef) {
    let prefix = data_prefix(d);
    let len = checked_len(DATA_PREFIX_LEN + d.payload.len()).expect("Data payload too large");
    buf.reserve(HEADER_LEN + len as usize);
    buf.extend_from_slice(&header(Kind::Data, len, &data_covered(d, &prefix)));
    buf.extend_from_slice(&prefix);
    buf.extend_from_slice(d.payload);
}

/// Writes one frame. A `Data` payload is written from where it is, not
/// copied. Does not flush.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> io::Result<()> {
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} frame payload over {MAX_PAYLOAD} bytes", msg.kind()),
        )
    };
    match msg {
        Message::Data(d) => write_data(w, &d.view()),
        _ => {
            let mut buf = vec![0; HEADER_LEN];
            encode_payload(msg, &mut buf);
            let len = checked_len(buf.len() - HEADER_LEN).ok_or_else(too_large)?;
            let header = header(msg.kind(), len, &[&buf[HEADER_LEN..]]);
            buf[..HEADER_LEN].copy_from_slice(&header);
            w.write_all(&buf)
        }
    }
}

/// Writes one `Data` frame, its payload from where it is. Does not flush.
pub fn write_data<W: Write>(w: &mut W, d: &DataRef) -> io::Result<()> {
    w.write_all(&data_head(d)?)?;
    w.write_all(d.payload)
}

/// A `Data` frame's header and fixed fields: what precedes its payload.
pub fn data_head(d: &DataRef) -> io::Result<[u8; HEADER_LEN + DATA_PREFIX_LEN]> {
    let prefix = data_prefix(d);
    let len = checked_len(DATA_PREFIX_LEN + d.payload.len()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("Data frame payload over {MAX_PAYLOAD} bytes"),
        )
    })?;
    let mut head = [0; HEADER_LEN + DATA_PREFIX_LEN];
    head[..HEADER_LEN].copy_from_slice(&header(Kind::Data, len, &data_covered(d, &prefix)));
    head[HEADER_LEN..].copy_from_slice(&prefix);
    Ok(head)
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary;
/// an end anywhere else is [`ProtocolError::Truncated`].
pub fn read_message<R: Read>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    read_message_into(r, &mut Vec::new(), |_, _| {})
}

/// [`read_message`] for a reader of bulk data. A `Data` payload is read
/// into `spare`'s buffer, taken from it: handed back once the payload is
/// applied, it serves the next frame, and only the part of it that grows
/// is zeroed first. `ahead` is told the payload's length just before the
/// payload is read, so a buffering reader can read it past its buffer.
pub fn read_message_into<R: Read>(
    r: &mut R,
    spare: &mut Vec<u8>,
    ahead: fn(&mut R, usize),
) -> Result<Option<Message>, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ProtocolError::Io { source }),
        }
    }
    let field = |at: usize, n: usize| &head[at..at + n];
    let magic = u32::from_le_bytes(field(0, 4).try_into().unwrap());
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic { found: magic });
    }
    let raw_kind = u16::from_le_bytes(field(4, 2).try_into().unwrap());
    let kind = Kind::try_from(raw_kind).map_err(|kind| ProtocolError::UnknownKind { kind })?;
    let malformed = |reason| ProtocolError::Malformed { kind, reason };
    if u16::from_le_bytes(field(6, 2).try_into().unwrap()) != 0 {
        return Err(malformed("flags are not zero"));
    }
    let len = u32::from_le_bytes(field(8, 4).try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { len });
    }
    if u32::from_le_bytes(field(12, 4).try_into().unwrap()) != 0 {
        return Err(malformed("reserved header field is not zero"));
    }
    let checksum = u64::from_le_bytes(field(16, 8).try_into().unwrap());
    let seed = u64::from_le_bytes(field(4, 8).try_into().unwrap());
    if kind == Kind::Data {
        // Read the fixed fields apart so the bytes land in their own buffer
        // without being moved afterwards.
        if (len as usize) < DATA_PREFIX_LEN {
            // Consume the frame so the error is about it, not the next one.
            let mut rest = vec![0; len as usize];
            read_exact(r, &mut rest)?;
            if payload_checksum(seed, &[&rest]) != checksum {
                return Err(ProtocolError::Checksum { kind });
            }
            return Err(malformed("shorter than its fixed fields"));
        }
        let mut prefix = [0u8; DATA_PREFIX_LEN];
        read_exact(r, &mut prefix)?;
        let want = len as usize - DATA_PREFIX_LEN;
        // Zeroing a megabyte costs as much as hashing it: a buffer reused
        // for frames of one size is zeroed once.
        let mut bytes = std::mem::take(spare);
        bytes.resize(want, 0);
        ahead(r, want);
        read_exact(r, &mut bytes)?;
        let raw = prefix[DATA_CODEC_AT] == Codec::Raw as u8;
        let covered: &[&[u8]] = if raw { &[&prefix] } else { &[&prefix, &bytes] };
        if payload_checksum(seed, covered) != checksum {
            return Err(ProtocolError::Checksum { kind });
        }
        let d = decode_data(&prefix, bytes)?;
        if raw && crate::hash::data_hash(&d.payload) != d.data_hash {
            return Err(ProtocolError::Checksum { kind });
        }
        return Ok(Some(Message::Data(d)));
    }

    let mut payload = vec![0; len as usize];
    read_exact(r, &mut payload)?;
    if payload_checksum(seed, &[&payload]) != checksum {
        return Err(ProtocolError::Checksum { kind });
    }
    decode_payload(kind, &payload).map(Some)
}

/// `read_exact`, an early end being [`ProtocolError::Truncated`].
fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated
        } else {
            ProtocolError::Io { source: e }
        }
    })
}

fn checked_len(n: usize) -> Option<u32> {
    u32::try_from(n).ok().filter(|&n| n <= MAX_PAYLOAD)
}

fn payload_checksum(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = crate::hash::seeded_hasher(seed);
    for p in parts {
        h.update(p);
    }
    h.digest()
}

fn header(kind: Kind, payload_len: u32, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    // flags (6..8) and reserved (12..16) stay zero.
    h[8..12].copy_from_slice(&payload_len.to_le_bytes());
    let seed = u64::from_le_bytes(h[4..12].try_into().unwrap());
    h[16..24].copy_from_slice(&payload_checksum(seed, payload).to_le_bytes());
    h
}

/// Where the codec byte sits in a `Data` frame's fixed fields.
const DATA_CODEC_AT: usize = 12;

/// What a `Data` frame's checksum covers: the fixed fields, and the payload
/// unless it is raw (then its hash, in the fixed fields, covers it; an empty
/// part adds nothing to the checksum).
fn data_covered<'a>(d: &DataRef<'a>, prefix: &'a [u8; DATA_PREFIX_LEN]) -> [&'a [u8]; 2] {
    match d.codec {
        Codec::Raw => [prefix, &[]],
        Codec::Zstd => [prefix, d.payload],
    }
}

fn data_prefix(d: &DataRef) -> [u8; DATA_PREFIX_LEN] {
    let mut p = [0u8; DATA_PREFIX_LEN];
    p[0..8].copy_from_slice(&d.offset.to_le_bytes());
    p[8..12].copy_from_slice(&d.raw_len.to_le_bytes());
    p[DATA_CODEC_AT] = d.codec as u8;
    // 13..16 reserved, zero.
    p[16..24].copy_from_slice(&d.data_hash.to_le_bytes());
    p
}

fn encode_payload(msg: &Message, b: &mut Vec<u8>) {
    match msg {
        Message::Hello(h) => {
            b.extend_from_slice(&h.version.to_le_bytes());
            b.extend_from_slice(&h.source_id);
            b.extend_from_slice(&h.device_size.to_le_bytes());
            b.extend_from_slice(&h.chunk_size.to_le_bytes());
            b.push(
                u8::from(h.force_new_source) | u8::from(h.read_only) << 1 | u8::from(h.manage) << 2,
            );
            b.push(h.format);
            b.extend_from_slice(h.image.as_bytes());
        }
        Message::Welcome(w) => {
            b.extend_from_slice(&w.version.to_le_bytes());
            b.extend_from_slice(&w.generation.to_le_bytes());
            b.extend_from_slice(&w.image_size.to_le_bytes());
            b.push(u8::from(w.created) | u8::from(w.altered) << 1);
            b.push(u8::from(w.source_id.is_some()));
            b.extend_from_slice(&w.source_id.unwrap_or_default());
        }
        Message::Data(d) => {
            b.extend_from_slice(&data_prefix(&d.view()));
            b.extend_from_slice(&d.payload);
        }
        Message::Zero { offset, len } => {
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        Message::Commit { generation } => b.extend_from_slice(&generation.to_le_bytes()),
        Message::Ack {
            generation,
            bytes_written,
        } => {
            b.extend_from_slice(&generation.to_le_bytes());
            b.extend_from_slice(&bytes_written.to_le_bytes());
        }
        Message::HashRequest { offset, len, block } => {
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&block.to_le_bytes());
        }
        Message::HashReply {
            offset,
            block,
            hashes,
        } => {
            b.reserve(12 + 16 * hashes.len());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&block.to_le_bytes());
            for h in hashes {
                b.extend_from_slice(&h.to_le_bytes());
            }
        }
        Message::Error { code, message } => {
            b.extend_from_slice(&(*code as u16).to_le_bytes());
            b.extend_from_slice(message.as_bytes());
        }
        Message::Manage(m) => {
            b.push(m.op as u8);
            b.push(u8::from(m.app_consistent));
            b.extend_from_slice(&m.max_boot_points.to_le_bytes());
            b.extend_from_slice(m.name.as_bytes());
        }
        Message::Managed { json } | Message::Task { json } => b.extend_from_slice(json.as_bytes()),
    }
}

/// Reads fixed-size little-endian fields off a payload.
struct Fields<'a> {
    kind: Kind,
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < n {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                reason: "payload too short",
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.array().map(u64::from_le_bytes)
    }

    fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("boolean is neither 0 nor 1")),
        }
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        let s = std::str::from_utf8(self.rest)
            .map_err(|_| self.malformed("string is not UTF-8"))?
            .to_owned();
        self.rest = &[];
        Ok(s)
    }

    fn end(&self) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }

    fn malformed(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            reason,
        }
    }
}

fn decode_payload(kind: Kind, payload: &[u8]) -> Result<Message, ProtocolError> {
    let mut f = Fields {
        kind,
        rest: payload,
    };
    let msg = match kind {
        Kind::Hello => {
            let version = f.u16()?;
            let parsed = (|| {
                let source_id = f.array()?;
                let device_size = f.u64()?;
                let chunk_size = f.u32()?;
                let flags = f.u8()?;
                let format = f.u8()?;
                if flags & !0b111 != 0 || usize::from(format) > FORMATS.len() {
                    return Err(ProtocolError::Malformed {
                        kind,
                        reason: "unknown Hello flags",
                    });
                }
                Ok::<_, ProtocolError>(Hello {
                    version,
                    source_id,
                    device_size,
                    chunk_size,
                    force_new_source: flags & 1 != 0,
                    read_only: flags & 2 != 0,
                    manage: flags & 4 != 0,
                    format,
                    image: f.string()?,
                })
            })();
            return match parsed {
                Err(_) if version != VERSION => Err(ProtocolError::Version { found: version }),
                other => other.map(Message::Hello),
            };
        }
        Kind::Welcome => {
            let version = f.u16()?;
            let parsed = (|| {
                let generation = f.u64()?;
                let image_size = f.u64()?;
                let flags = f.u8()?;
                if flags > 0b11 {
                    return Err(f.malformed("unknown Welcome flags"));
                }
                let has_source = f.bool()?;
                let id: [u8; 16] = f.array()?;
                if !has_source && id != [0; 16] {
                    return Err(f.malformed("source id present but flagged absent"));
                }
                f.end()?;
                Ok(Welcome {
                    version,
                    generation,
                    source_id: has_source.then_some(id),
                    image_size,
                    created: flags & 1 != 0,
                    altered: flags & 2 != 0,
                })
            })();
            return match parsed {
                Err(_) if version != VERSION => Err(ProtocolError::Version { found: version }),
                other => other.map(Message::Welcome),
            };
        }
        Kind::Data => {
            let prefix: [u8; DATA_PREFIX_LEN] = f.array()?;
            return decode_data(&prefix, f.rest.to_vec()).map(Message::Data);
        }
        Kind::Zero => Message::Zero {
            offset: f.u64()?,
            len: f.u64()?,
        },
        Kind::Commit => Message::Commit {
            generation: f.u64()?,
        },
        Kind::Ack => Message::Ack {
            generation: f.u64()?,
            bytes_written: f.u64()?,
        },
        Kind::HashRequest => Message::HashRequest {
            offset: f.u64()?,
            len: f.u64()?,
            block: f.u32()?,
        },
        Kind::HashReply => {
            let offset = f.u64()?;
            let block = f.u32()?;
            if !f.rest.len().is_multiple_of(16) {
                return Err(f.malformed("hash list is not a whole number of hashes"));
            }
            let hashes = f
                .rest
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
                .collect();
            f.rest = &[];
            Message::HashReply {
                offset,
                block,
                hashes,
            }
        }
        Kind::Error => {
            let raw = f.u16()?;
            let code = ErrorCode::try_from(raw).map_err(|_| f.malformed("unknown error code"))?;
            Message::Error {
                code,
                message: f.string()?,
            }
        }
        Kind::Manage => {
            let op = ManageOp::try_from(f.u8()?).map_err(|_| f.malformed("unknown manage op"))?;
            let app_consistent = f.bool()?;
            let max_boot_points = f.u16()?;
            Message::Manage(Manage {
                op,
                name: f.string()?,
                app_consistent,
                max_boot_points,
            })
        }
        Kind::Managed => Message::Managed { json: f.string()? },
        Kind::Task => Message::Task { json: f.string()? },
    };
    f.end()?;
    Ok(msg)
}

fn decode_data(prefix: &[u8; DATA_PREFIX_LEN], payload: Vec<u8>) -> Result<Data, ProtocolError> {
    let mut f = Fields {
        kind: Kind::Data,
        rest: prefix,
    };
    let offset = f.u64()?;
    let raw_len = f.u32()?;
    let codec = Codec::try_from(f.u8()?).map_err(|_| f.malformed("unknown codec"))?;
    if f.array::<3>()? != [0; 3] {
        return Err(f.malformed("reserved bytes are not zero"));
    }
    let data_hash = f.u64()?;
    if raw_len > MAX_DATA_LEN {
        return Err(f.malformed("raw length over MAX_DATA_LEN"));
    }
    if codec == Codec::Raw && payload.len() != raw_len as usize {
        return Err(f.malformed("raw payload length differs from raw_len"));
    }
    if offset.checked_add(u64::from(raw_len)).is_none() {
        return Err(f.malformed("offset + raw_len overflows"));
    }
    Ok(Data {
        offset,
        raw_len,
        codec,
        data_hash,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(msg: &Message) -> Message {
        let frame = encode(msg);
        let mut r = &frame[..];
        let back = read_message(&mut r).unwrap().unwrap();
        assert!(r.is_empty(), "frame not fully consumed");
        back
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        (1u16..=13).prop_map(|c| ErrorCode::try_from(c).unwrap())
    }

    fn data() -> impl Strategy<Value = Data> {
        (
            0u64..1 << 50,
            prop::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(offset, payload, zstd, data_hash)| Data {
                offset,
                raw_len: if zstd { 4096 } else { payload.len() as u32 },
                codec: if zstd { Codec::Zstd } else { Codec::Raw },
                // A raw payload's hash is checked as the frame is read.
                data_hash: if zstd {
                    data_hash
                } else {
                    crate::hash::data_hash(&payload)
                },
                payload,
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<[u8; 16]>(),
                any::<u64>(),
                any::<u32>(),
                ".{0,40}",
                any::<bool>(),
                any::<bool>(),
                (any::<bool>(), 0u8..=4)
            )
                .prop_map(
                    |(
                        source_id,
                        device_size,
                        chunk_size,
                        image,
                        force,
                        read_only,
                        (manage, format),
                    )| {
                        Message::Hello(Hello {
                            version: VERSION,
                            source_id,
                            device_size,
                            chunk_size,
                            image,
                            force_new_source: force,
                            read_only,
                            manage,
                            format,
                        })
                    }
                ),
            (
                any::<u64>(),
                any::<Option<[u8; 16]>>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(generation, source_id, image_size, created, altered)| {
                    Message::Welcome(Welcome {
                        version: VERSION,
                        generation,
                        source_id,
                        image_size,
                        created,
                        altered,
                    })
                }),
            data().prop_map(Message::Data),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Message::Zero { offset, len }),
            any::<u64>().prop_map(|generation| Message::Commit { generation }),
            (any::<u64>(), any::<u64>()).prop_map(|(generation, bytes_written)| Message::Ack {
                generation,
                bytes_written
            }),
            (any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(offset, len, block)| Message::HashRequest { offset, len, block }),
            (
                any::<u64>(),
                any::<u32>(),
                prop::collection::vec(any::<u128>(), 0..20)
            )
                .prop_map(|(offset, block, hashes)| Message::HashReply {
                    offset,
                    block,
                    hashes
                }),
            (code(), ".{0,60}").prop_map(|(code, message)| Message::Error { code, message }),
            ".{0,60}".prop_map(|json| Message::Managed { json }),
            ".{0,60}".prop_map(|json| Message::Task { json }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in message()) {
            prop_assert_eq!(round_trip(&msg), msg.clone());
            // The streaming writer produces the same bytes as encode.
            let mut written = Vec::new();
            write_message(&mut written, &msg).unwrap();
            prop_assert_eq!(written, encode(&msg));
        }

        #[test]
        fn a_flipped_byte_is_an_error_never_another_message(
            msg in message(),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut frame = encode(&msg);
            let i = at.index(frame.len());
            frame[i] ^= 1 << bit;
            let mut r = &frame[..];
            match read_message(&mut r) {
                Err(_) => {}
                Ok(got) => prop_assert!(false, "byte {} bit {}: decoded {:?}", i, bit, got),
            }
        }

        #[test]
        fn any_truncation_is_an_error(msg in message(), cut in any::<prop::sample::Index>()) {
            let frame = encode(&msg);
            let keep = 1 + cut.index(frame.len() - 1);
            let mut r = &frame[..keep];
            prop_assert!(matches!(read_message(&mut r), Err(ProtocolError::Truncated)));
        }
    }

    #[test]
    fn header_layout_is_fixed() {
        let frame = encode(&Message::Commit { generation: 7 });
        assert_eq!(frame.len(), HEADER_LEN + 8);
        assert_eq!(&frame[0..4], b"FRRY");
        assert_eq!(&frame[4..6], &5u16.to_le_bytes());
        assert_eq!(&frame[6..8], &[0, 0]);
        assert_eq!(&frame[8..12], &8u32.to_le_bytes());
        assert_eq!(&frame[12..16], &[0; 4]);
        let seed = u64::from_le_bytes(frame[4..12].try_into().unwrap());
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&frame[24..], seed);
        assert_eq!(&frame[16..24], &sum.to_le_bytes());
        assert_eq!(&frame[24..], &7u64.to_le_bytes());
    }

    #[test]
    fn clean_eof_is_none_and_frames_follow_each_other() {
        let mut stream = encode(&Message::Zero { offset: 1, len: 2 });
        stream.extend(encode(&Message::Commit { generation: 3 }));
        let mut r = &stream[..];
        assert_eq!(
            read_message(&mut r).unwrap(),
            Some(Message::Zero { offset: 1, len: 2 })
        );
        assert_eq!(
            read_message(&mut r).unwrap(),
            Some(Message::Commit { generation: 3 })
        );
        assert!(read_message(&mut r).unwrap().is_none());
    }

    fn with_header(kind: u16, flags: u16, len: u32, reserved: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&reserved.to_le_bytes());
        let seed = u64::from_le_bytes(f[4..12].try_into().unwrap());
        f.extend_from_slice(&payload_checksum(seed, &[payload]).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn header_fields_are_checked() {
        let read = |f: Vec<u8>| read_message(&mut &f[..]);
        let mut bad_magic = encode(&Message::Commit { generation: 1 });
        bad_magic[0] = b'X';
        assert!(matches!(
            read(bad_magic),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(matches!(
            read(with_header(42, 0, 0, 0, &[])),
            Err(ProtocolError::UnknownKind { kind: 42 })
        ));
        assert!(matches!(
            read(with_header(5, 1, 8, 0, &[0; 8])),
            Err(ProtocolError::Malformed { .. })
        ));
        assert!(matches!(
            read(with_header(5, 0, 8, 1, &[0; 8])),
            Err(ProtocolError::Malformed { .. })
        ));
        assert!(matches!(
            read(with_header(5, 0, MAX_PAYLOAD + 1, 0, &[])),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            read(with_header(5, 0, 9, 0, &[0; 9])),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn bad_codes_and_lengths_are_malformed() {
        let read = |f: Vec<u8>| read_message(&mut &f[..]);
        // Unknown error code.
        assert!(matches!(
            read(with_header(9, 0, 2, 0, &99u16.to_le_bytes())),
            Err(ProtocolError::Malformed { .. })
        ));
        // Unknown codec.
        let mut d = encode(&Message::Data(Data {
            offset: 0,
            raw_len: 1,
            codec: Codec::Raw,
            data_hash: 0,
            payload: vec![1],
        }));
        d[HEADER_LEN + 12] = 7;
        let fixed = with_header(3, 0, 25, 0, &d[HEADER_LEN..]);
        assert!(matches!(read(fixed), Err(ProtocolError::Malformed { .. })));
        // Raw payload shorter than raw_len.
        let prefix = data_prefix(&DataRef {
            offset: 0,
            raw_len: 10,
            codec: Codec::Raw,
            data_hash: 0,
            payload: &[],
        })
        .to_vec();
        // The checksum of a raw Data frame covers its fixed fields only.
        let mut frame = with_header(3, 0, prefix.len() as u32 + 4, 0, &prefix);
        frame.extend_from_slice(&[0; 4]);
        assert!(matches!(read(frame), Err(ProtocolError::Malformed { .. })));
    }

    #[test]
    fn a_hello_of_another_version_is_a_version_error() {
        // A future Hello whose layout this version cannot parse.
        let mut payload = (VERSION + 1).to_le_bytes().to_vec();
        payload.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            read_message(&mut &with_header(1, 0, 5, 0, &payload)[..]),
            Err(ProtocolError::Version { found }) if found == VERSION + 1
        ));
        // One that parses comes back as a Hello for the agent to refuse.
        let hello = Hello {
            version: 9,
            source_id: [1; 16],
            device_size: 1,
            chunk_size: 4096,
            image: "x".into(),
            force_new_source: false,
            read_only: false,
            manage: false,
            format: 0,
        };
        assert_eq!(
            round_trip(&Message::Hello(hello.clone())),
            Message::Hello(hello)
        );
    }

    #[test]
    fn oversized_messages_are_refused_by_the_writer() {
        let msg = Message::Data(Data {
            offset: 0,
            raw_len: MAX_DATA_LEN,
            codec: Codec::Zstd,
            data_hash: 0,
            payload: vec![0; MAX_DATA_LEN as usize + 1],
        });
        let err = write_message(&mut io::sink(), &msg).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn streaming_checksum_matches_one_shot() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        assert_eq!(
            payload_checksum(77, &[&bytes[..24], &bytes[24..]]),
            xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 77)
        );
    }
}
