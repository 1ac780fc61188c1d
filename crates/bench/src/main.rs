//! Benchmarks that compare agentstore with its anchors in one run and report ratios.
//!
//!     cargo run --release -p agentstore-bench -- local [--ops N]
//!     cargo run --release -p agentstore-bench -- redis [--seconds S]
//!     cargo run --release -p agentstore-bench -- postgres [--seconds S]
//!     cargo build --release -p agentstore -p agentstore-bench && target/release/agentstore-bench cluster [--seconds S] [--plaintext]
//!     cargo build --release -p agentstore -p agentstore-bench && target/release/agentstore-bench strong [--seconds S]
//!     cargo build --release -p agentstore -p agentstore-bench && target/release/agentstore-bench causal [--seconds S]
//!     cargo build --release -p agentstore -p agentstore-bench && target/release/agentstore-bench trust [--seconds S]
//!     cargo build --release -p agentstore -p agentstore-bench && target/release/agentstore-bench resp [--seconds S]
//!
//! `local`: put and get through the `p2p_ai_agents::storage` facade against raw redb at the
//! same durability (one fsync per commit), with 1 writer and with 16 concurrent writers.
//! Raw redb commits every put on its own (it has one writer at a time); the facade's local
//! engine commits concurrent writes together (group commit). Values are 100 bytes.

mod causal;
mod cluster;
mod documents;
mod load;
mod postgres;
mod redis;
mod resp;
mod stats;
mod strong;
mod trust;

use std::sync::Arc;
use std::time::Instant;

use p2p_ai_agents::storage::{Config, Storage};
use redb::{Database, ReadableDatabase, TableDefinition};

use crate::stats::{Row, Sample};

const TABLE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("bench");

fn main() {
    let mut args = std::env::args().skip(1);
    let suite = args.next().unwrap_or_else(|| "local".into());
    let mut ops = 2000usize;
    let mut seconds = 5u64;
    let mut peers = cluster::Peers::Admitted;
    while let Some(arg) = args.next() {
        let mut number = || args.next().and_then(|n| n.parse().ok()).expect("a number");
        match arg.as_str() {
            "--ops" => ops = number() as usize,
            "--seconds" => seconds = number(),
            // The cluster benchmark with `insecure: true` nodes (plaintext peer links).
            "--plaintext" => peers = cluster::Peers::Plaintext,
            other => panic!("unknown option {other}"),
        }
    }
    match suite.as_str() {
        "local" => local(ops, true),
        "local-get" => local(ops, false),
        "redis" => redis::run(seconds),
        "postgres" => postgres::run(seconds),
        "cluster" => cluster::run(seconds, peers),
        "strong" => strong::run(seconds),
        "documents" => documents::run(seconds),
        "causal" => causal::run(seconds),
        "trust" => trust::run(seconds),
        "resp" => resp::run(seconds),
        "signatures" => trust::signatures(ops),
        other => {
            eprintln!(
                "unknown benchmark `{other}`; available: local, local-get, redis, postgres, cluster, strong, documents, causal, trust, resp, signatures"
            );
            std::process::exit(2);
        }
    }
}

/// The runtime every benchmark's clients share: two workers, the machine's two cores.
pub(crate) fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn key(i: usize) -> String {
    format!("bench:{i:08}")
}

/// A 100-byte value: 98 characters, 100 bytes once JSON-quoted by the facade.
fn value() -> String {
    "v".repeat(98)
}

/// Rounds per workload. Ours and raw alternate, and the median round of each is reported,
/// so a burst of noise on this shared machine does not decide a ratio.
const ROUNDS: usize = 3;

fn local(ops: usize, with_puts: bool) {
    // Writers share a 2-worker runtime; the single reader runs on a current-thread runtime,
    // as a single-threaded application would.
    let multi = two_workers();
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reads = ops * 25;
    println!(
        "local engine vs raw redb, fsync per commit, 100-byte values, {ops} puts and {reads} gets \
         per round, median of {ROUNDS} alternating rounds\n"
    );
    let mut rows = Vec::new();
    for writers in [1usize, 16].into_iter().filter(|_| with_puts) {
        let (ours, raw) = alternate(
            || multi.block_on(facade_puts(ops, writers)),
            || raw_puts(ops, writers),
        );
        rows.push(Row::new(format!("put, {writers} writer(s)"), ours, raw));
    }
    let (ours, raw) = alternate(|| single.block_on(facade_gets(reads)), || raw_gets(reads));
    rows.push(Row::new("get, 1 reader".into(), ours, raw));
    stats::print_table(&rows);
}

/// Runs both sides `ROUNDS` times, alternating, and keeps each side's median round.
fn alternate(
    mut ours: impl FnMut() -> Sample,
    mut raw: impl FnMut() -> Sample,
) -> (Sample, Sample) {
    let mut our_rounds = Vec::new();
    let mut raw_rounds = Vec::new();
    for _ in 0..ROUNDS {
        our_rounds.push(ours());
        raw_rounds.push(raw());
    }
    (stats::median(our_rounds), stats::median(raw_rounds))
}

fn raw_db() -> (Arc<Database>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("raw.redb")).unwrap();
    (Arc::new(db), dir)
}

/// Raw redb, one transaction (and fsync) per put; `writers` threads contend for the writer.
fn raw_puts(ops: usize, writers: usize) -> Sample {
    let (db, _dir) = raw_db();
    let value = value().into_bytes();
    let per_writer = ops / writers;
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (db, value) = (Arc::clone(&db), value.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let key = key(w * per_writer + i);
                    let t = Instant::now();
                    let txn = db.begin_write().unwrap();
                    txn.open_table(TABLE)
                        .unwrap()
                        .insert(key.as_bytes(), value.as_slice())
                        .unwrap();
                    txn.commit().unwrap();
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let latencies = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    Sample::new(latencies, start.elapsed())
}

async fn open_storage() -> (Storage, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: Some(dir.path().display().to_string()),
        ..Config::default()
    };
    (Storage::new(config).await.unwrap(), dir)
}

async fn facade_puts(ops: usize, writers: usize) -> Sample {
    let (storage, _dir) = open_storage().await;
    let per_writer = ops / writers;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let storage = storage.clone();
        tasks.spawn(async move {
            let value = value();
            let mut latencies = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let key = key(w * per_writer + i);
                let t = Instant::now();
                storage.set(&key, &value).await.unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(ops);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.unwrap());
    }
    Sample::new(latencies, start.elapsed())
}

const PRELOAD: usize = 10_000;

fn raw_gets(reads: usize) -> Sample {
    let (db, _dir) = raw_db();
    let value = value().into_bytes();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(TABLE).unwrap();
        for i in 0..PRELOAD {
            table.insert(key(i).as_bytes(), value.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    let mut latencies = Vec::with_capacity(reads);
    let start = Instant::now();
    for i in 0..reads {
        let key = key(i * 7919 % PRELOAD);
        let t = Instant::now();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(TABLE).unwrap();
        let got = table
            .get(key.as_bytes())
            .unwrap()
            .map(|v| v.value().to_vec());
        assert_eq!(got.map(|v| v.len()), Some(98));
        latencies.push(t.elapsed());
    }
    Sample::new(latencies, start.elapsed())
}

async fn facade_gets(reads: usize) -> Sample {
    let (storage, _dir) = open_storage().await;
    let value = value();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (storage, value) = (storage.clone(), value.clone());
        tasks.spawn(async move {
            for i in (w..PRELOAD).step_by(16) {
                storage.set(&key(i), &value).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut latencies = Vec::with_capacity(reads);
    let start = Instant::now();
    for i in 0..reads {
        let key = key(i * 7919 % PRELOAD);
        let t = Instant::now();
        let got: Option<String> = storage.get(&key).await.unwrap();
        assert_eq!(got.map(|v| v.len()), Some(98));
        latencies.push(t.elapsed());
    }
    Sample::new(latencies, start.elapsed())
}
