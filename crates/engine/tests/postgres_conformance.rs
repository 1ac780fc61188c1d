//! The PostgreSQL engine passes the conformance suite against a real PostgreSQL
//! (127.0.0.1:5432, database `test`, or `AGENTSTORE_TEST_POSTGRES_URL`).

use agentstore_core::NodeId;
use agentstore_engine::testkit::postgres_url;
use agentstore_engine::{NodeClock, PostgresEngine, PostgresOptions};

async fn make() -> (PostgresEngine, ()) {
    let clock = NodeClock::system(NodeId::new("pg-test").unwrap(), 500);
    let options = PostgresOptions {
        pool_size: 4,
        ..PostgresOptions::new(postgres_url())
    };
    (
        PostgresEngine::connect(options, clock)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (see .ci/run)"),
        (),
    )
}

agentstore_engine::conformance_tests!(make);
agentstore_engine::conformance_tests!(two_phase: make);
