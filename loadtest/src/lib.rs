//! # pbload
//!
//! An open-loop load generator for the postback engine. It speaks only HTTP: it sets up its
//! own advertiser, offer, partner and (optionally) a postback setting through the admin API,
//! then sends a realistic mix of clicks, server postbacks (GET and POST), pixels, duplicates,
//! status updates and bad postbacks at a rate set by the clock, not by the replies, so that
//! latency under overload is measured, not hidden. Latency counts from when a request was
//! *due*, so a backlog in the generator shows too.
//!
//! With `verify`, it then checks through the stats API that every postback that got a 200 is
//! in the log exactly once with the expected outcome, and it samples the end-to-end lag
//! (accepted → visible in the stats) during the run.
//!
//! It is not a general HTTP benchmark tool, and it never targets anything but the address it
//! is given.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod closed;
mod receiver;

pub use closed::{cpu_seconds, run_closed, ClosedOptions, ClosedReport, CpuShare};

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Scenario {
    /// Clicks, postbacks, pixels, duplicates, updates and bad postbacks (needs the engine).
    Full,
    /// Only `GET /postback?...` with random click ids: the same requests to any server, for
    /// comparing the engine with baseline servers.
    Postback,
    /// Only `GET /click?...` (needs the engine).
    Click,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Base URLs of the engines: requests go to each in turn (one engine, or a cluster's);
    /// setup and verification go through the first.
    pub targets: Vec<String>,
    pub api_key: String,
    pub scenario: Scenario,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    /// Requests under way at most; beyond it a request is counted as `overloaded`, not sent.
    pub max_in_flight: usize,
    /// Keep-alive connections per target of the raw open loop (`run_raw`), each carrying one
    /// request at a time: a server answering in L seconds can be driven at N/L req/s at most.
    pub open_connections: usize,
    pub verify: bool,
    /// An affiliate postback URL to configure (e.g. a sink), if any.
    pub affiliate_url: Option<String>,
    /// Receive the run's affiliate postbacks here (a loopback port of pbload's own), and with
    /// `verify` check that each conversion state arrived exactly once.
    pub receive_postbacks: bool,
    /// The server's process ids, to measure the CPU it spends per request beside pbload's own.
    pub server_pids: Vec<u32>,
    pub quiet: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub scenario: String,
    pub rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub ok: u64,
    /// Answers other than the expected status, and transport errors.
    pub errors: u64,
    /// Requests not sent because `max_in_flight` were under way.
    pub overloaded: u64,
    pub achieved_rps: f64,
    pub latency: Percentiles,
    pub by_kind: HashMap<String, Percentiles>,
    pub e2e_lag: Option<Percentiles>,
    pub verify: Option<Verification>,
    /// CPU per request of the generator and the server (see `CpuShare`).
    pub cpu: CpuShare,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    pub expected: u64,
    pub found_once: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub wrong_outcome: u64,
    /// Duplicates sent on another click than their original's (likely another partition),
    /// and how many of them the engine saw before their original.
    pub cross_duplicates: u64,
    pub cross_duplicates_first: u64,
    /// With `receive_postbacks`: the affiliate postback checks.
    pub deliveries: Option<DeliveryCheck>,
    /// Up to ten examples of what went wrong.
    pub problems: Vec<String>,
}

/// Each state of each of the run's conversions (its action id and status) delivered to the
/// run's affiliate once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryCheck {
    pub expected: u64,
    pub once: u64,
    pub missing: u64,
    pub duplicated: u64,
    /// Deliveries of states no conversion had.
    pub unexpected: u64,
    /// Deliveries of status updates whose answer was lost (the connection broke, as when an
    /// engine is killed): the engine may have logged such a request before it went, so its
    /// state may or may not arrive; neither is a fault.
    pub answer_lost: u64,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.wrong_outcome == 0
            && self.expected > 0
            && self.deliveries.as_ref().is_none_or(|d| {
                d.missing == 0 && d.duplicated == 0 && d.unexpected == 0 && d.expected > 0
            })
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A thin HTTP client for the target.
#[derive(Clone)]
pub struct Target {
    base: String,
    api_key: String,
    client: HttpClient,
    /// Tracking GETs go here instead of through `client` (see `closed::RawPool`).
    raw: Option<Arc<closed::RawPool>>,
}

impl Target {
    pub fn new(base: &str, api_key: &str, connections: usize) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
        Self {
            base: base.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            client,
            raw: None,
        }
    }

    /// Sends tracking requests (everything but the API under `/3.0/`) over raw keep-alive
    /// connections: they cost the generator a few microseconds where hyper's client costs
    /// tens. A redirect's answer is its `Location`, as through the client.
    pub fn with_raw_tracking(mut self) -> Self {
        self.raw = closed::RawPool::new(&self.base).map(Arc::new);
        self
    }

    /// Sends a request; returns the status and the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> anyhow::Result<(u16, Bytes)> {
        if let Some(raw) = &self.raw {
            if !path.starts_with("/3.0/") {
                let body = body.as_ref().map(|(t, b)| (*t, b.as_str()));
                let (status, bytes) = raw.request(method.as_str(), path, body).await?;
                return Ok((status, Bytes::from(bytes)));
            }
        }
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if path.starts_with("/3.0/") {
            req = req.header("API-Key", &self.api_key);
        }
        let body = match body {
            Some((content_type, b)) => {
                req = req.header("content-type", content_type);
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self.client.request(req.body(body)?).await?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        if status == 302 {
            let location = parts
                .headers
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Ok((status, Bytes::from(location.to_string())));
        }
        Ok((status, bytes))
    }

    async fn admin(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let (status, bytes) = self
            .send(
                Method::POST,
                path,
                Some(("application/x-www-form-urlencoded", body)),
            )
            .await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        if status != 200 || value["status"] != 1 {
            bail!("{path} answered {status}: {value}");
        }
        Ok(value)
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, bytes) = self.send(Method::GET, path, None).await?;
        if status != 200 {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const SECURE: &str = "pbload-secure";

/// What the run set up.
struct Setup {
    offer_id: u64,
    pid: u64,
}

async fn setup(target: &Target, affiliate_url: Option<&str>) -> anyhow::Result<Setup> {
    let adv = target
        .admin(
            "/3.0/admin/advertiser",
            &[("title", "pbload"), ("secure", SECURE)],
        )
        .await?;
    let adv_id = adv["advertiser"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let offer = target
        .admin(
            "/3.0/admin/offer",
            &[
                ("title", "pbload offer"),
                ("advertiser", &adv_id),
                ("url", "https://landing.example/?clickid={clickid}&s={sub1}"),
                ("payments[0][goal]", "1"),
                ("payments[0][total]", "1.5"),
                ("payments[0][revenue]", "2"),
                ("payments[1][goal]", "sale"),
                ("payments[1][type]", "percent"),
                ("payments[1][total]", "10"),
                ("payments[1][revenue]", "15"),
            ],
        )
        .await?;
    let offer_id = offer["offer"]["id"].as_u64().context("offer id")?;
    let partner = target
        .admin("/3.0/admin/partner", &[("email", "pbload@example.com")])
        .await?;
    let pid = partner["partner"]["id"].as_u64().context("partner id")?;
    if let Some(url) = affiliate_url {
        target
            .admin(
                "/3.0/partner/postback",
                &[("partner_id", &pid.to_string()), ("url", url)],
            )
            .await?;
    }
    Ok(Setup { offer_id, pid })
}

/// Waits until another engine of a cluster knows the run's offer (catalog changes reach every
/// engine within about a second): one click on it, until it redirects.
async fn seen_by(target: &Target, offer_id: u64, pid: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = target
            .send(
                Method::GET,
                &format!("/click?offer_id={offer_id}&pid={pid}"),
                None,
            )
            .await?;
        if status == 302 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{}: the run's offer is unknown after 10 s", target.base);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request of the mix, and what the engine should log for it.
struct Planned {
    kind: &'static str,
    method: Method,
    path: String,
    body: Option<String>,
    /// The outcome text expected in the log (empty for success), for postbacks.
    expect: Option<&'static str>,
    /// The token that finds this postback in the log.
    token: Option<String>,
    /// Follow-ups that become possible once this one is acknowledged.
    on_ok: FollowUp,
    /// The postback's action id is its token (so the lag probe can find it by action id).
    action_is_token: bool,
    /// For a duplicate on another click (so, likely, another partition and another process):
    /// the token of the postback it duplicates. Which of the two the engine sees first is not
    /// fixed, so either may be the one that registers the conversion.
    twin_of: Option<String>,
    /// For a status update of a pending conversion: the conversion's action id.
    update_of: Option<String>,
}

enum FollowUp {
    None,
    /// A click: its id comes from the redirect.
    Click,
    /// A conversion that can be duplicated, or updated if it is pending.
    Conversion {
        query: String,
        pending: bool,
        token: String,
    },
}

/// State the mix draws from: clicks and conversions already acknowledged.
#[derive(Default)]
struct Pool {
    clicks: Vec<String>,
    conversions: Vec<String>,
    pending: Vec<String>,
    /// Conversions that are not pending and not yet duplicated on another click, with their
    /// tokens.
    crossable: Vec<(String, String)>,
}

struct Plan {
    run: String,
    seq: AtomicU64,
    pool: Mutex<Pool>,
    offer_id: u64,
    /// The run's partner: every click is its.
    pid: u64,
}

impl Plan {
    fn token(&self) -> String {
        format!(
            "R{}x{}Z",
            self.run,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn next(&self, scenario: Scenario, rng: &mut impl Rng) -> Planned {
        let (offer, pid) = (self.offer_id, self.pid);
        match scenario {
            Scenario::Postback => {
                let token = self.token();
                // 96 random bits, as 24 hex digits.
                let click = format!("{:024x}", rng.random::<u128>() >> 32);
                let path =
                    format!("/postback?clickid={click}&action_id={token}&goal=1&sum=10&lt={token}");
                return plain(path, token);
            }
            Scenario::Click => return click(offer, pid, rng),
            Scenario::Full => {}
        }
        let roll: f64 = rng.random();
        let (click_id, dup, update, cross) = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.clicks.len() < 20 {
                drop(pool);
                return click(offer, pid, rng);
            }
            // Postbacks favour recent clicks: most arrive minutes, not days, after the click.
            let n = pool.clicks.len();
            let back = (rng.random::<f64>().powi(3) * n as f64) as usize;
            let click_id = pool.clicks[n - 1 - back.min(n - 1)].clone();
            let dup = (!pool.conversions.is_empty()).then(|| {
                let i = rng.random_range(0..pool.conversions.len());
                pool.conversions[i].clone()
            });
            let update = if rng.random_bool(0.05) {
                pool.pending.pop()
            } else {
                None
            };
            let cross = ((0.25..0.28).contains(&roll) && !pool.crossable.is_empty()).then(|| {
                let i = rng.random_range(0..pool.crossable.len());
                pool.crossable.swap_remove(i)
            });
            (click_id, dup, update, cross)
        };
        let token = self.token();
        if roll < 0.25 {
            return click(offer, pid, rng);
        }
        if let Some(query) = update {
            let mut planned = postback(
                format!("{query}&status=1&lt={token}"),
                token,
                "",
                FollowUp::None,
                false,
            );
            planned.update_of = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("action_id="))
                .map(str::to_string);
            return planned;
        }
        if roll < 0.28 {
            if let Some((query, original)) = cross {
                // The same offer, goal and action id on another click.
                let query = query
                    .split('&')
                    .map(|kv| {
                        if kv.starts_with("clickid=") {
                            format!("clickid={click_id}")
                        } else {
                            kv.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                let mut planned = postback(
                    format!("{query}&lt={token}"),
                    token,
                    "Conversion exists",
                    FollowUp::None,
                    false,
                );
                planned.twin_of = Some(original);
                return planned;
            }
        }
        if roll < 0.30 {
            if let Some(query) = dup {
                return postback(
                    format!("{query}&lt={token}"),
                    token,
                    "Conversion exists",
                    FollowUp::None,
                    false,
                );
            }
        }
        if roll < 0.34 {
            let q = format!("clickid={click_id}&secure=wrong&action_id={token}&lt={token}");
            return postback(q, token, "Access denied", FollowUp::None, false);
        }
        if roll < 0.37 {
            return postback(
                format!("clickid=nothex{token}&lt={token}"),
                token,
                "Broken clickid",
                FollowUp::None,
                false,
            );
        }
        if roll < 0.40 {
            let q = format!(
                "clickid={click_id}&secure={SECURE}&goal=nope&action_id={token}&lt={token}"
            );
            return postback(q, token, "Goal not found", FollowUp::None, false);
        }
        if roll < 0.50 {
            let path = format!(
                "/success.jpg?offer_id={offer}&clickid={click_id}&afsecure={SECURE}&afgoal=sale&afprice=20&afid={token}&lt={token}"
            );
            return Planned {
                kind: "pixel",
                method: Method::GET,
                path,
                body: None,
                expect: Some(""),
                token: Some(token),
                on_ok: FollowUp::None,
                action_is_token: true,
                twin_of: None,
                update_of: None,
            };
        }
        let goal = if rng.random_bool(0.5) { "1" } else { "sale" };
        let pending = rng.random_bool(0.3);
        let base =
            format!("clickid={click_id}&secure={SECURE}&goal={goal}&sum=25&action_id={token}");
        let query = if pending {
            format!("{base}&status=2")
        } else {
            base.clone()
        };
        let post = rng.random_bool(0.3);
        let follow = FollowUp::Conversion {
            query: base,
            pending,
            token: token.clone(),
        };
        postback(format!("{query}&lt={token}"), token, "", follow, post)
    }
}

fn plain(path: String, token: String) -> Planned {
    Planned {
        kind: "postback",
        method: Method::GET,
        path,
        body: None,
        expect: None,
        token: Some(token),
        on_ok: FollowUp::None,
        action_is_token: true,
        twin_of: None,
        update_of: None,
    }
}

fn click(offer: u64, pid: u64, rng: &mut impl Rng) -> Planned {
    Planned {
        kind: "click",
        method: Method::GET,
        path: format!(
            "/click?offer_id={offer}&pid={pid}&sub1=s{}",
            rng.random_range(0..1000)
        ),
        body: None,
        expect: None,
        token: None,
        on_ok: FollowUp::Click,
        action_is_token: false,
        twin_of: None,
        update_of: None,
    }
}

fn postback(
    query: String,
    token: String,
    expect: &'static str,
    on_ok: FollowUp,
    post: bool,
) -> Planned {
    let (method, path, body) = if post {
        (Method::POST, "/postback".to_string(), Some(query))
    } else {
        (Method::GET, format!("/postback?{query}"), None)
    };
    // New conversions and rejected ones carry the token as their action id.
    let action_is_token = !matches!(on_ok, FollowUp::None) || expect == "Access denied";
    Planned {
        kind: "postback",
        method,
        path,
        body,
        expect: Some(expect),
        token: Some(token),
        on_ok,
        action_is_token,
        twin_of: None,
        update_of: None,
    }
}

/// Everything the request tasks record.
struct Recorder {
    all: Mutex<Histogram<u64>>,
    by_kind: Mutex<HashMap<&'static str, Histogram<u64>>>,
    lag: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    overloaded: AtomicU64,
    sent: AtomicU64,
    /// token → expected outcome, for every postback that got a 200.
    expected: Mutex<HashMap<String, &'static str>>,
    /// (original, duplicate on another click) tokens, both acknowledged.
    twins: Mutex<Vec<(String, String)>>,
    /// (token, action id) of the acknowledged status updates.
    updates: Mutex<Vec<(String, String)>>,
    /// Action ids of status updates whose answer was lost (no HTTP status came back).
    updates_answer_lost: Mutex<Vec<String>>,
    /// (original, duplicate on another click) tokens where the duplicate's answer was lost: it
    /// may be stored all the same (a process killed after its append), and then may reach the
    /// dedupe before its original.
    twins_answer_lost: Mutex<Vec<(String, String)>>,
    first_error: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Runs the load and returns the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(!opts.targets.is_empty(), "no target");
    let connections = opts.max_in_flight.min(1024);
    let targets: Vec<Arc<Target>> = opts
        .targets
        .iter()
        .map(|t| Arc::new(Target::new(t, &opts.api_key, connections).with_raw_tracking()))
        .collect();
    let target = targets[0].clone();
    anyhow::ensure!(
        !(opts.receive_postbacks && opts.affiliate_url.is_some()),
        "receive_postbacks and affiliate_url both name the affiliate: give one"
    );
    let receiver = if opts.receive_postbacks {
        Some(receiver::Receiver::start().await?)
    } else {
        None
    };
    let affiliate_url = receiver
        .as_ref()
        .map(|r| r.url.clone())
        .or(opts.affiliate_url.clone());
    let Setup { offer_id, pid } = match opts.scenario {
        Scenario::Postback if !opts.verify => Setup {
            offer_id: 0,
            pid: 1,
        },
        _ => setup(&target, affiliate_url.as_deref())
            .await
            .context("setting up through the admin API")?,
    };
    if offer_id != 0 {
        for t in &targets[1..] {
            seen_by(t, offer_id, pid).await?;
        }
    }
    let plan = Arc::new(Plan {
        run: format!("{:06x}", rand::rng().random_range(0..0xff_ffffu32)),
        seq: AtomicU64::new(0),
        pool: Mutex::new(Pool::default()),
        offer_id,
        pid,
    });
    let rec = Arc::new(Recorder {
        all: Mutex::new(histogram()),
        by_kind: Mutex::new(HashMap::new()),
        lag: Mutex::new(histogram()),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        overloaded: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        expected: Mutex::new(HashMap::new()),
        twins: Mutex::new(Vec::new()),
        updates: Mutex::new(Vec::new()),
        updates_answer_lost: Mutex::new(Vec::new()),
        twins_answer_lost: Mutex::new(Vec::new()),
        first_error: Mutex::new(None),
    });
    let in_flight = Arc::new(tokio::sync::Semaphore::new(opts.max_in_flight.max(1)));
    let lag_probes = Arc::new(tokio::sync::Semaphore::new(4));
    let progress = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(opts.duration.as_secs());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let meter = closed::CpuMeter::start(&opts.server_pids);
    let raw = !opts.verify
        && opts.scenario != Scenario::Full
        && opts.targets.iter().all(|t| t.starts_with("http://"));
    let elapsed = if raw {
        run_raw(&opts, &plan, &rec).await
    } else {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
        let total = (opts.rate * opts.duration.as_secs_f64()) as u64;
        let mut rng = rand::rng();
        let mut tasks = tokio::task::JoinSet::new();
        let mut n = 0u64;
        let mut last_tick = 0;
        while n < total {
            // Open loop: every request has a due time from the clock; send all that are due.
            let due = start + interval.mul_f64(n as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            }
            n += 1;
            let planned = plan.next(opts.scenario, &mut rng);
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                rec.overloaded.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (t, r, pl, probes) = (
                targets[n as usize % targets.len()].clone(),
                rec.clone(),
                plan.clone(),
                lag_probes.clone(),
            );
            let probe_lag = opts.verify && n.is_multiple_of(50);
            tasks.spawn(async move {
                let _permit = permit;
                one(&t, &r, &pl, planned, due, probe_lag, &probes).await;
            });
            while tasks.try_join_next().is_some() {}
            let secs = start.elapsed().as_secs();
            if secs != last_tick {
                last_tick = secs;
                progress.set_position(secs);
                progress.set_message(format!(
                    "sent {} ok {} errors {} overloaded {}",
                    rec.sent.load(Ordering::Relaxed),
                    rec.ok.load(Ordering::Relaxed),
                    rec.errors.load(Ordering::Relaxed),
                    rec.overloaded.load(Ordering::Relaxed)
                ));
            }
        }
        while tasks.join_next().await.is_some() {}
        start.elapsed().as_secs_f64()
    };
    let cpu = meter.finish(rec.ok.load(Ordering::Relaxed) + rec.errors.load(Ordering::Relaxed));
    progress.finish_and_clear();

    let verify = if opts.verify {
        let mut v = verify(&target, &rec, &plan).await?;
        if let Some(receiver) = &receiver {
            let check = verify_deliveries(&target, &rec, &plan, receiver, &mut v.problems).await?;
            v.deliveries = Some(check);
        }
        Some(v)
    } else {
        None
    };
    let by_kind = rec
        .by_kind
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, h)| (k.to_string(), Percentiles::of(h)))
        .collect();
    let lag = rec.lag.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let latency = Percentiles::of(&rec.all.lock().unwrap_or_else(|e| e.into_inner()));
    let ok = rec.ok.load(Ordering::Relaxed);
    if let Some(e) = rec
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        eprintln!("first error: {e}");
    }
    Ok(Report {
        target: opts.targets.join(","),
        scenario: format!("{:?}", opts.scenario).to_lowercase(),
        rate: opts.rate,
        duration_s: elapsed,
        sent: rec.sent.load(Ordering::Relaxed),
        ok,
        errors: rec.errors.load(Ordering::Relaxed),
        overloaded: rec.overloaded.load(Ordering::Relaxed),
        achieved_rps: ok as f64 / elapsed,
        latency,
        by_kind,
        e2e_lag: (!lag.is_empty()).then(|| Percentiles::of(&lag)),
        verify,
        cpu,
    })
}

async fn one(
    target: &Target,
    rec: &Recorder,
    plan: &Plan,
    p: Planned,
    due: Instant,
    probe_lag: bool,
    probes: &tokio::sync::Semaphore,
) {
    rec.sent.fetch_add(1, Ordering::Relaxed);
    let body = p.body.map(|b| ("application/x-www-form-urlencoded", b));
    let result = target.send(p.method, &p.path, body).await;
    let micros = due.elapsed().as_micros().max(1) as u64;
    // Clicks redirect; anything else counts when it is a 2xx (nginx baselines answer 204).
    let good = |status: u16| {
        if p.kind == "click" {
            status == 302
        } else {
            (200..300).contains(&status)
        }
    };
    match result {
        Ok((status, bytes)) if good(status) => {
            rec.ok.fetch_add(1, Ordering::Relaxed);
            let _ = rec
                .all
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(micros);
            let _ = rec
                .by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(p.kind)
                .or_insert_with(histogram)
                .record(micros);
            if let (Some(token), Some(expect)) = (&p.token, p.expect) {
                rec.expected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(token.clone(), expect);
                if let Some(original) = &p.twin_of {
                    rec.twins
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((original.clone(), token.clone()));
                }
                if let Some(action) = &p.update_of {
                    rec.updates
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((token.clone(), action.clone()));
                }
            }
            remember(plan, p.on_ok, &bytes);
            if probe_lag && p.action_is_token {
                if let (Some(token), Ok(_permit)) = (&p.token, probes.try_acquire()) {
                    let accepted = Instant::now();
                    if wait_visible(target, token, Duration::from_secs(30)).await {
                        let lag = accepted.elapsed().as_micros().max(1) as u64;
                        let _ = rec
                            .lag
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(lag);
                    }
                }
            }
        }
        other => {
            rec.errors.fetch_add(1, Ordering::Relaxed);
            if let (Err(_), Some(action)) = (&other, &p.update_of) {
                rec.updates_answer_lost
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(action.clone());
            }
            if let (Err(_), Some(original), Some(token)) = (&other, &p.twin_of, &p.token) {
                rec.twins_answer_lost
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((original.clone(), token.clone()));
            }
            let mut first = rec.first_error.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(match other {
                    Ok((status, body)) => format!(
                        "{} {}: {status} {}",
                        p.kind,
                        p.path,
                        String::from_utf8_lossy(&body)
                    ),
                    Err(e) => format!("{} {}: {e:#}", p.kind, p.path),
                });
            }
        }
    }
}

/// The open loop of the `postback` and `click` scenarios without `verify`: each target gets
/// `open_connections` workers, each with one raw keep-alive connection (`closed::RawPool`) and
/// a queue; the clock hands each due request to the next worker with room (none:
/// `overloaded`), and the worker times it from when it was due. No task, timer or HTTP client
/// per request, so the generator spends as little per request as it can. The connections are
/// fixed, not opened as the server slows: opening them as needed (up to `max_in_flight`)
/// halved the rate bare hyper held here (80,000 req/s against 160,000), as a burst opened
/// connections that the generator and the server then paid for on every request, and closing
/// the idle ones churned. Returns the seconds it ran.
async fn run_raw(opts: &Options, plan: &Plan, rec: &Recorder) -> f64 {
    let workers_per_target = opts.open_connections.max(1);
    let room = (opts.max_in_flight / (workers_per_target * opts.targets.len()).max(1)).max(1);
    let mut queues = Vec::new();
    let mut workers = tokio::task::JoinSet::new();
    for t in &opts.targets {
        for _ in 0..workers_per_target {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, String)>(room);
            queues.push(tx);
            let Some(pool) = closed::RawPool::new(t) else {
                continue;
            };
            workers.spawn(async move {
                let (mut h, mut ok, mut errors) = (histogram(), 0u64, 0u64);
                let mut first_error = None;
                while let Some((due, path)) = rx.recv().await {
                    match pool.get(&path).await {
                        Ok(status) if (200..400).contains(&status) => {
                            ok += 1;
                            let _ = h.record(due.elapsed().as_micros().max(1) as u64);
                        }
                        Ok(status) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{path}: {status}"));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{path}: {e:#}"));
                        }
                    }
                }
                (h, ok, errors, first_error)
            });
        }
    }
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
    let total = (opts.rate * opts.duration.as_secs_f64()) as u64;
    let mut rng = rand::rng();
    let (mut next, mut sent, mut overloaded) = (0usize, 0u64, 0u64);
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let planned = plan.next(opts.scenario, &mut rng);
        let mut item = Some((due, planned.path));
        for _ in 0..queues.len() {
            next = (next + 1) % queues.len();
            match queues[next].try_send(item.take().unwrap_or_else(|| unreachable!())) {
                Ok(()) => break,
                Err(tokio::sync::mpsc::error::TrySendError::Full(back))
                | Err(tokio::sync::mpsc::error::TrySendError::Closed(back)) => item = Some(back),
            }
        }
        if item.is_some() {
            overloaded += 1;
        } else {
            sent += 1;
        }
    }
    drop(queues);
    let kind = if opts.scenario == Scenario::Click {
        "click"
    } else {
        "postback"
    };
    while let Some(done) = workers.join_next().await {
        let Ok((h, ok, errors, first_error)) = done else {
            continue;
        };
        rec.ok.fetch_add(ok, Ordering::Relaxed);
        rec.errors.fetch_add(errors, Ordering::Relaxed);
        let _ = rec.all.lock().unwrap_or_else(|e| e.into_inner()).add(&h);
        let _ = rec
            .by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_insert_with(histogram)
            .add(&h);
        if let Some(e) = first_error {
            rec.first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
    }
    rec.sent.fetch_add(sent, Ordering::Relaxed);
    rec.overloaded.fetch_add(overloaded, Ordering::Relaxed);
    start.elapsed().as_secs_f64()
}

/// Adds what an acknowledged request makes possible to the pool the mix draws from.
fn remember(plan: &Plan, follow: FollowUp, body: &[u8]) {
    let mut pool = plan.pool.lock().unwrap_or_else(|e| e.into_inner());
    match follow {
        FollowUp::Click => {
            let location = String::from_utf8_lossy(body);
            if let Some(id) = location.split("clickid=").nth(1) {
                pool.clicks.push(id.chars().take(24).collect());
            }
        }
        FollowUp::Conversion {
            query,
            pending,
            token,
        } => {
            if pending {
                pool.pending.push(query.clone());
            } else {
                pool.crossable.push((query.clone(), token));
            }
            pool.conversions.push(query);
        }
        FollowUp::None => {}
    }
}

fn date_range() -> String {
    // Yesterday to tomorrow (UTC), so that a run across midnight is still found.
    let day = 86_400;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format!(
        "date_from={}&date_to={}",
        civil(now - day),
        civil(now + day)
    )
}

fn civil(secs: i64) -> String {
    postback_core::delivery::civil(secs * 1_000_000).0
}

/// Polls the stats until the postback `token` shows. The pause between polls grows with the
/// wait (10 ms, then a tenth of the time waited so far): a probe then costs the engine a few
/// dozen queries however far behind it is, instead of a hundred a second that add to the load
/// they measure (four probes polling every 10 ms took ~40 µs of the engine's CPU per request
/// at 8,000 req/s on Kafka once the lag reached seconds), and the lag it reads is at most a
/// tenth over the true one.
async fn wait_visible(target: &Target, token: &str, timeout: Duration) -> bool {
    let started = Instant::now();
    let deadline = started + timeout;
    // The action id is indexed; probing by it costs the engine next to nothing.
    let path = format!(
        "/3.0/stats/serverpostbacks?{}&limit=1&action_id={token}",
        date_range()
    );
    while Instant::now() < deadline {
        if let Ok(v) = target.get_json(&path).await {
            if v["pagination"]["total_count"].as_u64().unwrap_or(0) > 0 {
                return true;
            }
        }
        tokio::time::sleep(probe_pause(started.elapsed())).await;
    }
    false
}

/// The pause before the next poll of a probe that has waited `waited`.
fn probe_pause(waited: Duration) -> Duration {
    (waited / 10).max(Duration::from_millis(10))
}

/// Every acknowledged postback of this run, found in the log exactly once, with its outcome.
/// The (token, error) of each row of a server-postback CSV export whose `lt` parameter (in the
/// query or the form body) starts with `prefix`, and what else the row says, for a report.
fn run_rows(csv: &[u8], prefix: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    if let Some(at) = closed::find(csv, b"\r\n# export cut short") {
        bail!(
            "the CSV export was cut short: {}",
            String::from_utf8_lossy(&csv[at + 2..])
        );
    }
    let mut reader = csv::Reader::from_reader(csv);
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in the CSV export"))
    };
    let (get, post, error) = (column("get")?, column("post")?, column("error")?);
    let described: Vec<(&str, usize)> = ["id", "date", "action_id", "conversion_id"]
        .into_iter()
        .filter_map(|name| Some((name, headers.iter().position(|h| h == name)?)))
        .collect();
    let mut out = Vec::new();
    for row in reader.records() {
        let row = row?;
        // A cell a spreadsheet would take for a formula carries a leading quote.
        let cell = |i: usize| {
            let c = row.get(i).unwrap_or("");
            c.strip_prefix('\'').unwrap_or(c)
        };
        let token = |i: usize| {
            postback_core::params::parse_form(cell(i).as_bytes())
                .get("lt")
                .map(str::to_string)
        };
        if let Some(t) = token(get).or_else(|| token(post)) {
            if t.starts_with(prefix) {
                let about = described
                    .iter()
                    .map(|(name, i)| format!("{name} {}", cell(*i)))
                    .collect::<Vec<_>>()
                    .join(", ");
                out.push((t, cell(error).to_string(), about));
            }
        }
    }
    Ok(out)
}

/// Which of a twin pair (an original and its duplicate on another click) should have
/// registered the conversion: a duplicate may reach the dedupe before its original, and then
/// the duplicate registered it and the original is the one that exists. That holds too for a
/// duplicate whose answer was lost (`lost`): not expected itself, it may have been stored all
/// the same. Returns the pairs of `twins` and how many pairs, of both, came in that order.
fn settle_twins(
    expected: &mut HashMap<String, &'static str>,
    seen: &HashMap<String, Vec<String>>,
    twins: &[(String, String)],
    lost: &[(String, String)],
) -> (u64, u64) {
    let swapped = |original: &str, duplicate: &str| {
        seen.get(original).map(Vec::as_slice) == Some(&["Conversion exists".to_string()][..])
            && seen.get(duplicate).map(Vec::as_slice) == Some(&[String::new()][..])
    };
    let mut first = 0;
    for (original, duplicate) in twins {
        if swapped(original, duplicate) && expected.contains_key(original) {
            first += 1;
            expected.insert(original.clone(), "Conversion exists");
            expected.insert(duplicate.clone(), "");
        }
    }
    for (original, duplicate) in lost {
        if swapped(original, duplicate) && expected.contains_key(original) {
            first += 1;
            expected.insert(original.clone(), "Conversion exists");
        }
    }
    (twins.len() as u64, first)
}

async fn verify(target: &Target, rec: &Recorder, plan: &Plan) -> anyhow::Result<Verification> {
    let expected = rec
        .expected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let prefix = format!("R{}x", plan.run);
    // The run's postbacks are those of its offer, and those that matched no click (offer 0);
    // both are index ranges, unlike a search for the run's token.
    let bases = [plan.offer_id, 0]
        .map(|offer| format!("/3.0/stats/serverpostbacks?{}&offer={offer}", date_range()));
    // Wait until the processor has caught up with everything acknowledged.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = 0;
    loop {
        let mut total = 0;
        for base in &bases {
            let v = target.get_json(&format!("{base}&limit=1")).await?;
            total += v["pagination"]["total_count"].as_u64().unwrap_or(0);
        }
        if (total >= expected.len() as u64 && total == last) || Instant::now() > deadline {
            break;
        }
        last = total;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every row of the run, read from the CSV export: one snapshot, paged by time inside the
    // engine (listing pages by offset would cost the store a scan of every row before each).
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    // What the rows of each token say besides their outcome (a failure's report shows it).
    let mut about: HashMap<String, Vec<String>> = HashMap::new();
    for offer in [plan.offer_id, 0] {
        let path = format!(
            "/3.0/stats/serverpostbacks/csv?{}&offer={offer}",
            date_range()
        );
        let (status, csv) = target.send(Method::GET, &path, None).await?;
        if status != 200 {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&csv)
            );
        }
        for (token, error, row) in run_rows(&csv, &prefix)? {
            about.entry(token.clone()).or_default().push(row);
            seen.entry(token).or_default().push(error);
        }
    }
    // A duplicate on another click may reach the dedupe before its original: then the
    // duplicate registered the conversion and the original is the one that exists.
    let mut expected = expected;
    let twins = rec.twins.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let originals: HashMap<&str, &str> = twins
        .iter()
        .map(|(original, duplicate)| (duplicate.as_str(), original.as_str()))
        .collect();
    // A token's rows, and its original's where it is a duplicate on another click.
    let report = |token: &str| {
        let rows = |t: &str| about.get(t).map(|r| r.join("; ")).unwrap_or_default();
        match originals.get(token) {
            Some(original) => format!(
                "[{}] (its original {original}: {:?}, [{}])",
                rows(token),
                seen.get(*original).cloned().unwrap_or_default(),
                rows(original)
            ),
            None => format!("[{}]", rows(token)),
        }
    };
    let lost = rec
        .twins_answer_lost
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (cross, cross_first) = settle_twins(&mut expected, &seen, &twins, &lost);
    let mut v = Verification {
        expected: expected.len() as u64,
        cross_duplicates: cross,
        cross_duplicates_first: cross_first,
        ..Default::default()
    };
    for (token, want) in &expected {
        match seen.get(token).map(Vec::as_slice) {
            None | Some([]) => {
                v.missing += 1;
                if v.problems.len() < 10 {
                    v.problems
                        .push(format!("{token}: acknowledged but not in the log"));
                }
            }
            Some([got]) if got == want => v.found_once += 1,
            Some([got]) => {
                v.wrong_outcome += 1;
                if v.problems.len() < 10 {
                    v.problems.push(format!(
                        "{token}: logged {got:?}, expected {want:?} {}",
                        report(token)
                    ));
                }
            }
            Some(many) => {
                v.duplicated += 1;
                if v.problems.len() < 10 {
                    v.problems.push(format!(
                        "{token}: logged {} times {}",
                        many.len(),
                        report(token)
                    ));
                }
            }
        }
    }
    Ok(v)
}

/// Every state of the run's conversions reached the receiver once: each conversion's current
/// state, and the pending state of each conversion a status update confirmed.
async fn verify_deliveries(
    target: &Target,
    rec: &Recorder,
    plan: &Plan,
    receiver: &receiver::Receiver,
    problems: &mut Vec<String>,
) -> anyhow::Result<DeliveryCheck> {
    let status_number = |name: &str| match name {
        "confirmed" => "1",
        "pending" => "2",
        "declined" => "3",
        "hold" => "5",
        _ => "?",
    };
    let mut expected: HashMap<(String, String), u32> = HashMap::new();
    // Action id → its conversion ids, to explain a state that never arrived or came twice.
    let mut leads: HashMap<String, Vec<String>> = HashMap::new();
    let base = format!(
        "/3.0/stats/conversions?{}&offer={}&limit=500",
        date_range(),
        plan.offer_id
    );
    for page in 1.. {
        let v = target.get_json(&format!("{base}&page={page}")).await?;
        let rows = v["conversions"].as_array().cloned().unwrap_or_default();
        for c in &rows {
            let action = c["action_id"].as_str().unwrap_or("").to_string();
            let status = status_number(c["status"].as_str().unwrap_or("")).to_string();
            let lead = c["id"].as_str().unwrap_or("").to_string();
            leads.entry(action.clone()).or_default().push(lead);
            expected.insert((action, status), 0);
        }
        if rows.len() < 500 {
            break;
        }
    }
    let updates = rec
        .updates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (_, action) in updates {
        expected.insert((action, "2".to_string()), 0);
    }
    // Deliveries follow the conversions; wait for them (bounded), then count.
    let deadline = Instant::now() + Duration::from_secs(120);
    let counts = loop {
        let counts = receiver.counts();
        let all_in = expected.keys().all(|k| counts.contains_key(k));
        if all_in || Instant::now() > deadline {
            // A moment more for a second delivery of the last ones to show.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break receiver.counts();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut check = DeliveryCheck {
        expected: expected.len() as u64,
        ..DeliveryCheck::default()
    };
    let note = |problems: &mut Vec<String>, text: String| {
        if problems.len() < 10 {
            problems.push(text);
        }
    };
    for key in expected.keys() {
        match counts.get(key).copied().unwrap_or(0) {
            0 => {
                check.missing += 1;
                if problems.len() < 10 {
                    let lead = leads
                        .get(&key.0)
                        .and_then(|l| l.first())
                        .map_or("", String::as_str);
                    let why = attempts_of(target, plan, lead).await;
                    note(problems, format!("{key:?}: never delivered ({why})"));
                }
            }
            1 => check.once += 1,
            n => {
                check.duplicated += 1;
                let conversions = leads.get(&key.0).cloned().unwrap_or_default();
                note(
                    problems,
                    format!("{key:?}: delivered {n} times (conversions {conversions:?})"),
                );
            }
        }
    }
    let answer_lost: HashSet<String> = rec
        .updates_answer_lost
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    for (key, n) in &counts {
        if expected.contains_key(key) {
            continue;
        }
        // An update is to pending (2); one whose answer was lost may have been logged.
        if key.1 == "2" && answer_lost.contains(&key.0) {
            check.answer_lost += u64::from(*n);
        } else {
            check.unexpected += u64::from(*n);
            note(
                problems,
                format!("{key:?}: delivered, but no conversion had it"),
            );
        }
    }
    Ok(check)
}

/// What the engine's attempt log holds for a conversion (by its id): tells a job never made
/// from one made and not attempted, or attempted and failed.
async fn attempts_of(target: &Target, plan: &Plan, lead: &str) -> String {
    if lead.is_empty() {
        return "its conversion is not in the listing".into();
    }
    let path = format!(
        "/3.0/stats/affiliatepostbacks?{}&offer={}&limit=500",
        date_range(),
        plan.offer_id
    );
    let mut seen = Vec::new();
    for page in 1..=20 {
        let Ok(v) = target.get_json(&format!("{path}&page={page}")).await else {
            return "the attempt log could not be read".into();
        };
        let rows = v["postbacks"].as_array().cloned().unwrap_or_default();
        for r in rows.iter().filter(|r| r["lead_id"] == lead) {
            seen.push(format!(
                "status {} attempt {} code {} {}",
                r["status"], r["attempt"], r["http_code"], r["error"]
            ));
        }
        if rows.len() < 500 {
            break;
        }
    }
    if seen.is_empty() {
        format!("conversion {lead}: no attempt logged")
    } else {
        format!("conversion {lead}: {}", seen.join("; "))
    }
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<18}{v}\n"));
    line(&mut s, "target", format!("{} ({})", r.target, r.scenario));
    line(
        &mut s,
        "rate",
        format!("{:.0}/s for {:.1} s", r.rate, r.duration_s),
    );
    line(
        &mut s,
        "answered",
        format!(
            "{} ok, {} errors, {} not sent (overloaded)",
            r.ok, r.errors, r.overloaded
        ),
    );
    line(&mut s, "throughput", format!("{:.0} ok/s", r.achieved_rps));
    if let Some(server) = r.cpu.server_us_per_request {
        line(
            &mut s,
            "cpu µs/request",
            format!(
                "pbload {:.1}, server {server:.1}: {}",
                r.cpu.generator_us_per_request,
                r.cpu.by_thread_text()
            ),
        );
    }
    s.push_str(&format!(
        "{:<18}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}\n",
        "latency (ms)", "n", "p50", "p90", "p99", "p99.9", "max"
    ));
    let row = |s: &mut String, name: &str, p: &Percentiles| {
        s.push_str(&format!(
            "{:<18}{:>9}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{:>9.2}\n",
            name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
        ))
    };
    row(&mut s, "  all", &r.latency);
    let mut kinds: Vec<_> = r.by_kind.iter().collect();
    kinds.sort_by_key(|(k, _)| k.as_str());
    for (k, p) in kinds {
        row(&mut s, &format!("  {k}"), p);
    }
    if let Some(lag) = &r.e2e_lag {
        row(&mut s, "  e2e lag", lag);
    }
    if let Some(v) = &r.verify {
        line(
            &mut s,
            "verify",
            format!(
                "{}: {} of {} found once with the expected outcome; {} missing, {} duplicated, {} wrong",
                if v.passed() { "PASSED" } else { "FAILED" },
                v.found_once,
                v.expected,
                v.missing,
                v.duplicated,
                v.wrong_outcome
            ),
        );
        if v.cross_duplicates > 0 {
            line(
                &mut s,
                "",
                format!(
                    "{} duplicates on other clicks, {} of them seen before their original",
                    v.cross_duplicates, v.cross_duplicates_first
                ),
            );
        }
        if let Some(d) = &v.deliveries {
            line(
                &mut s,
                "deliveries",
                format!(
                    "{} of {} conversion states reached the affiliate once; {} missing, {} duplicated, {} unexpected{}",
                    d.once,
                    d.expected,
                    d.missing,
                    d.duplicated,
                    d.unexpected,
                    if d.answer_lost > 0 {
                        format!(
                            "; {} for updates whose answer was lost (may or may not arrive)",
                            d.answer_lost
                        )
                    } else {
                        String::new()
                    }
                ),
            );
        }
        for p in &v.problems {
            line(&mut s, "", p.clone());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_that_reached_the_dedupe_first_registered_the_conversion() {
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let seen: HashMap<String, Vec<String>> = [
            ("O1", "Conversion exists"),
            ("D1", ""),
            ("O2", ""),
            ("D2", "Conversion exists"),
            ("O3", "Conversion exists"),
            ("L3", ""),
        ]
        .into_iter()
        .map(|(t, e)| (t.to_string(), vec![e.to_string()]))
        .collect();
        let fresh = || -> HashMap<String, &'static str> {
            [
                ("O1", ""),
                ("D1", "Conversion exists"),
                ("O2", ""),
                ("D2", "Conversion exists"),
                ("O3", ""),
            ]
            .into_iter()
            .map(|(t, e)| (t.to_string(), e))
            .collect()
        };
        let twins = owned(&[("O1", "D1"), ("O2", "D2")]);
        let mut expected = fresh();
        assert_eq!(settle_twins(&mut expected, &seen, &twins, &[]), (2, 1));
        assert_eq!((expected["O1"], expected["D1"]), ("Conversion exists", ""));
        assert_eq!((expected["O2"], expected["D2"]), ("", "Conversion exists"));
        // O3's duplicate L3 got no answer (its process was killed) but was stored, and came
        // first: without knowing of it, O3 looks wrong.
        assert_eq!(expected["O3"], "");
        let lost = owned(&[("O3", "L3")]);
        let mut expected = fresh();
        assert_eq!(settle_twins(&mut expected, &seen, &twins, &lost), (2, 2));
        assert_eq!(expected["O3"], "Conversion exists");
        assert!(
            !expected.contains_key("L3"),
            "a lost answer is not expected"
        );
    }

    #[test]
    fn the_runs_rows_are_read_from_the_csv_export() {
        let csv = "id,date,offer_id,error,get,post,server\r\n\
            \"1\",\"d\",\"7\",\"\",\"clickid=c1&lt=Rabcx1\",\"\",\"s\"\r\n\
            \"2\",\"d\",\"7\",\"Conversion exists\",\"clickid=c1\",\"lt=Rabcx2&sum=1\",\"s\"\r\n\
            \"3\",\"d\",\"7\",\"a \"\"quoted\"\", error\",\"'=lt=Rabcx3\",\"\",\"s\"\r\n\
            \"4\",\"d\",\"7\",\"\",\"lt=Rotherx1\",\"\",\"s\"\r\n";
        let rows = super::run_rows(csv.as_bytes(), "Rabcx").expect("parses");
        let about = |id: &str| format!("id {id}, date d");
        assert_eq!(
            rows,
            vec![
                ("Rabcx1".to_string(), String::new(), about("1")),
                (
                    "Rabcx2".to_string(),
                    "Conversion exists".to_string(),
                    about("2")
                ),
            ]
        );
        let cut = format!("{csv}# export cut short: the store is down\r\n");
        let err = super::run_rows(cut.as_bytes(), "Rabcx").expect_err("cut short");
        assert!(err.to_string().contains("the store is down"), "{err}");
    }

    /// A server that answers in 10 ms needs 400 requests under way at 40,000 req/s: the open
    /// loop keeps as many under way as it was given connections, no more. The server here
    /// holds every answer until that many are waiting (or 3 s have passed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_open_loop_keeps_as_many_requests_under_way_as_it_has_connections() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let want = 320u64;
        let (pending, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (release, released) = tokio::sync::watch::channel(false);
        let release = Arc::new(release);
        let (p, m) = (pending.clone(), most.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (p, m, release, mut released) =
                    (p.clone(), m.clone(), release.clone(), released.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while closed::find(&buf, b"\r\n\r\n").is_none() {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = closed::find(&buf, b"\r\n\r\n").unwrap_or(0) + 4;
                        buf.drain(..end);
                        let waiting = p.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(waiting, Ordering::SeqCst);
                        if waiting >= want {
                            release.send_replace(true);
                        }
                        let held = released.wait_for(|r| *r);
                        let _ = tokio::time::timeout(Duration::from_secs(3), held).await;
                        p.fetch_sub(1, Ordering::SeqCst);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let report = run(Options {
            targets: vec![format!("http://{addr}")],
            api_key: String::new(),
            scenario: Scenario::Postback,
            rate: 4000.0,
            duration: Duration::from_millis(100),
            max_in_flight: 4096,
            open_connections: want as usize,
            verify: false,
            affiliate_url: None,
            receive_postbacks: false,
            server_pids: Vec::new(),
            quiet: true,
        })
        .await
        .expect("runs");
        assert_eq!((report.sent, report.ok, report.errors), (400, 400, 0));
        let most = most.load(Ordering::SeqCst);
        assert_eq!(most, want, "requests under way at once at most");
    }

    /// A lag probe polls a few dozen times over a long wait (every 10 ms would be 3,000), and
    /// never pauses for more than a tenth of what it waited (past the first 10 ms).
    #[test]
    fn a_probe_polls_a_few_dozen_times_however_long_it_waits() {
        let (mut waited, mut polls) = (Duration::ZERO, 0);
        while waited < Duration::from_secs(30) {
            let pause = probe_pause(waited);
            assert!(pause <= (waited / 10).max(Duration::from_millis(10)));
            waited += pause;
            polls += 1;
        }
        assert!((40..80).contains(&polls), "{polls} polls");
    }
}
