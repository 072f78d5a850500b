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
/// page, recorded as each page was placed; 0 = never placed). A page with a
/// digest on one side only counts as a mismatch, never as a silent pass.
pub fn compare_digests(source: &[u64], dest: &Mapping) -> VerifyResult {
    let table = dest.atomic_words();
    let mut result = VerifyResult {
        method: "digest".into(),
        ..Default::default()
    };
    let mut never_placed = 0u64;
    for p in 0..source.len().max(table.len()) {
        result.pages_checked += 1;
        let want = source.get(p).copied();
        let got = table.get(p).map(|w| w.load(Ordering::Relaxed));
        if got == Some(0) {
            never_placed += 1;
        }
        if want.is_none() || want != got {
            result.mismatches += 1;
            if result.mismatch_pages.len() < MAX_LISTED {
                result.mismatch_pages.push(p as u64);
            }
        }
    }
    if source.len() != table.len() {
        result.detail = format!(
            "the source sent digests of {} pages, the destination has {}",
            source.len(),
            table.len()
        );
    } else if never_placed > 0 {
        result.detail = format!("{never_placed} pages were never placed on the destination");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::mem::{create_memfd, Access};
    use std::os::fd::AsFd;

    fn table(values: &[u64]) -> Mapping {
        let fd = create_memfd("t", (values.len() * 8) as u64).unwrap();
        let m = Mapping::new(fd.as_fd(), values.len() * 8, Access::ReadWrite).unwrap();
        for (w, v) in m.atomic_words().iter().zip(values) {
            w.store(*v, Ordering::Relaxed);
        }
        m
    }

    #[test]
    fn digests_compare_page_by_page() {
        let t = table(&[5, 6, 0, 8]);
        let r = compare_digests(&[5, 6, 7, 8], &t);
        assert_eq!((r.pages_checked, r.mismatches), (4, 1));
        assert_eq!(r.mismatch_pages, vec![2]);
        assert!(r.detail.contains("never placed"), "{}", r.detail);
        // Too few source digests: the rest are mismatches, not passes.
        let t = table(&[5, 6, 7, 8]);
        let r = compare_digests(&[5, 6], &t);
        assert_eq!((r.pages_checked, r.mismatches), (4, 2));
        let r = compare_digests(&[], &t);
        assert_eq!(r.mismatches, 4);
    }

    #[test]
    fn ab_rule_over_ranges() {
        let fd = create_memfd("t", 8 * 4096).unwrap();
        let m = Mapping::new(fd.as_fd(), 8 * 4096, Access::ReadWrite).unwrap();
        for (i, v) in [3u8, 3, 2, 2, 9, 9, 9, 7].iter().enumerate() {
            m.write(i * 4096, &[*v]);
        }
        let r = ab_check(&m, &[(0, 4 * 4096), (4 * 4096, 8 * 4096)]);
        assert_eq!(r.pages_checked, 8);
        assert_eq!(r.mismatch_pages, vec![7]);
    }
}
