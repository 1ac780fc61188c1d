//! Three nodes on loopback, real TCP between them, real engines.

use std::collections::BTreeMap;
use std::time::Duration;

use agentstore_cluster::{Node, NodeConfig, PeerSecurity, PeerTrust};
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

struct Cluster {
    ids: Vec<NodeId>,
    addrs: Vec<std::net::SocketAddr>,
    engines: Vec<LocalEngine>,
    nodes: Vec<Option<Node>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn config(
    ids: &[NodeId],
    addrs: &[std::net::SocketAddr],
    me: usize,
    anti_entropy: Duration,
) -> NodeConfig {
    let peers: BTreeMap<NodeId, std::net::SocketAddr> = ids
        .iter()
        .cloned()
        .zip(addrs.iter().copied())
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, p)| p)
        .collect();
    NodeConfig {
        id: ids[me].clone(),
        security: admitted(&ids[me]),
        client_addr: None,
        seeds: peers,
        replicas: 3,
        write_quorum: 2,
        read_quorum: 2,
        request_timeout: Duration::from_millis(500),
        anti_entropy_interval: anti_entropy,
        tombstone_grace: Duration::from_secs(3600),
        signatures: None,
    }
}

/// Anti-entropy off in effect (an hour between rounds), so each test sees only what its own
/// messages did; `anti_entropy_repairs_what_no_message_carried` turns it on.
const NO_ANTI_ENTROPY: Duration = Duration::from_secs(3600);

async fn cluster() -> Cluster {
    cluster_with(NO_ANTI_ENTROPY).await
}

async fn cluster_with(anti_entropy: Duration) -> Cluster {
    let ids: Vec<NodeId> = ["node-a", "node-b", "node-c"]
        .map(|n| NodeId::new(n).unwrap())
        .to_vec();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let engines: Vec<LocalEngine> = (0..3)
        .map(|i| LocalEngine::open(dirs[i].path(), NodeClock::system(ids[i].clone(), 500)).unwrap())
        .collect();
    let nodes = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            Some(Node::start(
                config(&ids, &addrs, i, anti_entropy),
                engines[i].clone(),
                listener,
            ))
        })
        .collect();
    Cluster {
        ids,
        addrs,
        engines,
        nodes,
        _dirs: dirs,
    }
}

fn key(k: &str) -> Key {
    k.parse().unwrap()
}

fn value(outcome: &Outcome) -> Option<Value> {
    match outcome {
        Outcome::Read { record } => record.as_ref().map(|r| r.value.clone()),
        other => panic!("expected a read, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_is_read_on_another() {
    let c = cluster().await;
    let (a, cc) = (c.nodes[0].as_ref().unwrap(), c.nodes[2].as_ref().unwrap());
    let written = a
        .write(key("doc:1"), Mutation::Put(b"hello".to_vec()))
        .await
        .unwrap();
    assert!(matches!(written, Outcome::Written { .. }), "{written:?}");
    let read = cc.read(key("doc:1")).await.unwrap();
    assert_eq!(
        value(&read),
        Some(Value::Register(Some(b"hello".to_vec()))),
        "W + R > N: C sees A's write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_on_every_node_are_exact() {
    let c = cluster().await;
    let nodes: Vec<&Node> = c.nodes.iter().map(|n| n.as_ref().unwrap()).collect();
    // Every node increments at the same time.
    let rounds = nodes.iter().map(|node| async move {
        for _ in 0..10 {
            let outcome = node
                .write(key("hits:x"), Mutation::PnCounterAdd(1))
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Written { .. }), "{outcome:?}");
        }
    });
    let mut all = Vec::new();
    for round in rounds {
        all.push(round);
    }
    let (r0, r1, r2) = (all.remove(0), all.remove(0), all.remove(0));
    tokio::join!(r0, r1, r2);
    let read = nodes[1].read(key("hits:x")).await.unwrap();
    match value(&read) {
        Some(Value::PnCounter(counter)) => assert_eq!(counter.value(), 30),
        other => panic!("expected a counter, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_receives_what_it_missed_through_hints() {
    let mut c = cluster().await;
    c.nodes[1].take().unwrap().shutdown().await; // node-b goes down
    let a = c.nodes[0].as_ref().unwrap();
    let written = a
        .write(
            key("doc:missed"),
            Mutation::Put(b"while b was down".to_vec()),
        )
        .await
        .unwrap();
    assert!(
        matches!(written, Outcome::Written { .. }),
        "W=2 of N=3 with one replica down: {written:?}"
    );
    // After the request's deadline, A keeps a hint for B.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        c.engines[1]
            .get(&key("doc:missed"))
            .await
            .unwrap()
            .is_none()
    );
    // node-b restarts on the same address with the same data.
    let listener = TcpListener::bind(c.addrs[1]).await.unwrap();
    c.nodes[1] = Some(Node::start(
        config(&c.ids, &c.addrs, 1, NO_ANTI_ENTROPY),
        c.engines[1].clone(),
        listener,
    ));
    // Delivered once node-a sees node-b alive again (failure detection) and its next hint
    // round runs (every 500 ms): seconds, more on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(record) = c.engines[1].get(&key("doc:missed")).await.unwrap() {
            assert_eq!(
                record.value,
                Value::Register(Some(b"while b was down".to_vec()))
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hint was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delivered hints are forgotten.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.engines[0].hints_for(&c.ids[1], 10).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the delivered hint was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_peer_connection_is_dropped_and_the_node_keeps_working() {
    use tokio::io::AsyncWriteExt;
    let c = cluster().await;
    for junk in [
        &b"\x00\x00\x00\x05node-a\xff\xff\xff\xff"[..],
        b"\x00\x00\x00\x06node-a\x00\x00\x00\x03abc",
        b"\xff\xff\xff\xff",
    ] {
        let mut stream = tokio::net::TcpStream::connect(c.addrs[1]).await.unwrap();
        stream.write_all(junk).await.unwrap();
    }
    let b = c.nodes[1].as_ref().unwrap();
    let written = b
        .write(key("doc:after-junk"), Mutation::Put(b"fine".to_vec()))
        .await
        .unwrap();
    assert!(matches!(written, Outcome::Written { .. }), "{written:?}");
    let read = c.nodes[0]
        .as_ref()
        .unwrap()
        .read(key("doc:after-junk"))
        .await
        .unwrap();
    assert_eq!(value(&read), Some(Value::Register(Some(b"fine".to_vec()))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_version_is_detected_as_a_conflict_and_resolved_alike_everywhere() {
    let c = cluster().await;
    // node-c holds a version of the key that node-a has never seen.
    let from_c = c.engines[2]
        .apply(key("doc:contested"), Mutation::Put(b"from c".to_vec()))
        .await
        .unwrap();
    let a = c.nodes[0].as_ref().unwrap();
    let written = a
        .write(key("doc:contested"), Mutation::Put(b"from a".to_vec()))
        .await
        .unwrap();
    let Outcome::Written { record: from_a } = written else {
        panic!("the write was not acknowledged: {written:?}");
    };
    // W=2: node-c may merge the write just after the client got its answer. Each delivery
    // of a concurrent state counts (a read repair racing the write may count a second time).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = c.nodes[2].as_ref().unwrap().metrics_text();
        let detected = metrics.lines().find_map(|l| {
            l.strip_prefix(r#"agentstore_node_conflicts_total{strategy="lww"} "#)?
                .parse::<u64>()
                .ok()
        });
        if detected.is_some_and(|n| n >= 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every replica ends with the version of the greater hybrid timestamp (LWW; within one
    // millisecond the node id breaks the tie, so node-c's earlier write may win). A replica
    // that has not seen node-c's version yet gets it from the reads' repair.
    let winner = if from_a.stamp > from_c.stamp {
        from_a.value
    } else {
        from_c.value
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for node in c.nodes.iter().flatten() {
        loop {
            let read = node.read(key("doc:contested")).await.unwrap();
            if value(&read).as_ref() == Some(&winner) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a replica reads {read:?}, not the LWW winner {winner:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A tombstone of `key` stamped `age` ago by node-a, as node-a's engine would hold it.
fn tombstone(key_name: &str, age: Duration) -> agentstore_core::Record {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut clock = agentstore_core::HybridClock::new(NodeId::new("node-a").unwrap(), 500);
    let physical = now - age.as_millis() as u64;
    let put = agentstore_core::record::apply(
        None,
        &Mutation::Put(key_name.as_bytes().to_vec()),
        &mut clock,
        physical,
    )
    .unwrap();
    agentstore_core::record::apply(Some(&put), &Mutation::Delete, &mut clock, physical).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_past_its_grace_is_collected_not_spread_to_replicas_that_hold_nothing() {
    let c = cluster_with(Duration::from_millis(100)).await;
    // node-a alone holds two tombstones: one from two hours ago (past the hour of grace), one
    // fresh. node-b and node-c hold nothing of either key.
    let (old, fresh) = (key("doc:long-gone"), key("doc:just-gone"));
    for (k, age) in [(&old, Duration::from_secs(7200)), (&fresh, Duration::ZERO)] {
        c.engines[0]
            .apply(k.clone(), Mutation::Merge(tombstone(&k.to_string(), age)))
            .await
            .unwrap();
    }
    // Anti-entropy carries the fresh tombstone to the others (a delayed write of the value it
    // deletes could still arrive there)...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for engine in &c.engines[1..] {
        while engine.get(&fresh).await.unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the fresh tombstone never spread"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // ...and node-a collects the old one, since every other replica holds nothing of it;
    // none of them took it in meanwhile from the rounds that carried the fresh one.
    while c.engines[0].get(&old).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "node-a never collected the old tombstone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, engine) in c.engines.iter().enumerate() {
        let held = engine.get(&old).await.unwrap();
        assert!(held.is_none(), "{} holds {held:?}", c.ids[i]);
        let fresh = engine.get(&fresh).await.unwrap();
        assert!(
            fresh.is_some_and(|r| r.is_tombstone()),
            "{} lost the fresh tombstone",
            c.ids[i]
        );
    }
}

/// A value of `key` written by node-a `age` ago that expired `expired_for` ago.
fn expired(key_name: &str, age: Duration, expired_for: Duration) -> agentstore_core::Record {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut clock = agentstore_core::HybridClock::new(NodeId::new("node-a").unwrap(), 500);
    agentstore_core::record::apply(
        None,
        &Mutation::PutExpiring {
            value: key_name.as_bytes().to_vec(),
            expires_at_ms: now - expired_for.as_millis() as u64,
        },
        &mut clock,
        now - age.as_millis() as u64,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_value_is_collected_and_never_spread_back_while_an_expiring_one_spreads() {
    let c = cluster_with(Duration::from_millis(100)).await;
    // node-a alone holds a heartbeat that expired two hours ago (past the hour of grace) and
    // one that expires in an hour.
    let (gone, alive) = (key("beat:gone"), key("beat:alive"));
    let hour = Duration::from_secs(3600);
    c.engines[0]
        .apply(
            gone.clone(),
            Mutation::Merge(expired("beat:gone", 3 * hour, 2 * hour)),
        )
        .await
        .unwrap();
    let mut living = expired("beat:alive", Duration::ZERO, Duration::ZERO);
    living.expires_at_ms = living.expires_at_ms.map(|at| at + 3_600_000);
    c.engines[0]
        .apply(alive.clone(), Mutation::Merge(living.clone()))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for engine in &c.engines[1..] {
        while engine.get(&alive).await.unwrap().as_ref() != Some(&living) {
            assert!(
                std::time::Instant::now() < deadline,
                "the unexpired value never spread with its expiry"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while c.engines[0].get(&gone).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "node-a never collected the expired value"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, engine) in c.engines.iter().enumerate() {
        let held = engine.get(&gone).await.unwrap();
        assert!(held.is_none(), "{} holds {held:?}", c.ids[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_what_no_message_carried() {
    let c = cluster_with(Duration::from_millis(100)).await;
    // A record that reached node-a's engine without being replicated (as after a dropped
    // message): only anti-entropy can carry it to the other replicas.
    c.engines[0]
        .apply(
            key("doc:unreplicated"),
            Mutation::Put(b"found by the trees".to_vec()),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for engine in &c.engines[1..] {
        loop {
            if let Some(record) = engine.get(&key("doc:unreplicated")).await.unwrap() {
                assert_eq!(
                    record.value,
                    Value::Register(Some(b"found by the trees".to_vec()))
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "anti-entropy never repaired a replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let metrics = c.nodes[0].as_ref().unwrap().metrics_text();
    assert!(
        metrics.contains("agentstore_node_anti_entropy_records_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_an_unreachable_peer_are_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        NodeId::new("node-a").unwrap(),
        NodeId::new("node-b").unwrap(),
    );
    let nobody: std::net::SocketAddr =
        format!("127.0.0.1:{}", agentstore_engine::testkit::free_port())
            .parse()
            .unwrap();
    let engine = LocalEngine::open(dir.path(), NodeClock::system(a.clone(), 500)).unwrap();
    let config = NodeConfig {
        security: admitted(&a),
        id: a,
        client_addr: None,
        seeds: BTreeMap::from([(b, nobody)]),
        replicas: 2,
        write_quorum: 1,
        read_quorum: 1,
        request_timeout: Duration::from_millis(200),
        anti_entropy_interval: NO_ANTI_ENTROPY,
        tombstone_grace: Duration::from_secs(3600),
        signatures: None,
    };
    let node = Node::start(
        config,
        engine,
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let written = node
        .write(key("doc:lonely"), Mutation::Put(b"x".to_vec()))
        .await
        .unwrap();
    assert!(
        matches!(written, Outcome::Written { .. }),
        "W=1 needs only this node"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dropped = |text: String| -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix("agentstore_node_messages_dropped_total{message=\"replicate\"} ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    while dropped(node.metrics_text()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            node.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_its_deadline_is_dropped_unanswered() {
    let c = cluster().await;
    // An admitted member's transport, sending a read whose deadline is long gone.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let x = NodeId::new("node-x").unwrap();
    let (transport, _inbox) = agentstore_cluster::Transport::start(
        x.clone(),
        admitted(&x),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        BTreeMap::from([(c.ids[1].clone(), c.addrs[1])]),
        stopped,
        Default::default(),
    );
    let late = agentstore_wire::Envelope {
        request: 7,
        deadline_ms: 1, // long gone
        message: agentstore_core::replication::Message::Read {
            request: 7,
            key: key("doc:late"),
        },
    };
    transport.send(&c.ids[1], late);
    let b = c.nodes[1].as_ref().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b
        .metrics_text()
        .lines()
        .any(|l| l == "agentstore_node_expired_requests_total 1")
    {
        assert!(std::time::Instant::now() < deadline, "{}", b.metrics_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_its_authority_never_admitted_cannot_join_or_read() {
    let c = cluster().await;
    let written = c.nodes[0]
        .as_ref()
        .unwrap()
        .write(key("doc:secret"), Mutation::Put(b"s".to_vec()))
        .await
        .unwrap();
    assert!(matches!(written, Outcome::Written { .. }));
    // A stranger with a key and an admission of its own authority, seeded with every member.
    let stranger_authority = agentstore_trust::SecretKey::generate();
    let id = NodeId::new("node-d").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = LocalEngine::open(dir.path(), NodeClock::system(id.clone(), 500)).unwrap();
    let mut config = config(&c.ids, &c.addrs, 0, NO_ANTI_ENTROPY);
    config.id = id.clone();
    config.seeds.insert(c.ids[0].clone(), c.addrs[0]);
    config.security = PeerSecurity::Tls(std::sync::Arc::new(
        PeerTrust::generate(&stranger_authority, "node-d").unwrap(),
    ));
    config.write_quorum = 1;
    config.read_quorum = 1;
    let stranger = Node::start(
        config,
        engine,
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in c.nodes.iter().flatten() {
        let members: Vec<String> = node
            .status()
            .await
            .unwrap()
            .members
            .iter()
            .map(|m| m.id.to_string())
            .collect();
        assert!(!members.contains(&"node-d".to_owned()), "{members:?}");
    }
    // Its read reaches no member: whatever it answers, it is not the member's record.
    let read = stranger.read(key("doc:secret")).await.unwrap();
    assert!(
        !matches!(&read, Outcome::Read { record: Some(_) }),
        "{read:?}"
    );
    stranger.shutdown().await;
}

/// Established TCP connections accepted on `ports` (Linux, from /proc/net/tcp).
fn accepted_on(ports: &[u16]) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            fields[3] == "01" && local_port.is_some_and(|p| ports.contains(&p))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pair_of_nodes_shares_one_connection() {
    let c = cluster().await;
    // Every node sends to both others, several times, at the same moment.
    let writes = c
        .nodes
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, node)| async move {
            for j in 0..5 {
                node.write(key(&format!("doc:{i}-{j}")), Mutation::Put(vec![1]))
                    .await
                    .unwrap();
            }
        });
    let mut writes: Vec<_> = writes.collect();
    let (w2, w1, w0) = (
        writes.pop().unwrap(),
        writes.pop().unwrap(),
        writes.pop().unwrap(),
    );
    tokio::join!(w0, w1, w2);
    let ports: Vec<u16> = c.addrs.iter().map(|a| a.port()).collect();
    // Simultaneous dials may open a second connection for a moment; the one dialled by the
    // smaller id is kept and the other is closed once drained.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let connections = accepted_on(&ports);
        if connections == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{connections} connections between 3 nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
