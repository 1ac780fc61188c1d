//! Membership on loopback: nodes find each other from seeds, a fourth node joins through one
//! seed and receives its share of the data, writes reaching a non-replica are forwarded, and a
//! stopped node is seen dead by the others.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentstore_cluster::membership::Liveness;
use agentstore_cluster::{Node, NodeConfig, PeerSecurity, PeerTrust, Status};
use agentstore_core::placement::Ring;
use agentstore_core::record::{Mutation, Value};
use agentstore_core::replication::Outcome;
use agentstore_core::{Key, NodeId};
use agentstore_engine::{Engine, LocalEngine, NodeClock};
use tokio::net::TcpListener;

/// The authority that admits this test's nodes.
static AUTHORITY: std::sync::LazyLock<agentstore_trust::SecretKey> =
    std::sync::LazyLock::new(agentstore_trust::SecretKey::generate);

/// Peer links as a node admitted as `id` has them: mutual TLS, admissions checked.
fn admitted(id: &NodeId) -> PeerSecurity {
    PeerSecurity::Tls(std::sync::Arc::new(
        PeerTrust::generate(&AUTHORITY, id.as_str()).unwrap(),
    ))
}

struct Member {
    id: NodeId,
    addr: SocketAddr,
    engine: LocalEngine,
    node: Node,
    _dir: tempfile::TempDir,
}

async fn start(name: &str, seeds: &[&Member]) -> Member {
    let id = NodeId::new(name).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = LocalEngine::open(dir.path(), NodeClock::system(id.clone(), 500)).unwrap();
    let config = NodeConfig {
        id: id.clone(),
        security: admitted(&id),
        client_addr: None,
        seeds: seeds.iter().map(|m| (m.id.clone(), m.addr)).collect(),
        replicas: 3,
        write_quorum: 2,
        read_quorum: 2,
        request_timeout: Duration::from_secs(5),
        anti_entropy_interval: Duration::from_millis(100),
        tombstone_grace: Duration::ZERO,
        signatures: None,
    };
    let node = Node::start(config, engine.clone(), listener);
    Member {
        id,
        addr,
        engine,
        node,
        _dir: dir,
    }
}

fn key(k: &str) -> Key {
    k.parse().unwrap()
}

fn alive(status: &Status) -> Vec<String> {
    status
        .members
        .iter()
        .filter(|m| m.liveness == Liveness::Alive)
        .map(|m| m.id.to_string())
        .collect()
}

/// Waits until `check` holds, or fails with what `describe` says.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn sees_alive(member: &Member, expected: &[&str]) -> Result<(), String> {
    let status = member.node.status().await.map_err(|e| e.to_string())?;
    let alive = alive(&status);
    if alive == expected {
        Ok(())
    } else {
        Err(format!("{} sees {alive:?} alive", member.id))
    }
}

/// Three nodes, B and C knowing only A as their seed, once each sees all three alive.
async fn three() -> (Member, Member, Member) {
    let a = start("node-a", &[]).await;
    let b = start("node-b", &[&a]).await;
    let c = start("node-c", &[&a]).await;
    for m in [&a, &b, &c] {
        eventually("three members alive", || {
            sees_alive(m, &["node-a", "node-b", "node-c"])
        })
        .await;
    }
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_one_seed_and_receives_its_share() {
    let a = start("node-a", &[]).await;
    let b = start("node-b", &[&a]).await;
    let c = start("node-c", &[&a]).await;
    // B and C know only A; they learn each other through it.
    for m in [&a, &b, &c] {
        eventually("three members alive", || {
            sees_alive(m, &["node-a", "node-b", "node-c"])
        })
        .await;
    }
    let keys: Vec<Key> = (0..120).map(|i| key(&format!("doc:{i}"))).collect();
    for k in &keys {
        let put = a
            .node
            .write(k.clone(), Mutation::Put(k.to_string().into_bytes()))
            .await
            .unwrap();
        assert!(matches!(put, Outcome::Written { .. }), "{put:?}");
    }

    let d = start("node-d", &[&b]).await;
    for m in [&a, &b, &c, &d] {
        eventually("four members alive", || {
            sees_alive(m, &["node-a", "node-b", "node-c", "node-d"])
        })
        .await;
    }
    // Every key placed on D reaches D (anti-entropy from the old replicas); none is lost.
    let ring = Ring::new([&a, &b, &c, &d].map(|m| m.id.clone()), 64);
    let on_d: Vec<&Key> = keys
        .iter()
        .filter(|k| ring.replicas(k.as_bytes(), 3).contains(&d.id))
        .collect();
    assert!(
        !on_d.is_empty() && on_d.len() < keys.len(),
        "D replicates some keys, not all: {}",
        on_d.len()
    );
    eventually("D holds every key placed on it", || async {
        for k in &on_d {
            match d.engine.get(k).await.map_err(|e| e.to_string())? {
                Some(r) if r.value == Value::Register(Some(k.to_string().into_bytes())) => {}
                other => return Err(format!("{k}: {other:?}")),
            }
        }
        Ok(())
    })
    .await;
    for k in &keys {
        let read = d.node.read(k.clone()).await.unwrap();
        let Outcome::Read { record: Some(r) } = read else {
            panic!("{k} lost: {read:?}")
        };
        assert_eq!(r.value, Value::Register(Some(k.to_string().into_bytes())));
    }

    // A write on a node that does not replicate the key is forwarded to one that does.
    let members = [&a, &b, &c, &d];
    let k = keys
        .iter()
        .find(|k| !ring.replicas(k.as_bytes(), 3).contains(&a.id))
        .expect("with 4 nodes and N=3, A misses some keys");
    let written = a
        .node
        .write(k.clone(), Mutation::Put(b"forwarded".to_vec()))
        .await
        .unwrap();
    let Outcome::Written { record } = written else {
        panic!("forwarded write failed: {written:?}")
    };
    assert_eq!(record.value, Value::Register(Some(b"forwarded".to_vec())));
    assert!(
        a.engine.get(k).await.unwrap().map(|r| r.value) != Some(record.value.clone()),
        "the non-replica did not store the write itself"
    );
    for m in members {
        let read = m.node.read(k.clone()).await.unwrap();
        assert_eq!(
            read,
            Outcome::Read {
                record: Some(record.clone())
            },
            "on {}",
            m.id
        );
    }
    // Old replicas hand their moved keys over and keep nothing they no longer replicate.
    for m in members {
        eventually("non-replicas hold nothing", || async {
            for k in &keys {
                let held = m.engine.get(k).await.map_err(|e| e.to_string())?.is_some();
                if held && !ring.replicas(k.as_bytes(), 3).contains(&m.id) {
                    return Err(format!("{} still holds {k}", m.id));
                }
            }
            Ok(())
        })
        .await;
    }

    // D leaves: its records go to the replicas taking its place, the others drop it from
    // placement, and nothing is lost.
    d.node.leave().await.unwrap();
    assert!(
        d.engine.scan(b"", None, 10).await.unwrap().is_empty(),
        "a node that left holds nothing"
    );
    let Member { node, .. } = d;
    node.shutdown().await;
    for m in [&a, &b, &c] {
        eventually("D out of placement", || async {
            let status = m.node.status().await.map_err(|e| e.to_string())?;
            let ids: Vec<&str> = status.members.iter().map(|s| s.id.as_str()).collect();
            if ids == ["node-a", "node-b", "node-c"] {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        })
        .await;
    }
    for k in &keys {
        for m in [&a, &b, &c] {
            // With three members and N=3, every member holds every key again.
            let held = m.engine.get(k).await.unwrap().map(|r| r.value);
            assert!(held.is_some(), "{k} missing on {} after D left", m.id);
        }
    }

    // A node that stops without leaving is seen dead; placement keeps it (its keys do not
    // move: the others keep hints for it).
    let Member { node, .. } = c;
    node.shutdown().await;
    for m in [&a, &b] {
        eventually("C seen dead", || async {
            let status = m.node.status().await.map_err(|e| e.to_string())?;
            let seen = status.members.iter().find(|s| s.id.as_str() == "node-c");
            match seen {
                Some(s) if s.liveness == Liveness::Dead && s.share > 0.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
}

/// The value of the metric line starting with `name` (labels included), if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_lag_violations_and_quorum_reachability() {
    let (a, b, c) = three().await;
    for i in 0..20 {
        let k = key(&format!("doc:{i}"));
        a.node
            .write(k.clone(), Mutation::Put(vec![i]))
            .await
            .unwrap();
        a.node.read(k).await.unwrap();
    }
    let text = a.node.metrics_text();
    let lag = metric(
        &text,
        r#"agentstore_replication_lag_seconds_count{backend="cluster",level="eventual"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        lag >= 20.0,
        "each write's replicas acknowledged: {lag}\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"agentstore_consistency_violations_total{guarantee="read_your_writes"}"#
        ),
        Some(0.0),
        "W + R > N: no read missed an acknowledged write (the counter is there from the start)"
    );
    eventually("every quorum reachable", || async {
        match metric(
            &a.node.metrics_text(),
            r#"agentstore_quorum_reachable_ratio{op="write"}"#,
        ) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // One of three down: W=2 still reachable. Two down: no write quorum anywhere.
    let Member { node, .. } = c;
    node.shutdown().await;
    eventually("C seen dead", || async {
        let status = a.node.status().await.map_err(|e| e.to_string())?;
        let dead = status.members.iter().any(|m| m.liveness == Liveness::Dead);
        if dead {
            Ok(())
        } else {
            Err("C still alive".into())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ratio = metric(
        &a.node.metrics_text(),
        r#"agentstore_quorum_reachable_ratio{op="write"}"#,
    );
    assert_eq!(ratio, Some(1.0));
    let Member { node, .. } = b;
    node.shutdown().await;
    eventually("no write quorum with two of three down", || async {
        match metric(
            &a.node.metrics_text(),
            r#"agentstore_quorum_reachable_ratio{op="write"}"#,
        ) {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let text = a.node.metrics_text();
    let reachable = metric(
        &text,
        r#"agentstore_quorum_reachable_seconds_total{op="write"}"#,
    )
    .unwrap();
    let observed = metric(&text, "agentstore_observed_seconds_total").unwrap();
    assert!(
        reachable > 0.0 && reachable < observed,
        "a share of the time: {reachable} of {observed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_only_once_every_replica_holds_them() {
    let (a, b, c) = three().await;
    let gone = key("doc:gone");
    a.node
        .write(gone.clone(), Mutation::Put(b"x".to_vec()))
        .await
        .unwrap();
    a.node.write(gone.clone(), Mutation::Delete).await.unwrap();
    // A replica may collect first and get the tombstone back from one that has not yet
    // (anti-entropy); it converges to no copy anywhere.
    eventually("the tombstone is collected everywhere", || async {
        for m in [&a, &b, &c] {
            if let Some(r) = m.engine.get(&gone).await.map_err(|e| e.to_string())? {
                return Err(format!("{} still holds {r:?}", m.id));
            }
        }
        Ok(())
    })
    .await;
    match b.node.read(gone.clone()).await.unwrap() {
        Outcome::Read { record: None } => {}
        Outcome::Read { record: Some(r) } if r.is_tombstone() => {}
        other => panic!("the key stays deleted: {other:?}"),
    }

    // With node-c down, node-a and node-b cannot learn that it holds the tombstone: they keep it.
    let Member { node, .. } = c;
    node.shutdown().await;
    let kept = key("doc:kept");
    a.node
        .write(kept.clone(), Mutation::Put(b"y".to_vec()))
        .await
        .unwrap();
    a.node.write(kept.clone(), Mutation::Delete).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for m in [&a, &b] {
        let held = m.engine.get(&kept).await.unwrap();
        assert!(
            held.as_ref().is_some_and(|r| r.is_tombstone()),
            "{} keeps the tombstone while a replica cannot confirm it: {held:?}",
            m.id
        );
    }
}
