//! The `postcopy` supervisor: the CLI, the migration state machine on each
//! host, and the starting, watching and stopping of the role processes.

// Events travel by value through the supervisor's wait loop; boxing them to
// please this lint would buy nothing at a few events per millisecond.
#![allow(clippy::result_large_err)]

pub mod chaos;
pub mod cli;
pub mod client;
pub mod ctlsock;
pub mod demo;
pub mod dest;
pub mod error;
pub mod events;
pub mod machine;
pub mod net;
pub mod policy;
pub mod progress;
pub mod report;
pub mod session;
pub mod source;
pub mod spawn;
pub mod verify;
