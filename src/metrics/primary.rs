//! A primary's metrics (`drblk serve --metrics ADDR`), from its [`PrimaryStatus`].

use std::fmt::Result;

use super::encode::{exposition, Families};
use crate::control::PrimaryStatus;
use crate::lineage::Role;

/// The text Prometheus scrapes, for `status`.
pub fn render(status: PrimaryStatus) -> String {
    exposition(move |f| families(f, &status))
}

/// Every family of a primary.
fn families(f: &mut Families<'_>, s: &PrimaryStatus) -> Result {
    super::common_info(f, &s.disk)?;
    let role = s.lineage.as_ref().map_or(Role::Primary, |l| l.role);
    super::role(f, role)?;
    f.gauge(
        "drblk_disk_size_bytes",
        "Capacity the guest sees.",
        s.size as f64,
    )?;
    f.gauge(
        "drblk_frontends_connected",
        "Frontends (VMs) connected to the vhost-user socket.",
        s.frontends_connected as f64,
    )?;
    guest(f, s)?;
    group(f, s)?;

    let link = s.link.as_ref();
    let state = link.and_then(|l| l.secondary_state);
    let refused = link.is_some_and(|l| l.secondary.starts_with("refused"));
    super::replica_state(
        f,
        state,
        refused,
        "The secondary's state as it last reported it.",
    )?;
    if let Some(l) = link {
        f.gauge(
            "drblk_link_up",
            "1 while the QUIC link to the secondary is connected.",
            f64::from(u8::from(l.connected)),
        )?;
        f.counter(
            "drblk_link_connects",
            "Connections made to the secondary.",
            l.connects,
        )?;
        f.counter(
            "drblk_secondary_store_failures",
            "Groups the secondary could not store (a full or failing disk there); each is shipped again after a backoff.",
            l.secondary_failures,
        )?;
        f.gauge(
            "drblk_secondary_store_failing",
            "1 while the secondary fails to store groups (drblk status says why).",
            f64::from(u8::from(l.secondary_error.is_some())),
        )?;
        f.counter(
            "drblk_link_wire_bytes",
            "Bytes of extent frames written to the link (payload and headers).",
            l.wire_bytes,
        )?;
        f.counter(
            "drblk_link_udp_bytes",
            "Bytes of UDP datagrams sent (QUIC overhead and retransmissions included).",
            l.udp_bytes,
        )?;
        f.counters(
            "drblk_resyncs",
            "Resyncs started, by kind: full copies (the initial sync counts) and checksum comparisons.",
            &[
                (&[("kind", "full")], l.full_resyncs),
                (&[("kind", "checksum")], l.checksum_resyncs),
            ],
        )?;
        f.counters(
            "drblk_resync_chunks",
            "Chunks checksum resyncs compared, and of those found different (and shipped).",
            &[
                (&[("result", "compared")], l.resync_compared),
                (&[("result", "differing")], l.resync_differing),
            ],
        )?;
        f.gauge(
            "drblk_sync_size_bytes",
            "Bytes the current or last sync had to ship when it began.",
            l.sync_total_bytes as f64,
        )?;
        if let Some(p) = l.sync_progress {
            f.gauge(
                "drblk_sync_progress_ratio",
                "Progress of the secondary's sync, 0 to 1 (1 once it is consistent).",
                p,
            )?;
        }
    }

    if let Some(r) = &s.replication {
        f.gauge(
            "drblk_last_committed_cg",
            "The last consistency group the secondary committed.",
            r.last_committed_cg as f64,
        )?;
        if let Some(ms) = r.rpo_ms {
            f.gauge(
                "drblk_rpo_seconds",
                "Recovery point: age of the primary's state that the secondary holds (absent until a group commits).",
                ms / 1e3,
            )?;
        }
        if let Some(t) = r.last_committed_frozen_unix_s {
            f.gauge(
                "drblk_last_sync_timestamp_seconds",
                "When the primary froze the last group the secondary committed (Unix time).",
                t,
            )?;
        }
        f.counter(
            "drblk_shipped_bytes",
            "Bytes of block data shipped to the secondary (re-shipments after a link loss count again).",
            r.bytes_shipped,
        )?;
        f.counter(
            "drblk_shipped_extents",
            "Extents (runs of contiguous blocks, one link message each) shipped.",
            r.extents_shipped,
        )?;
    }

    if let Some(cg) = &s.cg {
        f.gauge(
            "drblk_outofsync_bytes",
            "Bytes marked to ship that the secondary does not hold yet.",
            cg.dirty_bytes as f64,
        )?;
        f.histogram(
            "drblk_freeze_seconds",
            "How long the queues were frozen to form each consistency group.",
            &cg.freeze_seconds,
        )?;
        let a = &cg.abandoned;
        f.counters(
            "drblk_cg",
            "Consistency groups by outcome: committed, abandoned (by reason) or aborted while forming.",
            &[
                (&[("result", "committed"), ("reason", "")], cg.committed),
                (&[("result", "abandoned"), ("reason", "cache_full")], a.cache_full),
                (&[("result", "abandoned"), ("reason", "drain_timeout")], a.drain_timeout),
                (&[("result", "abandoned"), ("reason", "preserve_failed")], a.preserve_failed),
                (&[("result", "abandoned"), ("reason", "link_lost")], a.link_lost),
                (
                    &[("result", "aborted"), ("reason", "coordination_timeout")],
                    cg.coordination_aborts,
                ),
            ],
        )?;
        f.gauge(
            "drblk_cow_bytes",
            "Bytes the copy-on-write cache holds (old contents kept for the group being shipped).",
            cg.cow_bytes as f64,
        )?;
    }
    Ok(())
}

/// Guest requests by operation.
/// A daemon serving several disks as one group: per disk, labelled with its image and its
/// position in the group (the families above describe the first disk, or the group).
fn group(f: &mut Families<'_>, s: &PrimaryStatus) -> Result {
    if s.group.is_empty() {
        return Ok(());
    }
    let index: Vec<String> = (0..s.group.len()).map(|i| i.to_string()).collect();
    let labels: Vec<[(&str, &str); 2]> = s
        .group
        .iter()
        .zip(&index)
        .map(|(m, i)| [("disk", m.disk.as_str()), ("index", i.as_str())])
        .collect();
    let each = |v: &dyn Fn(&crate::control::MemberStatus) -> f64| -> Vec<(&[(&str, &str)], f64)> {
        labels
            .iter()
            .zip(&s.group)
            .map(|(l, m)| (&l[..], v(m)))
            .collect()
    };
    f.gauges(
        "drblk_group_disk_size_bytes",
        "Capacity of each disk of the group.",
        &each(&|m| m.size as f64),
    )?;
    f.gauges(
        "drblk_group_disk_frontends_connected",
        "Frontends connected to each disk of the group.",
        &each(&|m| m.frontends_connected as f64),
    )?;
    f.gauges(
        "drblk_group_disk_dirty_chunks",
        "Chunks of each disk of the group to ship with the next group.",
        &each(&|m| m.dirty_chunks.unwrap_or(0) as f64),
    )?;
    let requests: Vec<(&[(&str, &str)], u64)> = labels
        .iter()
        .zip(&s.group)
        .map(|(l, m)| (&l[..], m.requests))
        .collect();
    f.counters(
        "drblk_group_disk_requests",
        "Requests completed on each disk of the group.",
        &requests,
    )
}

fn guest(f: &mut Families<'_>, s: &PrimaryStatus) -> Result {
    let labels: Vec<[(&str, &str); 1]> = s.ops.iter().map(|o| [("op", o.op.as_str())]).collect();
    let by_op = |v: fn(&crate::blk::op_stats::OpStatus) -> u64| {
        s.ops
            .iter()
            .zip(&labels)
            .map(|(o, l)| (&l[..], v(o)))
            .collect::<Vec<_>>()
    };
    f.counters(
        "drblk_guest_requests",
        "Guest requests completed, by operation.",
        &by_op(|o| o.requests),
    )?;
    f.counters(
        "drblk_guest_request_errors",
        "Guest requests completed with an error status, by operation.",
        &by_op(|o| o.errors),
    )?;
    f.counters(
        "drblk_guest_bytes",
        "Bytes moved by successful guest requests, by operation.",
        &by_op(|o| o.bytes),
    )?;
    let hist: Vec<_> = s
        .ops
        .iter()
        .zip(&labels)
        .map(|(o, l)| (&l[..], &o.latency_seconds))
        .collect();
    f.histograms(
        "drblk_guest_request_duration_seconds",
        "Time the backend took per guest request, by operation.",
        &hist,
    )?;
    f.counter(
        "drblk_guest_rejected_requests",
        "Malformed requests rejected by validation.",
        s.rejected,
    )
}
