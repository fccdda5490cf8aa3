//! The web console's static page and assets, compiled into the binary. They carry no data:
//! the page asks `/3.0/` for it with the API key the operator signs in with. Every answer
//! forbids everything the page does not need (`Content-Security-Policy`), content sniffing and
//! framing.

use crate::http::{ApiError, Body};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Scripts, styles and requests from this origin only; no inline code, no frames, no plugins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; \
    frame-ancestors 'none'";

pub fn asset(method: &Method, path: &str) -> Result<Response<Body>, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::Method);
    }
    let (body, content_type) = match path {
        "/" => (INDEX, "text/html; charset=utf-8"),
        "/console/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return Err(ApiError::NoRoute),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("content-security-policy", HeaderValue::from_static(POLICY));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_locked_down_and_only_read() {
        for path in ["/", "/console/console.js", "/console/console.css"] {
            let r = asset(&Method::GET, path).expect(path);
            let h = r.headers();
            assert!(h["content-security-policy"]
                .to_str()
                .expect("ascii")
                .contains("script-src 'self'"));
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h["x-frame-options"], "DENY");
        }
        assert!(matches!(asset(&Method::POST, "/"), Err(ApiError::Method)));
        assert!(matches!(
            asset(&Method::GET, "/console/other.js"),
            Err(ApiError::NoRoute)
        ));
        // The page runs no inline script (the policy would block it anyway).
        assert!(!INDEX.contains("<script>"));
    }
}
