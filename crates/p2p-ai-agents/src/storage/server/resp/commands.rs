//! The commands a node answers over RESP, each a call on the same [`Storage`] the HTTP API
//! serves: same levels, same conflict strategies, same errors (their codes in upper case:
//! `-QUORUM_UNAVAILABLE …`, `-WRONGTYPE …` for a value of another kind, `-NOAUTH`,
//! `-NOPERM`), same capability checks.
//!
//! Values: `SET` stores its argument as a JSON string (it must be UTF-8); `GET` answers a
//! string value as its text and any other JSON value (written over HTTP) as its JSON text, a
//! counter as its total. A connection is one session: its reads see its own writes, and
//! `AGENTSTORE.SESSION` hands the session's token to another connection or node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentstore_core::config::ConflictStrategy;
use agentstore_core::{ConsistencyLevel, Key};
use agentstore_engine::session::SessionToken;
use agentstore_engine::{PhysicalClock, SystemClock};
use agentstore_trust::{Capability, Operation};
use serde_json::Value as Json;

use super::super::auth;
use super::super::{Api, ApiError};
use super::frame::Reply;
use crate::storage::{Storage, StorageError};

/// Cursors of unfinished `SCAN`s one connection keeps (the oldest is dropped beyond).
const CURSORS: usize = 64;
/// `SCAN`'s page size when `COUNT` is not given (Redis's default).
const SCAN_COUNT: usize = 10;
/// The most keys one `SCAN` page returns.
const SCAN_MAX: usize = 1000;

/// What a connection remembers between its commands.
#[derive(Debug, Default)]
pub(super) struct Connection {
    /// The token `AUTH` proved (when the node checks tokens).
    capability: Option<Arc<Capability>>,
    /// The level `AGENTSTORE.LEVEL` asked for (`None`: each collection's).
    level: Option<ConsistencyLevel>,
    /// The connection's session: what its calls saw and wrote.
    pub(super) session: SessionToken,
    /// Unfinished scans: cursor number → (prefix, last key returned).
    cursors: BTreeMap<u64, (String, String)>,
    next_cursor: u64,
}

/// The outcome of one command for the connection loop.
pub(super) enum Next {
    /// Answer and read the next command.
    Reply(Reply),
    /// Answer, then close the connection (`QUIT`).
    Close(Reply),
}

type Answer = Result<Reply, Reply>;

fn wrong_args(name: &str) -> Reply {
    Reply::error(
        "ERR",
        format!(
            "wrong number of arguments for '{}' command",
            name.to_ascii_lowercase()
        ),
    )
}

fn syntax() -> Reply {
    Reply::error("ERR", "syntax error")
}

/// An error of the API as a RESP error: Redis's own codes where Redis has one for the same
/// failure, the API's code in upper case otherwise.
fn api_error(err: ApiError) -> Reply {
    let code = match err.code {
        "wrong_operation" | "wrong_kind" => "WRONGTYPE",
        "forbidden" => "NOPERM",
        "unauthenticated" => "NOAUTH",
        "invalid_token" | "token_expired" => "WRONGPASS",
        other => return Reply::error(&other.to_ascii_uppercase(), err.message),
    };
    Reply::error(code, err.message)
}

fn storage_error(err: StorageError) -> Reply {
    api_error(ApiError::from(err))
}

fn text(arg: &[u8], what: &str) -> Result<String, Reply> {
    String::from_utf8(arg.to_vec()).map_err(|_| {
        Reply::error(
            "ERR",
            format!("{what} must be UTF-8 text (agentstore keeps values as JSON)"),
        )
    })
}

fn integer(arg: &[u8]) -> Result<i64, Reply> {
    std::str::from_utf8(arg)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Reply::error("ERR", "value is not an integer or out of range"))
}

/// A stored JSON value as `GET` answers it: a string as its text, anything else as JSON.
fn bulk_of(value: Json) -> Reply {
    match value {
        Json::String(text) => Reply::Bulk(text.into_bytes()),
        other => Reply::Bulk(other.to_string().into_bytes()),
    }
}

fn collection_of(key: &str) -> Result<String, Reply> {
    key.parse::<Key>()
        .map(|k| k.collection().to_owned())
        .map_err(|e| Reply::error("INVALID_KEY", e))
}

impl Connection {
    /// The store as this connection calls it: at its level, if it asked for one.
    fn storage(&self, api: &Api) -> Storage {
        match self.level {
            Some(level) => api.storage.at_level(level),
            None => api.storage.clone(),
        }
    }

    /// Checks that the connection may do `operation` on `prefix` (a key, or a scan prefix).
    fn may(&self, api: &Api, operation: Operation, prefix: &str) -> Result<(), Reply> {
        if api.clients.is_none() {
            return Ok(());
        }
        let capability = self.capability.as_ref().ok_or_else(noauth)?;
        auth::allowed(capability, operation, prefix).map_err(api_error)
    }

    /// Runs one command (its name and arguments; at least the name).
    pub(super) async fn execute(&mut self, api: &Api, args: Vec<Vec<u8>>) -> Next {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let args = &args[1..];
        let answer = match name.as_str() {
            "QUIT" => return Next::Close(Reply::OK),
            "AUTH" => self.auth(api, args),
            "HELLO" => self.hello(api, args),
            _ => match self.authenticated(api) {
                Ok(()) => self.command(api, &name, args).await,
                Err(refused) => Err(refused),
            },
        };
        Next::Reply(answer.unwrap_or_else(|refused| refused))
    }

    /// `Ok` if the node is open, or the connection proved a token that has not expired.
    fn authenticated(&self, api: &Api) -> Result<(), Reply> {
        if api.clients.is_none() {
            return Ok(());
        }
        let capability = self.capability.as_ref().ok_or_else(noauth)?;
        auth::unexpired(capability).map_err(api_error)
    }

    async fn command(&mut self, api: &Api, name: &str, args: &[Vec<u8>]) -> Answer {
        let arity = |ok: bool| if ok { Ok(()) } else { Err(wrong_args(name)) };
        match name {
            "PING" => match args {
                [] => Ok(Reply::Simple("PONG")),
                [message] => Ok(Reply::Bulk(message.clone())),
                _ => Err(wrong_args(name)),
            },
            "ECHO" => {
                arity(args.len() == 1)?;
                Ok(Reply::Bulk(args[0].clone()))
            }
            "SELECT" => {
                arity(args.len() == 1)?;
                match args[0].as_slice() {
                    b"0" => Ok(Reply::OK),
                    _ => Err(Reply::error(
                        "ERR",
                        "agentstore has one keyspace (database 0); collections separate keys",
                    )),
                }
            }
            // Client libraries announce themselves and ask for command tables at connect; a
            // node has no such table to give and nothing to do with a client's name.
            "CLIENT" => Ok(Reply::OK),
            "COMMAND" | "CONFIG" => Ok(Reply::Array(Vec::new())),
            "INFO" => self.info(api).await,
            "GET" => {
                arity(args.len() == 1)?;
                let key = text(&args[0], "a key")?;
                self.may(api, Operation::Read, &key)?;
                let storage = self.storage(api);
                Ok(self.in_session(get(&storage, &key)).await?)
            }
            "MGET" => {
                arity(!args.is_empty())?;
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    let key = text(arg, "a key")?;
                    self.may(api, Operation::Read, &key)?;
                    // A key of another kind reads as nil, as in Redis.
                    let storage = self.storage(api);
                    values.push(
                        self.in_session(get(&storage, &key))
                            .await
                            .unwrap_or(Reply::Nil),
                    );
                }
                Ok(Reply::Array(values))
            }
            "EXISTS" => {
                arity(!args.is_empty())?;
                let mut found = 0;
                for arg in args {
                    if self.exists(api, arg).await?.1 {
                        found += 1;
                    }
                }
                Ok(Reply::Integer(found))
            }
            "SET" => {
                arity(args.len() >= 2)?;
                let key = text(&args[0], "a key")?;
                let value = text(&args[1], "a value")?;
                self.may(api, Operation::Write, &key)?;
                self.set(api, &key, value, &args[2..]).await
            }
            "DEL" | "UNLINK" => {
                arity(!args.is_empty())?;
                let mut deleted = 0;
                for arg in args {
                    let key = text(arg, "a key")?;
                    self.may(api, Operation::Write, &key)?;
                    let storage = self.storage(api);
                    // Redis counts the keys that existed: read just before the delete.
                    let existed = self
                        .in_session(async {
                            let existed = storage.exists(&key).await?;
                            storage.delete(&key).await?;
                            Ok::<_, StorageError>(existed)
                        })
                        .await?;
                    deleted += i64::from(existed);
                }
                Ok(Reply::Integer(deleted))
            }
            "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
                let by = match name {
                    "INCR" | "DECR" => {
                        arity(args.len() == 1)?;
                        1
                    }
                    _ => {
                        arity(args.len() == 2)?;
                        integer(&args[1])?
                    }
                };
                let delta = if name.starts_with("DECR") {
                    by.checked_neg()
                        .ok_or_else(|| Reply::error("ERR", "decrement would overflow"))?
                } else {
                    by
                };
                let key = text(&args[0], "a key")?;
                self.may(api, Operation::Write, &key)?;
                let storage = self.storage(api);
                let total = self
                    .in_session(async { storage.counter_add(&key, delta).await })
                    .await?;
                Ok(Reply::Integer(total))
            }
            "SADD" | "SREM" => {
                arity(args.len() >= 2)?;
                let key = text(&args[0], "a key")?;
                self.may(api, Operation::Write, &key)?;
                let add = name == "SADD";
                let storage = self.storage(api);
                let changed = self
                    .in_session(async {
                        let mut members: Vec<Json> = storage.set_members(&key).await?;
                        let mut changed = 0;
                        for arg in &args[1..] {
                            let member = Json::String(text(arg, "a member")?);
                            // Redis counts the members the command added or removed (a
                            // member named twice, once).
                            let held = members.contains(&member);
                            if held != add {
                                changed += 1;
                                if add {
                                    members.push(member.clone());
                                } else {
                                    members.retain(|m| *m != member);
                                }
                            }
                            if add {
                                storage.set_add(&key, &member).await
                            } else {
                                storage.set_remove(&key, &member).await
                            }
                            .map_err(storage_error)?;
                        }
                        Ok::<_, Reply>(changed)
                    })
                    .await?;
                Ok(Reply::Integer(changed))
            }
            "SMEMBERS" | "SCARD" | "SISMEMBER" => {
                arity(args.len() == if name == "SISMEMBER" { 2 } else { 1 })?;
                let key = text(&args[0], "a key")?;
                self.may(api, Operation::Read, &key)?;
                let storage = self.storage(api);
                let members: Vec<Json> = self
                    .in_session(async { storage.set_members(&key).await })
                    .await?;
                Ok(match name {
                    "SCARD" => Reply::Integer(members.len() as i64),
                    "SISMEMBER" => {
                        let member = Json::String(text(&args[1], "a member")?);
                        Reply::Integer(i64::from(members.contains(&member)))
                    }
                    _ => Reply::Array(members.into_iter().map(bulk_of).collect()),
                })
            }
            "SCAN" => self.scan(api, args).await,
            "MSET" => {
                arity(!args.is_empty() && args.len().is_multiple_of(2))?;
                let mut pairs = Vec::with_capacity(args.len() / 2);
                for pair in args.chunks(2) {
                    let key = text(&pair[0], "a key")?;
                    self.may(api, Operation::Write, &key)?;
                    pairs.push((key, Json::String(text(&pair[1], "a value")?)));
                }
                // Atomic, as in Redis: one transaction (refused where the keys' level cannot
                // write several keys at once).
                let storage = self.storage(api);
                self.in_session(async {
                    let mut transaction = storage.transaction();
                    for (key, value) in &pairs {
                        transaction.set(key, value);
                    }
                    transaction.commit().await
                })
                .await?;
                Ok(Reply::OK)
            }
            "TYPE" => {
                arity(args.len() == 1)?;
                let (key, exists) = self.exists(api, &args[0]).await?;
                let kind = match api.storage.plan(&collection_of(&key)?).conflict {
                    _ if !exists => "none",
                    ConflictStrategy::GSet | ConflictStrategy::OrSet => "set",
                    _ => "string",
                };
                Ok(Reply::Simple(kind))
            }
            "TTL" | "PTTL" => {
                arity(args.len() == 1)?;
                let key = text(&args[0], "a key")?;
                self.may(api, Operation::Read, &key)?;
                let storage = self.storage(api);
                let read = self
                    .in_session(async { storage.get_versioned::<Json>(&key).await })
                    .await;
                let expires_at_ms = match read {
                    Ok(Some(versioned)) => versioned.expires_at_ms,
                    Ok(None) => return Ok(Reply::Integer(-2)),
                    // Counters, sets and siblings exist but never expire.
                    Err(StorageError::Siblings { .. } | StorageError::Deserialize { .. }) => None,
                    Err(err) => return Err(err.into()),
                };
                // -1: the key exists and does not expire; else what is left, rounded up.
                let Some(at) = expires_at_ms else {
                    return Ok(Reply::Integer(-1));
                };
                let left_ms = at
                    .saturating_sub(PhysicalClock::now_ms(&SystemClock))
                    .max(1);
                let left_ms = i64::try_from(left_ms).unwrap_or(i64::MAX);
                Ok(Reply::Integer(if name == "TTL" {
                    (left_ms + 999) / 1000
                } else {
                    left_ms
                }))
            }
            "AGENTSTORE.LEVEL" => self.level(args),
            "AGENTSTORE.SESSION" => self.session(args),
            "AGENTSTORE.PLAN" => {
                arity(args.len() == 1)?;
                let collection = text(&args[0], "a collection")?;
                let plan = api.storage.plan(&collection);
                Ok(Reply::Array(vec![
                    Reply::text("collection"),
                    Reply::text(plan.name),
                    Reply::text("backend"),
                    Reply::text(plan.backend.to_string()),
                    Reply::text("consistency"),
                    Reply::text(plan.consistency.as_str()),
                    Reply::text("conflict"),
                    Reply::text(plan.conflict.to_string()),
                    Reply::text("guarantee"),
                    Reply::text(plan.guarantee.level.as_str()),
                    Reply::text("summary"),
                    Reply::text(plan.guarantee.summary),
                ]))
            }
            _ => Err(Reply::error(
                "ERR",
                format!(
                    "unknown command '{}' (agentstore speaks a subset of Redis: see docs/resp.md)",
                    name.to_ascii_lowercase()
                ),
            )),
        }
    }

    /// Whether the key `arg` names has a value (read in the connection's session).
    async fn exists(&mut self, api: &Api, arg: &[u8]) -> Result<(String, bool), Reply> {
        let key = text(arg, "a key")?;
        self.may(api, Operation::Read, &key)?;
        let storage = self.storage(api);
        let exists = self
            .in_session(async { storage.exists(&key).await })
            .await?;
        Ok((key, exists))
    }

    /// Runs `call` in the connection's session, and keeps the session grown by it.
    async fn in_session<T, E>(&mut self, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let token = std::mem::take(&mut self.session);
        let (result, token) = agentstore_engine::session::run(token, call).await;
        self.session = token;
        result
    }

    /// `SET key value [NX] [EX s | PX ms]`: a write, or with `NX` a write only if the key has
    /// no value (compare-and-set against absent; nil when it has one), or with `EX`/`PX` a
    /// write that expires.
    async fn set(&mut self, api: &Api, key: &str, value: String, options: &[Vec<u8>]) -> Answer {
        let mut only_if_absent = false;
        let mut ttl = None;
        let mut options = options.iter();
        while let Some(option) = options.next() {
            let option = option.to_ascii_uppercase();
            match option.as_slice() {
                b"NX" => only_if_absent = true,
                b"EX" | b"PX" if ttl.is_none() => {
                    let amount = options.next().ok_or_else(syntax)?;
                    let amount = u64::try_from(integer(amount)?)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            Reply::error("ERR", "invalid expire time in 'set' command")
                        })?;
                    ttl = Some(if option == b"EX" {
                        Duration::from_secs(amount)
                    } else {
                        Duration::from_millis(amount)
                    });
                }
                b"EXAT" | b"PXAT" | b"KEEPTTL" | b"GET" | b"XX" => {
                    return Err(Reply::error(
                        "ERR",
                        "SET takes NX, EX and PX here; not EXAT, PXAT, KEEPTTL, GET or XX",
                    ));
                }
                _ => return Err(syntax()),
            }
        }
        if only_if_absent && ttl.is_some() {
            return Err(Reply::error(
                "ERR",
                "SET with NX and a time to live is not supported: use a lock \
                 (POST /v1/locks/{key}) for a lease",
            ));
        }
        let storage = self.storage(api);
        let value = Json::String(value);
        let written = self
            .in_session(async {
                match ttl {
                    Some(ttl) => storage.set_with_ttl(key, value, ttl).await,
                    None if only_if_absent => storage.compare_and_set(key, value, None).await,
                    None => storage.set(key, value).await,
                }
            })
            .await;
        match written {
            Ok(_) => Ok(Reply::OK),
            Err(StorageError::VersionMismatch { .. }) if only_if_absent => Ok(Reply::Nil),
            Err(err) => Err(err.into()),
        }
    }

    /// `SCAN cursor MATCH prefix* [COUNT n]`: a page of the keys under a prefix. The cursor
    /// is this connection's (`0` starts a scan; the cursor answered continues it; `0` when
    /// done). A prefix names its collection, so `MATCH` is required and takes a prefix
    /// followed by `*` only.
    async fn scan(&mut self, api: &Api, args: &[Vec<u8>]) -> Answer {
        let (cursor, options) = args.split_first().ok_or_else(|| wrong_args("SCAN"))?;
        let cursor = std::str::from_utf8(cursor)
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
            .ok_or_else(|| Reply::error("ERR", "invalid cursor"))?;
        let (mut pattern, mut count) = (None, SCAN_COUNT);
        let mut options = options.iter();
        while let Some(option) = options.next() {
            let value = options.next().ok_or_else(syntax)?;
            match option.to_ascii_uppercase().as_slice() {
                b"MATCH" => pattern = Some(text(value, "a pattern")?),
                b"COUNT" => {
                    count = usize::try_from(integer(value)?)
                        .ok()
                        .filter(|c| *c > 0)
                        .ok_or_else(syntax)?
                }
                _ => return Err(syntax()),
            }
        }
        let (prefix, after) = if cursor == 0 {
            let pattern = pattern.ok_or_else(|| {
                Reply::error(
                    "ERR",
                    "agentstore scans one collection at a time: SCAN 0 MATCH <collection>:<prefix>*",
                )
            })?;
            let prefix = pattern
                .strip_suffix('*')
                .filter(|p| !p.contains(['*', '?', '[', '\\']))
                .ok_or_else(|| {
                    Reply::error("ERR", "MATCH takes a key prefix followed by '*' only")
                })?
                .to_owned();
            (prefix, None)
        } else {
            let (prefix, after) = self
                .cursors
                .remove(&cursor)
                .ok_or_else(|| Reply::error("ERR", "invalid cursor"))?;
            (prefix, Some(after))
        };
        collection_of(&format!("{prefix}:"))?;
        self.may(api, Operation::Read, &prefix)?;
        let limit = count.min(SCAN_MAX);
        let storage = self.storage(api);
        let entries = self
            .in_session(async { storage.scan(&prefix, after.as_deref(), limit).await })
            .await?;
        let next = match entries.last() {
            Some(last) if entries.len() == limit => {
                self.next_cursor += 1;
                if self.cursors.len() >= CURSORS {
                    self.cursors.pop_first();
                }
                self.cursors
                    .insert(self.next_cursor, (prefix, last.key.clone()));
                self.next_cursor
            }
            _ => 0,
        };
        let keys = entries.into_iter().map(|e| Reply::text(e.key)).collect();
        Ok(Reply::Array(vec![
            Reply::text(next.to_string()),
            Reply::Array(keys),
        ]))
    }

    /// `AUTH token` or `AUTH user token` (the user is ignored): proves a capability token.
    fn auth(&mut self, api: &Api, args: &[Vec<u8>]) -> Answer {
        let token = match args {
            [token] | [_, token] => text(token, "a token")?,
            _ => return Err(wrong_args("AUTH")),
        };
        let Some(gate) = &api.clients else {
            return Err(Reply::error(
                "ERR",
                "AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            ));
        };
        self.capability = Some(gate.verify(&token).map_err(api_error)?);
        Ok(Reply::OK)
    }

    /// `HELLO [2] [AUTH user token]`: RESP2 only (a client asking for 3 falls back to 2).
    fn hello(&mut self, api: &Api, args: &[Vec<u8>]) -> Answer {
        let mut args = args.iter();
        if let Some(version) = args.next()
            && version.as_slice() != b"2"
        {
            return Err(Reply::error("NOPROTO", "agentstore speaks RESP2 only"));
        }
        while let Some(option) = args.next() {
            match option.to_ascii_uppercase().as_slice() {
                b"AUTH" => {
                    let (Some(user), Some(token)) = (args.next(), args.next()) else {
                        return Err(syntax());
                    };
                    self.auth(api, &[user.clone(), token.clone()])?;
                }
                b"SETNAME" => {
                    args.next().ok_or_else(syntax)?;
                }
                _ => return Err(syntax()),
            }
        }
        self.authenticated(api)?;
        Ok(Reply::Array(vec![
            Reply::text("server"),
            Reply::text("agentstore"),
            Reply::text("version"),
            Reply::text(env!("CARGO_PKG_VERSION")),
            Reply::text("proto"),
            Reply::Integer(2),
            Reply::text("mode"),
            Reply::text("standalone"),
        ]))
    }

    /// `AGENTSTORE.LEVEL [eventual|causal|strong|collection]`: the level this connection's
    /// calls ask for (each served at the stronger of it and its collection's, or refused
    /// where the collection cannot deliver it); `collection` goes back to each collection's.
    fn level(&mut self, args: &[Vec<u8>]) -> Answer {
        match args {
            [] => Ok(Reply::text(
                self.level.map_or("collection", ConsistencyLevel::as_str),
            )),
            [level] => {
                let level = text(level, "a level")?.to_ascii_lowercase();
                self.level = match level.as_str() {
                    "collection" => None,
                    other => Some(other.parse().map_err(|_| {
                        Reply::error(
                            "ERR",
                            format!(
                                "unknown level '{other}': eventual, causal, strong or collection"
                            ),
                        )
                    })?),
                };
                Ok(Reply::OK)
            }
            _ => Err(wrong_args("AGENTSTORE.LEVEL")),
        }
    }

    /// `AGENTSTORE.SESSION [token]`: the connection's session token (empty when it has seen
    /// nothing that needs one), or adopts `token` (a session carried from another connection
    /// or over HTTP); an empty token starts a new session.
    fn session(&mut self, args: &[Vec<u8>]) -> Answer {
        match args {
            [] => Ok(Reply::text(self.session.to_string())),
            [token] => {
                let token = text(token, "a session token")?;
                self.session = if token.is_empty() {
                    SessionToken::default()
                } else {
                    token
                        .parse()
                        .map_err(|e| Reply::error("INVALID_SESSION", e))?
                };
                Ok(Reply::OK)
            }
            _ => Err(wrong_args("AGENTSTORE.SESSION")),
        }
    }

    /// `INFO`: the server section Redis clients look for, and the node's place in its
    /// cluster.
    async fn info(&self, api: &Api) -> Answer {
        let status = api
            .node
            .status()
            .await
            .map_err(|e| Reply::error("STOPPED", e))?;
        let alive = status
            .members
            .iter()
            .filter(|m| m.liveness == agentstore_core::node_state::Liveness::Alive)
            .count();
        let plan = api.storage.plan("");
        let text = format!(
            "# Server\r\nredis_version:7.0.0\r\nagentstore_version:{}\r\nredis_mode:standalone\r\n\
             \r\n# Cluster\r\nnode:{}\r\nmembers:{}\r\nmembers_alive:{alive}\r\nreplicas:{}\r\n\
             write_quorum:{}\r\nread_quorum:{}\r\ndefault_level:{}\r\ndefault_guarantee:{}\r\n",
            env!("CARGO_PKG_VERSION"),
            status.node,
            status.members.len(),
            status.replicas,
            status.write_quorum,
            status.read_quorum,
            plan.consistency.as_str(),
            plan.guarantee.summary.replace(['\r', '\n'], " "),
        );
        Ok(Reply::text(text))
    }
}

/// `GET`: a register's value, a counter's total; a set is of another kind.
async fn get(storage: &Storage, key: &str) -> Result<Reply, StorageError> {
    let collection = key
        .parse::<Key>()
        .map(|k| k.collection().to_owned())
        .unwrap_or_default();
    match storage.plan(&collection).conflict {
        ConflictStrategy::GCounter | ConflictStrategy::PnCounter => {
            Ok(Reply::text(storage.counter(key).await?.to_string()))
        }
        ConflictStrategy::Document => Ok(Reply::text(storage.document(key).await?.text)),
        strategy @ (ConflictStrategy::GSet | ConflictStrategy::OrSet) => {
            Err(StorageError::WrongOperation {
                key: key.to_owned(),
                collection,
                strategy,
                operation: "GET",
                hint: "read a set's members with SMEMBERS".into(),
            })
        }
        ConflictStrategy::MultiValue => {
            let mut siblings = storage.get_siblings::<Json>(key).await?;
            match siblings.values.len() {
                0 => Ok(Reply::Nil),
                1 => Ok(bulk_of(siblings.values.remove(0))),
                n => Ok(Reply::error(
                    "SIBLINGS",
                    format!(
                        "{key} holds {n} concurrent values; read and resolve them with GET \
                         /v1/keys/{key} over HTTP"
                    ),
                )),
            }
        }
        ConflictStrategy::Register => {
            Ok(storage.get::<Json>(key).await?.map_or(Reply::Nil, bulk_of))
        }
    }
}

fn noauth() -> Reply {
    Reply::error("NOAUTH", "Authentication required.")
}

impl From<StorageError> for Reply {
    fn from(err: StorageError) -> Self {
        storage_error(err)
    }
}
