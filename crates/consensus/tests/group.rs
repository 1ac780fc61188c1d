//! A Raft group of three members in one process, talking through an in-memory RPC that can
//! cut members off: elections, forwarding, linearizable reads, atomic batches, compare-and-set,
//! fencing, leader loss, restart from files, snapshots and learners.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentstore_consensus::{
    Group, GroupConfig, GroupError, MemberId, ReadLevel, Rpc, RpcError, RpcFuture,
};
use agentstore_core::record::{Expect, Mutation, Value};
use agentstore_core::{Key, Record};
use agentstore_engine::{EngineError, Fence, Write};

/// Members by id; a member missing from the map (or cut) is unreachable.
#[derive(Debug, Default)]
struct Switchboard {
    members: Mutex<BTreeMap<MemberId, Group>>,
    cut: Mutex<BTreeSet<MemberId>>,
}

#[derive(Debug)]
struct MemRpc {
    from: MemberId,
    board: Arc<Switchboard>,
}

impl Rpc for MemRpc {
    fn call(&self, to: &MemberId, _addr: &str, request: Vec<u8>, timeout: Duration) -> RpcFuture {
        let board = Arc::clone(&self.board);
        let (from, to) = (self.from.clone(), to.clone());
        Box::pin(async move {
            let reachable = {
                let cut = board.cut.lock().unwrap();
                !cut.contains(&from) && !cut.contains(&to)
            };
            let target = board.members.lock().unwrap().get(&to).cloned();
            match target {
                Some(group) if reachable => Ok(group.serve(&request).await),
                _ => {
                    tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
                    Err(RpcError::Unreachable(to.0))
                }
            }
        })
    }
}

struct Cluster {
    board: Arc<Switchboard>,
    dirs: BTreeMap<MemberId, tempfile::TempDir>,
    voters: BTreeMap<MemberId, String>,
}

fn id(s: &str) -> MemberId {
    MemberId::from(s)
}

fn key(s: &str) -> Key {
    Key::new(s.as_bytes()).unwrap()
}

fn put(k: &str, v: &str) -> Write {
    Write::new(key(k), Mutation::Put(v.as_bytes().to_vec()))
}

fn value(record: &Option<Record>) -> Option<String> {
    match record.as_ref().map(|r| &r.value) {
        Some(Value::Register(Some(bytes))) => Some(String::from_utf8(bytes.to_vec()).unwrap()),
        _ => None,
    }
}

impl Cluster {
    async fn new(names: &[&str], snapshot_every: u64) -> Self {
        let voters: BTreeMap<MemberId, String> =
            names.iter().map(|n| (id(n), format!("mem:{n}"))).collect();
        let mut cluster = Cluster {
            board: Arc::default(),
            dirs: BTreeMap::new(),
            voters,
        };
        for name in names {
            cluster.dirs.insert(id(name), tempfile::tempdir().unwrap());
            cluster.start(name, snapshot_every).await;
        }
        cluster
    }

    async fn start(&self, name: &str, snapshot_every: u64) -> Group {
        let member = id(name);
        let mut config = GroupConfig::new(
            member.clone(),
            format!("mem:{name}"),
            self.dirs[&member].path().to_owned(),
            self.voters.clone(),
        );
        config.snapshot_every = snapshot_every;
        config.kept_behind_snapshot = 0;
        config.request_timeout = Duration::from_secs(5);
        let rpc = Arc::new(MemRpc {
            from: member.clone(),
            board: Arc::clone(&self.board),
        });
        let group = Group::start(config, rpc).await.unwrap();
        self.board
            .members
            .lock()
            .unwrap()
            .insert(member, group.clone());
        group
    }

    fn group(&self, name: &str) -> Group {
        self.board.members.lock().unwrap()[&id(name)].clone()
    }

    async fn stop(&self, name: &str) {
        let group = self.board.members.lock().unwrap().remove(&id(name));
        if let Some(group) = group {
            group.shutdown().await;
        }
    }

    /// Waits until some member leads and every running voter knows it; returns its name.
    async fn leader(&self) -> String {
        for _ in 0..200 {
            let groups: Vec<Group> = self
                .board
                .members
                .lock()
                .unwrap()
                .values()
                .cloned()
                .collect();
            let statuses: Vec<_> = groups.iter().map(Group::status).collect();
            if let Some(leader) = statuses.iter().find(|s| s.state == "leader")
                && statuses
                    .iter()
                    .all(|s| s.leader.as_deref() == Some(leader.id.as_str()))
            {
                return leader.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected in 10 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_any_member_is_read_linearizably_everywhere() {
    let cluster = Cluster::new(&["a", "b", "c"], 10_000).await;
    let leader = cluster.leader().await;
    let follower = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();

    // Written through a follower: forwarded to the leader.
    let records = cluster
        .group(follower)
        .write(vec![put("agent:1", "ada"), put("agent:2", "bob")])
        .await
        .unwrap();
    assert_eq!(records.len(), 2);
    for name in ["a", "b", "c"] {
        let got = cluster
            .group(name)
            .read(&key("agent:1"), ReadLevel::Linearizable)
            .await
            .unwrap();
        assert_eq!(
            value(&got).as_deref(),
            Some("ada"),
            "linearizable read on {name}"
        );
    }
    // Every replica computed the same record, stamp and version included.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stale: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let group = cluster.group(n);
            async move { group.read(&key("agent:2"), ReadLevel::Stale).await.unwrap() }
        })
        .collect();
    let mut replicas = Vec::new();
    for read in stale {
        replicas.push(read.await);
    }
    assert!(replicas.iter().all(|r| r == &replicas[0] && r.is_some()));
    let scanned = cluster
        .group(follower)
        .scan(b"agent:", None, 10, ReadLevel::Linearizable)
        .await
        .unwrap();
    assert_eq!(scanned.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_atomic_and_conditions_and_fences_are_checked_in_the_log() {
    let cluster = Cluster::new(&["a", "b", "c"], 10_000).await;
    cluster.leader().await;
    let group = cluster.group("b");
    let first = group
        .write(vec![Write::expecting(
            key("id:k"),
            Mutation::Put(b"v1".to_vec()),
            Expect::Absent,
        )])
        .await
        .unwrap();
    // A second "create if absent" fails, and the batch it is in writes nothing.
    let refused = group
        .write(vec![
            put("id:other", "x"),
            Write::expecting(key("id:k"), Mutation::Put(b"v2".to_vec()), Expect::Absent),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            GroupError::Refused(EngineError::ExpectationFailed { .. })
        ),
        "{refused:?}"
    );
    assert_eq!(
        group
            .read(&key("id:other"), ReadLevel::Linearizable)
            .await
            .unwrap(),
        None
    );
    // Compare-and-set on the version read.
    let version = first[0].version.clone();
    group
        .write(vec![Write::expecting(
            key("id:k"),
            Mutation::Put(b"v3".to_vec()),
            Expect::Version(version.clone()),
        )])
        .await
        .unwrap();
    let stale_cas = group
        .write(vec![Write::expecting(
            key("id:k"),
            Mutation::Put(b"v4".to_vec()),
            Expect::Version(version),
        )])
        .await;
    assert!(stale_cas.is_err());
    // Fencing: token 5 seen, then token 4 is refused.
    let fence = |token| Fence {
        lock: "job".into(),
        token,
    };
    group
        .write(vec![put("id:f", "by5").fenced(fence(5))])
        .await
        .unwrap();
    let fenced = group
        .write(vec![put("id:f", "by4").fenced(fence(4))])
        .await
        .unwrap_err();
    assert!(matches!(
        fenced,
        GroupError::Refused(EngineError::Fenced {
            token: 4,
            highest: 5,
            ..
        })
    ));
    let got = group
        .read(&key("id:f"), ReadLevel::Linearizable)
        .await
        .unwrap();
    assert_eq!(value(&got).as_deref(), Some("by5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_are_exact_across_a_leader_loss_and_a_restart() {
    let cluster = Cluster::new(&["a", "b", "c"], 10_000).await;
    let leader = cluster.leader().await;
    let add = |name: &str| {
        let group = cluster.group(name);
        async move {
            group
                .write(vec![Write::new(
                    key("bank:total"),
                    Mutation::PnCounterAdd(1),
                )])
                .await
        }
    };
    let mut acknowledged = 0i64;
    for name in ["a", "b", "c", "a", "b", "c"] {
        add(name).await.unwrap();
        acknowledged += 1;
    }
    // The leader goes away: the others elect a new one and keep counting.
    cluster.stop(&leader).await;
    let survivors: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    for name in survivors.iter().chain(survivors.iter()) {
        add(name).await.unwrap();
        acknowledged += 1;
    }
    // The old leader restarts from its files and catches up.
    let restarted = cluster.start(&leader, 10_000).await;
    cluster.leader().await;
    let total = restarted
        .read(&key("bank:total"), ReadLevel::Linearizable)
        .await
        .unwrap();
    match total.map(|r| r.value) {
        Some(Value::PnCounter(counter)) => assert_eq!(counter.value(), acknowledged),
        other => panic!("not a counter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_refuses_and_a_learner_catches_up_from_a_snapshot() {
    let cluster = Cluster::new(&["a", "b", "c"], 20).await;
    let leader = cluster.leader().await;
    for i in 0..60 {
        cluster
            .group(&leader)
            .write(vec![put(&format!("log:{i:03}"), "x")])
            .await
            .unwrap();
    }
    let status = cluster.group(&leader).status();
    assert!(
        status.snapshot.is_some(),
        "a snapshot was taken: {status:?}"
    );

    // A learner joins after compaction: it can only catch up through the snapshot.
    let mut voters = cluster.voters.clone();
    voters.insert(id("d"), "mem:d".into());
    let dir = tempfile::tempdir().unwrap();
    let config = GroupConfig::new(id("d"), "mem:d".into(), dir.path().to_owned(), voters);
    let rpc = Arc::new(MemRpc {
        from: id("d"),
        board: Arc::clone(&cluster.board),
    });
    let learner = Group::start(config, rpc).await.unwrap();
    cluster
        .board
        .members
        .lock()
        .unwrap()
        .insert(id("d"), learner.clone());
    cluster
        .group(&leader)
        .add_learner(id("d"), "mem:d".into())
        .await
        .unwrap();
    let mut copied = Vec::new();
    for _ in 0..100 {
        copied = learner
            .scan(b"log:", None, 100, ReadLevel::Stale)
            .await
            .unwrap();
        if copied.len() == 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(copied.len(), 60, "the learner has every record");
    assert!(
        cluster.group(&leader).status().snapshot.is_some() && learner.status().snapshot.is_some(),
        "the learner caught up by installing a snapshot"
    );
    assert_eq!(learner.status().learners, vec!["d".to_string()]);

    // Cut the leader off: alone it cannot commit, and says so (typed, never a success).
    cluster.board.cut.lock().unwrap().insert(id(&leader));
    let refused = cluster
        .group(&leader)
        .write(vec![put("log:minority", "x")])
        .await;
    assert!(
        matches!(
            refused,
            Err(GroupError::Indeterminate { .. } | GroupError::NoLeader { .. })
        ),
        "{refused:?}"
    );
    // Healed, the group has one leader again and serves.
    cluster.board.cut.lock().unwrap().clear();
    let leader = cluster.leader().await;
    cluster
        .group(&leader)
        .write(vec![put("log:after", "y")])
        .await
        .unwrap();
}
