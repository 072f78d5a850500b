//! Child processes of the bench: each in its own process group, told to
//! end (SIGTERM) if the bench dies, stopped by pid when a run is over or
//! interrupted, never by name.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM (signal-hook): the bench stops at the next chance.
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The flag signals set.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    INTERRUPTED
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

/// Makes `cmd` a proper child of the bench: own process group (a
/// terminal's Ctrl-C reaches only the bench, which stops its children in
/// order) and SIGTERM when the bench dies.
pub fn detach(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, setpgid).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

impl Proc {
    /// Starts `cmd` with stdout and stderr into `log`.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        detach(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Exited already?
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits until it exits, `limit` passes or the bench is interrupted
    /// (then it is stopped and the error says why).
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Ok(st);
            }
            if interrupted() {
                self.stop();
                return Err(format!("{}: interrupted", self.name));
            }
            if t.elapsed() > limit {
                self.stop();
                return Err(format!(
                    "{} still running after {} s: stopped",
                    self.name,
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; reaps it.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child, not yet reaped, by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
