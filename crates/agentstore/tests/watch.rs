//! Watching prefixes on three real node processes: every level's feed over HTTP (long poll
//! and Server-Sent Events), its order, and resuming without a gap across a reconnect and a
//! restart of the watched node.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{cluster, eventually, http, http_session};
use serde_json::Value as Json;

const COLLECTIONS: &str = "  collections:\n    chat:\n      consistency: causal\n    ledger:\n      consistency: strong\n";

/// One page of `/v1/changes/{prefix}` at `node` after `after` (from now when empty).
fn changes(node: SocketAddr, prefix: &str, after: &str, wait_ms: u64) -> (u16, Json) {
    let after = if after.is_empty() {
        String::new()
    } else {
        format!("&after={after}")
    };
    let path = format!("/v1/changes/{prefix}?limit=1000&wait_ms={wait_ms}{after}");
    let (status, body) = http(node, "GET", &path, "").unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Json::Null))
}

/// The position to watch `prefix` at `node` from now.
fn now(node: SocketAddr, prefix: &str) -> String {
    let (status, page) = changes(node, prefix, "", 0);
    assert_eq!(status, 200, "{page}");
    page["position"].as_str().unwrap().to_owned()
}

/// Reads `/v1/changes` at `node` after `after` until `count` changes have come (30 s at
/// most): their (key, value) in feed order, and the position after the last.
fn collect(
    node: SocketAddr,
    prefix: &str,
    after: &str,
    count: usize,
) -> (Vec<(String, Json)>, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut position = after.to_owned();
    while seen.len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} changes of {prefix} after 30 s: {seen:?}",
            seen.len()
        );
        let (status, page) = changes(node, prefix, &position, 2000);
        assert_eq!(status, 200, "{page}");
        for change in page["changes"].as_array().unwrap() {
            seen.push((
                change["key"].as_str().unwrap().to_owned(),
                change["value"].clone(),
            ));
        }
        position = page["position"].as_str().unwrap().to_owned();
    }
    (seen, position)
}

fn put(node: SocketAddr, key: &str, value: &str) {
    let (status, body) = http(node, "PUT", &format!("/v1/keys/{key}"), value).unwrap();
    assert_eq!(status, 200, "{key}: {body}");
}

#[test]
fn every_level_is_watched_in_order_and_resumes_without_a_gap_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    let (a, b, c) = (nodes[0].client, nodes[1].client, nodes[2].client);
    eventually("the Raft group has a leader", || {
        let (status, body) =
            http(b, "PUT", "/v1/keys/ledger:warmup", "0").map_err(|e| e.to_string())?;
        (status == 200).then_some(()).ok_or(body)
    });

    // Strong: the log's order, at a follower as at the leader.
    let from = now(c, "ledger:entry");
    for i in 0..5 {
        put(b, &format!("ledger:entry:{i}"), &i.to_string());
    }
    let (seen, _) = collect(c, "ledger:entry", &from, 5);
    let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "ledger:entry:0",
            "ledger:entry:1",
            "ledger:entry:2",
            "ledger:entry:3",
            "ledger:entry:4"
        ]
    );

    // Causal: an answer written after reading its question comes after it in every feed.
    let from = now(c, "chat");
    for round in 0..5 {
        let question = format!("chat:q{round}");
        let (status, body, token) =
            http_session(a, "PUT", &format!("/v1/keys/{question}"), "\"why?\"", "").unwrap();
        assert_eq!(status, 200, "{body}");
        let token = token.expect("a session token");
        let answer = format!("chat:r{round}");
        let (status, body, _) = http_session(
            b,
            "PUT",
            &format!("/v1/keys/{answer}"),
            "\"because\"",
            &token,
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (seen, _) = collect(c, "chat", &from, 10);
    for round in 0..5 {
        let at = |key: String| seen.iter().position(|(k, _)| *k == key).unwrap();
        assert!(
            at(format!("chat:q{round}")) < at(format!("chat:r{round}")),
            "an answer before its question: {seen:?}"
        );
    }

    // Eventual: every write reaches the watcher of another node.
    let from = now(c, "tasks");
    for i in 0..6 {
        put(a, &format!("tasks:{i}"), &format!("{i}"));
    }
    let (seen, position) = collect(c, "tasks", &from, 6);
    let mut keys: Vec<String> = seen.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    assert_eq!(
        keys,
        (0..6).map(|i| format!("tasks:{i}")).collect::<Vec<_>>()
    );

    // A position is its node's: another node refuses it instead of misreading it.
    let (status, page) = changes(a, "tasks", &position, 0);
    assert_eq!(
        (status, page["error"]["code"].as_str()),
        (410, Some("position_unavailable"))
    );

    // Node c stops; writes go on through a; c, restarted, resumes from the position it gave.
    nodes[2].signal("-KILL");
    for i in 6..10 {
        put(a, &format!("tasks:{i}"), &format!("{i}"));
    }
    nodes[2].start();
    let (seen, _) = collect(c, "tasks", &position, 4);
    let mut keys: Vec<String> = seen.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        (6..10).map(|i| format!("tasks:{i}")).collect::<Vec<_>>(),
        "exactly the writes made while it was down, none before"
    );
}

/// Opens `/v1/watch/{prefix}` at `node` (resuming with `Last-Event-ID` when given) and reads
/// events until `count` changes have come: (id, key) of each.
fn stream(
    node: SocketAddr,
    prefix: &str,
    last_event_id: Option<&str>,
    count: usize,
) -> Vec<(String, String)> {
    let mut socket = TcpStream::connect(node).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    write!(
        socket,
        "GET /v1/watch/{prefix} HTTP/1.1\r\nHost: {node}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(socket).lines();
    let status = lines.next().unwrap().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let mut events = Vec::new();
    let (mut id, mut kind) = (String::new(), String::new());
    while events.len() < count {
        let line = lines.next().expect("the stream ends early").unwrap();
        if let Some(value) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
            id = value.trim().to_owned();
        } else if let Some(value) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
            kind = value.trim().to_owned();
        } else if let Some(data) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
            assert_eq!(kind, "change", "{data}");
            let change: Json = serde_json::from_str(data).unwrap();
            assert_eq!(change["position"].as_str(), Some(id.as_str()));
            events.push((id.clone(), change["key"].as_str().unwrap().to_owned()));
        }
    }
    events
}

#[test]
fn server_sent_events_resume_after_the_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), "");
    let a = nodes[0].client;
    for i in 0..3 {
        put(a, &format!("jobs:{i}"), "1");
    }
    // The start of a's feed: every change it holds comes after it.
    let position = format!("{}-0", feed_of(a));
    collect(a, "jobs", &position, 3);
    // The whole feed from its start, then a reconnect after the second event.
    let events = stream(a, "jobs", Some(&position), 3);
    let keys: Vec<&str> = events.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(keys, ["jobs:0", "jobs:1", "jobs:2"]);
    put(a, "jobs:3", "1");
    let resumed = stream(a, "jobs", Some(&events[1].0), 2);
    let keys: Vec<&str> = resumed.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["jobs:2", "jobs:3"],
        "after the last event seen, nothing lost or repeated"
    );

    // A node stops while a watch is open: the stream ends, and the stop does not wait on it.
    let mut open = TcpStream::connect(a).unwrap();
    write!(open, "GET /v1/watch/jobs HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(&open).read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    let mut nodes = nodes;
    nodes[0].signal("-TERM");
    let mut rest = Vec::new();
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ended = std::io::Read::read_to_end(&mut open, &mut rest);
    assert!(ended.is_ok(), "the stream ended with the node: {ended:?}");
}

/// The feed id of `node`'s eventual collections (from a position it hands out).
fn feed_of(node: SocketAddr) -> String {
    let position = now(node, "jobs");
    position.split_once('-').unwrap().0.to_owned()
}

#[test]
fn a_stream_ends_with_an_error_event_when_the_callers_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = common::token_cluster(dir.path(), "");
    let a = nodes[0].client;
    let writer = common::issue_token(dir.path(), &["--write", "jobs:"]);
    let watcher = common::issue_token(dir.path(), &["--read", "jobs:", "--ttl", "4s"]);
    let issued = Instant::now();

    let mut socket = TcpStream::connect(a).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        socket,
        "GET /v1/watch/jobs: HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {watcher}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(socket).lines();
    let status = lines.next().unwrap().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let (code, body) = common::http_bearer(a, "PUT", "/v1/keys/jobs:1", "1", &writer).unwrap();
    assert_eq!(code, 200, "{body}");

    // The change while the token is valid, then the error event, then the end of the stream.
    let mut events = Vec::new();
    let mut kind = String::new();
    for line in lines {
        let line = line.expect("the stream ends cleanly, not by the read timeout");
        if let Some(value) = line.strip_prefix("event:") {
            kind = value.trim().to_owned();
        } else if let Some(data) = line.strip_prefix("data:") {
            let data: Json = serde_json::from_str(data.trim()).unwrap();
            events.push((kind.clone(), data));
        }
    }
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["change", "error"], "{events:?}");
    assert_eq!(events[0].1["key"], "jobs:1");
    assert_eq!(events[1].1["error"]["code"], "token_expired", "{events:?}");
    assert!(
        issued.elapsed() >= Duration::from_secs(3),
        "the stream ran until the token's expiry, not before"
    );
}

#[test]
fn an_expired_strong_value_is_deleted_through_the_log_and_watchers_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let b = addrs[1];
    eventually("the Raft group has a leader", || {
        let (status, body) =
            http(b, "PUT", "/v1/keys/ledger:warmup", "0").map_err(|e| e.to_string())?;
        (status == 200).then_some(()).ok_or(body)
    });
    let start = now(b, "ledger");
    for path in [
        "/v1/keys/ledger:beat?ttl_ms=1",
        "/v1/keys/ledger:renewed?ttl_ms=1",
        "/v1/keys/ledger:renewed",
    ] {
        let (status, body) = http(b, "PUT", path, "1").unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, before) = collect(b, "ledger", &start, 3);
    std::thread::sleep(Duration::from_millis(50));

    // Only the leader purges; every node may be asked.
    let purge = |node| {
        let (status, body) = http(node, "POST", "/v1/purge", "").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Json>(&body).unwrap()["purged"]
            .as_u64()
            .unwrap()
    };
    let purged: u64 = addrs.iter().map(|&node| purge(node)).sum();
    assert_eq!(
        purged, 1,
        "ledger:beat, not the renewed key nor the warm-up"
    );
    let (deleted, _) = collect(b, "ledger", &before, 1);
    assert_eq!(deleted, [("ledger:beat".to_owned(), Json::Null)]);
    let again: u64 = addrs.iter().map(|&node| purge(node)).sum();
    assert_eq!(again, 0, "a tombstone is not purged again");
    let (status, _) = http(b, "GET", "/v1/keys/ledger:beat", "").unwrap();
    assert_eq!(status, 404);
    let (status, body) = http(b, "GET", "/v1/keys/ledger:renewed", "").unwrap();
    assert_eq!(status, 200, "{body}");
}
