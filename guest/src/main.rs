//! `postcopy-guest`: a guest process, started by the supervisor on each host.

fn main() {
    common::role::role_main::<_, _, _, _>("guest", guest::runner::run)
}
