//! The control socket of a running daemon (`<socket>.ctl`, mode 0600): one JSON request per
//! line, one JSON answer per line. `drblk ctl` is its client.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"form-cg"}` (form a consistency group now),
//! `{"cmd":"drain"}` (form one last group and wait until it is committed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::blk::device::DeviceShared;
use crate::cg::Engine;
use crate::replicate::cycle::Cycle;
use crate::replicate::shipper::LinkStatus;

/// The control socket path for a vhost-user socket path.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Everything the control socket reports on and acts on.
pub struct ControlState {
    /// The device.
    pub shared: Arc<DeviceShared>,
    /// The consistency-group engine, if writes are tracked.
    pub engine: Option<Arc<Engine>>,
    /// The consistency-group cycle, if one runs.
    pub cycle: Mutex<Option<Cycle>>,
    /// The replication link, if the disk is replicated.
    pub link: Mutex<Option<Arc<LinkStatus>>>,
}

/// A running control socket; removed on drop.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale file; the caller holds the daemon lock).
    pub fn start(path: &Path, state: Arc<ControlState>) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("drblk-control".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let state = state.clone();
                            std::thread::spawn(move || {
                                if let Err(e) = serve_conn(conn, &state) {
                                    tracing::debug!(error = %e, "control connection ended");
                                }
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_conn(conn: UnixStream, state: &ControlState) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, state)
                .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")})),
            Err(e) => json!({"ok": false, "error": format!("not a JSON request: {e}")}),
        };
        writeln!(out, "{answer}")?;
    }
    Ok(())
}

/// The daemon's status as JSON (also what `drblk ctl status` prints).
pub fn status(state: &ControlState) -> Value {
    let s = &state.shared;
    let disk = s.executor.disk();
    let mut v = json!({
        "ok": true,
        "disk": disk.path().display().to_string(),
        "size": disk.size(),
        "readonly": disk.readonly(),
        "queues": s.limits.num_queues,
        "connections": s.stats.connections.load(Ordering::Relaxed),
        "requests": s.stats.requests.load(Ordering::Relaxed),
        "rejected": s.stats.rejected.load(Ordering::Relaxed),
    });
    if let Some(e) = state.engine.as_ref() {
        let st = e.stats();
        let mut c = st.coordination_ns.clone();
        c.sort_unstable();
        let pct = |q: f64| {
            c.get(((c.len().max(1) - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        v["cg"] = json!({
            "phase": format!("{:?}", st.phase),
            "last_committed": st.last_committed,
            "formed": st.formed,
            "committed": st.committed,
            "coordination_aborts": st.coordination_aborts,
            "abandoned": {
                "cache_full": st.abandoned_cache_full,
                "drain_timeout": st.abandoned_drain_timeout,
                "preserve_failed": st.abandoned_preserve_failed,
                "link_lost": st.abandoned_link_lost,
            },
            "freeze_us": {"p50": pct(0.5) as f64 / 1e3, "p99": pct(0.99) as f64 / 1e3, "max": st.coordination_max_ns as f64 / 1e3},
            "cow_bytes": st.cow_bytes,
            "cow_peak_bytes": st.cow_peak_bytes,
            "dirty_chunks": st.oos_dirty + st.cr_dirty,
        });
    }
    if let Some(cycle) = state.cycle.lock().expect("cycle lock").as_ref() {
        let cs = cycle.stats();
        let frozen = cs.last_commit_frozen_us.load(Ordering::SeqCst);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        v["replication"] = json!({
            "last_committed_cg": cs.last_committed.load(Ordering::SeqCst),
            "rpo_ms": if frozen > 0 { Some(now.saturating_sub(frozen) as f64 / 1e3) } else { None },
            "chunks_shipped": cs.chunks_shipped.load(Ordering::Relaxed),
            "bytes_shipped": cs.bytes_shipped.load(Ordering::Relaxed),
        });
    }
    if let Some(link) = state.link.lock().expect("link lock").as_ref() {
        v["link"] = json!({
            "connected": link.connected.load(Ordering::SeqCst),
            "secondary": link.remote_state.lock().expect("status lock").clone(),
            "connects": link.connects.load(Ordering::Relaxed),
            "full_resyncs": link.full_resyncs.load(Ordering::Relaxed),
        });
    }
    v
}

fn handle(req: &Value, state: &ControlState) -> anyhow::Result<Value> {
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => Ok(status(state)),
        Some("form-cg") => {
            let g = state.cycle.lock().expect("cycle lock");
            let cycle = g
                .as_ref()
                .context("no consistency-group cycle runs (no replication target)")?;
            cycle.trigger();
            Ok(json!({"ok": true}))
        }
        Some("drain") => {
            // Form groups until one that was formed after this request has committed: it then
            // holds every write completed before the request.
            let stats = {
                let g = state.cycle.lock().expect("cycle lock");
                let cycle = g
                    .as_ref()
                    .context("no consistency-group cycle runs (no replication target)")?;
                cycle.trigger();
                cycle.stats().clone()
            };
            let engine = state.engine.as_ref().context("no consistency groups")?;
            // CG numbers need not start at 1 (a restarted primary continues above what its
            // replica holds): the first CG formed from now on gets the next number.
            let target = engine.next_cg();
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let committed = stats.last_committed.load(Ordering::SeqCst);
                if committed >= target {
                    return Ok(json!({"ok": true, "cg": committed}));
                }
                if Instant::now() > deadline {
                    bail!(
                        "no consistency group committed within 300 s (last committed: {committed})"
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
                if let Some(c) = state.cycle.lock().expect("cycle lock").as_ref() {
                    c.trigger();
                }
            }
        }
        Some(other) => bail!("unknown command {other:?} (status, form-cg, drain)"),
        None => bail!("request needs a \"cmd\""),
    }
}

/// Sends one request to the control socket of the daemon serving `socket`.
pub fn request(socket: &Path, cmd: &str) -> anyhow::Result<Value> {
    let path = control_path(socket);
    let conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to {} (is `drblk serve --socket {}` running?)",
            path.display(),
            socket.display()
        )
    })?;
    let mut w = conn.try_clone()?;
    writeln!(w, "{}", json!({"cmd": cmd}))?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("bad answer from the daemon")?;
    if v.get("ok") == Some(&Value::Bool(false)) {
        bail!(
            "{}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
        );
    }
    Ok(v)
}
