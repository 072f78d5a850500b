//! Why a migration did not complete.

use common::control::ExitStatus;

use crate::machine::ProtocolError;
use crate::net::NetError;
use crate::spawn::SpawnError;

#[derive(Debug, thiserror::Error)]
pub enum MigError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("{name} failed: {detail}")]
    Role { name: &'static str, detail: String },
    #[error("{name} (pid {pid}) died unexpectedly: {status}")]
    RoleDied {
        name: &'static str,
        pid: u32,
        status: ExitStatus,
    },
    /// Died of SIGSYS: a call outside its seccomp list (docs/security.md).
    #[error("role {name} was killed by its sandbox ({})", match syscall {
        Some(nr) => format!("syscall {nr}"),
        None => "SIGSYS; it left no syscall number".to_string(),
    })]
    Sandboxed {
        name: &'static str,
        pid: u32,
        /// The number the role's SIGSYS handler wrote to its note pipe.
        syscall: Option<i64>,
    },
    #[error("{0} stopped talking to the supervisor")]
    ChannelClosed(&'static str),
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    #[error("lost the control connection to the peer: {0}")]
    PeerLost(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// A message the migration's state does not allow.
    #[error("protocol: {0}")]
    OutOfOrder(#[from] ProtocolError),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("timed out after {secs:.0} s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl MigError {
    /// The child this error is about, if it is a child's death or failure.
    pub fn child(&self) -> Option<&'static str> {
        match self {
            MigError::Role { name, .. }
            | MigError::RoleDied { name, .. }
            | MigError::ChannelClosed(name) => Some(name),
            _ => None,
        }
    }

    /// A role's failure that the link caused (its connection timed out,
    /// was reset or closed by the peer), not a fault of the role: such a
    /// restart is not counted against `--max-restarts`, so repeated link
    /// cuts in postcopy cannot use up the budget meant for crashing roles.
    pub fn is_link_trouble(&self) -> bool {
        match self {
            MigError::Role { detail, .. } => [
                "connection error:",
                "peer closed the",
                "connection closed in the middle of",
                "closed the return path",
            ]
            .iter()
            .any(|m| detail.contains(m)),
            _ => false,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        MigError::Io {
            what: what.into(),
            source,
        }
    }
}
