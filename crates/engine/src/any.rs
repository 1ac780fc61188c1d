//! One engine of whichever kind, so a store can route collections to different backends.

use crate::error::EngineError;
use crate::{Engine, Key, LocalEngine, Record, Write};

/// An engine of any kind this build has.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyEngine {
    /// The embedded engine.
    Local(LocalEngine),
    /// Redis.
    #[cfg(feature = "redis")]
    Redis(crate::RedisEngine),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(crate::PostgresEngine),
}

impl AnyEngine {
    /// The backend's name, as metrics label it.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyEngine::Local(_) => "local",
            #[cfg(feature = "redis")]
            AnyEngine::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            AnyEngine::Postgres(_) => "postgres",
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $engine:ident => $call:expr) => {
        match $self {
            AnyEngine::Local($engine) => $call,
            #[cfg(feature = "redis")]
            AnyEngine::Redis($engine) => $call,
            #[cfg(feature = "postgres")]
            AnyEngine::Postgres($engine) => $call,
        }
    };
}

impl Engine for AnyEngine {
    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        dispatch!(self, engine => engine.get(key).await)
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        dispatch!(self, engine => engine.scan(prefix, start_after, limit).await)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        dispatch!(self, engine => engine.commit(writes).await)
    }
}
