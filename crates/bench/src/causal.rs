//! Causal vs eventual collections on the same three `agentstore node` processes, in one run.
//!
//! One cluster (async replication, N=3 W=1 R=1: an eventual write is acknowledged once one
//! node has it durably, as a causal write is) holds an eventual collection (`bench`) and a
//! causal one (`tasks`). Clients, each on its own keep-alive HTTP/1.1 connection to one of the
//! nodes (client i to node i mod 3), PUT and GET 100-byte values over 100 000 keys of one
//! collection, then of the other, at concurrency 1, 16 and 64. Causal clients run in
//! sessions: each sends its token and keeps the one it is answered, as an agent would.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cluster::{Connection, Peers, start_cluster};
use crate::load;
use crate::stats::{Row, Sample};

const KEYS: u64 = 100_000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];

async fn measure(
    clients: &[String],
    collection: &'static str,
    sessions: bool,
    concurrency: usize,
    write: bool,
    seconds: u64,
) -> Sample {
    let mut connections = Vec::new();
    for i in 0..concurrency {
        let connection = Connection::open(&clients[i % clients.len()]).await;
        connections.push(Mutex::new(if sessions {
            connection.in_session()
        } else {
            connection
        }));
    }
    let connections = Arc::new(connections);
    let value = Arc::new(format!("\"{}\"", "v".repeat(98)));
    load::run(
        concurrency,
        Duration::from_secs(seconds),
        move |client, i| {
            let (connections, value) = (Arc::clone(&connections), Arc::clone(&value));
            async move {
                let key = load::key(collection, client, i, KEYS);
                let mut connection = connections[client].lock().await;
                if write {
                    connection
                        .call("PUT", &format!("/v1/keys/{key}"), &value)
                        .await;
                } else {
                    connection.call("GET", &format!("/v1/keys/{key}"), "").await;
                }
            }
        },
    )
    .await
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    println!(
        "3 agentstore nodes on loopback (fsync per write on every node), one cluster: a causal collection (in sessions) vs an eventual one (async, W=1 R=1); 100-byte values, {KEYS} keys, {seconds} s per workload\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let replication = "    strategy: async\n    replicas: 3\n    read_quorum: 1\n";
    let collections = "  collections:\n    tasks:\n      consistency: causal\n";
    let (nodes, clients) = start_cluster(dir.path(), replication, collections, Peers::Admitted);
    let mut rows = Vec::new();
    for write in [true, false] {
        for concurrency in CONCURRENCY {
            let causal = runtime.block_on(measure(
                &clients,
                "tasks",
                true,
                concurrency,
                write,
                seconds,
            ));
            let eventual = runtime.block_on(measure(
                &clients,
                "bench",
                false,
                concurrency,
                write,
                seconds,
            ));
            let what = if write { "put" } else { "get" };
            rows.push(Row::new(
                format!("causal vs eventual {what}, {concurrency} client(s)"),
                causal,
                eventual,
            ));
        }
    }
    drop(nodes);
    crate::stats::print_table_with("eventual", &rows);
}
