//! `postbackd`: parse the command line, load the configuration, start telemetry, run.

use clap::{Parser, Subcommand};

// malloc/free took 8% of the engine's cycles under load with glibc's allocator (README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use postbackd::{Config, Overrides, Server};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "postbackd", version, about = "The postback engine")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Clone, Default)]
struct Common {
    /// Configuration file (TOML); settings in it are overridden by POSTBACKD_* variables.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: event log, catalog, store, generated API key.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The event logs: file://DIR (embedded, the default: in the data directory) or
    /// kafka://HOST:PORT[,HOST:PORT]/PREFIX.
    #[arg(long)]
    log: Option<String>,
    /// The analytics store: empty for the embedded one (SQLite in the data directory), or
    /// clickhouse://[USER[:PASSWORD]@]HOST:PORT/DATABASE.
    #[arg(long)]
    store: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine (the default).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// API key for /3.0/ (default: generated once and kept in the data directory).
        #[arg(long)]
        api_key: Option<String>,
        /// Let affiliate postbacks reach loopback, private and link-local addresses.
        #[arg(long)]
        allow_private_postback_targets: bool,
        /// Apply the ClickHouse schema's migrations first (as `postbackd migrate` does).
        #[arg(long)]
        migrate: bool,
        /// What this process does: ingest, process, dispatch, api (comma-separated; all by
        /// default).
        #[arg(long)]
        roles: Option<postbackd::config::Roles>,
    },
    /// Create or upgrade the ClickHouse schema (--store clickhouse://...), then exit.
    /// Idempotent: applied migrations are recorded in the database's `schema_versions`.
    /// Safe to run from several processes at once on a new database; on one that holds rows,
    /// run it once, with no engine writing (migrations 2 and 3 count the rows already logged).
    Migrate {
        #[command(flatten)]
        common: Common,
        /// Then count the hourly counts again from the rows (after the ClickHouse server was
        /// killed during an insert); with no engine writing.
        #[arg(long)]
        recount_hours: bool,
    },
    /// Rebuild the analytics store from the event log, then exit.
    Replay {
        #[command(flatten)]
        common: Common,
    },
    /// Check the configuration (file, POSTBACKD_* variables, flags) and print what it
    /// resolves to, without connecting to anything; exits non-zero on an error.
    CheckConfig {
        #[command(flatten)]
        common: Common,
        /// What the process would do (as `serve --roles`).
        #[arg(long)]
        roles: Option<postbackd::config::Roles>,
    },
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        // Colours for a terminal only: a log file or collector gets plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    // Named so that a thread's CPU time says its stage (`pbload --server-pid` reports it):
    // HTTP, the stats API and the dispatcher run here.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("front-end")
        .build()?;
    let default = Command::Serve {
        common: Common::default(),
        listen: None,
        api_key: None,
        allow_private_postback_targets: false,
        migrate: false,
        roles: None,
    };
    match cli.command.unwrap_or(default) {
        Command::Serve {
            common,
            listen,
            api_key,
            allow_private_postback_targets,
            migrate,
            roles,
        } => {
            let flags = Overrides {
                listen,
                data_dir: common.data_dir,
                log: common.log,
                store: common.store,
                roles,
                migrate,
                api_key,
                allow_private_postback_targets,
            };
            let config = Config::load(common.config.as_deref(), &env, &flags)?;
            postbackd::priority::set_background(config.background_priority());
            let metrics =
                metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
            runtime.block_on(serve(config, metrics))
        }
        Command::Migrate {
            common,
            recount_hours,
        } => {
            let flags = Overrides {
                data_dir: common.data_dir,
                log: common.log,
                store: common.store,
                ..Default::default()
            };
            let config = Config::load(common.config.as_deref(), &env, &flags)?;
            let applied = runtime.block_on(postbackd::backends::migrate(&config, recount_hours))?;
            println!("applied {applied} migration(s); the schema is current");
            if recount_hours {
                println!("the hourly counts were counted again from the rows");
            }
            Ok(())
        }
        Command::CheckConfig { common, roles } => {
            let flags = Overrides {
                data_dir: common.data_dir,
                log: common.log,
                store: common.store,
                roles,
                ..Default::default()
            };
            let c = Config::load(common.config.as_deref(), &env, &flags)?;
            postbackd::backends::check(&c)?;
            println!("configuration is valid");
            println!("listen: {}", c.listen);
            println!("roles: {}", c.roles);
            println!("data directory: {}", c.data_dir.display());
            println!("log: {}", postbackd::backends::redact(&c.log));
            println!("store: {}", postbackd::backends::redact(&c.store));
            println!("partitions: {}", c.partitions());
            Ok(())
        }
        Command::Replay { common } => {
            let flags = Overrides {
                data_dir: common.data_dir,
                log: common.log,
                store: common.store,
                ..Default::default()
            };
            let config = Config::load(common.config.as_deref(), &env, &flags)?;
            let n = runtime.block_on(postbackd::engine::replay(config))?;
            println!("replayed {n} events into a new store");
            Ok(())
        }
    }
}

async fn serve(
    config: Config,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    let server = Server::start(config, Some(metrics)).await?;
    println!("postbackd listening on http://{}", server.addr());
    println!(
        "data directory: {}",
        server.engine.config.data_dir.display()
    );
    if config_key_was_generated(&server) {
        println!("API key: {}", server.engine.api_key);
    }
    shutdown_signal().await;
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// A key given in the configuration is not echoed to the logs; a generated one is, once.
fn config_key_was_generated(server: &Server) -> bool {
    server.engine.config.api_key.is_empty()
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
