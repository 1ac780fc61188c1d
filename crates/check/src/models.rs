//! The sequential specifications agentstore's strong collections promise.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;

use crate::linearizable::Model;

/// What a client asks of a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOp<V> {
    /// Put a value (`Some`) or delete (`None`).
    Write(Option<V>),
    /// Read the value.
    Read,
    /// Write `new` only if the value is `expect`. With a distinct value per write this is
    /// the same as a compare-and-set on the version that wrote `expect`.
    CompareAndSet {
        /// The value the write requires.
        expect: Option<V>,
        /// The value written when it matches.
        new: Option<V>,
    },
}

/// What a register answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterAnswer<V> {
    /// A write was applied.
    Written,
    /// A read saw this value (`None`: no value).
    Value(Option<V>),
    /// A compare-and-set applied (`true`) or found another value (`false`).
    Swapped(bool),
}

/// A read/write register of values `V`, with compare-and-set.
#[derive(Debug, Clone, Copy)]
pub struct Register<V>(PhantomData<fn() -> V>);

impl<V> Register<V> {
    /// The register model.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<V> Default for Register<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> Model for Register<V>
where
    V: Clone + Eq + Hash + fmt::Debug,
{
    type State = Option<V>;
    type Input = RegisterOp<V>;
    type Output = RegisterAnswer<V>;

    fn init(&self) -> Option<V> {
        None
    }

    fn step(
        &self,
        state: &Option<V>,
        input: &RegisterOp<V>,
        output: Option<&RegisterAnswer<V>>,
    ) -> Option<Option<V>> {
        match (input, output) {
            (RegisterOp::Write(v), None | Some(RegisterAnswer::Written)) => Some(v.clone()),
            (RegisterOp::Read, None) => Some(state.clone()),
            (RegisterOp::Read, Some(RegisterAnswer::Value(seen))) => {
                (seen == state).then(|| state.clone())
            }
            // Unknown answer: it applies if it matches here (placing it last instead is the
            // same as it never applying).
            (RegisterOp::CompareAndSet { expect, new }, None) => Some(if expect == state {
                new.clone()
            } else {
                state.clone()
            }),
            (RegisterOp::CompareAndSet { expect, new }, Some(RegisterAnswer::Swapped(swapped))) => {
                match (expect == state, swapped) {
                    (true, true) => Some(new.clone()),
                    (false, false) => Some(state.clone()),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// What a client asks of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterOp {
    /// Add (or, negative, subtract) an amount.
    Add(i64),
    /// Read the total.
    Read,
}

/// What a counter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterAnswer {
    /// An addition was applied.
    Added,
    /// A read saw this total.
    Total(i64),
}

/// A counter: additions and reads of the exact total.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

impl Model for Counter {
    type State = i64;
    type Input = CounterOp;
    type Output = CounterAnswer;

    fn init(&self) -> i64 {
        0
    }

    fn step(&self, state: &i64, input: &CounterOp, output: Option<&CounterAnswer>) -> Option<i64> {
        match (input, output) {
            (CounterOp::Add(n), None | Some(CounterAnswer::Added)) => Some(state + n),
            (CounterOp::Read, None) => Some(*state),
            (CounterOp::Read, Some(CounterAnswer::Total(seen))) => {
                (seen == state).then_some(*state)
            }
            _ => None,
        }
    }
}
