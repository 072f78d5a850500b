//! `postcopy demo`: both ends on this machine. The destination is a real
//! `postcopy incoming` process, handed a listening loopback socket; the
//! source runs here.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::cli::{DemoArgs, SourceOpts};
use crate::report::Report;
use crate::source;

/// fd number at which the destination finds its listening socket.
const LISTEN_FD: i32 = 3;

pub fn demo(args: &DemoArgs, opts: SourceOpts) -> Result<Report, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("loopback socket: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("incoming")
        .arg("--listen-fd")
        .arg(LISTEN_FD.to_string())
        .arg("--quiet")
        .arg("--link-timeout")
        .arg(opts.link_timeout.as_secs().to_string())
        .env("POSTCOPY_LOG_TAG", "dst");
    if let Some(p) = &args.dest_serial_log {
        cmd.arg("--serial-log").arg(p);
    }
    let raw = listener.as_raw_fd();
    // SAFETY: runs between fork and exec; only dup2, fcntl, prctl, setpgid.
    unsafe {
        cmd.pre_exec(move || {
            if raw == LISTEN_FD {
                let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(raw, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the destination: {e}"))?;
    let pid = child.id();
    drop(child);
    drop(listener);
    Ok(source::migrate(
        opts,
        addr.to_string(),
        &[("postcopy incoming", pid)],
    ))
}
