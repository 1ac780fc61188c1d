//! Strong collections on three `agentstore node` processes: one Raft group, writes through
//! any node, linearizable reads everywhere, and the leader killed (SIGKILL) or paused
//! (SIGSTOP, longer than the election timeout) without losing an acknowledged write.

mod common;

use common::{NodeProcess, cluster, history, http};
use serde_json::Value as Json;
use std::time::{Duration, Instant};

const COLLECTIONS: &str = "  collections:\n    agent:\n      consistency: strong\n    bank:\n      consistency: strong\n      conflict: pn_counter\n    accounts:\n      consistency: strong\n";

fn status(node: &NodeProcess) -> Option<Json> {
    let (code, body) = http(node.client, "GET", "/v1/status", "").ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Waits until the running nodes agree on a leader; returns its index.
fn leader(nodes: &[NodeProcess]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: Vec<(usize, Json)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.child.is_some())
            .filter_map(|(i, n)| status(n).map(|s| (i, s)))
            .collect();
        let leaders: Vec<&str> = running
            .iter()
            .filter_map(|(_, s)| s["raft"]["leader"].as_str())
            .collect();
        let agreed = running.len() == nodes.iter().filter(|n| n.child.is_some()).count()
            && !leaders.is_empty()
            && leaders.len() == running.len()
            && leaders.iter().all(|l| *l == leaders[0]);
        if agreed {
            let name = leaders[0];
            if let Some((i, _)) = running
                .iter()
                .find(|(_, s)| s["node"] == name && s["raft"]["state"] == "leader")
            {
                return *i;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {running:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn add(node: &NodeProcess) -> (u16, String) {
    http(
        node.client,
        "POST",
        "/v1/counters/bank:total",
        r#"{"delta":1}"#,
    )
    .unwrap()
}

fn total(node: &NodeProcess) -> i64 {
    total_of(node, "bank:total")
}

fn total_of(node: &NodeProcess, key: &str) -> i64 {
    let (code, body) = http(node.client, "GET", &format!("/v1/keys/{key}"), "").unwrap();
    assert_eq!(code, 200, "{body}");
    let body: Json = serde_json::from_str(&body).unwrap();
    body["value"]
        .as_i64()
        .unwrap_or_else(|| panic!("no counter value: {body}"))
}

#[test]
fn strong_collections_survive_a_killed_and_a_paused_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    let first = leader(&nodes);

    // The status says what strong collections get: Raft, linearizable.
    let status_a = status(&nodes[0]).unwrap();
    let agent = status_a["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap()
        .clone();
    assert_eq!(agent["guarantee"]["level"], "strong", "{agent}");
    assert_eq!(status_a["raft"]["voters"].as_array().unwrap().len(), 3);

    // A write through a follower is read on every node.
    let follower = (first + 1) % 3;
    let (code, body) = http(
        nodes[follower].client,
        "PUT",
        "/v1/keys/agent:identity:123",
        r#"{"name":"ada"}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    for node in &nodes {
        let (code, body) = http(node.client, "GET", "/v1/keys/agent:identity:123", "").unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""value":{"name":"ada"}"#), "{body}");
    }

    // A stale read answers from the node's own copy (it has caught up by now, or soon).
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, body) = http(
                node.client,
                "GET",
                "/v1/keys/agent:identity:123?stale=true",
                "",
            )
            .unwrap();
            if code == 200 && body.contains(r#""value":{"name":"ada"}"#) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "stale read never caught up: {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (code, body) = http(
        nodes[0].client,
        "GET",
        "/v1/keys/agent:identity:123?stale=true&consistency=strong",
        "",
    )
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid_query"), "{body}");

    // Compare-and-set through the log: the version a read returned wins once.
    let (_, body) = http(nodes[2].client, "GET", "/v1/keys/agent:identity:123", "").unwrap();
    let version = serde_json::from_str::<Json>(&body).unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let cas = |node: &NodeProcess, condition: &str, value: &str| {
        http(
            node.client,
            "PUT",
            &format!("/v1/keys/agent:identity:123?if_version={condition}"),
            value,
        )
        .unwrap()
    };
    let (code, body) = cas(&nodes[1], &version, r#"{"name":"ada","key":"k2"}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = cas(&nodes[2], &version, r#"{"name":"mallory"}"#);
    assert_eq!(
        (code, body.contains("version_mismatch")),
        (409, true),
        "{body}"
    );
    let (code, body) = cas(&nodes[0], "absent", r#"{"name":"mallory"}"#);
    assert_eq!(
        (code, body.contains("version_mismatch")),
        (409, true),
        "{body}"
    );
    let (code, body) = http(
        nodes[0].client,
        "PUT",
        "/v1/keys/agent:new?if_version=absent",
        r#"{"name":"eve"}"#,
    )
    .unwrap();
    assert_eq!(code, 200, "created when absent: {body}");
    let (_, body) = http(nodes[0].client, "GET", "/v1/keys/agent:identity:123", "").unwrap();
    assert!(body.contains("k2"), "{body}");

    // Increments from every node are exact.
    let mut acknowledged = 0;
    for node in &nodes {
        for _ in 0..3 {
            let (code, body) = add(node);
            assert_eq!(code, 200, "{body}");
            acknowledged += 1;
        }
    }

    // SIGKILL the leader: the other two elect a new one and keep counting.
    nodes[first].signal("-KILL");
    let second = leader(&nodes);
    assert_ne!(second, first);
    for node in nodes.iter().filter(|n| n.child.is_some()) {
        let (code, body) = add(node);
        assert_eq!(code, 200, "{body}");
        acknowledged += 1;
    }
    // The killed node restarts from its files and catches up.
    nodes[first].start();
    leader(&nodes);
    assert_eq!(total(&nodes[first]), acknowledged);

    // SIGSTOP the leader for longer than the election timeout: the others take over.
    let paused = leader(&nodes);
    let pid = nodes[paused].child.as_ref().unwrap().id().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let others: Vec<usize> = (0..3).filter(|i| *i != paused).collect();
    let mut served = false;
    let mut unanswered = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !served && Instant::now() < deadline {
        let (code, _) = add(&nodes[others[0]]);
        if code == 200 {
            acknowledged += 1;
            served = true;
        } else {
            // Refused before it was proposed, or indeterminate (it may still apply).
            unanswered += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(served, "the majority serves while the old leader is paused");
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    leader(&nodes);
    // The resumed node does not answer from its stale state: its read goes through the
    // current leader and sees every acknowledged increment.
    let counted = total(&nodes[paused]);
    assert!(
        counted >= acknowledged && counted <= acknowledged + unanswered,
        "{counted} vs {acknowledged} acknowledged, {unanswered} unanswered"
    );
    for node in &nodes {
        assert_eq!(total(node), counted, "every node reads the same count");
    }
}

#[test]
fn histories_through_killed_and_paused_leaders_are_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    leader(&nodes);
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let histories = Default::default();
    let mut faults = Vec::new();
    let acknowledged = history::load_while(&addrs, 4, &histories, || {
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(700));
            let victim = leader(&nodes);
            if round % 2 == 0 {
                faults.push(format!("SIGKILL node {victim}"));
                nodes[victim].signal("-KILL");
                std::thread::sleep(Duration::from_millis(1500));
                nodes[victim].start();
            } else {
                faults.push(format!("SIGSTOP node {victim} for 2 s"));
                let pid = nodes[victim].child.as_ref().unwrap().id().to_string();
                for signal in ["-STOP", "-CONT"] {
                    std::process::Command::new("kill")
                        .args([signal, &pid])
                        .status()
                        .unwrap();
                    if signal == "-STOP" {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(700));
    });
    leader(&nodes);
    history::final_reads(&addrs, &histories);
    let summary = history::check(&histories);
    println!(
        "{summary}, {acknowledged} acknowledged writes; faults: {}",
        faults.join(", ")
    );
    assert!(
        acknowledged >= 50,
        "only {acknowledged} writes acknowledged"
    );
}

/// A balance and the version it was read at.
fn balance(node: std::net::SocketAddr, account: u64) -> Option<(i64, String)> {
    match http(node, "GET", &format!("/v1/keys/accounts:{account}"), "") {
        Ok((200, body)) => {
            let body: Json = serde_json::from_str(&body).ok()?;
            Some((
                body["value"].as_i64()?,
                body["version"].as_str()?.to_owned(),
            ))
        }
        _ => None,
    }
}

#[test]
fn bank_transfers_in_transactions_keep_the_total_through_a_killed_leader() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const ACCOUNTS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    leader(&nodes);
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let open: Vec<String> = (0..ACCOUNTS)
        .map(|a| format!(r#"{{"key":"accounts:{a}","set":100}}"#))
        .collect();
    let (code, body) = http(
        addrs[0],
        "POST",
        "/v1/transactions",
        &format!(r#"{{"writes":[{}]}}"#, open.join(",")),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");

    let stop = AtomicBool::new(false);
    let (done, unknown, audits) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|scope| {
        for worker in 0..3u64 {
            let (addrs, stop, done, unknown) = (&addrs, &stop, &done, &unknown);
            scope.spawn(move || {
                let mut rng = agentstore_sim::Rng::new(worker + 11);
                while !stop.load(Ordering::Relaxed) {
                    let node = addrs[rng.below(3) as usize];
                    let from = rng.below(ACCOUNTS);
                    let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                    let (Some((a, va)), Some((b, vb))) = (balance(node, from), balance(node, to)) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let amount = (1 + rng.below(20) as i64).min(a);
                    let body = format!(
                        r#"{{"writes":[{{"key":"accounts:{from}","set":{},"if_version":"{va}"}},{{"key":"accounts:{to}","set":{},"if_version":"{vb}"}},{{"key":"bank:transfers","add":1}}]}}"#,
                        a - amount,
                        b + amount
                    );
                    match http(node, "POST", "/v1/transactions", &body) {
                        Ok((200, _)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((409, body)) => assert!(body.contains("version_mismatch"), "{body}"),
                        Ok((503, body)) if body.contains(r#""code":"unavailable""#) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {}
                        _ => {
                            unknown.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        // The auditor: every linearizable scan of the accounts sums to the same total.
        let (addrs, stop, audits) = (&addrs, &stop, &audits);
        scope.spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if let Ok((200, body)) = http(addrs[i % 3], "GET", "/v1/scan/accounts", "") {
                    let body: Json = serde_json::from_str(&body).unwrap();
                    let balances: Vec<i64> = body["entries"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["value"].as_i64().unwrap())
                        .collect();
                    assert_eq!(balances.len(), ACCOUNTS as usize, "{body}");
                    assert_eq!(
                        balances.iter().sum::<i64>(),
                        400,
                        "a scan saw money made or lost: {body}"
                    );
                    assert!(balances.iter().all(|b| *b >= 0), "{body}");
                    audits.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Transfers go through before the fault and again after it; how many a second
        // brings depends on the machine, so the run waits for them rather than a time.
        let progress = |what: &str, from: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while done.load(Ordering::Relaxed) < from + 10 {
                if std::time::Instant::now() > deadline {
                    stop.store(true, Ordering::Relaxed);
                    panic!(
                        "{what}: only {} transfers in 60 s",
                        done.load(Ordering::Relaxed) - from
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        progress("before the leader is killed", 0);
        let victim = leader(&nodes);
        nodes[victim].signal("-KILL");
        std::thread::sleep(Duration::from_millis(1500));
        nodes[victim].start();
        leader(&nodes);
        progress(
            "after the killed leader is back",
            done.load(Ordering::Relaxed),
        );
        // Enough audits to mean something, however fast the transfers went.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while audits.load(Ordering::Relaxed) < 10 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });

    let total: i64 = (0..ACCOUNTS).map(|a| balance(addrs[0], a).unwrap().0).sum();
    assert_eq!(total, 400);
    let (done, unknown) = (done.into_inner(), unknown.into_inner());
    let counted = total_of(&nodes[1], "bank:transfers") as usize;
    assert!(
        counted >= done && counted <= done + unknown,
        "{counted} transfers counted, {done} acknowledged, {unknown} unanswered"
    );
    assert!(audits.into_inner() >= 10);
}

#[test]
fn leases_minted_through_raft_fence_off_a_holder_that_outlived_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    leader(&nodes);
    let acquire = |node: &NodeProcess, holder: &str, ttl: u64| {
        http(
            node.client,
            "POST",
            "/v1/locks/agent:lock:payout",
            &format!(r#"{{"holder":"{holder}","ttl_ms":{ttl}}}"#),
        )
        .unwrap()
    };
    let (code, body) = acquire(&nodes[0], "worker-a", 500);
    assert_eq!(code, 200, "{body}");
    let first: Json = serde_json::from_str(&body).unwrap();
    let (code, body) = acquire(&nodes[1], "worker-b", 5000);
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("lock_held") && body.contains("worker-a"),
        "{body}"
    );

    // worker-a stalls past its lease; worker-b, through another node, takes over.
    std::thread::sleep(Duration::from_millis(700));
    let (code, body) = acquire(&nodes[1], "worker-b", 5000);
    assert_eq!(code, 200, "{body}");
    let second: Json = serde_json::from_str(&body).unwrap();
    assert!(
        second["token"].as_u64() > first["token"].as_u64(),
        "{first} {second}"
    );

    // worker-a wakes up and writes with its old token: refused on every node.
    let fenced_put = |node: &NodeProcess, token: &Json, value: &str| {
        http(
            node.client,
            "PUT",
            &format!("/v1/keys/agent:payout?fence_lock=agent:lock:payout&fence_token={token}"),
            value,
        )
        .unwrap()
    };
    for node in &nodes {
        let (code, body) = fenced_put(node, &first["token"], r#""from a""#);
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("fenced"), "{body}");
    }
    let (code, body) = fenced_put(&nodes[2], &second["token"], r#""from b""#);
    assert_eq!(code, 200, "{body}");
    let (_, body) = http(nodes[0].client, "GET", "/v1/keys/agent:payout", "").unwrap();
    assert!(body.contains("from b"), "{body}");
    // The lock's key shows the lease.
    let (_, body) = http(nodes[0].client, "GET", "/v1/keys/agent:lock:payout", "").unwrap();
    assert!(body.contains("worker-b"), "{body}");
    let (code, body) = http(
        nodes[1].client,
        "DELETE",
        &format!("/v1/locks/agent:lock:payout?token={}", second["token"]),
        "",
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = acquire(&nodes[2], "worker-c", 5000);
    assert_eq!(code, 200, "released, the lock is free: {body}");
}

/// Runs the `agentstore` CLI; returns (success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_node_joins_the_raft_group_from_the_cli_and_an_original_voter_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    leader(&nodes);
    for node in &nodes {
        for _ in 0..5 {
            assert_eq!(add(node).0, 200);
        }
    }
    let peers: Vec<(&str, u16)> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .zip(nodes.iter().map(|n| n.peer_port))
        .collect();
    let port = agentstore_engine::testkit::free_port();
    let mut joining = common::node(dir.path(), "node-d", port, &peers, COLLECTIONS);
    joining.start();

    // Asked of a follower, the learner is added by the leader and catches up.
    let first = leader(&nodes);
    let follower = nodes[(first + 1) % 3].client.to_string();
    let (ok, out) = cli(&[
        "--node",
        &follower,
        "raft",
        "add-learner",
        "node-d",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(ok, "{out}");
    // The data and the membership entry that names the learner may reach it
    // in different batches: wait for both.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) =
            http(joining.client, "GET", "/v1/keys/bank:total?stale=true", "").unwrap();
        let learners = status(&joining).map(|s| s["raft"]["learners"].clone());
        if code == 200
            && body.contains(r#""value":15"#)
            && learners.as_ref() == Some(&serde_json::json!(["node-d"]))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the learner never caught up: {code} {body}, learners {learners:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Promoted, it votes; then node-a is removed and stopped: three voters serve on.
    let (ok, out) = cli(&["--node", &follower, "raft", "promote", "node-d"]);
    assert!(ok, "{out}");
    assert!(out.contains("node-d"), "{out}");
    let (ok, out) = cli(&[
        "--node",
        &nodes[1].client.to_string(),
        "raft",
        "remove",
        "node-a",
    ]);
    assert!(ok, "{out}");
    // The CLI returns once the leader committed the change; node-d learns it
    // with the next replication round.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let voters = status(&joining).map(|s| s["raft"]["voters"].clone());
        if voters == Some(serde_json::json!(["node-b", "node-c", "node-d"])) {
            break;
        }
        assert!(Instant::now() < deadline, "voters on node-d: {voters:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes[0].signal("-KILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut added, mut unanswered) = (0, 0);
    while added < 3 {
        assert!(Instant::now() < deadline, "the new group never served");
        match add(&joining).0 {
            200 => added += 1,
            _ => {
                // Refused, or indeterminate (it may still apply).
                unanswered += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let total = total_of(&joining, "bank:total");
    assert!(
        (18..=18 + unanswered).contains(&total),
        "{total}, {unanswered} unanswered"
    );
    assert_eq!(total_of(&nodes[2], "bank:total"), total);
    let (ok, out) = cli(&[
        "--node",
        &nodes[1].client.to_string(),
        "raft",
        "promote",
        "node-x",
    ]);
    assert!(!ok && out.contains("not a learner"), "{out}");
}

/// How one survivor's writes went after a fault: the gap from the fault to its first
/// acknowledged write, the longest any of its requests took, and the codes of the answers
/// before the first acknowledgement.
#[derive(Debug)]
struct Failover {
    gap: Duration,
    longest: Duration,
    codes: Vec<String>,
}

/// Puts through `node` one after another from `fault_at` until one is acknowledged.
fn first_acknowledged(node: &NodeProcess, fault_at: Instant, name: &str) -> Failover {
    let mut longest = Duration::ZERO;
    let mut codes = Vec::new();
    for i in 0.. {
        let started = Instant::now();
        let (code, body) = http(
            node.client,
            "PUT",
            &format!("/v1/keys/agent:failover:{name}:{i}"),
            r#""x""#,
        )
        .unwrap_or((0, String::new()));
        longest = longest.max(started.elapsed());
        if code == 200 {
            break;
        }
        let error: Json = serde_json::from_str(&body).unwrap_or_default();
        codes.push(error["error"]["code"].as_str().unwrap_or("none").to_owned());
        assert!(
            fault_at.elapsed() < Duration::from_secs(30),
            "{name}: no write acknowledged 30 s after the fault: {codes:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Failover {
        gap: fault_at.elapsed(),
        longest,
        codes,
    }
}

/// Kill the leader, then pause another: writes sent to every surviving node go to the leader
/// elected meanwhile. Each is answered within its deadline (5 s for strong requests, plus a
/// second for the exchange), none is `indeterminate`, and the gap from the fault to each
/// survivor's first acknowledged write is printed.
#[test]
fn writes_through_every_survivor_reach_the_new_leader_after_a_kill_and_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    for fault in ["-KILL", "-STOP"] {
        let old = leader(&nodes);
        for node in &nodes {
            let (code, body) = add(node);
            assert_eq!(code, 200, "{body}");
        }
        let pid = nodes[old].child.as_ref().unwrap().id().to_string();
        let fault_at = Instant::now();
        if fault == "-KILL" {
            nodes[old].signal(fault);
        } else {
            std::process::Command::new("kill")
                .args([fault, &pid])
                .status()
                .unwrap();
        }
        let survivors: Vec<&NodeProcess> =
            (0..3).filter(|i| *i != old).map(|i| &nodes[i]).collect();
        let outcomes: Vec<(String, Failover)> = std::thread::scope(|scope| {
            let running: Vec<_> = survivors
                .iter()
                .map(|node| {
                    let name = node
                        .config
                        .file_stem()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    scope.spawn(move || {
                        let outcome = first_acknowledged(node, fault_at, &name);
                        (name, outcome)
                    })
                })
                .collect();
            running.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (name, outcome) in &outcomes {
            eprintln!(
                "{fault} leader: first write acknowledged through {name} {} ms after the fault (longest request {} ms; before it: {:?})",
                outcome.gap.as_millis(),
                outcome.longest.as_millis(),
                outcome.codes
            );
            assert!(
                outcome.longest < Duration::from_secs(6),
                "{name}: a request outlived its deadline: {outcome:?}"
            );
            assert!(
                !outcome.codes.iter().any(|c| c == "indeterminate"),
                "{name}: {outcome:?}"
            );
        }
        match fault {
            "-KILL" => nodes[old].start(),
            _ => {
                std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap();
            }
        }
        leader(&nodes);
    }
}
