//! Redis engine vs `redis-benchmark` on the same server at the same concurrency.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentstore_core::NodeId;
use agentstore_engine::testkit::RedisServer;
use agentstore_engine::{Engine, Mutation, NodeClock, RedisEngine, RedisOptions};

use crate::load;
use crate::stats::{Row, Sample};

const CLIENTS: usize = 50;
const KEYS: u64 = 100_000;

/// What `redis-benchmark --csv` reports for one test.
pub(crate) struct Anchor {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

pub(crate) fn redis_benchmark(port: u16, test: &str, requests: u64) -> Anchor {
    redis_benchmark_at("127.0.0.1", &port.to_string(), test, requests)
}

/// `redis-benchmark -c 50 -d 100 -r 100000 -t test` against `host:port`.
pub(crate) fn redis_benchmark_at(host: &str, port: &str, test: &str, requests: u64) -> Anchor {
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-t", test])
        .args(["-n", &requests.to_string()])
        .args([
            "-c",
            &CLIENTS.to_string(),
            "-d",
            "100",
            "-r",
            &KEYS.to_string(),
            "--csv",
        ])
        .output()
        .expect("redis-benchmark is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("\"{}\"", test.to_uppercase())))
        .unwrap_or_else(|| panic!("redis-benchmark printed no {test} result: {text}"));
    let fields: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(0.0))
        .collect();
    Anchor {
        rps: fields[0],
        p50_ms: fields[3],
        p99_ms: fields[5],
    }
}

/// A row of `ours` beside `redis-benchmark -t test` on `port`, run for about as many requests
/// as ours did in `seconds`.
pub(crate) fn beside(port: u16, test: &str, name: &str, ours: Sample, seconds: u64) -> Row {
    let requests = (ours.ops_per_sec() * seconds as f64).max(10_000.0) as u64;
    let anchor = redis_benchmark(port, test, requests);
    Row::with_anchor_figures(name, ours, anchor.rps, anchor.p50_ms, anchor.p99_ms)
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    let server = RedisServer::start(&[]);
    let engine = runtime.block_on(async {
        let clock = NodeClock::system(NodeId::new("bench").unwrap(), 500);
        RedisEngine::connect(RedisOptions::new(server.url()), clock)
            .await
            .unwrap()
    });
    let engine = Arc::new(engine);
    let value = vec![b'v'; 100];
    let duration = Duration::from_secs(seconds);
    println!(
        "Redis engine vs redis-benchmark, one redis-server (no persistence), {CLIENTS} clients, 100-byte values, {KEYS} keys\n"
    );
    let mut rows = Vec::new();

    let put = {
        let (engine, value) = (Arc::clone(&engine), value.clone());
        runtime.block_on(load::run(CLIENTS, duration, move |client, i| {
            let (engine, value) = (Arc::clone(&engine), value.clone());
            async move {
                let key = load::key("bench", client, i, KEYS);
                engine.apply(key, Mutation::Put(value)).await.unwrap();
            }
        }))
    };
    rows.push(beside(server.port, "set", "put vs SET", put, seconds));

    let get = {
        let engine = Arc::clone(&engine);
        runtime.block_on(load::run(CLIENTS, duration, move |client, i| {
            let engine = Arc::clone(&engine);
            async move {
                let key = load::key("bench", client, i, KEYS);
                engine.get(&key).await.unwrap();
            }
        }))
    };
    rows.push(beside(server.port, "get", "get vs GET", get, seconds));
    crate::stats::print_table_with("redis-benchmark", &rows);
}
