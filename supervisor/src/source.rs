//! The source supervisor: starts the guest, connects to the destination,
//! starts ram-sender and page-server, and drives the migration through its
//! states (docs/state-machine.md). The failure rule is QEMU's: before the
//! package is on the wire the source guest is resumed and keeps running;
//! after it, the destination may be running the only live copy, so the
//! source never resumes its guest by itself.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::bitmap::SharedBitmap;
use common::control::{ControlMsg, DestSummary, PostcopyMode, SetupRequest, VerifyMethod};
use common::guest::GuestKind;
use common::mem::{create_memfd, Access, Mapping};
use common::msg::{
    FinalSync, FromGuest, FromPageServer, FromRamSender, GuestInit, PushStats, RoundStats,
    SenderSetup, ServerSetup, ServerStats, Side, ToGuest, ToPageServer, ToRamSender,
};
use common::state::{MigrationState, StateMachine};
use common::types::{MemLayout, MigrationId, RemoteAddr, PAGE_SIZE};
use common::wire::{ConnKind, Package};

use crate::cli::SourceOpts;
use crate::ctlsock::{CommandSocket, Phase};
use crate::error::MigError;
use crate::events::{self, Event};
use crate::net::{self, Control};
use crate::policy::{Decision, Policy};
use crate::progress::ProgressLine;
use crate::report::{Report, RoleReport, RoundReport, SwitchoverReport, VerifyReport};
use crate::session::{EventLoop, Session};
use crate::spawn::{self, Child};
use crate::verify;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Source {
    opts: SourceOpts,
    to: String,
    id: MigrationId,
    layout: MemLayout,
    s: Session,
    sm: StateMachine,
    report: Report,
    progress: ProgressLine,
    memfd: OwnedFd,
    serial_path: Option<String>,
    guest: Option<Child<ToGuest, FromGuest>>,
    guest_fds: Vec<OwnedFd>,
    guest_base: RemoteAddr,
    sender: Option<Child<ToRamSender, FromRamSender>>,
    server: Option<Child<ToPageServer, FromPageServer>>,
    control: Option<Control>,
    /// Data connections and the sent bitmap: held here so a role restart
    /// could hand them over again.
    held: Vec<OwnedFd>,
    start_requested: bool,
    guest_stopped: bool,
    package_sent: bool,
    t0: Option<Instant>,
    last_round: Option<RoundStats>,
    final_sync: Option<FinalSync>,
    push: Option<PushStats>,
    served: Option<ServerStats>,
    dest: Option<DestSummary>,
    /// The last MARK the destination has processed.
    dest_mark: u64,
    /// The migration has ended; events no longer fail it.
    finishing: bool,
    /// The last progress report: when, and bytes sent by then.
    last_progress: Option<(Instant, u64)>,
    /// The ram-sender has work and should be talking.
    awaiting_sender: bool,
    /// The guest's estimate of its saved state, bytes.
    state_bytes: u64,
    /// Where `postcopy start-postcopy` reaches this migration.
    cmd_socket: Option<CommandSocket>,
}

/// Runs a migration of a new guest to `to` and returns its report.
/// `extra` are processes already started (the demo's destination) to list.
pub fn migrate(opts: SourceOpts, to: String, extra: &[(&'static str, u32)]) -> Report {
    let layout = MemLayout::new(opts.guest.mem_bytes).expect("checked by the CLI");
    let mut report = Report {
        status: "failed".into(),
        side: "source".into(),
        guest: opts.guest.kind.to_string(),
        workload: opts.guest.workload.name().to_string(),
        vcpus: opts.guest.vcpus,
        mem_bytes: opts.guest.mem_bytes,
        page_size: PAGE_SIZE as u64,
        postcopy_mode: opts.postcopy.to_string(),
        downtime_limit_ms: opts.downtime_limit.as_millis() as u64,
        max_bandwidth: opts.max_bandwidth,
        verify: VerifyReport::none("not reached"),
        ..Default::default()
    };
    report.verify.method = opts.verify.to_string();
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
    let mut src = Source {
        opts,
        to,
        id,
        layout,
        s,
        sm: StateMachine::new(),
        report,
        progress: ProgressLine::new(),
        memfd,
        serial_path: None,
        guest: None,
        guest_fds: Vec::new(),
        guest_base: RemoteAddr(0),
        sender: None,
        server: None,
        control: None,
        held: Vec::new(),
        start_requested: false,
        guest_stopped: false,
        package_sent: false,
        t0: None,
        last_round: None,
        final_sync: None,
        push: None,
        served: None,
        dest: None,
        dest_mark: 0,
        finishing: false,
        last_progress: None,
        awaiting_sender: false,
        state_bytes: 0,
        cmd_socket: None,
    };
    let phase = if src.opts.postcopy == PostcopyMode::Never {
        Phase::NoPostcopy
    } else {
        Phase::Precopy
    };
    match CommandSocket::bind(src.opts.command_socket.clone(), phase, src.s.tx.clone()) {
        Ok(c) => {
            log::info!("command socket {}", c.path().display());
            src.cmd_socket = Some(c);
        }
        Err(e) => log::warn!("no command socket ({e}); SIGUSR1 still starts postcopy"),
    }
    let result = src.run();
    src.finish(result)
}

impl EventLoop for Source {
    fn session(&mut self) -> &mut Session {
        &mut self.s
    }

    fn on_tick(&mut self) -> Result<(), MigError> {
        if self.finishing {
            return Ok(());
        }
        let link = self.opts.link_timeout;
        self.s
            .keep_alive(self.control.as_mut(), link, "destination")?;
        // A ram-sender that stops talking while it has work (stopped,
        // wedged) would hold the migration forever.
        let limit = link.max(Duration::from_secs(30));
        let silent = self.s.sender_heard.elapsed();
        if self.awaiting_sender && silent > limit {
            return Err(MigError::Role {
                name: "ram-sender",
                detail: format!("no progress for {:.0} s", silent.as_secs_f64()),
            });
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Result<(), MigError> {
        if self.finishing {
            // The migration has ended: only exits still matter.
            if let Event::Exited { pid, status } = ev {
                self.s.exited(pid, status);
            }
            return Ok(());
        }
        let Some(ev) = self.s.handle_common(ev, "destination")? else {
            return Ok(());
        };
        match ev {
            Event::Sender(FromRamSender::Progress(p)) => {
                let phase = if self.package_sent {
                    "postcopy"
                } else {
                    "precopy"
                };
                let now = Instant::now();
                let rate = match self.last_progress.replace((now, p.total_bytes)) {
                    Some((t, b)) if now > t => {
                        (p.total_bytes.saturating_sub(b)) as f64 * 8.0
                            / now.duration_since(t).as_secs_f64()
                            / 1e6
                    }
                    _ => 0.0,
                };
                let dirty = self
                    .last_round
                    .as_ref()
                    .map(|r| r.dirty_rate)
                    .unwrap_or(0.0);
                self.progress.draw(&format!(
                    "[{phase}] sync {}  sent {} pages ({} MiB)  pending {} pages  dirty {dirty:.0} pages/s  {rate:.0} Mbit/s",
                    self.last_round.as_ref().map(|r| r.sync_count).unwrap_or(1),
                    p.total_pages,
                    p.total_bytes >> 20,
                    p.round_left
                ));
                Ok(())
            }
            Event::Sender(FromRamSender::Synced(s)) => {
                // A sync that raced a switchover: the round is moot.
                log::debug!("ignoring sync {} after the switch", s.sync_count);
                Ok(())
            }
            Event::Sender(FromRamSender::Error(e)) => Err(MigError::Role {
                name: "ram-sender",
                detail: e,
            }),
            Event::Server(FromPageServer::Error(e)) => Err(MigError::Role {
                name: "page-server",
                detail: e,
            }),
            Event::Guest(FromGuest::Error(e)) => Err(MigError::Role {
                name: "guest",
                detail: e,
            }),
            Event::Guest(FromGuest::Progress { .. }) => Ok(()),
            Event::Sender(FromRamSender::PushDone(p)) => {
                self.push = Some(p);
                self.awaiting_sender = false;
                Ok(())
            }
            Event::Server(FromPageServer::Closed(st)) => {
                self.served = Some(st);
                Ok(())
            }
            Event::Peer(ControlMsg::DestMark { id }) => {
                self.dest_mark = self.dest_mark.max(id);
                Ok(())
            }
            Event::Interrupt(sig) => {
                if self.package_sent {
                    log::warn!(
                        "signal {sig}: cannot cancel in postcopy (the destination runs the guest); waiting for completion"
                    );
                    Ok(())
                } else {
                    Err(MigError::Cancelled(format!("signal {sig}")))
                }
            }
            Event::StartPostcopy => {
                if self.opts.postcopy == PostcopyMode::Never {
                    log::warn!("start-postcopy ignored: this migration runs with --postcopy never");
                } else {
                    self.start_requested = true;
                }
                Ok(())
            }
            // The destination's reports come in one order; one that jumps
            // ahead is a broken or hostile peer, not news.
            Event::Peer(ControlMsg::DestRunning { .. }) if !self.package_sent => Err(
                MigError::Protocol("DestRunning before the package was sent".into()),
            ),
            Event::Peer(ControlMsg::DestCompleted(_)) if self.report.downtime_ms.is_none() => Err(
                MigError::Protocol("DestCompleted before DestRunning".into()),
            ),
            Event::Peer(ControlMsg::Verified(_)) if self.dest.is_none() => {
                Err(MigError::Protocol("Verified before DestCompleted".into()))
            }
            Event::Peer(
                m @ (ControlMsg::Setup(_)
                | ControlMsg::SourceDigests { .. }
                | ControlMsg::SourceDigestsEnd
                | ControlMsg::Finish),
            ) => Err(MigError::Protocol(format!(
                "the destination sent {}, which only a source sends",
                m.name()
            ))),
            other => {
                self.s.stash(other);
                Ok(())
            }
        }
    }
}

impl Source {
    fn guest(&self) -> &Child<ToGuest, FromGuest> {
        self.guest.as_ref().expect("guest started")
    }

    fn sender(&self) -> &Child<ToRamSender, FromRamSender> {
        self.sender.as_ref().expect("ram-sender started")
    }

    /// Sends the ram-sender a command it must act on: from now on it
    /// should be talking (see `on_tick`).
    fn command_sender(&mut self, cmd: ToRamSender) -> Result<(), MigError> {
        self.sender().send(cmd)?;
        self.awaiting_sender = true;
        self.s.sender_heard = Instant::now();
        Ok(())
    }

    fn run(&mut self) -> Result<(), MigError> {
        self.start_guest()?;
        self.await_boot()?;
        self.idle(self.opts.warmup)?;
        let t0 = Instant::now();
        self.t0 = Some(t0);
        self.setup()?;
        self.sm.go(MigrationState::Active)?;
        self.report.setup_time_ms = ms(t0.elapsed());
        match self.precopy()? {
            Decision::Complete { expected_ms } => {
                log::info!("precopy converged (expected downtime {expected_ms:.1} ms)");
                self.complete_precopy()?
            }
            Decision::Switchover { reason } => {
                log::info!("switching to postcopy: {reason}");
                self.report.switchover_reason = Some(reason);
                self.switchover()?
            }
            Decision::Continue => unreachable!("precopy returns a final decision"),
        }
        self.report.total_time_ms = ms(t0.elapsed());
        self.release_guest();
        self.verify()?;
        self.finish_peer();
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

    /// Control handshake, then the three data connections and the roles.
    fn setup(&mut self) -> Result<(), MigError> {
        let ctrl = net::connect(&self.to, ConnKind::Control, self.id, self.opts.link_timeout)?;
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
        }))?;
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
        let main = net::connect(&self.to, ConnKind::Main, self.id, self.opts.link_timeout)?;
        net::limit_unsent(&main, 256 << 10);
        let ret = net::connect(
            &self.to,
            ConnKind::ReturnPath,
            self.id,
            self.opts.link_timeout,
        )?;
        let urgent = net::connect(&self.to, ConnKind::Urgent, self.id, self.opts.link_timeout)?;

        let (_sent, sent_fd) = SharedBitmap::create("postcopy-sent", self.layout.pages())
            .map_err(|e| MigError::Setup(format!("sent bitmap: {e}")))?;

        let mut sender: Child<ToRamSender, FromRamSender> = spawn::spawn("ram-sender")?;
        self.s.watch("ram-sender", sender.pid);
        events::forward(
            sender.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "ram-sender",
            events::sender_event,
        );
        let mut server: Child<ToPageServer, FromPageServer> = spawn::spawn("page-server")?;
        self.s.watch("page-server", server.pid);
        events::forward(
            server.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "page-server",
            events::server_event,
        );
        server.send(ToPageServer::Start(ServerSetup {
            layout: self.layout,
        }))?;
        server.send_fds(&[
            ("memory", self.memfd.as_fd()),
            ("sent", sent_fd.as_fd()),
            ("return", ret.as_fd()),
            ("urgent", urgent.as_fd()),
        ])?;
        sender.send(ToRamSender::Start(SenderSetup {
            layout: self.layout,
            guest_base: self.guest_base,
            max_bandwidth: self.opts.max_bandwidth,
        }))?;
        sender.send_fds(&[
            ("memory", self.memfd.as_fd()),
            ("pagemap", self.guest_fds[1].as_fd()),
            ("uffd", self.guest_fds[0].as_fd()),
            ("sent", sent_fd.as_fd()),
            ("main", main.as_fd()),
        ])?;
        self.held
            .extend([sent_fd, main.into(), ret.into(), urgent.into()]);
        self.sender = Some(sender);
        self.server = Some(server);
        self.awaiting_sender = true;
        self.s.sender_heard = Instant::now();
        Ok(())
    }

    /// Precopy rounds until the policy says stop.
    fn precopy(&mut self) -> Result<Decision, MigError> {
        let mut policy = Policy::new(
            self.opts.postcopy,
            self.opts.downtime_limit,
            self.opts.postcopy_after_syncs,
            self.state_bytes,
            self.opts.max_bandwidth,
        );
        loop {
            if self.start_requested {
                if let d @ Decision::Switchover { .. } = policy.requested() {
                    return Ok(d);
                }
            }
            let got = self.wait("a dirty sync", None, |ev| match ev {
                Event::Sender(FromRamSender::Synced(s)) => Ok(Some(s)),
                Event::StartPostcopy => Ok(None),
                other => Err(other),
            })?;
            if got.is_some() {
                // It now waits for our decision.
                self.awaiting_sender = false;
            }
            let Some(stats) = got else {
                if self.opts.postcopy == PostcopyMode::Never {
                    log::warn!("start-postcopy ignored: this migration runs with --postcopy never");
                } else {
                    self.start_requested = true;
                }
                continue;
            };
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
            self.progress.draw(&format!(
                "[precopy] sync {}  sent {} pages  pending {} pages  dirty {:.0} pages/s  {:.0} Mbit/s",
                stats.sync_count,
                stats.total_pages,
                stats.pending_pages,
                stats.dirty_rate,
                stats.bandwidth * 8.0 / 1e6
            ));
            let decision = policy.decide(&stats, self.start_requested);
            log::info!(
                "sync {}: {} pending pages, round {:.0} Mbit/s (estimate {:.0}), {:.0} dirty pages/s -> {decision:?}",
                stats.sync_count,
                stats.pending_pages,
                stats.bandwidth * 8.0 / 1e6,
                policy.bandwidth() * 8.0 / 1e6,
                stats.dirty_rate
            );
            self.last_round = Some(stats);
            match decision {
                Decision::Continue => self.command_sender(ToRamSender::Continue)?,
                d => return Ok(d),
            }
        }
    }

    fn stop_guest(&mut self) -> Result<Instant, MigError> {
        let t = Instant::now();
        self.guest().send(ToGuest::Stop)?;
        self.wait("the guest to stop", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Stopped) => Ok(()),
            other => Err(other),
        })?;
        self.guest_stopped = true;
        Ok(t)
    }

    /// Stop, last sync and pages, save state, send the package. Returns
    /// when the package is on the wire.
    fn stop_and_send_package(&mut self, listen: bool) -> Result<Instant, MigError> {
        let t_stop = self.stop_guest()?;
        let t_stopped = Instant::now();
        self.command_sender(if listen {
            ToRamSender::Switchover
        } else {
            ToRamSender::Complete
        })?;
        let fs = self.wait("the final dirty sync", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Sender(FromRamSender::FinalSyncDone(f)) => Ok(f),
            other => Err(other),
        })?;
        self.awaiting_sender = false;
        let t_synced = Instant::now();
        self.guest().send(ToGuest::SaveState)?;
        let state = self.wait("the guest state", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::State(s)) => Ok(s),
            other => Err(other),
        })?;
        // From here the destination may start the guest: whatever happens
        // next, the source never resumes its own (QEMU's rule).
        self.package_sent = true;
        self.command_sender(ToRamSender::Package(Package {
            listen,
            run: true,
            guest_state: state,
        }))?;
        let pkg_bytes = self.wait(
            "the package to be sent",
            Some(STEP_TIMEOUT),
            |ev| match ev {
                Event::Sender(FromRamSender::PackageSent { bytes }) => Ok(bytes),
                other => Err(other),
            },
        )?;
        // After a switchover it goes on pushing pages until PushDone.
        self.awaiting_sender = listen && self.push.is_none();
        let t_pkg = Instant::now();
        let fsync = fs.sync_us as f64 / 1e3;
        self.report.switchover_ms = Some(SwitchoverReport {
            stop: ms(t_stopped - t_stop),
            final_sync: fsync,
            discard: (ms(t_synced - t_stopped) - fsync).max(0.0),
            package: ms(t_pkg - t_synced),
            ..Default::default()
        });
        self.report.downtime_bytes = fs.bytes + pkg_bytes;
        self.report.discarded_pages = self.report.prediscard_pages + fs.discard_pages;
        self.report.dirty_sync_count = fs.sync_count;
        self.final_sync = Some(fs);
        Ok(t_stop)
    }

    fn await_dest_running(&mut self, t_stop: Instant, t_pkg: Instant) -> Result<Instant, MigError> {
        let (listen_us, start_us, discard_us) = self.wait(
            "the destination guest to run",
            Some(STEP_TIMEOUT),
            |ev| match ev {
                Event::Peer(ControlMsg::DestRunning {
                    listen_us,
                    start_us,
                    discard_us,
                }) => Ok((listen_us, start_us, discard_us)),
                other => Err(other),
            },
        )?;
        let t = Instant::now();
        self.report.downtime_ms = Some(ms(t - t_stop));
        if let Some(sw) = self.report.switchover_ms.as_mut() {
            sw.dest_start = ms(t - t_pkg);
            sw.dest_listen = listen_us as f64 / 1e3;
            sw.dest_discard = discard_us as f64 / 1e3;
            sw.dest_load_run = start_us as f64 / 1e3;
        }
        Ok(t)
    }

    fn await_dest_completed(&mut self) -> Result<(), MigError> {
        // While the push runs, the ram-sender's watchdog bounds this wait;
        // once every page is on the wire, the destination has one step
        // timeout to confirm, however it keeps talking meanwhile.
        let summary = loop {
            match self.wait(
                "the destination to have every page",
                Some(STEP_TIMEOUT),
                |ev| match ev {
                    Event::Peer(ControlMsg::DestCompleted(s)) => Ok(s),
                    other => Err(other),
                },
            ) {
                Err(MigError::Timeout { .. }) if self.awaiting_sender => continue,
                other => break other?,
            }
        };
        self.dest = Some(summary);
        Ok(())
    }

    fn complete_precopy(&mut self) -> Result<(), MigError> {
        if let Some(c) = &self.cmd_socket {
            c.set_phase(Phase::Past);
        }
        let t_stop = self.stop_and_send_package(false)?;
        let t_pkg = Instant::now();
        self.await_dest_running(t_stop, t_pkg)?;
        self.await_dest_completed()?;
        self.sm.go(MigrationState::Completed)?;
        Ok(())
    }

    fn switchover(&mut self) -> Result<(), MigError> {
        self.report.switched_to_postcopy = true;
        if let Some(c) = &self.cmd_socket {
            c.set_phase(Phase::Past);
        }
        self.prediscard()?;
        let t_stop = self.stop_and_send_package(true)?;
        self.sm.go(MigrationState::PostcopyActive)?;
        let t_pkg = Instant::now();
        self.await_dest_running(t_stop, t_pkg)?;
        // The destination supervisor's word is the one that counts; the
        // page-server's POSTCOPY_DONE only brings its numbers.
        self.await_dest_completed()?;
        self.report.postcopy_phase_ms = Some(ms(t_stop.elapsed()));
        self.sm.go(MigrationState::Completed)?;
        match self.wait(
            "the page-server's numbers",
            Some(Duration::from_secs(10)),
            |ev| match ev {
                Event::Server(FromPageServer::PostcopyDone(s)) => Ok(s),
                other => Err(other),
            },
        ) {
            Ok(stats) => self.served = Some(stats),
            Err(e) => log::warn!("page-server: {e}"),
        }
        self.awaiting_sender = false;
        Ok(())
    }

    /// While the guest still runs, send what is stale on the destination now
    /// and wait until it is dropped there: that page-cache work (about
    /// 0.6 µs a page here) then costs no downtime.
    fn prediscard(&mut self) -> Result<(), MigError> {
        let t = Instant::now();
        self.command_sender(ToRamSender::PreDiscard)?;
        let (pages, mark) = self.wait("the early discard", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Sender(FromRamSender::PreDiscarded { pages, mark }) => Ok((pages, mark)),
            other => Err(other),
        })?;
        self.awaiting_sender = false;
        if self.dest_mark < mark {
            self.wait(
                "the destination to drop stale pages",
                Some(STEP_TIMEOUT),
                |ev| match ev {
                    Event::Peer(ControlMsg::DestMark { id }) if id >= mark => Ok(()),
                    other => Err(other),
                },
            )?;
        }
        self.report.prediscard_pages = pages;
        self.report.prediscard_ms = Some(ms(t.elapsed()));
        Ok(())
    }

    /// The destination has every page: the source guest can go.
    fn release_guest(&mut self) {
        if let Some(g) = &self.guest {
            self.s.set_quitting("postcopy-guest");
            let _ = g.send(ToGuest::Quit);
        }
        self.report.source_guest = Some("released".into());
    }

    fn verify(&mut self) -> Result<(), MigError> {
        match self.opts.verify {
            VerifyMethod::None => {
                self.report.verify = VerifyReport::none("--verify none");
                return Ok(());
            }
            VerifyMethod::Ab => {}
            VerifyMethod::Digest => {
                // The source memory is frozen since the stop: digest it now
                // (after the destination runs, so downtime does not pay).
                let mem = Mapping::new(
                    self.memfd.as_fd(),
                    self.layout.mem_bytes() as usize,
                    Access::ReadOnly,
                )
                .map_err(|e| MigError::Setup(format!("mapping source memory: {e}")))?;
                // Off the main thread, so heartbeats go on for a big guest.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(verify::digests(&mem));
                });
                let digests = loop {
                    match rx.try_recv() {
                        Ok(d) => break d,
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            self.idle(Duration::from_millis(20))?
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            return Err(MigError::Setup("the digest thread died".into()))
                        }
                    }
                };
                let control = self.control.as_mut().expect("connected");
                for (i, chunk) in digests.chunks(1 << 20).enumerate() {
                    control.send(&ControlMsg::SourceDigests {
                        first: (i as u64) << 20,
                        digests: chunk.to_vec(),
                    })?;
                }
                control.send(&ControlMsg::SourceDigestsEnd)?;
            }
        }
        let v = self.wait(
            "the destination's memory check",
            Some(Duration::from_secs(300)),
            |ev| match ev {
                Event::Peer(ControlMsg::Verified(v)) => Ok(v),
                other => Err(other),
            },
        )?;
        self.report.verify = VerifyReport::from_result(v);
        Ok(())
    }

    /// Tells the destination we are done and collects its process list.
    fn finish_peer(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        if control.send(&ControlMsg::Finish).is_err() {
            return;
        }
        match self.wait(
            "the destination's process list",
            Some(Duration::from_secs(20)),
            |ev| match ev {
                Event::Peer(ControlMsg::DestDone {
                    roles,
                    serial_bytes,
                }) => Ok((roles, serial_bytes)),
                other => Err(other),
            },
        ) {
            Ok((roles, serial_bytes)) => {
                self.report.roles.extend(roles.iter().map(RoleReport::from));
                if let (Some(d), Some(b)) = (self.dest.as_mut(), serial_bytes) {
                    d.serial_bytes = b;
                }
            }
            Err(e) => log::warn!("no process list from the destination: {e}"),
        }
    }

    /// After a failure before the package: the seed's rule, resume the
    /// source guest; then show that it runs and its memory is intact.
    fn keep_source_running(&mut self) {
        let Some(guest) = &self.guest else { return };
        if !self.s.is_alive("postcopy-guest") || self.s.is_quitting("postcopy-guest") {
            self.report.source_guest = Some("gone".into());
            return;
        }
        let stopped = self.guest_stopped;
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

    fn finish(mut self, result: Result<(), MigError>) -> Report {
        self.progress.clear();
        self.finishing = true;
        if let Some(c) = &self.cmd_socket {
            c.set_phase(Phase::Past);
        }
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
                let next = if cancelled {
                    MigrationState::Cancelled
                } else {
                    MigrationState::Failed
                };
                if self.sm.state().can_go(next) {
                    let _ = self.sm.go(next);
                }
                if self.report.source_guest.is_some() {
                    // Released after completion: a later failure (say, of
                    // the memory check) changes nothing for it.
                } else if self.package_sent && self.s.peer_guest_ran == Some(false) {
                    // The destination says its guest never ran: no second
                    // copy exists, so the source may carry on.
                    log::warn!("the destination never ran the guest: resuming it here");
                    self.keep_source_running();
                } else if self.package_sent {
                    self.report.source_guest = Some(
                        "frozen: the destination may be running the guest; the source never resumes it"
                            .into(),
                    );
                } else {
                    self.keep_source_running();
                }
                if self.report.verify.mismatches.is_none() {
                    self.report.verify.detail = "migration did not complete".into();
                }
            }
        }
        self.fill_totals();
        // Quit whatever still runs and collect how each ended.
        self.quit_roles();
        self.s.set_quitting("postcopy-guest");
        if let Some(c) = &self.guest {
            let _ = c.send(ToGuest::Quit);
        }
        if let Some(c) = self.control.as_mut() {
            c.shutdown();
        }
        // Closing our ends of the links also frees a role still waiting
        // for its fds.
        self.sender = None;
        self.server = None;
        self.guest = None;
        if result.is_err() {
            // The demo's destination may still wait for a migration that
            // will not come.
            self.s.terminate("postcopy incoming");
        }
        self.s.reap_all(Duration::from_secs(5));
        let mut roles: Vec<RoleReport> = self.s.role_infos().iter().map(RoleReport::from).collect();
        roles.append(&mut self.report.roles);
        self.report.roles = roles;
        self.report
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

    fn fill_totals(&mut self) {
        let r = &mut self.report;
        let (mut pages, mut zero, mut bytes_total) = (0u64, 0u64, 0u64);
        if let Some(fs) = &self.final_sync {
            r.precopy_bytes = fs.precopy_bytes;
            pages += fs.precopy_pages + fs.pages;
            zero += fs.precopy_zero_pages + fs.zero_pages;
            bytes_total += r.precopy_bytes + r.downtime_bytes;
        } else if let Some(l) = &self.last_round {
            r.precopy_bytes = l.total_bytes;
            pages += l.total_pages;
            zero += l.total_zero_pages;
            bytes_total += l.total_bytes;
            r.dirty_sync_count = l.sync_count;
        }
        let mut post = 0u64;
        if let Some(p) = &self.push {
            post += p.bytes;
            pages += p.pages;
            zero += p.zero_pages;
        }
        if let Some(s) = &self.served {
            post += s.bytes;
            pages += s.pages_urgent - s.zero_pages;
            zero += s.zero_pages;
        }
        r.postcopy_bytes = post;
        bytes_total += post;
        r.pages_sent = pages;
        r.zero_pages = zero;
        if r.total_time_ms > 0.0 {
            r.throughput_mbps = bytes_total as f64 * 8.0 / (r.total_time_ms / 1e3) / 1e6;
        }
        if let Some(d) = &self.dest {
            if let Some(pc) = &d.postcopy {
                r.postcopy_requests = pc.requests;
                r.postcopy_faults = pc.faults;
                r.pages_urgent = pc.pages_urgent;
                r.pages_background = pc.pages_background;
                r.postcopy_blocktime_ms = Some(pc.blocktime_us as f64 / 1e3);
                r.fault_latency_us = Some(pc.latency.clone());
            }
            r.serial_log_destination = d.serial_log.clone();
            if d.serial_log.is_some() {
                r.serial_bytes_destination = Some(d.serial_bytes);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// First 8 hex digits of an id, for file names.
pub fn short(id: MigrationId) -> String {
    id.to_string()[..8].to_string()
}
