//! Closed-loop mode (`--connections N`): N keep-alive connections, each sending its next
//! request as soon as the last answer arrived, for a while: the way most HTTP benchmarks run.
//! The request is prepared once as bytes and answers are read without an HTTP library, so the
//! generator costs as little per request as it can and the server sets the pace. What each side
//! spent is measured in CPU time (`/proc`), so a run says when the generator was the limit.

use crate::{histogram, Percentiles};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct ClosedOptions {
    /// `http://host:port` (loopback in this project's benchmarks).
    pub target: String,
    /// The path and query every request asks for.
    pub path: String,
    pub connections: usize,
    pub duration: Duration,
    /// The server's processes, to measure their CPU time too.
    pub server_pids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClosedReport {
    pub target: String,
    pub connections: usize,
    pub duration_s: f64,
    pub ok: u64,
    pub errors: u64,
    pub ok_per_s: f64,
    pub latency: Percentiles,
    pub cpu: CpuShare,
}

/// CPU time per answered request, of the generator and (if its pid was given) the server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuShare {
    pub generator_us_per_request: f64,
    pub server_us_per_request: Option<f64>,
    /// The generator spent as much CPU per request as the server, or more: on a machine they
    /// share, the run measured the generator as much as the server.
    pub generator_bound: bool,
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 (1-based), in USER_HZ (100 on Linux).
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU per request over a run: the generator's and the server's (all its processes).
pub struct CpuMeter {
    generator: Option<f64>,
    server: Option<f64>,
    server_pids: Vec<u32>,
}

fn server_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_seconds(Some(*p))).sum()
}

impl CpuMeter {
    pub fn start(server_pids: &[u32]) -> Self {
        Self {
            generator: cpu_seconds(None),
            server: server_seconds(server_pids),
            server_pids: server_pids.to_vec(),
        }
    }

    pub fn finish(&self, requests: u64) -> CpuShare {
        let per = |start: Option<f64>, now: Option<f64>| match (start, now) {
            (Some(a), Some(b)) if requests > 0 => Some((b - a) * 1e6 / requests as f64),
            _ => None,
        };
        let generator = per(self.generator, cpu_seconds(None)).unwrap_or(0.0);
        let server = per(self.server, server_seconds(&self.server_pids));
        CpuShare {
            generator_us_per_request: generator,
            server_us_per_request: server,
            generator_bound: server.is_some_and(|s| generator >= s),
        }
    }
}

pub async fn run_closed(opts: ClosedOptions) -> anyhow::Result<ClosedReport> {
    let authority = opts
        .target
        .trim_end_matches('/')
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("closed-loop mode speaks plain http:// only"))?
        .to_string();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: pbload\r\n\r\n",
        opts.path
    )
    .into_bytes();
    let meter = CpuMeter::start(&opts.server_pids);
    let started = Instant::now();
    let until = started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.connections.max(1) {
        let (authority, request) = (authority.clone(), request.clone());
        tasks.spawn(async move { connection(&authority, &request, until).await });
    }
    let mut all = histogram();
    let (mut ok, mut errors) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (h, o, e) = done?;
        all.add(&h).ok();
        ok += o;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(ClosedReport {
        target: opts.target,
        connections: opts.connections,
        duration_s: elapsed,
        ok,
        errors,
        ok_per_s: ok as f64 / elapsed.max(1e-9),
        latency: Percentiles::of(&all),
        cpu: meter.finish(ok + errors),
    })
}

/// One connection's loop: latencies, answers in 2xx/3xx, and failures (a failed connection is
/// opened again).
async fn connection(
    authority: &str,
    request: &[u8],
    until: Instant,
) -> (hdrhistogram::Histogram<u64>, u64, u64) {
    let mut h = histogram();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut buf = vec![0u8; 16 * 1024];
    'connect: while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(authority).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        while Instant::now() < until {
            let sent = Instant::now();
            if stream.write_all(request).await.is_err() {
                errors += 1;
                continue 'connect;
            }
            match read_response(&mut stream, &mut buf).await {
                Some((status, keep_alive)) => {
                    let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
                    if (200..400).contains(&status) {
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                    if !keep_alive {
                        continue 'connect;
                    }
                }
                None => {
                    errors += 1;
                    continue 'connect;
                }
            }
        }
    }
    (h, ok, errors)
}

/// Reads one response (headers, then a `Content-Length` or chunked body); its status, and
/// whether the connection stays open. `None` on a broken or unreadable answer.
async fn read_response(stream: &mut TcpStream, buf: &mut [u8]) -> Option<(u16, bool)> {
    let mut len = 0;
    let head_end = loop {
        if len == buf.len() {
            return None; // headers larger than the buffer
        }
        let n = stream.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        if let Some(i) = find(&buf[..len], b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let keep_alive = header("connection").is_none_or(|v| v != "close");
    let mut body = len - head_end;
    if let Some(length) = header("content-length") {
        let want: usize = length.parse().ok()?;
        while body < want {
            let n = stream.read(&mut buf[..]).await.ok()?;
            if n == 0 {
                return None;
            }
            body += n;
        }
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // Read until the last chunk's marker (the bodies here are small).
        let mut tail: Vec<u8> = buf[head_end..len].to_vec();
        while find(&tail, b"0\r\n\r\n").is_none() {
            let n = stream.read(&mut buf[..]).await.ok()?;
            if n == 0 {
                return None;
            }
            tail.extend_from_slice(&buf[..n]);
        }
    }
    Some((status, keep_alive))
}

/// Keep-alive connections to one server for tracking requests (a GET, no body), written and
/// read without an HTTP library: what the open-loop `postback` and `click` scenarios send, so
/// that the generator costs less per request than the servers it drives.
pub(crate) struct RawPool {
    authority: String,
    idle: std::sync::Mutex<Vec<(TcpStream, Vec<u8>)>>,
}

impl RawPool {
    /// `None` for anything but plain `http://`.
    pub(crate) fn new(base: &str) -> Option<Self> {
        let authority = base
            .trim_end_matches('/')
            .strip_prefix("http://")?
            .to_string();
        Some(Self {
            authority,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Sends `GET path` on an idle connection (or a new one); the answer's status.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<u16> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let (mut stream, mut buf) = match idle {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(&self.authority).await?;
                s.set_nodelay(true)?;
                (s, vec![0u8; 16 * 1024])
            }
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pbload\r\n\r\n",
            self.authority
        );
        stream.write_all(request.as_bytes()).await?;
        let (status, keep_alive) = read_response(&mut stream, &mut buf)
            .await
            .ok_or_else(|| anyhow::anyhow!("the connection broke or the answer was unreadable"))?;
        if keep_alive {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((stream, buf));
        }
        Ok(status)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
