//! On-disk record format of the staging journal.
//!
//! Every record is a 48-byte header followed by `len` payload bytes, little-endian:
//!
//! | off | size | field                                                            |
//! |-----|------|------------------------------------------------------------------|
//! | 0   | 4    | magic `b"DRJL"`                                                  |
//! | 4   | 2    | format version (3; versions 1 and 2 are still read, see below)   |
//! | 6   | 1    | record type: 1 extent data, 2 zero extent, 3 commit, 4 checkpoint |
//! | 7   | 1    | data/zero: the extent's disk (index in the group); others: 0      |
//! | 8   | 8    | journal generation (random per journal incarnation)              |
//! | 16  | 8    | cg                                                               |
//! | 24  | 8    | data/zero: first chunk; commit: number of chunks in the CG; checkpoint: 0 |
//! | 32  | 8    | data/zero: number of chunks; commit/checkpoint: frozen_at (µs since the Unix epoch) |
//! | 40  | 4    | payload length (data: the extent's length; others: 0)            |
//! | 44  | 4    | crc32c over bytes 0..44 of the header followed by the payload     |
//!
//! The generation ties records to one incarnation of the journal file, so that bytes that
//! merely look like records (stale data, a journal stored *inside* a replicated disk) are
//! not taken for ours when scanning for commit records after a corrupt one.
//!
//! A data or zero record holds one *extent*: `count` contiguous chunks from `first`, inside
//! one extent region (`Geometry::extent_len`). Version 1 journals (one chunk per record,
//! field 32 always 0) stay readable: a version-1 data/zero record with `aux == 0` decodes as
//! `count == 1`. New records are always written as version 2.

pub const MAGIC: [u8; 4] = *b"DRJL";
pub const VERSION: u16 = 3;
/// Oldest version still decoded.
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    Data = 1,
    Zero = 2,
    Commit = 3,
    Checkpoint = 4,
}

impl RecordType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecordType::Data,
            2 => RecordType::Zero,
            3 => RecordType::Commit,
            4 => RecordType::Checkpoint,
            _ => return None,
        })
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub rtype: RecordType,
    /// The extent's disk (data/zero; 0 for the other types).
    pub disk: u8,
    pub gen: u64,
    pub cg: u64,
    /// First chunk (data/zero) or number of chunks (commit).
    pub arg: u64,
    /// Number of chunks (data/zero) or frozen_at_unix_us (commit/checkpoint).
    pub aux: u64,
    pub len: u32,
    pub crc: u32,
}

impl Header {
    pub fn new(rtype: RecordType, gen: u64, cg: u64, arg: u64, aux: u64, len: u32) -> Self {
        Header {
            rtype,
            disk: 0,
            gen,
            cg,
            arg,
            aux,
            len,
            crc: 0,
        }
    }

    /// The same header for an extent of disk `disk`.
    pub fn on_disk(self, disk: u8) -> Self {
        Header { disk, ..self }
    }

    fn encode_body(&self, version: u16) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&version.to_le_bytes());
        b[6] = self.rtype as u8;
        b[7] = self.disk;
        b[8..16].copy_from_slice(&self.gen.to_le_bytes());
        b[16..24].copy_from_slice(&self.cg.to_le_bytes());
        b[24..32].copy_from_slice(&self.arg.to_le_bytes());
        b[32..40].copy_from_slice(&self.aux.to_le_bytes());
        b[40..44].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Encode the header, computing the crc over header and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        self.encode_version(payload, VERSION)
    }

    /// [`Header::encode`] in an older format version (tests write version-1 journals).
    pub fn encode_version(&self, payload: &[u8], version: u16) -> [u8; HEADER_LEN] {
        debug_assert_eq!(payload.len(), self.len as usize);
        let mut b = self.encode_body(version);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..44]), payload);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode a header without checking the crc (which needs the payload).
    /// `None` if magic, version, type or disk byte are wrong (a disk other than 0 is only
    /// valid in a version-3 data/zero record; the scan checks it against the group). A version-1 data/zero
    /// record (one chunk, `aux` 0) decodes with `aux == 1` (the crc is checked over the raw
    /// bytes, see [`Header::crc_ok`], so this does not affect it).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || b[0..4] != MAGIC {
            return None;
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return None;
        }
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let rtype = RecordType::from_u8(b[6])?;
        let extent = matches!(rtype, RecordType::Data | RecordType::Zero);
        if b[7] != 0 && (version < 3 || !extent) {
            return None;
        }
        let mut aux = u64at(32);
        if version == 1 && aux == 0 && matches!(rtype, RecordType::Data | RecordType::Zero) {
            aux = 1;
        }
        Some(Header {
            rtype,
            disk: b[7],
            gen: u64at(8),
            cg: u64at(16),
            arg: u64at(24),
            aux,
            len: u32::from_le_bytes(b[40..44].try_into().unwrap()),
            crc: u32::from_le_bytes(b[44..48].try_into().unwrap()),
        })
    }

    /// Check the crc of a decoded header against its raw bytes and payload.
    pub fn crc_ok(raw_header: &[u8], payload: &[u8]) -> bool {
        let stored = u32::from_le_bytes(raw_header[44..48].try_into().unwrap());
        crc32c::crc32c_append(crc32c::crc32c(&raw_header[..44]), payload) == stored
    }

    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.len as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_crc() {
        let payload = [7u8; 100];
        let h = Header::new(RecordType::Data, 9, 3, 42, 0, 100);
        let raw = h.encode(&payload);
        let d = Header::decode(&raw).unwrap();
        assert_eq!(d.rtype, RecordType::Data);
        assert_eq!((d.disk, d.gen, d.cg, d.arg, d.len), (0, 9, 3, 42, 100));
        assert!(Header::crc_ok(&raw, &payload));
        let mut p2 = payload;
        p2[50] ^= 1;
        assert!(!Header::crc_ok(&raw, &p2));
        let mut r2 = raw;
        r2[20] ^= 1;
        assert!(!Header::crc_ok(&r2, &payload));
    }

    #[test]
    fn version_1_records_decode_as_one_chunk() {
        let h = Header::new(RecordType::Data, 9, 3, 42, 0, 4);
        let raw = h.encode_version(&[1, 2, 3, 4], 1);
        let d = Header::decode(&raw).unwrap();
        assert_eq!((d.arg, d.aux), (42, 1));
        assert!(Header::crc_ok(&raw, &[1, 2, 3, 4]));
        let z =
            Header::decode(&Header::new(RecordType::Zero, 9, 3, 5, 0, 0).encode_version(&[], 1));
        assert_eq!(z.map(|z| (z.arg, z.aux)), Some((5, 1)));
        // Version 2 keeps aux as written (0 is an invalid extent, caught by the scan).
        let d = Header::decode(&Header::new(RecordType::Zero, 9, 3, 5, 0, 0).encode(&[])).unwrap();
        assert_eq!(d.aux, 0);
        // A commit record of version 1 keeps its frozen_at.
        let c = Header::new(RecordType::Commit, 9, 3, 2, 0, 0).encode_version(&[], 1);
        assert_eq!(Header::decode(&c).unwrap().aux, 0);
        // Unknown versions are refused.
        assert!(Header::decode(&h.encode_version(&[1, 2, 3, 4], 4)).is_none());
        assert!(Header::decode(&h.encode_version(&[1, 2, 3, 4], 0)).is_none());
    }

    #[test]
    fn the_disk_byte_is_read_only_where_it_can_be_meant() {
        let h = Header::new(RecordType::Zero, 9, 3, 5, 2, 0).on_disk(7);
        let d = Header::decode(&h.encode(&[])).unwrap();
        assert_eq!((d.disk, d.arg, d.aux), (7, 5, 2));
        // Versions 1 and 2 had byte 7 reserved: a non-zero one is not a record of theirs.
        assert!(Header::decode(&h.encode_version(&[], 2)).is_none());
        assert!(Header::decode(&h.encode_version(&[], 1)).is_none());
        assert_eq!(
            Header::decode(&h.on_disk(0).encode_version(&[], 2))
                .unwrap()
                .disk,
            0
        );
        // Commit and checkpoint records cover the whole group: no disk.
        for t in [RecordType::Commit, RecordType::Checkpoint] {
            let c = Header::new(t, 9, 3, 2, 0, 0);
            assert!(Header::decode(&c.on_disk(1).encode(&[])).is_none());
            assert_eq!(Header::decode(&c.encode(&[])).unwrap().disk, 0);
        }
    }
}
