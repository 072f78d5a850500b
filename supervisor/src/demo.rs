//! `postcopy demo`: both ends on this machine. The destination is a real
//! `postcopy incoming` process, handed a listening loopback socket; the
//! source runs here. With `--tls` both ends use a test CA and certificates
//! made for this run (or the `--tls-*` files given, for both ends).

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::Command;

use crate::cli::{DemoArgs, SourceOpts};
use crate::pki::{TestCa, Validity};
use crate::report::Report;
use crate::tls::TlsFiles;
use crate::{source, spawn};

/// fd number at which the destination finds its listening socket.
const LISTEN_FD: i32 = 3;

/// A directory removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn demo(args: &DemoArgs, mut opts: SourceOpts) -> Result<Report, String> {
    // The test CA lives as long as the demo (the destination reads its
    // files at start).
    let mut _scratch = None;
    let files: Option<TlsFiles> = if args.tls {
        let dir = std::env::temp_dir().join(format!("postcopy-demo-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let scratch = _scratch.insert(Scratch(dir));
        let ca = TestCa::new(&scratch.0, "demo")?;
        Some(ca.host(&scratch.0, "demo", Validity::Now)?)
    } else {
        args.mig.tls.files()
    };
    if let Some(f) = &files {
        opts.transport =
            crate::net::Transport::Tls(std::sync::Arc::new(crate::tls::Tls::load(f, None)?));
    }
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
        .arg("--max-restarts")
        .arg(opts.max_restarts.to_string())
        .env("POSTCOPY_LOG_TAG", "dst");
    if let Some(c) = &args.mig.chaos {
        cmd.arg("--chaos").arg(&c.spec);
    }
    if let Some(p) = &args.dest_serial_log {
        cmd.arg("--serial-log").arg(p);
    }
    if let Some(u) = &args.mig.role_user {
        cmd.arg("--role-user").arg(u);
    }
    if let Some(f) = &files {
        cmd.arg("--tls-cert")
            .arg(&f.cert)
            .arg("--tls-key")
            .arg(&f.key)
            .arg("--tls-ca")
            .arg(&f.ca);
    }
    spawn::hand_over(&mut cmd, listener.as_raw_fd(), LISTEN_FD);
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
