//! The local engine passes the conformance suite.

use agentstore_core::NodeId;
use agentstore_engine::{LocalEngine, NodeClock};

async fn make() -> (LocalEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let clock = NodeClock::system(NodeId::new("local-test").unwrap(), 500);
    (LocalEngine::open(dir.path(), clock).unwrap(), dir)
}

agentstore_engine::conformance_tests!(make);
agentstore_engine::conformance_tests!(two_phase: make);
