//! Checking guest memory after a migration: the `ab` rule over ranges of a
//! stopped guest's memory, and per-page digest tables compared page by page.

use std::sync::atomic::Ordering;

use common::control::VerifyResult;
use common::digest::page_digest;
use common::guest::ab_violations;
use common::mem::Mapping;
use common::types::{PAGE_SHIFT, PAGE_SIZE};

const MAX_LISTED: usize = 64;

/// The `ab` rule over each byte range of `mem`.
pub fn ab_check(mem: &Mapping, ranges: &[(u64, u64)]) -> VerifyResult {
    let bytes = mem.atomic_bytes();
    let mut result = VerifyResult {
        method: "ab".into(),
        ..Default::default()
    };
    let mut details = Vec::new();
    for &(start, end) in ranges {
        let first = start.div_ceil(PAGE_SIZE as u64);
        let last = (end >> PAGE_SHIFT).min(mem.len() as u64 >> PAGE_SHIFT);
        let check = ab_violations(
            (first..last).map(|p| (p, bytes[(p << PAGE_SHIFT) as usize].load(Ordering::Relaxed))),
        );
        result.pages_checked += check.pages_checked;
        result.mismatches += check.bad_pages.len() as u64;
        for p in check.bad_pages {
            if result.mismatch_pages.len() < MAX_LISTED {
                result.mismatch_pages.push(p);
            }
        }
        if first < last {
            let b = |p: u64| bytes[(p << PAGE_SHIFT) as usize].load(Ordering::Relaxed);
            details.push(format!(
                "{:#x}-{:#x}: first byte {} .. {}",
                start,
                end,
                b(first),
                b(last - 1)
            ));
        }
    }
    result.detail = details.join("; ");
    result
}

/// Digests of every page of `mem`.
pub fn digests(mem: &Mapping) -> Vec<u64> {
    let pages = mem.len() / PAGE_SIZE;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        mem.read(p * PAGE_SIZE, &mut buf);
        out.push(page_digest(&buf));
    }
    out
}

/// Compares the source's digests with the destination's table (one u64 per
/// page, recorded as each page was placed; 0 = never placed).
pub fn compare_digests(source: &[u64], dest: &Mapping) -> VerifyResult {
    let table = dest.atomic_words();
    let mut result = VerifyResult {
        method: "digest".into(),
        ..Default::default()
    };
    let mut never_placed = 0u64;
    for (p, &want) in source.iter().enumerate() {
        result.pages_checked += 1;
        let got = table.get(p).map(|w| w.load(Ordering::Relaxed)).unwrap_or(0);
        if got != want {
            if got == 0 {
                never_placed += 1;
            }
            result.mismatches += 1;
            if result.mismatch_pages.len() < MAX_LISTED {
                result.mismatch_pages.push(p as u64);
            }
        }
    }
    if source.len() != table.len() {
        result.detail = format!(
            "source has {} pages, destination table {}",
            source.len(),
            table.len()
        );
    } else if never_placed > 0 {
        result.detail = format!("{never_placed} pages were never placed on the destination");
    }
    result
}
