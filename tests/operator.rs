//! What an operator runs, through the real binary: `drblk status` on both sites (summary,
//! JSON, watch, a sync in progress), every refusal of `serve`, `secondary`, `promote`,
//! `ctl` and `status` as one line that names the cause and the next step, refusals over
//! the link seen in the primary's status, and the vhost-user backend conventions
//! (`--print-capabilities`, the descriptor and its wrapper).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::sites::{drblk, text, Sites, BIN, SIZE};

/// `drblk ctl FLAG PATH args...` (ctl's options come before its command).
fn ctl(args: &[&str], flag: &str, path: &Path) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg(flag)
        .arg(path)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A refusal: exit status 1, nothing on stdout, and exactly one line on stderr that holds
/// every one of `cause` and `next` (what to do).
fn refused(o: &Output, cause: &[&str], next: &[&str]) {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, not:\n{err}");
    for w in cause.iter().chain(next) {
        assert!(lines[0].contains(w), "{w:?} not in: {}", lines[0]);
    }
    assert!(lines[0].starts_with("drblk: error: "), "{}", lines[0]);
}

#[test]
fn status_reads_both_sites_as_summary_json_and_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary();
    let _primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));

    let p = stdout(&drblk(&["status"], &[("--socket", &s.sock())]));
    for want in [
        "role        primary (generation ",
        "link        up; secondary consistent at CG",
        "RPO ",
        "groups ",
        "freeze p50",
        "shipped ",
    ] {
        assert!(p.contains(want), "{want:?} not in:\n{p}");
    }
    let j: drblk::control::PrimaryStatus = serde_json::from_slice(
        drblk(&["status", "--json"], &[("--socket", &s.sock())])
            .stdout
            .as_slice(),
    )
    .unwrap();
    assert!(j.replication.unwrap().last_committed_cg >= 1);

    let sec = stdout(&drblk(&["status"], &[("--control", &s.control())]));
    for want in [
        "role        secondary (generation ",
        "state       consistent at CG",
        "link        primary connected (1 connection since start)",
        "drill       none",
    ] {
        assert!(sec.contains(want), "{want:?} not in:\n{sec}");
    }
    // --watch off a terminal: one summary per refresh; --json: one object per line.
    let w = stdout(&drblk(
        &["status", "--watch", "--count", "3", "--interval", "50ms"],
        &[("--control", &s.control())],
    ));
    assert_eq!(w.matches("role        secondary").count(), 3, "{w}");
    assert_eq!(
        w.matches("/s now").count(),
        2,
        "rates from the second refresh on:\n{w}"
    );
    let wj = stdout(&drblk(
        &[
            "status",
            "--json",
            "--watch",
            "--count",
            "2",
            "--interval",
            "10ms",
        ],
        &[("--socket", &s.sock())],
    ));
    assert_eq!(wj.lines().count(), 2, "{wj}");
    for l in wj.lines() {
        let _: drblk::control::PrimaryStatus = serde_json::from_str(l).unwrap();
    }
}

#[test]
fn a_sync_in_progress_shows_how_far_it_is_on_both_sites() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    // Data that is not zero (zero extents cost nothing to ship), shipped at 256 KB/s: the
    // 16 MiB sync takes about a minute: the two looks below fall inside it on any machine.
    common::fill_pattern(&tmp.path().join("primary.img"), SIZE);
    let _secondary = s.secondary();
    let _primary = s.primary_with(&["--max-rate", "256K"]);
    s.wait_until("the sync to have started", || {
        let o = drblk(&["status", "--json"], &[("--control", &s.control())]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["replica"]["Syncing"]["done_chunks"]
            .as_u64()
            .is_some_and(|d| d > 0)
    });
    let p = stdout(&drblk(&["status"], &[("--socket", &s.sock())]));
    assert!(p.contains("sync        syncing "), "{p}");
    assert!(p.contains(" of 16.00 MiB)"), "{p}");
    let sec = stdout(&drblk(&["status"], &[("--control", &s.control())]));
    assert!(sec.contains("state       inconsistent, syncing"), "{sec}");
    assert!(
        sec.contains("sync        syncing ") && sec.contains(" of 16.00 MiB)"),
        "{sec}"
    );
}

#[test]
fn every_refusal_is_one_line_with_its_cause_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = common::make_certs(d);
    let (img, sock) = (d.join("a.img"), d.join("a.sock"));

    // serve: no image and no size; a bad size; certificates missing or of another site.
    refused(
        &drblk(&["serve"], &[("--disk", &img), ("--socket", &sock)]),
        &["does not exist"],
        &["--size"],
    );
    let bad = drblk(
        &["serve", "--size", "12Q"],
        &[("--disk", &img), ("--socket", &sock)],
    );
    assert_eq!(bad.status.code(), Some(2), "clap's usage error");
    let first = String::from_utf8_lossy(&bad.stderr)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(
        first.contains("'12Q'") && first.contains("use K, M, G or T"),
        "{first}"
    );
    let nocerts = d.join("nocerts");
    refused(
        &drblk(
            &["serve", "--size", "1M", "--replicate-to", "127.0.0.1:9"],
            &[("--disk", &img), ("--socket", &sock), ("--certs", &nocerts)],
        ),
        &["loading this site's certificate", "nocerts"],
        &["drblk cert --dir"],
    );
    refused(
        &drblk(
            &[
                "serve",
                "--size",
                "1M",
                "--replicate-to",
                "127.0.0.1:9",
                "--site",
                "elsewhere",
            ],
            &[("--disk", &img), ("--socket", &sock), ("--certs", &certs)],
        ),
        &["elsewhere.pem"],
        &["drblk cert --dir", "--sites elsewhere"],
    );
    refused(
        &drblk(
            &["secondary"],
            &[("--disk", &d.join("r.img")), ("--certs", &nocerts)],
        ),
        &["loading this site's certificate"],
        &["drblk cert --dir"],
    );
    // promote: no replica state.
    std::fs::write(d.join("plain.img"), [0u8; 4096]).unwrap();
    refused(
        &drblk(&["promote"], &[("--disk", &d.join("plain.img"))]),
        &["holds no replica"],
        &["--state-dir"],
    );
    // ctl and status: nothing listening.
    refused(
        &ctl(&["status"], "--socket", &d.join("none.sock")),
        &["none.sock.ctl"],
        &["drblk serve --socket"],
    );
    refused(
        &drblk(&["status"], &[("--control", &d.join("none.ctl"))]),
        &["none.ctl"],
        &["start it"],
    );

    // A running primary: its socket in use, a secondary's command, its metrics port.
    let mut primary = drblk_daemon(
        &["serve", "--size", "4M"],
        &[("--disk", &img), ("--socket", &sock)],
        d,
    );
    let control = drblk::control::control_path(&sock);
    wait_for(&control, &mut primary);
    refused(
        &drblk(&["serve"], &[("--disk", &img), ("--socket", &sock)]),
        &["in use"],
        &["stop"],
    );
    refused(
        &ctl(&["promote"], "--control", &control),
        &["this is a primary"],
        &["drblk ctl --control PATH promote"],
    );
    refused(
        &ctl(&["drill", "status"], "--control", &control),
        &["drills run on a secondary"],
        &["drill start --socket"],
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    refused(
        &drblk(
            &["serve", "--size", "1M", "--metrics", &addr],
            &[
                ("--disk", &d.join("m.img")),
                ("--socket", &d.join("m.sock")),
            ],
        ),
        &["cannot listen for metrics on"],
        &["give a free HOST:PORT to --metrics"],
    );
}

fn drblk_daemon(args: &[&str], paths: &[(&str, &Path)], dir: &Path) -> common::KillOnDrop {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut c = Command::new(BIN);
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    common::KillOnDrop(
        c.stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn wait_for(path: &Path, d: &mut common::KillOnDrop) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(d.0.try_wait().unwrap().is_none(), "the daemon exited");
        assert!(
            std::time::Instant::now() < deadline,
            "{} never answered",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn refusals_over_the_link_show_in_the_primarys_status_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary();
    {
        let _primary = s.primary();
        s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));
    }
    // Another disk (a new identity and generation) sent to the same secondary.
    for f in std::fs::read_dir(tmp.path()).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("primary.img.") {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let _other = s.primary();
    let mut line = String::new();
    s.wait_until("the refusal in the primary's status", || {
        let o = drblk(&["status"], &[("--socket", &s.sock())]);
        line = String::from_utf8_lossy(&o.stdout).into_owned();
        // (First perhaps "already serves a primary connection": another disk does not
        // replace the killed primary's session, which lasts until its idle timeout.)
        line.contains("shares no generation")
    });
    assert!(line.contains("these are different disks"), "{line}");
    assert!(
        line.contains("restart this secondary with --discard-local-changes"),
        "{line}"
    );
    let logs = s.logs();
    assert!(
        logs.contains("rejected by the secondary: ") && logs.contains("shares no generation"),
        "{logs}"
    );
}

#[test]
fn the_backend_follows_qemus_vhost_user_conventions() {
    let caps: serde_json::Value =
        serde_json::from_str(&stdout(&drblk(&["serve", "--print-capabilities"], &[]))).unwrap();
    assert_eq!(caps["type"], "block");
    assert!(caps["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "read-only"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let desc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("contrib/vhost-user/50-drblk.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(desc["type"], "block");
    assert_eq!(desc["binary"], "/usr/libexec/drblk-vhost-user-blk");
    // The wrapper the descriptor names, run with the conventions' options.
    let wrapper = root.join("contrib/vhost-user/drblk-vhost-user-blk");
    let o = Command::new("sh")
        .arg(&wrapper)
        .arg("--print-capabilities")
        .env("DRBLK", BIN)
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(),
        caps
    );
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("c.sock");
    let log = std::fs::File::create(tmp.path().join("c.log")).unwrap();
    let mut d = common::KillOnDrop(
        Command::new("sh")
            .arg(&wrapper)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(tmp.path().join("c.img"))
            .args(["--size", "1M", "--read-only"])
            .env("DRBLK", BIN)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(&drblk::control::control_path(&sock), &mut d);
    let st = common::ctl_status(&sock);
    assert!(st.readonly);
}
