//! The two supervisors' protocol states (docs/state-machine.md). Each side
//! keeps one enum whose variants carry what the state needs; every event is
//! judged by it alone, and the coarse transitions go through the table in
//! `common::state`, the one authority on which state may follow which.

pub mod dest;
pub mod source;

use common::control::ControlMsg;
use common::msg::{FromFaultHandler, FromGuest, FromPageServer, FromRamSender};
use common::state::MigrationState;

use crate::events::Event;

/// A message that the protocol does not allow in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} is not allowed in state {state}: {why}")]
pub struct ProtocolError {
    /// The message (e.g. `DestCompleted`, `ram-sender FinalSyncDone`).
    pub message: String,
    /// The state it arrived in.
    pub state: &'static str,
    pub why: String,
}

impl ProtocolError {
    pub fn new(message: String, state: &'static str, why: &str) -> Self {
        ProtocolError {
            message,
            state,
            why: why.to_string(),
        }
    }

    pub fn transition(from: MigrationState, to: MigrationState) -> Self {
        ProtocolError {
            message: format!("the step to {to}"),
            state: from.name(),
            why: format!("the migration cannot go from {from} to {to}"),
        }
    }
}

/// The machine's verdict on an event it allowed.
#[derive(Debug, Clone, PartialEq)]
pub enum Judged<A> {
    /// Nothing for the protocol (heartbeats, progress, exits).
    Ignored,
    /// Allowed; these are the next steps, in order (maybe none).
    Act(Vec<A>),
}

/// What becomes of the source guest when the migration fails now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GuestFate {
    /// It was never asked to stop: it runs on.
    Running,
    /// It was asked to stop (it may not have answered yet): resume it.
    Resume,
    /// The package may be on the destination: it stays frozen.
    Frozen,
}

/// The name of an event's message, for errors: `DestCompleted`,
/// `ram-sender PackageSent`, ...
pub fn event_name(ev: &Event) -> String {
    match ev {
        Event::Peer(m) => peer_name(m).to_string(),
        Event::Sender(m) => format!("ram-sender {}", sender_name(m)),
        Event::Server(m) => format!("page-server {}", server_name(m)),
        Event::Handler(m) => format!("fault-handler {}", handler_name(m)),
        Event::Guest(m) => format!("guest {}", guest_name(m)),
        Event::ChannelClosed(n) => format!("{n} channel closed"),
        Event::PeerLost(_) => "peer lost".into(),
        Event::Exited { pid, .. } => format!("exit of pid {pid}"),
        Event::Interrupt(s) => format!("signal {s}"),
        Event::StartPostcopy => "start-postcopy".into(),
        Event::Retired(n) => format!("{n} retired"),
        Event::Recover(_) => "recover".into(),
        Event::Command(c, _) => format!("control command {c:?}"),
    }
}

fn peer_name(m: &ControlMsg) -> &'static str {
    m.name()
}

// Variant names only: payloads (pages, saved states) are never formatted.
fn sender_name(m: &FromRamSender) -> &'static str {
    match m {
        FromRamSender::Synced(_) => "Synced",
        FromRamSender::Progress(_) => "Progress",
        FromRamSender::FinalSyncDone(_) => "FinalSyncDone",
        FromRamSender::PreDiscarded { .. } => "PreDiscarded",
        FromRamSender::PackageSent { .. } => "PackageSent",
        FromRamSender::PushDone(_) => "PushDone",
        FromRamSender::Error(_) => "Error",
    }
}

fn server_name(m: &FromPageServer) -> &'static str {
    match m {
        FromPageServer::PostcopyDone(_) => "PostcopyDone",
        FromPageServer::Closed(_) => "Closed",
        FromPageServer::Error(_) => "Error",
    }
}

fn handler_name(m: &FromFaultHandler) -> &'static str {
    match m {
        FromFaultHandler::Progress(_) => "Progress",
        FromFaultHandler::Mark(..) => "Mark",
        FromFaultHandler::Package(..) => "Package",
        FromFaultHandler::PrecopyDone(_) => "PrecopyDone",
        FromFaultHandler::PostcopyDone(..) => "PostcopyDone",
        FromFaultHandler::Error(_) => "Error",
    }
}

fn guest_name(m: &FromGuest) -> &'static str {
    match m {
        FromGuest::Ready { .. } => "Ready",
        FromGuest::Running => "Running",
        FromGuest::Stopped => "Stopped",
        FromGuest::State(_) => "State",
        FromGuest::Listening => "Listening",
        FromGuest::Loaded => "Loaded",
        FromGuest::Progress { .. } => "Progress",
        FromGuest::Error(_) => "Error",
    }
}

#[cfg(test)]
mod tests;
