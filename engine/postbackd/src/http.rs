//! The HTTP front end: connection handling, routing, and the one place where errors become
//! status codes.
//!
//! Nothing is read before it is routed and authorised: a request's route is known from its
//! path alone, `/3.0/` requests are checked for the key on their headers, and only then is a
//! body read, under a size limit per route and a memory budget shared by all requests.
//! Connections are capped; each one's header buffer is bounded by the largest request.

use crate::engine::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use postback_core::params::{parse_form, parse_json, Params};
use postback_core::seams::SeamError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

pub type Body = Full<Bytes>;

/// What the server sends: a whole body, or the live stream's.
pub type Served = http_body_util::Either<Body, Streamed>;

/// A body sent as it is made (the live stream, CSV exports): what a task sends on the channel,
/// until it ends or the client goes.
pub struct Streamed {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl Streamed {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Every way a request can fail, by what the client sees. Texts are the client's: details
/// that could reveal the host (OS errors, SQL) are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Token is necessary")]
    NoKey,
    #[error("Auth Denied")]
    WrongKey,
    #[error("{0}")]
    BadRequest(String),
    #[error("Resource Not Found")]
    NotFound,
    #[error("Page Not Found")]
    NoRoute,
    /// The route exists, but this process's roles leave it to others.
    #[error("Page Not Found: this process does not serve {0} (its roles: {1})")]
    NotServedHere(&'static str, crate::config::Roles),
    #[error("Method Not Allowed")]
    Method,
    #[error("Request is too large")]
    TooLarge,
    #[error("Request timed out")]
    Timeout,
    /// The backend cannot take the request now; the detail is logged.
    #[error("Service temporarily unavailable, please retry")]
    Unavailable(String),
    /// Too many requests in flight for the memory budget.
    #[error("Server is busy, please retry")]
    Busy,
    #[error("Server error, Please contact your administrator")]
    Internal(String),
}

impl From<SeamError> for ApiError {
    fn from(e: SeamError) -> Self {
        match e {
            SeamError::Unavailable(m) => ApiError::Unavailable(m),
            SeamError::Rejected(m) => ApiError::BadRequest(m),
            SeamError::Fatal(m) => ApiError::Internal(m),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoKey => StatusCode::UNAUTHORIZED,
            ApiError::WrongKey => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound | ApiError::NoRoute | ApiError::NotServedHere(..) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The Affise error envelope: both `message` and `error`, with the same text.
    pub fn into_response(self) -> Response<Body> {
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(%detail, "answering 503"),
            _ => {}
        }
        let text = self.to_string();
        json(
            self.status(),
            &serde_json::json!({"status": 2, "message": text, "error": text}),
        )
    }
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What a request is for, from its path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Postback,
    Click,
    Pixel,
    Health,
    Ready,
    Metrics,
    Stats,
    Admin,
    /// The web console's page and assets (`/`, `/console/...`).
    Console,
    Unknown,
}

impl Route {
    pub fn of(path: &str) -> Self {
        match path {
            "/postback" => Route::Postback,
            "/click" => Route::Click,
            "/success.jpg" | "/success.php" | "/track.js" => Route::Pixel,
            "/health" => Route::Health,
            "/ready" => Route::Ready,
            "/metrics" => Route::Metrics,
            p if p.starts_with("/3.0/stats/") => Route::Stats,
            p if p.starts_with("/3.0/") => Route::Admin,
            "/" | "/console/console.js" | "/console/console.css" => Route::Console,
            _ => Route::Unknown,
        }
    }

    fn is_tracking(self) -> bool {
        matches!(self, Route::Postback | Route::Click | Route::Pixel)
    }

    /// The label of the request-latency metric.
    fn metric(self) -> usize {
        match self {
            Route::Postback => 0,
            Route::Click => 1,
            Route::Pixel => 2,
            Route::Stats => 3,
            Route::Admin => 4,
            _ => 5,
        }
    }
}

/// A request, read whole: what the handlers see.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub client_ip: IpAddr,
}

impl Req {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Query and body parameters together (body after query), for the admin and stats APIs.
    pub fn params(&self) -> Result<Params, ApiError> {
        let mut p = parse_form(self.query.as_bytes());
        if !self.body.is_empty() {
            let body = if self.header("content-type").starts_with("application/json") {
                parse_json(&self.body).map_err(|e| ApiError::BadRequest(e.to_string()))?
            } else {
                parse_form(&self.body)
            };
            p.0.extend(body.0);
        }
        Ok(p)
    }
}

/// Accepts connections until `stop`, then drains the ones open (for up to 10 s). At most
/// `max_connections` are open at once; beyond that, new ones wait in the kernel's backlog.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
    only_metrics: bool,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let timeout = Duration::from_secs(engine.config.request_timeout_secs);
    let connections = Arc::new(Semaphore::new(engine.config.max_connections.max(1)));
    // A request line with its query, plus headers: anything longer is refused by hyper.
    let max_buf = (engine.config.max_request_bytes + 32 * 1024).max(8 * 1024);
    // Connections are served on the front end's own threads (`crate::cores`); the metrics
    // listener's few stay on the runtime that called.
    let cores = if only_metrics {
        None
    } else {
        match crate::cores::Cores::start(engine.config.http_threads(), "front-end") {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no threads of its own for HTTP; serving here");
                None
            }
        }
    };
    loop {
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let watcher = graceful.watcher();
        let serve_one = move |stream: tokio::net::TcpStream| async move {
            let service = hyper::service::service_fn(move |req| {
                let engine = engine.clone();
                async move {
                    let response = if only_metrics {
                        metrics_only(&engine, &req).map(Served::Left)
                    } else {
                        handle(engine, req, peer, timeout).await
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(max_buf)
                .serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
            drop(slot);
        };
        match &cores {
            // Moved to its thread's runtime, which then polls it and everything it starts.
            Some(cores) => match stream.into_std() {
                Ok(stream) => {
                    cores.next().spawn(async move {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => serve_one(stream).await,
                            Err(e) => tracing::debug!(error = %e, "connection not moved"),
                        }
                    });
                }
                Err(e) => tracing::debug!(error = %e, "connection not moved"),
            },
            None => {
                tokio::spawn(serve_one(stream));
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing them");
        }
    }
    if let Some(cores) = cores {
        let _ = tokio::task::spawn_blocking(move || cores.stop()).await;
    }
}

/// The kernel's queue of connections not yet accepted. mio's default, 128, overflowed when a
/// client opened a few hundred connections at once, and each SYN the kernel dropped was retried
/// only after a second: those requests took a second longer. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The separate metrics listener (`metrics_listen`): `/metrics` without a key, nothing else.
fn metrics_only(engine: &Engine, req: &Request<Incoming>) -> Response<Body> {
    match Route::of(req.uri().path()) {
        Route::Metrics => metrics(engine),
        _ => ApiError::NoRoute.into_response(),
    }
}

async fn handle(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    peer: SocketAddr,
    timeout: Duration,
) -> Response<Served> {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let route = Route::of(parts.uri.path());
    let path = parts.uri.path().trim_end_matches('/');
    if route == Route::Stats && (path == LIVE || path == CSV) {
        return streamed(&engine, &parts).await.map_or_else(
            |e| e.into_response().map(Served::Left),
            |r| r.map(Served::Right),
        );
    }
    let response = match respond(&engine, route, parts, body, peer, timeout).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    engine.http_metrics.latency[route.metric()].record(started.elapsed().as_secs_f64());
    response.map(Served::Left)
}

const LIVE: &str = "/3.0/stats/serverpostbacks/live";
const CSV: &str = "/3.0/stats/serverpostbacks/csv";

/// The live stream of new server postbacks (`crate::live`) and the CSV export
/// (`crate::export`): the key, the role, then the stream.
async fn streamed(
    engine: &Arc<Engine>,
    parts: &hyper::http::request::Parts,
) -> Result<Response<Streamed>, ApiError> {
    let query = parts.uri.query().unwrap_or("");
    authorize(engine, &parts.headers, query)?;
    if !engine.config.roles.api {
        return Err(ApiError::NotServedHere("the API", engine.config.roles));
    }
    if parts.method != Method::GET {
        return Err(ApiError::Method);
    }
    let params = parse_form(query.as_bytes());
    if parts.uri.path().trim_end_matches('/') == LIVE {
        crate::live::start(engine, &params)
    } else {
        crate::export::start(engine, &params).await
    }
}

/// Answers what needs no body, checks the key, then reads the body and hands the request on.
async fn respond(
    engine: &Arc<Engine>,
    route: Route,
    parts: hyper::http::request::Parts,
    body: Incoming,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Response<Body>, ApiError> {
    let query = parts.uri.query().unwrap_or("");
    match route {
        Route::Unknown => return Err(ApiError::NoRoute),
        Route::Health => return Ok(text(StatusCode::OK, "ok")),
        Route::Ready => return Ok(ready(engine)),
        Route::Metrics => {
            authorize(engine, &parts.headers, query)?;
            return Ok(metrics(engine));
        }
        Route::Stats | Route::Admin => authorize(engine, &parts.headers, query)?,
        Route::Postback | Route::Click | Route::Pixel => {}
        // The page and its assets hold no data; the data comes from /3.0/ with the key.
        Route::Console if !engine.config.roles.api => {
            return Err(ApiError::NotServedHere("the console", engine.config.roles))
        }
        Route::Console => return crate::console::asset(&parts.method, parts.uri.path()),
    }
    let roles = engine.config.roles;
    if route.is_tracking() && !roles.ingest {
        return Err(ApiError::NotServedHere("tracking requests", roles));
    }
    if matches!(route, Route::Stats | Route::Admin) && !roles.api {
        return Err(ApiError::NotServedHere("the API", roles));
    }
    let limit = if route.is_tracking() {
        engine.config.max_request_bytes
    } else {
        engine.config.max_api_body_bytes
    };
    if query.len() > limit {
        return Err(ApiError::TooLarge);
    }
    let (body, _budget) = read_body(engine, body, query.len(), limit, timeout).await?;
    let req = Req {
        client_ip: client_ip(engine, &parts.headers, peer),
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: query.to_string(),
        headers: parts.headers,
        body,
    };
    match route {
        Route::Postback => crate::tracking::postback(engine, req).await,
        Route::Click => crate::tracking::click(engine, req).await,
        Route::Pixel => crate::tracking::pixel(engine, req).await,
        Route::Stats => crate::stats::route(engine, req).await,
        _ => crate::admin::route(engine, req).await,
    }
}

/// How long a request waits for its share of the memory budget before it is answered 503: a
/// spent budget means an overload or an attack, and a quick refusal lets clients back off.
const MEMORY_WAIT: Duration = Duration::from_millis(500);

/// Reads a body of at most `limit` bytes, first taking its size (and the query's) from the
/// memory budget that all requests in flight share; the permit is held until the request is
/// answered. A request that cannot get its share within `MEMORY_WAIT` is answered 503.
async fn read_body(
    engine: &Engine,
    body: Incoming,
    query_len: usize,
    limit: usize,
    timeout: Duration,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let hint = body.size_hint();
    if hint.lower() as usize > limit {
        return Err(ApiError::TooLarge);
    }
    // Unknown length (chunked): reserve the most it may be.
    let expected = hint.exact().map_or(limit, |n| n as usize);
    let bytes = expected + query_len;
    let budget = if bytes == 0 {
        None
    } else {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let permit = tokio::time::timeout(
            MEMORY_WAIT,
            engine.request_memory.clone().acquire_many_owned(kib),
        )
        .await;
        match permit {
            Ok(Ok(p)) => Some(p),
            _ => {
                engine.http_metrics.busy.increment(1);
                return Err(ApiError::Busy);
            }
        }
    };
    if expected == 0 {
        return Ok((Bytes::new(), budget));
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => Ok((b.to_bytes(), budget)),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge)
        }
        Ok(Err(_)) => Err(ApiError::BadRequest("unreadable request body".into())),
        Err(_) => Err(ApiError::Timeout),
    }
}

/// The memory budget for request bodies and queries in flight, in KiB permits.
pub fn request_memory(bytes: usize) -> Arc<Semaphore> {
    let kib = (bytes / 1024).clamp(64, Semaphore::MAX_PERMITS);
    Arc::new(Semaphore::new(kib))
}

fn ready(engine: &Engine) -> Response<Body> {
    match engine.not_ready() {
        None => text(StatusCode::OK, "ready"),
        Some(why) => {
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "not ready");
            *r.body_mut() = Full::new(Bytes::from(format!("not ready: {why}")));
            r
        }
    }
}

fn metrics(engine: &Engine) -> Response<Body> {
    let body = engine
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

const ROUTES: [&str; 6] = ["postback", "click", "pixel", "stats", "admin", "other"];

/// Metric handles of the request path, registered once: looking a metric up by name on every
/// request costs more than the increment.
pub struct HttpMetrics {
    latency: [metrics::Histogram; 6],
    pub clicks: metrics::Counter,
    pub s2s_postbacks: metrics::Counter,
    pub pixel_postbacks: metrics::Counter,
    pub append_failures: metrics::Counter,
    /// Requests refused because the memory budget for requests in flight was spent.
    pub busy: metrics::Counter,
}

impl HttpMetrics {
    pub fn new() -> Self {
        Self {
            latency: ROUTES
                .map(|r| metrics::histogram!("postbackd_http_request_seconds", "route" => r)),
            clicks: metrics::counter!("postbackd_clicks_total"),
            s2s_postbacks: metrics::counter!("postbackd_postbacks_total", "kind" => "s2s"),
            pixel_postbacks: metrics::counter!("postbackd_postbacks_total", "kind" => "pixel"),
            append_failures: metrics::counter!("postbackd_append_failures_total"),
            busy: metrics::counter!("postbackd_http_busy_total"),
        }
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The client's address. Behind proxies (`trust_forwarded_for`), `X-Forwarded-For` is read from
/// the right: each proxy appends the address it saw, so entries a client wrote itself are on
/// the left. Addresses of `trusted_proxies` are skipped (the peer must be one of them, when
/// they are configured); the first other address is the client. Without `trusted_proxies`, one
/// proxy is trusted: the rightmost entry is the client.
pub fn client_ip(engine: &Engine, headers: &hyper::HeaderMap, peer: SocketAddr) -> IpAddr {
    forwarded_client(
        engine.config.trust_forwarded_for,
        &engine.trusted_proxies,
        headers,
        peer.ip(),
    )
}

fn forwarded_client(
    trust: bool,
    proxies: &[ipnet::IpNet],
    headers: &hyper::HeaderMap,
    peer: IpAddr,
) -> IpAddr {
    let trusted = |ip: &IpAddr| proxies.iter().any(|n| n.contains(ip));
    if !trust || (!proxies.is_empty() && !trusted(&peer)) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            // Garbage in the chain: nothing to its left can be trusted.
            break;
        };
        client = ip;
        if proxies.is_empty() || !trusted(&ip) {
            break;
        }
    }
    client
}

/// Checks the API key (header `API-Key`, or `Authorization: Bearer` as Prometheus sends it,
/// or, when `api_key_in_query` allows, query `api-key` / `API-Key`) in constant time.
fn authorize(engine: &Engine, headers: &hyper::HeaderMap, query: &str) -> Result<(), ApiError> {
    let header = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        });
    let given = match header {
        Some(v) => v,
        None if engine.config.api_key_in_query => parse_form(query.as_bytes())
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("api-key"))
            .map(|(_, v)| v.to_string())
            .ok_or(ApiError::NoKey)?,
        None => return Err(ApiError::NoKey),
    };
    if given.is_empty() {
        return Err(ApiError::NoKey);
    }
    if bool::from(given.as_bytes().ct_eq(engine.api_key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_is_read_from_the_right() {
        let peer = ip("10.0.0.2");
        let forged = xff(&["6.6.6.6, 1.2.3.4"]);
        // Not trusted: the peer.
        assert_eq!(forwarded_client(false, &[], &forged, peer), peer);
        // One proxy: the address it appended, not the one the client wrote.
        assert_eq!(forwarded_client(true, &[], &forged, peer), ip("1.2.3.4"));
        // Two proxies of ours: skip them from the right.
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let chain = xff(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(forwarded_client(true, &nets, &chain, peer), ip("1.2.3.4"));
        // A peer that is not one of our proxies is the client, whatever it says.
        assert_eq!(
            forwarded_client(true, &nets, &chain, ip("5.5.5.5")),
            ip("5.5.5.5")
        );
        // Garbage stops the walk at the last good address.
        let junk = xff(&["1.2.3.4, nonsense, 10.0.0.9"]);
        assert_eq!(forwarded_client(true, &nets, &junk, peer), ip("10.0.0.9"));
        assert_eq!(forwarded_client(true, &nets, &xff(&[]), peer), peer);
    }

    /// Connections a client opens at once all complete, even before any is accepted.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_in_syn_retries() {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let opened = tokio::task::spawn_blocking(move || {
            (0..600)
                .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.len())
        })
        .await
        .expect("connects");
        assert_eq!(opened.expect("every connection completes"), 600);
        drop(listener);
    }

    #[test]
    fn routes_are_known_from_the_path() {
        assert_eq!(Route::of("/postback"), Route::Postback);
        assert_eq!(Route::of("/track.js"), Route::Pixel);
        assert_eq!(Route::of("/3.0/stats/conversions"), Route::Stats);
        assert_eq!(Route::of("/3.0/offers"), Route::Admin);
        assert_eq!(Route::of("/3.0"), Route::Unknown);
        assert_eq!(Route::of("/"), Route::Console);
        assert_eq!(Route::of("/console/x.js"), Route::Unknown);
        assert_eq!(Route::of("/postback/"), Route::Unknown);
    }
}
