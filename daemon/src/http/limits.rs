//! Rate limits and stream caps: per client address and per user on the
//! routes anyone can hammer (`/lti/login`, uploads, tickets), GCRA through
//! `governor`; open event streams per user and in all.
//!
//! The client address is the peer's, or the last entry of
//! `limits.client_ip_header` when a reverse proxy sets it (behind a proxy
//! every peer is the proxy). IPv6 addresses count by /64, the block one
//! client usually holds. Keys whose bucket is full again are dropped every
//! few hundred checks, so the maps hold the clients of about the last minute.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::AppState;
use crate::config::LimitsConfig;
use crate::error::Error;
use crate::slots::{Full, Slot, Slots};

/// Which limited route a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    Login,
    Upload,
    Ticket,
}

struct Limiter {
    keyed: DefaultKeyedRateLimiter<String>,
}

impl Limiter {
    fn new(per_minute: u32) -> Option<Limiter> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Limiter {
            keyed: DefaultKeyedRateLimiter::keyed(Quota::per_minute(n)),
        })
    }
}

/// The daemon's rate limiters and stream counts.
pub struct RateLimits {
    login_ip: Option<Limiter>,
    upload_ip: Option<Limiter>,
    upload_user: Option<Limiter>,
    ticket_ip: Option<Limiter>,
    ticket_user: Option<Limiter>,
    clock: DefaultClock,
    checks: AtomicU64,
    streams: Slots,
    max_streams: usize,
    max_streams_per_user: usize,
}

impl RateLimits {
    pub fn new(c: &LimitsConfig) -> RateLimits {
        RateLimits {
            login_ip: Limiter::new(c.login_per_ip_per_minute),
            upload_ip: Limiter::new(c.uploads_per_ip_per_minute),
            upload_user: Limiter::new(c.uploads_per_user_per_minute),
            ticket_ip: Limiter::new(c.tickets_per_ip_per_minute),
            ticket_user: Limiter::new(c.tickets_per_user_per_minute),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
            streams: Slots::default(),
            max_streams: c.max_streams,
            max_streams_per_user: c.max_streams_per_user,
        }
    }

    /// One request to a limited route from `ip` (and `user`, when known):
    /// `TooManyRequests` with the wait when over a limit.
    pub(crate) fn check(
        &self,
        route: Limited,
        ip: Option<IpAddr>,
        user: Option<&str>,
    ) -> Result<(), Error> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % 512 == 511 {
            self.prune();
        }
        let (by_ip, by_user) = match route {
            Limited::Login => (&self.login_ip, &None),
            Limited::Upload => (&self.upload_ip, &self.upload_user),
            Limited::Ticket => (&self.ticket_ip, &self.ticket_user),
        };
        if let (Some(l), Some(ip)) = (by_ip, ip) {
            self.one(l, ip_key(ip), route)?;
        }
        if let (Some(l), Some(u)) = (by_user, user) {
            self.one(l, u.to_owned(), route)?;
        }
        Ok(())
    }

    fn one(&self, l: &Limiter, key: String, route: Limited) -> Result<(), Error> {
        l.keyed.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Error::TooManyRequests {
                code: "rate_limited",
                message: format!(
                    "too many {} requests; try again in {} s",
                    match route {
                        Limited::Login => "login",
                        Limited::Upload => "upload",
                        Limited::Ticket => "ticket",
                    },
                    wait.as_secs().max(1)
                ),
                retry_after_secs: wait.as_secs().max(1),
            }
        })
    }

    /// Drops the keys whose bucket is full again.
    fn prune(&self) {
        for l in [
            &self.login_ip,
            &self.upload_ip,
            &self.upload_user,
            &self.ticket_ip,
            &self.ticket_user,
        ]
        .into_iter()
        .flatten()
        {
            l.keyed.retain_recent();
            l.keyed.shrink_to_fit();
        }
    }

    /// Keys held by all limiters (for tests and the admin view).
    pub fn keys(&self) -> usize {
        [
            &self.login_ip,
            &self.upload_ip,
            &self.upload_user,
            &self.ticket_ip,
            &self.ticket_user,
        ]
        .into_iter()
        .flatten()
        .map(|l| l.keyed.len())
        .sum()
    }

    /// Opens an event stream for `user`, or says no (per user and in all).
    pub(crate) fn open_stream(&self, user: &str) -> Result<StreamSlot, Error> {
        self.streams
            .take(user, self.max_streams_per_user, self.max_streams)
            .map_err(|full| Error::TooManyRequests {
                code: "too_many_streams",
                message: match full {
                    Full::Key(mine) => format!(
                        "you have {mine} live status streams open; close a tab and try again"
                    ),
                    Full::All => {
                        "the server has too many live status streams open; try again in a minute"
                            .into()
                    }
                },
                retry_after_secs: 30,
            })
    }

    /// Open event streams in all.
    pub fn streams(&self) -> usize {
        self.streams.held()
    }
}

/// An open event stream's place; given back when the stream is dropped.
pub(crate) type StreamSlot = Slot;

/// `/lti/login`: per client address (no user is known yet).
pub(crate) async fn login_limit(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
    next: Next,
) -> Response {
    match st.limits.check(Limited::Login, ip, None) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `limits.request_timeout` for every route but uploads (whose body is the
/// work), previews and purges; a stream answers at once, so its body is
/// never cut.
pub(crate) async fn request_timeout(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let t = st.config.limits.request_timeout;
    let path = req.uri().path();
    let upload = req.method() == Method::POST
        && (path.ends_with("/submissions") || path == "/api/v1/plugins");
    // A first preview transcodes (bounded by the intake timeout; cutting it
    // would only restart it on the next view), a purge deletes media.
    let long = path.ends_with("/preview") || path == "/api/v1/admin/purge";
    if t.is_zero() || upload || long {
        return next.run(req).await;
    }
    match tokio::time::timeout(t, next.run(req)).await {
        Ok(r) => r,
        Err(_) => Error::Unavailable(format!(
            "the server took longer than {} s to answer; try again",
            t.as_secs()
        ))
        .into_response(),
    }
}

/// IPv4 as is; IPv6 by its /64.
fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The client's address: the peer's, or from `limits.client_ip_header`.
pub(crate) struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(
            parts,
            &st.config.limits.client_ip_header,
        )))
    }
}

pub(crate) fn client_ip(parts: &Parts, header: &str) -> Option<IpAddr> {
    if !header.is_empty()
        && let Some(v) = parts.headers.get(header).and_then(|v| v.to_str().ok())
        && let Some(ip) = v
            .rsplit(',')
            .next()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
    {
        return Some(ip);
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(ip_key(a), ip_key(b));
        let m: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(ip_key(m), "192.0.2.7");
    }

    #[test]
    fn a_limit_refuses_with_a_wait_and_counts_per_key() {
        let c = LimitsConfig {
            tickets_per_user_per_minute: 5,
            ..LimitsConfig::default()
        };
        let l = RateLimits::new(&c);
        for _ in 0..5 {
            l.check(Limited::Ticket, None, Some("a")).expect("within");
        }
        match l.check(Limited::Ticket, None, Some("a")) {
            Err(Error::TooManyRequests {
                retry_after_secs, ..
            }) => assert!((1..=60).contains(&retry_after_secs)),
            other => panic!("{other:?}"),
        }
        l.check(Limited::Ticket, None, Some("b"))
            .expect("another user");
    }
}
