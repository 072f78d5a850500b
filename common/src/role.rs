//! How a role process joins its supervisor. The supervisor starts the role
//! with `--ipc NAME` and one end of a Unix socket pair at fd 3. The role
//! connects by name to the supervisor's one-shot ipc-channel server (the one
//! connection a role makes itself), hands over the two typed channels it will
//! use, and receives every other fd it needs over fd 3 with SCM_RIGHTS.

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The fd number at which a role finds its end of the fd socket.
pub const FD_SOCKET: RawFd = 3;
/// Command-line flag naming the supervisor's one-shot ipc server.
pub const IPC_ARG: &str = "--ipc";

/// The first message a role sends: its pid and the two channels.
#[derive(Serialize, Deserialize)]
pub struct Bootstrap<In, Out> {
    pub pid: u32,
    pub to_role: IpcSender<In>,
    pub from_role: IpcReceiver<Out>,
}

/// Errors in the role ↔ supervisor plumbing.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("usage: {0} --ipc SERVER_NAME (roles are started by the postcopy supervisor)")]
    Usage(String),
    #[error("could not reach the supervisor's ipc server: {0}")]
    Connect(std::io::Error),
    #[error("ipc channel error: {0}")]
    Ipc(String),
    #[error("fd socket error: {0}")]
    FdSocket(nix::Error),
    #[error("fd socket: {0}")]
    FdProtocol(String),
    #[error("the supervisor did not hand over the {0} fd")]
    MissingFd(&'static str),
}

/// A Unix SEQPACKET socket that carries named fds.
#[derive(Debug)]
pub struct FdSocket {
    sock: OwnedFd,
}

/// Most fds one message carries.
const MAX_FDS: usize = 32;

impl FdSocket {
    /// A connected pair (supervisor end, role end).
    pub fn pair() -> Result<(FdSocket, OwnedFd), LinkError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(LinkError::FdSocket)?;
        Ok((FdSocket { sock: a }, b))
    }

    pub fn from_owned(sock: OwnedFd) -> FdSocket {
        FdSocket { sock }
    }

    /// Sends fds with their names in one message.
    pub fn send(&self, fds: &[(&str, BorrowedFd<'_>)]) -> Result<(), LinkError> {
        if fds.len() > MAX_FDS {
            return Err(LinkError::FdProtocol(format!(
                "{} fds in one message, at most {MAX_FDS}",
                fds.len()
            )));
        }
        let names: Vec<&str> = fds.iter().map(|(n, _)| *n).collect();
        let payload =
            rmp_serde::to_vec(&names).map_err(|e| LinkError::FdProtocol(e.to_string()))?;
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let iov = [IoSlice::new(&payload)];
        let cmsgs = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        sendmsg::<UnixAddr>(self.sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)
            .map_err(LinkError::FdSocket)?;
        Ok(())
    }

    /// Receives one message of named fds (blocking).
    pub fn recv(&self) -> Result<NamedFds, LinkError> {
        let mut payload = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (bytes, fds) = {
            let mut iov = [IoSliceMut::new(&mut payload)];
            let msg = recvmsg::<UnixAddr>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(LinkError::FdSocket)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(LinkError::FdSocket)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    for fd in list {
                        // SAFETY: the kernel just installed this fd in our
                        // table for us; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(LinkError::FdProtocol("fd list truncated".into()));
            }
            (msg.bytes, fds)
        };
        if bytes == 0 {
            return Err(LinkError::FdProtocol("peer closed the fd socket".into()));
        }
        let names: Vec<String> = rmp_serde::from_slice(&payload[..bytes])
            .map_err(|e| LinkError::FdProtocol(format!("bad fd name list: {e}")))?;
        if names.len() != fds.len() {
            return Err(LinkError::FdProtocol(format!(
                "{} names for {} fds",
                names.len(),
                fds.len()
            )));
        }
        Ok(NamedFds {
            fds: names.into_iter().zip(fds).collect(),
        })
    }
}

impl AsFd for FdSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Fds received from the supervisor, by name.
#[derive(Debug, Default)]
pub struct NamedFds {
    fds: Vec<(String, OwnedFd)>,
}

impl NamedFds {
    /// Takes the fd called `name`.
    pub fn take(&mut self, name: &'static str) -> Result<OwnedFd, LinkError> {
        let i = self
            .fds
            .iter()
            .position(|(n, _)| n == name)
            .ok_or(LinkError::MissingFd(name))?;
        Ok(self.fds.swap_remove(i).1)
    }

    /// Takes the fd called `name` if it was sent.
    pub fn take_optional(&mut self, name: &'static str) -> Option<OwnedFd> {
        self.take(name).ok()
    }
}

/// A role's end of its link to the supervisor.
pub struct RoleLink<In, Out> {
    pub rx: IpcReceiver<In>,
    pub tx: IpcSender<Out>,
    pub fds: FdSocket,
}

impl<In, Out> RoleLink<In, Out>
where
    In: Serialize + DeserializeOwned,
    Out: Serialize + DeserializeOwned,
{
    /// Connects to the supervisor named on the command line.
    pub fn connect_from_args() -> Result<Self, LinkError> {
        let args: Vec<String> = std::env::args().collect();
        let prog = args.first().cloned().unwrap_or_else(|| "role".into());
        let server = match args.as_slice() {
            [_, flag, name] if flag == IPC_ARG => name.clone(),
            _ => return Err(LinkError::Usage(prog)),
        };
        // SAFETY: fd 3 was placed there by the supervisor for us and is owned
        // by nobody else in this process.
        let fds = FdSocket::from_owned(unsafe { OwnedFd::from_raw_fd(FD_SOCKET) });
        Self::connect(server, fds)
    }

    /// Connects to the one-shot server `server`.
    pub fn connect(server: String, fds: FdSocket) -> Result<Self, LinkError> {
        let boot: IpcSender<Bootstrap<In, Out>> =
            IpcSender::connect(server).map_err(LinkError::Connect)?;
        let (to_role, rx) = ipc::channel::<In>().map_err(|e| LinkError::Ipc(e.to_string()))?;
        let (tx, from_role) = ipc::channel::<Out>().map_err(|e| LinkError::Ipc(e.to_string()))?;
        boot.send(Bootstrap {
            pid: std::process::id(),
            to_role,
            from_role,
        })
        .map_err(|e| LinkError::Ipc(e.to_string()))?;
        Ok(RoleLink { rx, tx, fds })
    }

    /// Receives the next command; a closed channel means the supervisor is
    /// gone, which ends the role.
    pub fn recv(&self) -> Result<In, LinkError> {
        self.rx
            .recv()
            .map_err(|e| LinkError::Ipc(format!("supervisor channel: {e:?}")))
    }

    /// A command if one is waiting; an error if the supervisor is gone.
    pub fn try_recv(&self) -> Result<Option<In>, LinkError> {
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(m)),
            Err(ipc_channel::TryRecvError::Empty) => Ok(None),
            Err(ipc_channel::TryRecvError::IpcError(e)) => {
                Err(LinkError::Ipc(format!("supervisor channel: {e:?}")))
            }
        }
    }

    pub fn send(&self, msg: Out) -> Result<(), LinkError> {
        self.tx
            .send(msg)
            .map_err(|e| LinkError::Ipc(format!("supervisor channel: {e:?}")))
    }
}

/// Closes every fd above the fd socket and the sandbox's note pipe: a role
/// starts with nothing the supervisor did not mean to give it.
pub fn close_inherited_fds() {
    let first = crate::sandbox::NOTE_FD.max(FD_SOCKET) as u32 + 1;
    // SAFETY: close_range only closes fds; nothing in this process uses fds
    // above these two yet (called first thing in main).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r != 0 {
        log::warn!("close_range failed: {}", std::io::Error::last_os_error());
    }
}

/// Implemented by each role's outgoing message enum, so the common main can
/// report a fatal error before exiting.
pub trait RoleOutput {
    fn fatal(text: String) -> Self;
}

/// The common `main` of a role: logging, fd hygiene, the link, then `body`.
/// A returned error is sent to the supervisor and ends the process with 1.
pub fn role_main<In, Out, E, F>(name: &'static str, body: F) -> !
where
    In: Serialize + DeserializeOwned,
    Out: Serialize + DeserializeOwned + RoleOutput,
    E: std::fmt::Display,
    F: FnOnce(RoleLink<In, Out>) -> Result<(), E>,
{
    crate::logging::init_role(name);
    close_inherited_fds();
    let link = match RoleLink::<In, Out>::connect_from_args() {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            std::process::exit(2);
        }
    };
    let tx = link.tx.clone();
    match body(link) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let text = e.to_string();
            log::error!("{text}");
            let _ = tx.send(Out::fatal(text));
            std::process::exit(1)
        }
    }
}
