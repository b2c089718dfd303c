//! Helpers shared by the integration tests: a served image in a temp dir.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use drblk_testkit::workload as dw;

pub mod sites;

use std::path::{Path, PathBuf};

use drblk::cli::ServeArgs;
use drblk::site::primary::Server;
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

/// Reads a whole device of `size` bytes through `f` (1 MiB at a time).
pub fn read_device(f: &mut TestFrontend, size: u64) -> Vec<u8> {
    const STEP: u64 = 1 << 20;
    let mut out = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(STEP as usize) {
        let len = STEP.min(size - off);
        let (st, _) = f
            .request(
                0,
                VIRTIO_BLK_T_IN,
                off / 512,
                &[Desc::w(DATA_BASE, len as u32)],
            )
            .unwrap();
        assert_eq!(st, 0, "read at {off}");
        out.extend(f.read_mem(DATA_BASE, len as usize).unwrap());
    }
    out
}

/// Writes `data` at `off` through `f`; returns the status byte.
pub fn write_device(f: &mut TestFrontend, off: u64, data: &[u8]) -> u8 {
    f.write_mem(DATA_BASE, data).unwrap();
    f.request(
        0,
        VIRTIO_BLK_T_OUT,
        off / 512,
        &[Desc::r(DATA_BASE, data.len() as u32)],
    )
    .unwrap()
    .0
}

/// A temp dir with an image (pre-filled with a pattern) served on a socket.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub socket: PathBuf,
    pub server: Option<Server>,
}

pub fn serve_args(dir: &Path, size: u64) -> ServeArgs {
    let mut a = ServeArgs::new(dir.join("disk.img"), dir.join("disk.sock"));
    a.size = Some(size);
    a.queues = 2;
    a.serial = Some("drblk-test-serial".into());
    a
}

/// Fills `path` (created with `size`) with a recognisable pattern, 4 KiB at a time.
pub fn fill_pattern(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut block = vec![0u8; 4096];
    for b in 0..size / 4096 {
        for (i, x) in block.iter_mut().enumerate() {
            *x = (b as u8).wrapping_mul(31).wrapping_add(i as u8);
        }
        f.write_all(&block).unwrap();
    }
}

pub fn start(size: u64, tweak: impl FnOnce(&mut ServeArgs)) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let mut args = serve_args(dir.path(), size);
    fill_pattern(&args.disk[0], size);
    tweak(&mut args);
    let server = Server::start(&args).unwrap();
    Served {
        disk: args.disk[0].clone(),
        socket: args.socket[0].clone(),
        dir,
        server: Some(server),
    }
}

pub fn checksum(path: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(path).unwrap())
}

/// Runs `drblk ctl --socket SOCK CMD` and returns its JSON answer read as a `T` (the command
/// must succeed): `drblk::control::PrimaryStatus` for `status`, `Reply<Drained>` for `drain`.
pub fn ctl<T: serde::de::DeserializeOwned>(sock: &Path, cmd: &str) -> T {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drblk"))
        .args(["ctl", "--socket"])
        .arg(sock)
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl {cmd}: unexpected answer ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `drblk ctl status`, typed.
pub fn ctl_status(sock: &Path) -> drblk::control::PrimaryStatus {
    ctl(sock, "status")
}

/// A child process (a `drblk` daemon) killed with SIGKILL and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP port free on loopback now (for a secondary to listen on).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `drblk cert --dir DIR/certs` (CA plus the primary's and the secondary's certificates).
pub fn make_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drblk"))
        .args(["cert", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    certs
}
