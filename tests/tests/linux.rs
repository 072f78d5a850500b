//! A real Linux guest migrated live (issue 10): the micro-VM boots the
//! kernel and initramfs of scripts/linux-guest.sh, whose /init stamps and
//! audits its own memory, and the whole pipeline moves it with precopy only
//! and with postcopy (auto and manual), over loopback and between two
//! network namespaces, with 1 and 2 vCPUs; then once more with each data
//! role killed in the middle of postcopy. Every run must complete with the
//! digest check at 0 mismatches, the guest's own verdicts `ok` on both
//! hosts (the audited count going on from where the source left it), the
//! destination's serial log growing after completion, and no kernel
//! warning in either log.
//!
//! Without /dev/kvm, without the kernel, or on a KVM too slow to boot Linux
//! (measured) every trial says "skipped: <reason>".

use libtest_mimic::Arguments;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

use guest_init::{kernel_complaints, verdicts, Verdict, RUNNING_MARKER};
use tests::{check, linux_skip_reason, num, postcopy, report, run, text, TempDir, TwoHosts};

type TestResult = Result<(), String>;

/// Per migration, boot included (a VMX/SVM host needs well under a minute).
const LIMIT: Duration = Duration::from_secs(300);

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let skip = linux_skip_reason();
    if let Some(reason) = &skip {
        eprintln!("skipped: {reason}");
    }
    let trial = |name: &'static str, f: fn() -> TestResult| tests::kvm_trial(name, f, skip.clone());
    let no_kvm = tests::kvm_skip_reason();
    let trials = vec![
        tests::plain_trial(
            "linux_bad_options_are_refused",
            linux_bad_options_are_refused,
        ),
        tests::kvm_trial(
            "interrupt_driven_guest_migrates",
            interrupt_driven_guest_migrates,
            no_kvm,
        ),
        trial("linux_migration_matrix", linux_migration_matrix),
        trial(
            "linux_role_killed_mid_postcopy",
            linux_role_killed_mid_postcopy,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Mode {
    Never,
    Auto,
    Manual,
}

#[derive(Copy, Clone, Debug)]
enum Link {
    Loopback,
    Namespaces,
}

/// The guest of every run: 256 MiB, its workload over a quarter of it.
fn guest_args(vcpus: u32, mode: Mode) -> Vec<String> {
    let mut a: Vec<String> = [
        "--guest",
        "linux",
        "--mem",
        "256M",
        "--vcpus",
        &vcpus.to_string(),
        "--cmdline",
        "console=ttyS0 loglevel=5 reboot=k panic=-1 nomodule acpi=off i8042.noaux i8042.nomux \
         i8042.dumbkbd postcopy.mem=25% postcopy.report_ms=200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mig: &[&str] = match mode {
        // A paced writer (5000 pages/s per vCPU, ~20 MB/s) lets precopy
        // converge.
        Mode::Never => &["--postcopy", "never", "--write-rate", "5000"],
        // A writer flat out against a 64 MiB/s link never converges.
        Mode::Auto => &[
            "--postcopy",
            "auto",
            "--write-rate",
            "0",
            "--max-bandwidth",
            "64M",
        ],
        Mode::Manual => &[
            "--postcopy",
            "manual",
            "--postcopy-after-syncs",
            "2",
            "--write-rate",
            "20000",
            "--max-bandwidth",
            "64M",
            "--max-postcopy-bandwidth",
            "32M",
        ],
    };
    a.extend(mig.iter().map(|s| s.to_string()));
    a
}

fn read_log(path: &Path) -> Result<String, String> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| format!("serial log {}: {e}", path.display()))
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(2500);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn last_audited(log: &str) -> Option<u64> {
    verdicts(log).into_iter().rev().find_map(|v| match v {
        Verdict::Ok { audited } => Some(audited),
        Verdict::Fail(_) => None,
    })
}

/// The guest's own account on one host: at least one verdict, all `ok`,
/// and no kernel complaint. Returns the last audited count.
fn guest_says_ok(host: &str, log: &str) -> Result<u64, String> {
    if let Some(Verdict::Fail(line)) = verdicts(log)
        .into_iter()
        .find(|v| matches!(v, Verdict::Fail(_)))
    {
        return Err(format!("{host}: the guest found a stale page: {line}"));
    }
    let complaints = kernel_complaints(log);
    check(
        complaints.is_empty(),
        format!("{host}: kernel complaints: {complaints:#?}"),
    )?;
    last_audited(log).ok_or_else(|| format!("{host}: no verdict in the serial log:\n{}", tail(log)))
}

/// Everything one completed run must show.
fn judge(
    what: &str,
    r: &Value,
    ok: bool,
    out: &str,
    mode: Mode,
    src_log: &Path,
    dst_log: &Path,
) -> TestResult {
    let fail = |e: String| format!("{what}: {e}");
    check(
        ok && text(r, "status") == "completed",
        format!("not completed: {}\n{out}", r["error"]),
    )
    .map_err(fail)?;
    check(
        text(&r["verify"], "method") == "digest"
            && r["verify"]["mismatches"].as_u64() == Some(0)
            && num(r, "verify.pages_checked").map_err(fail)? > 0,
        format!("verify: {}", r["verify"]),
    )
    .map_err(fail)?;
    check(
        (r["switched_to_postcopy"] == true) == (mode != Mode::Never),
        format!(
            "switched_to_postcopy is {} with {mode:?}",
            r["switched_to_postcopy"]
        ),
    )
    .map_err(fail)?;
    let src = read_log(src_log)?;
    check(
        src.contains(RUNNING_MARKER),
        format!(
            "the source log never shows the workload running:\n{}",
            tail(&src)
        ),
    )
    .map_err(fail)?;
    let src_audited = guest_says_ok("source", &src).map_err(fail)?;
    let dst = read_log(dst_log)?;
    let dst_audited = guest_says_ok("destination", &dst).map_err(fail)?;
    // The counters live in guest memory: the destination goes on from them
    // (a count below the source's last would be memory gone back).
    check(
        dst_audited >= src_audited,
        format!("the destination's audit ({dst_audited}) did not go on from the source's ({src_audited})"),
    )
    .map_err(fail)?;
    // Still running after completion: its log grew past what it held then.
    let at_completion = num(r, "serial_bytes_destination_at_completion").map_err(fail)?;
    check(
        dst.len() as u64 > at_completion,
        format!(
            "the destination log held {at_completion} bytes at completion and {} at the end",
            dst.len()
        ),
    )
    .map_err(fail)?;
    eprintln!(
        "  {what}: ok; guest booted in {:?} s, downtime {} ms, postcopy phase {} ms, {} \
         requests; audited {src_audited} on the source, {dst_audited} by the end",
        guest_init::boot_seconds(&src),
        r["downtime_ms"],
        r["postcopy_phase_ms"],
        r["postcopy_requests"]
    );
    Ok(())
}

/// One migration, judged; returns the source's report. `extra` goes to the
/// source (the demo hands `--chaos` on to its destination).
fn migrate(link: Link, vcpus: u32, mode: Mode, extra: &[&str]) -> Result<Value, String> {
    let what = format!(
        "{link:?}, {vcpus} vCPU(s), postcopy {mode:?} {}",
        extra.join(" ")
    );
    let dir = TempDir::new("linux");
    let (json, src_log, dst_log) = (
        dir.path("r.json"),
        dir.path("src.serial"),
        dir.path("dst.serial"),
    );
    let mut args = guest_args(vcpus, mode);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--serial-log".into());
    args.push(src_log.display().to_string());
    let (ok, out) = match link {
        Link::Loopback => {
            let out = run(
                postcopy()
                    .arg("demo")
                    .args(&args)
                    .arg("--dest-serial-log")
                    .arg(&dst_log)
                    .arg("--json")
                    .arg(&json),
                LIMIT,
            )?;
            (out.status.success(), out.describe())
        }
        Link::Namespaces => {
            let hosts = TwoHosts::new("lx")?;
            let djson = dir.path("d.json");
            let port = 7000 + (std::process::id() % 1000) as u16;
            let dst_log_s = dst_log.display().to_string();
            let (dest, addr) = hosts.incoming(port, &["--serial-log", &dst_log_s], &djson);
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(&mut hosts.migrate(&addr, &argv, &json), LIMIT)?;
            let dout = dest.finish(Duration::from_secs(60))?;
            let d = report(&djson).map_err(|e| format!("{what}: {e}\n{}", dout.describe()))?;
            check(
                dout.status.success() && text(&d, "status") == "completed",
                format!("{what}: destination: {}\n{}", d["error"], dout.describe()),
            )?;
            (out.status.success(), out.describe())
        }
    };
    let r = report(&json).map_err(|e| format!("{what}: {e}\n{out}"))?;
    judge(&what, &r, ok, &out, mode, &src_log, &dst_log)?;
    Ok(r)
}

/// Wrong Linux guest options end at the command line (exit 2) with the
/// option named; no KVM needed.
fn linux_bad_options_are_refused() -> TestResult {
    let dir = TempDir::new("linux-cli");
    let not_a_kernel = dir.path("notes.txt");
    std::fs::write(&not_a_kernel, vec![b'x'; 4096]).map_err(|e| e.to_string())?;
    let not_a_kernel = not_a_kernel.display().to_string();
    // Passes the command line's look at the header (the guest would refuse
    // it later): the options after it are what is judged.
    let fake = dir.path("fake-bzImage");
    let mut image = vec![0u8; 0x400];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&fake, image).map_err(|e| e.to_string())?;
    let fake = fake.display().to_string();
    let missing = dir.path("missing-dir").display().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--guest", "linux", "--kernel", "/nonexistent/vmlinuz"],
            vec!["--kernel /nonexistent/vmlinuz", "No such file"],
        ),
        (
            vec!["--guest", "linux", "--kernel", &not_a_kernel],
            vec!["neither a bzImage", "nor a vmlinux"],
        ),
        (
            vec!["--guest", "kvm", "--cmdline", "console=ttyS0"],
            vec!["go with --guest linux"],
        ),
        (
            vec!["--guest", "linux", "--kernel", &fake, "--mem", "64M"],
            vec!["at least 128 MiB"],
        ),
        (
            vec!["--guest", "linux", "--kernel", &fake, "--workload", "idle"],
            vec!["--workload ab (seq), random or pagecache"],
        ),
        (
            vec!["--guest", "process", "--workload", "pagecache"],
            vec!["pagecache is for --guest linux"],
        ),
        (
            vec!["--guest", "linux", "--kernel", &fake, "--verify", "ab"],
            vec!["--verify ab needs the ab workload"],
        ),
    ];
    for (args, needles) in &cases {
        let out = run(postcopy().arg("demo").args(args), Duration::from_secs(10))?;
        check(
            out.status.code() == Some(2),
            format!("{args:?} should exit 2\n{}", out.describe()),
        )?;
        for n in needles {
            check(
                out.stderr.contains(n),
                format!("{args:?}: stderr lacks {n:?}\n{}", out.describe()),
            )?;
        }
    }
    // No default kernel where it is looked for: the message says how to
    // build one.
    let out = run(
        postcopy()
            .args(["demo", "--guest", "linux"])
            .env("POSTCOPY_LINUX_GUEST_DIR", &missing),
        Duration::from_secs(10),
    )?;
    check(
        out.status.code() == Some(2) && out.stderr.contains("scripts/linux-guest.sh"),
        format!("no default kernel:\n{}", out.describe()),
    )?;
    Ok(())
}

/// What a Linux guest needs from the package, on any KVM: a boot sector
/// that lives on interrupts (guest/boot/interrupts.S: PIT ticks through the
/// PIC make the UART raise IRQ 4, each round one 'U') migrates with precopy
/// and with postcopy, and on the destination the rounds go on: the PIT,
/// PIC and UART state arrived, and the guest's pages with them.
fn interrupt_driven_guest_migrates() -> TestResult {
    let sector =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/boot/interrupts.bin");
    for mode in [
        &["--postcopy", "never"][..],
        // Its 143 busy pages take 0.6 s on a 1 MiB/s link, far over a 50 ms
        // downtime limit (which its 16 KiB state fits, as a switch needs):
        // precopy cannot complete, the first sync switches.
        &[
            "--postcopy",
            "manual",
            "--postcopy-after-syncs",
            "1",
            "--downtime-limit",
            "50",
            "--max-bandwidth",
            "1M",
        ],
    ] {
        let dir = TempDir::new("irq");
        let (json, src_log, dst_log) = (
            dir.path("r.json"),
            dir.path("src.serial"),
            dir.path("dst.serial"),
        );
        let out = run(
            postcopy()
                .args(["demo", "--guest", "kvm", "--mem", "64M", "--boot-sector"])
                .arg(&sector)
                .args(mode)
                .arg("--serial-log")
                .arg(&src_log)
                .arg("--dest-serial-log")
                .arg(&dst_log)
                .arg("--json")
                .arg(&json),
            LIMIT,
        )?;
        let r = report(&json).map_err(|e| format!("{e}\n{}", out.describe()))?;
        let what = format!("{mode:?}");
        check(
            out.status.success() && text(&r, "status") == "completed",
            format!("{what}: not completed: {}\n{}", r["error"], out.describe()),
        )?;
        check(
            r["verify"]["mismatches"].as_u64() == Some(0),
            format!("{what}: verify {}", r["verify"]),
        )?;
        check(
            (r["switched_to_postcopy"] == true) == (mode[1] == "manual"),
            format!("{what}: switched_to_postcopy {}", r["switched_to_postcopy"]),
        )?;
        for (host, path) in [("source", &src_log), ("destination", &dst_log)] {
            let log = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            check(
                !log.is_empty() && log.iter().all(|&b| b == b'U'),
                format!(
                    "{what}: the {host} log is {:?}",
                    String::from_utf8_lossy(&log)
                ),
            )?;
        }
        eprintln!(
            "  {what}: completed, downtime {} ms; {} rounds on the source, {} on the destination",
            r["downtime_ms"],
            std::fs::metadata(&src_log).map(|m| m.len()).unwrap_or(0),
            std::fs::metadata(&dst_log).map(|m| m.len()).unwrap_or(0)
        );
    }
    Ok(())
}

/// Done-when 1: every mode, both links, 1 and 2 vCPUs, and the workload's
/// three modes spread over them (postcopy auto with `ab`/seq, which never
/// converges when flat out), six boots in all.
fn linux_migration_matrix() -> TestResult {
    for (link, vcpus, mode, workload) in [
        (Link::Loopback, 1, Mode::Never, "random"),
        (Link::Loopback, 2, Mode::Auto, "ab"),
        (Link::Loopback, 1, Mode::Manual, "pagecache"),
        (Link::Namespaces, 2, Mode::Never, "pagecache"),
        (Link::Namespaces, 1, Mode::Auto, "ab"),
        (Link::Namespaces, 2, Mode::Manual, "random"),
    ] {
        migrate(link, vcpus, mode, &["--workload", workload])?;
    }
    Ok(())
}

/// Done-when 2: each data role killed (SIGKILL) 150 ms into postcopy; the
/// migration goes on with a fresh one and the guest never notices.
fn linux_role_killed_mid_postcopy() -> TestResult {
    for role in ["ram-sender", "page-server", "fault-handler"] {
        let spec = format!("{role}@postcopy+150ms");
        let r = migrate(Link::Loopback, 1, Mode::Manual, &["--chaos", &spec])?;
        let restarts: u64 = r["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["name"] == role)
            .filter_map(|x| x["restarts"].as_u64())
            .sum();
        check(
            restarts >= 1,
            format!("{spec}: no restart of {role} counted: {}", r["roles"]),
        )?;
    }
    Ok(())
}
