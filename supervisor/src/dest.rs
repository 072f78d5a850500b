//! The destination supervisor: accepts one migration, starts its guest and
//! fault-handler, loads the package and runs the guest, and checks memory at
//! the end. Before its guest runs, any failure tears everything down (the
//! source keeps its guest); once it runs, this is the only live copy.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::bitmap::SharedBitmap;
use common::control::{
    ControlMsg, DestSummary, PostcopyMode, SetupAccepted, SetupRequest, VerifyMethod,
};
use common::counters::{Counter, SharedCounters};
use common::guest::{GuestKind, Workload, KVM_MAX_MEM};
use common::mem::{create_memfd, Access, Mapping};
use common::msg::{
    FromFaultHandler, FromGuest, GuestInit, HandlerSetup, HandlerStart, PostcopyStats,
    RecvProgress, Side, ToFaultHandler, ToGuest,
};
use common::state::MigrationState;
use common::tls::Session as TlsSession;
use common::types::{MemLayout, MigrationId, RemoteAddr, PAGE_SIZE};
use common::uffd::Uffd;
use common::wire::{ConnKind, HelloStatus, Package};

use crate::chaos::{self, Chaos};
use crate::cli::IncomingArgs;
use crate::ctlsock::{Allowed, Command, ControlSocket, Status};
use crate::error::MigError;
use crate::events::{self, Event, Gate, Reply};
use crate::machine::dest::{DestAction, DestMachine, DestState};
use crate::machine::Judged;
use crate::net::{self, Control, NetError};
use crate::progress::Progress;
use crate::report::{CpuReport, Report, RoleReport, VcpuBlocktime, VerifyReport};
use crate::session::{EventLoop, Session, CONTROL};
use crate::snapshot::{Reading, Snapshot, Telemetry};
use crate::source::short;
use crate::spawn::{self, Child};
use crate::verify;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Dest {
    args: IncomingArgs,
    s: Session,
    /// Where the migration is: the one state, judging every event.
    m: DestMachine,
    /// When the machine entered its current state (step deadlines).
    state_since: (&'static str, Instant),
    report: Report,
    progress: Progress,
    /// The live figures: timeline samples, rates (snapshot.rs).
    telemetry: Telemetry,
    req: Option<SetupRequest>,
    layout: MemLayout,
    memfd: Option<OwnedFd>,
    digests_fd: Option<OwnedFd>,
    guest: Option<Child<ToGuest, FromGuest>>,
    handler: Option<Child<ToFaultHandler, FromFaultHandler>>,
    control: Option<Control>,
    /// The memfd of the received bitmap, then the userfaultfd dup (postcopy).
    held: Vec<OwnedFd>,
    /// The received bitmap (read at a resync).
    received: Option<SharedBitmap>,
    /// The fault-handler's running totals (faults, latency, blocktime,
    /// bytes), and the memfd handed to each fault-handler.
    counters: Option<(SharedCounters, OwnedFd)>,
    /// The data connections the fault-handler holds, and their TLS
    /// sessions until it takes them.
    conns: Vec<(ConnKind, OwnedFd)>,
    conn_tls: Vec<(ConnKind, TlsSession)>,
    /// Bulk streams agreed at setup, the main stream included.
    streams: u32,
    /// Where the sources' connections arrive (kept for resyncs).
    listener: Option<net::Acceptor>,
    id: MigrationId,
    guest_base: RemoteAddr,
    /// What stops the fault-handler's events when it is replaced.
    handler_gate: Gate,
    serial_path: Option<String>,
    /// The source's digests, as they come.
    digests: Vec<u64>,
    /// The package, between its arrival and the guest's Load.
    package: Option<Package>,
    /// Switchover timings: when Listen and Load were sent, and the
    /// discard time of the last stretch of the stream (µs).
    t_listen: Option<Instant>,
    t_load: Option<Instant>,
    listen_us: u64,
    discard_us: u64,
    /// Discard time already spent at the last MARK (before the stop).
    mark_discard_us: u64,
    /// Messages for the source kept while the link is down.
    outbox: Vec<ControlMsg>,
    /// `--chaos`: planned kills of the fault-handler.
    chaos: Option<Chaos>,
    /// What the fault-handler said when it had every page.
    done: Option<(Option<PostcopyStats>, RecvProgress)>,
    /// The control socket (docs/control.md).
    ctl: Option<ControlSocket>,
    /// Restarts of the fault-handler after failures of its own (not
    /// caused by the link), against `--max-restarts`.
    crashes: u32,
    /// When the control socket's figures were last published.
    published: Instant,
    /// When the link was lost, while paused.
    paused_at: Option<Instant>,
}

/// How long a destination paused in precopy waits for the source: one
/// more link timeout, at least 10 s. The source comes back only if it had
/// handed the package over (it then retries every 0.5–5 s, so 10 s sees at
/// least three tries); one that lost the link before that failed and
/// resumed its guest, and the destination should not outlive it by much.
fn precopy_pause_limit(link_timeout: Duration) -> Duration {
    link_timeout.max(Duration::from_secs(10))
}

/// What the live figures are made of now (snapshot.rs), borrowing only the
/// fields it reads (the telemetry stays free to update).
macro_rules! dest_reading {
    ($d:expr) => {
        Reading {
            status: $d.m.state().coarse(),
            phase: $d.m.state().name(),
            counters: $d.counters.as_ref().map(|(c, _)| c),
            pages_done: $d.received.as_ref().map(|r| r.count()),
            round_left: None,
            dirty_pages_per_s: None,
        }
    };
}

/// Waits for one migration and returns the destination's report.
pub fn incoming(args: IncomingArgs) -> Report {
    let mut report = Report {
        status: "failed".into(),
        side: "destination".into(),
        transport: args.transport.name().into(),
        page_size: PAGE_SIZE as u64,
        verify: VerifyReport::none("not reached"),
        ..Default::default()
    };
    let s = match Session::new("destination") {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("cannot watch signals: {e}"));
            return report;
        }
    };
    let m = DestMachine::new();
    report.started_at_unix_ms =
        crate::report::unix_ms_now() - s.started.elapsed().as_secs_f64() * 1e3;
    let progress = Progress::new(args.quiet);
    let telemetry = Telemetry::new("destination", s.started, 0);
    let mut d = Dest {
        args,
        s,
        progress,
        telemetry,
        state_since: (m.state().name(), Instant::now()),
        m,
        report,
        req: None,
        layout: MemLayout::new(PAGE_SIZE as u64).expect("one page"),
        memfd: None,
        digests_fd: None,
        guest: None,
        handler: None,
        control: None,
        held: Vec::new(),
        received: None,
        counters: None,
        conns: Vec::new(),
        streams: 1,
        conn_tls: Vec::new(),
        listener: None,
        id: MigrationId([0; 16]),
        guest_base: RemoteAddr(0),
        handler_gate: Gate::default(),
        serial_path: None,
        digests: Vec::new(),
        package: None,
        t_listen: None,
        t_load: None,
        listen_us: 0,
        discard_us: 0,
        mark_discard_us: 0,
        outbox: Vec::new(),
        chaos: None,
        done: None,
        ctl: None,
        published: Instant::now(),
        crashes: 0,
        paused_at: None,
    };
    d.chaos = d.args.chaos.clone();
    d.ctl = ControlSocket::open(
        d.args.control.clone(),
        "destination",
        d.s.started,
        d.s.tx.clone(),
    );
    d.publish();
    let t0 = Instant::now();
    let result = d.run();
    d.report.total_time_ms = t0.elapsed().as_secs_f64() * 1e3;
    d.finish(result)
}

impl EventLoop for Dest {
    fn session(&mut self) -> &mut Session {
        &mut self.s
    }

    fn on_tick(&mut self) -> Result<(), MigError> {
        if self.published.elapsed() >= Duration::from_millis(250) {
            self.publish();
        }
        self.sample();
        if self.m.is_over() {
            return Ok(());
        }
        if matches!(self.m.state(), DestState::Paused { .. }) {
            let limit = precopy_pause_limit(self.link_timeout());
            let waited = self.paused_at.map_or(Duration::ZERO, |t| t.elapsed());
            if self.m.paused_before_package() && waited > limit {
                return Err(MigError::PeerLost(format!(
                    "the link was lost in precopy and the source did not come back within {:.0} s: it lost the link before handing over the package (and runs its guest on), or it is gone",
                    limit.as_secs_f64()
                )));
            }
            return self.accept_control();
        }
        self.chaos_tick();
        let link = self.link_timeout();
        if let Err(e) = self.s.keep_alive(self.control.as_mut(), link, "source") {
            return self.on_link_lost_as(e, true);
        }
        // The main stream must move while pages are due (heartbeats alone
        // do not hold a migration).
        let due = matches!(
            self.m.state(),
            DestState::Precopy { .. } | DestState::Running { postcopy: true }
        );
        if due != self.s.expects_data() {
            self.s.expect_data(due);
        }
        self.s.check_data(link, "source")?;
        let (name, since) = self.state_since;
        if let Some(what) = self.m.state().step() {
            let limit = if self.m.state() == &DestState::AwaitFinish {
                Duration::from_secs(120)
            } else {
                STEP_TIMEOUT
            };
            if since.elapsed() > limit {
                return Err(MigError::Timeout {
                    what: format!("{what} (in state {name})"),
                    secs: limit.as_secs_f64(),
                });
            }
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Result<(), MigError> {
        if self.m.is_over() {
            if let Event::Exited { pid, status } = ev {
                self.s.exited(pid, status);
            }
            return Ok(());
        }
        match self.handle(ev) {
            // A resync whose connections do not come (the link went again)
            // pauses like any lost link.
            Err(e) if e.child() == Some("fault-handler") => match self.on_handler_failure(e) {
                Err(e @ (MigError::PeerLost(_) | MigError::Net(_))) => self.on_link_lost(e),
                r => r,
            },
            Err(e @ (MigError::PeerLost(_) | MigError::Net(_))) => self.on_link_lost(e),
            r => r,
        }
    }
}

impl Dest {
    /// One event: the common cases, a signal, then the machine's verdict
    /// and its steps.
    fn handle(&mut self, ev: Event) -> Result<(), MigError> {
        let Some(ev) = self.s.handle_common(ev, "source")? else {
            return Ok(());
        };
        if let Event::Command(cmd, reply) = ev {
            return self.on_command(cmd, reply);
        }
        if let Event::Interrupt(sig) = ev {
            return match self.allowed().cancel {
                Err(why) => {
                    log::warn!("signal {sig}: not cancelling: {why}");
                    Ok(())
                }
                Ok(()) => Err(MigError::Cancelled(format!("signal {sig}"))),
            };
        }
        let judged = self.m.on(&ev, self.wants_digests())?;
        self.observe(ev)?;
        self.after_judging(judged)
    }

    fn guest(&self) -> &Child<ToGuest, FromGuest> {
        self.guest.as_ref().expect("guest started")
    }

    fn handler(&self) -> &Child<ToFaultHandler, FromFaultHandler> {
        self.handler.as_ref().expect("fault-handler started")
    }

    fn control(&mut self) -> Result<&mut Control, MigError> {
        self.control
            .as_mut()
            .ok_or_else(|| MigError::Protocol("no control connection".into()))
    }

    /// Sends to the source, or (while the link is down) keeps the message
    /// for when it is back: the guest goes on meanwhile, and what it did
    /// (started, finished) must still reach the source, in order.
    /// A send that fails keeps the message too: the broken link is seen by
    /// the control reader (or the heartbeat) and pauses the migration, and
    /// the steps after this one are not lost meanwhile.
    fn send_peer(&mut self, msg: ControlMsg) -> Result<(), MigError> {
        match self.control.as_mut() {
            Some(c) if self.outbox.is_empty() => {
                if let Err(e) = c.send(&msg) {
                    log::warn!(
                        "cannot reach the source ({e}); keeping {} for later",
                        msg.name()
                    );
                    self.outbox.push(msg);
                }
            }
            _ => self.outbox.push(msg),
        }
        Ok(())
    }

    /// The link to the source is lost. Once the package is here the
    /// migration pauses: the fault-handler goes (faulting threads wait),
    /// and the source's new control connection is awaited on the
    /// listener (`accept_control`). Before it, the migration fails.
    fn on_link_lost(&mut self, e: MigError) -> Result<(), MigError> {
        // The control connection closed or reset is the one loss that is
        // not silence; data connections that never came are.
        let silent = !matches!(e, MigError::PeerLost(_));
        self.on_link_lost_as(e, silent)
    }

    /// [`Dest::on_link_lost`]; `silent`: the source went quiet (no word
    /// for the link timeout, or connections that did not come), as a cut
    /// link looks. In precopy only that pauses: a source that handed the
    /// package over keeps its control connection open, so one it closed or
    /// reset means a source that is gone (or failed before the package),
    /// and the destination fails at once as before.
    fn on_link_lost_as(&mut self, e: MigError, silent: bool) -> Result<(), MigError> {
        if !silent && matches!(self.m.state(), DestState::Precopy { .. }) {
            return Err(e);
        }
        if !self.m.pause() {
            return Err(e);
        }
        // No pages can come while paused; the clock starts again after.
        self.s.expect_data(false);
        self.paused_at = Some(Instant::now());
        self.report.note(
            self.s.started,
            "pause",
            format!("{e}; waiting for the source"),
        );
        let gate = self.handler_gate.clone();
        self.s.retire("fault-handler", &gate);
        self.handler = None;
        self.conns.clear();
        if let Some(mut c) = self.control.take() {
            let gate = c.gate.clone();
            self.s.retire(CONTROL, &gate);
            c.shutdown();
        }
        self.note_state();
        Ok(())
    }

    /// Paused: takes the source's new control connection if one is
    /// waiting (only this migration's), then sends what the guest did
    /// meanwhile. The source's Resync follows.
    fn accept_control(&mut self) -> Result<(), MigError> {
        let Some(mut listener) = self.listener.take() else {
            return Ok(());
        };
        let id = self.id;
        let got = listener.accept::<MigError>(
            Some(Instant::now()),
            self.link_timeout(),
            "the source to reconnect",
            |h| {
                if h.migration != id {
                    HelloStatus::UnknownMigration
                } else if h.kind != ConnKind::Control {
                    HelloStatus::Unexpected
                } else {
                    HelloStatus::Ok
                }
            },
            || Ok(()),
        );
        self.listener = Some(listener);
        let stream = match got {
            Ok((_, s)) => s,
            Err(MigError::Net(NetError::AcceptTimeout { .. })) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.control =
            Some(Control::new(stream, self.s.tx.clone()).map_err(|e| MigError::io("control", e))?);
        self.s.peer_heard = Instant::now();
        self.paused_at = None;
        self.m.link_back();
        self.report.note(
            self.s.started,
            "recover",
            "the source connected again".into(),
        );
        self.note_state();
        for msg in std::mem::take(&mut self.outbox) {
            self.send_peer(msg)?;
        }
        Ok(())
    }

    fn link_timeout(&self) -> Duration {
        Duration::from_secs(self.args.link_timeout)
    }

    fn wants_digests(&self) -> bool {
        self.req
            .as_ref()
            .is_some_and(|r| r.verify == VerifyMethod::Digest)
    }

    fn listener(&self) -> Result<TcpListener, MigError> {
        if let Some(fd) = self.args.listen_fd {
            // SAFETY: `demo` put a listening socket at this fd for us and
            // nothing else in this process uses it.
            return Ok(TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let addr = self.args.listen.as_deref().expect("clap requires one");
        TcpListener::bind(addr).map_err(|e| MigError::io(format!("listen on {addr}"), e))
    }

    /// Notes when the machine entered a new state (step deadlines, the
    /// report's events).
    fn note_state(&mut self) {
        let name = self.m.state().name();
        if name != self.state_since.0 {
            let from = self.state_since.0;
            self.report
                .note(self.s.started, "state", format!("{from} -> {name}"));
            self.state_since = (name, Instant::now());
            self.publish();
        }
    }

    /// What each control command can do now. The migration is driven from
    /// the source; here only `cancel` (before the guest ran) applies.
    fn allowed(&self) -> Allowed {
        if self.m.is_over() {
            return Allowed::none("the migration is over");
        }
        let source = |what: &str| {
            Err(format!(
                "{what} is the source's: send it to the source's control socket"
            ))
        };
        Allowed {
            start_postcopy: source("start-postcopy"),
            cancel: match self.m.state() {
                st if st.guest_ran() => {
                    Err("the guest runs here and may be the only live copy".into())
                }
                // The package is here and the link is down: only our Abort
                // (guest_ran false) lets the source resume its frozen copy,
                // and it could not be sent.
                DestState::Paused { .. } => Err(format!(
                    "the link to the source is down: the source could not learn that the guest never ran here and would keep its copy frozen for good; the source reconnects by itself (or `postcopy recover` there){}",
                    if self.m.paused_before_package() {
                        format!(
                            "; paused in precopy, this side gives up by itself {:.0} s after the loss",
                            precopy_pause_limit(self.link_timeout()).as_secs_f64()
                        )
                    } else {
                        String::new()
                    }
                )),
                _ => Ok(()),
            },
            pause: source("pause"),
            recover: source("recover (the destination takes the source back on its listening address by itself)"),
            set: source("set"),
            retry: source("retry"),
        }
    }

    /// A command from the control socket.
    fn on_command(&mut self, cmd: Command, reply: Option<Reply>) -> Result<(), MigError> {
        let checked = match cmd {
            Command::Cancel => self.allowed().cancel,
            Command::StartPostcopy => self.allowed().start_postcopy,
            Command::Pause => self.allowed().pause,
            Command::Recover(_) => self.allowed().recover,
            Command::Set(_) => self.allowed().set,
            Command::Retry(_) | Command::Quit => self.allowed().retry,
        };
        let ok = checked.is_ok();
        if let Some(r) = reply {
            let _ = r.send(checked);
        }
        if ok {
            // Only cancel gets here.
            return Err(MigError::Cancelled(
                "requested on the control socket".into(),
            ));
        }
        Ok(())
    }

    /// Publishes the state, what each command can do and the figures.
    fn publish(&mut self) {
        self.published = Instant::now();
        let Some(mut ctl) = self.ctl.take() else {
            return;
        };
        let mut r = self.report.clone();
        r.status = self.m.state().coarse().name().into();
        r.events.clear();
        let mut figures = serde_json::to_value(&r).unwrap_or_default();
        figures["live"] = serde_json::to_value(self.snapshot()).unwrap_or_default();
        let status = Status {
            state: self.m.state().name(),
            allowed: self.allowed(),
            figures,
        };
        ctl.update(status, &self.report.events);
        self.ctl = Some(ctl);
    }

    /// The migration's figures now (the control socket's `query`).
    fn snapshot(&self) -> Snapshot {
        self.telemetry.snapshot(&dest_reading!(self))
    }

    /// A timeline sample and a progress redraw, when due (every 50 ms).
    fn sample(&mut self) {
        let reading = dest_reading!(self);
        if self.telemetry.sample(&reading) && self.progress.enabled() {
            self.progress.tick(&self.telemetry.snapshot(&reading));
        }
    }

    /// Notes a state change, then does the steps the machine asked for.
    fn after_judging(&mut self, judged: Judged<DestAction>) -> Result<(), MigError> {
        self.note_state();
        if let Judged::Act(actions) = judged {
            for a in actions {
                self.exec(a)?;
            }
        }
        self.chaos_tick();
        Ok(())
    }

    /// Where the migration is, for `--chaos`.
    fn chaos_phase(&self) -> Option<chaos::Phase> {
        match self.m.state() {
            DestState::Precopy { .. } => Some(chaos::Phase::Precopy),
            DestState::Listening | DestState::Loading { .. } | DestState::Starting { .. } => {
                Some(chaos::Phase::Switchover)
            }
            DestState::Running { postcopy: true } => Some(chaos::Phase::Postcopy),
            _ => None,
        }
    }

    /// Kills the fault-handler if `--chaos` says it is time.
    fn chaos_tick(&mut self) {
        let phase = self.chaos_phase();
        chaos::fire(
            self.chaos.as_mut(),
            &["fault-handler"],
            phase,
            &mut self.s,
            &mut self.report,
        );
    }

    /// Takes what the driver needs from an event the machine allowed.
    fn observe(&mut self, ev: Event) -> Result<(), MigError> {
        match ev {
            Event::Handler(FromFaultHandler::Error(e)) => {
                return Err(MigError::Role {
                    name: "fault-handler",
                    detail: e,
                })
            }
            Event::Guest(FromGuest::Error(e)) => {
                return Err(MigError::Role {
                    name: "guest",
                    detail: e,
                })
            }
            Event::Handler(FromFaultHandler::Mark(_, prog)) => {
                self.mark_discard_us = prog.discard_us;
            }
            Event::Handler(FromFaultHandler::Package(pkg, prog)) => {
                self.discard_us = prog.discard_us.saturating_sub(self.mark_discard_us);
                self.package = Some(pkg);
            }
            Event::Handler(FromFaultHandler::PrecopyDone(prog)) => self.done = Some((None, prog)),
            Event::Handler(FromFaultHandler::PostcopyDone(stats, prog)) => {
                self.done = Some((Some(stats), prog))
            }
            Event::Peer(ControlMsg::SourceDigests { first, digests }) => {
                if first != self.digests.len() as u64 {
                    return Err(MigError::Protocol(format!(
                        "source digests out of order: chunk at page {first}, expected {}",
                        self.digests.len()
                    )));
                }
                if self.digests.len() as u64 + digests.len() as u64 > self.layout.pages() {
                    return Err(MigError::Protocol(format!(
                        "source sent more digests than the {} pages of guest memory",
                        self.layout.pages()
                    )));
                }
                self.digests.extend(digests);
            }
            Event::Peer(ControlMsg::SourceDigestsEnd)
                if self.digests.len() as u64 != self.layout.pages() =>
            {
                return Err(MigError::Protocol(format!(
                    "the source sent {} digests for {} pages of guest memory",
                    self.digests.len(),
                    self.layout.pages()
                )));
            }
            _ => {}
        }
        Ok(())
    }

    /// Does one step the machine asked for.
    fn exec(&mut self, a: DestAction) -> Result<(), MigError> {
        match a {
            DestAction::AckMark(id) => self.send_peer(ControlMsg::DestMark { id })?,
            DestAction::Listen => {
                self.t_listen = Some(Instant::now());
                self.guest().send(ToGuest::Listen)?;
            }
            DestAction::HandlerListening => {
                // A handler that just died hears nothing; its successor is
                // told at its start (the guest is registered by then), and
                // the steps after this one (Load) must not be lost.
                if let Some(h) = &self.handler {
                    if h.send(ToFaultHandler::Listening).is_err() {
                        log::warn!("the fault-handler did not take Listening; its successor will");
                    }
                }
            }
            DestAction::Load => {
                self.listen_us = self
                    .t_listen
                    .map(|t| t.elapsed().as_micros() as u64)
                    .unwrap_or(0);
                self.t_load = Some(Instant::now());
                let pkg = self.package.take().expect("the package came first");
                self.guest().send(ToGuest::Load(pkg.guest_state))?;
            }
            DestAction::Run => self.guest().send(ToGuest::Run)?,
            DestAction::SendRunning => {
                let start_us = self
                    .t_load
                    .map(|t| t.elapsed().as_micros() as u64)
                    .unwrap_or(0);
                let (listen_us, discard_us) = (self.listen_us, self.discard_us);
                self.send_peer(ControlMsg::DestRunning {
                    listen_us,
                    start_us,
                    discard_us,
                })?;
            }
            DestAction::Completed => {
                let (stats, prog) = self.done.take().expect("the fault-handler said so");
                let at_completion = self.completed(stats, prog)?;
                // Stop the guest for the memory check; a KVM guest first
                // shows on its serial port that it runs here (a Linux guest:
                // that it still runs after completion).
                if let Some(r) = self.req.as_ref().filter(|r| r.guest.kind == GuestKind::Kvm) {
                    let after = match r.guest.workload {
                        Workload::Linux(_) => at_completion,
                        _ => 0,
                    };
                    self.await_marker(after)?;
                }
                self.guest().send(ToGuest::Stop)?;
            }
            DestAction::Check => {
                self.check()?;
                self.m.checked()?;
                self.note_state();
            }
            DestAction::Resync(epoch) => self.resync(epoch, "the source asked")?,
            DestAction::Done => {}
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), MigError> {
        let mut listener = net::Acceptor::new(self.listener()?, self.args.transport.clone())?;
        if let Ok(a) = listener.local_addr() {
            log::info!("waiting for a migration on {a}");
        }
        let secs = self.args.accept_timeout;
        let (hello, ctrl) = listener.accept(
            (secs > 0).then(|| Instant::now() + Duration::from_secs(secs)),
            self.link_timeout(),
            &format!("migration within the --accept-timeout of {secs} s"),
            |h| {
                if h.kind == ConnKind::Control {
                    HelloStatus::Ok
                } else {
                    HelloStatus::Unexpected
                }
            },
            || self.s.poll_stop("source"),
        )?;
        let id = hello.migration;
        self.report.migration_id = id.to_string();
        let t0 = Instant::now();
        // From here every control message arrives as an event.
        self.control =
            Some(Control::new(ctrl, self.s.tx.clone()).map_err(|e| MigError::io("control", e))?);
        self.s.peer_heard = Instant::now();
        let setup = self.wait("the source's Setup", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Peer(ControlMsg::Setup(_)) => Ok(ev),
            other => Err(other),
        })?;
        let judged = self.m.on(&setup, false)?;
        self.after_judging(judged)?;
        let Event::Peer(ControlMsg::Setup(req)) = setup else {
            unreachable!("picked a Setup")
        };
        match self.prepare(id, &req) {
            Ok(accepted) => self.control()?.send(&ControlMsg::SetupAccepted(accepted))?,
            Err(e) => {
                let _ = self.control()?.send(&ControlMsg::SetupRefused {
                    reason: e.to_string(),
                });
                return Err(e);
            }
        }
        self.accept_data(&mut listener, id, true)?;
        self.start_handler(HandlerStart::Fresh)?;
        // Kept for the connections of a resync (only this migration's
        // hellos are accepted on it).
        self.listener = Some(listener);
        self.id = id;
        self.m.connected()?;
        self.note_state();
        self.report.setup_time_ms = t0.elapsed().as_secs_f64() * 1e3;
        // From here the machine drives: every event is judged and its steps
        // done in on_event, until the source says Finish.
        while !self.m.is_over() {
            self.idle(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// Checks the request and gets everything ready for pages.
    fn prepare(&mut self, id: MigrationId, req: &SetupRequest) -> Result<SetupAccepted, MigError> {
        if req.migration != id {
            return Err(MigError::Protocol(format!(
                "Setup names migration {}, the hello named {id}",
                req.migration
            )));
        }
        req.check().map_err(|e| MigError::Setup(e.to_string()))?;
        if req.page_size as usize != PAGE_SIZE {
            return Err(MigError::Setup(format!(
                "page size {} is not supported (only {PAGE_SIZE})",
                req.page_size
            )));
        }
        let g = &req.guest;
        self.layout = MemLayout::new(g.mem_bytes).map_err(|e| MigError::Setup(e.to_string()))?;
        if !(1..=64).contains(&g.vcpus) {
            return Err(MigError::Setup(format!(
                "{} vCPUs is outside 1..=64",
                g.vcpus
            )));
        }
        if g.kind == GuestKind::Kvm && g.mem_bytes > KVM_MAX_MEM {
            return Err(MigError::Setup(format!(
                "a KVM guest of {} bytes is larger than the {KVM_MAX_MEM} supported",
                g.mem_bytes
            )));
        }
        for &(a, b) in &req.verify_ranges {
            if a >= b || b > g.mem_bytes {
                return Err(MigError::Setup(format!(
                    "verify range {a:#x}-{b:#x} does not fit guest memory"
                )));
            }
        }
        self.report.guest = g.kind.to_string();
        self.report.workload = g.workload.name().to_string();
        self.report.vcpus = g.vcpus;
        self.streams = req.streams;
        self.report.streams = req.streams;
        self.report.mem_bytes = g.mem_bytes;
        self.telemetry.set_mem_bytes(g.mem_bytes);
        self.report.postcopy_mode = req.postcopy.to_string();
        self.report.verify.method = req.verify.to_string();
        self.req = Some(req.clone());

        let postcopy = req.postcopy != PostcopyMode::Never;
        let memfd = create_memfd("postcopy-guest-memory", g.mem_bytes)
            .map_err(|e| MigError::Setup(e.to_string()))?;
        let mut guest: Child<ToGuest, FromGuest> = spawn::spawn("postcopy-guest")?;
        self.s.watch("postcopy-guest", guest.pid);
        events::forward(
            guest.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "postcopy-guest",
            events::guest_event,
        );
        guest.send(ToGuest::Init(GuestInit {
            config: g.clone(),
            side: Side::Destination { postcopy },
        }))?;
        let serial = if g.kind == GuestKind::Kvm {
            let path = self.args.serial_log.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("postcopy-{}-destination.serial", short(id)))
            });
            let f = File::create(&path)
                .map_err(|e| MigError::io(format!("serial log {}", path.display()), e))?;
            self.serial_path = Some(path.display().to_string());
            Some(f)
        } else {
            None
        };
        match &serial {
            Some(f) => guest.send_fds(&[("memory", memfd.as_fd()), ("serial", f.as_fd())])?,
            None => guest.send_fds(&[("memory", memfd.as_fd())])?,
        }
        self.guest = Some(guest);
        // The advise step: a guest that cannot make the userfaultfd postcopy
        // needs fails here, before any page moves.
        let base = match self.wait("the guest to start", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Ready { base, .. }) => Ok(base),
            other => Err(other),
        }) {
            Ok(b) => b,
            Err(MigError::Role { detail, .. }) => return Err(MigError::Setup(detail)),
            Err(e) => return Err(e),
        };
        let uffd: Option<OwnedFd> = if postcopy {
            let mut fds = self.guest().recv_fds()?;
            Some(
                fds.take("uffd")
                    .map_err(|e| MigError::Setup(e.to_string()))?,
            )
        } else {
            None
        };
        let (received, received_fd) =
            SharedBitmap::create("postcopy-received", self.layout.pages())
                .map_err(|e| MigError::Setup(format!("received bitmap: {e}")))?;
        self.received = Some(received);
        self.counters = Some(
            SharedCounters::create("postcopy-counters")
                .map_err(|e| MigError::Setup(format!("counters: {e}")))?,
        );
        if req.verify == VerifyMethod::Digest {
            self.digests_fd = Some(
                create_memfd("postcopy-digests", self.layout.pages() * 8)
                    .map_err(|e| MigError::Setup(e.to_string()))?,
            );
        }
        self.guest_base = base;
        self.memfd = Some(memfd);
        self.held.push(received_fd);
        if let Some(u) = uffd {
            self.held.push(u);
        }
        let features = if postcopy {
            Uffd::probe_features(true).unwrap_or(0)
        } else {
            0
        };
        Ok(SetupAccepted {
            postcopy_ready: postcopy,
            uffd_features: features,
        })
    }

    /// The data connections (main, return path, urgent, the extra bulk
    /// streams), then hand them to the fault-handler.
    fn accept_data(
        &mut self,
        listener: &mut net::Acceptor,
        id: MigrationId,
        cancellable: bool,
    ) -> Result<(), MigError> {
        let mut got: Vec<(ConnKind, OwnedFd)> = Vec::new();
        self.conn_tls.clear();
        // The source opens them all right after SetupAccepted: one link
        // timeout for all of them, however the peer keeps talking meanwhile.
        let link_timeout = self.link_timeout();
        let deadline = Instant::now() + link_timeout;
        // Main stream, return path, urgent connection, and one connection
        // per extra bulk stream.
        let want = 3 + (self.streams as usize - 1);
        let what = format!(
            "data connection (all {want} are due within the {} s link timeout after setup)",
            link_timeout.as_secs()
        );
        let streams = self.streams;
        while got.len() < want {
            let s = &mut self.s;
            let (h, stream) = listener.accept(
                Some(deadline),
                link_timeout,
                &what,
                |h| {
                    if h.migration != id {
                        HelloStatus::UnknownMigration
                    } else if h.kind == ConnKind::Control || got.iter().any(|(k, _)| *k == h.kind) {
                        HelloStatus::Unexpected
                    } else if matches!(h.kind, ConnKind::Bulk(n) if u32::from(n) >= streams) {
                        // Only streams 1..N-1 were agreed at setup.
                        HelloStatus::Unexpected
                    } else {
                        HelloStatus::Ok
                    }
                },
                || {
                    if cancellable {
                        s.poll_stop("source")
                    } else {
                        Ok(())
                    }
                },
            )?;
            if let Some(t) = stream.tls {
                self.conn_tls.push((h.kind, t));
            }
            got.push((h.kind, stream.stream.into()));
        }
        self.conns = got;
        Ok(())
    }

    /// Starts a fault-handler on the data connections just accepted, with
    /// the shared bitmaps, the userfaultfd dup and the digest table.
    fn start_handler(&mut self, resume: HandlerStart) -> Result<(), MigError> {
        let mut handler: Child<ToFaultHandler, FromFaultHandler> = spawn::spawn("fault-handler")?;
        if self.s.procs.iter().any(|p| p.name == "fault-handler") {
            let n = self.s.replace("fault-handler", handler.pid);
            self.report.note(
                self.s.started,
                "restart",
                format!(
                    "fault-handler started again (restart {n}, pid {})",
                    handler.pid
                ),
            );
        } else {
            self.s.watch("fault-handler", handler.pid);
        }
        self.handler_gate = events::forward(
            handler.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "fault-handler",
            events::handler_event,
        );
        let postcopy = self.held.len() > 1;
        let mut tls = std::mem::take(&mut self.conn_tls);
        let mut session = |k: ConnKind| {
            let i = tls.iter().position(|(kind, _)| *kind == k)?;
            Some(Box::new(tls.swap_remove(i).1))
        };
        handler.send(ToFaultHandler::Start(HandlerSetup {
            layout: self.layout,
            guest_base: self.guest_base,
            postcopy,
            digests: self.digests_fd.is_some(),
            resume,
            vcpus: self.report.vcpus,
            main_tls: session(ConnKind::Main),
            return_tls: session(ConnKind::ReturnPath),
            urgent_tls: session(ConnKind::Urgent),
            streams: self.streams,
            bulk_tls: (1..self.streams)
                .map(|n| session(ConnKind::Bulk(n as u8)))
                .collect(),
        }))?;
        let fd = |k: ConnKind| {
            self.conns
                .iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, f)| f.as_fd())
                .expect("all accepted")
        };
        let memfd = self.memfd.as_ref().expect("prepared");
        let mut fds = vec![
            ("memory", memfd.as_fd()),
            ("received", self.held[0].as_fd()),
            ("main", fd(ConnKind::Main)),
            ("return", fd(ConnKind::ReturnPath)),
            ("urgent", fd(ConnKind::Urgent)),
            (
                "counters",
                self.counters.as_ref().expect("prepared").1.as_fd(),
            ),
        ];
        for n in 1..self.streams {
            fds.push((
                common::msg::BULK_FD_NAMES[n as usize],
                fd(ConnKind::Bulk(n as u8)),
            ));
        }
        if postcopy {
            fds.push(("uffd", self.held[1].as_fd()));
        }
        if let Some(d) = &self.digests_fd {
            fds.push(("digests", d.as_fd()));
        }
        handler.send_fds(&fds)?;
        self.handler = Some(handler);
        Ok(())
    }

    /// The fault-handler died or failed (`e` says how): a resync of our own
    /// replaces it, unless it died too often, or no data plane is needed
    /// any more (every page is here).
    fn on_handler_failure(&mut self, e: MigError) -> Result<(), MigError> {
        if e.child() != Some("fault-handler") {
            return Err(e);
        }
        // Link trouble is free once the package is here (see the source's
        // on_role_failure); before it, it counts.
        let package_here = !matches!(
            self.m.state(),
            DestState::Accepting | DestState::Preparing { .. } | DestState::Precopy { .. }
        );
        if !(e.is_link_trouble() && package_here) {
            if self.crashes >= self.args.max_restarts {
                return Err(MigError::Setup(format!(
                    "{e}; the fault-handler failed and was restarted {} times already (--max-restarts {})",
                    self.crashes, self.args.max_restarts
                )));
            }
            self.crashes += 1;
        }
        match self.m.begin_resync() {
            Some(epoch) => {
                log::warn!("{e}: restarting the fault-handler");
                self.resync(epoch, &e.to_string())
            }
            None if self.m.state().guest_ran()
                || self.received.as_ref().is_some_and(|r| r.is_full()) =>
            {
                log::warn!("{e}: every page is here, no fault-handler needed any more");
                let gate = self.handler_gate.clone();
                self.s.retire("fault-handler", &gate);
                self.handler = None;
                Ok(())
            }
            None => Err(e),
        }
    }

    /// Resync `epoch` (ours, or asked for by the source): replaces the
    /// fault-handler and the data connections, and tells the source what
    /// is here.
    fn resync(&mut self, epoch: u32, reason: &str) -> Result<(), MigError> {
        let gate = self.handler_gate.clone();
        self.s.retire("fault-handler", &gate);
        self.handler = None;
        self.conns.clear();
        // The main stream is replaced: its clock starts again with it.
        self.s.expect_data(false);
        let package = self.m.resynced();
        let received = self.received.as_ref().expect("prepared");
        if !package {
            // Precopy starts over: every page comes again.
            received.clear_all();
        }
        let bytes = received.to_bytes();
        let full = received.is_full();
        self.report
            .note(self.s.started, "resync", format!("epoch {epoch}: {reason}"));
        self.send_peer(ControlMsg::ResyncReady {
            epoch,
            package,
            received: bytes,
        })?;
        if full {
            return self.complete_without_handler();
        }
        let mut listener = self.listener.take().expect("kept for resyncs");
        let id = self.id;
        // Once the guest ran here a signal must not cancel (this may be the
        // only copy): the accept is not cut short by one.
        let accepted = self.accept_data(&mut listener, id, !self.m.state().guest_ran());
        self.listener = Some(listener);
        accepted?;
        self.start_handler(if package {
            HandlerStart::Postcopy
        } else {
            HandlerStart::Again
        })?;
        if self.m.state().registered() {
            self.handler().send(ToFaultHandler::Listening)?;
        }
        self.note_state();
        Ok(())
    }

    /// Every page is here but no fault-handler said so: the one that placed
    /// the last page died before its `PostcopyDone` (or the link went
    /// first). Completion is judged here from the shared bitmap and
    /// counters, as that handler would have: without it the source, told
    /// by the resync that nothing is missing, sends nothing more and waits
    /// for `DestCompleted`, and this side would wait for pages.
    fn complete_without_handler(&mut self) -> Result<(), MigError> {
        if self.done.is_some() || !self.m.state().registered() {
            return Ok(());
        }
        let Some((c, _)) = self.counters.as_ref() else {
            return Ok(());
        };
        log::info!("every page is here after the resync: postcopy complete");
        let stats = PostcopyStats::from_counters(c, None);
        let prog = RecvProgress {
            pages_received: self.layout.pages(),
            bytes: c.get(Counter::RecvBytes),
            ..Default::default()
        };
        self.handle(Event::Handler(FromFaultHandler::PostcopyDone(stats, prog)))
    }

    /// Reports completion to the source; returns the destination serial
    /// log's size at that moment.
    fn completed(
        &mut self,
        stats: Option<PostcopyStats>,
        prog: RecvProgress,
    ) -> Result<u64, MigError> {
        let serial_bytes = self
            .serial_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .unwrap_or(0);
        if let Some(s) = &stats {
            self.report.postcopy_requests = s.requests;
            self.report.postcopy_faults = s.faults;
            self.report.pages_urgent = s.pages_urgent;
            self.report.pages_background = s.pages_background;
            self.report.postcopy_blocktime_ms = Some(s.blocktime_us as f64 / 1e3);
            self.report.postcopy_vcpu_blocktime = VcpuBlocktime::from_stats(s);
            self.report.fault_latency_us = Some(s.latency.clone());
            self.report.switched_to_postcopy = true;
        }
        self.report.discarded_pages = prog.discarded;
        self.report.dirty_sync_count = prog.rounds;
        self.report.serial_log_destination = self.serial_path.clone();
        if self.serial_path.is_some() {
            self.report.serial_bytes_destination_at_completion = Some(serial_bytes);
        }
        self.send_peer(ControlMsg::DestCompleted(DestSummary {
            recv: prog,
            postcopy: stats,
            serial_log: self.serial_path.clone(),
            serial_bytes,
        }))?;
        Ok(serial_bytes)
    }

    /// The guest is stopped (and the source's digests are in): checks
    /// memory as agreed at setup and tells the source.
    fn check(&mut self) -> Result<(), MigError> {
        let req = self.req.clone().expect("setup done");
        // Serial output after the stop is final: count it now.
        if let Some(p) = &self.serial_path {
            self.report.serial_bytes_destination = std::fs::metadata(p).ok().map(|m| m.len());
        }
        let result = match req.verify {
            VerifyMethod::None => None,
            VerifyMethod::Ab => {
                let mem = self.map(self.memfd.as_ref(), self.layout.mem_bytes() as usize)?;
                Some(verify::ab_check(&mem, &req.verify_ranges))
            }
            VerifyMethod::Digest => {
                let table = self.map(self.digests_fd.as_ref(), self.layout.pages() as usize * 8)?;
                Some(verify::compare_digests(&self.digests, &table))
            }
        };
        if let Some(r) = result {
            if r.mismatches > 0 {
                log::error!(
                    "memory check ({}) found {} mismatching pages, first {:?}",
                    r.method,
                    r.mismatches,
                    r.mismatch_pages
                );
            }
            self.report.verify = VerifyReport::from_result(r.clone());
            self.send_peer(ControlMsg::Verified(r))?;
        } else {
            self.report.verify = VerifyReport::none("--verify none");
            self.send_peer(ControlMsg::Verified(common::control::VerifyResult {
                method: "none".into(),
                ..Default::default()
            }))?;
        }
        Ok(())
    }

    /// Lets a KVM guest run until its serial log here holds more than
    /// `after` bytes (it shows it continued after the switchover, or after
    /// completion), up to 20 s.
    fn await_marker(&mut self, after: u64) -> Result<(), MigError> {
        let Some(path) = self.serial_path.clone() else {
            return Ok(());
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if std::fs::metadata(&path)
                .map(|m| m.len() > after)
                .unwrap_or(false)
            {
                return Ok(());
            }
            self.idle(Duration::from_millis(50))?;
        }
        log::warn!("the destination guest wrote nothing to COM1 within 20 s");
        Ok(())
    }

    fn map(&self, fd: Option<&OwnedFd>, len: usize) -> Result<Mapping, MigError> {
        let fd = fd.ok_or_else(|| MigError::Setup("nothing to map".into()))?;
        Mapping::new(fd.as_fd(), len, Access::ReadOnly).map_err(|e| MigError::Setup(e.to_string()))
    }

    fn finish(mut self, result: Result<(), MigError>) -> Report {
        self.progress.clear();
        let guest_ran = self.m.state().guest_ran();
        self.m.end(match &result {
            Ok(()) => MigrationState::Completed,
            Err(MigError::Cancelled(_)) => MigrationState::Cancelled,
            Err(_) => MigrationState::Failed,
        });
        match &result {
            Ok(()) => self.report.status = "completed".into(),
            Err(e) => {
                log::error!("incoming migration failed: {e}");
                let cancelled = matches!(e, MigError::Cancelled(_));
                self.report.status = if cancelled { "cancelled" } else { "failed" }.into();
                self.report.error = Some(e.to_string());
                if let Some(c) = self.control.as_mut() {
                    let _ = c.send(&ControlMsg::Abort {
                        reason: e.to_string(),
                        cancelled,
                        guest_ran,
                    });
                }
            }
        }
        for name in ["fault-handler", "postcopy-guest"] {
            self.s.set_quitting(name);
        }
        if let Some(h) = &self.handler {
            let _ = h.send(ToFaultHandler::Quit);
        }
        if let Some(g) = &self.guest {
            let _ = g.send(ToGuest::Quit);
        }
        // Closing our ends of the links also frees a role still waiting
        // for its fds.
        self.handler = None;
        self.guest = None;
        self.s.reap_all(Duration::from_secs(5));
        let roles = self.s.role_infos();
        if let Some(c) = self.control.as_mut() {
            let _ = c.send(&ControlMsg::DestDone {
                roles: roles.clone(),
                serial_bytes: self.report.serial_bytes_destination,
            });
            c.shutdown();
        }
        self.report.roles = roles.iter().map(RoleReport::from).collect();
        self.telemetry.last_sample(&dest_reading!(self));
        self.report.timeline = self.telemetry.timeline().to_vec();
        self.report.cost.cpu = Some(CpuReport::measure(
            &self.report.roles,
            "destination",
            self.report.mem_bytes,
        ));
        self.held.clear();
        let status = self.report.status.clone();
        self.report.note(
            self.s.started,
            "end",
            format!("the migration ended: {status}"),
        );
        self.publish();
        self.report
    }
}
