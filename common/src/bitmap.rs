//! Page bitmaps. [`SharedBitmap`] lives in a memfd the supervisor holds, so a
//! role that dies loses none of it: the source's `sent` set and the
//! destination's `received` set. [`Bitmap`] is a private one (a dirty set, the
//! requests in flight).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::mem::{create_memfd, Access, Mapping, MemError};

const MAGIC: u64 = u64::from_le_bytes(*b"PCBITMAP");
const HEADER_WORDS: usize = 8;
const H_MAGIC: usize = 0;
const H_BITS: usize = 1;
const H_HINT: usize = 2;
const H_COUNT: usize = 3;

fn words_for(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

/// Errors opening a shared bitmap handed over by the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("shared bitmap has bad magic {0:#x}")]
    BadMagic(u64),
    #[error("shared bitmap holds {actual} bits, expected {expected}")]
    WrongSize { actual: u64, expected: u64 },
}

/// A bitmap in shared memory with a small header: the bit count, a running
/// count of set bits, and a hint word roles use to talk about a position
/// (the page-server posts the last requested page for the ram-sender).
pub struct SharedBitmap {
    map: Mapping,
    bits: u64,
}

impl SharedBitmap {
    /// Creates a new, all-clear bitmap in a fresh memfd (supervisor side).
    pub fn create(name: &str, bits: u64) -> Result<(SharedBitmap, OwnedFd), BitmapError> {
        let len = (HEADER_WORDS + words_for(bits)) * 8;
        let fd = create_memfd(name, len as u64)?;
        let map = Mapping::new(fd.as_fd(), len, Access::ReadWrite)?;
        let w = map.atomic_words();
        w[H_BITS].store(bits, Ordering::Relaxed);
        w[H_MAGIC].store(MAGIC, Ordering::Release);
        Ok((SharedBitmap { map, bits }, fd))
    }

    /// Maps a bitmap created by the supervisor (role side).
    pub fn open(fd: BorrowedFd<'_>, bits: u64) -> Result<SharedBitmap, BitmapError> {
        let len = (HEADER_WORDS + words_for(bits)) * 8;
        let map = Mapping::new(fd, len, Access::ReadWrite)?;
        let w = map.atomic_words();
        let magic = w[H_MAGIC].load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(BitmapError::BadMagic(magic));
        }
        let actual = w[H_BITS].load(Ordering::Relaxed);
        if actual != bits {
            return Err(BitmapError::WrongSize {
                actual,
                expected: bits,
            });
        }
        Ok(SharedBitmap { map, bits })
    }

    fn words(&self) -> &[AtomicU64] {
        &self.map.atomic_words()[HEADER_WORDS..HEADER_WORDS + words_for(self.bits)]
    }

    fn header(&self, i: usize) -> &AtomicU64 {
        &self.map.atomic_words()[i]
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn locate(&self, bit: u64) -> (&AtomicU64, u64) {
        assert!(
            bit < self.bits,
            "bit {bit} outside a bitmap of {}",
            self.bits
        );
        (&self.words()[(bit / 64) as usize], 1u64 << (bit % 64))
    }

    pub fn get(&self, bit: u64) -> bool {
        let (w, m) = self.locate(bit);
        w.load(Ordering::Acquire) & m != 0
    }

    /// Sets a bit; true if this call set it (it was clear). The one call
    /// that wins a race is the one that owns the page.
    pub fn test_and_set(&self, bit: u64) -> bool {
        let (w, m) = self.locate(bit);
        let won = w.fetch_or(m, Ordering::AcqRel) & m == 0;
        if won {
            self.header(H_COUNT).fetch_add(1, Ordering::AcqRel);
        }
        won
    }

    /// Clears a bit; true if it was set.
    pub fn clear(&self, bit: u64) -> bool {
        let (w, m) = self.locate(bit);
        let was = w.fetch_and(!m, Ordering::AcqRel) & m != 0;
        if was {
            self.header(H_COUNT).fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    /// Clears the bits of `mask` in word `word` (bits `64*word ..`) at once;
    /// returns which of them were set.
    pub fn clear_word_bits(&self, word: usize, mask: u64) -> u64 {
        let was = self.words()[word].fetch_and(!mask, Ordering::AcqRel) & mask;
        if was != 0 {
            self.header(H_COUNT)
                .fetch_sub(u64::from(was.count_ones()), Ordering::AcqRel);
        }
        was
    }

    /// Number of set bits, as kept by the running count.
    pub fn count(&self) -> u64 {
        self.header(H_COUNT).load(Ordering::Acquire)
    }

    /// True when every bit is set.
    pub fn is_full(&self) -> bool {
        self.count() >= self.bits
    }

    /// First clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.scan(from, true)
    }

    /// First set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, false)
    }

    fn scan(&self, from: u64, want_clear: bool) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let words = self.words();
        let mut wi = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while wi < words.len() {
            let mut v = words[wi].load(Ordering::Acquire);
            if want_clear {
                v = !v;
            }
            v &= mask;
            if v != 0 {
                let bit = wi as u64 * 64 + u64::from(v.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            wi += 1;
            mask = !0;
        }
        None
    }

    /// The bits as little-endian bytes (bit `i` is bit `i % 8` of byte
    /// `i / 8`), `ceil(len / 8)` of them: what a resync sends.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self
            .words()
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        out.truncate(self.bits.div_ceil(8) as usize);
        out
    }

    /// Replaces every bit with `bytes` (as from [`Self::to_bytes`]) and
    /// recounts. Only while no role uses the bitmap (the supervisor,
    /// between two roles). Errors when `bytes` does not hold exactly
    /// `ceil(len / 8)` bytes or sets bits past the end.
    pub fn overwrite(&self, bytes: &[u8]) -> Result<(), BitmapError> {
        let want = self.bits.div_ceil(8);
        if bytes.len() as u64 != want
            || (!self.bits.is_multiple_of(8) && bytes[bytes.len() - 1] >> (self.bits % 8) != 0)
        {
            return Err(BitmapError::WrongSize {
                actual: bytes.len() as u64 * 8,
                expected: self.bits,
            });
        }
        let mut count = 0u64;
        for (i, w) in self.words().iter().enumerate() {
            let mut le = [0u8; 8];
            let start = i * 8;
            let end = (start + 8).min(bytes.len());
            le[..end - start].copy_from_slice(&bytes[start..end]);
            let v = u64::from_le_bytes(le);
            count += u64::from(v.count_ones());
            w.store(v, Ordering::Release);
        }
        self.header(H_COUNT).store(count, Ordering::Release);
        Ok(())
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.words() {
            w.store(0, Ordering::Release);
        }
        self.header(H_COUNT).store(0, Ordering::Release);
    }

    /// The hint word (0 = no hint).
    pub fn hint(&self) -> u64 {
        self.header(H_HINT).load(Ordering::Acquire)
    }

    pub fn set_hint(&self, value: u64) {
        self.header(H_HINT).store(value, Ordering::Release)
    }
}

/// A plain, private bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; words_for(bits)],
            bits,
        }
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn get(&self, bit: u64) -> bool {
        assert!(bit < self.bits);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Sets a bit; true if it was clear.
    pub fn set(&mut self, bit: u64) -> bool {
        assert!(
            bit < self.bits,
            "bit {bit} outside a bitmap of {}",
            self.bits
        );
        let w = &mut self.words[(bit / 64) as usize];
        let m = 1u64 << (bit % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        was_clear
    }

    /// Clears a bit; true if it was set.
    pub fn clear(&mut self, bit: u64) -> bool {
        assert!(bit < self.bits);
        let w = &mut self.words[(bit / 64) as usize];
        let m = 1u64 << (bit % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        was_set
    }

    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first + count;
        assert!(
            end <= self.bits,
            "bits {first}..{end} outside a bitmap of {}",
            self.bits
        );
        let mut b = first;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi == 64 {
                !0u64 << lo
            } else {
                ((1u64 << hi) - 1) & (!0u64 << lo)
            };
            self.words[w] |= mask;
            b = b - lo + hi;
        }
    }

    /// The bits, 64 to a word (bit i of word w is bit 64*w + i).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets the bits of `mask` in word `word`.
    pub fn set_word_bits(&mut self, word: usize, mask: u64) {
        self.words[word] |= mask;
    }

    pub fn set_all(&mut self) {
        for w in &mut self.words {
            *w = !0;
        }
        let tail = self.bits % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of set bits as `(first, count)`, each at most `max_run` long.
    pub fn runs(&self, max_run: u64) -> Runs<'_> {
        Runs {
            map: self,
            pos: 0,
            max_run,
        }
    }

    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut v = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if v != 0 {
                let bit = wi as u64 * 64 + u64::from(v.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            v = self.words[wi];
        }
    }
}

/// Iterator over runs of set bits.
pub struct Runs<'a> {
    map: &'a Bitmap,
    pos: u64,
    max_run: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.map.next_set(self.pos)?;
        let mut end = first + 1;
        while end < self.map.bits && end - first < self.max_run && self.map.get(end) {
            end += 1;
        }
        self.pos = end;
        Some((first, end - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bitmap_counts_and_scans() {
        let (b, fd) = SharedBitmap::create("t", 130).unwrap();
        assert!(b.test_and_set(0));
        assert!(!b.test_and_set(0));
        assert!(b.test_and_set(129));
        assert!(b.test_and_set(64));
        assert_eq!(b.count(), 3);
        assert_eq!(b.next_set(1), Some(64));
        assert_eq!(b.next_set(65), Some(129));
        assert_eq!(b.next_clear(0), Some(1));
        assert!(b.clear(64));
        assert!(!b.clear(64));
        assert_eq!(b.count(), 2);
        // A second mapping (another role) sees the same bits.
        let other = SharedBitmap::open(fd.as_fd(), 130).unwrap();
        assert!(other.get(129));
        assert!(!other.get(64));
        other.set_hint(77);
        assert_eq!(b.hint(), 77);
        assert!(matches!(
            SharedBitmap::open(fd.as_fd(), 131),
            Err(BitmapError::WrongSize { .. })
        ));
        // Word-wise clearing reports what was set and keeps the count.
        assert_eq!(b.clear_word_bits(2, 0b11), 0b10);
        assert_eq!(b.count(), 1);
        assert!(b.test_and_set(129));
        for i in 0..130 {
            b.test_and_set(i);
        }
        assert!(b.is_full());
        assert_eq!(b.next_clear(0), None);
    }

    #[test]
    fn local_bitmap_runs() {
        let mut b = Bitmap::new(200);
        b.set_range(3, 5);
        b.set(64);
        b.set(65);
        b.set(199);
        let runs: Vec<_> = b.runs(3).collect();
        assert_eq!(runs, vec![(3, 3), (6, 2), (64, 2), (199, 1)]);
        assert_eq!(b.count(), 8);
        let mut r = Bitmap::new(300);
        r.set_range(5, 200);
        assert_eq!(r.count(), 200);
        assert_eq!(r.runs(1000).collect::<Vec<_>>(), vec![(5, 200)]);
        r.set_range(64, 64);
        r.set_range(299, 1);
        assert_eq!(r.count(), 201);
        b.set_all();
        assert_eq!(b.count(), 200);
        assert_eq!(b.runs(1000).collect::<Vec<_>>(), vec![(0, 200)]);
        b.clear_all();
        assert_eq!(b.runs(10).next(), None);
    }

    #[test]
    fn shared_bytes_round_trip_and_refuse_bad_input() {
        let (a, _fd) = SharedBitmap::create("t-a", 70).unwrap();
        for b in [0, 5, 63, 64, 69] {
            a.test_and_set(b);
        }
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), 9);
        let (b, _fd2) = SharedBitmap::create("t-b", 70).unwrap();
        b.overwrite(&bytes).unwrap();
        assert_eq!(b.count(), 5);
        assert!(b.get(69) && b.get(64) && !b.get(1));
        // A bit past the end, or the wrong length, is refused.
        let mut bad = bytes.clone();
        bad[8] |= 0x80;
        assert!(b.overwrite(&bad).is_err());
        assert!(b.overwrite(&bytes[..8]).is_err());
        b.clear_all();
        assert_eq!(b.count(), 0);
        assert!(!b.get(69));
    }
}
