//! Which site may write a disk: the checks `drblk serve` and `drblk secondary` make against
//! the disk's lineage file before touching the image (see [`crate::lineage`]).

use std::path::Path;

use anyhow::bail;

use crate::lineage::{Lineage, Role};

/// Checks that `drblk serve` may serve `image`, and returns its lineage: the one on disk,
/// or with `replicated` a first one (a new generation) written now. A replica
/// (`secondary`) or a demoted disk is refused for writing: serving it would silently
/// diverge it from the site that now writes its generation. Read-only serving is allowed.
pub fn lineage_for_serve(
    image: &Path,
    readonly: bool,
    replicated: bool,
) -> anyhow::Result<Option<Lineage>> {
    let lineage = Lineage::load(image)?;
    match &lineage {
        Some(l) if readonly && !l.role.writes() => {
            tracing::warn!(disk = %image.display(), lineage = %l.describe(), "serving a replica read-only");
        }
        Some(l) if l.role == Role::Secondary => bail!(
            "{} is a replica kept by `drblk secondary` ({}): writing it would silently diverge \
             it from its primary. To fail over to it, run `drblk promote --disk {}` (with the \
             secondary's --state-dir if it used one); to look at it without writing, serve it \
             with --readonly",
            image.display(),
            l.describe(),
            image.display()
        ),
        Some(l) if l.role == Role::Demoted => bail!(
            "{} was demoted at CG {} (a planned switchover): the promoted site writes this disk \
             now. Run this one as its secondary (`drblk secondary --disk {} ...`), or, if that \
             site is lost, make this one writable again with `drblk promote --disk {}`",
            image.display(),
            l.since_cg,
            image.display(),
            image.display()
        ),
        Some(l) => {
            tracing::info!(disk = %image.display(), lineage = %l.describe(), "lineage");
        }
        None if replicated && !readonly => {
            let l = Lineage::new_primary();
            l.store(image)?;
            tracing::info!(disk = %image.display(), lineage = %l.describe(), "first start as a replicated primary: new generation");
            return Ok(Some(l));
        }
        None => {}
    }
    Ok(lineage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_refuses_a_replica_and_a_demoted_disk_but_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("r.img");
        assert_eq!(lineage_for_serve(&img, false, false).unwrap(), None);
        let p = lineage_for_serve(&img, false, true).unwrap().unwrap();
        assert_eq!(p.role, Role::Primary);
        assert_eq!(
            lineage_for_serve(&img, false, true).unwrap(),
            Some(p.clone())
        );

        Lineage::replica_of(p.generation, &[]).store(&img).unwrap();
        let e = lineage_for_serve(&img, false, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("drblk promote --disk"), "{e}");
        assert!(lineage_for_serve(&img, true, true).is_ok());

        let mut d = p.clone();
        d.role = Role::Demoted;
        d.since_cg = 4;
        d.store(&img).unwrap();
        let e = lineage_for_serve(&img, false, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("demoted at CG 4"), "{e}");
    }
}
