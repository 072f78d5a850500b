//! The two machines driven through every order of arrival the protocol
//! allows, without processes. A model of each side's environment (the peer
//! supervisor and the roles) answers the machine's steps: each answer goes
//! into the queue of the channel it travels on (FIFO per channel, any order
//! across channels), and proptest chooses which channel delivers next. The
//! checks: legal orders complete; any message the model could not send now
//! is refused with an error naming the message and the state; and a failure
//! at any point leaves the source guest running (before the package) or
//! frozen (after), never stopped.

use std::collections::VecDeque;

use proptest::prelude::*;

use common::control::{ControlMsg, DestSummary, PostcopyMode, SetupAccepted, VerifyResult};
use common::guest::{GuestConfig, GuestKind, Workload};
use common::msg::{
    FinalSync, FromFaultHandler, FromGuest, FromPageServer, FromRamSender, PostcopyStats,
    PushStats, RecvProgress, RoundStats, SendProgress, SenderStart, ServerStats, ToRamSender,
};
use common::state::MigrationState;
use common::types::RemoteAddr;
use common::wire::Package;

use super::dest::{DestAction, DestMachine, DestState};
use super::source::{SourceMachine, SourceState, SrcAction};
use super::{event_name, GuestFate, Judged};
use crate::events::Event;
use crate::policy::Policy;

// ------------------------------------------------------------ messages

fn synced(pending: u64) -> Event {
    Event::Sender(FromRamSender::Synced(RoundStats {
        sync_count: 1,
        round_pages: 1000,
        round_bytes: 1000 * 4096,
        round_us: 1000,
        wire_us: 1000,
        pending_pages: pending,
        bandwidth: 4e9,
        dirty_rate: 10.0,
        ..Default::default()
    }))
}

fn summary() -> DestSummary {
    DestSummary {
        recv: RecvProgress::default(),
        postcopy: None,
        serial_log: None,
        serial_bytes: 0,
    }
}

fn package(listen: bool) -> Package {
    Package {
        listen,
        run: true,
        guest_state: vec![1, 2, 3],
    }
}

/// Every message a source supervisor can receive (heartbeats, progress
/// and errors are allowed anywhere and judged elsewhere).
fn source_catalogue() -> Vec<Event> {
    vec![
        Event::Peer(ControlMsg::SetupAccepted(SetupAccepted {
            postcopy_ready: true,
            uffd_features: 0,
        })),
        Event::Peer(ControlMsg::SetupRefused {
            reason: "no".into(),
        }),
        Event::Peer(ControlMsg::DestMark { id: 1 }),
        Event::Peer(ControlMsg::DestRunning {
            listen_us: 1,
            start_us: 1,
            discard_us: 1,
        }),
        Event::Peer(ControlMsg::DestCompleted(summary())),
        Event::Peer(ControlMsg::Verified(VerifyResult::default())),
        Event::Peer(ControlMsg::DestDone {
            roles: vec![],
            serial_bytes: None,
        }),
        Event::Peer(ControlMsg::Setup(common::control::SetupRequest {
            migration: common::types::MigrationId([0; 16]),
            guest: guest_config(),
            page_size: 4096,
            postcopy: PostcopyMode::Auto,
            verify: common::control::VerifyMethod::None,
            verify_ranges: vec![],
            streams: 1,
        })),
        Event::Peer(ControlMsg::SourceDigests {
            first: 0,
            digests: vec![],
        }),
        Event::Peer(ControlMsg::SourceDigestsEnd),
        Event::Peer(ControlMsg::Finish),
        synced(0),
        Event::Sender(FromRamSender::PreDiscarded { pages: 1, mark: 1 }),
        Event::Sender(FromRamSender::FinalSyncDone(FinalSync::default())),
        Event::Sender(FromRamSender::PackageSent { bytes: 10 }),
        Event::Sender(FromRamSender::PushDone(PushStats::default())),
        Event::Server(FromPageServer::PostcopyDone(ServerStats::default())),
        Event::Server(FromPageServer::Closed(ServerStats::default())),
        Event::Guest(FromGuest::Ready {
            base: RemoteAddr(0),
            state_bytes: 0,
        }),
        Event::Guest(FromGuest::Running),
        Event::Guest(FromGuest::Stopped),
        Event::Guest(FromGuest::State(vec![1])),
        Event::Guest(FromGuest::Listening),
        Event::Guest(FromGuest::Loaded),
        Event::Handler(FromFaultHandler::Mark(1, RecvProgress::default())),
        Event::Peer(ControlMsg::Resync {
            epoch: 1,
            reason: "a role died".into(),
        }),
        Event::Peer(ControlMsg::ResyncReady {
            epoch: 1,
            package: true,
            received: vec![0xff; 32],
        }),
    ]
}

fn guest_config() -> GuestConfig {
    GuestConfig {
        kind: GuestKind::Process,
        mem_bytes: 1 << 20,
        vcpus: 1,
        workload: Workload::Idle,
        boot_sector: None,
    }
}

/// Messages allowed in every state of the source: they carry no protocol
/// step.
fn noise(i: u8) -> Event {
    match i % 5 {
        0 => Event::Peer(ControlMsg::Heartbeat),
        1 => Event::Sender(FromRamSender::Progress(SendProgress::default())),
        2 => Event::Guest(FromGuest::Progress {
            ops: 1,
            booted: true,
            running: true,
        }),
        3 => Event::Interrupt(2),
        _ => Event::Exited {
            pid: 1,
            status: common::control::ExitStatus::Code(0),
        },
    }
}

// ------------------------------------------------------------ the model

/// The channels into a supervisor, each FIFO.
#[derive(Default)]
struct Queues(Vec<VecDeque<Event>>);

impl Queues {
    fn new(n: usize) -> Self {
        Queues((0..n).map(|_| VecDeque::new()).collect())
    }

    fn push(&mut self, ch: usize, ev: Event) {
        self.0[ch].push_back(ev);
    }

    /// Takes the head of the `pick`-th non-empty channel.
    fn pop(&mut self, pick: u8) -> Option<Event> {
        let ready: Vec<usize> = (0..self.0.len())
            .filter(|&i| !self.0[i].is_empty())
            .collect();
        if ready.is_empty() {
            return None;
        }
        let ch = ready[pick as usize % ready.len()];
        self.0[ch].pop_front()
    }

    /// The names of the messages that may arrive next.
    fn heads(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|q| q.front())
            .map(event_name)
            .collect()
    }
}

const PEER: usize = 0;
const SENDER: usize = 1;
const SERVER: usize = 2;
const GUEST: usize = 3;

/// The source's world: the destination supervisor, ram-sender,
/// page-server and guest, answering the machine's steps as the real ones
/// would.
struct SourceWorld {
    q: Queues,
    /// Syncs before precopy converges (each Continue brings another).
    rounds_left: u32,
    /// The guest was sent Stop and not Resume (whatever it answered).
    guest_stopped: bool,
    package_handed: bool,
    postcopy: bool,
    /// A start-postcopy in mid-round cuts the round short (no Synced).
    interrupt_drops: bool,
    /// A page-server runs (none after a resync that needed no roles).
    server_alive: bool,
}

impl SourceWorld {
    fn new(rounds: u32) -> Self {
        SourceWorld {
            q: Queues::new(4),
            rounds_left: rounds,
            guest_stopped: false,
            package_handed: false,
            postcopy: false,
            interrupt_drops: false,
            server_alive: true,
        }
    }

    fn next_sync(&mut self) -> Event {
        if self.rounds_left > 0 {
            self.rounds_left -= 1;
            synced(1 << 30)
        } else {
            synced(0)
        }
    }

    fn act(&mut self, a: &SrcAction) {
        if let SrcAction::StartRoles { .. } = a {
            self.server_alive = true;
        }
        match a {
            SrcAction::Sender(ToRamSender::Continue) => {
                let s = self.next_sync();
                self.q.push(SENDER, s);
            }
            SrcAction::Sender(ToRamSender::PreDiscard) if self.interrupt_drops => {
                // The round was cut short: its Synced never comes.
                self.q.0[SENDER].retain(|e| !matches!(e, Event::Sender(FromRamSender::Synced(_))));
                self.interrupt_drops = false;
                self.act(&SrcAction::Sender(ToRamSender::PreDiscard));
            }
            SrcAction::Sender(ToRamSender::PreDiscard) => {
                // The MARK is on the wire before the ram-sender says so:
                // the destination's ack may come first.
                self.q.push(
                    SENDER,
                    Event::Sender(FromRamSender::PreDiscarded { pages: 3, mark: 1 }),
                );
                self.q
                    .push(PEER, Event::Peer(ControlMsg::DestMark { id: 1 }));
            }
            SrcAction::Sender(ToRamSender::Complete | ToRamSender::Switchover) => self.q.push(
                SENDER,
                Event::Sender(FromRamSender::FinalSyncDone(FinalSync::default())),
            ),
            SrcAction::Sender(other) => panic!("unexpected command {other:?}"),
            SrcAction::StopGuest { .. } => {
                self.guest_stopped = true;
                self.q.push(GUEST, Event::Guest(FromGuest::Stopped));
            }
            SrcAction::SaveState => self.q.push(GUEST, Event::Guest(FromGuest::State(vec![7]))),
            SrcAction::SendPackage { postcopy } => {
                self.package_handed = true;
                self.q.push(
                    SENDER,
                    Event::Sender(FromRamSender::PackageSent { bytes: 3 }),
                );
                self.q.push(
                    PEER,
                    Event::Peer(ControlMsg::DestRunning {
                        listen_us: 1,
                        start_us: 1,
                        discard_us: 0,
                    }),
                );
                self.q
                    .push(PEER, Event::Peer(ControlMsg::DestCompleted(summary())));
                if *postcopy {
                    self.q.push(
                        SENDER,
                        Event::Sender(FromRamSender::PushDone(PushStats::default())),
                    );
                    self.q.push(
                        SERVER,
                        Event::Server(FromPageServer::PostcopyDone(ServerStats::default())),
                    );
                    // The destination may close the return path once it
                    // said it has every page.
                    self.q.push(
                        SERVER,
                        Event::Server(FromPageServer::Closed(ServerStats::default())),
                    );
                }
                self.postcopy = *postcopy;
            }
            SrcAction::Completed => self.q.push(
                PEER,
                Event::Peer(ControlMsg::Verified(VerifyResult::default())),
            ),
            SrcAction::Finish => {
                self.q.push(
                    PEER,
                    Event::Peer(ControlMsg::DestDone {
                        roles: vec![],
                        serial_bytes: None,
                    }),
                );
                // The destination closes the return path as it ends.
                if !self.postcopy && self.server_alive {
                    self.q.push(
                        SERVER,
                        Event::Server(FromPageServer::Closed(ServerStats::default())),
                    );
                }
            }
            SrcAction::ResumeGuest => {
                self.guest_stopped = false;
                self.q.push(GUEST, Event::Guest(FromGuest::Running));
            }
            SrcAction::StartRoles { start, .. } => match start {
                // Precopy starts over: a new ram-sender's first round.
                SenderStart::Precopy => {
                    let s = self.next_sync();
                    self.q.push(SENDER, s);
                }
                // The push of what the destination lacks, on new roles.
                SenderStart::Push => {
                    self.q.push(
                        SENDER,
                        Event::Sender(FromRamSender::PushDone(PushStats::default())),
                    );
                    self.q.push(
                        SERVER,
                        Event::Server(FromPageServer::PostcopyDone(ServerStats::default())),
                    );
                    self.q.push(
                        SERVER,
                        Event::Server(FromPageServer::Closed(ServerStats::default())),
                    );
                }
            },
            SrcAction::SwitchDecided(_)
            | SrcAction::Converged(_)
            | SrcAction::DestRunning
            | SrcAction::Done => {}
        }
    }

    fn apply(&mut self, j: Judged<SrcAction>) {
        if let Judged::Act(actions) = j {
            for a in &actions {
                self.act(a);
            }
        }
    }

    /// The data roles died and the source asked for resync `epoch`: what
    /// they had queued is never heard (their gates closed); the
    /// destination answers, unless it finished already (it then ignores
    /// the request and its DestCompleted is on the way).
    fn resync(&mut self, epoch: u32) {
        self.q.0[SENDER].clear();
        self.q.0[SERVER].clear();
        self.server_alive = false;
        let completed = self.q.0[PEER]
            .iter()
            .any(|e| matches!(e, Event::Peer(ControlMsg::DestCompleted(_))));
        if completed {
            return;
        }
        // The destination got a package handed over (this model loses
        // none); after a postcopy one half the pages are there.
        let received = match (self.package_handed, self.postcopy) {
            (false, _) => vec![0u8; 32],
            (true, false) => vec![0xff; 32],
            (true, true) => [vec![0xff; 16], vec![0u8; 16]].concat(),
        };
        self.q.push(
            PEER,
            Event::Peer(ControlMsg::ResyncReady {
                epoch,
                package: self.package_handed,
                received,
            }),
        );
    }
}

fn source_machine(mode: PostcopyMode, after_syncs: Option<u32>) -> SourceMachine {
    let policy = Policy::new(
        mode,
        std::time::Duration::from_millis(300),
        after_syncs,
        0,
        0,
    );
    SourceMachine::new(policy, 256)
}

/// Runs a source migration in the order `picks` chooses. `fail_at`: end
/// it with a failure after that many deliveries. `probe`: at every step,
/// also offer each message that cannot come now, on a copy of the machine,
/// and require a refusal that names it and the state. Returns the final
/// machine and world.
fn run_source(
    mode: PostcopyMode,
    rounds: u32,
    picks: &[u8],
    start_at: Option<usize>,
    fail_at: Option<usize>,
    resync_at: Option<usize>,
    probe: bool,
) -> Result<(SourceMachine, SourceWorld), TestCaseError> {
    let after = (mode == PostcopyMode::Manual).then_some(rounds.max(1));
    let mut m = source_machine(mode, after);
    let mut w = SourceWorld::new(rounds);
    m.setup_sent().unwrap();
    w.apply(Judged::Act(vec![]));
    let j = m.roles_started().unwrap();
    w.apply(j);
    // The ram-sender starts its first round by itself.
    let s = w.next_sync();
    w.q.push(SENDER, s);
    let catalogue = source_catalogue();
    let mut step = 0usize;
    let mut picks = picks.iter().copied().cycle();
    while !m.is_over() {
        if fail_at == Some(step) {
            return Ok((m, w));
        }
        if resync_at == Some(step) {
            // A data role dies here: the driver asks for resync 1.
            if m.begin_resync(1)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                w.resync(1);
            }
        }
        if start_at == Some(step) {
            w.interrupt_drops = picks.clone().next().unwrap_or(0) % 2 == 0;
            let j = m
                .on(&Event::StartPostcopy)
                .map_err(|e| TestCaseError::fail(format!("start-postcopy refused: {e}")))?;
            w.apply(j);
        }
        if probe {
            let heads = w.q.heads();
            for ev in &catalogue {
                let name = event_name(ev);
                if heads.contains(&name) {
                    continue;
                }
                // A migration that never uses the return path does not
                // care when it ends.
                let unused_closed = name == "page-server Closed"
                    && (mode == PostcopyMode::Never && m.state().tail().is_none()
                        || m.state().tail().is_some_and(|t| !t.postcopy && !t.closed));
                // A round interrupted by the switch may never send its
                // Synced: the ram-sender's next word may be PreDiscarded.
                // (Or it had sent it already.) Only the ram-sender knows.
                let interrupted = (name == "ram-sender PreDiscarded"
                    || name == "ram-sender Synced")
                    && matches!(
                        m.state(),
                        SourceState::PreDiscard {
                            round_open: true,
                            ..
                        }
                    );
                // Only the destination knows whether it finished before
                // our resync request reached it.
                let resync_answer =
                    name == "ResyncReady" && matches!(m.state(), SourceState::Resync { .. });
                if unused_closed || interrupted || resync_answer {
                    continue;
                }
                let mut copy = m.clone();
                match copy.on(ev) {
                    Err(e) => {
                        let text = e.to_string();
                        prop_assert!(
                            text.contains(&name) && text.contains(m.state().name()),
                            "error does not name {name} and {}: {text}",
                            m.state().name()
                        );
                    }
                    Ok(j) => prop_assert!(
                        false,
                        "{name} accepted in state {:?} ({j:?}); it cannot come now (next: {heads:?})",
                        m.state()
                    ),
                }
            }
        }
        let pick = picks.next().unwrap_or(0);
        // Noise now and then: it never changes anything.
        if pick % 7 == 0 {
            let before = m.state().clone();
            prop_assert!(matches!(m.on(&noise(pick / 7)), Ok(Judged::Ignored)));
            prop_assert_eq!(m.state(), &before);
        }
        let Some(ev) = w.q.pop(pick) else {
            prop_assert!(false, "stuck in state {:?}: nothing can arrive", m.state());
            unreachable!()
        };
        let j = m
            .on(&ev)
            .map_err(|e| TestCaseError::fail(format!("legal {} refused: {e}", event_name(&ev))))?;
        w.apply(j);
        step += 1;
        prop_assert!(step < 10_000, "no end in sight");
    }
    Ok((m, w))
}

fn modes() -> impl Strategy<Value = PostcopyMode> {
    prop_oneof![
        Just(PostcopyMode::Never),
        Just(PostcopyMode::Auto),
        Just(PostcopyMode::Manual)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Every legal order completes, and everything else is refused by name.
    #[test]
    fn source_every_legal_order_completes(
        mode in modes(),
        rounds in 0u32..4,
        picks in proptest::collection::vec(any::<u8>(), 1..64),
        start_at in proptest::option::of(0usize..12),
    ) {
        let (m, w) = run_source(mode, rounds, &picks, start_at, None, None, true)?;
        prop_assert_eq!(m.state(), &SourceState::Over(MigrationState::Completed));
        prop_assert!(w.package_handed);
    }

    /// A failure at any point: the source guest runs (never asked to stop,
    /// or resumed) until the package was handed over; after it, frozen.
    #[test]
    fn source_failure_never_leaves_the_guest_stopped(
        mode in modes(),
        rounds in 0u32..4,
        picks in proptest::collection::vec(any::<u8>(), 1..64),
        start_at in proptest::option::of(0usize..12),
        fail_at in 0usize..40,
    ) {
        let (m, mut w) = run_source(mode, rounds, &picks, start_at, Some(fail_at), None, false)?;
        let fate = m.state().guest_fate();
        match fate {
            GuestFate::Resume => w.guest_stopped = false,
            GuestFate::Running => prop_assert!(!w.guest_stopped, "stopped guest left as running"),
            GuestFate::Frozen => prop_assert!(w.package_handed, "frozen before the package"),
        }
        if !w.package_handed {
            prop_assert!(!w.guest_stopped, "guest left stopped in {:?}", m.state());
            prop_assert!(m.can_cancel().is_ok());
        } else {
            prop_assert_eq!(fate, GuestFate::Frozen);
            prop_assert!(m.can_cancel().is_err());
        }
        // The coarse state follows the table: cancelling after the package
        // is not a transition it allows.
        let mut ended = m.clone();
        ended.end(MigrationState::Cancelled);
        if w.package_handed && m.state().coarse() != MigrationState::Active {
            prop_assert_ne!(ended.state().coarse(), MigrationState::Cancelled);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// A data role dies at any point: the resync (a fresh precopy before
    /// the package, the push of what is missing after it) completes in
    /// every order, and a failure during it still never leaves the guest
    /// stopped.
    #[test]
    fn source_resync_at_any_point_completes(
        mode in modes(),
        rounds in 0u32..3,
        picks in proptest::collection::vec(any::<u8>(), 1..64),
        start_at in proptest::option::of(0usize..12),
        resync_at in 0usize..30,
    ) {
        let (m, w) = run_source(mode, rounds, &picks, start_at, None, Some(resync_at), true)?;
        prop_assert_eq!(m.state(), &SourceState::Over(MigrationState::Completed));
        prop_assert!(w.package_handed);
        prop_assert!(!w.guest_stopped || w.package_handed);
    }

    #[test]
    fn source_failure_after_resync_never_leaves_the_guest_stopped(
        mode in modes(),
        picks in proptest::collection::vec(any::<u8>(), 1..64),
        resync_at in 0usize..20,
        fail_at in 0usize..40,
    ) {
        let (m, mut w) = run_source(mode, 1, &picks, None, Some(fail_at), Some(resync_at), false)?;
        match m.state().guest_fate() {
            GuestFate::Resume => w.guest_stopped = false,
            GuestFate::Running => prop_assert!(!w.guest_stopped, "stopped guest left as running in {:?}", m.state()),
            GuestFate::Frozen => prop_assert!(w.package_handed, "frozen before the package"),
        }
        prop_assert!(!w.guest_stopped || w.package_handed, "guest left stopped in {:?}", m.state());
    }
}

/// Fault 1 of issue 7, by hand: DestRunning and DestCompleted both arrive
/// before the ram-sender says the package left.
#[test]
fn dest_reports_before_package_sent_complete() {
    let mut m = source_machine(PostcopyMode::Never, None);
    m.setup_sent().unwrap();
    m.roles_started().unwrap();
    let mut go = |ev: Event| m.on(&ev).unwrap();
    go(synced(0));
    go(Event::Guest(FromGuest::Stopped));
    go(Event::Sender(FromRamSender::FinalSyncDone(
        FinalSync::default(),
    )));
    go(Event::Guest(FromGuest::State(vec![])));
    go(Event::Peer(ControlMsg::DestRunning {
        listen_us: 0,
        start_us: 0,
        discard_us: 0,
    }));
    go(Event::Peer(ControlMsg::DestCompleted(summary())));
    go(Event::Sender(FromRamSender::PackageSent { bytes: 1 }));
    assert!(matches!(m.state(), SourceState::Verifying { .. }));
}

/// The reverse is a broken peer: refused, naming message and state.
#[test]
fn dest_completed_before_running_is_refused() {
    let mut m = source_machine(PostcopyMode::Never, None);
    m.setup_sent().unwrap();
    m.roles_started().unwrap();
    m.on(&synced(0)).unwrap();
    m.on(&Event::Guest(FromGuest::Stopped)).unwrap();
    m.on(&Event::Sender(FromRamSender::FinalSyncDone(
        FinalSync::default(),
    )))
    .unwrap();
    m.on(&Event::Guest(FromGuest::State(vec![]))).unwrap();
    let e = m
        .on(&Event::Peer(ControlMsg::DestCompleted(summary())))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "DestCompleted is not allowed in state package sent: DestRunning has not come first"
    );
}

/// Fault 2 of issue 7: a cancel while the guest's Stopped is still on its
/// way must resume it.
#[test]
fn cancel_while_stopping_resumes() {
    let mut m = source_machine(PostcopyMode::Manual, Some(100));
    m.setup_sent().unwrap();
    m.roles_started().unwrap();
    m.on(&Event::StartPostcopy).unwrap();
    m.on(&Event::Sender(FromRamSender::PreDiscarded {
        pages: 0,
        mark: 1,
    }))
    .unwrap();
    let j = m.on(&Event::Peer(ControlMsg::DestMark { id: 1 })).unwrap();
    assert!(
        matches!(j, Judged::Act(ref a) if matches!(a[..], [SrcAction::StopGuest { postcopy: true }]))
    );
    assert_eq!(m.state().guest_fate(), GuestFate::Resume);
    assert!(m.can_cancel().is_ok());
}

/// Fault 3 of issue 7: a return path that closed before the switch fails
/// the migration while the source guest still runs.
#[test]
fn return_path_closed_in_precopy_is_refused() {
    let mut m = source_machine(PostcopyMode::Auto, None);
    m.setup_sent().unwrap();
    m.roles_started().unwrap();
    let e = m
        .on(&Event::Server(FromPageServer::Closed(
            ServerStats::default(),
        )))
        .unwrap_err();
    assert!(e.to_string().contains("return path"), "{e}");
    assert_eq!(m.state().guest_fate(), GuestFate::Running);
}

// ------------------------------------------------------------ destination

const D_PEER: usize = 0;
const D_HANDLER: usize = 1;
const D_GUEST: usize = 2;

/// The destination's world: the source supervisor, the fault-handler and
/// the guest.
struct DestWorld {
    q: Queues,
    postcopy: bool,
    digests: bool,
}

impl DestWorld {
    fn act(&mut self, a: &DestAction) {
        match a {
            DestAction::AckMark(_) => {}
            DestAction::Listen => self.q.push(D_GUEST, Event::Guest(FromGuest::Listening)),
            DestAction::HandlerListening => self.q.push(
                D_HANDLER,
                Event::Handler(FromFaultHandler::PostcopyDone(
                    PostcopyStats::default(),
                    RecvProgress::default(),
                )),
            ),
            DestAction::Load => self.q.push(D_GUEST, Event::Guest(FromGuest::Loaded)),
            DestAction::Run => self.q.push(D_GUEST, Event::Guest(FromGuest::Running)),
            DestAction::SendRunning => {}
            DestAction::Completed => {
                self.q.push(D_GUEST, Event::Guest(FromGuest::Stopped));
                if self.digests {
                    self.q.push(
                        D_PEER,
                        Event::Peer(ControlMsg::SourceDigests {
                            first: 0,
                            digests: vec![1],
                        }),
                    );
                    self.q
                        .push(D_PEER, Event::Peer(ControlMsg::SourceDigestsEnd));
                }
            }
            DestAction::Check => self.q.push(D_PEER, Event::Peer(ControlMsg::Finish)),
            DestAction::Resync(_) => panic!("a resync step without a resync"),
            DestAction::Done => {}
        }
    }

    fn apply(&mut self, j: Judged<DestAction>) {
        if let Judged::Act(actions) = j {
            for a in &actions {
                self.act(a);
            }
        }
    }
}

fn dest_catalogue() -> Vec<Event> {
    let mut v: Vec<Event> = source_catalogue()
        .into_iter()
        .filter(|e| matches!(e, Event::Peer(_) | Event::Guest(_)))
        .collect();
    v.extend([
        Event::Handler(FromFaultHandler::Mark(1, RecvProgress::default())),
        Event::Handler(FromFaultHandler::Package(
            package(true),
            RecvProgress::default(),
        )),
        Event::Handler(FromFaultHandler::PrecopyDone(RecvProgress::default())),
        Event::Handler(FromFaultHandler::PostcopyDone(
            PostcopyStats::default(),
            RecvProgress::default(),
        )),
        Event::Sender(FromRamSender::PackageSent { bytes: 1 }),
    ]);
    v
}

fn run_dest(postcopy: bool, digests: bool, picks: &[u8]) -> Result<DestMachine, TestCaseError> {
    let mut m = DestMachine::new();
    let mut w = DestWorld {
        q: Queues::new(3),
        postcopy,
        digests,
    };
    let setup = source_catalogue()
        .into_iter()
        .find(|e| matches!(e, Event::Peer(ControlMsg::Setup(_))))
        .unwrap();
    let j = m.on(&setup, digests).unwrap();
    w.apply(j);
    m.on(
        &Event::Guest(FromGuest::Ready {
            base: RemoteAddr(0),
            state_bytes: 0,
        }),
        digests,
    )
    .unwrap();
    m.connected().unwrap();
    // The main stream: MARKs (early discard, which commits to the
    // switch), the package, and after a plain precopy the end of the stream.
    let marks = u32::from(postcopy);
    for id in 1..=marks {
        w.q.push(
            D_HANDLER,
            Event::Handler(FromFaultHandler::Mark(id as u64, RecvProgress::default())),
        );
    }
    w.q.push(
        D_HANDLER,
        Event::Handler(FromFaultHandler::Package(
            package(w.postcopy),
            RecvProgress::default(),
        )),
    );
    if !w.postcopy {
        w.q.push(
            D_HANDLER,
            Event::Handler(FromFaultHandler::PrecopyDone(RecvProgress::default())),
        );
    }
    let catalogue = dest_catalogue();
    let mut picks = picks.iter().copied().cycle();
    let mut steps = 0;
    while !m.is_over() {
        let heads = w.q.heads();
        for ev in &catalogue {
            let name = event_name(ev);
            if heads.contains(&name) {
                continue;
            }
            // The source may start an early discard at any time before
            // the package: a MARK is always possible then.
            let mark_possible = name == "fault-handler Mark"
                && matches!(
                    m.state(),
                    DestState::Precopy {
                        postcopy_allowed: true,
                        ..
                    }
                );
            // Whether every digest came is the driver's count to check.
            let end_possible = (name == "SourceDigestsEnd" || name == "SourceDigests")
                && matches!(
                    m.state(),
                    DestState::Verifying {
                        digests_end: false,
                        ..
                    }
                )
                && digests;
            // The source may ask for a resync whenever a data plane runs.
            let resync_possible = name == "Resync"
                && matches!(
                    m.state(),
                    DestState::Precopy { .. }
                        | DestState::Listening
                        | DestState::Loading { .. }
                        | DestState::Starting { .. }
                        | DestState::Running { .. }
                        | DestState::Verifying { .. }
                        | DestState::AwaitFinish
                );
            if mark_possible || end_possible || resync_possible {
                continue;
            }
            let mut copy = m.clone();
            match copy.on(ev, digests) {
                Err(e) => prop_assert!(
                    e.to_string().contains(&name) && e.to_string().contains(m.state().name()),
                    "error does not name {name} and the state: {e}"
                ),
                Ok(j) => prop_assert!(
                    false,
                    "{name} accepted in {:?} ({j:?}); next can only be {heads:?}",
                    m.state()
                ),
            }
        }
        let pick = picks.next().unwrap_or(0);
        let Some(ev) = w.q.pop(pick) else {
            prop_assert!(false, "stuck in {:?}", m.state());
            unreachable!()
        };
        let j = m
            .on(&ev, digests)
            .map_err(|e| TestCaseError::fail(format!("legal {} refused: {e}", event_name(&ev))))?;
        // The driver checks memory as soon as the machine asks, and says so.
        if matches!(&j, Judged::Act(a) if a.contains(&DestAction::Check)) {
            m.checked().unwrap();
        }
        w.apply(j);
        steps += 1;
        prop_assert!(steps < 1000);
    }
    Ok(m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn dest_every_legal_order_completes(
        postcopy in any::<bool>(),
        digests in any::<bool>(),
        picks in proptest::collection::vec(any::<u8>(), 1..32),
    ) {
        let m = run_dest(postcopy, digests, &picks)?;
        prop_assert_eq!(m.state(), &DestState::Over { outcome: MigrationState::Completed, guest_ran: true });
    }
}

/// The destination's pages can all be in before its guest runs (a tiny
/// guest): completion waits for the guest, then goes on by itself.
#[test]
fn dest_pages_done_before_running() {
    let mut m = DestMachine::new();
    let setup = source_catalogue()
        .into_iter()
        .find(|e| matches!(e, Event::Peer(ControlMsg::Setup(_))))
        .unwrap();
    m.on(&setup, false).unwrap();
    m.connected().unwrap();
    m.on(
        &Event::Handler(FromFaultHandler::Mark(1, RecvProgress::default())),
        false,
    )
    .unwrap();
    m.on(
        &Event::Handler(FromFaultHandler::Package(
            package(true),
            RecvProgress::default(),
        )),
        false,
    )
    .unwrap();
    m.on(&Event::Guest(FromGuest::Listening), false).unwrap();
    m.on(
        &Event::Handler(FromFaultHandler::PostcopyDone(
            PostcopyStats::default(),
            RecvProgress::default(),
        )),
        false,
    )
    .unwrap();
    m.on(&Event::Guest(FromGuest::Loaded), false).unwrap();
    let j = m.on(&Event::Guest(FromGuest::Running), false).unwrap();
    assert_eq!(
        j,
        Judged::Act(vec![DestAction::SendRunning, DestAction::Completed])
    );
    assert!(m.state().guest_ran());
}
