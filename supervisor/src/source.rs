//! The source supervisor: starts the guest, connects to the destination,
//! starts ram-sender and page-server, and drives the migration through its
//! states (docs/state-machine.md). The failure rule is QEMU's: before the
//! package is on the wire the source guest is resumed and keeps running;
//! after it, the destination may be running the only live copy, so the
//! source never resumes its guest by itself.

use std::fs::File;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::bitmap::SharedBitmap;
use common::control::{ControlMsg, DestSummary, PostcopyMode, SetupRequest, VerifyMethod};
use common::counters::{Counter, SharedCounters};
use common::guest::GuestKind;
use common::mem::{create_memfd, Access, Mapping};
use common::msg::{
    FinalSync, FromGuest, FromPageServer, FromRamSender, GuestInit, RoundStats, SenderSetup,
    SenderStart, ServerSetup, Side, ToGuest, ToPageServer, ToRamSender,
};
use common::state::MigrationState;
use common::types::{MemLayout, MigrationId, RemoteAddr, PAGE_SIZE};
use common::wire::{ConnKind, Package};

use crate::chaos::{self, Chaos};
use crate::cli::SourceOpts;
use crate::ctlsock::{Allowed, Command, ControlSocket, Setting, Status};
use crate::error::MigError;
use crate::events::{self, Event, Gate, Reply};
use crate::machine::source::{Resume, SourceMachine, SourceState, SrcAction};
use crate::machine::{GuestFate, Judged};
use crate::net::{self, Control};
use crate::policy::Policy;
use crate::progress::Progress;
use crate::report::{CpuReport, Report, RoleReport, RoundReport, VcpuBlocktime, VerifyReport};
use crate::session::{EventLoop, Session, CONTROL};
use crate::snapshot::{Reading, Snapshot, Telemetry};
use crate::spawn::{self, Child};
use crate::verify;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to list its processes after `Finish`
/// (the migration has completed by then: a silent peer only costs the list).
const FINISH_TIMEOUT: Duration = Duration::from_secs(20);

/// The first wait before reconnecting after a lost link, doubled after
/// each failed try up to `RECONNECT_MAX`.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// When the next reconnect try is due, and the wait after it.
struct Reconnect {
    at: Instant,
    backoff: Duration,
}

/// The event gates of the data roles.
#[derive(Default)]
struct Gates {
    sender: Gate,
    server: Gate,
}

/// When each step of the stop happened, for the report.
#[derive(Default)]
struct Times {
    decided: Option<Instant>,
    stop: Option<Instant>,
    stopped: Option<Instant>,
    synced: Option<Instant>,
    package_sent: Option<Instant>,
    dest_running: Option<Instant>,
}

struct Source {
    opts: SourceOpts,
    to: String,
    id: MigrationId,
    layout: MemLayout,
    s: Session,
    /// Where the migration is: the one state, judging every event.
    m: SourceMachine,
    /// When the machine entered its current state (step deadlines).
    state_since: (&'static str, Instant),
    report: Report,
    progress: Progress,
    /// The live figures: timeline samples, rates (snapshot.rs).
    telemetry: Telemetry,
    /// Pages left in the current precopy round, as the ram-sender last said.
    round_left: Option<u64>,
    memfd: OwnedFd,
    serial_path: Option<String>,
    guest: Option<Child<ToGuest, FromGuest>>,
    guest_fds: Vec<OwnedFd>,
    guest_base: RemoteAddr,
    sender: Option<Child<ToRamSender, FromRamSender>>,
    server: Option<Child<ToPageServer, FromPageServer>>,
    control: Option<Control>,
    /// The data connections (main, return path, urgent): held here so a
    /// role restart can hand them over again, and so their liveness can be
    /// checked before the switch.
    conns: Vec<TcpStream>,
    /// The memfds of the sent bitmap and the counters, in that order.
    held: Vec<OwnedFd>,
    /// The sent bitmap (set to the destination's after a resync).
    sent: Option<SharedBitmap>,
    /// What stops the data roles' events when they are replaced.
    gates: Gates,
    /// The last resync epoch (0: none yet).
    epoch: u32,
    /// While paused: when to try the destination again.
    reconnect: Reconnect,
    /// `--chaos`: planned kills of our data roles.
    chaos: Option<Chaos>,
    t0: Option<Instant>,
    times: Times,
    /// The guest's saved state, between its arrival and the package.
    saved_state: Option<Vec<u8>>,
    last_round: Option<RoundStats>,
    final_sync: Option<FinalSync>,
    /// What the roles put on the wire, counted as they write.
    counters: Option<SharedCounters>,
    dest: Option<DestSummary>,
    /// Digests of the frozen source memory, being computed off the main
    /// thread (verify by digest).
    digests: Option<std::sync::mpsc::Receiver<Vec<u64>>>,
    /// The control socket (docs/control.md).
    ctl: Option<ControlSocket>,
    /// When the control socket's figures were last published.
    published: Instant,
    /// Paused by `pause`: no reconnect until `recover`.
    on_hold: bool,
    /// `--keep-guest` kept the guest after the last attempt.
    keep: bool,
    /// The last attempt's report, while the guest is kept.
    last_report: Option<Report>,
    /// The guest's estimate of its saved state, bytes (for the policy).
    state_bytes: u64,
    /// Earlier attempts of this guest's migration (`--keep-guest`).
    attempts: Vec<crate::report::Attempt>,
    /// Restarts of each data role after failures of its own (not caused
    /// by the link), against `--max-restarts`.
    crashes: std::collections::HashMap<&'static str, u32>,
}

/// What the live figures are made of now (snapshot.rs), borrowing only the
/// fields it reads (the telemetry stays free to update).
macro_rules! source_reading {
    ($src:expr) => {
        Reading {
            status: $src.m.state().coarse(),
            phase: $src.m.state().name(),
            counters: $src.counters.as_ref(),
            pages_done: $src.sent.as_ref().map(|s| s.count()),
            round_left: $src.round_left.filter(|_| !$src.m.state().package_out()),
            dirty_pages_per_s: $src.last_round.as_ref().map(|r| r.dirty_rate),
        }
    };
}

/// Runs a migration of a new guest to `to` and returns its report.
/// `extra` are processes already started (the demo's destination) to list.
pub fn migrate(opts: SourceOpts, to: String, extra: &[(&'static str, u32)]) -> Report {
    let layout = MemLayout::new(opts.guest.mem_bytes).expect("checked by the CLI");
    let mut report = new_report(&opts, MigrationId([0; 16]));
    report.migration_id = String::new();
    let fail_early = |mut report: Report, e: String| {
        report.error = Some(e);
        report
    };
    let id = match MigrationId::random() {
        Ok(id) => id,
        Err(e) => return fail_early(report, format!("no migration id: {e}")),
    };
    report.migration_id = id.to_string();
    let mut s = match Session::new("source") {
        Ok(s) => s,
        Err(e) => return fail_early(report, format!("cannot watch signals: {e}")),
    };
    for (name, pid) in extra {
        s.watch_on(name, "destination", *pid);
        s.set_quitting(name);
    }
    let memfd = match create_memfd("postcopy-guest-memory", layout.mem_bytes()) {
        Ok(fd) => fd,
        Err(e) => return fail_early(report, format!("guest memory: {e}")),
    };
    // The policy learns the guest's state size once the guest is up.
    let policy = Policy::new(
        opts.postcopy,
        opts.downtime_limit,
        opts.postcopy_after_syncs,
        0,
        opts.max_bandwidth,
    );
    let m = SourceMachine::new(policy, layout.pages());
    report.started_at_unix_ms = crate::report::unix_ms_now() - ms(s.started.elapsed());
    let progress = Progress::new(opts.quiet);
    let telemetry = Telemetry::new("source", s.started, opts.guest.mem_bytes);
    let mut src = Source {
        opts,
        to,
        id,
        layout,
        s,
        state_since: (m.state().name(), Instant::now()),
        m,
        report,
        progress,
        telemetry,
        round_left: None,
        memfd,
        serial_path: None,
        guest: None,
        guest_fds: Vec::new(),
        guest_base: RemoteAddr(0),
        sender: None,
        server: None,
        control: None,
        conns: Vec::new(),
        held: Vec::new(),
        sent: None,
        gates: Gates::default(),
        epoch: 0,
        reconnect: Reconnect {
            at: Instant::now(),
            backoff: RECONNECT_FIRST,
        },
        chaos: None,
        t0: None,
        times: Times::default(),
        saved_state: None,
        last_round: None,
        final_sync: None,
        counters: None,
        dest: None,
        digests: None,
        ctl: None,
        published: Instant::now(),
        on_hold: false,
        keep: false,
        last_report: None,
        state_bytes: 0,
        attempts: Vec::new(),
        crashes: Default::default(),
    };
    src.ctl = ControlSocket::open(
        src.opts.control.clone(),
        "source",
        src.s.started,
        src.s.tx.clone(),
    );
    src.chaos = src.opts.chaos.clone();
    src.publish();
    let mut result = src.run();
    loop {
        let report = src.conclude(result);
        if !src.kept() {
            return src.finish(report);
        }
        // --keep-guest: the guest runs here; wait for retry or quit.
        println!("{}", report.summary().trim_end());
        println!(
            "the guest runs on here: `postcopy retry [--to ADDR]` migrates it again, `postcopy quit` ends it"
        );
        match src.await_retry(report) {
            Ok(r) => result = r,
            Err(why) => return src.finish_kept(why),
        }
    }
}

impl EventLoop for Source {
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
        if matches!(self.m.state(), SourceState::Paused { .. }) {
            return self.try_reconnect();
        }
        let link = self.opts.link_timeout;
        if let Err(e) = self
            .s
            .keep_alive(self.control.as_mut(), link, "destination")
        {
            return self.on_link_lost(e);
        }
        // A ram-sender that stops talking while it has work (stopped,
        // wedged) would hold the migration forever.
        let limit = link.max(Duration::from_secs(30));
        let silent = self.s.sender_heard.elapsed();
        if self.sender.is_some() && self.m.state().awaits_sender() && silent > limit {
            return Err(MigError::Role {
                name: "ram-sender",
                detail: format!("no progress for {:.0} s", silent.as_secs_f64()),
            });
        }
        self.chaos_tick();
        let (name, since) = self.state_since;
        if let Some(what) = self.m.state().step() {
            if matches!(self.m.state(), SourceState::Finishing { .. })
                && since.elapsed() > FINISH_TIMEOUT
            {
                log::warn!("no process list from the destination in time");
                self.m.end(MigrationState::Completed);
                return Ok(());
            }
            // A resync is the destination's answer and three connections:
            // the link timeout bounds it.
            let limit = if matches!(self.m.state(), SourceState::Resync { .. }) {
                self.opts.link_timeout
            } else {
                STEP_TIMEOUT
            };
            if since.elapsed() > limit {
                let e = MigError::Timeout {
                    what: format!("{what} (in state {name})"),
                    secs: limit.as_secs_f64(),
                };
                return if matches!(self.m.state(), SourceState::Resync { .. }) {
                    self.on_link_lost(e)
                } else {
                    Err(e)
                };
            }
        }
        self.poll_digests()
    }

    fn on_event(&mut self, ev: Event) -> Result<(), MigError> {
        if self.m.is_over() {
            // The migration has ended: only exits still matter.
            if let Event::Exited { pid, status } = ev {
                self.s.exited(pid, status);
            }
            return Ok(());
        }
        match self.handle(ev) {
            Err(e) if e.child().is_some() => match self.on_role_failure(e) {
                Err(e @ (MigError::PeerLost(_) | MigError::Net(_))) => self.on_link_lost(e),
                r => r,
            },
            Err(e @ (MigError::PeerLost(_) | MigError::Net(_))) => self.on_link_lost(e),
            r => r,
        }
    }
}

impl Source {
    /// One event: the peer's and the processes' common cases, a signal,
    /// then the machine's verdict and its steps.
    fn handle(&mut self, ev: Event) -> Result<(), MigError> {
        let Some(ev) = self.s.handle_common(ev, "destination")? else {
            return Ok(());
        };
        let ev = match ev {
            Event::Command(cmd, reply) => match self.on_command(cmd, reply)? {
                Some(ev) => ev,
                None => return Ok(()),
            },
            ev => ev,
        };
        if let Event::Recover(to) = ev {
            if let Some(to) = to {
                log::info!("recover: the destination is now at {to}");
                self.to = to;
            }
            self.on_hold = false;
            self.reconnect.at = Instant::now();
            return Ok(());
        }
        if let Event::Interrupt(sig) = ev {
            return match self.m.can_cancel() {
                Ok(()) => Err(MigError::Cancelled(format!("signal {sig}"))),
                Err(why) => {
                    log::warn!("signal {sig}: not cancelling: {why}; waiting for completion");
                    Ok(())
                }
            };
        }
        if let Event::Server(FromPageServer::Closed(_)) = &ev {
            if !self.m.expects_closed() && self.m.epoch().is_none() {
                // The destination's end of the return path went away (its
                // fault-handler died, say): the data plane is broken.
                return Err(MigError::Role {
                    name: "page-server",
                    detail: "the destination closed the return path".into(),
                });
            }
        }
        if let Event::Peer(ControlMsg::ResyncReady { epoch, .. }) = &ev {
            if self.m.epoch() != Some(*epoch) && *epoch > self.epoch {
                // The destination started this resync (its fault-handler
                // died): ours follows.
                self.begin_resync(*epoch, "the destination asked", false)?;
            }
        }
        let judged = self.m.on(&ev)?;
        self.observe(ev)?;
        self.after_judging(judged)
    }

    fn guest(&self) -> &Child<ToGuest, FromGuest> {
        self.guest.as_ref().expect("guest started")
    }

    fn sender(&self) -> &Child<ToRamSender, FromRamSender> {
        self.sender.as_ref().expect("ram-sender started")
    }

    /// What each control command can do in the current state.
    fn allowed(&self) -> Allowed {
        use SourceState as S;
        let st = self.m.state();
        if self.m.is_over() {
            return match self.keep {
                // Parameters set now hold for the next attempt.
                true => Allowed {
                    retry: Ok(()),
                    set: Ok(()),
                    ..Allowed::none(KEPT)
                },
                // Still settling the guest's fate (`conclude`): whether it
                // is kept is not known yet; "over" would be wrong if it is.
                false if self.opts.keep_guest => Allowed::none(
                    "the attempt is ending (--keep-guest: retry applies once the guest is seen running here)",
                ),
                false => Allowed::none("the migration is over"),
            };
        }
        let in_precopy = matches!(st, S::Booting { .. } | S::Setup { .. } | S::Precopy { .. });
        Allowed {
            start_postcopy: match st {
                _ if self.opts.postcopy == PostcopyMode::Never => Err(
                    "this migration was set up with --postcopy never: the destination did not prepare for postcopy".into(),
                ),
                _ if self.m.policy().mode() == PostcopyMode::Never => {
                    Err("the postcopy policy was set to never".into())
                }
                _ if in_precopy => Ok(()),
                S::Paused {
                    from: Resume::Precopy { .. },
                    ..
                }
                | S::Resync {
                    from: Resume::Precopy { .. },
                    ..
                } => Err(
                    "the data roles are being replaced (resync); start-postcopy applies once precopy runs again".into(),
                ),
                S::Paused { .. } | S::Resync { .. } => {
                    Err("the package was sent; the migration is recovering its link".into())
                }
                _ => Err("the migration is already switching to postcopy or past precopy".into()),
            },
            cancel: self.m.can_cancel().map_err(str::to_string),
            pause: match st {
                S::PackageOut {
                    tail,
                    dest_running: true,
                } if tail.postcopy => Ok(()),
                // Until the destination says its guest runs, it may not
                // have the package: a link dropped then fails it (it
                // pauses only with the package in), and this side would
                // wait for it for good with the guest frozen.
                S::PackageOut { tail, .. } if tail.postcopy => Err(
                    "the destination has not confirmed the package yet; pause applies once its guest runs".into(),
                ),
                S::Paused { .. } => Err("the migration is paused already".into()),
                S::Resync {
                    from: Resume::Package { .. },
                    ..
                } => Err("the migration is recovering (resync); pause applies once postcopy runs again".into()),
                _ => Err(
                    "pause applies in postcopy, while the destination still needs pages from here"
                        .into(),
                ),
            },
            recover: match st {
                S::Paused { .. } => Ok(()),
                _ => Err("the migration is not paused (recover applies once a postcopy migration lost its link or was paused)".into()),
            },
            set: Ok(()),
            retry: Err("the migration is running (retry applies after a cancel or failure with migrate --keep-guest)".into()),
        }
    }

    /// A command from the control socket: answers it on `reply`; returns
    /// the event it stands for when the machine must judge it.
    fn on_command(
        &mut self,
        cmd: Command,
        reply: Option<Reply>,
    ) -> Result<Option<Event>, MigError> {
        let allowed = self.allowed();
        let answer = |r: Result<(), String>| {
            if let Some(t) = &reply {
                let _ = t.send(r);
            }
        };
        let checked = match &cmd {
            Command::StartPostcopy => allowed.start_postcopy,
            Command::Cancel => allowed.cancel,
            Command::Pause => allowed.pause,
            Command::Recover(_) => allowed.recover,
            Command::Set(_) => allowed.set,
            Command::Retry(_) | Command::Quit => allowed.retry,
        };
        if let Err(why) = checked {
            answer(Err(why));
            return Ok(None);
        }
        match cmd {
            Command::StartPostcopy => {
                answer(Ok(()));
                Ok(Some(Event::StartPostcopy))
            }
            Command::Recover(to) => {
                answer(Ok(()));
                Ok(Some(Event::Recover(to)))
            }
            Command::Cancel => {
                answer(Ok(()));
                Err(MigError::Cancelled(
                    "requested on the control socket".into(),
                ))
            }
            Command::Pause => {
                answer(Ok(()));
                self.on_hold = true;
                self.on_link_lost(MigError::Setup(
                    "paused on the control socket; `postcopy recover` resumes".into(),
                ))?;
                Ok(None)
            }
            Command::Set(setting) => {
                answer(self.apply(setting));
                Ok(None)
            }
            Command::Retry(_) | Command::Quit => Ok(None),
        }
    }

    /// `set KEY VALUE` while the migration runs.
    fn apply(&mut self, setting: Setting) -> Result<(), String> {
        let text = match &setting {
            Setting::MaxBandwidth(b) | Setting::MaxPostcopyBandwidth(b) => format!("{b} bytes/s"),
            Setting::DowntimeLimit(ms) => format!("{ms} ms"),
            Setting::Postcopy(m) => m.to_string(),
        };
        let key = setting.key();
        match setting {
            Setting::MaxBandwidth(b) => {
                self.opts.max_bandwidth = b;
                self.report.max_bandwidth = b;
                self.m.policy_mut().set_max_bandwidth(b);
                if let Some(x) = &self.sender {
                    let _ = x.send(ToRamSender::SetMaxBandwidth(b));
                }
            }
            Setting::MaxPostcopyBandwidth(b) => {
                self.opts.max_postcopy_bandwidth = b;
                self.report.max_postcopy_bandwidth = b;
                if let Some(x) = &self.sender {
                    let _ = x.send(ToRamSender::SetMaxPostcopyBandwidth(b));
                }
            }
            Setting::DowntimeLimit(ms) => {
                self.opts.downtime_limit = Duration::from_millis(ms);
                self.report.downtime_limit_ms = ms;
                self.m
                    .policy_mut()
                    .set_downtime_limit(Duration::from_millis(ms));
            }
            Setting::Postcopy(mode) if self.keep => {
                // For the next attempt, which sets up the destination anew.
                self.opts.postcopy = mode;
            }
            Setting::Postcopy(mode) => {
                use SourceState as S;
                if self.opts.postcopy == PostcopyMode::Never && mode != PostcopyMode::Never {
                    return Err("this migration was set up with --postcopy never: the destination did not prepare for postcopy".into());
                }
                if !matches!(
                    self.m.state(),
                    S::Booting { .. } | S::Setup { .. } | S::Precopy { .. }
                ) {
                    return Err("the postcopy policy applies before the switch; the migration is past precopy".into());
                }
                self.m.policy_mut().set_mode(mode);
                self.report.postcopy_mode = mode.to_string();
            }
        }
        self.report
            .note(self.s.started, "set", format!("{key} = {text}"));
        self.publish();
        Ok(())
    }

    /// Publishes the state, what each command can do and the figures on
    /// the control socket.
    fn publish(&mut self) {
        self.published = Instant::now();
        let Some(mut ctl) = self.ctl.take() else {
            return;
        };
        let status = Status {
            state: self.m.state().name(),
            allowed: self.allowed(),
            figures: self.figures(),
        };
        ctl.update(status, &self.report.events);
        self.ctl = Some(ctl);
    }

    /// The report so far, its totals from the roles' running counts, and
    /// the live figures (`live`: the [`Snapshot`], docs/report.md).
    fn figures(&self) -> serde_json::Value {
        let mut r = self.report.clone();
        r.status = self.m.state().coarse().name().into();
        r.events.clear();
        totals(&mut r, self.counters.as_ref(), self.dest.as_ref());
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        v["live"] = serde_json::to_value(self.snapshot()).unwrap_or_default();
        v
    }

    /// Runs the machine's verdict: notes a state change, then does the
    /// steps it asked for.
    fn after_judging(&mut self, judged: Judged<SrcAction>) -> Result<(), MigError> {
        let name = self.m.state().name();
        if name != self.state_since.0 {
            let from = self.state_since.0;
            self.report
                .note(self.s.started, "state", format!("{from} -> {name}"));
            self.state_since = (name, Instant::now());
            self.publish();
        }
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
            SourceState::Precopy { .. } => Some(chaos::Phase::Precopy),
            SourceState::Stopping { .. }
            | SourceState::FinalSync { .. }
            | SourceState::Saving { .. }
            | SourceState::PackageOut {
                dest_running: false,
                ..
            } => Some(chaos::Phase::Switchover),
            SourceState::PackageOut { tail, .. } if tail.postcopy => Some(chaos::Phase::Postcopy),
            _ => None,
        }
    }

    /// Kills a data role of ours if `--chaos` says it is time.
    fn chaos_tick(&mut self) {
        let phase = self.chaos_phase();
        chaos::fire(
            self.chaos.as_mut(),
            &["ram-sender", "page-server"],
            phase,
            &mut self.s,
            &mut self.report,
        );
    }

    /// Takes what the report needs from an event the machine allowed.
    fn observe(&mut self, ev: Event) -> Result<(), MigError> {
        match ev {
            Event::Sender(FromRamSender::Error(e)) => {
                return Err(MigError::Role {
                    name: "ram-sender",
                    detail: e,
                })
            }
            Event::Server(FromPageServer::Error(e)) => {
                return Err(MigError::Role {
                    name: "page-server",
                    detail: e,
                })
            }
            Event::Guest(FromGuest::Error(e)) => {
                return Err(MigError::Role {
                    name: "guest",
                    detail: e,
                })
            }
            Event::Sender(FromRamSender::Progress(p)) => self.round_left = Some(p.round_left),
            Event::Sender(FromRamSender::Synced(stats)) => self.record_round(stats),
            Event::Sender(FromRamSender::PreDiscarded { pages, .. }) => {
                self.report.prediscard_pages = pages;
            }
            Event::Sender(FromRamSender::FinalSyncDone(fs)) => {
                self.times.synced = Some(Instant::now());
                self.report.discarded_pages = self.report.prediscard_pages + fs.discard_pages;
                self.final_sync = Some(fs);
            }
            Event::Sender(FromRamSender::PackageSent { .. }) => {
                self.times.package_sent = Some(Instant::now());
            }
            Event::Guest(FromGuest::Stopped) => self.times.stopped = Some(Instant::now()),
            Event::Guest(FromGuest::State(st)) => self.saved_state = Some(st),
            Event::Peer(ControlMsg::DestRunning {
                listen_us,
                start_us,
                discard_us,
            }) => {
                let sw = self
                    .report
                    .switchover_ms
                    .get_or_insert_with(Default::default);
                sw.dest_listen = listen_us as f64 / 1e3;
                sw.dest_discard = discard_us as f64 / 1e3;
                sw.dest_load_run = start_us as f64 / 1e3;
            }
            Event::Peer(ControlMsg::DestCompleted(summary)) => {
                if summary.serial_log.is_some() {
                    self.report.serial_bytes_destination_at_completion = Some(summary.serial_bytes);
                }
                self.dest = Some(summary)
            }
            Event::Peer(ControlMsg::Verified(v)) => {
                self.report.verify = VerifyReport::from_result(v)
            }
            Event::Peer(ControlMsg::DestDone {
                roles,
                serial_bytes,
            }) => {
                self.report.roles.extend(roles.iter().map(RoleReport::from));
                if let (Some(d), Some(b)) = (self.dest.as_mut(), serial_bytes) {
                    d.serial_bytes = b;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Does one step the machine asked for.
    fn exec(&mut self, a: SrcAction) -> Result<(), MigError> {
        match a {
            SrcAction::Sender(cmd) => {
                self.sender()
                    .send(cmd)
                    .map_err(|_| MigError::ChannelClosed("ram-sender"))?;
                self.s.sender_heard = Instant::now();
            }
            SrcAction::ResumeGuest => {
                log::info!("back to precopy: resuming the source guest");
                self.guest().send(ToGuest::Resume)?;
            }
            SrcAction::StartRoles { epoch, start, sent } => {
                let bitmap = self.sent.as_ref().expect("set up");
                match sent {
                    None => bitmap.clear_all(),
                    Some(bytes) => bitmap.overwrite(&bytes).map_err(|e| {
                        MigError::Protocol(format!("the destination's received bitmap: {e}"))
                    })?,
                }
                log::info!(
                    "resync {epoch}: starting the data roles again ({start:?}, {} of {} pages on the destination)",
                    bitmap.count(),
                    self.layout.pages()
                );
                self.start_data_roles(start)?;
            }
            SrcAction::SwitchDecided(reason) => {
                log::info!("switching to postcopy: {reason}");
                self.report.switched_to_postcopy = true;
                self.report.switchover_reason = Some(reason);
                self.times.decided = Some(Instant::now());
            }
            SrcAction::Converged(expected_ms) => {
                log::info!("precopy converged (expected downtime {expected_ms:.1} ms)");
            }
            SrcAction::StopGuest { postcopy } => {
                if let Some(t) = self.times.decided {
                    self.report.prediscard_ms = Some(ms(t.elapsed()));
                }
                if postcopy {
                    // The point of no return is near: every channel
                    // postcopy needs must be alive (fault 3 of issue 7).
                    self.check_postcopy_channels()?;
                }
                self.times.stop = Some(Instant::now());
                self.guest().send(ToGuest::Stop)?;
            }
            SrcAction::SaveState => self.guest().send(ToGuest::SaveState)?,
            SrcAction::SendPackage { postcopy } => {
                // From here the destination may start the guest: whatever
                // happens next, the source never resumes its own (QEMU's
                // rule); the machine's state says so already.
                let state = self.saved_state.take().unwrap_or_default();
                self.sender()
                    .send(ToRamSender::Package(Package {
                        listen: postcopy,
                        run: true,
                        guest_state: state,
                    }))
                    .map_err(|_| MigError::ChannelClosed("ram-sender"))?;
                self.s.sender_heard = Instant::now();
            }
            SrcAction::DestRunning => {
                let t = Instant::now();
                self.times.dest_running = Some(t);
                let tm = &self.times;
                let stop = tm.stop.expect("stopped before the package");
                self.report.downtime_ms = Some(ms(t - stop));
                let stopped = tm.stopped.unwrap_or(stop);
                let synced = tm.synced.unwrap_or(stopped);
                let pkg = tm.package_sent.unwrap_or(t).min(t);
                let fsync = self
                    .final_sync
                    .as_ref()
                    .map(|f| f.sync_us as f64 / 1e3)
                    .unwrap_or(0.0);
                let sw = self
                    .report
                    .switchover_ms
                    .get_or_insert_with(Default::default);
                sw.stop = ms(stopped - stop);
                sw.final_sync = fsync;
                sw.discard = (ms(synced - stopped) - fsync).max(0.0);
                sw.package = ms(pkg.saturating_duration_since(synced));
                sw.dest_start = ms(t - pkg);
            }
            SrcAction::Completed => {
                if self.report.switched_to_postcopy {
                    if let Some(stop) = self.times.stop {
                        self.report.postcopy_phase_ms = Some(ms(stop.elapsed()));
                    }
                }
                if let Some(t0) = self.t0 {
                    self.report.total_time_ms = ms(t0.elapsed());
                }
                self.release_guest();
                self.start_verify()?;
            }
            SrcAction::Finish => {
                let control = self.control.as_mut().expect("connected");
                control.send(&ControlMsg::Finish)?;
            }
            SrcAction::Done => {}
        }
        Ok(())
    }

    /// Before the stop that commits to postcopy: the page-server must run
    /// and the return path and urgent connection must still be open (a
    /// destination that closed one would leave the guest starving after
    /// the point of no return).
    fn check_postcopy_channels(&self) -> Result<(), MigError> {
        if !self.s.is_alive("page-server") {
            return Err(MigError::Setup(
                "the page-server is not running: postcopy could not serve a fault; not switching"
                    .into(),
            ));
        }
        for (i, conn) in self.conns.iter().enumerate() {
            let what = match i {
                0 => "main stream".to_string(),
                1 => "return path".to_string(),
                2 => "urgent connection".to_string(),
                n => format!("bulk stream {}", n - 2),
            };
            if let Some(why) = net::closed(conn) {
                return Err(MigError::Setup(format!(
                    "the {what} to the destination is {why}: postcopy could not run; not switching"
                )));
            }
        }
        Ok(())
    }

    /// The migration's figures now (the control socket's `query`).
    fn snapshot(&self) -> Snapshot {
        self.telemetry.snapshot(&source_reading!(self))
    }

    /// A timeline sample and a progress redraw, when due (every 50 ms).
    fn sample(&mut self) {
        let reading = source_reading!(self);
        if self.telemetry.sample(&reading) && self.progress.enabled() {
            self.progress.tick(&self.telemetry.snapshot(&reading));
        }
    }

    fn record_round(&mut self, stats: RoundStats) {
        self.report.rounds.push(RoundReport {
            sync: stats.sync_count,
            pages: stats.round_pages,
            zero_pages: stats.round_zero_pages,
            bytes: stats.round_bytes,
            ms: stats.round_us as f64 / 1e3,
            pending_pages: stats.pending_pages,
            bandwidth_mbps: stats.bandwidth * 8.0 / 1e6,
            dirty_pages_per_s: stats.dirty_rate,
        });
        self.round_left = Some(stats.pending_pages);
        log::info!(
            "sync {}: {} pending pages, round {:.0} Mbit/s (estimate {:.0}), {:.0} dirty pages/s",
            stats.sync_count,
            stats.pending_pages,
            stats.bandwidth * 8.0 / 1e6,
            self.m.policy().bandwidth() * 8.0 / 1e6,
            stats.dirty_rate
        );
        self.last_round = Some(stats);
    }

    fn run(&mut self) -> Result<(), MigError> {
        self.start_guest()?;
        self.await_boot()?;
        self.idle(self.opts.warmup)?;
        self.run_attempt()
    }

    /// One migration of the running guest: setup, then the machine drives.
    fn run_attempt(&mut self) -> Result<(), MigError> {
        let t0 = Instant::now();
        self.t0 = Some(t0);
        self.setup()?;
        self.report.setup_time_ms = ms(t0.elapsed());
        let judged = self.m.roles_started()?;
        self.after_judging(judged)?;
        // From here the machine drives: every event is judged and its
        // steps done in on_event, until the destination lists its
        // processes (or something fails).
        while !self.m.is_over() {
            self.idle(Duration::from_millis(100))?;
        }
        Ok(())
    }

    fn start_guest(&mut self) -> Result<(), MigError> {
        let mut guest: Child<ToGuest, FromGuest> = spawn::spawn("postcopy-guest")?;
        self.s.watch("postcopy-guest", guest.pid);
        events::forward(
            guest.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "postcopy-guest",
            events::guest_event,
        );
        guest.send(ToGuest::Init(GuestInit {
            config: self.opts.guest.clone(),
            side: Side::Source,
        }))?;
        let serial = if self.opts.guest.kind == GuestKind::Kvm {
            let path = self.opts.serial_log.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("postcopy-{}-source.serial", short(self.id)))
            });
            let f = File::create(&path)
                .map_err(|e| MigError::io(format!("serial log {}", path.display()), e))?;
            self.serial_path = Some(path.display().to_string());
            Some(f)
        } else {
            None
        };
        match &serial {
            Some(f) => guest.send_fds(&[("memory", self.memfd.as_fd()), ("serial", f.as_fd())])?,
            None => guest.send_fds(&[("memory", self.memfd.as_fd())])?,
        }
        self.guest = Some(guest);
        let base = self.wait("the guest to start", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Ready { base, state_bytes }) => Ok((base, state_bytes)),
            other => Err(other),
        })?;
        let (base, state_bytes) = base;
        self.guest_base = base;
        self.m.policy_mut().set_state_bytes(state_bytes);
        self.state_bytes = state_bytes;
        let mut fds = self.guest().recv_fds()?;
        let uffd = fds
            .take("uffd")
            .map_err(|e| MigError::Setup(e.to_string()))?;
        let pagemap = fds
            .take("pagemap")
            .map_err(|e| MigError::Setup(e.to_string()))?;
        self.guest_fds = vec![uffd, pagemap];
        self.guest().send(ToGuest::Run)?;
        self.wait("the guest to run", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Running) => Ok(()),
            other => Err(other),
        })?;
        self.report.serial_log_source = self.serial_path.clone();
        Ok(())
    }

    /// Waits until the guest is past its start-up (ab: memory zeroed; idle:
    /// memory filled; KVM: its first serial marker, which the built-in
    /// sector writes after its first full pass). Warm-up counts from there.
    /// A guest that never says so (a sector that never writes COM1) gets a
    /// warning after a minute and is migrated anyway.
    fn await_boot(&mut self) -> Result<(), MigError> {
        const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
        let t = Instant::now();
        while t.elapsed() < BOOT_TIMEOUT {
            self.guest().send(ToGuest::Ping)?;
            let booted = self.wait("guest progress", Some(STEP_TIMEOUT), |ev| match ev {
                Event::Guest(FromGuest::Progress { booted, .. }) => Ok(booted),
                other => Err(other),
            })?;
            if booted {
                log::info!("guest booted in {:.1} s", t.elapsed().as_secs_f64());
                return Ok(());
            }
            self.idle(Duration::from_millis(20))?;
        }
        log::warn!(
            "the guest did not finish starting up in {} s; migrating anyway",
            BOOT_TIMEOUT.as_secs()
        );
        Ok(())
    }

    /// Control handshake, then the data connections and the roles.
    fn setup(&mut self) -> Result<(), MigError> {
        let ctrl = net::connect(
            &self.opts.transport,
            &self.to,
            ConnKind::Control,
            self.id,
            self.opts.link_timeout,
        )?;
        // From here every control message arrives as an event, so a signal
        // or a dying process is noticed while we wait for the peer.
        let control = self
            .control
            .insert(Control::new(ctrl, self.s.tx.clone()).map_err(|e| MigError::io("control", e))?);
        self.s.peer_heard = Instant::now();
        control.send(&ControlMsg::Setup(SetupRequest {
            migration: self.id,
            guest: self.opts.guest.clone(),
            page_size: PAGE_SIZE as u32,
            postcopy: self.opts.postcopy,
            verify: self.opts.verify,
            verify_ranges: self.opts.verify_ranges.clone(),
            streams: self.opts.streams,
        }))?;
        self.m.setup_sent()?;
        let answer = self.wait(
            "the destination to accept",
            Some(STEP_TIMEOUT),
            |ev| match ev {
                Event::Peer(ControlMsg::SetupAccepted(a)) => Ok(Ok(a)),
                Event::Peer(ControlMsg::SetupRefused { reason }) => Ok(Err(reason)),
                other => Err(other),
            },
        )?;
        match answer {
            Err(reason) => return Err(MigError::Refused(reason)),
            Ok(a) if self.opts.postcopy != PostcopyMode::Never && !a.postcopy_ready => {
                return Err(MigError::Refused(
                    "the destination cannot take postcopy".into(),
                ))
            }
            Ok(_) => {}
        }
        let (sent, sent_fd) = SharedBitmap::create("postcopy-sent", self.layout.pages())
            .map_err(|e| MigError::Setup(format!("sent bitmap: {e}")))?;
        let (counters, counters_fd) = SharedCounters::create("postcopy-counters")
            .map_err(|e| MigError::Setup(format!("counters: {e}")))?;
        self.counters = Some(counters);
        self.sent = Some(sent);
        self.held = vec![sent_fd, counters_fd];
        self.start_data_roles(SenderStart::Precopy)
    }

    /// Opens the data connections and starts the ram-sender and the
    /// page-server on them, with the shared bitmaps and counters: at setup,
    /// and again after a resync (the same fds, fresh connections).
    fn start_data_roles(&mut self, start: SenderStart) -> Result<(), MigError> {
        let connect = |kind| {
            net::connect(
                &self.opts.transport,
                &self.to,
                kind,
                self.id,
                self.opts.link_timeout,
            )
        };
        let main = connect(ConnKind::Main)?;
        net::limit_unsent(&main.stream, 256 << 10);
        let ret = connect(ConnKind::ReturnPath)?;
        let urgent = connect(ConnKind::Urgent)?;
        // The extra bulk streams, each its own connection (and with TLS its
        // own session), like the main stream.
        let mut bulk = Vec::new();
        for n in 1..self.opts.streams {
            let c = connect(ConnKind::Bulk(n as u8))?;
            net::limit_unsent(&c.stream, 256 << 10);
            bulk.push(c);
        }

        let mut sender: Child<ToRamSender, FromRamSender> = spawn::spawn("ram-sender")?;
        self.watch_role("ram-sender", sender.pid);
        self.gates.sender = events::forward(
            sender.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "ram-sender",
            events::sender_event,
        );
        let mut server: Child<ToPageServer, FromPageServer> = spawn::spawn("page-server")?;
        self.watch_role("page-server", server.pid);
        self.gates.server = events::forward(
            server.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "page-server",
            events::server_event,
        );
        server.send(ToPageServer::Start(ServerSetup {
            layout: self.layout,
            return_tls: ret.tls.clone().map(Box::new),
            urgent_tls: urgent.tls.clone().map(Box::new),
            prefetch: self.opts.prefetch_pages,
        }))?;
        server.send_fds(&[
            ("memory", self.memfd.as_fd()),
            ("sent", self.held[0].as_fd()),
            ("return", ret.as_fd()),
            ("urgent", urgent.as_fd()),
            ("counters", self.held[1].as_fd()),
        ])?;
        sender.send(ToRamSender::Start(SenderSetup {
            layout: self.layout,
            guest_base: self.guest_base,
            max_bandwidth: self.opts.max_bandwidth,
            max_postcopy_bandwidth: self.opts.max_postcopy_bandwidth,
            resume: start,
            main_tls: main.tls.clone().map(Box::new),
            streams: self.opts.streams,
            bulk_tls: bulk.iter().map(|c| c.tls.clone().map(Box::new)).collect(),
        }))?;
        let mut fds = vec![
            ("memory", self.memfd.as_fd()),
            ("pagemap", self.guest_fds[1].as_fd()),
            ("uffd", self.guest_fds[0].as_fd()),
            ("sent", self.held[0].as_fd()),
            ("main", main.as_fd()),
            ("counters", self.held[1].as_fd()),
        ];
        for (n, c) in bulk.iter().enumerate() {
            fds.push((common::msg::BULK_FD_NAMES[n + 1], c.as_fd()));
        }
        sender.send_fds(&fds)?;
        drop(fds);
        // Main stream, return path, urgent connection, then the extra bulk
        // streams in order.
        self.conns = [main.stream, ret.stream, urgent.stream]
            .into_iter()
            .chain(bulk.into_iter().map(|c| c.stream))
            .collect();
        self.sender = Some(sender);
        self.server = Some(server);
        self.s.sender_heard = Instant::now();
        Ok(())
    }

    /// Watches a new data role: the first of its name, or the successor of
    /// one that was retired (counted as a restart).
    fn watch_role(&mut self, name: &'static str, pid: u32) {
        if self.s.procs.iter().any(|p| p.name == name) {
            let n = self.s.replace(name, pid);
            self.report.note(
                self.s.started,
                "restart",
                format!("{name} started again (restart {n}, pid {pid})"),
            );
        } else {
            self.s.watch(name, pid);
        }
    }

    /// A source data role died or failed (`e` says how): the migration
    /// resyncs with fresh roles and connections, unless the role died
    /// more than `--max-restarts` times, or nothing can be resumed.
    fn on_role_failure(&mut self, e: MigError) -> Result<(), MigError> {
        let Some(name @ ("ram-sender" | "page-server")) = e.child() else {
            return Err(e);
        };
        // Link trouble is free once the package is out (a postcopy
        // migration that gives up strands the guest); before it, it counts:
        // failing is safe there (the guest runs on here), and a link that
        // resets every stream would start precopy over for ever.
        if !(e.is_link_trouble() && self.m.state().package_out()) {
            let crashes = self.crashes.entry(name).or_default();
            if *crashes >= self.opts.max_restarts {
                return Err(MigError::Setup(format!(
                    "{e}; {name} failed and was restarted {crashes} times already (--max-restarts {})",
                    self.opts.max_restarts
                )));
            }
            *crashes += 1;
        }
        log::warn!("{e}: restarting the data roles");
        self.resync(&e.to_string())
    }

    /// Starts a resync: retires both data roles and their connections and
    /// asks the destination for what it has (`ResyncReady` answers).
    fn resync(&mut self, reason: &str) -> Result<(), MigError> {
        self.begin_resync(self.epoch + 1, reason, true)
    }

    /// Resync `epoch`: retires the data roles; `ask`: send `Resync` (the
    /// destination's `ResyncReady` answers; without `ask` it is on its way).
    fn begin_resync(&mut self, epoch: u32, reason: &str, ask: bool) -> Result<(), MigError> {
        let needed = match self.m.begin_resync(epoch) {
            Ok(n) => n,
            Err(_) => {
                return Err(MigError::Setup(format!(
                    "{reason} (nothing to resume from)"
                )))
            }
        };
        self.retire_data_roles();
        if !needed {
            log::info!("every page is on the destination: no data roles needed any more");
            return Ok(());
        }
        self.epoch = epoch;
        self.report
            .note(self.s.started, "resync", format!("epoch {epoch}: {reason}"));
        if let Some(c) = self.control.as_mut().filter(|_| ask) {
            c.send(&ControlMsg::Resync {
                epoch,
                reason: reason.to_string(),
            })?;
        }
        self.after_judging(Judged::Act(vec![]))
    }

    /// The control connection (or a data connection) to the destination
    /// is lost. After the package this pauses the migration: the data
    /// roles go, and the source reconnects with backoff (`try_reconnect`).
    /// Before it, the migration fails (the source guest runs on).
    fn on_link_lost(&mut self, e: MigError) -> Result<(), MigError> {
        let epoch = self.epoch + 1;
        if !self.m.pause(epoch)? {
            return Err(e);
        }
        self.epoch = epoch;
        self.report.note(
            self.s.started,
            "pause",
            match self.on_hold {
                true => e.to_string(),
                false => format!("{e}; reconnecting to {}", self.to),
            },
        );
        self.retire_data_roles();
        if let Some(mut c) = self.control.take() {
            let gate = c.gate.clone();
            self.s.retire(CONTROL, &gate);
            c.shutdown();
        }
        self.reconnect = Reconnect {
            at: Instant::now() + RECONNECT_FIRST,
            backoff: RECONNECT_FIRST,
        };
        self.after_judging(Judged::Act(vec![]))
    }

    /// Paused: one try to reach the destination again, when it is due (or
    /// forced by `postcopy recover`). On success the resync starts.
    fn try_reconnect(&mut self) -> Result<(), MigError> {
        if self.on_hold || Instant::now() < self.reconnect.at {
            return Ok(());
        }
        let within = self.reconnect.backoff.max(Duration::from_secs(1));
        match net::connect_within(
            &self.opts.transport,
            &self.to,
            ConnKind::Control,
            self.id,
            self.opts.link_timeout,
            within,
        ) {
            Ok(stream) => {
                let control = Control::new(stream, self.s.tx.clone())
                    .map_err(|e| MigError::io("control", e))?;
                self.control = Some(control);
                self.s.peer_heard = Instant::now();
                let epoch = self.epoch;
                self.m.link_back(epoch)?;
                self.report.note(
                    self.s.started,
                    "recover",
                    format!("reconnected to {}", self.to),
                );
                let sent = self
                    .control
                    .as_mut()
                    .expect("just set")
                    .send(&ControlMsg::Resync {
                        epoch,
                        reason: "reconnected after losing the link".into(),
                    });
                if let Err(e) = sent {
                    return self.on_link_lost(e.into());
                }
                self.after_judging(Judged::Act(vec![]))
            }
            Err(e) => {
                log::info!(
                    "still no link to {} ({e}); next try in {:.1} s",
                    self.to,
                    self.reconnect.backoff.as_secs_f64()
                );
                self.reconnect.at = Instant::now() + self.reconnect.backoff;
                self.reconnect.backoff = (self.reconnect.backoff * 2).min(RECONNECT_MAX);
                Ok(())
            }
        }
    }

    /// Kills the ram-sender and page-server and closes their connections;
    /// nothing more of them is heard.
    fn retire_data_roles(&mut self) {
        let (sg, vg) = (self.gates.sender.clone(), self.gates.server.clone());
        self.s.retire("ram-sender", &sg);
        self.s.retire("page-server", &vg);
        self.sender = None;
        self.server = None;
        self.conns.clear();
    }

    /// The destination has every page: the source guest can go.
    fn release_guest(&mut self) {
        if let Some(g) = &self.guest {
            self.s.set_quitting("postcopy-guest");
            let _ = g.send(ToGuest::Quit);
        }
        self.report.source_guest = Some("released".into());
    }

    /// Starts the memory check: with digests, the source memory (frozen
    /// since the stop) is digested off the main thread, so heartbeats go on
    /// for a big guest, and sent when ready (`poll_digests`).
    fn start_verify(&mut self) -> Result<(), MigError> {
        if self.opts.verify != VerifyMethod::Digest {
            return Ok(());
        }
        let mem = Mapping::new(
            self.memfd.as_fd(),
            self.layout.mem_bytes() as usize,
            Access::ReadOnly,
        )
        .map_err(|e| MigError::Setup(format!("mapping source memory: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(verify::digests(&mem));
        });
        self.digests = Some(rx);
        Ok(())
    }

    /// Sends the source digests once they are computed.
    fn poll_digests(&mut self) -> Result<(), MigError> {
        let Some(rx) = &self.digests else {
            return Ok(());
        };
        let digests = match rx.try_recv() {
            Ok(d) => d,
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return Err(MigError::Setup("the digest thread died".into()))
            }
        };
        self.digests = None;
        let control = self.control.as_mut().expect("connected");
        for (i, chunk) in digests.chunks(1 << 20).enumerate() {
            control.send(&ControlMsg::SourceDigests {
                first: (i as u64) << 20,
                digests: chunk.to_vec(),
            })?;
        }
        control.send(&ControlMsg::SourceDigestsEnd)?;
        Ok(())
    }

    /// After a failure before the package: the seed's rule, resume the
    /// source guest (`stopped`: it was asked to stop, whether or not it
    /// answered); then show that it runs and its memory is intact.
    fn keep_source_running(&mut self, stopped: bool) {
        let Some(guest) = &self.guest else { return };
        if !self.s.is_alive("postcopy-guest") || self.s.is_quitting("postcopy-guest") {
            self.report.source_guest = Some("gone".into());
            return;
        }
        if stopped && guest.send(ToGuest::Resume).is_err() {
            self.report.source_guest = Some("unreachable".into());
            return;
        }
        let ops = |src: &mut Source| -> Option<(u64, bool)> {
            src.guest().send(ToGuest::Ping).ok()?;
            src.wait(
                "guest progress",
                Some(Duration::from_secs(5)),
                |ev| match ev {
                    Event::Guest(FromGuest::Progress { ops, running, .. }) => Ok((ops, running)),
                    other => Err(other),
                },
            )
            .ok()
        };
        let drain = |src: &mut Source| {
            // Errors here are the failure we are already reporting.
            let _ = src.wait("the guest", Some(Duration::from_secs(5)), |ev| match ev {
                Event::Guest(FromGuest::Running) | Event::Guest(FromGuest::Stopped) => Ok(()),
                other => Err(other),
            });
        };
        if stopped {
            drain(self);
        }
        // Running: the guest says its workers or vCPUs run and it answers.
        // Progress over the sample is shown too (an idle workload, or a KVM
        // guest between two serial markers, makes none in 300 ms).
        let a = ops(self);
        std::thread::sleep(Duration::from_millis(300));
        let b = ops(self);
        self.report.source_guest = Some(
            match (a, b) {
                (Some((a, _)), Some((b, true))) if b > a => "running",
                (Some(_), Some((_, true))) => "running (no progress in 300 ms)",
                (Some(_), Some((_, false))) => "stopped",
                _ => "unresponsive",
            }
            .into(),
        );
        if self.opts.verify == VerifyMethod::Ab && self.guest().send(ToGuest::Stop).is_ok() {
            drain(self);
            if let Ok(mem) = Mapping::new(
                self.memfd.as_fd(),
                self.layout.mem_bytes() as usize,
                Access::ReadOnly,
            ) {
                self.report.source_verify = Some(VerifyReport::from_result(verify::ab_check(
                    &mem,
                    &self.opts.verify_ranges,
                )));
            }
            let _ = self.guest().send(ToGuest::Resume);
            drain(self);
        }
    }

    /// Ends one attempt: settles the source guest's fate, quits the roles
    /// and returns the attempt's report. With `--keep-guest`, a guest left
    /// running here (a cancel, a failure before the switch) stays, with its
    /// memory and its fds, for `retry`.
    fn conclude(&mut self, result: Result<(), MigError>) -> Report {
        self.progress.clear();
        self.telemetry.last_sample(&source_reading!(self));
        self.report.timeline = self.telemetry.timeline().to_vec();
        // What the source guest needs is decided by where the migration
        // stood when it ended; from here events no longer fail it.
        let fate = self.m.state().guest_fate();
        let outcome = match &result {
            Ok(()) => MigrationState::Completed,
            Err(MigError::Cancelled(_)) => MigrationState::Cancelled,
            Err(_) => MigrationState::Failed,
        };
        self.m.end(outcome);
        let t_end = self.t0.map(|t| ms(t.elapsed()));
        match &result {
            Ok(()) => {
                self.report.status = "completed".into();
            }
            Err(e) => {
                log::error!("migration failed: {e}");
                let cancelled = matches!(e, MigError::Cancelled(_));
                self.report.status = if cancelled { "cancelled" } else { "failed" }.into();
                self.report.error = Some(e.to_string());
                if self.report.total_time_ms == 0.0 {
                    self.report.total_time_ms = t_end.unwrap_or(0.0);
                }
                // Roles first, so none of them trips over the peer leaving.
                self.quit_roles();
                if let Some(c) = self.control.as_mut() {
                    let _ = c.send(&ControlMsg::Abort {
                        reason: e.to_string(),
                        cancelled,
                        guest_ran: true,
                    });
                }
                if self.report.source_guest.is_some() {
                    // Released after completion: a later failure (say, of
                    // the memory check) changes nothing for it.
                } else if fate == GuestFate::Frozen && self.s.peer_guest_ran == Some(false) {
                    // The destination says its guest never ran: no second
                    // copy exists, so the source may carry on.
                    log::warn!("the destination never ran the guest: resuming it here");
                    self.keep_source_running(true);
                } else if fate == GuestFate::Frozen {
                    self.report.source_guest = Some(
                        "frozen: the destination may be running the guest; the source never resumes it"
                            .into(),
                    );
                } else {
                    self.keep_source_running(fate == GuestFate::Resume);
                }
                if self.report.verify.mismatches.is_none() {
                    self.report.verify.detail = "migration did not complete".into();
                }
            }
        }
        totals(&mut self.report, self.counters.as_ref(), self.dest.as_ref());
        self.keep = self.opts.keep_guest
            && result.is_err()
            && self
                .report
                .source_guest
                .as_deref()
                .is_some_and(|g| g.starts_with("running"));
        let status = self.report.status.clone();
        self.report.note(
            self.s.started,
            "end",
            format!("the migration ended: {status}"),
        );
        // Quit whatever still runs and collect how each ended.
        self.quit_roles();
        if !self.keep {
            self.s.set_quitting("postcopy-guest");
            if let Some(c) = &self.guest {
                let _ = c.send(ToGuest::Quit);
            }
        }
        if let Some(c) = self.control.as_mut() {
            c.shutdown();
        }
        self.control = None;
        // Closing our ends of the links also frees a role still waiting
        // for its fds.
        self.sender = None;
        self.server = None;
        self.conns.clear();
        if !self.keep {
            self.guest = None;
        }
        if result.is_err() {
            // The demo's destination may still wait for a migration that
            // will not come.
            self.s.terminate("postcopy incoming");
        }
        let keep = self.keep.then_some("postcopy-guest");
        self.s.reap_but(Duration::from_secs(5), keep);
        let mut roles: Vec<RoleReport> = self.s.role_infos().iter().map(RoleReport::from).collect();
        roles.append(&mut self.report.roles);
        self.report.roles = roles;
        self.report.cost.cpu = Some(CpuReport::measure(
            &self.report.roles,
            "source",
            self.report.mem_bytes,
        ));
        self.report.attempts = self.attempts.clone();
        self.publish();
        self.report.clone()
    }

    /// True when the last attempt kept the guest for a retry.
    fn kept(&self) -> bool {
        self.keep
    }

    /// The report of the last attempt (the control socket goes with us).
    fn finish(self, report: Report) -> Report {
        report
    }

    /// `--keep-guest`, after an attempt that left the guest running here:
    /// waits for `retry` (runs the next attempt and returns its result) or
    /// `quit` / a signal / the guest's end (`Err`: how the guest ends, for
    /// the report's `source_guest`).
    fn await_retry(&mut self, report: Report) -> Result<Result<(), MigError>, String> {
        self.attempts.push(crate::report::Attempt {
            migration_id: report.migration_id.clone(),
            status: report.status.clone(),
            error: report.error.clone(),
            total_time_ms: report.total_time_ms,
            source_guest: report.source_guest.clone(),
        });
        self.last_report = Some(report);
        self.publish();
        loop {
            let Some(ev) = self.s.next_event(Duration::from_millis(500)) else {
                continue;
            };
            match ev {
                Event::Command(Command::Retry(to), reply) => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                    if let Err(e) = self.new_attempt(to) {
                        log::error!("cannot start another attempt: {e}");
                        return Err(format!("ended: no other attempt could start ({e})"));
                    }
                    return Ok(self.run_attempt());
                }
                Event::Command(Command::Quit, reply) => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                    return Err("ended by quit".into());
                }
                Event::Command(Command::Set(setting), reply) => {
                    let r = self.apply(setting);
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Event::Command(_, Some(reply)) => {
                    let _ = reply.send(Err(KEPT.into()));
                }
                Event::Interrupt(sig) => {
                    log::info!("signal {sig}: ending with the kept guest");
                    return Err(format!("ended by signal {sig}"));
                }
                Event::Exited { pid, status } => {
                    if let Some(p) = self.s.exited(pid, status) {
                        log::error!("{} (pid {pid}) ended: {status}", p.name);
                        if p.name == "postcopy-guest" {
                            return Err(format!("gone: it ended while kept ({status})"));
                        }
                    }
                }
                Event::ChannelClosed("postcopy-guest") => {
                    log::error!("the kept guest stopped talking to the supervisor");
                    return Err("gone: it stopped talking to the supervisor while kept".into());
                }
                _ => {}
            }
        }
    }

    /// Ends a supervisor that kept its guest: the guest goes now. Returns
    /// the last attempt's report, its `source_guest` saying how the guest
    /// ended (`how`).
    fn finish_kept(mut self, how: String) -> Report {
        self.s.set_quitting("postcopy-guest");
        if let Some(c) = &self.guest {
            let _ = c.send(ToGuest::Quit);
        }
        self.guest = None;
        self.s.reap_all(Duration::from_secs(5));
        let mut report = self.last_report.take().unwrap_or_default();
        report.source_guest = Some(how);
        report.attempts = self.attempts.clone();
        report.attempts.pop();
        report
    }

    /// Starts over for another attempt of the same guest: a new migration
    /// id, a fresh state machine and report; the guest, its memory and its
    /// fds stay.
    fn new_attempt(&mut self, to: Option<String>) -> Result<(), MigError> {
        if let Some(to) = to {
            self.to = to;
        }
        self.id =
            MigrationId::random().map_err(|e| MigError::Setup(format!("no migration id: {e}")))?;
        let policy = Policy::new(
            self.opts.postcopy,
            self.opts.downtime_limit,
            self.opts.postcopy_after_syncs,
            self.state_bytes,
            self.opts.max_bandwidth,
        );
        self.m = SourceMachine::new(policy, self.layout.pages());
        self.state_since = (self.m.state().name(), Instant::now());
        self.report = new_report(&self.opts, self.id);
        self.report.serial_log_source = self.serial_path.clone();
        self.report.note(
            self.s.started,
            "retry",
            format!("attempt {} to {}", self.attempts.len() + 1, self.to),
        );
        self.times = Times::default();
        // The report's timeline and the live figures are this attempt's.
        self.telemetry = Telemetry::new("source", self.s.started, self.opts.guest.mem_bytes);
        self.round_left = None;
        self.saved_state = None;
        self.last_round = None;
        self.final_sync = None;
        self.counters = None;
        self.dest = None;
        self.digests = None;
        self.control = None;
        self.conns.clear();
        self.held.clear();
        self.sent = None;
        self.gates = Gates::default();
        self.epoch = 0;
        self.crashes.clear();
        self.on_hold = false;
        self.keep = false;
        self.t0 = None;
        self.s.new_attempt();
        if let Some(c) = self.ctl.as_mut() {
            c.new_report();
        }
        self.publish();
        Ok(())
    }

    fn quit_roles(&mut self) {
        for name in ["ram-sender", "page-server"] {
            self.s.set_quitting(name);
        }
        if let Some(c) = &self.sender {
            let _ = c.send(ToRamSender::Quit);
        }
        if let Some(c) = &self.server {
            let _ = c.send(ToPageServer::Quit);
        }
    }
}

/// The report's totals from the roles' running counts (`counters`) and
/// the destination's summary (`dest`).
fn totals(r: &mut Report, counters: Option<&SharedCounters>, dest: Option<&DestSummary>) {
    // The roles' own running counts, not the end-of-step messages: a round
    // cut short, a push that failed and a role that died count for what
    // they sent.
    if let Some(c) = counters {
        let g = |k| c.get(k);
        r.precopy_bytes = g(Counter::PrecopyBytes);
        r.downtime_bytes = g(Counter::DowntimeBytes);
        r.postcopy_bytes = g(Counter::PushBytes) + g(Counter::UrgentBytes);
        r.pages_sent = g(Counter::PrecopyPages)
            + g(Counter::DowntimePages)
            + g(Counter::PushPages)
            + g(Counter::UrgentPages);
        r.zero_pages = g(Counter::PrecopyZeroPages)
            + g(Counter::DowntimeZeroPages)
            + g(Counter::PushZeroPages)
            + g(Counter::UrgentZeroPages);
        r.dirty_sync_count = u32::try_from(g(Counter::DirtySyncs)).unwrap_or(u32::MAX);
    }
    let bytes_total = r.precopy_bytes + r.downtime_bytes + r.postcopy_bytes;
    if r.total_time_ms > 0.0 {
        r.throughput_mbps = bytes_total as f64 * 8.0 / (r.total_time_ms / 1e3) / 1e6;
    }
    if let Some(d) = dest {
        if let Some(pc) = &d.postcopy {
            r.postcopy_requests = pc.requests;
            r.postcopy_faults = pc.faults;
            r.pages_urgent = pc.pages_urgent;
            r.pages_background = pc.pages_background;
            r.postcopy_blocktime_ms = Some(pc.blocktime_us as f64 / 1e3);
            r.postcopy_vcpu_blocktime = VcpuBlocktime::from_stats(pc);
            r.fault_latency_us = Some(pc.latency.clone());
            r.cost.fault_path_us = pc.fault_path.clone();
        }
        r.serial_log_destination = d.serial_log.clone();
        if d.serial_log.is_some() {
            r.serial_bytes_destination = Some(d.serial_bytes);
        }
    }
}

/// A source report before anything happened.
fn new_report(opts: &SourceOpts, id: MigrationId) -> Report {
    let mut report = Report {
        status: "failed".into(),
        side: "source".into(),
        transport: opts.transport.name().into(),
        migration_id: id.to_string(),
        guest: opts.guest.kind.to_string(),
        workload: opts.guest.workload.name().to_string(),
        vcpus: opts.guest.vcpus,
        mem_bytes: opts.guest.mem_bytes,
        page_size: PAGE_SIZE as u64,
        postcopy_mode: opts.postcopy.to_string(),
        downtime_limit_ms: opts.downtime_limit.as_millis() as u64,
        max_bandwidth: opts.max_bandwidth,
        max_postcopy_bandwidth: opts.max_postcopy_bandwidth,
        prefetch_pages: opts.prefetch_pages,
        streams: opts.streams,
        verify: VerifyReport::none("not reached"),
        ..Default::default()
    };
    report.verify.method = opts.verify.to_string();
    report
}

/// What a kept supervisor answers to commands other than retry and quit.
const KEPT: &str =
    "no migration is running: the guest is kept here after the last attempt (retry or quit)";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// First 8 hex digits of an id, for file names.
pub fn short(id: MigrationId) -> String {
    id.to_string()[..8].to_string()
}
