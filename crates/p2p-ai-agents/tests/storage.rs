//! The facade end to end on the embedded engine.

use p2p_ai_agents::storage::{
    CollectionConfig, Config, ConflictStrategy, ConsistencyLevel, Storage, StorageError,
};

struct Fixture {
    storage: Storage,
    _dir: tempfile::TempDir,
}

async fn open(collections: &[(&str, ConflictStrategy, Option<ConsistencyLevel>)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: Some(dir.path().display().to_string()),
        ..Config::default()
    };
    for (name, conflict, consistency) in collections {
        config.collections.insert(
            name.to_string(),
            CollectionConfig {
                backend: None,
                consistency: *consistency,
                conflict: Some(*conflict),
                ..Default::default()
            },
        );
    }
    Fixture {
        storage: Storage::new(config).await.unwrap(),
        _dir: dir,
    }
}

#[tokio::test]
async fn typed_values_round_trip_and_deletes_remove_them() {
    let f = open(&[]).await;
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Identity {
        name: String,
        keys: Vec<u8>,
    }
    let identity = Identity {
        name: "ada ✓".into(),
        keys: vec![0, 255],
    };
    f.storage.set("agent:identity:1", &identity).await.unwrap();
    assert_eq!(
        f.storage.get::<Identity>("agent:identity:1").await.unwrap(),
        Some(identity)
    );
    assert_eq!(
        f.storage.get::<Identity>("agent:identity:2").await.unwrap(),
        None
    );
    f.storage.delete("agent:identity:1").await.unwrap();
    assert_eq!(
        f.storage.get::<Identity>("agent:identity:1").await.unwrap(),
        None
    );
    let wrong_type = f
        .storage
        .set("n:1", "text")
        .await
        .and(f.storage.get::<u32>("n:1").await);
    assert!(
        matches!(wrong_type, Err(StorageError::Deserialize { .. })),
        "{wrong_type:?}"
    );
}

#[tokio::test]
async fn the_effective_level_is_the_stronger_of_call_and_collection() {
    let f = open(&[(
        "agent",
        ConflictStrategy::Register,
        Some(ConsistencyLevel::Strong),
    )])
    .await;
    let receipt = f
        .storage
        .set_with_consistency("agent:x", 1, ConsistencyLevel::Eventual)
        .await
        .unwrap();
    assert_eq!(
        receipt.level,
        ConsistencyLevel::Strong,
        "a call cannot go below its collection"
    );
    let receipt = f
        .storage
        .set_with_consistency("metrics:x", 1, ConsistencyLevel::Causal)
        .await
        .unwrap();
    assert_eq!(
        receipt.level,
        ConsistencyLevel::Causal,
        "a call can ask for more"
    );
    let receipt = f.storage.set("metrics:y", 1).await.unwrap();
    assert_eq!(receipt.level, ConsistencyLevel::Eventual);
    assert_eq!(
        receipt.delivered,
        ConsistencyLevel::Strong,
        "one embedded node is linearizable"
    );
}

#[tokio::test]
async fn invalid_keys_are_typed_errors() {
    let f = open(&[]).await;
    assert!(matches!(
        f.storage.set("", 1).await,
        Err(StorageError::Key { .. })
    ));
    assert!(matches!(
        f.storage.get::<u8>("bad name:1").await,
        Err(StorageError::Key { .. })
    ));
}

#[tokio::test]
async fn counters_are_exact_under_concurrent_increments() {
    let f = open(&[
        ("hits", ConflictStrategy::PnCounter, None),
        ("grow", ConflictStrategy::GCounter, None),
    ])
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let storage = f.storage.clone();
        tasks.spawn(async move {
            for _ in 0..20 {
                storage.counter_add("hits:page", 3).await.unwrap();
                storage.counter_add("hits:page", -1).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(f.storage.counter("hits:page").await.unwrap(), 16 * 20 * 2);
    assert_eq!(f.storage.get::<i64>("hits:page").await.unwrap(), Some(640));
    assert_eq!(f.storage.counter("hits:never").await.unwrap(), 0);
    assert_eq!(f.storage.counter_add("grow:x", 5).await.unwrap(), 5);
    let err = f.storage.counter_add("grow:x", -1).await.unwrap_err();
    assert!(err.to_string().contains("pn_counter"), "{err}");
}

#[tokio::test]
async fn operations_that_do_not_fit_the_strategy_name_the_config_to_change() {
    let f = open(&[("hits", ConflictStrategy::PnCounter, None)]).await;
    let err = f.storage.counter_add("metrics:x", 1).await.unwrap_err();
    assert!(
        matches!(err, StorageError::WrongOperation { ref collection, .. } if collection == "metrics")
    );
    assert!(
        err.to_string()
            .contains("storage.collections.metrics.conflict: pn_counter"),
        "{err}"
    );
    assert!(matches!(
        f.storage.set("hits:x", 1).await,
        Err(StorageError::WrongOperation { .. })
    ));
    assert!(matches!(
        f.storage.delete("hits:x").await,
        Err(StorageError::WrongOperation { .. })
    ));
}

#[tokio::test]
async fn sets_add_remove_and_list() {
    let f = open(&[
        ("peers", ConflictStrategy::OrSet, None),
        ("seen", ConflictStrategy::GSet, None),
    ])
    .await;
    for peer in ["p3", "p1", "p2"] {
        f.storage.set_add("peers:online", peer).await.unwrap();
    }
    f.storage.set_remove("peers:online", "p2").await.unwrap();
    assert_eq!(
        f.storage
            .set_members::<String>("peers:online")
            .await
            .unwrap(),
        ["p1", "p3"]
    );
    f.storage.delete("peers:online").await.unwrap();
    assert!(
        f.storage
            .set_members::<String>("peers:online")
            .await
            .unwrap()
            .is_empty()
    );
    f.storage.set_add("seen:ids", 7).await.unwrap();
    f.storage.set_add("seen:ids", 7).await.unwrap();
    assert_eq!(f.storage.set_members::<u32>("seen:ids").await.unwrap(), [7]);
    assert!(matches!(
        f.storage.set_remove("seen:ids", 7).await,
        Err(StorageError::WrongOperation { .. })
    ));
}

#[tokio::test]
async fn multi_value_reads_return_siblings_and_a_context_write_resolves_them() {
    let f = open(&[("docs", ConflictStrategy::MultiValue, None)]).await;
    f.storage.set("docs:plan", "draft by a").await.unwrap();
    f.storage.set("docs:plan", "draft by b").await.unwrap();
    assert!(matches!(
        f.storage.get::<String>("docs:plan").await,
        Err(StorageError::Siblings { count: 2, .. })
    ));
    let siblings = f.storage.get_siblings::<String>("docs:plan").await.unwrap();
    let mut values = siblings.values.clone();
    values.sort();
    assert_eq!(values, ["draft by a", "draft by b"]);
    for round in 0..5 {
        let current = f.storage.get_siblings::<String>("docs:plan").await.unwrap();
        f.storage
            .set_with_context("docs:plan", format!("merged {round}"), &current.context)
            .await
            .unwrap();
        assert_eq!(
            f.storage.get::<String>("docs:plan").await.unwrap(),
            Some(format!("merged {round}"))
        );
    }
    f.storage.delete("docs:plan").await.unwrap();
    assert_eq!(f.storage.get::<String>("docs:plan").await.unwrap(), None);
}

#[tokio::test]
async fn compare_and_set_writes_only_over_the_version_read() {
    let f = open(&[]).await;
    f.storage
        .compare_and_set("locks:job", "owner-a", None)
        .await
        .unwrap();
    let taken = f
        .storage
        .compare_and_set("locks:job", "owner-b", None)
        .await;
    assert!(
        matches!(taken, Err(StorageError::VersionMismatch { .. })),
        "{taken:?}"
    );
    let read = f
        .storage
        .get_versioned::<String>("locks:job")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.value, "owner-a");
    f.storage
        .compare_and_set("locks:job", "owner-c", Some(&read.version))
        .await
        .unwrap();
    let stale = f
        .storage
        .compare_and_set("locks:job", "owner-d", Some(&read.version))
        .await;
    assert!(matches!(stale, Err(StorageError::VersionMismatch { .. })));
    assert_eq!(
        f.storage
            .get::<String>("locks:job")
            .await
            .unwrap()
            .as_deref(),
        Some("owner-c")
    );
}

#[tokio::test]
async fn scan_lists_live_keys_of_a_collection_in_order() {
    let f = open(&[]).await;
    for i in [3, 1, 2, 4] {
        f.storage.set(&format!("notes:{i}"), i).await.unwrap();
    }
    f.storage.set("notesx:9", 9).await.unwrap();
    f.storage.delete("notes:2").await.unwrap();
    let keys: Vec<String> = f
        .storage
        .scan("notes", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["notes:1", "notes:3", "notes:4"]);
    let page = f.storage.scan("notes", Some("notes:1"), 1).await.unwrap();
    assert_eq!(page[0].key, "notes:3");
    assert_eq!(page[0].value, serde_json::json!(3));
}

#[tokio::test]
async fn data_survives_reopen_and_a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: Some(dir.path().display().to_string()),
        ..Config::default()
    };
    {
        let storage = Storage::new(config.clone()).await.unwrap();
        storage.set("k:1", "kept").await.unwrap();
        let second = Storage::new(config.clone()).await;
        assert!(
            second
                .unwrap_err()
                .to_string()
                .contains("in use by another agentstore process")
        );
    }
    let storage = Storage::new(config).await.unwrap();
    assert_eq!(
        storage.get::<String>("k:1").await.unwrap().as_deref(),
        Some("kept")
    );
}

/// Runs the specification's code example (examples/spec_example.rs) as a real process.
#[test]
fn the_spec_example_runs() {
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/spec_example");
    assert!(
        example.exists(),
        "build the examples first ({} missing)",
        example.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(&example)
        .env("AGENTSTORE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("agent:identity:123 = {\"name\":\"agent-123\""),
        "{stdout}"
    );
    assert!(stdout.contains("metrics:cpu = 0.42"), "{stdout}");
    assert!(
        stdout.contains("task:456 = {\"depends_on\":[455]"),
        "{stdout}"
    );
    assert!(dir.path().join("agentstore.redb").exists());
}

/// The value of a counter or histogram count line of the metrics text, if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn engine_operations_and_errors_are_measured() {
    let f = open(&[]).await;
    f.storage.set("m:1", 1).await.unwrap();
    f.storage.set("m:2", 2).await.unwrap();
    f.storage.get::<u32>("m:1").await.unwrap();
    let _ = f.storage.compare_and_set("m:1", 3, None).await; // fails: the key exists
    let text = f.storage.metrics_text();
    let commits = metric(
        &text,
        r#"agentstore_engine_operation_seconds_count{backend="local",op="commit"}"#,
    );
    assert_eq!(commits, Some(3.0), "{text}");
    let gets = metric(
        &text,
        r#"agentstore_engine_operation_seconds_count{backend="local",op="get"}"#,
    );
    assert_eq!(gets, Some(1.0), "{text}");
    let failed = metric(
        &text,
        r#"agentstore_engine_errors_total{backend="local",op="commit",kind="expectation_failed"}"#,
    );
    assert_eq!(failed, Some(1.0), "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_apply_all_or_nothing_and_transfers_keep_the_total() {
    let f = open(&[("hits", ConflictStrategy::PnCounter, None)]).await;
    let storage = std::sync::Arc::new(f.storage);
    for account in 0..4 {
        storage
            .set(&format!("bank:{account}"), 100i64)
            .await
            .unwrap();
    }
    // Concurrent transfers: read two balances, move money with compare-and-set on both in
    // one transaction; a transfer that lost a race writes nothing and is retried.
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let storage = std::sync::Arc::clone(&storage);
        tasks.push(tokio::spawn(async move {
            let (mut done, mut conflicts) = (0, 0);
            for i in 0..25u64 {
                let (from, to) = ((worker + i) % 4, (worker + i + 1 + i % 3) % 4);
                if from == to {
                    continue;
                }
                loop {
                    let a = storage
                        .get_versioned::<i64>(&format!("bank:{from}"))
                        .await
                        .unwrap()
                        .unwrap();
                    let b = storage
                        .get_versioned::<i64>(&format!("bank:{to}"))
                        .await
                        .unwrap()
                        .unwrap();
                    let amount = (i as i64 % 7 + 1).min(a.value);
                    let mut transfer = storage.transaction();
                    transfer
                        .compare_and_set(
                            &format!("bank:{from}"),
                            a.value - amount,
                            Some(&a.version),
                        )
                        .compare_and_set(&format!("bank:{to}"), b.value + amount, Some(&b.version))
                        .counter_add("hits:transfers", 1);
                    match transfer.commit().await {
                        Ok(receipts) => {
                            assert_eq!(receipts.len(), 3);
                            done += 1;
                            break;
                        }
                        Err(StorageError::VersionMismatch { .. }) => conflicts += 1,
                        Err(other) => panic!("transfer failed: {other}"),
                    }
                }
            }
            (done, conflicts)
        }));
    }
    let mut transfers = 0;
    for task in tasks {
        transfers += task.await.unwrap().0;
    }
    let mut total = 0;
    for account in 0..4 {
        let balance: i64 = storage
            .get(&format!("bank:{account}"))
            .await
            .unwrap()
            .unwrap();
        assert!(balance >= 0, "no account goes below zero");
        total += balance;
    }
    assert_eq!(total, 400, "transfers move money, never make or lose it");
    assert_eq!(storage.counter("hits:transfers").await.unwrap(), transfers);

    // A write that cannot be staged (a counter operation on an lww key) fails the whole
    // transaction before anything is written.
    let mut bad = storage.transaction();
    bad.set("bank:0", 0i64)
        .counter_add("bank:1", 5)
        .set("bank:2", 0i64);
    let err = bad.commit().await.unwrap_err();
    assert!(matches!(err, StorageError::WrongOperation { .. }), "{err}");
    let mut after = 0;
    for account in 0..4 {
        after += storage
            .get::<i64>(&format!("bank:{account}"))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(after, 400);
    assert!(storage.transaction().commit().await.unwrap().is_empty());
}

#[tokio::test]
async fn leases_grant_increasing_tokens_and_fence_off_an_expired_holder() {
    use std::time::Duration;
    let f = open(&[]).await;
    let storage = &f.storage;
    let first = storage
        .acquire_lock("locks:payout", "worker-a", Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(first.token, 1);
    let held = storage
        .acquire_lock("locks:payout", "worker-b", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&held, StorageError::LockHeld { holder, .. } if holder == "worker-a"),
        "{held}"
    );
    let renewed = storage
        .acquire_lock("locks:payout", "worker-a", Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(renewed.token, 1, "the holder renews its own lease");

    // worker-a stalls past its lease; worker-b takes over with a higher token.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = storage
        .acquire_lock("locks:payout", "worker-b", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(second.token, 2);
    let mut late = storage.transaction();
    late.set("ledger:payout", "from a").fenced(&first);
    let fenced = late.commit().await.unwrap_err();
    assert!(
        matches!(
            fenced,
            StorageError::Engine(agentstore_engine::EngineError::Fenced {
                token: 1,
                highest: 2,
                ..
            })
        ),
        "the stale holder is fenced off even before the new one wrote: {fenced}"
    );
    let mut current = storage.transaction();
    current.set("ledger:payout", "from b").fenced(&second);
    current.commit().await.unwrap();
    assert_eq!(
        storage
            .get::<String>("ledger:payout")
            .await
            .unwrap()
            .as_deref(),
        Some("from b")
    );
    storage.release_lock(&first).await.unwrap(); // not the current grant: nothing happens
    assert!(
        storage
            .acquire_lock("locks:payout", "worker-c", Duration::from_secs(5))
            .await
            .is_err(),
        "releasing an old grant does not free the lock"
    );
    storage.release_lock(&second).await.unwrap();
    let third = storage
        .acquire_lock("locks:payout", "worker-c", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(third.token, 3, "tokens keep growing across releases");
}

#[tokio::test]
async fn a_watch_sees_each_change_in_order_and_resumes_after_reopening_without_a_gap() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: Some(dir.path().display().to_string()),
        ..Config::default()
    };
    let storage = Storage::new(config.clone()).await.unwrap();
    storage.set("tasks:before", 0).await.unwrap();
    // From now: what was written before is not replayed.
    let mut watch = storage.watch("tasks", None);
    let waiting = tokio::spawn(async move {
        let change = watch.next().await.unwrap();
        (change, watch)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    storage.set("tasks:1", "one").await.unwrap();
    storage.set("other:1", "elsewhere").await.unwrap();
    storage.set("tasks:2", "two").await.unwrap();
    storage.delete("tasks:1").await.unwrap();
    let (first, mut watch) = waiting.await.unwrap();
    assert_eq!(
        (first.key.as_str(), first.value.clone()),
        ("tasks:1", Some(serde_json::json!("one")))
    );
    let second = watch.next().await.unwrap();
    assert_eq!(
        (second.key.as_str(), second.value.clone()),
        ("tasks:2", Some(serde_json::json!("two"))),
        "another collection's change is not in the watch"
    );
    let resume_at = watch.position().unwrap();
    assert_eq!(resume_at, second.position);
    drop((watch, storage));

    // Reopened: written while nobody watched, read after the position kept.
    let storage = Storage::new(config).await.unwrap();
    storage.set("tasks:3", "three").await.unwrap();
    let page = storage
        .changes("tasks", Some(resume_at), 10, Duration::ZERO)
        .await
        .unwrap();
    let seen: Vec<(String, Option<serde_json::Value>)> = page
        .changes
        .iter()
        .map(|c| (c.key.clone(), c.value.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("tasks:1".to_owned(), None),
            ("tasks:3".to_owned(), Some(serde_json::json!("three")))
        ],
        "the delete, then the write made after reopening, and nothing twice"
    );
    assert!(
        page.changes
            .windows(2)
            .all(|w| w[0].position.seq < w[1].position.seq)
    );

    // A position from another store is refused, not misread.
    let other = open(&[]).await;
    match other
        .storage
        .changes("tasks", Some(resume_at), 10, Duration::ZERO)
        .await
    {
        Err(StorageError::Engine(agentstore_engine::EngineError::PositionUnavailable {
            ..
        })) => {}
        other => panic!("another feed's position: {other:?}"),
    }
}

#[tokio::test]
async fn a_value_with_a_time_to_live_reads_as_absent_once_it_expires_and_a_rewrite_renews_it() {
    use std::time::Duration;
    let f = open(&[("hits", ConflictStrategy::PnCounter, None)]).await;
    let s = &f.storage;
    s.set_with_ttl("beat:a", "alive", Duration::from_millis(300))
        .await
        .unwrap();
    s.set_with_ttl("beat:b", "alive", Duration::from_millis(300))
        .await
        .unwrap();
    let read = s.get_versioned::<String>("beat:a").await.unwrap().unwrap();
    assert_eq!(read.value, "alive");
    assert!(read.expires_at_ms.is_some());
    // b is written again without a time to live: it no longer expires.
    s.set("beat:b", "forever").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.get::<String>("beat:a").await.unwrap(), None);
    assert!(!s.exists("beat:a").await.unwrap());
    let listed: Vec<String> = s
        .scan("beat", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(listed, ["beat:b"], "an expired key is not listed");
    assert_eq!(
        s.get::<String>("beat:b").await.unwrap().as_deref(),
        Some("forever")
    );
    // The embedded store gives an expired value's space back (also every minute by itself).
    assert_eq!(s.purge_expired().await.unwrap(), 1, "beat:a, and only it");
    assert_eq!(s.purge_expired().await.unwrap(), 0);
    // Expired, the key takes a compare-and-set against absent, as a missing key does.
    s.compare_and_set("beat:a", "again", None).await.unwrap();
    assert_eq!(
        s.get::<String>("beat:a").await.unwrap().as_deref(),
        Some("again")
    );
    // Only lww values expire.
    assert!(matches!(
        s.set_with_ttl("hits:x", 1, Duration::from_secs(1)).await,
        Err(StorageError::WrongOperation { .. })
    ));
}

#[tokio::test]
async fn a_collection_ttl_applies_to_every_write_without_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "storage:\n  data_dir: {}\n  collections:\n    sessions:\n      ttl_ms: 200\n",
        dir.path().display()
    );
    let config = Config::from_yaml(&yaml, "ttl.yaml").unwrap();
    let storage = Storage::new(config).await.unwrap();
    storage.set("sessions:1", "open").await.unwrap();
    storage.set("other:1", "kept").await.unwrap();
    assert!(storage.exists("sessions:1").await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!storage.exists("sessions:1").await.unwrap());
    assert!(storage.exists("other:1").await.unwrap());

    let refused = Config::from_yaml(
        "storage:\n  collections:\n    hits:\n      conflict: pn_counter\n      ttl_ms: 5\n",
        "bad.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("bad.yaml") && refused.contains("storage.collections.hits.ttl_ms"),
        "{refused}"
    );
}

#[tokio::test]
async fn documents_take_concurrent_edits_against_one_revision_and_refuse_stale_ones() {
    use agentstore_engine::EngineError;
    use p2p_ai_agents::storage::TextOp;
    let fx = open(&[(
        "docs",
        ConflictStrategy::Document,
        Some(ConsistencyLevel::Strong),
    )])
    .await;
    let s = &fx.storage;
    let empty = s.document("docs:plan").await.unwrap();
    assert_eq!((empty.revision, empty.text.as_str()), (0, ""));
    let first = s
        .edit("docs:plan", 0, &TextOp::new().insert("steps: read"))
        .await
        .unwrap();
    assert_eq!(first.revision, 1);
    assert_eq!(first.receipt.delivered, ConsistencyLevel::Strong);

    // Two writers read revision 1 and edit at once: both edits land, neither undoes the other.
    let append = TextOp::new().retain(11).insert(", plan");
    let capitalize = TextOp::new().delete(5).insert("Steps").retain(6);
    let (a, b) = tokio::join!(
        s.edit("docs:plan", 1, &append),
        s.edit("docs:plan", 1, &capitalize),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut revisions = [a.revision, b.revision];
    revisions.sort();
    assert_eq!(revisions, [2, 3]);
    let doc = s.document("docs:plan").await.unwrap();
    assert_eq!((doc.revision, doc.text.as_str()), (3, "Steps: read, plan"));
    assert_eq!(
        s.get::<String>("docs:plan").await.unwrap().as_deref(),
        Some("Steps: read, plan")
    );
    // A reader that held revision 1 catches up by the edits since.
    let caught = s.edits_since("docs:plan", 1).await.unwrap();
    assert_eq!(caught.revision, 3);
    let text = caught
        .edits
        .iter()
        .try_fold("steps: read".to_owned(), |text, op| op.apply(&text))
        .unwrap();
    assert_eq!(text, "Steps: read, plan");

    // An edit against a revision the document has not reached, or that does not fit.
    let ahead = s.edit("docs:plan", 9, &TextOp::new().retain(17)).await;
    assert!(
        matches!(
            ahead,
            Err(StorageError::Engine(EngineError::EditRefused { .. }))
        ),
        "{ahead:?}"
    );
    let misfit = s.edit("docs:plan", 3, &TextOp::new().retain(2)).await;
    assert!(
        matches!(
            misfit,
            Err(StorageError::Engine(EngineError::EditRefused { .. }))
        ),
        "{misfit:?}"
    );
    assert_eq!(s.document("docs:plan").await.unwrap().revision, 3);

    // A document is edited, not set; a delete empties it and its revisions go on.
    assert!(matches!(
        s.set("docs:plan", "x").await,
        Err(StorageError::WrongOperation { .. })
    ));
    s.delete("docs:plan").await.unwrap();
    let cleared = s.document("docs:plan").await.unwrap();
    assert_eq!((cleared.revision, cleared.text.as_str()), (4, ""));
}
