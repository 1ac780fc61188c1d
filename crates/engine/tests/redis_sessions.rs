//! Session reads on Redis: a replica serves a session only once it has reached the session's
//! replication offset; otherwise the primary does, so a session always reads its own writes.

use std::time::{Duration, Instant};

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::session::{self, SessionToken};
use agentstore_engine::testkit::RedisServer;
use agentstore_engine::{Engine, Key, Mutation, NodeClock, RedisEngine, RedisOptions};

async fn value(engine: &RedisEngine, key: &Key) -> Option<Vec<u8>> {
    match engine.get(key).await.unwrap()?.value {
        Value::Register(bytes) => bytes,
        other => panic!("a register was written, found {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_a_replica_only_once_it_has_caught_up() {
    let primary = RedisServer::start(&[]);
    let replica = RedisServer::replica_of(&primary);
    primary.wait_until(
        |info| info.contains("state=online"),
        "the replica is online",
    );
    let clock = NodeClock::system(NodeId::new("session-test").unwrap(), 500);
    let options = RedisOptions {
        read_replicas: vec![replica.url()],
        ..RedisOptions::new(primary.url())
    };
    let engine = RedisEngine::connect(options, clock).await.unwrap();
    let key: Key = "tasks:a".parse().unwrap();

    // A write in a session carries the primary's offset; reading right after sees it.
    let ((), token) = session::run(SessionToken::new(), async {
        engine
            .apply(key.clone(), Mutation::Put(b"v1".to_vec()))
            .await
            .unwrap();
        assert_eq!(value(&engine, &key).await.as_deref(), Some(&b"v1"[..]));
    })
    .await;
    assert!(token.redis_offset > 0, "the write's offset is in the token");

    // Once the replica reports the offset, it serves the session, with the same answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.session_reads().0 == 0 {
        assert!(
            Instant::now() < deadline,
            "the replica never served the session"
        );
        let (read, _) = session::run(token.clone(), value(&engine, &key)).await;
        assert_eq!(read.as_deref(), Some(&b"v1"[..]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The replica stops applying (paused); the session's next write is beyond what it last
    // reported, so the session reads the primary and sees its write.
    replica.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (replica_before, primary_before) = engine.session_reads();
    let ((), _) = session::run(token, async {
        engine
            .apply(key.clone(), Mutation::Put(b"v2".to_vec()))
            .await
            .unwrap();
        for _ in 0..20 {
            assert_eq!(value(&engine, &key).await.as_deref(), Some(&b"v2"[..]));
        }
    })
    .await;
    let (replica_after, primary_after) = engine.session_reads();
    assert_eq!(
        replica_after, replica_before,
        "the lagging replica served nothing"
    );
    assert_eq!(primary_after - primary_before, 20);
    replica.signal("-CONT");
}
