//! The hello and its reply: both decoders, and the server and client halves
//! of the exchange over a stream of the fuzzer's bytes.
#![no_main]

use common::types::MigrationId;
use common::wire::{
    client_hello, server_read_hello, ConnKind, Hello, HelloReply, HELLO_LEN, HELLO_REPLY_LEN,
};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};

/// Reads from the fuzzer's bytes, swallows what is written.
struct Peer<'a>(Cursor<&'a [u8]>);

impl Read for Peer<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = <[u8; HELLO_LEN]>::try_from(data.get(..HELLO_LEN).unwrap_or(&[])) {
        if let Ok(h) = Hello::decode(&b) {
            // Everything a hello may say is in the fields: it re-encodes
            // to the same bytes.
            assert_eq!(h.encode(), b);
        }
    }
    if let Ok(b) = <[u8; HELLO_REPLY_LEN]>::try_from(data.get(..HELLO_REPLY_LEN).unwrap_or(&[])) {
        if let Ok(r) = HelloReply::decode(&b) {
            assert_eq!(r.encode(), b);
        }
    }
    let _ = server_read_hello(&mut Peer(Cursor::new(data)));
    let _ = client_hello(
        &mut Peer(Cursor::new(data)),
        ConnKind::Main,
        MigrationId([7; 16]),
    );
});
