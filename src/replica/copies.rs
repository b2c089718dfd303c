//! The records a commit read back and verified, kept in memory for the apply that follows.
//!
//! `commit_durable` reads every staged record back once and checks its crc before the
//! commit record is written; the apply used to read and check every record a second time.
//! It now writes the copy the commit made: the same bytes, checked by the same crc. Only
//! what did not fit in [`COPIES_MAX`] is read again.
//!
//! Why the copies cannot go stale: they are taken by `commit_durable` and used by the apply
//! of the same group; in between the store refuses to stage (`pending_apply`), so nothing
//! is appended, compacted or reset, and the records stay where they were read. They are
//! dropped when the staged index is cleared, and taken anew by each commit.

use std::collections::HashMap;

/// Bytes of record payloads kept between a commit and its apply (a group of 4,096 4 KiB
/// chunks; a larger group reads the rest at apply, as before).
pub(super) const COPIES_MAX: usize = 16 << 20;

/// Verified payloads by the journal offset of their record.
pub(super) struct RecordCopies {
    /// Zeroed once, at the first use, and then reused as it is: a record is read over
    /// whatever the last group left there, so the hot path never zeroes a payload.
    bytes: Vec<u8>,
    /// Bytes of `bytes` that hold this group's copies.
    used: usize,
    /// Record offset -> (start, length) in `bytes`.
    at: HashMap<u64, (usize, usize)>,
    /// Bytes kept at most ([`COPIES_MAX`]; tests lower it).
    limit: usize,
}

impl Default for RecordCopies {
    fn default() -> Self {
        RecordCopies::with_limit(COPIES_MAX)
    }
}

impl RecordCopies {
    /// Copies of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        RecordCopies {
            bytes: Vec::new(),
            used: 0,
            at: HashMap::new(),
            limit,
        }
    }

    /// Forgets every copy (keeps the memory for the next group).
    pub fn clear(&mut self) {
        self.used = 0;
        self.at.clear();
    }

    /// Room for the `len`-byte payload of the record at `offset`: the caller reads it into
    /// the slice returned, and must [`clear`](Self::clear) if that fails. None when the
    /// copies are full (or the record is empty): the apply reads that record itself.
    pub fn slot(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let start = self.used;
        if len == 0 || start + len > self.limit {
            return None;
        }
        if self.bytes.is_empty() {
            self.bytes = vec![0; self.limit];
        }
        self.used = start + len;
        self.at.insert(offset, (start, len));
        Some(&mut self.bytes[start..start + len])
    }

    /// The verified payload of the record at `offset`, if kept.
    pub fn get(&self, offset: u64) -> Option<&[u8]> {
        self.at
            .get(&offset)
            .map(|&(start, len)| &self.bytes[start..start + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_found_by_offset_until_full_or_cleared() {
        let mut c = RecordCopies::default();
        c.slot(100, 3).unwrap().copy_from_slice(b"abc");
        c.slot(4000, 2).unwrap().copy_from_slice(b"de");
        assert_eq!(c.get(100), Some(&b"abc"[..]));
        assert_eq!(c.get(4000), Some(&b"de"[..]));
        assert_eq!(c.get(7), None);
        assert!(c.slot(9, 0).is_none(), "an empty record is not kept");
        assert!(
            c.slot(8000, COPIES_MAX).is_none(),
            "what would pass the bound is not kept"
        );
        assert_eq!(c.get(8000), None);
        c.clear();
        assert_eq!(c.get(100), None);
        assert!(c.slot(8000, COPIES_MAX).is_some(), "cleared: room again");
        c.clear();
        c.slot(5, 3).unwrap().copy_from_slice(b"xyz");
        assert_eq!(
            c.get(5),
            Some(&b"xyz"[..]),
            "reused memory holds the new copy"
        );
        assert_eq!(c.get(8000), None);
    }
}
