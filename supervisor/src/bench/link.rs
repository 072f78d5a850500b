//! The links a bench runs over (the three): loopback; two network
//! namespaces joined by a veth pair shaped with tbf to 1 Gbit/s each way;
//! and the same plus 1 ms round trip through the bench's own delay relay
//! ([`super::relay`]; this kernel has no netem). Namespaces carry the
//! bench's pid in their names, go away on drop, and those of benches that
//! died are removed when the next bench starts.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

/// Which link a scenario runs over.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LinkKind {
    /// 127.0.0.1 in this namespace.
    #[serde(rename = "loopback")]
    Loopback,
    /// Two namespaces, a veth pair, tbf 1 Gbit/s on both ends.
    #[serde(rename = "veth-1g")]
    Veth,
    /// As `Veth`, plus the delay relay (0.5 ms each way) in the source's
    /// namespace.
    #[serde(rename = "veth-1g-relay")]
    Relay,
}

impl LinkKind {
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Loopback => "loopback",
            LinkKind::Veth => "veth-1g",
            LinkKind::Relay => "veth-1g-relay",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LinkKind::Loopback => "loopback TCP on this host",
            LinkKind::Veth => {
                "two network namespaces joined by veth, tbf 1 Gbit/s (burst 128 KiB, latency 10 ms) on both ends"
            }
            LinkKind::Relay => {
                "veth with tbf 1 Gbit/s as veth-1g, plus the bench's TCP relay in the source namespace holding each chunk 0.5 ms each way (1 ms round trip)"
            }
        }
    }
}

/// Prefix of every namespace a bench creates: `pcb<pid>s<n>` / `pcb<pid>d<n>`.
const PREFIX: &str = "pcb";
const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const DST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// tbf settings on both ends of the veth pair (those of the QEMU anchor in
/// `../shared/anchors`, so the figures compare).
pub const TBF: [&str; 6] = ["rate", "1gbit", "burst", "128kb", "latency", "10ms"];

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {}: {e} (is iproute2 installed?)", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes the namespaces of benches that are no longer running; returns
/// their names.
pub fn remove_stale() -> Vec<String> {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return vec![];
    };
    let mut removed = vec![];
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        let tail = &rest[digits.len()..];
        if !(tail.starts_with('s') || tail.starts_with('d')) {
            continue;
        }
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if run("ip", &["netns", "del", name]).is_ok() {
            removed.push(name.to_string());
        }
    }
    removed
}

/// Two namespaces ("hosts") joined by a shaped veth pair; deleted on drop
/// (the veth pair goes with them).
pub struct Netns {
    pub src: String,
    pub dst: String,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = Netns {
            src: format!("{PREFIX}{pid}s{n}"),
            dst: format!("{PREFIX}{pid}d{n}"),
        };
        // From here on, drop cleans up whatever part was made.
        run("ip", &["netns", "add", &ns.src])?;
        run("ip", &["netns", "add", &ns.dst])?;
        // Interface names: at most 15 bytes; the namespaces' names fit.
        let (src_if, dst_if) = (ns.src.clone(), ns.dst.clone());
        run(
            "ip",
            &[
                "link", "add", &src_if, "netns", &ns.src, "type", "veth", "peer", "name", &dst_if,
                "netns", &ns.dst,
            ],
        )?;
        for (name, ifname, ip) in [(&ns.src, &src_if, SRC_IP), (&ns.dst, &dst_if, DST_IP)] {
            let addr = format!("{ip}/24");
            run("ip", &["-n", name, "addr", "add", &addr, "dev", ifname])?;
            run("ip", &["-n", name, "link", "set", ifname, "up"])?;
            run("ip", &["-n", name, "link", "set", "lo", "up"])?;
            let mut tc = vec!["-n", name, "qdisc", "add", "dev", ifname, "root", "tbf"];
            tc.extend(TBF);
            run("tc", &tc)?;
        }
        Ok(ns)
    }

    /// The source's address on the link.
    pub fn src_ip() -> IpAddr {
        IpAddr::V4(SRC_IP)
    }

    /// The destination's address on the link.
    pub fn dst_ip() -> IpAddr {
        IpAddr::V4(DST_IP)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.src]);
        let _ = run("ip", &["netns", "del", &self.dst]);
    }
}

/// Names of this process's namespaces that still exist (a test looks for
/// leftovers with it).
pub fn ours_left() -> Vec<String> {
    let own = format!("{PREFIX}{}", std::process::id());
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.strip_prefix(&own)
                .is_some_and(|t| t.starts_with('s') || t.starts_with('d'))
        })
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a fresh thread inside network namespace `ns` (None: this
/// one). Sockets keep the namespace they were made in, so what `f` creates
/// can be used from any thread afterwards; threads `f` starts stay in `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = ns.map(|n| format!("/run/netns/{n}"));
    std::thread::spawn(move || -> Result<T, String> {
        if let Some(path) = path {
            let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {path}: {e}"))?;
        }
        Ok(f())
    })
    .join()
    .map_err(|_| "a thread inside a namespace panicked".to_string())?
}

/// Where a scenario's two ends live and how the source reaches the
/// destination.
pub struct Endpoints {
    pub kind: LinkKind,
    /// Namespace of the source (None: this one).
    pub src_ns: Option<String>,
    pub dst_ns: Option<String>,
    /// The destination's address on the link.
    pub dst_ip: IpAddr,
    _netns: Option<Netns>,
}

impl Endpoints {
    pub fn set_up(kind: LinkKind) -> Result<Endpoints, String> {
        Ok(match kind {
            LinkKind::Loopback => Endpoints {
                kind,
                src_ns: None,
                dst_ns: None,
                dst_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                _netns: None,
            },
            LinkKind::Veth | LinkKind::Relay => {
                let ns = Netns::create()?;
                Endpoints {
                    kind,
                    src_ns: Some(ns.src.clone()),
                    dst_ns: Some(ns.dst.clone()),
                    dst_ip: Netns::dst_ip(),
                    _netns: Some(ns),
                }
            }
        })
    }

    /// A listening socket for the destination, on the link, any port.
    pub fn listen(&self) -> Result<std::net::TcpListener, String> {
        let ip = self.dst_ip;
        in_netns(self.dst_ns.as_deref(), move || {
            std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        })?
        .map_err(|e| format!("listen on {ip}: {e}"))
    }

    /// `program` to run in the source's (`src`) or destination's namespace.
    pub fn command(&self, src: bool, program: &std::path::Path) -> Command {
        match if src { &self.src_ns } else { &self.dst_ns } {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    /// Where the source connects to reach `target` on the destination: the
    /// target itself, or a relay in front of it (kept alive by the guard).
    pub fn reach(
        &self,
        target: SocketAddr,
    ) -> Result<(SocketAddr, Option<super::relay::Relay>), String> {
        match self.kind {
            LinkKind::Relay => {
                let relay = super::relay::Relay::start(
                    self.src_ns.as_deref(),
                    target,
                    super::relay::ONE_WAY_DELAY,
                )?;
                Ok((relay.addr(), Some(relay)))
            }
            _ => Ok((target, None)),
        }
    }
}
