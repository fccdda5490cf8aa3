//! The one place where backends are chosen, by the URL of the configuration's `log`: the
//! embedded log (`file://DIR`, or nothing: the data directory) or Kafka
//! (`kafka://HOST:PORT[,HOST:PORT]/PREFIX`). The rest of the engine only sees the seams.

use crate::config::Config;
use crate::embedded_log::{EmbeddedEventLog, Faults, LogOptions};
use anyhow::Context as _;
use postback_core::log::EventLog;
use postback_core::seams::{AnalyticsStore, DeliveryQueue, StateStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The engine's three logs.
pub struct Logs {
    /// Clicks and postbacks.
    pub events: Arc<dyn EventLog>,
    /// Postbacks that passed their click's rules, keyed by conversion, for the dedupe.
    pub conversions: Arc<dyn EventLog>,
    /// Catalog changes: one partition, never expired (replays need all of it).
    pub catalog: Arc<dyn EventLog>,
    /// Affiliate-postback jobs and the outcome of each attempt.
    pub deliveries: Arc<dyn EventLog>,
}

/// The engine's stores.
pub struct Stores {
    /// What the stats API reads.
    pub analytics: Arc<dyn AnalyticsStore>,
    /// The processor's state and positions.
    pub state: Arc<dyn StateStore>,
    /// The affiliate-postback jobs.
    pub queue: Arc<dyn DeliveryQueue>,
    /// The analytics store is the state store (both SQLite): its clicks and conversions are
    /// written with the state, in the transaction that moves the positions.
    pub analytics_is_state: bool,
}

/// Opens the stores: SQLite in the data directory (`store.sqlite`) for the state and the
/// queue, and for the analytics unless the configuration names ClickHouse.
pub async fn open_stores(config: &Config, dir: &Path) -> anyhow::Result<Stores> {
    let sqlite = Arc::new(
        crate::sqlite_store::SqliteStore::open(&dir.join("store.sqlite"))
            .context("opening the store")?
            .with_query_budget(Duration::from_millis(config.query_timeout_ms)),
    );
    let store = config.store.trim();
    if store.is_empty() {
        return Ok(Stores {
            analytics: sqlite.clone(),
            state: sqlite.clone(),
            queue: sqlite,
            analytics_is_state: true,
        });
    }
    let clickhouse = postback_clickhouse::ClickHouseStore::connect(&clickhouse_config(config)?)
        .await
        .with_context(|| format!("connecting to the analytics store {}", redact(store)))?;
    if config.migrate {
        clickhouse
            .migrate_at_start()
            .await
            .context("migrating the ClickHouse schema")?;
    }
    clickhouse
        .check_schema()
        .await
        .context("checking the ClickHouse schema")?;
    Ok(Stores {
        analytics: Arc::new(clickhouse),
        state: sqlite.clone(),
        queue: sqlite,
        analytics_is_state: false,
    })
}

fn clickhouse_config(config: &Config) -> anyhow::Result<postback_clickhouse::ClickHouseConfig> {
    let mut c = postback_clickhouse::ClickHouseConfig::from_url(config.store.trim())
        .map_err(anyhow::Error::msg)?;
    c.retention_days = config.retention_days;
    c.query_timeout = Duration::from_millis(config.query_timeout_ms);
    Ok(c)
}

/// `postbackd migrate`: brings the ClickHouse schema up to this build's, then, with
/// `recount_hours`, counts the hourly counts again from the rows; returns how many migrations
/// it applied.
pub async fn migrate(config: &Config, recount_hours: bool) -> anyhow::Result<usize> {
    if config.store.trim().is_empty() {
        anyhow::bail!(
            "migrate: no --store given; the embedded store needs no migrations (a store of an \
             older schema is rebuilt from the logs at start)"
        );
    }
    let store = postback_clickhouse::ClickHouseStore::connect(&clickhouse_config(config)?)
        .await
        .with_context(|| format!("connecting to {}", redact(config.store.trim())))?;
    let applied = store.migrate().await?;
    if recount_hours {
        store.recount_hours().await?;
    }
    Ok(applied)
}

/// A store URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Checks the backends' URLs as `serve` would read them, without connecting.
pub fn check(config: &Config) -> anyhow::Result<()> {
    if let LogUrl::Kafka(url) = LogUrl::parse(config)? {
        check_kafka(&url)?;
    }
    if !config.store.trim().is_empty() {
        clickhouse_config(config)?;
    }
    Ok(())
}

#[cfg(feature = "kafka")]
fn check_kafka(url: &str) -> anyhow::Result<()> {
    postback_kafka::KafkaConfig::from_url(url)
        .map(drop)
        .map_err(anyhow::Error::msg)
}

#[cfg(not(feature = "kafka"))]
fn check_kafka(_url: &str) -> anyhow::Result<()> {
    anyhow::bail!("log: Kafka is not enabled in this build (the `kafka` feature)")
}

/// Failures to inject into the embedded logs, for tests of recovery.
#[derive(Default, Clone)]
pub struct InjectedFaults {
    pub events: Option<Arc<Faults>>,
    pub deliveries: Option<Arc<Faults>>,
    /// No catalog follower in the background: the catalog changes other processes make
    /// arrive only when this process needs them (a follower lagging as far as it can).
    pub catalog_unfollowed: bool,
}

/// Where the logs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUrl {
    File(PathBuf),
    Kafka(String),
}

impl LogUrl {
    pub fn parse(config: &Config) -> anyhow::Result<Self> {
        let url = config.log.trim();
        if url.is_empty() {
            return Ok(LogUrl::File(config.data_dir.clone()));
        }
        if let Some(dir) = url.strip_prefix("file://") {
            let dir = if dir.is_empty() {
                config.data_dir.clone()
            } else {
                PathBuf::from(dir)
            };
            return Ok(LogUrl::File(dir));
        }
        if url.starts_with("kafka://") {
            return Ok(LogUrl::Kafka(url.to_string()));
        }
        anyhow::bail!("log: {url:?} is neither file://DIR nor kafka://HOST:PORT/PREFIX")
    }
}

/// Opens (or creates) the logs the configuration names.
pub async fn open_logs(config: &Config, faults: InjectedFaults) -> anyhow::Result<Logs> {
    let retention = Duration::from_secs(u64::from(config.retention_days) * 86_400);
    let append_timeout = Duration::from_millis(config.append_timeout_ms.max(1));
    let partitions = config.partitions();
    match LogUrl::parse(config)? {
        LogUrl::File(dir) => {
            let options = |faults: Option<Arc<Faults>>, retention: Option<Duration>| LogOptions {
                append_timeout,
                faults,
                retention,
                ..LogOptions::default()
            };
            let open = |name: &str, partitions, options| {
                EmbeddedEventLog::open(&dir.join(name), partitions, options)
                    .with_context(|| format!("opening the {name} log in {}", dir.display()))
            };
            Ok(Logs {
                events: Arc::new(open(
                    "events",
                    partitions,
                    options(faults.events, Some(retention)),
                )?),
                conversions: Arc::new(open(
                    "conversions",
                    partitions,
                    options(None, Some(retention)),
                )?),
                catalog: Arc::new(open("catalog", 1, options(None, None))?),
                deliveries: Arc::new(open(
                    "deliveries",
                    partitions,
                    options(faults.deliveries, Some(retention)),
                )?),
            })
        }
        LogUrl::Kafka(url) => {
            let linger = Duration::from_millis(config.kafka_linger_ms);
            open_kafka(&url, partitions, retention, append_timeout, linger).await
        }
    }
}

#[cfg(feature = "kafka")]
async fn open_kafka(
    url: &str,
    partitions: u32,
    retention: Duration,
    append_timeout: Duration,
    linger: Duration,
) -> anyhow::Result<Logs> {
    let mut config = postback_kafka::KafkaConfig::from_url(url).map_err(anyhow::Error::msg)?;
    config.append_timeout = append_timeout;
    config.linger = linger;
    let kafka = postback_kafka::Kafka::connect(config).context("connecting to Kafka")?;
    let topic = |name: &'static str, partitions, retention| {
        let kafka = kafka.clone();
        async move {
            kafka
                .log(name, partitions, retention)
                .await
                .with_context(|| format!("opening the {name} topic"))
        }
    };
    Ok(Logs {
        events: topic("events", partitions, Some(retention)).await?,
        conversions: topic("conversions", partitions, Some(retention)).await?,
        catalog: topic("catalog", 1, None).await?,
        deliveries: topic("deliveries", partitions, Some(retention)).await?,
    })
}

#[cfg(not(feature = "kafka"))]
async fn open_kafka(
    url: &str,
    _partitions: u32,
    _retention: Duration,
    _append_timeout: Duration,
    _linger: Duration,
) -> anyhow::Result<Logs> {
    anyhow::bail!(
        "log: {url}: the Kafka log is not enabled in this build (build postbackd with the \
         `kafka` feature, which is on by default)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_urls() {
        let config = |log: &str| Config {
            log: log.into(),
            data_dir: "/d".into(),
            ..Config::default()
        };
        assert_eq!(
            LogUrl::parse(&config("")).expect("url"),
            LogUrl::File("/d".into())
        );
        assert_eq!(
            LogUrl::parse(&config("file:///var/log/pb")).expect("url"),
            LogUrl::File("/var/log/pb".into())
        );
        assert_eq!(
            LogUrl::parse(&config("kafka://k:9092/pb")).expect("url"),
            LogUrl::Kafka("kafka://k:9092/pb".into())
        );
        assert!(LogUrl::parse(&config("redis://x")).is_err());
        assert_eq!(config("kafka://k:9092").partitions(), 12);
        assert_eq!(config("").partitions(), 1);
    }
}
