//! Sessions: a client's causal past, which follows it from node to node.

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use agentstore_engine::session::{self, SessionToken};

use super::{Result, StorageError};

/// A client session on causal collections: the calls run in it see everything the session
/// has seen or written before (read-your-writes, monotonic reads, monotonic writes,
/// writes-follow-reads), on whichever node serves them.
///
/// ```no_run
/// # async fn example(storage: p2p_ai_agents::storage::Storage) -> p2p_ai_agents::storage::Result<()> {
/// use p2p_ai_agents::storage::Session;
///
/// let session = Session::new();
/// session.run(storage.set("tasks:a", "fetch the data")).await?;
/// // Hand the token to wherever the agent goes next (another node, another process):
/// let token = session.token();
/// let elsewhere = Session::resume(&token)?;
/// let task: Option<String> = elsewhere.run(storage.get("tasks:a")).await?;
/// assert!(task.is_some(), "read-your-writes on any node");
/// # Ok(()) }
/// ```
///
/// A node that has not yet received what the session has seen waits for it (up to its
/// session wait, 5 s by default) and otherwise refuses the call with a `session_behind`
/// error rather than answer with an older state. Collections at other levels ignore the
/// session: strong ones always answer with the latest state, eventual ones promise no order.
/// Cheap to clone; clones share the token.
#[derive(Debug, Clone, Default)]
pub struct Session {
    token: Arc<Mutex<SessionToken>>,
}

impl Session {
    /// A new session, which has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Continues the session whose token is `token` (from [`Session::token`], or the
    /// `agentstore-session` header of a node's answer).
    pub fn resume(token: &str) -> Result<Self> {
        let token = SessionToken::from_str(token)
            .map_err(|e| StorageError::InvalidSession(e.to_string()))?;
        Ok(Self {
            token: Arc::new(Mutex::new(token)),
        })
    }

    /// The session's token as text, to continue it elsewhere.
    pub fn token(&self) -> String {
        agentstore_engine::lock(&self.token).to_string()
    }

    /// Runs a storage call in this session; the session then includes what the call saw and
    /// wrote.
    pub async fn run<F: Future>(&self, call: F) -> F::Output {
        let start = agentstore_engine::lock(&self.token).clone();
        let (output, seen) = session::run(start, call).await;
        agentstore_engine::lock(&self.token).merge(&seen);
        output
    }
}
