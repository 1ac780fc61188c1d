//! Checkers for histories recorded by tests: a client records when it invoked each
//! operation, when the answer came back and what it was (or that no answer came: the
//! operation is *indeterminate*, it may or may not have taken effect), and a checker decides
//! whether some execution of the system's specification explains everything observed.
//!
//! - [`linearizable`]: linearizability, key by key (it is a local property, so a history is
//!   linearizable exactly when every key's sub-history is), by the Wing–Gong–Lowe search.
//! - [`models`]: the sequential specifications the stores promise: a register, a counter.
//! - [`causal`]: causal consistency of sessions (the bad patterns: thin air, cyclic
//!   causality, stale reads), naming the session guarantee a stale read breaks.
//! - [`history`]: a thread-safe recorder with one monotonic clock for every client.
//!
//! The checker has no dependency: it is pure logic over values, shared by the in-process
//! simulations and by the real-process tests.

pub mod causal;
pub mod history;
pub mod linearizable;
pub mod models;

pub use history::{Call, Recorder};
pub use linearizable::{
    Checked, Failure, Model, Operation, Outcome, Verdict, check, check_per_key,
};
