//! The source supervisor's command socket, through which
//! `postcopy start-postcopy` and `postcopy recover` reach a running
//! migration. One line in (`start-postcopy`, `recover`, `recover ADDR`),
//! one line out (`ok` or `error: ...`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use crate::events::Event;

/// Where command sockets live.
pub const SOCKET_DIR: &str = "/run/postcopy";

pub struct CommandSocket {
    path: PathBuf,
    phase: Arc<AtomicU8>,
}

/// What a start-postcopy request can do now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `--postcopy never`: nothing.
    NoPostcopy = 0,
    /// Precopy runs: switch.
    Precopy = 1,
    /// Switched already, or over.
    Past = 2,
    /// Postcopy paused by a lost link: `recover` applies.
    Paused = 3,
}

impl CommandSocket {
    /// Listens on `path` (default: `/run/postcopy/migrate-<pid>.sock`).
    pub fn bind(
        path: Option<PathBuf>,
        phase: Phase,
        events: Sender<Event>,
    ) -> std::io::Result<Self> {
        let path = match path {
            Some(p) => p,
            None => {
                std::fs::create_dir_all(SOCKET_DIR)?;
                Path::new(SOCKET_DIR).join(format!("migrate-{}.sock", std::process::id()))
            }
        };
        // Replace a stale socket, never anything else.
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                )));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(std::io::Error::other(format!(
                    "{} is in use by another migration",
                    path.display()
                )));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        let phase = Arc::new(AtomicU8::new(phase as u8));
        let seen = phase.clone();
        std::thread::Builder::new()
            .name("command-socket".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    // A client that says nothing cannot hold the socket.
                    conn.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let reply = match (line.trim(), seen.load(Ordering::Acquire)) {
                        ("start-postcopy", p) if p == Phase::Precopy as u8 => {
                            let _ = events.send(Event::StartPostcopy);
                            "ok\n".to_string()
                        }
                        ("start-postcopy", p) if p == Phase::NoPostcopy as u8 => {
                            "error: this migration runs with --postcopy never\n".to_string()
                        }
                        ("start-postcopy", _) => {
                            "error: this migration is already in postcopy or over\n".to_string()
                        }
                        (cmd, p) if cmd == "recover" || cmd.starts_with("recover ") => {
                            if p == Phase::Paused as u8 {
                                let to = cmd.strip_prefix("recover ").map(|a| a.trim().to_string());
                                let _ = events.send(Event::Recover(to));
                                "ok\n".to_string()
                            } else {
                                "error: the migration is not paused (recover applies once a postcopy migration lost its link)\n".to_string()
                            }
                        }
                        (other, _) => format!("error: unknown command {other:?}\n"),
                    };
                    let _ = (&conn).write_all(reply.as_bytes());
                }
            })?;
        Ok(CommandSocket { path, phase })
    }

    /// Says what a request can do from now on.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CommandSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `command` to the migration listening on `path`, or to the only one
/// running on this host.
pub fn send_command(path: Option<&Path>, command: &str) -> Result<String, String> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let mut found: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
                .map_err(|e| format!("no running migration found ({SOCKET_DIR}: {e})"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .filter(|p| match UnixStream::connect(p) {
                    Ok(_) => true,
                    Err(e) => {
                        // Left by a migration that was killed.
                        if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            let _ = std::fs::remove_file(p);
                        }
                        false
                    }
                })
                .collect();
            match found.len() {
                0 => return Err(format!("no running migration found in {SOCKET_DIR}")),
                1 => found.remove(0),
                _ => {
                    return Err(format!(
                        "several migrations are running; pick one with --socket: {}",
                        found
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
    };
    let mut conn =
        UnixStream::connect(&path).map_err(|e| format!("cannot reach {}: {e}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    conn.write_all(format!("{command}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let line = line.trim().to_string();
    match line.strip_prefix("error: ") {
        Some(e) => Err(e.to_string()),
        None => Ok(line),
    }
}
