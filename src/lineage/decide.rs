//! The handshake's decision: given the lineages of the site that would write (the
//! *source*, running `drblk serve`) and of the site that would be written (the *target*,
//! running `drblk secondary`), what may be synchronised and how.

use super::{Ancestor, GenerationId, Role};

/// One site as the handshake sees it.
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    /// Its role.
    pub role: Role,
    /// Its current generation.
    pub generation: GenerationId,
    /// Its earlier generations, newest first.
    pub history: &'a [Ancestor],
    /// The last CG of its generation it holds: a replica's last committed CG, a primary's
    /// last CG its secondary acknowledged, a demoted site's CG of demotion (`None`: none,
    /// e.g. a replica still syncing).
    pub cg: Option<u64>,
    /// It holds writes that are in no CG the other side may have: a primary's unshipped
    /// changes (its change record is not empty, or is missing).
    pub tail: bool,
}

/// What the two lineages allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same generation, same CG, nothing unshipped.
    NothingToSync,
    /// The target holds `from_cg` of the source's line: ship the source's changes since
    /// then (its change record).
    Incremental {
        /// The common CG.
        from_cg: u64,
    },
    /// The target has no usable common point with the source (a new or syncing replica, or
    /// one older than the source's record reaches): copy the disk.
    FullCopy,
    /// The target wrote (or holds groups) that the source never had since their common CG
    /// — it is an old primary that was failed over from. Synchronising discards those
    /// writes, so it needs the operator's word. Then ship the changes of both sides since
    /// `common_cg` (both change records), or the whole disk if `full`.
    DiscardTarget {
        /// The last CG both hold.
        common_cg: u64,
        /// No change record reaches back to `common_cg`: a full copy is needed.
        full: bool,
    },
    /// The target was promoted from the source's generation at `promoted_at_cg` and the
    /// source wrote nothing since: the source is the stale side and must never write the
    /// target (it can rejoin as the target's secondary).
    TargetIsNewer {
        /// Where the target's generation began.
        promoted_at_cg: u64,
    },
    /// Both sides started writing on their own since `common_cg`: an operator must pick
    /// the side whose writes survive.
    SplitBrain {
        /// The last CG both hold.
        common_cg: u64,
    },
    /// No generation in common: these are different disks.
    Unrelated,
}

impl Decision {
    /// Whether replication may go ahead without an operator's explicit word.
    pub fn proceeds(self) -> bool {
        matches!(
            self,
            Decision::NothingToSync | Decision::Incremental { .. } | Decision::FullCopy
        )
    }
}

fn ended_at(history: &[Ancestor], generation: GenerationId) -> Option<u64> {
    history
        .iter()
        .find(|a| a.generation == generation)
        .map(|a| a.until_cg)
}

/// Decides what a handshake between `source` and `target` may do (DESIGN.md §7).
///
/// | what the two sites hold | decision |
/// |---|---|
/// | same generation, target a replica with no CG (new, syncing) | `FullCopy` |
/// | same generation, target a replica at the source's CG, no unshipped writes | `NothingToSync` |
/// | same generation, target a replica at or above the source's CG | `Incremental` from the target's CG |
/// | same generation, target a replica below the source's CG (it lost a group) | `FullCopy` |
/// | same generation, target also writes it (a copied disk) | `SplitBrain` |
/// | target's generation ended at CG p in the source's history; target a replica at p | `Incremental` from p |
/// | … target a replica below p (or syncing) | `FullCopy` |
/// | … target a replica above p (it holds groups the source never got) | `DiscardTarget { full: true }` |
/// | … target demoted at p, or an old primary at p with no unshipped writes | `Incremental` from p |
/// | … target an old primary with writes since its CG m ≤ p (crashed, failed over from) | `DiscardTarget { common_cg: m, full: false }` |
/// | … target an old primary at m > p (the source lost groups it had acknowledged) | `DiscardTarget { full: true }` |
/// | … target itself promoted and written since p | `SplitBrain` |
/// | source's generation ended at q in the target's history, source wrote nothing past q | `TargetIsNewer` |
/// | … source wrote past q | `SplitBrain` |
/// | a generation in both histories (both promoted from it) | `SplitBrain` |
/// | nothing in common | `Unrelated` |
pub fn decide(source: &Side<'_>, target: &Side<'_>) -> Decision {
    if source.generation == target.generation {
        if target.role != Role::Secondary {
            return Decision::SplitBrain {
                common_cg: target.cg.unwrap_or(0).min(source.cg.unwrap_or(0)),
            };
        }
        return match (target.cg, source.cg) {
            (None, _) => Decision::FullCopy,
            (Some(t), Some(s)) if t == s && !source.tail => Decision::NothingToSync,
            (Some(t), s) if t >= s.unwrap_or(0) => Decision::Incremental { from_cg: t },
            _ => Decision::FullCopy,
        };
    }
    if let Some(p) = ended_at(source.history, target.generation) {
        // The source descends from the target's generation: it began writing at p.
        return match (target.role, target.cg) {
            (Role::Secondary, Some(t)) if t == p => Decision::Incremental { from_cg: p },
            (Role::Secondary, Some(t)) if t > p => Decision::DiscardTarget {
                common_cg: p,
                full: true,
            },
            (Role::Secondary, _) => Decision::FullCopy,
            (Role::Demoted, Some(d)) if d == p && !target.tail => {
                Decision::Incremental { from_cg: p }
            }
            (Role::Promoted, m) if target.tail || m.unwrap_or(0) > p => Decision::SplitBrain {
                common_cg: m.unwrap_or(0).min(p),
            },
            (_, Some(m)) if m == p && !target.tail => Decision::Incremental { from_cg: p },
            (_, Some(m)) if m > p => Decision::DiscardTarget {
                common_cg: p,
                full: true,
            },
            (_, m) => Decision::DiscardTarget {
                common_cg: m.unwrap_or(0),
                full: m.is_none(),
            },
        };
    }
    if let Some(q) = ended_at(target.history, source.generation) {
        // The target descends from the source's generation: it was promoted at q.
        let wrote_since = source.tail || source.cg.is_some_and(|c| c > q);
        return if wrote_since {
            Decision::SplitBrain { common_cg: q }
        } else {
            Decision::TargetIsNewer { promoted_at_cg: q }
        };
    }
    let common = source
        .history
        .iter()
        .find_map(|a| ended_at(target.history, a.generation).map(|t| t.min(a.until_cg)));
    match common {
        Some(common_cg) => Decision::SplitBrain { common_cg },
        None => Decision::Unrelated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G0: GenerationId = [0; 16];
    const G1: GenerationId = [1; 16];
    const G2: GenerationId = [2; 16];
    const G3: GenerationId = [3; 16];

    fn anc(generation: GenerationId, until_cg: u64) -> Ancestor {
        Ancestor {
            generation,
            until_cg,
        }
    }

    fn side(
        role: Role,
        generation: GenerationId,
        history: &[Ancestor],
        cg: Option<u64>,
        tail: bool,
    ) -> Side<'_> {
        Side {
            role,
            generation,
            history,
            cg,
            tail,
        }
    }

    use Decision::*;
    use Role::*;

    // One test per row of the table, in its order.

    #[test]
    fn same_generation_new_replica_gets_a_full_copy() {
        let s = side(Primary, G1, &[], Some(5), true);
        assert_eq!(decide(&s, &side(Secondary, G1, &[], None, false)), FullCopy);
    }

    #[test]
    fn same_generation_same_cg_nothing_unshipped_is_in_sync() {
        let s = side(Primary, G1, &[], Some(5), false);
        let t = side(Secondary, G1, &[], Some(5), false);
        assert_eq!(decide(&s, &t), NothingToSync);
    }

    #[test]
    fn same_generation_replica_at_or_above_source_cg_is_incremental() {
        let s = side(Primary, G1, &[], Some(5), true);
        assert_eq!(
            decide(&s, &side(Secondary, G1, &[], Some(5), false)),
            Incremental { from_cg: 5 }
        );
        // The acknowledgement of 6 was lost on the way back.
        assert_eq!(
            decide(&s, &side(Secondary, G1, &[], Some(6), false)),
            Incremental { from_cg: 6 }
        );
    }

    #[test]
    fn same_generation_replica_below_source_cg_gets_a_full_copy() {
        let s = side(Primary, G1, &[], Some(5), true);
        assert_eq!(
            decide(&s, &side(Secondary, G1, &[], Some(4), false)),
            FullCopy
        );
    }

    #[test]
    fn same_generation_two_writers_is_split_brain() {
        let s = side(Primary, G1, &[], Some(5), true);
        assert_eq!(
            decide(&s, &side(Primary, G1, &[], Some(3), true)),
            SplitBrain { common_cg: 3 }
        );
    }

    #[test]
    fn stale_replica_of_the_old_generation_at_the_promotion_point_is_incremental() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        assert_eq!(
            decide(&s, &side(Secondary, G1, &[], Some(9), false)),
            Incremental { from_cg: 9 }
        );
    }

    #[test]
    fn stale_replica_below_the_promotion_point_gets_a_full_copy() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        assert_eq!(
            decide(&s, &side(Secondary, G1, &[], Some(7), false)),
            FullCopy
        );
        assert_eq!(decide(&s, &side(Secondary, G1, &[], None, false)), FullCopy);
    }

    #[test]
    fn replica_holding_groups_the_source_never_got_needs_consent() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        let d = decide(&s, &side(Secondary, G1, &[], Some(11), false));
        assert_eq!(
            d,
            DiscardTarget {
                common_cg: 9,
                full: true
            }
        );
        assert!(!d.proceeds());
    }

    #[test]
    fn demoted_old_primary_at_the_promotion_point_is_incremental() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        assert_eq!(
            decide(&s, &side(Demoted, G1, &[], Some(9), false)),
            Incremental { from_cg: 9 }
        );
        // A crashed old primary whose record is empty at exactly p loses nothing either.
        assert_eq!(
            decide(&s, &side(Primary, G1, &[], Some(9), false)),
            Incremental { from_cg: 9 }
        );
    }

    #[test]
    fn crashed_old_primary_with_unshipped_writes_needs_consent() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        let d = decide(&s, &side(Primary, G1, &[], Some(8), true));
        assert_eq!(
            d,
            DiscardTarget {
                common_cg: 8,
                full: false
            }
        );
        assert!(!d.proceeds());
        // A demoted site that is not at p (it wrote after demoting?) is treated the same.
        assert_eq!(
            decide(&s, &side(Demoted, G1, &[], Some(9), true)),
            DiscardTarget {
                common_cg: 9,
                full: false
            }
        );
    }

    #[test]
    fn old_primary_ahead_of_the_promotion_point_needs_consent_and_a_full_copy() {
        let h = [anc(G1, 9)];
        let s = side(Promoted, G2, &h, Some(9), true);
        assert_eq!(
            decide(&s, &side(Primary, G1, &[], Some(12), true)),
            DiscardTarget {
                common_cg: 9,
                full: true
            }
        );
    }

    #[test]
    fn promoted_target_that_wrote_since_is_split_brain() {
        // G0 was promoted to G1 on the target, then the source was promoted from G1 at 9,
        // while the target kept writing G1.
        let th = [anc(G0, 4)];
        let h = [anc(G1, 9), anc(G0, 4)];
        let s = side(Promoted, G2, &h, Some(9), true);
        assert_eq!(
            decide(&s, &side(Promoted, G1, &th, Some(9), true)),
            SplitBrain { common_cg: 9 }
        );
    }

    #[test]
    fn source_whose_target_was_promoted_is_stale() {
        let th = [anc(G1, 9)];
        let s = side(Primary, G1, &[], Some(9), false);
        assert_eq!(
            decide(&s, &side(Promoted, G2, &th, Some(9), true)),
            TargetIsNewer { promoted_at_cg: 9 }
        );
    }

    #[test]
    fn source_that_wrote_past_the_targets_promotion_is_split_brain() {
        let th = [anc(G1, 9)];
        let s = side(Primary, G1, &[], Some(9), true);
        assert_eq!(
            decide(&s, &side(Promoted, G2, &th, Some(9), true)),
            SplitBrain { common_cg: 9 }
        );
        let s = side(Primary, G1, &[], Some(10), false);
        assert_eq!(
            decide(&s, &side(Promoted, G2, &th, Some(9), true)),
            SplitBrain { common_cg: 9 }
        );
    }

    #[test]
    fn both_promoted_from_a_common_generation_is_split_brain() {
        let sh = [anc(G1, 9)];
        let th = [anc(G1, 7)];
        let s = side(Promoted, G2, &sh, Some(9), true);
        assert_eq!(
            decide(&s, &side(Promoted, G3, &th, Some(7), true)),
            SplitBrain { common_cg: 7 }
        );
    }

    #[test]
    fn nothing_in_common_is_unrelated() {
        let (sh, th) = ([anc(G0, 3)], [anc(G3, 1)]);
        let s = side(Primary, G1, &sh, Some(9), true);
        assert_eq!(
            decide(&s, &side(Secondary, G2, &th, Some(9), false)),
            Unrelated
        );
    }
}
