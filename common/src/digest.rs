//! Per-page digests for the `digest` verification: the source digests its
//! frozen pages, the destination digests each page as it is placed, and the two
//! tables are compared. A 64-bit multiply-rotate hash over four lanes: not
//! cryptographic, fast enough to run on every placed page.

use crate::types::PAGE_SIZE;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;

/// Digest of one page (exactly [`PAGE_SIZE`] bytes).
pub fn page_digest(page: &[u8]) -> u64 {
    assert_eq!(page.len(), PAGE_SIZE, "digest of a partial page");
    let mut lanes = [P1, P2, P3, P1 ^ P2];
    for chunk in page.chunks_exact(32) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().expect("8"));
            *lane = (*lane ^ w.wrapping_mul(P2))
                .rotate_left(31)
                .wrapping_mul(P1);
        }
    }
    let mut h = lanes[0].rotate_left(1)
        ^ lanes[1].rotate_left(7)
        ^ lanes[2].rotate_left(12)
        ^ lanes[3].rotate_left(18);
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    // 0 means "no digest recorded" in the tables; never produce it.
    if h == 0 {
        1
    } else {
        h
    }
}

/// Digest of an all-zero page.
pub fn zero_page_digest() -> u64 {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    page_digest(&ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_pages_apart() {
        let mut a = vec![0u8; PAGE_SIZE];
        let z = page_digest(&a);
        assert_eq!(z, zero_page_digest());
        a[0] = 1;
        let d1 = page_digest(&a);
        a[0] = 2;
        let d2 = page_digest(&a);
        a[0] = 1;
        a[4095] = 1;
        let d3 = page_digest(&a);
        assert!(z != d1 && d1 != d2 && d1 != d3 && d2 != d3);
        assert_ne!(z, 0);
    }
}
