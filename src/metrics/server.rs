//! The HTTP endpoint: `GET /metrics` on its own thread (tiny_http), answering what a
//! renderer returns at that moment. Anything else gets 404; the server never blocks the
//! daemon (a slow scraper holds only this thread).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;

/// What the endpoint answers: the exposition text, rendered per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// OpenMetrics text, as Prometheus asks for it.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics endpoint; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

/// A bound metrics listener that does not answer yet (see [`MetricsServer::bind`]).
pub struct BoundMetrics {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` (TCP) and serves `/metrics` from `render`.
    pub fn start(addr: &str, render: Render) -> anyhow::Result<MetricsServer> {
        Self::bind(addr)?.serve(render)
    }

    /// Takes the address first, so that a daemon refuses an address in use before it
    /// creates or changes anything; [`BoundMetrics::serve`] starts answering.
    pub fn bind(addr: &str) -> anyhow::Result<BoundMetrics> {
        let server = tiny_http::Server::http(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for metrics on {addr}: {e} (give a free HOST:PORT to --metrics, e.g. 127.0.0.1:9850)"
            )
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("the metrics listener has no IP address")?;
        Ok(BoundMetrics { server, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl BoundMetrics {
    /// Starts answering `GET /metrics` from `render`.
    pub fn serve(self, render: Render) -> anyhow::Result<MetricsServer> {
        let local = self.addr;
        let server = Arc::new(self.server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("drblk-metrics".into())
            .spawn(move || serve(&s, &render))
            .context("starting the metrics thread")?;
        tracing::info!(addr = %local, "metrics served at http://{local}/metrics");
        Ok(MetricsServer {
            server,
            addr: local,
            thread: Some(thread),
        })
    }
}

fn serve(server: &tiny_http::Server, render: &Render) {
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = match (request.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE)
                    .expect("a valid header");
                tiny_http::Response::from_string(render()).with_header(header)
            }
            _ => tiny_http::Response::from_string("drblk serves /metrics only\n")
                .with_status_code(404),
        };
        // A scraper that went away is not the daemon's problem.
        let _ = request.respond(response);
    }
    tracing::info!("metrics endpoint closed");
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
