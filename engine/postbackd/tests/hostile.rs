//! Replays the hostile-input corpus (`tests/hostile/corpus.txt`) against a running engine:
//! every request gets its expected status, the engine answers the next good request, and no
//! acknowledged postback is lost or doubled.

mod common;

use common::{today, Api, KEY};
use postbackd::{Config, Server};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Case {
    name: String,
    expect: Vec<u16>,
    head: Vec<u8>,
    body: Vec<u8>,
}

/// `\xNN` bytes and the placeholders, in one line of the corpus.
fn expand(line: &str, click: &str) -> Vec<u8> {
    let line = line
        .replace("{key}", KEY)
        .replace("{today}", &today())
        .replace("{click}", click);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while !rest.is_empty() {
        if let Some(hex) = rest.strip_prefix("\\x") {
            let byte = u8::from_str_radix(&hex[..2], 16).expect("\\xNN in the corpus");
            out.push(byte);
            rest = &hex[2..];
        } else if let Some(big) = rest.strip_prefix("{big:") {
            let (n, after) = big.split_once('}').expect("{big:N}");
            out.extend(std::iter::repeat_n(b'a', n.parse().expect("N")));
            rest = after;
        } else {
            let c = rest.chars().next().expect("a char");
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn corpus(click: &str) -> Vec<Case> {
    let text = include_str!("hostile/corpus.txt");
    let mut cases = Vec::new();
    for block in text.split("\n### ").skip(1) {
        let mut lines = block.lines();
        let name = lines.next().expect("a name").to_string();
        let expect = lines
            .next()
            .and_then(|l| l.strip_prefix("> "))
            .unwrap_or_else(|| panic!("{name}: no expected status"))
            .split('|')
            .map(|s| s.trim().parse().expect("a status"))
            .collect();
        let mut rest: Vec<&str> = lines.collect();
        while rest.last().is_some_and(|l| l.is_empty()) {
            rest.pop();
        }
        let split = rest.iter().position(|l| l.is_empty());
        let (head_lines, body_lines) = match split {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&rest[..], &[][..]),
        };
        let mut body = Vec::new();
        for l in body_lines {
            body.extend(expand(l, click));
            body.extend_from_slice(b"\r\n");
        }
        let mut head = Vec::new();
        let mut declared = false;
        for l in head_lines {
            let lower = l.to_ascii_lowercase();
            declared |=
                lower.starts_with("content-length:") || lower.starts_with("transfer-encoding:");
            head.extend(expand(l, click));
            head.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() && !declared {
            head.extend(format!("Content-Length: {}\r\n", body.len()).into_bytes());
        }
        head.extend_from_slice(b"\r\n");
        cases.push(Case {
            name,
            expect,
            head,
            body,
        });
    }
    cases
}

/// The status of the first response on `s`, if one comes within `wait`.
fn read_status(s: &mut TcpStream, got: &mut Vec<u8>, wait: Duration) -> Option<u16> {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    while got.len() < 12 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    std::str::from_utf8(got.get(9..12)?).ok()?.parse().ok()
}

/// Sends a case; a server may answer before the body is sent (a declared length over the
/// limit), so the body goes in pieces with a look for an answer between them.
fn send(addr: SocketAddr, case: &Case) -> Option<u16> {
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.write_all(&case.head);
    let mut got = Vec::new();
    for piece in case.body.chunks(16 * 1024) {
        if let Some(status) = read_status(&mut s, &mut got, Duration::from_millis(50)) {
            return Some(status);
        }
        if s.write_all(piece).is_err() {
            break;
        }
    }
    read_status(&mut s, &mut got, Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_gets_its_answers_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        api_key: KEY.into(),
        request_timeout_secs: 5,
        ..Config::default()
    };
    let server = Server::start(config, None).await.expect("starts");
    let api = Api::new(server.addr());
    api.admin_post(
        "/3.0/admin/offer",
        &[
            ("title", "O"),
            ("url", "https://x.example/?clickid={clickid}"),
            ("payments[0][type]", "percent"),
            ("payments[0][total]", "10"),
        ],
    )
    .await;
    api.admin_post("/3.0/admin/partner", &[("email", "a@example.com")])
        .await;
    let click = api.click(1, 1, "").await;
    let cases = corpus(&click);
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let addr = server.addr();
    let mut acknowledged = 0u64;
    for (i, case) in cases.iter().enumerate() {
        let (name, status) = {
            let case = Case {
                name: case.name.clone(),
                expect: case.expect.clone(),
                head: case.head.clone(),
                body: case.body.clone(),
            };
            tokio::task::spawn_blocking(move || (case.name.clone(), send(addr, &case)))
                .await
                .expect("joins")
        };
        assert!(
            status.is_some_and(|s| case.expect.contains(&s)),
            "{name}: got {status:?}, expected {:?}",
            case.expect
        );
        let head = String::from_utf8_lossy(&case.head);
        let tracking = head.contains(" /postback")
            || head.contains("/postback?")
            || head.contains(" /success.");
        if tracking && status == Some(200) {
            acknowledged += 1;
        }
        // The engine still answers a good postback, with a 200.
        api.postback(&format!("clickid={click}&probe={i}")).await;
        acknowledged += 1;
    }
    // Every acknowledged postback is in the log exactly once (the wait fails on more).
    let body = api.wait_for_postbacks(acknowledged).await;
    let rows = body["postbacks"].as_array().expect("rows");
    let case = |name: &str| -> &Value {
        rows.iter()
            .find(|r| r["_get"]["case"] == name)
            .unwrap_or_else(|| panic!("no row for case {name}"))
    };
    assert_eq!(case("dup")["_get"]["action_id"], "first");
    assert_eq!(case("dup")["action_id"], "first", "shown as processed");
    assert_eq!(case("negsum")["error"], "Invalid sum");
    assert_eq!(case("hugesum")["error"], "Invalid sum");
    assert_eq!(
        case("xff")["server"],
        "127.0.0.1",
        "the peer, not the header"
    );
    assert_eq!(case("nul")["error"], "Broken clickid");
    let started = Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(15), "shutdown hung");
}
