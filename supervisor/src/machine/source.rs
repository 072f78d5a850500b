//! The source supervisor's protocol state (docs/state-machine.md): one enum
//! whose variants hold what that state needs. Every event, from the peer or
//! a role, is judged by [`SourceMachine::on`] against the state alone: it is
//! refused with an error naming the message and the state, or it moves the
//! migration on and says what to do next ([`SrcAction`]). No I/O here, so
//! tests drive it through every interleaving the protocol allows.

use common::control::{ControlMsg, PostcopyMode};
use common::msg::{FromGuest, FromPageServer, FromRamSender, SenderStart, ToRamSender};
use common::state::MigrationState;

use crate::events::Event;
use crate::policy::{Decision, Policy};

use super::{GuestFate, Judged, ProtocolError};

/// Where the source migration is. Each variant holds what that step needs.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceState {
    /// The guest starts and warms up; nothing is connected yet.
    /// `requested`: start-postcopy arrived already.
    Booting { requested: bool },
    /// `Setup` is on the control connection; the answer is awaited.
    Setup { requested: bool },
    /// Precopy rounds: the ram-sender sends a round and owes a `Synced`
    /// (our answer to it is given at once). `requested`: start-postcopy
    /// arrived and waits for the policy to allow it.
    Precopy { requested: bool },
    /// The switch is decided and the guest still runs: the early discard
    /// set is on its way. `mark` is the MARK the ram-sender put after it
    /// (once it said so), `acked` the highest MARK the destination has
    /// processed. `round_open`: the switch was requested in the middle of
    /// a round, whose `Synced` may still come (and means nothing now).
    PreDiscard {
        mark: Option<u64>,
        acked: u64,
        round_open: bool,
    },
    /// `Stop` was sent to the guest; its `Stopped` is awaited. The guest may
    /// already obey it: a failure from here on must resume it.
    Stopping { postcopy: bool },
    /// The guest is stopped; the final dirty sync runs.
    FinalSync { postcopy: bool },
    /// The guest saves its state for the package.
    Saving { postcopy: bool },
    /// The package was handed to the ram-sender: the destination may run
    /// the guest from now on, so the source never resumes its own.
    /// `dest_running`: the destination says its guest runs.
    PackageOut { dest_running: bool, tail: Tail },
    /// The destination has every page; the memory check runs.
    Verifying { tail: Tail },
    /// `Finish` sent; the destination's process list is awaited.
    Finishing { tail: Tail },
    /// Every data connection and data role is being replaced (a role
    /// died, a connection broke, or the link came back after a pause):
    /// `Resync` went to the destination, its `ResyncReady` is awaited.
    Resync { epoch: u32, from: Resume },
    /// The link to the destination is lost after the package: the
    /// destination may run the only copy, so the migration waits for the
    /// link (reconnecting) instead of failing.
    Paused { epoch: u32, from: Resume },
    /// Over: completed, failed or cancelled.
    Over(MigrationState),
}

/// Answers the source guest still owes to commands given before a resync
/// took the migration back to precopy; each is taken once, and means
/// nothing now.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Owed {
    /// A MARK was sent: the destination's ack may still come (before its
    /// `ResyncReady`, on the same connection).
    pub mark: bool,
    pub stopped: bool,
    pub state: bool,
    /// `Resume` was (or will be) sent: its `Running` comes.
    pub running: bool,
}

/// What a resync resumes.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// Before the package: precopy starts over (every page again).
    /// `resume_guest`: the guest was asked to stop, so it is resumed.
    Precopy { requested: bool, resume_guest: bool },
    /// After the package: what the destination has decides (postcopy
    /// resumes from its `received` bitmap; if the package never arrived,
    /// the destination guest never ran and precopy starts over).
    Package { dest_running: bool, tail: Tail },
}

/// What the source roles still owe once the package is out; each report
/// comes once, in any order against the destination's.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    /// The package asked to listen: a postcopy migration.
    pub postcopy: bool,
    /// The ram-sender said the package is on the wire.
    pub sent: bool,
    /// (postcopy) The ram-sender pushed every page.
    pub push_done: bool,
    /// (postcopy) The page-server saw the destination's POSTCOPY_DONE.
    pub served: bool,
    /// The page-server saw the return path end.
    pub closed: bool,
}

impl Tail {
    fn new(postcopy: bool) -> Self {
        Tail {
            postcopy,
            sent: false,
            push_done: false,
            served: false,
            closed: false,
        }
    }
}

impl SourceState {
    /// The role reports still owed, once the package is out.
    pub fn tail(&self) -> Option<&Tail> {
        match self {
            SourceState::PackageOut { tail, .. }
            | SourceState::Verifying { tail }
            | SourceState::Finishing { tail } => Some(tail),
            _ => None,
        }
    }

    fn tail_mut(&mut self) -> Option<&mut Tail> {
        match self {
            SourceState::PackageOut { tail, .. }
            | SourceState::Verifying { tail }
            | SourceState::Finishing { tail } => Some(tail),
            _ => None,
        }
    }

    /// Name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            SourceState::Booting { .. } => "booting",
            SourceState::Setup { .. } => "setup",
            SourceState::Precopy { .. } => "precopy",
            SourceState::PreDiscard { .. } => "early discard",
            SourceState::Stopping { .. } => "stopping the guest",
            SourceState::FinalSync { .. } => "final dirty sync",
            SourceState::Saving { .. } => "saving the guest state",
            // Named apart once every page is on the wire: the last wait
            // for the destination counts from there.
            SourceState::PackageOut { tail, .. }
                if tail.sent && (!tail.postcopy || tail.push_done) =>
            {
                "every page sent"
            }
            SourceState::PackageOut { .. } => "package sent",
            SourceState::Verifying { .. } => "verifying",
            SourceState::Finishing { .. } => "finishing",
            SourceState::Resync { .. } => "resync",
            SourceState::Paused { .. } => "paused",
            SourceState::Over(s) => s.name(),
        }
    }

    /// The coarse state of the transition table (common/src/state.rs).
    pub fn coarse(&self) -> MigrationState {
        match self {
            SourceState::Booting { .. } | SourceState::Setup { .. } => MigrationState::Setup,
            SourceState::Precopy { .. }
            | SourceState::PreDiscard { .. }
            | SourceState::Stopping { .. }
            | SourceState::FinalSync { .. }
            | SourceState::Saving { .. } => MigrationState::Active,
            SourceState::PackageOut { tail, .. } if tail.postcopy => MigrationState::PostcopyActive,
            SourceState::PackageOut { .. } => MigrationState::Active,
            SourceState::Verifying { .. } | SourceState::Finishing { .. } => {
                MigrationState::Completed
            }
            SourceState::Resync {
                from: Resume::Package { tail, .. },
                ..
            } if tail.postcopy => MigrationState::PostcopyRecover,
            SourceState::Paused {
                from: Resume::Package { tail, .. },
                ..
            } if tail.postcopy => MigrationState::PostcopyPaused,
            SourceState::Resync { .. } | SourceState::Paused { .. } => MigrationState::Active,
            SourceState::Over(s) => *s,
        }
    }

    /// True once the package may have reached the destination.
    pub fn package_out(&self) -> bool {
        self.tail().is_some()
            || *self == SourceState::Over(MigrationState::Completed)
            || matches!(
                self,
                SourceState::Resync {
                    from: Resume::Package { .. },
                    ..
                } | SourceState::Paused {
                    from: Resume::Package { .. },
                    ..
                }
            )
    }

    /// The ram-sender owes an answer in this state (its silence is a
    /// failure after a while).
    pub fn awaits_sender(&self) -> bool {
        match self {
            SourceState::Precopy { .. }
            | SourceState::PreDiscard { mark: None, .. }
            | SourceState::FinalSync { .. } => true,
            SourceState::PackageOut { tail, .. } => {
                !tail.sent || (tail.postcopy && !tail.push_done)
            }
            _ => false,
        }
    }

    /// What the source guest needs if the migration fails now (the seed's
    /// rule: resumed before the package, never after it).
    pub fn guest_fate(&self) -> GuestFate {
        match self {
            SourceState::Booting { .. }
            | SourceState::Setup { .. }
            | SourceState::Precopy { .. }
            | SourceState::PreDiscard { .. } => GuestFate::Running,
            SourceState::Stopping { .. }
            | SourceState::FinalSync { .. }
            | SourceState::Saving { .. } => GuestFate::Resume,
            SourceState::Resync {
                from: Resume::Precopy { resume_guest, .. },
                ..
            }
            | SourceState::Paused {
                from: Resume::Precopy { resume_guest, .. },
                ..
            } => {
                if *resume_guest {
                    GuestFate::Resume
                } else {
                    GuestFate::Running
                }
            }
            _ => GuestFate::Frozen,
        }
    }

    /// What the step waits for, and how long it may take, if it is bounded.
    /// Precopy rounds and the postcopy phase are bounded by liveness
    /// (heartbeats, the ram-sender's progress), not by a step deadline.
    pub fn step(&self) -> Option<&'static str> {
        match self {
            SourceState::Setup { .. } => Some("the destination to accept"),
            SourceState::PreDiscard { .. } => Some("the early discard"),
            SourceState::Stopping { .. } => Some("the guest to stop"),
            SourceState::FinalSync { .. } => Some("the final dirty sync"),
            SourceState::Saving { .. } => Some("the guest state"),
            SourceState::PackageOut {
                dest_running: false,
                ..
            } => Some("the destination guest to run"),
            // Once every page is on the wire the destination has one step
            // to confirm, however it keeps talking meanwhile (before that,
            // the ram-sender's progress bounds the wait).
            SourceState::PackageOut { tail, .. }
                if tail.sent && (!tail.postcopy || tail.push_done) =>
            {
                Some("the destination to have every page")
            }
            SourceState::Finishing { .. } => Some("the destination's process list"),
            SourceState::Resync { .. } => Some("the destination to be ready for new connections"),
            _ => None,
        }
    }
}

/// What the driver does next, in order.
#[derive(Clone, Debug)]
pub enum SrcAction {
    /// Tell the ram-sender.
    Sender(ToRamSender),
    /// The policy decided to switch (reason for the report).
    SwitchDecided(String),
    /// Precopy converged (expected downtime, ms).
    Converged(f64),
    /// Check that every channel postcopy needs is alive, then send `Stop`
    /// to the guest. Past this the failure rule changes.
    StopGuest { postcopy: bool },
    /// Ask the guest for its state.
    SaveState,
    /// Hand the package (the saved state) to the ram-sender.
    SendPackage { postcopy: bool },
    /// The destination guest runs (downtime ends).
    DestRunning,
    /// The destination has every page: release the source guest and check
    /// memory (send digests when verifying by digest).
    Completed,
    /// The memory check result is in: send `Finish`.
    Finish,
    /// The destination listed its processes: the migration is over.
    Done,
    /// (resync) Resume the source guest: it was asked to stop, and the
    /// migration goes back to precopy.
    ResumeGuest,
    /// (resync) Set the `sent` bitmap (`None`: clear it; `Some`: the
    /// destination's `received` bitmap), connect the data connections of
    /// `epoch` and start the ram-sender and page-server again.
    StartRoles {
        epoch: u32,
        start: SenderStart,
        sent: Option<Vec<u8>>,
    },
}

/// The source's state and the policy that decides when precopy ends.
#[derive(Clone, Debug)]
pub struct SourceMachine {
    state: SourceState,
    /// Answers in flight from before a resync (see [`Owed`]): they cross
    /// states, so they are kept beside the state, not in it.
    owed: Owed,
    policy: Policy,
    /// Pages of guest memory (to read the destination's bitmaps).
    pages: u64,
}

impl SourceMachine {
    pub fn new(policy: Policy, pages: u64) -> Self {
        SourceMachine {
            state: SourceState::Booting { requested: false },
            owed: Owed::default(),
            policy,
            pages,
        }
    }

    pub fn state(&self) -> &SourceState {
        &self.state
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn policy_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    fn go(&mut self, next: SourceState) -> Result<(), ProtocolError> {
        let (from, to) = (self.state.coarse(), next.coarse());
        if from != to && !from.can_go(to) {
            return Err(ProtocolError::transition(from, to));
        }
        log::debug!("source: {} -> {}", self.state.name(), next.name());
        self.state = next;
        Ok(())
    }

    /// The control handshake went out.
    pub fn setup_sent(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            SourceState::Booting { requested } => self.go(SourceState::Setup { requested }),
            _ => Err(self.out_of_step("Setup")),
        }
    }

    /// The destination accepted and the roles run: precopy starts (the
    /// ram-sender starts its first round by itself). A start-postcopy that
    /// came early is judged now.
    pub fn roles_started(&mut self) -> Result<Judged<SrcAction>, ProtocolError> {
        match self.state {
            SourceState::Setup { requested } => {
                self.go(SourceState::Precopy { requested: false })?;
                if requested {
                    self.on(&Event::StartPostcopy)
                } else {
                    Ok(Judged::Act(vec![]))
                }
            }
            _ => Err(self.out_of_step("the start of precopy")),
        }
    }

    /// Ends the migration with `outcome` (failed or cancelled, or
    /// completed once the destination listed its processes). Where the
    /// table forbids it (cancelling in postcopy), the coarse state stays.
    pub fn end(&mut self, outcome: MigrationState) {
        let now = self.state.coarse();
        let to = if now == outcome || now.can_go(outcome) {
            outcome
        } else {
            now
        };
        self.state = SourceState::Over(to);
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, SourceState::Over(_))
    }

    /// Takes one answer the guest owed from before a resync: its channel
    /// is FIFO, so they come first, in the order of the commands (Stopped,
    /// State, then Running for the Resume). True if `m` was one.
    fn owes(&mut self, m: &FromGuest) -> bool {
        let owed = &mut self.owed;
        let slot = match m {
            FromGuest::Stopped if owed.stopped => &mut owed.stopped,
            FromGuest::State(_) if owed.state && !owed.stopped => &mut owed.state,
            FromGuest::Running if owed.running && !owed.stopped && !owed.state => &mut owed.running,
            _ => return false,
        };
        *slot = false;
        true
    }

    /// Whether a `received` bitmap from the destination has every page
    /// (its length is checked when it is applied).
    fn full(&self, received: &[u8]) -> bool {
        let pages = self.pages;
        let whole = (pages / 8) as usize;
        received.len() as u64 == pages.div_ceil(8)
            && received[..whole].iter().all(|&b| b == 0xff)
            && (pages.is_multiple_of(8) || received[whole] == (1u8 << (pages % 8)) - 1)
    }

    fn out_of_step(&self, step: &str) -> ProtocolError {
        ProtocolError::new(
            step.to_string(),
            self.state.name(),
            "a step of the source's own out of order",
        )
    }

    /// Judges one event and returns what to do. Events the machine has no
    /// opinion on (exits, heartbeats, progress) come back as `Ignored`.
    pub fn on(&mut self, ev: &Event) -> Result<Judged<SrcAction>, ProtocolError> {
        use SourceState as S;
        let name = super::event_name(ev);
        let refuse = |st: &SourceState, why: &str| -> Result<Judged<SrcAction>, ProtocolError> {
            Err(ProtocolError::new(name.clone(), st.name(), why))
        };
        match ev {
            // ------------------------------------------------ the peer
            Event::Peer(m) => match m {
                ControlMsg::Heartbeat | ControlMsg::Abort { .. } => Ok(Judged::Ignored),
                ControlMsg::SetupAccepted(_) | ControlMsg::SetupRefused { .. } => match self.state
                {
                    S::Setup { .. } => Ok(Judged::Ignored),
                    _ => refuse(&self.state, "an answer to a Setup that is not pending"),
                },
                // One MARK per migration, acked once.
                ControlMsg::DestMark { id } => match &mut self.state {
                    S::PreDiscard { acked, .. } if *acked == 0 && *id > 0 => {
                        *acked = *id;
                        self.after_discard()
                    }
                    // The ack of a MARK whose early discard a resync undid
                    // (it comes before the ResyncReady, on one connection).
                    S::Resync { .. } if self.owed.mark => {
                        self.owed.mark = false;
                        Ok(Judged::Act(vec![]))
                    }
                    st => refuse(st, "no MARK is awaiting its ack"),
                },
                ControlMsg::ResyncReady {
                    epoch,
                    package,
                    received,
                } => {
                    let full = self.full(received);
                    self.resync_ready(*epoch, *package, received, full)
                }
                ControlMsg::Resync { .. } => refuse(&self.state, "only a source asks for a resync"),
                // The destination may have started its guest (or finished)
                // before it learnt of the resync.
                ControlMsg::DestRunning { .. }
                    if matches!(
                        &self.state,
                        S::Resync {
                            from: Resume::Package {
                                dest_running: false,
                                ..
                            },
                            ..
                        }
                    ) =>
                {
                    if let S::Resync {
                        from: Resume::Package { dest_running, .. },
                        ..
                    } = &mut self.state
                    {
                        *dest_running = true;
                    }
                    Ok(Judged::Act(vec![SrcAction::DestRunning]))
                }
                ControlMsg::DestCompleted(_)
                    if matches!(
                        &self.state,
                        S::Resync {
                            from: Resume::Package {
                                dest_running: true,
                                ..
                            },
                            ..
                        }
                    ) =>
                {
                    let S::Resync {
                        from: Resume::Package { mut tail, .. },
                        ..
                    } = self.state.clone()
                    else {
                        unreachable!("matched above")
                    };
                    // The roles are gone: nothing more comes from them.
                    tail.sent = true;
                    tail.push_done = true;
                    tail.served = true;
                    tail.closed = true;
                    self.go(S::Verifying { tail })?;
                    Ok(Judged::Act(vec![SrcAction::Completed]))
                }
                ControlMsg::DestRunning { .. } => match &mut self.state {
                    S::PackageOut { dest_running, .. } if !*dest_running => {
                        *dest_running = true;
                        Ok(Judged::Act(vec![SrcAction::DestRunning]))
                    }
                    S::PackageOut { .. } => refuse(&self.state, "the destination already runs"),
                    st => refuse(st, "the package was not sent"),
                },
                ControlMsg::DestCompleted(_) => match &self.state {
                    S::PackageOut {
                        dest_running: true,
                        tail,
                    } => {
                        let tail = *tail;
                        self.go(S::Verifying { tail })?;
                        Ok(Judged::Act(vec![SrcAction::Completed]))
                    }
                    S::PackageOut { .. } => refuse(&self.state, "DestRunning has not come first"),
                    st => refuse(st, "the package was not sent"),
                },
                ControlMsg::Verified(_) => match self.state {
                    S::Verifying { tail } => {
                        self.go(S::Finishing { tail })?;
                        Ok(Judged::Act(vec![SrcAction::Finish]))
                    }
                    _ => refuse(&self.state, "no memory check is running"),
                },
                ControlMsg::DestDone { .. } => match self.state {
                    S::Finishing { .. } => {
                        self.go(S::Over(MigrationState::Completed))?;
                        Ok(Judged::Act(vec![SrcAction::Done]))
                    }
                    _ => refuse(&self.state, "Finish was not sent"),
                },
                ControlMsg::Setup(_)
                | ControlMsg::SourceDigests { .. }
                | ControlMsg::SourceDigestsEnd
                | ControlMsg::Finish => refuse(&self.state, "only a source sends it"),
            },
            // ------------------------------------------------ ram-sender
            Event::Sender(m) => match m {
                FromRamSender::Progress(_) => Ok(Judged::Ignored),
                FromRamSender::Error(_) => Ok(Judged::Ignored),
                FromRamSender::Synced(stats) => match &mut self.state {
                    S::Precopy { requested } => {
                        let requested = *requested;
                        let d = self.policy.decide(stats, requested);
                        self.decided(d, true)
                    }
                    // A round that ended as the switch was decided: moot.
                    S::PreDiscard {
                        mark: None,
                        round_open,
                        ..
                    } if *round_open => {
                        *round_open = false;
                        Ok(Judged::Act(vec![]))
                    }
                    st => refuse(st, "no precopy round is running"),
                },
                FromRamSender::PreDiscarded { mark: m, .. } => match &mut self.state {
                    S::PreDiscard {
                        mark, round_open, ..
                    } if mark.is_none() => {
                        // The ram-sender answers in order: a round's Synced
                        // would have come first.
                        *round_open = false;
                        *mark = Some(*m);
                        self.after_discard()
                    }
                    st => refuse(st, "no early discard was asked for"),
                },
                FromRamSender::FinalSyncDone(_) => match self.state {
                    S::FinalSync { postcopy } => {
                        self.go(S::Saving { postcopy })?;
                        Ok(Judged::Act(vec![SrcAction::SaveState]))
                    }
                    _ => refuse(&self.state, "no final sync was asked for"),
                },
                // The destination can be done before the ram-sender says
                // the package left, or that the push ended.
                FromRamSender::PackageSent { .. } => match self.state.tail_mut() {
                    Some(t) if !t.sent => {
                        t.sent = true;
                        Ok(Judged::Act(vec![]))
                    }
                    _ => refuse(&self.state, "no package was handed over, or it was reported sent already"),
                },
                FromRamSender::PushDone(_) => match self.state.tail_mut() {
                    // After PackageSent: the ram-sender reports in order.
                    Some(t) if t.postcopy && t.sent && !t.push_done => {
                        t.push_done = true;
                        Ok(Judged::Act(vec![]))
                    }
                    _ => refuse(&self.state, "no postcopy push runs"),
                },
            },
            // ------------------------------------------------ page-server
            Event::Server(m) => match m {
                FromPageServer::Error(_) => Ok(Judged::Ignored),
                FromPageServer::PostcopyDone(_) => match self.state.tail_mut() {
                    Some(t) if t.postcopy && !t.served && !t.closed => {
                        t.served = true;
                        Ok(Judged::Act(vec![]))
                    }
                    _ => refuse(&self.state, "no postcopy runs, or it was reported done already"),
                },
                FromPageServer::Closed(_) => match &mut self.state {
                    // The destination closes the return path as it ends,
                    // after its POSTCOPY_DONE (the page-server reports in
                    // order); a precopy completion never uses it.
                    S::PackageOut { tail, .. } | S::Verifying { tail } | S::Finishing { tail }
                        if !tail.closed && (!tail.postcopy || tail.served) =>
                    {
                        tail.closed = true;
                        Ok(Judged::Act(vec![]))
                    }
                    S::PackageOut { tail, .. } | S::Verifying { tail } | S::Finishing { tail }
                        if !tail.closed =>
                    {
                        refuse(
                        &self.state,
                        "the destination closed the return path in postcopy before it had every page",
                        )
                    }
                    S::PackageOut { .. } | S::Verifying { .. } | S::Finishing { .. } => {
                        refuse(&self.state, "the return path ended already")
                    }
                    _ if self.policy.mode() == PostcopyMode::Never => Ok(Judged::Ignored),
                    _ => refuse(
                        &self.state,
                        "the destination closed the return path before the switch; postcopy could not fetch a page",
                    ),
                },
            },
            // ------------------------------------------------ the guest
            Event::Guest(m) => match m {
                FromGuest::Progress { .. } | FromGuest::Error(_) => Ok(Judged::Ignored),
                FromGuest::Stopped | FromGuest::State(_) | FromGuest::Running
                    if self.owes(m) =>
                {
                    Ok(Judged::Act(vec![]))
                }
                // The guest answers in order: nothing new before what an
                // earlier command still owes.
                FromGuest::Stopped | FromGuest::State(_) | FromGuest::Running
                    if self.owed.stopped || self.owed.state || self.owed.running =>
                {
                    refuse(&self.state, "the guest owes an answer to an earlier command first")
                }
                FromGuest::Ready { .. } | FromGuest::Running => match self.state {
                    S::Booting { .. } => Ok(Judged::Ignored),
                    _ => refuse(&self.state, "the guest started already"),
                },
                FromGuest::Stopped => match self.state {
                    S::Stopping { postcopy } => {
                        self.go(S::FinalSync { postcopy })?;
                        Ok(Judged::Act(vec![SrcAction::Sender(if postcopy {
                            ToRamSender::Switchover
                        } else {
                            ToRamSender::Complete
                        })]))
                    }
                    _ => refuse(&self.state, "the guest was not asked to stop"),
                },
                FromGuest::State(_) => match self.state {
                    S::Saving { postcopy } => {
                        self.go(S::PackageOut {
                            dest_running: false,
                            tail: Tail::new(postcopy),
                        })?;
                        Ok(Judged::Act(vec![SrcAction::SendPackage { postcopy }]))
                    }
                    _ => refuse(&self.state, "the guest was not asked for its state"),
                },
                FromGuest::Listening | FromGuest::Loaded => {
                    refuse(&self.state, "only a destination guest says it")
                }
            },
            // ------------------------------------------------ local
            Event::StartPostcopy => {
                if self.policy.mode() == PostcopyMode::Never {
                    log::warn!("start-postcopy ignored: this migration runs with --postcopy never");
                    return Ok(Judged::Ignored);
                }
                match &mut self.state {
                    S::Booting { requested } | S::Setup { requested } => {
                        *requested = true;
                        Ok(Judged::Act(vec![]))
                    }
                    S::Precopy { requested } => {
                        *requested = true;
                        // Switch now if allowed: PreDiscard interrupts the
                        // running round (the ram-sender takes it mid-round).
                        match self.policy.requested() {
                            d @ Decision::Switchover { .. } => self.decided(d, false),
                            _ => Ok(Judged::Act(vec![])),
                        }
                    }
                    _ => {
                        log::warn!("start-postcopy ignored: the migration is past precopy");
                        Ok(Judged::Ignored)
                    }
                }
            }
            Event::Handler(_) => refuse(&self.state, "only a destination role sends it"),
            Event::Interrupt(_) | Event::ChannelClosed(_) | Event::Exited { .. } | Event::PeerLost(_)
            | Event::Retired(_)
            | Event::Recover(_)
            | Event::Command(..) => {
                Ok(Judged::Ignored)
            }
        }
    }

    /// Acts on a policy decision. `answer_round`: the ram-sender waits for
    /// a decision on the sync it just reported.
    fn decided(
        &mut self,
        d: Decision,
        answer_round: bool,
    ) -> Result<Judged<SrcAction>, ProtocolError> {
        match d {
            Decision::Continue => Ok(Judged::Act(if answer_round {
                vec![SrcAction::Sender(ToRamSender::Continue)]
            } else {
                vec![]
            })),
            Decision::Complete { expected_ms } => {
                self.go(SourceState::Stopping { postcopy: false })?;
                Ok(Judged::Act(vec![
                    SrcAction::Converged(expected_ms),
                    SrcAction::StopGuest { postcopy: false },
                ]))
            }
            Decision::Switchover { reason } => {
                self.go(SourceState::PreDiscard {
                    mark: None,
                    acked: 0,
                    round_open: !answer_round,
                })?;
                Ok(Judged::Act(vec![
                    SrcAction::SwitchDecided(reason),
                    SrcAction::Sender(ToRamSender::PreDiscard),
                ]))
            }
        }
    }

    /// The early discard is over once the destination processed its MARK.
    fn after_discard(&mut self) -> Result<Judged<SrcAction>, ProtocolError> {
        match self.state {
            SourceState::PreDiscard {
                mark: Some(m),
                acked,
                ..
            } if acked >= m => {
                self.go(SourceState::Stopping { postcopy: true })?;
                Ok(Judged::Act(vec![SrcAction::StopGuest { postcopy: true }]))
            }
            _ => Ok(Judged::Act(vec![])),
        }
    }

    /// What a resync would resume from here; `None` where there is no
    /// data plane to replace (before the roles start, or once the
    /// destination has every page).
    fn resume_point(&self) -> Option<Resume> {
        let manual = self.policy.mode() == PostcopyMode::Manual;
        Some(match &self.state {
            SourceState::Precopy { requested } => Resume::Precopy {
                requested: *requested,
                resume_guest: false,
            },
            // The switch is undone; in manual mode it was asked for, so it
            // is asked for again.
            SourceState::PreDiscard { .. } => Resume::Precopy {
                requested: manual,
                resume_guest: false,
            },
            SourceState::Stopping { postcopy }
            | SourceState::FinalSync { postcopy }
            | SourceState::Saving { postcopy } => Resume::Precopy {
                requested: *postcopy && manual,
                resume_guest: true,
            },
            SourceState::PackageOut { dest_running, tail } => Resume::Package {
                dest_running: *dest_running,
                tail: *tail,
            },
            SourceState::Resync { from, .. } | SourceState::Paused { from, .. } => from.clone(),
            _ => return None,
        })
    }

    /// A source data role died or a data connection broke: starts resync
    /// `epoch` (the driver replaces the roles' processes and sends
    /// `Resync`). `Ok(false)`: nothing to resync, the destination has every
    /// page already. Errors before precopy starts.
    pub fn begin_resync(&mut self, epoch: u32) -> Result<bool, ProtocolError> {
        if matches!(
            self.state,
            SourceState::Verifying { .. } | SourceState::Finishing { .. }
        ) {
            return Ok(false);
        }
        let from = self
            .resume_point()
            .ok_or_else(|| self.out_of_step("a resync"))?;
        // Answers already on their way to commands given in this state.
        match self.state {
            SourceState::PreDiscard { acked: 0, .. } => self.owed.mark = true,
            SourceState::Stopping { .. } => self.owed.stopped = true,
            SourceState::Saving { .. } => self.owed.state = true,
            _ => {}
        }
        self.go(SourceState::Resync { epoch, from })?;
        Ok(true)
    }

    /// The link to the destination is lost. After the package the
    /// migration pauses (true); before it, it fails (false: the source
    /// guest runs on, the caller reports the loss).
    pub fn pause(&mut self, epoch: u32) -> Result<bool, ProtocolError> {
        match self.resume_point() {
            Some(from @ Resume::Package { .. }) => {
                self.go(SourceState::Paused { epoch, from })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The link is back: resync `epoch` starts.
    pub fn link_back(&mut self, epoch: u32) -> Result<(), ProtocolError> {
        match &self.state {
            SourceState::Paused { from, .. } => {
                let from = from.clone();
                self.go(SourceState::Resync { epoch, from })
            }
            _ => Err(self.out_of_step("reconnecting")),
        }
    }

    /// The resync epoch in progress, if any.
    pub fn epoch(&self) -> Option<u32> {
        match self.state {
            SourceState::Resync { epoch, .. } | SourceState::Paused { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// The destination is ready for resync `epoch` (see
    /// [`ControlMsg::ResyncReady`]); `full`: `received` has every page.
    fn resync_ready(
        &mut self,
        epoch: u32,
        package: bool,
        received: &[u8],
        full: bool,
    ) -> Result<Judged<SrcAction>, ProtocolError> {
        let name = "ResyncReady".to_string();
        let SourceState::Resync { epoch: ours, from } = &self.state else {
            return Err(ProtocolError::new(
                name,
                self.state.name(),
                "no resync is in progress",
            ));
        };
        if epoch != *ours {
            return Err(ProtocolError::new(
                name,
                self.state.name(),
                &format!("it is for epoch {epoch}, not {ours}"),
            ));
        }
        // After the ResyncReady no ack of an old MARK can come.
        self.owed.mark = false;
        let restart_precopy = |m: &mut Self, requested: bool, resume_guest: bool| {
            m.policy.restart();
            m.go(SourceState::Precopy { requested })?;
            let mut next = vec![];
            if resume_guest {
                m.owed.running = true;
                next.push(SrcAction::ResumeGuest);
            }
            next.push(SrcAction::StartRoles {
                epoch,
                start: SenderStart::Precopy,
                sent: None,
            });
            Ok(Judged::Act(next))
        };
        match from.clone() {
            Resume::Precopy { .. } if package => Err(ProtocolError::new(
                name,
                self.state.name(),
                "the destination claims a package that was never sent",
            )),
            Resume::Precopy {
                requested,
                resume_guest,
            } => restart_precopy(self, requested, resume_guest),
            Resume::Package { dest_running, .. } if !package => {
                if dest_running {
                    return Err(ProtocolError::new(
                        name,
                        self.state.name(),
                        "the destination ran the guest without the package",
                    ));
                }
                // The package never arrived whole: the destination guest
                // never ran, so the source guest may run on (the seed's
                // rule holds: no second copy exists).
                restart_precopy(self, false, true)
            }
            Resume::Package {
                dest_running,
                mut tail,
            } => {
                tail.sent = true;
                if full {
                    // Every page is there: nothing to send, no roles.
                    tail.push_done = true;
                    self.go(SourceState::PackageOut { dest_running, tail })?;
                    return Ok(Judged::Act(vec![]));
                }
                if !tail.postcopy {
                    return Err(ProtocolError::new(
                        name,
                        self.state.name(),
                        "pages are missing after a package that did not listen",
                    ));
                }
                tail.push_done = false;
                tail.served = false;
                tail.closed = false;
                self.go(SourceState::PackageOut { dest_running, tail })?;
                Ok(Judged::Act(vec![SrcAction::StartRoles {
                    epoch,
                    start: SenderStart::Push,
                    sent: Some(received.to_vec()),
                }]))
            }
        }
    }

    /// Whether the return path may end now (the page-server's `Closed`):
    /// once the destination said it has every page, or when postcopy is
    /// not used. Otherwise its end is a broken data plane.
    pub fn expects_closed(&self) -> bool {
        match self.state.tail() {
            Some(t) => !t.closed && (!t.postcopy || t.served),
            None => self.policy.mode() == PostcopyMode::Never,
        }
    }

    /// Cancelling is allowed until the package may have left.
    pub fn can_cancel(&self) -> Result<(), &'static str> {
        if self.state.package_out() {
            Err("the package was sent: the destination may be running the only live copy of the guest")
        } else {
            Ok(())
        }
    }
}
