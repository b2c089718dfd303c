//! QUIC endpoints with mutual TLS 1.3 (rustls, `ring` provider) and throughput tuning.
//!
//! * TLS 1.3 only, ALPN `drblk/1` ([`ALPN`]) on both sides.
//! * Server: a client certificate is required and verified against the site CA
//!   ([`WebPkiClientVerifier`]); optionally it must also be valid for an expected peer
//!   site name (checked after the handshake).
//! * Client: verifies the server's certificate against the CA for the secondary's site
//!   name and presents its own certificate.
//! * Transport: the three flow-control windows are raised together (throughput is bounded
//!   by the smallest), keep-alive and idle timeout detect a blackholed path, and the UDP
//!   socket buffers are enlarged.
//! * Restarts: the secondary's connection-ID and stateless-reset keys are derived from its
//!   site key ([`endpoint`]), so a secondary that restarts (crash, `kill -9`, upgrade) answers the
//!   primary's next packet on the old connection with a reset the primary accepts: the
//!   primary reconnects at once instead of waiting out the idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::certs::SiteIdentity;
use super::proto::ALPN;
use super::LinkError;

/// Transport tuning shared by both ends of the link.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Per-stream receive window (bytes).
    pub stream_receive_window: u64,
    /// Per-connection receive window (bytes); the receiver's buffer bound.
    pub receive_window: u64,
    /// Per-connection send window (bytes of unacknowledged data in flight).
    pub send_window: u64,
    /// Keep-alive interval: an idle link still exchanges packets this often.
    pub keep_alive: Duration,
    /// Idle timeout: a link with no packet received for this long is declared lost.
    pub idle_timeout: Duration,
    /// Requested UDP socket send and receive buffer size (the kernel may cap it).
    pub socket_buffer: usize,
    /// Upper bound for MTU discovery (1452 suits Ethernet paths; loopback allows more).
    pub mtu_upper_bound: u16,
    /// Congestion controller.
    pub congestion: Congestion,
    /// How often the primary sends an application heartbeat (see
    /// [`crate::link::proto::HEARTBEAT_INTERVAL`], the default).
    pub heartbeat: Duration,
}

/// Congestion controller of the sending side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (quinn's default): loss-based; collapses on paths with random loss.
    #[default]
    Cubic,
    /// BBR (quinn's implementation is marked experimental): model-based, tolerates random
    /// loss far better, suits long fat WAN links.
    Bbr,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            stream_receive_window: 16 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            socket_buffer: 8 << 20,
            mtu_upper_bound: 1452,
            congestion: Congestion::Cubic,
            heartbeat: crate::link::proto::HEARTBEAT_INTERVAL,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, LinkError> {
    let mut store = RootCertStore::empty();
    for c in ca {
        store
            .add(c.clone())
            .map_err(|e| LinkError::Tls(format!("unusable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// Builds the transport configuration. `peer_streams` is the number of unidirectional
/// streams the peer may open at once (0 for the client side: the server opens none).
pub fn transport(t: &Tuning, peer_uni_streams: u32, peer_bidi_streams: u32) -> TransportConfig {
    let mut tc = TransportConfig::default();
    let clamp = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    tc.stream_receive_window(clamp(t.stream_receive_window))
        .receive_window(clamp(t.receive_window))
        .send_window(t.send_window)
        .keep_alive_interval(Some(t.keep_alive))
        .max_idle_timeout(IdleTimeout::try_from(t.idle_timeout).ok())
        .max_concurrent_uni_streams(VarInt::from_u32(peer_uni_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(peer_bidi_streams))
        .datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(t.mtu_upper_bound.max(1200));
    tc.mtu_discovery_config(Some(mtu));
    if t.congestion == Congestion::Bbr {
        tc.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    tc
}

/// Server (secondary) QUIC configuration: TLS 1.3, client certificate required.
pub fn server_config(
    id: &SiteIdentity,
    tuning: &Tuning,
    max_data_streams: u32,
) -> Result<quinn::ServerConfig, LinkError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider())
        .build()
        .map_err(|e| LinkError::Tls(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| LinkError::Tls(format!("server certificate/key: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(Arc::new(transport(tuning, max_data_streams, 1)));
    Ok(sc)
}

/// Client (primary) QUIC configuration: TLS 1.3, presents its certificate.
pub fn client_config(id: &SiteIdentity, tuning: &Tuning) -> Result<quinn::ClientConfig, LinkError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| LinkError::Tls(format!("client certificate/key: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(Arc::new(transport(tuning, 0, 0)));
    Ok(cc)
}

/// Binds a UDP socket with enlarged buffers and wraps it in a quinn endpoint.
/// Must be called inside a tokio runtime.
///
/// A server passes its identity: the keys its endpoint checks connection IDs with and
/// signs stateless resets with are then derived from the site's private key, the same after
/// every restart. With quinn's defaults (random keys per process), a restarted secondary
/// drops the primary's packets for the old connection as foreign (their connection IDs do
/// not check) and could not sign a reset the primary accepts anyway: the primary waited
/// out its idle timeout (10 s) on a connection that no longer existed. Now it is reset at
/// its next packet and reconnects.
pub fn endpoint(
    bind: SocketAddr,
    server: Option<(quinn::ServerConfig, &SiteIdentity)>,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, LinkError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |what: &'static str| move |e: std::io::Error| LinkError::Io(format!("{what}: {e}"));
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(io("udp socket"))?;
    if bind.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max for unprivileged users.
    let _ = sock.set_recv_buffer_size(tuning.socket_buffer);
    let _ = sock.set_send_buffer_size(tuning.socket_buffer);
    let rcv = sock.recv_buffer_size().unwrap_or(0);
    let snd = sock.send_buffer_size().unwrap_or(0);
    if rcv < tuning.socket_buffer || snd < tuning.socket_buffer {
        tracing::debug!(
            requested = tuning.socket_buffer,
            recv = rcv,
            send = snd,
            "UDP socket buffers capped by the kernel (raise net.core.rmem_max/wmem_max)"
        );
    }
    sock.bind(&bind.into()).map_err(io("udp bind"))?;
    let std_sock: std::net::UdpSocket = sock.into();
    let runtime = quinn::default_runtime()
        .ok_or_else(|| LinkError::Io("no async runtime for the QUIC endpoint".into()))?;
    let (endpoint_cfg, server) = match server {
        Some((sc, identity)) => {
            let mut ec = EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &derived_key(identity, "stateless reset"),
            )));
            let cid_key = derived_key(identity, "connection ids");
            let cid_key = u64::from_le_bytes(cid_key[..8].try_into().expect("32 bytes"));
            ec.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            (ec, Some(sc))
        }
        None => (EndpointConfig::default(), None),
    };
    quinn::Endpoint::new(endpoint_cfg, server, std_sock, runtime).map_err(io("quic endpoint"))
}

/// A key for `purpose` of a site's server endpoint: a one-way function of the site's
/// private key (which never leaves the process), stable across restarts.
fn derived_key(identity: &SiteIdentity, purpose: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"drblk QUIC endpoint key v1\0");
    ctx.update(purpose.as_bytes());
    ctx.update(b"\0");
    ctx.update(identity.key.secret_der());
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The certificate chain a connected peer presented, if any.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// Whether the leaf of `chain` is valid for DNS name `site` (chain trust was already
/// verified by TLS; this only checks the name).
pub fn cert_matches_site(chain: &[CertificateDer<'static>], site: &str) -> bool {
    let Some(leaf) = chain.first() else {
        return false;
    };
    let Ok(name) = ServerName::try_from(site.to_string()) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(ee) => ee.verify_is_valid_for_subject_name(&name).is_ok(),
        Err(_) => false,
    }
}
