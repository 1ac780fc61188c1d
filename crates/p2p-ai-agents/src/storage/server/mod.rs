//! A cluster node with its client API: what `agentstore node` runs.
//!
//! The node ([`agentstore_cluster::Node`]) replicates the `local` collections with its peers;
//! a [`Storage`] routes those collections to it (Redis and PostgreSQL collections go to their
//! servers as everywhere else), and the HTTP/JSON API below serves that `Storage`: a call
//! on a node behaves as the same call on an embedded store, at the level the cluster
//! delivers. The API is described by `docs/openapi.yaml`; [`OPENAPI`] is that document.
//!
//! Errors are `{"error": {"code", "message"}}` with a stable `code` (listed in the
//! document).

mod auth;
mod dashboard;
mod http;
mod resp;
mod tls;
mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentstore_cluster::{
    CausalConfig, CausalEngine, ClusterEngine, Node, NodeConfig, PeerSecurity, PeerTrust,
    SignedCollections, StrongConfig, StrongEngine,
};
use agentstore_core::config::{ClientAuth, Config, PeerAuth};
use agentstore_core::{ConsistencyLevel, Key, codec};
use agentstore_engine::batch_codec::{decode_writes, encode_outcome};
use agentstore_engine::{Engine, EngineError, Fence, LocalEngine, NodeClock, Write};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{Attestation, ClusterEngines, Storage, StorageError, Version, default_data_dir};

pub use super::{ATTESTATION_HEADER, SESSION_HEADER};

/// The OpenAPI document of the client API.
pub const OPENAPI: &str = include_str!("../../../../../docs/openapi.yaml");

/// How old a tombstone must be before the cluster collects it (every replica must hold it
/// too). A day: longer than a node is expected to stay down with hints waiting for it.
const TOMBSTONE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How long a request waits for its quorum.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a strong request may take, an election and a forward to the leader included.
const STRONG_TIMEOUT: Duration = Duration::from_secs(5);

/// An error answer: status, stable code, message, and extra fields.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Json,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
            extra: Json::Null,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let (Some(error), Json::Object(extra)) = (error.as_object_mut(), self.extra) {
            error.extend(extra);
        }
        (self.status, axum::Json(json!({ "error": error }))).into_response()
    }
}

fn engine_error(err: EngineError) -> ApiError {
    let message = err.to_string();
    match err {
        EngineError::QuorumFailed {
            acknowledged,
            needed,
        } => ApiError {
            extra: json!({ "acknowledged": acknowledged, "needed": needed }),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "quorum_unavailable",
                message,
            )
        },
        EngineError::Unavailable { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
        EngineError::Indeterminate { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "indeterminate", message)
        }
        EngineError::Fenced { .. } => ApiError::new(StatusCode::CONFLICT, "fenced", message),
        EngineError::InTransaction { .. } => {
            ApiError::new(StatusCode::CONFLICT, "in_transaction", message)
        }
        EngineError::Unsupported { .. } => {
            ApiError::new(StatusCode::CONFLICT, "unsupported", message)
        }
        EngineError::WrongKind { .. } => ApiError::new(StatusCode::CONFLICT, "wrong_kind", message),
        EngineError::EditRefused {
            source: agentstore_core::ot::EditRefused::Misfit(_),
            ..
        } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_edit", message),
        EngineError::EditRefused { .. } => {
            ApiError::new(StatusCode::CONFLICT, "stale_revision", message)
        }
        EngineError::SignatureRefused { .. } => {
            ApiError::new(StatusCode::FORBIDDEN, "signature_refused", message)
        }
        EngineError::SessionBehind { waited_ms, .. } => ApiError {
            extra: json!({ "waited_ms": waited_ms }),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "session_behind", message)
        },
        EngineError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", message),
        EngineError::PositionUnavailable { .. } => {
            ApiError::new(StatusCode::GONE, "position_unavailable", message)
        }
        EngineError::DiskFull { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
        }
        EngineError::Denied { code, detail, .. } => {
            let code = match code.as_str() {
                "forbidden" => "forbidden",
                "signature_refused" => "signature_refused",
                "signature_required" => "signature_required",
                "invalid_token" => "invalid_token",
                "token_expired" => "token_expired",
                _ => "unauthenticated",
            };
            let status = match code {
                "forbidden" | "signature_refused" | "signature_required" => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            ApiError::new(status, code, detail)
        }
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "local_failure", message),
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        let message = err.to_string();
        let conflict = |code| ApiError::new(StatusCode::CONFLICT, code, &message);
        match err {
            StorageError::Key { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_key", message)
            }
            StorageError::Serialize { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", message)
            }
            StorageError::WrongOperation { .. } => conflict("wrong_operation"),
            StorageError::Siblings { .. } => conflict("siblings"),
            StorageError::VersionMismatch { .. } => conflict("version_mismatch"),
            StorageError::LockHeld {
                holder,
                expires_at_ms,
                ..
            } => ApiError {
                extra: json!({ "holder": holder, "expires_at_ms": expires_at_ms }),
                ..conflict("lock_held")
            },
            StorageError::TransactionUnfinished { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transaction_unfinished",
                &message,
            ),
            StorageError::LevelUnavailable { .. } => conflict("consistency_unavailable"),
            StorageError::InvalidSession(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_session", message)
            }
            StorageError::SignatureRequired { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "signature_required", message)
            }
            StorageError::Engine(err) => engine_error(err),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

type Answer = Result<Response, ApiError>;

fn invalid_body(what: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", what)
}

fn invalid_query(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", what)
}

fn not_found(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no value for {key}"),
    )
}

fn parse_key(key: &str) -> Result<Key, ApiError> {
    key.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_key", e))
}

/// What every handler shares.
#[derive(Clone)]
struct Api {
    storage: Storage,
    node: Arc<Node>,
    /// The node's member of the Raft group (strong collections).
    strong: StrongEngine,
    /// The node's causal broadcast (causal collections).
    causal: CausalEngine,
    /// Notified once the node has left the cluster: the server stops.
    left: Arc<Notify>,
    /// The gate that checks clients' capability tokens (`None`: open API).
    clients: Option<Arc<auth::Gate>>,
    /// Turns `true` when the server stops: watch streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    consistency: Option<ConsistencyLevel>,
    context: Option<String>,
    /// `true`: this node's copy (a follower read on a strong collection).
    stale: Option<bool>,
    /// Compare-and-set: write only if the key is at this version (`absent`: has no value).
    if_version: Option<String>,
    /// A fenced write: the lock (a key) and the token of the lease it is made under.
    fence_lock: Option<String>,
    fence_token: Option<u64>,
    /// The value expires this many ms after the write (lww collections).
    ttl_ms: Option<u64>,
}

/// The fence of a request: both parts, or neither.
fn fence(lock: &Option<String>, token: Option<u64>) -> Result<Option<Fence>, ApiError> {
    match (lock, token) {
        (Some(lock), Some(token)) => Ok(Some(Fence {
            lock: lock.clone(),
            token,
        })),
        (None, None) => Ok(None),
        _ => Err(invalid_query(
            "a fence needs both fence_lock and fence_token",
        )),
    }
}

impl KeyQuery {
    /// The store at the level `consistency=` asks for (at least the collection's).
    fn storage(&self, api: &Api) -> Storage {
        match self.consistency {
            Some(level) => api.storage.at_level(level),
            None => api.storage.clone(),
        }
    }

    /// Refuses the parameters in `given` (name, whether it was given) that `what` does not
    /// take, with the reason.
    fn refuse(given: &[(&str, bool)], what: &str) -> Result<(), ApiError> {
        let refused: Vec<&str> = given
            .iter()
            .filter(|(_, given)| *given)
            .map(|(name, _)| *name)
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(invalid_query(format!(
            "{} not taken by {what}",
            refused
                .iter()
                .map(|name| format!("{name}="))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Refuses the write parameters (a read takes `consistency=` and `stale=` only).
    fn read_only(&self, what: &str) -> Result<(), ApiError> {
        Self::refuse(
            &[
                ("if_version", self.if_version.is_some()),
                ("fence_lock", self.fence_lock.is_some()),
                ("fence_token", self.fence_token.is_some()),
                ("context", self.context.is_some()),
                ("ttl_ms", self.ttl_ms.is_some()),
            ],
            what,
        )
    }
}

fn context(query: &KeyQuery) -> Result<Option<Version>, ApiError> {
    query
        .context
        .as_deref()
        .map(|c| {
            c.parse::<Version>()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_context", e))
        })
        .transpose()
}

fn written(key: &str, version: &Version) -> Response {
    axum::Json(json!({ "key": key, "version": version.to_string() })).into_response()
}

async fn get_key(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
) -> Answer {
    use agentstore_core::config::ConflictStrategy as S;
    let collection = parse_key(&key)?.collection().to_owned();
    query.read_only("a read")?;
    let strategy = api.storage.plan(&collection).conflict;
    if query.stale == Some(true) && query.consistency.is_some() {
        return Err(invalid_query(
            "stale=true asks for less than any consistency=",
        ));
    }
    let storage = &match query.stale {
        Some(true) => api.storage.reading_stale(),
        _ => query.storage(&api),
    };
    let body = match strategy {
        S::Register => {
            let read = match query.consistency {
                None if query.stale == Some(true) => storage.get_stale::<Json>(&key).await,
                Some(level) => {
                    storage
                        .get_versioned_with_consistency::<Json>(&key, level)
                        .await
                }
                None => storage.get_versioned::<Json>(&key).await,
            }?;
            let read = read.ok_or_else(|| not_found(&key))?;
            let mut body =
                json!({ "key": key, "value": read.value, "version": read.version.to_string() });
            if let Some(signed) = &read.signed {
                body["signed"] = signed.to_json();
            }
            if let Some(at) = read.expires_at_ms {
                body["expires_at_ms"] = json!(at);
            }
            body
        }
        S::MultiValue => {
            let siblings = storage.get_siblings::<Json>(&key).await?;
            if siblings.values.is_empty() {
                return Err(not_found(&key));
            }
            json!({ "key": key, "siblings": siblings.values, "context": siblings.context.to_string() })
        }
        S::GCounter | S::PnCounter => json!({ "key": key, "value": storage.counter(&key).await? }),
        S::GSet | S::OrSet => {
            json!({ "key": key, "members": storage.set_members::<Json>(&key).await? })
        }
        S::Document => {
            let document = storage.document(&key).await?;
            json!({ "key": key, "value": document.text, "revision": document.revision })
        }
    };
    Ok(axum::Json(body).into_response())
}

/// The attestation a write carries in its header, if any.
fn attestation_of(headers: &HeaderMap) -> Result<Option<Attestation>, ApiError> {
    let Some(value) = headers.get(ATTESTATION_HEADER) else {
        return Ok(None);
    };
    let invalid = |reason: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_attestation",
            format!("the {ATTESTATION_HEADER} header: {reason}"),
        )
    };
    let text = value.to_str().map_err(|_| invalid("not ASCII".into()))?;
    Attestation::from_text(text)
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

/// A write that carries its attestation: only `consistency=` applies.
async fn attested_write(
    api: &Api,
    key: &str,
    value: Option<&Json>,
    attestation: &Attestation,
    query: &KeyQuery,
) -> Answer {
    if query.if_version.is_some()
        || query.fence_lock.is_some()
        || query.fence_token.is_some()
        || query.context.is_some()
        || query.stale.is_some()
    {
        return Err(invalid_query(
            "a write with an attestation takes only consistency=",
        ));
    }
    let receipt = api
        .storage
        .write_attested(key, value, attestation, query.consistency)
        .await?;
    Ok(written(key, &receipt.version))
}

async fn put_key(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Answer {
    use agentstore_core::config::ConflictStrategy as S;
    let value: Json =
        serde_json::from_slice(&body).map_err(|_| invalid_body("the body must be a JSON value"))?;
    if let Some(attestation) = attestation_of(&headers)? {
        return attested_write(&api, &key, Some(&value), &attestation, &query).await;
    }
    KeyQuery::refuse(&[("stale", query.stale.is_some())], "a write")?;
    let storage = query.storage(&api);
    let collection = parse_key(&key)?.collection().to_owned();
    let fence = fence(&query.fence_lock, query.fence_token)?;
    let receipt = if storage.plan(&collection).conflict == S::MultiValue {
        KeyQuery::refuse(
            &[
                ("if_version", query.if_version.is_some()),
                ("fence_lock", fence.is_some()),
                ("ttl_ms", query.ttl_ms.is_some()),
            ],
            "a multi_value write (it replaces the values its context= names; compare-and-set \
             and fences need an lww collection)",
        )?;
        // A multi-value write replaces the siblings its context names; no context adds one.
        let context = context(&query)?.unwrap_or_default();
        storage.set_with_context(&key, value, &context).await?
    } else {
        KeyQuery::refuse(
            &[("context", query.context.is_some())],
            "a write to an lww collection (contexts are for multi_value ones)",
        )?;
        if let Some(ttl_ms) = query.ttl_ms {
            KeyQuery::refuse(
                &[
                    ("if_version", query.if_version.is_some()),
                    ("fence_lock", fence.is_some()),
                ],
                "a write with a time to live",
            )?;
            if ttl_ms == 0 {
                return Err(invalid_query("ttl_ms is at least 1"));
            }
            let ttl = Duration::from_millis(ttl_ms);
            let receipt = storage.set_with_ttl(&key, value, ttl).await?;
            return Ok(written(&key, &receipt.version));
        }
        let expected = query.if_version.as_deref().map(parse_version).transpose()?;
        match (fence, expected) {
            (None, None) => storage.set(&key, value).await?,
            (None, Some(expected)) => {
                storage
                    .compare_and_set(&key, value, expected.as_ref())
                    .await?
            }
            (Some(fence), expected) => {
                let mut write = storage.transaction();
                match &expected {
                    Some(expected) => write.compare_and_set(&key, value, expected.as_ref()),
                    None => write.set(&key, value),
                }
                .with_fence(fence);
                only_receipt(write.commit().await?)?
            }
        }
    };
    Ok(written(&key, &receipt.version))
}

/// The receipt of a one-write transaction.
fn only_receipt(mut receipts: Vec<super::WriteReceipt>) -> Result<super::WriteReceipt, ApiError> {
    receipts
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no receipt"))
}

async fn delete_key(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    headers: HeaderMap,
) -> Answer {
    use agentstore_core::config::ConflictStrategy as S;
    if let Some(attestation) = attestation_of(&headers)? {
        return attested_write(&api, &key, None, &attestation, &query).await;
    }
    KeyQuery::refuse(&[("stale", query.stale.is_some())], "a delete")?;
    let storage = query.storage(&api);
    let collection = parse_key(&key)?.collection().to_owned();
    let fence = fence(&query.fence_lock, query.fence_token)?;
    let expected = query.if_version.as_deref().map(parse_version).transpose()?;
    let receipt = match storage.plan(&collection).conflict {
        S::Register => {
            KeyQuery::refuse(
                &[("context", query.context.is_some())],
                "a delete in an lww collection (contexts are for multi_value ones)",
            )?;
            match (fence, expected) {
                (None, None) => storage.delete(&key).await?,
                (fence, expected) => {
                    let mut delete = storage.transaction();
                    match &expected {
                        Some(Some(expected)) => delete.compare_and_delete(&key, expected),
                        Some(None) => {
                            return Err(invalid_query(
                                "if_version=absent cannot delete: the key has no value",
                            ));
                        }
                        None => delete.delete(&key),
                    };
                    if let Some(fence) = fence {
                        delete.with_fence(fence);
                    }
                    only_receipt(delete.commit().await?)?
                }
            }
        }
        S::MultiValue => {
            KeyQuery::refuse(
                &[
                    ("if_version", expected.is_some()),
                    ("fence_lock", fence.is_some()),
                ],
                "a multi_value delete (it drops the values its context= names, or all it has \
                 seen)",
            )?;
            match context(&query)? {
                Some(context) => storage.delete_with_context(&key, &context).await?,
                None => storage.delete(&key).await?,
            }
        }
        _ => {
            KeyQuery::refuse(
                &[
                    ("if_version", expected.is_some()),
                    ("fence_lock", fence.is_some()),
                    ("context", query.context.is_some()),
                ],
                "a delete of a counter or set (conditions, fences and contexts need an lww or \
                 multi_value collection)",
            )?;
            storage.delete(&key).await?
        }
    };
    Ok(written(&key, &receipt.version))
}

/// Refuses what a counter or set change does not take (it takes `consistency=` only).
fn only_consistency(query: &KeyQuery, what: &str) -> Result<(), ApiError> {
    query.read_only(what)?;
    KeyQuery::refuse(&[("stale", query.stale.is_some())], what)
}

async fn add_counter(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    body: axum::body::Bytes,
) -> Answer {
    only_consistency(&query, "a counter change")?;
    let delta = serde_json::from_slice::<Json>(&body)
        .ok()
        .and_then(|b| b.get("delta").and_then(Json::as_i64))
        .ok_or_else(|| invalid_body("the body must be {\"delta\": <integer>}"))?;
    let value = query.storage(&api).counter_add(&key, delta).await?;
    Ok(axum::Json(json!({ "key": key, "value": value })).into_response())
}

/// `POST /v1/documents/{key}`: `{"revision": n, "op": [...]}`, an edit of the document as it
/// was at revision `n` (see `Storage::edit`).
async fn edit_document(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    body: axum::body::Bytes,
) -> Answer {
    only_consistency(&query, "a document edit")?;
    let shape = "the body must be {\"revision\": <revision read>, \"op\": [retain n, \"insert\", -delete n, ...]}";
    let body: Json = serde_json::from_slice(&body).map_err(|_| invalid_body(shape))?;
    let revision = body
        .get("revision")
        .and_then(Json::as_u64)
        .ok_or_else(|| invalid_body(shape))?;
    let op = body.get("op").ok_or_else(|| invalid_body(shape))?;
    let op = super::op_from_json(op).map_err(|e| invalid_body(&format!("op: {e}")))?;
    let edited = query.storage(&api).edit(&key, revision, &op).await?;
    Ok(axum::Json(json!({
        "key": key,
        "revision": edited.revision,
        "applied": super::op_to_json(&edited.applied),
        "version": edited.receipt.version.to_string(),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentQuery {
    since: Option<u64>,
    consistency: Option<agentstore_core::ConsistencyLevel>,
}

/// `GET /v1/documents/{key}`: the text and revision, or with `?since=N` the edits applied
/// since revision N (see `Storage::edits_since`).
async fn read_document(
    State(api): State<Api>,
    Path(key): Path<String>,
    query: Result<Query<DocumentQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|e| invalid_query(e.body_text()))?;
    let storage = match query.consistency {
        Some(level) => api.storage.at_level(level),
        None => api.storage.clone(),
    };
    let body = match query.since {
        None => {
            let document = storage.document(&key).await?;
            json!({ "key": key, "revision": document.revision, "text": document.text })
        }
        Some(since) => {
            let caught = storage.edits_since(&key, since).await?;
            let edits: Vec<Json> = caught.edits.iter().map(super::op_to_json).collect();
            json!({ "key": key, "revision": caught.revision, "edits": edits })
        }
    };
    Ok(axum::Json(body).into_response())
}

async fn change_set(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    body: axum::body::Bytes,
) -> Answer {
    only_consistency(&query, "a set change")?;
    let storage = query.storage(&api);
    let change: Json = serde_json::from_slice(&body).unwrap_or_default();
    let receipt = match (change.get("add"), change.get("remove")) {
        (Some(member), None) => storage.set_add(&key, member).await?,
        (None, Some(member)) => storage.set_remove(&key, member).await?,
        _ => {
            return Err(invalid_body(
                "the body must be {\"add\": <value>} or {\"remove\": <value>}",
            ));
        }
    };
    Ok(written(&key, &receipt.version))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn scan(
    State(api): State<Api>,
    Path(prefix): Path<String>,
    Query(query): Query<ScanQuery>,
) -> Answer {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries = api
        .storage
        .scan(&prefix, query.after.as_deref(), limit)
        .await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.key.clone()))
        .flatten();
    let entries: Vec<Json> = entries
        .into_iter()
        .map(|e| json!({ "key": e.key, "value": e.value }))
        .collect();
    Ok(axum::Json(json!({ "entries": entries, "next": next })).into_response())
}

fn octets(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        bytes,
    )
        .into_response()
}

/// The key of a `/v1/records/{key}` call as bytes: keys are bytes, and a percent-encoded key
/// that is not UTF-8 is still a key (axum's `Path<String>` would refuse it).
struct RawKey(Key);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RawKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let invalid = |why: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid_key", why);
        let encoded = parts
            .uri
            .path()
            .rsplit_once('/')
            .map(|(_, last)| last)
            .ok_or_else(|| invalid("no key in the path"))?;
        Key::new(agentstore_core::key::percent_decode(encoded))
            .map(RawKey)
            .map_err(|e| invalid(&e.to_string()))
    }
}

async fn get_record(State(api): State<Api>, RawKey(key): RawKey) -> Answer {
    let engine = api.storage.engine_of(key.collection());
    match engine.get(&key).await.map_err(engine_error)? {
        Some(record) => Ok(octets(codec::encode(&record))),
        None => Err(not_found(&key.to_string())),
    }
}

async fn apply_record(
    State(api): State<Api>,
    RawKey(key): RawKey,
    body: axum::body::Bytes,
) -> Answer {
    let mutation = agentstore_wire::decode_mutation(&body)
        .map_err(|e| invalid_body(&format!("not an encoded mutation: {e}")))?;
    let committed = api
        .storage
        .engine_of(key.collection())
        .commit(vec![Write::new(key, mutation)])
        .await;
    outcome(committed.map_err(StorageError::Engine))
}

/// The answer to [`super::NodeClient`]'s writes: the outcome in `batch_codec`'s encoding, a
/// refusal that encoding types (a failed condition or fence, a value of another kind, a
/// refused document edit, a key in a transaction) included, so it arrives typed; any other failure is an error answer.
fn outcome(committed: Result<Vec<agentstore_engine::Record>, StorageError>) -> Answer {
    match committed {
        Err(StorageError::Engine(
            err @ (EngineError::ExpectationFailed { .. }
            | EngineError::Fenced { .. }
            | EngineError::WrongKind { .. }
            | EngineError::EditRefused { .. }
            | EngineError::InTransaction { .. }),
        )) => Ok(octets(encode_outcome(&Err(err)))),
        Err(err) => Err(err.into()),
        Ok(records) => Ok(octets(encode_outcome(&Ok(records)))),
    }
}

/// Applies a batch of writes atomically (compare-and-set and fences included), for
/// [`super::NodeClient`], as a transaction of this node's store would (across engines, by
/// two-phase commit): the body is a batch in `agentstore_engine::batch_codec`'s encoding;
/// the answer is the outcome in its encoding, a refused condition included (any other
/// failure is an error answer, as for a single write).
async fn apply_batch(
    State(api): State<Api>,
    caller: Option<axum::Extension<auth::Caller>>,
    body: axum::body::Bytes,
) -> Answer {
    let writes =
        decode_writes(&body).map_err(|e| invalid_body(&format!("not an encoded batch: {e}")))?;
    auth::may_write(caller.as_deref(), writes.iter().map(|w| w.key.to_string()))?;
    outcome(api.storage.commit_writes(writes).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    holder: String,
    ttl_ms: u64,
}

async fn acquire_lock(
    State(api): State<Api>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let body: LockBody = serde_json::from_slice(&body).map_err(|e| {
        invalid_body(&format!(
            "the body must be {{\"holder\": <name>, \"ttl_ms\": <ms>}}: {e}"
        ))
    })?;
    let lease = api
        .storage
        .acquire_lock(&key, &body.holder, Duration::from_millis(body.ttl_ms))
        .await?;
    Ok(axum::Json(json!({
        "lock": lease.lock,
        "holder": lease.holder,
        "token": lease.token,
        "expires_at_ms": lease.expires_at_ms,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseQuery {
    token: u64,
}

async fn release_lock(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(query): Query<ReleaseQuery>,
) -> Answer {
    let lease = super::Lease {
        lock: key,
        holder: String::new(),
        token: query.token,
        expires_at_ms: 0,
    };
    api.storage.release_lock(&lease).await?;
    Ok(axum::Json(json!({ "lock": lease.lock, "token": lease.token })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnerBody {
    id: String,
    addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VotersBody {
    voters: Vec<String>,
}

fn membership_error(err: agentstore_consensus::GroupError) -> ApiError {
    let message = err.to_string();
    match err {
        agentstore_consensus::GroupError::Membership { .. } => {
            ApiError::new(StatusCode::CONFLICT, "membership_refused", message)
        }
        agentstore_consensus::GroupError::Indeterminate { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "indeterminate", message)
        }
        _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
    }
}

/// Adds a learner to the Raft group (forwarded to the leader).
async fn add_learner(State(api): State<Api>, body: axum::body::Bytes) -> Answer {
    let body: LearnerBody = serde_json::from_slice(&body).map_err(|e| {
        invalid_body(&format!(
            "the body must be {{\"id\": <node id>, \"addr\": <peer host:port>}}: {e}"
        ))
    })?;
    api.strong
        .group()
        .add_learner(
            agentstore_consensus::MemberId::from(body.id.as_str()),
            body.addr,
        )
        .await
        .map_err(membership_error)?;
    Ok(axum::Json(json!({ "added": body.id })).into_response())
}

/// Sets the Raft group's voters (forwarded to the leader).
async fn set_voters(State(api): State<Api>, body: axum::body::Bytes) -> Answer {
    let body: VotersBody = serde_json::from_slice(&body).map_err(|e| {
        invalid_body(&format!(
            "the body must be {{\"voters\": [<node id>, ...]}}: {e}"
        ))
    })?;
    if body.voters.is_empty() {
        return Err(invalid_body("a group needs at least one voter"));
    }
    let voters = body
        .voters
        .iter()
        .map(|v| agentstore_consensus::MemberId::from(v.as_str()))
        .collect();
    api.strong
        .group()
        .change_voters(voters, true)
        .await
        .map_err(membership_error)?;
    Ok(axum::Json(json!({ "voters": body.voters })).into_response())
}

/// One write of a `POST /v1/transactions` body: exactly one of `set`, `delete`, `add`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionWrite {
    key: String,
    set: Option<Json>,
    /// With `set`: compare-and-set on this version (`absent`: the key has no value).
    if_version: Option<String>,
    delete: Option<bool>,
    add: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionBody {
    writes: Vec<TransactionWrite>,
    /// Every write fenced by this lease's lock and token.
    fence: Option<FenceBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceBody {
    lock: String,
    token: u64,
}

fn parse_version(text: &str) -> Result<Option<Version>, ApiError> {
    match text {
        "absent" => Ok(None),
        version => version
            .parse::<Version>()
            .map(Some)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_version", e)),
    }
}

async fn transaction(
    State(api): State<Api>,
    caller: Option<axum::Extension<auth::Caller>>,
    body: axum::body::Bytes,
) -> Answer {
    let body: TransactionBody = serde_json::from_slice(&body).map_err(|e| {
        invalid_body(&format!(
            "the body must be {{\"writes\": [{{\"key\": ..., \"set\"|\"delete\"|\"add\": ...}}]}}: {e}"
        ))
    })?;
    auth::may_write(
        caller.as_deref(),
        body.writes.iter().map(|w| w.key.as_str()),
    )?;
    let mut transaction = api.storage.transaction();
    if let Some(fence) = &body.fence {
        transaction.with_fence(Fence {
            lock: fence.lock.clone(),
            token: fence.token,
        });
    }
    for write in &body.writes {
        match (&write.set, write.delete, write.add, &write.if_version) {
            (Some(value), None, None, None) => transaction.set(&write.key, value),
            (Some(value), None, None, Some(version)) => {
                let expected = parse_version(version)?;
                transaction.compare_and_set(&write.key, value, expected.as_ref())
            }
            (None, Some(true), None, None) => transaction.delete(&write.key),
            (None, None, Some(delta), None) => transaction.counter_add(&write.key, delta),
            _ => {
                return Err(invalid_body(&format!(
                    "write to {}: give exactly one of set, delete: true or add (if_version only with set)",
                    write.key
                )));
            }
        };
    }
    let receipts = transaction.commit().await?;
    let writes: Vec<Json> = body
        .writes
        .iter()
        .zip(&receipts)
        .map(|(write, receipt)| json!({ "key": write.key, "version": receipt.version.to_string() }))
        .collect();
    Ok(axum::Json(json!({ "writes": writes })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordScanQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn scan_records(State(api): State<Api>, Query(query): Query<RecordScanQuery>) -> Answer {
    let after = query.after.as_deref().map(parse_key).transpose()?;
    let prefix = query.prefix.unwrap_or_default();
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let collection = prefix.split(':').next().unwrap_or_default();
    let entries = api
        .storage
        .engine_of(collection)
        .scan(prefix.as_bytes(), after.as_ref(), limit)
        .await
        .map_err(engine_error)?;
    Ok(octets(agentstore_wire::encode_entries(&entries)))
}

async fn status(State(api): State<Api>) -> Answer {
    use super::status::{
        CausalStatus, CollectionStatus, GuaranteeStatus, MemberStatus, RaftStatus,
        ReplicationStatus,
    };
    let node = api
        .node
        .status()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", e))?;
    let config = api.storage.config();
    let mut names: Vec<String> = config.collections.keys().cloned().collect();
    names.push(String::new());
    let collections = names
        .iter()
        .map(|name| {
            let plan = api.storage.plan(name);
            CollectionStatus {
                name: if name.is_empty() {
                    "(default)".into()
                } else {
                    name.clone()
                },
                backend: plan.backend.to_string(),
                consistency: plan.consistency,
                conflict: plan.conflict,
                encrypted: plan.encrypted,
                signed: plan.signed,
                ttl_ms: plan.ttl_ms,
                replication: ReplicationStatus {
                    strategy: plan.replication.strategy.to_string(),
                    n: plan.replication.quorum.n,
                    w: plan.replication.quorum.w,
                    r: plan.replication.quorum.r,
                },
                guarantee: GuaranteeStatus {
                    level: plan.guarantee.level,
                    summary: plan.guarantee.summary,
                    caveat: plan.guarantee.caveat,
                },
            }
        })
        .collect();
    let group = api.strong.group().status();
    let applied = agentstore_engine::session::SessionToken {
        causal: api.causal.applied(),
        redis_offset: 0,
    };
    let status = super::NodeStatus {
        node: node.node.to_string(),
        members: node
            .members
            .into_iter()
            .map(|m| MemberStatus {
                id: m.id.to_string(),
                peer_addr: m.peer_addr,
                client_addr: m.client_addr,
                liveness: m.liveness.as_str().to_owned(),
                share: m.share,
            })
            .collect(),
        replicas: node.replicas,
        write_quorum: node.write_quorum,
        read_quorum: node.read_quorum,
        in_flight: node.in_flight,
        collections,
        raft: RaftStatus {
            id: group.id,
            state: group.state.to_owned(),
            term: group.term,
            leader: group.leader,
            last_log: group.last_log,
            committed: group.committed,
            applied: group.applied,
            snapshot: group.snapshot,
            voters: group.voters,
            learners: group.learners,
            quorum_ack_ms: group.quorum_ack_ms,
            leader_changes: group.leader_changes,
            failure: group.failure,
        },
        causal: CausalStatus {
            applied: applied.to_string(),
        },
        signed_writes_refused: api.node.signatures().map_or(0, |s| s.refused_total()),
    };
    Ok(axum::Json(status).into_response())
}

async fn repair(State(api): State<Api>) -> Answer {
    let steps = api
        .node
        .repair()
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "repair_running", e))?;
    // One JSON line per member, as the repair reaches it.
    let lines = futures_lines(steps);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

fn futures_lines(
    steps: tokio::sync::mpsc::Receiver<agentstore_cluster::RepairStep>,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    futures_util::stream::unfold(steps, |mut steps| async move {
        let step = steps.recv().await?;
        let line = serde_json::to_string(&step).unwrap_or_default() + "\n";
        Some((Ok(line), steps))
    })
}

/// `POST /v1/purge` (admin): removes what expired now instead of at the store's next sweep
/// (`Storage::purge_expired`: PostgreSQL rows, and on the Raft leader the strong collections'
/// values).
async fn purge(State(api): State<Api>) -> Answer {
    let purged = api.storage.purge_expired().await?;
    Ok(axum::Json(json!({ "purged": purged })).into_response())
}

async fn leave(State(api): State<Api>) -> Answer {
    api.node
        .leave()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "handoff_incomplete", e))?;
    api.left.notify_one();
    Ok(axum::Json(json!({ "left": true })).into_response())
}

/// `GET /v1/backup`: every live record this node holds, as wire entries: its data file
/// (eventual collections) and its causal store, each read in one transaction, and the strong
/// collections read from the Raft group (linearizable, page by page). Tombstones and expired
/// values are left out: a restore needs only what reads would see.
async fn backup(State(api): State<Api>) -> Answer {
    let mut entries = api.node.snapshot().await.map_err(engine_error)?;
    entries.extend(api.causal.snapshot().map_err(engine_error)?);
    let mut after: Option<Key> = None;
    loop {
        let page = agentstore_engine::DynEngine::scan(&api.strong, b"", after.as_ref(), 1000)
            .await
            .map_err(engine_error)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        entries.extend(page);
    }
    let now_ms = agentstore_engine::PhysicalClock::now_ms(&agentstore_engine::SystemClock);
    entries.retain(|(_, record)| !record.is_tombstone() && !record.expired(now_ms));
    // In key order, each key once (the stores hold different collections; a key in two, after
    // its collection changed level, is joined).
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(Key, agentstore_core::Record)> = Vec::with_capacity(entries.len());
    for (key, record) in entries {
        match merged.last_mut() {
            Some((last, held)) if *last == key => {
                agentstore_core::Crdt::merge(held, &record);
            }
            _ => merged.push((key, record)),
        }
    }
    Ok(octets(agentstore_wire::encode_entries(&merged)))
}

async fn metrics(State(api): State<Api>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let text = merge_exposition(&[
        api.node.metrics_text(),
        api.strong.metrics_text(),
        api.causal.metrics_text(),
        api.storage.metrics_text(),
    ]);
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// Several registries' OpenMetrics texts as one exposition in the Prometheus text format
/// (0.0.4), which every scraper and `promtool check metrics` read: a family that more than one
/// registry has (the node's engine and the store's engines both measure `agentstore_engine_*`,
/// by backend) is described once with every registry's samples; a counter is described under
/// its sample name (`…_total`), as that format wants; OpenMetrics' `# UNIT` and `# EOF` go.
pub(crate) fn merge_exposition(texts: &[String]) -> String {
    // Families in order of first appearance: name, then its description and its samples.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let Some(rest) = line.strip_prefix("# ") else {
                if let Some(at) = current {
                    families[at].2.push(line.to_owned());
                }
                continue;
            };
            let mut words = rest.splitn(3, ' ');
            let (kind, name, tail) = (
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
            );
            if !matches!(kind, "HELP" | "TYPE") {
                continue;
            }
            let at = match families.iter().position(|(n, _, _)| n == name) {
                Some(at) => at,
                None => {
                    families.push((name.to_owned(), Vec::new(), Vec::new()));
                    families.len() - 1
                }
            };
            // Registries describe a shared family alike: once is enough.
            let described = format!("{kind} {tail}");
            if !families[at].1.contains(&described) {
                families[at].1.push(described);
            }
            current = Some(at);
        }
    }
    let mut out = String::new();
    for (name, description, samples) in families {
        let counter = description.iter().any(|d| d == "TYPE counter");
        let name = if counter && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name
        };
        for described in &description {
            let (kind, tail) = described.split_once(' ').unwrap_or((described, ""));
            out.push_str(&format!("# {kind} {name} {tail}\n"));
        }
        for sample in &samples {
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// `ok`, or 503 `storage_failing` while the node's last write to one of its files failed (a
/// full disk): the data file, the causal store or the Raft files. Each recovers by itself once
/// the cause is gone.
async fn healthz(State(api): State<Api>) -> Response {
    let failing = [
        ("data file", api.node.local_health()),
        ("causal store", api.causal.health()),
        ("Raft log and state machine", api.strong.health()),
    ]
    .into_iter()
    .find_map(|(file, health)| health.err().map(|failure| (file, failure)));
    match failing {
        None => "ok".into_response(),
        Some((file, failure)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failing",
            format!("the last write to this node's {file} failed: {failure}"),
        )
        .into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

/// The API: each path and what it serves.
fn routes() -> Vec<(&'static str, MethodRouter<Api>)> {
    vec![
        (
            "/v1/keys/{key}",
            get(get_key).put(put_key).delete(delete_key),
        ),
        ("/v1/counters/{key}", post(add_counter)),
        ("/v1/sets/{key}", post(change_set)),
        (
            "/v1/documents/{key}",
            get(read_document).post(edit_document),
        ),
        ("/v1/scan/{prefix}", get(scan)),
        ("/v1/watch/{prefix}", get(watch::watch)),
        ("/v1/changes/{prefix}", get(watch::changes)),
        ("/v1/feed", get(watch::feed)),
        ("/v1/backup", get(backup)),
        ("/v1/records", get(scan_records).post(apply_batch)),
        ("/v1/transactions", post(transaction)),
        ("/v1/locks/{key}", post(acquire_lock).delete(release_lock)),
        ("/v1/raft/learners", post(add_learner)),
        ("/v1/raft/voters", post(set_voters)),
        ("/v1/records/{key}", get(get_record).post(apply_record)),
        ("/v1/status", get(status)),
        ("/v1/leave", post(leave)),
        ("/v1/purge", post(purge)),
        ("/v1/repair", post(repair)),
        ("/v1/openapi.yaml", get(openapi)),
        ("/healthz", get(healthz)),
        ("/metrics", get(metrics)),
    ]
}

/// Every path the API serves (the OpenAPI document describes exactly these).
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

fn router(api: Api) -> Router {
    let routes = routes()
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, methods)
        });
    http::body_deadline(routes, http::HEAD_DEADLINE)
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            auth::authorize,
        ))
        // After the gate: the dashboard's files hold no data (its requests pass the gate).
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn(in_session))
        .layer(axum::middleware::from_fn(http::json_errors))
        .with_state(api)
}

/// Runs every request in the session its `agentstore-session` header names (a new one
/// without the header), and answers with the session's token grown by what the request saw
/// and wrote.
async fn in_session(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let token = match request.headers().get(SESSION_HEADER) {
        None => Default::default(),
        Some(value) => match value.to_str().map(str::parse) {
            Ok(Ok(token)) => token,
            Ok(Err(err)) => {
                return ApiError::new(StatusCode::BAD_REQUEST, "invalid_session", err)
                    .into_response();
            }
            Err(_) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_session",
                    "the session header is not ASCII",
                )
                .into_response();
            }
        },
    };
    let (mut response, token) = agentstore_engine::session::run(token, next.run(request)).await;
    if !token.is_empty()
        && let Ok(value) = HeaderValue::from_str(&token.to_string())
    {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

/// Listeners a node serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTP client API.
    pub clients: TcpListener,
    /// Replication and membership traffic.
    pub peers: TcpListener,
    /// The RESP endpoint, if the configuration asks for one (`storage.cluster.resp_addr`).
    pub resp: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of the configuration's `storage.cluster` block.
    pub async fn bind(config: &Config) -> Result<Self, StorageError> {
        let cluster = cluster_block(config)?;
        let bind = |addr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                StorageError::InvalidConfig(format!("cannot listen for {what} on {addr}: {e}"))
            })
        };
        let resp = match cluster.resp_addr {
            Some(addr) => Some(bind(addr, "RESP clients").await?),
            None => None,
        };
        Ok(Self {
            clients: bind(cluster.client_addr, "clients").await?,
            peers: bind(cluster.peer_addr, "peers").await?,
            resp,
        })
    }
}

/// The configuration's `storage.cluster` block, which a node needs.
pub fn cluster_block(
    config: &Config,
) -> Result<&agentstore_core::config::ClusterConfig, StorageError> {
    config.cluster.as_ref().ok_or_else(|| {
        StorageError::InvalidConfig(
            "a node needs a storage.cluster block (client_addr, peer_addr, peers)".into(),
        )
    })
}

/// How a node's peer links are secured: by its key and admission (loaded from `data_dir`,
/// the key created there at first start), checked against the configured authority.
pub fn peer_security(
    config: &Config,
    auth: &PeerAuth,
    data_dir: &std::path::Path,
) -> Result<PeerSecurity, StorageError> {
    let PeerAuth::Authority(authority) = auth else {
        tracing::warn!("peer links are plaintext and unauthenticated (storage.cluster.insecure)");
        return Ok(PeerSecurity::Plaintext);
    };
    let invalid = |e: agentstore_trust::TrustError| {
        StorageError::InvalidConfig(format!("storage.cluster.authority: {e}"))
    };
    let authority = agentstore_trust::authority_from(authority).map_err(invalid)?;
    let trust = PeerTrust::load(data_dir, authority)
        .map_err(|e| StorageError::InvalidConfig(e.to_string()))?;
    if trust.name() != config.node_id.as_str() {
        return Err(StorageError::InvalidConfig(format!(
            "this node is configured as {} but admitted as {}: admit it under its own name",
            config.node_id,
            trust.name()
        )));
    }
    Ok(PeerSecurity::Tls(Arc::new(trust)))
}

/// The data directory a node's configuration names (or the default one).
pub fn data_dir(config: &Config) -> PathBuf {
    config
        .data_dir
        .as_ref()
        .map_or_else(default_data_dir, PathBuf::from)
}

/// The client API's TLS settings: the node's key and the certificate `agentstore admit --host`
/// wrote into its data directory.
fn client_tls_config(
    data_dir: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, StorageError> {
    let invalid = |e: &dyn std::fmt::Display| {
        StorageError::InvalidConfig(format!("storage.cluster.client_tls: {e}"))
    };
    let key = agentstore_trust::SecretKey::load(&agentstore_trust::node_key_path(data_dir))
        .map_err(|e| invalid(&e))?;
    let path = agentstore_trust::client_cert_path(data_dir);
    let chain = std::fs::read_to_string(&path).map_err(|e| {
        invalid(&format!(
            "{}: {e}; write it with `agentstore admit ... --host <name or address clients use>`",
            path.display()
        ))
    })?;
    agentstore_trust::client_api_server(&key, &chain).map_err(|e| invalid(&e))
}

/// Runs a node until `shutdown` completes or the node leaves the cluster: starts replication
/// on `listeners.peers`, serves the client API on `listeners.clients`, then drains (requests
/// in progress finish) and stops.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StorageError> {
    let cluster = cluster_block(&config)?;
    let security = peer_security(&config, &cluster.peer_auth, &data_dir(&config))?;
    run_secured(config, listeners, security, shutdown).await
}

/// [`run`], with the peer links' security already loaded (see [`peer_security`]).
pub async fn run_secured(
    config: Config,
    listeners: Listeners,
    security: PeerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StorageError> {
    let cluster = cluster_block(&config)?.clone();
    let data_dir = data_dir(&config);
    let client_tls = cluster
        .client_tls
        .then(|| client_tls_config(&data_dir))
        .transpose()?;
    let clients = match (cluster.client_auth, &security) {
        (ClientAuth::Open, _) => None,
        (ClientAuth::Tokens, PeerSecurity::Tls(trust)) => {
            Some(Arc::new(auth::Gate::new(*trust.authority())))
        }
        (ClientAuth::Tokens, PeerSecurity::Plaintext) => {
            return Err(StorageError::InvalidConfig(
                "client tokens need the cluster's authority (storage.cluster.authority)".into(),
            ));
        }
    };
    // Signed collections need an authority, which the configuration's validation ensures.
    let signatures = match &security {
        PeerSecurity::Tls(trust) => {
            SignedCollections::from_config(&config, *trust.authority()).map(Arc::new)
        }
        PeerSecurity::Plaintext => None,
    };
    let clock = NodeClock::system(config.node_id.clone(), config.max_clock_offset_ms);
    let local = LocalEngine::open(&data_dir, Arc::clone(&clock))?;
    let quorum = config.replication.quorum;
    let node_config = NodeConfig {
        id: config.node_id.clone(),
        security,
        client_addr: Some(
            listeners
                .clients
                .local_addr()
                .unwrap_or(cluster.client_addr),
        ),
        seeds: cluster.peers.clone(),
        replicas: usize::from(quorum.n),
        write_quorum: usize::from(quorum.w),
        read_quorum: usize::from(quorum.r),
        request_timeout: REQUEST_TIMEOUT,
        anti_entropy_interval: Duration::from_secs(1),
        tombstone_grace: TOMBSTONE_GRACE,
        signatures: signatures.clone(),
    };
    let peer_addr = listeners.peers.local_addr().unwrap_or(cluster.peer_addr);
    let node = Arc::new(Node::start(node_config, local, listeners.peers));
    let engine = ClusterEngine::new(Arc::clone(&node), usize::from(quorum.n));
    let mut voters = cluster.peers.clone();
    voters.insert(config.node_id.clone(), peer_addr);
    let strong_config = StrongConfig {
        id: config.node_id.clone(),
        peer_addr,
        dir: data_dir.clone(),
        voters,
        request_timeout: STRONG_TIMEOUT,
        signatures: signatures.clone(),
    };
    let strong = StrongEngine::start(strong_config, node.transport().clone()).await?;
    let mut causal_config = CausalConfig::new(data_dir.clone(), clock);
    causal_config.signatures = signatures;
    let causal = CausalEngine::start(causal_config, node.transport().clone(), node.members())?;
    let engines = ClusterEngines {
        leaderless: Arc::new(engine),
        causal: Some(Arc::new(causal.clone())),
        strong: Some(Arc::new(strong.clone())),
    };
    let storage = Storage::with_cluster_engines(config.clone(), engines).await?;
    tracing::info!(
        node = %config.node_id,
        clients = %cluster.client_addr,
        peers = %cluster.peer_addr,
        data_dir = %data_dir.display(),
        "node ready"
    );
    let left = Arc::new(Notify::new());
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let api = Api {
        storage,
        node: Arc::clone(&node),
        strong: strong.clone(),
        causal,
        left: Arc::clone(&left),
        clients,
        stopping: stopped.clone(),
    };
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = left.notified() => {}
        }
        let _ = stopping.send(true);
    };
    // The RESP endpoint speaks TLS when the HTTP API does: a client gets the same protection
    // whichever protocol it picks.
    let resp = match listeners.resp {
        None => None,
        Some(listener) => {
            let addr = listener.local_addr().ok();
            tracing::info!(resp = ?addr, "serving RESP");
            let (api, stopped) = (api.clone(), stopped.clone());
            Some(match &client_tls {
                None => tokio::spawn(resp::serve(listener, api, stopped)),
                Some(config) => {
                    let listener =
                        tls::TlsListener::new(listener, Arc::clone(config)).map_err(|e| {
                            StorageError::InvalidConfig(format!("the RESP endpoint: {e}"))
                        })?;
                    tokio::spawn(resp::serve(listener, api, stopped))
                }
            })
        }
    };
    let app = router(api);
    match client_tls {
        None => http::serve(listeners.clients, app, http::HEAD_DEADLINE, stop).await,
        Some(config) => {
            let listener = tls::TlsListener::new(listeners.clients, config)
                .map_err(|e| StorageError::InvalidConfig(format!("the client API: {e}")))?;
            http::serve(listener, app, http::HEAD_DEADLINE, stop).await;
        }
    }
    if let Some(resp) = resp {
        let _ = resp.await;
    }
    // Drain: the HTTP server has finished its requests; stop the Raft member, then the node
    // loop and its listeners.
    strong.group().shutdown().await;
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    Ok(())
}
