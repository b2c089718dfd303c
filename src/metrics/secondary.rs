//! A secondary's metrics (`drblk secondary --metrics ADDR`), from its [`SecondaryStatus`].

use std::fmt::Result;

use super::encode::{exposition, Families};
use crate::control::SecondaryStatus;
use crate::lineage::Role;
use crate::replica::ReplicaState;

/// The text Prometheus scrapes, for `status`.
pub fn render(status: SecondaryStatus) -> String {
    exposition(move |f| families(f, &status))
}

fn families(f: &mut Families<'_>, s: &SecondaryStatus) -> Result {
    super::common_info(f, &s.disk)?;
    let role = s.lineage.as_ref().map_or(Role::Secondary, |l| l.role);
    super::role(f, role)?;
    super::replica_state(f, s.replica, false, "The replica's state.")?;
    f.gauge(
        "drblk_link_up",
        "1 while a primary is connected.",
        f64::from(u8::from(s.primary_connected)),
    )?;
    f.counter(
        "drblk_link_connects",
        "Primary connections accepted.",
        s.connections,
    )?;
    if let Some(cg) = s.last_committed_cg {
        f.gauge(
            "drblk_last_committed_cg",
            "The last consistency group committed here.",
            cg as f64,
        )?;
    }
    if let Some(ms) = s.primary_state_age_ms {
        f.gauge(
            "drblk_rpo_seconds",
            "Recovery point: age of the primary's state this replica holds (absent while it is not consistent).",
            ms / 1e3,
        )?;
    }
    if let Some(ReplicaState::Consistent {
        frozen_at_unix_us, ..
    }) = s.replica
    {
        f.gauge(
            "drblk_last_sync_timestamp_seconds",
            "When the primary froze the group this replica holds (Unix time).",
            frozen_at_unix_us as f64 / 1e6,
        )?;
    }
    match s.replica {
        Some(ReplicaState::Syncing {
            done_chunks,
            total_chunks,
        }) => {
            let left = total_chunks.saturating_sub(done_chunks) * s.chunk_size;
            f.gauge(
                "drblk_outofsync_bytes",
                "Bytes the sync still has to bring (absent when consistent: only the primary knows).",
                left as f64,
            )?;
            f.gauge(
                "drblk_sync_progress_ratio",
                "Progress of the sync, 0 to 1 (1 once consistent).",
                ReplicaState::Syncing {
                    done_chunks,
                    total_chunks,
                }
                .percent()
                    / 100.0,
            )?;
        }
        Some(_) => f.gauge(
            "drblk_sync_progress_ratio",
            "Progress of the sync, 0 to 1 (1 once consistent).",
            1.0,
        )?,
        None => {}
    }
    f.counters(
        "drblk_cg",
        "Consistency groups committed here.",
        &[
            (
                &[("result", "committed"), ("reason", "")],
                s.groups_committed,
            ),
            (
                &[("result", "failed"), ("reason", "store")],
                s.store_failures,
            ),
        ],
    )?;
    f.gauge(
        "drblk_store_failing",
        "1 while the last group failed in the store (a full or failing disk; see drblk status).",
        f64::from(u8::from(s.store_error.is_some())),
    )?;
    f.histogram(
        "drblk_commit_seconds",
        "Per group: from the primary's commit to the acknowledgement (journal made durable, then applied).",
        &s.commit_seconds,
    )?;
    f.counter(
        "drblk_received_bytes",
        "Block data received from the primary (the initial sync included).",
        s.received_bytes,
    )?;
    f.counter(
        "drblk_applied_bytes",
        "Block data of committed groups applied to the image (its rate is the apply throughput).",
        s.applied_bytes,
    )?;
    f.gauge(
        "drblk_journal_bytes",
        "Size of the replica's journal file.",
        s.journal_bytes as f64,
    )?;
    drill(f, s)
}

fn drill(f: &mut Families<'_>, s: &SecondaryStatus) -> Result {
    let d = s.drill.as_ref();
    f.gauge(
        "drblk_drill_running",
        "1 while a DR drill (a writable clone of the last group) runs.",
        f64::from(u8::from(d.is_some())),
    )?;
    let Some(d) = d else { return Ok(()) };
    f.gauge(
        "drblk_drill_cg",
        "The group the drill shows.",
        d.cg.unwrap_or(0) as f64,
    )?;
    f.gauge(
        "drblk_drill_age_seconds",
        "How long the drill has run.",
        d.age_s.unwrap_or(0.0),
    )?;
    f.gauges(
        "drblk_drill_bytes",
        "Space the drill uses, by kind: written by the drill, or replica blocks kept for it.",
        &[
            (&[("kind", "overlay")], d.overlay_bytes as f64),
            (&[("kind", "preserved")], d.preserved_bytes as f64),
        ],
    )?;
    f.gauge(
        "drblk_drill_space_bytes",
        "The limit on the drill's space (--drill-space).",
        d.space_bytes as f64,
    )?;
    f.counter(
        "drblk_drill_failed_writes",
        "Drill writes refused because its space was full.",
        d.failed_writes,
    )
}
