//! openraft's own storage test suite, run against agentstore's redb log and state machine:
//! once as the member that proposed the suite's entries (appends go through the log's writer
//! thread and return before their fsync), once as another member (a follower's appends commit
//! on the calling task).

use agentstore_consensus::{LogStore, MemberId, StateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

/// Opens stores for `member`. The suite's entries are proposed by its node 0, `n0`.
struct Builder {
    member: &'static str,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let member = MemberId::from(self.member);
        let log = LogStore::open(&dir.path().join("log.redb"), member).expect("the log opens");
        let state = StateMachine::open(&dir.path().join("state.redb")).expect("the state opens");
        Ok((dir, log, state))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_log_and_state_machine_pass_openraft_storage_suite_as_the_proposer() {
    Suite::test_all(Builder { member: "n0" })
        .await
        .expect("every check of the suite passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_log_and_state_machine_pass_openraft_storage_suite_as_a_follower() {
    Suite::test_all(Builder { member: "n9" })
        .await
        .expect("every check of the suite passes");
}
