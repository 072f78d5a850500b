//! The coarse migration states and the one table of which may follow which
//! (docs/state-machine.md). Each supervisor's own state machine
//! (`supervisor/src/machine/`) maps its detailed states onto these and asks
//! [`MigrationState::can_go`] before every change, so the table refuses what
//! the design does not allow (e.g. cancelling once postcopy started).

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationState {
    Setup,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }

    pub fn can_go(self, to: MigrationState) -> bool {
        use MigrationState::*;
        matches!(
            (self, to),
            (Setup, Active | Failed | Cancelled)
                | (Active, PostcopyActive | Completed | Failed | Cancelled)
                // A role restart recovers without a pause; a lost link
                // pauses first.
                | (PostcopyActive, Completed | PostcopyPaused | PostcopyRecover | Failed)
                | (PostcopyPaused, PostcopyRecover | Failed)
                // A resync that finds the package never arrived whole: the
                // destination guest never ran, so precopy starts over.
                | (PostcopyRecover, PostcopyActive | PostcopyPaused | Active | Completed | Failed)
        )
    }

    /// Name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Setup => "setup",
            MigrationState::Active => "active",
            MigrationState::PostcopyActive => "postcopy-active",
            MigrationState::PostcopyPaused => "postcopy-paused",
            MigrationState::PostcopyRecover => "postcopy-recover",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::MigrationState::*;
    use super::*;

    /// Walks `path` from `setup`, every step allowed by the table.
    fn walk(path: &[MigrationState]) {
        let mut at = Setup;
        for &s in path {
            assert!(at.can_go(s), "{at} -> {s} refused");
            at = s;
        }
    }

    #[test]
    fn precopy_path() {
        walk(&[Active, Completed]);
        assert!(Completed.is_terminal());
        assert!(!Completed.can_go(Failed));
    }

    #[test]
    fn postcopy_path_with_recovery() {
        walk(&[
            Active,
            PostcopyActive,
            PostcopyPaused,
            PostcopyRecover,
            PostcopyActive,
            PostcopyRecover,
            Completed,
        ]);
        // A resync that finds the package never arrived goes back.
        walk(&[Active, PostcopyActive, PostcopyRecover, Active, Completed]);
    }

    #[test]
    fn forbidden_transitions() {
        // No cancel once the destination may hold the only live copy.
        assert!(!PostcopyActive.can_go(Cancelled));
        assert!(!PostcopyPaused.can_go(Cancelled));
        // No going back to precopy.
        assert!(!PostcopyActive.can_go(Active));
        // No skipping setup.
        assert!(!Setup.can_go(PostcopyActive));
        assert!(!Setup.can_go(Completed));
    }
}
