//! The migration state machine (docs/state-machine.md). Both supervisors run
//! one; every transition goes through [`StateMachine::go`], which refuses the
//! ones the design does not allow (e.g. cancelling once postcopy started).

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration cannot go from {from} to {to}")]
pub struct StateError {
    pub from: MigrationState,
    pub to: MigrationState,
}

/// The current state; every change goes through [`StateMachine::go`].
#[derive(Debug)]
pub struct StateMachine {
    state: MigrationState,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    pub fn new() -> Self {
        StateMachine {
            state: MigrationState::Setup,
        }
    }

    pub fn state(&self) -> MigrationState {
        self.state
    }

    pub fn go(&mut self, to: MigrationState) -> Result<(), StateError> {
        if !self.state.can_go(to) {
            return Err(StateError {
                from: self.state,
                to,
            });
        }
        log::info!("state {} -> {}", self.state, to);
        self.state = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MigrationState::*;
    use super::*;

    #[test]
    fn precopy_path() {
        let mut m = StateMachine::new();
        m.go(Active).unwrap();
        m.go(Completed).unwrap();
        assert!(m.state().is_terminal());
        assert!(m.go(Failed).is_err());
    }

    #[test]
    fn postcopy_path_with_recovery() {
        let mut m = StateMachine::new();
        for s in [
            Active,
            PostcopyActive,
            PostcopyPaused,
            PostcopyRecover,
            PostcopyActive,
            Completed,
        ] {
            m.go(s).unwrap();
        }
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
        let mut m = StateMachine::new();
        let err = m.go(Completed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration cannot go from setup to completed"
        );
        assert_eq!(m.state(), Setup);
    }
}
