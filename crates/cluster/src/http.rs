//! The client API of a node: HTTP/JSON.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `PUT /v1/keys/{key}` | any JSON value | `200 {"key", "version"}` |
//! | `GET /v1/keys/{key}` | | `200 {"key", "value"}`, `404` |
//! | `DELETE /v1/keys/{key}` | | `200 {"key", "version"}` (a tombstone that replicates) |
//! | `POST /v1/counters/{key}` | `{"delta": n}` | `200 {"key", "value"}` (the new total) |
//! | `GET /metrics` | | OpenMetrics text: the node's and its engine's metrics |
//! | `GET /healthz` | | `200 ok` |
//!
//! Errors are `{"error": {"code", "message"}}` with a stable `code`: `invalid_key` and
//! `invalid_body` (400), `not_found` (404), `wrong_kind` (409), `quorum_unavailable` (503:
//! indeterminate for a write, which is durable where it was acknowledged), `not_a_replica`
//! (503), `local_failure` (500).

use std::sync::Arc;

use agentstore_core::record::{Mutation, Value};
use agentstore_core::replication::Outcome;
use agentstore_core::{Key, Record};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;

use crate::node::Node;

/// An error answer: status, stable code, message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

type Answer = Result<Response, ApiError>;

fn parse_key(key: &str) -> Result<Key, ApiError> {
    key.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_key", e))
}

fn failure(outcome: Outcome) -> ApiError {
    match outcome {
        Outcome::QuorumFailed { answered, needed } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "quorum_unavailable",
            format!("{answered} of the {needed} replicas needed answered in time"),
        ),
        Outcome::NotAReplica { replicas } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_a_replica",
            format!("this node does not hold the key; its replicas are {replicas:?}"),
        ),
        // The engine refuses a mutation for another kind of value with this wording
        // (`record::WrongKind`); anything else is a failure of the node's storage.
        Outcome::LocalFailure { detail } if detail.contains("cannot apply to it") => {
            ApiError::new(StatusCode::CONFLICT, "wrong_kind", detail)
        }
        Outcome::LocalFailure { detail } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "local_failure", detail)
        }
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected outcome {other:?}"),
        ),
    }
}

fn stopped(err: crate::node::NodeError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", err)
}

fn version(record: &Record) -> String {
    record
        .version
        .iter()
        .map(|(node, counter)| format!("{node}:{counter}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn rendered(record: &Record) -> Option<Json> {
    match &record.value {
        Value::Register(Some(bytes)) => serde_json::from_slice(bytes).ok(),
        Value::PnCounter(counter) => Some(json!(counter.value())),
        Value::GCounter(counter) => Some(json!(counter.value())),
        _ => None,
    }
}

async fn put(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let key = parse_key(&key)?;
    let value: Json = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON value",
        )
    })?;
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    write(&node, key, Mutation::Put(bytes)).await
}

/// Writes through the node and answers `{"key", "version"}`.
async fn write(node: &Node, key: Key, mutation: Mutation) -> Answer {
    match node.write(key.clone(), mutation).await.map_err(stopped)? {
        Outcome::Written { record } => Ok(axum::Json(
            json!({ "key": key.to_string(), "version": version(&record) }),
        )
        .into_response()),
        other => Err(failure(other)),
    }
}

async fn delete(State(node): State<Arc<Node>>, Path(key): Path<String>) -> Answer {
    write(&node, parse_key(&key)?, Mutation::Delete).await
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(axum::http::header::CONTENT_TYPE, content_type)],
        node.metrics_text(),
    )
        .into_response()
}

async fn read(State(node): State<Arc<Node>>, Path(key): Path<String>) -> Answer {
    let key = parse_key(&key)?;
    match node.read(key.clone()).await.map_err(stopped)? {
        Outcome::Read { record } => match record
            .as_ref()
            .filter(|r| !r.is_tombstone())
            .and_then(rendered)
        {
            Some(value) => {
                Ok(axum::Json(json!({ "key": key.to_string(), "value": value })).into_response())
            }
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no value for {key}"),
            )),
        },
        other => Err(failure(other)),
    }
}

async fn add(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let key = parse_key(&key)?;
    let delta = serde_json::from_slice::<Json>(&body)
        .ok()
        .and_then(|b| b.get("delta").and_then(Json::as_i64))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the body must be {\"delta\": <integer>}",
            )
        })?;
    match node
        .write(key.clone(), Mutation::PnCounterAdd(delta))
        .await
        .map_err(stopped)?
    {
        Outcome::Written { record } => Ok(axum::Json(
            json!({ "key": key.to_string(), "value": rendered(&record) }),
        )
        .into_response()),
        other => Err(failure(other)),
    }
}

/// Serves the client API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/keys/{key}", get(read).put(put).delete(delete))
        .route("/v1/counters/{key}", post(add))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
