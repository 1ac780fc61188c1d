//! What trust costs: the same three-node cluster with admitted nodes over mutual TLS and a
//! capability token checked on every request (the default with an authority), and with
//! `insecure: true` (plaintext peers, open client API), side by side in one run, for eventual
//! and strong puts.
//!
//! Both clusters run at once and the workload alternates between them in one-second slices:
//! the nodes share one disk whose fsync time drifts between minutes, and alternating keeps
//! that drift out of the ratio.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cluster::{Connection, Peers, connections, start_cluster_with_token};
use crate::load;
use crate::stats::{Row, Sample};

/// Concurrent clients, spread over the three nodes.
const CLIENTS: usize = 16;
/// Keys written.
const KEYS: u64 = 10_000;

/// Puts of 100-byte values to `collection` from every client for `duration`.
async fn puts(
    connections: &Arc<Vec<Mutex<Connection>>>,
    collection: &'static str,
    duration: Duration,
) -> Sample {
    let value = format!("\"{}\"", "v".repeat(98));
    let connections = Arc::clone(connections);
    load::run(CLIENTS, duration, move |client, i| {
        let (connections, value) = (Arc::clone(&connections), value.clone());
        async move {
            let key = load::key(collection, client, i, KEYS);
            let mut connection = connections[client].lock().await;
            connection
                .call("PUT", &format!("/v1/keys/{key}"), &value)
                .await;
        }
    })
    .await
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    println!(
        "3 agentstore nodes on loopback, admitted peers over mutual TLS and a token checked per request vs the same with `insecure: true` (plaintext, no tokens), both running, alternating one-second slices; {CLIENTS} clients over HTTP, 100-byte values, {KEYS} keys, {seconds} s per workload and side\n"
    );
    let replication = "    strategy: async\n    replicas: 3\n    read_quorum: 1\n";
    let collections = "  collections:\n    ledger:\n      consistency: strong\n";
    let dir = tempfile::tempdir().unwrap();
    let (_secure, secure, token) = start_cluster_with_token(
        &dir.path().join("tls"),
        replication,
        collections,
        Peers::AdmittedWithTokens,
    );
    let (_plain, plain, _) = start_cluster_with_token(
        &dir.path().join("plaintext"),
        replication,
        collections,
        Peers::Plaintext,
    );
    let mut rows = Vec::new();
    runtime.block_on(async {
        let secure = connections(&secure, CLIENTS, token.as_deref()).await;
        let plain = connections(&plain, CLIENTS, None).await;
        for (name, collection) in [
            ("eventual put (async, W=1)", "bench"),
            ("strong put (Raft)", "ledger"),
        ] {
            // Uncounted warm-up: connections, Raft leadership, the engines' files.
            puts(&secure, collection, Duration::from_secs(1)).await;
            puts(&plain, collection, Duration::from_secs(1)).await;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..seconds {
                ours.push(puts(&secure, collection, Duration::from_secs(1)).await);
                theirs.push(puts(&plain, collection, Duration::from_secs(1)).await);
            }
            rows.push(Row::new(
                name.to_owned(),
                Sample::merge(ours),
                Sample::merge(theirs),
            ));
        }
    });
    println!("agentstore = mutual TLS with admissions + tokens; plaintext = `insecure: true`\n");
    crate::stats::print_table_with("plaintext", &rows);
}
