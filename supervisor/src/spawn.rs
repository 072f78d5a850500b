//! Starting role processes. Each role is its own executable next to
//! `postcopy`, started with `--ipc NAME` and its fd socket at fd 3, in its own
//! process group (a terminal's Ctrl-C reaches only the supervisor) and with a
//! parent-death signal (a role never outlives its supervisor). Each also gets
//! the write end of a note pipe at fd 4, where its sandbox writes the number
//! of a forbidden syscall before it dies ([`sandbox_note`]), and the uid/gid
//! it drops to once it holds its fds ([`set_role_user`]).

use ipc_channel::ipc::{IpcOneShotServer, IpcReceiver, IpcSender};
use serde::{de::DeserializeOwned, Serialize};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use common::role::{Bootstrap, FdSocket, LinkError, FD_SOCKET, IPC_ARG};
use common::sandbox::{NOTE_FD, ROLE_IDS_ENV};

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

/// The unprivileged identity roles drop to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Users tried, in order, when `--role-user` is not given.
pub const DEFAULT_ROLE_USERS: [&str; 2] = ["postcopy", "nobody"];

/// The user roles run as: `name`, or the first of [`DEFAULT_ROLE_USERS`]
/// that exists. `None` when there is nothing to drop: this supervisor does
/// not run as root (its roles keep its own uid), or `name` is uid 0 (an
/// explicit choice to keep roles as root, for debugging).
pub fn resolve_role_user(name: Option<&str>) -> Result<Option<RoleUser>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let lookup = |n: &str| {
        nix::unistd::User::from_name(n)
            .map_err(|e| format!("--role-user {n}: cannot look the user up: {e}"))
    };
    let user = match name {
        Some(n) => lookup(n)?.ok_or(format!("--role-user {n}: no such user"))?,
        None => {
            let mut found = None;
            for n in DEFAULT_ROLE_USERS {
                if let Some(u) = lookup(n)? {
                    found = Some(u);
                    break;
                }
            }
            found.ok_or(format!(
                "no user for the roles: none of {DEFAULT_ROLE_USERS:?} exists; name one with --role-user"
            ))?
        }
    };
    if user.uid.is_root() {
        log::warn!("--role-user {}: roles keep uid 0", user.name);
        return Ok(None);
    }
    Ok(Some(RoleUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

static ROLE_USER: OnceLock<Option<RoleUser>> = OnceLock::new();

/// Sets, once per process, the user every role started from now on drops
/// to. Never set (role tests): roles keep our uid.
pub fn set_role_user(user: Option<RoleUser>) {
    let _ = ROLE_USER.set(user);
}

/// Read ends of the note pipes of running roles, by pid.
static NOTES: Mutex<Vec<(u32, OwnedFd)>> = Mutex::new(Vec::new());

fn take_note_fd(pid: u32) -> Option<OwnedFd> {
    let mut notes = NOTES.lock().expect("notes");
    let i = notes.iter().position(|(p, _)| *p == pid)?;
    Some(notes.swap_remove(i).1)
}

/// The syscall number the role `pid` wrote to its note pipe before its
/// sandbox killed it, if it did. Call once the process has exited (the
/// pipe is closed then, so this never blocks); the pipe is released.
pub fn sandbox_note(pid: u32) -> Option<i64> {
    let fd = take_note_fd(pid)?;
    // Never wait: a note is written before the process dies, or not at all.
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut buf = [0u8; 64];
    let n = nix::unistd::read(&fd, &mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Releases the note pipe of `pid` (it ended some other way).
pub fn forget_note(pid: u32) {
    drop(take_note_fd(pid));
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

/// Longest line of a role's output forwarded in one piece, in bytes.
const MAX_LINE: u64 = 4096;

/// True if `line` carries the log tag of role `name` on `host` with pid
/// `pid` (`[  1.234 host/name pid LEVEL] ...`, common::logging): a role
/// can only produce lines tagged as itself.
fn tagged_as(line: &str, host: &str, name: &str, pid: u32) -> bool {
    line.strip_prefix('[')
        .map(str::trim_start)
        .and_then(|l| l.split_once(' '))
        .is_some_and(|(time, rest)| {
            time.parse::<f64>().is_ok() && rest.starts_with(&format!("{host}/{name} {pid} "))
        })
}

/// `bytes` as text fit for a log line or a terminal: control characters
/// (escape sequences, carriage returns) and invalid UTF-8 escaped.
fn escape_output(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.trim_end_matches(['\n', '\r']).chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Forwards one output stream of a role to our stderr, line by line: a
/// role holds a pipe, never our terminal. Control characters are escaped,
/// lines without the role's own log tag get `[host/name pid]`, and lines longer
/// than [`MAX_LINE`] are cut.
fn forward_output(name: &'static str, pid: u32, stream: impl std::io::Read + Send + 'static) {
    use std::io::{BufRead, Read, Write};
    let spawned = std::thread::Builder::new()
        .name(format!("out-{name}"))
        .spawn(move || {
            let mut r = std::io::BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = escape_output(&line);
                let mut err = std::io::stderr().lock();
                let host = common::logging::host();
                let _ = if tagged_as(&text, host, name, pid) {
                    writeln!(err, "{text}")
                } else {
                    writeln!(err, "[{host}/{name} {pid}] {text}")
                };
            }
        });
    if let Err(e) = spawned {
        log::warn!("{name} (pid {pid}): cannot forward its output: {e}");
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
    let exec_err = |source| SpawnError::Exec {
        name: name.to_string(),
        source,
    };
    let (note_r, note_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| exec_err(std::io::Error::from(e)))?;
    // Above the numbers the child gets, so placing the fd socket at 3
    // cannot overwrite it before it goes to 4.
    let note_w: OwnedFd =
        nix::fcntl::fcntl(&note_w, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(NOTE_FD + 1))
            // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; we own it.
            .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
            .map_err(|e| exec_err(std::io::Error::from(e)))?;
    let mut cmd = Command::new(exe);
    cmd.arg(IPC_ARG)
        .arg(&server_name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match ROLE_USER.get().cloned().flatten() {
        Some(u) => cmd.env(ROLE_IDS_ENV, format!("{}:{}", u.uid, u.gid)),
        None => cmd.env_remove(ROLE_IDS_ENV),
    };
    hand_over(&mut cmd, theirs.as_raw_fd(), FD_SOCKET);
    let note_raw = note_w.as_raw_fd();
    // SAFETY: runs between fork and exec, after hand_over's closure, and
    // only calls dup2 (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(note_raw, NOTE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(exec_err)?;
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        forward_output(name, pid, out);
    }
    if let Some(err) = child.stderr.take() {
        forward_output(name, pid, err);
    }
    // The reaper owns waiting for it from here on.
    drop(child);
    drop::<OwnedFd>(theirs);
    drop(note_w);
    NOTES.lock().expect("notes").push((pid, note_r));

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

#[cfg(test)]
mod tests {
    use super::*;

    fn note_pipe(pid: u32, text: &[u8]) {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, text).unwrap();
        drop(w);
        NOTES.lock().unwrap().push((pid, r));
    }

    #[test]
    fn a_note_gives_the_syscall_once() {
        note_pipe(4_000_001, b"41\n");
        assert_eq!(sandbox_note(4_000_001), Some(41));
        assert_eq!(sandbox_note(4_000_001), None, "the pipe is released");
    }

    #[test]
    fn no_or_bad_note_is_none() {
        note_pipe(4_000_002, b"");
        assert_eq!(sandbox_note(4_000_002), None);
        note_pipe(4_000_003, b"socket\n");
        assert_eq!(sandbox_note(4_000_003), None);
        assert_eq!(sandbox_note(4_000_004), None, "never spawned");
        note_pipe(4_000_005, b"41\n");
        forget_note(4_000_005);
        assert_eq!(sandbox_note(4_000_005), None);
    }

    #[test]
    fn role_output_is_escaped_and_tagged() {
        assert_eq!(escape_output(b"a\x1b[2Jb\r\n"), "a\\u{1b}[2Jb");
        assert_eq!(escape_output(b"x\ty\xff\n"), "x\ty\u{fffd}");
        assert!(tagged_as(
            "[    0.016 src/page-server 734 DEBUG] hi",
            "src",
            "page-server",
            734
        ));
        assert!(!tagged_as(
            "[    0.016 src/page-server 735 DEBUG] hi",
            "src",
            "page-server",
            734
        ));
        assert!(!tagged_as(
            "[    0.016 dst/page-server 734 DEBUG] another host",
            "src",
            "page-server",
            734
        ));
        assert!(!tagged_as(
            "[    0.016 src/supervisor 734 ERROR] forged",
            "src",
            "page-server",
            734
        ));
        assert!(!tagged_as(
            "sandbox: forbidden syscall 41",
            "src",
            "page-server",
            734
        ));
    }

    #[test]
    fn role_user_must_exist() {
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(
                resolve_role_user(Some("no-such-user-for-postcopy")),
                Ok(None)
            );
            return;
        }
        let e = resolve_role_user(Some("no-such-user-for-postcopy")).unwrap_err();
        assert!(e.contains("no such user"), "{e}");
        assert_eq!(resolve_role_user(Some("root")), Ok(None));
        let u = resolve_role_user(None)
            .unwrap()
            .expect("postcopy or nobody");
        assert!(DEFAULT_ROLE_USERS.contains(&u.name.as_str()) && u.uid != 0);
    }
}
