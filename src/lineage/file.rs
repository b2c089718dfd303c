//! The lineage file, `IMAGE.drblk-lineage`: JSON, replaced atomically (temp file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new lineage, never a
//! mix. A file that does not parse is an error naming the file, never "no lineage".

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{hex_id, new_generation, short, Ancestor, GenerationId, Role, HISTORY_LEN};

/// Version of the file's format.
pub const LINEAGE_FORMAT: u32 = 1;

/// The lineage file of an image.
pub fn lineage_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".drblk-lineage");
    PathBuf::from(p)
}

/// A disk's role and lineage (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Always [`LINEAGE_FORMAT`].
    pub format: u32,
    /// What this site may do with the disk.
    pub role: Role,
    /// The current generation.
    #[serde(with = "hex_id")]
    pub generation: GenerationId,
    /// The CG of the last role change (promoted at, demoted at; 0 for a first start).
    pub since_cg: u64,
    /// When the role last changed (Unix microseconds).
    pub changed_at_unix_us: u64,
    /// Earlier generations, newest first (at most [`HISTORY_LEN`]).
    pub history: Vec<Ancestor>,
}

impl Lineage {
    /// The lineage of a disk first served as a primary: a new generation, no history.
    pub fn new_primary() -> Lineage {
        Lineage {
            format: LINEAGE_FORMAT,
            role: Role::Primary,
            generation: new_generation(),
            since_cg: 0,
            changed_at_unix_us: crate::sys::clock::now_unix_micros(),
            history: Vec::new(),
        }
    }

    /// The lineage a secondary adopts from its primary's: the same generation and history.
    pub fn replica_of(generation: GenerationId, history: &[Ancestor]) -> Lineage {
        Lineage {
            format: LINEAGE_FORMAT,
            role: Role::Secondary,
            generation,
            since_cg: 0,
            changed_at_unix_us: crate::sys::clock::now_unix_micros(),
            history: history.iter().take(HISTORY_LEN).copied().collect(),
        }
    }

    /// This lineage after `role` started writing at `cg`: the current generation ends at
    /// `cg` and a new one begins.
    pub fn promoted(&self, cg: u64) -> Lineage {
        let mut history = vec![Ancestor {
            generation: self.generation,
            until_cg: cg,
        }];
        history.extend(self.history.iter().take(HISTORY_LEN - 1).copied());
        Lineage {
            format: LINEAGE_FORMAT,
            role: Role::Promoted,
            generation: new_generation(),
            since_cg: cg,
            changed_at_unix_us: crate::sys::clock::now_unix_micros(),
            history,
        }
    }

    /// One line for logs: "promoted, generation 1a2b3c4d since CG 12".
    pub fn describe(&self) -> String {
        format!(
            "{}, generation {} since CG {}",
            self.role,
            short(&self.generation),
            self.since_cg
        )
    }

    /// Reads the lineage of `image` (`None`: the disk has none yet).
    pub fn load(image: &Path) -> io::Result<Option<Lineage>> {
        let path = lineage_path(image);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |detail: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a valid lineage file ({detail}); it records which site may write this disk, so drblk will not guess: restore it, or remove it only if this disk is not a replica",
                    path.display()
                ),
            )
        };
        let l: Lineage = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if l.format != LINEAGE_FORMAT {
            return Err(bad(format!("unsupported format {}", l.format)));
        }
        Ok(Some(l))
    }

    /// Replaces the lineage of `image` atomically.
    pub fn store(&self, image: &Path) -> io::Result<()> {
        let path = lineage_path(image);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut text = serde_json::to_string_pretty(self).expect("lineage serialises");
        text.push('\n');
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_round_trip_and_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        assert_eq!(Lineage::load(&img).unwrap(), None);
        let p = Lineage::new_primary();
        p.store(&img).unwrap();
        assert_eq!(Lineage::load(&img).unwrap(), Some(p.clone()));
        let s = Lineage::replica_of(p.generation, &p.history);
        let q = s.promoted(7);
        assert_eq!(q.role, Role::Promoted);
        assert_ne!(q.generation, p.generation);
        assert_eq!(
            q.history,
            vec![Ancestor {
                generation: p.generation,
                until_cg: 7
            }]
        );
        // History stays bounded.
        let mut l = q;
        for cg in 0..20 {
            l = l.promoted(cg);
        }
        assert_eq!(l.history.len(), HISTORY_LEN);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(lineage_path(&img), "{ not json").unwrap();
        let e = Lineage::load(&img).unwrap_err().to_string();
        assert!(e.contains("d.img.drblk-lineage"), "{e}");
        std::fs::write(
            lineage_path(&img),
            r#"{"format":9,"role":"primary","generation":"00000000000000000000000000000001","since_cg":0,"changed_at_unix_us":0,"history":[]}"#,
        )
        .unwrap();
        assert!(Lineage::load(&img)
            .unwrap_err()
            .to_string()
            .contains("unsupported format 9"));
    }
}
