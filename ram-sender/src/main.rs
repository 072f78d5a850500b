//! `ram-sender`: the source role that iterates the dirty bitmap and streams
//! pages to the destination on the main stream (and any extra bulk streams).

mod limiter;
mod pagemap;
mod seccomp;
mod sender;
mod streams;
mod zerocopy;

fn main() {
    common::role::role_main::<_, _, _, _>("ram-sender", sender::run)
}
