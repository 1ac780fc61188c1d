//! What trust costs: the same three-node cluster with admitted nodes over mutual TLS and a
//! capability token checked on every request (the default with an authority), and with
//! `insecure: true` (plaintext peers, open client API), side by side in one run, for eventual
//! and strong puts; and puts to signed collections (each write signed by the client with its
//! token, its signature checked by every node that stores it) against the same plaintext
//! puts.
//!
//! Both clusters run at once and the workload alternates between them in one-second slices:
//! the nodes share one disk whose fsync time drifts between minutes, and alternating keeps
//! that drift out of the ratio.

use std::sync::Arc;
use std::time::Duration;

use agentstore_engine::{PhysicalClock, SystemClock};
use agentstore_trust::Capability;
use tokio::sync::Mutex;

use crate::cluster::{Connection, Peers, connections, start_cluster_with_token};
use crate::load;
use crate::stats::{Row, Sample};

/// Concurrent clients, spread over the three nodes.
const CLIENTS: usize = 16;
/// Keys written.
const KEYS: u64 = 10_000;

/// Puts of 100-byte values to `collection` from every client for `duration`; with `signer`,
/// each put carries the client's signature (`agentstore-attestation`), made per request.
async fn puts(
    connections: &Arc<Vec<Mutex<Connection>>>,
    collection: &'static str,
    signer: Option<&Arc<Capability>>,
    duration: Duration,
) -> Sample {
    let value = format!("\"{}\"", "v".repeat(98));
    let connections = Arc::clone(connections);
    let signer = signer.cloned();
    load::run(CLIENTS, duration, move |client, i| {
        let (connections, value, signer) =
            (Arc::clone(&connections), value.clone(), signer.clone());
        async move {
            let key = load::key(collection, client, i, KEYS);
            let header = match &signer {
                None => String::new(),
                Some(token) => {
                    let attestation = token
                        .sign_write(
                            key.as_str().expect("UTF-8 keys"),
                            Some(value.as_bytes()),
                            SystemClock.now_ms(),
                        )
                        .expect("the token signs");
                    format!("agentstore-attestation: {}\r\n", attestation.to_text())
                }
            };
            let mut connection = connections[client].lock().await;
            connection
                .call_with("PUT", &format!("/v1/keys/{key}"), &value, &header)
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
    // Signed collections need an authority: only the secure cluster has them.
    let signed = format!(
        "{collections}    signed: {{ signed: true }}\n    signed_ledger: {{ signed: true, consistency: strong }}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_secure, secure, token) = start_cluster_with_token(
        &dir.path().join("tls"),
        replication,
        &signed,
        Peers::AdmittedWithTokens,
    );
    let signer = token
        .as_deref()
        .map(|t| Arc::new(Capability::from_text(t).expect("the benchmark's token")));
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
        for (name, collection, ours_in, signing) in [
            ("eventual put (async, W=1)", "bench", "bench", None),
            ("eventual put, signed", "bench", "signed", signer.as_ref()),
            ("strong put (Raft)", "ledger", "ledger", None),
            (
                "strong put, signed",
                "ledger",
                "signed_ledger",
                signer.as_ref(),
            ),
        ] {
            // Uncounted warm-up: connections, Raft leadership, the engines' files.
            puts(&secure, ours_in, signing, Duration::from_secs(1)).await;
            puts(&plain, collection, None, Duration::from_secs(1)).await;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..seconds {
                ours.push(puts(&secure, ours_in, signing, Duration::from_secs(1)).await);
                theirs.push(puts(&plain, collection, None, Duration::from_secs(1)).await);
            }
            rows.push(Row::new(
                name.to_owned(),
                Sample::merge(ours),
                Sample::merge(theirs),
            ));
        }
    });
    println!(
        "agentstore = mutual TLS with admissions + tokens (signed rows: + each write signed by its client and checked by every node that stores it); plaintext = `insecure: true`, unsigned\n"
    );
    crate::stats::print_table_with("plaintext", &rows);
}

/// What one signed write costs in CPU, on one core: the writer's signature, a node's check
/// of it (the token chain already known), and the attestation's encoding both ways. A node
/// checks each write it stores: at N=3, three checks per write across the cluster.
pub(crate) fn signatures(ops: usize) {
    use std::time::Instant;
    let authority = agentstore_trust::SecretKey::generate();
    let everything =
        agentstore_trust::Right::new(&[agentstore_trust::Operation::Write], "").expect("a right");
    let token = Capability::issue(&authority, vec![everything], 0).expect("a token");
    let value = vec![b'v'; 100];
    let keys: Vec<String> = (0..ops).map(|i| format!("bench:{i}")).collect();
    let per_op = |started: Instant| started.elapsed().as_secs_f64() * 1e6 / ops as f64;
    let started = Instant::now();
    let signed: Vec<_> = keys
        .iter()
        .map(|key| token.sign_write(key, Some(&value), 1).expect("signed"))
        .collect();
    let sign = per_op(started);
    let started = Instant::now();
    for (key, attestation) in keys.iter().zip(&signed) {
        attestation
            .verify_write(key, Some(&value))
            .expect("verifies");
    }
    let verify = per_op(started);
    let started = Instant::now();
    for attestation in &signed {
        let text = attestation.to_text();
        agentstore_trust::Attestation::from_text(&text).expect("parses");
    }
    let encoding = per_op(started);
    println!("{ops} signed writes of 100-byte values, ed25519 (ring), one core\n");
    println!("| step | µs per write |\n|---|---:|");
    println!("| sign (the writer) | {sign:.1} |");
    println!("| check (each node that stores it) | {verify:.1} |");
    println!("| text form out and back | {encoding:.1} |");
    println!(
        "| attestation size | {} bytes |",
        signed.first().map_or(0, |a| a.encode().len())
    );
}
