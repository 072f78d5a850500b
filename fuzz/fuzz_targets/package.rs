//! The device-state package, as the fault-handler reads it off the main
//! stream: a PACKAGE frame header in front of the fuzzer's bytes.
#![no_main]

use common::types::MemLayout;
use common::wire::{
    decode_message, frame_header, ConnKind, Frame, FrameReader, FrameType, Package,
};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_message::<Package>(data, "device-state package") {
        assert!(p.guest_state.len() <= data.len());
    }
    let mut framed = frame_header(FrameType::Package, data.len() as u32).to_vec();
    framed.extend_from_slice(data);
    let layout = MemLayout::new(1 << 20).expect("valid");
    let mut r = FrameReader::new(Cursor::new(framed), ConnKind::Main, layout);
    if let Ok(f) = r.next_frame() {
        assert!(matches!(f, Frame::Package(_)));
    }
});
