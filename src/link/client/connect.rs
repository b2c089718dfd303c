//! Connection setup of the primary: validates the configuration, binds the endpoint, runs
//! the QUIC + mutual TLS handshake, exchanges `Hello`/`HelloAck` on the control stream and
//! opens the data streams, all within `connect_timeout`. Independent of reconnects: each
//! attempt starts from the configuration alone (the caller supplies `last_committed_cg`).

use std::time::Duration;

use super::{describe_close, ClientConfig};
use crate::link::proto::{self, close_code, encode_frame, Hello, HelloAck, Message};
use crate::link::tls;
use crate::link::LinkError;

/// A connection that passed the handshake, with its streams open.
pub(super) struct Established {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) conn: quinn::Connection,
    /// Send half of the control stream (`Hello` was sent on it).
    pub(super) ctrl_send: quinn::SendStream,
    /// Receive half of the control stream (`HelloAck` was read from it).
    pub(super) ctrl_recv: quinn::RecvStream,
    /// The `cfg.data_streams` unidirectional data streams.
    pub(super) data: Vec<quinn::SendStream>,
    /// The secondary's handshake answer.
    pub(super) ack: HelloAck,
}

/// Connects to the secondary: QUIC + mutual TLS handshake, `Hello`/`HelloAck`, opens the
/// data streams. Bounded by `cfg.connect_timeout`.
pub(super) async fn establish(cfg: &ClientConfig) -> Result<Established, LinkError> {
    let Some(first) = cfg.disks.first() else {
        return Err(LinkError::InvalidArgument("no disk to replicate".into()));
    };
    if cfg.disks.len() > proto::MAX_GROUP_DISKS {
        return Err(LinkError::InvalidArgument(format!(
            "{} disks: a group has at most {}",
            cfg.disks.len(),
            proto::MAX_GROUP_DISKS
        )));
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        d.validate()?;
        if d.chunk_size != first.chunk_size {
            return Err(LinkError::InvalidArgument(format!(
                "disk {i} has chunk size {}, disk 0 {}: a group has one chunk size",
                d.chunk_size, first.chunk_size
            )));
        }
    }
    if !(1..=16).contains(&cfg.data_streams) {
        return Err(LinkError::InvalidArgument(format!(
            "data_streams {} not in 1..=16",
            cfg.data_streams
        )));
    }
    let cc = tls::client_config(&cfg.identity, &cfg.tuning)?;
    let endpoint = tls::endpoint(cfg.bind, None, &cfg.tuning)?;
    let t0 = tokio::time::Instant::now();
    let remaining = || cfg.connect_timeout.saturating_sub(t0.elapsed());
    let connecting = endpoint
        .connect_with(cc, cfg.server_addr, &cfg.server_name)
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let conn = match tokio::time::timeout(remaining(), connecting).await {
        Err(_) => return Err(LinkError::Timeout("QUIC/TLS handshake".into())),
        Ok(Err(e)) => {
            tracing::warn!(peer = %cfg.server_addr, "handshake with the secondary failed: {e}");
            return Err(LinkError::Connect(describe_close(&e)));
        }
        Ok(Ok(c)) => c,
    };
    let handshake = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| describe_close(&e))?;
        let hello = Message::Hello(Hello {
            magic: proto::HELLO_MAGIC,
            protocol_version: proto::PROTOCOL_VERSION,
            disks: cfg
                .disks
                .iter()
                .map(|d| proto::DiskDesc {
                    uuid: d.uuid,
                    size: d.size,
                })
                .collect(),
            chunk_size: first.chunk_size,
            last_committed_cg: cfg.last_committed_cg,
            site: cfg.identity.site.clone(),
            lineage: cfg.lineage.clone(),
            unshipped: cfg.unshipped,
        });
        let frame = encode_frame(&hello).map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let got = proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await;
        Ok::<_, String>((send, recv, got, buf))
    };
    let (send, recv, got, buf) = match tokio::time::timeout(remaining(), handshake).await {
        Err(_) => {
            conn.close(close_code::NORMAL.into(), b"handshake timeout");
            return Err(LinkError::Timeout("Hello/HelloAck".into()));
        }
        Ok(Err(e)) => return Err(handshake_failure(&conn, e).await),
        Ok(Ok(x)) => x,
    };
    let ack = match got {
        Ok(true) => match proto::decode_payload(&buf) {
            Ok(Message::HelloAck(ack)) => ack,
            Ok(Message::Reject(r)) => {
                tracing::warn!(peer = %cfg.server_addr, "secondary rejected the connection: {r}");
                conn.close(close_code::NORMAL.into(), b"rejected");
                return Err(LinkError::Rejected(r.to_string()));
            }
            Ok(m) => {
                conn.close(close_code::PROTOCOL_ERROR.into(), b"expected HelloAck");
                return Err(LinkError::Protocol(format!(
                    "expected HelloAck, got {}",
                    m.kind()
                )));
            }
            Err(e) => {
                conn.close(close_code::PROTOCOL_ERROR.into(), b"undecodable HelloAck");
                return Err(LinkError::Protocol(format!("undecodable HelloAck: {e}")));
            }
        },
        Ok(false) => return Err(handshake_failure(&conn, "control stream closed".into()).await),
        Err(e) => return Err(handshake_failure(&conn, e.to_string()).await),
    };
    if ack.protocol_version != proto::PROTOCOL_VERSION {
        conn.close(close_code::PROTOCOL_ERROR.into(), b"version");
        return Err(LinkError::Protocol(format!(
            "secondary acknowledged with protocol v{}",
            ack.protocol_version
        )));
    }
    if ack.disks.len() != cfg.disks.len() {
        conn.close(close_code::PROTOCOL_ERROR.into(), b"HelloAck disks");
        return Err(LinkError::Protocol(format!(
            "secondary answered for {} disks, the Hello announced {}",
            ack.disks.len(),
            cfg.disks.len()
        )));
    }
    let mut streams = Vec::new();
    for _ in 0..cfg.data_streams {
        match tokio::time::timeout(remaining().max(Duration::from_secs(1)), conn.open_uni()).await {
            Ok(Ok(s)) => streams.push(s),
            Ok(Err(e)) => return Err(LinkError::LinkLost(describe_close(&e))),
            Err(_) => {
                conn.close(close_code::NORMAL.into(), b"stream limit");
                return Err(LinkError::Connect(format!(
                    "secondary does not allow {} data streams",
                    cfg.data_streams
                )));
            }
        }
    }
    tracing::info!(
        peer = %cfg.server_addr,
        secondary = %ack.site,
        state = %ack.state,
        last_committed_cg = ?ack.last_committed_cg,
        streams = cfg.data_streams,
        "replication link up"
    );
    Ok(Established {
        endpoint,
        conn,
        ctrl_send: send,
        ctrl_recv: recv,
        data: streams,
        ack,
    })
}

/// Turns a handshake-phase failure into the most telling error: the secondary's close
/// reason (e.g. a `Reject` reason or a TLS alert) if the connection was closed.
async fn handshake_failure(conn: &quinn::Connection, what: String) -> LinkError {
    let reason = tokio::time::timeout(Duration::from_millis(500), conn.closed())
        .await
        .ok();
    match reason {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == close_code::REJECTED.into() =>
        {
            let r = String::from_utf8_lossy(&c.reason).to_string();
            tracing::warn!("secondary rejected the connection: {r}");
            LinkError::Rejected(r)
        }
        Some(e) => {
            tracing::warn!(
                "handshake with the secondary failed: {}",
                describe_close(&e)
            );
            LinkError::Connect(describe_close(&e))
        }
        None => {
            conn.close(close_code::NORMAL.into(), b"handshake failed");
            LinkError::Connect(what)
        }
    }
}
