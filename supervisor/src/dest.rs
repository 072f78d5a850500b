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
use common::guest::{GuestKind, KVM_MAX_MEM};
use common::mem::{create_memfd, Access, Mapping};
use common::msg::{
    FromFaultHandler, FromGuest, GuestInit, HandlerSetup, PostcopyStats, RecvProgress, Side,
    ToFaultHandler, ToGuest,
};
use common::state::{MigrationState, StateMachine};
use common::types::{MemLayout, MigrationId, PAGE_SIZE};
use common::uffd::Uffd;
use common::wire::{ConnKind, HelloStatus, Package};

use crate::cli::IncomingArgs;
use crate::error::MigError;
use crate::events::{self, Event};
use crate::net::{self, Control};
use crate::report::{Report, RoleReport, VerifyReport};
use crate::session::{EventLoop, Session};
use crate::source::short;
use crate::spawn::{self, Child};
use crate::verify;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Dest {
    args: IncomingArgs,
    s: Session,
    sm: StateMachine,
    report: Report,
    req: Option<SetupRequest>,
    layout: MemLayout,
    memfd: Option<OwnedFd>,
    digests_fd: Option<OwnedFd>,
    guest: Option<Child<ToGuest, FromGuest>>,
    handler: Option<Child<ToFaultHandler, FromFaultHandler>>,
    control: Option<Control>,
    held: Vec<OwnedFd>,
    serial_path: Option<String>,
    guest_running: bool,
    digests: Vec<u64>,
    digests_done: bool,
    /// Discard time already spent at the last MARK (before the stop).
    mark_discard_us: u64,
}

/// Waits for one migration and returns the destination's report.
pub fn incoming(args: IncomingArgs) -> Report {
    let mut report = Report {
        status: "failed".into(),
        side: "destination".into(),
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
    let mut d = Dest {
        args,
        s,
        sm: StateMachine::new(),
        report,
        req: None,
        layout: MemLayout::new(PAGE_SIZE as u64).expect("one page"),
        memfd: None,
        digests_fd: None,
        guest: None,
        handler: None,
        control: None,
        held: Vec::new(),
        serial_path: None,
        guest_running: false,
        digests: Vec::new(),
        digests_done: false,
        mark_discard_us: 0,
    };
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
        let link = self.link_timeout();
        self.s.keep_alive(self.control.as_mut(), link, "source")?;
        self.s.check_data(link, "source")
    }

    fn on_event(&mut self, ev: Event) -> Result<(), MigError> {
        let Some(ev) = self.s.handle_common(ev, "source")? else {
            return Ok(());
        };
        match ev {
            Event::Handler(FromFaultHandler::Progress(_)) => Ok(()),
            Event::Handler(FromFaultHandler::Mark(id, prog)) => {
                self.mark_discard_us = prog.discard_us;
                match self.control.as_mut() {
                    Some(c) => Ok(c.send(&ControlMsg::DestMark { id })?),
                    None => Ok(()),
                }
            }
            Event::Handler(FromFaultHandler::Error(e)) => Err(MigError::Role {
                name: "fault-handler",
                detail: e,
            }),
            Event::Guest(FromGuest::Error(e)) => Err(MigError::Role {
                name: "guest",
                detail: e,
            }),
            Event::Guest(FromGuest::Progress { .. }) => Ok(()),
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
                Ok(())
            }
            Event::Peer(ControlMsg::SourceDigestsEnd) => {
                self.digests_done = true;
                Ok(())
            }
            Event::Interrupt(sig) => {
                if self.guest_running {
                    log::warn!(
                        "signal {sig}: the guest runs here now and may be the only live copy; not cancelling"
                    );
                    Ok(())
                } else {
                    Err(MigError::Cancelled(format!("signal {sig}")))
                }
            }
            Event::StartPostcopy => Ok(()),
            other => {
                self.s.stash(other);
                Ok(())
            }
        }
    }
}

impl Dest {
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

    fn link_timeout(&self) -> Duration {
        Duration::from_secs(self.args.link_timeout)
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

    fn run(&mut self) -> Result<(), MigError> {
        let mut listener = net::Acceptor::new(self.listener()?)?;
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
        let req = self.wait("the source's Setup", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Peer(ControlMsg::Setup(r)) => Ok(r),
            other => Err(other),
        })?;
        match self.prepare(id, &req) {
            Ok(accepted) => self.control()?.send(&ControlMsg::SetupAccepted(accepted))?,
            Err(e) => {
                let _ = self.control()?.send(&ControlMsg::SetupRefused {
                    reason: e.to_string(),
                });
                return Err(e);
            }
        }
        self.accept_data(&mut listener, id)?;
        // From here the source must keep the main stream moving.
        self.s.expect_data(true);
        // One migration per `incoming`: later sources are refused at once.
        drop(listener);
        self.sm.go(MigrationState::Active)?;
        self.report.setup_time_ms = t0.elapsed().as_secs_f64() * 1e3;

        let (pkg, prog) = self.wait("the device-state package", None, |ev| match ev {
            Event::Handler(FromFaultHandler::Package(p, prog)) => Ok((p, prog)),
            other => Err(other),
        })?;
        // Loading the guest pauses the stream on our side, not the source's.
        self.s.expect_data(false);
        let discard_us = prog.discard_us.saturating_sub(self.mark_discard_us);
        self.start_guest(pkg, discard_us)?;
        self.s.expect_data(true);
        let (stats, prog) = self.wait("every page", None, |ev| match ev {
            Event::Handler(FromFaultHandler::PrecopyDone(p)) => Ok((None, p)),
            Event::Handler(FromFaultHandler::PostcopyDone(s, p)) => Ok((Some(s), p)),
            other => Err(other),
        })?;
        self.s.expect_data(false);
        self.completed(stats, prog)?;
        self.verify()?;
        self.wait(
            "the source to finish",
            Some(Duration::from_secs(120)),
            |ev| match ev {
                Event::Peer(ControlMsg::Finish) => Ok(()),
                other => Err(other),
            },
        )?;
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
        self.report.mem_bytes = g.mem_bytes;
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
        let (_received, received_fd) =
            SharedBitmap::create("postcopy-received", self.layout.pages())
                .map_err(|e| MigError::Setup(format!("received bitmap: {e}")))?;
        let want_digests = req.verify == VerifyMethod::Digest;
        if want_digests {
            self.digests_fd = Some(
                create_memfd("postcopy-digests", self.layout.pages() * 8)
                    .map_err(|e| MigError::Setup(e.to_string()))?,
            );
        }
        let mut handler: Child<ToFaultHandler, FromFaultHandler> = spawn::spawn("fault-handler")?;
        self.s.watch("fault-handler", handler.pid);
        events::forward(
            handler.rx.take().expect("fresh child"),
            self.s.tx.clone(),
            "fault-handler",
            events::handler_event,
        );
        handler.send(ToFaultHandler::Start(HandlerSetup {
            layout: self.layout,
            guest_base: base,
            postcopy,
            digests: want_digests,
        }))?;
        self.handler = Some(handler);
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

    /// The three data connections, then hand them to the fault-handler.
    fn accept_data(
        &mut self,
        listener: &mut net::Acceptor,
        id: MigrationId,
    ) -> Result<(), MigError> {
        let mut got: Vec<(ConnKind, OwnedFd)> = Vec::new();
        // The source opens all three right after SetupAccepted: one link
        // timeout for all of them, however the peer keeps talking meanwhile.
        let link_timeout = self.link_timeout();
        let deadline = Instant::now() + link_timeout;
        let what = format!(
            "data connection (all three are due within the {} s link timeout after setup)",
            link_timeout.as_secs()
        );
        while got.len() < 3 {
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
                    } else {
                        HelloStatus::Ok
                    }
                },
                || s.poll_stop("source"),
            )?;
            got.push((h.kind, stream.into()));
        }
        let fd = |k: ConnKind| {
            got.iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, f)| f.as_fd())
                .expect("all three accepted")
        };
        let memfd = self.memfd.as_ref().expect("prepared");
        let mut fds = vec![
            ("memory", memfd.as_fd()),
            ("received", self.held[0].as_fd()),
            ("main", fd(ConnKind::Main)),
            ("return", fd(ConnKind::ReturnPath)),
            ("urgent", fd(ConnKind::Urgent)),
        ];
        if self.held.len() > 1 {
            fds.push(("uffd", self.held[1].as_fd()));
        }
        if let Some(d) = &self.digests_fd {
            fds.push(("digests", d.as_fd()));
        }
        self.handler().send_fds(&fds)?;
        self.held.extend(got.into_iter().map(|(_, f)| f));
        Ok(())
    }

    /// The package is here: register (for postcopy), load, run.
    fn start_guest(&mut self, pkg: Package, discard_us: u64) -> Result<(), MigError> {
        if !pkg.run {
            return Err(MigError::Protocol(
                "the package does not ask to run the guest; a stopped incoming guest is not supported".into(),
            ));
        }
        let t = Instant::now();
        if pkg.listen {
            self.guest().send(ToGuest::Listen)?;
            self.wait(
                "the guest to register its memory",
                Some(STEP_TIMEOUT),
                |ev| match ev {
                    Event::Guest(FromGuest::Listening) => Ok(()),
                    other => Err(other),
                },
            )?;
            self.handler().send(ToFaultHandler::Listening)?;
        }
        let listen_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        self.guest().send(ToGuest::Load(pkg.guest_state))?;
        self.wait(
            "the guest to load its state",
            Some(STEP_TIMEOUT),
            |ev| match ev {
                Event::Guest(FromGuest::Loaded) => Ok(()),
                other => Err(other),
            },
        )?;
        self.guest().send(ToGuest::Run)?;
        self.wait("the guest to run", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Running) => Ok(()),
            other => Err(other),
        })?;
        self.guest_running = true;
        let start_us = t.elapsed().as_micros() as u64;
        if pkg.listen {
            self.sm.go(MigrationState::PostcopyActive)?;
        }
        self.control
            .as_mut()
            .expect("connected")
            .send(&ControlMsg::DestRunning {
                listen_us,
                start_us,
                discard_us,
            })?;
        Ok(())
    }

    fn completed(
        &mut self,
        stats: Option<PostcopyStats>,
        prog: RecvProgress,
    ) -> Result<(), MigError> {
        self.sm.go(MigrationState::Completed)?;
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
            self.report.fault_latency_us = Some(s.latency.clone());
            self.report.switched_to_postcopy = true;
        }
        self.report.discarded_pages = prog.discarded;
        self.report.dirty_sync_count = prog.rounds;
        self.report.serial_log_destination = self.serial_path.clone();
        self.control
            .as_mut()
            .expect("connected")
            .send(&ControlMsg::DestCompleted(DestSummary {
                recv: prog,
                postcopy: stats,
                serial_log: self.serial_path.clone(),
                serial_bytes,
            }))?;
        Ok(())
    }

    /// Stops the guest and checks its memory as agreed at setup.
    fn verify(&mut self) -> Result<(), MigError> {
        let req = self.req.clone().expect("setup done");
        if req.guest.kind == GuestKind::Kvm {
            self.await_marker()?;
        }
        self.guest().send(ToGuest::Stop)?;
        self.wait("the guest to stop", Some(STEP_TIMEOUT), |ev| match ev {
            Event::Guest(FromGuest::Stopped) => Ok(()),
            other => Err(other),
        })?;
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
                // Chunks are collected by on_event as they come; wait for the end.
                if !self.digests_done {
                    self.wait(
                        "the source's digests",
                        Some(Duration::from_secs(300)),
                        |ev| match ev {
                            Event::Peer(ControlMsg::SourceDigestsEnd) => Ok(()),
                            other => Err(other),
                        },
                    )?;
                    self.digests_done = true;
                }
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
            self.control
                .as_mut()
                .expect("connected")
                .send(&ControlMsg::Verified(r))?;
        } else {
            self.report.verify = VerifyReport::none("--verify none");
            self.control
                .as_mut()
                .expect("connected")
                .send(&ControlMsg::Verified(common::control::VerifyResult {
                    method: "none".into(),
                    ..Default::default()
                }))?;
        }
        Ok(())
    }

    /// Lets a KVM guest run until it has written to COM1 here (its serial
    /// log then shows it continued after the switchover), up to 20 s.
    fn await_marker(&mut self) -> Result<(), MigError> {
        let Some(path) = self.serial_path.clone() else {
            return Ok(());
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if std::fs::metadata(&path)
                .map(|m| m.len() > 0)
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
                        guest_ran: self.guest_running,
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
        self.held.clear();
        self.report
    }
}
