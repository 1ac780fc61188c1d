//! One `Storage` with collections on the local engine, Redis and PostgreSQL: the example
//! configuration that reproduces the spec's data-category tables, on real servers.

use agentstore_engine::testkit::RedisServer;
use agentstore_engine::testkit::postgres_url;
use p2p_ai_agents::storage::{self, ConsistencyLevel, Storage, StorageError};

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}x{nanos}", std::process::id())
}

async fn postgres_has(key: &str) -> bool {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM agentstore_records WHERE key = $1 AND record IS NOT NULL",
            &[&key.as_bytes()],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) == 1
}

fn redis_has(server: &RedisServer, key: &str) -> bool {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &server.port.to_string(),
            "EXISTS",
            &format!("agentstore:r:{key}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_routes_each_collection_to_its_backend() {
    let primary = RedisServer::start(&[]);
    let _replicas = [
        RedisServer::replica_of(&primary),
        RedisServer::replica_of(&primary),
    ];
    primary.wait_until(
        |info| info.matches("state=online").count() == 2,
        "both replicas are online",
    );
    let dir = tempfile::tempdir().unwrap();

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/agentstore.yaml"
    );
    let mut config = storage::load_config(path).unwrap();
    config.data_dir = Some(dir.path().display().to_string());
    config.redis.as_mut().unwrap().url = primary.url();
    config.supabase.as_mut().unwrap().url = postgres_url();
    // `keys` is encrypted in the example; its key comes from the environment in production.
    let storage = Storage::with_encryption_key(config, &[9; 32])
        .await
        .unwrap();
    let id = unique();

    // The spec's code example, with its keys made unique to this run.
    let identity = format!("agent:identity:{id}");
    let metric = format!("metrics:cpu:{id}");
    let task = format!("task:{id}");
    let receipt = storage
        .set_with_consistency(
            &identity,
            serde_json::json!({"name": "ada"}),
            ConsistencyLevel::Strong,
        )
        .await
        .unwrap();
    assert_eq!(receipt.delivered, ConsistencyLevel::Strong);
    let receipt = storage
        .set_with_consistency(&metric, 0.42, ConsistencyLevel::Eventual)
        .await
        .unwrap();
    assert_eq!(
        (receipt.level, receipt.delivered),
        (ConsistencyLevel::Eventual, ConsistencyLevel::Eventual)
    );
    let receipt = storage
        .set_with_consistency(
            &task,
            serde_json::json!({"depends_on": [455]}),
            ConsistencyLevel::Causal,
        )
        .await
        .unwrap();
    assert_eq!(receipt.level, ConsistencyLevel::Causal);
    assert_eq!(
        receipt.delivered,
        ConsistencyLevel::Strong,
        "task waits for both replicas"
    );

    // Each value is where the configuration says.
    assert!(postgres_has(&identity).await, "agent is on supabase");
    assert!(redis_has(&primary, &metric), "metrics are on redis");
    assert!(redis_has(&primary, &task), "task is on redis");
    let secret = format!("keys:{id}");
    storage.set(&secret, "ed25519:private").await.unwrap();
    assert!(
        !redis_has(&primary, &secret) && !postgres_has(&secret).await,
        "keys stay local"
    );
    assert!(dir.path().join("agentstore.redb").exists());

    // Reads come back from the same places.
    assert_eq!(
        storage
            .get::<serde_json::Value>(&identity)
            .await
            .unwrap()
            .unwrap()["name"],
        "ada"
    );
    assert_eq!(storage.get::<f64>(&metric).await.unwrap(), Some(0.42));
    assert_eq!(
        storage.get::<String>(&secret).await.unwrap().as_deref(),
        Some("ed25519:private")
    );

    // CRDT collections on Redis: exact under concurrency.
    let reputation = format!("reputation:{id}");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (storage, reputation) = (storage.clone(), reputation.clone());
        tasks.spawn(async move {
            for _ in 0..10 {
                storage.counter_add(&reputation, 2).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(storage.counter(&reputation).await.unwrap(), 160);
    let peers = format!("peers:{id}");
    storage.set_add(&peers, "p1").await.unwrap();
    storage.set_add(&peers, "p2").await.unwrap();
    storage.set_remove(&peers, "p1").await.unwrap();
    assert_eq!(storage.set_members::<String>(&peers).await.unwrap(), ["p2"]);

    // A scan lists the collection from its backend.
    let listed = storage.scan(&format!("task:{id}"), None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);

    // A transaction inside one engine is one PostgreSQL transaction.
    let (owner, deputy) = (format!("agent:owner:{id}"), format!("agent:deputy:{id}"));
    let mut pair = storage.transaction();
    pair.compare_and_set(&owner, "ada", None)
        .compare_and_set(&deputy, "bob", None);
    pair.commit().await.unwrap();
    assert!(postgres_has(&owner).await && postgres_has(&deputy).await);

    // Across PostgreSQL and the embedded engine: two-phase commit, all or nothing.
    let (card, key) = (format!("agent:card:{id}"), format!("keys:card:{id}"));
    let mut both = storage.transaction();
    both.set(&card, "public").set(&key, "private");
    let receipts = both.commit().await.unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(postgres_has(&card).await);
    assert_eq!(
        storage.get::<String>(&key).await.unwrap().as_deref(),
        Some("private")
    );
    // One failed condition (on the local side) writes nothing on either side.
    let (card2, key2) = (format!("agent:card2:{id}"), format!("keys:card2:{id}"));
    let mut doomed = storage.transaction();
    doomed
        .set(&card2, "public")
        .compare_and_set(&key, "replaced", None);
    let err = doomed.commit().await.unwrap_err();
    assert!(matches!(err, StorageError::VersionMismatch { .. }), "{err}");
    assert!(
        !postgres_has(&card2).await,
        "nothing written on PostgreSQL: {err}"
    );
    // ... and locks nothing: both sides take writes again.
    storage.set(&card2, "free").await.unwrap();
    storage.set(&key2, "free").await.unwrap();
    storage.set(&key, "free").await.unwrap();
    // Redis cannot take part in a two-phase commit: refused, nothing written.
    let mut with_redis = storage.transaction();
    with_redis
        .set(&format!("agent:r:{id}"), 1)
        .counter_add(&reputation, 1);
    let err = with_redis.commit().await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Engine(agentstore_engine::EngineError::Unsupported { .. })
        ),
        "{err}"
    );
    assert!(!postgres_has(&format!("agent:r:{id}")).await);
    assert_eq!(storage.counter(&reputation).await.unwrap(), 160);
}

#[tokio::test]
async fn a_level_the_backend_cannot_deliver_is_refused_with_the_fix() {
    let text = "storage:\n  redis:\n    url: redis://127.0.0.1:6379\n  collections:\n    workflow:\n      backend: redis\n      consistency: strong\n    cache:\n      backend: redis\n";
    let config = storage::Config::from_yaml(text, "test.yaml").unwrap();
    let storage = Storage::new(config).await.unwrap();
    let err = storage
        .set(&format!("workflow:{}", unique()), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::LevelUnavailable {
                delivered: ConsistencyLevel::Eventual,
                requested: ConsistencyLevel::Strong,
                ..
            }
        ),
        "{err:?}"
    );
    // An eventual collection on the same Redis works, and cannot be asked for more.
    storage
        .set(&format!("cache:{}", unique()), 1)
        .await
        .unwrap();
    let stronger = storage
        .set_with_consistency(&format!("cache:{}", unique()), 1, ConsistencyLevel::Strong)
        .await;
    assert!(matches!(
        stronger,
        Err(StorageError::LevelUnavailable { .. })
    ));
}

#[tokio::test]
async fn a_causal_redis_collection_is_served_in_sessions_by_its_primary() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "storage:\n  data_dir: {}\n  redis:\n    url: redis://127.0.0.1:6379\n  collections:\n    workflow:\n      backend: redis\n      consistency: causal\n",
        dir.path().display()
    );
    let config = storage::Config::from_yaml(&text, "test.yaml").unwrap();
    let storage = Storage::new(config).await.unwrap();
    assert_eq!(
        storage.plan("workflow").guarantee.level,
        ConsistencyLevel::Causal
    );
    let key = format!("workflow:{}", unique());
    let session = storage::Session::new();
    session.run(storage.set(&key, "step 1")).await.unwrap();
    let read: Option<String> = session.run(storage.get(&key)).await.unwrap();
    assert_eq!(read.as_deref(), Some("step 1"));
}
