//! What both supervisors share while a migration runs: the event channel,
//! the reaper, the list of processes they started, and the one loop that
//! waits for a particular event while handling everything else.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use common::control::{ControlMsg, ExitStatus, RoleInfo};
use common::msg::{FromFaultHandler, FromGuest, FromPageServer, FromRamSender};

use crate::ctlsock::Command;
use crate::error::MigError;
use crate::events::{Event, Gate, Reaper};
use crate::net::Control;

/// One process this supervisor started.
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: &'static str,
    /// Which end of the migration it belongs to.
    pub host: &'static str,
    pub pid: u32,
    pub exit: Option<ExitStatus>,
    /// We asked it to quit (its exit is not a failure).
    pub quitting: bool,
    pub restarts: u32,
}

/// Most control messages from the peer kept for a later `wait` at once. An
/// honest peer has at most a handful outstanding; a peer that sends more
/// that nothing waits for would otherwise grow the stash without bound.
pub const MAX_STASHED_PEER_MESSAGES: usize = 1024;

pub struct Session {
    pub tx: Sender<Event>,
    rx: Receiver<Event>,
    pub reaper: Reaper,
    stash: VecDeque<Event>,
    pub procs: Vec<Proc>,
    pub host: &'static str,
    /// When the peer supervisor last said anything.
    pub peer_heard: Instant,
    last_heartbeat: Instant,
    /// When a ram-sender message last arrived.
    pub sender_heard: Instant,
    /// When the fault-handler last reported frames from the main stream
    /// (progress, a mark, the package, the end).
    data_heard: Instant,
    /// Whether the peer must be sending data now (see `check_data`).
    expect_data: bool,
    /// Set when the peer overflowed the stash: the name of the message
    /// that did not fit.
    stash_overflow: Option<&'static str>,
    /// What the peer's Abort said about its guest having run.
    pub peer_guest_ran: Option<bool>,
    last_tick: Instant,
    /// When this supervisor started (report event times count from it).
    pub started: Instant,
    /// Children retired whose last events may still be queued: dropped
    /// until their `Retired` mark comes through.
    retiring: Vec<&'static str>,
}

/// How often `on_tick` runs while waiting: the report's timeline samples
/// there every 50 ms (snapshot.rs), beside heartbeats and liveness checks.
pub const TICK: Duration = Duration::from_millis(50);

/// What the control connection's events are retired as.
pub const CONTROL: &str = "control connection";

/// The child (or connection) an event comes from, if it comes from one.
fn child_of(ev: &Event) -> Option<&'static str> {
    match ev {
        Event::Guest(_) => Some("postcopy-guest"),
        Event::Sender(_) => Some("ram-sender"),
        Event::Server(_) => Some("page-server"),
        Event::Handler(_) => Some("fault-handler"),
        Event::ChannelClosed(n) => Some(n),
        Event::Peer(_) | Event::PeerLost(_) => Some(CONTROL),
        _ => None,
    }
}

impl Session {
    pub fn new(host: &'static str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let reaper = Reaper::start(tx.clone())?;
        let now = Instant::now();
        Ok(Session {
            tx,
            rx,
            reaper,
            stash: VecDeque::new(),
            procs: Vec::new(),
            host,
            peer_heard: now,
            last_heartbeat: now,
            sender_heard: now,
            data_heard: now,
            expect_data: false,
            stash_overflow: None,
            peer_guest_ran: None,
            last_tick: now,
            retiring: Vec::new(),
            started: now,
        })
    }

    /// Starts watching a process we started.
    pub fn watch(&mut self, name: &'static str, pid: u32) {
        self.watch_on(name, self.host, pid)
    }

    /// Starts watching a process we started for the other end (the demo's
    /// destination).
    pub fn watch_on(&mut self, name: &'static str, host: &'static str, pid: u32) {
        self.procs.push(Proc {
            name,
            host,
            pid,
            exit: None,
            quitting: false,
            restarts: 0,
        });
        self.reaper.watch(pid);
    }

    /// Records an exit; returns the process if it was not expected to end.
    pub fn exited(&mut self, pid: u32, status: ExitStatus) -> Option<Proc> {
        let p = self.procs.iter_mut().find(|p| p.pid == pid)?;
        p.exit = Some(status);
        // A sandbox death leaves a note, read when the death is explained.
        if status != ExitStatus::Signal(libc::SIGSYS) {
            crate::spawn::forget_note(pid);
        }
        (!p.quitting).then(|| p.clone())
    }

    /// Replaces a child that is gone or being killed: nothing more of the
    /// old one is heard (its events are dropped, its exit expected), it is
    /// killed, and the new process `pid` takes its entry with one more
    /// restart. Returns the restarts so far.
    pub fn replace(&mut self, name: &'static str, pid: u32) -> u32 {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .expect("replacing a child we started");
        p.pid = pid;
        p.exit = None;
        p.quitting = false;
        p.restarts += 1;
        let restarts = p.restarts;
        self.reaper.watch(pid);
        restarts
    }

    /// Stops hearing from a child (see [`Gate`]) and kills it: it is being
    /// replaced. Its exit is expected from now on.
    pub fn retire(&mut self, name: &'static str, gate: &Gate) {
        if gate.retire(&self.tx, name) {
            self.retiring.push(name);
        }
        self.stash.retain(|e| child_of(e) != Some(name));
        for p in self
            .procs
            .iter_mut()
            .filter(|p| p.name == name && p.exit.is_none())
        {
            p.quitting = true;
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }

    /// Kills (SIGKILL) the running child called `name`, as a crash would
    /// (`--chaos`): its death is not expected.
    pub fn kill(&self, name: &str) {
        for p in self
            .procs
            .iter()
            .filter(|p| p.name == name && p.exit.is_none() && !p.quitting)
        {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }

    /// Restarts of `name` so far.
    pub fn restarts(&self, name: &str) -> u32 {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.restarts)
            .unwrap_or(0)
    }

    /// Asks a process of ours to end (SIGTERM), if it still runs.
    pub fn terminate(&self, name: &str) {
        for p in self
            .procs
            .iter()
            .filter(|p| p.name == name && p.exit.is_none())
        {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(p.pid as i32, libc::SIGTERM) };
        }
    }

    pub fn set_quitting(&mut self, name: &str) {
        for p in self.procs.iter_mut().filter(|p| p.name == name) {
            p.quitting = true;
        }
    }

    /// True while the process called `name` runs (as far as we know).
    pub fn is_alive(&self, name: &str) -> bool {
        self.procs
            .iter()
            .any(|p| p.name == name && p.exit.is_none())
    }

    pub fn is_quitting(&self, name: &str) -> bool {
        self.procs.iter().any(|p| p.name == name && p.quitting)
    }

    /// The events both sides treat alike: their own processes ending, and
    /// the peer aborting or going away. Anything else is handed back.
    pub fn handle_common(&mut self, ev: Event, peer: &str) -> Result<Option<Event>, MigError> {
        match ev {
            Event::ChannelClosed(name) => {
                if self.is_quitting(name) {
                    return Ok(None);
                }
                let pid = self
                    .procs
                    .iter()
                    .find(|p| p.name == name && p.exit.is_none())
                    .map(|p| p.pid);
                Err(self.explain_death(name, pid, None))
            }
            Event::Exited { pid, status } => match self.exited(pid, status) {
                Some(p) => Err(self.explain_death(p.name, Some(pid), Some(status))),
                None => Ok(None),
            },
            Event::Peer(ControlMsg::Abort {
                reason,
                cancelled,
                guest_ran,
            }) => {
                self.peer_guest_ran = Some(guest_ran);
                Err(if cancelled {
                    MigError::Cancelled(format!("by the {peer}: {reason}"))
                } else {
                    MigError::PeerAborted(reason)
                })
            }
            Event::PeerLost(e) => Err(MigError::PeerLost(e)),
            Event::Peer(ControlMsg::Heartbeat) => Ok(None),
            other => Ok(Some(other)),
        }
    }

    /// A process of ours ended unexpectedly (its channel closed, or its
    /// exit arrived). Its own last words, an error message, may still be on
    /// the way, and so may its exit status: wait a moment for both, so the
    /// error says why and how it ended.
    fn explain_death(
        &mut self,
        name: &'static str,
        pid: Option<u32>,
        status: Option<ExitStatus>,
    ) -> MigError {
        let last_words = |ev: &Event| -> Option<String> {
            match (ev, name) {
                (Event::Guest(FromGuest::Error(e)), "postcopy-guest")
                | (Event::Sender(FromRamSender::Error(e)), "ram-sender")
                | (Event::Server(FromPageServer::Error(e)), "page-server")
                | (Event::Handler(FromFaultHandler::Error(e)), "fault-handler") => Some(e.clone()),
                _ => None,
            }
        };
        if let Some(i) = self.stash.iter().position(|e| last_words(e).is_some()) {
            let ev = self.stash.remove(i).expect("index in range");
            let detail = last_words(&ev).expect("matched above");
            return MigError::Role { name, detail };
        }
        let mut status = status;
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(ev) => {
                    if let Some(detail) = last_words(&ev) {
                        return MigError::Role { name, detail };
                    }
                    match ev {
                        Event::Exited { pid: p, status: s } if Some(p) == pid => {
                            self.exited(p, s);
                            status = Some(s);
                        }
                        // Its channel closing after its exit says nothing new.
                        Event::ChannelClosed(n) if n == name => {}
                        other => self.stash(other),
                    }
                }
                Err(_) => break,
            }
        }
        match (pid, status) {
            (Some(pid), Some(ExitStatus::Signal(libc::SIGSYS))) => MigError::Sandboxed {
                name,
                pid,
                syscall: crate::spawn::sandbox_note(pid),
            },
            (Some(pid), Some(status)) => MigError::RoleDied { name, pid, status },
            _ => MigError::ChannelClosed(name),
        }
    }

    /// For loops that cannot wait on events (accepting connections): takes
    /// what has arrived without blocking. A signal or a control-socket
    /// `cancel` ends the wait as a cancel, a dead process or a lost peer as
    /// a failure; anything else is kept for a later `wait`. Other commands
    /// are answered at once: kept, their client would time out and they
    /// would act on whatever migration came next.
    pub fn poll_stop(&mut self, peer: &str) -> Result<(), MigError> {
        while let Some(ev) = self.recv(Duration::ZERO) {
            match ev {
                Event::Interrupt(sig) => return Err(MigError::Cancelled(format!("signal {sig}"))),
                Event::Command(Command::Cancel, reply) => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                    return Err(MigError::Cancelled(
                        "requested on the control socket".into(),
                    ));
                }
                Event::Command(_, reply) => {
                    if let Some(r) = reply {
                        let _ = r.send(Err(format!(
                            "only cancel applies while waiting for the {peer}'s connections"
                        )));
                    }
                }
                ev => {
                    if let Some(other) = self.handle_common(ev, peer)? {
                        self.stash(other);
                    }
                }
            }
            self.check_stash()?;
        }
        Ok(())
    }

    /// Keeps an event for a later `wait`. Control messages from the peer
    /// are kept up to [`MAX_STASHED_PEER_MESSAGES`]; the next wait fails
    /// after that.
    pub fn stash(&mut self, ev: Event) {
        if let Event::Peer(m) = &ev {
            let kept = self
                .stash
                .iter()
                .filter(|e| matches!(e, Event::Peer(_)))
                .count();
            if kept >= MAX_STASHED_PEER_MESSAGES {
                self.stash_overflow.get_or_insert(m.name());
                return;
            }
        }
        self.stash.push_back(ev);
    }

    /// Fails once the peer has sent more messages than may wait unread.
    fn check_stash(&self) -> Result<(), MigError> {
        match self.stash_overflow {
            Some(name) => Err(MigError::Protocol(format!(
                "the peer sent more than {MAX_STASHED_PEER_MESSAGES} control messages that nothing waits for (the first one dropped: {name})"
            ))),
            None => Ok(()),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.recv_one(left)?;
            if let Event::Retired(name) = ev {
                if let Some(i) = self.retiring.iter().position(|n| *n == name) {
                    self.retiring.remove(i);
                }
                continue;
            }
            if child_of(&ev).is_some_and(|n| self.retiring.contains(&n)) {
                log::debug!("dropping an event of a retired {:?}", child_of(&ev));
                continue;
            }
            return Some(ev);
        }
    }

    fn recv_one(&mut self, timeout: Duration) -> Option<Event> {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => {
                match ev {
                    Event::Peer(_) => self.peer_heard = Instant::now(),
                    Event::Sender(_) => self.sender_heard = Instant::now(),
                    Event::Handler(_) => self.data_heard = Instant::now(),
                    _ => {}
                }
                Some(ev)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The heartbeat, both ways: says "still here" once a second on
    /// `control`, and fails when `peer` has been silent for `link_timeout`.
    pub fn keep_alive(
        &mut self,
        control: Option<&mut Control>,
        link_timeout: Duration,
        peer: &str,
    ) -> Result<(), MigError> {
        let Some(c) = control else { return Ok(()) };
        if self.last_heartbeat.elapsed() >= Duration::from_secs(1) {
            self.last_heartbeat = Instant::now();
            c.send(&ControlMsg::Heartbeat)?;
        }
        let silent = self.peer_heard.elapsed();
        if silent > link_timeout {
            return Err(MigError::PeerLost(format!(
                "no word from the {peer} for {:.0} s",
                silent.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// From now on (or no longer), the peer must keep data moving on the
    /// main stream; the clock starts now.
    /// Whether data on the main stream is due now.
    pub fn expects_data(&self) -> bool {
        self.expect_data
    }

    pub fn expect_data(&mut self, on: bool) {
        self.expect_data = on;
        self.data_heard = Instant::now();
    }

    /// Fails when data is expected and none has come for `limit`, whatever
    /// else the peer says: heartbeats keep a link alive, not a migration, so
    /// a peer that only sends them cannot hold this end forever. An honest
    /// source sends a ROUND frame every dirty sync (at least every few
    /// hundred ms) and pages after the switch.
    pub fn check_data(&self, limit: Duration, peer: &str) -> Result<(), MigError> {
        let silent = self.data_heard.elapsed();
        if self.expect_data && silent > limit {
            return Err(MigError::Protocol(format!(
                "the {peer} sent nothing on the main stream for {:.0} s (limit {} s); heartbeats alone do not hold a migration",
                silent.as_secs_f64(),
                limit.as_secs()
            )));
        }
        Ok(())
    }

    /// How long until `on_tick` is due.
    fn until_tick(&self) -> Duration {
        TICK.saturating_sub(self.last_tick.elapsed())
    }

    /// True at most every [`TICK`]: time for `on_tick`.
    fn tick_due(&mut self) -> bool {
        if self.last_tick.elapsed() >= TICK {
            self.last_tick = Instant::now();
            true
        } else {
            false
        }
    }

    /// Waits until every process we started has exited, killing the ones
    /// still there after `grace`.
    pub fn reap_all(&mut self, grace: Duration) {
        self.reap_but(grace, None)
    }

    /// Like [`Session::reap_all`], but leaves the process called `keep`
    /// running (`migrate --keep-guest`: the guest).
    pub fn reap_but(&mut self, grace: Duration, keep: Option<&str>) {
        let deadline = Instant::now() + grace;
        let mut killed = false;
        let waited = |p: &Proc| p.exit.is_none() && Some(p.name) != keep;
        while self.procs.iter().any(waited) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if killed {
                    break;
                }
                for p in self.procs.iter().filter(|p| waited(p)) {
                    log::warn!("{} (pid {}) did not exit; killing it", p.name, p.pid);
                    // SAFETY: kill(2) on a child we started and have not reaped.
                    unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
                }
                killed = true;
                continue;
            }
            if let Some(Event::Exited { pid, status }) =
                self.recv(left.min(Duration::from_millis(100)))
            {
                self.exited(pid, status);
            }
            if killed && Instant::now() > deadline + Duration::from_secs(2) {
                break;
            }
        }
    }

    /// A new migration of the same guest (`migrate --keep-guest`): the
    /// processes that ended are forgotten (the next ones are not restarts)
    /// and nothing of the last attempt's peer is kept.
    pub fn new_attempt(&mut self) {
        self.procs.retain(|p| p.exit.is_none());
        self.stash.clear();
        self.stash_overflow = None;
        self.peer_guest_ran = None;
        self.expect_data = false;
        let now = Instant::now();
        self.peer_heard = now;
        self.sender_heard = now;
    }

    /// The next event, within `timeout` (for loops outside a migration).
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        match self.stash.pop_front() {
            Some(ev) => Some(ev),
            None => self.recv(timeout),
        }
    }

    /// The processes, for the report.
    pub fn role_infos(&self) -> Vec<RoleInfo> {
        self.procs
            .iter()
            .map(|p| RoleInfo {
                name: p.name.to_string(),
                host: p.host.to_string(),
                pid: p.pid,
                restarts: p.restarts,
                exit: p.exit,
            })
            .collect()
    }
}

/// The waiting loop, shared by both sides: `pick` claims the event being
/// waited for; everything else goes to `on_event`, which may fail the
/// migration or stash the event for a later wait.
pub trait EventLoop {
    fn session(&mut self) -> &mut Session;
    fn on_event(&mut self, ev: Event) -> Result<(), MigError>;
    /// Runs every [`TICK`] or so while waiting, whatever arrives: liveness
    /// checks and heartbeats.
    fn on_tick(&mut self) -> Result<(), MigError> {
        Ok(())
    }

    fn wait<T>(
        &mut self,
        what: &str,
        timeout: Option<Duration>,
        pick: impl FnMut(Event) -> Result<T, Event>,
    ) -> Result<T, MigError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.pump(deadline, pick)?.ok_or_else(|| MigError::Timeout {
            what: what.to_string(),
            secs: timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0),
        })
    }

    /// Lets time pass while handling events. A timeout raised while
    /// handling them (a step deadline) is a failure like any other.
    fn idle(&mut self, d: Duration) -> Result<(), MigError> {
        self.pump(Some(Instant::now() + d), Err::<(), _>)?;
        Ok(())
    }

    /// The loop behind `wait` and `idle`: `pick` claims an event (`Some`);
    /// everything else goes to `on_event`; `None` once `deadline` passed.
    fn pump<T>(
        &mut self,
        deadline: Option<Instant>,
        mut pick: impl FnMut(Event) -> Result<T, Event>,
    ) -> Result<Option<T>, MigError> {
        // Events kept while something else was awaited come first, in
        // their order: the one awaited, or each to on_event.
        while let Some(ev) = self.session().stash.pop_front() {
            match pick(ev) {
                Ok(t) => return Ok(Some(t)),
                Err(ev) => self.on_event(ev)?,
            }
        }
        loop {
            let to_tick = self.session().until_tick();
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(to_tick),
                None => to_tick,
            };
            if let Some(ev) = self.session().recv(slice) {
                match pick(ev) {
                    Ok(t) => return Ok(Some(t)),
                    Err(ev) => {
                        self.on_event(ev)?;
                        self.session().check_stash()?;
                    }
                }
            }
            // Ticks run whether or not anything arrived, also when the
            // wait is over: short waits in a loop must not starve them.
            if self.session().tick_due() {
                self.on_tick()?;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }
}
