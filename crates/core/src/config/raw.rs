//! The configuration file as written, and its resolution into [`Config`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::{RenderOptions, SnippetMode};

use super::error::{expected_names, nearest, unknown_name};
use super::locate::{locate, path_at};
use super::{
    Backend, ClientAuth, ClusterConfig, CollectionConfig, Config, ConfigError, ConflictStrategy,
    IsolationLevel, PeerAuth, RedisConfig, Replication, ReplicationStrategy, SupabaseConfig,
    signed_rule,
};
use crate::key::validate_collection;
use crate::level::ConsistencyLevel;
use crate::node::NodeId;
use crate::quorum::{QuorumError, QuorumSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    storage: Option<Storage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Storage {
    node_id: Option<String>,
    data_dir: Option<String>,
    default_consistency: Option<ConsistencyLevel>,
    default_backend: Option<Backend>,
    default_conflict: Option<ConflictStrategy>,
    #[serde(default)]
    consistency_overrides: BTreeMap<String, ConsistencyLevel>,
    #[serde(default)]
    collections: BTreeMap<String, Collection>,
    replication: Option<ReplicationBlock>,
    redis: Option<Redis>,
    supabase: Option<Supabase>,
    clock: Option<Clock>,
    cluster: Option<Cluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cluster {
    client_addr: String,
    peer_addr: String,
    resp_addr: Option<String>,
    #[serde(default)]
    peers: BTreeMap<String, String>,
    authority: Option<String>,
    #[serde(default)]
    insecure: bool,
    clients: Option<ClientAuth>,
    #[serde(default)]
    client_tls: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Collection {
    backend: Option<Backend>,
    consistency: Option<ConsistencyLevel>,
    conflict: Option<ConflictStrategy>,
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    signed: bool,
    ttl_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicationBlock {
    strategy: Option<ReplicationStrategy>,
    replicas: Option<u8>,
    write_quorum: Option<u8>,
    read_quorum: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Redis {
    url: Option<String>,
    consistency: Option<ConsistencyLevel>,
    replicas: Option<u8>,
    wait_timeout_ms: Option<u64>,
    read_replicas: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Supabase {
    url: String,
    isolation_level: Option<IsolationLevel>,
    connection_pool_size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clock {
    max_offset_ms: Option<u64>,
}

/// Builds errors that point into the text being parsed.
struct Source<'a> {
    text: &'a str,
    name: &'a str,
}

impl Source<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = locate(self.text, field);
        ConfigError {
            source_name: self.name.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
            suggestion: None,
        }
    }

    fn serde_error(&self, err: &serde_saphyr::Error) -> ConfigError {
        let mut options = RenderOptions::default();
        options.snippets = SnippetMode::Off;
        let rendered = err.render_with_options(options);
        // The rendered text ends with the position; we report it in our own format.
        let message = rendered
            .split(" at line ")
            .next()
            .unwrap_or(&rendered)
            .trim()
            .to_owned();
        let (line, column) = err
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let mut field = path_at(self.text, line);
        let suggestion = unknown_name(&message).and_then(|unknown| {
            // For an unknown field the path ends with the unknown key; name its parent too.
            if message.contains("unknown field") && field.ends_with(unknown) {
                field.truncate(field.len() - unknown.len());
                field.push_str(unknown);
            }
            nearest(unknown, expected_names(&message))
        });
        if field.is_empty() {
            field = "(document)".into();
        }
        ConfigError {
            source_name: self.name.to_owned(),
            line,
            column,
            field,
            message,
            suggestion,
        }
    }
}

pub(super) fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
    let source = Source {
        text,
        name: source_name,
    };
    let file: File = serde_saphyr::from_str(text).map_err(|err| source.serde_error(&err))?;
    let Some(storage) = file.storage else {
        return Ok(Config::default());
    };
    resolve(storage, &source)
}

fn resolve(storage: Storage, source: &Source<'_>) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    if let Some(id) = storage.node_id {
        config.node_id =
            NodeId::new(id).map_err(|e| source.error("storage.node_id", e.to_string()))?;
    }
    config.data_dir = storage.data_dir;
    if let Some(level) = storage.default_consistency {
        config.default_consistency = level;
    }
    if let Some(backend) = storage.default_backend {
        config.default_backend = backend;
    }
    if let Some(conflict) = storage.default_conflict {
        config.default_conflict = conflict;
    }
    if let Some(block) = storage.replication {
        config.replication = replication(block, source)?;
    }
    if let Some(redis) = storage.redis {
        let consistency = redis.consistency.unwrap_or(ConsistencyLevel::Eventual);
        if consistency == ConsistencyLevel::Causal {
            return Err(source.error(
                "storage.redis.consistency",
                "Redis offers eventual (asynchronous replication) or strong (WAIT); \
                 causal is configured per collection",
            ));
        }
        let replicas = redis.replicas.unwrap_or(0);
        if consistency == ConsistencyLevel::Strong && replicas == 0 {
            return Err(source.error(
                "storage.redis.replicas",
                "strong Redis writes WAIT for `replicas` replicas, so it must be at least 1",
            ));
        }
        config.redis = Some(RedisConfig {
            url: redis.url.unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            consistency,
            replicas,
            wait_timeout_ms: redis.wait_timeout_ms.unwrap_or(1000),
            read_replicas: redis.read_replicas.unwrap_or_default(),
        });
    }
    if let Some(supabase) = storage.supabase {
        let pool = supabase.connection_pool_size.unwrap_or(10);
        if pool == 0 {
            return Err(source.error(
                "storage.supabase.connection_pool_size",
                "the pool needs at least one connection",
            ));
        }
        config.supabase = Some(SupabaseConfig {
            url: supabase.url,
            isolation_level: supabase
                .isolation_level
                .unwrap_or(IsolationLevel::Serializable),
            connection_pool_size: pool,
        });
    }
    if let Some(cluster) = storage.cluster {
        let addr = |field: &str, text: &str| {
            text.parse::<std::net::SocketAddr>().map_err(|_| {
                source.error(
                    field,
                    format!("`{text}` is not an address of the form 127.0.0.1:7000"),
                )
            })
        };
        let client_addr = addr("storage.cluster.client_addr", &cluster.client_addr)?;
        let peer_addr = addr("storage.cluster.peer_addr", &cluster.peer_addr)?;
        let resp_addr = cluster
            .resp_addr
            .as_deref()
            .map(|text| addr("storage.cluster.resp_addr", text))
            .transpose()?;
        let mut peers = BTreeMap::new();
        for (id, text) in &cluster.peers {
            let field = format!("storage.cluster.peers.{id}");
            let node = NodeId::new(id.clone()).map_err(|e| source.error(&field, e.to_string()))?;
            if node == config.node_id {
                return Err(
                    source.error(&field, "a node is not its own peer; list the other nodes")
                );
            }
            peers.insert(node, addr(&field, text)?);
        }
        let peer_auth = match (cluster.authority, cluster.insecure) {
            (Some(_), true) => {
                return Err(source.error(
                    "storage.cluster.insecure",
                    "`insecure: true` turns off the peer authentication that `authority` asks for; \
                     set one of them",
                ));
            }
            (Some(authority), false) => {
                let authority = authority.trim().to_owned();
                if authority.starts_with("ed25519:") && !is_ed25519_text(&authority) {
                    return Err(source.error(
                        "storage.cluster.authority",
                        "an ed25519 public key is `ed25519:` and 43 characters of URL-safe base64",
                    ));
                }
                PeerAuth::Authority(authority)
            }
            (None, true) => PeerAuth::Insecure,
            (None, false) => {
                return Err(source.error(
                    "storage.cluster",
                    "a node needs `authority`: the public key (or the file holding it) of the \
                     authority that admits this cluster's nodes (`agentstore authority new`); \
                     or `insecure: true` for plaintext, unauthenticated peer links on a closed network",
                ));
            }
        };
        let client_auth = match (cluster.clients, &peer_auth) {
            (Some(ClientAuth::Tokens), PeerAuth::Insecure) => {
                return Err(source.error(
                    "storage.cluster.clients",
                    "tokens are checked against the cluster's authority; name it with `authority` \
                     instead of `insecure: true`",
                ));
            }
            (Some(clients), _) => clients,
            (None, PeerAuth::Authority(_)) => ClientAuth::Tokens,
            (None, PeerAuth::Insecure) => ClientAuth::Open,
        };
        if cluster.client_tls && peer_auth == PeerAuth::Insecure {
            return Err(source.error(
                "storage.cluster.client_tls",
                "the client API's certificate is signed by the cluster's authority; name it \
                 with `authority` instead of `insecure: true`",
            ));
        }
        let nodes = peers.len() + 1;
        if usize::from(config.replication.quorum.n) > nodes {
            return Err(source.error(
                "storage.replication.replicas",
                format!(
                    "{} replicas need at least that many nodes; the cluster has {nodes}",
                    config.replication.quorum.n
                ),
            ));
        }
        config.cluster = Some(ClusterConfig {
            client_addr,
            peer_addr,
            resp_addr,
            peers,
            peer_auth,
            client_auth,
            client_tls: cluster.client_tls,
        });
    }
    if let Some(clock) = storage.clock {
        config.max_clock_offset_ms = clock.max_offset_ms.unwrap_or(config.max_clock_offset_ms);
    }

    for (name, collection) in storage.collections {
        let field = format!("storage.collections.{name}");
        validate_collection(name.as_bytes()).map_err(|e| source.error(&field, e.to_string()))?;
        let backend = collection.backend.unwrap_or(config.default_backend);
        check_backend_block(&config, backend, &format!("{field}.backend"), source)?;
        let conflict = collection.conflict.unwrap_or(config.default_conflict);
        if collection.encrypted
            && !matches!(
                conflict,
                ConflictStrategy::Register | ConflictStrategy::MultiValue
            )
        {
            return Err(source.error(
                &format!("{field}.encrypted"),
                format!(
                    "only lww and multi_value values can be encrypted: a {conflict} merges \
                     what it holds, which it cannot do without reading it"
                ),
            ));
        }
        if let Some(ttl_ms) = collection.ttl_ms {
            let why = if ttl_ms == 0 {
                Some("a time to live is at least 1 ms".to_owned())
            } else if conflict != ConflictStrategy::Register {
                Some(format!(
                    "only lww values expire: a {conflict} merges what every replica holds, and \
                     an expiry would race its merges"
                ))
            } else if collection.signed {
                Some("signed values do not expire: the signature covers the value alone".into())
            } else {
                None
            };
            if let Some(why) = why {
                return Err(source.error(&format!("{field}.ttl_ms"), why));
            }
        }
        if collection.signed {
            check_signed(
                &config,
                backend,
                conflict,
                &format!("{field}.signed"),
                source,
            )?;
        }
        config.collections.insert(
            name,
            CollectionConfig {
                backend: collection.backend,
                consistency: collection.consistency,
                conflict: collection.conflict,
                encrypted: collection.encrypted,
                signed: collection.signed,
                ttl_ms: collection.ttl_ms,
            },
        );
    }
    check_backend_block(
        &config,
        config.default_backend,
        "storage.default_backend",
        source,
    )?;
    for (name, level) in storage.consistency_overrides {
        let field = format!("storage.consistency_overrides.{name}");
        validate_collection(name.as_bytes()).map_err(|e| source.error(&field, e.to_string()))?;
        let entry = config.collections.entry(name.clone()).or_default();
        match entry.consistency {
            Some(other) if other != level => {
                return Err(source.error(
                    &field,
                    format!(
                        "`{name}` is {level} here but {other} in storage.collections.{name}.consistency; \
                         set it in one place"
                    ),
                ));
            }
            _ => entry.consistency = Some(level),
        }
    }
    check_documents_are_strong(&config, source)?;
    Ok(config)
}

/// An `ot_text` collection needs one order of its edits: the strong level (a Raft group in a
/// cluster, one ACID engine embedded). At a weaker level two replicas would apply concurrent
/// edits in different orders, and a merge could only keep one replica's document.
fn check_documents_are_strong(config: &Config, source: &Source<'_>) -> Result<(), ConfigError> {
    let why = |level: ConsistencyLevel| {
        format!(
            "an ot_text collection must be strong (it is {level}): its edits are transformed \
             in one order, which only the strong level gives"
        )
    };
    for (name, settings) in &config.collections {
        let conflict = settings.conflict.unwrap_or(config.default_conflict);
        let level = settings.consistency.unwrap_or(config.default_consistency);
        if conflict == ConflictStrategy::Document && level != ConsistencyLevel::Strong {
            return Err(source.error(&format!("storage.collections.{name}.conflict"), why(level)));
        }
    }
    if config.default_conflict == ConflictStrategy::Document
        && config.default_consistency != ConsistencyLevel::Strong
    {
        return Err(source.error("storage.default_conflict", why(config.default_consistency)));
    }
    Ok(())
}

/// A signed collection holds lww registers on the nodes' own engine (the nodes are what
/// check the signatures), in a cluster with an authority (what the signatures chain to).
fn check_signed(
    config: &Config,
    backend: Backend,
    conflict: ConflictStrategy,
    field: &str,
    source: &Source<'_>,
) -> Result<(), ConfigError> {
    if let Err(reason) = signed_rule(backend, conflict) {
        return Err(source.error(field, reason));
    }
    match config.cluster.as_ref().map(|c| &c.peer_auth) {
        Some(PeerAuth::Authority(_)) => Ok(()),
        _ => Err(source.error(
            field,
            "signatures chain to the cluster's authority: signed collections need \
             storage.cluster with an `authority`",
        )),
    }
}

fn check_backend_block(
    config: &Config,
    backend: Backend,
    field: &str,
    source: &Source<'_>,
) -> Result<(), ConfigError> {
    let missing = match backend {
        Backend::Redis if config.redis.is_none() => Some("storage.redis"),
        Backend::Supabase if config.supabase.is_none() => Some("storage.supabase"),
        _ => None,
    };
    match missing {
        Some(block) => {
            Err(source.error(field, format!("backend {backend} needs a `{block}` block")))
        }
        None => Ok(()),
    }
}

fn replication(block: ReplicationBlock, source: &Source<'_>) -> Result<Replication, ConfigError> {
    let strategy = block.strategy.unwrap_or(ReplicationStrategy::Async);
    let n = block.replicas.unwrap_or(1);
    let implied_w = match strategy {
        ReplicationStrategy::Async => 1,
        ReplicationStrategy::Sync => n,
        ReplicationStrategy::Quorum => QuorumSpec::majority(n),
    };
    let w = block.write_quorum.unwrap_or(implied_w);
    if strategy != ReplicationStrategy::Quorum && w != implied_w {
        return Err(source.error(
            "storage.replication.write_quorum",
            format!(
                "strategy {strategy} acknowledges after {implied_w} replica(s); \
                 use strategy quorum to choose write_quorum"
            ),
        ));
    }
    let r = block.read_quorum.unwrap_or(match strategy {
        ReplicationStrategy::Quorum => QuorumSpec::majority(n),
        _ => 1,
    });
    let quorum = QuorumSpec { n, w, r };
    quorum.validate().map_err(|err| {
        let field = match err {
            QuorumError::NoReplicas => "storage.replication.replicas",
            QuorumError::WriteQuorum { .. } => "storage.replication.write_quorum",
            QuorumError::ReadQuorum { .. } => "storage.replication.read_quorum",
        };
        source.error(field, err.to_string())
    })?;
    Ok(Replication { strategy, quorum })
}

/// Whether `text` has the form of an ed25519 public key: `ed25519:` and 32 bytes in unpadded
/// URL-safe base64 (43 characters; the last one carries 4 bits, so it is one of 16).
fn is_ed25519_text(text: &str) -> bool {
    let Some(encoded) = text.strip_prefix("ed25519:") else {
        return false;
    };
    let alphabet = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    encoded.len() == 43
        && encoded.bytes().all(alphabet)
        && encoded
            .bytes()
            .last()
            .is_some_and(|c| b"AEIMQUYcgkosw048".contains(&c))
}
