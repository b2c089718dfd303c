//! Accepting primaries: the accept loop (bounded number of concurrent handshakes), the
//! QUIC/TLS handshake with the peer certificate check, `Hello` (version, site name, one
//! primary at a time, [`ReplicaSink::hello`](super::ReplicaSink::hello)), refusing peers
//! with `Reject`, and the end of a connection (the sink is told, the server freed).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::session::Session;
use super::{PeerInfo, ServerShared};
use crate::link::proto::{self, close_code, encode_frame, HelloAck, Message, RejectReason};
use crate::link::tls;

/// Accepts connection attempts until the endpoint is closed; each runs in its own task.
pub(super) async fn accept_loop(srv: Arc<ServerShared>, ep: quinn::Endpoint) {
    let handshakes = Arc::new(Semaphore::new(srv.cfg.max_handshakes.max(1)));
    while let Some(incoming) = ep.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            refused(
                &srv,
                incoming.remote_address(),
                format_args!("too many handshakes; refused"),
            );
            incoming.refuse();
            continue;
        };
        tokio::spawn(handle_connection(srv.clone(), incoming, permit));
    }
}

/// Logs why a connection attempt was refused or ended before its session: at most one
/// line per 10 s over all attempts, saying how many were left out (a flood of attempts
/// must not flood the log).
fn refused(srv: &ServerShared, peer: SocketAddr, what: std::fmt::Arguments<'_>) {
    if let Some(a) = srv.refusals.admit() {
        tracing::warn!(%peer, "{what}{}", a.note());
    }
}

/// Sends `Reject`, waits (bounded) until the primary has read it, then closes.
async fn reject(
    srv: &ServerShared,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    addr: SocketAddr,
    site: &str,
    r: RejectReason,
) {
    srv.counters.rejected.fetch_add(1, Ordering::Relaxed);
    // Its own limit: a flood of attempts must not hide why a real primary is refused.
    if let Some(a) = srv.rejections.admit() {
        tracing::warn!(peer = %addr, "rejecting primary {site:?}: {r}{}", a.note());
    }
    let text = proto::clip(&r.to_string());
    if let Ok(frame) = encode_frame(&Message::Reject(r)) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(close_code::REJECTED.into(), text.as_bytes());
}

async fn handle_connection(
    srv: Arc<ServerShared>,
    incoming: quinn::Incoming,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let addr = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            refused(&srv, addr, format_args!("connection attempt failed: {e}"));
            return;
        }
    };
    let conn = match tokio::time::timeout(srv.cfg.handshake_timeout, connecting).await {
        Err(_) => {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            refused(&srv, addr, format_args!("QUIC/TLS handshake timed out"));
            return;
        }
        Ok(Err(e)) => {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            refused(
                &srv,
                addr,
                format_args!("QUIC/TLS handshake failed, peer refused: {e}"),
            );
            return;
        }
        Ok(Ok(c)) => c,
    };
    srv.counters.connections.fetch_add(1, Ordering::Relaxed);
    let chain = tls::peer_chain(&conn).unwrap_or_default();
    if let Some(expected) = &srv.cfg.expected_peer {
        if !tls::cert_matches_site(&chain, expected) {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            refused(
                &srv,
                addr,
                format_args!("peer certificate is not for site {expected:?}; refused"),
            );
            conn.close(
                close_code::UNAUTHORIZED.into(),
                b"certificate not for the expected site",
            );
            return;
        }
    }
    // Hello, bounded in time.
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await {
            Ok(true) => Ok((send, recv, buf)),
            Ok(false) => Err("control stream ended before Hello".to_string()),
            Err(e) => Err(format!("malformed first frame: {e}")),
        }
    };
    let (send, recv, buf) = match tokio::time::timeout(srv.cfg.handshake_timeout, first).await {
        Err(_) => {
            refused(
                &srv,
                addr,
                format_args!("no Hello within {:?}; closing", srv.cfg.handshake_timeout),
            );
            conn.close(close_code::PROTOCOL_ERROR.into(), b"no Hello");
            return;
        }
        Ok(Err(e)) => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            refused(&srv, addr, format_args!("handshake failed: {e}; closing"));
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                proto::clip(&e).as_bytes(),
            );
            return;
        }
        Ok(Ok(x)) => x,
    };
    match proto::peek_hello_version(&buf) {
        Some(proto::PROTOCOL_VERSION) => {}
        Some(v) => {
            let r = RejectReason::VersionMismatch {
                ours: proto::PROTOCOL_VERSION,
                theirs: v,
            };
            return reject(&srv, &conn, send, addr, "?", r).await;
        }
        None => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            refused(
                &srv,
                addr,
                format_args!("first frame is not a Hello; closing"),
            );
            conn.close(close_code::PROTOCOL_ERROR.into(), b"expected Hello");
            return;
        }
    }
    let hello = match proto::decode_payload(&buf) {
        Ok(Message::Hello(h)) => h,
        Ok(m) => {
            refused(
                &srv,
                addr,
                format_args!("expected Hello, got {}; closing", m.kind()),
            );
            conn.close(close_code::PROTOCOL_ERROR.into(), b"expected Hello");
            return;
        }
        Err(e) => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            refused(&srv, addr, format_args!("undecodable Hello: {e}; closing"));
            conn.close(close_code::PROTOCOL_ERROR.into(), b"undecodable Hello");
            return;
        }
    };
    let site = proto::clip(&hello.site);
    if !tls::cert_matches_site(&chain, &site) {
        let r = RejectReason::Other(format!(
            "Hello claims site {site:?}, but the client certificate is not for that name"
        ));
        return reject(&srv, &conn, send, addr, &site, r).await;
    }
    let serving = super::Serving {
        site: site.clone(),
        disks: hello.disks.clone(),
        chunk_size: hello.chunk_size,
        conn: conn.clone(),
    };
    if !take_the_server(&srv, serving).await {
        return reject(&srv, &conn, send, addr, &site, RejectReason::Busy).await;
    }
    let peer = PeerInfo {
        addr,
        site: site.clone(),
    };
    let (sink, h, p) = (srv.sink.clone(), hello.clone(), peer.clone());
    let ack = match srv.sink_thread.call(move || sink.hello(&h, &p)).await {
        Ok(Ok(ack)) => ack,
        Err(gone) => {
            free_the_server(&srv);
            conn.close(close_code::SHUTDOWN.into(), gone.to_string().as_bytes());
            return;
        }
        Ok(Err(r)) => {
            free_the_server(&srv);
            return reject(&srv, &conn, send, addr, &site, r).await;
        }
    };
    let session = Session::new(
        srv.clone(),
        conn.clone(),
        peer,
        &hello,
        send,
        ack.last_committed_cg,
    );
    let ack = HelloAck {
        protocol_version: proto::PROTOCOL_VERSION,
        ..ack
    };
    if let Err(e) = session.send_ctrl(&Message::HelloAck(ack.clone())).await {
        refused(&srv, addr, format_args!("sending HelloAck failed: {e}"));
        // No session runs (nor its silence watchdog): close, or the peer's keep-alives
        // would hold the server busy.
        conn.close(close_code::PROTOCOL_ERROR.into(), b"HelloAck not delivered");
    } else {
        tracing::info!(
            peer = %addr, site = %site, state = %ack.state,
            last_committed_cg = ?ack.last_committed_cg,
            "primary connected"
        );
        session.start(recv);
    }
    drop(handshake_permit);
    let reason = match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "closed by the primary (code {}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::LocallyClosed => "closed locally".into(),
        quinn::ConnectionError::TimedOut => "idle timeout: no packet from the primary".into(),
        e => e.to_string(),
    };
    tracing::info!(peer = %addr, site = %site, "primary disconnected: {reason}");
    // Let the session's tasks observe the closed connection before the sink is told.
    drop(session);
    let sink = srv.sink.clone();
    let r2 = reason.clone();
    let _ = srv.sink_thread.call(move || sink.disconnected(&r2)).await;
    free_the_server(&srv);
}

/// Makes this connection the one the server serves (`busy`). If another session holds it
/// for the same site *and the same disks*, that session is closed and this one waits (at
/// most the handshake timeout) until it has ended: a primary that restarted, or lost its
/// link without the secondary noticing, would otherwise be refused as `Busy` until QUIC's
/// idle timeout ends its old session. The certificate was checked for the site already.
/// The disks must match too because one site runs a primary per disk with one certificate:
/// a primary pointed at another disk's secondary must be refused, not cut that disk's
/// replication. False: busy with another session, or the old one did not end in time.
async fn take_the_server(srv: &ServerShared, new: super::Serving) -> bool {
    let deadline = tokio::time::Instant::now() + srv.cfg.handshake_timeout;
    loop {
        // Registered before the attempt, so that a release in between is not missed.
        let freed = srv.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if let Some(taken) = try_take(srv, &new) {
            return taken;
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            return false;
        }
    }
}

/// One attempt of [`take_the_server`]: `Some(true)` taken, `Some(false)` refused, `None`
/// the same primary's old session was told to close (wait for it to end).
fn try_take(srv: &ServerShared, new: &super::Serving) -> Option<bool> {
    // Under `current`'s lock, so that whoever sees `busy` set also sees whom it serves.
    let mut current = super::lock(&srv.current);
    if srv
        .busy
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        *current = Some(new.clone());
        return Some(true);
    }
    match &*current {
        Some(old)
            if old.site == new.site
                && old.disks == new.disks
                && old.chunk_size == new.chunk_size =>
        {
            if old.conn.close_reason().is_none() {
                let site = &new.site;
                tracing::info!(site, "a new connection from site {site:?} for the same disks replaces its previous session (restarted primary, or a link lost without notice)");
                old.conn.close(
                    close_code::NORMAL.into(),
                    b"replaced by a new connection from the same site",
                );
            }
            None
        }
        _ => Some(false),
    }
}

/// The session ended and the sink was told: the next primary may connect.
fn free_the_server(srv: &ServerShared) {
    let mut current = super::lock(&srv.current);
    current.take();
    srv.busy.store(false, Ordering::Release);
    drop(current);
    srv.freed.notify_waiters();
}
