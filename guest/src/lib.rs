//! The built-in guests. A guest process maps the guest-memory memfd and runs
//! either worker threads ([`process`]) or a KVM micro-VM ([`kvm`]); [`runner`]
//! speaks to the supervisor and drives whichever it runs.

pub mod kvm;
pub mod process;
pub mod runner;
