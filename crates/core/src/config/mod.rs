//! Configuration: the spec's YAML, plus collection routing and per-collection conflict
//! strategies.
//!
//! Every block of the spec's "Configuration" sections is accepted verbatim. agentstore adds:
//! `node_id`, `data_dir`, `default_backend`, `default_conflict`, a `collections` map (backend,
//! consistency and conflict strategy per collection), `redis.url` and `clock.max_offset_ms`.
//! Unknown fields are errors, and every error names the file, line, column and field.

mod error;
mod locate;
mod raw;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::error::ConfigError;
use crate::key::validate_collection;
use crate::level::ConsistencyLevel;
use crate::node::NodeId;
use crate::quorum::{QuorumGuarantee, QuorumSpec};
pub use crate::record::Kind as ConflictStrategy;

/// Where a collection's keys are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded engine in the node's data directory.
    Local,
    /// A Redis deployment (`storage.redis`).
    Redis,
    /// PostgreSQL, e.g. a Supabase project (`storage.supabase`).
    #[serde(alias = "postgres")]
    Supabase,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Local => "local",
            Backend::Redis => "redis",
            Backend::Supabase => "supabase",
        })
    }
}

/// How writes reach a key's replicas (the spec's "Replication Strategies").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationStrategy {
    /// Acknowledge after the local durable write; replicate in the background (W = 1).
    Async,
    /// Acknowledge after every replica has the write (W = N).
    Sync,
    /// Acknowledge after W replicas; reads ask R.
    Quorum,
}

impl fmt::Display for ReplicationStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicationStrategy::Async => "async",
            ReplicationStrategy::Sync => "sync",
            ReplicationStrategy::Quorum => "quorum",
        })
    }
}

/// Replication settings with the quorum sizes they imply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// The strategy.
    pub strategy: ReplicationStrategy,
    /// N, W and R (W is 1 for async and N for sync).
    pub quorum: QuorumSpec,
}

/// The spec's `storage.redis` block, plus the server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Address of the primary, `redis://host:port[/db]`.
    pub url: String,
    /// `eventual` (asynchronous replication) or `strong` (`WAIT` for `replicas`).
    pub consistency: ConsistencyLevel,
    /// Replicas that must acknowledge a strong write.
    pub replicas: u8,
    /// How long a strong write waits for them.
    pub wait_timeout_ms: u64,
    /// Replicas (`redis://host:port`) that may serve reads of causal collections in a
    /// session, once they have reached the session's replication offset.
    pub read_replicas: Vec<String>,
}

/// Transaction isolation for PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// SERIALIZABLE (the default).
    Serializable,
    /// READ COMMITTED.
    ReadCommitted,
}

/// The spec's `storage.supabase` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupabaseConfig {
    /// The database URL.
    pub url: String,
    /// Isolation of every transaction.
    pub isolation_level: IsolationLevel,
    /// Connections in the pool.
    pub connection_pool_size: u32,
}

/// Per-collection settings; unset fields fall back to the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectionConfig {
    /// Where its keys live.
    pub backend: Option<Backend>,
    /// Its consistency level (also settable through `consistency_overrides`).
    pub consistency: Option<ConsistencyLevel>,
    /// How concurrent writes to one key merge; also the kind of value its keys hold.
    pub conflict: Option<ConflictStrategy>,
    /// Whether its values are encrypted before they leave the store (`encrypted: true`).
    pub encrypted: bool,
    /// Whether every write must carry its writer's signature, which every node checks
    /// (`signed: true`; see `crate::signing`).
    pub signed: bool,
    /// The time to live of every value written without one of its own (`ttl_ms`; lww
    /// collections only): the key reads as absent that long after its last write.
    pub ttl_ms: Option<u64>,
}

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's id (unique in a deployment).
    pub node_id: NodeId,
    /// The data directory; `None` means the documented default.
    pub data_dir: Option<String>,
    /// Level of collections without an override.
    pub default_consistency: ConsistencyLevel,
    /// Backend of collections without one.
    pub default_backend: Backend,
    /// Conflict strategy of collections without one.
    pub default_conflict: ConflictStrategy,
    /// Named collections.
    pub collections: BTreeMap<String, CollectionConfig>,
    /// Replication between nodes.
    pub replication: Replication,
    /// The Redis backend, if configured.
    pub redis: Option<RedisConfig>,
    /// The PostgreSQL/Supabase backend, if configured.
    pub supabase: Option<SupabaseConfig>,
    /// Largest clock offset accepted from another node, in milliseconds.
    pub max_clock_offset_ms: u64,
    /// This node's place in a cluster, when it runs as a node (`agentstore node`).
    pub cluster: Option<ClusterConfig>,
}

/// A node's addresses and its peers (`storage.cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Where clients reach the node's HTTP API.
    pub client_addr: std::net::SocketAddr,
    /// Where the other nodes reach this one.
    pub peer_addr: std::net::SocketAddr,
    /// Where the node speaks RESP, the Redis protocol, to clients (`None`: it does not).
    pub resp_addr: Option<std::net::SocketAddr>,
    /// Every other node and its peer address.
    pub peers: BTreeMap<NodeId, std::net::SocketAddr>,
    /// Who may be a peer.
    pub peer_auth: PeerAuth,
    /// Who may use the client API.
    pub client_auth: ClientAuth,
    /// Whether the client API speaks HTTPS, with the certificate `agentstore admit --host`
    /// wrote into the data directory (signed by the authority).
    pub client_tls: bool,
}

/// Who may use a node's client API (`storage.cluster.clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Every request but `/healthz` and the OpenAPI document carries a capability token from
    /// the cluster's authority (`Authorization: Bearer`), and may do only what it grants (the
    /// default with `authority`).
    Tokens,
    /// Anyone who reaches the client address may do anything (the default with
    /// `insecure: true`).
    Open,
}

/// Who may be a node's peer (`storage.cluster.authority` / `insecure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    /// Nodes admitted by this authority, over mutual TLS: its public key (`ed25519:…`) or the
    /// path of a file holding it.
    Authority(String),
    /// Anyone who connects, in plaintext (`insecure: true`: a closed network or a benchmark).
    Insecure,
}

/// Default largest accepted clock offset between nodes.
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;

impl Default for Config {
    /// An embedded single node: everything local, eventual, LWW, no replication.
    fn default() -> Self {
        Self {
            node_id: NodeId::new("local").expect("a valid literal"),
            data_dir: None,
            default_consistency: ConsistencyLevel::Eventual,
            default_backend: Backend::Local,
            default_conflict: ConflictStrategy::Register,
            collections: BTreeMap::new(),
            replication: Replication {
                strategy: ReplicationStrategy::Async,
                quorum: QuorumSpec { n: 1, w: 1, r: 1 },
            },
            redis: None,
            supabase: None,
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            cluster: None,
        }
    }
}

/// What a collection really gets: its settings and the guarantee they deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionPlan {
    /// The collection.
    pub name: String,
    /// Where its keys live.
    pub backend: Backend,
    /// The level it is configured for.
    pub consistency: ConsistencyLevel,
    /// Its conflict strategy (and value kind).
    pub conflict: ConflictStrategy,
    /// Whether its values are stored encrypted.
    pub encrypted: bool,
    /// Whether its writes must be signed by their writers.
    pub signed: bool,
    /// The time to live of values written without one (`ttl_ms`).
    pub ttl_ms: Option<u64>,
    /// Replication between nodes.
    pub replication: Replication,
    /// What the configuration really delivers.
    pub guarantee: Guarantee,
}

/// The guarantee a collection really gets, which may differ from the level it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarantee {
    /// The strongest level really delivered.
    pub level: ConsistencyLevel,
    /// How it is delivered.
    pub summary: String,
    /// What the level does not cover on this backend, if anything.
    pub caveat: Option<String>,
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.level, self.summary)?;
        if let Some(caveat) = &self.caveat {
            write!(f, " ({caveat})")?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses a YAML configuration. `source_name` (usually the file path) is used in errors.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        raw::parse(text, source_name)
    }

    /// Settings and guarantee of `collection`, with defaults applied.
    pub fn plan(&self, collection: &str) -> CollectionPlan {
        let settings = self
            .collections
            .get(collection)
            .cloned()
            .unwrap_or_default();
        let backend = settings.backend.unwrap_or(self.default_backend);
        let consistency = settings.consistency.unwrap_or(self.default_consistency);
        CollectionPlan {
            name: collection.to_owned(),
            backend,
            consistency,
            conflict: settings.conflict.unwrap_or(self.default_conflict),
            encrypted: settings.encrypted,
            signed: settings.signed,
            ttl_ms: settings.ttl_ms,
            replication: self.replication,
            guarantee: self.guarantee(backend, consistency),
        }
    }

    /// Settings and guarantee of `collection` as the node this file configures serves it:
    /// [`Config::plan`] for an embedded store; in a cluster (`storage.cluster`), `local`
    /// collections get the cluster's guarantee for their level: leaderless replication
    /// (eventual), causal broadcast (causal) or the Raft group (strong).
    pub fn node_plan(&self, collection: &str) -> CollectionPlan {
        let mut plan = self.plan(collection);
        if self.cluster.is_some() && plan.backend == Backend::Local {
            plan.guarantee = match plan.consistency {
                ConsistencyLevel::Eventual => self.cluster_guarantee(),
                ConsistencyLevel::Causal => self.causal_guarantee(),
                ConsistencyLevel::Strong => self.raft_guarantee(),
            };
        }
        plan
    }

    /// Plans of every named collection, in name order.
    pub fn plans(&self) -> Vec<CollectionPlan> {
        self.collections
            .keys()
            .map(|name| self.plan(name))
            .collect()
    }

    /// What `backend` delivers to a collection configured for `level`.
    fn guarantee(&self, backend: Backend, level: ConsistencyLevel) -> Guarantee {
        match backend {
            Backend::Local => Guarantee {
                level: ConsistencyLevel::Strong,
                summary: "one ACID engine on one node (linearizable); every write is fsynced \
                          before it is acknowledged"
                    .into(),
                caveat: None,
            },
            Backend::Redis => match self.redis_wait(Backend::Redis, level) {
                Some(redis) => Guarantee {
                    level: ConsistencyLevel::Strong,
                    summary: format!(
                        "synchronous replication: every write waits (WAIT) for {} replica(s), \
                             at most {} ms",
                        redis.replicas, redis.wait_timeout_ms
                    ),
                    caveat: Some(
                        "not linearizable: a failover can still lose or reorder acknowledged \
                             writes, as Redis documents for WAIT"
                            .into(),
                    ),
                },
                None if level == ConsistencyLevel::Causal => Guarantee {
                    level: ConsistencyLevel::Causal,
                    summary: "one Redis primary orders every write; a session reads from a \
                              replica only once it has reached the session's replication \
                              offset, otherwise from the primary"
                        .into(),
                    caveat: Some(
                        "asynchronous replication: a failover can lose acknowledged writes, \
                         which a session may then miss"
                            .into(),
                    ),
                },
                None => Guarantee {
                    level: ConsistencyLevel::Eventual,
                    summary: "asynchronous Redis replication".into(),
                    caveat: (level > ConsistencyLevel::Eventual).then(|| {
                        format!(
                            "the collection asks for {level}, which Redis gives only with \
                                 storage.redis.consistency: strong; calls are refused until then"
                        )
                    }),
                },
            },
            Backend::Supabase => {
                let isolation = self.supabase.as_ref().map(|s| s.isolation_level);
                Guarantee {
                    level: ConsistencyLevel::Strong,
                    summary: match isolation {
                        Some(IsolationLevel::ReadCommitted) => {
                            "read committed on one PostgreSQL primary".into()
                        }
                        _ => "serializable transactions on one PostgreSQL primary".into(),
                    },
                    caveat: (isolation == Some(IsolationLevel::ReadCommitted)).then(|| {
                        "multi-key transactions are not serializable at read_committed".into()
                    }),
                }
            }
        }
    }

    /// The Redis settings when writes of a collection on `backend` at `level` must `WAIT`
    /// for replicas: on Redis, with `storage.redis.consistency: strong`, for collections that
    /// ask for more than eventual. Eventual collections skip the wait even then.
    pub fn redis_wait(&self, backend: Backend, level: ConsistencyLevel) -> Option<&RedisConfig> {
        self.redis.as_ref().filter(|redis| {
            backend == Backend::Redis
                && redis.consistency == ConsistencyLevel::Strong
                && level > ConsistencyLevel::Eventual
        })
    }

    /// What a cluster of nodes delivers to the collections it holds (those on the `local`
    /// backend, replicated between nodes without a leader): eventual consistency, with the
    /// read/write overlap of the quorum settings.
    pub fn cluster_guarantee(&self) -> Guarantee {
        let QuorumSpec { n, w, r } = self.replication.quorum;
        let overlapping = self.quorum_guarantee().overlapping;
        Guarantee {
            level: ConsistencyLevel::Eventual,
            summary: format!(
                "leaderless replication across the cluster ({}, N={n} W={w} R={r}); {}",
                self.replication.strategy,
                if overlapping {
                    "W + R > N: a read that starts after a write was acknowledged sees it"
                } else {
                    "W + R <= N: a read may miss an acknowledged write until replication catches up"
                }
            ),
            caveat: Some(
                "not linearizable: concurrent writes resolve by the collection's conflict \
                 strategy, and readers may disagree until read repair"
                    .into(),
            ),
        }
    }

    /// What a cluster delivers to the collections on the `local` backend configured causal:
    /// causal broadcast to every member, with session tokens.
    pub fn causal_guarantee(&self) -> Guarantee {
        Guarantee {
            level: ConsistencyLevel::Causal,
            summary: "causal+: every member holds every key; a write is durable on the node \
                      that takes it and reaches the others in causal order (what it depends on \
                      first); a session token keeps read-your-writes, monotonic reads and \
                      writes, and writes-follow-reads on whichever node the client uses"
                .into(),
            caveat: Some(
                "not linearizable: concurrent writes resolve by the collection's conflict \
                 strategy; a write lives only on the node that took it until it reaches \
                 another member"
                    .into(),
            ),
        }
    }

    /// What a cluster delivers to the collections on the `local` backend configured strong:
    /// they go through the cluster's Raft group.
    pub fn raft_guarantee(&self) -> Guarantee {
        Guarantee {
            level: ConsistencyLevel::Strong,
            summary: "linearizable: a Raft group of the cluster's voters; a write is \
                      acknowledged once a majority has it durably, reads confirm the leader \
                      with a quorum (read index)"
                .into(),
            caveat: Some("unavailable without a majority of the voters".into()),
        }
    }

    /// The quorum guarantee of the replication settings.
    pub fn quorum_guarantee(&self) -> QuorumGuarantee {
        self.replication
            .quorum
            .validate()
            .expect("validated when the config was built")
    }

    /// Checks the invariants a hand-built `Config` must hold; parsed configs already do.
    pub fn validate(&self) -> Result<(), String> {
        self.replication
            .quorum
            .validate()
            .map_err(|e| e.to_string())?;
        for (name, settings) in &self.collections {
            validate_collection(name.as_bytes())
                .map_err(|e| format!("collection `{name}`: {e}"))?;
            let backend = settings.backend.unwrap_or(self.default_backend);
            if backend == Backend::Redis && self.redis.is_none() {
                return Err(format!(
                    "collection `{name}` uses redis but storage.redis is not set"
                ));
            }
            if backend == Backend::Supabase && self.supabase.is_none() {
                return Err(format!(
                    "collection `{name}` uses supabase but storage.supabase is not set"
                ));
            }
            if settings.signed {
                signed_rule(backend, settings.conflict.unwrap_or(self.default_conflict))
                    .map_err(|reason| format!("collection `{name}`: {reason}"))?;
            }
        }
        Ok(())
    }
}

/// What a signed collection must be: lww registers (a signature covers one writer's value;
/// a merged counter or set has many writers) on the local backend (the nodes check
/// signatures; Redis and PostgreSQL would store what they are given).
pub(crate) fn signed_rule(backend: Backend, conflict: ConflictStrategy) -> Result<(), String> {
    if conflict != ConflictStrategy::Register {
        return Err(format!(
            "only lww collections can be signed: a {conflict} value merges many writers' \
             changes, which no one writer's signature covers"
        ));
    }
    if backend != Backend::Local {
        return Err(format!(
            "only local collections can be signed: the nodes check the signatures, and \
             {backend} would store whatever it is given"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
