//! `drblk status`: the typed status of either site as a few lines people read — role,
//! disk, state, group, RPO, link, throughput — and, during a sync, how far it is.
//!
//! Pure functions of one or two statuses (two give rates), so they are tested on values;
//! `watch.rs` fetches and refreshes.

use std::time::Duration;

use anyhow::Context;
use indicatif::{HumanBytes, HumanDuration};

use super::status::{PrimaryStatus, SecondaryStatus};
use crate::metrics::histogram::HistogramSnapshot;
use crate::replica::ReplicaState;

/// Either site's status.
#[derive(Debug, Clone, PartialEq)]
// One per `drblk ctl` answer: the size of a variant costs nothing that matters.
#[allow(clippy::large_enum_variant)]
pub enum AnyStatus {
    /// `drblk serve`.
    Primary(PrimaryStatus),
    /// `drblk secondary`.
    Secondary(SecondaryStatus),
}

/// A sync in progress: bytes brought over of bytes to bring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncProgress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

impl AnyStatus {
    /// Reads a `status` answer (a secondary's has a `state_dir`).
    pub fn from_json(v: serde_json::Value) -> anyhow::Result<AnyStatus> {
        if v.get("state_dir").is_some() {
            Ok(AnyStatus::Secondary(
                serde_json::from_value(v).context("reading a secondary's status")?,
            ))
        } else {
            Ok(AnyStatus::Primary(
                serde_json::from_value(v).context("reading a primary's status")?,
            ))
        }
    }

    /// The sync in progress, if the replica is syncing.
    pub fn sync(&self) -> Option<SyncProgress> {
        match self {
            AnyStatus::Primary(p) => primary_sync(p),
            AnyStatus::Secondary(s) => secondary_sync(s),
        }
    }

    /// Counters whose rate `render` shows: (guest bytes, shipped or applied bytes, sync
    /// bytes done).
    fn counters(&self) -> (u64, u64, u64) {
        let sync = self.sync().map_or(0, |p| p.done);
        match self {
            AnyStatus::Primary(p) => (
                p.ops.iter().map(|o| o.bytes).sum(),
                p.replication.map_or(0, |r| r.bytes_shipped),
                sync,
            ),
            AnyStatus::Secondary(s) => (0, s.applied_bytes, sync),
        }
    }
}

/// The secondary's sync as a primary sees it (what it shipped of what it marked).
fn primary_sync(p: &PrimaryStatus) -> Option<SyncProgress> {
    let l = p.link.as_ref()?;
    match (l.secondary_state, l.sync_progress) {
        (Some(ReplicaState::Syncing { .. }), Some(r)) => Some(SyncProgress {
            done: (r * l.sync_total_bytes as f64) as u64,
            total: l.sync_total_bytes,
        }),
        _ => None,
    }
}

/// A secondary's own sync (the chunks it received).
fn secondary_sync(s: &SecondaryStatus) -> Option<SyncProgress> {
    match s.replica {
        Some(ReplicaState::Syncing {
            done_chunks,
            total_chunks,
        }) => Some(SyncProgress {
            done: done_chunks.min(total_chunks) * s.chunk_size,
            total: total_chunks * s.chunk_size,
        }),
        _ => None,
    }
}

/// Rates between two statuses `elapsed` apart, bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// What the guest read and wrote.
    pub guest: f64,
    /// What the primary shipped, or the secondary applied.
    pub replication: f64,
    /// What a sync brought over.
    pub sync: f64,
}

impl Rates {
    /// The rates from `before` to `now`.
    pub fn between(before: &AnyStatus, now: &AnyStatus, elapsed: Duration) -> Rates {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let (a, b) = (before.counters(), now.counters());
        let r = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        Rates {
            guest: r(a.0, b.0),
            replication: r(a.1, b.1),
            sync: r(a.2, b.2),
        }
    }
}

fn rate(bytes_per_s: f64) -> String {
    format!("{}/s", HumanBytes(bytes_per_s as u64))
}

fn micros(h: &HistogramSnapshot, q: f64) -> String {
    match h.quantile_bound(q) {
        Some(s) if s < 1e-3 => format!("≤{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("≤{:.1} ms", s * 1e3),
        Some(s) => format!("≤{s:.1} s"),
        None if h.count == 0 => "-".into(),
        None => ">10 s".into(),
    }
}

fn phase(p: crate::cg::CgPhase) -> String {
    use crate::cg::CgPhase;
    match p {
        CgPhase::Idle => "idle".into(),
        CgPhase::Strict { cg } => format!("shipping CG {cg}"),
        CgPhase::Abandoned { cg } => format!("CG {cg} abandoned, catching up"),
    }
}

fn seconds(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{:.0} ms", ms)
    } else {
        HumanDuration(Duration::from_secs_f64(ms / 1e3)).to_string()
    }
}

/// A line about a sync: "syncing 42.0 % (27 MiB of 64 MiB) at 12 MiB/s, about 3 seconds left".
pub fn sync_line(p: SyncProgress, rates: Option<Rates>) -> String {
    let pct = if p.total == 0 {
        0.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    };
    let mut line = format!(
        "syncing {pct:.1} % ({} of {})",
        HumanBytes(p.done),
        HumanBytes(p.total)
    );
    if let Some(r) = rates.filter(|r| r.sync > 0.0) {
        let left = p.total.saturating_sub(p.done) as f64 / r.sync;
        line += &format!(
            " at {}, about {} left",
            rate(r.sync),
            HumanDuration(Duration::from_secs_f64(left))
        );
    }
    line
}

/// The summary of `status`; `rates` since an earlier status, if there was one.
pub fn render(status: &AnyStatus, rates: Option<Rates>) -> String {
    match status {
        AnyStatus::Primary(p) => primary(p, rates),
        AnyStatus::Secondary(s) => secondary(s, rates),
    }
}

fn role_line(l: Option<&crate::lineage::Lineage>, default: &str) -> String {
    match l {
        Some(l) => format!(
            "{} (generation {}, since CG {})",
            l.role,
            &crate::replica::identity::uuid_hex(&l.generation)[..8],
            l.since_cg
        ),
        None => default.into(),
    }
}

fn primary(p: &PrimaryStatus, rates: Option<Rates>) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out += &format!("{k:<12}{v}\n");
    line("role", role_line(p.lineage.as_ref(), "primary"));
    line(
        "disk",
        format!(
            "{} ({}, {} queue{}{}), {} VM connected",
            p.disk,
            HumanBytes(p.size),
            p.queues,
            if p.queues == 1 { "" } else { "s" },
            if p.readonly { ", read-only" } else { "" },
            p.frontends_connected
        ),
    );
    // A group: one line per disk (the lines below are the first disk's or the group's).
    for (i, m) in p.group.iter().enumerate() {
        line(
            if i == 0 { "group" } else { "" },
            format!(
                "disk {i}: {} on {} ({}), {} VM connected, {} requests",
                m.disk,
                m.socket,
                HumanBytes(m.size),
                m.frontends_connected,
                m.requests
            ),
        );
    }
    let requests: u64 = p.ops.iter().map(|o| o.requests).sum();
    let errors: u64 = p.ops.iter().map(|o| o.errors).sum();
    let mut guest = format!(
        "{requests} requests, {errors} failed, {} rejected",
        p.rejected
    );
    if let Some(r) = rates {
        guest += &format!("; {} now", rate(r.guest));
    }
    line("guest", guest);
    match (&p.link, &p.replication) {
        (Some(l), _) => {
            // While the secondary syncs, its handshake's figure is stale: this primary's
            // own count of what it shipped is the progress.
            let secondary = match (&l.secondary_state, l.sync_progress) {
                (Some(crate::replica::ReplicaState::Syncing { .. }), Some(p)) => {
                    format!("syncing {:.1} %", p * 100.0)
                }
                _ if l.secondary.is_empty() => "not reached yet".into(),
                _ => l.secondary.clone(),
            };
            line(
                "link",
                format!(
                    "{}; secondary {secondary}",
                    if l.connected { "up" } else { "DOWN" }
                ),
            );
            if let Some(e) = &l.secondary_error {
                line(
                    "secondary",
                    format!(
                        "CANNOT STORE GROUPS ({} failed, retrying): {e}",
                        l.secondary_failures
                    ),
                );
            }
        }
        (None, Some(_)) => line("link", "local replica".into()),
        (None, None) => line("replication", "off".into()),
    }
    if let Some(r) = &p.replication {
        line(
            "RPO",
            match r.rpo_ms {
                Some(ms) => format!("{} (CG {} committed)", seconds(ms), r.last_committed_cg),
                None => "none yet: no group has committed".into(),
            },
        );
        let mut shipped = format!(
            "{} in {} extents",
            HumanBytes(r.bytes_shipped),
            r.extents_shipped
        );
        if let Some(rt) = rates {
            shipped += &format!("; {} now", rate(rt.replication));
        }
        line("shipped", shipped);
    }
    if let Some(cg) = &p.cg {
        line(
            "groups",
            format!(
                "{} committed, {} abandoned ({}); freeze p50 {} p99 {}",
                cg.committed,
                cg.abandoned.total(),
                phase(cg.phase),
                micros(&cg.freeze_seconds, 0.5),
                micros(&cg.freeze_seconds, 0.99)
            ),
        );
        line("out of sync", HumanBytes(cg.dirty_bytes).to_string());
    }
    if let Some(s) = primary_sync(p) {
        line("sync", sync_line(s, rates));
    }
    out
}

fn secondary(s: &SecondaryStatus, rates: Option<Rates>) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out += &format!("{k:<12}{v}\n");
    line("role", role_line(s.lineage.as_ref(), "secondary"));
    line("disk", format!("{} (state in {})", s.disk, s.state_dir));
    line("state", s.state.clone());
    if let Some(ms) = s.primary_state_age_ms {
        line(
            "RPO",
            format!(
                "{} (CG {})",
                seconds(ms),
                s.last_committed_cg.unwrap_or_default()
            ),
        );
    }
    line(
        "link",
        format!(
            "{} ({} connection{} since start)",
            if s.primary_connected {
                "primary connected"
            } else {
                "no primary connected"
            },
            s.connections,
            if s.connections == 1 { "" } else { "s" }
        ),
    );
    let mut applied = format!(
        "{} groups, {} applied; commit p50 {} p99 {}; journal {}",
        s.groups_committed,
        HumanBytes(s.applied_bytes),
        micros(&s.commit_seconds, 0.5),
        micros(&s.commit_seconds, 0.99),
        HumanBytes(s.journal_bytes)
    );
    if let Some(r) = rates {
        applied += &format!("; {} now", rate(r.replication));
    }
    line("groups", applied);
    if let Some(e) = &s.store_error {
        line(
            "store",
            format!(
                "FAILING ({} groups failed; the primary retries): {e}",
                s.store_failures
            ),
        );
    }
    match &s.drill {
        Some(d) => line(
            "drill",
            format!(
                "running on {} for {} (CG {}): {} written, {} kept, of {}{}",
                if d.disks.len() > 1 {
                    d.disks
                        .iter()
                        .map(|x| x.socket.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    d.socket.clone().unwrap_or_else(|| "?".into())
                },
                HumanDuration(Duration::from_secs_f64(d.age_s.unwrap_or(0.0))),
                d.cg.unwrap_or_default(),
                HumanBytes(d.overlay_bytes),
                HumanBytes(d.preserved_bytes),
                HumanBytes(d.space_bytes),
                if d.frontend_connected {
                    ", VM connected"
                } else {
                    ""
                }
            ),
        ),
        None => line("drill", "none".into()),
    }
    if let Some(p) = secondary_sync(s) {
        line("sync", sync_line(p, rates));
    }
    out
}

#[cfg(test)]
mod tests;
