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
    /// How many log records the processor takes at once.
    pub processor_batch: usize,
    /// How many recent clicks and conversions the processor keeps in memory.
    pub processor_cache: usize,
    /// Seconds a client has to send its request headers and body.
    pub request_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            api_key: String::new(),
            platform_secure: String::new(),
            retention_days: 92,
            max_request_bytes: 64 * 1024,
            trust_forwarded_for: false,
            processor_batch: 2048,
            processor_cache: 200_000,
            request_timeout_secs: 10,
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub api_key: Option<String>,
}

impl Config {
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
        Ok(config)
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
                "PROCESSOR_BATCH" => self.processor_batch = value.parse().map_err(|e| bad(&e))?,
                "PROCESSOR_CACHE" => self.processor_cache = value.parse().map_err(|e| bad(&e))?,
                "REQUEST_TIMEOUT_SECS" => {
                    self.request_timeout_secs = value.parse().map_err(|e| bad(&e))?
                }
                // Not ours: RUST_LOG and the like are read elsewhere.
                _ if name == "LOG" => {}
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
        assert_eq!(c.max_request_bytes, 64 * 1024, "default kept");
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
}
