//! The guest process's side of the supervisor link: map memory, set up the
//! userfaultfd for this address space (write-protect tracking on the source,
//! missing-page faults on a postcopy destination), then obey commands.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use common::guest::{GuestConfig, GuestKind, Workload, KVM_MAX_MEM};
use common::mem::{Access, Mapping, MemError};
use common::msg::{FromGuest, GuestInit, Side, ToGuest};
use common::role::{LinkError, RoleLink};
use common::uffd::{Uffd, UffdError, DIRTY_TRACKING_FEATURES, POSTCOPY_FEATURES};

use crate::kvm::linux::LinuxBoot;
use crate::kvm::{KvmError, KvmGuest, BUILTIN_SECTOR};
use crate::process::{ProcessError, ProcessGuest};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("guest memory: {0}")]
    Mem(#[from] MemError),
    #[error("dirty tracking unavailable: {0}")]
    DirtyTracking(UffdError),
    #[error("postcopy unavailable on this host: {0}")]
    Postcopy(UffdError),
    #[error("userfaultfd: {0}")]
    Uffd(#[from] UffdError),
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("the first command must be Init, got {0}")]
    NotInitialised(String),
    #[error("{0} makes no sense on this side of the migration")]
    WrongSide(&'static str),
    #[error("the KVM guest needs a serial fd from the supervisor")]
    NoSerial,
    #[error("KVM guest memory must be at most {max} bytes, got {got}")]
    KvmMemTooLarge { got: u64, max: u64 },
    #[error("cannot open the Linux guest's {what} {path}: {source}")]
    LinuxFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

enum Engine {
    Process(ProcessGuest),
    Kvm(KvmGuest),
    /// A KVM guest booting Linux: booted once its `/init` says it runs.
    Linux(KvmGuest),
}

impl Engine {
    fn run(&mut self) -> Result<(), GuestError> {
        match self {
            Engine::Process(g) => g.run(),
            Engine::Kvm(g) | Engine::Linux(g) => g.run()?,
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), GuestError> {
        match self {
            Engine::Process(g) => g.stop()?,
            Engine::Kvm(g) | Engine::Linux(g) => g.stop()?,
        }
        Ok(())
    }

    fn save(&self) -> Result<Vec<u8>, GuestError> {
        Ok(match self {
            Engine::Process(g) => g.save(),
            Engine::Kvm(g) | Engine::Linux(g) => g.save()?,
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), GuestError> {
        match self {
            Engine::Process(g) => g.restore(state)?,
            Engine::Kvm(g) | Engine::Linux(g) => g.restore(state)?,
        }
        Ok(())
    }

    /// Size of the state `save` will produce (a bound for KVM, whose
    /// state can only be read with its vCPUs stopped).
    fn state_estimate(&self) -> u64 {
        match self {
            Engine::Process(g) => g.save().len() as u64,
            Engine::Kvm(g) | Engine::Linux(g) => 16 * 1024 * u64::from(g.vcpus()),
        }
    }

    fn is_running(&self) -> bool {
        match self {
            Engine::Process(g) => g.is_running(),
            Engine::Kvm(g) | Engine::Linux(g) => g.is_running() && g.failure().is_none(),
        }
    }

    fn booted(&self) -> bool {
        match self {
            Engine::Process(g) => g.booted(),
            Engine::Kvm(g) => g.serial_bytes() > 0,
            Engine::Linux(g) => g.marker_seen(),
        }
    }

    fn ops(&self) -> u64 {
        match self {
            Engine::Process(g) => g.ops(),
            Engine::Kvm(g) | Engine::Linux(g) => g.serial_bytes(),
        }
    }
}

/// Runs the guest process until Quit or until the supervisor goes away.
pub fn run(link: RoleLink<ToGuest, FromGuest>) -> Result<(), GuestError> {
    let init = match link.recv()? {
        ToGuest::Init(init) => init,
        other => return Err(GuestError::NotInitialised(format!("{other:?}"))),
    };
    let GuestInit { config, side } = init;
    let mut fds = link.fds.recv()?;
    let memfd = fds.take("memory")?;
    let serial = fds.take_optional("serial");
    let mem = Arc::new(Mapping::new(
        memfd.as_fd(),
        config.mem_bytes as usize,
        Access::ReadWrite,
    )?);
    drop(memfd);
    let base = mem.remote_addr();
    let len = mem.len() as u64;

    // The userfaultfd belongs to this address space, so it is made here and
    // handed to the supervisor, which passes it on to the roles.
    let uffd = match side {
        Side::Source => {
            let uffd = Uffd::with_features(true, DIRTY_TRACKING_FEATURES)
                .map_err(GuestError::DirtyTracking)?;
            uffd.register_wp(base, len)
                .map_err(GuestError::DirtyTracking)?;
            let pagemap = File::open("/proc/self/pagemap").map_err(GuestError::Pagemap)?;
            link.fds
                .send(&[("uffd", uffd.as_fd()), ("pagemap", pagemap.as_fd())])?;
            Some(uffd)
        }
        Side::Destination { postcopy: true } => {
            let uffd =
                Uffd::with_features(true, POSTCOPY_FEATURES).map_err(GuestError::Postcopy)?;
            link.fds.send(&[("uffd", uffd.as_fd())])?;
            Some(uffd)
        }
        Side::Destination { postcopy: false } => None,
    };

    let mut engine = build_engine(&config, side, mem.clone(), serial)?;
    link.send(FromGuest::Ready {
        base,
        state_bytes: engine.state_estimate(),
    })?;

    let mut listening = false;
    // A closed link means the supervisor is gone: nothing left to run for.
    while let Ok(cmd) = link.recv() {
        match cmd {
            ToGuest::Init(_) => return Err(GuestError::NotInitialised("a second Init".into())),
            ToGuest::Run | ToGuest::Resume => {
                engine.run()?;
                link.send(FromGuest::Running)?;
            }
            ToGuest::Stop => {
                engine.stop()?;
                link.send(FromGuest::Stopped)?;
            }
            ToGuest::SaveState => {
                engine.stop()?;
                link.send(FromGuest::State(engine.save()?))?;
            }
            ToGuest::Listen => {
                let Some(u) = uffd.as_ref().filter(|_| side != Side::Source) else {
                    return Err(GuestError::WrongSide("Listen"));
                };
                if !listening {
                    u.register_missing(base, len)?;
                    listening = true;
                }
                link.send(FromGuest::Listening)?;
            }
            ToGuest::Load(state) => {
                if side == Side::Source {
                    return Err(GuestError::WrongSide("Load"));
                }
                engine.restore(&state)?;
                link.send(FromGuest::Loaded)?;
            }
            ToGuest::Ping => link.send(FromGuest::Progress {
                ops: engine.ops(),
                booted: engine.booted(),
                running: engine.is_running(),
            })?,
            ToGuest::Quit => break,
        }
    }
    engine.stop()?;
    drop(uffd);
    Ok(())
}

fn build_engine(
    config: &GuestConfig,
    side: Side,
    mem: Arc<Mapping>,
    serial: Option<OwnedFd>,
) -> Result<Engine, GuestError> {
    Ok(match config.kind {
        GuestKind::Process => Engine::Process(ProcessGuest::new(mem, config.clone())?),
        GuestKind::Kvm => {
            if config.mem_bytes > KVM_MAX_MEM {
                return Err(GuestError::KvmMemTooLarge {
                    got: config.mem_bytes,
                    max: KVM_MAX_MEM,
                });
            }
            let serial = File::from(serial.ok_or(GuestError::NoSerial)?);
            let mut vm = KvmGuest::new(mem, config.vcpus.max(1), serial)?;
            if let Workload::Linux(spec) = &config.workload {
                vm.watch_serial_for(guest_init::RUNNING_MARKER.as_bytes());
                if side == Side::Source {
                    warn_if_slow();
                    vm.boot_linux(&mut open_linux(spec)?)?;
                }
                return Ok(Engine::Linux(vm));
            }
            if side == Side::Source {
                let sector: &[u8] = config.boot_sector.as_deref().unwrap_or(BUILTIN_SECTOR);
                vm.boot(sector)?;
            }
            Engine::Kvm(vm)
        }
    })
}

/// Opens what a Linux guest boots (source side only).
fn open_linux(spec: &common::guest::LinuxSpec) -> Result<LinuxBoot, GuestError> {
    let open = |what, path: &str| {
        File::open(path).map_err(|source| GuestError::LinuxFile {
            what,
            path: path.to_string(),
            source,
        })
    };
    Ok(LinuxBoot {
        kernel: open("kernel", &spec.kernel)?,
        initrd: spec
            .initrd
            .as_deref()
            .map(|p| open("initramfs", p))
            .transpose()?,
        cmdline: spec.cmdline.clone(),
    })
}

/// Says so, loudly, when this KVM runs guest code too slowly for Linux to
/// boot in useful time (see `kvm::linux_usable`); the guest is booted
/// anyway.
fn warn_if_slow() {
    match crate::kvm::guest_speed() {
        Ok(speed) if speed < crate::kvm::LINUX_MIN_GUEST_SPEED => log::warn!(
            "KVM here runs guest code at {:.2} M instructions/s (a VMX/SVM host runs \
             hundreds): this Linux guest will take minutes to hours to boot",
            speed / 1e6
        ),
        Ok(_) => {}
        Err(e) => log::warn!("the KVM speed probe failed: {e}"),
    }
}
