//! A node reached over HTTP, as an engine: what [`Storage::connect`](super::Storage::connect)
//! routes the cluster's collections to.
//!
//! It speaks the node API's record endpoints (`/v1/records`, see `docs/openapi.yaml`): whole
//! records in agentstore's binary encoding, so the client computes values, siblings and
//! counters exactly as an embedded store does. Connections are kept and reused; a connection
//! that fails is dropped and the call reports [`EngineError::Unavailable`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentstore_core::{Key, Record, codec};
use agentstore_engine::batch_codec::{decode_outcome, encode_writes};
use agentstore_engine::changelog::{ChangePage, Position};
use agentstore_engine::{DynEngine, EngineError, EngineFuture, Write, single_unconditional};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// At most this many idle connections are kept.
const IDLE: usize = 16;

/// An HTTP client of a node: its record endpoints (as an engine) and its administration
/// (status, repair, leave). Given several nodes' addresses, it talks to one and moves to the
/// next when that one cannot be reached.
#[derive(Debug)]
pub struct NodeClient {
    /// `host:port` of each node's client API it may use, in order of preference.
    addrs: Vec<String>,
    /// The one it talks to now (an index into `addrs`).
    current: AtomicUsize,
    /// The capability token sent with every request (`Authorization: Bearer`), if any.
    token: Option<String>,
    /// TLS settings when the node's client API speaks HTTPS.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// How long a request may take, connecting included (see [`NodeClient::with_timeout`]).
    timeout: Duration,
    /// Idle connections, with the index of the node each goes to.
    idle: Mutex<Vec<(usize, SendRequest<Full<Bytes>>)>>,
}

fn unavailable(detail: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable {
        backend: "node",
        detail: detail.to_string(),
    }
}

/// Percent-encodes a key or prefix for a path segment or a query value.
fn encode(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &byte in raw {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An HTTP/1.1 connection over `stream`, driven by a task of its own.
async fn handshake(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Result<SendRequest<Full<Bytes>>, EngineError> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(unavailable)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

impl NodeClient {
    /// How long a request may take by default: above every deadline a node keeps itself (5 s
    /// for a strong write, 5 s for a session to catch up), so a live node answers first.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

    /// A client of the node serving clients at `addr` (`host:port`; an `http://` prefix is
    /// accepted), or of the first of several nodes, `host:port,host:port,…`: when the node it
    /// talks to cannot be reached, a request goes to the next (a read also when the node
    /// stops answering; a write that was sent is not sent again, see
    /// [`NodeClient::with_timeout`]).
    pub fn new(addr: &str) -> Self {
        let addrs: Vec<String> = addr
            .split(',')
            .map(|addr| {
                addr.trim()
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_owned()
            })
            .filter(|addr| !addr.is_empty())
            .collect();
        Self {
            addrs: if addrs.is_empty() {
                vec![String::new()]
            } else {
                addrs
            },
            current: AtomicUsize::new(0),
            token: None,
            tls: None,
            timeout: Self::DEFAULT_TIMEOUT,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The same client, giving each request at most `timeout` (connecting included). A node
    /// that does not answer in time (paused, overloaded, behind a partition) fails the call:
    /// [`EngineError::Unavailable`] for a read or a request that never reached it, and
    /// [`EngineError::Indeterminate`] for a write that was sent, which may have applied.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// The same client, speaking HTTPS with these settings (see
    /// `agentstore_trust::client_api_client`: the cluster authority's certificate as the root).
    pub fn with_tls(self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self { tls, ..self }
    }

    /// The `host:port` it talks to now.
    pub fn addr(&self) -> &str {
        &self.addrs[self.now()]
    }

    /// The index of the node it talks to now.
    fn now(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.addrs.len()
    }

    /// The same client, presenting `token` (a capability token's text form) with every
    /// request.
    pub fn with_token(self, token: Option<String>) -> Self {
        Self { token, ..self }
    }

    fn authorized(&self, request: hyper::http::request::Builder) -> hyper::http::request::Builder {
        match &self.token {
            Some(token) => request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        }
    }

    /// A connection to the node it talks to now (an idle one if there is one), or to the next
    /// one that can be reached, which it then talks to; with the index of that node.
    async fn connection(&self) -> Result<(usize, SendRequest<Full<Bytes>>), EngineError> {
        let now = self.now();
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some((node, mut sender)) if node == now => {
                    if sender.ready().await.is_ok() {
                        return Ok((node, sender));
                    }
                }
                // A connection to a node it moved away from: dropped.
                Some(_) => {}
                None => break,
            }
        }
        let mut failures = Vec::new();
        for step in 0..self.addrs.len() {
            let node = (now + step) % self.addrs.len();
            match self.connect(&self.addrs[node]).await {
                Ok(sender) => {
                    if node != now {
                        self.current.store(node, Ordering::Relaxed);
                    }
                    return Ok((node, sender));
                }
                Err(err) => failures.push(err.to_string()),
            }
        }
        Err(unavailable(failures.join("; ")))
    }

    /// A new connection to the node at `addr`.
    async fn connect(&self, addr: &str) -> Result<SendRequest<Full<Bytes>>, EngineError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| unavailable(format!("cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return handshake(stream).await;
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| unavailable(format!("{host} is not a name TLS can check: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, stream)
            .await
            .map_err(|e| unavailable(format!("TLS with {addr}: {e}")))?;
        handshake(stream).await
    }

    /// After `node` failed a request it was sent: the next request goes to the next node.
    fn move_past(&self, node: usize) {
        let _ = self.current.compare_exchange(
            node,
            (node + 1) % self.addrs.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Sends one request; returns the status and the whole body. Bounded by the client's
    /// timeout (see [`NodeClient::with_timeout`]).
    async fn call(
        &self,
        method: Method,
        path: &str,
        mut body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let late = |what: &str, addr: &str| format!("{what} {addr} within {:?}", self.timeout);
        let reads = method == Method::GET;
        // A read goes to the next node when one fails it (each node once at most); a write
        // that was sent is never sent again.
        let mut tries = if reads { self.addrs.len() } else { 1 };
        loop {
            tries -= 1;
            let (node, sender) = tokio::time::timeout_at(deadline, self.connection())
                .await
                .map_err(|_| unavailable(late("no connection to", self.addr())))??;
            let addr = &self.addrs[node];
            // The last try takes the body; earlier ones (reads: no body) copy it.
            let payload = if tries == 0 {
                std::mem::take(&mut body)
            } else {
                body.clone()
            };
            let exchange = self.exchange(sender, node, method.clone(), path, payload);
            let failed = match tokio::time::timeout_at(deadline, exchange).await {
                Ok(Err(err @ EngineError::Unavailable { .. })) => err,
                Ok(answer) => return answer,
                Err(_) if reads => unavailable(late("no answer from", addr)),
                // Sent: the node may have applied it.
                Err(_) => {
                    self.move_past(node);
                    return Err(EngineError::Indeterminate {
                        backend: "node",
                        detail: late("no answer from", addr),
                    });
                }
            };
            self.move_past(node);
            if tries == 0 || tokio::time::Instant::now() >= deadline {
                return Err(failed);
            }
        }
    }

    /// One request on `sender`; returns the status and the whole body.
    async fn exchange(
        &self,
        mut sender: SendRequest<Full<Bytes>>,
        node: usize,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        let mut request = self.authorized(
            Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, &self.addrs[node])
                .header(hyper::header::CONTENT_TYPE, "application/octet-stream"),
        );
        // The call's session travels to the node, and comes back grown by what it saw there.
        let session = agentstore_engine::session::current();
        if let Some(token) = session.as_ref().filter(|t| !t.is_empty()) {
            request = request.header(super::SESSION_HEADER, token.to_string());
        }
        let request =
            request
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| EngineError::Internal {
                    detail: e.to_string(),
                })?;
        let response = sender.send_request(request).await.map_err(unavailable)?;
        let status = response.status();
        if session.is_some()
            && let Some(Ok(Ok(seen))) = response.headers().get(super::SESSION_HEADER).map(|v| {
                v.to_str()
                    .map(str::parse::<agentstore_engine::session::SessionToken>)
            })
        {
            agentstore_engine::session::observe(|token| token.merge(&seen));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(unavailable)?
            .to_bytes();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE {
            idle.push((node, sender));
        }
        Ok((status, body))
    }

    /// The node's `/v1/status` (see `docs/openapi.yaml`).
    pub async fn status(&self) -> Result<super::NodeStatus, EngineError> {
        let (status, body) = self.call(Method::GET, "/v1/status", Vec::new()).await?;
        if status != StatusCode::OK {
            return Err(Self::refused(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| EngineError::Storage {
            detail: format!("the node sent an invalid status: {e}"),
        })
    }

    /// Every live record the node holds (`GET /v1/backup`), for a backup.
    pub async fn backup(&self) -> Result<Vec<(Key, Record)>, EngineError> {
        let (status, body) = self.call(Method::GET, "/v1/backup", Vec::new()).await?;
        if status != StatusCode::OK {
            return Err(Self::refused(status, &body));
        }
        agentstore_wire::decode_entries(&body).map_err(|e| EngineError::Storage {
            detail: format!("the node sent an invalid backup: {e}"),
        })
    }

    /// Writes `record` into `key` as a merge (what a restore does): joined with what the key
    /// holds, so restoring twice, or into a node that has newer writes, loses nothing.
    pub async fn restore(&self, key: Key, record: Record) -> Result<(), EngineError> {
        let write = Write::new(key, agentstore_core::record::Mutation::Merge(record));
        DynEngine::commit(self, vec![write]).await.map(drop)
    }

    /// Asks the node to leave the cluster (it hands its records over, then stops).
    pub async fn leave(&self) -> Result<(), EngineError> {
        let (status, body) = self.call(Method::POST, "/v1/leave", Vec::new()).await?;
        if status != StatusCode::OK {
            return Err(Self::refused(status, &body));
        }
        Ok(())
    }

    /// Asks the node's Raft group to add `id` (its peer address `addr`) as a learner.
    pub async fn add_learner(&self, id: &str, addr: &str) -> Result<(), EngineError> {
        let body = serde_json::json!({ "id": id, "addr": addr }).to_string();
        self.post_json("/v1/raft/learners", body).await
    }

    /// Asks the node's Raft group to make `voters` its voting members (learners among them
    /// are promoted; voters left out leave the group).
    pub async fn set_voters(&self, voters: &[String]) -> Result<(), EngineError> {
        let body = serde_json::json!({ "voters": voters }).to_string();
        self.post_json("/v1/raft/voters", body).await
    }

    async fn post_json(&self, path: &str, body: String) -> Result<(), EngineError> {
        let (status, answer) = self.call(Method::POST, path, body.into_bytes()).await?;
        if status != StatusCode::OK {
            return Err(Self::refused(status, &answer));
        }
        Ok(())
    }

    /// Runs a repair on the node (Merkle anti-entropy with every member, now); calls
    /// `on_step` with each member's result as the node reports it.
    pub async fn repair(
        &self,
        mut on_step: impl FnMut(serde_json::Value),
    ) -> Result<(), EngineError> {
        let (node, mut sender) = self.connection().await?;
        let request = self
            .authorized(
                Request::builder()
                    .method(Method::POST)
                    .uri("/v1/repair")
                    .header(hyper::header::HOST, &self.addrs[node]),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| EngineError::Internal {
                detail: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(unavailable)?;
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            let bytes = body.collect().await.map_err(unavailable)?.to_bytes();
            return Err(Self::refused(status, &bytes));
        }
        // Newline-delimited JSON, a line per member, as the repair reaches it.
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(unavailable)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(step) = serde_json::from_slice(&line) {
                    on_step(step);
                }
            }
        }
        Ok(())
    }

    /// The engine error the node's error answer stands for.
    fn refused(status: StatusCode, body: &[u8]) -> EngineError {
        let error: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let code = error["error"]["code"].as_str().unwrap_or("").to_owned();
        let message = error["error"]["message"]
            .as_str()
            .map_or_else(|| format!("HTTP {status}"), str::to_owned);
        let count = |field: &str| error["error"][field].as_u64().unwrap_or(0) as usize;
        match code.as_str() {
            "quorum_unavailable" => EngineError::QuorumFailed {
                acknowledged: count("acknowledged"),
                needed: count("needed"),
            },
            "unsupported" => EngineError::Unsupported { detail: message },
            "position_unavailable" => EngineError::PositionUnavailable {
                requested: String::new(),
                detail: message,
            },
            "disk_full" => EngineError::DiskFull { detail: message },
            "membership_refused" => EngineError::InvalidSettings { detail: message },
            "indeterminate" => EngineError::Indeterminate {
                backend: "node",
                detail: message,
            },
            "session_behind" => EngineError::SessionBehind {
                backend: "node",
                waited_ms: count("waited_ms") as u64,
                detail: message,
            },
            _ if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN => {
                EngineError::Denied {
                    backend: "node",
                    code,
                    detail: message,
                }
            }
            _ if status.is_server_error() => unavailable(message),
            _ => EngineError::Storage { detail: message },
        }
    }

    fn record(key: &Key, body: &[u8]) -> Result<Record, EngineError> {
        codec::decode(body).map_err(|source| EngineError::Decode {
            key: key.clone(),
            source,
        })
    }
}

impl DynEngine for NodeClient {
    fn backend(&self) -> &'static str {
        "node"
    }

    fn get<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        Box::pin(async move {
            let path = format!("/v1/records/{}", encode(key.as_bytes()));
            let (status, body) = self.call(Method::GET, &path, Vec::new()).await?;
            match status {
                StatusCode::OK => Self::record(key, &body).map(Some),
                StatusCode::NOT_FOUND => Ok(None),
                other => Err(Self::refused(other, &body)),
            }
        })
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
        start_after: Option<&'a Key>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(Key, Record)>> {
        Box::pin(async move {
            let mut path = format!("/v1/records?prefix={}&limit={limit}", encode(prefix));
            if let Some(after) = start_after {
                path.push_str(&format!("&after={}", encode(after.as_bytes())));
            }
            let (status, body) = self.call(Method::GET, &path, Vec::new()).await?;
            if status != StatusCode::OK {
                return Err(Self::refused(status, &body));
            }
            agentstore_wire::decode_entries(&body).map_err(|e| EngineError::Storage {
                detail: format!("the node sent an invalid scan page: {e}"),
            })
        })
    }

    fn commit(&self, writes: Vec<Write>) -> EngineFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let single =
                matches!(writes.as_slice(), [w] if w.expect.is_none() && w.fence.is_none());
            let (status, answer) = if single {
                let write = single_unconditional(writes)?;
                let path = format!("/v1/records/{}", encode(write.key.as_bytes()));
                let body = agentstore_wire::encode_mutation(&write.mutation);
                self.call(Method::POST, &path, body).await?
            } else {
                // Batches and conditions: the node applies them atomically, on one engine.
                let body = encode_writes(&writes);
                self.call(Method::POST, "/v1/records", body).await?
            };
            if status != StatusCode::OK {
                return Err(Self::refused(status, &answer));
            }
            // Both answer the outcome, typed refusals included.
            decode_outcome(&answer).map_err(|e| EngineError::Storage {
                detail: format!("the node sent an invalid outcome: {e}"),
            })?
        })
    }

    fn changes<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> EngineFuture<'a, ChangePage> {
        Box::pin(async move {
            // The node answers within the wait; the request's own deadline is the timeout.
            let wait = wait.min(self.timeout / 2);
            let mut path = format!(
                "/v1/feed?prefix={}&limit={limit}&wait_ms={}",
                encode(prefix),
                wait.as_millis()
            );
            if let Some(after) = after {
                path.push_str(&format!("&after={after}"));
            }
            let (status, body) = self.call(Method::GET, &path, Vec::new()).await?;
            if status != StatusCode::OK {
                return Err(Self::refused(status, &body));
            }
            super::watch::decode_page(&body).map_err(|e| EngineError::Storage {
                detail: format!("the node sent an invalid feed page: {e}"),
            })
        })
    }
}
