//! Text documents (`ot_text`) on three `agentstore node` processes, beside their nearest
//! anchor, a strong put on the same cluster in the same run: both go through the Raft group
//! (a majority fsyncs every entry), so the difference is what an edit adds: the document's
//! transformation and the larger record it rewrites.
//!
//! Workloads, at 1 and 16 clients, each a closed loop over HTTP/1.1 keep-alive connections
//! spread from the leader:
//! - strong put: 100-byte values over 10 000 keys (the anchor);
//! - edit of its own document: each client inserts 100 characters at the start of its own
//!   document against the revision its last edit answered (nothing to transform), trimming
//!   the end to keep the document at most 1 000 characters;
//! - shared document, read then edit: every client reads one document (a linearizable read)
//!   and edits it against the revision read, so concurrent edits are transformed past each
//!   other; one read and one edit count as one operation.
//!
//! One-second slices, the edit workload and the anchor taking turns, as in `strong`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::cluster::{Connection, Peers, start_cluster};
use crate::load;
use crate::stats::{Row, Sample};
use crate::strong::{agentstore_leader, leader_first};

const KEYS: u64 = 10_000;
const CONCURRENCY: [usize; 2] = [1, 16];
/// The most characters a benchmark document holds: an edit past it trims the end.
const MAX_LEN: u64 = 1_000;
const INSERT: u64 = 100;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Put,
    OwnDocument,
    SharedDocument,
}

/// The number after `"name":` in a JSON text.
fn number(json: &[u8], name: &str) -> u64 {
    let text = String::from_utf8_lossy(json);
    text.split(&format!("\"{name}\":"))
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}

/// The length of the string after `"value":"` in a JSON text (the benchmark writes ASCII with
/// nothing to escape).
fn text_len(json: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(json);
    text.split("\"value\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map_or(0, |value| value.len() as u64)
}

/// An edit of a `len`-character document: 100 characters inserted at the start, the end
/// trimmed to keep it at most [`MAX_LEN`].
fn edit_body(revision: u64, len: u64) -> String {
    let insert = "x".repeat(INSERT as usize);
    let op = if len == 0 {
        format!("[\"{insert}\"]")
    } else if len + INSERT <= MAX_LEN {
        format!("[\"{insert}\", {len}]")
    } else {
        let trim = len + INSERT - MAX_LEN;
        format!("[\"{insert}\", {}, -{trim}]", len - trim)
    };
    format!("{{\"revision\": {revision}, \"op\": {op}}}")
}

async fn measure(addrs: &[String], clients: usize, workload: Workload, seconds: u64) -> Sample {
    let mut connections = Vec::new();
    for i in 0..clients {
        connections.push(Mutex::new(Connection::open(&addrs[i % addrs.len()]).await));
    }
    let connections = Arc::new(connections);
    // Each client's own document: (revision, length) as its last edit left it.
    let mut own = Vec::new();
    for client in 0..clients {
        let mut connection = connections[client].lock().await;
        let read = connection
            .call("GET", &format!("/v1/keys/pages:own-{client}"), "")
            .await;
        own.push(Mutex::new((number(&read, "revision"), text_len(&read))));
    }
    let own = Arc::new(own);
    let value = "v".repeat(98);
    load::run(clients, Duration::from_secs(seconds), move |client, i| {
        let connections = Arc::clone(&connections);
        let own = Arc::clone(&own);
        let value = value.clone();
        async move {
            let mut connection = connections[client].lock().await;
            match workload {
                Workload::Put => {
                    let path = format!("/v1/keys/ledger:{}", load::key_index(client, i, KEYS));
                    connection.call("PUT", &path, &format!("\"{value}\"")).await;
                }
                Workload::OwnDocument => {
                    let mut state = own[client].lock().await;
                    let (revision, len) = *state;
                    let path = format!("/v1/documents/pages:own-{client}");
                    let answer = connection
                        .call("POST", &path, &edit_body(revision, len))
                        .await;
                    *state = (number(&answer, "revision"), (len + INSERT).min(MAX_LEN));
                }
                Workload::SharedDocument => {
                    let read = connection.call("GET", "/v1/keys/pages:shared", "").await;
                    let body = edit_body(number(&read, "revision"), text_len(&read));
                    connection
                        .call("POST", "/v1/documents/pages:shared", &body)
                        .await;
                }
            }
        }
    })
    .await
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    println!(
        "3 agentstore nodes: ot_text document edits beside strong puts on the same Raft group, loopback, fsync per commit; {seconds} s per workload, in one-second slices taking turns\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let collections = "  collections:\n    ledger:\n      consistency: strong\n    pages:\n      consistency: strong\n      conflict: ot_text\n";
    let replication =
        "    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n";
    let (nodes, addrs) = start_cluster(dir.path(), replication, collections, Peers::Admitted);
    let addrs = leader_first(&addrs, agentstore_leader(&addrs));
    // Files grown first, not counted.
    runtime.block_on(measure(&addrs, 16, Workload::Put, 2));
    let mut rows = Vec::new();
    for (name, workload) in [
        ("edit of its own document", Workload::OwnDocument),
        ("shared document: read, then edit", Workload::SharedDocument),
    ] {
        for clients in CONCURRENCY {
            let (mut mine, mut anchor) = (Vec::new(), Vec::new());
            for _ in 0..seconds {
                mine.push(runtime.block_on(measure(&addrs, clients, workload, 1)));
                anchor.push(runtime.block_on(measure(&addrs, clients, Workload::Put, 1)));
            }
            rows.push(Row::new(
                format!("{name}, {clients} client(s)"),
                Sample::merge(mine),
                Sample::merge(anchor),
            ));
        }
    }
    drop(nodes);
    crate::stats::print_table_with("strong put", &rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_the_document_within_its_bound() {
        assert_eq!(
            edit_body(0, 0),
            format!("{{\"revision\": 0, \"op\": [\"{}\"]}}", "x".repeat(100))
        );
        assert!(edit_body(3, 950).ends_with(", 900, -50]}"));
        assert_eq!(
            number(br#"{"key":"pages:a","revision":42,"x":1}"#, "revision"),
            42
        );
        assert_eq!(
            text_len(br#"{"key":"pages:a","value":"abc","revision":1}"#),
            3
        );
    }
}
