//! agentstore's RESP endpoint vs Redis, driven by the same load tool in one run.
//!
//! `redis-benchmark -c 50 -d 100 -r 100000` (as the `redis` benchmark runs it) against node-a's RESP port of three
//! `agentstore node` processes (every node fsyncs each write before acknowledging it) and
//! against a Redis primary with two replicas, all three with `appendonly yes` and
//! `appendfsync always` (equal durability: every copy on disk). `SET` then `GET`, for the
//! eventual setting (async, N=3 W=1 R=1) and the quorum one (N=3 W=2 R=2).
//!
//! `redis-benchmark` cannot send `SET` then `WAIT 2` on one connection, so the quorum
//! comparison with `WAIT` uses this crate's own closed-loop load (50 connections, the same
//! keys and values) for both sides: agentstore's quorum `SET`, and Redis's `SET` + `WAIT 2 0`
//! pipelined.
//!
//! CPU per operation: the user and system time of the server processes (the three nodes, or
//! the three Redis servers) over the run, divided by the operations done.

use std::process::Command;
use std::time::{Duration, Instant};

use agentstore_engine::testkit::RedisServer;

use crate::cluster::{Peers, start_cluster_with_resp};
use crate::load;
use crate::stats::Sample;

const CLIENTS: usize = 50;
const KEYS: u64 = 100_000;

/// What one side of a row measured.
struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_op: f64,
}

/// The CPU time (user + system) `pids` have used so far.
fn cpu_time(pids: &[u32]) -> Duration {
    // Clock ticks per second: 100 on Linux for every architecture agentstore builds for.
    const TICKS: f64 = 100.0;
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) end with ')'.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // utime and stime are the 14th and 15th fields (11th and 12th after the name).
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    Duration::from_secs_f64(ticks as f64 / TICKS)
}

/// `redis-benchmark -t test` against `addr` for `requests` requests; with the servers' CPU.
fn redis_benchmark(addr: &str, test: &str, requests: u64, servers: &[u32]) -> Measured {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let cpu = cpu_time(servers);
    let anchor = crate::redis::redis_benchmark_at(host, port, test, requests);
    let cpu = cpu_time(servers).saturating_sub(cpu);
    Measured {
        ops_per_sec: anchor.rps,
        p50_ms: anchor.p50_ms,
        p99_ms: anchor.p99_ms,
        cpu_us_per_op: cpu.as_secs_f64() * 1e6 / requests as f64,
    }
}

/// 50 connections to `addr`, each sending `commands(key)` pipelined back to back for
/// `seconds`; with the servers' CPU.
fn closed_loop(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    seconds: u64,
    servers: &[u32],
    wait: bool,
) -> Measured {
    let value = "v".repeat(100);
    let cpu = cpu_time(servers);
    let sample: Sample = runtime.block_on(async {
        let client = redis::Client::open(format!("redis://{addr}/")).expect("a client");
        let mut connections = Vec::new();
        for _ in 0..CLIENTS {
            connections.push(tokio::sync::Mutex::new(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connected"),
            ));
        }
        let connections = std::sync::Arc::new(connections);
        load::run(CLIENTS, Duration::from_secs(seconds), move |c, i| {
            let (connections, value) = (std::sync::Arc::clone(&connections), value.clone());
            async move {
                let key = format!("key:{}", load::key_index(c, i, KEYS));
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(&key).arg(&value).ignore();
                if wait {
                    pipe.cmd("WAIT").arg(2).arg(0).ignore();
                }
                let mut connection = connections[c].lock().await;
                let () = pipe.query_async(&mut *connection).await.expect("SET");
            }
        })
        .await
    });
    let cpu = cpu_time(servers).saturating_sub(cpu);
    let ops = sample.operations() as f64;
    Measured {
        ops_per_sec: sample.ops_per_sec(),
        p50_ms: sample.percentile(50.0).as_secs_f64() * 1e3,
        p99_ms: sample.percentile(99.0).as_secs_f64() * 1e3,
        cpu_us_per_op: cpu.as_secs_f64() * 1e6 / ops.max(1.0),
    }
}

fn print(rows: &[(String, Measured, Measured)]) {
    println!(
        "| workload | agentstore ops/s | p50 | p99 | CPU/op | Redis ops/s | p50 | p99 | CPU/op | ratio (ops/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, ours, theirs) in rows {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:.0} µs | {:.0} | {:.2} ms | {:.2} ms | {:.0} µs | {:.2}x |",
            ours.ops_per_sec,
            ours.p50_ms,
            ours.p99_ms,
            ours.cpu_us_per_op,
            theirs.ops_per_sec,
            theirs.p50_ms,
            theirs.p99_ms,
            theirs.cpu_us_per_op,
            ours.ops_per_sec / theirs.ops_per_sec,
        );
    }
}

/// A Redis primary and two replicas, each with an append-only file synced on every write.
fn redis_with_aof(dir: &std::path::Path) -> (RedisServer, [RedisServer; 2]) {
    let aof = |name: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).expect("a directory");
        vec![
            "--appendonly".to_owned(),
            "yes".to_owned(),
            "--appendfsync".to_owned(),
            "always".to_owned(),
            "--dir".to_owned(),
            path.display().to_string(),
        ]
    };
    let primary = RedisServer::start(&aof("primary"));
    let replica = |name: &str| {
        let mut args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port.to_string(),
        ];
        args.extend(aof(name));
        RedisServer::start(&args)
    };
    let replicas = [replica("replica-1"), replica("replica-2")];
    // Both replicas attached before anything is measured.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = Command::new("redis-cli")
            .args(["-p", &primary.port.to_string(), "INFO", "replication"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if info.contains("connected_slaves:2") && info.matches("state=online").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas never attached");
        std::thread::sleep(Duration::from_millis(100));
    }
    (primary, replicas)
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    println!(
        "RESP: 3 agentstore nodes (fsync per write on every node) vs Redis primary + 2 replicas, all with appendfsync always; {CLIENTS} clients, 100-byte values, {KEYS} keys\n"
    );
    let dir = tempfile::tempdir().expect("a directory");
    let (primary, replicas) = redis_with_aof(dir.path());
    let redis_pids = [primary.pid(), replicas[0].pid(), replicas[1].pid()];
    let redis_addr = format!("127.0.0.1:{}", primary.port);
    let requests = |ops: f64| (ops * seconds as f64).max(20_000.0) as u64;
    let mut rows = Vec::new();
    let settings = [
        (
            "eventual (W=1)",
            "    strategy: async\n    replicas: 3\n    read_quorum: 1\n",
        ),
        (
            "quorum (W=2 R=2)",
            "    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n",
        ),
    ];
    for (name, replication) in settings {
        let nodes_dir = tempfile::tempdir().expect("a directory");
        let (nodes, _, resp, _) =
            start_cluster_with_resp(nodes_dir.path(), replication, "", Peers::Admitted);
        let pids: Vec<u32> = nodes.iter().map(|n| n.pid()).collect();
        // A first pass sizes the run: about `seconds` of agentstore's load.
        let probe = redis_benchmark(&resp[0], "set", 20_000, &pids);
        let n = requests(probe.ops_per_sec);
        for test in ["set", "get"] {
            let ours = redis_benchmark(&resp[0], test, n, &pids);
            let theirs =
                redis_benchmark(&redis_addr, test, requests(ours.ops_per_sec), &redis_pids);
            rows.push((
                format!("{name}: {} (redis-benchmark)", test.to_uppercase()),
                ours,
                theirs,
            ));
        }
        if name.starts_with("quorum") {
            let ours = closed_loop(&runtime, &resp[0], seconds, &pids, false);
            let theirs = closed_loop(&runtime, &redis_addr, seconds, &redis_pids, true);
            rows.push((
                "quorum (W=2) SET vs Redis SET + WAIT 2 (closed loop)".to_owned(),
                ours,
                theirs,
            ));
        }
        drop(nodes);
    }
    print(&rows);
}
