//! `pbload`: drive a running postback engine (or a baseline server) and report.

use clap::Parser;
use pbload::{run, table, Options, Scenario};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pbload",
    about = "Open-loop load generator for the postback engine"
)]
struct Cli {
    /// The engine's base URL (loopback only in this project's tests and benchmarks). Repeat it
    /// (or give a comma-separated list) to spread the load over a cluster's engines in turn;
    /// setup and `--verify` go through the first.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    target: Vec<String>,
    #[arg(long, env = "PBLOAD_API_KEY", default_value = "")]
    api_key: String,
    #[arg(long, value_enum, default_value = "full")]
    scenario: Scenario,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Ramp instead of one rate: START:END:STEP requests/s, `duration` seconds per step; stops
    /// at the first step that falls short (under 95% of its rate, or over 1% errors).
    #[arg(long)]
    ramp: Option<String>,
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Afterwards, check every acknowledged postback in the stats; also samples e2e lag.
    #[arg(long)]
    verify: bool,
    /// Configure this affiliate postback URL for the run's partner.
    #[arg(long)]
    affiliate_url: Option<String>,
    /// Receive the run's affiliate postbacks on a loopback port of pbload's own (the engine
    /// must allow private targets); with `--verify`, check that each conversion state reached
    /// it exactly once.
    #[arg(long, conflicts_with = "affiliate_url")]
    receive_postbacks: bool,
    /// Write the report(s) as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let base = Options {
        targets: cli.target.clone(),
        api_key: cli.api_key.clone(),
        scenario: cli.scenario,
        rate: cli.rate,
        duration: Duration::from_secs_f64(cli.duration),
        max_in_flight: cli.max_in_flight,
        verify: cli.verify,
        affiliate_url: cli.affiliate_url.clone(),
        receive_postbacks: cli.receive_postbacks,
        quiet: cli.quiet,
    };
    let reports = match &cli.ramp {
        None => vec![runtime.block_on(run(base))?],
        Some(spec) => {
            let parts: Vec<f64> = spec.split(':').map(str::parse).collect::<Result<_, _>>()?;
            let [start, end, step] = parts[..] else {
                anyhow::bail!("--ramp takes START:END:STEP");
            };
            let mut reports = Vec::new();
            let mut rate = start;
            while rate <= end {
                let r = runtime.block_on(run(Options {
                    rate,
                    verify: false,
                    ..base.clone()
                }))?;
                let short = r.achieved_rps < 0.95 * rate || r.errors + r.overloaded > r.sent / 100;
                println!(
                    "step {rate:>8.0}/s: {:>8.0} ok/s, p99 {:>8.2} ms, {} errors, {} overloaded{}",
                    r.achieved_rps,
                    r.latency.p99,
                    r.errors,
                    r.overloaded,
                    if short { "  <- short" } else { "" }
                );
                reports.push(r);
                if short {
                    break;
                }
                rate += step;
            }
            let peak = reports
                .iter()
                .filter(|r| {
                    r.achieved_rps >= 0.95 * r.rate && r.errors + r.overloaded <= r.sent / 100
                })
                .map(|r| r.achieved_rps)
                .fold(0.0, f64::max);
            println!("peak {peak:.0} ok/s");
            reports
        }
    };
    for r in &reports {
        if cli.ramp.is_none() {
            print!("{}", table(r));
        }
    }
    if let Some(path) = cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)?;
    }
    if reports
        .iter()
        .any(|r| r.verify.as_ref().is_some_and(|v| !v.passed()))
    {
        std::process::exit(1);
    }
    Ok(())
}
