//! `agentstore config check`: what each collection really gets.

use p2p_ai_agents::storage::{CollectionPlan, Config};
use serde_json::{Value as Json, json};

pub(crate) fn print(config: &Config, as_json: bool) {
    // What this file's node serves: in a cluster, the cluster's guarantees.
    let mut plans = vec![config.node_plan("(default)")];
    plans.extend(config.collections.keys().map(|name| config.node_plan(name)));
    let quorum = config.replication.quorum;
    let quorum_guarantee = config.quorum_guarantee();
    if as_json {
        let collections: Vec<Json> = plans.iter().map(plan_json).collect();
        let out = json!({
            "node_id": config.node_id.as_str(),
            "cluster": config.cluster.is_some(),
            "replication": {
                "strategy": config.replication.strategy.to_string(),
                "replicas": quorum.n, "write_quorum": quorum.w, "read_quorum": quorum.r,
                "overlapping": quorum_guarantee.overlapping,
                "guarantee": quorum_guarantee.to_string(),
            },
            "collections": collections,
        });
        println!("{out:#}");
        return;
    }
    println!("configuration is valid (node {})", config.node_id);
    println!(
        "replication between nodes: {} {} -> {}",
        config.replication.strategy, quorum, quorum_guarantee
    );
    if config.cluster.is_some() {
        println!("  (a cluster node: the guarantees below are the cluster's)");
    } else {
        println!(
            "  (applies to cluster nodes; this file configures an embedded store, a single node)"
        );
    }
    println!();
    println!(
        "{:<14} {:<9} {:<9} {:<12} guarantee",
        "collection", "backend", "level", "conflict"
    );
    for plan in &plans {
        let sealed = if plan.encrypted {
            "; values encrypted at rest (AES-256-GCM)"
        } else {
            ""
        };
        let signed = if plan.signed {
            "; writes signed by their writers, checked by every node"
        } else {
            ""
        };
        println!(
            "{:<14} {:<9} {:<9} {:<12} {}{sealed}{signed}",
            plan.name,
            plan.backend.to_string(),
            plan.consistency.as_str(),
            plan.conflict.as_str(),
            plan.guarantee
        );
    }
}

fn plan_json(plan: &CollectionPlan) -> Json {
    json!({
        "collection": plan.name,
        "backend": plan.backend.to_string(),
        "consistency": plan.consistency.as_str(),
        "conflict": plan.conflict.as_str(),
        "encrypted": plan.encrypted,
        "signed": plan.signed,
        "guarantee": {
            "level": plan.guarantee.level.as_str(),
            "summary": plan.guarantee.summary,
            "caveat": plan.guarantee.caveat,
        },
    })
}
