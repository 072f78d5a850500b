//! Helpers for the whole-system tests: find the built binaries, run them
//! with a deadline, read their JSON reports, and build two "hosts" out of
//! network namespaces joined by a veth pair.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `postcopy` and the role binaries are: `POSTCOPY_BIN_DIR`, else the
/// profile directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("POSTCOPY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/system-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A `postcopy` command.
pub fn postcopy() -> Command {
    let path = bin_dir().join("postcopy");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo build --release)",
        path.display()
    );
    Command::new(path)
}

/// What a finished command left behind.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr (last 4000 bytes)\n{}",
            self.status.code(),
            self.stdout,
            tail(&self.stderr, 4000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A started command whose output is collected.
/// Killed when dropped while still running, so a test that fails early
/// leaves no migration behind.
pub struct Running {
    child: Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn start(cmd: &mut Command) -> Running {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start command");
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    Running {
        child,
        out: Some(out),
        err: Some(err),
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit`; kills it past that (and says so in the error).
    pub fn finish(mut self, limit: Duration) -> Result<Outcome, String> {
        let t = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                let st = self.child.wait().map_err(|e| e.to_string())?;
                let o = Outcome {
                    status: st,
                    stdout: self.output(),
                    stderr: self.errors(),
                };
                return Err(format!(
                    "still running after {} s, killed\n{}",
                    limit.as_secs(),
                    o.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Outcome {
            status,
            stdout: self.output(),
            stderr: self.errors(),
        })
    }

    fn output(&mut self) -> String {
        self.out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn errors(&mut self) -> String {
        self.err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// Runs a command to the end (killed after `limit`).
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Outcome, String> {
    start(cmd).finish(limit)
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("postcopy-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a JSON report.
pub fn report(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("no report at {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("bad JSON in {}: {e}", path.display()))
}

/// A numeric field of a report (u64), or an error naming it.
pub fn num(r: &Value, field: &str) -> Result<u64, String> {
    let mut v = r;
    for part in field.split('.') {
        v = v
            .get(part)
            .ok_or_else(|| format!("report has no {field}: {r:#}"))?;
    }
    v.as_u64()
        .or_else(|| v.as_f64().map(|f| f as u64))
        .ok_or_else(|| format!("report field {field} is not a number: {v}"))
}

/// A string field of a report.
pub fn text<'a>(r: &'a Value, field: &str) -> &'a str {
    r.get(field).and_then(Value::as_str).unwrap_or("")
}

/// Fails unless `cond`.
pub fn check(cond: bool, what: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// Two network namespaces ("hosts") joined by a veth pair, each end with an
/// address; deleted on drop.
pub struct TwoHosts {
    pub src: String,
    pub dst: String,
    pub src_ip: String,
    pub dst_ip: String,
    pub src_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e} (is iproute2 installed?)", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl TwoHosts {
    pub fn new(tag: &str) -> Result<TwoHosts, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 10000, n);
        let h = TwoHosts {
            src: format!("pc-{tag}-s{id}"),
            dst: format!("pc-{tag}-d{id}"),
            src_ip: format!("10.{}.{}.1", 200 + (n % 50), std::process::id() % 250),
            dst_ip: format!("10.{}.{}.2", 200 + (n % 50), std::process::id() % 250),
            src_if: format!("vs{id}"),
        };
        let dst_if = format!("vd{id}");
        ip(&["netns", "add", &h.src])?;
        ip(&["netns", "add", &h.dst])?;
        ip(&[
            "link", "add", &h.src_if, "type", "veth", "peer", "name", &dst_if,
        ])?;
        ip(&["link", "set", &h.src_if, "netns", &h.src])?;
        ip(&["link", "set", &dst_if, "netns", &h.dst])?;
        for (ns, ifname, addr) in [(&h.src, &h.src_if, &h.src_ip), (&h.dst, &dst_if, &h.dst_ip)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    /// A command run inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// `postcopy incoming` on the destination host, on `port`, writing its
    /// report to `json`; returns it and the address to migrate to.
    pub fn incoming(&self, port: u16, extra: &[&str], json: &Path) -> (Running, String) {
        let addr = format!("{}:{port}", self.dst_ip);
        let dest = start(
            self.exec(&self.dst, &bin_dir().join("postcopy"))
                .args(["incoming", "--listen", &addr, "--accept-timeout", "60"])
                .args(extra)
                .arg("--json")
                .arg(json),
        );
        // Let it bind before anyone connects.
        std::thread::sleep(Duration::from_millis(300));
        (dest, addr)
    }

    /// `postcopy migrate --to addr ARGS --json json` on the source host.
    pub fn migrate(&self, addr: &str, args: &[&str], json: &Path) -> Command {
        let mut c = self.exec(&self.src, &bin_dir().join("postcopy"));
        c.args(["migrate", "--to", addr])
            .args(args)
            .arg("--json")
            .arg(json);
        c
    }

    /// Takes the source's end of the link down: packets stop, nobody is
    /// told.
    pub fn cut(&self) -> Result<(), String> {
        ip(&["-n", &self.src, "link", "set", &self.src_if, "down"])
    }

    /// Brings the source's end of the link back up.
    pub fn restore(&self) -> Result<(), String> {
        ip(&["-n", &self.src, "link", "set", &self.src_if, "up"])
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Why KVM tests cannot run here, if they cannot.
pub fn kvm_skip_reason() -> Option<String> {
    guest::kvm::kvm_usable().err()
}

/// A whole-system test: passes or fails with its message.
pub fn plain_trial(name: &'static str, f: fn() -> Result<(), String>) -> libtest_mimic::Trial {
    libtest_mimic::Trial::test(name, move || f().map_err(libtest_mimic::Failed::from))
}

/// A test that needs KVM: with `skip` (why KVM is not usable) it says
/// "skipped: <reason>" and counts as ignored, never as passed.
pub fn kvm_trial(
    name: &'static str,
    f: fn() -> Result<(), String>,
    skip: Option<String>,
) -> libtest_mimic::Trial {
    use libtest_mimic::{Completion, Failed};
    libtest_mimic::Trial::ignorable_test(name, move || match &skip {
        Some(reason) => {
            eprintln!("skipped: {name}: {reason}");
            Ok(Completion::ignored_with(format!("skipped: {reason}")))
        }
        None => f().map(|()| Completion::Completed).map_err(Failed::from),
    })
}

/// Where the Linux guest's kernel and initramfs are: as `postcopy` looks
/// for them (`POSTCOPY_LINUX_GUEST_DIR`, else `linux-guest/` beside the
/// binaries' profile directory: target/linux-guest).
pub fn linux_guest_dir() -> PathBuf {
    std::env::var_os("POSTCOPY_LINUX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            bin_dir()
                .parent()
                .map(|t| t.join("linux-guest"))
                .unwrap_or_else(|| PathBuf::from("target/linux-guest"))
        })
}

/// Why Linux guest tests cannot run here, if they cannot: no kernel built
/// (scripts/linux-guest.sh), KVM unusable, or KVM too slow to boot Linux
/// (measured by `guest::kvm::linux_usable`).
pub fn linux_skip_reason() -> Option<String> {
    let dir = linux_guest_dir();
    for f in ["vmlinuz", "initrd.cpio.gz"] {
        if !dir.join(f).is_file() {
            return Some(format!(
                "no {} (build it with ./scripts/linux-guest.sh)",
                dir.join(f).display()
            ));
        }
    }
    guest::kvm::linux_usable().err()
}
