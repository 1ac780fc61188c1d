//! Transactions across a Raft collection and a PostgreSQL collection on three `agentstore
//! node` processes: two-phase commit with a durable coordinator record. The coordinator
//! (the node a client sent the transaction to) is killed between prepare and the decision,
//! and between the decision and the commits; restarted, it ends each transaction all or
//! nothing. PostgreSQL on 127.0.0.1:5432 (see `.ci/run`).

mod common;

use agentstore_engine::testkit::postgres_url;
use common::{NodeProcess, cluster, eventually, http};
use serde_json::Value as Json;
use std::time::Duration;

fn collections() -> String {
    format!(
        "  supabase:\n    url: {}\n  collections:\n    ledger:\n      consistency: strong\n    audit:\n      backend: supabase\n      consistency: strong\n",
        postgres_url()
    )
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}x{nanos}", std::process::id())
}

fn get(node: &NodeProcess, key: &str) -> (u16, Json) {
    let (code, body) = http(node.client, "GET", &format!("/v1/keys/{key}"), "").unwrap();
    (code, serde_json::from_str(&body).unwrap_or(Json::Null))
}

fn strong_ready(nodes: &[NodeProcess]) {
    eventually("a Raft leader serves", || {
        match http(nodes[1].client, "PUT", "/v1/keys/ledger:ready", "1") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

fn transaction(ledger: &str, audit: &str, value: &str) -> String {
    format!(
        r#"{{"writes":[{{"key":"{ledger}","set":"{value}"}},{{"key":"{audit}","set":"{value}"}}]}}"#
    )
}

/// Restarts node 0 with `crash` as its crash point, sends it a transaction that kills it
/// there, checks that both keys are locked while it is down, restarts it and returns the
/// state each key settles in.
fn killed_coordinator(nodes: &mut [NodeProcess], crash: &str) -> (u16, u16, String, String) {
    let id = unique();
    let (ledger, audit) = (format!("ledger:{id}"), format!("audit:{id}"));
    nodes[0].signal("-KILL");
    nodes[0].env = vec![("AGENTSTORE_CRASH_AT".into(), crash.into())];
    nodes[0].start();
    strong_ready(nodes);
    // A transaction refused before it began is sent again (a few times at most); one that
    // began dies at the crash point.
    let mut answers = Vec::new();
    loop {
        let sent = http(
            nodes[0].client,
            "POST",
            "/v1/transactions",
            &transaction(&ledger, &audit, crash),
        );
        assert!(
            !matches!(sent, Ok((200, _))),
            "the coordinator died before answering: {sent:?}"
        );
        answers.push(sent);
        if nodes[0].exits_within(Duration::from_secs(20)) {
            break;
        }
        assert!(
            answers.len() < 3,
            "the coordinator never reached its crash point {crash}; it answered {answers:?}; its log:\n{}",
            nodes[0].log_tail(40)
        );
    }

    // While the coordinator is down, both participants hold the keys (once the Raft group
    // has replaced the coordinator if it led).
    for key in [&ledger, &audit] {
        eventually("the prepared transaction holds its keys", || {
            match http(
                nodes[1].client,
                "PUT",
                &format!("/v1/keys/{key}"),
                "\"intruder\"",
            ) {
                Ok((409, body)) if body.contains("in_transaction") => Ok(()),
                Ok((503, body)) => Err(body),
                other => panic!("{key} must be locked by the prepared transaction: {other:?}"),
            }
        });
    }

    // Restarted (no crash point), the coordinator finishes the transaction.
    nodes[0].env.clear();
    nodes[0].start();
    let mut settled = (0, 0, String::new(), String::new());
    eventually("the transaction is resolved and its keys unlocked", || {
        let locked = [&ledger, &audit].iter().any(|key| {
            // A compare-and-set on a version no write has: refused, and by the lock first
            // while the key is held, so it probes without writing.
            let path = format!("/v1/keys/{key}?if_version=probe:999999");
            matches!(http(nodes[2].client, "PUT", &path, "0"), Ok((409, body)) if body.contains("in_transaction"))
        });
        if locked {
            return Err("still locked".into());
        }
        let (l, lv) = get(&nodes[1], &ledger);
        let (a, av) = get(&nodes[2], &audit);
        settled = (l, a, lv["value"].to_string(), av["value"].to_string());
        Ok(())
    });
    settled
}

#[test]
fn a_killed_coordinator_ends_its_transactions_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &collections());
    strong_ready(&nodes);

    // A cross-engine transaction commits on both sides.
    let id = unique();
    let (ledger, audit) = (format!("ledger:{id}"), format!("audit:{id}"));
    let (code, body) = http(
        nodes[2].client,
        "POST",
        "/v1/transactions",
        &transaction(&ledger, &audit, "both"),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&nodes[0], &ledger).1["value"], "both");
    assert_eq!(get(&nodes[1], &audit).1["value"], "both");

    // Killed after every participant prepared, before the decision: aborted everywhere.
    let (l, a, _, _) = killed_coordinator(&mut nodes, "after-prepare");
    assert_eq!(
        (l, a),
        (404, 404),
        "nothing of the undecided transaction is written"
    );

    // Killed after the decision to commit, before telling anyone: committed everywhere.
    let (l, a, lv, av) = killed_coordinator(&mut nodes, "after-decision");
    assert_eq!((l, a), (200, 200));
    assert_eq!(
        (lv.as_str(), av.as_str()),
        ("\"after-decision\"", "\"after-decision\"")
    );
}
