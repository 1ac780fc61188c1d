//! The specification's "Code Example" (storage-consistency-model.md), run as written.
//!
//! Only the placeholders the specification leaves to the reader are filled in: `config`,
//! `identity_data`, `cpu_usage`, `task_data`, and the `Result` type its `main` returns. The
//! data goes to the default data directory (`$AGENTSTORE_DATA_DIR`, else
//! `~/.local/share/agentstore`).
//!
//!     cargo run -p p2p-ai-agents --example spec_example

use p2p_ai_agents::storage::{ConsistencyLevel, Storage};

// ---- placeholders (not in the specification) --------------------------------------------
type Result<T> = p2p_ai_agents::storage::Result<T>;
// ------------------------------------------------------------------------------------------

#[rustfmt::skip]
#[tokio::main]
async fn main() -> Result<()> {
    // ---- placeholders (not in the specification) ----------------------------------------
    let config = p2p_ai_agents::storage::Config::default();
    let identity_data = serde_json::json!({ "name": "agent-123", "public_key": "ed25519:9f3c..." });
    let cpu_usage = 0.42_f64;
    let task_data = serde_json::json!({ "id": 456, "depends_on": [455], "status": "queued" });
    // --------------------------------------------------------------------------------------

    let storage = Storage::new(config).await?;
    
    // Strong consistency for critical data
    storage.set_with_consistency(
        "agent:identity:123",
        identity_data,
        ConsistencyLevel::Strong,
    ).await?;
    
    // Eventual consistency for metrics
    storage.set_with_consistency(
        "metrics:cpu",
        cpu_usage,
        ConsistencyLevel::Eventual,
    ).await?;
    
    // Causal consistency for task dependencies
    storage.set_with_consistency(
        "task:456",
        task_data,
        ConsistencyLevel::Causal,
    ).await?;

    // ---- not in the specification: show what was stored ---------------------------------
    for key in ["agent:identity:123", "metrics:cpu", "task:456"] {
        let value: Option<serde_json::Value> = storage.get(key).await?;
        println!("{key} = {}", value.unwrap_or_default());
    }
    println!("data directory: {}", storage.data_dir().display());
    // --------------------------------------------------------------------------------------
    
    Ok(())
}
