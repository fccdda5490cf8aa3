//! A stand-in affiliate (`--receive-postbacks`): it answers every request 200 and counts the
//! affiliate postbacks the engine delivers, by the conversion's action id and status, so that
//! `--verify` can check that each conversion state reached the affiliate exactly once.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

/// (action id, status) → deliveries.
pub type Counts = HashMap<(String, String), u32>;

pub struct Receiver {
    /// The postback URL to configure: `{transactionid}` and `{status}` in its query.
    pub url: String,
    counts: Arc<Mutex<Counts>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!(
            "http://{}/r?t={{transactionid}}&s={{status}}",
            listener.local_addr()?
        );
        let counts = Arc::new(Mutex::new(Counts::new()));
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let counts = counts.clone();
                        async move {
                            let query = req.uri().query().unwrap_or("").as_bytes();
                            let params = postback_core::params::parse_form(query);
                            let key = (
                                params.get("t").unwrap_or("").to_string(),
                                params.get("s").unwrap_or("").to_string(),
                            );
                            *counts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(key)
                                .or_default() += 1;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(Self { url, counts, task })
    }

    pub fn counts(&self) -> Counts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
