//! A Raft group of three members in one process, talking through an in-memory RPC that can
//! cut members off: elections, forwarding, linearizable reads, atomic batches, compare-and-set,
//! fencing, leader loss, restart from files, snapshots and learners.

use std::sync::Arc;
use std::time::Duration;

use agentstore_consensus::{Group, GroupConfig, GroupError, ReadLevel};
use agentstore_core::record::{Expect, Mutation, Value};
use agentstore_engine::{EngineError, Fence, Write};

mod common;

/// Adds 1 to the counter `bank:total` through `group`.
async fn increment(group: Group) -> Result<Vec<agentstore_core::Record>, GroupError> {
    group
        .write(vec![Write::new(
            key("bank:total"),
            Mutation::PnCounterAdd(1),
        )])
        .await
}

use common::{Cluster, MemRpc, id, key, put, value};

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
    let add = |name: &str| increment(cluster.group(name));
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
    let restarted = cluster.start(&leader).await;
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
    // Asked of a follower: forwarded to the leader.
    let follower = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();
    cluster
        .group(follower)
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

    // Promoted, then one original voter removed: four members, then three again.
    let all: std::collections::BTreeSet<_> = ["a", "b", "c", "d"].into_iter().map(id).collect();
    cluster
        .group(follower)
        .change_voters(all, true)
        .await
        .unwrap();
    assert_eq!(learner.status().voters.len(), 4);
    let removed = ["a", "b", "c"]
        .into_iter()
        .find(|n| *n != leader && *n != follower)
        .unwrap();
    let remaining: std::collections::BTreeSet<_> = ["a", "b", "c", "d"]
        .into_iter()
        .filter(|n| *n != removed)
        .map(id)
        .collect();
    cluster
        .group(&leader)
        .change_voters(remaining, true)
        .await
        .unwrap();
    for _ in 0..100 {
        if learner.status().voters.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!learner.status().voters.contains(&removed.to_string()));
    cluster.stop(removed).await;
    cluster
        .group(follower)
        .write(vec![put("log:after-removal", "z")])
        .await
        .unwrap();

    // Cut the leader off: alone it cannot commit, and says so (typed, never a success).
    let mut everyone = cluster.ids();
    everyone.push(id("d"));
    cluster.board.isolate(&id(&leader), &everyone);
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
    cluster.board.heal();
    let leader = cluster.leader().await;
    cluster
        .group(&leader)
        .write(vec![put("log:after", "y")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_steps_go_through_the_log_and_survive_a_snapshot() {
    let cluster = Cluster::new(&["a", "b", "c"], 30).await;
    let leader = cluster.leader().await;
    let follower = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();
    let group = cluster.group(follower);

    group
        .prepare("t1", vec![put("tx:a", "1"), put("tx:b", "2")])
        .await
        .unwrap();
    // Prepared keys refuse other writes on every member, through the log.
    let refused = cluster.group(&leader).write(vec![put("tx:a", "x")]).await;
    assert!(
        matches!(
            refused,
            Err(GroupError::Refused(EngineError::InTransaction { ref txn, .. })) if txn == "t1"
        ),
        "{refused:?}"
    );
    let read = group
        .read(&key("tx:a"), ReadLevel::Linearizable)
        .await
        .unwrap();
    assert_eq!(read, None, "reads see the state before the transaction");

    // Enough entries for a snapshot that compacts the prepare away: a member restarted
    // after it must learn the lock from the snapshot.
    let lagging = ["a", "b", "c"]
        .into_iter()
        .find(|n| *n != leader && *n != follower)
        .unwrap();
    cluster.stop(lagging).await;
    for i in 0..80 {
        group
            .write(vec![put(&format!("fill:{i:03}"), "x")])
            .await
            .unwrap();
    }
    assert!(cluster.group(&leader).status().snapshot.is_some());
    cluster.start(lagging).await;
    cluster.leader().await;
    for _ in 0..100 {
        if cluster.group(lagging).status().applied >= cluster.group(&leader).status().applied {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The restarted member alone with one other: whoever leads now has the lock.
    cluster.stop(&leader).await;
    let now = cluster.leader().await;
    let refused = cluster.group(&now).write(vec![put("tx:b", "x")]).await;
    assert!(
        matches!(
            refused,
            Err(GroupError::Refused(EngineError::InTransaction { .. }))
        ),
        "{refused:?}"
    );

    let records = cluster.group(&now).resolve("t1", true).await.unwrap();
    assert_eq!(records.len(), 2);
    assert!(
        cluster
            .group(&now)
            .resolve("t1", true)
            .await
            .unwrap()
            .is_empty()
    );
    let read = cluster
        .group(lagging)
        .read(&key("tx:b"), ReadLevel::Linearizable)
        .await
        .unwrap();
    assert_eq!(value(&read).as_deref(), Some("2"));

    // A prepare whose condition fails is refused and locks nothing; an abort unlocks.
    let stale = Write::expecting(key("tx:a"), Mutation::Put(b"3".to_vec()), Expect::Absent);
    assert!(matches!(
        cluster.group(&now).prepare("t2", vec![stale]).await,
        Err(GroupError::Refused(EngineError::ExpectationFailed { .. }))
    ));
    cluster
        .group(&now)
        .prepare("t3", vec![put("tx:c", "1")])
        .await
        .unwrap();
    cluster.group(&now).resolve("t3", false).await.unwrap();
    cluster
        .group(&now)
        .write(vec![put("tx:a", "4"), put("tx:c", "5")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_while_the_leader_is_paused_go_to_the_next_leader_and_apply_once() {
    let cluster = Cluster::new(&["a", "b", "c"], 10_000).await;
    let leader = cluster.leader().await;
    let add = |name: &str| increment(cluster.group(name));
    let total = |name: &str| {
        let group = cluster.group(name);
        async move {
            match group
                .read(&key("bank:total"), ReadLevel::Linearizable)
                .await
                .unwrap()
                .map(|r| r.value)
            {
                Some(Value::PnCounter(counter)) => counter.value(),
                other => panic!("not a counter: {other:?}"),
            }
        }
    };
    add(&leader).await.unwrap();
    let followers: Vec<String> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != leader)
        .map(str::to_owned)
        .collect();
    // The leader stops answering (a paused process: what is sent to it waits in its socket
    // and arrives when it resumes). Writes through both followers are answered, not
    // indeterminate: they go to the leader elected meanwhile.
    cluster.board.pause(&id(&leader));
    let (first, second) = tokio::join!(add(&followers[0]), add(&followers[1]));
    first.unwrap();
    second.unwrap();
    // The old leader resumes and reads the proposals it was sent while paused: they apply
    // nothing more.
    cluster.board.resume(&id(&leader));
    cluster.leader().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in ["a", "b", "c"] {
        assert_eq!(total(name).await, 3, "read through {name}");
    }
}
