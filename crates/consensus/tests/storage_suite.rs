//! openraft's own storage test suite, run against agentstore's redb log and state machine.

use agentstore_consensus::{LogStore, StateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = LogStore::open(&dir.path().join("log.redb")).expect("the log opens");
        let state = StateMachine::open(&dir.path().join("state.redb")).expect("the state opens");
        Ok((dir, log, state))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_log_and_state_machine_pass_openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("every check of the suite passes");
}
