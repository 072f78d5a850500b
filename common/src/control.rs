//! Control messages between the two supervisors (MessagePack in CONTROL frames
//! on the control connection). See docs/protocol.md for the order they come in.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::io::Read;

use crate::guest::{
    GuestConfig, GuestKind, Workload, KVM_MAX_MEM, KVM_MIN_MEM, LINUX_MIN_MEM, LINUX_SPEC_MAX_TEXT,
};
use crate::msg::{PostcopyStats, RecvProgress};
use crate::peer_text::escape_in_place;
use crate::types::{MemLayout, MigrationId, PAGE_SIZE};
use crate::wire::{decode_message, Frame, FrameReader, WireError, MAX_STREAMS};

/// Most digests one [`ControlMsg::SourceDigests`] carries (8 MiB of them).
pub const DIGESTS_PER_MESSAGE: usize = 1 << 20;
/// Most verify ranges a [`SetupRequest`] may carry: the built-in guests need
/// one per vCPU at most.
pub const MAX_VERIFY_RANGES: usize = 1024;
/// Most vCPUs a guest may declare.
pub const MAX_VCPUS: u32 = 64;
/// Length of a KVM boot sector.
pub const BOOT_SECTOR_LEN: usize = 512;
/// Most processes a [`ControlMsg::DestDone`] may list.
pub const MAX_ROLES: usize = 64;
/// Most mismatching pages a [`VerifyResult`] lists.
pub const MAX_MISMATCH_PAGES: usize = 64;

/// When to switch from precopy to postcopy.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostcopyMode {
    /// Precopy only, however long it takes.
    Never,
    /// Switch when precopy will not converge within the downtime limit.
    Auto,
    /// Switch on `postcopy start-postcopy` (or after N dirty syncs).
    Manual,
}

impl fmt::Display for PostcopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PostcopyMode::Never => "never",
            PostcopyMode::Auto => "auto",
            PostcopyMode::Manual => "manual",
        })
    }
}

/// How the destination's memory is checked after the migration.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyMethod {
    None,
    Ab,
    Digest,
}

impl fmt::Display for VerifyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyMethod::None => "none",
            VerifyMethod::Ab => "ab",
            VerifyMethod::Digest => "digest",
        })
    }
}

/// Source → destination: what is coming.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetupRequest {
    pub migration: MigrationId,
    pub guest: GuestConfig,
    pub page_size: u32,
    pub postcopy: PostcopyMode,
    pub verify: VerifyMethod,
    /// Byte ranges the `ab` rule is checked over (at most
    /// [`MAX_VERIFY_RANGES`]).
    #[serde(deserialize_with = "bounded::<_, _, MAX_VERIFY_RANGES>")]
    pub verify_ranges: Vec<(u64, u64)>,
    /// Bulk streams, the main stream included (1..=[`MAX_STREAMS`]): the
    /// source opens `streams - 1` bulk-stream connections beside the main
    /// stream.
    pub streams: u32,
}

/// Why a [`SetupRequest`] cannot be served; each names the wrong value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    #[error("page size {0} is not supported (only {PAGE_SIZE})")]
    PageSize(u32),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0} vCPUs is outside 1..={MAX_VCPUS}")]
    Vcpus(u32),
    #[error("a KVM guest needs {KVM_MIN_MEM}..={KVM_MAX_MEM} bytes of memory, not {0}")]
    KvmMemory(u64),
    #[error("a {kind} guest cannot run the {workload} workload")]
    Workload {
        kind: GuestKind,
        workload: &'static str,
    },
    #[error("a boot sector goes only with a KVM guest running the boot-sector workload (this is a {kind} guest running {workload})")]
    BootSectorNotAllowed {
        kind: GuestKind,
        workload: &'static str,
    },
    #[error("a boot sector is exactly {BOOT_SECTOR_LEN} bytes, not {0}")]
    BootSectorLen(usize),
    #[error("the boot-sector workload needs a boot sector")]
    NoBootSector,
    #[error("random workload: {0}")]
    Random(String),
    #[error("a Linux guest spec carries a path or command line of {0} bytes, more than the {LINUX_SPEC_MAX_TEXT} allowed")]
    LinuxText(usize),
    #[error("a Linux guest needs at least {LINUX_MIN_MEM} bytes of memory, not {0}")]
    LinuxMemory(u64),
    #[error("{0} verify ranges, more than the {MAX_VERIFY_RANGES} allowed")]
    TooManyVerifyRanges(usize),
    #[error("verify range {0:#x}-{1:#x} does not fit guest memory of {2:#x} bytes")]
    VerifyRange(u64, u64, u64),
    #[error("{0} bulk streams is outside 1..={MAX_STREAMS}")]
    Streams(u32),
}

impl SetupRequest {
    /// Checks every field against the guest kind and the limits of this
    /// build, before the destination spends anything on the request.
    pub fn check(&self) -> Result<(), SetupError> {
        if self.page_size as usize != PAGE_SIZE {
            return Err(SetupError::PageSize(self.page_size));
        }
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return Err(SetupError::Streams(self.streams));
        }
        let g = &self.guest;
        MemLayout::new(g.mem_bytes).map_err(|e| SetupError::Memory(e.to_string()))?;
        if !(1..=MAX_VCPUS).contains(&g.vcpus) {
            return Err(SetupError::Vcpus(g.vcpus));
        }
        let workload = g.workload.name();
        match (g.kind, &g.workload) {
            (GuestKind::Kvm, Workload::Ab | Workload::BootSector) => {}
            (GuestKind::Kvm, Workload::Linux(spec)) => {
                let longest = [spec.kernel.len(), spec.cmdline.len()]
                    .into_iter()
                    .chain(spec.initrd.as_ref().map(String::len))
                    .max()
                    .unwrap_or(0);
                if longest > LINUX_SPEC_MAX_TEXT {
                    return Err(SetupError::LinuxText(longest));
                }
                if g.mem_bytes < LINUX_MIN_MEM {
                    return Err(SetupError::LinuxMemory(g.mem_bytes));
                }
            }
            (GuestKind::Process, Workload::Ab | Workload::Idle | Workload::Random(_)) => {}
            (kind, _) => return Err(SetupError::Workload { kind, workload }),
        }
        if g.kind == GuestKind::Kvm && !(KVM_MIN_MEM..=KVM_MAX_MEM).contains(&g.mem_bytes) {
            return Err(SetupError::KvmMemory(g.mem_bytes));
        }
        match (&g.boot_sector, &g.workload) {
            (Some(b), Workload::BootSector) if b.len() != BOOT_SECTOR_LEN => {
                return Err(SetupError::BootSectorLen(b.len()))
            }
            (Some(_), Workload::BootSector) => {}
            (Some(_), _) => {
                return Err(SetupError::BootSectorNotAllowed {
                    kind: g.kind,
                    workload,
                })
            }
            (None, Workload::BootSector) => return Err(SetupError::NoBootSector),
            (None, _) => {}
        }
        if let Workload::Random(r) = &g.workload {
            let pages = g.mem_bytes / PAGE_SIZE as u64;
            if r.hot_percent > 100 {
                return Err(SetupError::Random(format!(
                    "hot percent {} is more than 100",
                    r.hot_percent
                )));
            }
            if r.hot_pages > pages {
                return Err(SetupError::Random(format!(
                    "{} hot pages in a guest of {pages} pages",
                    r.hot_pages
                )));
            }
        }
        if self.verify_ranges.len() > MAX_VERIFY_RANGES {
            return Err(SetupError::TooManyVerifyRanges(self.verify_ranges.len()));
        }
        for &(a, b) in &self.verify_ranges {
            if a >= b || b > g.mem_bytes {
                return Err(SetupError::VerifyRange(a, b, g.mem_bytes));
            }
        }
        Ok(())
    }
}

/// Destination → source: ready for pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetupAccepted {
    /// The destination checked its userfaultfd and can take postcopy.
    pub postcopy_ready: bool,
    pub uffd_features: u64,
}

/// How a process ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// One process of the migration, for the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoleInfo {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub restarts: u32,
    pub exit: Option<ExitStatus>,
}

/// Result of the memory check.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyResult {
    pub method: String,
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first mismatching pages (at most [`MAX_MISMATCH_PAGES`]).
    #[serde(deserialize_with = "bounded::<_, _, MAX_MISMATCH_PAGES>")]
    pub mismatch_pages: Vec<u64>,
    pub detail: String,
}

/// Destination → source: every page is in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestSummary {
    pub recv: RecvProgress,
    pub postcopy: Option<PostcopyStats>,
    pub serial_log: Option<String>,
    pub serial_bytes: u64,
}

/// Supervisor ↔ supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlMsg {
    Setup(SetupRequest),
    SetupAccepted(SetupAccepted),
    SetupRefused {
        reason: String,
    },
    /// Destination → source: its guest runs. `listen_us` and `start_us` are
    /// the destination's share of the switchover.
    DestRunning {
        listen_us: u64,
        start_us: u64,
        /// Time the destination spent dropping the final discard set.
        discard_us: u64,
    },
    /// Destination → source: everything before MARK `id` on the main
    /// stream has been processed.
    DestMark {
        id: u64,
    },
    /// Destination → source: every page is in place.
    DestCompleted(DestSummary),
    /// Source → destination: digests of the source's frozen pages.
    SourceDigests {
        first: u64,
        /// At most [`DIGESTS_PER_MESSAGE`].
        #[serde(deserialize_with = "bounded::<_, _, DIGESTS_PER_MESSAGE>")]
        digests: Vec<u64>,
    },
    SourceDigestsEnd,
    /// Destination → source: the memory check.
    Verified(VerifyResult),
    /// Destination → source, last: its processes and how much its guest
    /// wrote to the serial log, for the report.
    DestDone {
        #[serde(deserialize_with = "bounded::<_, _, MAX_ROLES>")]
        roles: Vec<RoleInfo>,
        serial_bytes: Option<u64>,
    },
    /// Either way: the migration ends without completing.
    Abort {
        reason: String,
        cancelled: bool,
        /// From the destination: whether its guest ever ran. If it never
        /// did, the source may resume its own even after the package.
        guest_ran: bool,
    },
    /// Source → destination: the source has everything; exit.
    Finish,
    /// Either way, every second: "still here". A peer that stays silent
    /// for the link timeout is lost, even if its kernel keeps TCP alive.
    Heartbeat,
    /// Either side: a data role died or a data connection broke; replace
    /// every data connection and data role (epoch `epoch`, counting from 1).
    /// docs/state-machine.md, "Restart and recovery".
    Resync {
        epoch: u32,
        reason: String,
    },
    /// Destination → source: ready for the data connections of `epoch`.
    /// `package`: the package arrived whole, so `received` (the bitmap of
    /// pages the destination has, as from `SharedBitmap::to_bytes`) is
    /// what postcopy resumes from. Without it the destination guest never
    /// ran, and precopy starts over.
    ResyncReady {
        epoch: u32,
        package: bool,
        #[serde(with = "serde_bytes")]
        received: Vec<u8>,
    },
}

impl ControlMsg {
    pub fn name(&self) -> &'static str {
        match self {
            ControlMsg::Setup(_) => "Setup",
            ControlMsg::SetupAccepted(_) => "SetupAccepted",
            ControlMsg::SetupRefused { .. } => "SetupRefused",
            ControlMsg::DestRunning { .. } => "DestRunning",
            ControlMsg::DestMark { .. } => "DestMark",
            ControlMsg::DestCompleted(_) => "DestCompleted",
            ControlMsg::SourceDigests { .. } => "SourceDigests",
            ControlMsg::SourceDigestsEnd => "SourceDigestsEnd",
            ControlMsg::Verified(_) => "Verified",
            ControlMsg::DestDone { .. } => "DestDone",
            ControlMsg::Abort { .. } => "Abort",
            ControlMsg::Finish => "Finish",
            ControlMsg::Heartbeat => "Heartbeat",
            ControlMsg::Resync { .. } => "Resync",
            ControlMsg::ResyncReady { .. } => "ResyncReady",
        }
    }
}

/// The variants in declaration order: serde also accepts a variant by its
/// index, so the size check must know both.
const VARIANTS: [&str; 15] = [
    "Setup",
    "SetupAccepted",
    "SetupRefused",
    "DestRunning",
    "DestMark",
    "DestCompleted",
    "SourceDigests",
    "SourceDigestsEnd",
    "Verified",
    "DestDone",
    "Abort",
    "Finish",
    "Heartbeat",
    "Resync",
    "ResyncReady",
];

/// Largest `received` bitmap a `ResyncReady` carries, bytes (a guest of up
/// to 512 GiB; larger guests cannot resync).
pub const MAX_RESYNC_BITMAP: usize = (16 << 20) - (64 << 10);

/// Largest encoded size of each control message this build accepts, checked
/// before any of it is decoded: enough for what an honest peer sends (the
/// limits on lists above, the longest text an error carries), nothing like
/// the frame limit.
pub fn max_encoded_len(variant: &str) -> Option<usize> {
    const SMALL: usize = 1 << 10;
    const TEXT: usize = 64 << 10;
    Some(match variant {
        "SourceDigestsEnd" | "Finish" | "Heartbeat" => 64,
        "SetupAccepted" | "DestRunning" | "DestMark" => SMALL,
        // Boot sector, verify ranges (≤ 1024 × 19 bytes), small fields.
        "Setup" => TEXT,
        "SetupRefused" | "Abort" | "DestCompleted" | "Verified" | "DestDone" | "Resync" => TEXT,
        // A bitmap of every page (1 bit each) and the envelope: up to the
        // control frame's own limit, guests up to 512 GiB.
        "ResyncReady" => MAX_RESYNC_BITMAP + SMALL,
        // Up to 9 bytes per digest plus the envelope.
        "SourceDigests" => DIGESTS_PER_MESSAGE * 9 + SMALL,
        _ => return None,
    })
}

/// Reads which variant a MessagePack-encoded `ControlMsg` is, from its first
/// bytes only: a map of one entry keyed by the variant (name or index), or
/// the bare variant for those without data.
fn peek_variant(payload: &[u8]) -> Result<&'static str, WireError> {
    let bad = |detail: String| WireError::Decode {
        what: "control message",
        detail,
    };
    let mut rd = payload;
    let mut take = |n: usize| -> Result<&[u8], WireError> {
        if rd.len() < n {
            return Err(bad("message ends inside its variant name".into()));
        }
        let (a, b) = rd.split_at(n);
        rd = b;
        Ok(a)
    };
    let be = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    // MessagePack markers: 0x8N map of N entries, 0xa0+N string of N bytes,
    // 0xd9 string with a 1-byte length, 0x00..=0x7f a small integer,
    // 0xcc..=0xcf unsigned integers of 1, 2, 4, 8 bytes.
    let mut marker = take(1)?[0];
    if marker == 0x81 {
        marker = take(1)?[0];
    } else if matches!(marker, 0x80..=0x8f | 0xde | 0xdf) {
        return Err(bad(
            "not a control message (a map of other than one entry)".into()
        ));
    }
    let name = match marker {
        0xa0..=0xbf => take(usize::from(marker & 0x1f))?,
        0xd9 => {
            let n = usize::from(take(1)?[0]);
            take(n)?
        }
        0x00..=0x7f => return index(u64::from(marker)),
        0xcc => return index(be(take(1)?)),
        0xcd => return index(be(take(2)?)),
        0xce => return index(be(take(4)?)),
        0xcf => return index(be(take(8)?)),
        m => return Err(bad(format!("not a control message (starts with {m:#04x})"))),
    };
    VARIANTS
        .iter()
        .find(|v| v.as_bytes() == name)
        .copied()
        .ok_or_else(|| {
            bad(format!(
                "unknown control message {:?}",
                crate::peer_text::escape(&String::from_utf8_lossy(name))
            ))
        })
}

fn index(i: u64) -> Result<&'static str, WireError> {
    VARIANTS
        .get(i as usize)
        .copied()
        .ok_or_else(|| WireError::Decode {
            what: "control message",
            detail: format!("unknown control message number {i}"),
        })
}

/// Deserializes a list, refusing it once it holds more than `MAX` items, so
/// a list of tiny encodings cannot grow into a large allocation.
fn bounded<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for V<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX {
                return Err(serde::de::Error::custom(format!(
                    "a list of {hint} items, more than the {MAX} allowed"
                )));
            }
            let mut out = Vec::with_capacity(hint.min(MAX));
            while let Some(x) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::custom(format!(
                        "a list of more than the {MAX} items allowed"
                    )));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V::<T, MAX>(std::marker::PhantomData))
}

impl ControlMsg {
    /// Decodes one control message from a CONTROL payload: its size is
    /// checked against the limit for its variant before anything else is
    /// decoded, lists are bounded while they are read, and every piece of
    /// text in it is escaped (see [`crate::peer_text`]) before the caller
    /// can show it.
    pub fn decode(payload: &[u8]) -> Result<ControlMsg, WireError> {
        let variant = peek_variant(payload)?;
        let max = max_encoded_len(variant).expect("every variant has a limit");
        if payload.len() > max {
            return Err(WireError::MessageTooLarge {
                what: variant,
                len: payload.len(),
                max,
            });
        }
        let mut msg: ControlMsg = decode_message(payload, "control message")?;
        msg.escape_text();
        Ok(msg)
    }

    /// Escapes every string a peer could have put in this message.
    fn escape_text(&mut self) {
        match self {
            ControlMsg::SetupRefused { reason } | ControlMsg::Abort { reason, .. } => {
                escape_in_place(reason)
            }
            ControlMsg::Verified(v) => {
                escape_in_place(&mut v.method);
                escape_in_place(&mut v.detail);
            }
            ControlMsg::DestCompleted(s) => {
                if let Some(p) = s.serial_log.as_mut() {
                    escape_in_place(p);
                }
            }
            ControlMsg::DestDone { roles, .. } => {
                for r in roles {
                    escape_in_place(&mut r.name);
                    escape_in_place(&mut r.host);
                }
            }
            ControlMsg::Resync { reason, .. } => escape_in_place(reason),
            ControlMsg::Setup(s) => {
                if let Workload::Linux(spec) = &mut s.guest.workload {
                    escape_in_place(&mut spec.kernel);
                    escape_in_place(&mut spec.cmdline);
                    if let Some(i) = spec.initrd.as_mut() {
                        escape_in_place(i);
                    }
                }
            }
            ControlMsg::ResyncReady { .. }
            | ControlMsg::SetupAccepted(_)
            | ControlMsg::DestRunning { .. }
            | ControlMsg::DestMark { .. }
            | ControlMsg::SourceDigests { .. }
            | ControlMsg::SourceDigestsEnd
            | ControlMsg::Finish
            | ControlMsg::Heartbeat => {}
        }
    }
}

/// Reads one control message off the control connection (see
/// [`ControlMsg::decode`]).
pub fn recv_control<R: Read>(r: &mut FrameReader<R>) -> Result<ControlMsg, WireError> {
    match r.next_frame()? {
        Frame::Control(p) => ControlMsg::decode(p),
        other => unreachable!("control connection yielded {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::RandomParams;
    use crate::wire::message_frame;
    use crate::wire::FrameType;
    use std::time::Instant;

    fn setup() -> SetupRequest {
        SetupRequest {
            migration: MigrationId([1; 16]),
            guest: GuestConfig {
                kind: GuestKind::Process,
                mem_bytes: 16 << 20,
                vcpus: 2,
                workload: Workload::Ab,
                boot_sector: None,
            },
            page_size: PAGE_SIZE as u32,
            postcopy: PostcopyMode::Auto,
            verify: VerifyMethod::Ab,
            verify_ranges: vec![(0, 8 << 20), (8 << 20, 16 << 20)],
            streams: 1,
        }
    }

    fn encode(msg: &ControlMsg) -> Vec<u8> {
        rmp_serde::to_vec_named(msg).unwrap()
    }

    #[test]
    fn every_variant_is_named_and_decodes() {
        let msgs = vec![
            ControlMsg::Setup(setup()),
            ControlMsg::SetupAccepted(SetupAccepted {
                postcopy_ready: true,
                uffd_features: 3,
            }),
            ControlMsg::SetupRefused {
                reason: "no".into(),
            },
            ControlMsg::DestRunning {
                listen_us: 1,
                start_us: 2,
                discard_us: 3,
            },
            ControlMsg::DestMark { id: 4 },
            ControlMsg::DestCompleted(DestSummary::default()),
            ControlMsg::SourceDigests {
                first: 0,
                digests: vec![u64::MAX; 1000],
            },
            ControlMsg::SourceDigestsEnd,
            ControlMsg::Verified(VerifyResult::default()),
            ControlMsg::DestDone {
                roles: vec![],
                serial_bytes: None,
            },
            ControlMsg::Abort {
                reason: "x".into(),
                cancelled: false,
                guest_ran: false,
            },
            ControlMsg::Finish,
            ControlMsg::Heartbeat,
            ControlMsg::Resync {
                epoch: 1,
                reason: "a role died".into(),
            },
            ControlMsg::ResyncReady {
                epoch: 1,
                package: true,
                received: vec![0xff; 1 << 20],
            },
        ];
        assert_eq!(msgs.len(), VARIANTS.len());
        for (i, m) in msgs.iter().enumerate() {
            let p = encode(m);
            assert_eq!(peek_variant(&p).unwrap(), m.name());
            assert_eq!(VARIANTS[i], m.name(), "VARIANTS is in declaration order");
            assert_eq!(ControlMsg::decode(&p).unwrap().name(), m.name());
        }
        // A variant given by its index (serde accepts that too) is sized
        // as that variant.
        assert_eq!(peek_variant(&[0x0c]).unwrap(), "Heartbeat");
        assert_eq!(ControlMsg::decode(&[0x0c]).unwrap().name(), "Heartbeat");
        assert_eq!(peek_variant(&[0x81, 0x06, 0x90]).unwrap(), "SourceDigests");
    }

    #[test]
    fn oversized_messages_are_refused_before_decoding() {
        // 64 MiB of 1-byte integers as digests: refused by its size alone,
        // in far less time than decoding would take.
        let mut p = vec![0x81, 0xad];
        p.extend_from_slice(b"SourceDigests");
        p.extend_from_slice(&[0x92, 0x00, 0xdd]);
        let n: u32 = 64 << 20;
        p.extend_from_slice(&n.to_be_bytes());
        p.resize(p.len() + n as usize, 0x01);
        let t = Instant::now();
        let err = ControlMsg::decode(&p).unwrap_err();
        assert!(t.elapsed().as_millis() < 500, "{:?}", t.elapsed());
        assert!(
            matches!(
                err,
                WireError::MessageTooLarge {
                    what: "SourceDigests",
                    ..
                }
            ),
            "{err}"
        );
        // A heartbeat padded to 1 KiB.
        let mut p = encode(&ControlMsg::Heartbeat);
        p.resize(1024, 0xc0);
        let err = ControlMsg::decode(&p).unwrap_err();
        assert!(
            err.to_string().contains("Heartbeat message of 1024 bytes"),
            "{err}"
        );
        // A setup with a 60 MiB boot sector never reaches the decoder.
        let mut s = setup();
        s.guest.boot_sector = Some(vec![0; 60 << 20]);
        let err = ControlMsg::decode(&encode(&ControlMsg::Setup(s))).unwrap_err();
        assert!(
            matches!(err, WireError::MessageTooLarge { what: "Setup", .. }),
            "{err}"
        );
    }

    #[test]
    fn lists_are_bounded_while_decoding() {
        // Within the size limit, but more digests than one message carries:
        // 1-byte integers, each of which would grow to 8 bytes.
        let digests = vec![1u64; DIGESTS_PER_MESSAGE + 1];
        let p = encode(&ControlMsg::SourceDigests { first: 0, digests });
        assert!(p.len() <= max_encoded_len("SourceDigests").unwrap());
        let err = ControlMsg::decode(&p).unwrap_err();
        assert!(err.to_string().contains("more than the 1048576"), "{err}");
        // Verify ranges: 2000 tiny ones fit in the Setup size limit but
        // not in the count.
        let mut s = setup();
        s.verify_ranges = vec![(0, 1); MAX_VERIFY_RANGES + 1];
        let err = ControlMsg::decode(&encode(&ControlMsg::Setup(s))).unwrap_err();
        assert!(err.to_string().contains("1024"), "{err}");
    }

    #[test]
    fn peer_text_is_escaped_on_decode() {
        let m = ControlMsg::Abort {
            reason: "bad\n[INFO] migration completed\x1b[2J".into(),
            cancelled: false,
            guest_ran: false,
        };
        match ControlMsg::decode(&encode(&m)).unwrap() {
            ControlMsg::Abort { reason, .. } => {
                assert_eq!(reason, "bad\\n[INFO] migration completed\\u{1b}[2J")
            }
            other => panic!("{other:?}"),
        }
        let err = ControlMsg::decode(&rmp_serde::to_vec("\x1b]0;pwned\x07").unwrap()).unwrap_err();
        assert!(!err.to_string().chars().any(|c| c.is_control()), "{err}");
    }

    #[test]
    fn setup_fields_are_checked_against_the_guest_kind() {
        assert_eq!(setup().check(), Ok(()));
        let with = |f: &dyn Fn(&mut SetupRequest)| {
            let mut s = setup();
            f(&mut s);
            s.check().unwrap_err()
        };
        assert_eq!(
            with(&|s| s.guest.boot_sector = Some(vec![0; 60 << 20])),
            SetupError::BootSectorNotAllowed {
                kind: GuestKind::Process,
                workload: "ab"
            }
        );
        let kvm = |s: &mut SetupRequest| {
            s.guest.kind = GuestKind::Kvm;
            s.guest.workload = Workload::BootSector;
            s.verify_ranges.clear();
        };
        assert_eq!(
            with(&|s| {
                kvm(s);
                s.guest.boot_sector = Some(vec![0; 513]);
            }),
            SetupError::BootSectorLen(513)
        );
        assert_eq!(with(&|s| kvm(s)), SetupError::NoBootSector);
        let mut ok = setup();
        kvm(&mut ok);
        ok.guest.boot_sector = Some(vec![0; 512]);
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            with(&|s| {
                kvm(s);
                s.guest.boot_sector = Some(vec![0; 512]);
                s.guest.mem_bytes = 64 << 30;
            }),
            SetupError::KvmMemory(64 << 30)
        );
        assert_eq!(
            with(&|s| s.guest.workload = Workload::BootSector),
            SetupError::Workload {
                kind: GuestKind::Process,
                workload: "boot-sector"
            }
        );
        assert_eq!(with(&|s| s.guest.vcpus = 0), SetupError::Vcpus(0));
        assert_eq!(with(&|s| s.page_size = 65536), SetupError::PageSize(65536));
        assert!(matches!(
            with(&|s| s.guest.mem_bytes = 2 << 40),
            SetupError::Memory(_)
        ));
        assert_eq!(
            with(&|s| s.verify_ranges = vec![(0, 1); MAX_VERIFY_RANGES + 1]),
            SetupError::TooManyVerifyRanges(MAX_VERIFY_RANGES + 1)
        );
        assert_eq!(
            with(&|s| s.verify_ranges = vec![(0, 32 << 20)]),
            SetupError::VerifyRange(0, 32 << 20, 16 << 20)
        );
        assert!(matches!(
            with(&|s| s.guest.workload = Workload::Random(RandomParams {
                hot_pages: 1 << 40,
                hot_percent: 50,
                write_rate: 0,
                seed: 1
            })),
            SetupError::Random(_)
        ));
        let linux = |s: &mut SetupRequest| {
            s.guest.kind = GuestKind::Kvm;
            s.guest.mem_bytes = 256 << 20;
            s.guest.workload = Workload::Linux(crate::guest::LinuxSpec {
                kernel: "/boot/vmlinuz".into(),
                initrd: Some("/boot/initrd".into()),
                cmdline: "console=ttyS0".into(),
            });
        };
        let mut ok = setup();
        linux(&mut ok);
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            with(&|s| {
                linux(s);
                s.guest.kind = GuestKind::Process;
            }),
            SetupError::Workload {
                kind: GuestKind::Process,
                workload: "linux"
            }
        );
        assert_eq!(
            with(&|s| {
                linux(s);
                s.guest.mem_bytes = 64 << 20;
            }),
            SetupError::LinuxMemory(64 << 20)
        );
        assert_eq!(
            with(&|s| {
                linux(s);
                if let Workload::Linux(l) = &mut s.guest.workload {
                    l.cmdline = "x".repeat(LINUX_SPEC_MAX_TEXT + 1);
                }
            }),
            SetupError::LinuxText(LINUX_SPEC_MAX_TEXT + 1)
        );
        let _ = message_frame(FrameType::Control, &ControlMsg::Setup(setup()), "setup").unwrap();
    }
}
