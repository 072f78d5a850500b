//! The control socket of both supervisors (schema: docs/control.md): JSON
//! lines over a Unix socket, for orchestrators and for the `postcopy
//! status | watch | start-postcopy | cancel | pause | recover | set | retry`
//! clients. The requests are QEMU's QMP migration commands under our names.
//!
//! Every client has a thread of its own, and the socket never waits on the
//! supervisor's event loop: the driver publishes its state, what each
//! command can do now and its figures ([`Status`]) after every change, and
//! the client threads answer `query` from that and check a command against
//! it before handing it over as [`Event::Command`]. A client that hangs,
//! never reads or sends garbage costs its own thread and nothing else.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::control::PostcopyMode;
use serde::Serialize;
use serde_json::{json, Value};

use crate::events::Event;
use crate::report::ReportEvent;

/// Where control sockets live when `--control` does not say.
pub const SOCKET_DIR: &str = "/run/postcopy";

/// Longest request line, bytes; a longer one closes the connection.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Clients connected at once; the next one is told so and closed.
pub const MAX_CLIENTS: usize = 32;
/// A client that does not take a reply or an event within this is
/// dropped (a subscriber that never reads).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that has not subscribed and says nothing for this long is
/// closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client waits for the supervisor to take a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept for subscribers that fall behind (older ones are dropped,
/// and the subscriber is told how many it missed).
const MAX_EVENTS_KEPT: usize = 4096;

/// A command for the event loop, checked against [`Allowed`] first.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// QMP `migrate-start-postcopy`.
    StartPostcopy,
    /// QMP `migrate_cancel`.
    Cancel,
    /// QMP `migrate-pause`: drop the link in postcopy; `recover` resumes.
    Pause,
    /// QMP `migrate-recover`: reconnect now, optionally to a new address.
    Recover(Option<String>),
    /// QMP `migrate-set-parameters`, one parameter.
    Set(Setting),
    /// After a cancel or a failure that left the source guest running
    /// (`--keep-guest`): migrate it again, optionally to a new address.
    Retry(Option<String>),
    /// End a supervisor kept alive by `--keep-guest`.
    Quit,
}

/// A parameter `set` changes while the migration runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// Precopy cap, bytes/s (0 = unlimited).
    MaxBandwidth(u64),
    /// Postcopy push cap, bytes/s (0 = unlimited; requested pages are never
    /// paced).
    MaxPostcopyBandwidth(u64),
    /// The pause the policy may plan for, ms.
    DowntimeLimit(u64),
    /// The postcopy policy: `auto` or `manual` (or `never` before the
    /// switch).
    Postcopy(PostcopyMode),
}

impl Setting {
    /// The key as the report and `set` name it.
    pub fn key(&self) -> &'static str {
        match self {
            Setting::MaxBandwidth(_) => "max-bandwidth",
            Setting::MaxPostcopyBandwidth(_) => "max-postcopy-bandwidth",
            Setting::DowntimeLimit(_) => "downtime-limit",
            Setting::Postcopy(_) => "postcopy",
        }
    }

    /// Parses `set KEY VALUE`; VALUE is a JSON number or a string such as
    /// `64M`, `300` (ms for downtime-limit), `manual`.
    pub fn parse(key: &str, value: &Value) -> Result<Setting, String> {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(format!(
                    "the value of {key} must be a number or a string, not {other}"
                ))
            }
        };
        let size = |t: &str| crate::cli::bandwidth_arg(t).map_err(|e| format!("{key}: {e}"));
        match key {
            "max-bandwidth" => Ok(Setting::MaxBandwidth(size(&text)?)),
            "max-postcopy-bandwidth" => Ok(Setting::MaxPostcopyBandwidth(size(&text)?)),
            "downtime-limit" => {
                let ms = text.trim_end_matches("ms").trim();
                match ms.parse::<u64>() {
                    Ok(v) if (1..=600_000).contains(&v) => Ok(Setting::DowntimeLimit(v)),
                    _ => Err(format!(
                        "downtime-limit is milliseconds from 1 to 600000, not {text:?}"
                    )),
                }
            }
            "postcopy" => match text.as_str() {
                "auto" => Ok(Setting::Postcopy(PostcopyMode::Auto)),
                "manual" => Ok(Setting::Postcopy(PostcopyMode::Manual)),
                "never" => Ok(Setting::Postcopy(PostcopyMode::Never)),
                _ => Err(format!("postcopy is auto, manual or never, not {text:?}")),
            },
            _ => Err(format!(
                "unknown parameter {key:?} (known: max-bandwidth, max-postcopy-bandwidth, downtime-limit, postcopy)"
            )),
        }
    }
}

/// What each command can do now: `Ok` or why not. The drivers fill it
/// from their state after every change.
#[derive(Debug, Clone, Serialize)]
pub struct Allowed {
    #[serde(serialize_with = "as_why")]
    pub start_postcopy: Result<(), String>,
    #[serde(serialize_with = "as_why")]
    pub cancel: Result<(), String>,
    #[serde(serialize_with = "as_why")]
    pub pause: Result<(), String>,
    #[serde(serialize_with = "as_why")]
    pub recover: Result<(), String>,
    #[serde(serialize_with = "as_why")]
    pub set: Result<(), String>,
    #[serde(serialize_with = "as_why")]
    pub retry: Result<(), String>,
}

fn as_why<S: serde::Serializer>(r: &Result<(), String>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Ok(()) => s.serialize_bool(true),
        Err(why) => s.serialize_str(why),
    }
}

impl Allowed {
    /// Nothing applies, for the same reason.
    pub fn none(why: &str) -> Self {
        let no = || Err(why.to_string());
        Allowed {
            start_postcopy: no(),
            cancel: no(),
            pause: no(),
            recover: no(),
            set: no(),
            retry: no(),
        }
    }

    fn check(&self, cmd: &Command) -> Result<(), String> {
        match cmd {
            Command::StartPostcopy => self.start_postcopy.clone(),
            Command::Cancel => self.cancel.clone(),
            Command::Pause => self.pause.clone(),
            Command::Recover(_) => self.recover.clone(),
            Command::Set(_) => self.set.clone(),
            Command::Retry(_) | Command::Quit => self.retry.clone(),
        }
    }
}

/// What `query` answers: published by the driver after every change.
#[derive(Debug, Clone)]
pub struct Status {
    /// The supervisor's detailed state (docs/state-machine.md).
    pub state: &'static str,
    pub allowed: Allowed,
    /// The report so far, with the report's field names; its `status` is
    /// the coarse migration state while the migration runs.
    pub figures: Value,
}

struct Board {
    status: Value,
    allowed: Allowed,
    /// Events in order; `first` is the sequence number of `events[0]`.
    events: VecDeque<Value>,
    first: u64,
    /// Set when the socket closes: subscribers end.
    closed: bool,
}

struct Shared {
    side: &'static str,
    /// The supervisor's start: `query`'s `elapsed_ms` counts from it.
    started: Instant,
    board: Mutex<Board>,
    changed: Condvar,
    clients: AtomicUsize,
    /// Writes owed before the process may end: replies to commands handed
    /// to the driver, and event threads yet to send `closed`.
    owed: AtomicUsize,
}

/// Counts one write owed in [`Shared::owed`] while it lives.
struct Owed(Arc<Shared>);

impl Owed {
    fn new(sh: &Arc<Shared>) -> Self {
        sh.owed.fetch_add(1, Ordering::AcqRel);
        Owed(sh.clone())
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        self.0.owed.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The listening control socket; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Report events published so far.
    published: usize,
}

impl ControlSocket {
    /// Listens on `path` (default: `/run/postcopy/<side>-<pid>.sock`).
    /// Commands that pass the published [`Allowed`] go to `events`.
    pub fn bind(
        path: Option<PathBuf>,
        side: &'static str,
        started: Instant,
        events: Sender<Event>,
    ) -> std::io::Result<Self> {
        let path = match path {
            Some(p) => p,
            None => {
                std::fs::create_dir_all(SOCKET_DIR)?;
                let name = if side == "source" {
                    "migrate"
                } else {
                    "incoming"
                };
                Path::new(SOCKET_DIR).join(format!("{name}-{}.sock", std::process::id()))
            }
        };
        // Replace a stale socket, never anything else.
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                )));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(std::io::Error::other(format!(
                    "{} is in use by another migration",
                    path.display()
                )));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        let shared = Arc::new(Shared {
            side,
            started,
            board: Mutex::new(Board {
                status: json!({"side": side, "state": "starting"}),
                allowed: Allowed::none("the migration is starting"),
                events: VecDeque::new(),
                first: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            clients: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.board.lock().expect("board").closed {
                        break;
                    }
                    let conn = match conn {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of fds, say: the connection stays queued;
                            // do not spin on it.
                            log::warn!("control socket: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let n = sh.clients.fetch_add(1, Ordering::AcqRel);
                    if n >= MAX_CLIENTS {
                        sh.clients.fetch_sub(1, Ordering::AcqRel);
                        conn.set_write_timeout(Some(WRITE_TIMEOUT)).ok();
                        let _ = (&conn).write_all(
                            reply_err(
                                &Value::Null,
                                &format!("too many clients (at most {MAX_CLIENTS})"),
                            )
                            .as_bytes(),
                        );
                        continue;
                    }
                    let (sh, tx) = (sh.clone(), events.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            serve(&conn, &sh, &tx);
                            sh.clients.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        log::warn!("control socket: no thread for a client");
                    }
                }
            })?;
        Ok(ControlSocket {
            path,
            shared,
            published: 0,
        })
    }

    /// [`ControlSocket::bind`], logging where it listens, or why there is
    /// none (the migration then runs without one).
    pub fn open(
        path: Option<PathBuf>,
        side: &'static str,
        started: Instant,
        events: Sender<Event>,
    ) -> Option<Self> {
        match Self::bind(path, side, started, events) {
            Ok(c) => {
                log::info!("control socket {}", c.path().display());
                Some(c)
            }
            Err(e) => {
                log::warn!("no control socket ({e})");
                None
            }
        }
    }

    /// Publishes the driver's state (what `query` answers and what the
    /// commands are checked against), and every report event not
    /// published yet (each state change, restart, pause, ...).
    pub fn update(&mut self, status: Status, events: &[ReportEvent]) {
        let mut b = self.shared.board.lock().expect("board");
        let mut st = status.figures;
        if let Value::Object(o) = &mut st {
            o.insert("state".into(), json!(status.state));
            o.insert("side".into(), json!(self.shared.side));
            o.insert("allowed".into(), json!(status.allowed));
            o.insert(
                "elapsed_ms".into(),
                json!(self.shared.started.elapsed().as_secs_f64() * 1e3),
            );
        }
        b.status = st;
        b.allowed = status.allowed;
        for e in events.iter().skip(self.published) {
            b.events.push_back(json!({
                "event": e.kind,
                "t_ms": e.t_ms,
                "side": self.shared.side,
                "detail": e.detail,
            }));
            if b.events.len() > MAX_EVENTS_KEPT {
                b.events.pop_front();
                b.first += 1;
            }
        }
        self.published = self.published.max(events.len());
        drop(b);
        self.shared.changed.notify_all();
    }

    /// A new attempt starts with a new report: its events are published
    /// from its first.
    pub fn new_report(&mut self) {
        self.published = 0;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    /// Closes the socket, and waits (at most a client's write timeout)
    /// until the answers owed are written: the answer to the command that
    /// ends the supervisor (`cancel`, `quit`) and each subscriber's
    /// `closed`, which the process ending right after would otherwise cut.
    fn drop(&mut self) {
        self.shared.board.lock().expect("board").closed = true;
        self.shared.changed.notify_all();
        let _ = std::fs::remove_file(&self.path);
        let t = Instant::now();
        while self.shared.owed.load(Ordering::Acquire) > 0 && t.elapsed() < WRITE_TIMEOUT {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn reply_ok(id: &Value, result: Value) -> String {
    let mut v = json!({"ok": true, "result": result});
    if !id.is_null() {
        v["id"] = id.clone();
    }
    format!("{v}\n")
}

fn reply_err(id: &Value, why: &str) -> String {
    let mut v = json!({"ok": false, "error": why});
    if !id.is_null() {
        v["id"] = id.clone();
    }
    format!("{v}\n")
}

/// One request, parsed.
#[derive(Debug, PartialEq)]
enum Request {
    Query,
    Subscribe,
    Do(Command),
}

/// Parses a request line: a JSON object `{"cmd": NAME, ...}` with an
/// optional `id` echoed in the reply, or for people at a terminal the bare
/// words `NAME [ARG...]`. Returns the id and the request, or the id and
/// what is wrong.
fn parse_request(line: &str) -> (Value, Result<Request, String>) {
    let line = line.trim();
    let (id, name, args): (Value, String, Value) = if line.starts_with('{') {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return (Value::Null, Err(format!("not a JSON request: {e}"))),
        };
        let id = v.get("id").cloned().unwrap_or(Value::Null);
        match v.get("cmd").and_then(Value::as_str) {
            Some(c) => (id, c.to_string(), v),
            None => return (id, Err("a request needs \"cmd\": a string".into())),
        }
    } else {
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or("").to_string();
        let rest: Vec<&str> = words.collect();
        let args = match (name.as_str(), rest.as_slice()) {
            ("set", [k, v]) => json!({"key": k, "value": v}),
            ("recover" | "retry", [to]) => json!({"to": to}),
            (_, []) => json!({}),
            _ => return (Value::Null, Err(format!("unexpected words after {name:?}"))),
        };
        (Value::Null, name, args)
    };
    let to = |args: &Value| -> Result<Option<String>, String> {
        match args.get("to") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.len() < 256 => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "\"to\" must be an address such as HOST:PORT, not {other}"
            )),
        }
    };
    let req = match name.as_str() {
        "query" => Ok(Request::Query),
        "subscribe" => Ok(Request::Subscribe),
        "start-postcopy" => Ok(Request::Do(Command::StartPostcopy)),
        "cancel" => Ok(Request::Do(Command::Cancel)),
        "pause" => Ok(Request::Do(Command::Pause)),
        "recover" => to(&args).map(|t| Request::Do(Command::Recover(t))),
        "retry" => to(&args).map(|t| Request::Do(Command::Retry(t))),
        "quit" => Ok(Request::Do(Command::Quit)),
        "set" => match (args.get("key").and_then(Value::as_str), args.get("value")) {
            (Some(k), Some(v)) => Setting::parse(k, v).map(|s| Request::Do(Command::Set(s))),
            _ => Err("set needs \"key\" (a string) and \"value\"".into()),
        },
        "" => Err("an empty request".into()),
        other => Err(format!(
            "unknown command {:?} (known: query, subscribe, start-postcopy, cancel, pause, recover, set, retry, quit)",
            common::peer_text::escape(other)
        )),
    };
    (id, req)
}

/// Reads one line of at most [`MAX_REQUEST_BYTES`]; `Ok(None)` at the end.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_REQUEST_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request longer than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// One client: requests in, replies out; after `subscribe`, a second
/// thread writes the events while requests are still answered.
fn serve(conn: &UnixStream, sh: &Arc<Shared>, tx: &Sender<Event>) {
    conn.set_write_timeout(Some(WRITE_TIMEOUT)).ok();
    conn.set_read_timeout(Some(IDLE_TIMEOUT)).ok();
    let Ok(writer) = conn.try_clone() else { return };
    let writer = Arc::new(Mutex::new(writer));
    let mut reader = BufReader::new(conn);
    // The event thread of a subscription, and what tells it the client
    // left: it must not outlive the client (each holds a thread and an fd
    // until the next event, and an idle supervisor may see none for hours).
    let mut events: Option<std::thread::JoinHandle<()>> = None;
    let gone = Arc::new(AtomicBool::new(false));
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    let _ = writer
                        .lock()
                        .expect("writer")
                        .write_all(reply_err(&Value::Null, &e.to_string()).as_bytes());
                }
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let (id, req) = parse_request(&line);
        // A command's answer is owed until written (see ControlSocket's drop).
        let _owed = matches!(req, Ok(Request::Do(_))).then(|| Owed::new(sh));
        let reply = match req {
            Err(why) => reply_err(&id, &why),
            Ok(Request::Query) => {
                let mut status = sh.board.lock().expect("board").status.clone();
                // Now, not when the driver last published (it does not
                // while it waits for connections or keeps a guest).
                if let Value::Object(o) = &mut status {
                    o.insert(
                        "elapsed_ms".into(),
                        json!(sh.started.elapsed().as_secs_f64() * 1e3),
                    );
                }
                reply_ok(&id, status)
            }
            Ok(Request::Subscribe) if events.is_some() => reply_err(&id, "already subscribed"),
            Ok(Request::Subscribe) => {
                let (sh, w, g) = (sh.clone(), writer.clone(), gone.clone());
                let from = sh.board.lock().expect("board").first;
                // Counted before the thread runs: a drop meanwhile waits.
                let owed = Owed::new(&sh);
                let spawned = std::thread::Builder::new()
                    .name("control-events".into())
                    .spawn(move || {
                        stream_events(&sh, &w, from, &g);
                        drop(owed);
                    });
                match spawned {
                    Ok(t) => {
                        events = Some(t);
                        // Subscribers may stay quiet for the whole migration.
                        conn.set_read_timeout(None).ok();
                        reply_ok(&id, json!({"subscribed": true}))
                    }
                    Err(e) => reply_err(&id, &format!("no thread for the events: {e}")),
                }
            }
            Ok(Request::Do(cmd)) => {
                let allowed = sh.board.lock().expect("board").allowed.check(&cmd);
                match allowed {
                    Err(why) => reply_err(&id, &why),
                    Ok(()) => {
                        let (answer, answered) = std::sync::mpsc::channel();
                        match tx.send(Event::Command(cmd, Some(answer))) {
                            Err(_) => reply_err(&id, "the migration has ended"),
                            Ok(()) => match answered.recv_timeout(ANSWER_TIMEOUT) {
                                Ok(Ok(())) => reply_ok(&id, json!({})),
                                Ok(Err(why)) => reply_err(&id, &why),
                                Err(_) => reply_err(
                                    &id,
                                    "the supervisor did not answer in time (busy or ending); the command may still take effect",
                                ),
                            },
                        }
                    }
                }
            }
        };
        if writer
            .lock()
            .expect("writer")
            .write_all(reply.as_bytes())
            .is_err()
        {
            break;
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    if let Some(t) = events {
        gone.store(true, Ordering::Release);
        // Under the lock: the event thread is either before its check of
        // `gone` or waiting, and then woken.
        drop(sh.board.lock().expect("board"));
        sh.changed.notify_all();
        let _ = t.join();
    }
}

/// Writes every event from sequence number `next` on, as they come, until
/// the socket closes, the client stops taking them or it left (`gone`).
fn stream_events(sh: &Shared, writer: &Mutex<UnixStream>, mut next: u64, gone: &AtomicBool) {
    loop {
        let (batch, missed, closed) = {
            let mut b = sh.board.lock().expect("board");
            while !b.closed && b.first + b.events.len() as u64 <= next {
                if gone.load(Ordering::Acquire) {
                    return;
                }
                b = sh
                    .changed
                    .wait_timeout(b, Duration::from_secs(1))
                    .expect("board")
                    .0;
            }
            let missed = b.first.saturating_sub(next);
            next = next.max(b.first);
            let skip = (next - b.first) as usize;
            let batch: Vec<Value> = b.events.iter().skip(skip).cloned().collect();
            next += batch.len() as u64;
            (batch, missed, b.closed)
        };
        let mut text = String::new();
        if missed > 0 {
            text.push_str(&format!(
                "{}\n",
                json!({"event": "missed", "side": sh.side, "detail": format!("{missed} events dropped: this client fell behind")})
            ));
        }
        for e in &batch {
            text.push_str(&format!("{e}\n"));
        }
        if closed {
            text.push_str(&format!(
                "{}\n",
                json!({"event": "closed", "side": sh.side})
            ));
        }
        let mut w = writer.lock().expect("writer");
        if w.write_all(text.as_bytes()).is_err() {
            // Never reads: dropped, the migration goes on.
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
        if closed {
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// Finds the control socket: `path`, or the only one of `side` ("source"
/// or "destination") running on this host; with no side, the only source,
/// else the only destination.
pub fn find(path: Option<&Path>, side: Option<&str>) -> Result<PathBuf, String> {
    if let Some(p) = path {
        return Ok(p.to_path_buf());
    }
    let live = |prefix: &str| -> Result<Vec<PathBuf>, String> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
            .map_err(|e| format!("no running migration found ({SOCKET_DIR}: {e})"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .filter(|p| match UnixStream::connect(p) {
                Ok(_) => true,
                Err(e) => {
                    // Left by a migration that was killed.
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        let _ = std::fs::remove_file(p);
                    }
                    false
                }
            })
            .collect();
        found.sort();
        Ok(found)
    };
    let mut found = match side {
        Some("destination") => live("incoming-")?,
        Some(_) => live("migrate-")?,
        None => match live("migrate-")? {
            f if f.is_empty() => live("incoming-")?,
            f => f,
        },
    };
    match found.len() {
        0 => Err(format!(
            "no running migration found in {SOCKET_DIR}{}",
            side.map(|s| format!(" (looked for a {s})"))
                .unwrap_or_default()
        )),
        1 => Ok(found.remove(0)),
        _ => Err(format!(
            "several migrations are running; pick one with --control: {}",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A connection to a control socket, for the CLI clients.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, String> {
        let conn = UnixStream::connect(path)
            .map_err(|e| format!("cannot reach {}: {e}", path.display()))?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
        conn.set_write_timeout(Some(Duration::from_secs(5))).ok();
        let writer = conn
            .try_clone()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(conn),
            writer,
        })
    }

    /// Sends one request and returns its result, or the socket's error.
    pub fn call(&mut self, request: Value) -> Result<Value, String> {
        let p = self.path.display().to_string();
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| format!("{p}: {e}"))?;
        loop {
            let v = self
                .next_line()?
                .ok_or_else(|| format!("{p} closed the connection"))?;
            if v.get("event").is_some() {
                continue; // an event of a subscription: not our answer
            }
            return match v.get("ok").and_then(Value::as_bool) {
                Some(true) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                _ => Err(v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("malformed reply")
                    .to_string()),
            };
        }
    }

    /// The next line from the socket (a reply or an event); `None` once it
    /// closed.
    pub fn next_line(&mut self) -> Result<Option<Value>, String> {
        let p = self.path.display().to_string();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| format!("{p}: a reply that is not JSON: {e}")),
            Err(e) => Err(format!("{p}: {e}")),
        }
    }

    /// For `watch`: waits for events without a deadline.
    pub fn wait_forever(&mut self) {
        self.reader.get_ref().set_read_timeout(None).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_json_and_as_words() {
        let (id, r) = parse_request(r#"{"cmd":"set","key":"max-bandwidth","value":"64M","id":7}"#);
        assert_eq!(id, json!(7));
        assert_eq!(
            r,
            Ok(Request::Do(Command::Set(Setting::MaxBandwidth(64 << 20))))
        );
        assert_eq!(
            parse_request("recover 10.0.0.2:4444").1,
            Ok(Request::Do(Command::Recover(Some("10.0.0.2:4444".into()))))
        );
        assert_eq!(parse_request("query").1, Ok(Request::Query));
        assert_eq!(
            parse_request("set downtime-limit 300").1,
            Ok(Request::Do(Command::Set(Setting::DowntimeLimit(300))))
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let why = |l: &str| parse_request(l).1.unwrap_err();
        assert!(why("{nope").contains("not a JSON request"));
        assert!(why(r#"{"id":1}"#).contains("needs \"cmd\""));
        assert!(why("frobnicate").contains("unknown command \"frobnicate\""));
        assert!(why("set max-bandwidth 10").contains("too slow"));
        assert!(why("set color red").contains("unknown parameter"));
        assert!(why("set postcopy sometimes").contains("auto, manual or never"));
        assert!(why(r#"{"cmd":"recover","to":5}"#).contains("\"to\""));
        assert!(why("cancel now please").contains("unexpected words"));
    }

    #[test]
    fn a_command_that_does_not_apply_is_refused_with_the_reason() {
        let mut a = Allowed::none("over");
        a.cancel = Err("the destination may hold the only live copy".into());
        assert_eq!(
            a.check(&Command::Cancel),
            Err("the destination may hold the only live copy".into())
        );
        a.start_postcopy = Ok(());
        assert_eq!(a.check(&Command::StartPostcopy), Ok(()));
    }

    #[test]
    fn a_long_line_is_refused() {
        let long = vec![b'a'; MAX_REQUEST_BYTES + 10];
        let mut r = BufReader::new(&long[..]);
        assert!(read_line(&mut r).is_err());
        let mut r = BufReader::new(&b"query\n"[..]);
        assert_eq!(read_line(&mut r).unwrap(), Some("query\n".into()));
    }
}
