//! Starting role processes. Each role is its own executable next to
//! `postcopy`, started with `--ipc NAME` and its fd socket at fd 3, in its own
//! process group (a terminal's Ctrl-C reaches only the supervisor) and with a
//! parent-death signal (a role never outlives its supervisor).

use ipc_channel::ipc::{IpcOneShotServer, IpcReceiver, IpcSender};
use serde::{de::DeserializeOwned, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::role::{Bootstrap, FdSocket, LinkError, FD_SOCKET, IPC_ARG};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot find the {name} executable at {path}: build the workspace (cargo build --release) or set POSTCOPY_BIN_DIR")]
    NotFound { name: String, path: PathBuf },
    #[error("starting {name}: {source}")]
    Exec {
        name: String,
        source: std::io::Error,
    },
    #[error("{name}: ipc setup: {detail}")]
    Ipc { name: String, detail: String },
    #[error("{name} (pid {pid}) did not connect within {secs} s")]
    Timeout { name: String, pid: u32, secs: u64 },
    #[error("{name}: {source}")]
    Link {
        name: String,
        #[source]
        source: LinkError,
    },
}

/// Where the role executables live: `POSTCOPY_BIN_DIR`, else the directory
/// of the running `postcopy`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("POSTCOPY_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A started process and its link.
pub struct Child<In, Out> {
    pub name: &'static str,
    pub pid: u32,
    pub tx: IpcSender<In>,
    /// Taken by whoever forwards its messages.
    pub rx: Option<IpcReceiver<Out>>,
    pub fds: FdSocket,
}

impl<In: Serialize, Out> Child<In, Out> {
    /// Sends a command; a dead child is reported by its exit, not here.
    pub fn send(&self, msg: In) -> Result<(), SpawnError> {
        self.tx.send(msg).map_err(|e| SpawnError::Ipc {
            name: self.name.to_string(),
            detail: format!("{e:?}"),
        })
    }

    pub fn send_fds(&self, fds: &[(&str, std::os::fd::BorrowedFd<'_>)]) -> Result<(), SpawnError> {
        self.fds.send(fds).map_err(|source| SpawnError::Link {
            name: self.name.to_string(),
            source,
        })
    }

    pub fn recv_fds(&self) -> Result<common::role::NamedFds, SpawnError> {
        self.fds.recv().map_err(|source| SpawnError::Link {
            name: self.name.to_string(),
            source,
        })
    }

    /// SIGKILL (the reaper reports the exit).
    pub fn kill(&self) {
        // SAFETY: kill(2) on a pid we started; if it was reaped already the
        // worst case is ESRCH.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
    }
}

/// Prepares `cmd` to get `fd` at fd number `at` (and no other fd of ours:
/// everything else is close-on-exec), to run in its own process group (a
/// terminal's Ctrl-C reaches only the supervisor) and to die with us.
pub fn hand_over(cmd: &mut Command, fd: RawFd, at: RawFd) {
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, prctl, setpgid).
    unsafe {
        cmd.pre_exec(move || {
            if fd == at {
                let flags = libc::fcntl(at, libc::F_GETFD);
                libc::fcntl(at, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, at) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

/// Starts `name` from [`bin_dir`] and waits for it to join.
pub fn spawn<In, Out>(name: &'static str) -> Result<Child<In, Out>, SpawnError>
where
    In: Serialize + DeserializeOwned + Send + 'static,
    Out: Serialize + DeserializeOwned + Send + 'static,
{
    spawn_exe(name, &bin_dir().join(name))
}

/// Starts `exe` as role `name` and waits for it to join.
pub fn spawn_exe<In, Out>(name: &'static str, exe: &Path) -> Result<Child<In, Out>, SpawnError>
where
    In: Serialize + DeserializeOwned + Send + 'static,
    Out: Serialize + DeserializeOwned + Send + 'static,
{
    if !exe.is_file() {
        return Err(SpawnError::NotFound {
            name: name.to_string(),
            path: exe.to_path_buf(),
        });
    }
    let ipc = |detail: String| SpawnError::Ipc {
        name: name.to_string(),
        detail,
    };
    let (server, server_name) =
        IpcOneShotServer::<Bootstrap<In, Out>>::new().map_err(|e| ipc(e.to_string()))?;
    let (ours, theirs) = FdSocket::pair().map_err(|source| SpawnError::Link {
        name: name.to_string(),
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg(IPC_ARG).arg(&server_name).stdin(Stdio::null());
    hand_over(&mut cmd, theirs.as_raw_fd(), FD_SOCKET);
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        name: name.to_string(),
        source,
    })?;
    let pid = child.id();
    // The reaper owns waiting for it from here on.
    drop(child);
    drop::<OwnedFd>(theirs);

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.accept());
    });
    const JOIN_TIMEOUT: u64 = 20;
    let (_, boot) = match rx.recv_timeout(Duration::from_secs(JOIN_TIMEOUT)) {
        Ok(r) => r.map_err(|e| ipc(format!("{e:?}")))?,
        Err(_) => {
            // SAFETY: kill(2) on the child we just started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(SpawnError::Timeout {
                name: name.to_string(),
                pid,
                secs: JOIN_TIMEOUT,
            });
        }
    };
    if boot.pid != pid {
        return Err(ipc(format!(
            "joined with pid {}, but pid {pid} was started",
            boot.pid
        )));
    }
    log::debug!("{name} started as pid {pid}");
    Ok(Child {
        name,
        pid,
        tx: boot.to_role,
        rx: Some(boot.from_role),
        fds: ours,
    })
}
