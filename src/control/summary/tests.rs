use super::*;
use crate::control::status::{CgStatus, LinkStatusView, ReplicationStatus};

fn primary_status() -> PrimaryStatus {
    PrimaryStatus {
        disk: "/var/lib/vm/db.img".into(),
        size: 8 << 30,
        readonly: false,
        queues: 4,
        connections: 1,
        frontends_connected: 1,
        lineage: None,
        requests: 0,
        rejected: 0,
        ops: Vec::new(),
        cg: Some(CgStatus {
            phase: crate::cg::CgPhase::Strict { cg: 42 },
            last_committed: 41,
            formed: 42,
            committed: 41,
            coordination_aborts: 0,
            abandoned: Default::default(),
            freeze_us: Default::default(),
            cow_bytes: 0,
            cow_peak_bytes: 0,
            dirty_chunks: 3,
            dirty_bytes: 3 << 12,
            freeze_seconds: Default::default(),
        }),
        replication: Some(ReplicationStatus {
            last_committed_cg: 41,
            rpo_ms: Some(73.0),
            last_committed_frozen_unix_s: Some(1.8e9),
            chunks_shipped: 10,
            extents_shipped: 5,
            bytes_shipped: 10 << 12,
        }),
        link: Some(LinkStatusView {
            connected: true,
            secondary: "consistent at CG 41".into(),
            secondary_state: Some(ReplicaState::Consistent {
                cg: 41,
                frozen_at_unix_us: 1,
            }),
            sync_progress: Some(1.0),
            sync_total_bytes: 8 << 30,
            connects: 1,
            full_resyncs: 1,
            checksum_resyncs: 0,
            resync_compared: 0,
            resync_differing: 0,
            wire_bytes: 0,
            udp_bytes: 0,
            secondary_failures: 0,
            secondary_error: None,
        }),
        track: None,
        group: Vec::new(),
    }
}

fn secondary_status(replica: Option<ReplicaState>) -> SecondaryStatus {
    SecondaryStatus {
        disk: "/srv/dr/db.img".into(),
        state_dir: "/srv/dr/db.img.state".into(),
        state: "inconsistent, syncing 25.0 % (1 of 4 chunks)".into(),
        last_committed_cg: None,
        primary_state_age_ms: None,
        lineage: None,
        replica,
        chunk_size: 1 << 20,
        primary_connected: true,
        connections: 1,
        groups_committed: 0,
        received_bytes: 0,
        applied_bytes: 0,
        journal_bytes: 0,
        commit_seconds: Default::default(),
        store_failures: 0,
        store_error: None,
        drill: None,
    }
}

#[test]
fn a_replicating_primary_reads_as_role_disk_link_rpo_and_groups() {
    let text = render(&AnyStatus::Primary(primary_status()), None);
    for want in [
        "role        primary",
        "/var/lib/vm/db.img (8.00 GiB, 4 queues), 1 VM connected",
        "link        up; secondary consistent at CG 41",
        "RPO         73 ms (CG 41 committed)",
        "41 committed, 0 abandoned (shipping CG 42)",
        "out of sync 12.00 KiB",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert!(
        !text.contains("sync  "),
        "no sync line when consistent:\n{text}"
    );
}

#[test]
fn a_syncing_replica_shows_progress_rate_and_time_left_from_two_statuses() {
    let syncing = |done| {
        AnyStatus::Secondary(secondary_status(Some(ReplicaState::Syncing {
            done_chunks: done,
            total_chunks: 400,
        })))
    };
    let (before, now) = (syncing(100), syncing(110));
    assert_eq!(
        now.sync(),
        Some(SyncProgress {
            done: 110 << 20,
            total: 400 << 20
        })
    );
    let rates = Rates::between(&before, &now, Duration::from_secs(1));
    assert_eq!(rates.sync, (10 << 20) as f64);
    let text = render(&now, Some(rates));
    assert!(
        text.contains(
            "syncing 27.5 % (110.00 MiB of 400.00 MiB) at 10.00 MiB/s, about 29 seconds left"
        ),
        "{text}"
    );
    assert!(
        text.contains("primary connected (1 connection since start)"),
        "{text}"
    );
    assert!(text.contains("drill       none"), "{text}");
}

#[test]
fn a_primary_sees_its_secondarys_sync_from_what_it_shipped() {
    let mut p = primary_status();
    let l = p.link.as_mut().unwrap();
    l.secondary_state = Some(ReplicaState::Syncing {
        done_chunks: 0,
        total_chunks: 0,
    });
    l.sync_progress = Some(0.5);
    l.sync_total_bytes = 1 << 30;
    let s = AnyStatus::Primary(p);
    assert_eq!(
        s.sync(),
        Some(SyncProgress {
            done: 1 << 29,
            total: 1 << 30
        })
    );
    let text = render(&s, None);
    assert!(text.contains("syncing 50.0 % (512.00 MiB of 1.00 GiB)"));
    assert!(
        text.contains("link        up; secondary syncing 50.0 %\n"),
        "the link line shows this primary's count, not the handshake's:\n{text}"
    );
}

#[test]
fn a_secondary_that_cannot_store_groups_says_why_on_both_sites() {
    let mut p = primary_status();
    let l = p.link.as_mut().unwrap();
    l.secondary_failures = 3;
    l.secondary_error = Some("journal full: 1.00 MiB free in /srv/r.state".into());
    let text = render(&AnyStatus::Primary(p), None);
    assert!(
        text.contains("secondary   CANNOT STORE GROUPS (3 failed, retrying): journal full: 1.00 MiB free in /srv/r.state"),
        "{text}"
    );
    assert!(!render(&AnyStatus::Primary(primary_status()), None).contains("CANNOT"));
    let mut s = secondary_status(None);
    s.store_failures = 2;
    s.store_error = Some("journal full".into());
    let text = render(&AnyStatus::Secondary(s), None);
    assert!(
        text.contains("store       FAILING (2 groups failed; the primary retries): journal full"),
        "{text}"
    );
}

#[test]
fn either_status_is_told_from_its_json() {
    let p = AnyStatus::Primary(primary_status());
    let AnyStatus::Primary(inner) = &p else {
        unreachable!()
    };
    let v = serde_json::to_value(crate::control::Reply::ok(inner)).unwrap();
    assert_eq!(AnyStatus::from_json(v).unwrap(), p);
    let s = secondary_status(None);
    let v = serde_json::to_value(crate::control::Reply::ok(&s)).unwrap();
    assert_eq!(AnyStatus::from_json(v).unwrap(), AnyStatus::Secondary(s));
    assert!(AnyStatus::from_json(serde_json::json!({"ok": true, "state_dir": 3})).is_err());
}

#[test]
fn a_group_lists_every_disk() {
    let mut p = primary_status();
    p.group = ["db", "log"]
        .iter()
        .map(|n| crate::control::MemberStatus {
            disk: format!("/var/lib/vm/{n}.img"),
            socket: format!("/run/vm/{n}.sock"),
            size: 1 << 30,
            frontends_connected: 1,
            requests: 5,
            dirty_chunks: Some(0),
            track: None,
        })
        .collect();
    let text = render(&AnyStatus::Primary(p), None);
    assert!(
        text.contains("group       disk 0: /var/lib/vm/db.img on /run/vm/db.sock (1.00 GiB)")
            && text.contains("disk 1: /var/lib/vm/log.img on /run/vm/log.sock"),
        "{text}"
    );
}

#[test]
fn a_drill_of_a_group_names_every_disks_socket() {
    let mut s = secondary_status(None);
    let mut d = crate::drill::DrillStatus::none(None);
    d.running = true;
    d.cg = Some(7);
    d.socket = Some("/run/d0.sock".into());
    d.overlay_bytes = 8192;
    d.space_bytes = 1 << 30;
    d.disks = ["/run/d0.sock", "/run/d1.sock"]
        .map(|socket| crate::drill::DrillDiskStatus {
            socket: socket.into(),
            overlay_bytes: 4096,
            preserved_bytes: 0,
            frontend_connected: false,
        })
        .to_vec();
    s.drill = Some(d);
    let text = render(&AnyStatus::Secondary(s), None);
    assert!(
        text.contains("running on /run/d0.sock, /run/d1.sock for"),
        "{text}"
    );
    assert!(text.contains("(CG 7): 8.00 KiB written"), "{text}");
}
