//! The TLS record layer the roles run themselves (`common::tls`): the
//! reader on the fuzzer's raw bytes (headers, lengths, content types,
//! records that do not open), and a round trip: the fuzzer's chunks sealed
//! by the writer, one byte of the sealed stream optionally flipped, read
//! back. Unflipped, exactly the chunks come out; flipped, the reader must
//! fail, never hand back other bytes than were sealed.
#![no_main]

use common::tls::Session;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use std::io::{Cursor, Read, Write};

#[derive(Serialize)]
struct Keys {
    seq: u64,
    key: [u8; 32],
    iv: [u8; 12],
}

#[derive(Serialize)]
struct Sess {
    suite: u16,
    tx: Keys,
    rx: Keys,
}

/// A session whose two directions share keys, so what it writes it reads.
/// `chacha`: TLS13_CHACHA20_POLY1305_SHA256, else TLS13_AES_256_GCM_SHA384.
fn session(chacha: bool) -> Session {
    let k = || Keys {
        seq: 0,
        key: [0x42; 32],
        iv: [0x24; 12],
    };
    let s = Sess {
        suite: if chacha { 0x1303 } else { 0x1302 },
        tx: k(),
        rx: k(),
    };
    rmp_serde::from_slice(&rmp_serde::to_vec_named(&s).expect("encode")).expect("a session")
}

/// Reads everything `r` gives until the end or an error; the bytes read
/// and whether it ended cleanly.
fn drain(r: &mut impl Read) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let s = session(mode & 1 == 1);
    if mode & 2 == 0 {
        // Raw bytes as a peer's records: anything but a panic is fine.
        let mut r = s.reader(Cursor::new(rest)).expect("reader");
        let _ = drain(&mut r);
        return;
    }
    // Round trip: chunks of the input (lengths from the mode byte's high
    // bits), sealed, maybe one byte flipped, opened.
    let chunk = 1 + usize::from(mode >> 2) * 97;
    let mut sealed = Vec::new();
    {
        let mut w = s.writer(&mut sealed).expect("writer");
        for c in rest.chunks(chunk) {
            w.write_all(c).expect("seal");
        }
        w.flush().expect("flush");
    }
    let flip = rest.len().checked_sub(1).map(|_| rest[0] as usize);
    if let Some(at) = flip.filter(|&at| at < sealed.len() && mode & 0x80 != 0) {
        sealed[at] ^= 0x01;
        let mut r = s.reader(Cursor::new(&sealed[..])).expect("reader");
        let (out, clean) = drain(&mut r);
        // A flipped byte is either caught, or (if it fell in what was
        // already read) nothing after it is handed out as if sealed.
        assert!(!clean || out != rest, "a tampered stream read back whole");
        assert!(
            rest.starts_with(&out),
            "the reader handed out bytes that were never sealed"
        );
    } else {
        let mut r = s.reader(Cursor::new(&sealed[..])).expect("reader");
        let (out, clean) = drain(&mut r);
        assert!(clean, "a clean stream failed to open");
        assert_eq!(out, rest, "the round trip changed the bytes");
    }
});
