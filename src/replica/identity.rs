//! A disk's replication identity: a random UUID kept next to the image
//! (`<image>.drblk-id`), so a secondary can tell "the same disk" from "another disk that
//! happens to have the same size" and refuse to overwrite the wrong one.

use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// The identity file of an image.
pub fn identity_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".drblk-id");
    PathBuf::from(p)
}

/// Formats a UUID as 32 hex digits (the identity file's and the state file's form).
pub fn uuid_hex(uuid: &[u8; 16]) -> String {
    Uuid::from_bytes(*uuid).simple().to_string()
}

/// Parses 32 hex digits (surrounding white space is ignored).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    // Only the simple form: the files this reads are written by `uuid_hex`.
    (s.len() == 32)
        .then(|| Uuid::try_parse(s).ok())
        .flatten()
        .map(Uuid::into_bytes)
}

/// Gives the image the identity `uuid` (a promoted replica keeps its primary's), unless it
/// has it already; an image that holds another identity is refused.
pub fn store(image: &Path, uuid: &[u8; 16]) -> io::Result<()> {
    let path = identity_path(image);
    match std::fs::read_to_string(&path) {
        Ok(s) if parse_uuid(&s) == Some(*uuid) => return Ok(()),
        Ok(s) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} says this image is disk {}, but its replica state says {}: restore the right identity file or state directory",
                    path.display(),
                    s.trim(),
                    uuid_hex(uuid)
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = path.with_extension("drblk-id.tmp");
    std::fs::write(&tmp, uuid_hex(uuid) + "\n")?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Reads the image's identity, creating a fresh random one if it has none.
pub fn load_or_create(image: &Path) -> io::Result<[u8; 16]> {
    let path = identity_path(image);
    match std::fs::read_to_string(&path) {
        Ok(s) => parse_uuid(&s).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold a disk identity (32 hex digits)",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let uuid = Uuid::new_v4().into_bytes();
            let tmp = path.with_extension("drblk-id.tmp");
            std::fs::write(&tmp, uuid_hex(&uuid) + "\n")?;
            std::fs::rename(&tmp, &path)?;
            tracing::info!(disk = %image.display(), id = %uuid_hex(&uuid), "new disk identity");
            Ok(uuid)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let a = load_or_create(&img).unwrap();
        let b = load_or_create(&img).unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_uuid(&uuid_hex(&a)), Some(a));
        std::fs::write(identity_path(&img), "junk").unwrap();
        assert!(load_or_create(&img).is_err());
    }
}
