//! What Prometheus scrapes: `--metrics ADDR` serves `GET /metrics` in the OpenMetrics text
//! format, built on each scrape from the same typed status `drblk ctl status` answers
//! ([`primary`], [`secondary`]).

pub mod encode;
pub mod histogram;
pub mod primary;
pub mod secondary;
mod server;

pub use server::{BoundMetrics, MetricsServer};

use crate::lineage::Role;
use crate::replica::ReplicaState;
use encode::Families;

/// `drblk_build_info` and `drblk_disk_info`: constant 1, their labels say what runs.
fn common_info(f: &mut Families<'_>, disk: &str) -> std::fmt::Result {
    f.gauges(
        "drblk_build_info",
        "Constant 1; the version label says which drblk runs.",
        &[(&[("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    )?;
    f.gauges(
        "drblk_disk_info",
        "Constant 1; the disk label names the image this daemon serves or keeps.",
        &[(&[("disk", disk)], 1.0)],
    )
}

/// `drblk_role{role}`: 1 for the site's role, 0 for the others (one series per role, so a
/// role change shows as one series dropping and another rising).
fn role(f: &mut Families<'_>, role: Role) -> std::fmt::Result {
    let all = [
        Role::Primary,
        Role::Secondary,
        Role::Promoted,
        Role::Demoted,
    ];
    let names: Vec<String> = all.iter().map(|r| r.to_string()).collect();
    let labels: Vec<[(&str, &str); 1]> = names.iter().map(|n| [("role", n.as_str())]).collect();
    let samples: Vec<_> = all
        .iter()
        .zip(&labels)
        .map(|(r, l)| (&l[..], f64::from(u8::from(*r == role))))
        .collect();
    f.gauges(
        "drblk_role",
        "The disk's role at this site (1 for the current one).",
        &samples,
    )
}

/// The `state` label of a replica state (`refused`: the secondary refused this primary).
fn state_name(state: Option<ReplicaState>, refused: bool) -> &'static str {
    match state {
        _ if refused => "refused",
        None => "unknown",
        Some(ReplicaState::Syncing { .. }) => "syncing",
        Some(ReplicaState::Consistent { .. }) => "consistent",
        Some(ReplicaState::Promoted) => "promoted",
    }
}

/// `drblk_replica_state{state}`: 1 for the replica's state, 0 for the others.
fn replica_state(
    f: &mut Families<'_>,
    state: Option<ReplicaState>,
    refused: bool,
    help: &str,
) -> std::fmt::Result {
    let now = state_name(state, refused);
    let all = ["unknown", "syncing", "consistent", "promoted", "refused"];
    let labels: Vec<[(&str, &str); 1]> = all.iter().map(|n| [("state", *n)]).collect();
    let samples: Vec<_> = all
        .iter()
        .zip(&labels)
        .map(|(n, l)| (&l[..], f64::from(u8::from(*n == now))))
        .collect();
    f.gauges("drblk_replica_state", help, &samples)
}

#[cfg(test)]
mod tests;
