//! The engine conformance suite on a three-node cluster, through `NodeClient` (the engine a
//! `Storage::connect` client routes to): for each level, the nodes' default collection is at
//! that level, so the suite's fresh collections are served by the cluster's leaderless
//! replication (`ClusterEngine`), its causal broadcast (`CausalEngine`) or its Raft group
//! (`StrongEngine`). What a level cannot do (a condition or a fence without a single point
//! that orders writes; a multi-key batch without one place that holds every key) must be
//! refused with a typed error, which checks of their own assert.

use std::sync::Arc;

use agentstore_engine::AnyEngine;
use p2p_ai_agents::storage::NodeClient;

mod common;

use common::{TestNode, cluster_with};

/// A node client on the first node of a cluster whose default collection is at `level`.
async fn cluster_at(level: &str) -> (AnyEngine, Vec<TestNode>) {
    let nodes = cluster_with(&format!("  default_consistency: {level}\n")).await;
    let client = NodeClient::new(&nodes[0].client.to_string());
    (AnyEngine::Dyn(Arc::new(client)), nodes)
}

async fn strong() -> (AnyEngine, Vec<TestNode>) {
    cluster_at("strong").await
}

async fn causal() -> (AnyEngine, Vec<TestNode>) {
    cluster_at("causal").await
}

async fn eventual() -> (AnyEngine, Vec<TestNode>) {
    cluster_at("eventual").await
}

agentstore_engine::conformance_tests!(in_one the_strong_level_conforms, strong, [every, batches, conditions]);
agentstore_engine::conformance_tests!(in_one the_causal_level_conforms, causal, [every, batches, refuses_conditions]);
agentstore_engine::conformance_tests!(in_one the_eventual_level_conforms, eventual, [every, refuses_conditions, refuses_batches]);
