//! The bench's scenarios: guest, memory, workload, link and migration
//! settings, and whether QEMU runs the same scenario beside ours. `--quick`
//! picks a set that runs in a few minutes; the full set covers the issue's
//! sizes (256 MiB, 1 GiB, 4 GiB, 8 GiB with `--with-8g`) and links.

use serde::Serialize;

use super::link::LinkKind;

/// The comparison guest: a boot sector that zeroes, then increments
/// forever, the first byte of every page of [1 MiB, 513 MiB) (the test
/// fixture `tests/fixtures/boot/ab-fixed.bin`: it takes no parameters from
/// its loader, so QEMU's SeaBIOS and our VMM run it alike).
pub const SECTOR: &[u8; 512] = include_bytes!("../../../tests/fixtures/boot/ab-fixed.bin");
/// What the sector dirties, as `--verify-range` and QEMU's memory check
/// take it.
pub const SECTOR_RANGE: (u64, u64) = (0x10_0000, 0x2010_0000);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guest {
    /// The KVM micro-VM running [`SECTOR`] (QEMU runs it too).
    KvmSector,
    /// The process guest.
    Process { workload: &'static str, vcpus: u32 },
}

/// Migration settings, in the CLI's terms.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Settings {
    /// `auto`, `never` or `manual`.
    pub postcopy: &'static str,
    /// manual: switch after this many dirty syncs (QEMU: start postcopy
    /// once `dirty-sync-count` reaches it).
    pub after_syncs: Option<u32>,
    pub downtime_limit_ms: u64,
    /// Precopy cap, bytes/s, 0 = none.
    pub max_bandwidth: u64,
    /// Postcopy push cap, bytes/s, 0 = none.
    pub max_postcopy_bandwidth: u64,
    /// `--prefetch-pages`: the page-server's read-ahead (ours only).
    pub prefetch_pages: u32,
    /// `--streams`: bulk streams, the main stream included (ours only).
    pub streams: u32,
}

/// The settings of the side-by-side table (and of the QEMU anchor):
/// precopy capped at 128 MiB/s, postcopy after the 2nd dirty sync,
/// downtime limit 1 ms, no postcopy cap.
pub const AS_QEMU_ANCHOR: Settings = Settings {
    postcopy: "manual",
    after_syncs: Some(2),
    downtime_limit_ms: 1,
    max_bandwidth: 128 << 20,
    max_postcopy_bandwidth: 0,
    prefetch_pages: common::msg::PREFETCH_PAGES,
    streams: 1,
};

/// Postcopy for certain, after the 2nd dirty sync, no caps: the push then
/// runs flat out while the guest faults (the load scenarios; the tiny ones
/// of the bench's own test).
pub const ALWAYS_POSTCOPY: Settings = Settings {
    postcopy: "manual",
    after_syncs: Some(2),
    downtime_limit_ms: 1,
    max_bandwidth: 0,
    max_postcopy_bandwidth: 0,
    prefetch_pages: common::msg::PREFETCH_PAGES,
    streams: 1,
};

/// Precopy only, no caps.
pub const PRECOPY_ONLY: Settings = Settings {
    postcopy: "never",
    after_syncs: None,
    downtime_limit_ms: 300,
    max_bandwidth: 0,
    max_postcopy_bandwidth: 0,
    prefetch_pages: common::msg::PREFETCH_PAGES,
    streams: 1,
};

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    /// What it is there to measure.
    pub about: &'static str,
    pub guest: Guest,
    pub mem_bytes: u64,
    pub link: LinkKind,
    pub settings: Settings,
    /// QEMU runs it too (alternating with ours) when installed.
    pub with_qemu: bool,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn kvm(name: &'static str, link: LinkKind, about: &'static str) -> Scenario {
    Scenario {
        name,
        about,
        guest: Guest::KvmSector,
        mem_bytes: GIB,
        link,
        settings: AS_QEMU_ANCHOR,
        with_qemu: true,
    }
}

fn load(name: &'static str, mem_bytes: u64, about: &'static str) -> Scenario {
    Scenario {
        name,
        about,
        guest: Guest::Process {
            workload: "ab",
            vcpus: 2,
        },
        mem_bytes,
        link: LinkKind::Loopback,
        settings: ALWAYS_POSTCOPY,
        with_qemu: false,
    }
}

fn precopy(name: &'static str, mem_bytes: u64, link: LinkKind) -> Scenario {
    Scenario {
        name,
        about: "precopy throughput against raw TCP on the same link (an idle guest, every page sent once)",
        guest: Guest::Process {
            workload: "idle",
            vcpus: 1,
        },
        mem_bytes,
        link,
        settings: PRECOPY_ONLY,
        with_qemu: false,
    }
}

/// Every scenario the bench knows, in the order it runs them.
pub fn all() -> Vec<Scenario> {
    vec![
        kvm(
            "kvm-loopback",
            LinkKind::Loopback,
            "side by side with QEMU: pause, postcopy phase, blocktime, requests, CPU",
        ),
        Scenario {
            settings: Settings {
                prefetch_pages: 16,
                ..AS_QEMU_ANCHOR
            },
            with_qemu: false,
            ..kvm(
                "kvm-loopback-read-ahead",
                LinkKind::Loopback,
                "kvm-loopback with 16 pages of read-ahead (--prefetch-pages 16): what it costs or gains",
            )
        },
        kvm(
            "kvm-veth",
            LinkKind::Veth,
            "side by side with QEMU on a 1 Gbit/s link; postcopy phase against line rate",
        ),
        kvm(
            "kvm-relay",
            LinkKind::Relay,
            "side by side with QEMU on 1 Gbit/s with 1 ms round trip",
        ),
        load(
            "load-256M",
            256 * MIB,
            "scale: cost linear in size, pause flat; fault latency while the push saturates loopback",
        ),
        load(
            "load-1G",
            GIB,
            "fault latency while the push saturates loopback (the issue's target); scale",
        ),
        load("load-4G", 4 * GIB, "scale: cost linear in size, pause flat"),
        load("load-8G", 8 * GIB, "scale: cost linear in size, pause flat"),
        precopy("precopy-loopback", GIB, LinkKind::Loopback),
        Scenario {
            name: "precopy-loopback-2-streams",
            about: "precopy-loopback with two bulk streams (--streams 2): what a second stream is worth on this machine",
            settings: Settings {
                streams: 2,
                ..PRECOPY_ONLY
            },
            ..precopy("precopy-loopback", GIB, LinkKind::Loopback)
        },
        Scenario {
            name: "load-1G-2-streams",
            about: "load-1G with two bulk streams (--streams 2), in precopy and after the switch",
            settings: Settings {
                streams: 2,
                ..ALWAYS_POSTCOPY
            },
            ..load("load-1G", GIB, "")
        },
        precopy("precopy-veth", GIB, LinkKind::Veth),
        precopy("precopy-veth-256M", 256 * MIB, LinkKind::Veth),
        Scenario {
            name: "tiny",
            about: "a few seconds of postcopy on loopback (the bench's own test)",
            guest: Guest::Process {
                workload: "ab",
                vcpus: 1,
            },
            mem_bytes: 32 * MIB,
            link: LinkKind::Loopback,
            settings: ALWAYS_POSTCOPY,
            with_qemu: false,
        },
        Scenario {
            name: "tiny-relay",
            about: "a few seconds of postcopy through the shaped link and the relay (the bench's own test)",
            guest: Guest::Process {
                workload: "ab",
                vcpus: 1,
            },
            mem_bytes: 32 * MIB,
            link: LinkKind::Relay,
            settings: ALWAYS_POSTCOPY,
            with_qemu: false,
        },
    ]
}

/// The scenarios of a run: those named, or the quick or full set.
pub fn select(names: &[String], quick: bool, with_8g: bool) -> Result<Vec<Scenario>, String> {
    let all = all();
    if !names.is_empty() {
        return names
            .iter()
            .map(|n| {
                all.iter().find(|s| s.name == n).cloned().ok_or_else(|| {
                    format!(
                        "--scenario {n:?}: no such scenario (known: {})",
                        all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect();
    }
    let set: &[&str] = if quick {
        &["kvm-loopback", "load-256M", "precopy-veth-256M"]
    } else {
        &[
            "kvm-loopback",
            "kvm-loopback-read-ahead",
            "kvm-veth",
            "kvm-relay",
            "load-256M",
            "load-1G",
            "load-4G",
            "load-8G",
            "precopy-loopback",
            "precopy-loopback-2-streams",
            "load-1G-2-streams",
            "precopy-veth",
        ]
    };
    Ok(all
        .into_iter()
        .filter(|s| set.contains(&s.name))
        .filter(|s| with_8g || s.name != "load-8G")
        .collect())
}

impl Scenario {
    /// `postcopy migrate` options for this scenario (the boot sector at
    /// `sector` for the KVM guest).
    pub fn migrate_args(&self, sector: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> = vec![];
        let mut push = |x: &str| a.push(x.to_string());
        match self.guest {
            Guest::KvmSector => {
                push("--guest");
                push("kvm");
                push("--boot-sector");
                push(&sector.display().to_string());
                push("--verify");
                push("ab");
                push("--verify-range");
                push(&format!("{:#x}-{:#x}", SECTOR_RANGE.0, SECTOR_RANGE.1));
            }
            Guest::Process { workload, vcpus } => {
                push("--guest");
                push("process");
                push("--workload");
                push(workload);
                push("--vcpus");
                push(&vcpus.to_string());
            }
        }
        push("--mem");
        push(&self.mem_bytes.to_string());
        let s = self.settings;
        push("--postcopy");
        push(s.postcopy);
        if let Some(n) = s.after_syncs {
            push("--postcopy-after-syncs");
            push(&n.to_string());
        }
        push("--downtime-limit");
        push(&s.downtime_limit_ms.to_string());
        push("--max-bandwidth");
        push(&s.max_bandwidth.to_string());
        push("--max-postcopy-bandwidth");
        push(&s.max_postcopy_bandwidth.to_string());
        push("--prefetch-pages");
        push(&s.prefetch_pages.to_string());
        push("--streams");
        push(&s.streams.to_string());
        a
    }

    /// One line saying what runs.
    pub fn describe(&self) -> String {
        let guest = match self.guest {
            Guest::KvmSector => {
                "KVM guest running the ab boot sector (512 MiB dirtied)".to_string()
            }
            Guest::Process { workload, vcpus } => {
                format!("process guest, {workload}, {vcpus} worker(s)")
            }
        };
        let s = self.settings;
        let cap = |b: u64| {
            if b == 0 {
                "none".to_string()
            } else {
                format!("{} MiB/s", b >> 20)
            }
        };
        format!(
            "{guest}, {} MiB, {}; postcopy {}{}, downtime limit {} ms, precopy cap {}, postcopy cap {}, read-ahead {} pages, {} bulk stream(s)",
            self.mem_bytes >> 20,
            self.link.name(),
            s.postcopy,
            s.after_syncs
                .map(|n| format!(" after {n} dirty syncs"))
                .unwrap_or_default(),
            s.downtime_limit_ms,
            cap(s.max_bandwidth),
            cap(s.max_postcopy_bandwidth),
            s.prefetch_pages,
            s.streams
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sector_is_a_boot_sector() {
        assert_eq!(&SECTOR[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn sets_and_names() {
        let quick = select(&[], true, false).unwrap();
        assert!(quick.iter().any(|s| s.with_qemu));
        let full = select(&[], false, false).unwrap();
        assert!(full.iter().all(|s| s.name != "load-8G"));
        assert!(select(&[], false, true)
            .unwrap()
            .iter()
            .any(|s| s.name == "load-8G"));
        let e = select(&["nope".into()], false, false).unwrap_err();
        assert!(e.contains("nope") && e.contains("tiny"), "{e}");
    }
}
