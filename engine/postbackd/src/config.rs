//! Configuration: one typed tree with compiled-in defaults, overridden by a TOML file, then by
//! `POSTBACKD_*` environment variables, then by command-line flags. Unknown keys are errors.

use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the HTTP server listens.
    pub listen: SocketAddr,
    /// Where the event log, the catalog and the embedded store live.
    pub data_dir: PathBuf,
    /// The event logs: empty or `file://DIR` for the embedded log (in the data directory, or
    /// DIR), `kafka://HOST:PORT[,HOST:PORT]/PREFIX` for topics `PREFIX.events`,
    /// `PREFIX.catalog` and `PREFIX.deliveries` on a Kafka cluster.
    pub log: String,
    /// The analytics store: empty for the embedded SQLite store in the data directory, or
    /// `clickhouse://[USER[:PASSWORD]@]HOST:PORT/DATABASE` (the HTTP port). The processor's
    /// state and the delivery queue stay in the data directory either way.
    pub store: String,
    /// What this process does (`ingest`, `process`, `dispatch`, `api`; all by default), so that
    /// a deployment scales the front end, the processors, the dispatchers and the stats API
    /// apart. `/health`, `/ready` and `/metrics` are served whatever the roles.
    pub roles: Roles,
    /// Apply the ClickHouse schema's migrations at start (`postbackd migrate` does it alone).
    /// Off: a store whose schema is behind this build's is refused with a clear error.
    pub migrate: bool,
    /// The key for everything under `/3.0/`. Empty: generated once and kept in the data dir.
    pub api_key: String,
    /// The platform-level secure code every postback must carry. Empty: none.
    pub platform_secure: String,
    /// Rows older than this many days are deleted from the store.
    pub retention_days: u32,
    /// The largest query string or body a tracking request may have, in bytes.
    pub max_request_bytes: usize,
    /// Take the client address from `X-Forwarded-For` (only behind a trusted proxy).
    pub trust_forwarded_for: bool,
    /// With `trust_forwarded_for`: the proxies (IPs or CIDRs) whose `X-Forwarded-For` entries
    /// are skipped, from the right, to find the client. Empty: one proxy, the peer.
    pub trusted_proxies: Vec<String>,
    /// The largest body of an `/3.0/` request (after the key was checked), in bytes.
    pub max_api_body_bytes: usize,
    /// Memory for request bodies and queries in flight, shared by all requests, in bytes: a
    /// request that cannot get its share within `request_timeout_secs` is answered 503.
    pub request_memory_bytes: usize,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Threads serving HTTP, each keeping the connections it is given (`crate::cores`).
    /// 0: one per core.
    pub http_threads: usize,
    /// Accept the API key in the query string (`api-key=`), as Affise does. Keys in URLs end up
    /// in proxies' logs: turn it off where clients send the header.
    pub api_key_in_query: bool,
    /// A second address serving only `/metrics`, without the key (for a scraper on a private
    /// network). On the main address `/metrics` needs the key.
    pub metrics_listen: Option<SocketAddr>,
    /// Partitions of the events and deliveries logs (fixed when a log is created; at most 256).
    /// Clicks and postbacks are placed by click id, so each partition is processed in order.
    /// Default: 1 for the embedded log, 12 for Kafka.
    pub partitions: Option<u32>,
    /// Deduplicate conversions in a second stage, keyed by conversion (offer, goal, action id)
    /// on the `conversions` log, so that processes owning different partitions of the events
    /// log never both create one conversion. Default: on with Kafka, where partitions may be
    /// spread over processes; off with the embedded log, where one process owns them all and
    /// one pass decides the same.
    pub separate_dedupe: Option<bool>,
    /// How processing and the store's writes give way to the front end (`idle` or `nice`, see
    /// `priority::Background`). Default: `idle` with the embedded log, where the engine has
    /// the machine to itself; `nice` with Kafka, whose broker may share it.
    pub background_priority: Option<crate::priority::Background>,
    /// How many log records the processor takes at once.
    pub processor_batch: usize,
    /// How many bytes of log records the processor takes at once (at least one record).
    pub processor_batch_bytes: usize,
    /// Memory for the recent clicks and conversions the processor keeps, in bytes.
    pub processor_cache_bytes: usize,
    /// After a batch smaller than `processor_batch`, wait this long (milliseconds) before the
    /// next, so that the store gets few large inserts: ClickHouse prefers them, and each
    /// SQLite commit rewrites every index page it touches. Default: 100 with the embedded
    /// store, 200 with ClickHouse.
    pub processor_linger_ms: Option<u64>,
    /// Seconds a client has to send its request headers and body.
    pub request_timeout_secs: u64,
    /// Milliseconds a stats query may run before it is stopped and refused (400).
    pub query_timeout_ms: u64,
    /// Milliseconds an append to the log may take (a stalled disk) before the request is
    /// answered 503; what was refused is never stored afterwards.
    pub append_timeout_ms: u64,
    /// With Kafka: milliseconds the producer waits to gather records into a request
    /// (`linger.ms`). Longer spends less CPU per record and delays each acknowledgement by as
    /// much; 1 takes bursts best (measured in the README).
    pub kafka_linger_ms: u64,
    /// Let affiliate postbacks reach loopback, private and link-local addresses.
    pub allow_private_postback_targets: bool,
    /// Attempts per delivery (a re-send starts a new round).
    pub delivery_max_attempts: u32,
    /// The first retry waits about this long (milliseconds); each next one twice as long.
    pub delivery_base_delay_ms: u64,
    /// No retry waits longer than this (seconds), `Retry-After` included.
    pub delivery_max_delay_secs: u64,
    /// Time to connect to an affiliate's server (milliseconds).
    pub delivery_connect_timeout_ms: u64,
    /// Time for a whole attempt (milliseconds).
    pub delivery_timeout_ms: u64,
    /// Attempts under way at once to one host.
    pub delivery_per_host: usize,
    /// Attempts under way at once in all.
    pub delivery_concurrency: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            log: String::new(),
            store: String::new(),
            roles: Roles::ALL,
            migrate: false,
            api_key: String::new(),
            platform_secure: String::new(),
            retention_days: 92,
            max_request_bytes: 32 * 1024,
            trust_forwarded_for: false,
            trusted_proxies: Vec::new(),
            max_api_body_bytes: 1 << 20,
            request_memory_bytes: 64 << 20,
            max_connections: 4096,
            http_threads: 0,
            api_key_in_query: true,
            metrics_listen: None,
            partitions: None,
            separate_dedupe: None,
            background_priority: None,
            processor_batch: 2048,
            processor_batch_bytes: 8 << 20,
            processor_cache_bytes: 64 << 20,
            processor_linger_ms: None,
            request_timeout_secs: 10,
            append_timeout_ms: 5000,
            kafka_linger_ms: 1,
            query_timeout_ms: 10_000,
            allow_private_postback_targets: false,
            delivery_max_attempts: 8,
            delivery_base_delay_ms: 10_000,
            delivery_max_delay_secs: 3600,
            delivery_connect_timeout_ms: 3000,
            delivery_timeout_ms: 10_000,
            delivery_per_host: 8,
            delivery_concurrency: 256,
        }
    }
}

/// What a process does: take tracking requests (`ingest`), process the event log into the
/// store (`process`), deliver affiliate postbacks (`dispatch`), serve `/3.0/` (`api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
    pub process: bool,
    pub dispatch: bool,
    pub api: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        ingest: true,
        process: true,
        dispatch: true,
        api: true,
    };
}

impl std::str::FromStr for Roles {
    type Err = String;

    /// A comma-separated list, e.g. `ingest,api`; `all` for every role.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut roles = Roles {
            ingest: false,
            process: false,
            dispatch: false,
            api: false,
        };
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "all" => roles = Roles::ALL,
                "ingest" => roles.ingest = true,
                "process" => roles.process = true,
                "dispatch" => roles.dispatch = true,
                "api" => roles.api = true,
                other => {
                    return Err(format!(
                        "unknown role {other:?} (roles: ingest, process, dispatch, api, all)"
                    ))
                }
            }
        }
        if roles
            == (Roles {
                ingest: false,
                process: false,
                dispatch: false,
                api: false,
            })
        {
            return Err("no role given (roles: ingest, process, dispatch, api, all)".into());
        }
        Ok(roles)
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (self.ingest, "ingest"),
            (self.process, "process"),
            (self.dispatch, "dispatch"),
            (self.api, "api"),
        ];
        let on: Vec<&str> = names.iter().filter(|r| r.0).map(|r| r.1).collect();
        f.write_str(&on.join(","))
    }
}

/// In the configuration file: `roles = "ingest,api"` or `roles = ["ingest", "api"]`.
impl<'de> Deserialize<'de> for Roles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Text(String),
            List(Vec<String>),
        }
        let text = match Given::deserialize(d)? {
            Given::Text(t) => t,
            Given::List(l) => l.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub log: Option<String>,
    pub store: Option<String>,
    pub roles: Option<Roles>,
    pub migrate: bool,
    pub api_key: Option<String>,
    pub allow_private_postback_targets: bool,
}

impl Config {
    /// Partitions of the events and deliveries logs: as configured, or the backend's default.
    pub fn partitions(&self) -> u32 {
        self.partitions
            .unwrap_or(if self.log.starts_with("kafka://") {
                12
            } else {
                1
            })
    }

    /// Threads serving HTTP: as configured, or one per core.
    pub fn http_threads(&self) -> usize {
        match self.http_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// How background threads give way: as configured, or the log backend's default.
    pub fn background_priority(&self) -> crate::priority::Background {
        use crate::priority::Background;
        self.background_priority
            .unwrap_or(if self.log.starts_with("kafka://") {
                Background::Nice
            } else {
                Background::Idle
            })
    }

    /// Whether the dedupe runs as a stage of its own (see `separate_dedupe`).
    pub fn dedupe_separately(&self) -> bool {
        self.separate_dedupe
            .unwrap_or_else(|| self.log.starts_with("kafka://"))
    }

    /// The processor's pause after a short batch: as configured, or the store's default.
    pub fn processor_linger(&self) -> std::time::Duration {
        let default = if self.store.is_empty() { 100 } else { 200 };
        std::time::Duration::from_millis(self.processor_linger_ms.unwrap_or(default))
    }

    /// The dispatcher's settings.
    pub fn delivery(&self) -> crate::dispatcher::DeliveryConfig {
        crate::dispatcher::DeliveryConfig {
            policy: postback_core::delivery::RetryPolicy {
                max_attempts: self.delivery_max_attempts.max(1),
                base: std::time::Duration::from_millis(self.delivery_base_delay_ms),
                max_delay: std::time::Duration::from_secs(self.delivery_max_delay_secs),
            },
            connect_timeout: std::time::Duration::from_millis(self.delivery_connect_timeout_ms),
            timeout: std::time::Duration::from_millis(self.delivery_timeout_ms),
            per_host: self.delivery_per_host,
            concurrency: self.delivery_concurrency,
        }
    }

    /// Builds the configuration from its layers. `env` is the process environment, passed in.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &Overrides,
    ) -> anyhow::Result<Self> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        if let Some(v) = flags.listen {
            config.listen = v;
        }
        if let Some(v) = &flags.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &flags.api_key {
            config.api_key = v.clone();
        }
        if flags.allow_private_postback_targets {
            config.allow_private_postback_targets = true;
        }
        config.trusted_proxy_nets()?;
        if let Some(v) = &flags.log {
            config.log = v.clone();
        }
        if let Some(v) = &flags.store {
            config.store = v.clone();
        }
        if let Some(v) = flags.roles {
            config.roles = v;
        }
        if flags.migrate {
            config.migrate = true;
        }
        if !(1..=256).contains(&config.partitions()) {
            anyhow::bail!("partitions must be from 1 to 256");
        }
        if config.kafka_linger_ms >= config.append_timeout_ms {
            anyhow::bail!("kafka_linger_ms must be below append_timeout_ms");
        }
        Ok(config)
    }

    /// `trusted_proxies` parsed; an entry that is neither an IP nor a CIDR is an error.
    pub fn trusted_proxy_nets(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.trusted_proxies
            .iter()
            .map(|e| {
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| anyhow::anyhow!("trusted_proxies: {e:?} is not an IP or CIDR"))
            })
            .collect()
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> anyhow::Result<()> {
        for (key, value) in env {
            let Some(name) = key.strip_prefix("POSTBACKD_") else {
                continue;
            };
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{key}: {e}");
            match name {
                "LISTEN" => self.listen = value.parse().map_err(|e| bad(&e))?,
                "DATA_DIR" => self.data_dir = PathBuf::from(value),
                "API_KEY" => self.api_key = value.clone(),
                "PLATFORM_SECURE" => self.platform_secure = value.clone(),
                "RETENTION_DAYS" => self.retention_days = value.parse().map_err(|e| bad(&e))?,
                "MAX_REQUEST_BYTES" => {
                    self.max_request_bytes = value.parse().map_err(|e| bad(&e))?
                }
                "TRUST_FORWARDED_FOR" => {
                    self.trust_forwarded_for = value.parse().map_err(|e| bad(&e))?
                }
                "TRUSTED_PROXIES" => {
                    self.trusted_proxies = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "MAX_API_BODY_BYTES" => {
                    self.max_api_body_bytes = value.parse().map_err(|e| bad(&e))?
                }
                "REQUEST_MEMORY_BYTES" => {
                    self.request_memory_bytes = value.parse().map_err(|e| bad(&e))?
                }
                "MAX_CONNECTIONS" => self.max_connections = value.parse().map_err(|e| bad(&e))?,
                "HTTP_THREADS" => self.http_threads = value.parse().map_err(|e| bad(&e))?,
                "API_KEY_IN_QUERY" => self.api_key_in_query = value.parse().map_err(|e| bad(&e))?,
                "METRICS_LISTEN" => self.metrics_listen = Some(value.parse().map_err(|e| bad(&e))?),
                "PARTITIONS" => self.partitions = Some(value.parse().map_err(|e| bad(&e))?),
                "SEPARATE_DEDUPE" => {
                    self.separate_dedupe = Some(value.parse().map_err(|e| bad(&e))?)
                }
                "BACKGROUND_PRIORITY" => {
                    self.background_priority = Some(value.parse().map_err(|e: String| bad(&e))?)
                }
                "LOG" => self.log = value.clone(),
                "STORE" => self.store = value.clone(),
                "ROLES" => self.roles = value.parse().map_err(|e| bad(&e))?,
                "MIGRATE" => self.migrate = value.parse().map_err(|e| bad(&e))?,
                "PROCESSOR_LINGER_MS" => {
                    self.processor_linger_ms = Some(value.parse().map_err(|e| bad(&e))?)
                }
                "PROCESSOR_BATCH" => self.processor_batch = value.parse().map_err(|e| bad(&e))?,
                "PROCESSOR_BATCH_BYTES" => {
                    self.processor_batch_bytes = value.parse().map_err(|e| bad(&e))?
                }
                "PROCESSOR_CACHE_BYTES" => {
                    self.processor_cache_bytes = value.parse().map_err(|e| bad(&e))?
                }
                "REQUEST_TIMEOUT_SECS" => {
                    self.request_timeout_secs = value.parse().map_err(|e| bad(&e))?
                }
                "QUERY_TIMEOUT_MS" => self.query_timeout_ms = value.parse().map_err(|e| bad(&e))?,
                "APPEND_TIMEOUT_MS" => {
                    self.append_timeout_ms = value.parse().map_err(|e| bad(&e))?
                }
                "KAFKA_LINGER_MS" => self.kafka_linger_ms = value.parse().map_err(|e| bad(&e))?,
                "ALLOW_PRIVATE_POSTBACK_TARGETS" => {
                    self.allow_private_postback_targets = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_MAX_ATTEMPTS" => {
                    self.delivery_max_attempts = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_BASE_DELAY_MS" => {
                    self.delivery_base_delay_ms = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_MAX_DELAY_SECS" => {
                    self.delivery_max_delay_secs = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_CONNECT_TIMEOUT_MS" => {
                    self.delivery_connect_timeout_ms = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_TIMEOUT_MS" => {
                    self.delivery_timeout_ms = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_PER_HOST" => {
                    self.delivery_per_host = value.parse().map_err(|e| bad(&e))?
                }
                "DELIVERY_CONCURRENCY" => {
                    self.delivery_concurrency = value.parse().map_err(|e| bad(&e))?
                }
                _ => anyhow::bail!("unknown setting {key}"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nretention_days = 30\napi_key = \"f\"\n",
        )
        .expect("write");
        let env: HashMap<String, String> =
            [("POSTBACKD_RETENTION_DAYS".to_string(), "10".to_string())].into();
        let flags = Overrides {
            api_key: Some("flag".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&file), &env, &flags).expect("loads");
        assert_eq!(c.listen.port(), 9000, "file over default");
        assert_eq!(c.retention_days, 10, "environment over file");
        assert_eq!(c.api_key, "flag", "flag over file");
        assert_eq!(c.max_request_bytes, 32 * 1024, "default kept");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listn = \"127.0.0.1:9000\"\n").expect("write");
        let err = Config::load(Some(&file), &HashMap::new(), &Overrides::default());
        assert!(err.is_err());
        let env: HashMap<String, String> =
            [("POSTBACKD_LISTN".to_string(), "x".to_string())].into();
        assert!(Config::load(None, &env, &Overrides::default()).is_err());
    }

    #[test]
    fn roles_from_every_layer() {
        assert_eq!(Config::default().roles, Roles::ALL);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "roles = [\"ingest\", \"api\"]\n").expect("write");
        let c = Config::load(Some(&file), &HashMap::new(), &Overrides::default()).expect("file");
        assert_eq!(c.roles.to_string(), "ingest,api");
        let env: HashMap<String, String> = [(
            "POSTBACKD_ROLES".to_string(),
            " process , dispatch".to_string(),
        )]
        .into();
        let c = Config::load(Some(&file), &env, &Overrides::default()).expect("env");
        assert_eq!(c.roles.to_string(), "process,dispatch");
        let flags = Overrides {
            roles: Some("all".parse().expect("all")),
            ..Default::default()
        };
        assert_eq!(
            Config::load(None, &env, &flags).expect("flag").roles,
            Roles::ALL
        );
        for bad in ["", " , ", "ingest,web"] {
            let env: HashMap<String, String> =
                [("POSTBACKD_ROLES".to_string(), bad.to_string())].into();
            let err = Config::load(None, &env, &Overrides::default()).expect_err(bad);
            assert!(err.to_string().contains("role"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn background_priority_defaults_by_log_and_is_read_from_every_layer() {
        use crate::priority::Background;
        assert_eq!(Config::default().background_priority(), Background::Idle);
        let kafka = Config {
            log: "kafka://127.0.0.1:9092/p".into(),
            ..Config::default()
        };
        assert_eq!(kafka.background_priority(), Background::Nice);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "background_priority = \"nice\"\n").expect("write");
        let c = Config::load(Some(&file), &HashMap::new(), &Overrides::default()).expect("file");
        assert_eq!(c.background_priority(), Background::Nice);
        let env: HashMap<String, String> = [(
            "POSTBACKD_BACKGROUND_PRIORITY".to_string(),
            "idle".to_string(),
        )]
        .into();
        let c = Config::load(Some(&file), &env, &Overrides::default()).expect("env");
        assert_eq!(c.background_priority(), Background::Idle);
        let env: HashMap<String, String> = [(
            "POSTBACKD_BACKGROUND_PRIORITY".to_string(),
            "low".to_string(),
        )]
        .into();
        let err = Config::load(None, &env, &Overrides::default()).expect_err("low");
        assert!(err.to_string().contains("idle or nice"), "{err}");
    }

    #[test]
    fn http_threads_default_to_one_per_core_and_are_read_from_every_layer() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(Config::default().http_threads(), cores);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "http_threads = 3\n").expect("write");
        let c = Config::load(Some(&file), &HashMap::new(), &Overrides::default()).expect("file");
        assert_eq!(c.http_threads(), 3);
        let env: HashMap<String, String> =
            [("POSTBACKD_HTTP_THREADS".to_string(), "1".to_string())].into();
        let c = Config::load(Some(&file), &env, &Overrides::default()).expect("env");
        assert_eq!(c.http_threads(), 1);
    }

    #[test]
    fn kafka_linger_is_read_from_every_layer_and_stays_below_the_append_timeout() {
        assert_eq!(Config::default().kafka_linger_ms, 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "kafka_linger_ms = 5\n").expect("write");
        let c = Config::load(Some(&file), &HashMap::new(), &Overrides::default()).expect("file");
        assert_eq!(c.kafka_linger_ms, 5);
        let env = |v: &str| -> HashMap<String, String> {
            [("POSTBACKD_KAFKA_LINGER_MS".to_string(), v.to_string())].into()
        };
        let c = Config::load(Some(&file), &env("10"), &Overrides::default()).expect("env");
        assert_eq!(c.kafka_linger_ms, 10);
        let err = Config::load(None, &env("5000"), &Overrides::default()).expect_err("too long");
        assert!(err.to_string().contains("below append_timeout_ms"), "{err}");
    }
}
