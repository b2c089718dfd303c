//! The secondary's side of the lineage decision (DESIGN.md §7): what the disk behind
//! `drblk secondary` holds — a replica, or an old primary's image rejoining — and what a
//! refused handshake tells the operator.

use std::path::Path;

use crate::lineage::{decide, short, Decision, Lineage, Role, Side};
use crate::link::Hello;

/// The most ranges a `HelloAck` carries (its frame is at most 64 KiB); more are merged
/// into coarser ones (shipping more, never less).
const MAX_RANGES: usize = 3000;

/// The byte ranges an old primary's change record (next to `image`) says it wrote since
/// the CG its secondary acknowledged: what a rejoin must take from the new primary on top
/// of the new primary's own changes. `None`: there is no record (or it cannot be read as a
/// whole), so the whole disk is in doubt.
pub fn tail_ranges(image: &Path, disk_size: u64) -> Option<Vec<(u64, u64)>> {
    let l =
        crate::track::file::RecordFile::load(&crate::track::default_record_path(image)).ok()??;
    if l.sb.flags & crate::track::file::FLAG_ALL_DIRTY != 0 {
        return Some(vec![(0, disk_size)]);
    }
    let chunk = l.sb.chunk_size;
    let mut ranges: Vec<(u64, u64)> =
        l.al.iter()
            .map(|&e| (e * l.sb.al_extent, l.sb.al_extent))
            .collect();
    let chunks = disk_size.div_ceil(chunk);
    let mut i = 0;
    while i < chunks {
        let bit = |i: u64| l.words[(i / 64) as usize] >> (i % 64) & 1 == 1;
        if l.words[(i / 64) as usize] == 0 {
            i = (i / 64 + 1) * 64;
            continue;
        }
        if bit(i) {
            let start = i;
            while i < chunks && bit(i) {
                i += 1;
            }
            ranges.push((start * chunk, (i - start) * chunk));
        } else {
            i += 1;
        }
    }
    Some(coalesce(ranges, disk_size))
}

/// Sorts and merges `ranges` (clipped to the disk), coarsening them until at most
/// [`MAX_RANGES`] remain.
fn coalesce(mut ranges: Vec<(u64, u64)>, disk_size: u64) -> Vec<(u64, u64)> {
    let mut grain = 1u64;
    loop {
        ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(off, len) in &ranges {
            let start = off / grain * grain;
            let end = (off + len)
                .div_ceil(grain)
                .saturating_mul(grain)
                .min(disk_size);
            match out.last_mut() {
                Some(last) if start <= last.0 + last.1 => {
                    last.1 = last.1.max(end - last.0);
                }
                _ if start < end => out.push((start, end - start)),
                _ => {}
            }
        }
        if out.len() <= MAX_RANGES {
            return out;
        }
        ranges = out;
        grain = grain.max(1 << 20) * 8;
    }
}

/// The target's own view, for the decision.
pub struct Target {
    /// Its role (a replica store that is open is a `Secondary`, whatever else).
    pub role: Role,
    /// Its lineage (a new replica has none yet: it takes the primary's).
    pub lineage: Option<Lineage>,
    /// The CG it holds.
    pub cg: Option<u64>,
    /// Its writes since `cg` (an old primary's change record): chunks, and whether the
    /// record is missing (then any chunk may differ).
    pub tail_chunks: u64,
    /// No usable change record: its writes since `cg` are unknown.
    pub tail_unknown: bool,
    /// When its change record was last written (the latest its own writes can be from).
    pub tail_until: Option<std::time::SystemTime>,
}

impl Target {
    /// An open replica store at `cg`.
    pub fn replica(lineage: Option<Lineage>, cg: Option<u64>) -> Target {
        Target {
            role: Role::Secondary,
            lineage,
            cg,
            tail_chunks: 0,
            tail_unknown: false,
            tail_until: None,
        }
    }

    /// An image with no open replica store: judged by its lineage (and, for a disk that was
    /// written, its change record).
    pub fn image(image: &Path, lineage: Lineage) -> Target {
        let (cg, tail_chunks, tail_unknown) = match lineage.role {
            Role::Secondary => (None, 0, false),
            Role::Demoted | Role::Primary | Role::Promoted => {
                let path = crate::track::default_record_path(image);
                match crate::track::file::RecordFile::load(&path) {
                    Ok(Some(l)) => {
                        let bits: u64 = l.words.iter().map(|w| u64::from(w.count_ones())).sum();
                        let per_ext = l.sb.al_extent / l.sb.chunk_size.max(1);
                        let all = l.sb.flags & crate::track::file::FLAG_ALL_DIRTY != 0;
                        // A demoted disk is at its CG of demotion; its record only shows a
                        // write that slipped past (it should be empty).
                        let cg = match lineage.role {
                            Role::Demoted => lineage.since_cg,
                            _ => l.sb.acked_cg,
                        };
                        (
                            (cg > 0).then_some(cg),
                            bits + l.al.len() as u64 * per_ext,
                            all,
                        )
                    }
                    // A demoted disk without a record (`--no-track-file`): the fence kept
                    // every write in the final group.
                    Ok(None) if lineage.role == Role::Demoted => (Some(lineage.since_cg), 0, false),
                    _ => (None, 0, true),
                }
            }
        };
        Target {
            role: lineage.role,
            lineage: Some(lineage),
            cg,
            tail_chunks,
            tail_unknown,
            tail_until: std::fs::metadata(crate::track::default_record_path(image))
                .and_then(|m| m.modified())
                .ok(),
        }
    }

    /// Decides against the primary's `Hello` (`None`: it sent no lineage, or this target
    /// has none: nothing to compare, the handshake goes on as it always did).
    pub fn decide(&self, hello: &Hello) -> Option<Decision> {
        let (src, mine) = (hello.lineage.as_ref()?, self.lineage.as_ref()?);
        let source = Side {
            role: src.role,
            generation: src.generation,
            history: &src.history,
            cg: hello.last_committed_cg,
            tail: hello.unshipped,
        };
        let target = Side {
            role: self.role,
            generation: mine.generation,
            history: &mine.history,
            cg: self.cg,
            tail: self.tail_chunks > 0 || self.tail_unknown,
        };
        Some(decide(&source, &target))
    }

    /// Why the handshake is refused, and the command that proceeds.
    pub fn refusal(&self, d: Decision, image: &Path, site: &str, hello: &Hello) -> String {
        let img = image.display();
        let primary_site = format!("site {site:?}");
        let proceed = format!(
            "to replace this disk with {primary_site}'s copy, restart this secondary with --discard-local-changes"
        );
        let gen = self
            .lineage
            .as_ref()
            .map(|l| short(&l.generation))
            .unwrap_or_default();
        match d {
            // A replica holding groups the primary never received (the primary was promoted
            // from an older group).
            Decision::DiscardTarget { common_cg, .. } if self.role == Role::Secondary => format!(
                "{img} (a replica, generation {gen}) holds groups after CG {common_cg} that {primary_site} never received: it was promoted from CG {common_cg}. Rejoining as its secondary discards them; {proceed}"
            ),
            Decision::DiscardTarget { common_cg, .. } => {
                let lost = if self.tail_unknown {
                    "an unknown number of chunks (no usable change record)".to_string()
                } else if self.tail_chunks > 0 {
                    format!("up to {} chunks", self.tail_chunks)
                } else {
                    "no chunks its change record knows of".to_string()
                };
                let lost = match self.tail_until {
                    Some(t) => format!(
                        "{lost}, written until about {} (its change record's last update)",
                        humantime::format_rfc3339_seconds(t)
                    ),
                    None => lost,
                };
                format!(
                    "{img} was written here ({}, generation {gen}) after the last group both sites hold (CG {common_cg}): rejoining as {primary_site}'s secondary discards those writes — {lost}{}; {proceed}",
                    self.role,
                    match self.cg {
                        Some(c) if c > common_cg => format!(", and groups {}..={c} that {primary_site} never received", common_cg + 1),
                        _ => String::new(),
                    }
                )
            }
            // This site was promoted from the primary's generation, and the primary wrote on.
            Decision::SplitBrain { common_cg }
                if hello.lineage.as_ref().is_some_and(|src| {
                    self.lineage.as_ref().is_some_and(|l| {
                        l.history.iter().any(|a| a.generation == src.generation)
                    })
                }) =>
            {
                format!(
                    "the secondary was promoted at CG {common_cg} ({img}, generation {gen}): {primary_site} is no longer replicated, and it wrote since (split brain). Its writes after CG {common_cg} are not on the promoted site; to go on, run {primary_site} as this site's secondary with --discard-local-changes, or restart this site's `drblk secondary` with --discard-local-changes to take {primary_site}'s copy instead"
                )
            }
            Decision::SplitBrain { common_cg } => format!(
                "split brain: {img} (generation {gen}) and {primary_site} both wrote on their own since CG {common_cg}; refusing to resync either way. Pick the site whose writes survive; on the other one, restart `drblk secondary` with --discard-local-changes to take the other's copy"
            ),
            Decision::TargetIsNewer { promoted_at_cg } => format!(
                "the secondary was promoted at CG {promoted_at_cg} ({img}, generation {gen}): {primary_site} is no longer replicated and must not write here. Run {primary_site} as this site's secondary instead (`drblk secondary` on {primary_site}'s disk; with --discard-local-changes there if it wrote after CG {promoted_at_cg})"
            ),
            Decision::Unrelated => format!(
                "{img} (generation {gen}) shares no generation with {primary_site}'s disk: these are different disks; {proceed}"
            ),
            _ => format!("{d:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_and_coarsened_to_fit_a_hello_ack() {
        assert_eq!(
            coalesce(
                vec![(8192, 4096), (0, 4096), (4096, 4096), (1 << 20, 10)],
                2 << 20
            ),
            vec![(0, 12288), (1 << 20, 10)]
        );
        // Clipped to the disk.
        assert_eq!(coalesce(vec![(4096, 1 << 30)], 8192), vec![(4096, 4096)]);
        // Too many: coarser ranges, covering every byte of the fine ones.
        let fine: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 65536, 4096)).collect();
        let coarse = coalesce(fine.clone(), 1 << 40);
        assert!(coarse.len() <= MAX_RANGES, "{}", coarse.len());
        for (off, len) in fine {
            assert!(coarse.iter().any(|&(o, l)| o <= off && off + len <= o + l));
        }
    }
}
