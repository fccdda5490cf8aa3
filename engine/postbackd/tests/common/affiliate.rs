//! A scripted affiliate server for delivery tests, speaking plain HTTP/1.1 with keep-alive:
//! `/ok` answers 200, `/flaky` 500 then 200, `/limited` 429 with `Retry-After: 1` then 200,
//! `/bad` 404, `/slow` 200 after a second, `/hang` never answers. Each request is recorded
//! before it is answered.
//! While paused, it drops every connection without reading what was sent, like a server
//! that went away: nothing sent during a pause counts as received.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: String,
    pub method: String,
    pub body: String,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    paused: AtomicBool,
}

#[derive(Clone)]
pub struct Affiliate {
    pub addr: std::net::SocketAddr,
    state: Arc<State>,
}

impl Affiliate {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, s.clone()));
            }
        });
        Self { addr, state }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Requests to `path` whose query contains `needle`.
    pub fn count(&self, path: &str, needle: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.path == path && r.query.contains(needle))
            .count()
    }

    pub fn pause(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::SeqCst);
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let mut reader = BufReader::new(stream);
    loop {
        if state.paused.load(Ordering::SeqCst) {
            return;
        }
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let Some(request_line) = head.first() else {
            return;
        };
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let length: usize = head
            .iter()
            .filter_map(|h| h.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        if state.paused.load(Ordering::SeqCst) {
            return;
        }
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let (path, query) = (path.to_string(), query.to_string());
        let seen_before = {
            let mut received = state.received.lock().expect("lock");
            let seen = received.iter().any(|r| r.path == path && r.query == query);
            received.push(Received {
                path: path.clone(),
                query: query.clone(),
                method,
                body: String::from_utf8_lossy(&body).into_owned(),
                at: Instant::now(),
            });
            seen
        };
        let (status, extra, text) = match (path.as_str(), seen_before) {
            ("/ok", _) | ("/flaky", true) | ("/limited", true) => ("200 OK", "", "ok"),
            ("/flaky", false) => ("500 Internal Server Error", "", "oops"),
            ("/limited", false) => ("429 Too Many Requests", "Retry-After: 1\r\n", "slow down"),
            ("/slow", _) => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                ("200 OK", "", "ok")
            }
            ("/hang", _) => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                return;
            }
            _ => ("404 Not Found", "", "no such postback"),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nContent-Type: text/plain\r\n\r\n{text}",
            text.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// An address nothing listens on.
pub fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}
