//! The source supervisor's command socket, through which
//! `postcopy start-postcopy` reaches a running migration. One line in
//! (`start-postcopy`), one line out (`ok` or `error: ...`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use crate::events::Event;

/// Where command sockets live.
pub const SOCKET_DIR: &str = "/run/postcopy";

pub struct CommandSocket {
    path: PathBuf,
}

impl CommandSocket {
    /// Listens on `path` (default: `/run/postcopy/migrate-<pid>.sock`).
    pub fn bind(path: Option<PathBuf>, events: Sender<Event>) -> std::io::Result<Self> {
        let path = match path {
            Some(p) => p,
            None => {
                std::fs::create_dir_all(SOCKET_DIR)?;
                Path::new(SOCKET_DIR).join(format!("migrate-{}.sock", std::process::id()))
            }
        };
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::thread::Builder::new()
            .name("command-socket".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let reply = match line.trim() {
                        "start-postcopy" => {
                            let _ = events.send(Event::StartPostcopy);
                            "ok\n".to_string()
                        }
                        other => format!("error: unknown command {other:?}\n"),
                    };
                    let _ = (&conn).write_all(reply.as_bytes());
                }
            })?;
        Ok(CommandSocket { path })
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
                .filter(|p| UnixStream::connect(p).is_ok())
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
