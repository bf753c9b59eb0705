//! The accept loop. `axum::serve` gives hyper no timer, so a client that
//! opens connections and sends its headers a byte a minute would hold them
//! forever; here every HTTP/1 connection must deliver a request's headers
//! within `limits.header_read_timeout` (also the longest a kept-alive
//! connection may sit idle between requests). HTTP/1.1 only: the daemon sits
//! behind a TLS proxy, and hyper's HTTP/1-or-2 sniffing reads the first
//! bytes with no timer at all. Each request carries the peer's address
//! (`ConnectInfo`) for the per-client limits.
//!
//! Shutdown stops accepting at once, lets requests in flight finish for up
//! to `limits.request_timeout` (at least 10 s), then closes what is left
//! (open event streams never finish on their own).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::config::LimitsConfig;

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &LimitsConfig,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(limits);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on
                    // (a connection reset before accept is not worth a pause).
                    if !is_per_connection(&e) {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            tower::ServiceExt::map_request(app, move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req.map(Body::new)
            });
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = limits.request_timeout.max(Duration::from_secs(10));
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::info!(seconds = grace.as_secs(), "closing connections still open after the shutdown grace");
        }
    }
}

/// The connection settings: the header-read timeout (0 = none).
fn builder(limits: &LimitsConfig) -> Builder {
    let mut b = Builder::new();
    let header = (!limits.header_read_timeout.is_zero()).then_some(limits.header_read_timeout);
    b.timer(TokioTimer::new()).header_read_timeout(header);
    b
}

/// Errors that concern one connection only (the peer went away before it
/// was accepted).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
