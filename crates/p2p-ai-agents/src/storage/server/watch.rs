//! The change feed over HTTP (see `crate::storage::watch`):
//!
//! - `GET /v1/watch/{prefix}?after=N`: Server-Sent Events, one `change` event per change
//!   (`id` is its position, so a browser's `EventSource` resumes by itself with
//!   `Last-Event-ID`), a comment every 15 s to keep proxies from closing a quiet stream, and
//!   an `error` event (the API's error body) before the stream ends on a failure.
//! - `GET /v1/changes/{prefix}?after=N&limit=L&wait_ms=W`: one page as JSON, waiting up to
//!   `W` ms (60 000 at most) for a change: a long poll, for clients without SSE.
//! - `GET /v1/feed?prefix=P&after=N&limit=L&wait_ms=W`: the same page with the raw records
//!   (octets), for `NodeClient`.
//!
//! A stream ends when the node stops and when the caller's token expires.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agentstore_engine::Engine as _;
use agentstore_trust::Capability;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::auth::{Caller, unexpired};
use super::{Answer, Api, ApiError, engine_error, octets};
use crate::storage::Position;
use crate::storage::watch::{Change, PAGE, Watch, collection_prefix, encode_page};

/// The longest a request may wait for a change.
const LONGEST_WAIT: Duration = Duration::from_secs(60);
/// A comment this often keeps a quiet stream open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FeedQuery {
    /// A position (`<feed>-<number>`) to resume after.
    after: Option<String>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
    /// `/v1/feed` only: the key prefix.
    prefix: Option<String>,
}

impl FeedQuery {
    fn after(&self) -> Result<Option<Position>, ApiError> {
        self.after
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(super::invalid_query)
    }

    fn limit(&self) -> usize {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.unwrap_or(0)).min(LONGEST_WAIT)
    }
}

fn change_json(change: &Change) -> Json {
    json!({
        "position": change.position.to_string(),
        "key": change.key,
        "value": change.value,
        "deleted": change.value.is_none(),
        "version": change.version.to_string(),
    })
}

/// `GET /v1/changes/{prefix}`: one page of changes as JSON.
pub(super) async fn changes(
    State(api): State<Api>,
    Path(prefix): Path<String>,
    Query(query): Query<FeedQuery>,
) -> Answer {
    let page = api
        .storage
        .changes(&prefix, query.after()?, query.limit(), query.wait())
        .await?;
    let changes: Vec<Json> = page.changes.iter().map(change_json).collect();
    let position = page.position.to_string();
    Ok(axum::Json(json!({ "changes": changes, "position": position })).into_response())
}

/// `GET /v1/feed`: one page with the raw records, for a `NodeClient`.
pub(super) async fn feed(State(api): State<Api>, Query(query): Query<FeedQuery>) -> Answer {
    let prefix = query.prefix.clone().unwrap_or_default();
    let collection = prefix.split(':').next().unwrap_or_default();
    let page = api
        .storage
        .engine_of(collection)
        .changes(
            prefix.as_bytes(),
            query.after()?,
            query.limit(),
            query.wait(),
        )
        .await
        .map_err(engine_error)?;
    Ok(octets(encode_page(&page)))
}

/// A stream's state between events: the watch, and what ends it besides a failure.
struct Stream {
    watch: Watch,
    stopping: tokio::sync::watch::Receiver<bool>,
    caller: Option<Arc<Capability>>,
    ended: bool,
}

impl Stream {
    /// The next event, or `None` once the stream is over.
    async fn next(&mut self) -> Option<Event> {
        if self.ended || *self.stopping.borrow() {
            return None;
        }
        let expiry = self.caller.as_ref().and_then(|c| c.expires_ms());
        if let Some(capability) = &self.caller
            && let Err(expired) = unexpired(capability)
        {
            return Some(self.fail(expired));
        }
        let until_expiry = async {
            match expiry {
                Some(at) => {
                    let now =
                        agentstore_engine::PhysicalClock::now_ms(&agentstore_engine::SystemClock);
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
                }
                None => std::future::pending().await,
            }
        };
        let change = tokio::select! {
            _ = self.stopping.changed() => return None,
            () = until_expiry => {
                let expired = self.caller.as_deref().map(unexpired);
                return Some(self.fail(match expired {
                    Some(Err(expired)) => expired,
                    _ => ApiError::new(
                        axum::http::StatusCode::UNAUTHORIZED,
                        "token_expired",
                        "the token has expired",
                    ),
                }));
            }
            change = self.watch.next() => change,
        };
        match change {
            Ok(change) => Some(
                Event::default()
                    .event("change")
                    .id(change.position.to_string())
                    .json_data(change_json(&change))
                    .unwrap_or_else(|_| Event::default().comment("unencodable change")),
            ),
            Err(err) => Some(self.fail(ApiError::from(err))),
        }
    }

    fn fail(&mut self, error: ApiError) -> Event {
        self.ended = true;
        Event::default()
            .event("error")
            .json_data(json!({ "error": { "code": error.code, "message": error.message } }))
            .unwrap_or_else(|_| Event::default().event("error"))
    }
}

/// `GET /v1/watch/{prefix}`: the changes as Server-Sent Events.
pub(super) async fn watch(
    State(api): State<Api>,
    Path(prefix): Path<String>,
    Query(query): Query<FeedQuery>,
    headers: HeaderMap,
    caller: Option<Extension<Caller>>,
) -> Answer {
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<Position>().map_err(super::invalid_query))
        .transpose()?;
    let after = query.after()?.or(resumed);
    // Read once now: a position the node cannot serve is an HTTP error, not a stream.
    let first = api
        .storage
        .changes(&prefix, after, PAGE, Duration::ZERO)
        .await?;
    let state = Stream {
        watch: Watch::from_page(&api.storage, &collection_prefix(&prefix), first),
        stopping: api.stopping.clone(),
        caller: caller.map(|Extension(Caller(capability))| capability),
        ended: false,
    };
    let events = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next().await?;
        Some((Ok::<_, Infallible>(event), state))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
