//! The expositions of both sites rendered from typed statuses, parsed back with
//! `prometheus-parse`, and the endpoint answering over HTTP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use super::histogram::Histogram;
use crate::control::status::{
    AbandonedCounts, CgStatus, LinkStatusView, PrimaryStatus, ReplicationStatus, SecondaryStatus,
};
use crate::replica::ReplicaState;

fn parse(text: &str) -> HashMap<String, f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut m = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        m.insert(format!("{}{{{}}}", s.metric, labels.join(",")), v);
    }
    m
}

fn primary() -> PrimaryStatus {
    let h = Histogram::default();
    h.observe(Duration::from_micros(20));
    h.observe(Duration::from_micros(40));
    let ops = crate::blk::op_stats::GuestOps::default();
    ops.record(
        0,
        crate::blk::op_stats::Op::Write,
        4096,
        true,
        Duration::from_micros(30),
    );
    ops.record(
        1,
        crate::blk::op_stats::Op::Read,
        512,
        false,
        Duration::from_micros(9),
    );
    PrimaryStatus {
        disk: "/var/lib/vm/a \"b\".img".into(),
        size: 1 << 30,
        readonly: false,
        queues: 2,
        connections: 1,
        frontends_connected: 1,
        lineage: None,
        requests: 2,
        rejected: 3,
        ops: ops.snapshot(),
        cg: Some(CgStatus {
            phase: crate::cg::CgPhase::Idle,
            last_committed: 9,
            formed: 10,
            committed: 9,
            coordination_aborts: 1,
            abandoned: AbandonedCounts {
                cache_full: 0,
                drain_timeout: 2,
                preserve_failed: 0,
                link_lost: 1,
            },
            freeze_us: Default::default(),
            cow_bytes: 0,
            cow_peak_bytes: 0,
            dirty_chunks: 2,
            dirty_bytes: 8192,
            freeze_seconds: h.snapshot(),
        }),
        replication: Some(ReplicationStatus {
            last_committed_cg: 9,
            rpo_ms: Some(250.0),
            last_committed_frozen_unix_s: Some(1.8e9),
            chunks_shipped: 4,
            extents_shipped: 2,
            bytes_shipped: 16384,
        }),
        link: Some(LinkStatusView {
            connected: false,
            secondary: "refused this primary: nope".into(),
            secondary_state: None,
            sync_progress: None,
            sync_total_bytes: 0,
            connects: 3,
            full_resyncs: 1,
            checksum_resyncs: 2,
            resync_compared: 10,
            resync_differing: 1,
            wire_bytes: 20000,
            udp_bytes: 30000,
            secondary_failures: 0,
            secondary_error: None,
        }),
        track: None,
        group: Vec::new(),
    }
}

#[test]
fn a_primarys_status_becomes_its_metrics() {
    let text = super::primary::render(primary());
    assert!(text.ends_with("# EOF\n"), "{text}");
    let m = parse(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(get("drblk_role{role=primary}"), 1.0);
    assert_eq!(get("drblk_replica_state{state=refused}"), 1.0);
    assert_eq!(get("drblk_replica_state{state=consistent}"), 0.0);
    assert_eq!(get("drblk_link_up{}"), 0.0);
    assert_eq!(get("drblk_rpo_seconds{}"), 0.25);
    assert_eq!(get("drblk_outofsync_bytes{}"), 8192.0);
    assert_eq!(
        get("drblk_cg_total{reason=drain_timeout,result=abandoned}"),
        2.0
    );
    assert_eq!(
        get("drblk_cg_total{reason=coordination_timeout,result=aborted}"),
        1.0
    );
    assert_eq!(get("drblk_cg_total{reason=,result=committed}"), 9.0);
    assert_eq!(get("drblk_freeze_seconds{}"), 2.0);
    assert_eq!(get("drblk_guest_requests_total{op=write}"), 1.0);
    assert_eq!(get("drblk_guest_request_errors_total{op=read}"), 1.0);
    assert_eq!(get("drblk_guest_bytes_total{op=write}"), 4096.0);
    assert_eq!(get("drblk_guest_rejected_requests_total{}"), 3.0);
    assert_eq!(get("drblk_resyncs_total{kind=checksum}"), 2.0);
    assert!(!m.contains_key("drblk_sync_progress_ratio{}"));
    // A label value with quotes is escaped, and the parser reads it back.
    assert!(text.contains(r#"disk="/var/lib/vm/a \"b\".img""#), "{text}");
}

#[test]
fn a_secondarys_status_becomes_its_metrics_syncing_or_with_a_drill() {
    let mut s = SecondaryStatus {
        disk: "/srv/r.img".into(),
        state_dir: "/srv/r.img.state".into(),
        state: "syncing".into(),
        last_committed_cg: None,
        primary_state_age_ms: None,
        lineage: None,
        replica: Some(ReplicaState::Syncing {
            done_chunks: 1,
            total_chunks: 4,
        }),
        chunk_size: 4096,
        primary_connected: true,
        connections: 2,
        groups_committed: 0,
        received_bytes: 4096,
        applied_bytes: 0,
        journal_bytes: 100,
        commit_seconds: Default::default(),
        store_failures: 0,
        store_error: None,
        drill: None,
    };
    let m = parse(&super::secondary::render(s.clone()));
    assert_eq!(m["drblk_role{role=secondary}"], 1.0);
    assert_eq!(m["drblk_replica_state{state=syncing}"], 1.0);
    assert_eq!(m["drblk_sync_progress_ratio{}"], 0.25);
    assert_eq!(m["drblk_outofsync_bytes{}"], 3.0 * 4096.0);
    assert_eq!(m["drblk_drill_running{}"], 0.0);
    assert!(!m.contains_key("drblk_rpo_seconds{}"));

    s.replica = Some(ReplicaState::Consistent {
        cg: 7,
        frozen_at_unix_us: 1_800_000_000_000_000,
    });
    s.last_committed_cg = Some(7);
    s.primary_state_age_ms = Some(1500.0);
    let mut d = crate::drill::DrillStatus::none(None);
    d.running = true;
    d.cg = Some(7);
    d.overlay_bytes = 4096;
    d.preserved_bytes = 8192;
    d.space_bytes = 1 << 30;
    d.failed_writes = 1;
    s.drill = Some(d);
    let m = parse(&super::secondary::render(s));
    assert_eq!(m["drblk_rpo_seconds{}"], 1.5);
    assert_eq!(m["drblk_last_sync_timestamp_seconds{}"], 1.8e9);
    assert_eq!(m["drblk_sync_progress_ratio{}"], 1.0);
    assert_eq!(m["drblk_last_committed_cg{}"], 7.0);
    assert_eq!(m["drblk_drill_running{}"], 1.0);
    assert_eq!(m["drblk_drill_bytes{kind=preserved}"], 8192.0);
    assert_eq!(m["drblk_drill_failed_writes_total{}"], 1.0);
}

#[test]
fn the_endpoint_answers_metrics_and_404_and_holds_its_address() {
    let server = super::MetricsServer::start(
        "127.0.0.1:0",
        std::sync::Arc::new(|| super::primary::render(primary())),
    )
    .unwrap();
    let addr = server.local_addr();
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ok = get("/metrics?x=1");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("application/openmetrics-text"), "{ok}");
    assert!(ok.contains("drblk_rpo_seconds 0.25"), "{ok}");
    assert!(get("/").starts_with("HTTP/1.1 404"));
    // The address is taken while it runs.
    let again = super::MetricsServer::bind(&addr.to_string());
    assert!(again.is_err());
    // Dropping it stops its thread (and returns).
    drop(server);
}

#[test]
fn a_group_has_a_series_per_disk() {
    let mut s = primary();
    s.group = ["db", "log"]
        .iter()
        .enumerate()
        .map(|(i, n)| crate::control::MemberStatus {
            disk: format!("/vm/{n}.img"),
            socket: format!("/run/{n}.sock"),
            size: (i as u64 + 1) << 30,
            frontends_connected: 1,
            requests: 10 * i as u64,
            dirty_chunks: Some(i as u64 + 3),
            track: None,
        })
        .collect();
    let text = super::primary::render(s);
    let m = parse(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(
        get("drblk_group_disk_size_bytes{disk=/vm/log.img,index=1}"),
        (2u64 << 30) as f64
    );
    assert_eq!(
        get("drblk_group_disk_dirty_chunks{disk=/vm/db.img,index=0}"),
        3.0
    );
    assert_eq!(
        get("drblk_group_disk_requests_total{disk=/vm/log.img,index=1}"),
        10.0
    );
    // One disk: no group families.
    assert!(!super::primary::render(primary()).contains("drblk_group_disk"));
}
