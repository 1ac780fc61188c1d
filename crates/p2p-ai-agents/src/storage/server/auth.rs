//! Who may do what through the client API: capability tokens from the cluster's authority.
//!
//! With `storage.cluster.clients: tokens` (the default when the cluster names an authority)
//! every request but `/healthz` and the OpenAPI document carries `Authorization: Bearer
//! agentstore-token-v1:…`. A missing, malformed, forged or expired token is answered 401; a
//! valid one that does not grant the request is answered 403. What a request needs:
//!
//! | request | needs |
//! |---|---|
//! | `GET` a key, a record, a scan, a watch or the changes of a prefix | `read` on a prefix of the key (or of the prefix) |
//! | `PUT`/`DELETE`/`POST` on a key (values, counters, sets, documents, locks, records) | `write` on it |
//! | `POST /v1/transactions`, `POST /v1/records` (batches) | `write` on every key written |
//! | Raft membership, `leave`, `repair`, `backup`, `purge` | `admin` on the empty prefix (the whole cluster) |
//! | `status`, `metrics` | any valid token |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentstore_trust::{Capability, Operation, PublicKey};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use agentstore_engine::{PhysicalClock, SystemClock, lock};

use super::{Api, ApiError};

/// The verified capability a request carries, for handlers that check each key they write.
#[derive(Debug, Clone)]
pub(super) struct Caller(pub(super) Arc<Capability>);

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn unauthenticated(code: &'static str, message: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

fn forbidden(operation: Operation, prefix: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("the token does not allow {operation} on '{prefix}'"),
    )
}

/// Tokens whose signatures checked out, kept so a client's every request does not pay for
/// verifying its token again (two ed25519 operations per block): a token's bytes cannot
/// change, and expiry is checked on every request.
const VERIFIED: usize = 4096;

/// The client API's gate: the authority and the tokens it has verified.
#[derive(Debug)]
pub(super) struct Gate {
    authority: PublicKey,
    verified: Mutex<HashMap<String, Arc<Capability>>>,
}

impl Gate {
    pub(super) fn new(authority: PublicKey) -> Self {
        Self {
            authority,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The verified token of a request, or why there is none.
    fn caller(&self, request: &Request) -> Result<Arc<Capability>, ApiError> {
        let value = request
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                unauthenticated(
                    "unauthenticated",
                    "this node needs a capability token: Authorization: Bearer agentstore-token-v1:…",
                )
            })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthenticated("invalid_token", "expected `Bearer <token>`"))?;
        self.verify(token)
    }

    /// The capability `token` (its text form) proves, if the authority signed it and it has
    /// not expired.
    pub(super) fn verify(&self, token: &str) -> Result<Arc<Capability>, ApiError> {
        let known = lock(&self.verified).get(token).cloned();
        let capability = match known {
            Some(capability) => capability,
            None => {
                let capability = Capability::from_text(token)
                    .map_err(|e| unauthenticated("invalid_token", e))?;
                capability
                    .verify(&self.authority)
                    .map_err(|e| unauthenticated("invalid_token", e))?;
                let capability = Arc::new(capability);
                let mut verified = lock(&self.verified);
                if verified.len() >= VERIFIED {
                    verified.clear();
                }
                verified.insert(token.to_owned(), Arc::clone(&capability));
                capability
            }
        };
        unexpired(&capability)?;
        Ok(capability)
    }
}

/// `Ok` if `capability` has not expired.
pub(super) fn unexpired(capability: &Capability) -> Result<(), ApiError> {
    if capability.expires_ms().is_some_and(|at| at <= now_ms()) {
        return Err(unauthenticated("token_expired", "the token has expired"));
    }
    Ok(())
}

/// `Ok` if `capability` allows `operation` on `prefix` now.
pub(super) fn allowed(
    capability: &Capability,
    operation: Operation,
    prefix: &str,
) -> Result<(), ApiError> {
    if capability.allows(operation, prefix, now_ms()) {
        Ok(())
    } else {
        Err(forbidden(operation, prefix))
    }
}

/// What the request needs beyond a valid token, judged by its route (`None`: nothing more, or
/// the handler checks each key it writes).
fn needs(
    path: &str,
    method: &Method,
    request: &Request,
    params: &Result<RawPathParams, RawPathParamsRejection>,
) -> Option<(Operation, String)> {
    let param = |name: &str| match params {
        Ok(params) => params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default(),
        // A key that is not UTF-8 (routes take bytes): judged by its longest UTF-8 prefix,
        // which a token must cover, so it covers the whole key too.
        Err(_) => {
            let last = request.uri().path().rsplit('/').next().unwrap_or("");
            let bytes = agentstore_core::key::percent_decode(last);
            let valid = match std::str::from_utf8(&bytes) {
                Ok(text) => text.len(),
                Err(err) => err.valid_up_to(),
            };
            String::from_utf8_lossy(&bytes[..valid]).into_owned()
        }
    };
    let read_or_write = if method == Method::GET {
        Operation::Read
    } else {
        Operation::Write
    };
    match path {
        "/v1/keys/{key}"
        | "/v1/counters/{key}"
        | "/v1/sets/{key}"
        | "/v1/documents/{key}"
        | "/v1/locks/{key}"
        | "/v1/records/{key}" => Some((read_or_write, param("key"))),
        "/v1/scan/{prefix}" | "/v1/watch/{prefix}" | "/v1/changes/{prefix}" => {
            Some((Operation::Read, param("prefix")))
        }
        "/v1/records" | "/v1/feed" if method == Method::GET => {
            #[derive(serde::Deserialize)]
            struct Prefix {
                prefix: Option<String>,
            }
            let prefix = axum::extract::Query::<Prefix>::try_from_uri(request.uri())
                .ok()
                .and_then(|q| q.0.prefix)
                .unwrap_or_default();
            Some((Operation::Read, prefix))
        }
        "/v1/raft/learners" | "/v1/raft/voters" | "/v1/leave" | "/v1/repair" | "/v1/backup"
        | "/v1/purge" => Some((Operation::Admin, String::new())),
        _ => None,
    }
}

/// The client API's gate (a route layer, so the route and its parameters are known).
pub(super) async fn authorize(
    State(api): State<Api>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(gate) = api.clients.clone() else {
        return next.run(request).await;
    };
    let path = matched.as_ref().map_or("", MatchedPath::as_str);
    if path == "/healthz" || path == "/v1/openapi.yaml" {
        return next.run(request).await;
    }
    let capability = match gate.caller(&request) {
        Ok(capability) => capability,
        Err(err) => return err.into_response(),
    };
    if let Some((operation, prefix)) = needs(path, request.method(), &request, &params)
        && let Err(refused) = allowed(&capability, operation, &prefix)
    {
        return refused.into_response();
    }
    request.extensions_mut().insert(Caller(capability));
    next.run(request).await
}

/// Checks that the request's token (if the node checks tokens) allows writing every key.
pub(super) fn may_write(
    caller: Option<&Caller>,
    keys: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<(), ApiError> {
    let Some(Caller(capability)) = caller else {
        return Ok(());
    };
    for key in keys {
        allowed(capability, Operation::Write, key.as_ref())?;
    }
    Ok(())
}
