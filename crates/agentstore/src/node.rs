//! `agentstore node`: a cluster node in the foreground.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentstore_cluster::{Node, NodeConfig, http};
use agentstore_engine::{LocalEngine, NodeClock};
use p2p_ai_agents::storage::{Config, StorageError, default_data_dir};
use tokio::net::TcpListener;

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, StorageError> {
    TcpListener::bind(addr).await.map_err(|e| {
        StorageError::InvalidConfig(format!("cannot listen for {what} on {addr}: {e}"))
    })
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

pub(crate) async fn run(config: Config) -> Result<u8, StorageError> {
    let Some(cluster) = config.cluster.clone() else {
        return Err(StorageError::InvalidConfig(
            "`agentstore node` needs a storage.cluster block (client_addr, peer_addr, peers) in --config".into(),
        ));
    };
    let data_dir = config
        .data_dir
        .as_ref()
        .map_or_else(default_data_dir, PathBuf::from);
    let clock = NodeClock::system(config.node_id.clone(), config.max_clock_offset_ms);
    let engine = LocalEngine::open(&data_dir, clock)?;
    let peers = bind(cluster.peer_addr, "peers").await?;
    let clients = bind(cluster.client_addr, "clients").await?;
    let quorum = config.replication.quorum;
    let node_config = NodeConfig {
        id: config.node_id.clone(),
        client_addr: Some(cluster.client_addr),
        seeds: cluster.peers.clone(),
        replicas: usize::from(quorum.n),
        write_quorum: usize::from(quorum.w),
        read_quorum: usize::from(quorum.r),
        request_timeout: Duration::from_secs(2),
        anti_entropy_interval: Duration::from_secs(1),
    };
    let node = Arc::new(Node::start(node_config, engine, peers));
    eprintln!(
        "node {} ready: clients on http://{}, peers on {}, data in {} ({} N={} W={} R={})",
        config.node_id,
        cluster.client_addr,
        cluster.peer_addr,
        data_dir.display(),
        config.replication.strategy,
        quorum.n,
        quorum.w,
        quorum.r
    );
    if let Err(err) = http::serve(clients, Arc::clone(&node), stop_signal()).await {
        eprintln!("error: the client API failed: {err}");
    }
    // Drain: the HTTP server has finished its requests; stop the node loop and its listeners.
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    eprintln!("node {} stopped", config.node_id);
    Ok(0)
}
