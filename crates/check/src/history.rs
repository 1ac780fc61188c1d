//! Recording a history from concurrent clients.

use std::sync::Mutex;
use std::time::Instant;

use crate::linearizable::{Operation, Outcome};

/// A recorded call, to be completed with [`Recorder::returned`] or [`Recorder::refused`];
/// a call never completed stays indeterminate.
#[derive(Debug)]
#[must_use = "a call is completed by Recorder::returned or Recorder::refused"]
pub struct Call(usize);

/// Collects operations from any number of threads or tasks, timing every call and return on
/// one monotonic clock (nanoseconds since the recorder was made).
#[derive(Debug)]
pub struct Recorder<K, I, O> {
    start: Instant,
    ops: Mutex<Vec<Entry<K, I, O>>>,
}

#[derive(Debug)]
struct Entry<K, I, O> {
    key: K,
    op: Operation<I, O>,
    refused: bool,
}

impl<K: Clone, I: Clone, O: Clone> Default for Recorder<K, I, O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone, I: Clone, O: Clone> Recorder<K, I, O> {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, Vec<Entry<K, I, O>>> {
        // A client that panicked mid-record leaves a consistent vector behind.
        self.ops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `client` is about to ask `input` of `key`. Call this before sending.
    pub fn invoke(&self, client: usize, key: K, input: I) -> Call {
        let mut ops = self.ops();
        let call = self.now();
        ops.push(Entry {
            key,
            op: Operation {
                client,
                input,
                call,
                outcome: Outcome::Indeterminate,
            },
            refused: false,
        });
        Call(ops.len() - 1)
    }

    /// Records the answer to `call`. Call this as soon as it arrives.
    pub fn returned(&self, call: Call, output: O) {
        let at = self.now();
        self.ops()[call.0].op.outcome = Outcome::Returned { at, output };
    }

    /// Records that `call` certainly did not take effect (refused before it could apply):
    /// it leaves the history.
    pub fn refused(&self, call: Call) {
        self.ops()[call.0].refused = true;
    }

    /// The recorded history, refused calls left out, calls without an answer indeterminate.
    pub fn history(&self) -> Vec<(K, Operation<I, O>)> {
        self.ops()
            .iter()
            .filter(|entry| !entry.refused)
            .map(|entry| (entry.key.clone(), entry.op.clone()))
            .collect()
    }
}
