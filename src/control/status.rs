//! The daemon's status as typed values — what `{"cmd":"status"}` answers, what `drblk ctl
//! status` prints and what tests and metrics read — and the other answers of the control
//! socket.
//!
//! On the wire a status is one JSON object: [`PrimaryStatus`]'s fields next to `"ok": true`
//! (see [`Reply`]); a failure is an [`ErrorReply`]. Sections that do not apply (no consistency groups, no replication, no
//! link) are left out of the object. Units are in the field names (`rpo_ms`,
//! `bytes_shipped`, `freeze_us`); counters count since the daemon started.

use serde::{Deserialize, Serialize};

use crate::cg::CgPhase;

/// The status of a primary (`drblk serve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// The image served (its path as given).
    pub disk: String,
    /// The capacity the guest sees, in bytes.
    pub size: u64,
    /// The disk is served read-only.
    pub readonly: bool,
    /// Virtqueues offered to the frontend.
    pub queues: u16,
    /// Frontend connections served (the current one included).
    pub connections: u64,
    /// Frontends (VMs) connected now.
    #[serde(default)]
    pub frontends_connected: u64,
    /// The disk's role and lineage (`IMAGE.drblk-lineage`), if it has one.
    #[serde(default)]
    pub lineage: Option<crate::lineage::Lineage>,
    /// Requests completed (any status).
    pub requests: u64,
    /// Requests rejected by validation.
    pub rejected: u64,
    /// Requests by operation (those seen since start).
    #[serde(default)]
    pub ops: Vec<crate::blk::op_stats::OpStatus>,
    /// The consistency-group engine, if writes are tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cg: Option<CgStatus>,
    /// The consistency-group cycle and what it shipped, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
    /// The link to the secondary, if the disk is replicated over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatusView>,
    /// The persisted change record, if one is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<TrackStatus>,
    /// Every disk of the group, in order, when the daemon serves several (the fields above
    /// other than `cg`, `replication` and `link`, which are the group's, describe the
    /// first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<MemberStatus>,
}

/// One disk of a daemon that serves several as one consistency group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The image served.
    pub disk: String,
    /// Its vhost-user socket.
    pub socket: String,
    /// The capacity the guest sees, in bytes.
    pub size: u64,
    /// Frontends connected to it now.
    pub frontends_connected: u64,
    /// Requests completed.
    pub requests: u64,
    /// Chunks dirty (to ship with the next group), if writes are tracked.
    pub dirty_chunks: Option<u64>,
    /// Its change record, if one is kept.
    pub track: Option<TrackStatus>,
}

/// The primary's persisted change record (`--track-file`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackStatus {
    /// Where it lives.
    pub path: String,
    /// It is kept up to date (false after an I/O error: it was removed, and a restart
    /// resyncs the whole disk).
    pub kept: bool,
    /// On start it was trusted (false: none yet, foreign or corrupt — a full copy followed).
    pub trusted_on_start: bool,
    /// Blocks it marked for the resync on start.
    pub resync_blocks_on_start: u64,
    /// The group it says the secondary holds at least.
    pub acked_cg: u64,
    /// Writes that had to add their extent to the on-disk activity log.
    pub al_misses: u64,
    /// Its metadata writes (log, bitmap pages, superblock).
    pub meta_writes: u64,
    /// Its fdatasyncs.
    pub syncs: u64,
}

/// The consistency-group engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CgStatus {
    /// The engine's phase, as text: `Idle`, `Strict { cg: N }` or `Abandoned { cg: N }`.
    #[serde(with = "phase_text")]
    pub phase: CgPhase,
    /// The last committed group, 0 if none.
    pub last_committed: u64,
    /// Groups formed (freeze, swap and run completed).
    pub formed: u64,
    /// Groups committed.
    pub committed: u64,
    /// Formations undone because coordinating the queues took too long.
    pub coordination_aborts: u64,
    /// Groups abandoned, by reason.
    pub abandoned: AbandonedCounts,
    /// How long the queues were frozen to form a group (the recent formations' percentiles
    /// and the longest ever), in microseconds.
    pub freeze_us: FreezeTimes,
    /// Bytes the copy-on-write cache holds now.
    pub cow_bytes: u64,
    /// The most bytes the copy-on-write cache has held.
    pub cow_peak_bytes: u64,
    /// Chunks (of `--chunk-size`) marked to be shipped: those still to ship of the group
    /// being drained (OOS) plus those written since for the next group (CR).
    pub dirty_chunks: u64,
    /// `dirty_chunks` in bytes (the secondary lacks at most this much of the disk).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Every freeze since start, as a histogram (seconds).
    #[serde(default)]
    pub freeze_seconds: crate::metrics::histogram::HistogramSnapshot,
}

/// Groups abandoned, by reason (counts since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbandonedCounts {
    /// Because the copy-on-write cache was full.
    pub cache_full: u64,
    /// Because draining the group took longer than `--max-drain-time`.
    pub drain_timeout: u64,
    /// Because a chunk could not be read to preserve it.
    pub preserve_failed: u64,
    /// Because the link to the secondary was lost while the group was strict.
    pub link_lost: u64,
}

impl AbandonedCounts {
    /// All abandoned groups, whatever the reason.
    pub fn total(&self) -> u64 {
        self.cache_full + self.drain_timeout + self.preserve_failed + self.link_lost
    }
}

/// Freeze (coordination) times, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FreezeTimes {
    /// Median over the most recent formations (at most 1024), µs; 0 before the first.
    pub p50: f64,
    /// 99th percentile over the most recent formations, µs; 0 before the first.
    pub p99: f64,
    /// Longest since start, µs.
    pub max: f64,
}

/// The consistency-group cycle: what has been committed where the groups go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// The last group committed by the sink (the secondary or local replica), 0 if none.
    pub last_committed_cg: u64,
    /// Recovery point: milliseconds between the freeze of the last committed group and
    /// now; `null` until a group has committed.
    pub rpo_ms: Option<f64>,
    /// When the primary froze the last committed group (seconds since the Unix epoch);
    /// `null` until a group has committed.
    #[serde(default)]
    pub last_committed_frozen_unix_s: Option<f64>,
    /// Blocks (chunks) shipped (re-shipments after a link loss count again).
    pub chunks_shipped: u64,
    /// Extents shipped: runs of contiguous blocks, one link message each.
    #[serde(default)]
    pub extents_shipped: u64,
    /// Bytes shipped (chunk payloads).
    pub bytes_shipped: u64,
}

/// The replication link as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatusView {
    /// Connected to the secondary now.
    pub connected: bool,
    /// The secondary's state as it last reported it (`syncing 42.0 %`, `consistent at CG
    /// 7`); empty before the first connection.
    pub secondary: String,
    /// The same, typed; `null` before the first connection and after a refusal.
    #[serde(default)]
    pub secondary_state: Option<crate::replica::ReplicaState>,
    /// While the secondary syncs: how much of what this connection's resync marked has been
    /// shipped (0 to 1); 1 once it is consistent.
    #[serde(default)]
    pub sync_progress: Option<f64>,
    /// Bytes the current (or last) sync had to ship when it began.
    #[serde(default)]
    pub sync_total_bytes: u64,
    /// Connections made (1 = the first).
    pub connects: u64,
    /// Full resyncs started (the initial copy counts as one).
    pub full_resyncs: u64,
    /// Checksum resyncs: the disks compared chunk by chunk, only what differs shipped.
    #[serde(default)]
    pub checksum_resyncs: u64,
    /// Chunks those resyncs compared.
    #[serde(default)]
    pub resync_compared: u64,
    /// Chunks they found different (and shipped).
    #[serde(default)]
    pub resync_differing: u64,
    /// Bytes written to the link (extent frames with their headers), over all connections:
    /// divided by the bytes the guest wrote, the link's write amplification.
    #[serde(default)]
    pub wire_bytes: u64,
    /// Bytes of UDP datagrams sent (the frames plus QUIC's own headers, acknowledgements
    /// and retransmissions), over all connections; updated at each commit.
    #[serde(default)]
    pub udp_bytes: u64,
    /// Groups the secondary could not store (a full or failing disk there); each one stays
    /// dirty here and is shipped again after a backoff.
    #[serde(default)]
    pub secondary_failures: u64,
    /// The secondary's reason for the last of those, until a group commits again
    /// ("journal full: ...").
    #[serde(default)]
    pub secondary_error: Option<String>,
}

/// A successful answer on the control socket: `{"ok": true, ...body}`, the body's fields
/// flattened next to `ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    /// Always `true` (failures are [`ErrorReply`]).
    pub ok: bool,
    /// The answer's fields.
    #[serde(flatten)]
    pub body: T,
}

impl<T> Reply<T> {
    /// A successful answer carrying `body`.
    pub fn ok(body: T) -> Self {
        Reply { ok: true, body }
    }
}

/// A failed request: `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Always `false`.
    pub ok: bool,
    /// What went wrong.
    pub error: String,
}

impl ErrorReply {
    /// A failure saying `error`.
    pub fn new(error: impl Into<String>) -> Self {
        ErrorReply {
            ok: false,
            error: error.into(),
        }
    }
}

/// The body of the answer to `drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drained {
    /// The last committed group: it holds every write completed before the request.
    pub cg: u64,
}

/// The body of the answer to `promote` (a secondary's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The CG the promoted disk holds.
    pub cg: u64,
    /// The new generation (32 hex digits).
    pub generation: String,
    /// What `drblk promote` prints.
    pub report: String,
}

/// What a secondary's `drblk ctl --control PATH status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondaryStatus {
    /// The replica image.
    pub disk: String,
    /// Its state directory.
    pub state_dir: String,
    /// "consistent at CG 7 (the primary's state as of 0.3 s ago)", "inconsistent,
    /// syncing 42.0 %", "promoted", or why there is no replica yet.
    pub state: String,
    /// The last committed CG.
    pub last_committed_cg: Option<u64>,
    /// How old the primary's state in the replica is (ms): the RPO if the primary were
    /// lost now.
    pub primary_state_age_ms: Option<f64>,
    /// The disk's role and lineage.
    pub lineage: Option<crate::lineage::Lineage>,
    /// The replica's state, typed; `null` before the first primary connected.
    #[serde(default)]
    pub replica: Option<crate::replica::ReplicaState>,
    /// The replica's chunk size (bytes; the unit of `Syncing`'s chunk counts).
    #[serde(default)]
    pub chunk_size: u64,
    /// A primary is connected now.
    #[serde(default)]
    pub primary_connected: bool,
    /// Primary connections accepted since start.
    #[serde(default)]
    pub connections: u64,
    /// Groups committed since start.
    #[serde(default)]
    pub groups_committed: u64,
    /// Data bytes received in extents since start (the initial sync included).
    #[serde(default)]
    pub received_bytes: u64,
    /// Data bytes of committed groups applied to the image since start (the initial sync
    /// not included).
    #[serde(default)]
    pub applied_bytes: u64,
    /// Bytes of the journal file now.
    #[serde(default)]
    pub journal_bytes: u64,
    /// How long each group took from its commit request to its acknowledgement (journal
    /// made durable, then applied to the image), seconds.
    #[serde(default)]
    pub commit_seconds: crate::metrics::histogram::HistogramSnapshot,
    /// Groups this secondary could not stage or commit (a full or failing disk): each one
    /// is retried by the primary.
    #[serde(default)]
    pub store_failures: u64,
    /// Why the last group failed, while no group has committed since.
    #[serde(default)]
    pub store_error: Option<String>,
    /// The drill, if one runs.
    #[serde(default)]
    pub drill: Option<crate::drill::DrillStatus>,
}

/// An answer without fields (`form-cg`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// [`CgPhase`] as the text it has always had in the status (its `Debug` form).
mod phase_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::cg::CgPhase;

    pub fn serialize<S: Serializer>(phase: &CgPhase, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{phase:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CgPhase, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| D::Error::custom(format!("not a CG phase: {text:?}")))
    }

    fn parse(text: &str) -> Option<CgPhase> {
        let text = text.trim();
        if text == "Idle" {
            return Some(CgPhase::Idle);
        }
        let (name, rest) = text.split_once('{')?;
        let cg = rest
            .trim()
            .strip_suffix('}')?
            .trim()
            .strip_prefix("cg:")?
            .trim()
            .parse()
            .ok()?;
        match name.trim() {
            "Strict" => Some(CgPhase::Strict { cg }),
            "Abandoned" => Some(CgPhase::Abandoned { cg }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PrimaryStatus {
        PrimaryStatus {
            disk: "/var/lib/vm/disk.img".into(),
            size: 8 << 30,
            readonly: false,
            queues: 4,
            connections: 1,
            frontends_connected: 1,
            lineage: None,
            requests: 123_456,
            rejected: 2,
            ops: Vec::new(),
            cg: Some(CgStatus {
                phase: CgPhase::Strict { cg: 42 },
                last_committed: 41,
                formed: 42,
                committed: 41,
                coordination_aborts: 1,
                abandoned: AbandonedCounts {
                    cache_full: 1,
                    drain_timeout: 2,
                    preserve_failed: 3,
                    link_lost: 4,
                },
                freeze_us: FreezeTimes {
                    p50: 12.5,
                    p99: 80.25,
                    max: 300.0,
                },
                cow_bytes: 65536,
                cow_peak_bytes: 1 << 20,
                dirty_chunks: 17,
                dirty_bytes: 17 << 12,
                freeze_seconds: Default::default(),
            }),
            replication: Some(ReplicationStatus {
                last_committed_cg: 41,
                rpo_ms: Some(73.5),
                last_committed_frozen_unix_s: Some(1.7e9),
                chunks_shipped: 9000,
                extents_shipped: 4000,
                bytes_shipped: 9000 << 16,
            }),
            link: Some(LinkStatusView {
                connected: true,
                secondary: "consistent at CG 41".into(),
                secondary_state: None,
                sync_progress: Some(1.0),
                sync_total_bytes: 0,
                connects: 2,
                full_resyncs: 1,
                checksum_resyncs: 0,
                resync_compared: 0,
                resync_differing: 0,
                wire_bytes: 9000 << 12,
                udp_bytes: 9100 << 12,
                secondary_failures: 0,
                secondary_error: None,
            }),
            track: Some(TrackStatus {
                path: "/var/lib/vm/disk.img.drblk-track".into(),
                kept: true,
                trusted_on_start: true,
                resync_blocks_on_start: 310,
                acked_cg: 40,
                al_misses: 12,
                meta_writes: 30,
                syncs: 30,
            }),
            group: vec![MemberStatus {
                disk: "/var/lib/vm/log.img".into(),
                socket: "/run/vm/log.sock".into(),
                size: 1 << 30,
                frontends_connected: 1,
                requests: 7,
                dirty_chunks: Some(3),
                track: None,
            }],
        }
    }

    #[test]
    fn a_status_round_trips_through_json() {
        let s = sample();
        let text = serde_json::to_string(&Reply::ok(&s)).unwrap();
        let back: PrimaryStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let reply: Reply<PrimaryStatus> = serde_json::from_str(&text).unwrap();
        assert!(reply.ok);
        assert_eq!(reply.body, s);

        // The field names and shapes readers of the JSON rely on.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["size"], 8u64 << 30);
        assert_eq!(v["cg"]["phase"], "Strict { cg: 42 }");
        assert_eq!(v["cg"]["abandoned"]["link_lost"], 4);
        assert_eq!(v["cg"]["freeze_us"]["p99"], 80.25);
        assert_eq!(v["replication"]["last_committed_cg"], 41);
        assert_eq!(v["replication"]["rpo_ms"], 73.5);
        assert_eq!(v["link"]["secondary"], "consistent at CG 41");
    }

    #[test]
    fn absent_sections_are_left_out_and_a_missing_rpo_is_null() {
        let mut s = sample();
        s.cg = None;
        s.link = None;
        s.replication.as_mut().unwrap().rpo_ms = None;
        let v = serde_json::to_value(&s).unwrap();
        assert!(v.get("cg").is_none() && v.get("link").is_none());
        assert!(v["replication"]["rpo_ms"].is_null());
        assert_eq!(serde_json::from_value::<PrimaryStatus>(v).unwrap(), s);
    }

    #[test]
    fn every_phase_round_trips_as_its_text() {
        for phase in [
            CgPhase::Idle,
            CgPhase::Strict { cg: 7 },
            CgPhase::Abandoned { cg: u64::MAX },
        ] {
            let mut s = sample();
            s.cg.as_mut().unwrap().phase = phase;
            let v = serde_json::to_value(&s).unwrap();
            assert_eq!(v["cg"]["phase"], format!("{phase:?}"));
            assert_eq!(serde_json::from_value::<PrimaryStatus>(v).unwrap(), s);
        }
        let mut v = serde_json::to_value(sample()).unwrap();
        v["cg"]["phase"] = "Melting { cg: 1 }".into();
        assert!(serde_json::from_value::<PrimaryStatus>(v).is_err());
    }
}
