//! Writes the seed corpus (fuzz/seeds/TARGET/*): one well-formed input per
//! frame type, hello, control message, package and guest state, from the
//! project's own encoders. Run from fuzz/: `cargo run --example seeds`.

use common::control::{
    ControlMsg, DestSummary, PostcopyMode, RoleInfo, SetupAccepted, SetupRequest, VerifyMethod,
    VerifyResult,
};
use common::guest::{GuestConfig, GuestKind, Workload};
use common::types::{MemLayout, MigrationId, PAGE_SIZE};
use common::wire::{
    discard_frames, empty_frame, frame_header, mark_frame, message_frame, pages_prefix,
    fence_frame, request_frame, round_frame, zero_frame, ConnKind, FrameType, Hello, HelloReply, HelloStatus,
    Package, PROTOCOL_VERSION,
};
use guest::kvm::devices::DeviceState;
use guest::kvm::state::{VcpuState, VmState};
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn main() {
    let l = MemLayout::new(64 * PAGE_SIZE as u64).expect("layout");
    let id = MigrationId([0x42; 16]);

    // Frames: selector byte (kind = sel % 5, guest size = sel / 5 % 3),
    // then a stream. Main stream, small guest.
    let mut main = vec![1u8];
    main.extend_from_slice(&pages_prefix(l.range(3, 2).expect("range")));
    main.extend(std::iter::repeat_n(0xab, 2 * PAGE_SIZE));
    main.extend_from_slice(&zero_frame(l.range(5, 10).expect("range")));
    main.extend_from_slice(&round_frame(3));
    main.extend(discard_frames(&[
        l.range(0, 4).expect("range"),
        l.range(2, 8).expect("range"),
    ]));
    main.extend_from_slice(&mark_frame(9));
    let pkg = Package {
        listen: true,
        run: true,
        guest_state: vec![1, 2, 3],
    };
    main.extend(message_frame(FrameType::Package, &pkg, "package").expect("encodes"));
    main.extend_from_slice(&empty_frame(FrameType::Eos));
    write("frame", "main", &main);
    let mut ret = vec![2u8];
    ret.extend_from_slice(&request_frame(l.range(7, 1).expect("range")));
    ret.extend_from_slice(&empty_frame(FrameType::PostcopyDone));
    write("frame", "return-path", &ret);
    let mut urgent = vec![3u8];
    urgent.extend_from_slice(&pages_prefix(l.range(7, 1).expect("range")));
    urgent.extend(std::iter::repeat_n(0x11, PAGE_SIZE));
    write("frame", "urgent", &urgent);
    let mut control = vec![0u8];
    control.extend(message_frame(FrameType::Control, &ControlMsg::Heartbeat, "c").expect("enc"));
    write("frame", "control", &control);
    let mut bulk = vec![4u8];
    bulk.extend_from_slice(&pages_prefix(l.range(9, 1).expect("range")));
    bulk.extend(std::iter::repeat_n(0x22, PAGE_SIZE));
    bulk.extend_from_slice(&fence_frame(1));
    bulk.extend_from_slice(&empty_frame(FrameType::Eos));
    write("frame", "bulk", &bulk);
    // The main stream of a 1 TiB guest.
    let mut big = vec![1u8 + 5 * 2];
    big.extend_from_slice(&frame_header(FrameType::Zero, 16));
    big.extend_from_slice(&0u64.to_le_bytes());
    big.extend_from_slice(&1024u32.to_le_bytes());
    big.extend_from_slice(&0u32.to_le_bytes());
    write("frame", "zero-1tib", &big);

    // Hellos: a hello then a reply, so both decoders see a valid start.
    for (i, kind) in [
        ConnKind::Control,
        ConnKind::Main,
        ConnKind::ReturnPath,
        ConnKind::Urgent,
        ConnKind::Bulk(1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = Hello {
            kind,
            migration: id,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(
            &HelloReply {
                version: PROTOCOL_VERSION,
                status: HelloStatus::Ok,
            }
            .encode(),
        );
        write("hello", &format!("hello-{i}"), &b);
    }
    let refused = HelloReply {
        version: PROTOCOL_VERSION,
        status: HelloStatus::UnknownMigration,
    }
    .encode();
    write("hello", "refused", &refused);

    // Control messages, one of each.
    let setup = SetupRequest {
        migration: id,
        guest: GuestConfig {
            kind: GuestKind::Kvm,
            mem_bytes: 2 << 20,
            vcpus: 1,
            workload: Workload::BootSector,
            boot_sector: Some(vec![0x90; 512]),
        },
        page_size: PAGE_SIZE as u32,
        postcopy: PostcopyMode::Auto,
        verify: VerifyMethod::Ab,
        verify_ranges: vec![(1 << 20, 2 << 20)],
        streams: 2,
    };
    let msgs = vec![
        ControlMsg::Setup(setup),
        ControlMsg::SetupAccepted(SetupAccepted {
            postcopy_ready: true,
            uffd_features: 0x1ffff,
        }),
        ControlMsg::SetupRefused {
            reason: "no userfaultfd".into(),
        },
        ControlMsg::DestRunning {
            listen_us: 10,
            start_us: 20,
            discard_us: 30,
        },
        ControlMsg::DestMark { id: 5 },
        ControlMsg::DestCompleted(DestSummary {
            serial_log: Some("/tmp/x.serial".into()),
            ..Default::default()
        }),
        ControlMsg::SourceDigests {
            first: 0,
            digests: vec![1, u64::MAX, 77],
        },
        ControlMsg::SourceDigestsEnd,
        ControlMsg::Verified(VerifyResult {
            method: "ab".into(),
            pages_checked: 10,
            mismatches: 1,
            mismatch_pages: vec![3],
            detail: "one stale page".into(),
        }),
        ControlMsg::DestDone {
            roles: vec![RoleInfo {
                name: "fault-handler".into(),
                host: "destination".into(),
                pid: 10,
                restarts: 0,
                exit: None,
            }],
            serial_bytes: Some(3),
        },
        ControlMsg::Abort {
            reason: "cancelled".into(),
            cancelled: true,
            guest_ran: false,
        },
        ControlMsg::Finish,
        ControlMsg::Heartbeat,
    ];
    for m in &msgs {
        write(
            "control",
            m.name(),
            &rmp_serde::to_vec_named(m).expect("encodes"),
        );
    }

    write(
        "package",
        "package",
        &rmp_serde::to_vec_named(&pkg).expect("encodes"),
    );

    let mut state = VmState::new(2 << 20, DeviceState::default());
    write("guest_state", "no-vcpu", &state.encode().expect("encodes"));
    state.vcpus.push(VcpuState {
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: vec![0; 64],
        xcrs: Some(Default::default()),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![(0x10, 12345), (0x6e0, 0)],
        events: Default::default(),
        tsc_khz: Some(2_000_000),
    });
    write("guest_state", "one-vcpu", &state.encode().expect("encodes"));
    // The package's guest_state as the KVM guest carries it.
    let pkg = Package {
        listen: false,
        run: true,
        guest_state: state.encode().expect("encodes"),
    };
    write(
        "package",
        "kvm-package",
        &rmp_serde::to_vec_named(&pkg).expect("encodes"),
    );
}
