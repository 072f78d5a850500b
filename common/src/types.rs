//! Units that carry meaning: page indices, guest offsets, migration ids and the
//! memory layout that bounds them. A page index or range from the wire can only
//! be built through [`MemLayout`], which checks it against guest memory.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The one page size this project migrates with.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Index of a 4 KiB page of guest memory, checked against the layout it came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageIndex(u64);

impl PageIndex {
    /// The raw index.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Byte offset of this page inside guest memory.
    pub fn offset(self) -> GuestAddr {
        GuestAddr(self.0 << PAGE_SHIFT)
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A run of consecutive pages, `count` ≥ 1, wholly inside guest memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    first: PageIndex,
    count: u32,
}

impl PageRange {
    pub fn first(self) -> PageIndex {
        self.first
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// One past the last page.
    pub fn end(self) -> u64 {
        self.first.0 + u64::from(self.count)
    }

    pub fn pages(self) -> impl Iterator<Item = PageIndex> {
        (self.first.0..self.end()).map(PageIndex)
    }

    pub fn byte_len(self) -> u64 {
        u64::from(self.count) << PAGE_SHIFT
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 1 {
            write!(f, "page {}", self.first.0)
        } else {
            write!(f, "pages {}..{}", self.first.0, self.end())
        }
    }
}

/// Offset of a byte inside guest memory (for a KVM guest, its physical address).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GuestAddr(pub u64);

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A virtual address inside the guest process, where it mapped guest memory.
/// userfaultfd and pagemap ioctls take these: they act on the guest's address
/// space, whichever process issues them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAddr(pub u64);

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// Identifies one migration on every connection and in every log line.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// A fresh random id (from the kernel's random pool).
    pub fn random() -> std::io::Result<Self> {
        let mut id = [0u8; 16];
        let mut filled = 0;
        while filled < id.len() {
            // SAFETY: getrandom writes at most `len - filled` bytes into the
            // unfilled tail of `id`, which is valid writable memory.
            let n =
                unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            filled += n as usize;
        }
        Ok(MigrationId(id))
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

/// A page index or range that does not fit the guest memory it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("pages {first}..{first}+{count} run past the end of guest memory ({pages} pages)")]
    RangeOutOfBounds { first: u64, count: u32, pages: u64 },
    #[error("empty page range at page {first}")]
    EmptyRange { first: u64 },
}

/// Size and page size of guest memory: the bounds every page index is checked against.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemLayout {
    mem_bytes: u64,
}

/// Why a memory size cannot be migrated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("memory size {0} bytes is not a multiple of the 4096-byte page size")]
    NotPageAligned(u64),
    #[error("memory size must be at least one page, got {0} bytes")]
    TooSmall(u64),
    #[error("memory size {0} bytes is larger than the supported maximum of 1 TiB")]
    TooLarge(u64),
}

impl MemLayout {
    pub const MAX_BYTES: u64 = 1 << 40;

    pub fn new(mem_bytes: u64) -> Result<Self, LayoutError> {
        if mem_bytes < PAGE_SIZE as u64 {
            return Err(LayoutError::TooSmall(mem_bytes));
        }
        if !mem_bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(LayoutError::NotPageAligned(mem_bytes));
        }
        if mem_bytes > Self::MAX_BYTES {
            return Err(LayoutError::TooLarge(mem_bytes));
        }
        Ok(MemLayout { mem_bytes })
    }

    pub fn mem_bytes(self) -> u64 {
        self.mem_bytes
    }

    pub fn page_size(self) -> usize {
        PAGE_SIZE
    }

    pub fn pages(self) -> u64 {
        self.mem_bytes >> PAGE_SHIFT
    }

    /// Checks a raw page index (from the wire, or from a fault address).
    pub fn page(self, raw: u64) -> Result<PageIndex, RangeError> {
        if raw < self.pages() {
            Ok(PageIndex(raw))
        } else {
            Err(RangeError::PageOutOfRange {
                page: raw,
                pages: self.pages(),
            })
        }
    }

    /// Checks a raw page run (from the wire).
    pub fn range(self, first: u64, count: u32) -> Result<PageRange, RangeError> {
        if count == 0 {
            return Err(RangeError::EmptyRange { first });
        }
        match first.checked_add(u64::from(count)) {
            Some(end) if end <= self.pages() => Ok(PageRange {
                first: PageIndex(first),
                count,
            }),
            _ => Err(RangeError::RangeOutOfBounds {
                first,
                count,
                pages: self.pages(),
            }),
        }
    }

    /// Every page of guest memory.
    pub fn all_pages(self) -> impl Iterator<Item = PageIndex> {
        (0..self.pages()).map(PageIndex)
    }
}

/// Parses a size like `256M`, `1G`, `4096`, `64K`, `0x1000` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|e| format!("bad hex size {text:?}: {e}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let value: u64 = digits.parse().map_err(|_| {
        format!("bad size {text:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "bad size {text:?}: unknown suffix {other:?} (use K, M, G or T)"
            ))
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} overflows 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks_pages_and_ranges() {
        let l = MemLayout::new(16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(l.pages(), 16);
        assert!(l.page(15).is_ok());
        assert_eq!(
            l.page(16),
            Err(RangeError::PageOutOfRange {
                page: 16,
                pages: 16
            })
        );
        assert!(l.range(0, 16).is_ok());
        assert!(l.range(15, 2).is_err());
        assert!(l.range(u64::MAX, 2).is_err());
        assert!(l.range(3, 0).is_err());
        let r = l.range(4, 3).unwrap();
        assert_eq!(
            r.pages().map(PageIndex::get).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        assert_eq!(r.to_string(), "pages 4..7");
    }

    #[test]
    fn layout_rejects_bad_sizes() {
        assert!(MemLayout::new(0).is_err());
        assert!(MemLayout::new(4097).is_err());
        assert!(MemLayout::new(2 << 40).is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0x100000").unwrap(), 0x100000);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn migration_ids_differ() {
        let a = MigrationId::random().unwrap();
        let b = MigrationId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
    }
}
