//! Control messages between the two supervisors (MessagePack in CONTROL frames
//! on the control connection). See docs/protocol.md for the order they come in.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::guest::GuestConfig;
use crate::msg::{PostcopyStats, RecvProgress};
use crate::types::MigrationId;

/// When to switch from precopy to postcopy.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostcopyMode {
    /// Precopy only, however long it takes.
    Never,
    /// Switch when precopy will not converge within the downtime limit.
    Auto,
    /// Switch on `postcopy start-postcopy` (or after N dirty syncs).
    Manual,
}

impl fmt::Display for PostcopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PostcopyMode::Never => "never",
            PostcopyMode::Auto => "auto",
            PostcopyMode::Manual => "manual",
        })
    }
}

/// How the destination's memory is checked after the migration.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyMethod {
    None,
    Ab,
    Digest,
}

impl fmt::Display for VerifyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyMethod::None => "none",
            VerifyMethod::Ab => "ab",
            VerifyMethod::Digest => "digest",
        })
    }
}

/// Source → destination: what is coming.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetupRequest {
    pub migration: MigrationId,
    pub guest: GuestConfig,
    pub page_size: u32,
    pub postcopy: PostcopyMode,
    pub verify: VerifyMethod,
    /// Byte ranges the `ab` rule is checked over.
    pub verify_ranges: Vec<(u64, u64)>,
}

/// Destination → source: ready for pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetupAccepted {
    /// The destination checked its userfaultfd and can take postcopy.
    pub postcopy_ready: bool,
    pub uffd_features: u64,
}

/// How a process ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// One process of the migration, for the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoleInfo {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub restarts: u32,
    pub exit: Option<ExitStatus>,
}

/// Result of the memory check.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyResult {
    pub method: String,
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first mismatching pages (at most 64).
    pub mismatch_pages: Vec<u64>,
    pub detail: String,
}

/// Destination → source: every page is in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestSummary {
    pub recv: RecvProgress,
    pub postcopy: Option<PostcopyStats>,
    pub serial_log: Option<String>,
    pub serial_bytes: u64,
}

/// Supervisor ↔ supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlMsg {
    Setup(SetupRequest),
    SetupAccepted(SetupAccepted),
    SetupRefused {
        reason: String,
    },
    /// Destination → source: its guest runs. `listen_us` and `start_us` are
    /// the destination's share of the switchover.
    DestRunning {
        listen_us: u64,
        start_us: u64,
        /// Time the destination spent dropping the final discard set.
        discard_us: u64,
    },
    /// Destination → source: everything before MARK `id` on the main
    /// stream has been processed.
    DestMark {
        id: u64,
    },
    /// Destination → source: every page is in place.
    DestCompleted(DestSummary),
    /// Source → destination: digests of the source's frozen pages.
    SourceDigests {
        first: u64,
        digests: Vec<u64>,
    },
    SourceDigestsEnd,
    /// Destination → source: the memory check.
    Verified(VerifyResult),
    /// Destination → source, last: its processes and how much its guest
    /// wrote to the serial log, for the report.
    DestDone {
        roles: Vec<RoleInfo>,
        serial_bytes: Option<u64>,
    },
    /// Either way: the migration ends without completing.
    Abort {
        reason: String,
        cancelled: bool,
        /// From the destination: whether its guest ever ran. If it never
        /// did, the source may resume its own even after the package.
        guest_ran: bool,
    },
    /// Source → destination: the source has everything; exit.
    Finish,
    /// Either way, every second: "still here". A peer that stays silent
    /// for the link timeout is lost, even if its kernel keeps TCP alive.
    Heartbeat,
    /// Either side: a data role died or a data connection broke; replace
    /// every data connection and data role (epoch `epoch`, counting from 1).
    /// docs/state-machine.md, "Restart and recovery".
    Resync {
        epoch: u32,
        reason: String,
    },
    /// Destination → source: ready for the data connections of `epoch`.
    /// `package`: the package arrived whole, so `received` (the bitmap of
    /// pages the destination has, as from `SharedBitmap::to_bytes`) is
    /// what postcopy resumes from. Without it the destination guest never
    /// ran, and precopy starts over.
    ResyncReady {
        epoch: u32,
        package: bool,
        #[serde(with = "serde_bytes")]
        received: Vec<u8>,
    },
}

impl ControlMsg {
    pub fn name(&self) -> &'static str {
        match self {
            ControlMsg::Setup(_) => "Setup",
            ControlMsg::SetupAccepted(_) => "SetupAccepted",
            ControlMsg::SetupRefused { .. } => "SetupRefused",
            ControlMsg::DestRunning { .. } => "DestRunning",
            ControlMsg::DestMark { .. } => "DestMark",
            ControlMsg::DestCompleted(_) => "DestCompleted",
            ControlMsg::SourceDigests { .. } => "SourceDigests",
            ControlMsg::SourceDigestsEnd => "SourceDigestsEnd",
            ControlMsg::Verified(_) => "Verified",
            ControlMsg::DestDone { .. } => "DestDone",
            ControlMsg::Abort { .. } => "Abort",
            ControlMsg::Finish => "Finish",
            ControlMsg::Heartbeat => "Heartbeat",
            ControlMsg::Resync { .. } => "Resync",
            ControlMsg::ResyncReady { .. } => "ResyncReady",
        }
    }
}
