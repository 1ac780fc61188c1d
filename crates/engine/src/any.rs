//! One engine of whichever kind, so a store can route collections to different backends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::changelog::ChangePage;

use crate::error::EngineError;
use crate::{Engine, Key, LocalEngine, Record, Write};

/// A boxed future of an engine call.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>;

/// The [`Engine`] contract in a form that can live behind `dyn`: for engines defined outside
/// this crate (a cluster node, a remote node over HTTP) that a store routes collections to.
/// Implementations keep the obligations of [`Engine`], and may refuse what they cannot do
/// (multi-key batches, conditional writes) with [`EngineError::Unsupported`].
pub trait DynEngine: std::fmt::Debug + Send + Sync + 'static {
    /// The backend's name, as metrics label it.
    fn backend(&self) -> &'static str;
    /// See [`Engine::get`].
    fn get<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>>;
    /// See [`Engine::get_stale`].
    fn get_stale<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        self.get(key)
    }
    /// See [`Engine::scan`].
    fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
        start_after: Option<&'a Key>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(Key, Record)>>;
    /// See [`Engine::commit`].
    fn commit(&self, writes: Vec<Write>) -> EngineFuture<'_, Vec<Record>>;
    /// See [`Engine::prepare`].
    fn prepare<'a>(&'a self, txn: &'a str, writes: Vec<Write>) -> EngineFuture<'a, ()> {
        let _ = (txn, writes);
        Box::pin(async { Err(crate::no_two_phase()) })
    }
    /// See [`Engine::resolve`].
    fn resolve<'a>(&'a self, txn: &'a str, commit: bool) -> EngineFuture<'a, Vec<Record>> {
        let _ = (txn, commit);
        Box::pin(async { Err(crate::no_two_phase()) })
    }
    /// See [`Engine::changes`].
    fn changes<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: Duration,
    ) -> EngineFuture<'a, ChangePage> {
        let _ = (prefix, after, limit, wait);
        Box::pin(async { Err(crate::no_change_feed()) })
    }
    /// See [`Engine::purge_expired`].
    fn purge_expired(&self, now_ms: u64) -> EngineFuture<'_, usize> {
        let _ = now_ms;
        Box::pin(async { Ok(0) })
    }
}

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
    /// An engine defined elsewhere (a cluster node, a remote node).
    Dyn(Arc<dyn DynEngine>),
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
            AnyEngine::Dyn(engine) => engine.backend(),
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
            AnyEngine::Dyn($engine) => $call,
        }
    };
}

impl Engine for AnyEngine {
    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        dispatch!(self, engine => engine.get(key).await)
    }

    async fn get_stale(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        dispatch!(self, engine => engine.get_stale(key).await)
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

    async fn prepare(&self, txn: &str, writes: Vec<Write>) -> Result<(), EngineError> {
        dispatch!(self, engine => engine.prepare(txn, writes).await)
    }

    async fn resolve(&self, txn: &str, commit: bool) -> Result<Vec<Record>, EngineError> {
        dispatch!(self, engine => engine.resolve(txn, commit).await)
    }

    async fn changes(
        &self,
        prefix: &[u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: Duration,
    ) -> Result<ChangePage, EngineError> {
        dispatch!(self, engine => engine.changes(prefix, after, limit, wait).await)
    }

    async fn purge_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        dispatch!(self, engine => engine.purge_expired(now_ms).await)
    }
}
