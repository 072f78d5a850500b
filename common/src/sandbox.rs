//! The role sandbox (docs/security.md, "Role sandbox"): once a role holds
//! every fd it will ever use, [`enter`] lowers its resource limits, moves
//! it into an empty network namespace and a private mount namespace whose
//! root is an empty read-only tmpfs, drops it to an unprivileged uid/gid,
//! sets `no_new_privs` and installs its seccomp allow-list. Each role keeps its own list as data in its crate
//! (`seccomp.rs`); [`BASE`] is what every role needs to be a Rust process
//! talking ipc-channel at all.
//!
//! A call outside the list is never executed: the filter answers it with
//! SECCOMP_RET_TRAP, a tiny SIGSYS handler writes the syscall number to the
//! note pipe the supervisor handed over (fd [`NOTE_FD`]) and to stderr, then
//! makes the same call again with SIGSYS blocked, so the kernel kills the
//! process with SIGSYS. The supervisor reads the note after the death and
//! reports `role X was killed by its sandbox (syscall N)`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Where a role finds the write end of its note pipe: the supervisor reads
/// the number of a forbidden syscall from the other end after the role died.
pub const NOTE_FD: RawFd = 4;
/// Environment variable through which the supervisor names the uid and gid
/// a role drops to (`UID:GID`). Unset: the role keeps its identity (roles
/// started by hand or by the role tests, or a supervisor that is not root).
pub const ROLE_IDS_ENV: &str = "POSTCOPY_ROLE_IDS";
/// Test-only: the role named here makes a forbidden call (`socket(AF_INET,
/// SOCK_STREAM)`, as a compromised role reaching for the network would)
/// right after its filter went on.
pub const FORBIDDEN_TEST_ENV: &str = "POSTCOPY_TEST_FORBIDDEN_SYSCALL";

/// Most fds a sandboxed role may hold at once: its handed fds (at most a
/// dozen) plus what ipc-channel creates for a large message.
pub const RLIMIT_NOFILE: u64 = 64;
/// Most tasks the role user may have: the limit is per user, so it counts
/// every role of every migration on the host that runs as this user.
pub const RLIMIT_NPROC: u64 = 512;

/// Which calls of one syscall the list allows. `name` is the constant's
/// name as written in the list (the macros below fill it in), for the docs.
#[derive(Clone, Copy, Debug)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `arg` (0-based) equals `value`, compared as 32 bits: every
    /// use is an int-sized argument (an fd, a command, a signal), of which
    /// the kernel ignores the upper half too.
    Eq {
        arg: u8,
        value: u64,
        name: &'static str,
    },
    /// Argument `arg` differs from `value` (32 bits).
    Ne {
        arg: u8,
        value: u64,
        name: &'static str,
    },
    /// Argument `arg` has every bit of `bits` set (64 bits).
    Has {
        arg: u8,
        bits: u64,
        name: &'static str,
    },
    /// Argument `arg` has no bit of `bits` set (64 bits).
    Lacks {
        arg: u8,
        bits: u64,
        name: &'static str,
    },
}

/// `arg_eq!(N, CONST)`: argument N equals CONST.
#[macro_export]
macro_rules! arg_eq {
    ($arg:expr, $($c:ident)::+) => {
        $crate::sandbox::Args::Eq { arg: $arg, value: $($c)::+ as u64, name: stringify!($($c)::+) }
    };
}
/// `arg_ne!(N, CONST)`: argument N differs from CONST.
#[macro_export]
macro_rules! arg_ne {
    ($arg:expr, $($c:ident)::+) => {
        $crate::sandbox::Args::Ne { arg: $arg, value: $($c)::+ as u64, name: stringify!($($c)::+) }
    };
}
/// `arg_has!(N, BITS)`: argument N has every bit of BITS.
#[macro_export]
macro_rules! arg_has {
    ($arg:expr, $($c:ident)::+) => {
        $crate::sandbox::Args::Has { arg: $arg, bits: $($c)::+ as u64, name: stringify!($($c)::+) }
    };
}
/// `arg_lacks!(N, BITS)`: argument N has none of BITS.
#[macro_export]
macro_rules! arg_lacks {
    ($arg:expr, $($c:ident)::+) => {
        $crate::sandbox::Args::Lacks { arg: $arg, bits: $($c)::+ as u64, name: stringify!($($c)::+) }
    };
}

/// One entry of an allow-list: a syscall, which of its calls, and why the
/// role needs it.
#[derive(Clone, Copy, Debug)]
pub struct Syscall {
    pub name: &'static str,
    pub nr: i64,
    pub args: Args,
    pub why: &'static str,
}

/// One ioctl request a role may issue, and why.
#[derive(Clone, Copy, Debug)]
pub struct Ioctl {
    pub name: &'static str,
    pub request: u64,
    pub why: &'static str,
}

/// A role's allow-list: [`BASE`] plus its own syscalls and ioctls.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub role: &'static str,
    pub syscalls: &'static [Syscall],
    pub ioctls: &'static [Ioctl],
}

/// `syscall!(SYS_name, "why")`: any call of `name`;
/// `syscall!(SYS_name, args, "why")`: only the calls that match `args`.
#[macro_export]
macro_rules! syscall {
    ($nr:ident, $why:expr) => {
        $crate::syscall!($nr, $crate::sandbox::Args::Any, $why)
    };
    ($nr:ident, $args:expr, $why:expr) => {
        $crate::sandbox::Syscall {
            name: stringify!($nr),
            nr: ::libc::$nr,
            args: $args,
            why: $why,
        }
    };
}

/// `ioctl!(REQUEST, "why")`: the request constant `REQUEST` (in scope).
#[macro_export]
macro_rules! ioctl {
    ($name:ident, $why:expr) => {
        $crate::sandbox::Ioctl {
            name: stringify!($name),
            request: $name,
            why: $why,
        }
    };
}

/// stderr's fd, by name for the docs.
const STDERR: RawFd = libc::STDERR_FILENO;

/// What every role needs to be a Rust process with threads that talks to
/// its supervisor over ipc-channel and logs to stderr.
pub static BASE: &[Syscall] = &[
    syscall!(SYS_futex, "locks, condition variables and thread joins (std::sync)"),
    syscall!(SYS_recvmsg, "ipc-channel: commands from the supervisor"),
    syscall!(SYS_sendmsg, "ipc-channel: reports and errors to the supervisor"),
    syscall!(SYS_write, arg_eq!(0, STDERR), "log lines and panic messages on stderr"),
    syscall!(SYS_write, arg_eq!(0, NOTE_FD), "the SIGSYS handler's note to the supervisor"),
    syscall!(SYS_mmap, arg_lacks!(2, libc::PROT_EXEC), "the allocator and thread stacks; never executable memory"),
    syscall!(SYS_mprotect, arg_lacks!(2, libc::PROT_EXEC), "guard pages of new thread stacks (glibc); never executable"),
    syscall!(SYS_munmap, "the allocator gives memory back; thread stacks freed"),
    syscall!(SYS_mremap, "the allocator grows large buffers in place (realloc)"),
    syscall!(SYS_madvise, "the allocator and glibc's thread exit release unused pages"),
    syscall!(SYS_brk, "the allocator's main heap"),
    syscall!(SYS_close, "dropping fds: ipc-channel's per-message fds, handed fds at exit"),
    syscall!(SYS_clone, arg_has!(0, libc::CLONE_THREAD), "starting a thread (glibc's fallback from clone3); never a new process"),
    syscall!(SYS_clone3, "glibc tries it first for a thread: a second filter answers ENOSYS, so glibc uses clone, whose flags this list can check"),
    syscall!(SYS_rseq, "glibc registers every new thread for restartable sequences"),
    syscall!(SYS_set_robust_list, "glibc's thread start: robust futex list"),
    syscall!(SYS_sigaltstack, "std's per-thread stack for the stack-overflow handler"),
    syscall!(SYS_rt_sigprocmask, "glibc blocks signals around thread start"),
    syscall!(SYS_rt_sigaction, arg_ne!(0, libc::SIGSYS), "glibc installs its internal handlers at first thread start; never for SIGSYS, so the sandbox's handler stays"),
    syscall!(SYS_rt_sigreturn, "returning from a signal handler"),
    syscall!(SYS_sched_getaffinity, "std's thread start reads the CPU set"),
    syscall!(SYS_gettid, "glibc's thread start and abort()"),
    syscall!(SYS_getpid, "abort() names its own process"),
    syscall!(SYS_tgkill, arg_eq!(2, libc::SIGABRT), "abort() after a panic (panic = abort) ends the role with SIGABRT, not a sandbox report"),
    syscall!(SYS_prctl, arg_eq!(0, libc::PR_SET_NAME), "std names each thread"),
    syscall!(SYS_restart_syscall, "a sleep or wait interrupted by a stop signal resumes"),
    syscall!(SYS_exit, "a thread ends"),
    syscall!(SYS_exit_group, "the role ends"),
];

/// Errors while entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox of {role}: {what}")]
    List { role: &'static str, what: String },
    #[error("sandbox: building the seccomp filter of {role}: {source}")]
    Compile {
        role: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("sandbox: installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("sandbox: {ROLE_IDS_ENV}={value:?} is not UID:GID")]
    Ids { value: String },
    #[error("sandbox: {what} failed: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
    #[error("sandbox: the supervisor (pid {0}) went away while the role changed its uid")]
    ParentGone(i32),
    #[error("sandbox: still able to regain uid 0 after dropping to uid {0}")]
    NotDropped(u32),
    #[error("sandbox: {0} threads run already; namespaces must be entered before the first thread starts")]
    Threads(usize),
}

fn os(what: impl Into<String>) -> SandboxError {
    SandboxError::Os {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

fn condition(args: &Args) -> Option<SeccompCondition> {
    let (arg, len, op, value) = match *args {
        Args::Any => return None,
        Args::Eq { arg, value, .. } => (arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value),
        Args::Ne { arg, value, .. } => (arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, value),
        Args::Has { arg, bits, .. } => (
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(bits),
            bits,
        ),
        Args::Lacks { arg, bits, .. } => (
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(bits),
            0,
        ),
    };
    Some(SeccompCondition::new(arg, len, op, value).expect("argument index below 6"))
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// The two BPF programs of `policy`: the allow-list (anything else traps),
/// and the one that answers clone3 with ENOSYS. Fails on a list that names
/// a syscall twice without conditions, or mixes "any" with conditions for
/// one syscall (one of the two entries would be dead).
pub fn compile(policy: &Policy) -> Result<(BpfProgram, BpfProgram), SandboxError> {
    let list_err = |what: String| SandboxError::List {
        role: policy.role,
        what,
    };
    let mut rules: BTreeMap<i64, (bool, Vec<SeccompRule>)> = BTreeMap::new();
    for s in BASE.iter().chain(policy.syscalls) {
        let (any, conds) = rules.entry(s.nr).or_default();
        match condition(&s.args) {
            None if *any || !conds.is_empty() => {
                return Err(list_err(format!("{} is listed twice", s.display_name())))
            }
            None => *any = true,
            Some(_) if *any => {
                return Err(list_err(format!(
                    "{} is allowed with any arguments and also with conditions",
                    s.display_name()
                )))
            }
            Some(c) => conds.push(SeccompRule::new(vec![c]).expect("one condition")),
        }
    }
    if !policy.ioctls.is_empty() {
        let (any, conds) = rules.entry(libc::SYS_ioctl).or_default();
        if *any {
            return Err(list_err("ioctl is allowed with any request".into()));
        }
        for (i, io) in policy.ioctls.iter().enumerate() {
            if policy.ioctls[..i].iter().any(|o| o.request == io.request) {
                return Err(list_err(format!("ioctl {} is listed twice", io.name)));
            }
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, io.request)
                .expect("argument 1");
            conds.push(SeccompRule::new(vec![c]).expect("one condition"));
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, (_, conds))| (nr, conds))
        .collect();
    let compile = |rules, mismatch, matched| -> Result<BpfProgram, SandboxError> {
        SeccompFilter::new(rules, mismatch, matched, target_arch())
            .and_then(BpfProgram::try_from)
            .map_err(|source| SandboxError::Compile {
                role: policy.role,
                source,
            })
    };
    let main = compile(rules, SeccompAction::Trap, SeccompAction::Allow)?;
    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok((main, clone3))
}

impl Syscall {
    /// `read` for `SYS_read`.
    pub fn display_name(&self) -> &'static str {
        self.name.trim_start_matches("SYS_")
    }
}

impl Args {
    fn describe(&self) -> String {
        let short = |n: &'static str| n.rsplit("::").next().unwrap_or(n).trim();
        match *self {
            Args::Any => "any".into(),
            Args::Eq { arg, value, name } => format!("arg{arg} = {} ({value})", short(name)),
            Args::Ne { arg, value, name } => format!("arg{arg} ≠ {} ({value})", short(name)),
            Args::Has { arg, bits, name } => format!("arg{arg} has {} ({bits:#x})", short(name)),
            Args::Lacks { arg, bits, name } => {
                format!("arg{arg} lacks {} ({bits:#x})", short(name))
            }
        }
    }
}

/// The Markdown table of `syscalls` and `ioctls`, as docs/security.md
/// holds it.
pub fn table(syscalls: &[Syscall], ioctls: &[Ioctl]) -> String {
    let mut out = String::from("| syscall | nr | calls allowed | why |\n|---|---|---|---|\n");
    for s in syscalls {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            s.display_name(),
            s.nr,
            s.args.describe(),
            s.why
        );
    }
    if !ioctls.is_empty() {
        out.push_str("\n| ioctl | request | why |\n|---|---|---|\n");
        for io in ioctls {
            let _ = writeln!(out, "| `{}` | {:#010x} | {} |", io.name, io.request, io.why);
        }
    }
    out
}

/// Checks that docs/security.md holds `table` between the markers
/// `<!-- syscalls:KEY begin -->` and `<!-- syscalls:KEY end -->`; with
/// `POSTCOPY_BLESS_DOCS=1` it rewrites that part instead. For the unit test
/// of each allow-list, so the document cannot drift from the code.
pub fn check_doc(doc: &std::path::Path, key: &str, table: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    let begin = format!("<!-- syscalls:{key} begin -->\n");
    let end = format!("<!-- syscalls:{key} end -->");
    let start = text
        .find(&begin)
        .ok_or(format!("{}: no {begin:?} marker", doc.display()))?
        + begin.len();
    let stop = start
        + text[start..]
            .find(&end)
            .ok_or(format!("{}: no {end:?} marker", doc.display()))?;
    if &text[start..stop] == table {
        return Ok(());
    }
    if std::env::var_os("POSTCOPY_BLESS_DOCS").is_some() {
        let new = format!("{}{table}{}", &text[..start], &text[stop..]);
        return std::fs::write(doc, new).map_err(|e| format!("{}: {e}", doc.display()));
    }
    Err(format!(
        "{} is out of date for {key}: run the test with POSTCOPY_BLESS_DOCS=1 to rewrite it; expected\n{table}",
        doc.display()
    ))
}

/// The uid and gid the supervisor asked for, if any.
fn role_ids() -> Result<Option<(u32, u32)>, SandboxError> {
    let Ok(value) = std::env::var(ROLE_IDS_ENV) else {
        return Ok(None);
    };
    let parsed = value
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    match parsed {
        Some(ids) => Ok(Some(ids)),
        None => Err(SandboxError::Ids { value }),
    }
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    name: &str,
    want: u64,
) -> Result<(), SandboxError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `cur`.
    if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
        return Err(os(format!("getrlimit({name})")));
    }
    let v = want.min(cur.rlim_max);
    let new = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: setrlimit reads one rlimit.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(os(format!("setrlimit({name}, {v})")));
    }
    Ok(())
}

/// Where the empty root is mounted, in the role's own mount namespace
/// only (any directory that exists would do; this one always does).
const EMPTY_ROOT_AT: &std::ffi::CStr = c"/tmp";

/// Moves this (single-threaded) process into a new, empty network
/// namespace and a private mount namespace, and makes an empty read-only
/// tmpfs its root. Its sockets were made in the supervisor's namespace and
/// keep working; what it could reach by name (another address, a path) is
/// gone. Needs root (CAP_SYS_ADMIN, CAP_SYS_CHROOT): Ok(false) and nothing
/// done for a role started by an unprivileged user.
fn isolate() -> Result<bool, SandboxError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    // unshare moves only the calling thread: any other thread would stay
    // behind in the supervisor's namespaces.
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|source| SandboxError::Os {
            what: "reading /proc/self/task".into(),
            source,
        })?
        .count();
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(os("unshare(CLONE_NEWNET | CLONE_NEWNS)"));
    }
    // Nothing done in here propagates back to the host, nor in.
    // SAFETY: mount with valid C strings or null pointers.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(os("making / private (mount MS_REC | MS_PRIVATE)"));
    }
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            c"postcopy-role".as_ptr(),
            EMPTY_ROOT_AT.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k,mode=0555".as_ptr().cast(),
        )
    } != 0
    {
        return Err(os(format!("mounting an empty tmpfs on {EMPTY_ROOT_AT:?}")));
    }
    // SAFETY: chdir reads one valid C string.
    if unsafe { libc::chdir(EMPTY_ROOT_AT.as_ptr()) } != 0 {
        return Err(os(format!("chdir {EMPTY_ROOT_AT:?}")));
    }
    // SAFETY: chroot reads one valid C string.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(os(format!("chroot {EMPTY_ROOT_AT:?}")));
    }
    // SAFETY: as for the first chdir.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(os("chdir / in the empty root"));
    }
    Ok(true)
}

/// Drops every privilege of uid 0 for good: supplementary groups, gid, uid
/// (real, effective, saved).
fn drop_to(uid: u32, gid: u32) -> Result<(), SandboxError> {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: setgroups with an empty list reads nothing.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(os("setgroups([])"));
    }
    // SAFETY: plain id changes of this process.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(os(format!("setresgid({gid})")));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(os(format!("setresuid({uid})")));
    }
    // The kernel clears the parent-death signal when credentials change:
    // set it again, then make sure the supervisor did not die in between.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(os("prctl(PR_SET_PDEATHSIG)"));
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(SandboxError::ParentGone(parent));
    }
    // SAFETY: setuid(0) must fail now; if it does not, the drop did not hold.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(SandboxError::NotDropped(uid));
    }
    Ok(())
}

/// Where the SIGSYS handler writes its note (-1: nowhere but stderr).
static NOTE: AtomicI32 = AtomicI32::new(-1);

/// The SIGSYS part of the kernel's siginfo (x86-64 and aarch64 layout:
/// three ints, padding, then the union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// si_code of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// Decimal digits of `n` into the end of `buf`; returns where they start.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

/// Writes all of `bytes` to `fd`, ignoring failures (nothing else can be
/// done from a signal handler).
fn write_raw(fd: RawFd, bytes: &[u8]) {
    // SAFETY: write from a valid buffer; async-signal-safe.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Dies by SIGSYS: a call no role may make traps again, and with SIGSYS
/// blocked (we are in its handler) the kernel kills the process instead.
fn die_by_sigsys() -> ! {
    // SAFETY: socket(2) with plain integer arguments; it never runs, the
    // filter traps it. Should it ever run, abort() ends the process anyway.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    std::process::abort()
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSA_SIGINFO handler a valid siginfo.
    let si = unsafe { &*info.cast::<SigsysInfo>() };
    if si.code != SYS_SECCOMP {
        // Sent by someone, not by the filter: nothing to report.
        die_by_sigsys();
    }
    let nr = si.syscall;
    let mut buf = [0u8; 20];
    let at = digits(nr.max(0) as u64, &mut buf);
    let note = NOTE.load(Ordering::Relaxed);
    if note >= 0 {
        write_raw(note, &buf[at..]);
        write_raw(note, b"\n");
    }
    write_raw(STDERR, b"sandbox: forbidden syscall ");
    write_raw(STDERR, &buf[at..]);
    write_raw(STDERR, b"\n");
    // The same call again, same arguments: the filter traps it again.
    let _ = ctx;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel hands a SA_SIGINFO handler its ucontext; after
        // a seccomp trap the registers hold the call's arguments.
        let g = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        let r = |i: libc::c_int| g[i as usize];
        // SAFETY: this call never runs (the filter traps it, and SIGSYS is
        // blocked in its own handler, so the kernel kills the process).
        unsafe {
            libc::syscall(
                libc::c_long::from(nr),
                r(libc::REG_RDI),
                r(libc::REG_RSI),
                r(libc::REG_RDX),
                r(libc::REG_R10),
                r(libc::REG_R8),
                r(libc::REG_R9),
            )
        };
    }
    die_by_sigsys()
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(os("sigaction(SIGSYS)"));
    }
    Ok(())
}

/// True if `fd` is open and a pipe (the note pipe the supervisor hands
/// over; a role started some other way may have anything there).
fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: a zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO }
}

/// Enters the sandbox of `policy`. Call once the role holds every fd it
/// will use (and has mapped what it maps) and before it reads anything from
/// the network; threads started later inherit the filter.
///
/// In order: RLIMIT_CORE 0, RLIMIT_NOFILE [`RLIMIT_NOFILE`], RLIMIT_NPROC
/// [`RLIMIT_NPROC`], RLIMIT_NICE 0 (no thread can raise its priority once
/// unprivileged, see [`crate::priority`]); as root, a new empty network namespace and a private
/// mount namespace with an empty read-only root (the role must still be
/// single-threaded); the uid/gid from [`ROLE_IDS_ENV`] (groups cleared,
/// parent-death signal re-armed); no_new_privs; a panic hook that only prints;
/// the SIGSYS handler; the filters, on every thread (TSYNC).
/// Errors name the step that failed.
pub fn enter(policy: &Policy) -> Result<(), SandboxError> {
    let (main, clone3) = compile(policy)?;
    let ids = role_ids()?;
    let trigger = std::env::var(FORBIDDEN_TEST_ENV).is_ok_and(|r| r == policy.role);
    set_limit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    set_limit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", RLIMIT_NOFILE)?;
    set_limit(libc::RLIMIT_NPROC, "RLIMIT_NPROC", RLIMIT_NPROC)?;
    set_limit(libc::RLIMIT_NICE, "RLIMIT_NICE", 0)?;
    let isolated = isolate()?;
    if let Some((uid, gid)) = ids {
        drop_to(uid, gid)?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    if is_pipe(NOTE_FD) {
        NOTE.store(NOTE_FD, Ordering::Relaxed);
    }
    // std's default panic hook looks for the working directory and files
    // before it prints: a plain message keeps a panic a panic (SIGABRT),
    // not a sandbox kill.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!("thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
    }));
    install_sigsys_handler()?;
    seccompiler::apply_filter_all_threads(&clone3).map_err(SandboxError::Install)?;
    seccompiler::apply_filter_all_threads(&main).map_err(SandboxError::Install)?;
    log::debug!(
        "sandbox on: {} syscall entries, {} ioctls{}{}",
        BASE.len() + policy.syscalls.len(),
        policy.ioctls.len(),
        if isolated {
            ", own network and mount namespaces"
        } else {
            ""
        },
        match ids {
            Some((u, g)) => format!(", uid {u} gid {g}"),
            None => String::new(),
        }
    );
    if trigger {
        log::warn!("{FORBIDDEN_TEST_ENV}: making a forbidden call on purpose");
        // SAFETY: socket(2) with integer arguments; the filter traps it.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_compiles() {
        let p = Policy {
            role: "base",
            syscalls: &[],
            ioctls: &[],
        };
        compile(&p).expect("base list compiles");
    }

    #[test]
    fn duplicates_are_refused() {
        static TWICE: &[Syscall] = &[syscall!(SYS_futex, "again")];
        let p = Policy {
            role: "twice",
            syscalls: TWICE,
            ioctls: &[],
        };
        let e = compile(&p).unwrap_err().to_string();
        assert!(e.contains("futex is listed twice"), "{e}");
        static MIXED: &[Syscall] = &[syscall!(SYS_brk, arg_eq!(0, libc::PR_SET_NAME), "x")];
        let p = Policy {
            role: "mixed",
            syscalls: MIXED,
            ioctls: &[],
        };
        let e = compile(&p).unwrap_err().to_string();
        assert!(
            e.contains("brk is allowed with any arguments and also"),
            "{e}"
        );
    }

    /// The SIGSYS handler's way to die relies on socket(2) being outside
    /// every list.
    #[test]
    fn base_forbids_socket_and_creating_processes() {
        assert!(BASE.iter().all(|s| s.nr != libc::SYS_socket));
        assert!(BASE.iter().all(|s| s.nr != libc::SYS_fork
            && s.nr != libc::SYS_vfork
            && s.nr != libc::SYS_execve));
        let clone = BASE.iter().find(|s| s.nr == libc::SYS_clone).unwrap();
        assert!(
            matches!(clone.args, Args::Has { arg: 0, bits, .. } if bits == libc::CLONE_THREAD as u64)
        );
    }

    #[test]
    fn digits_of_numbers() {
        let mut b = [0u8; 20];
        let at = digits(0, &mut b);
        assert_eq!(&b[at..], b"0");
        let at = digits(435, &mut b);
        assert_eq!(&b[at..], b"435");
        let at = digits(u64::MAX, &mut b);
        assert_eq!(&b[at..], u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn docs_hold_the_base_list() {
        let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md");
        check_doc(&doc, "base", &table(BASE, &[])).unwrap();
    }
}
