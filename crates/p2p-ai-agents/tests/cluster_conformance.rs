//! The engine conformance suite on a three-node cluster, through `NodeClient` (the engine a
//! `Storage::connect` client routes to): for each level, the nodes' default collection is at
//! that level, so the suite's fresh collections are served by the cluster's leaderless
//! replication (`ClusterEngine`), its causal broadcast (`CausalEngine`) or its Raft group
//! (`StrongEngine`). What a level cannot do (a condition or a fence without a single point
//! that orders writes; a multi-key batch without one place that holds every key) must be
//! refused with a typed error, which checks of their own assert.

use std::sync::Arc;

use agentstore_engine::AnyEngine;
use agentstore_engine::conformance::{self, namespace};
use p2p_ai_agents::storage::NodeClient;

mod common;

use common::{TestNode, cluster_with, stop};

/// A node client on the first node of a cluster whose default collection is at `level`.
async fn cluster_at(level: &str) -> (AnyEngine, Vec<TestNode>) {
    let nodes = cluster_with(&format!("  default_consistency: {level}\n")).await;
    let client = NodeClient::new(&nodes[0].client.to_string());
    (AnyEngine::Dyn(Arc::new(client)), nodes)
}

/// Runs each named check in a fresh collection; fails naming every check that failed.
macro_rules! run_checks {
    ($engine:expr; $($check:ident),* $(,)?) => {{
        let mut failed = Vec::new();
        $(
            let engine = $engine.clone();
            let ns = namespace();
            let outcome = tokio::spawn(async move {
                conformance::$check(&engine, &ns).await;
            })
            .await;
            if outcome.is_err() {
                failed.push(stringify!($check));
            }
        )*
        failed
    }};
}

async fn assert_conforms(failed: Vec<&str>, nodes: Vec<TestNode>) {
    stop(nodes).await;
    assert!(failed.is_empty(), "failed checks: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strong_level_conforms() {
    let (engine, nodes) = cluster_at("strong").await;
    let failed = run_checks!(engine;
        missing_key_reads_as_none,
        binary_and_unicode_keys_and_values_round_trip,
        delete_leaves_a_tombstone,
        scan_returns_a_prefix_in_key_order_with_paging,
        compare_and_set_checks_the_version,
        a_failed_expectation_writes_nothing_of_its_batch,
        a_batch_sees_its_own_writes,
        concurrent_counter_increments_are_exact,
        concurrent_lww_writers_keep_the_newest_stamp,
        multi_value_keeps_siblings_until_a_context_write,
        sets_add_and_remove,
        a_mutation_of_the_wrong_kind_is_refused,
        merging_a_remote_state_joins_it,
        a_write_with_an_older_fencing_token_is_rejected,
    );
    assert_conforms(failed, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_causal_level_conforms() {
    let (engine, nodes) = cluster_at("causal").await;
    let failed = run_checks!(engine;
        missing_key_reads_as_none,
        binary_and_unicode_keys_and_values_round_trip,
        delete_leaves_a_tombstone,
        scan_returns_a_prefix_in_key_order_with_paging,
        concurrent_counter_increments_are_exact,
        concurrent_lww_writers_keep_the_newest_stamp,
        multi_value_keeps_siblings_until_a_context_write,
        sets_add_and_remove,
        a_mutation_of_the_wrong_kind_is_refused,
        merging_a_remote_state_joins_it,
        a_batch_sees_its_own_writes,
        conditions_and_fences_are_refused_typed,
    );
    assert_conforms(failed, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eventual_level_conforms() {
    let (engine, nodes) = cluster_at("eventual").await;
    let failed = run_checks!(engine;
        missing_key_reads_as_none,
        binary_and_unicode_keys_and_values_round_trip,
        delete_leaves_a_tombstone,
        scan_returns_a_prefix_in_key_order_with_paging,
        concurrent_counter_increments_are_exact,
        concurrent_lww_writers_keep_the_newest_stamp,
        multi_value_keeps_siblings_until_a_context_write,
        sets_add_and_remove,
        a_mutation_of_the_wrong_kind_is_refused,
        merging_a_remote_state_joins_it,
        conditions_and_fences_are_refused_typed,
        multi_key_batches_are_refused_typed,
    );
    assert_conforms(failed, nodes).await;
}
