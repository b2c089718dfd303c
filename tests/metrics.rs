//! `--metrics ADDR` through the real binaries: a running primary and secondary are scraped
//! over HTTP and the text is parsed by Prometheus parsers — the Rust `prometheus-parse`
//! crate for the values, and the official Python client's strict OpenMetrics parser
//! (Debian's python3-prometheus-client) for the format — and the figures must agree with
//! what the test did and with `drblk ctl status`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::sites::{Sites, SIZE};
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use prometheus_parse::{Scrape, Value};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

/// `GET path` on `addr`; returns (status line, content type, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or("").to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The address a daemon logged for its metrics ("metrics served at http://ADDR/metrics").
fn metrics_addr(s: &Sites, log: &str) -> String {
    let mut addr = String::new();
    s.wait_until("the metrics address in the log", || {
        let text = std::fs::read_to_string(s.dir.join(log)).unwrap_or_default();
        match text.split("metrics served at http://").nth(1) {
            Some(rest) => {
                addr = rest.split("/metrics").next().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    addr
}

/// Samples by "name{label=value,...}" (labels sorted), value as f64 (histograms: count).
fn samples(text: &str) -> (Scrape, HashMap<String, f64>) {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut by_key = HashMap::new();
    for s in &scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let v = match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => continue,
        };
        by_key.insert(format!("{}{{{}}}", s.metric, labels.join(",")), v);
    }
    (scrape, by_key)
}

fn get(m: &HashMap<String, f64>, key: &str, text: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
}

/// The official OpenMetrics parser accepts the text (skipped, with a note, where Debian's
/// python3-prometheus-client is not installed; the README's test command installs it).
fn strict_openmetrics_check(text: &str) {
    let python = "/usr/bin/python3";
    let probe = std::process::Command::new(python)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "note: python3-prometheus-client is not installed: strict OpenMetrics check skipped"
        );
        return;
    }
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nn = sum(1 for _ in p(sys.stdin.read()))\nprint(n)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(families > 10, "only {families} families");
}

#[test]
fn a_running_primary_and_secondary_are_scraped_and_their_figures_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary_with(&["--metrics", "127.0.0.1:0"]);
    let _primary = s.primary_with(&["--metrics", "127.0.0.1:0"]);
    let (paddr, saddr) = (
        metrics_addr(&s, "primary.log"),
        metrics_addr(&s, "secondary.log"),
    );
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));

    // 64 writes of 4 KiB and 8 reads through vhost-user, then a drain: every write is in a
    // committed group.
    let mut f = TestFrontend::connect(&s.sock(), 2, 256, true).unwrap();
    f.write_mem(DATA_BASE, &[0xA5; 4096]).unwrap();
    for i in 0..64u64 {
        let (st, _) = f
            .request(
                0,
                VIRTIO_BLK_T_OUT,
                i * 8 * 17 % (SIZE / 512),
                &[Desc::r(DATA_BASE, 4096)],
            )
            .unwrap();
        assert_eq!(st, 0);
    }
    for i in 0..8u64 {
        let (st, _) = f
            .request(1, VIRTIO_BLK_T_IN, i * 8, &[Desc::w(DATA_BASE, 4096)])
            .unwrap();
        assert_eq!(st, 0);
    }
    let drained: drblk::control::Drained = common::ctl(&s.sock(), "drain");

    let (status, ctype, text) = http_get(&paddr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    strict_openmetrics_check(&text);
    let (scrape, m) = samples(&text);
    assert!(
        scrape.docs.contains_key("drblk_rpo_seconds"),
        "HELP lines are kept"
    );
    assert_eq!(get(&m, "drblk_role{role=primary}", &text), 1.0);
    assert_eq!(get(&m, "drblk_role{role=secondary}", &text), 0.0);
    assert_eq!(get(&m, "drblk_replica_state{state=consistent}", &text), 1.0);
    assert_eq!(get(&m, "drblk_link_up{}", &text), 1.0);
    assert!(get(&m, "drblk_last_committed_cg{}", &text) >= drained.cg as f64);
    let rpo = get(&m, "drblk_rpo_seconds{}", &text);
    assert!((0.0..3600.0).contains(&rpo), "rpo {rpo}");
    assert!(get(&m, "drblk_last_sync_timestamp_seconds{}", &text) > 1.6e9);
    assert_eq!(get(&m, "drblk_sync_progress_ratio{}", &text), 1.0);
    assert!(get(&m, "drblk_outofsync_bytes{}", &text) >= 0.0);
    assert_eq!(get(&m, "drblk_guest_requests_total{op=write}", &text), 64.0);
    assert_eq!(get(&m, "drblk_guest_requests_total{op=read}", &text), 8.0);
    assert_eq!(
        get(&m, "drblk_guest_bytes_total{op=write}", &text),
        64.0 * 4096.0
    );
    assert_eq!(
        get(&m, "drblk_guest_request_errors_total{op=write}", &text),
        0.0
    );
    assert_eq!(
        get(&m, "drblk_guest_request_duration_seconds{op=write}", &text),
        64.0
    );
    let committed = get(&m, "drblk_cg_total{reason=,result=committed}", &text);
    assert!(committed >= 1.0, "{committed}");
    assert!(get(&m, "drblk_freeze_seconds{}", &text) >= committed);
    assert_eq!(
        get(
            &m,
            "drblk_cg_total{reason=link_lost,result=abandoned}",
            &text
        ),
        0.0
    );
    assert!(get(&m, "drblk_shipped_bytes_total{}", &text) >= 64.0 * 4096.0);
    assert_eq!(get(&m, "drblk_resyncs_total{kind=full}", &text), 1.0);

    // The same figures `drblk ctl status` shows.
    let st = common::ctl_status(&s.sock());
    let write = st.ops.iter().find(|o| o.op == "write").unwrap();
    assert_eq!(write.requests, 64);
    assert_eq!(
        get(&m, "drblk_shipped_bytes_total{}", &text),
        st.replication.unwrap().bytes_shipped as f64
    );

    let (status, _, text) = http_get(&saddr, "/metrics");
    assert!(status.contains("200"), "{status}");
    strict_openmetrics_check(&text);
    let (_, m) = samples(&text);
    assert_eq!(get(&m, "drblk_role{role=secondary}", &text), 1.0);
    assert_eq!(get(&m, "drblk_replica_state{state=consistent}", &text), 1.0);
    assert_eq!(get(&m, "drblk_link_up{}", &text), 1.0);
    assert!(get(&m, "drblk_last_committed_cg{}", &text) >= drained.cg as f64);
    assert!(get(&m, "drblk_rpo_seconds{}", &text) >= 0.0);
    assert!(get(&m, "drblk_cg_total{reason=,result=committed}", &text) >= 1.0);
    assert!(get(&m, "drblk_applied_bytes_total{}", &text) >= 64.0 * 4096.0);
    assert!(get(&m, "drblk_received_bytes_total{}", &text) >= 64.0 * 4096.0);
    assert!(get(&m, "drblk_commit_seconds{}", &text) >= 1.0);
    assert!(get(&m, "drblk_journal_bytes{}", &text) > 0.0);
    assert_eq!(get(&m, "drblk_drill_running{}", &text), 0.0);

    // Anything but GET /metrics is a 404, and the daemon goes on.
    assert!(http_get(&paddr, "/").0.contains("404"));
    assert!(http_get(&paddr, "/metrics").0.contains("200"));
}

#[test]
fn a_metrics_address_in_use_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = s.drblk(
        &["serve", "--size", "16M", "--metrics", &addr],
        &[
            ("--disk", &tmp.path().join("m.img")),
            ("--socket", &tmp.path().join("m.sock")),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")) && err.contains("--metrics"),
        "{err}"
    );
}
