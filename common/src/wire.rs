//! The wire protocol between the two hosts (docs/protocol.md is its description;
//! this module is its definition). Every connection opens with a [`Hello`]; after
//! that, frames with a fixed 8-byte header. Page payloads are raw bytes; control
//! payloads are MessagePack. Every field read from the wire is checked here, so a
//! caller that gets a [`Frame`] holds only ranges that fit guest memory.

use crate::peer_text::escape;
use crate::types::{MemLayout, MigrationId, PageIndex, PageRange, RangeError, PAGE_SIZE};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// First four bytes of every hello and hello reply.
pub const MAGIC: [u8; 4] = *b"PCPY";
/// The protocol version this build speaks. Peers must speak exactly this one.
pub const PROTOCOL_VERSION: u16 = 3;
/// Length of a [`Hello`] on the wire.
pub const HELLO_LEN: usize = 32;
/// Length of a [`HelloReply`] on the wire.
pub const HELLO_REPLY_LEN: usize = 16;
/// Length of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Length of the range sub-header that starts PAGES, ZERO and REQUEST payloads.
pub const RANGE_LEN: usize = 16;
/// Header plus range sub-header: what precedes the page bytes of a PAGES frame.
pub const PAGES_PREFIX_LEN: usize = FRAME_HEADER_LEN + RANGE_LEN;
/// Most pages one PAGES frame may carry (1 MiB of data).
pub const MAX_PAGES_PER_FRAME: u32 = 256;
/// Most pages one page request may ask for.
pub const MAX_PAGES_PER_REQUEST: u32 = 512;
/// Most pages one ZERO frame may cover (4 MiB of guest memory): a 24-byte
/// frame must not make the destination touch more than this many pages'
/// worth of bitmaps and digests. Senders split longer runs.
pub const MAX_PAGES_PER_ZERO: u32 = 1024;
/// Most ranges one DISCARD frame may carry.
pub const MAX_DISCARD_RANGES: usize = 65536;
/// Largest CONTROL payload; each message type has its own smaller limit
/// (`control::max_encoded_len`).
pub const MAX_CONTROL_LEN: u32 = 16 << 20;
/// Largest PACKAGE payload: the saved state of a 64-vCPU KVM guest is about
/// 1 MiB.
pub const MAX_PACKAGE_LEN: u32 = 16 << 20;
/// Most bulk streams (the main stream included) a migration may use.
pub const MAX_STREAMS: u32 = 16;
/// Pages per pinning chunk: every page of chunk `c` (pages `c*256 ..
/// c*256+255`) travels on stream `c % streams`, so all copies of a page
/// share one TCP stream and arrive in the order they were sent. One chunk
/// is one PAGES frame at most (1 MiB).
pub const STREAM_CHUNK_PAGES: u64 = MAX_PAGES_PER_FRAME as u64;

/// The stream (0 = the main stream) that carries page `page` when a
/// migration runs `streams` bulk streams.
pub fn stream_of(page: u64, streams: u32) -> u32 {
    ((page / STREAM_CHUNK_PAGES) % u64::from(streams.max(1))) as u32
}

/// What a connection carries; named in its hello.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnKind {
    /// Supervisor ↔ supervisor, MessagePack control messages both ways.
    Control,
    /// ram-sender → fault-handler: bulk pages, discard set, device-state package.
    Main,
    /// fault-handler → page-server: page requests and postcopy completion.
    ReturnPath,
    /// page-server → fault-handler: requested pages, never queued behind bulk.
    Urgent,
    /// ram-sender → fault-handler: extra bulk stream number `n` (1 ≤ n <
    /// the agreed stream count; the main stream is stream 0). Carries the
    /// pages pinned to it, FENCE barriers and its own EOS.
    Bulk(u8),
}

impl ConnKind {
    fn code(self) -> u8 {
        match self {
            ConnKind::Control => 1,
            ConnKind::Main => 2,
            ConnKind::ReturnPath => 3,
            ConnKind::Urgent => 4,
            ConnKind::Bulk(_) => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => ConnKind::Control,
            2 => ConnKind::Main,
            3 => ConnKind::ReturnPath,
            4 => ConnKind::Urgent,
            5 => ConnKind::Bulk(0),
            _ => return None,
        })
    }

    fn allows(self, ty: FrameType) -> bool {
        use FrameType as T;
        match self {
            ConnKind::Control => matches!(ty, T::Control),
            ConnKind::Main => matches!(
                ty,
                T::Pages
                    | T::Zero
                    | T::Round
                    | T::Discard
                    | T::Mark
                    | T::Package
                    | T::Eos
                    | T::Fence
            ),
            ConnKind::Bulk(_) => matches!(ty, T::Pages | T::Zero | T::Fence | T::Eos),
            ConnKind::ReturnPath => matches!(ty, T::Request | T::PostcopyDone),
            ConnKind::Urgent => matches!(ty, T::Pages | T::Zero | T::PageTimes),
        }
    }
}

impl fmt::Display for ConnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let ConnKind::Bulk(n) = self {
            return write!(f, "bulk-stream {n}");
        }
        f.write_str(match self {
            ConnKind::Control => "control",
            ConnKind::Main => "main-stream",
            ConnKind::ReturnPath => "return-path",
            ConnKind::Urgent => "urgent",
            ConnKind::Bulk(_) => unreachable!("written above"),
        })
    }
}

/// Why a hello was refused; sent back in the [`HelloReply`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    Ok,
    BadMagic,
    VersionMismatch,
    BadKind,
    UnknownMigration,
    Unexpected,
}

impl HelloStatus {
    fn code(self) -> u8 {
        match self {
            HelloStatus::Ok => 0,
            HelloStatus::BadMagic => 1,
            HelloStatus::VersionMismatch => 2,
            HelloStatus::BadKind => 3,
            HelloStatus::UnknownMigration => 4,
            HelloStatus::Unexpected => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => HelloStatus::Ok,
            1 => HelloStatus::BadMagic,
            2 => HelloStatus::VersionMismatch,
            3 => HelloStatus::BadKind,
            4 => HelloStatus::UnknownMigration,
            5 => HelloStatus::Unexpected,
            _ => return None,
        })
    }
}

impl fmt::Display for HelloStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HelloStatus::Ok => "accepted",
            HelloStatus::BadMagic => "bad magic",
            HelloStatus::VersionMismatch => "protocol version mismatch",
            HelloStatus::BadKind => "unknown connection kind",
            HelloStatus::UnknownMigration => "unknown migration id",
            HelloStatus::Unexpected => "connection not expected now",
        })
    }
}

/// Everything that can be wrong with what came off the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the {0} connection")]
    Closed(ConnKind),
    #[error("{conn} connection closed in the middle of a {what} ({got} of {want} bytes)")]
    Torn {
        conn: ConnKind,
        what: String,
        got: usize,
        want: usize,
    },
    #[error("the peer said nothing on the {0} connection in time (no hello or hello reply)")]
    Silent(ConnKind),
    #[error("peer closed the connection during the hello ({got} of {want} bytes)")]
    ClosedInHello { got: usize, want: usize },
    #[error("bad magic {got:02x?} (expected {MAGIC:02x?}): peer is not a postcopy endpoint")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version mismatch: we speak version {ours}, peer speaks version {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("hello names unknown connection kind {0}")]
    BadKind(u8),
    #[error("hello has nonzero reserved bytes")]
    BadHelloReserved,
    #[error("bulk-stream hello names stream {0}, outside 1..{MAX_STREAMS}")]
    BadStreamIndex(u8),
    #[error(
        "peer refused our {kind} hello: {status} (peer speaks protocol version {peer_version})"
    )]
    Refused {
        kind: ConnKind,
        status: HelloStatus,
        peer_version: u16,
    },
    #[error("peer sent an unknown hello status {0}")]
    BadHelloStatus(u8),
    #[error("hello for migration {got} but this endpoint serves migration {expected}")]
    UnknownMigration {
        got: MigrationId,
        expected: MigrationId,
    },
    #[error("unknown frame type {ty:#04x} on the {conn} connection")]
    UnknownFrameType { conn: ConnKind, ty: u8 },
    #[error("frame type {ty} is not allowed on the {conn} connection")]
    FrameNotAllowed { conn: ConnKind, ty: FrameType },
    #[error("{ty} frame has nonzero flags/reserved bits ({flags:#04x}, {reserved:#06x})")]
    BadHeaderBits {
        ty: FrameType,
        flags: u8,
        reserved: u16,
    },
    #[error("{ty} frame has length {len}, expected {expected}")]
    BadLength {
        ty: FrameType,
        len: u32,
        expected: String,
    },
    #[error("{ty} frame has nonzero reserved word {reserved:#x}")]
    BadRangeReserved { ty: FrameType, reserved: u32 },
    #[error("{ty} frame carries {count} pages, more than the limit of {max}")]
    TooManyPages { ty: FrameType, count: u32, max: u32 },
    #[error("{ty} frame names memory outside the guest: {source}")]
    Range {
        ty: FrameType,
        #[source]
        source: RangeError,
    },
    #[error("malformed {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("{what} message of {len} bytes is larger than its limit of {max} bytes")]
    MessageTooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("could not encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
}

impl WireError {
    /// True when the peer went away at a frame boundary (closed, reset,
    /// broken pipe) rather than sending something wrong. A torn frame is
    /// not a disconnect: it is a bad frame.
    pub fn is_disconnect(&self) -> bool {
        match self {
            WireError::Closed(_) => true,
            WireError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::NotConnected
            ),
            _ => false,
        }
    }
}

/// The first bytes on every connection, client → server.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub kind: ConnKind,
    pub migration: MigrationId,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6] = self.kind.code();
        if let ConnKind::Bulk(n) = self.kind {
            b[7] = n;
        }
        b[8..24].copy_from_slice(&self.migration.0);
        b
    }

    /// Parses a hello. Magic and version are checked first, so a peer from
    /// another protocol or version gets an error naming both versions.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, WireError> {
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let mut kind = ConnKind::from_code(b[6]).ok_or(WireError::BadKind(b[6]))?;
        if b[24..32].iter().any(|&x| x != 0) {
            return Err(WireError::BadHelloReserved);
        }
        // Byte 7 is the stream index of a bulk stream, zero for every
        // other kind.
        match kind {
            ConnKind::Bulk(_) if b[7] == 0 || u32::from(b[7]) >= MAX_STREAMS => {
                return Err(WireError::BadStreamIndex(b[7]))
            }
            ConnKind::Bulk(_) => kind = ConnKind::Bulk(b[7]),
            _ if b[7] != 0 => return Err(WireError::BadHelloReserved),
            _ => {}
        }
        let migration = MigrationId(b[8..24].try_into().expect("16 bytes"));
        Ok(Hello { kind, migration })
    }
}

/// The server's answer to a hello. Its layout never changes between versions,
/// so each side can tell the other which version it speaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub status: HelloStatus,
}

impl HelloReply {
    pub fn encode(&self) -> [u8; HELLO_REPLY_LEN] {
        let mut b = [0u8; HELLO_REPLY_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.status.code();
        b
    }

    pub fn decode(b: &[u8; HELLO_REPLY_LEN]) -> Result<HelloReply, WireError> {
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        // The version comes before everything after it: a peer of another
        // version may use status codes or reserved bytes this one does not
        // know, and must be told apart as "another version".
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let status = HelloStatus::from_code(b[6]).ok_or(WireError::BadHelloStatus(b[6]))?;
        if b[7..].iter().any(|&x| x != 0) {
            return Err(WireError::BadHelloReserved);
        }
        Ok(HelloReply { version, status })
    }
}

/// Client side of the opening: send our hello, read the verdict.
pub fn client_hello<S: Read + Write>(
    stream: &mut S,
    kind: ConnKind,
    migration: MigrationId,
) -> Result<(), WireError> {
    stream.write_all(&Hello { kind, migration }.encode())?;
    stream.flush()?;
    let mut b = [0u8; HELLO_REPLY_LEN];
    read_exact_at(stream, &mut b, kind, At::Hello)?;
    let reply = HelloReply::decode(&b)?;
    match reply.status {
        HelloStatus::Ok => Ok(()),
        status => Err(WireError::Refused {
            kind,
            status,
            peer_version: reply.version,
        }),
    }
}

/// Server side, first half: read and check a hello. A bad magic or version is
/// answered with a refusal here; the caller decides on the rest with
/// [`server_reply`].
pub fn server_read_hello<S: Read + Write>(stream: &mut S) -> Result<Hello, WireError> {
    let mut b = [0u8; HELLO_LEN];
    read_exact_at(stream, &mut b, ConnKind::Control, At::Hello)?;
    server_check_hello(stream, &b)
}

/// Checks a hello already read whole (by a caller that reads several
/// connections at once). A hello that cannot be served at all (bad magic,
/// version, kind) is refused on `stream`, naming our version.
pub fn server_check_hello<S: Write>(
    stream: &mut S,
    b: &[u8; HELLO_LEN],
) -> Result<Hello, WireError> {
    match Hello::decode(b) {
        Ok(h) => Ok(h),
        Err(e) => {
            let status = match e {
                WireError::BadMagic { .. } => HelloStatus::BadMagic,
                WireError::VersionMismatch { .. } => HelloStatus::VersionMismatch,
                WireError::BadKind(_) => HelloStatus::BadKind,
                _ => HelloStatus::Unexpected,
            };
            // Best effort: the peer may already be gone.
            let _ = server_reply(stream, status);
            Err(e)
        }
    }
}

/// Server side, second half: accept or refuse.
pub fn server_reply<S: Write>(stream: &mut S, status: HelloStatus) -> Result<(), WireError> {
    stream.write_all(
        &HelloReply {
            version: PROTOCOL_VERSION,
            status,
        }
        .encode(),
    )?;
    stream.flush()?;
    Ok(())
}

/// Frame types, one byte on the wire.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameType {
    Pages,
    Zero,
    Round,
    Discard,
    Package,
    Eos,
    Mark,
    PageTimes,
    Fence,
    Request,
    PostcopyDone,
    Control,
}

impl FrameType {
    pub fn code(self) -> u8 {
        match self {
            FrameType::Pages => 0x01,
            FrameType::Zero => 0x02,
            FrameType::Round => 0x03,
            FrameType::Discard => 0x04,
            FrameType::Package => 0x05,
            FrameType::Eos => 0x06,
            FrameType::Mark => 0x07,
            FrameType::PageTimes => 0x08,
            FrameType::Fence => 0x09,
            FrameType::Request => 0x10,
            FrameType::PostcopyDone => 0x11,
            FrameType::Control => 0x20,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => FrameType::Pages,
            0x02 => FrameType::Zero,
            0x03 => FrameType::Round,
            0x04 => FrameType::Discard,
            0x05 => FrameType::Package,
            0x06 => FrameType::Eos,
            0x07 => FrameType::Mark,
            0x08 => FrameType::PageTimes,
            0x09 => FrameType::Fence,
            0x10 => FrameType::Request,
            0x11 => FrameType::PostcopyDone,
            0x20 => FrameType::Control,
            _ => return None,
        })
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameType::Pages => "PAGES",
            FrameType::Zero => "ZERO",
            FrameType::Round => "ROUND",
            FrameType::Discard => "DISCARD",
            FrameType::Package => "PACKAGE",
            FrameType::Eos => "EOS",
            FrameType::Mark => "MARK",
            FrameType::PageTimes => "PAGE_TIMES",
            FrameType::Fence => "FENCE",
            FrameType::Request => "REQUEST",
            FrameType::PostcopyDone => "POSTCOPY_DONE",
            FrameType::Control => "CONTROL",
        })
    }
}

/// Encodes a frame header.
pub fn frame_header(ty: FrameType, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = ty.code();
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h
}

fn range_bytes(range: PageRange) -> [u8; RANGE_LEN] {
    let mut b = [0u8; RANGE_LEN];
    b[0..8].copy_from_slice(&range.first().get().to_le_bytes());
    b[8..12].copy_from_slice(&range.count().to_le_bytes());
    b
}

/// The 24 bytes that precede the page data of a PAGES frame. The caller writes
/// `range.count()` pages right after them.
pub fn pages_prefix(range: PageRange) -> [u8; PAGES_PREFIX_LEN] {
    assert!(range.count() <= MAX_PAGES_PER_FRAME);
    let mut b = [0u8; PAGES_PREFIX_LEN];
    let len = RANGE_LEN as u32 + range.count() * PAGE_SIZE as u32;
    b[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(FrameType::Pages, len));
    b[FRAME_HEADER_LEN..].copy_from_slice(&range_bytes(range));
    b
}

fn range_frame(ty: FrameType, range: PageRange) -> [u8; PAGES_PREFIX_LEN] {
    let mut b = [0u8; PAGES_PREFIX_LEN];
    b[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(ty, RANGE_LEN as u32));
    b[FRAME_HEADER_LEN..].copy_from_slice(&range_bytes(range));
    b
}

/// A whole ZERO frame: these pages are all zero bytes.
pub fn zero_frame(range: PageRange) -> [u8; PAGES_PREFIX_LEN] {
    range_frame(FrameType::Zero, range)
}

/// A whole REQUEST frame (return path).
pub fn request_frame(range: PageRange) -> [u8; PAGES_PREFIX_LEN] {
    assert!(range.count() <= MAX_PAGES_PER_REQUEST);
    range_frame(FrameType::Request, range)
}

/// A whole ROUND frame: the sender finished dirty sync number `sync`.
pub fn round_frame(sync: u32) -> [u8; FRAME_HEADER_LEN + 8] {
    let mut b = [0u8; FRAME_HEADER_LEN + 8];
    b[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(FrameType::Round, 8));
    b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&sync.to_le_bytes());
    b
}

/// Payload bytes of a PAGE_TIMES frame: page, request read, page sent.
pub const PAGE_TIMES_LEN: usize = 24;

/// A whole PAGE_TIMES frame (urgent connection, right after the answer to
/// the request for `page`): when the page-server read that request and
/// when it handed the answer to the socket, in ns of its host's
/// `CLOCK_MONOTONIC` ([`crate::clock::monotonic_ns`]).
pub fn page_times_frame(
    page: PageIndex,
    request_read_ns: u64,
    page_sent_ns: u64,
) -> [u8; FRAME_HEADER_LEN + PAGE_TIMES_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN + PAGE_TIMES_LEN];
    b[..FRAME_HEADER_LEN]
        .copy_from_slice(&frame_header(FrameType::PageTimes, PAGE_TIMES_LEN as u32));
    b[8..16].copy_from_slice(&page.get().to_le_bytes());
    b[16..24].copy_from_slice(&request_read_ns.to_le_bytes());
    b[24..32].copy_from_slice(&page_sent_ns.to_le_bytes());
    b
}

/// A whole MARK frame: the destination reports when it has processed
/// everything before it.
pub fn mark_frame(id: u64) -> [u8; FRAME_HEADER_LEN + 8] {
    let mut b = [0u8; FRAME_HEADER_LEN + 8];
    b[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(FrameType::Mark, 8));
    b[FRAME_HEADER_LEN..].copy_from_slice(&id.to_le_bytes());
    b
}

/// A whole FENCE frame: barrier number `seq` (section "Parallel bulk
/// streams" of docs/protocol.md). Written on every stream; the
/// destination applies nothing after the main stream's FENCE `seq` until
/// every stream has delivered everything before its own FENCE `seq`.
pub fn fence_frame(seq: u64) -> [u8; FRAME_HEADER_LEN + 8] {
    let mut b = [0u8; FRAME_HEADER_LEN + 8];
    b[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(FrameType::Fence, 8));
    b[FRAME_HEADER_LEN..].copy_from_slice(&seq.to_le_bytes());
    b
}

/// A header-only frame (EOS, POSTCOPY_DONE).
pub fn empty_frame(ty: FrameType) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!(matches!(ty, FrameType::Eos | FrameType::PostcopyDone));
    frame_header(ty, 0)
}

/// DISCARD frames for a set of ranges (several frames if there are many).
pub fn discard_frames(ranges: &[PageRange]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in ranges.chunks(MAX_DISCARD_RANGES) {
        let len = (chunk.len() * RANGE_LEN) as u32;
        out.extend_from_slice(&frame_header(FrameType::Discard, len));
        for r in chunk {
            out.extend_from_slice(&range_bytes(*r));
        }
    }
    out
}

/// A frame carrying a MessagePack message (CONTROL or PACKAGE).
pub fn message_frame<T: Serialize>(
    ty: FrameType,
    msg: &T,
    what: &'static str,
) -> Result<Vec<u8>, WireError> {
    debug_assert!(matches!(ty, FrameType::Control | FrameType::Package));
    let payload = rmp_serde::to_vec_named(msg).map_err(|e| WireError::Encode {
        what,
        detail: e.to_string(),
    })?;
    let max = match ty {
        FrameType::Package => MAX_PACKAGE_LEN,
        _ => MAX_CONTROL_LEN,
    };
    if payload.len() > max as usize {
        return Err(WireError::Encode {
            what,
            detail: format!("{} bytes is more than the {max}-byte limit", payload.len()),
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&frame_header(ty, payload.len() as u32));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a MessagePack payload, naming what it was meant to be on failure.
pub fn decode_message<T: DeserializeOwned>(
    payload: &[u8],
    what: &'static str,
) -> Result<T, WireError> {
    let mut cursor = io::Cursor::new(payload);
    // The decoder's message may quote the peer's bytes (an unknown variant
    // name): escaped, like all peer text.
    let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor)).map_err(|e| {
        WireError::Decode {
            what,
            detail: escape(&e.to_string()).into_owned(),
        }
    })?;
    let used = cursor.position() as usize;
    if used != payload.len() {
        return Err(WireError::Decode {
            what,
            detail: format!("{} trailing bytes after the message", payload.len() - used),
        });
    }
    Ok(value)
}

/// The device-state package: sent once, on the main stream, at the end of
/// precopy. The destination reads it whole before it needs the stream for pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Register the destination's userfaultfd: postcopy follows.
    pub listen: bool,
    /// Start the destination guest once the state is loaded.
    pub run: bool,
    /// The guest's saved state (CPU-like state of the process or KVM guest).
    #[serde(with = "serde_bytes")]
    pub guest_state: Vec<u8>,
}

/// One frame read off a connection, already checked.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// Page contents, `range.count()` pages back to back.
    Pages { range: PageRange, data: &'a [u8] },
    /// These pages are all zero.
    Zero { range: PageRange },
    /// The sender finished dirty sync `sync`.
    Round { sync: u32 },
    /// Drop these pages: they were sent in precopy and dirtied since.
    Discard { ranges: Vec<PageRange> },
    /// Report back (on the control connection) once everything before this
    /// frame has been processed.
    Mark { id: u64 },
    /// Barrier `seq` across the bulk streams.
    Fence { seq: u64 },
    /// The device-state package.
    Package(Package),
    /// End of the main stream: every page has been sent.
    Eos,
    /// When the source read the request for `page` and sent its answer
    /// (ns, the source's `CLOCK_MONOTONIC`): the source's part of the
    /// fault path.
    PageTimes {
        page: PageIndex,
        request_read_ns: u64,
        page_sent_ns: u64,
    },
    /// Send these pages on the urgent connection.
    Request { range: PageRange },
    /// The destination has every page.
    PostcopyDone,
    /// A MessagePack control message, decoded by the caller.
    Control(&'a [u8]),
}

impl Frame<'_> {
    /// The type this frame came as.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Pages { .. } => FrameType::Pages,
            Frame::Zero { .. } => FrameType::Zero,
            Frame::Round { .. } => FrameType::Round,
            Frame::Discard { .. } => FrameType::Discard,
            Frame::Mark { .. } => FrameType::Mark,
            Frame::Fence { .. } => FrameType::Fence,
            Frame::PageTimes { .. } => FrameType::PageTimes,
            Frame::Package(_) => FrameType::Package,
            Frame::Eos => FrameType::Eos,
            Frame::Request { .. } => FrameType::Request,
            Frame::PostcopyDone => FrameType::PostcopyDone,
            Frame::Control(_) => FrameType::Control,
        }
    }
}

/// Reads and checks frames from one connection.
pub struct FrameReader<R> {
    inner: R,
    conn: ConnKind,
    layout: MemLayout,
    buf: Vec<u8>,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, conn: ConnKind, layout: MemLayout) -> Self {
        FrameReader {
            inner,
            conn,
            layout,
            buf: Vec::new(),
            bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes read so far, headers included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts the bytes read into `counter`, which is up to date before
    /// each frame is returned (so others can read it while the frame is
    /// being handled).
    pub fn counting_into(mut self, counter: Arc<AtomicU64>) -> Self {
        counter.fetch_add(self.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.bytes = counter;
        self
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next frame. Any error leaves the connection unusable: the
    /// caller drops it.
    pub fn next_frame(&mut self) -> Result<Frame<'_>, WireError> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        read_exact_at(&mut self.inner, &mut h, self.conn, At::Boundary)?;
        let conn = self.conn;
        let ty =
            FrameType::from_code(h[0]).ok_or(WireError::UnknownFrameType { conn, ty: h[0] })?;
        if !conn.allows(ty) {
            return Err(WireError::FrameNotAllowed { conn, ty });
        }
        let flags = h[1];
        let reserved = u16::from_le_bytes([h[2], h[3]]);
        if flags != 0 || reserved != 0 {
            return Err(WireError::BadHeaderBits {
                ty,
                flags,
                reserved,
            });
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        check_len(ty, len)?;
        self.buf.resize(len as usize, 0);
        read_exact_at(&mut self.inner, &mut self.buf, conn, At::Payload(ty))?;
        self.bytes
            .fetch_add(FRAME_HEADER_LEN as u64 + u64::from(len), Ordering::Relaxed);
        let p = &self.buf[..];
        let layout = self.layout;
        Ok(match ty {
            FrameType::Pages => {
                let range = parse_range(ty, p, layout, MAX_PAGES_PER_FRAME)?;
                let expected = RANGE_LEN + range.count() as usize * PAGE_SIZE;
                if p.len() != expected {
                    return Err(WireError::BadLength {
                        ty,
                        len,
                        expected: format!("{expected} for {range}"),
                    });
                }
                Frame::Pages {
                    range,
                    data: &p[RANGE_LEN..],
                }
            }
            FrameType::Zero => Frame::Zero {
                range: parse_range(ty, p, layout, MAX_PAGES_PER_ZERO)?,
            },
            FrameType::Request => Frame::Request {
                range: parse_range(ty, p, layout, MAX_PAGES_PER_REQUEST)?,
            },
            FrameType::Round => {
                if p[4..8].iter().any(|&b| b != 0) {
                    return Err(WireError::BadRangeReserved {
                        ty,
                        reserved: u32::from_le_bytes(p[4..8].try_into().expect("4")),
                    });
                }
                Frame::Round {
                    sync: u32::from_le_bytes(p[0..4].try_into().expect("4")),
                }
            }
            FrameType::Discard => {
                let mut ranges = Vec::with_capacity(p.len() / RANGE_LEN);
                for chunk in p.chunks_exact(RANGE_LEN) {
                    ranges.push(parse_range(ty, chunk, layout, u32::MAX)?);
                }
                Frame::Discard {
                    ranges: normalize_ranges(ranges, layout),
                }
            }
            FrameType::Mark => Frame::Mark {
                id: u64::from_le_bytes(p[0..8].try_into().expect("8")),
            },
            FrameType::Fence => Frame::Fence {
                seq: u64::from_le_bytes(p[0..8].try_into().expect("8")),
            },
            FrameType::PageTimes => {
                let raw = u64::from_le_bytes(p[0..8].try_into().expect("8"));
                let page = layout
                    .page(raw)
                    .map_err(|source| WireError::Range { ty, source })?;
                Frame::PageTimes {
                    page,
                    request_read_ns: u64::from_le_bytes(p[8..16].try_into().expect("8")),
                    page_sent_ns: u64::from_le_bytes(p[16..24].try_into().expect("8")),
                }
            }
            FrameType::Package => Frame::Package(decode_message(p, "device-state package")?),
            FrameType::Eos => Frame::Eos,
            FrameType::PostcopyDone => Frame::PostcopyDone,
            FrameType::Control => Frame::Control(p),
        })
    }
}

fn check_len(ty: FrameType, len: u32) -> Result<(), WireError> {
    let ok = match ty {
        FrameType::Pages => {
            len as usize >= RANGE_LEN + PAGE_SIZE
                && len as usize <= RANGE_LEN + MAX_PAGES_PER_FRAME as usize * PAGE_SIZE
        }
        FrameType::Zero | FrameType::Request => len as usize == RANGE_LEN,
        FrameType::Round | FrameType::Mark | FrameType::Fence => len == 8,
        FrameType::PageTimes => len as usize == PAGE_TIMES_LEN,
        FrameType::Discard => {
            len > 0
                && (len as usize).is_multiple_of(RANGE_LEN)
                && len as usize <= MAX_DISCARD_RANGES * RANGE_LEN
        }
        FrameType::Package => len > 0 && len <= MAX_PACKAGE_LEN,
        FrameType::Control => len > 0 && len <= MAX_CONTROL_LEN,
        FrameType::Eos | FrameType::PostcopyDone => len == 0,
    };
    if ok {
        Ok(())
    } else {
        let expected = match ty {
            FrameType::Pages => format!("{RANGE_LEN} + 4096 × (1..={MAX_PAGES_PER_FRAME})"),
            FrameType::Zero | FrameType::Request => RANGE_LEN.to_string(),
            FrameType::Round | FrameType::Mark | FrameType::Fence => "8".into(),
            FrameType::PageTimes => PAGE_TIMES_LEN.to_string(),
            FrameType::Discard => format!(
                "a nonzero multiple of {RANGE_LEN} up to {}",
                MAX_DISCARD_RANGES * RANGE_LEN
            ),
            FrameType::Package => format!("1..={MAX_PACKAGE_LEN}"),
            FrameType::Control => format!("1..={MAX_CONTROL_LEN}"),
            FrameType::Eos | FrameType::PostcopyDone => "0".into(),
        };
        Err(WireError::BadLength { ty, len, expected })
    }
}

fn parse_range(
    ty: FrameType,
    p: &[u8],
    layout: MemLayout,
    max: u32,
) -> Result<PageRange, WireError> {
    let first = u64::from_le_bytes(p[0..8].try_into().expect("8"));
    let count = u32::from_le_bytes(p[8..12].try_into().expect("4"));
    let reserved = u32::from_le_bytes(p[12..16].try_into().expect("4"));
    if reserved != 0 {
        return Err(WireError::BadRangeReserved { ty, reserved });
    }
    if count > max {
        return Err(WireError::TooManyPages { ty, count, max });
    }
    layout
        .range(first, count)
        .map_err(|source| WireError::Range { ty, source })
}

/// Sorts ranges and merges the ones that overlap or touch, so the work a
/// DISCARD frame causes is bounded by guest memory, not by how often the
/// peer repeats a range.
fn normalize_ranges(mut ranges: Vec<PageRange>, layout: MemLayout) -> Vec<PageRange> {
    ranges.sort_unstable_by_key(|r| r.first().get());
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (first, end) = (r.first().get(), r.end());
        match out.last_mut() {
            Some((_, e)) if first <= *e => *e = (*e).max(end),
            _ => out.push((first, end)),
        }
    }
    // A merged run can be longer than one range's 32-bit count: split it.
    let mut merged = Vec::with_capacity(out.len());
    for (mut first, end) in out {
        while first < end {
            let n = (end - first).min(u64::from(u32::MAX)) as u32;
            merged.push(
                layout
                    .range(first, n)
                    .expect("inside the ranges it came from"),
            );
            first += u64::from(n);
        }
    }
    merged
}

/// Where in the stream a read happens: what an early end of stream means.
#[derive(Copy, Clone)]
enum At {
    /// At a frame boundary: a close before the first byte is a clean end.
    Boundary,
    /// Inside a frame: any close tears it.
    Payload(FrameType),
    /// During the hello exchange.
    Hello,
}

fn read_exact_at<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    conn: ConnKind,
    at: At,
) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(match at {
                    At::Boundary if filled == 0 => WireError::Closed(conn),
                    At::Boundary => WireError::Torn {
                        conn,
                        what: "frame header".into(),
                        got: filled,
                        want: buf.len(),
                    },
                    At::Payload(ty) => WireError::Torn {
                        conn,
                        what: format!("{ty} frame"),
                        got: filled,
                        want: buf.len(),
                    },
                    At::Hello => WireError::ClosedInHello {
                        got: filled,
                        want: buf.len(),
                    },
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A read timeout set by the caller ran out.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && matches!(at, At::Hello) =>
            {
                return Err(WireError::Silent(conn))
            }
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Writes a control message as one CONTROL frame.
pub fn send_control<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
    let frame = message_frame(FrameType::Control, msg, "control message")?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn layout() -> MemLayout {
        MemLayout::new(64 * PAGE_SIZE as u64).unwrap()
    }

    fn reader(bytes: Vec<u8>, conn: ConnKind) -> FrameReader<Cursor<Vec<u8>>> {
        FrameReader::new(Cursor::new(bytes), conn, layout())
    }

    #[test]
    fn hello_round_trips() {
        let id = MigrationId([7; 16]);
        let h = Hello {
            kind: ConnKind::Urgent,
            migration: id,
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn bulk_hello_carries_its_stream_index() {
        let id = MigrationId([7; 16]);
        let h = Hello {
            kind: ConnKind::Bulk(3),
            migration: id,
        };
        let b = h.encode();
        assert_eq!((b[6], b[7]), (5, 3));
        assert_eq!(Hello::decode(&b).unwrap(), h);
        assert_eq!(ConnKind::Bulk(3).to_string(), "bulk-stream 3");
        for bad in [0u8, MAX_STREAMS as u8, 255] {
            let mut b = b;
            b[7] = bad;
            assert!(matches!(
                Hello::decode(&b),
                Err(WireError::BadStreamIndex(n)) if n == bad
            ));
        }
        // Byte 7 stays reserved for every other kind.
        let mut b = Hello {
            kind: ConnKind::Main,
            migration: id,
        }
        .encode();
        b[7] = 1;
        assert!(matches!(
            Hello::decode(&b),
            Err(WireError::BadHelloReserved)
        ));
    }

    #[test]
    fn bulk_stream_carries_pages_fences_and_its_end_only() {
        let mut bytes = fence_frame(9).to_vec();
        bytes.extend(empty_frame(FrameType::Eos));
        bytes.extend(round_frame(1));
        let mut r = reader(bytes, ConnKind::Bulk(1));
        assert_eq!(r.next_frame().unwrap(), Frame::Fence { seq: 9 });
        assert_eq!(r.next_frame().unwrap(), Frame::Eos);
        assert!(matches!(
            r.next_frame(),
            Err(WireError::FrameNotAllowed {
                ty: FrameType::Round,
                ..
            })
        ));
        assert_eq!(stream_of(255, 3), 0);
        assert_eq!(stream_of(256, 3), 1);
        assert_eq!(stream_of(3 * 256, 3), 0);
        assert_eq!(stream_of(12345, 1), 0);
    }

    #[test]
    fn hello_with_wrong_magic_or_version_is_refused() {
        let mut b = Hello {
            kind: ConnKind::Main,
            migration: MigrationId([0; 16]),
        }
        .encode();
        b[0] = b'X';
        assert!(matches!(Hello::decode(&b), Err(WireError::BadMagic { .. })));
        b[0] = b'P';
        b[4..6].copy_from_slice(&9u16.to_le_bytes());
        let err = Hello::decode(&b).unwrap_err();
        assert!(matches!(
            err,
            WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 9
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains(&format!("version {PROTOCOL_VERSION}")) && text.contains("version 9"),
            "{text}"
        );
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6] = 42;
        assert!(matches!(Hello::decode(&b), Err(WireError::BadKind(42))));
    }

    #[test]
    fn pages_frame_round_trips() {
        let range = layout().range(3, 2).unwrap();
        let mut bytes = pages_prefix(range).to_vec();
        bytes.extend(std::iter::repeat_n(0xabu8, 2 * PAGE_SIZE));
        bytes.extend_from_slice(&zero_frame(layout().range(9, 40).unwrap()));
        bytes.extend_from_slice(&round_frame(5));
        bytes.extend_from_slice(&mark_frame(77));
        bytes.extend_from_slice(&empty_frame(FrameType::Eos));
        let mut r = reader(bytes, ConnKind::Main);
        match r.next_frame().unwrap() {
            Frame::Pages { range: got, data } => {
                assert_eq!(got, range);
                assert_eq!(data.len(), 2 * PAGE_SIZE);
                assert!(data.iter().all(|&b| b == 0xab));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.next_frame().unwrap(),
            Frame::Zero {
                range: layout().range(9, 40).unwrap()
            }
        );
        assert_eq!(r.next_frame().unwrap(), Frame::Round { sync: 5 });
        assert_eq!(r.next_frame().unwrap(), Frame::Mark { id: 77 });
        assert_eq!(r.next_frame().unwrap(), Frame::Eos);
        assert!(matches!(
            r.next_frame(),
            Err(WireError::Closed(ConnKind::Main))
        ));
    }

    #[test]
    fn discard_and_package_round_trip() {
        let l = layout();
        let ranges = vec![l.range(0, 1).unwrap(), l.range(10, 20).unwrap()];
        let pkg = Package {
            listen: true,
            run: true,
            guest_state: vec![1, 2, 3],
        };
        let mut bytes = discard_frames(&ranges);
        bytes.extend(message_frame(FrameType::Package, &pkg, "package").unwrap());
        let mut r = reader(bytes, ConnKind::Main);
        assert_eq!(r.next_frame().unwrap(), Frame::Discard { ranges });
        assert_eq!(r.next_frame().unwrap(), Frame::Package(pkg));
    }

    #[test]
    fn out_of_range_pages_are_refused() {
        let mut bytes = frame_header(FrameType::Request, 16).to_vec();
        bytes.extend_from_slice(&63u64.to_le_bytes());
        bytes.extend_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let err = reader(bytes, ConnKind::ReturnPath)
            .next_frame()
            .unwrap_err();
        assert!(matches!(err, WireError::Range { .. }), "{err}");
        assert!(err.to_string().contains("63"), "{err}");
    }

    #[test]
    fn page_times_round_trip_and_are_checked() {
        let page = layout().page(7).unwrap();
        let bytes = page_times_frame(page, 1_000, 2_500).to_vec();
        let mut r = reader(bytes.clone(), ConnKind::Urgent);
        assert_eq!(
            r.next_frame().unwrap(),
            Frame::PageTimes {
                page,
                request_read_ns: 1_000,
                page_sent_ns: 2_500
            }
        );
        // Only the urgent connection carries them.
        let err = reader(bytes.clone(), ConnKind::Main)
            .next_frame()
            .unwrap_err();
        assert!(matches!(err, WireError::FrameNotAllowed { .. }), "{err}");
        // A page beyond guest memory is refused, naming it.
        let mut bad = bytes.clone();
        bad[8..16].copy_from_slice(&64u64.to_le_bytes());
        let err = reader(bad, ConnKind::Urgent).next_frame().unwrap_err();
        assert!(matches!(err, WireError::Range { .. }), "{err}");
        assert!(err.to_string().contains("64"), "{err}");
        // So is any other length.
        let mut short = frame_header(FrameType::PageTimes, 16).to_vec();
        short.extend_from_slice(&bytes[8..24]);
        let err = reader(short, ConnKind::Urgent).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadLength { .. }), "{err}");
    }

    #[test]
    fn frames_are_checked_against_the_connection_kind() {
        let bytes = empty_frame(FrameType::Eos).to_vec();
        let err = reader(bytes, ConnKind::Urgent).next_frame().unwrap_err();
        assert!(matches!(err, WireError::FrameNotAllowed { .. }), "{err}");
        let err = reader(vec![0x77, 0, 0, 0, 0, 0, 0, 0], ConnKind::Main)
            .next_frame()
            .unwrap_err();
        assert!(err.to_string().contains("0x77"), "{err}");
    }

    #[test]
    fn malformed_lengths_and_bits_are_refused() {
        // PAGES claiming one page but carrying half of one.
        let mut bytes = frame_header(FrameType::Pages, (RANGE_LEN + 2048) as u32).to_vec();
        bytes.extend(vec![0; RANGE_LEN + 2048]);
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadLength { .. }), "{err}");
        // PAGES whose range says 2 pages but the payload holds 1.
        let range = layout().range(0, 2).unwrap();
        let mut bytes = frame_header(FrameType::Pages, (RANGE_LEN + PAGE_SIZE) as u32).to_vec();
        bytes.extend_from_slice(&range_bytes(range));
        bytes.extend(vec![0; PAGE_SIZE]);
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadLength { .. }), "{err}");
        // Nonzero flags.
        let mut bytes = empty_frame(FrameType::Eos).to_vec();
        bytes[1] = 1;
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadHeaderBits { .. }), "{err}");
        // Oversized request.
        let mut bytes = frame_header(FrameType::Request, 16).to_vec();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&4096u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let err = reader(bytes, ConnKind::ReturnPath)
            .next_frame()
            .unwrap_err();
        assert!(matches!(err, WireError::TooManyPages { .. }), "{err}");
        // Torn frame: header promises more than arrives.
        let mut bytes = pages_prefix(layout().range(0, 1).unwrap()).to_vec();
        bytes.extend(vec![0; 100]);
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::Torn { .. }), "{err}");
        assert!(!err.is_disconnect(), "a torn frame is a bad frame: {err}");
        assert!(err.to_string().contains("PAGES frame"), "{err}");
        // A close between frames is a clean end.
        let bytes = empty_frame(FrameType::Eos).to_vec();
        let mut r = reader(bytes, ConnKind::Main);
        r.next_frame().unwrap();
        assert!(r.next_frame().unwrap_err().is_disconnect());
        // A package with bytes after the message.
        let pkg = Package {
            listen: false,
            run: true,
            guest_state: vec![],
        };
        let mut bytes = message_frame(FrameType::Package, &pkg, "package").unwrap();
        bytes.push(0xc0);
        let len = (bytes.len() - FRAME_HEADER_LEN) as u32;
        bytes[4..8].copy_from_slice(&len.to_le_bytes());
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
        // Garbage where a package should be.
        let mut bytes = frame_header(FrameType::Package, 3).to_vec();
        bytes.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::Decode { .. }), "{err}");
    }

    #[test]
    fn zero_frames_are_capped() {
        let big = MemLayout::new(64 << 30).unwrap();
        let mut bytes = frame_header(FrameType::Zero, 16).to_vec();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&(MAX_PAGES_PER_ZERO + 1).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let mut r = FrameReader::new(Cursor::new(bytes.clone()), ConnKind::Main, big);
        let err = r.next_frame().unwrap_err();
        assert!(matches!(err, WireError::TooManyPages { .. }), "{err}");
        assert!(err.to_string().contains("1025"), "{err}");
        bytes[16..20].copy_from_slice(&MAX_PAGES_PER_ZERO.to_le_bytes());
        let mut r = FrameReader::new(Cursor::new(bytes), ConnKind::Main, big);
        assert!(matches!(r.next_frame().unwrap(), Frame::Zero { .. }));
    }

    #[test]
    fn discard_ranges_are_merged() {
        let l = layout();
        // The whole guest many times over, plus overlapping and touching
        // pieces: one range comes out.
        let mut sent = vec![l.range(0, 64).unwrap(); 1000];
        sent.extend([l.range(5, 3).unwrap(), l.range(63, 1).unwrap()]);
        let mut r = reader(discard_frames(&sent), ConnKind::Main);
        assert_eq!(
            r.next_frame().unwrap(),
            Frame::Discard {
                ranges: vec![l.range(0, 64).unwrap()]
            }
        );
        let sent = vec![
            l.range(20, 2).unwrap(),
            l.range(3, 4).unwrap(),
            l.range(7, 1).unwrap(),
            l.range(21, 5).unwrap(),
            l.range(40, 1).unwrap(),
        ];
        let mut r = reader(discard_frames(&sent), ConnKind::Main);
        assert_eq!(
            r.next_frame().unwrap(),
            Frame::Discard {
                ranges: vec![
                    l.range(3, 5).unwrap(),
                    l.range(20, 6).unwrap(),
                    l.range(40, 1).unwrap()
                ]
            }
        );
    }

    #[test]
    fn oversized_messages_are_refused_by_their_header() {
        // Nothing of the payload is read: the header alone is refused.
        let bytes = frame_header(FrameType::Control, MAX_CONTROL_LEN + 1).to_vec();
        let err = reader(bytes, ConnKind::Control).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadLength { .. }), "{err}");
        let bytes = frame_header(FrameType::Package, MAX_PACKAGE_LEN + 1).to_vec();
        let err = reader(bytes, ConnKind::Main).next_frame().unwrap_err();
        assert!(matches!(err, WireError::BadLength { .. }), "{err}");
    }

    #[test]
    fn decode_errors_escape_the_peers_text() {
        // A unit variant name carrying an escape sequence and a newline.
        let payload = rmp_serde::to_vec("\u{1b}[2J\nforged").unwrap();
        let err = decode_message::<FrameTypeProbe>(&payload, "probe").unwrap_err();
        let text = err.to_string();
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
    }

    #[derive(Debug, Deserialize)]
    enum FrameTypeProbe {
        #[allow(dead_code)]
        Only,
    }

    #[test]
    fn client_hello_reports_peer_version() {
        // A fake server that answers with version 3.
        struct Fake {
            out: Vec<u8>,
            input: Cursor<Vec<u8>>,
        }
        impl Read for Fake {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.input.read(b)
            }
        }
        impl Write for Fake {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.out.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let reply = HelloReply {
            version: 3,
            status: HelloStatus::VersionMismatch,
        };
        let mut fake = Fake {
            out: vec![],
            input: Cursor::new(reply.encode().to_vec()),
        };
        let err = client_hello(&mut fake, ConnKind::Control, MigrationId([1; 16])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("version {PROTOCOL_VERSION}")) && text.contains("version 3"),
            "{text}"
        );
        assert_eq!(fake.out.len(), HELLO_LEN);
    }
}
