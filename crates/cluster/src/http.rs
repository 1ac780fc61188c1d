//! The client API of a node: HTTP/JSON.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `PUT /v1/keys/{key}` | any JSON value | `200 {"key", "version"}` |
//! | `GET /v1/keys/{key}` | | `200 {"key", "value"}`, `404` |
//! | `POST /v1/counters/{key}` | `{"delta": n}` | `200 {"key", "value"}` (the new total) |
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

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message.to_string() } })),
    )
        .into_response()
}

fn parse_key(key: &str) -> Result<Key, Response> {
    key.parse()
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_key", e))
}

fn failure(outcome: Outcome) -> Response {
    match outcome {
        Outcome::QuorumFailed { answered, needed } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "quorum_unavailable",
            format!("{answered} of the {needed} replicas needed answered in time"),
        ),
        Outcome::NotAReplica { replicas } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_a_replica",
            format!("this node does not hold the key; its replicas are {replicas:?}"),
        ),
        // The engine refuses a mutation for another kind of value with this wording
        // (`record::WrongKind`); anything else is a failure of the node's storage.
        Outcome::LocalFailure { detail } if detail.contains("cannot apply to it") => {
            error(StatusCode::CONFLICT, "wrong_kind", detail)
        }
        Outcome::LocalFailure { detail } => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "local_failure", detail)
        }
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected outcome {other:?}"),
        ),
    }
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
) -> Response {
    let key = match parse_key(&key) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let Ok(value) = serde_json::from_slice::<Json>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON value",
        );
    };
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    match node.write(key.clone(), Mutation::Put(bytes)).await {
        Ok(Outcome::Written { record }) => {
            axum::Json(json!({ "key": key.to_string(), "version": version(&record) }))
                .into_response()
        }
        Ok(other) => failure(other),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "stopped", e),
    }
}

async fn read(State(node): State<Arc<Node>>, Path(key): Path<String>) -> Response {
    let key = match parse_key(&key) {
        Ok(key) => key,
        Err(response) => return response,
    };
    match node.read(key.clone()).await {
        Ok(Outcome::Read { record }) => match record
            .as_ref()
            .filter(|r| !r.is_tombstone())
            .and_then(rendered)
        {
            Some(value) => {
                axum::Json(json!({ "key": key.to_string(), "value": value })).into_response()
            }
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no value for {key}"),
            ),
        },
        Ok(other) => failure(other),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "stopped", e),
    }
}

async fn add(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let key = match parse_key(&key) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let Some(delta) = serde_json::from_slice::<Json>(&body)
        .ok()
        .and_then(|b| b.get("delta").and_then(Json::as_i64))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be {\"delta\": <integer>}",
        );
    };
    match node.write(key.clone(), Mutation::PnCounterAdd(delta)).await {
        Ok(Outcome::Written { record }) => {
            axum::Json(json!({ "key": key.to_string(), "value": rendered(&record) }))
                .into_response()
        }
        Ok(other) => failure(other),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "stopped", e),
    }
}

/// Serves the client API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/keys/{key}", get(read).put(put))
        .route("/v1/counters/{key}", post(add))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
