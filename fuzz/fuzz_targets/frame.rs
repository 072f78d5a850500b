//! The frame reader, on every connection kind and a few guest sizes: no
//! panic, and every frame it returns holds what the reader promises (ranges
//! inside guest memory, within the per-frame caps, DISCARD ranges merged).
#![no_main]

use common::types::{MemLayout, PAGE_SIZE};
use common::wire::{ConnKind, Frame, FrameReader, MAX_PAGES_PER_REQUEST, MAX_PAGES_PER_ZERO};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let conn = [
        ConnKind::Control,
        ConnKind::Main,
        ConnKind::ReturnPath,
        ConnKind::Urgent,
        ConnKind::Bulk(1),
    ][usize::from(sel % 5)];
    let mem = [64 * PAGE_SIZE as u64, 1 << 30, 1 << 40][usize::from((sel / 5) % 3)];
    let layout = MemLayout::new(mem).expect("valid size");
    let mut r = FrameReader::new(Cursor::new(rest), conn, layout);
    while let Ok(f) = r.next_frame() {
        match f {
            Frame::Pages { range, data } => {
                assert!(range.end() <= layout.pages());
                assert_eq!(data.len(), range.count() as usize * PAGE_SIZE);
            }
            Frame::Zero { range } => {
                assert!(range.end() <= layout.pages());
                assert!(range.count() <= MAX_PAGES_PER_ZERO);
            }
            Frame::Request { range } => assert!(range.count() <= MAX_PAGES_PER_REQUEST),
            Frame::PageTimes { page, .. } => assert!(page.get() < layout.pages()),
            Frame::Discard { ranges } => {
                let total: u64 = ranges.iter().map(|r| u64::from(r.count())).sum();
                assert!(total <= layout.pages());
                for w in ranges.windows(2) {
                    assert!(w[0].end() <= w[1].first().get(), "sorted and disjoint");
                }
            }
            Frame::Control(p) => {
                let _ = common::control::ControlMsg::decode(p);
            }
            _ => {}
        }
    }
});
