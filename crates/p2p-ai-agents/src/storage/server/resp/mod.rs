//! The node's RESP endpoint (`storage.cluster.resp_addr`): the Redis protocol over the same
//! [`Storage`](crate::storage::Storage) as the HTTP API, so `redis-cli`, `redis-benchmark`
//! and Redis client libraries work against a node (see `docs/resp.md`).
//!
//! Each connection reads what the client sent, runs every whole command in it in order, and
//! writes their replies in one write: a pipelining client gets its replies in one batch.

mod commands;
mod frame;

use axum::serve::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::Api;
use commands::{Connection, Next};
use frame::Reply;

/// Client connections served at once; more wait in the kernel's backlog.
const CONNECTIONS: usize = 4096;
/// What one read asks the socket for.
const READ: usize = 16 * 1024;

/// Serves RESP on `listener` until `stopping` turns true; then each connection finishes the
/// commands it has read and closes.
pub(super) async fn serve<L: Listener>(
    mut listener: L,
    api: Api,
    mut stopping: watch::Receiver<bool>,
) {
    let slots = std::sync::Arc::new(Semaphore::new(CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = stopping.changed() => break,
            slot = std::sync::Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let (io, _) = tokio::select! {
            _ = stopping.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (api, stopping) = (api.clone(), stopping.clone());
        connections.spawn(async move {
            let _slot = slot;
            connection(io, api, stopping).await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One client connection: commands in, replies out, in order.
async fn connection<S>(mut stream: S, api: Api, mut stopping: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut state = Connection::default();
    let mut input: Vec<u8> = Vec::with_capacity(READ);
    let mut output: Vec<u8> = Vec::with_capacity(READ);
    loop {
        let mut used = 0;
        let mut closing = false;
        while !closing {
            match frame::parse(&input[used..]) {
                Ok(Some((args, taken))) => {
                    used += taken;
                    if args.is_empty() {
                        continue;
                    }
                    match state.execute(&api, args).await {
                        Next::Reply(reply) => reply.encode(&mut output),
                        Next::Close(reply) => {
                            reply.encode(&mut output);
                            closing = true;
                        }
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    Reply::error("ERR", err).encode(&mut output);
                    closing = true;
                }
            }
        }
        input.drain(..used);
        if !output.is_empty() {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if closing || *stopping.borrow() {
            let _ = stream.shutdown().await;
            return;
        }
        input.reserve(READ);
        tokio::select! {
            read = stream.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = stopping.changed() => {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}
