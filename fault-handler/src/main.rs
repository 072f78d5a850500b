//! `fault-handler`: the destination role that owns the userfaultfd, places
//! every incoming page and turns guest faults into page requests.

mod fault_path;
mod handler;
mod latency;
mod seccomp;

fn main() {
    common::role::role_main::<_, _, _, _>("fault-handler", handler::run)
}
