//! Roles and lineage of a replicated disk (DESIGN.md §7): who may write it, and what a
//! handshake must resync.
//!
//! Every disk drblk serves or replicates has a *lineage file* next to its image
//! (`IMAGE.drblk-lineage`, JSON, replaced atomically): its [`Role`], its current
//! *generation* (a random id, new whenever a site starts writing on its own: a first
//! `drblk serve` of a disk, a promotion), the CG of its last role change, and a short
//! history of the generations before (newest first, each with the CG it ended at).
//!
//! - A primary (`drblk serve`) starts a generation the first time it serves a disk.
//! - A secondary adopts the generation and history of the primary it replicates (they come
//!   in the `Hello`).
//! - `drblk promote` ends the replica's generation at the CG it holds and starts a new one:
//!   the old primary's writes after that CG are not in it.
//! - `drblk serve` refuses a disk whose role is `secondary` or `demoted` (writing it would
//!   silently diverge it from its lineage); `drblk promote` is the way to make it writable.
//!
//! At each handshake [`decide`] compares the two sites' lineages (a pure function, with its
//! table in its doc comment). The file's job is in `file.rs`, the decision's in
//! `decide.rs`.

mod decide;
mod file;

pub use decide::{decide, Decision, Side};
pub use file::{lineage_path, Lineage, LINEAGE_FORMAT};

use serde::{Deserialize, Serialize};

/// A generation identifier: 16 random bytes, shown as 32 hex digits.
pub type GenerationId = [u8; 16];

/// What a site may do with its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Served by `drblk serve`, the source of its generation.
    Primary,
    /// A replica kept by `drblk secondary`: written only by committed groups.
    Secondary,
    /// A former replica made writable by `drblk promote` (a primary in a new generation).
    Promoted,
    /// A former primary that handed over at a committed CG (planned switchover).
    Demoted,
}

impl Role {
    /// Whether the site wrote (or may have written) the disk on its own.
    pub fn writes(self) -> bool {
        matches!(self, Role::Primary | Role::Promoted)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Promoted => "promoted",
            Role::Demoted => "demoted",
        })
    }
}

/// An earlier generation: it ended at `until_cg` (the last CG it shares with its successor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    /// The generation.
    #[serde(with = "hex_id")]
    pub generation: GenerationId,
    /// The last CG of it that the next generation holds.
    pub until_cg: u64,
}

/// How many earlier generations a lineage keeps.
pub const HISTORY_LEN: usize = 8;

/// Serde form of a generation id: 32 hex digits.
pub(crate) mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::replica::identity::uuid_hex(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        crate::replica::identity::parse_uuid(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not 32 hex digits: {s:?}")))
    }
}

/// A new random generation id.
pub fn new_generation() -> GenerationId {
    uuid::Uuid::new_v4().into_bytes()
}

/// Short form of a generation id for logs and messages (first 8 hex digits).
pub fn short(id: &GenerationId) -> String {
    crate::replica::identity::uuid_hex(id)[..8].to_owned()
}
