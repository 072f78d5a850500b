//! The destination supervisor's protocol state (docs/state-machine.md): one
//! enum whose variants hold what that state needs, judging every event from
//! the source, the fault-handler and the guest by the state alone. No I/O:
//! [`DestMachine::on`] returns the next steps for the driver.

use common::control::{ControlMsg, PostcopyMode};
use common::msg::{FromFaultHandler, FromGuest};
use common::state::MigrationState;

use crate::events::Event;

use super::{Judged, ProtocolError};

/// Where the destination migration is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestState {
    /// The source's `Setup` is awaited on the control connection.
    Accepting,
    /// Setup accepted: the guest and the fault-handler start, the data
    /// connections come in. `postcopy_allowed`: the Setup allows a switch.
    Preparing { postcopy_allowed: bool },
    /// Pages flow; the package is awaited (and, when the Setup allows
    /// postcopy, MARKs of the early discard). `marked`: a MARK came, so
    /// the source committed to postcopy and its package must listen.
    Precopy {
        postcopy_allowed: bool,
        marked: bool,
    },
    /// The package asked to listen: the guest registers its memory with
    /// the userfaultfd.
    Listening,
    /// The guest loads the saved state. `pages_done`: the fault-handler
    /// already has every page (it may finish before the guest runs).
    Loading { postcopy: bool, pages_done: bool },
    /// `Run` sent to the guest.
    Starting { postcopy: bool, pages_done: bool },
    /// The guest runs here, the only live copy from now on; the rest of
    /// the pages are awaited.
    Running { postcopy: bool },
    /// Every page is in and `DestCompleted` sent; the guest is being
    /// stopped for the memory check (`stopped`), and the source's digests
    /// come in (`digests_end`: all of them are here).
    Verifying { stopped: bool, digests_end: bool },
    /// `Verified` sent; the source's `Finish` is awaited.
    AwaitFinish,
    /// The link to the source is lost after the package: the guest goes
    /// on with the pages it has (threads that fault wait), until the
    /// source connects again; then `resume` goes on. Or lost in precopy,
    /// where the package may have been on its way: the source, which may
    /// have handed it over and keeps its guest frozen, must learn that it
    /// never arrived (a resync back to precopy); that wait is bounded.
    Paused { resume: Box<DestState> },
    /// Over: completed, failed or cancelled. `guest_ran`: the guest was
    /// started here before the end.
    Over {
        outcome: MigrationState,
        guest_ran: bool,
    },
}

impl DestState {
    pub fn name(&self) -> &'static str {
        match self {
            DestState::Accepting => "accepting",
            DestState::Preparing { .. } => "preparing",
            DestState::Precopy { .. } => "precopy",
            DestState::Listening => "listening",
            DestState::Loading { .. } => "loading the guest state",
            DestState::Starting { .. } => "starting the guest",
            DestState::Running { .. } => "running",
            DestState::Verifying { .. } => "verifying",
            DestState::AwaitFinish => "awaiting finish",
            DestState::Paused { .. } => "paused",
            DestState::Over { outcome, .. } => outcome.name(),
        }
    }

    pub fn coarse(&self) -> MigrationState {
        match self {
            DestState::Accepting | DestState::Preparing { .. } => MigrationState::Setup,
            DestState::Precopy { .. }
            | DestState::Listening
            | DestState::Loading { .. }
            | DestState::Starting { .. }
            | DestState::Running { postcopy: false } => MigrationState::Active,
            DestState::Running { postcopy: true } => MigrationState::PostcopyActive,
            DestState::Verifying { .. } | DestState::AwaitFinish => MigrationState::Completed,
            DestState::Paused { resume } => match resume.coarse() {
                MigrationState::PostcopyActive => MigrationState::PostcopyPaused,
                other => other,
            },
            DestState::Over { outcome, .. } => *outcome,
        }
    }

    /// True once the guest was started here: from then on this may be the
    /// only live copy, and nothing here tears it down by itself.
    pub fn guest_ran(&self) -> bool {
        match self {
            DestState::Paused { resume } => resume.guest_ran(),
            _ => matches!(
                self,
                DestState::Running { .. }
                    | DestState::Verifying { .. }
                    | DestState::AwaitFinish
                    | DestState::Over {
                        guest_ran: true,
                        ..
                    }
            ),
        }
    }

    /// The guest registered its memory with the userfaultfd: a
    /// fault-handler may place pages through it and serve faults.
    pub fn registered(&self) -> bool {
        if let DestState::Paused { resume } = self {
            return resume.registered();
        }
        matches!(
            self,
            DestState::Loading { postcopy: true, .. }
                | DestState::Starting { postcopy: true, .. }
                | DestState::Running { postcopy: true }
        )
    }

    /// What a bounded step waits for.
    pub fn step(&self) -> Option<&'static str> {
        match self {
            DestState::Accepting => Some("the source's Setup"),
            DestState::Listening => Some("the guest to register its memory"),
            DestState::Loading { .. } => Some("the guest to load its state"),
            DestState::Starting { .. } => Some("the guest to run"),
            DestState::AwaitFinish => Some("the source to finish"),
            _ => None,
        }
    }
}

/// What the destination driver does next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAction {
    /// Tell the source that MARK `id` was processed.
    AckMark(u64),
    /// Ask the guest to register its memory (postcopy).
    Listen,
    /// Tell the fault-handler the guest listens, so it may place pages with
    /// UFFDIO_COPY and serve faults.
    HandlerListening,
    /// Ask the guest to load the package's state.
    Load,
    /// Ask the guest to run.
    Run,
    /// Tell the source the guest runs.
    SendRunning,
    /// Tell the source every page is here, then stop the guest for the
    /// memory check (a KVM guest first writes to its serial port here).
    Completed,
    /// Check memory and send `Verified`.
    Check,
    /// Replace the fault-handler and the data connections (resync
    /// `epoch`): tell the source what is here, accept its connections,
    /// start a fault-handler that resumes.
    Resync(u32),
    /// Over.
    Done,
}

#[derive(Clone, Debug)]
pub struct DestMachine {
    state: DestState,
    /// The last resync epoch (0: none yet).
    epoch: u32,
}

impl Default for DestMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl DestMachine {
    pub fn new() -> Self {
        DestMachine {
            state: DestState::Accepting,
            epoch: 0,
        }
    }

    pub fn state(&self) -> &DestState {
        &self.state
    }

    fn go(&mut self, next: DestState) -> Result<(), ProtocolError> {
        let (from, to) = (self.state.coarse(), next.coarse());
        if from != to && !from.can_go(to) {
            return Err(ProtocolError::transition(from, to));
        }
        log::debug!("destination: {} -> {}", self.state.name(), next.name());
        self.state = next;
        Ok(())
    }

    /// Ends the migration with `outcome`; where the table forbids it
    /// (cancelling once the guest runs here), the coarse state stays.
    pub fn end(&mut self, outcome: MigrationState) {
        let now = self.state.coarse();
        let to = if now == outcome || now.can_go(outcome) {
            outcome
        } else {
            now
        };
        self.state = DestState::Over {
            outcome: to,
            guest_ran: self.state.guest_ran(),
        };
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, DestState::Over { .. })
    }

    /// The fault-handler died (or its connections broke): starts a resync
    /// of our own. `None` when no data plane is needed any more (every
    /// page is here) or none exists yet.
    pub fn begin_resync(&mut self) -> Option<u32> {
        match self.state {
            DestState::Accepting
            | DestState::Preparing { .. }
            | DestState::Verifying { .. }
            | DestState::AwaitFinish
            | DestState::Over { .. } => None,
            // A plain precopy's package follows every page: nothing more
            // is needed once it is here.
            DestState::Loading {
                postcopy: false, ..
            }
            | DestState::Starting {
                postcopy: false, ..
            }
            | DestState::Running { postcopy: false } => None,
            _ => {
                self.epoch += 1;
                Some(self.epoch)
            }
        }
    }

    /// Resync `epoch` is under way: precopy without the package starts
    /// over (a new MARK may come). Returns whether the package is here.
    pub fn resynced(&mut self) -> bool {
        match &mut self.state {
            DestState::Precopy { marked, .. } => {
                *marked = false;
                false
            }
            _ => true,
        }
    }

    /// Every data connection is in and handed to the fault-handler.
    pub fn connected(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            DestState::Preparing { postcopy_allowed } => self.go(DestState::Precopy {
                postcopy_allowed,
                marked: false,
            }),
            _ => Err(ProtocolError::new(
                "data connections".into(),
                self.state.name(),
                "not expected now",
            )),
        }
    }

    /// The memory check was sent.
    pub fn checked(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            DestState::Verifying {
                stopped: true,
                digests_end: true,
            } => self.go(DestState::AwaitFinish),
            _ => Err(ProtocolError::new(
                "the memory check".into(),
                self.state.name(),
                "the guest is not stopped or digests are missing",
            )),
        }
    }

    /// True while paused in precopy: the package never arrived here.
    pub fn paused_before_package(&self) -> bool {
        matches!(&self.state, DestState::Paused { resume } if matches!(**resume, DestState::Precopy { .. }))
    }

    /// The link to the source is lost: from precopy on (the package may be
    /// here, or on its way) the migration pauses (true); before precopy, or
    /// once every page is here, it fails (false).
    pub fn pause(&mut self) -> bool {
        match self.state {
            // The package may be on its way: a source that handed it over
            // pauses and comes back; the driver bounds the wait (a source
            // that lost the link before the package fails and does not).
            DestState::Precopy { .. }
            | DestState::Listening
            | DestState::Loading { .. }
            | DestState::Starting { .. }
            | DestState::Running { .. } => {
                let resume = Box::new(self.state.clone());
                let paused = DestState::Paused { resume };
                // The table allows it: a postcopy guest pauses, a precopy
                // one stays active.
                let ok = self.go(paused).is_ok();
                debug_assert!(ok, "pausing from {:?}", self.state);
                ok
            }
            // Every page is here: the source learns of it when it comes back.
            DestState::Verifying { .. } | DestState::AwaitFinish => false,
            _ => false,
        }
    }

    /// The source connected again: the migration goes on where it paused
    /// (its Resync follows).
    pub fn link_back(&mut self) {
        if let DestState::Paused { resume } = &self.state {
            self.state = (**resume).clone();
        }
    }

    /// Judges one event; see [`super::source::SourceMachine::on`].
    /// `digests`: the source sends digests (verify by digest); otherwise
    /// they count as complete from the start.
    pub fn on(&mut self, ev: &Event, digests: bool) -> Result<Judged<DestAction>, ProtocolError> {
        if let DestState::Paused { resume } = &self.state {
            if let Event::Peer(m) = ev {
                return Err(ProtocolError::new(
                    m.name().to_string(),
                    self.state.name(),
                    "the link to the source is down",
                ));
            }
            // The guest goes on while paused: judge by where it stands.
            let mut inner = DestMachine {
                state: (**resume).clone(),
                epoch: self.epoch,
            };
            let judged = inner.on(ev, digests)?;
            self.state = DestState::Paused {
                resume: Box::new(inner.state),
            };
            return Ok(judged);
        }
        use DestState as S;
        let name = super::event_name(ev);
        let refuse = |st: &DestState, why: &str| -> Result<Judged<DestAction>, ProtocolError> {
            Err(ProtocolError::new(name.clone(), st.name(), why))
        };
        match ev {
            Event::Peer(m) => match m {
                ControlMsg::Heartbeat | ControlMsg::Abort { .. } => Ok(Judged::Ignored),
                ControlMsg::Setup(req) => match self.state {
                    S::Accepting => {
                        self.go(S::Preparing {
                            postcopy_allowed: req.postcopy != PostcopyMode::Never,
                        })?;
                        Ok(Judged::Act(vec![]))
                    }
                    _ => refuse(&self.state, "a second Setup"),
                },
                ControlMsg::SourceDigests { .. } => match self.state {
                    S::Verifying {
                        digests_end: false,
                        ..
                    } if digests => Ok(Judged::Act(vec![])),
                    _ => refuse(&self.state, "no digests are expected now"),
                },
                ControlMsg::SourceDigestsEnd => match &mut self.state {
                    S::Verifying {
                        digests_end,
                        stopped,
                    } if digests && !*digests_end => {
                        *digests_end = true;
                        Ok(Judged::Act(if *stopped {
                            vec![DestAction::Check]
                        } else {
                            vec![]
                        }))
                    }
                    st => refuse(st, "no digests are expected now"),
                },
                ControlMsg::Finish => match self.state {
                    S::AwaitFinish => {
                        self.go(S::Over {
                            outcome: MigrationState::Completed,
                            guest_ran: true,
                        })?;
                        Ok(Judged::Act(vec![DestAction::Done]))
                    }
                    _ => refuse(&self.state, "the memory check was not sent"),
                },
                ControlMsg::Resync { epoch, .. } => match self.state {
                    S::Accepting | S::Preparing { .. } | S::Over { .. } => {
                        refuse(&self.state, "there is no data plane to resync")
                    }
                    // Every page is here: the source learns it from our
                    // DestCompleted, already on its way.
                    S::Verifying { .. } | S::AwaitFinish => Ok(Judged::Ignored),
                    // Ours crossed theirs: the one we started stands.
                    _ if *epoch <= self.epoch => Ok(Judged::Ignored),
                    _ => {
                        self.epoch = *epoch;
                        Ok(Judged::Act(vec![DestAction::Resync(*epoch)]))
                    }
                },
                ControlMsg::SetupAccepted(_)
                | ControlMsg::ResyncReady { .. }
                | ControlMsg::SetupRefused { .. }
                | ControlMsg::DestRunning { .. }
                | ControlMsg::DestMark { .. }
                | ControlMsg::DestCompleted(_)
                | ControlMsg::Verified(_)
                | ControlMsg::DestDone { .. } => refuse(&self.state, "only a destination sends it"),
            },
            Event::Handler(m) => match m {
                FromFaultHandler::Progress(_) | FromFaultHandler::Error(_) => Ok(Judged::Ignored),
                FromFaultHandler::Mark(id, _) => match &mut self.state {
                    S::Precopy {
                        postcopy_allowed: true,
                        marked,
                    } if !*marked => {
                        *marked = true;
                        Ok(Judged::Act(vec![DestAction::AckMark(*id)]))
                    }
                    st => refuse(
                        st,
                        "one MARK only, before the package of a migration that may switch",
                    ),
                },
                FromFaultHandler::Package(pkg, _) => match self.state {
                    S::Precopy { .. } if !pkg.run => refuse(
                        &self.state,
                        "the package does not ask to run the guest; a stopped incoming guest is not supported",
                    ),
                    S::Precopy { marked: false, .. } if pkg.listen => refuse(
                        &self.state,
                        "a package that listens comes after the early discard's MARK",
                    ),
                    S::Precopy { marked: true, .. } if !pkg.listen => refuse(
                        &self.state,
                        "after the early discard's MARK the package must listen",
                    ),
                    S::Precopy { .. } if pkg.listen => {
                        self.go(S::Listening)?;
                        Ok(Judged::Act(vec![DestAction::Listen]))
                    }
                    S::Precopy { .. } => {
                        self.go(S::Loading {
                            postcopy: false,
                            pages_done: false,
                        })?;
                        Ok(Judged::Act(vec![DestAction::Load]))
                    }
                    _ => refuse(&self.state, "a second package"),
                },
                FromFaultHandler::PrecopyDone(_) => self.pages_done(false, digests, &name),
                FromFaultHandler::PostcopyDone(..) => self.pages_done(true, digests, &name),
            },
            Event::Guest(m) => match m {
                FromGuest::Progress { .. } | FromGuest::Error(_) => Ok(Judged::Ignored),
                FromGuest::Ready { .. } => match self.state {
                    S::Preparing { .. } => Ok(Judged::Ignored),
                    _ => refuse(&self.state, "the guest started already"),
                },
                FromGuest::Listening => match self.state {
                    S::Listening => {
                        self.go(S::Loading {
                            postcopy: true,
                            pages_done: false,
                        })?;
                        Ok(Judged::Act(vec![
                            DestAction::HandlerListening,
                            DestAction::Load,
                        ]))
                    }
                    _ => refuse(&self.state, "the guest was not asked to listen"),
                },
                FromGuest::Loaded => match self.state {
                    S::Loading {
                        postcopy,
                        pages_done,
                    } => {
                        self.go(S::Starting {
                            postcopy,
                            pages_done,
                        })?;
                        Ok(Judged::Act(vec![DestAction::Run]))
                    }
                    _ => refuse(&self.state, "the guest was not asked to load"),
                },
                FromGuest::Running => match self.state {
                    S::Starting {
                        postcopy,
                        pages_done,
                    } => {
                        self.go(S::Running { postcopy })?;
                        let mut next = vec![DestAction::SendRunning];
                        if pages_done {
                            self.go(S::Verifying {
                                stopped: false,
                                digests_end: !digests,
                            })?;
                            next.push(DestAction::Completed);
                        }
                        Ok(Judged::Act(next))
                    }
                    _ => refuse(&self.state, "the guest was not asked to run"),
                },
                FromGuest::Stopped => match &mut self.state {
                    S::Verifying {
                        stopped,
                        digests_end,
                    } if !*stopped => {
                        *stopped = true;
                        Ok(Judged::Act(if *digests_end {
                            vec![DestAction::Check]
                        } else {
                            vec![]
                        }))
                    }
                    st => refuse(st, "the guest was not asked to stop"),
                },
                FromGuest::State(_) => refuse(&self.state, "only a source guest saves its state"),
            },
            Event::Sender(_) | Event::Server(_) => refuse(&self.state, "a source role's message"),
            Event::Interrupt(_)
            | Event::ChannelClosed(_)
            | Event::Exited { .. }
            | Event::PeerLost(_)
            | Event::Retired(_)
            | Event::Recover(_)
            | Event::Command(..)
            | Event::StartPostcopy => Ok(Judged::Ignored),
        }
    }

    /// The fault-handler has every page (`postcopy`: through the
    /// userfaultfd). It may say so before the guest runs here.
    fn pages_done(
        &mut self,
        postcopy_done: bool,
        digests: bool,
        name: &str,
    ) -> Result<Judged<DestAction>, ProtocolError> {
        let refuse =
            |st: &DestState, why: &str| Err(ProtocolError::new(name.to_string(), st.name(), why));
        match &mut self.state {
            S::Loading {
                postcopy,
                pages_done,
            }
            | S::Starting {
                postcopy,
                pages_done,
            } if *postcopy == postcopy_done && !*pages_done => {
                *pages_done = true;
                Ok(Judged::Act(vec![]))
            }
            S::Running { postcopy } if *postcopy == postcopy_done => {
                self.go(S::Verifying {
                    stopped: false,
                    digests_end: !digests,
                })?;
                Ok(Judged::Act(vec![DestAction::Completed]))
            }
            st if st.guest_ran() || matches!(st, S::Loading { .. } | S::Starting { .. }) => {
                refuse(st, "the wrong kind of completion, or a second one")
            }
            st => refuse(st, "the package has not arrived"),
        }
    }
}

use DestState as S;
