//! The secondary's side of the lineage decision (DESIGN.md §7): what the disk behind
//! `drblk secondary` holds — a replica, or an old primary's image rejoining — and what a
//! refused handshake tells the operator.

use std::path::Path;

use crate::lineage::{decide, short, Decision, Lineage, Role, Side};
use crate::link::Hello;

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
        }
    }

    /// An image with no open replica store: judged by its lineage (and, for a disk that was
    /// written, its change record).
    pub fn image(image: &Path, lineage: Lineage) -> Target {
        let (cg, tail_chunks, tail_unknown) = match lineage.role {
            Role::Secondary => (None, 0, false),
            Role::Demoted => (Some(lineage.since_cg), 0, false),
            Role::Primary | Role::Promoted => {
                let path = crate::track::default_record_path(image);
                match crate::track::file::RecordFile::load(&path) {
                    Ok(Some(l)) => {
                        let bits: u64 = l.words.iter().map(|w| u64::from(w.count_ones())).sum();
                        let per_ext = l.sb.al_extent / l.sb.chunk_size.max(1);
                        let all = l.sb.flags & crate::track::file::FLAG_ALL_DIRTY != 0;
                        (
                            (l.sb.acked_cg > 0).then_some(l.sb.acked_cg),
                            bits + l.al.len() as u64 * per_ext,
                            all,
                        )
                    }
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
            // Unknown here; only turns "nothing to sync" into "incremental".
            tail: true,
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
    pub fn refusal(&self, d: Decision, image: &Path, primary_site: &str) -> String {
        let img = image.display();
        let proceed = format!(
            "to replace this disk with {primary_site}'s copy, restart this secondary with --discard-local-changes"
        );
        let gen = self
            .lineage
            .as_ref()
            .map(|l| short(&l.generation))
            .unwrap_or_default();
        match d {
            Decision::DiscardTarget { common_cg, .. } => {
                let lost = if self.tail_unknown {
                    "an unknown number of chunks (no usable change record)".to_string()
                } else {
                    format!("up to {} chunks", self.tail_chunks)
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
            Decision::SplitBrain { common_cg } => format!(
                "split brain: {img} (generation {gen}) and {primary_site} both wrote on their own since CG {common_cg}; refusing to resync either way. Pick the site whose writes survive; on the other one, {}",
                proceed.trim_start_matches("to replace this disk with ")
                    .replacen("'s copy, restart", ": restart", 1)
            ),
            Decision::TargetIsNewer { promoted_at_cg } => format!(
                "{img} was promoted at CG {promoted_at_cg} (generation {gen}) from {primary_site}'s generation: {primary_site} is the stale side and must not write here. Run {primary_site} as this site's secondary instead; {proceed}"
            ),
            Decision::Unrelated => format!(
                "{img} (generation {gen}) shares no generation with {primary_site}'s disk: these are different disks; {proceed}"
            ),
            _ => format!("{d:?}"),
        }
    }
}
