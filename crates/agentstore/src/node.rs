//! `agentstore node`: a cluster node in the foreground.

use agentstore_cluster::PeerSecurity;
use p2p_ai_agents::storage::server::{self, Listeners};
use p2p_ai_agents::storage::{Config, StorageError};

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

/// Tells the operator (on stderr) what the node does: a line of text, or with JSON logs a JSON
/// line of the logs' shape, so a log collector reads every line.
fn announce(json_logs: bool, message: String) {
    if json_logs {
        let line = serde_json::json!({
            "level": "INFO",
            "fields": { "message": message },
            "target": "agentstore::node",
        });
        eprintln!("{line}");
    } else {
        eprintln!("{message}");
    }
}

pub(crate) async fn run(config: Config, json_logs: bool) -> Result<u8, StorageError> {
    let cluster = server::cluster_block(&config)?.clone();
    // A node holds a connection per peer and per client: the soft limit on open files is
    // often 1024; raise it to the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files"),
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
    let security = server::peer_security(&config, &cluster.peer_auth, &server::data_dir(&config))?;
    let listeners = Listeners::bind(&config).await?;
    {
        let quorum = config.replication.quorum;
        let scheme = if cluster.client_tls { "https" } else { "http" };
        let peers = match &security {
            PeerSecurity::Tls(trust) => format!("mutual TLS as {}", trust.key()),
            PeerSecurity::Plaintext => "PLAINTEXT, UNAUTHENTICATED".to_owned(),
        };
        announce(
            json_logs,
            format!(
                "node {} ready: clients on {scheme}://{}, peers on {} ({peers}; {} N={} W={} R={})",
                config.node_id,
                cluster.client_addr,
                cluster.peer_addr,
                config.replication.strategy,
                quorum.n,
                quorum.w,
                quorum.r
            ),
        );
    }
    let id = config.node_id.clone();
    server::run_secured(config, listeners, security, stop_signal()).await?;
    announce(json_logs, format!("node {id} stopped"));
    Ok(0)
}
