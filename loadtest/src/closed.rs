//! Closed-loop mode (`--connections N`): N keep-alive connections, each sending its next
//! request as soon as the last answer arrived, for a while: the way most HTTP benchmarks run.
//! The request is prepared once as bytes and answers are read without an HTTP library, so the
//! generator costs as little per request as it can and the server sets the pace. What each side
//! spent is measured in CPU time (`/proc`), so a run says when the generator was the limit.

use crate::{histogram, Percentiles};
use serde::Serialize;
use std::collections::BTreeMap;
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
    /// Requests each connection writes at once before reading their answers (HTTP/1.1
    /// pipelining; 1 = none): the generator's system calls are shared by that many requests.
    pub pipeline: usize,
    pub duration: Duration,
    /// The server's processes, to measure their CPU time too.
    pub server_pids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClosedReport {
    pub target: String,
    pub connections: usize,
    pub pipeline: usize,
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
    /// The server's CPU per request by thread name (its stages: postbackd names its threads
    /// `front-end`, `log-writer`, `processor`, `store-writer`, ...; librdkafka's are
    /// summed as `librdkafka`), with `ended threads` for those gone before the run ended.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub server_by_thread: BTreeMap<String, f64>,
}

impl CpuShare {
    /// `server_by_thread` as `name µs, ...`.
    pub fn by_thread_text(&self) -> String {
        let parts: Vec<String> = self
            .server_by_thread
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        parts.join(", ")
    }
}

/// CPU seconds of each live thread of `pid`, by thread id: its name and user + system time.
fn thread_seconds(pid: u32) -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, seconds)) = parse_stat(&stat) {
            out.insert(tid, (stage_of(name), seconds));
        }
    }
    out
}

/// The command name and CPU seconds (user + system) of a `/proc/.../stat` line.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 (1-based), in USER_HZ (100 on Linux).
    Some((name, (ticks(11)? + ticks(12)?) / 100.0))
}

/// The stage a thread's name stands for: librdkafka's many threads as one.
fn stage_of(thread: &str) -> String {
    if thread.starts_with("rdk:") || thread == "producer pollin" {
        "librdkafka".into()
    } else {
        thread.to_string()
    }
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    Some(parse_stat(&stat)?.1)
}

/// CPU per request over a run: the generator's and the server's (all its processes).
pub struct CpuMeter {
    generator: Option<f64>,
    server: Option<f64>,
    server_pids: Vec<u32>,
    threads: Vec<BTreeMap<u32, (String, f64)>>,
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
            threads: server_pids.iter().map(|p| thread_seconds(*p)).collect(),
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
            server_by_thread: self.by_thread(server, requests),
        }
    }
}

impl CpuMeter {
    /// `server` (µs per request) split by thread name: what each live thread used since the
    /// start (a thread started meanwhile, from zero), the rest as `ended threads`.
    fn by_thread(&self, server: Option<f64>, requests: u64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let Some(server) = server else {
            return out;
        };
        if requests == 0 {
            return out;
        }
        for (pid, before) in self.server_pids.iter().zip(&self.threads) {
            for (tid, (name, now)) in thread_seconds(*pid) {
                let then = before.get(&tid).map_or(0.0, |t| t.1);
                *out.entry(name).or_insert(0.0) += (now - then) * 1e6 / requests as f64;
            }
        }
        let seen: f64 = out.values().sum();
        if server - seen >= 0.05 {
            out.insert("ended threads".into(), server - seen);
        }
        out.retain(|_, us| *us >= 0.05);
        out
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
    .repeat(opts.pipeline.max(1))
    .into_bytes();
    let pipeline = opts.pipeline.max(1);
    let meter = CpuMeter::start(&opts.server_pids);
    let started = Instant::now();
    let until = started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.connections.max(1) {
        let (authority, request) = (authority.clone(), request.clone());
        tasks.spawn(async move { connection(&authority, &request, pipeline, until).await });
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
        pipeline,
        duration_s: elapsed,
        ok,
        errors,
        ok_per_s: ok as f64 / elapsed.max(1e-9),
        latency: Percentiles::of(&all),
        cpu: meter.finish(ok + errors),
    })
}

/// One connection's loop: latencies, answers in 2xx/3xx, and failures (a failed connection is
/// opened again). `requests` holds `pipeline` requests, written at once.
async fn connection(
    authority: &str,
    requests: &[u8],
    pipeline: usize,
    until: Instant,
) -> (hdrhistogram::Histogram<u64>, u64, u64) {
    let mut h = histogram();
    let (mut ok, mut errors) = (0u64, 0u64);
    'connect: while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(authority).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut answers = Answers::default();
        while Instant::now() < until {
            let sent = Instant::now();
            if stream.write_all(requests).await.is_err() {
                errors += pipeline as u64;
                continue 'connect;
            }
            for i in 0..pipeline {
                match answers.next(&mut stream).await {
                    Some((status, keep_alive)) => {
                        let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
                        if (200..400).contains(&status) {
                            ok += 1;
                        } else {
                            errors += 1;
                        }
                        if !keep_alive {
                            errors += (pipeline - 1 - i) as u64;
                            continue 'connect;
                        }
                    }
                    None => {
                        errors += (pipeline - i) as u64;
                        continue 'connect;
                    }
                }
            }
        }
    }
    (h, ok, errors)
}

/// An answer read whole (see `Answers::read`).
struct Answer {
    status: u16,
    keep_alive: bool,
    location: Option<String>,
    body: Vec<u8>,
}

/// Answers read from one connection: what was read past the last answer waits for the next.
struct Answers {
    buf: Vec<u8>,
    /// `buf[start..end]` is read and not yet taken.
    start: usize,
    end: usize,
}

impl Default for Answers {
    fn default() -> Self {
        Self {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        }
    }
}

impl Answers {
    /// Reads more into the buffer (moving what is left to its start when the end is full).
    async fn fill(&mut self, stream: &mut TcpStream) -> Option<()> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                return None; // an answer larger than the buffer
            }
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        match stream.read(&mut self.buf[self.end..]).await.ok()? {
            0 => None,
            n => {
                self.end += n;
                Some(())
            }
        }
    }

    /// The next response (headers, then a `Content-Length` or chunked body): its status, and
    /// whether the connection stays open. `None` on a broken or unreadable answer.
    async fn next(&mut self, stream: &mut TcpStream) -> Option<(u16, bool)> {
        let answer = self.read(stream, false).await?;
        Some((answer.status, answer.keep_alive))
    }

    /// The next response whole: with its `Location` and its body when `keep` (otherwise they
    /// are skipped, which costs nothing per byte).
    async fn read(&mut self, stream: &mut TcpStream, keep: bool) -> Option<Answer> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        let head_len = loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n\r\n") {
                break i + 4;
            }
            self.fill(stream).await?;
        };
        let head = std::str::from_utf8(&self.buf[self.start..self.start + head_len]).ok()?;
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
        let length = header("content-length");
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        // The location as sent (`header` lowercases values).
        let location = keep
            .then(|| {
                head.split("\r\n").skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("location")
                        .then(|| v.trim().to_string())
                })
            })
            .flatten();
        self.start += head_len;
        let mut body = Vec::new();
        if let Some(length) = length {
            self.take(stream, length.parse().ok()?, keep.then_some(&mut body))
                .await?;
        } else if chunked {
            loop {
                let line = loop {
                    if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n") {
                        break i;
                    }
                    self.fill(stream).await?;
                };
                let size = std::str::from_utf8(&self.buf[self.start..self.start + line]).ok()?;
                let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
                self.start += line + 2;
                // The chunk and its line break; the last (empty) chunk is only a line break.
                self.take(stream, size, keep.then_some(&mut body)).await?;
                self.take(stream, 2, None).await?;
                if size == 0 {
                    break;
                }
            }
        }
        Some(Answer {
            status,
            keep_alive,
            location,
            body,
        })
    }

    /// Takes the next `want` bytes, into `into` if given.
    async fn take(
        &mut self,
        stream: &mut TcpStream,
        mut want: usize,
        mut into: Option<&mut Vec<u8>>,
    ) -> Option<()> {
        loop {
            let have = (self.end - self.start).min(want);
            if let Some(body) = into.as_deref_mut() {
                body.extend_from_slice(&self.buf[self.start..self.start + have]);
            }
            self.start += have;
            want -= have;
            if want == 0 {
                return Some(());
            }
            (self.start, self.end) = (0, 0);
            self.fill(stream).await?;
        }
    }
}

/// Keep-alive connections to one server for tracking requests, written and read without an
/// HTTP library: what the open-loop scenarios send (clicks, postbacks by GET and POST, pixels),
/// so that the generator costs less per request than the servers it drives.
pub(crate) struct RawPool {
    authority: String,
    /// Connections waiting for a request, each with when it went idle: oldest first.
    idle: std::sync::Mutex<Vec<(TcpStream, Answers, Instant)>>,
    /// How long a connection may wait and still be used (see `IDLE_REUSE`).
    idle_reuse: Duration,
}

/// Servers close keep-alive connections idle for a while (postbackd after its
/// `request_timeout_secs`, 10 s by default; nginx after 75 s), and a request written into one
/// the server is closing fails unread: after a burst had opened more connections than the
/// load needed, such failures showed as errors of the server. Connections idle longer than
/// this are closed instead of reused.
const IDLE_REUSE: Duration = Duration::from_secs(2);

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
            idle_reuse: IDLE_REUSE,
        })
    }

    /// Sends `GET path` on an idle connection (or a new one); the answer's status.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<u16> {
        Ok(self.send("GET", path, None, false).await?.status)
    }

    /// Sends a request with an optional `(content type, body)`; the answer's status, and its
    /// `Location` for a redirect or else its body.
    pub(crate) async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let answer = self.send(method, path, body, true).await?;
        Ok(match answer.location {
            Some(location) if answer.status == 302 => (answer.status, location.into_bytes()),
            _ => (answer.status, answer.body),
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
        keep: bool,
    ) -> anyhow::Result<Answer> {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let stale = idle.partition_point(|(_, _, since)| since.elapsed() >= self.idle_reuse);
            idle.drain(..stale);
            idle.pop().map(|(stream, answers, _)| (stream, answers))
        };
        let (mut stream, mut answers) = match idle {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(&self.authority).await?;
                s.set_nodelay(true)?;
                (s, Answers::default())
            }
        };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pbload\r\n",
            self.authority
        );
        match body {
            Some((content_type, body)) => {
                request.push_str(&format!(
                    "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            None => request.push_str("\r\n"),
        }
        stream.write_all(request.as_bytes()).await?;
        let answer = answers
            .read(&mut stream, keep)
            .await
            .ok_or_else(|| anyhow::anyhow!("the connection broke or the answer was unreadable"))?;
        if answer.keep_alive {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((
                stream,
                answers,
                Instant::now(),
            ));
        }
        Ok(answer)
    }
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's name may hold spaces and parentheses; librdkafka's threads count as one.
    #[test]
    fn stat_lines_give_a_threads_name_and_cpu_seconds() {
        let stat = "42 (rdk:broker1 (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let (name, seconds) = parse_stat(stat).expect("parses");
        assert_eq!(name, "rdk:broker1 (x)");
        assert!((seconds - 3.0).abs() < 1e-9, "{seconds}");
        assert_eq!(stage_of(name), "librdkafka");
        assert_eq!(stage_of("store-writer"), "store-writer");
    }

    /// The server's CPU is split by thread name: a thread that worked shows under its name,
    /// and the parts add up to the whole.
    #[test]
    fn server_cpu_is_split_by_thread_name() {
        let me = std::process::id();
        let meter = CpuMeter::start(&[me]);
        let (done, hold) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::Builder::new()
            .name("burner".into())
            .spawn(move || {
                let started = Instant::now();
                let mut x = 1u64;
                while started.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                // Alive until measured: an ended thread's time shows as `ended threads`.
                let _ = hold.recv();
            })
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(400));
        // Per 1,000 requests, one clock tick (10 ms) is 10 µs.
        let share = meter.finish(1000);
        let _ = done.send(());
        burner.join().expect("join");
        let burned = share.server_by_thread.get("burner").copied().unwrap_or(0.0);
        assert!(burned >= 10.0, "{:?}", share.server_by_thread);
        // The process's and its threads' counters are read a moment apart: a tick or two.
        let parts: f64 = share.server_by_thread.values().sum();
        let whole = share.server_us_per_request.expect("server cpu");
        assert!((parts - whole).abs() <= 20.5, "{parts} against {whole}");
    }

    /// Answers arrive in pieces and several at once (pipelined): each is taken whole, bodies
    /// by length or in chunks (kept or skipped), and what follows one waits for the next.
    #[tokio::test]
    async fn answers_are_split_at_their_ends_however_they_arrive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let wire: Vec<u8> = [
            "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{\"status\":1}",
            "HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nbusy\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nend",
        ]
        .concat()
        .into_bytes();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            // Pieces that cut headers, bodies and chunk markers anywhere.
            for piece in wire.chunks(7) {
                s.write_all(piece).await.expect("write");
                s.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut answers = Answers {
            buf: vec![0; 64],
            start: 0,
            end: 0,
        };
        let mut got = Vec::new();
        // The first skipped (as the closed loop reads), the others whole.
        for keep in [false, true, true, true] {
            let a = answers.read(&mut stream, keep).await.expect("an answer");
            let body = String::from_utf8(a.body).expect("utf-8");
            got.push((a.status, a.keep_alive, a.location, body));
        }
        assert_eq!(
            got,
            vec![
                (200, true, None, String::new()),
                (302, true, Some("/x".to_string()), String::new()),
                (503, true, None, "busy".to_string()),
                (200, false, None, "end".to_string()),
            ]
        );
        assert!(answers.next(&mut stream).await.is_none(), "closed");
        server.await.expect("server");
    }

    /// An idle connection is reused while it is fresh, and replaced by a new one once it has
    /// waited longer than the pool allows (the server may be closing it).
    #[tokio::test]
    async fn connections_idle_too_long_are_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // One request per read is enough here: each is written whole.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(ok.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut pool = RawPool::new(&format!("http://{addr}")).expect("pool");
        pool.idle_reuse = Duration::from_millis(200);
        let accepts = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(pool.get("/a").await.expect("first"), 200);
        assert_eq!(pool.get("/b").await.expect("at once"), 200);
        assert_eq!(accepts(), 1, "a fresh idle connection is reused");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.get("/c").await.expect("after a wait"), 200);
        assert_eq!(accepts(), 2, "a stale one is replaced");
        assert_eq!(pool.idle.lock().expect("idle").len(), 1, "and dropped");
    }
}
