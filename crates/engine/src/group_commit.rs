//! The queue discipline of agentstore's group-commit writer threads (the local engine, the
//! causal store, the Raft log): wait for one request, take whatever else has queued up
//! behind it, and commit them as one transaction, so one fsync serves them all.

use tokio::sync::mpsc;

/// Most requests committed in one transaction. Bounds the latency one commit adds to the
/// requests queued behind it, and the memory a group holds.
pub const MAX_GROUP: usize = 256;

/// Blocks until a request arrives; returns it with whatever else is queued, up to
/// [`MAX_GROUP`], in order. `None` once every sender is gone and nothing is left. For a
/// writer's own thread, never an async task.
pub fn next_group<T>(queue: &mut mpsc::Receiver<T>) -> Option<Vec<T>> {
    let first = queue.blocking_recv()?;
    let mut group = Vec::with_capacity(queue.len().min(MAX_GROUP - 1) + 1);
    group.push(first);
    while group.len() < MAX_GROUP {
        match queue.try_recv() {
            Ok(request) => group.push(request),
            Err(_) => break,
        }
    }
    Some(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_takes_what_is_queued_in_order_up_to_the_bound() {
        let (tx, mut rx) = mpsc::channel(1000);
        for i in 0..(MAX_GROUP + 10) {
            tx.try_send(i).unwrap();
        }
        drop(tx);
        let first = next_group(&mut rx).unwrap();
        assert_eq!(first, (0..MAX_GROUP).collect::<Vec<_>>());
        let second = next_group(&mut rx).unwrap();
        assert_eq!(second, (MAX_GROUP..MAX_GROUP + 10).collect::<Vec<_>>());
        assert_eq!(next_group(&mut rx), None);
    }
}
