//! Messages between the supervisor and each process it starts, one enum per
//! direction per process. They travel over ipc-channel; fds travel beside them
//! on the fd socket (see [`crate::role`]).

use serde::{Deserialize, Serialize};

use crate::guest::GuestConfig;
use crate::role::RoleOutput;
use crate::tls::Session;
use crate::types::{MemLayout, RemoteAddr};
use crate::wire::Package;

// ---------------------------------------------------------------- guest

/// Which end of the migration a guest process is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// Runs the workload from the start; memory is tracked for dirty pages.
    Source,
    /// Waits for pages and state; may fault pages in through userfaultfd.
    Destination { postcopy: bool },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestInit {
    pub config: GuestConfig,
    pub side: Side,
}

/// Supervisor → guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToGuest {
    /// Map memory (fds: `memory`, and `serial` for KVM) and prepare. The guest
    /// answers Ready and sends its fds: source `uffd` + `pagemap`,
    /// postcopy destination `uffd`.
    Init(GuestInit),
    /// Start the workload from the beginning (source).
    Run,
    /// Stop at a safe point; answer Stopped.
    Stop,
    /// Continue after a Stop (the source after a failed migration).
    Resume,
    /// Answer State with everything needed to continue where it stopped.
    SaveState,
    /// Register guest memory with the userfaultfd in missing mode.
    Listen,
    /// Load a state saved on the other host; answer Loaded.
    Load(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Answer Progress.
    Ping,
    /// Exit.
    Quit,
}

/// Guest → supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromGuest {
    Ready {
        /// Where guest memory is mapped in the guest process.
        base: RemoteAddr,
        /// About how large its saved state will be: the part of the
        /// switchover that cannot be fetched later.
        state_bytes: u64,
    },
    Running,
    Stopped,
    State(#[serde(with = "serde_bytes")] Vec<u8>),
    Listening,
    Loaded,
    /// Workload progress: writes (process) or serial bytes (KVM) so far;
    /// `booted` once the workload is past its start-up (ab: memory zeroed,
    /// idle: memory filled; KVM: the first serial marker).
    Progress {
        ops: u64,
        booted: bool,
        /// Its workers or vCPUs are running (not stopped).
        running: bool,
    },
    Error(String),
}

impl RoleOutput for FromGuest {
    fn fatal(text: String) -> Self {
        FromGuest::Error(text)
    }
}

// ---------------------------------------------------------------- ram-sender

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SenderSetup {
    pub layout: MemLayout,
    pub guest_base: RemoteAddr,
    /// Bytes per second on the main stream while the guest runs (and when
    /// precopy completes); 0 = unlimited.
    pub max_bandwidth: u64,
    /// Bytes per second on the main stream from the switch to postcopy on
    /// (discard set, package, background push); 0 = unlimited. Requested
    /// pages go out on the urgent connection and are never paced.
    pub max_postcopy_bandwidth: u64,
    /// Where to start: a fresh precopy, or (a ram-sender started again
    /// after the package) the postcopy push of whatever `sent` lacks.
    pub resume: SenderStart,
    /// With TLS: the main stream's session, continued here.
    pub main_tls: Option<Box<Session>>,
    /// Bulk streams, the main stream included (fds `bulk1` ..
    /// `bulk{streams-1}` come beside `main`).
    pub streams: u32,
    /// With TLS: each extra bulk stream's own session, stream 1 first.
    pub bulk_tls: Vec<Option<Box<Session>>>,
}

/// Where a ram-sender starts (docs/state-machine.md, "Restart and
/// recovery").
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SenderStart {
    /// Arm dirty tracking and send every page: the first start, and any
    /// start before the package (what an earlier ram-sender had harvested
    /// from the dirty log but not delivered is unknown, so everything goes
    /// again).
    Precopy,
    /// After the package, on a fresh main stream: push every page whose
    /// `sent` bit is clear (the supervisor set `sent` to what the
    /// destination has).
    Push,
}

/// Supervisor → ram-sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToRamSender {
    /// fds: `memory`, `pagemap`, `uffd`, `sent`, `main`, `counters` (the
    /// source's [`crate::counters::SharedCounters`]).
    Start(SenderSetup),
    /// After Synced: another precopy round.
    Continue,
    /// The guest is stopped and precopy converged: final sync, send the rest,
    /// then wait for the package.
    Complete,
    /// Postcopy was decided, the guest still runs: send the discard set of
    /// what is stale now and a MARK, answer PreDiscarded, then wait for
    /// Switchover. The destination drops those pages before the guest
    /// stops, so downtime only pays for what is dirtied after this.
    PreDiscard,
    /// The guest is stopped: final sync, discard set, then wait for the package.
    Switchover,
    /// Send the device-state package; after a switchover, push every page
    /// not sent yet; after Complete, end the stream.
    Package(Package),
    /// New precopy cap, bytes/s (0 = unlimited).
    SetMaxBandwidth(u64),
    /// New postcopy cap, bytes/s (0 = unlimited).
    SetMaxPostcopyBandwidth(u64),
    /// Stop sending and exit.
    Quit,
}

/// Numbers from one dirty sync.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundStats {
    /// Dirty syncs so far, this one included.
    pub sync_count: u32,
    /// Pages sent as data in the round that just ended.
    pub round_pages: u64,
    pub round_zero_pages: u64,
    pub round_bytes: u64,
    pub round_us: u64,
    /// Of round_us: time spent writing to the main stream (pacing
    /// included). round_bytes / wire_us is what the link carries.
    pub wire_us: u64,
    /// Dirty pages found by this sync: what the next round must send.
    pub pending_pages: u64,
    /// Bytes per second over the round.
    pub bandwidth: f64,
    /// Pages dirtied per second over the round.
    pub dirty_rate: f64,
    /// Everything sent so far.
    pub total_bytes: u64,
    pub total_pages: u64,
    pub total_zero_pages: u64,
}

/// Live numbers during a round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SendProgress {
    pub total_bytes: u64,
    pub total_pages: u64,
    /// Pages still to send in this round.
    pub round_left: u64,
    pub bandwidth: f64,
}

/// The final sync at stop.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FinalSync {
    pub sync_count: u32,
    /// Totals at the moment the guest stopped (what precopy sent).
    pub precopy_bytes: u64,
    pub precopy_pages: u64,
    pub precopy_zero_pages: u64,
    pub dirty_pages: u64,
    /// Pages the destination must drop (sent before, dirtied since).
    pub discard_pages: u64,
    /// Bytes sent after the guest stopped (precopy completion: the rest).
    pub bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub sync_us: u64,
    pub send_us: u64,
}

/// The postcopy background push.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub us: u64,
}

/// ram-sender → supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromRamSender {
    /// A dirty sync finished; waits for Continue, Complete or Switchover.
    Synced(RoundStats),
    Progress(SendProgress),
    FinalSyncDone(FinalSync),
    /// The early discard set is on the wire, followed by MARK `mark`.
    PreDiscarded {
        pages: u64,
        mark: u64,
    },
    /// The package is on the wire (precopy completion: so is EOS).
    PackageSent {
        bytes: u64,
    },
    /// Postcopy: every page has been sent.
    PushDone(PushStats),
    Error(String),
}

impl RoleOutput for FromRamSender {
    fn fatal(text: String) -> Self {
        FromRamSender::Error(text)
    }
}

// ---------------------------------------------------------------- page-server

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerSetup {
    pub layout: MemLayout,
    /// With TLS: the sessions of the return path and the urgent
    /// connection, continued here.
    pub return_tls: Option<Box<Session>>,
    pub urgent_tls: Option<Box<Session>>,
    /// Read-ahead: after answering a request, the page-server also sends
    /// up to this many of the pages right after it that nobody has claimed
    /// yet, on urgent (0: none). `--prefetch-pages`, by default
    /// [`PREFETCH_PAGES`].
    pub prefetch: u32,
}

/// The page-server's read-ahead by default: none. On the boot sector
/// guest (`postcopy bench --scenario kvm-loopback --scenario
/// kvm-loopback-read-ahead`) 16 pages measured worse in two runs
/// (blocktime 2–127 ms and 7–3372 requests, against 0.5–1.4 ms and 3–33)
/// and better in a third (10.5 against 18.9 ms, medians): the spread
/// within a scenario is larger than the difference. A guest that walks
/// memory in order can keep pace with the urgent connection (one fault per
/// read-ahead) instead of being overtaken by the push, which follows the
/// hint. `--prefetch-pages N` turns it on.
pub const PREFETCH_PAGES: u32 = 0;

/// Supervisor → page-server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToPageServer {
    /// fds: `memory`, `sent`, `return`, `urgent`, `counters` (the source's
    /// [`crate::counters::SharedCounters`]).
    Start(ServerSetup),
    Quit,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerStats {
    pub requests: u64,
    pub pages_urgent: u64,
    pub zero_pages: u64,
    /// Requested pages the postcopy push had claimed already (so they went
    /// out twice: on the main stream and, not waiting for it, on urgent).
    pub pages_in_flight: u64,
    /// Pages sent as read-ahead after a request ([`ServerSetup::prefetch`]);
    /// counted in `pages_urgent` too.
    pub pages_prefetched: u64,
    pub bytes: u64,
}

/// page-server → supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromPageServer {
    /// The destination has every page (POSTCOPY_DONE on the return path).
    PostcopyDone(ServerStats),
    /// The return path ended.
    Closed(ServerStats),
    Error(String),
}

impl RoleOutput for FromPageServer {
    fn fatal(text: String) -> Self {
        FromPageServer::Error(text)
    }
}

// ---------------------------------------------------------------- fault-handler

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandlerSetup {
    pub layout: MemLayout,
    /// Where the destination guest mapped memory (for userfaultfd ioctls).
    pub guest_base: RemoteAddr,
    /// A userfaultfd was handed over; postcopy may follow.
    pub postcopy: bool,
    /// Record a digest of every page as it is placed.
    pub digests: bool,
    /// Where to start: a fresh stream, or (a fault-handler started again
    /// after the guest registered its memory) postcopy at once.
    pub resume: HandlerStart,
    /// The guest's vCPUs (worker threads of a process guest): blocktime
    /// counts the time during which this many threads were blocked at once.
    pub vcpus: u32,
    /// With TLS: the sessions of the main stream, the return path and the
    /// urgent connection, continued here.
    pub main_tls: Option<Box<Session>>,
    pub return_tls: Option<Box<Session>>,
    pub urgent_tls: Option<Box<Session>>,
    /// Bulk streams, the main stream included (fds `bulk1` ..
    /// `bulk{streams-1}` come beside `main`).
    pub streams: u32,
    /// With TLS: each extra bulk stream's own session, stream 1 first.
    pub bulk_tls: Vec<Option<Box<Session>>>,
}

/// Where a fault-handler starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandlerStart {
    /// Read the main stream from its start (precopy).
    Fresh,
    /// A fresh stream again, after an earlier handler wrote pages: what it
    /// wrote is unknown, so a zero page always drops the page.
    Again,
    /// Postcopy from the first frame: guest memory is registered; what
    /// was placed is in `received`; threads blocked on a fault an earlier
    /// handler read are woken to fault again.
    Postcopy,
}

/// Supervisor → fault-handler.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToFaultHandler {
    /// fds: `memory`, `received`, `main`, `return`, `urgent`, optional
    /// `uffd` and `digests`.
    Start(HandlerSetup),
    /// The guest registered its memory with the userfaultfd: serve faults
    /// and place the rest of the stream with UFFDIO_COPY.
    Listening,
    Quit,
}

/// Fault latency, µs, from reading the fault to placing the page, over
/// every fault of the migration (all fault-handlers, if one was restarted):
/// percentiles of its HdrHistogram ([`crate::latency`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// Bucket N counts faults with latency in [2^N, 2^(N+1)) µs (bucket 0
    /// also holds latencies under 1 µs).
    pub hist_log2_us: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Page requests sent on the return path.
    pub requests: u64,
    /// Fault events read from the userfaultfd.
    pub faults: u64,
    /// Faults resolved without a request (page already here or known zero).
    pub faults_local: u64,
    pub pages_urgent: u64,
    pub pages_background: u64,
    /// QEMU's postcopy blocktime, µs: time during which every vCPU (every
    /// worker thread) was blocked on a fault at once.
    pub blocktime_us: u64,
    /// Per guest thread that faulted (QEMU's per-vCPU blocktime), in
    /// thread-id order.
    pub vcpu_blocktime: Vec<crate::counters::ThreadBlocktime>,
    pub latency: LatencySummary,
    /// Where the time of the faults answered on the urgent connection went
    /// (none when no fault was answered there).
    #[serde(default)]
    pub fault_path: Option<Box<FaultPath>>,
}

impl PostcopyStats {
    /// The whole migration's figures from the destination's shared
    /// counters (every fault-handler's, successors included), with the
    /// fault path of the handler that saw it (`None` if none did).
    pub fn from_counters(
        c: &crate::counters::SharedCounters,
        fault_path: Option<Box<FaultPath>>,
    ) -> PostcopyStats {
        use crate::counters::Counter;
        PostcopyStats {
            requests: c.get(Counter::FaultRequests),
            faults: c.get(Counter::Faults),
            faults_local: c.get(Counter::FaultsLocal),
            pages_urgent: c.get(Counter::PlacedUrgent),
            pages_background: c.get(Counter::PlacedBackground),
            blocktime_us: c.get(Counter::BlocktimeUs),
            vcpu_blocktime: c.thread_blocktimes(),
            latency: crate::latency::summary(&crate::latency::histogram(&c.latency_counts())),
            fault_path,
        }
    }
}

/// Percentiles of one step of the fault path, µs (from nanosecond stamps,
/// so fractions of a µs are kept).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The path of a fault answered on the urgent connection, step by step
/// (docs/protocol.md, PAGE_TIMES): fault read → request written (on the
/// return path) → request read on the source → page sent → page read on
/// the destination → placed (UFFDIO_COPY returned, which wakes the
/// faulting thread). Each step in µs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultPath {
    /// Faults whose every stamp arrived (one per request answered on the
    /// urgent connection).
    pub faults: u64,
    /// Requests whose page came on the main stream instead (the push had
    /// it on its way): no source stamps.
    pub answered_by_push: u64,
    /// Those, fault read → placed.
    pub push_fault_read_to_placed: StepSummary,
    /// Both hosts stamp with one clock (one kernel), so the one-way network
    /// steps below are known; otherwise only their sum is.
    pub shared_clock: bool,
    pub fault_read_to_request_written: StepSummary,
    /// One way, destination → source (only with `shared_clock`).
    pub request_written_to_request_read: Option<StepSummary>,
    /// The source's service time.
    pub request_read_to_page_sent: StepSummary,
    /// One way, source → destination (only with `shared_clock`).
    pub page_sent_to_page_read: Option<StepSummary>,
    pub page_read_to_placed: StepSummary,
    /// Both network legs: (request written → page read) − (request read →
    /// page sent); needs no shared clock.
    pub network_round_trip: StepSummary,
    /// The whole path, fault read → placed.
    pub fault_read_to_placed: StepSummary,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RecvProgress {
    pub pages_received: u64,
    pub bytes: u64,
    pub rounds: u32,
    pub discarded: u64,
    /// Time spent dropping discarded pages, µs.
    pub discard_us: u64,
}

/// fault-handler → supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromFaultHandler {
    Progress(RecvProgress),
    /// Everything before MARK `id` on the main stream has been processed.
    Mark(u64, RecvProgress),
    /// The package arrived (after every precopy page and the discard set).
    /// With `listen`, the handler waits for Listening before reading on.
    Package(Package, RecvProgress),
    /// EOS after a plain precopy: every page is in.
    PrecopyDone(RecvProgress),
    /// Every page is placed and the userfaultfd unregistered.
    PostcopyDone(PostcopyStats, RecvProgress),
    Error(String),
}

impl RoleOutput for FromFaultHandler {
    fn fatal(text: String) -> Self {
        FromFaultHandler::Error(text)
    }
}

/// The fd names of the bulk streams, index = stream number (stream 0, the
/// main stream, is handed as `main`).
pub const BULK_FD_NAMES: [&str; crate::wire::MAX_STREAMS as usize] = [
    "main", "bulk1", "bulk2", "bulk3", "bulk4", "bulk5", "bulk6", "bulk7", "bulk8", "bulk9",
    "bulk10", "bulk11", "bulk12", "bulk13", "bulk14", "bulk15",
];
