//! Host-side backends for the guest tests: the real `drblk` binary and qemu-storage-daemon,
//! run as child processes (killed on Drop), plus small helpers (skip switch, data patterns,
//! hole inspection).
//!
//! Include with `#[path = "common/daemons.rs"] mod daemons;`.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// True (after printing "skipped") when `DRBLK_SKIP_VM` is set: guest tests return early.
pub fn skip_vm(test: &str) -> bool {
    if std::env::var_os("DRBLK_SKIP_VM").is_some() {
        eprintln!("{test}: skipped (DRBLK_SKIP_VM is set)");
        println!("{test}: skipped (DRBLK_SKIP_VM is set)");
        true
    } else {
        false
    }
}

pub use drblk_testkit::rng::pattern;

/// Creates a sparse image of `size` bytes.
pub fn create_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Bytes of `[start, end)` that are allocated (data, not holes) according to
/// SEEK_DATA/SEEK_HOLE.
pub fn allocated_bytes(path: &Path, start: u64, end: u64) -> u64 {
    let f = File::open(path).unwrap();
    let fd = f.as_raw_fd();
    let mut pos = start;
    let mut total = 0;
    while pos < end {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break; // ENXIO: no data past pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        total += hole - data as u64;
        pos = hole;
    }
    total
}

/// Waits until `cond` holds, at most `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How a backend is started (to restart it identically).
#[derive(Clone, Debug)]
struct Spawn {
    program: OsString,
    args: Vec<OsString>,
    /// `taskset -c <cpus>` prefix.
    cpus: Option<String>,
}

/// A backend process serving one vhost-user socket. Dropping it kills the process.
pub struct Backend {
    pub name: String,
    pub socket: PathBuf,
    spawn: Spawn,
    child: Option<Child>,
    /// Log (stderr) of the current incarnation.
    log: PathBuf,
    logdir: PathBuf,
    /// How many times the process was started.
    pub starts: u32,
    /// What must appear in the log once the socket is listening (None: the socket file
    /// appearing is enough).
    ready_line: Option<&'static str>,
}

pub const DRBLK_BIN: &str = env!("CARGO_BIN_EXE_drblk");

impl Backend {
    /// `drblk serve --disk DISK --socket SOCKET EXTRA...` (started, listening).
    pub fn drblk(
        name: &str,
        disk: &Path,
        socket: &Path,
        extra: &[&str],
        cpus: Option<&str>,
    ) -> Backend {
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "--disk".into(),
            disk.into(),
            "--socket".into(),
            socket.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let mut b = Backend::new(
            name,
            socket,
            DRBLK_BIN.into(),
            args,
            cpus,
            Some("waiting for a vhost-user frontend"),
        );
        b.start();
        b
    }

    /// qemu-storage-daemon exporting `disk` as vhost-user-blk (io_uring, page cache).
    pub fn qsd(name: &str, disk: &Path, socket: &Path, queues: u16, cpus: Option<&str>) -> Backend {
        let args: Vec<OsString> = vec![
            "--blockdev".into(),
            format!("driver=file,node-name=f,filename={},aio=io_uring,cache.direct=off", disk.display()).into(),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            )
            .into(),
        ];
        let mut b = Backend::new(name, socket, "qemu-storage-daemon".into(), args, cpus, None);
        b.start();
        b
    }

    fn new(
        name: &str,
        socket: &Path,
        program: OsString,
        args: Vec<OsString>,
        cpus: Option<&str>,
        ready_line: Option<&'static str>,
    ) -> Backend {
        let logdir = socket.parent().unwrap().to_path_buf();
        Backend {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            spawn: Spawn {
                program,
                args,
                cpus: cpus.map(str::to_string),
            },
            child: None,
            log: PathBuf::new(),
            logdir,
            starts: 0,
            ready_line,
        }
    }

    /// Starts the process and waits (≤ 15 s) until it listens on the socket.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        self.starts += 1;
        self.log = self
            .logdir
            .join(format!("{}.{}.log", self.name, self.starts));
        let log = File::create(&self.log).unwrap();
        if self.ready_line.is_none() {
            // Readiness is the socket file appearing, so remove a stale one first.
            let _ = fs::remove_file(&self.socket);
        }
        let mut cmd = match &self.spawn.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&self.spawn.program);
                c
            }
            None => Command::new(&self.spawn.program),
        };
        cmd.args(&self.spawn.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.spawn.program));
        let ready = wait_until(Duration::from_secs(120), || {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            match self.ready_line {
                Some(line) => self.log_text().contains(line),
                None => self.socket.exists(),
            }
        });
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{} exited at start ({st}):\n{}", self.name, self.log_text());
        }
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not listen on {} within 15 s:\n{}",
                self.name,
                self.socket.display(),
                self.log_text()
            );
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait ≤ 10 s for a clean exit (else SIGKILL). Returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still alive.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The current incarnation's log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// All incarnations' logs, concatenated with headers.
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        for i in 1..=self.starts {
            let p = self.logdir.join(format!("{}.{i}.log", self.name));
            s.push_str(&format!(
                "--- {} #{i} ---\n{}",
                self.name,
                fs::read_to_string(p).unwrap_or_default()
            ));
        }
        s
    }

    /// Waits until the current log contains `needle` (or the process died), at most `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().contains(needle))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// SHA-256 of `data` as lowercase hex (the host's `sha256sum`; the guest has busybox's).
pub fn sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    // sha256sum reads all its input before writing 65 bytes: no deadlock.
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Shell helper for jobs: `find_disk SERIAL` prints the vdX whose serial is SERIAL.
pub const FIND_DISK_SH: &str = r#"
find_disk() {
    for d in $(drblk_disks); do
        [ "$(cat /sys/block/$d/serial 2>/dev/null)" = "$1" ] && { echo "$d"; return 0; }
    done
    echo "DRBLK-ERROR no disk with serial $1 (disks: $(drblk_disks))" >&2
    return 1
}
"#;
