//! The session a call runs in: the causal context that follows a client between nodes.
//!
//! A session is a context of the whole call path (facade → engine → node → HTTP → the next
//! node), like a trace span, rather than an argument of every engine method: engines that give
//! every call the latest state (one ACID engine, a Raft group, one PostgreSQL primary) satisfy
//! any session and never look at it, and the [`Engine`](crate::Engine) contract stays the same
//! for them. Engines that can serve an older state (a causal replica, a Redis replica) read
//! the token with [`current`], wait until they have caught up to it, and grow it with
//! [`observe`] by what the call saw.

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::lock;

pub use agentstore_core::session::SessionToken;

tokio::task_local! {
    static SESSION: Arc<Mutex<SessionToken>>;
}

/// Runs `call` in a session whose causal past is `token`; returns the call's output and the
/// token grown by what the call saw and wrote.
pub async fn run<F: Future>(token: SessionToken, call: F) -> (F::Output, SessionToken) {
    let shared = Arc::new(Mutex::new(token));
    let output = SESSION.scope(Arc::clone(&shared), call).await;
    let token = lock(&shared).clone();
    (output, token)
}

/// The token of the session the current call runs in, or `None` outside a session.
pub fn current() -> Option<SessionToken> {
    SESSION.try_with(|token| lock(token).clone()).ok()
}

/// Grows the current session's token (nothing outside a session).
pub fn observe(grow: impl FnOnce(&mut SessionToken)) {
    let _ = SESSION.try_with(|token| grow(&mut lock(token)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_sees_and_grows_its_sessions_token() {
        let start: SessionToken = "a=1".parse().unwrap();
        let ((), token) = run(start, async {
            assert_eq!(current().unwrap().to_string(), "a=1");
            observe(|t| t.merge(&"b=2".parse().unwrap()));
        })
        .await;
        assert_eq!(token.to_string(), "a=1,b=2");
        assert!(current().is_none(), "outside a session");
        observe(|_| unreachable!("no session to grow"));
    }
}
