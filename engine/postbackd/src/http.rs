//! The HTTP front end: connection handling, routing, and the one place where errors become
//! status codes.

use crate::engine::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use postback_core::params::{parse_form, parse_json, Params};
use postback_core::seams::SeamError;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

pub type Body = Full<Bytes>;

/// Every way a request can fail, by what the client sees.
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
    #[error("Method Not Allowed")]
    Method,
    #[error("Request is too large")]
    TooLarge,
    #[error("Request timed out")]
    Timeout,
    #[error("Service unavailable: {0}")]
    Unavailable(String),
    #[error("Server error, Please contact your administrator")]
    Internal(String),
}

impl From<SeamError> for ApiError {
    fn from(e: SeamError) -> Self {
        match e {
            SeamError::Unavailable(m) => ApiError::Unavailable(m),
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
            ApiError::NotFound | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The Affise error envelope: both `message` and `error`, with the same text.
    pub fn into_response(self) -> Response<Body> {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
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

/// Accepts connections until `stop`, then drains the ones open (for up to 10 s).
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let timeout = Duration::from_secs(engine.config.request_timeout_secs);
    loop {
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
        let service = hyper::service::service_fn(move |req| {
            let engine = engine.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(engine, req, peer, timeout).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .max_buf_size(256 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing them");
        }
    }
}

async fn handle(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    peer: SocketAddr,
    timeout: Duration,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let tracking = matches!(
        parts.uri.path(),
        "/postback" | "/click" | "/success.jpg" | "/success.php" | "/track.js"
    );
    let limit = if tracking {
        engine.config.max_request_bytes
    } else {
        4 << 20
    };
    let query = parts.uri.query().unwrap_or("").to_string();
    if query.len() > limit {
        return ApiError::TooLarge.into_response();
    }
    let body = match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return ApiError::TooLarge.into_response()
        }
        Ok(Err(_)) => {
            return ApiError::BadRequest("unreadable request body".into()).into_response()
        }
        Err(_) => return ApiError::Timeout.into_response(),
    };
    let client_ip = client_ip(&engine, &parts.headers, peer);
    let req = Req {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        headers: parts.headers,
        body,
        client_ip,
    };
    let route = route_index(&req.path);
    let response = match route_request(&engine, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    engine.http_metrics.latency[route].record(started.elapsed().as_secs_f64());
    response
}

const ROUTES: [&str; 6] = ["postback", "click", "pixel", "stats", "admin", "other"];

fn route_index(path: &str) -> usize {
    match path {
        "/postback" => 0,
        "/click" => 1,
        "/success.jpg" | "/success.php" | "/track.js" => 2,
        p if p.starts_with("/3.0/stats/") => 3,
        p if p.starts_with("/3.0/") => 4,
        _ => 5,
    }
}

/// Metric handles of the request path, registered once: looking a metric up by name on every
/// request costs more than the increment.
pub struct HttpMetrics {
    latency: [metrics::Histogram; 6],
    pub clicks: metrics::Counter,
    pub s2s_postbacks: metrics::Counter,
    pub pixel_postbacks: metrics::Counter,
    pub append_failures: metrics::Counter,
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
        }
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn client_ip(engine: &Engine, headers: &hyper::HeaderMap, peer: SocketAddr) -> IpAddr {
    if engine.config.trust_forwarded_for {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer.ip()
}

async fn route_request(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    match req.path.as_str() {
        "/postback" => crate::tracking::postback(engine, req).await,
        "/click" => crate::tracking::click(engine, req).await,
        "/success.jpg" | "/success.php" | "/track.js" => crate::tracking::pixel(engine, req).await,
        "/health" => Ok(text(StatusCode::OK, "ok")),
        "/ready" => Ok(if engine.ready.load(Ordering::Acquire) {
            text(StatusCode::OK, "ready")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
        }),
        "/metrics" => {
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
            Ok(r)
        }
        p if p.starts_with("/3.0/") => {
            authorize(engine, &req)?;
            if p.starts_with("/3.0/stats/") {
                crate::stats::route(engine, req).await
            } else {
                crate::admin::route(engine, req).await
            }
        }
        _ => Err(ApiError::NoRoute),
    }
}

/// Checks the API key (header `API-Key`, or query `api-key` / `API-Key`) in constant time.
fn authorize(engine: &Engine, req: &Req) -> Result<(), ApiError> {
    let from_query = || {
        let q = parse_form(req.query.as_bytes());
        let key = q
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("api-key"))
            .map(|(_, v)| v.to_string());
        key
    };
    let given = match req.headers.get("api-key").and_then(|v| v.to_str().ok()) {
        Some(v) => v.to_string(),
        None => from_query().ok_or(ApiError::NoKey)?,
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
