//! The client side of the control socket: what `drblk ctl` uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use super::server::{control_path, Request};
use super::status::{Drained, PrimaryStatus};

/// Sends `req` to the control socket of the daemon serving `socket` and returns its
/// answer (`{"ok":true,...}`); an `{"ok":false,"error":...}` answer is an error.
pub fn request(socket: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let path = control_path(socket);
    UnixStream::connect(&path)
        .with_context(|| {
            format!(
                "connecting to {} (is `drblk serve --socket {}` running?)",
                path.display(),
                socket.display()
            )
        })
        .and_then(|conn| exchange(conn, req))
}

/// Sends `req` to the control socket at `path` itself (a secondary's `--control`).
pub fn request_at(path: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    UnixStream::connect(path)
        .with_context(|| {
            format!(
                "connecting to {} (is the daemon running? start it, or give its control socket: a secondary's is STATE_DIR/ctl)",
                path.display()
            )
        })
        .and_then(|conn| exchange(conn, req))
}

fn exchange(conn: UnixStream, req: Request) -> anyhow::Result<serde_json::Value> {
    let mut w = conn.try_clone()?;
    writeln!(w, "{}", serde_json::to_string(&req)?)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("bad answer from the daemon")?;
    if v.get("ok") == Some(&serde_json::Value::Bool(false)) {
        bail!(
            "{}",
            v.get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("request failed")
        );
    }
    Ok(v)
}

/// Sends `req` and reads the answer as a `T`.
pub fn request_as<T: DeserializeOwned>(socket: &Path, req: Request) -> anyhow::Result<T> {
    serde_json::from_value(request(socket, req.clone())?)
        .with_context(|| format!("unexpected answer from the daemon to {req:?}"))
}

/// The status of the daemon serving `socket`.
pub fn status(socket: &Path) -> anyhow::Result<PrimaryStatus> {
    request_as(socket, Request::Status)
}

/// Asks the daemon serving `socket` to form a consistency group now.
pub fn form_cg(socket: &Path) -> anyhow::Result<()> {
    request(socket, Request::FormCg).map(drop)
}

/// Asks the daemon serving `socket` to form one last group and waits until it has
/// committed; returns the last committed group.
pub fn drain(socket: &Path) -> anyhow::Result<u64> {
    request_as::<Drained>(socket, Request::Drain).map(|d| d.cg)
}
