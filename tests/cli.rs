//! The `drblk` binary as a user runs it: help, errors, socket handling, signals.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_drblk");

fn wait_for_socket(p: &Path, child: &mut Child) {
    // A hang guard only: a daemon under ptrace on a loaded machine may take long to start.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon did not exit within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_command(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("serve")
        .arg("--disk")
        .arg(dir.join("d.img"))
        .arg("--socket")
        .arg(dir.join("d.sock"))
        .args(extra)
        .stdout(Stdio::null());
    c
}

/// A daemon that keeps running: its log goes to a file in `dir` (a pipe nobody reads would
/// fill up and block the daemon's next log line).
fn serve(dir: &Path, extra: &[&str]) -> Child {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::fs::File::create(dir.join(format!("serve-{n}.log"))).unwrap();
    serve_command(dir, extra).stderr(log).spawn().unwrap()
}

/// A daemon expected to exit at once (a refusal): its output.
fn serve_to_exit(dir: &Path, extra: &[&str]) -> std::process::Output {
    serve_command(dir, extra)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn help_explains_every_serve_flag() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--disk",
        "--socket",
        "--size",
        "--queues",
        "--queue-size",
        "--threads",
        "--readonly",
        "--direct",
        "--serial",
        "--logical-block-size",
        "--poll-us",
        "--socket-mode",
        "--ship-nice",
        "--ship-cpus",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("serve") && help.contains("secondary") && help.contains("ctl"));
}

#[test]
fn a_non_ascii_image_name_serves_with_a_truncated_default_serial() {
    // "drblk-" + the image's stem is cut to GET_ID's 20 bytes; byte 20 falls inside 'é'.
    let dir = tempfile::tempdir().unwrap();
    let mut d = Command::new(BIN)
        .arg("serve")
        .arg("--disk")
        .arg(dir.path().join("aaaaaaaaaaaaaé.img"))
        .args(["--size", "1M", "--socket"])
        .arg(dir.path().join("d.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&dir.path().join("d.sock"), &mut d);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut d, 120);
    assert!(st.success(), "{st}");
}

#[test]
fn missing_image_without_size_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_to_exit(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("--size"),
        "{err}"
    );
}

#[test]
fn ship_cpus_that_are_not_online_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_to_exit(
        dir.path(),
        &[
            "--size",
            "1M",
            "--cg-interval",
            "1s",
            "--ship-cpus",
            "0,1023",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ship-cpus 0,1023 names CPU 1023, which is not online")
            && err.contains("pick CPUs from"),
        "{err}"
    );
    let out = serve_to_exit(dir.path(), &["--size", "1M", "--ship-cpus", "1-0"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty range"), "{err}");
}

#[test]
fn socket_is_private_stale_sockets_are_replaced_and_live_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    // A stale socket file left by a dead process.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut first = serve(dir.path(), &["--size", "1M"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "daemon never listened");
        assert!(first.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let second = serve_to_exit(dir.path(), &[]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use"),
        "second daemon must be refused clearly: {err}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "first daemon still serving"
    );

    // SIGTERM: clean exit, socket removed.
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut first, 120);
    assert!(st.success(), "exit status {st}");
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[test]
fn sigterm_with_a_connected_frontend_flushes_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = serve(
        dir.path(),
        &["--size", "4M", "--queues", "2", "--socket-mode", "660"],
    );
    let sock = dir.path().join("d.sock");
    wait_for_socket(&sock, &mut d);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let mut c = drblk_testkit::blkio_client::BlkioClient::connect(&sock, 2, 65536, false).unwrap();
    c.buf()[..4096].fill(0x3c);
    c.run(
        1,
        drblk_testkit::blkio_client::Op::Write {
            offset: 8192,
            buf: 0,
            len: 4096,
        },
    )
    .unwrap();
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut d, 120);
    assert!(st.success(), "{st}");
    drop(c);
    let image = std::fs::read(dir.path().join("d.img")).unwrap();
    assert_eq!(&image[8192..12288], &[0x3cu8; 4096][..]);
}

#[test]
fn local_replica_drain_makes_it_identical_and_status_reports_figures() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica.img");
    let mut d = serve(
        dir.path(),
        &[
            "--size",
            "8M",
            "--queues",
            "2",
            "--local-replica",
            replica.to_str().unwrap(),
            "--cg-interval",
            "20ms",
            "--ship-nice",
            "19",
            "--ship-cpus",
            "0",
        ],
    );
    let sock = dir.path().join("d.sock");
    wait_for_socket(&sock, &mut d);
    // The drain runs niced, the formation (freezes) at the daemon's own priority; both
    // only on CPU 0, the queue workers wherever the daemon may run.
    let tasks = |name: &str| -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{}/task", d.id())).unwrap() {
            let path = t.unwrap().path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                v.push(path);
            }
        }
        v
    };
    let cpus_of = |name: &str| -> Vec<String> {
        tasks(name)
            .iter()
            .filter_map(|t| {
                let status = std::fs::read_to_string(t.join("status")).ok()?;
                let line = status
                    .lines()
                    .find(|l| l.starts_with("Cpus_allowed_list:"))?;
                Some(line.split_whitespace().nth(1)?.to_owned())
            })
            .collect()
    };
    let nice_of = |name: &str| -> Vec<i64> {
        let mut v = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{}/task", d.id())).unwrap() {
            let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
            let (Some(a), Some(b)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            if &stat[a + 1..b] == name {
                // Field 19 of /proc/<pid>/task/<tid>/stat is the niceness.
                v.push(
                    stat[b + 2..]
                        .split_whitespace()
                        .nth(16)
                        .unwrap()
                        .parse()
                        .unwrap(),
                );
            }
        }
        v
    };
    let own = nice_of("drblk")[0];
    // The socket is bound before the cycle starts: wait for its thread to exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while nice_of("drblk-cg-cycle").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        nice_of("drblk-cg-cycle"),
        vec![19],
        "the shipping thread is niced"
    );
    assert_eq!(nice_of("drblk-cg-form"), vec![own], "freezes are not niced");
    assert_eq!(cpus_of("drblk-cg-cycle"), vec!["0"], "--ship-cpus 0");
    assert_eq!(cpus_of("drblk-cg-form"), vec!["0"], "--ship-cpus 0");
    // The daemon inherits this process's CPUs (every CPU, unless the test runs under taskset).
    let inherited = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap();
    let own = cpus_of("drblk");
    assert!(
        !own.is_empty() && own.iter().all(|c| *c == inherited),
        "the daemon's own threads keep the CPUs it started with: {own:?}, not {inherited}"
    );
    let mut c =
        drblk_testkit::blkio_client::BlkioClient::connect(&sock, 2, 1 << 20, false).unwrap();
    for i in 0..64u64 {
        c.buf()[..65536].fill(i as u8 + 1);
        let q = (i % 2) as usize;
        c.run(
            q,
            drblk_testkit::blkio_client::Op::Write {
                offset: (i * 7919 % 120) * 65536,
                buf: 0,
                len: 65536,
            },
        )
        .unwrap();
    }
    let drained: drblk::control::Drained = common::ctl(&sock, "drain");
    assert!(drained.cg >= 1, "{drained:?}");
    assert_eq!(
        std::fs::read(dir.path().join("d.img")).unwrap(),
        std::fs::read(&replica).unwrap(),
        "after a drain the replica equals the primary"
    );
    let status = common::ctl_status(&sock);
    let cg = status.cg.as_ref().expect("consistency groups");
    assert!(cg.committed >= 1, "{status:?}");
    assert!(cg.freeze_us.max.is_finite(), "{status:?}");
    let rpo_ms = status.replication.and_then(|r| r.rpo_ms);
    assert!(rpo_ms.is_some(), "{status:?}");
    drop(c);
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut d, 120).success());
}

#[test]
fn ctl_without_a_daemon_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(dir.path().join("none.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `drblk serve"));
}

#[test]
fn the_control_socket_answers_garbage_with_errors_and_keeps_serving() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    use drblk::control::{control_path, ErrorReply, PrimaryStatus, Reply, MAX_REQUEST_BYTES};

    let s = common::start(1 << 20, |_| {});
    let path = control_path(&s.socket);
    let conn = UnixStream::connect(&path).unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut ask = |req: &[u8]| {
        // A write may fail once the daemon has closed the connection; the answer tells.
        let _ = w.write_all(req);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    };
    for garbage in [
        &b"\xff\x00garbage\n"[..],
        b"{\"cmd\":\"reboot\"}\n",
        b"{}\n",
    ] {
        let e: ErrorReply = serde_json::from_str(&ask(garbage)).unwrap();
        assert!(!e.ok && !e.error.is_empty(), "{e:?}");
    }
    // Without consistency groups there is nothing to form, and the status says so.
    let e: ErrorReply = serde_json::from_str(&ask(b"{\"cmd\":\"form-cg\"}\n")).unwrap();
    assert!(e.error.contains("no consistency-group cycle"), "{e:?}");
    let st: Reply<PrimaryStatus> = serde_json::from_str(&ask(b"{\"cmd\":\"status\"}\n")).unwrap();
    assert!(st.ok);
    assert_eq!((st.body.size, st.body.queues), (1 << 20, 2));
    assert!(st.body.cg.is_none() && st.body.replication.is_none() && st.body.link.is_none());

    // An oversized line is answered with an error and the connection closed; the daemon
    // goes on serving others.
    let mut big = vec![b'x'; MAX_REQUEST_BYTES + 10];
    big.push(b'\n');
    let e: ErrorReply = serde_json::from_str(&ask(&big)).unwrap();
    assert!(e.error.contains("longer than"), "{e:?}");
    assert_eq!(ask(b""), "", "the connection is closed");
    let status: PrimaryStatus = common::ctl(&s.socket, "status");
    assert_eq!((&status.disk, status.size), (&st.body.disk, st.body.size));
}
