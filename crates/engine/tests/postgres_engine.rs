//! What only the PostgreSQL engine has: isolation levels, a bounded pool, URL checks.

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::testkit::postgres_url;
use agentstore_engine::{
    Engine, EngineError, Isolation, Key, Mutation, NodeClock, PostgresEngine, PostgresOptions,
};

async fn engine(options: PostgresOptions) -> PostgresEngine {
    let clock = NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    PostgresEngine::connect(options, clock).await.unwrap()
}

#[tokio::test]
async fn transactions_run_at_the_configured_isolation() {
    // Single statements and multi-write transactions alike.
    let both = |s: &str| (s.to_owned(), s.to_owned());
    let serializable = engine(PostgresOptions::new(postgres_url())).await;
    assert_eq!(
        serializable.isolation_in_use().await.unwrap(),
        both("serializable")
    );
    let options = PostgresOptions {
        isolation: Isolation::ReadCommitted,
        ..PostgresOptions::new(postgres_url())
    };
    assert_eq!(
        engine(options).await.isolation_in_use().await.unwrap(),
        both("read committed")
    );
}

/// Counts the server connections with our application name, from another connection.
async fn open_connections(application_name: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_never_opens_more_connections_than_configured_and_counts_stay_exact() {
    for isolation in [Isolation::Serializable, Isolation::ReadCommitted] {
        let name = format!("agentstore-pool-test-{}-{isolation:?}", std::process::id());
        let options = PostgresOptions {
            pool_size: 3,
            isolation,
            application_name: name.clone(),
            ..PostgresOptions::new(postgres_url())
        };
        let engine = engine(options).await;
        let key: Key = format!("pool{}:{isolation:?}", std::process::id())
            .parse()
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..24 {
            let (engine, key) = (engine.clone(), key.clone());
            tasks.spawn(async move {
                for _ in 0..5 {
                    engine
                        .apply(key.clone(), Mutation::PnCounterAdd(1))
                        .await
                        .unwrap();
                }
            });
        }
        let mut peak = 0;
        while !tasks.is_empty() {
            peak = peak.max(open_connections(&name).await);
            if let Ok(Some(done)) =
                tokio::time::timeout(std::time::Duration::from_millis(20), tasks.join_next()).await
            {
                done.unwrap();
            }
        }
        assert!(
            (1..=3).contains(&peak),
            "{isolation:?}: {peak} connections open, pool size 3"
        );
        let (_, max) = engine.pool_status();
        assert_eq!(max, 3);
        match engine.get(&key).await.unwrap().unwrap().value {
            Value::PnCounter(counter) => {
                assert_eq!(counter.value(), 120, "{isolation:?}: increments lost")
            }
            other => panic!("expected a counter, got {:?}", other.kind()),
        }
    }
}

#[tokio::test]
async fn a_supabase_api_url_is_refused_with_the_url_that_is_needed() {
    let clock = NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    let err = PostgresEngine::connect(PostgresOptions::new("https://project.supabase.co"), clock)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidSettings { .. }));
    assert!(
        err.to_string()
            .contains("postgresql://postgres:PASSWORD@db.PROJECT.supabase.co"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_typed_error() {
    let clock = NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    let options = PostgresOptions::new("postgresql://postgres@127.0.0.1:1/test");
    let err = PostgresEngine::connect(options, clock).await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Unavailable {
                backend: "postgres",
                ..
            }
        ),
        "{err:?}"
    );
}

fn with_params(params: &str) -> String {
    let url = postgres_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

#[tokio::test]
async fn sslmode_encrypts_as_libpq_does() {
    let clock = || NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    let connect = |url: String| PostgresEngine::connect(PostgresOptions::new(url), clock());
    let required = connect(with_params("sslmode=require")).await.unwrap();
    assert!(
        required.connection_encrypted().await.unwrap(),
        "sslmode=require encrypts"
    );
    let preferred = connect(postgres_url()).await.unwrap();
    assert!(
        preferred.connection_encrypted().await.unwrap(),
        "the default (prefer) encrypts when the server offers TLS"
    );
    let plain = connect(with_params("sslmode=disable")).await.unwrap();
    assert!(
        !plain.connection_encrypted().await.unwrap(),
        "sslmode=disable does not"
    );
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_that_does_not_name_the_host() {
    let clock = NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    // The server's own certificate as the trusted root: it chains, but it names the machine,
    // not 127.0.0.1.
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cert: String = client
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let url = with_params(&format!("sslmode=verify-full&sslrootcert={cert}"));
    let err = PostgresEngine::connect(PostgresOptions::new(url), clock)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_rows_are_deleted_by_a_purge_and_live_ones_stay() {
    use agentstore_engine::{PhysicalClock, SystemClock, Write};
    let engine = engine(PostgresOptions::new(postgres_url())).await;
    let ns = agentstore_engine::conformance::namespace();
    let key = |k: &str| format!("purge{ns}:{k}").parse::<Key>().unwrap();
    // Long expired: the time to live ran out in 1970.
    let expired = || Mutation::PutExpiring {
        value: b"beat".to_vec(),
        expires_at_ms: 1_000,
    };
    let later = SystemClock.now_ms() + 3_600_000;
    // One write alone (the optimistic path) and a batch (one serializable transaction).
    engine.apply(key("one"), expired()).await.unwrap();
    engine
        .commit(vec![
            Write::new(key("two"), expired()),
            Write::new(
                key("later"),
                Mutation::PutExpiring {
                    value: b"beat".to_vec(),
                    expires_at_ms: later,
                },
            ),
        ])
        .await
        .unwrap();
    engine
        .apply(key("kept"), Mutation::Put(b"v".to_vec()))
        .await
        .unwrap();
    // Rewritten without a time to live: the row no longer expires.
    engine.apply(key("renewed"), expired()).await.unwrap();
    engine
        .apply(key("renewed"), Mutation::Put(b"v".to_vec()))
        .await
        .unwrap();

    let purged = engine.purge_expired(SystemClock.now_ms()).await.unwrap();
    assert!(purged >= 2, "{purged}");
    for gone in ["one", "two"] {
        assert!(engine.get(&key(gone)).await.unwrap().is_none(), "{gone}");
    }
    for live in ["later", "kept", "renewed"] {
        assert!(engine.get(&key(live)).await.unwrap().is_some(), "{live}");
    }
}
