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
    /// Keep-alive connections per target of the open loop (`postback` and `click` without
    /// `--verify`), each carrying one request at a time: a server answering in L seconds can
    /// be driven at N/L req/s at most, and every connection costs the generator and the server
    /// a little on each request.
    #[arg(long, default_value_t = 256, conflicts_with = "connections")]
    open_connections: usize,
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
    /// Closed loop instead of a rate: this many keep-alive connections, each sending its next
    /// request when the last was answered, for `duration` seconds; one fixed URL of the
    /// scenario (`postback` or `click`), read without an HTTP library to cost the least.
    #[arg(long, conflicts_with_all = ["ramp", "verify"])]
    connections: Option<usize>,
    /// With `--connections`: requests each connection writes at once before reading their
    /// answers (HTTP/1.1 pipelining), so that pbload's system calls are shared by that many.
    #[arg(long, default_value_t = 1, requires = "connections")]
    pipeline: usize,
    /// The server's process id (repeat it, or a comma-separated list, for a server of several
    /// processes): its CPU time per request is reported beside pbload's own, and a run where
    /// pbload spent as much is flagged generator-bound.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
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
        open_connections: cli.open_connections,
        verify: cli.verify,
        affiliate_url: cli.affiliate_url.clone(),
        receive_postbacks: cli.receive_postbacks,
        server_pids: cli.server_pid.clone(),
        quiet: cli.quiet,
    };
    if let Some(connections) = cli.connections {
        return closed_loop(&cli, connections, &runtime);
    }
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
                    "step {rate:>8.0}/s: {:>8.0} ok/s, p99 {:>8.2} ms, {} errors, {} overloaded{}{}",
                    r.achieved_rps,
                    r.latency.p99,
                    r.errors,
                    r.overloaded,
                    cpu_note(&r.cpu),
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

/// CPU per request, and a warning where the generator spent as much as the server.
fn cpu_note(cpu: &pbload::CpuShare) -> String {
    match cpu.server_us_per_request {
        Some(server) => format!(
            ", cpu/req pbload {:.1} µs, server {server:.1} µs{}{}",
            cpu.generator_us_per_request,
            if cpu.server_by_thread.is_empty() {
                String::new()
            } else {
                format!(" ({})", cpu.by_thread_text())
            },
            if cpu.generator_bound {
                " GENERATOR-BOUND"
            } else {
                ""
            }
        ),
        None => String::new(),
    }
}

fn closed_loop(
    cli: &Cli,
    connections: usize,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let target = cli
        .target
        .first()
        .ok_or_else(|| anyhow::anyhow!("no target"))?
        .clone();
    let path = match cli.scenario {
        Scenario::Click => "/click?offer_id=1&pid=1&sub1=closed".to_string(),
        // One fixed URL, the same for the engine and the baselines.
        _ => "/postback?clickid=5f0000007e28fee0558b4567&action_id=closed-loop&goal=1&sum=10"
            .to_string(),
    };
    let r = runtime.block_on(pbload::run_closed(pbload::ClosedOptions {
        target,
        path,
        connections,
        pipeline: cli.pipeline,
        duration: Duration::from_secs_f64(cli.duration),
        server_pids: cli.server_pid.clone(),
    }))?;
    let pipelined = if r.pipeline > 1 {
        format!(", pipeline {}", r.pipeline)
    } else {
        String::new()
    };
    println!(
        "closed loop, {} connections{pipelined}, {:.1} s: {:.0} ok/s, {} errors; latency ms p50 {:.2} p99 {:.2} p99.9 {:.2}{}",
        r.connections,
        r.duration_s,
        r.ok_per_s,
        r.errors,
        r.latency.p50,
        r.latency.p99,
        r.latency.p999,
        cpu_note(&r.cpu)
    );
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    Ok(())
}
