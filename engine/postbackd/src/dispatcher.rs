//! The affiliate-postback dispatcher: applies the deliveries log to the store, and delivers
//! due jobs over HTTP with bounded concurrency per host and overall, timeouts, and retries.
//!
//! Dispatchers form a consumer group on the deliveries log: each partition (and so each job,
//! keyed by its id) belongs to one dispatcher at a time, which applies its records to its own
//! queue and alone attempts its jobs. A partition is let go only once its attempts under way
//! are recorded in the log, so no job is attempted by two dispatchers at once; the next owner
//! reads the partition from where its queue stopped, those records included.
//!
//! Each attempt's outcome is appended to the deliveries log before it counts, so the attempt
//! log survives a crash and a replay. Delivery is at least once: a process that dies after an
//! affiliate answered but before the answer reached the log sends that state again on restart;
//! it never skips one.

use crate::engine::Engine;
use crate::guard::TargetGuard;
use crate::pipeline::now_us;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use postback_core::delivery::{
    Attempt, AttemptResult, AttemptRow, DeliveryJob, DeliveryRecord, DueQuery, JobState, JobStatus,
    Next, RetryPolicy,
};
use postback_core::keys::{partition_of, Partition};
use postback_core::log::{Keyed, Polled, Position, Record};
use postback_core::seams::{AnalyticsRows, SeamError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// The dispatchers' group on the deliveries log, and the consumer name under which the queue
/// keeps their positions.
pub const CONSUMER: &str = "dispatcher";

/// Records of the deliveries log applied at once.
const APPLY_BATCH: usize = 1024;

/// The pause after applying a short batch: each attempt appends its own record, and applying
/// them one transaction each (and looking for due jobs after each) cost the store more than
/// all the attempts themselves; this gathers them. Due jobs are started before the pause.
const APPLY_LINGER: Duration = Duration::from_millis(50);

/// The least time between two looks for due jobs started by attempts ending: a host's slots
/// are refilled as they free up (not once per `APPLY_LINGER`, which held a host to about 160
/// deliveries a second), without a query of the queue per attempt.
const REFILL_GAP: Duration = Duration::from_millis(5);

/// Delivery settings, from the engine's configuration.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub policy: RetryPolicy,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub per_host: usize,
    pub concurrency: usize,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<PeerChecked>, Full<Bytes>>;

struct Dispatcher {
    engine: Arc<Engine>,
    config: DeliveryConfig,
    client: HttpClient,
    /// Jobs being attempted, with the attempt number, until the log's record of it is applied.
    in_flight: Mutex<HashMap<String, u32>>,
    /// Attempts under way, in all and per host. A host's entry goes with its last attempt, so
    /// the map holds at most `concurrency` hosts, however many hosts URLs (and their macros)
    /// name.
    running: Mutex<Running>,
    /// Where the next read of due jobs starts: hosts are served in turn.
    host_cursor: Mutex<String>,
    /// Told when an attempt gives its slot back: there may be room to start another.
    freed: tokio::sync::Notify,
    stop: watch::Receiver<bool>,
}

#[derive(Default)]
struct Running {
    all: usize,
    per_host: HashMap<String, usize>,
    per_partition: HashMap<Partition, usize>,
}

/// An attempt's place in `Dispatcher::running`, given back when the attempt ends.
struct Slot {
    dispatcher: Arc<Dispatcher>,
    host: String,
    partition: Partition,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.dispatcher.lock_running();
        running.all = running.all.saturating_sub(1);
        if let Some(n) = running.per_host.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                running.per_host.remove(&self.host);
            }
        }
        if let Some(n) = running.per_partition.get_mut(&self.partition) {
            *n -= 1;
            if *n == 0 {
                running.per_partition.remove(&self.partition);
            }
        }
        drop(running);
        self.dispatcher.freed.notify_one();
    }
}

/// Runs the dispatcher until `stop`.
pub async fn run(engine: Arc<Engine>, config: DeliveryConfig, mut stop: watch::Receiver<bool>) {
    let client = client(&config, engine.targets.clone());
    let d = Arc::new(Dispatcher {
        engine,
        config,
        client,
        in_flight: Mutex::new(HashMap::new()),
        running: Mutex::new(Running::default()),
        host_cursor: Mutex::new(String::new()),
        freed: tokio::sync::Notify::new(),
        stop: stop.clone(),
    });
    let mut attempts = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        // An error leaves the group; joining again starts each partition from the queue.
        if let Err(e) = d.member(&mut attempts, &mut stop, &mut backoff).await {
            tracing::error!(error = %e, "dispatcher failed; joining again");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    // Attempts under way get their timeout to finish; their records land in the log.
    let _ = tokio::time::timeout(d.config.timeout + Duration::from_secs(1), async {
        while attempts.join_next().await.is_some() {}
    })
    .await;
}

impl Dispatcher {
    /// One membership in the dispatchers' group, until `stop` (Ok) or an error. Each round
    /// applies the records polled, then starts the due attempts of the partitions owned.
    async fn member(
        self: &Arc<Self>,
        attempts: &mut tokio::task::JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> Result<(), SeamError> {
        let log = self.engine.deliveries.clone();
        let mut sub = log.clone().subscribe(CONSUMER).await?;
        let mut owned = BTreeSet::new();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // A poll is cancel-safe: an attempt ending cuts it short to start the next ones.
            let polled = tokio::select! {
                polled = sub.poll(APPLY_BATCH, 4 << 20, Duration::from_millis(250)) => polled?,
                _ = self.refill_wanted() => Polled::Idle,
                _ = stop.changed() => continue,
            };
            let mut linger = false;
            match polled {
                Polled::Assigned(partitions) => {
                    for p in partitions {
                        let end = self.catch_up(p).await?;
                        tracing::info!(partition = p, end, "dispatching a partition");
                        sub.start_at(p, end);
                        owned.insert(p);
                    }
                }
                Polled::Revoked(partitions) => {
                    tracing::info!(?partitions, "partitions moved to another dispatcher");
                    for p in &partitions {
                        owned.remove(p);
                    }
                    self.let_go(&partitions, attempts).await;
                }
                Polled::Records(records) => {
                    let short = records.len() < APPLY_BATCH;
                    let mut by_partition: BTreeMap<Partition, Vec<Record>> = BTreeMap::new();
                    for r in records {
                        by_partition.entry(r.partition).or_default().push(r);
                    }
                    let mut next = Vec::new();
                    for (p, batch) in by_partition {
                        let Some(last) = batch.last().map(|r| r.offset) else {
                            continue;
                        };
                        let at = Position {
                            partition: p,
                            offset: last + 1,
                        };
                        let records = decode(&batch);
                        apply_batch(&self.engine, &records, at, false).await?;
                        self.recorded(&records);
                        next.push(at);
                    }
                    sub.commit(next).await?;
                    linger = short;
                }
                Polled::Idle => {}
            }
            *backoff = Duration::from_millis(100);
            self.fill_slots(&owned, attempts).await?;
            if linger {
                // Records gather meanwhile; slots that free up are filled again.
                let until = tokio::time::Instant::now() + APPLY_LINGER;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = self.refill_wanted() => self.fill_slots(&owned, attempts).await?,
                        _ = stop.changed() => break,
                    }
                }
            }
        }
    }

    /// Reaps the attempts that ended and starts due ones in the slots free.
    async fn fill_slots(
        self: &Arc<Self>,
        owned: &BTreeSet<Partition>,
        attempts: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), SeamError> {
        while attempts.try_join_next().is_some() {}
        self.start_due(owned, attempts).await
    }

    /// Ends once an attempt has given its slot back, at most once per `REFILL_GAP`.
    async fn refill_wanted(&self) {
        self.freed.notified().await;
        tokio::time::sleep(REFILL_GAP).await;
    }

    /// Applies a partition just assigned from where this process's queue stopped up to the
    /// log's end now, read from the log itself, and returns that end. The group starts a member
    /// at the offset the last owner committed: the records before it would never reach this
    /// queue, and a job it still holds as pending, which another dispatcher delivered since,
    /// would go out twice. Any of these records may be in the attempt log already (another
    /// process applied them). None of the partition's jobs is attempted before this returns.
    async fn catch_up(&self, p: Partition) -> Result<u64, SeamError> {
        let (at, end) =
            apply_partition(&self.engine, p, true, |records| self.recorded(records)).await?;
        if at < end {
            return Err(SeamError::Unavailable(format!(
                "deliveries partition {p}: offsets {at}..{end} not readable yet"
            )));
        }
        // The last batch may reach past `end`: the group starts after it.
        Ok(at)
    }

    /// Jobs whose attempt is now in the log leave the in-flight set.
    fn recorded(&self, records: &[DeliveryRecord]) {
        let mut in_flight = self.lock_in_flight();
        for r in records {
            if let DeliveryRecord::Attempt(a) = r {
                if in_flight.get(&a.job_id).is_some_and(|n| *n <= a.attempt) {
                    in_flight.remove(&a.job_id);
                }
            }
        }
    }

    /// Waits until the attempts under way in `partitions` are recorded in the log, then
    /// forgets their jobs: another dispatcher owns them from now on.
    async fn let_go(&self, partitions: &[Partition], attempts: &mut tokio::task::JoinSet<()>) {
        let busy = |d: &Self| {
            let running = d.lock_running();
            partitions
                .iter()
                .any(|p| running.per_partition.contains_key(p))
        };
        while busy(self) {
            if attempts.join_next().await.is_none() {
                break;
            }
        }
        let n = self.engine.deliveries.partitions();
        self.lock_in_flight()
            .retain(|job_id, _| !partitions.contains(&partition_of(job_id, n)));
    }

    /// Starts the due attempts of the partitions owned.
    async fn start_due(
        self: &Arc<Self>,
        owned: &BTreeSet<Partition>,
        attempts: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), SeamError> {
        if owned.is_empty() {
            return Ok(());
        }
        if self.engine.deliveries.health().is_some() {
            // Attempts could not be recorded: start none until the log has recovered.
            return Ok(());
        }
        let total = self.engine.deliveries.partitions() as usize;
        let concurrency = self.config.concurrency.max(1);
        // A host's limit holds across the dispatchers: each takes its partitions' share.
        let per_host = (self.config.per_host * owned.len() / total.max(1)).max(1);
        let room = concurrency.saturating_sub(self.lock_running().all);
        if room == 0 {
            return Ok(());
        }
        let after_host = self
            .host_cursor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Due jobs already under way, or ended and not yet applied from the log, come back
        // too: ask for enough past them.
        let under_way = self.lock_in_flight().len();
        let due = self
            .engine
            .queue
            .due_jobs(DueQuery {
                now_us: now_us(),
                per_host: per_host + under_way,
                after_host,
                limit: room + under_way,
                max_hosts: 1024,
                partitions: Some(owned.iter().copied().collect()),
            })
            .await?;
        *self.host_cursor.lock().unwrap_or_else(|e| e.into_inner()) = due.last_host;
        let n = self.engine.deliveries.partitions();
        for job in due.jobs {
            let host = job.job.host();
            {
                let running = self.lock_running();
                if running.all >= concurrency
                    || running.per_host.get(&host).is_some_and(|n| *n >= per_host)
                {
                    continue;
                }
            }
            let fresh = self
                .lock_in_flight()
                .insert(job.job.job_id.clone(), job.attempts + 1)
                .is_none();
            if fresh {
                let partition = partition_of(&job.job.job_id, n);
                let slot = self.take_slot(host, partition);
                attempts.spawn(self.clone().attempt(job, slot));
            }
        }
        Ok(())
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_slot(self: &Arc<Self>, host: String, partition: Partition) -> Slot {
        let mut running = self.lock_running();
        running.all += 1;
        *running.per_host.entry(host.clone()).or_default() += 1;
        *running.per_partition.entry(partition).or_default() += 1;
        Slot {
            dispatcher: self.clone(),
            host,
            partition,
        }
    }

    /// One attempt; `_slot` holds its place among those under way until it is recorded.
    async fn attempt(self: Arc<Self>, state: JobState, _slot: Slot) {
        let job = &state.job;
        let n = state.attempts + 1;
        let started = now_us();
        let outcome = self.send(job).await;
        let next = self.config.policy.next(
            n - state.round_base,
            outcome.result,
            rand::random::<f64>(),
            outcome.retry_after,
        );
        let (status, next_at_us) = match next {
            Next::Delivered => (JobStatus::Delivered, None),
            Next::Failed => (JobStatus::Failed, None),
            Next::GaveUp => (JobStatus::GaveUp, None),
            Next::RetryIn(d) => (JobStatus::Pending, Some(now_us() + d.as_micros() as i64)),
        };
        let code = match outcome.result {
            AttemptResult::Answered(c) => c,
            _ => 0,
        };
        metrics::counter!("postbackd_deliveries_total", "state" => status.as_str()).increment(1);
        metrics::histogram!("postbackd_delivery_seconds").record((now_us() - started) as f64 / 1e6);
        let record = DeliveryRecord::Attempt(Attempt {
            job_id: job.job_id.clone(),
            attempt: n,
            at_us: started,
            http_code: code,
            error: outcome.error,
            state: status,
            next_at_us,
        });
        self.record(&job.job_id, record).await;
    }

    /// Appends an attempt's record, retrying with backoff while the deliveries log cannot take
    /// it. The job stays in flight meanwhile (and keeps its slot), so it is not sent again
    /// before its outcome is recorded, and the dispatcher slows down instead of re-sending.
    /// Only a shutdown gives up, which leaves the job due after the restart (at least once).
    async fn record(&self, job_id: &str, record: DeliveryRecord) {
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        let keyed = Keyed::new(job_id, bytes);
        let mut backoff = Duration::from_millis(100);
        let mut stop = self.stop.clone();
        loop {
            match self.engine.deliveries.append(vec![keyed.clone()]).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(job = %job_id, error = %e,
                        "could not record a delivery attempt; retrying");
                    metrics::counter!("postbackd_delivery_record_failures_total").increment(1);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn send(&self, job: &DeliveryJob) -> Outcome {
        let uri: Uri = match job.url.parse() {
            Ok(u) => u,
            Err(e) => return Outcome::forbidden(format!("invalid URL: {e}")),
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Outcome::forbidden("only http and https URLs are delivered".into());
        }
        // A host that is an address (in any notation) is checked here: it is not resolved.
        if let Some(ip) = TargetGuard::literal_host(&job.url) {
            if let Some(why) = self.engine.targets.refusal(ip) {
                return Outcome::forbidden(format!("target address {why}"));
            }
        }
        let method = if job.method.eq_ignore_ascii_case("POST") {
            Method::POST
        } else {
            Method::GET
        };
        let body = if method == Method::POST {
            Bytes::from(uri.query().unwrap_or("").to_string())
        } else {
            Bytes::new()
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("postbackd/", env!("CARGO_PKG_VERSION"))),
        );
        if method == Method::POST {
            req.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
        }
        let exchange = async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            // The start of the body explains a refusal; the rest is not needed.
            let mut body = resp.into_body();
            let mut head = Vec::new();
            while head.len() < 256 {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            head.extend_from_slice(data);
                        }
                    }
                    _ => break,
                }
            }
            head.truncate(256);
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, head))
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Err(_) => Outcome::unreachable(format!("timeout after {:?}", self.config.timeout)),
            Ok(Err(e)) => {
                if is_forbidden(&e) {
                    Outcome::forbidden(innermost(&e))
                } else {
                    Outcome::unreachable(innermost(&e))
                }
            }
            Ok(Ok((status, retry_after, head))) => Outcome {
                result: AttemptResult::Answered(status),
                error: if (200..300).contains(&status) {
                    String::new()
                } else {
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&head).trim())
                },
                retry_after,
            },
        }
    }
}

struct Outcome {
    result: AttemptResult,
    error: String,
    retry_after: Option<Duration>,
}

impl Outcome {
    fn forbidden(error: String) -> Self {
        Self {
            result: AttemptResult::Forbidden,
            error,
            retry_after: None,
        }
    }
    fn unreachable(error: String) -> Self {
        Self {
            result: AttemptResult::Unreachable,
            error,
            retry_after: None,
        }
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    let secs = at.timestamp() - now_us() / 1_000_000;
    Some(Duration::from_secs(secs.max(0) as u64))
}

/// The most specific description of an error: the last of its sources.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = last.source() {
        last = next;
    }
    let text = last.to_string();
    if text.is_empty() {
        e.to_string()
    } else {
        text
    }
}

fn is_forbidden(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn client(config: &DeliveryConfig, guard: Arc<TargetGuard>) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver {
        guard: guard.clone(),
    });
    http.set_connect_timeout(Some(config.connect_timeout));
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(PeerChecked { inner: http, guard });
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(config.per_host.max(1))
        .build(https)
}

/// Resolves names and drops the addresses the guard refuses, so that the connection goes only
/// to an address that was checked: a name cannot be re-pointed between check and use.
#[derive(Clone)]
struct GuardedResolver {
    guard: Arc<TargetGuard>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("DNS lookup of {host} failed: {e}"))
                })?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| match guard.refusal(a.ip()) {
                    None => true,
                    Some(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if let (true, Some(why)) = (allowed.is_empty(), refused) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves to {why}"),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// The last check: the connected socket's peer address, before anything is sent. The checks
/// before connecting cover every way this engine names an address; this one covers any way a
/// parser or resolver might disagree with them.
#[derive(Clone)]
struct PeerChecked {
    inner: HttpConnector<GuardedResolver>,
    guard: Arc<TargetGuard>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for PeerChecked {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let guard = self.guard.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let peer = io.inner().peer_addr()?;
            match guard.refusal(peer.ip()) {
                None => Ok(io),
                Some(why) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("connected to {why}"),
                )) as BoxError),
            }
        })
    }
}

/// Applies what the deliveries log holds past `next` (each partition's next offset, read from
/// the store the first time) to the store, with the new positions; `until` bounds each
/// partition (a replay stops at the ends it was given). `applied` sees each batch once it is
/// in the store.
/// Applies one batch of a partition's records: the attempt log first (idempotent; the
/// batch may be in it already when `maybe_inserted`), then the queue and the position.
async fn apply_batch(
    engine: &Engine,
    records: &[DeliveryRecord],
    next: Position,
    maybe_inserted: bool,
) -> Result<(), SeamError> {
    let attempts = attempt_rows(engine, records).await?;
    if !attempts.is_empty() {
        engine
            .analytics
            .insert(AnalyticsRows {
                attempts,
                maybe_inserted,
                ..Default::default()
            })
            .await?;
    }
    engine
        .queue
        .apply_deliveries(CONSUMER, records.to_vec(), next)
        .await
}

/// The attempts among `records`, each with its job (from the records, or from the queue);
/// an attempt of a job the queue never had is left out.
async fn attempt_rows(
    engine: &Engine,
    records: &[DeliveryRecord],
) -> Result<Vec<AttemptRow>, SeamError> {
    let mut jobs: HashMap<String, DeliveryJob> = HashMap::new();
    let mut unknown = Vec::new();
    for r in records {
        match r {
            DeliveryRecord::Job(j) => {
                jobs.insert(j.job_id.clone(), j.clone());
            }
            DeliveryRecord::Attempt(a) if !jobs.contains_key(&a.job_id) => {
                unknown.push(a.job_id.clone());
            }
            _ => {}
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        for state in engine.queue.jobs(unknown).await? {
            jobs.insert(state.job.job_id.clone(), state.job);
        }
    }
    Ok(records
        .iter()
        .filter_map(|r| match r {
            DeliveryRecord::Attempt(a) => jobs.get(&a.job_id).map(|job| AttemptRow {
                job: job.clone(),
                attempt: a.clone(),
            }),
            _ => None,
        })
        .collect())
}

/// Applies the deliveries log, as it is now, to the store (a replay's second half).
pub async fn apply_log(engine: &Engine) -> Result<(), SeamError> {
    for p in 0..engine.deliveries.partitions() {
        apply_partition(engine, p, false, |_| {}).await?;
    }
    Ok(())
}

/// Applies partition `p` of the deliveries log, read from the log itself, from where the queue
/// stopped to the log's end now; returns where it stopped (short of the end only if the log
/// gave nothing more) and that end. The first batch may be in the attempt log already (it was
/// inserted there before the queue was committed); with `all_maybe_inserted`, any may.
async fn apply_partition(
    engine: &Engine,
    p: Partition,
    all_maybe_inserted: bool,
    mut applied: impl FnMut(&[DeliveryRecord]),
) -> Result<(u64, u64), SeamError> {
    let log = &engine.deliveries;
    let (start, end) = log.bounds(p).await?;
    let mut at = engine.queue.position(CONSUMER, p).await?.max(start);
    let mut maybe_inserted = true;
    while at < end {
        let batch = log.read(p, at, APPLY_BATCH, 4 << 20).await?;
        let Some(last) = batch.last().map(|r| r.offset) else {
            break;
        };
        let next = Position {
            partition: p,
            offset: last + 1,
        };
        let records = decode(&batch);
        apply_batch(engine, &records, next, maybe_inserted).await?;
        applied(&records);
        maybe_inserted = all_maybe_inserted;
        at = next.offset;
    }
    Ok((at, end))
}

fn decode(batch: &[Record]) -> Vec<DeliveryRecord> {
    batch
        .iter()
        .filter_map(|r| match serde_json::from_slice(&r.payload) {
            Ok(d) => Some(d),
            Err(e) => {
                let position = r.position();
                tracing::error!(?position, error = %e, "skipping an undecodable delivery record");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "in the past"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
