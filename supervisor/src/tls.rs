//! Mutual TLS 1.3 between the hosts (`--tls-cert/--tls-key/--tls-ca`;
//! docs/security.md, "Between the hosts"). The supervisor runs every
//! handshake with rustls: each side presents its certificate and accepts
//! only a peer whose certificate chains to the CA (the source also checks
//! the destination's name, the host of `--to` or `--tls-hostname`). Only
//! then is the hello said, inside the session. Once a connection's hello
//! is accepted, its peer's certificate is the migration's: every later
//! connection must present the very same one.
//!
//! Records are read from the socket one whole record at a time and never a
//! byte beyond, so that when the hello is done the session's keys
//! ([`common::tls::Session`]) and the untouched socket can go to the
//! process that will use the connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::tls::{Session, HEADER_LEN, MAX_CIPHERTEXT};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig,
    ServerConnection,
};

/// Where a host's TLS identity comes from: PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// This host's certificate, then any intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA (one or more certificates) a peer's certificate must chain to.
    pub ca: PathBuf,
}

/// A host's TLS identity and what it accepts of a peer, for one migration.
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The name the destination's certificate must carry, when it is not
    /// the host of `--to`.
    hostname: Option<String>,
    /// The certificate of the peer whose hello was accepted first.
    peer: Mutex<Option<CertificateDer<'static>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

fn certs(flag: &str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, String> {
    let list = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if list.is_empty() {
        return Err(format!(
            "{flag} {}: holds no PEM certificate",
            path.display()
        ));
    }
    Ok(list)
}

impl Tls {
    /// Loads `files`. Errors name the option, the file and what is wrong
    /// with it (unreadable, no PEM item, a key that does not match the
    /// certificate, a CA certificate rustls cannot use).
    pub fn load(files: &TlsFiles, hostname: Option<String>) -> Result<Tls, String> {
        let chain = certs("--tls-cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
        let mut roots = RootCertStore::empty();
        for c in certs("--tls-ca", &files.ca)? {
            roots
                .add(c)
                .map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
        }
        let roots = Arc::new(roots);
        let provider = common::tls::provider();
        let pair = |e: rustls::Error| {
            format!(
                "--tls-cert {} with --tls-key {}: {e}",
                files.cert.display(),
                files.key.display()
            )
        };
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(pair)?;
        client.enable_secret_extraction = true;
        client.resumption = Resumption::disabled();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| format!("--tls-ca {}: {e}", files.ca.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(pair)?;
        server.enable_secret_extraction = true;
        // A session ticket would be a record after the handshake that the
        // role taking the socket over would have to read; nothing resumes.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        if let Some(h) = &hostname {
            ServerName::try_from(h.as_str()).map_err(|e| format!("--tls-hostname {h:?}: {e}"))?;
        }
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            hostname,
            peer: Mutex::new(None),
        })
    }

    /// The destination's name to check, from `addr` (HOST:PORT, `[V6]:PORT`)
    /// unless `--tls-hostname` gave one.
    fn server_name(&self, addr: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.hostname {
            Some(h) => h.as_str(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                host.trim_start_matches('[').trim_end_matches(']')
            }
        };
        ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
    }

    /// Refuses a peer whose certificate is not the migration's.
    fn check_peer(&self, conn: &Connection) -> Result<(), String> {
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("the peer presented no certificate")?;
        match &*self.peer.lock().expect("peer lock") {
            Some(b) if b != cert => Err(format!(
                "the peer's certificate (SHA-256 {}) is not the one this migration's first connection presented (SHA-256 {}): refused",
                fingerprint(cert),
                fingerprint(b)
            )),
            _ => Ok(()),
        }
    }

    /// Makes the peer of `conn` the migration's, if none is yet.
    fn bind_peer(&self, conn: &Connection) {
        let mut bound = self.peer.lock().expect("peer lock");
        if bound.is_none() {
            if let Some(c) = conn.peer_certificates().and_then(|c| c.first()) {
                log::info!("TLS peer: certificate SHA-256 {}", fingerprint(c));
                *bound = Some(c.clone().into_owned());
            }
        }
    }

    /// Client side, on a connected blocking socket (its read timeout bounds
    /// each wait): the handshake with the destination at `addr`, then
    /// `hello` inside the session. Returns the session for whoever takes
    /// the socket. Nothing of `hello` is sent unless the destination's
    /// certificate was accepted.
    pub fn connect<E: From<io::Error>>(
        &self,
        sock: &mut TcpStream,
        addr: &str,
        hello: impl FnOnce(&mut InSession<'_>) -> Result<(), E>,
    ) -> Result<Session, ConnectError<E>> {
        let name = self.server_name(addr).map_err(ConnectError::Tls)?;
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut conn = Connection::Client(conn);
        let mut rec = RecordIn::default();
        while conn.is_handshaking() {
            match pump(&mut conn, sock, &mut rec) {
                Ok(()) => {}
                Err(Pump::Io(e)) if is_wait(&e) => {
                    return Err(ConnectError::Tls(
                        "the destination did not finish the TLS handshake in time".into(),
                    ))
                }
                Err(p) => return Err(ConnectError::Tls(p.to_string())),
            }
        }
        self.check_peer(&conn).map_err(ConnectError::Tls)?;
        let mut s = InSession {
            conn: &mut conn,
            sock,
            rec: &mut rec,
        };
        s.flush().map_err(|e| ConnectError::Tls(e.to_string()))?;
        hello(&mut s).map_err(ConnectError::Hello)?;
        self.bind_peer(&conn);
        finish(conn).map_err(ConnectError::Tls)
    }
}

/// What went wrong in [`Tls::connect`]: the TLS part (named), or the hello.
#[derive(Debug)]
pub enum ConnectError<E> {
    Tls(String),
    Hello(E),
}

/// SHA-256 of a certificate, hex, for logs and errors.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let sha256 = common::tls::suites()
        .into_iter()
        .find(|s| s.suite() == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        .and_then(|s| s.tls13())
        .expect("ChaCha20 suite is offered")
        .common
        .hash_provider;
    sha256
        .hash(cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One TLS record read whole from a socket, never a byte more; partial
/// reads (a nonblocking socket) carry on at the next call.
#[derive(Default)]
pub struct RecordIn {
    buf: Vec<u8>,
    got: usize,
}

impl RecordIn {
    /// Reads towards the next record: Ok(true) when `self.record()` holds
    /// it whole. A socket with nothing more gives its WouldBlock (or
    /// timeout) error; the end of the stream is UnexpectedEof.
    fn read_from(&mut self, sock: &mut impl Read) -> io::Result<bool> {
        if self.buf.len() < HEADER_LEN {
            self.buf.resize(HEADER_LEN, 0);
        }
        loop {
            let want = if self.got < HEADER_LEN {
                HEADER_LEN
            } else {
                let (ty, len) = (
                    self.buf[0],
                    u16::from_be_bytes([self.buf[3], self.buf[4]]) as usize,
                );
                if !(20..=23).contains(&ty) || self.buf[1] != 3 || len > MAX_CIPHERTEXT {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the peer does not speak TLS (its bytes {:02x?} are no TLS record header)",
                            &self.buf[..HEADER_LEN]
                        ),
                    ));
                }
                HEADER_LEN + len
            };
            if self.got == want && want > HEADER_LEN {
                return Ok(true);
            }
            self.buf.resize(want.max(HEADER_LEN + 1), 0);
            let n = sock.read(&mut self.buf[self.got..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            self.got += n;
        }
    }

    /// The whole record; the next read starts a new one.
    fn take(&mut self) -> Vec<u8> {
        let len = self.got;
        self.got = 0;
        let mut rec = std::mem::take(&mut self.buf);
        rec.truncate(len);
        rec
    }
}

/// Why a step of a handshake stopped.
#[derive(Debug)]
enum Pump {
    /// The socket: WouldBlock or a timeout means "call again".
    Io(io::Error),
    /// rustls refused what the peer sent (the alert is on its way).
    Tls(rustls::Error),
}

impl std::fmt::Display for Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pump::Io(e) => write!(f, "TLS handshake: {e}"),
            Pump::Tls(e) => f.write_str(&describe(e)),
        }
    }
}

fn is_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// An operator's reading of a rustls error: which side refused what.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => {
            format!("TLS: the peer's certificate is not acceptable: {c:?} ({e})")
        }
        E::NoCertificatesPresented => "TLS: the peer presented no certificate".into(),
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied),
        ) => format!("TLS: the peer refused our certificate (alert {a:?})"),
        E::AlertReceived(a) => format!("TLS: the peer ended the handshake (alert {a:?})"),
        E::PeerIncompatible(p) => format!("TLS: the peer cannot do TLS 1.3 as required: {p:?}"),
        other => format!("TLS: {other}"),
    }
}

/// One step: sends what rustls has for the peer, then reads one more
/// record and hands it to rustls.
fn pump(conn: &mut Connection, sock: &mut TcpStream, rec: &mut RecordIn) -> Result<(), Pump> {
    while conn.wants_write() {
        conn.write_tls(sock).map_err(Pump::Io)?;
    }
    if !rec.read_from(sock).map_err(Pump::Io)? {
        return Ok(());
    }
    let record = rec.take();
    let mut at = &record[..];
    while !at.is_empty() {
        conn.read_tls(&mut at).map_err(Pump::Io)?;
    }
    if let Err(e) = conn.process_new_packets() {
        // Tell the peer why (best effort: it may be gone).
        let _ = conn.write_tls(sock);
        return Err(Pump::Tls(e));
    }
    Ok(())
}

/// The session of a finished handshake whose hello is done: what the peer
/// sent is all read (a byte more would be lost to the next holder).
fn finish(mut conn: Connection) -> Result<Session, String> {
    match conn.reader().read(&mut [0u8; 1]) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(0) => return Err("TLS: the peer closed the session after its hello".into()),
        Ok(_) => {
            return Err("TLS: the peer sent more than its hello before hearing the answer".into())
        }
        Err(e) => return Err(format!("TLS: {e}")),
    }
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or("TLS: no cipher suite after the handshake")?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| format!("TLS: cannot take over the session: {e}"))?;
    Session::new(suite, secrets).map_err(|e| e.to_string())
}

/// A session during its hello, as a stream: writes are sealed and sent at
/// once (flush), reads wait for the peer's records (the socket's timeout
/// bounds each wait).
pub struct InSession<'a> {
    conn: &'a mut Connection,
    sock: &'a mut TcpStream,
    rec: &'a mut RecordIn,
}

impl Read for InSession<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            match pump(self.conn, self.sock, self.rec) {
                Ok(()) => {}
                Err(Pump::Io(e)) => return Err(e),
                Err(p) => return Err(io::Error::new(io::ErrorKind::InvalidData, p.to_string())),
            }
        }
    }
}

impl Write for InSession<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock)?;
        }
        Ok(())
    }
}

/// The server side of one accepted connection on a nonblocking socket:
/// the handshake, then the hello, moved on as far as the peer has sent.
pub struct ServerHandshake {
    tls: Arc<Tls>,
    conn: Connection,
    rec: RecordIn,
}

/// Where [`ServerHandshake::advance`] stopped.
pub enum Advance {
    /// `hello` is full: judge it, answer through [`ServerHandshake::session`].
    Hello,
    /// The peer has to send more.
    Wait,
    /// Refused, with the reason to log.
    Refused(String),
}

impl ServerHandshake {
    pub fn new(tls: Arc<Tls>) -> Result<Self, String> {
        let conn = ServerConnection::new(tls.server.clone()).map_err(|e| describe(&e))?;
        Ok(ServerHandshake {
            tls,
            conn: Connection::Server(conn),
            rec: RecordIn::default(),
        })
    }

    /// Moves on until `hello[..*got]` is full or the peer has to send
    /// more. No byte of the hello is read before the handshake, and with
    /// it the peer's certificate, was accepted.
    pub fn advance(&mut self, sock: &mut TcpStream, hello: &mut [u8], got: &mut usize) -> Advance {
        loop {
            if !self.conn.is_handshaking() {
                if let Err(why) = self.tls.check_peer(&self.conn) {
                    return Advance::Refused(why);
                }
                match self.conn.reader().read(&mut hello[*got..]) {
                    Ok(0) => {
                        return Advance::Refused(
                            "the peer closed the session before its hello".into(),
                        )
                    }
                    Ok(n) => {
                        *got += n;
                        if *got == hello.len() {
                            return Advance::Hello;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Advance::Refused(format!("TLS: {e}")),
                }
            }
            match pump(&mut self.conn, sock, &mut self.rec) {
                Ok(()) => {}
                Err(Pump::Io(e)) if is_wait(&e) => return Advance::Wait,
                Err(p) => return Advance::Refused(p.to_string()),
            }
        }
    }

    /// Part of the handshake is still to be sent (the socket was full).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The reply goes through here.
    pub fn writer<'a>(&'a mut self, sock: &'a mut TcpStream) -> InSession<'a> {
        InSession {
            conn: &mut self.conn,
            sock,
            rec: &mut self.rec,
        }
    }

    /// The hello was accepted: its peer is the migration's (if none was
    /// yet), and the session goes to whoever takes the socket.
    pub fn session(self) -> Result<Session, String> {
        self.tls.bind_peer(&self.conn);
        finish(self.conn)
    }
}
