//! The real `postcopy` against hostile peers of the test suite's own: fake
//! sources and destinations that speak the wire protocol by hand over raw
//! TCP and do what an honest peer never would (connect and say nothing,
//! keep only heartbeats coming, send setups and frames built to cost the
//! other end time and memory, put escape sequences in their text). Each
//! trial is one fault of issue 8; each asserts a clear error or a bounded
//! delay, and that the other end comes through unharmed. With TLS
//! (faults 1 and 2) the hostile peers speak TLS with rustls themselves,
//! holding no certificate, one of another CA, or an expired one.

use libtest_mimic::{Arguments, Failed, Trial};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::control::{recv_control, ControlMsg, PostcopyMode, SetupRequest, VerifyMethod};
use common::guest::{GuestConfig, GuestKind, Workload};
use common::types::{MemLayout, MigrationId, PAGE_SIZE};
use common::wire::{
    client_hello, frame_header, send_control, ConnKind, FrameReader, FrameType, HELLO_LEN,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use supervisor::pki::{TestCa, Validity};
use supervisor::tls::TlsFiles;
use tests::{check, free_port, postcopy, report, run, start, text, Running, TempDir};

type TestResult = Result<(), String>;

fn main() {
    let mut args = Arguments::from_args();
    // Migrations keep both CPUs busy, and the timing bounds below assume
    // nothing else runs.
    args.test_threads.get_or_insert(1);
    let t = |name: &'static str, f: fn() -> TestResult| {
        Trial::test(name, move || f().map_err(Failed::from))
    };
    let trials = vec![
        t(
            "idle_clients_do_not_delay_a_real_source",
            idle_clients_do_not_delay_a_real_source,
        ),
        t(
            "heartbeats_without_data_connections_release_the_destination",
            heartbeats_without_data_connections_release_the_destination,
        ),
        t(
            "heartbeats_without_pages_release_the_destination",
            heartbeats_without_pages_release_the_destination,
        ),
        t(
            "bad_bulk_stream_hellos_are_refused_and_the_migration_goes_on",
            bad_bulk_stream_hellos_are_refused_and_the_migration_goes_on,
        ),
        t(
            "destination_that_only_heartbeats_releases_the_source",
            destination_that_only_heartbeats_releases_the_source,
        ),
        t(
            "a_flood_of_unawaited_messages_is_refused",
            a_flood_of_unawaited_messages_is_refused,
        ),
        t("hostile_setups_are_refused", hostile_setups_are_refused),
        t(
            "peer_text_is_escaped_on_both_ends",
            peer_text_is_escaped_on_both_ends,
        ),
        t(
            "a_source_without_the_certificate_gets_nothing_accepted",
            a_source_without_the_certificate_gets_nothing_accepted,
        ),
        t(
            "a_destination_without_the_certificate_gets_no_page",
            a_destination_without_the_certificate_gets_no_page,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------- fixtures

/// `postcopy incoming` on 127.0.0.1:`port`, with a 3 s link timeout, its
/// report in `json`; returns once it listens.
fn incoming(port: u16, json: &Path) -> Result<Running, String> {
    let dest = start(
        postcopy()
            .args([
                "incoming",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--link-timeout",
                "3",
                "--accept-timeout",
                "60",
                "--json",
            ])
            .arg(json),
    );
    let t = Instant::now();
    // A probe that connects and closes: one more idle client, harmless.
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("incoming never listened".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(dest)
}

/// A fake source's (or destination's) control connection.
struct Peer {
    out: TcpStream,
    reader: FrameReader<TcpStream>,
    stop: Arc<AtomicBool>,
}

impl Peer {
    fn new(stream: TcpStream) -> Result<Peer, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let layout = MemLayout::new(PAGE_SIZE as u64).map_err(|e| e.to_string())?;
        let reader = FrameReader::new(
            stream.try_clone().map_err(|e| e.to_string())?,
            ConnKind::Control,
            layout,
        );
        Ok(Peer {
            out: stream,
            reader,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    fn send(&mut self, msg: &ControlMsg) -> TestResult {
        send_control(&mut self.out, msg).map_err(|e| format!("send {}: {e}", msg.name()))
    }

    /// The next message that is not a heartbeat.
    fn recv(&mut self) -> Result<ControlMsg, String> {
        loop {
            match recv_control(&mut self.reader) {
                Ok(ControlMsg::Heartbeat) => {}
                Ok(m) => return Ok(m),
                Err(e) => return Err(format!("control connection: {e}")),
            }
        }
    }

    /// A heartbeat every 300 ms until the peer goes away: a peer that is
    /// alive and says nothing else.
    fn keep_beating(&self) -> Result<(), String> {
        let mut out = self.out.try_clone().map_err(|e| e.to_string())?;
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if send_control(&mut out, &ControlMsg::Heartbeat).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn connect(port: u16, kind: ConnKind, id: MigrationId) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    client_hello(&mut s, kind, id).map_err(|e| format!("{kind} hello: {e}"))?;
    Ok(s)
}

/// A small, valid setup: 16 MiB idle process guest, precopy only.
fn setup(id: MigrationId) -> SetupRequest {
    SetupRequest {
        migration: id,
        guest: GuestConfig {
            kind: GuestKind::Process,
            mem_bytes: 16 << 20,
            vcpus: 1,
            workload: Workload::Idle,
            boot_sector: None,
        },
        page_size: PAGE_SIZE as u32,
        postcopy: PostcopyMode::Never,
        verify: VerifyMethod::None,
        verify_ranges: vec![],
        streams: 1,
    }
}

/// A fake source that got through setup: its control connection, heartbeats
/// running.
fn fake_source_after_setup(port: u16, id: MigrationId) -> Result<Peer, String> {
    let mut p = Peer::new(connect(port, ConnKind::Control, id)?)?;
    p.send(&ControlMsg::Setup(setup(id)))?;
    match p.recv()? {
        ControlMsg::SetupAccepted(_) => {}
        other => return Err(format!("expected SetupAccepted, got {other:?}")),
    }
    p.keep_beating()?;
    Ok(p)
}

/// The destination ended on its own, failed, in time, naming `needle`;
/// it started `roles` processes, and each of them exited cleanly.
fn failed_with(
    dest: Running,
    json: &Path,
    since: Instant,
    limit: Duration,
    needle: &str,
    roles: usize,
) -> TestResult {
    let out = dest.finish(Duration::from_secs(60))?;
    let took = since.elapsed();
    check(
        !out.status.success(),
        format!("the destination should fail\n{}", out.describe()),
    )?;
    check(
        took < limit,
        format!(
            "the destination took {took:?} (limit {limit:?}) to let go\n{}",
            out.describe()
        ),
    )?;
    let r = report(json)?;
    check(
        text(&r, "status") == "failed",
        format!("status {}", r["status"]),
    )?;
    let err = text(&r, "error");
    check(
        err.contains(needle),
        format!("error {err:?} lacks {needle:?}"),
    )?;
    // Every role it started was asked to quit and did: no crash, no kill.
    let list = r["roles"].as_array().cloned().unwrap_or_default();
    check(
        list.len() == roles,
        format!("{} processes, expected {roles}: {list:?}", list.len()),
    )?;
    for role in &list {
        check(
            role["exit"].is_u64(),
            format!("a role did not exit cleanly: {role}"),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------- fault 3

/// Two clients connect and say nothing; a real source must still get
/// through at once (hellos used to be read one at a time, 10 s each).
fn idle_clients_do_not_delay_a_real_source() -> TestResult {
    let port = free_port();
    let dir = TempDir::new("idle-clients");
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let dest = incoming(port, &dj)?;
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "16M",
                "--postcopy",
                "never",
                "--json",
            ])
            .arg(&sj),
        Duration::from_secs(60),
    )?;
    let r = report(&sj).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        out.status.success() && text(&r, "status") == "completed",
        format!("migrate failed\n{}\nreport: {r:#}", out.describe()),
    )?;
    let setup_ms = r["setup_time_ms"].as_f64().unwrap_or(f64::MAX);
    check(
        setup_ms < 3000.0,
        format!("setup took {setup_ms:.0} ms with two idle clients connected"),
    )?;
    let dout = dest.finish(Duration::from_secs(30))?;
    check(
        dout.status.success(),
        format!("destination failed\n{}", dout.describe()),
    )?;
    drop(idle);
    Ok(())
}

// ---------------------------------------------------------------- fault 4

/// A source that sets up and then only sends heartbeats, never opening the
/// data connections, holds the destination's one migration no longer than
/// the link timeout (3 s here).
fn heartbeats_without_data_connections_release_the_destination() -> TestResult {
    let port = free_port();
    let dir = TempDir::new("beats-no-data");
    let dj = dir.path("dst.json");
    let dest = incoming(port, &dj)?;
    let id = MigrationId([0x51; 16]);
    let _p = fake_source_after_setup(port, id)?;
    let t = Instant::now();
    // Only the guest runs: the fault-handler starts once its connections
    // are in.
    failed_with(dest, &dj, t, Duration::from_secs(10), "data connection", 1)
}

/// A source that sets up, opens all three data connections, and then only
/// sends heartbeats: no pages, no rounds. Dropped after the link timeout.
fn heartbeats_without_pages_release_the_destination() -> TestResult {
    let port = free_port();
    let dir = TempDir::new("beats-no-pages");
    let dj = dir.path("dst.json");
    let dest = incoming(port, &dj)?;
    let id = MigrationId([0x52; 16]);
    let _p = fake_source_after_setup(port, id)?;
    let _data: Vec<TcpStream> = [ConnKind::Main, ConnKind::ReturnPath, ConnKind::Urgent]
        .into_iter()
        .map(|k| connect(port, k, id))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    failed_with(
        dest,
        &dj,
        t,
        Duration::from_secs(10),
        "sent nothing on the main stream",
        2,
    )
}

/// A source that agreed on 2 bulk streams opens bulk-stream hellos that
/// do not fit: stream 5 (≥ N), stream 0 (the main stream's number, never a
/// bulk stream's), and stream 1 twice. Each is refused with status 5 and
/// logged; the destination keeps accepting, takes the real connections
/// and starts its fault-handler (which then, as no pages come, gives up on
/// the silent main stream).
fn bad_bulk_stream_hellos_are_refused_and_the_migration_goes_on() -> TestResult {
    let port = free_port();
    let dir = TempDir::new("bad-bulk");
    let dj = dir.path("dst.json");
    let dest = incoming(port, &dj)?;
    let id = MigrationId([0x53; 16]);
    let mut p = Peer::new(connect(port, ConnKind::Control, id)?)?;
    p.send(&ControlMsg::Setup(SetupRequest {
        streams: 2,
        ..setup(id)
    }))?;
    match p.recv()? {
        ControlMsg::SetupAccepted(_) => {}
        other => return Err(format!("expected SetupAccepted, got {other:?}")),
    }
    p.keep_beating()?;
    let refused = |r: Result<TcpStream, String>, what: &str| match r {
        Ok(_) => Err(format!("{what} was accepted")),
        Err(e) if e.contains("connection not expected now") => Ok(()),
        Err(e) => Err(format!("{what}: {e}")),
    };
    refused(connect(port, ConnKind::Bulk(5), id), "bulk stream 5 of 2")?;
    // Stream 0 cannot even be encoded as a bulk hello: write it raw.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let mut h = common::wire::Hello {
        kind: ConnKind::Bulk(1),
        migration: id,
    }
    .encode();
    h[7] = 0;
    raw.write_all(&h).map_err(|e| e.to_string())?;
    let mut reply = [0u8; 16];
    raw.read_exact(&mut reply).map_err(|e| e.to_string())?;
    check(reply[6] == 5, format!("bulk stream 0: status {}", reply[6]))?;
    let first = connect(port, ConnKind::Bulk(1), id)?;
    refused(
        connect(port, ConnKind::Bulk(1), id),
        "a second bulk stream 1",
    )?;
    let mut data: Vec<TcpStream> = [ConnKind::Main, ConnKind::ReturnPath, ConnKind::Urgent]
        .into_iter()
        .map(|k| connect(port, k, id))
        .collect::<Result<_, _>>()?;
    data.push(first);
    let out = dest.finish(Duration::from_secs(60))?;
    let log = out.describe();
    for needle in [
        "refused bulk-stream 5 connection",
        "bulk-stream hello names stream 0, outside 1..16",
        "refused bulk-stream 1 connection",
        "sent nothing on the main stream",
    ] {
        check(log.contains(needle), format!("no {needle:?} in\n{log}"))?;
    }
    let r = report(&dj)?;
    check(
        r["streams"].as_u64() == Some(2),
        format!("streams {}", r["streams"]),
    )?;
    // The fault-handler did start: the refusals did not end the migration.
    let roles = r["roles"].as_array().cloned().unwrap_or_default();
    check(
        roles.iter().any(|r| r["name"] == "fault-handler"),
        format!("no fault-handler: {roles:?}"),
    )
}

/// The other way round: a fake destination takes every page and the
/// package, says its guest runs, and then only sends heartbeats, never
/// `DestCompleted`. The source (its guest stopped, the destination's
/// claimed to run) gives up after one step timeout (60 s) instead of
/// waiting forever.
fn destination_that_only_heartbeats_releases_the_source() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let fake = std::thread::spawn(move || -> TestResult {
        let accept = || -> Result<(TcpStream, u8), String> {
            let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h).map_err(|e| e.to_string())?;
            common::wire::server_reply(&mut s, common::wire::HelloStatus::Ok)
                .map_err(|e| e.to_string())?;
            Ok((s, h[6]))
        };
        let (c, _) = accept()?;
        let mut p = Peer::new(c)?;
        let mem = match p.recv()? {
            ControlMsg::Setup(s) => s.guest.mem_bytes,
            other => return Err(format!("expected Setup, got {other:?}")),
        };
        p.send(&ControlMsg::SetupAccepted(common::control::SetupAccepted {
            postcopy_ready: false,
            uffd_features: 0,
        }))?;
        p.keep_beating()?;
        let mut data = Vec::new();
        for _ in 0..3 {
            data.push(accept()?);
        }
        let main = data
            .iter()
            .find(|(_, kind)| *kind == 2)
            .ok_or("no main stream")?
            .0
            .try_clone()
            .map_err(|e| e.to_string())?;
        let layout = MemLayout::new(mem).map_err(|e| e.to_string())?;
        let mut r = FrameReader::new(main, ConnKind::Main, layout);
        loop {
            match r.next_frame().map_err(|e| format!("main stream: {e}"))? {
                common::wire::Frame::Package(_) => p.send(&ControlMsg::DestRunning {
                    listen_us: 0,
                    start_us: 0,
                    discard_us: 0,
                })?,
                common::wire::Frame::Eos => break,
                _ => {}
            }
        }
        // Every page is here; say so never. Heartbeats go on until the
        // source hangs up.
        while p.recv().is_ok() {}
        Ok(())
    });
    let dir = TempDir::new("dest-beats");
    let sj = dir.path("src.json");
    let t = Instant::now();
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "16M",
                "--postcopy",
                "never",
                "--json",
            ])
            .arg(&sj),
        Duration::from_secs(120),
    )?;
    let took = t.elapsed();
    fake.join().map_err(|_| "fake destination panicked")??;
    check(
        !out.status.success(),
        format!("migrate should fail\n{}", out.describe()),
    )?;
    check(
        took < Duration::from_secs(90),
        format!("the source took {took:?} to give up"),
    )?;
    let r = report(&sj)?;
    check(
        text(&r, "status") == "failed",
        format!("status {}", r["status"]),
    )?;
    let err = text(&r, "error");
    check(
        err.contains("waiting for the destination to have every page"),
        format!("error {err:?}"),
    )
}

// ---------------------------------------------------------------- fault 5

/// Messages that nothing waits for are kept for later, but not without
/// bound: 5000 `Finish` (16 bytes each) right after setup end the migration
/// instead of growing the destination's memory.
fn a_flood_of_unawaited_messages_is_refused() -> TestResult {
    let port = free_port();
    let dir = TempDir::new("flood");
    let dj = dir.path("dst.json");
    let dest = incoming(port, &dj)?;
    let id = MigrationId([0x55; 16]);
    let mut p = fake_source_after_setup(port, id)?;
    let t = Instant::now();
    for _ in 0..5000 {
        if p.send(&ControlMsg::Finish).is_err() {
            break;
        }
    }
    failed_with(
        dest,
        &dj,
        t,
        Duration::from_secs(10),
        "more than 1024 control messages that nothing waits for",
        // Only the guest: the fault-handler starts with its connections.
        1,
    )
}

/// Setups built to cost the destination memory, and setup fields that do
/// not fit the guest kind: each refused at once with an error naming it,
/// before any guest or role starts.
fn hostile_setups_are_refused() -> TestResult {
    let id = MigrationId([0x53; 16]);
    // A boot sector for a process guest.
    {
        let port = free_port();
        let dir = TempDir::new("setup-boot-sector");
        let dj = dir.path("dst.json");
        let dest = incoming(port, &dj)?;
        let mut p = Peer::new(connect(port, ConnKind::Control, id)?)?;
        let mut s = setup(id);
        s.guest.boot_sector = Some(vec![0x90; 512]);
        p.send(&ControlMsg::Setup(s))?;
        let t = Instant::now();
        match p.recv()? {
            ControlMsg::SetupRefused { reason } => check(
                reason.contains("boot sector") && reason.contains("process"),
                format!("refusal {reason:?}"),
            )?,
            other => return Err(format!("expected SetupRefused, got {other:?}")),
        }
        failed_with(dest, &dj, t, Duration::from_secs(10), "boot sector", 0)?;
    }
    // 60 MiB of boot sector: refused by the frame header, not read.
    {
        let port = free_port();
        let dir = TempDir::new("setup-60m");
        let dj = dir.path("dst.json");
        let dest = incoming(port, &dj)?;
        let mut c = connect(port, ConnKind::Control, id)?;
        let mut s = setup(id);
        s.guest.boot_sector = Some(vec![0x90; 60 << 20]);
        let frame = common::wire::message_frame(FrameType::Control, &ControlMsg::Setup(s), "x");
        // Too large for the encoder now: write what an old encoder would.
        let len = 60u32 << 20;
        let t = Instant::now();
        let _ = c.write_all(&frame_header(FrameType::Control, len));
        let _ = c.write_all(&vec![0u8; 1 << 20]);
        check(
            frame.is_err(),
            "the encoder refuses a 60 MiB control message",
        )?;
        failed_with(
            dest,
            &dj,
            t,
            Duration::from_secs(10),
            "CONTROL frame has length",
            0,
        )?;
    }
    // 100 000 verify ranges: over the Setup size limit, refused before
    // decoding.
    {
        let port = free_port();
        let dir = TempDir::new("setup-ranges");
        let dj = dir.path("dst.json");
        let dest = incoming(port, &dj)?;
        let mut p = Peer::new(connect(port, ConnKind::Control, id)?)?;
        let mut s = setup(id);
        s.verify_ranges = vec![(0, 4096); 100_000];
        let t = Instant::now();
        p.send(&ControlMsg::Setup(s))?;
        failed_with(
            dest,
            &dj,
            t,
            Duration::from_secs(10),
            "larger than its limit of 65536 bytes",
            0,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------- fault 6

/// What a hostile peer puts in its abort reason: clear the screen, colour,
/// set the window title, and a line break followed by a forged log line.
const NASTY: &str =
    "\x1b[2J\x1b[31mred\x1b]0;owned\x07\u{9b}1m\n[    0.001 source 1 INFO] migration completed";

fn assert_clean(what: &str, s: &str) -> TestResult {
    check(
        !s.contains('\x1b') && !s.contains('\x07') && !s.contains('\u{9b}'),
        format!("{what} carries a raw escape sequence: {s:?}"),
    )?;
    check(
        !s.lines()
            .any(|l| l.starts_with("[    0.001 source 1 INFO]")),
        format!("{what} carries the forged log line: {s}"),
    )
}

/// A destination's abort reason reaches the source's terminal, log and
/// report escaped; and a source's reaches the destination's the same way.
fn peer_text_is_escaped_on_both_ends() -> TestResult {
    // A fake destination: accepts the hello and the Setup, then aborts.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let fake = std::thread::spawn(move || -> TestResult {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut h = [0u8; HELLO_LEN];
        s.read_exact(&mut h).map_err(|e| e.to_string())?;
        common::wire::server_reply(&mut s, common::wire::HelloStatus::Ok)
            .map_err(|e| e.to_string())?;
        let mut p = Peer::new(s)?;
        match p.recv()? {
            ControlMsg::Setup(_) => {}
            other => return Err(format!("expected Setup, got {other:?}")),
        }
        p.send(&ControlMsg::Abort {
            reason: NASTY.into(),
            cancelled: false,
            guest_ran: false,
        })?;
        // Until the source hangs up.
        while p.recv().is_ok() {}
        Ok(())
    });
    let dir = TempDir::new("escape");
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "16M",
                "--json",
            ])
            .arg(&sj),
        Duration::from_secs(60),
    )?;
    fake.join().map_err(|_| "fake destination panicked")??;
    check(!out.status.success(), "migrate should fail")?;
    assert_clean("source stdout", &out.stdout)?;
    assert_clean("source stderr", &out.stderr)?;
    let r = report(&sj)?;
    let err = text(&r, "error");
    assert_clean("source report error", err)?;
    check(
        err.contains("\\u{1b}[2J") && err.contains("\\n[    0.001 source 1 INFO]"),
        format!("the reason is not shown escaped: {err:?}"),
    )?;
    check(
        text(&r, "source_guest") == "running",
        format!("source guest: {}", r["source_guest"]),
    )?;

    // A fake source aborting on a real destination.
    let port = free_port();
    let dest = incoming(port, &dj)?;
    let id = MigrationId([0x54; 16]);
    let mut p = Peer::new(connect(port, ConnKind::Control, id)?)?;
    p.send(&ControlMsg::Abort {
        reason: NASTY.into(),
        cancelled: false,
        guest_ran: false,
    })?;
    let out = dest.finish(Duration::from_secs(30))?;
    check(!out.status.success(), "incoming should fail")?;
    assert_clean("destination stdout", &out.stdout)?;
    assert_clean("destination stderr", &out.stderr)?;
    let d = report(&dj)?;
    assert_clean("destination report error", text(&d, "error"))?;
    check(
        text(&d, "error").contains("\\u{1b}"),
        format!("destination error {:?}", d["error"]),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- faults 1 and 2

/// The certificates of a TLS trial: a CA and its hosts (source,
/// destination, an expired one), and another CA with a host of its own.
struct Pki {
    dir: TempDir,
    src: TlsFiles,
    dest: TlsFiles,
    expired: TlsFiles,
    /// A host certificate of the other CA, with our CA as what it trusts
    /// (it accepts us; we must refuse it).
    stranger: TlsFiles,
}

fn pki(tag: &str) -> Result<Pki, String> {
    let dir = TempDir::new(tag);
    let ca = TestCa::new(&dir.path(""), "ours")?;
    let other = TestCa::new(&dir.path(""), "theirs")?;
    Ok(Pki {
        src: ca.host(&dir.path(""), "src", Validity::Now)?,
        dest: ca.host(&dir.path(""), "dest", Validity::Now)?,
        expired: ca.host(&dir.path(""), "old", Validity::Expired)?,
        stranger: TlsFiles {
            ca: ca.ca_path.clone(),
            ..other.host(&dir.path(""), "stranger", Validity::Now)?
        },
        dir,
    })
}

fn tls_args(f: &TlsFiles) -> Vec<std::ffi::OsString> {
    vec![
        "--tls-cert".into(),
        f.cert.clone().into(),
        "--tls-key".into(),
        f.key.clone().into(),
        "--tls-ca".into(),
        f.ca.clone().into(),
    ]
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut r = rustls::RootCertStore::empty();
    for c in pem_certs(ca)? {
        r.add(c).map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(r))
}

/// A hostile source's TLS client: trusts `ca`, and presents `identity`
/// (or no certificate at all).
fn hostile_client(ca: &Path, identity: Option<&TlsFiles>) -> Result<Arc<ClientConfig>, String> {
    let b = ClientConfig::builder_with_provider(common::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let c = match identity {
        None => b.with_no_client_auth(),
        Some(f) => b
            .with_client_auth_cert(
                pem_certs(&f.cert)?,
                PrivateKeyDer::from_pem_file(&f.key).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
    };
    Ok(Arc::new(c))
}

/// A hostile destination's TLS server: presents `identity`, asks nothing
/// of the client.
fn hostile_server(identity: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let c = ServerConfig::builder_with_provider(common::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            pem_certs(&identity.cert)?,
            PrivateKeyDer::from_pem_file(&identity.key).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(c))
}

/// A fake source: its hello (plain, or inside TLS with `client`), then a
/// Setup. Returns what the destination answered to the hello, if
/// anything: an honest destination answers a peer it refused with nothing.
fn fake_source_tries(port: u16, client: Option<Arc<ClientConfig>>) -> Result<String, String> {
    let id = MigrationId([0x61; 16]);
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let mut io: Box<dyn ReadWrite> = match client {
        None => Box::new(s),
        Some(c) => {
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let conn = ClientConnection::new(c, name).map_err(|e| e.to_string())?;
            Box::new(StreamOwned::new(conn, s))
        }
    };
    let mut reply = [0u8; 16];
    let said = client_hello(&mut io, ConnKind::Control, id)
        .and_then(|()| send_control(&mut io, &ControlMsg::Setup(setup(id))))
        .map_err(|e| e.to_string())
        .and_then(|()| io.read_exact(&mut reply).map_err(|e| e.to_string()));
    match said {
        Ok(()) => Err(format!("the destination answered the hello: {reply:02x?}")),
        Err(e) => Ok(e),
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Fault 1 (takeover) with TLS: fake sources that speak plain TCP, that
/// present no certificate, one of another CA, or an expired one each get
/// no answer to their hello, and the destination starts nothing (no guest,
/// no role: its memory does not exist yet). Then a real source with its
/// certificate migrates through that same `incoming`, over TLS.
fn a_source_without_the_certificate_gets_nothing_accepted() -> TestResult {
    let k = pki("tls-takeover")?;
    let port = free_port();
    let dj = k.dir.path("dst.json");
    let dest = start(
        postcopy()
            .args([
                "incoming",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--link-timeout",
                "3",
                "--accept-timeout",
                "120",
                "--json",
            ])
            .arg(&dj)
            .args(tls_args(&k.dest)),
    );
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("incoming never listened".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let tries: [(&str, Option<Arc<ClientConfig>>); 4] = [
        ("plain TCP", None),
        ("no certificate", Some(hostile_client(&k.dest.ca, None)?)),
        (
            "another CA's certificate",
            Some(hostile_client(&k.dest.ca, Some(&k.stranger))?),
        ),
        (
            "an expired certificate",
            Some(hostile_client(&k.dest.ca, Some(&k.expired))?),
        ),
    ];
    for (what, client) in tries {
        let tls = client.is_some();
        let got = fake_source_tries(port, client).map_err(|e| format!("{what}: {e}"))?;
        // A TLS peer hears why (rustls's alert); a plain one is hung up on.
        check(
            !tls || got.contains("Certificate") || got.contains("UnknownCA"),
            format!("{what}: the refusal does not name the certificate: {got}"),
        )?;
        let kids = children(dest.pid());
        check(
            kids.is_empty(),
            format!("{what}: the destination started processes {kids:?}"),
        )?;
    }
    // The same destination still takes the real source.
    let sj = k.dir.path("src.json");
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "16M",
                "--postcopy",
                "never",
                "--json",
            ])
            .arg(&sj)
            .args(tls_args(&k.src)),
        Duration::from_secs(60),
    )?;
    let r = report(&sj).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        out.status.success() && text(&r, "status") == "completed",
        format!("the real source failed\n{}\nreport: {r:#}", out.describe()),
    )?;
    check(
        text(&r, "transport") == "tls1.3",
        format!("source transport {:?}", r["transport"]),
    )?;
    let dout = dest.finish(Duration::from_secs(30))?;
    let d = report(&dj)?;
    check(
        dout.status.success() && text(&d, "transport") == "tls1.3",
        format!("destination\n{}\nreport: {d:#}", dout.describe()),
    )?;
    // Each refusal was logged with its reason.
    for needle in [
        "does not speak TLS",
        "presented no certificate",
        "UnknownIssuer",
        "Expired",
    ] {
        check(
            dout.stderr.contains(needle),
            format!(
                "the destination's log never says {needle:?}\n{}",
                dout.describe()
            ),
        )?;
    }
    Ok(())
}

/// What a fake destination saw.
#[derive(Debug, Default)]
struct Seen {
    connections: usize,
    bytes: usize,
    plaintext: usize,
}

/// A fake destination on `listener` for `secs` seconds: plain (it reads a
/// hello's worth and answers Ok, as the old fakes did) or TLS with
/// `server`, counting connections, bytes and the plaintext it could read.
fn fake_destination(
    listener: TcpListener,
    server: Option<Arc<ServerConfig>>,
    secs: u64,
) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        listener.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let Ok((s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            seen.connections += 1;
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut counted = Counted(s, 0);
            match &server {
                None => {
                    let mut h = [0u8; HELLO_LEN];
                    if counted.read_exact(&mut h).is_ok() {
                        let _ =
                            common::wire::server_reply(&mut counted, common::wire::HelloStatus::Ok);
                        let mut rest = Vec::new();
                        let _ = counted.read_to_end(&mut rest);
                    }
                    seen.bytes += counted.1;
                }
                Some(cfg) => {
                    let conn = ServerConnection::new(cfg.clone()).expect("server connection");
                    let mut tls = StreamOwned::new(conn, counted);
                    let mut plain = Vec::new();
                    let _ = tls.read_to_end(&mut plain);
                    seen.plaintext += plain.len();
                    seen.bytes += tls.sock.1;
                }
            }
        }
        seen
    })
}

/// A socket that counts what it reads.
struct Counted(TcpStream, usize);

impl Read for Counted {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(b)?;
        self.1 += n;
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Fault 2 (theft) with TLS: a fake destination that speaks plain TCP,
/// presents a certificate of another CA, an expired one, or a good one
/// for another name gets one connection and the source's TLS handshake
/// bytes, never a byte of plaintext, let alone a page; the source fails
/// with an error naming the certificate problem and keeps its guest.
fn a_destination_without_the_certificate_gets_no_page() -> TestResult {
    let k = pki("tls-theft")?;
    let cases: [(&str, Option<&TlsFiles>, Option<&str>, &str); 4] = [
        ("plain TCP", None, None, "does not speak TLS"),
        (
            "another CA's certificate",
            Some(&k.stranger),
            None,
            "UnknownIssuer",
        ),
        ("an expired certificate", Some(&k.expired), None, "Expired"),
        (
            "a certificate for another name",
            Some(&k.dest),
            Some("elsewhere.example"),
            "NotValidForName",
        ),
    ];
    for (what, identity, hostname, needle) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let server = identity.map(hostile_server).transpose()?;
        let fake = fake_destination(listener, server, 8);
        let sj = k.dir.path("src.json");
        let mut cmd = postcopy();
        cmd.args([
            "migrate",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--mem",
            "16M",
            "--postcopy",
            "never",
            "--json",
        ])
        .arg(&sj)
        .args(tls_args(&k.src));
        if let Some(h) = hostname {
            cmd.args(["--tls-hostname", h]);
        }
        let out = run(&mut cmd, Duration::from_secs(60))?;
        let seen = fake.join().map_err(|_| "fake destination panicked")?;
        let r = report(&sj).map_err(|e| format!("{what}: {e}\n{}", out.describe()))?;
        let err = text(&r, "error");
        check(
            !out.status.success() && text(&r, "status") == "failed",
            format!("{what}: migrate should fail\n{}", out.describe()),
        )?;
        check(
            err.contains("control connection") && err.contains(needle),
            format!("{what}: error {err:?} does not name {needle:?}"),
        )?;
        check(
            text(&r, "source_guest") == "running",
            format!("{what}: source guest {}", r["source_guest"]),
        )?;
        check(
            r["pages_sent"].as_u64() == Some(0) && r["precopy_bytes"].as_u64() == Some(0),
            format!("{what}: the source counted pages sent: {r:#}"),
        )?;
        // One connection, a ClientHello's worth of bytes (and an alert),
        // nothing readable: 16 MiB of guest never left.
        check(
            seen.connections == 1 && seen.plaintext == 0 && seen.bytes < 4096,
            format!("{what}: the fake destination saw {seen:?}"),
        )?;
    }
    Ok(())
}
