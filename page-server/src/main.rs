//! `page-server`: the source role that answers page requests from the return
//! path with pages on the urgent connection.

mod seccomp;
mod server;

fn main() {
    common::role::role_main::<_, _, _, _>("page-server", server::run)
}
