//! The client API's HTTP/1.1 server: axum's router on hyper connections that a client cannot
//! hold open for free.
//!
//! axum's own `serve` sets no timer, so a connection that sends a request head slowly (or
//! never sends another request) stays open forever. Here every connection must deliver each
//! request head within [`HEAD_DEADLINE`] (hyper's header-read timeout: it also closes a
//! keep-alive connection idle that long) and its body within the same time after the head
//! (`408 request_timeout` otherwise; a body over [`BODY_LIMIT`] is `413 body_too_large`), at
//! most [`CONNECTIONS`] connections are served at once (more wait in the kernel's backlog),
//! and a shutdown lets requests in progress finish.

use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// How long a client may take to send a request head (and may stay idle between requests).
pub(super) const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// Client connections served at once.
const CONNECTIONS: usize = 4096;
/// The largest request body (axum's default limit, which its extractors apply too).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// `router`'s routes read their whole request body within `deadline` before their handler
/// runs. A route layer: layers added after it (the client check) run first, so a request
/// that will be refused is never buffered.
pub(super) fn body_deadline<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    deadline: Duration,
) -> Router<S> {
    router.route_layer(axum::middleware::from_fn_with_state(deadline, body_within))
}

/// Gives every error answer the API's JSON error body. The handlers answer JSON already;
/// what does not is axum's own answers: an unknown route (404), a method a route does not
/// serve (405) and a path or query that does not parse (400), which come as plain text or
/// empty.
pub(super) async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", format!("no route {path}")),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("{path} does not serve {method}"),
        ),
        StatusCode::BAD_REQUEST if text.contains("query string") => ("invalid_query", text),
        StatusCode::BAD_REQUEST => ("invalid_request", text),
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text),
        _ if status.is_server_error() => ("internal", text),
        _ => ("invalid_request", text),
    };
    super::ApiError::new(status, code, message).into_response()
}

/// Reads the whole request body within `deadline` before the handler runs, so a client that
/// trickles a body (or stops sending it) cannot hold a request open.
async fn body_within(
    axum::extract::State(deadline): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        Ok(Err(_)) => super::ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a request body has at most {BODY_LIMIT} bytes"),
        )
        .into_response(),
        Err(_) => {
            let mut answer = super::ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs_f64()
                ),
            )
            .into_response();
            answer.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            answer
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the requests in progress
/// finish. A request head must arrive within `deadline` ([`HEAD_DEADLINE`] for a node), and
/// its body within `deadline` after it.
pub(super) async fn serve<L: Listener>(
    mut listener: L,
    app: Router,
    deadline: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let head_deadline = deadline;
    let slots = std::sync::Arc::new(Semaphore::new(CONNECTIONS));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = std::sync::Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let (io, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_deadline)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stopping.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
        // Forget the connections that are done.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Reads until the server closes the connection (10 s at most); what it sent.
    async fn until_closed(stream: &mut TcpStream) -> Option<String> {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
        read.await
            .ok()
            .map(|_| String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn slow_and_idle_clients_are_closed_and_a_prompt_one_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, Duration::from_millis(300), async {
            let _ = stopped.await;
        }));
        // Half a request head, then nothing: closed at the deadline, not served.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // Nothing at all.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // A whole request.
        let mut prompt = TcpStream::connect(addr).await.unwrap();
        prompt
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let served = until_closed(&mut prompt)
            .await
            .expect("answered and closed");
        assert!(
            served.starts_with("HTTP/1.1 200") && served.ends_with("ok"),
            "{served}"
        );
        let slow_answer = until_closed(&mut slow).await;
        assert!(
            slow_answer.is_some(),
            "a slow head kept its connection past 10 s"
        );
        assert!(
            !slow_answer.unwrap().contains("200"),
            "a slow head was served"
        );
        assert!(
            until_closed(&mut silent).await.is_some(),
            "an idle connection stayed open"
        );
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_answered_408_and_a_whole_one_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = body_deadline(
            Router::new().route(
                "/echo",
                axum::routing::post(|body: axum::body::Bytes| async move { body }),
            ),
            Duration::from_millis(300),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, Duration::from_millis(300), async {
            let _ = stopped.await;
        }));
        // A head announcing 10 bytes, then 3 of them, then nothing.
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        trickle
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let answer = until_closed(&mut trickle)
            .await
            .expect("a stalled body kept its connection past 10 s");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        let mut whole = TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let served = until_closed(&mut whole).await.expect("answered");
        assert!(
            served.starts_with("HTTP/1.1 200") && served.ends_with("hello"),
            "{served}"
        );
        let _ = stop.send(());
        server.await.unwrap();
    }
}
