//! TLS 1.3 records on a connection between the hosts, after its handshake
//! (docs/security.md, "Between the hosts"). The supervisor runs the
//! handshake with rustls (supervisor/src/tls.rs), authenticates the peer,
//! says the hello inside the session, and then hands the socket on together
//! with the session's traffic keys ([`Session`]); from there the process
//! that holds the socket (a role, or the supervisor for its control
//! connection) protects every record itself with the negotiated suite's
//! AEAD, as rustls builds it. The host's private key never leaves the
//! supervisor.
//!
//! Only what follows a finished TLS 1.3 handshake is built here:
//! application data both ways, and a peer's `close_notify` as the end of
//! the stream. A key update, a session ticket or any other alert from the
//! peer is an error (ours send none of them). Each direction is an
//! independent half ([`TlsReader`], [`TlsWriter`]), as TLS 1.3 keys them,
//! so one thread can read while another writes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::crypto::{ring, CryptoProvider};
use rustls::{
    AlertDescription, CipherSuite, ConnectionTrafficSecrets, ContentType, ExtractedSecrets,
    ProtocolVersion, SupportedCipherSuite,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// Most plaintext one record carries (RFC 8446 §5.1: 2^14 bytes).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Most bytes after a record's header (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Content type of an application-data record (RFC 8446 §5.1): the only
/// outer type after the handshake.
const APPLICATION_DATA: u8 = 23;
/// Plaintext a writer turns into records per write to the socket: 16 full
/// records, one system call.
const WRITE_BATCH: usize = 16 * MAX_PLAINTEXT;
/// Bytes a reader asks the socket for at once.
const READ_CHUNK: usize = 64 << 10;

/// The cipher suites offered and accepted, in order of preference:
/// AES-256-GCM (AES-NI makes it the faster one where it exists) and
/// ChaCha20-Poly1305. Both take 32-byte keys, which is what [`Keys`]
/// carries.
pub fn suites() -> Vec<SupportedCipherSuite> {
    vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ]
}

/// rustls's ring provider with only [`suites`].
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: suites(),
        ..ring::default_provider()
    })
}

/// Errors in turning a finished handshake into a [`Session`], or a
/// [`Session`] into record protection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cipher suite {0:#06x} is not one this build offers")]
    Suite(u16),
    #[error("TLS: the negotiated suite {0:?} is not TLS 1.3 with a 32-byte key")]
    Unsupported(CipherSuite),
    #[error("TLS: cannot take over the session: {0}")]
    Extract(rustls::Error),
}

/// The traffic key of one direction of a session, and the sequence number
/// of its next record.
#[derive(Clone, Serialize, Deserialize)]
pub struct Keys {
    pub seq: u64,
    key: [u8; 32],
    iv: [u8; 12],
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ seq: {}, .. }}", self.seq)
    }
}

/// A TLS 1.3 session after its handshake (and the hello inside it): the
/// suite and both directions' keys. Handed from the supervisor to the role
/// that gets the socket, in that role's Start message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// IANA number of the cipher suite.
    pub suite: u16,
    /// What we send.
    pub tx: Keys,
    /// What the peer sends.
    pub rx: Keys,
}

fn keys(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, CipherSuite> {
    let (key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        ConnectionTrafficSecrets::Aes128Gcm { .. } => {
            return Err(CipherSuite::TLS13_AES_128_GCM_SHA256)
        }
        _ => return Err(CipherSuite::Unknown(0)),
    };
    let mut k = Keys {
        seq,
        key: [0; 32],
        iv: [0; 12],
    };
    let (kb, ib) = (key.as_ref(), iv.as_ref());
    if kb.len() != 32 || ib.len() != 12 {
        return Err(CipherSuite::Unknown(0));
    }
    k.key.copy_from_slice(kb);
    k.iv.copy_from_slice(ib);
    Ok(k)
}

impl Session {
    /// The session of a finished handshake, from rustls's extracted secrets.
    pub fn new(suite: SupportedCipherSuite, secrets: ExtractedSecrets) -> Result<Self, TlsError> {
        let name = suite.suite();
        let unsupported = |_| TlsError::Unsupported(name);
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Session {
            suite: u16::from(name),
            tx: keys(tx_seq, tx).map_err(unsupported)?,
            rx: keys(rx_seq, rx).map_err(unsupported)?,
        })
    }

    fn suite(&self) -> Result<&'static rustls::Tls13CipherSuite, TlsError> {
        let want = CipherSuite::from(self.suite);
        suites()
            .into_iter()
            .find(|s| s.suite() == want)
            .and_then(|s| s.tls13())
            .ok_or(TlsError::Suite(self.suite))
    }

    /// The sending half over `out`.
    pub fn writer<W: Write>(&self, out: W) -> Result<TlsWriter<W>, TlsError> {
        let suite = self.suite()?;
        Ok(TlsWriter {
            out,
            enc: suite
                .aead_alg
                .encrypter(AeadKey::from(self.tx.key), Iv::from(self.tx.iv)),
            seq: self.tx.seq,
            limit: suite.common.confidentiality_limit,
            batch: Vec::with_capacity(
                WRITE_BATCH + 16 * (HEADER_LEN + MAX_CIPHERTEXT - MAX_PLAINTEXT),
            ),
            broken: false,
        })
    }

    /// The receiving half over `input`.
    pub fn reader<R: Read>(&self, input: R) -> Result<TlsReader<R>, TlsError> {
        let suite = self.suite()?;
        Ok(TlsReader {
            input,
            dec: suite
                .aead_alg
                .decrypter(AeadKey::from(self.rx.key), Iv::from(self.rx.iv)),
            seq: self.rx.seq,
            buf: vec![0; READ_CHUNK + HEADER_LEN + MAX_CIPHERTEXT].into_boxed_slice(),
            head: 0,
            tail: 0,
            plain: 0..0,
            end: None,
        })
    }
}

/// The sending half of a session: each `write` seals up to
/// [`WRITE_BATCH`] bytes into full records and writes them with one call.
/// A failed write leaves a torn record on the wire: the writer refuses
/// every write after it.
pub struct TlsWriter<W> {
    out: W,
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// Records one key may seal (RFC 8446 §5.5, as rustls states it per
    /// suite): past it the writer stops (key updates are not built).
    limit: u64,
    batch: Vec<u8>,
    broken: bool,
}

impl<W> TlsWriter<W> {
    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: an earlier write failed half-way; the connection is unusable",
            ));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let take = buf.len().min(WRITE_BATCH);
        self.batch.clear();
        for chunk in buf[..take].chunks(MAX_PLAINTEXT) {
            if self.seq >= self.limit {
                self.broken = true;
                return Err(io::Error::other(format!(
                    "TLS: this connection sealed {} records, the confidentiality limit of its cipher suite (RFC 8446 §5.5); key updates are not built",
                    self.seq
                )));
            }
            let record = self
                .enc
                .encrypt(
                    OutboundPlainMessage {
                        typ: ContentType::ApplicationData,
                        version: ProtocolVersion::TLSv1_2,
                        payload: OutboundChunks::Single(chunk),
                    },
                    self.seq,
                )
                .map_err(|e| io::Error::other(format!("TLS: sealing record {}: {e}", self.seq)))?;
            self.seq += 1;
            self.batch.extend_from_slice(&record.encode());
        }
        if let Err(e) = self.out.write_all(&self.batch) {
            self.broken = true;
            return Err(e);
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The receiving half of a session. Records are read in chunks, opened in
/// place and served from there; a read that fails (a timeout included)
/// loses nothing, the next one carries on. The peer's `close_notify`, or
/// the connection closing between two records, reads as the end of the
/// stream; anything else that is not application data is an error naming
/// it.
pub struct TlsReader<R> {
    input: R,
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    buf: Box<[u8]>,
    /// Unread bytes from the socket are `buf[head..tail]`.
    head: usize,
    tail: usize,
    /// Plaintext of the current record not handed out yet.
    plain: std::ops::Range<usize>,
    /// The stream ended (close_notify or EOF at a record boundary).
    end: Option<()>,
}

impl<R> TlsReader<R> {
    pub fn get_ref(&self) -> &R {
        &self.input
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<R: Read> TlsReader<R> {
    /// Opens the record at `buf[head..]` if it is all there: Ok(true) when
    /// one was taken (its plaintext, possibly empty, in `plain`).
    fn open_record(&mut self) -> io::Result<bool> {
        let have = &self.buf[self.head..self.tail];
        if have.len() < HEADER_LEN {
            return Ok(false);
        }
        let (ty, version, len) = (
            have[0],
            u16::from_be_bytes([have[1], have[2]]),
            u16::from_be_bytes([have[3], have[4]]) as usize,
        );
        if ty != APPLICATION_DATA || version != 0x0303 {
            return Err(bad(format!(
                "TLS: record {} has type {ty} and version {version:#06x}; after the handshake only application data (23, 0x0303) may come",
                self.seq
            )));
        }
        if len > MAX_CIPHERTEXT {
            return Err(bad(format!(
                "TLS: record {} is {len} bytes long, more than {MAX_CIPHERTEXT}",
                self.seq
            )));
        }
        if have.len() < HEADER_LEN + len {
            return Ok(false);
        }
        let start = self.head + HEADER_LEN;
        let seq = self.seq;
        let body = &mut self.buf[start..start + len];
        let base = body.as_ptr() as usize;
        let msg =
            InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, body);
        let plain = self.dec.decrypt(msg, seq).map_err(|e| {
            bad(format!(
                "TLS: record {seq} does not open with this session's key ({e}): forged, damaged or out of order"
            ))
        })?;
        let (typ, off, n) = (
            plain.typ,
            plain.payload.as_ptr() as usize - base,
            plain.payload.len(),
        );
        self.seq += 1;
        self.head = start + len;
        match typ {
            ContentType::ApplicationData => self.plain = start + off..start + off + n,
            ContentType::Alert => {
                let body = &self.buf[start + off..start + off + n];
                let desc = (n == 2).then(|| AlertDescription::from(body[1]));
                if desc == Some(AlertDescription::CloseNotify) {
                    self.end = Some(());
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("TLS: the peer sent alert {desc:?}"),
                    ));
                }
            }
            other => {
                return Err(bad(format!(
                    "TLS: record {seq} holds a {other:?} message after the handshake (key updates and session tickets are not used here)"
                )))
            }
        }
        Ok(true)
    }
}

impl<R: Read> Read for TlsReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.plain.is_empty() {
            if self.end.is_some() {
                return Ok(0);
            }
            if self.open_record()? {
                continue;
            }
            // Room for a whole record after what is here: move the partial
            // record to the front once the buffer's end is near.
            if self.buf.len() - self.head < HEADER_LEN + MAX_CIPHERTEXT {
                self.buf.copy_within(self.head..self.tail, 0);
                self.tail -= self.head;
                self.head = 0;
            }
            let n = self.input.read(&mut self.buf[self.tail..])?;
            if n == 0 {
                if self.head == self.tail {
                    self.end = Some(());
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "TLS: the connection closed inside record {} ({} bytes of it came)",
                        self.seq,
                        self.tail - self.head
                    ),
                ));
            }
            self.tail += n;
        }
        let n = out.len().min(self.plain.len());
        out[..n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
        self.plain.start += n;
        Ok(n)
    }
}

/// What a process reads a connection through: the socket itself (plain
/// TCP) or a session's receiving half.
pub enum RecvHalf {
    Plain(TcpStream),
    Tls(TlsReader<TcpStream>),
}

/// What a process writes a connection through.
pub enum SendHalf {
    Plain(TcpStream),
    Tls(TlsWriter<TcpStream>),
}

impl RecvHalf {
    /// Reads `stream` through `session`'s receiving half, or as it is.
    pub fn new(stream: TcpStream, session: Option<&Session>) -> Result<Self, TlsError> {
        Ok(match session {
            Some(s) => RecvHalf::Tls(s.reader(stream)?),
            None => RecvHalf::Plain(stream),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        match self {
            RecvHalf::Plain(s) => s,
            RecvHalf::Tls(r) => r.get_ref(),
        }
    }
}

impl SendHalf {
    /// Writes `stream` through `session`'s sending half, or as it is.
    pub fn new(stream: TcpStream, session: Option<&Session>) -> Result<Self, TlsError> {
        Ok(match session {
            Some(s) => SendHalf::Tls(s.writer(stream)?),
            None => SendHalf::Plain(stream),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        match self {
            SendHalf::Plain(s) => s,
            SendHalf::Tls(w) => w.get_ref(),
        }
    }
}

impl Read for RecvHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RecvHalf::Plain(s) => s.read(buf),
            RecvHalf::Tls(r) => r.read(buf),
        }
    }
}

impl Write for SendHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SendHalf::Plain(s) => s.write(buf),
            SendHalf::Tls(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SendHalf::Plain(s) => s.flush(),
            SendHalf::Tls(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(suite: CipherSuite) -> Session {
        let k = |seq, b| Keys {
            seq,
            key: [b; 32],
            iv: [b ^ 0x5a; 12],
        };
        Session {
            suite: u16::from(suite),
            tx: k(3, 1),
            rx: k(3, 1),
        }
    }

    /// What one side seals the other opens, across record and write
    /// boundaries, for both suites; a trickling socket loses nothing.
    #[test]
    fn records_round_trip() {
        for suite in [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let s = session(suite);
            let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut w = s.writer(Vec::new()).unwrap();
            w.write_all(&data[..5]).unwrap();
            w.write_all(&data[5..]).unwrap();
            let wire = w.out.clone();
            assert!(wire.len() > data.len());
            struct Trickle(Vec<u8>, usize);
            impl Read for Trickle {
                fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                    let n = b.len().min(7).min(self.0.len() - self.1);
                    b[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                    self.1 += n;
                    Ok(n)
                }
            }
            let mut r = s.reader(Trickle(wire, 0)).unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    /// A flipped bit, a record out of order and a record of the wrong type
    /// are each refused by name.
    #[test]
    fn tampering_is_refused() {
        let s = session(CipherSuite::TLS13_AES_256_GCM_SHA384);
        let mut w = s.writer(Vec::new()).unwrap();
        w.write_all(b"first").unwrap();
        w.write_all(b"second").unwrap();
        let wire = w.out.clone();
        let first_len = HEADER_LEN + u16::from_be_bytes([wire[3], wire[4]]) as usize;

        let mut flipped = wire.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        let e = s
            .reader(&flipped[..])
            .unwrap()
            .read(&mut [0; 16])
            .unwrap_err();
        assert!(e.to_string().contains("does not open"), "{e}");

        let swapped = [&wire[first_len..], &wire[..first_len]].concat();
        let e = s
            .reader(&swapped[..])
            .unwrap()
            .read(&mut [0; 16])
            .unwrap_err();
        assert!(e.to_string().contains("record 3 does not open"), "{e}");

        let mut handshake = wire.clone();
        handshake[0] = 22;
        let e = s
            .reader(&handshake[..])
            .unwrap()
            .read(&mut [0; 16])
            .unwrap_err();
        assert!(e.to_string().contains("type 22"), "{e}");

        // A stream cut inside a record is not a clean end.
        let e = s
            .reader(&wire[..first_len - 1])
            .unwrap()
            .read(&mut [0; 16])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    /// The writer stops at its suite's confidentiality limit.
    #[test]
    fn confidentiality_limit_stops_the_writer() {
        let mut s = session(CipherSuite::TLS13_AES_256_GCM_SHA384);
        s.tx.seq = 1 << 24;
        let mut w = s.writer(Vec::new()).unwrap();
        let e = w.write(b"x").unwrap_err();
        assert!(e.to_string().contains("confidentiality limit"), "{e}");
        assert!(w.write(b"x").is_err());
    }
}
