//! Two sites started from the real binaries in a temp dir: `drblk secondary` and `drblk
//! serve --replicate-to` with certificates, logs in the dir, and the waits and `ctl` calls
//! the tests share.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::KillOnDrop;
use drblk::control::PrimaryStatus;

pub const BIN: &str = env!("CARGO_BIN_EXE_drblk");
/// Size of the primary's disk.
pub const SIZE: u64 = 16 << 20;

pub struct Sites {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub port: u16,
}

impl Sites {
    pub fn new(dir: &Path) -> Sites {
        let certs = super::make_certs(dir);
        std::fs::write(dir.join("primary.img"), vec![0u8; SIZE as usize]).unwrap();
        Sites {
            dir: dir.to_path_buf(),
            certs,
            port: super::free_udp_port(),
        }
    }

    pub fn replica(&self) -> PathBuf {
        self.dir.join("secondary.img")
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join("primary.sock")
    }

    pub fn spawn(&self, log: &str, args: &[&str], paths: &[(&str, &Path)]) -> KillOnDrop {
        self.spawn_env(log, args, paths, &[])
    }

    /// [`Sites::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        log: &str,
        args: &[&str],
        paths: &[(&str, &Path)],
        env: &[(&str, &str)],
    ) -> KillOnDrop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .unwrap();
        let mut c = Command::new(BIN);
        c.args(args);
        for (flag, p) in paths {
            c.arg(flag).arg(p);
        }
        c.envs(env.iter().copied());
        let child = c
            .env("RUST_LOG", "drblk=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        KillOnDrop(child)
    }

    pub fn secondary(&self) -> KillOnDrop {
        self.secondary_with(&[])
    }

    /// `drblk secondary` with `extra` arguments.
    pub fn secondary_with(&self, extra: &[&str]) -> KillOnDrop {
        self.secondary_env(extra, &[])
    }

    /// `drblk secondary` with `extra` arguments and environment variables.
    pub fn secondary_env(&self, extra: &[&str], env: &[(&str, &str)]) -> KillOnDrop {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec!["secondary", "--listen", &listen];
        args.extend_from_slice(extra);
        self.spawn_env(
            "secondary.log",
            &args,
            &[("--disk", &self.replica()), ("--certs", &self.certs)],
            env,
        )
    }

    /// The secondary's control socket (its default: STATE_DIR/ctl).
    pub fn control(&self) -> PathBuf {
        self.dir.join("secondary.img.state/ctl")
    }

    /// `drblk ctl --control CONTROL args...`.
    pub fn ctl_control(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["ctl", "--control"])
            .arg(self.control())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn primary(&self) -> KillOnDrop {
        self.primary_with(&[])
    }

    /// `drblk serve` with `extra` arguments.
    pub fn primary_with(&self, extra: &[&str]) -> KillOnDrop {
        self.primary_env(extra, &[])
    }

    /// `drblk serve` with `extra` arguments and environment variables.
    pub fn primary_env(&self, extra: &[&str], env: &[(&str, &str)]) -> KillOnDrop {
        let to = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "serve",
            "--queues",
            "2",
            "--replicate-to",
            &to,
            "--cg-interval",
            "20ms",
        ];
        args.extend_from_slice(extra);
        let mut d = self.spawn_env(
            "primary.log",
            &args,
            &[
                ("--disk", &self.dir.join("primary.img")),
                ("--socket", &self.sock()),
                ("--certs", &self.certs),
            ],
            env,
        );
        let ctl_socket = drblk::control::control_path(&self.sock());
        self.wait_until("the primary to listen", || {
            assert!(d.0.try_wait().unwrap().is_none(), "the primary exited");
            std::os::unix::net::UnixStream::connect(self.sock()).is_ok()
                && std::os::unix::net::UnixStream::connect(&ctl_socket).is_ok()
        });
        d
    }

    pub fn logs(&self) -> String {
        ["primary.log", "secondary.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Waits for `f`; the deadline only guards against hangs.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last group the secondary acknowledged, as the primary saw it.
    pub fn acked(&self) -> Option<u64> {
        let out = Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.sock())
            .arg("status")
            .output()
            .ok()?;
        let st: PrimaryStatus = serde_json::from_slice(&out.stdout).ok()?;
        st.replication.map(|r| r.last_committed_cg)
    }

    pub fn drblk(&self, args: &[&str], paths: &[(&str, &Path)]) -> Output {
        drblk(args, paths)
    }
}

/// `drblk args... FLAG PATH...`, run to its end.
pub fn drblk(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
