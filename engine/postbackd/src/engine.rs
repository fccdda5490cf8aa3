//! The engine's shared state and its life cycle: open the data directory, load the catalog,
//! start the processor and the HTTP server; and the shutdown sequence that undoes it.

use crate::config::Config;
use crate::pipeline;
use crate::sqlite_store::{SchemaState, SqliteStore, SCHEMA_VERSION};
use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use postback_core::catalog::{Catalog, CatalogRecord};
use postback_core::ids::IdGenerator;
use postback_core::log::{EventLog, Keyed, Record};
use postback_core::seams::{AnalyticsStore, DeliveryQueue, SeamError, StateStore};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What every part of the running engine shares.
pub struct Engine {
    pub config: Config,
    pub api_key: String,
    /// Clicks and postbacks.
    pub events: Arc<dyn EventLog>,
    /// Postbacks on their way to the dedupe, keyed by conversion (see `pipeline`).
    pub conversions: Arc<dyn EventLog>,
    /// Catalog changes (never expired: the catalog is small and replays need all of it).
    pub catalog_log: Arc<dyn EventLog>,
    /// Affiliate-postback jobs and the outcome of each attempt.
    pub deliveries: Arc<dyn EventLog>,
    /// What the stats API reads.
    pub analytics: Arc<dyn AnalyticsStore>,
    /// The processor's state and positions.
    pub state: Arc<dyn StateStore>,
    /// The affiliate-postback jobs.
    pub queue: Arc<dyn DeliveryQueue>,
    /// See `backends::Stores::analytics_is_state`.
    pub analytics_is_state: bool,
    pub catalog: RwLock<Catalog>,
    /// The offset of the catalog log after the last record applied to `catalog`. Held while
    /// applying records and while writing, so that this process assigns new ids one at a time.
    pub catalog_writer: tokio::sync::Mutex<u64>,
    pub ids: IdGenerator,
    pub metrics: Option<PrometheusHandle>,
    pub http_metrics: crate::http::HttpMetrics,
    /// False once shutdown has begun.
    pub ready: AtomicBool,
    /// Memory for request bodies in flight (see `http::read_body`).
    pub request_memory: Arc<tokio::sync::Semaphore>,
    /// `config.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where affiliate postbacks may go.
    pub targets: Arc<crate::guard::TargetGuard>,
}

pub use crate::backends::InjectedFaults;

impl Engine {
    /// Opens the data directory: the logs, the store, and the catalog as the log has it.
    pub async fn open(
        config: Config,
        metrics: Option<PrometheusHandle>,
        faults: InjectedFaults,
    ) -> anyhow::Result<Arc<Self>> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let api_key = resolve_api_key(&config.api_key, &dir)?;
        let logs = crate::backends::open_logs(&config, faults).await?;
        let stores = crate::backends::open_stores(&config, &dir).await?;
        let (catalog, catalog_next) = load_catalog(logs.catalog.as_ref()).await?;
        let seed: [u8; 8] = rand::random();
        Ok(Arc::new(Self {
            api_key,
            events: logs.events,
            conversions: logs.conversions,
            catalog_log: logs.catalog,
            deliveries: logs.deliveries,
            analytics: stores.analytics,
            state: stores.state,
            queue: stores.queue,
            analytics_is_state: stores.analytics_is_state,
            catalog: RwLock::new(catalog),
            catalog_writer: tokio::sync::Mutex::new(catalog_next),
            ids: IdGenerator::new(
                [seed[0], seed[1], seed[2], seed[3], seed[4]],
                u32::from_le_bytes([seed[5], seed[6], seed[7], 0]),
            ),
            metrics,
            http_metrics: crate::http::HttpMetrics::new(),
            ready: AtomicBool::new(false),
            request_memory: crate::http::request_memory(config.request_memory_bytes),
            trusted_proxies: config.trusted_proxy_nets()?,
            targets: Arc::new(crate::guard::TargetGuard::new(
                config.allow_private_postback_targets,
            )),
            config,
        }))
    }

    /// Appends a catalog change durably and applies it, with every change before it in the
    /// log. `build` makes the change from the catalog as the log has it (one writer of this
    /// process at a time); when another process's creation took the new entity's id first, the
    /// appended record is void and `build` runs again on the catalog that now has that id.
    pub async fn change_catalog<T, E: From<SeamError>>(
        &self,
        build: impl Fn() -> Result<(CatalogRecord, T), E>,
    ) -> Result<T, E> {
        let mut next = self.catalog_writer.lock().await;
        for _ in 0..CATALOG_TRIES {
            self.catch_up(&mut next, None).await?;
            let (record, out) = build()?;
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| SeamError::Fatal(format!("encoding a catalog change: {e}")))?;
            let at = self
                .catalog_log
                .append(vec![Keyed::new(CATALOG_KEY, bytes)])
                .await?;
            let offset = at.first().map(|p| p.offset).ok_or_else(|| {
                SeamError::Fatal("the catalog log acknowledged no position".into())
            })?;
            if self.catch_up(&mut next, Some(offset)).await? == Some(true) {
                return Ok(out);
            }
            tracing::info!(
                offset,
                "another process created this id first; trying again"
            );
        }
        Err(SeamError::Unavailable("catalog: too many concurrent creations".into()).into())
    }

    /// Applies the catalog log from `next` to its end (and through `through`, waiting for it
    /// as long as an append may take): then whether the record at `through` took effect.
    async fn catch_up(
        &self,
        next: &mut u64,
        through: Option<u64>,
    ) -> Result<Option<bool>, SeamError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.append_timeout_ms.max(1));
        let mut outcome = None;
        loop {
            let end = self.catalog_log.bounds(0).await?.1;
            let goal = through.map_or(end, |offset| end.max(offset + 1));
            while *next < end {
                let batch = self.catalog_log.read(0, *next, 4096, 4 << 20).await?;
                let Some(last) = batch.last().map(|r| r.offset) else {
                    break; // not readable yet: wait below
                };
                let mut catalog = self.catalog_write();
                for r in batch {
                    let applied = catalog.apply_record(decode_catalog(&r)?);
                    if Some(r.offset) == through {
                        outcome = Some(applied);
                    }
                }
                *next = last + 1;
            }
            if *next >= goal {
                return Ok(outcome);
            }
            if Instant::now() > deadline {
                return Err(SeamError::Unavailable(format!(
                    "the catalog log did not give offsets {}..{goal} in time",
                    *next
                )));
            }
            self.catalog_log.wait_for(0, *next).await;
        }
    }

    /// Applies every catalog change the log holds now. The processing stages call it before a
    /// batch: a change acknowledged before a postback was appended is then applied before the
    /// postback is judged, however far behind the follower below is (a partner's postback
    /// setting created on one engine, a conversion made on another a moment later).
    pub async fn catalog_current(&self) -> Result<(), SeamError> {
        let mut next = self.catalog_writer.lock().await;
        self.catch_up(&mut next, None).await.map(|_| ())
    }

    /// Applies the changes other processes make to the catalog as they reach the log (within
    /// about 100 ms on Kafka), until `stop`.
    pub async fn follow_catalog(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let from = *self.catalog_writer.lock().await;
            tokio::select! {
                _ = self.catalog_log.wait_for(0, from) => {}
                _ = stop.changed() => return,
            }
            let mut next = self.catalog_writer.lock().await;
            if let Err(e) = self.catch_up(&mut next, None).await {
                drop(next);
                tracing::warn!(error = %e, "following the catalog log failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Why the engine should not get traffic now, if it should not: shutting down, or a log
    /// that cannot take appends (it recovers by itself; see `embedded_log`).
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        let logs: [(&str, &dyn EventLog); 3] = [
            ("event log", self.events.as_ref()),
            ("deliveries log", self.deliveries.as_ref()),
            ("catalog log", self.catalog_log.as_ref()),
        ];
        logs.iter()
            .find_map(|(name, log)| log.health().map(|why| format!("{name}: {why}")))
            // The processor waits for the analytics store (nothing is lost; the lag grows).
            .or_else(|| {
                self.analytics
                    .health()
                    .filter(|_| self.config.roles.process)
                    .map(|why| format!("analytics store: {why}"))
            })
    }

    pub fn catalog_read(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    fn catalog_write(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every catalog change has this key: one partition keeps them in order.
const CATALOG_KEY: &str = "catalog";

/// How often a writer builds a change again after losing its new id to another process.
const CATALOG_TRIES: usize = 16;

fn decode_catalog(r: &Record) -> Result<CatalogRecord, SeamError> {
    serde_json::from_slice(&r.payload).map_err(|e| {
        SeamError::Fatal(format!(
            "catalog record {:?} does not decode: {e}",
            r.position()
        ))
    })
}

/// The catalog as the log has it, and the offset after the last record applied.
async fn load_catalog(log: &dyn EventLog) -> anyhow::Result<(Catalog, u64)> {
    let mut catalog = Catalog::default();
    let mut from = log.bounds(0).await?.0;
    loop {
        let batch = log.read(0, from, 4096, 4 << 20).await?;
        let Some(last) = batch.last().map(|r| r.offset) else {
            break;
        };
        from = last + 1;
        for r in batch {
            catalog.apply_record(decode_catalog(&r)?);
        }
    }
    Ok((catalog, from))
}

/// The configured key, or the one kept in the data directory, or a new one kept there.
fn resolve_api_key(configured: &str, dir: &Path) -> anyhow::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    let path = dir.join("api_key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim();
        if !key.is_empty() {
            return Ok(key.to_string());
        }
    }
    let key: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::write(&path, &key).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// A running engine. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    pub engine: Arc<Engine>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    metrics_http: Option<JoinHandle<()>>,
    /// The processor and the dispatcher run where the roles say.
    processor: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
    housekeeping: JoinHandle<()>,
    catalog: Option<JoinHandle<()>>,
}

/// The Prometheus recorder keeps every histogram sample until it is drained, which only a
/// scrape or an upkeep does: without this, a server nobody scrapes grows by each request's
/// latency sample for ever.
async fn keep_metrics_bounded(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        handle.run_upkeep();
    }
}

impl Server {
    /// Opens the data directory and starts serving on `config.listen`. A store written by
    /// another schema version is rebuilt from the logs first.
    pub async fn start(config: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<Self> {
        Self::start_with(config, metrics, InjectedFaults::default()).await
    }

    /// [`Server::start`], with failures injected into the logs (for tests).
    pub async fn start_with(
        config: Config,
        metrics: Option<PrometheusHandle>,
        faults: InjectedFaults,
    ) -> anyhow::Result<Self> {
        let listener = crate::http::listen(config.listen)
            .with_context(|| format!("listening on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match config.metrics_listen {
            Some(a) => Some(
                crate::http::listen(a).with_context(|| format!("listening on {a} for metrics"))?,
            ),
            None => None,
        };
        rebuild_stale_store(&config).await?;
        if let Some(handle) = metrics.clone() {
            tokio::spawn(keep_metrics_bounded(handle));
        }
        let follow_catalog = !faults.catalog_unfollowed;
        let engine = Engine::open(config, metrics, faults).await?;
        let (stop, stop_rx) = watch::channel(false);
        let roles = engine.config.roles;
        tracing::info!(%roles, "starting");
        let processor = roles.process.then(|| {
            in_background(
                "processor",
                pipeline::run_processor(engine.clone(), stop_rx.clone()),
            )
        });
        let housekeeping = tokio::spawn(pipeline::run_retention(engine.clone(), stop_rx.clone()));
        let catalog =
            follow_catalog.then(|| tokio::spawn(engine.clone().follow_catalog(stop_rx.clone())));
        let dispatcher = roles.dispatch.then(|| {
            tokio::spawn(crate::dispatcher::run(
                engine.clone(),
                engine.config.delivery(),
                stop_rx.clone(),
            ))
        });
        engine.ready.store(true, Ordering::Release);
        let metrics_http = metrics_listener
            .map(|l| tokio::spawn(crate::http::serve(engine.clone(), l, stop_rx.clone(), true)));
        let http = tokio::spawn(crate::http::serve(engine.clone(), listener, stop_rx, false));
        Ok(Self {
            engine,
            addr,
            stop,
            http,
            metrics_http,
            processor,
            dispatcher,
            housekeeping,
            catalog,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shutdown sequence: readiness fails; the server stops accepting and drains requests
    /// in flight (each one that got a 200 is already durable); the processor finishes its batch
    /// and commits; the logs flush and fsync what is queued.
    pub async fn shutdown(self) {
        self.engine.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        let _ = self.http.await;
        if let Some(m) = self.metrics_http {
            let _ = m.await;
        }
        if let Some(p) = self.processor {
            let _ = p.await;
        }
        if let Some(d) = self.dispatcher {
            let _ = d.await;
        }
        let _ = self.housekeeping.await;
        if let Some(c) = self.catalog {
            let _ = c.await;
        }
        // Close the logs now rather than when the last reference goes.
        self.engine.events.close();
        self.engine.catalog_log.close();
        self.engine.deliveries.close();
    }
}

/// Runs `task` on a thread of its own with its own runtime, at background priority
/// (`crate::priority`): the processor must not take the cores the front end needs during a
/// burst, and gets the idle ones (threads it starts inherit the priority). The handle ends with
/// the task.
fn in_background(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    // Its worker (which runs what the task spawns: the processor's writes, while the task
    // itself judges the next batch on this thread) and its blocking threads (log reads, Kafka
    // calls) are named after it too.
    let io_name = format!("{name}-io");
    let started = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            crate::priority::lower_this_thread();
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .thread_name(io_name)
                .build()
            {
                Ok(runtime) => runtime.block_on(task),
                Err(e) => tracing::error!(error = %e, "could not start a background runtime"),
            }
            let _ = done.send(());
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "could not start a background thread");
    }
    tokio::spawn(async move {
        let _ = finished.await;
    })
}

/// The store is derived data: one written by an older schema is rebuilt from the logs rather
/// than migrated; one written by a newer version is left alone and refused.
async fn rebuild_stale_store(config: &Config) -> anyhow::Result<()> {
    let path = config.data_dir.join("store.sqlite");
    match SqliteStore::schema_state(&path)? {
        SchemaState::Current => Ok(()),
        SchemaState::Newer(v) => anyhow::bail!(
            "{} has schema version {v}, newer than this build's {SCHEMA_VERSION}; \
             run a newer postbackd",
            path.display()
        ),
        SchemaState::Stale(v) => {
            tracing::warn!(
                from = v,
                to = SCHEMA_VERSION,
                "the store's schema is older than this build's; rebuilding it from the logs"
            );
            let n = replay(config.clone()).await?;
            tracing::info!(events = n, "store rebuilt");
            Ok(())
        }
    }
}

/// Rebuilds the analytics store from the logs: the old store is set aside (renamed, not
/// deleted, until the new one is complete), every event is processed again, and the deliveries
/// log is applied again. No affiliate postback is created or sent again: the jobs and their
/// attempts are read back from the deliveries log.
pub async fn replay(config: Config) -> anyhow::Result<u64> {
    let dir = config.data_dir.clone();
    let store = dir.join("store.sqlite");
    let old = dir.join("store.sqlite.before-replay");
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", store.display()));
        let to = PathBuf::from(format!("{}{suffix}", old.display()));
        if from.exists() {
            std::fs::rename(&from, &to).with_context(|| format!("moving {}", from.display()))?;
        }
    }
    let engine = Engine::open(config, None, InjectedFaults::default()).await?;
    if !engine.analytics_is_state {
        // Rows of a replay may differ from the stored ones (a rule changed): start afresh.
        engine
            .analytics
            .clear()
            .await
            .context("clearing the analytics store")?;
    }
    let processed = pipeline::process_to_end(&engine).await?;
    crate::dispatcher::apply_log(&engine).await?;
    engine.events.close();
    engine.catalog_log.close();
    engine.deliveries.close();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", old.display()));
    }
    Ok(processed)
}
