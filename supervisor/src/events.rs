//! Everything the supervisor reacts to arrives as one [`Event`] on one
//! channel: messages from each child (one forwarding thread per ipc channel),
//! child exits and signals (signal-hook), the peer supervisor's control
//! messages, and `postcopy start-postcopy` requests.

use ipc_channel::ipc::IpcReceiver;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashSet;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use common::control::{ControlMsg, ExitStatus};

use crate::ctlsock::Command;
use common::msg::{FromFaultHandler, FromGuest, FromPageServer, FromRamSender};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

#[derive(Debug)]
pub enum Event {
    Guest(FromGuest),
    Sender(FromRamSender),
    Server(FromPageServer),
    Handler(FromFaultHandler),
    /// A child's ipc channel closed (it exited or crashed).
    ChannelClosed(&'static str),
    Peer(ControlMsg),
    /// The control connection failed.
    PeerLost(String),
    Exited {
        pid: u32,
        status: ExitStatus,
    },
    /// SIGINT or SIGTERM.
    Interrupt(i32),
    /// `postcopy start-postcopy` or SIGUSR1.
    StartPostcopy,
    /// A child was retired: none of its events follow (see [`Gate`]).
    Retired(&'static str),
    /// `postcopy recover [--to ADDR]`: try the destination again now.
    Recover(Option<String>),
    /// A command from the control socket (`crate::ctlsock`), already
    /// checked against what the state allowed when it was published; the
    /// driver checks again and answers on `reply`.
    Command(Command, Option<Reply>),
}

/// Where the driver answers a control-socket command: `Ok` or why not.
pub type Reply = Sender<Result<(), String>>;

/// Closes one child's stream of events: once retired, nothing more of
/// that child reaches the event channel (a role being replaced must not
/// speak for its successor).
#[derive(Clone, Default)]
pub struct Gate(Arc<Mutex<bool>>);

impl Gate {
    /// Stops the forwarding and puts `Event::Retired(name)` on `tx`: every
    /// event of the child is before it, every event of a successor after.
    /// Returns false if it was retired before (nothing sent).
    pub fn retire(&self, tx: &Sender<Event>, name: &'static str) -> bool {
        let mut retired = self.0.lock().expect("gate");
        if *retired {
            return false;
        }
        *retired = true;
        let _ = tx.send(Event::Retired(name));
        true
    }

    /// Sends `ev` unless the gate is retired; false once it is (or the
    /// receiver is gone). Under the gate's lock, so a retirement is either
    /// before the event (dropped) or after it (in order).
    pub fn pass(&self, tx: &Sender<Event>, ev: Event) -> bool {
        let retired = self.0.lock().expect("gate");
        !*retired && tx.send(ev).is_ok()
    }
}

/// Forwards one child's messages into the event channel until the child's
/// channel closes or its gate is retired.
pub fn forward<T>(
    rx: IpcReceiver<T>,
    tx: Sender<Event>,
    name: &'static str,
    wrap: fn(T) -> Event,
) -> Gate
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    let gate = Gate::default();
    let g = gate.clone();
    std::thread::Builder::new()
        .name(format!("from-{name}"))
        .spawn(move || loop {
            let ev = match rx.recv() {
                Ok(m) => wrap(m),
                Err(_) => Event::ChannelClosed(name),
            };
            let closed = matches!(ev, Event::ChannelClosed(_));
            if !g.pass(&tx, ev) || closed {
                return;
            }
        })
        .expect("spawn forwarding thread");
    gate
}

/// Watches signals; reaps the children it was told about.
#[derive(Clone)]
pub struct Reaper {
    pids: Arc<Mutex<HashSet<u32>>>,
    tx: Sender<Event>,
}

impl Reaper {
    /// Starts the signal thread. Must be called before any child starts.
    pub fn start(tx: Sender<Event>) -> std::io::Result<Reaper> {
        let reaper = Reaper {
            pids: Arc::new(Mutex::new(HashSet::new())),
            tx,
        };
        let mut signals = Signals::new([SIGCHLD, SIGINT, SIGTERM, SIGUSR1])?;
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let ev = match sig {
                        SIGCHLD => {
                            r.reap();
                            continue;
                        }
                        SIGUSR1 => Event::StartPostcopy,
                        other => Event::Interrupt(other),
                    };
                    if r.tx.send(ev).is_err() {
                        return;
                    }
                }
            })?;
        Ok(reaper)
    }

    /// Starts watching `pid` (it may have exited already).
    pub fn watch(&self, pid: u32) {
        self.pids.lock().expect("pids").insert(pid);
        self.reap();
    }

    fn reap(&self) {
        let pids: Vec<u32> = self.pids.lock().expect("pids").iter().copied().collect();
        for pid in pids {
            let status = match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus::Signal(sig as i32),
                Ok(_) => continue,
                Err(_) => continue,
            };
            self.pids.lock().expect("pids").remove(&pid);
            let _ = self.tx.send(Event::Exited { pid, status });
        }
    }
}

pub fn guest_event(m: FromGuest) -> Event {
    Event::Guest(m)
}
pub fn sender_event(m: FromRamSender) -> Event {
    Event::Sender(m)
}
pub fn server_event(m: FromPageServer) -> Event {
    Event::Server(m)
}
pub fn handler_event(m: FromFaultHandler) -> Event {
    Event::Handler(m)
}
