//! Strong writes on Redis: `WAIT` for replicas, and a typed error when they do not answer.

use agentstore_core::NodeId;
use agentstore_engine::testkit::RedisServer;
use agentstore_engine::{
    Engine, EngineError, Key, Mutation, NodeClock, RedisEngine, RedisOptions, WaitPolicy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_writes_wait_for_replicas_and_report_a_shortfall() {
    let primary = RedisServer::start(&[]);
    let mut first = RedisServer::replica_of(&primary);
    let second = RedisServer::replica_of(&primary);
    primary.wait_until(
        |info| info.matches("state=online").count() == 2,
        "both replicas are online",
    );

    let clock = NodeClock::system(NodeId::new("wait-test").unwrap(), 500);
    let options = RedisOptions {
        // Replicas answer WAIT at once; the margin is for a loaded machine, where a replica
        // can take longer than half a second to be scheduled.
        wait: Some(WaitPolicy {
            replicas: 2,
            timeout_ms: 2000,
        }),
        ..RedisOptions::new(primary.url())
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = agentstore_engine::EngineMetrics::register(&mut registry);
    let engine = RedisEngine::connect(options, clock).await.unwrap();
    let engine = agentstore_engine::Instrumented::new(engine, "redis", metrics);
    let key: Key = "identity:alice".parse().unwrap();
    engine
        .apply(key.clone(), Mutation::Put(b"v1".to_vec()))
        .await
        .expect("both replicas acknowledge");

    first.stop();
    primary.wait_until(
        |info| info.matches("state=online").count() == 1,
        "one replica is gone",
    );
    match engine
        .apply(key.clone(), Mutation::Put(b"v2".to_vec()))
        .await
    {
        Err(EngineError::ReplicationShortfall {
            acknowledged,
            required,
            timeout_ms,
        }) => {
            assert_eq!((acknowledged, required, timeout_ms), (1, 2, 2000));
        }
        other => panic!("expected a replication shortfall, got {other:?}"),
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.lines()
            .any(|l| l == r#"agentstore_engine_wait_shortfalls_total{backend="redis"} 1"#),
        "{text}"
    );
    // Indeterminate, not failed: the write is on the primary and on the remaining replica.
    let stored = engine.get(&key).await.unwrap().unwrap();
    assert_eq!(
        stored.value,
        agentstore_core::Value::Register(Some(b"v2".to_vec()))
    );
    drop(second);
}
