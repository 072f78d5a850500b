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
    /// was reset or closed by the peer), not a fault of the role: after
    /// the package such a restart is not counted against `--max-restarts`,
    /// so repeated link trouble in postcopy cannot use up the budget meant
    /// for crashing roles. Told by the roles' wire errors, and by the OS
    /// error a socket gives when the link broke ([`LINK_ERRNOS`]), which
    /// is how a role that writes its stream reports a reset
    /// (`main stream: Connection reset by peer (os error 104)`).
    pub fn is_link_trouble(&self) -> bool {
        match self {
            MigError::Role { detail, .. } => {
                [
                    "connection error:",
                    "peer closed the",
                    "connection closed in the middle of",
                    "closed the return path",
                ]
                .iter()
                .any(|m| detail.contains(m))
                    || os_error(detail).is_some_and(|n| LINK_ERRNOS.contains(&n))
            }
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

/// The errors a socket gives when the link broke under it (not when the
/// process misused it): reset, broken pipe, timed out, unreachable.
pub const LINK_ERRNOS: [i32; 9] = [
    libc::ECONNRESET,
    libc::EPIPE,
    libc::ETIMEDOUT,
    libc::ECONNABORTED,
    libc::EHOSTUNREACH,
    libc::ENETUNREACH,
    libc::ENETDOWN,
    libc::ENETRESET,
    libc::EHOSTDOWN,
];

/// The OS error number of a message that ends with an `io::Error` as Rust
/// shows it (`... (os error 104)`).
fn os_error(detail: &str) -> Option<i32> {
    let at = detail.rfind("(os error ")? + "(os error ".len();
    let end = detail[at..].find(')')? + at;
    detail[at..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(detail: &str) -> MigError {
        MigError::Role {
            name: "ram-sender",
            detail: detail.into(),
        }
    }

    #[test]
    fn link_trouble_is_told_from_a_fault_of_the_role() {
        for link in [
            "main stream: Connection reset by peer (os error 104)",
            "main stream: Broken pipe (os error 32)",
            "return path: Connection timed out (os error 110)",
            "connection error: early eof",
            "peer closed the main connection",
            "the destination closed the return path",
        ] {
            assert!(role(link).is_link_trouble(), "{link}");
        }
        for own in [
            "pagemap: Bad address (os error 14)",
            "main stream: frame of 9999999 bytes is too long",
            "guest memory: (os error",
            "no progress for 30 s",
        ] {
            assert!(!role(own).is_link_trouble(), "{own}");
        }
        assert!(
            !MigError::PeerLost("Connection reset by peer (os error 104)".into()).is_link_trouble()
        );
    }
}
