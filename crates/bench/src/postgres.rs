//! PostgreSQL engine vs `pgbench` on the same server, same isolation, same concurrency.
//!
//! Two pgbench anchors: a single-statement upsert (the cheapest way to write a key), and the
//! same transaction shape the engine runs to merge safely (insert a placeholder, lock the row,
//! update, commit).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentstore_core::NodeId;
use agentstore_engine::{Engine, Mutation, NodeClock, PostgresEngine, PostgresOptions};

use crate::load;
use crate::stats::{Row, Sample};

const CLIENTS: usize = 16;
const KEYS: u64 = 100_000;

fn url() -> String {
    std::env::var("AGENTSTORE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

fn psql(sql: &str) {
    let status = Command::new("psql")
        .args([url().as_str(), "-q", "-c", sql])
        .status()
        .expect("psql is installed");
    assert!(status.success(), "psql failed: {sql}");
}

/// Runs one pgbench script; returns its latencies (from its per-transaction log).
fn pgbench(script: &str, seconds: u64) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("pgbench")
        .current_dir(dir.path())
        .env("PGOPTIONS", "-c default_transaction_isolation=serializable")
        .args([
            "-n",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "--max-tries=20",
            "-l",
        ])
        .arg("-f")
        .arg(&file)
        .arg(url())
        .output()
        .expect("pgbench is installed");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("pgbench_log")
        {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            // client_id transaction_no time_us script_no epoch epoch_us
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse::<u64>().ok())
            {
                latencies.push(Duration::from_micros(us));
            }
        }
    }
    Sample::new(latencies, Duration::from_secs(seconds))
}

const UPSERT: &str = "\\set k random(1, 100000)
INSERT INTO agentstore_bench_upsert (key, value) VALUES (:k, repeat('v', 100))
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
";

const MERGE_SHAPE: &str = "\\set k random(1, 100000)
BEGIN;
INSERT INTO agentstore_bench_tx (key, value) VALUES (:k, NULL) ON CONFLICT (key) DO NOTHING;
SELECT value FROM agentstore_bench_tx WHERE key = :k FOR UPDATE;
UPDATE agentstore_bench_tx SET value = repeat('v', 100) WHERE key = :k;
COMMIT;
";

const SELECT: &str = "\\set k random(1, 100000)
SELECT value FROM agentstore_bench_upsert WHERE key = :k;
";

pub(crate) fn run(seconds: u64) {
    psql("DROP TABLE IF EXISTS agentstore_bench_upsert, agentstore_bench_tx");
    psql("CREATE TABLE agentstore_bench_upsert (key bigint PRIMARY KEY, value text)");
    psql("CREATE TABLE agentstore_bench_tx (key bigint PRIMARY KEY, value text)");
    let runtime = crate::two_workers();
    let engine = runtime.block_on(async {
        let clock = NodeClock::system(NodeId::new("bench").unwrap(), 500);
        let options = PostgresOptions {
            pool_size: CLIENTS,
            application_name: "agentstore-bench".into(),
            ..PostgresOptions::new(url())
        };
        Arc::new(PostgresEngine::connect(options, clock).await.unwrap())
    });
    let duration = Duration::from_secs(seconds);
    println!(
        "PostgreSQL engine vs pgbench, serializable, {CLIENTS} clients, 100-byte values, {KEYS} keys\n"
    );

    let put_load = || {
        let engine = Arc::clone(&engine);
        runtime.block_on(load::run(CLIENTS, duration, move |client, i| {
            let engine = Arc::clone(&engine);
            async move {
                let key = load::key("pgbench", client, i, KEYS);
                engine
                    .apply(key, Mutation::Put(vec![b'v'; 100]))
                    .await
                    .unwrap();
            }
        }))
    };
    let get_load = || {
        let engine = Arc::clone(&engine);
        runtime.block_on(load::run(CLIENTS, duration, move |client, i| {
            let engine = Arc::clone(&engine);
            async move {
                let key = load::key("pgbench", client, i, KEYS);
                engine.get(&key).await.unwrap();
            }
        }))
    };
    // Each pgbench run sits between two of ours, so drift in the machine's load shows.
    let rows = vec![
        Row::new(
            "put vs pgbench single-statement upsert".into(),
            put_load(),
            pgbench(UPSERT, seconds),
        ),
        Row::new(
            "put vs pgbench merge-shaped transaction".into(),
            put_load(),
            pgbench(MERGE_SHAPE, seconds),
        ),
        Row::new(
            "get vs pgbench SELECT".into(),
            get_load(),
            pgbench(SELECT, seconds),
        ),
    ];
    crate::stats::print_table_with("pgbench", &rows);
    psql("DROP TABLE IF EXISTS agentstore_bench_upsert, agentstore_bench_tx");
}
