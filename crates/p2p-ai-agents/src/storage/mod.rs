//! The storage API of the specification: `Storage`, `ConsistencyLevel`, and friends.
//!
//! ```no_run
//! use p2p_ai_agents::storage::{Config, ConsistencyLevel, Storage};
//!
//! # async fn demo() -> p2p_ai_agents::storage::Result<()> {
//! let storage = Storage::new(Config::default()).await?;
//! storage.set_with_consistency("agent:identity:123", "ada", ConsistencyLevel::Strong).await?;
//! let name: Option<String> = storage.get("agent:identity:123").await?;
//! storage.counter_add("metrics:requests", 1).await?;
//! # Ok(()) }
//! ```
//!
//! # Levels
//!
//! Every collection (a key's first `:`-separated segment) has a configured level; a call may
//! name another. The **effective level of a call is the stronger of the two**: a call can ask
//! for more than its collection, never for less. If the collection's backend cannot deliver
//! the effective level, the call fails with [`StorageError::LevelUnavailable`] instead of
//! silently giving less. An embedded store is one node on one ACID engine, which is
//! linearizable, so it delivers every level, and every receipt says what was delivered.
//!
//! # Values
//!
//! Values are stored as JSON (any `Serialize` type). What a key holds is set by its
//! collection's conflict strategy: `lww` and `multi_value` keys hold values written with
//! [`Storage::set`]; `g_counter` and `pn_counter` keys are counters; `g_set` and `or_set` keys
//! are sets. An operation that does not fit the strategy is a typed error that says which
//! configuration line to change.

mod documents;
mod error;
mod lease;
mod remote;
mod routes;
mod sealing;
#[cfg(feature = "node")]
pub mod server;

/// The header that carries a session token (see [`Session`]) both ways.
pub const SESSION_HEADER: &str = "agentstore-session";

/// The header that carries a write's attestation (`agentstore-attestation-v1:…`) on a write
/// to a signed collection, made by a client that keeps its token.
pub const ATTESTATION_HEADER: &str = "agentstore-attestation";
mod session;
pub mod status;
mod transaction;
mod two_phase;
mod values;
mod version;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use agentstore_core::ConsistencyLevel;
use agentstore_core::Key;
pub use agentstore_core::config::Config;
pub use agentstore_core::config::{
    Backend, CollectionConfig, CollectionPlan, ConfigError, ConflictStrategy, Guarantee,
    IsolationLevel, RedisConfig, Replication, ReplicationStrategy, SupabaseConfig,
};
use agentstore_core::record::{Mutation, Value};
use agentstore_engine::{
    AnyEngine, DynEngine, Engine, EngineError, EngineMetrics, Expect, Instrumented, NodeClock,
    PhysicalClock, Record, SystemClock, Write,
};
pub use agentstore_trust::{Attestation, Capability, PublicKey, TrustError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

pub use self::documents::{DocumentEdits, DocumentState, Edited, op_from_json, op_to_json};
pub use self::error::{Result, StorageError};
pub use self::lease::Lease;
pub use self::remote::NodeClient;
pub use self::routes::ClusterEngines;
use self::routes::Routes;
pub use self::sealing::{KEY_ENV as ENCRYPTION_KEY_ENV, KEY_FILE_ENV as ENCRYPTION_KEY_FILE_ENV};
pub use self::session::Session;
pub use self::status::NodeStatus;
pub use self::transaction::Transaction;
use self::values::Reading;
pub use self::version::{InvalidVersion, Version};
pub use self::watch::{Change, Changes, Watch};
pub use agentstore_core::ot::TextOp;
pub use agentstore_engine::changelog::Position;
use prometheus_client::registry::Registry;

/// Environment variable that overrides the default data directory.
pub const DATA_DIR_ENV: &str = "AGENTSTORE_DATA_DIR";

/// How often a store removes the values whose time to live has passed (see
/// [`Storage::purge_expired`]).
pub const EXPIRED_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// The data directory used when the configuration names none: `$AGENTSTORE_DATA_DIR`, else
/// `$XDG_DATA_HOME/agentstore`, else `$HOME/.local/share/agentstore`, else `./agentstore-data`.
pub fn default_data_dir() -> PathBuf {
    let env = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env(DATA_DIR_ENV)
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("agentstore")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/agentstore")))
        .unwrap_or_else(|| PathBuf::from("agentstore-data"))
}

/// Reads and validates a YAML configuration file.
pub fn load_config(path: impl AsRef<Path>) -> Result<Config> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| StorageError::ConfigFile {
        path: path.to_owned(),
        source,
    })?;
    Ok(Config::from_yaml(&text, &path.display().to_string())?)
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The key's version after the write (for compare-and-set).
    pub version: Version,
    /// The effective level of the call: the stronger of the call's and the collection's.
    pub level: ConsistencyLevel,
    /// The level the collection's mechanism really delivered (at least `level`).
    pub delivered: ConsistencyLevel,
}

/// A value with the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its version; pass it to [`Storage::compare_and_set`].
    pub version: Version,
    /// Its writer's signature, on a signed collection: who wrote it and the attestation any
    /// holder of the cluster's authority key can check ([`Signed::verify`]).
    pub signed: Option<Signed>,
    /// When the value expires (Unix ms), if it was written with a time to live.
    pub expires_at_ms: Option<u64>,
}

/// The writer's signature of a value in a signed collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The writer: the key its token signs with ([`Capability::author`]).
    pub author: PublicKey,
    /// When the writer signed (milliseconds since the Unix epoch, by its clock).
    pub signed_at_ms: u64,
    /// The signature, with the writer's token chain (never its proof).
    pub attestation: Attestation,
    /// The value's bytes as stored, which the attestation signs.
    stored: Vec<u8>,
    key: String,
}

impl Signed {
    fn of(key: &Key, record: &Record) -> Option<Self> {
        let (Value::Register(Some(stored)), Some(bytes)) = (&record.value, &record.attestation)
        else {
            return None;
        };
        let attestation = Attestation::decode(bytes).ok()?;
        Some(Self {
            author: attestation.author(),
            signed_at_ms: attestation.signed_at_ms(),
            attestation,
            stored: stored.clone(),
            key: key.as_str()?.to_owned(),
        })
    }

    /// The JSON the node's API and the CLI show: `author`, `signed_at_ms`, `attestation`.
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "author": self.author.to_string(),
            "signed_at_ms": self.signed_at_ms,
            "attestation": self.attestation.to_text(),
        })
    }

    /// Checks the signature end to end, with nothing but the cluster's authority key: the
    /// writer's token chains to `authority`, allowed this write when it was signed, and its
    /// holder signed exactly this key and value. Nodes check this before storing; a reader
    /// that trusts no node checks it again here.
    pub fn verify(&self, authority: &PublicKey) -> Result<(), TrustError> {
        self.attestation
            .verify(authority, &self.key, Some(&self.stored))
            .map(|_| ())
    }
}

/// The concurrent values of a multi-value key, and the context that replaces them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Siblings<T> {
    /// Every value not superseded (empty when the key is missing or deleted).
    pub values: Vec<T>,
    /// Pass it to [`Storage::set_with_context`] to replace exactly these values.
    pub context: Version,
}

/// One key of a scan, with its value rendered as JSON (see [`Storage::scan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its value: the register's value, a counter's total, a set's members as an array, or
    /// the array of siblings of a multi-value key.
    pub value: Json,
}

/// A handle to the store. Cheap to clone; all clones share one engine.
#[derive(Debug, Clone)]
pub struct Storage {
    inner: Arc<Inner>,
    /// The token this handle signs writes of signed collections with, if any.
    signer: Option<Arc<Capability>>,
    /// The level every call of this handle asks for at least (see [`Storage::at_level`]).
    level: Option<ConsistencyLevel>,
    /// How fresh this handle's reads must be (see [`Storage::reading_stale`]).
    freshness: Freshness,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    data_dir: PathBuf,
    /// The plan and engine of every collection, computed once: every call looks one up.
    routes: Routes,
    /// This store's metrics (engine latency, errors, retries, WAIT shortfalls).
    registry: Registry,
    /// The durable log of cross-engine transactions this store coordinates.
    coordinator: two_phase::Coordinator,
    /// Seals and opens the values of encrypted collections (`None` when there are none).
    sealer: Option<sealing::Sealer>,
}

/// What a call resolved to: the key, its collection's plan and engine, and the effective level.
struct Call<'a> {
    key: Key,
    plan: &'a CollectionPlan,
    engine: &'a Instrumented<AnyEngine>,
    level: ConsistencyLevel,
    /// The collection's sealer, if its values are encrypted.
    sealer: Option<&'a sealing::Sealer>,
    /// The token that signs this call's writes, if the collection is signed and the handle
    /// has one.
    signer: Option<&'a Capability>,
}

/// Whether a read must see the latest write or may read this node's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    Latest,
    Stale,
}

impl Storage {
    /// Opens the store described by `config`: the local engine in the configured data
    /// directory (see [`default_data_dir`]) if any collection uses it, and connections to Redis
    /// and PostgreSQL if any collection uses them. Encrypted collections take their key from
    /// `AGENTSTORE_ENCRYPTION_KEY` or `AGENTSTORE_ENCRYPTION_KEY_FILE`.
    #[tracing::instrument(skip_all, fields(node = %config.node_id))]
    pub async fn new(config: Config) -> Result<Self> {
        Self::open(config, None, None).await
    }

    /// [`Storage::new`], with the key that seals the values of encrypted collections given
    /// here rather than in the environment.
    pub async fn with_encryption_key(config: Config, key: &[u8; 32]) -> Result<Self> {
        Self::open(config, None, Some(key)).await
    }

    /// Opens a store whose `local` collections live in `cluster` (a cluster node, or a node
    /// reached over the network) instead of the embedded engine; Redis and PostgreSQL
    /// collections are opened as with [`Storage::new`]. Those collections deliver what the
    /// cluster does ([`Config::cluster_guarantee`]): a call that asks for more is refused.
    pub async fn with_cluster(config: Config, cluster: Arc<dyn DynEngine>) -> Result<Self> {
        let cluster = ClusterEngines {
            leaderless: cluster,
            causal: None,
            strong: None,
        };
        Self::open(config, Some(cluster), None).await
    }

    /// Opens a store whose `local` collections live in a cluster's engines: eventual ones in
    /// `engines.leaderless`, causal ones in `engines.causal`, strong ones in `engines.strong`
    /// (causal ones too when there is no causal engine). Each collection's plan carries what
    /// its engine delivers ([`Config::cluster_guarantee`], [`Config::causal_guarantee`],
    /// [`Config::raft_guarantee`]).
    pub async fn with_cluster_engines(config: Config, engines: ClusterEngines) -> Result<Self> {
        Self::open(config, Some(engines), None).await
    }

    /// Like [`Storage::with_cluster`], with the cluster's Raft group (`strong`) serving the
    /// `local` collections configured causal or strong ([`Config::raft_guarantee`]).
    pub async fn with_cluster_and_raft(
        config: Config,
        cluster: Arc<dyn DynEngine>,
        strong: Arc<dyn DynEngine>,
    ) -> Result<Self> {
        let cluster = ClusterEngines {
            leaderless: cluster,
            causal: None,
            strong: Some(strong),
        };
        Self::open(config, Some(cluster), None).await
    }

    /// Opens a store whose `local` collections live in the cluster of the node serving
    /// clients at `node` (`host:port`), with the same API as an embedded store. The cluster's
    /// settings are the node's, read from it here: replication (N, W, R) and the level and
    /// conflict strategy of each collection it holds (they decide what a key is, so the node's
    /// win over `config`'s). Redis and PostgreSQL collections are opened from `config` as with
    /// [`Storage::new`].
    pub async fn connect(node: &str, config: Config) -> Result<Self> {
        Self::connect_client(NodeClient::new(node), config).await
    }

    /// [`Storage::connect`] through a client set up beforehand: with a capability token
    /// ([`NodeClient::with_token`]), as a node that checks tokens requires, or over HTTPS
    /// ([`NodeClient::with_tls`]).
    pub async fn connect_client(remote: NodeClient, mut config: Config) -> Result<Self> {
        let node = remote.addr().to_owned();
        let status = remote.status().await?;
        for collection in status.collections.iter().filter(|c| c.backend == "local") {
            let (consistency, conflict) = (collection.consistency, collection.conflict);
            if collection.name == "(default)" {
                if config.default_backend == Backend::Local {
                    config.default_consistency = consistency;
                    config.default_conflict = conflict;
                }
                continue;
            }
            config.collections.insert(
                collection.name.clone(),
                agentstore_core::config::CollectionConfig {
                    backend: Some(Backend::Local),
                    consistency: Some(consistency),
                    conflict: Some(conflict),
                    // The client encrypts and decrypts: the node stores ciphertext.
                    encrypted: collection.encrypted,
                    // The client signs (`signing_with`); the nodes check.
                    signed: collection.signed,
                    // The client stamps expiries; every node hides what expired.
                    ttl_ms: collection.ttl_ms,
                },
            );
        }
        let number = |field: &str, value: usize| {
            u8::try_from(value).map_err(|_| {
                StorageError::InvalidConfig(format!(
                    "the node at {node} sent a status with `{field}` {value}"
                ))
            })
        };
        config.replication.quorum = agentstore_core::quorum::QuorumSpec {
            n: number("replicas", status.replicas)?,
            w: number("write_quorum", status.write_quorum)?,
            r: number("read_quorum", status.read_quorum)?,
        };
        // The node routes each record to the engine of its collection, so one client serves
        // both; what it can deliver is the node's: every node has a Raft member (which serves
        // strong collections even while its group is still forming: its first writes wait for
        // the leader) and a causal broadcast.
        let remote: Arc<dyn DynEngine> = Arc::new(remote);
        let engines = ClusterEngines {
            leaderless: Arc::clone(&remote),
            causal: Some(Arc::clone(&remote)),
            strong: Some(Arc::clone(&remote)),
        };
        Self::with_cluster_engines(config, engines).await
    }

    async fn open(
        config: Config,
        cluster: Option<ClusterEngines>,
        encryption_key: Option<&[u8; 32]>,
    ) -> Result<Self> {
        config.validate().map_err(StorageError::InvalidConfig)?;
        let data_dir = config
            .data_dir
            .as_ref()
            .map_or_else(default_data_dir, PathBuf::from);
        let clock = NodeClock::system(config.node_id.clone(), config.max_clock_offset_ms);
        let mut registry = Registry::default();
        let metrics = EngineMetrics::register(&mut registry);
        let in_cluster = cluster.is_some();
        let encrypted: Vec<String> = config
            .collections
            .iter()
            .filter(|(_, c)| c.encrypted)
            .map(|(name, _)| name.clone())
            .collect();
        let sealer = match encryption_key {
            _ if encrypted.is_empty() => None,
            Some(key) => Some(sealing::Sealer::new(key)?),
            None => Some(sealing::Sealer::from_env(&encrypted)?),
        };
        let routes = Routes::open(&config, &data_dir, clock, metrics, cluster).await?;
        let coordinator = two_phase::Coordinator::new(&data_dir, config.node_id.as_str());
        let recover = coordinator.has_log();
        let storage = Self {
            inner: Arc::new(Inner {
                config,
                data_dir,
                routes,
                registry,
                coordinator,
                sealer,
            }),
            signer: None,
            level: None,
            freshness: Freshness::Latest,
        };
        storage.sweep_expired_in_background();
        if recover && in_cluster {
            // A cluster's Raft group may not have a leader yet: recover once it has.
            storage.recover_in_background();
        } else if recover {
            // Transactions an earlier run left unfinished end all-or-nothing before anything
            // else is served; what cannot be resolved yet (a participant down) is retried.
            match storage.recover_transactions().await {
                Ok(0) => {}
                Ok(left) => {
                    tracing::warn!(
                        left,
                        "unfinished transactions are retried in the background"
                    );
                    storage.recover_in_background();
                }
                Err(err) => {
                    tracing::warn!(error = %err, "transaction recovery is retried in the background");
                    storage.recover_in_background();
                }
            }
        }
        Ok(storage)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The data directory of the local engine.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// This store's metrics in the OpenMetrics text format (what a `/metrics` endpoint serves,
    /// with content type `application/openmetrics-text; version=1.0.0; charset=utf-8`).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Removes, now, the stored values whose time to live has passed, from every engine that
    /// alone decides what it holds (`Engine::purge_expired`: the embedded engine, PostgreSQL,
    /// a cluster's Raft group through its leader), and answers how many; the store also does
    /// it every [`EXPIRED_SWEEP`] by itself. Expired values read as absent from the moment
    /// they expire; this gives their space back. Redis expires values itself, and a cluster
    /// collects its eventual collections' expired values once every replica holds them.
    pub async fn purge_expired(&self) -> Result<usize> {
        let now_ms = SystemClock.now_ms();
        let mut purged = 0;
        for engine in self.inner.routes.engines() {
            purged += engine.purge_expired(now_ms).await?;
        }
        Ok(purged)
    }

    /// Runs [`Storage::purge_expired`] every [`EXPIRED_SWEEP`] until the store is dropped (the
    /// task holds only a weak handle, so it never keeps files or connections open).
    fn sweep_expired_in_background(&self) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let first = tokio::time::Instant::now() + EXPIRED_SWEEP;
            let mut ticks = tokio::time::interval_at(first, EXPIRED_SWEEP);
            loop {
                ticks.tick().await;
                let Some(inner) = inner.upgrade() else { break };
                let storage = Storage {
                    inner,
                    signer: None,
                    level: None,
                    freshness: Freshness::Latest,
                };
                match storage.purge_expired().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::debug!(purged, "expired values removed"),
                    Err(err) => tracing::warn!(error = %err, "removing expired values failed"),
                }
            }
        });
    }

    /// The engine that serves `collection`: the node's record endpoints use it, so a key has
    /// one path whichever API reaches it.
    #[cfg(feature = "node")]
    pub(crate) fn engine_of(&self, collection: &str) -> &Instrumented<AnyEngine> {
        &self.inner.routes.get(collection).engine
    }

    /// The one engine that serves all of `collections`, if one does (an atomic batch of
    /// writes to them is then one commit of it).
    pub(crate) fn batch_engine<'c>(
        &self,
        mut collections: impl Iterator<Item = &'c str>,
    ) -> Option<&Instrumented<AnyEngine>> {
        let routes = &self.inner.routes;
        let first = routes.get(collections.next().unwrap_or_default());
        collections
            .all(|name| routes.get(name).instance == first.instance)
            .then_some(&first.engine)
    }

    /// Settings and guarantee of a collection.
    pub fn plan(&self, collection: &str) -> CollectionPlan {
        let mut plan = self.inner.routes.get(collection).plan.clone();
        plan.name = collection.to_owned();
        plan
    }

    /// Resolves a call: validates the key, finds its collection's plan, computes the
    /// effective level and checks that the collection delivers it.
    fn call(&self, key: &str, requested: Option<ConsistencyLevel>) -> Result<Call<'_>> {
        let parsed: Key = key.parse().map_err(|source| StorageError::Key {
            key: key.to_owned(),
            source,
        })?;
        let route = self.inner.routes.get(parsed.collection());
        let plan = &route.plan;
        let requested = requested.max(self.level);
        let level = requested.map_or(plan.consistency, |r| r.max(plan.consistency));
        if level > plan.guarantee.level {
            return Err(StorageError::LevelUnavailable {
                collection: parsed.collection().to_owned(),
                delivered: plan.guarantee.level,
                requested: level,
            });
        }
        tracing::Span::current().record("level", level.as_str());
        Ok(Call {
            key: parsed,
            plan,
            engine: &route.engine,
            level,
            sealer: self.sealer_of(plan),
            signer: self.signer.as_deref().filter(|_| plan.signed),
        })
    }

    /// A handle to the same store that signs its writes to signed collections with `token`
    /// (its holder's key becomes their author; see [`Capability::sign_write`]). Writes to
    /// signed collections through a handle without a token are refused before they leave.
    ///
    /// The token never leaves this process: what travels is each write's attestation. The
    /// node a client talks to learns the token it authenticates with (`NodeClient::with_token`),
    /// so authenticate with an attenuated copy (`Capability::attenuate`) and sign with the
    /// original: then no node can sign as this writer.
    pub fn signing_with(&self, token: Capability) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            signer: Some(Arc::new(token)),
            level: self.level,
            freshness: self.freshness,
        }
    }

    /// A handle to the same store whose reads (values, counters, sets, siblings) are this
    /// node's copy, as [`Storage::get_stale`] reads a value: on a strong collection in a
    /// cluster, a follower read without a round trip to the leader. Writes are unchanged.
    pub fn reading_stale(&self) -> Self {
        Self {
            freshness: Freshness::Stale,
            ..self.clone()
        }
    }

    /// The key's record at the handle's freshness, `None` once it expired.
    async fn read_record(&self, call: &Call<'_>) -> Result<Option<Record>> {
        self.read_record_as(call, self.freshness).await
    }

    async fn read_record_as(
        &self,
        call: &Call<'_>,
        freshness: Freshness,
    ) -> Result<Option<Record>> {
        let record = match freshness {
            Freshness::Latest => call.engine.get(&call.key).await?,
            Freshness::Stale => call.engine.get_stale(&call.key).await?,
        };
        Ok(record.filter(|r| !r.expired(SystemClock.now_ms())))
    }

    /// A handle to the same store whose every call (reads, writes, counters, sets,
    /// transactions) asks for at least `level`: served at the stronger of it and the
    /// collection's level, or refused with [`StorageError::LevelUnavailable`] where the
    /// collection's configuration cannot deliver it. Never weaker than the collection's level.
    pub fn at_level(&self, level: ConsistencyLevel) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            signer: self.signer.clone(),
            level: Some(level.max(self.level.unwrap_or(level))),
            freshness: self.freshness,
        }
    }

    /// Writes to a signed collection with a signature made elsewhere (by a client that keeps
    /// its token): the node's HTTP API uses it for writes that carry an
    /// `agentstore-attestation` header. `value` is the JSON value (`None`: a delete); the
    /// attestation must sign its compact JSON bytes. Nodes refuse it if the signature does
    /// not hold.
    pub async fn write_attested(
        &self,
        key: &str,
        value: Option<&serde_json::Value>,
        attestation: &Attestation,
        level: Option<ConsistencyLevel>,
    ) -> Result<WriteReceipt> {
        traced("set", key, async move {
            let call = self.call(key, level)?;
            if !call.plan.signed || call.plan.encrypted {
                return Err(Self::wrong(
                    &call,
                    "a write signed elsewhere",
                    "it needs a signed collection (signed: true) that is not encrypted: the \
                     signature of an encrypted value covers its ciphertext, which only a \
                     client that seals and signs (Storage::signing_with) can make",
                ));
            }
            let value = value.map(|v| Self::encode(&call, v)).transpose()?;
            let mutation = Mutation::Signed {
                value,
                attestation: attestation.encode(),
            };
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// The write of an LWW register (`None`: a delete): signed when the collection is.
    fn lww(call: &Call<'_>, value: Option<Vec<u8>>) -> Result<Mutation> {
        if !call.plan.signed {
            return Ok(value.map_or(Mutation::Delete, Mutation::Put));
        }
        let Some(signer) = call.signer else {
            return Err(StorageError::SignatureRequired {
                collection: call.key.collection().to_owned(),
            });
        };
        // A signature covers the key as text: a signed collection's keys are UTF-8.
        let key = call.key.as_str().ok_or_else(|| {
            Self::wrong(
                call,
                "a signed write",
                "the keys of a signed collection must be UTF-8 text",
            )
        })?;
        let attestation = signer
            .sign_write(key, value.as_deref(), SystemClock.now_ms())
            .map_err(|e| StorageError::InvalidConfig(format!("the signing token: {e}")))?;
        Ok(Mutation::Signed {
            value,
            attestation: attestation.encode(),
        })
    }

    fn sealer_of(&self, plan: &CollectionPlan) -> Option<&sealing::Sealer> {
        plan.encrypted
            .then_some(self.inner.sealer.as_ref())
            .flatten()
    }

    fn receipt(call: &Call<'_>, record: &Record) -> WriteReceipt {
        WriteReceipt {
            version: Version(record.version.clone()),
            level: call.level,
            delivered: call.plan.guarantee.level,
        }
    }

    fn wrong(call: &Call<'_>, operation: &'static str, hint: impl Into<String>) -> StorageError {
        StorageError::WrongOperation {
            key: call.key.to_string(),
            collection: call.key.collection().to_owned(),
            strategy: call.plan.conflict,
            operation,
            hint: hint.into(),
        }
    }

    /// A value as it is stored: JSON, sealed if the collection is encrypted.
    fn encode<T: Serialize>(call: &Call<'_>, value: &T) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(value).map_err(|source| StorageError::Serialize {
            key: call.key.to_string(),
            source,
        })?;
        Ok(match call.sealer {
            Some(sealer) => sealer.seal(call.key.as_bytes(), json),
            None => json,
        })
    }

    /// Writes `value` at the collection's level.
    pub async fn set<T: Serialize>(&self, key: &str, value: T) -> Result<WriteReceipt> {
        self.write_value(key, value, None, None).await
    }

    /// Writes `value` at `level` or the collection's level, whichever is stronger.
    pub async fn set_with_consistency<T: Serialize>(
        &self,
        key: &str,
        value: T,
        level: ConsistencyLevel,
    ) -> Result<WriteReceipt> {
        self.write_value(key, value, Some(level), None).await
    }

    /// Writes `value` to expire `ttl` from now (an lww collection's key, not signed): from
    /// then on every node reads the key as absent, and the cluster purges it later. Writing
    /// the key again (with or without a time to live) replaces the expiry: a heartbeat is a
    /// key written again before its time to live runs out.
    pub async fn set_with_ttl<T: Serialize>(
        &self,
        key: &str,
        value: T,
        ttl: std::time::Duration,
    ) -> Result<WriteReceipt> {
        self.write_value(key, value, None, Some(ttl)).await
    }

    async fn write_value<T: Serialize>(
        &self,
        key: &str,
        value: T,
        level: Option<ConsistencyLevel>,
        ttl: Option<std::time::Duration>,
    ) -> Result<WriteReceipt> {
        traced("set", key, async move {
            let call = self.call(key, level)?;
            let mutation = Self::set_mutation(&call, &value, ttl)?;
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// What `set` writes to the call's key, by its collection's strategy; `ttl` (or the
    /// collection's `ttl_ms`) makes an lww value expire.
    fn set_mutation<T: Serialize>(
        call: &Call<'_>,
        value: &T,
        ttl: Option<std::time::Duration>,
    ) -> Result<Mutation> {
        let bytes = Self::encode(call, value)?;
        let ttl = ttl.or(call.plan.ttl_ms.map(std::time::Duration::from_millis));
        if let Some(ttl) = ttl {
            if call.plan.conflict != ConflictStrategy::Register || call.plan.signed {
                return Err(Self::wrong(
                    call,
                    "a time to live",
                    "only values of lww collections that are not signed expire",
                ));
            }
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            return Ok(Mutation::PutExpiring {
                value: bytes,
                expires_at_ms: SystemClock.now_ms().saturating_add(ttl_ms),
            });
        }
        Ok(match call.plan.conflict {
            ConflictStrategy::Register => Self::lww(call, Some(bytes))?,
            // A write without a context does not overwrite what it has not seen: it becomes a
            // sibling. Use `set_with_context` to replace siblings.
            ConflictStrategy::MultiValue => Mutation::PutSibling {
                value: Some(bytes),
                context: Default::default(),
            },
            ConflictStrategy::Document => {
                return Err(Self::wrong(
                    call,
                    "set",
                    "edit a document with `edit` against its revision (POST /v1/documents/KEY)",
                ));
            }
            _ => {
                return Err(Self::wrong(
                    call,
                    "set",
                    "use the counter or set operations",
                ));
            }
        })
    }

    /// What `counter_add` writes to the call's key, by its collection's strategy.
    fn counter_mutation(call: &Call<'_>, delta: i64) -> Result<Mutation> {
        Ok(match call.plan.conflict {
            ConflictStrategy::PnCounter => Mutation::PnCounterAdd(delta),
            ConflictStrategy::GCounter if delta >= 0 => Mutation::GCounterAdd(delta.unsigned_abs()),
            ConflictStrategy::GCounter => {
                return Err(Self::wrong(
                    call,
                    "decrement",
                    "a g_counter only grows; use pn_counter",
                ));
            }
            _ => return Err(Self::wrong(call, "counter_add", counter_hint(call))),
        })
    }

    /// Compare-and-set: writes `value` only if the key is still at `expected` (as returned by
    /// [`Storage::get_versioned`]), or, with `None`, only if the key has no value.
    pub async fn compare_and_set<T: Serialize>(
        &self,
        key: &str,
        value: T,
        expected: Option<&Version>,
    ) -> Result<WriteReceipt> {
        traced("compare_and_set", key, async move {
            let call = self.call(key, None)?;
            if call.plan.conflict != ConflictStrategy::Register {
                return Err(Self::wrong(
                    &call,
                    "compare_and_set",
                    "compare-and-set needs an lww collection",
                ));
            }
            let mutation = Self::lww(&call, Some(Self::encode(&call, &value)?))?;
            let expect = expected.map_or(Expect::Absent, |v| Expect::Version(v.0.clone()));
            match call
                .engine
                .apply_if(call.key.clone(), mutation, expect)
                .await
            {
                Ok(record) => Ok(Self::receipt(&call, &record)),
                Err(EngineError::ExpectationFailed { .. }) => Err(StorageError::VersionMismatch {
                    key: call.key.to_string(),
                }),
                Err(err) => Err(err.into()),
            }
        })
        .await
    }

    /// Reads a value at the collection's level.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.read_value(key, None, Freshness::Latest)
            .await
            .map(|v| v.map(|v| v.value))
    }

    /// Reads a value at `level` or the collection's level, whichever is stronger.
    pub async fn get_with_consistency<T: DeserializeOwned>(
        &self,
        key: &str,
        level: ConsistencyLevel,
    ) -> Result<Option<T>> {
        self.read_value(key, Some(level), Freshness::Latest)
            .await
            .map(|v| v.map(|v| v.value))
    }

    /// Whether `key` holds anything: a value, a sibling, a set member, or a counter that was
    /// ever changed and not deleted since.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        traced("exists", key, async move {
            let call = self.call(key, None)?;
            let record = self.read_record(&call).await?;
            Ok(
                match values::read(record.as_ref(), call.sealer, &call.key)? {
                    Reading::Absent => false,
                    Reading::One(Json::Array(members))
                        if matches!(
                            call.plan.conflict,
                            ConflictStrategy::GSet | ConflictStrategy::OrSet
                        ) =>
                    {
                        !members.is_empty()
                    }
                    _ => true,
                },
            )
        })
        .await
    }

    /// Reads a value with its version, for [`Storage::compare_and_set`].
    pub async fn get_versioned<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>> {
        self.read_value(key, None, Freshness::Latest).await
    }

    /// Reads a value with its version at `level` or the collection's level, whichever is
    /// stronger.
    pub async fn get_versioned_with_consistency<T: DeserializeOwned>(
        &self,
        key: &str,
        level: ConsistencyLevel,
    ) -> Result<Option<Versioned<T>>> {
        self.read_value(key, Some(level), Freshness::Latest).await
    }

    /// Reads a value with its version as this node has it: on a strong collection in a
    /// cluster, a follower's copy without a round trip to the leader, which may miss the
    /// latest writes (never a value that was not written, and never one older than this node
    /// showed before). Elsewhere the same as [`Storage::get_versioned`]. Asking for it is the
    /// only way to get a weaker read than the collection's level.
    pub async fn get_stale<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Versioned<T>>> {
        self.read_value(key, None, Freshness::Stale).await
    }

    async fn read_value<T: DeserializeOwned>(
        &self,
        key: &str,
        level: Option<ConsistencyLevel>,
        freshness: Freshness,
    ) -> Result<Option<Versioned<T>>> {
        traced("get", key, async move {
            let call = self.call(key, level)?;
            let record = match freshness {
                Freshness::Stale => self.read_record_as(&call, Freshness::Stale).await?,
                Freshness::Latest => self.read_record(&call).await?,
            };
            let decode_error = |source| StorageError::Deserialize {
                key: call.key.to_string(),
                source,
            };
            let Some(record) = record else {
                return Ok(None);
            };
            let value = match &record.value {
                // The common case, parsed straight from the stored bytes into `T`.
                Value::Register(Some(bytes)) => {
                    let plain = values::plain(call.sealer, &call.key, bytes)?;
                    serde_json::from_slice(&plain).map_err(decode_error)?
                }
                _ => match values::read(Some(&record), call.sealer, &call.key)? {
                    Reading::Absent => return Ok(None),
                    Reading::One(json) => serde_json::from_value(json).map_err(decode_error)?,
                    Reading::Siblings(values) => {
                        return Err(StorageError::Siblings {
                            key: call.key.to_string(),
                            count: values.len(),
                        });
                    }
                },
            };
            let signed = Signed::of(&call.key, &record);
            let version = Version(record.version);
            Ok(Some(Versioned {
                value,
                version,
                signed,
                expires_at_ms: record.expires_at_ms,
            }))
        })
        .await
    }

    /// Deletes a key: an LWW key gets a tombstone; a multi-value key drops the values this
    /// node has seen (a concurrent write elsewhere survives, as it should); an OR-Set drops
    /// the members it has seen. Grow-only values and PN-counters cannot be deleted.
    pub async fn delete(&self, key: &str) -> Result<WriteReceipt> {
        self.delete_with(key, None).await
    }

    /// Deletes a key at (at least) `level`; see [`Storage::delete`].
    pub async fn delete_with_consistency(
        &self,
        key: &str,
        level: ConsistencyLevel,
    ) -> Result<WriteReceipt> {
        self.delete_with(key, Some(level)).await
    }

    async fn delete_with(
        &self,
        key: &str,
        level: Option<ConsistencyLevel>,
    ) -> Result<WriteReceipt> {
        traced("delete", key, async move {
            let call = self.call(key, level)?;
            if call.plan.conflict == ConflictStrategy::Register {
                // A tombstone needs nothing of the current state: no read first.
                let record = call
                    .engine
                    .apply(call.key.clone(), Self::lww(&call, None)?)
                    .await?;
                return Ok(Self::receipt(&call, &record));
            }
            if call.plan.conflict == ConflictStrategy::Document {
                return self.clear_document(&call).await;
            }
            let current = call.engine.get(&call.key).await?;
            let writes = match (&call.plan.conflict, current.as_ref().map(|r| &r.value)) {
                (ConflictStrategy::MultiValue, Some(Value::MultiValue(register))) => {
                    vec![Mutation::PutSibling {
                        value: None,
                        context: register.context().clone(),
                    }]
                }
                (ConflictStrategy::MultiValue, _) => {
                    vec![Mutation::PutSibling {
                        value: None,
                        context: Default::default(),
                    }]
                }
                (ConflictStrategy::OrSet, Some(Value::OrSet(set))) => set
                    .iter()
                    .map(|member| Mutation::OrSetRemove(member.clone()))
                    .collect(),
                (ConflictStrategy::OrSet, _) => Vec::new(),
                _ => {
                    return Err(Self::wrong(
                        &call,
                        "delete",
                        "grow-only values and counters cannot be deleted; use an lww collection for \
                         values that must be removable",
                    ));
                }
            };
            let batch: Vec<Write> = writes
                .into_iter()
                .map(|m| Write::new(call.key.clone(), m))
                .collect();
            let version = if batch.is_empty() {
                current.map(|r| r.version).unwrap_or_default()
            } else {
                let mut records = call.engine.commit(batch).await?;
                records.pop().map(|r| r.version).unwrap_or_default()
            };
            Ok(WriteReceipt {
                version: Version(version),
                level: call.level,
                delivered: call.plan.guarantee.level,
        })
        })
        .await
    }

    /// Adds `delta` to a counter (`g_counter` accepts only `delta >= 0`); returns the new total.
    pub async fn counter_add(&self, key: &str, delta: i64) -> Result<i64> {
        traced("counter_add", key, async move {
            let call = self.call(key, None)?;
            let mutation = Self::counter_mutation(&call, delta)?;
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(counter_value(&record.value).unwrap_or(0))
        })
        .await
    }

    /// A counter's total (0 when missing).
    pub async fn counter(&self, key: &str) -> Result<i64> {
        traced("counter", key, async move {
            let call = self.call(key, None)?;
            if !matches!(
                call.plan.conflict,
                ConflictStrategy::GCounter | ConflictStrategy::PnCounter
            ) {
                return Err(Self::wrong(&call, "counter", counter_hint(&call)));
            }
            let record = self.read_record(&call).await?;
            Ok(record.and_then(|r| counter_value(&r.value)).unwrap_or(0))
        })
        .await
    }

    /// Adds `member` to a set (`g_set` or `or_set`).
    pub async fn set_add<T: Serialize>(&self, key: &str, member: T) -> Result<WriteReceipt> {
        traced("set_add", key, async move {
            let call = self.call(key, None)?;
            let bytes = Self::encode(&call, &member)?;
            let mutation = match call.plan.conflict {
                ConflictStrategy::GSet => Mutation::GSetAdd(bytes),
                ConflictStrategy::OrSet => Mutation::OrSetAdd(bytes),
                _ => return Err(Self::wrong(&call, "set_add", set_hint(&call))),
            };
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// Removes `member` from an `or_set` (the adds this node has seen; a concurrent add wins).
    pub async fn set_remove<T: Serialize>(&self, key: &str, member: T) -> Result<WriteReceipt> {
        traced("set_remove", key, async move {
            let call = self.call(key, None)?;
            if call.plan.conflict != ConflictStrategy::OrSet {
                return Err(Self::wrong(
                    &call,
                    "set_remove",
                    "only an or_set supports removal",
                ));
            }
            let bytes = Self::encode(&call, &member)?;
            let record = call
                .engine
                .apply(call.key.clone(), Mutation::OrSetRemove(bytes))
                .await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// The members of a set, in their JSON byte order.
    pub async fn set_members<T: DeserializeOwned>(&self, key: &str) -> Result<Vec<T>> {
        traced("set_members", key, async move {
            let call = self.call(key, None)?;
            if !matches!(
                call.plan.conflict,
                ConflictStrategy::GSet | ConflictStrategy::OrSet
            ) {
                return Err(Self::wrong(&call, "set_members", set_hint(&call)));
            }
            Ok(self.get::<Vec<T>>(key).await?.unwrap_or_default())
        })
        .await
    }

    /// Every concurrent value of a key, with the context that replaces them. Works on `lww`
    /// keys too (at most one value).
    pub async fn get_siblings<T: DeserializeOwned>(&self, key: &str) -> Result<Siblings<T>> {
        traced("get_siblings", key, async move {
            let call = self.call(key, None)?;
            let record = self.read_record(&call).await?;
            let decode_error = |source| StorageError::Deserialize {
                key: call.key.to_string(),
                source,
            };
            let values = match values::read(record.as_ref(), call.sealer, &call.key)? {
                Reading::Absent => Vec::new(),
                Reading::One(json) => vec![json],
                Reading::Siblings(values) => values,
            };
            let values = values
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .map_err(decode_error)?;
            let context = match record.map(|r| r.value) {
                Some(Value::MultiValue(register)) => Version(register.context().clone()),
                _ => Version::default(),
            };
            Ok(Siblings { values, context })
        })
        .await
    }

    /// Deletes the values of a multi-value key that `context` (from
    /// [`Storage::get_siblings`]) covers; a value written concurrently, which the context has
    /// not seen, stays.
    pub async fn delete_with_context(&self, key: &str, context: &Version) -> Result<WriteReceipt> {
        traced("delete_with_context", key, async move {
            let call = self.call(key, None)?;
            if call.plan.conflict != ConflictStrategy::MultiValue {
                return Err(Self::wrong(
                    &call,
                    "delete_with_context",
                    "contexts apply to multi_value collections",
                ));
            }
            let mutation = Mutation::PutSibling {
                value: None,
                context: context.0.clone(),
            };
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// Writes a multi-value key, replacing the siblings that `context` (from
    /// [`Storage::get_siblings`]) covers. A client that always writes back its context never
    /// adds siblings.
    pub async fn set_with_context<T: Serialize>(
        &self,
        key: &str,
        value: T,
        context: &Version,
    ) -> Result<WriteReceipt> {
        traced("set_with_context", key, async move {
            let call = self.call(key, None)?;
            if call.plan.conflict != ConflictStrategy::MultiValue {
                return Err(Self::wrong(
                    &call,
                    "set_with_context",
                    "contexts apply to multi_value collections",
                ));
            }
            let bytes = Self::encode(&call, &value)?;
            let mutation = Mutation::PutSibling {
                value: Some(bytes),
                context: context.0.clone(),
            };
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            Ok(Self::receipt(&call, &record))
        })
        .await
    }

    /// Up to `limit` live keys starting with `prefix`, in key order, after `start_after` if
    /// given. A prefix without `:` is a collection name and lists that collection.
    pub async fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        traced("scan", prefix, async move {
            let prefix = if prefix.contains(':') {
                prefix.to_owned()
            } else {
                format!("{prefix}:")
            };
            let after = start_after
                .map(|k| {
                    k.parse::<Key>().map_err(|source| StorageError::Key {
                        key: k.to_owned(),
                        source,
                    })
                })
                .transpose()?;
            // The prefix names its collection (the part before the first `:`), which names the engine.
            let collection = prefix.split(':').next().unwrap_or_default();
            let route = self.inner.routes.get(collection);
            let (engine, sealer) = (&route.engine, self.sealer_of(&route.plan));
            let mut out = Vec::new();
            let mut cursor = after;
            // Tombstones are skipped, so a page may need several engine pages.
            while out.len() < limit {
                let page = engine
                    .scan(prefix.as_bytes(), cursor.as_ref(), limit - out.len())
                    .await?;
                let Some((last, _)) = page.last() else { break };
                cursor = Some(last.clone());
                for (key, record) in page {
                    let value = match values::read(Some(&record), sealer, &key)? {
                        Reading::Absent => continue,
                        Reading::One(json) => json,
                        Reading::Siblings(values) => Json::Array(values),
                    };
                    out.push(Entry {
                        key: key.to_string(),
                        value,
                    });
                }
            }
            Ok(out)
        })
        .await
    }
}

fn counter_value(value: &Value) -> Option<i64> {
    match value {
        Value::PnCounter(counter) => Some(counter.value()),
        Value::GCounter(counter) => Some(i64::try_from(counter.value()).unwrap_or(i64::MAX)),
        _ => None,
    }
}

fn counter_hint(call: &Call<'_>) -> String {
    format!(
        "set `storage.collections.{}.conflict: pn_counter` (or g_counter) to count",
        call.key.collection()
    )
}

fn set_hint(call: &Call<'_>) -> String {
    format!(
        "set `storage.collections.{}.conflict: or_set` (or g_set) to keep a set",
        call.key.collection()
    )
}

/// Runs a storage operation in a span carrying its key, level and outcome (`ok` or the error's
/// kind).
async fn traced<T>(
    op: &'static str,
    key: &str,
    operation: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "storage",
        op,
        key,
        level = tracing::field::Empty,
        outcome = tracing::field::Empty
    );
    let result = operation.instrument(span.clone()).await;
    span.record(
        "outcome",
        match &result {
            Ok(_) => "ok",
            Err(err) => err.kind(),
        },
    );
    result
}
