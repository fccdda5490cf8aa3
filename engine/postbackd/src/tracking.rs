//! The public tracking endpoints: clicks, server postbacks and pixels. Each appends the raw
//! request to the event log and answers only once the append is durable.

use crate::engine::Engine;
use crate::http::{ApiError, Body, Req};
use crate::pipeline::now_us;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use hyper::{Method, Response, StatusCode};
use postback_core::catalog::OfferStatus;
use postback_core::event::{ClickEvent, Event, PixelContext, PostbackEvent};
use postback_core::log::Keyed;
use postback_core::params::parse_form;
use std::sync::Arc;

/// The cookie that carries the last click id, per offer (`pbk_<offer>`) and overall (`pbk`).
const COOKIE: &str = "pbk";
/// Cookies live as long as the data does: three months.
const COOKIE_MAX_AGE: u32 = 92 * 86_400;

/// Appends the event; a failure is a 503 (the detail is logged, not sent).
async fn append(engine: &Engine, event: &Event) -> Result<(), ApiError> {
    engine
        .events
        .append(vec![Keyed::new(event.key(), event.to_json())])
        .await
        .map(|_| ())
        .map_err(|e| {
            engine.http_metrics.append_failures.increment(1);
            ApiError::Unavailable(format!("append failed: {e}"))
        })
}

/// `GET /click?offer_id=&pid=&sub1..8=`: records the click and redirects to the offer.
pub async fn click(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET && req.method != Method::HEAD {
        return Err(ApiError::Method);
    }
    let p = parse_form(req.query.as_bytes());
    let offer_id: u64 = match p.get("offer_id").map(|v| v.trim().parse()) {
        Some(Ok(id)) => id,
        _ => return Ok(crate::http::text(StatusCode::NOT_FOUND, "Offer not found")),
    };
    let Some(pid) = p.get("pid").and_then(|v| v.trim().parse::<u64>().ok()) else {
        return Ok(crate::http::text(
            StatusCode::BAD_REQUEST,
            "Missing or invalid pid",
        ));
    };
    let url = {
        let catalog = engine.catalog_read();
        match catalog.offer(offer_id) {
            Some(o) if o.status != OfferStatus::Stopped => o.url.clone(),
            _ => return Ok(crate::http::text(StatusCode::NOT_FOUND, "Offer not found")),
        }
    };
    let at_us = now_us();
    let click_id = engine.ids.next((at_us / 1_000_000) as u32).to_hex();
    let mut subs: Vec<String> = (1..=8)
        .map(|i| p.get(&format!("sub{i}")).unwrap_or("").to_string())
        .collect();
    while subs.last().is_some_and(String::is_empty) {
        subs.pop();
    }
    let event = ClickEvent {
        at_us,
        click_id: click_id.clone(),
        offer_id,
        pid,
        ip: req.client_ip.to_string(),
        ua: req.header("user-agent").to_string(),
        referrer: req.header("referer").to_string(),
        country: String::new(),
        subs,
    };
    let location = postback_core::macros::fill(&url, |name| match name {
        "clickid" | "click_id" => Some(click_id.clone()),
        "offer_id" | "offerid" => Some(offer_id.to_string()),
        "pid" => Some(pid.to_string()),
        _ => name
            .strip_prefix("sub")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=8).contains(n))
            .map(|n| event.sub(n).to_string()),
    });
    append(engine, &Event::Click(event)).await?;
    engine.http_metrics.clicks.increment(1);
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    h.insert(LOCATION, header_value(&location));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let secure = req
        .header("x-forwarded-proto")
        .eq_ignore_ascii_case("https");
    // Pixels fire from the advertiser's site: a cross-site request needs SameSite=None,
    // which browsers accept only on Secure cookies, so plain HTTP gets Lax.
    let attrs = if secure {
        "SameSite=None; Secure"
    } else {
        "SameSite=Lax"
    };
    for name in [format!("{COOKIE}_{offer_id}"), COOKIE.to_string()] {
        let cookie =
            format!("{name}={click_id}; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly; {attrs}");
        h.append(SET_COOKIE, header_value(&cookie));
    }
    Ok(r)
}

fn header_value(s: &str) -> HeaderValue {
    // Macro values are percent-encoded; an offer URL with raw control characters is cut.
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        let clean: String = s.chars().filter(|c| !c.is_control()).collect();
        HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("/"))
    })
}

fn postback_event(req: Req, pixel: Option<PixelContext>) -> PostbackEvent {
    let mut event = PostbackEvent {
        at_us: now_us(),
        ip: req.client_ip.to_string(),
        method: req.method.as_str().to_string(),
        content_type: req.header("content-type").to_string(),
        query: req.query,
        body: None,
        body_hex: None,
        pixel,
    };
    event.set_body(&req.body);
    event
}

/// `GET|POST /postback`: a server-to-server postback.
pub async fn postback(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET && req.method != Method::POST {
        return Err(ApiError::Method);
    }
    append(engine, &Event::Postback(postback_event(req, None))).await?;
    engine.http_metrics.s2s_postbacks.increment(1);
    let mut r = Response::new(Full::new(Bytes::from_static(br#"{"status":1}"#)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// A transparent 1x1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// `track.js` loaded without parameters: reads the page's `af*` variables and fires the image
/// pixel with them, as Affise's `<script>var afoffer_id=...</script>` snippet expects.
const TRACK_JS_LOADER: &str = r#"(function(){var w=window,p=[];
function a(k,v){if(v!==undefined&&v!==null&&v!=='')p.push(k+'='+encodeURIComponent(v));}
a('offer_id',w.afoffer_id);a('afstatus',w.afstatus);a('afgoal',w.afgoal);a('afprice',w.afprice);
a('afid',w.afid);a('afsecure',w.afsecure);a('clickid',w.afclick_id);
var s=document.currentScript&&document.currentScript.src||'';var base=s.replace(/track\.js.*$/,'');
(new Image()).src=base+'success.jpg?'+p.join('&');})();
"#;

/// `/success.jpg`, `/success.php`, `/track.js`: client-side pixels.
pub async fn pixel(engine: &Arc<Engine>, req: Req) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET && req.method != Method::POST {
        return Err(ApiError::Method);
    }
    let kind = req.path.trim_start_matches('/').to_string();
    let p = parse_form(req.query.as_bytes());
    if kind == "track.js" && p.is_empty() {
        return Ok(reply(&kind, TRACK_JS_LOADER.as_bytes()));
    }
    let offer = p.get("offer_id").unwrap_or("").trim().to_string();
    let cookie_click_id =
        cookie(&req, &format!("{COOKIE}_{offer}")).or_else(|| cookie(&req, COOKIE));
    let context = PixelContext {
        kind: kind.clone(),
        source: req.header("referer").to_string(),
        cookie_click_id,
    };
    append(engine, &Event::Postback(postback_event(req, Some(context)))).await?;
    engine.http_metrics.pixel_postbacks.increment(1);
    let body: &[u8] = match kind.as_str() {
        "success.jpg" => PIXEL,
        "success.php" => b"<!DOCTYPE html><html><body></body></html>",
        _ => b"",
    };
    Ok(reply(&kind, body))
}

fn reply(kind: &str, body: &[u8]) -> Response<Body> {
    let content_type = match kind {
        "success.jpg" => "image/gif",
        "success.php" => "text/html; charset=utf-8",
        _ => "application/javascript",
    };
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn cookie(req: &Req, name: &str) -> Option<String> {
    req.headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}
