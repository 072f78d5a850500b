//! What more than one postcopy process truly shares: the wire protocol, the
//! messages between supervisor and roles, shared bitmaps and counters, memfd mappings,
//! userfaultfd, the role sandbox, page digests and the migration state machine.

pub mod bitmap;
pub mod clock;
pub mod control;
pub mod counters;
pub mod digest;
pub mod guest;
pub mod latency;
pub mod logging;
pub mod mem;
pub mod msg;
pub mod peer_text;
pub mod priority;
pub mod role;
pub mod sandbox;
pub mod state;
pub mod tls;
pub mod types;
pub mod uffd;
pub mod wire;
