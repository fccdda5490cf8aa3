//! The `postbackd` binary as a separate process, for tests that kill it or measure it.
#![allow(dead_code)]

use super::{Api, KEY};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `postbackd serve`; dropping it kills the process (SIGKILL).
pub struct Process {
    pub child: Child,
    pub api: Api,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `postbackd serve` on a free loopback port with the test key, `args` and `env`, and
/// waits (bounded) until it is ready.
pub async fn spawn(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Process {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let child = Command::new(env!("CARGO_BIN_EXE_postbackd"))
        .args(["serve", "--listen", &addr.to_string(), "--api-key", KEY])
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn postbackd");
    let api = Api::new(addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = api.http.get(format!("{}/ready", api.base)).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "postbackd did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process { child, api }
}
