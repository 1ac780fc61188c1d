//! Linearizability by the Wing–Gong–Lowe search (the algorithm behind Porcupine and Knossos'
//! linear checker).
//!
//! A history is linearizable when every operation can be given a point between its call and
//! its return such that, taken in the order of those points, the operations form a legal run
//! of the sequential [`Model`] with the answers the clients saw. An *indeterminate* operation
//! (the client saw no answer) has no return: it may take effect at any point after its call,
//! or never, and any answer is possible for it. Placing it after everything else is the same
//! as "never", so the search needs no special case beyond an infinite return time.
//!
//! The search walks the calls in time order, tries to linearize each pending call next, and
//! backtracks when it reaches a return whose operation it has not placed. It succeeds once
//! every operation that returned is placed: the indeterminate ones left over are the ones that
//! never took effect.
//!
//! Configurations it has already explored are cached. A configuration is the set of placed
//! answered operations, the model state, and the set of placed indeterminate operations; one
//! that differs from an explored one only by placing *more* indeterminate operations is
//! pruned, since everything it can still do the explored one could do too (an indeterminate
//! operation is never forced, so leaving it unplaced only keeps options open). Without that
//! dominance rule each indeterminate write doubles the configurations a history with a
//! violation must exhaust. For the same reason, an indeterminate operation placed right after
//! other indeterminate ones is skipped when it leaves the state it would leave placed before
//! them (a write overwrites; the shorter run is tried as a sibling anyway), and one that
//! changes nothing (a read, a compare-and-set that fails) is never placed. With these rules,
//! histories of hundreds of operations per key, a tenth of them indeterminate, stay fast.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// The object's state; equal states must behave the same from then on.
    type State: Clone + Eq + Hash + fmt::Debug;
    /// What a client asked.
    type Input: fmt::Debug;
    /// What a client was answered.
    type Output: fmt::Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// The state after `input` is applied to `state`, if `output` is an answer the object
    /// can give there; `None` if it cannot. `output` is `None` for an indeterminate
    /// operation, whose answer nobody saw: any answer is possible.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;
}

/// An operation of `M`'s object.
pub type OperationOf<M> = Operation<<M as Model>::Input, <M as Model>::Output>;

/// An operation of `M`'s object on key `K`.
pub type Keyed<K, M> = (K, OperationOf<M>);

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<O> {
    /// The client got `output` at time `at`.
    Returned {
        /// When the answer arrived.
        at: u64,
        /// The answer.
        output: O,
    },
    /// No answer: the operation may have taken effect at any time after its call, or never.
    Indeterminate,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// Who issued it (a client issues one operation at a time).
    pub client: usize,
    /// What was asked.
    pub input: I,
    /// When it was invoked, on the clock shared by every client.
    pub call: u64,
    /// How it ended.
    pub outcome: Outcome<O>,
}

impl<I, O> Operation<I, O> {
    fn output(&self) -> Option<&O> {
        match &self.outcome {
            Outcome::Returned { output, .. } => Some(output),
            Outcome::Indeterminate => None,
        }
    }

    fn return_time(&self) -> u64 {
        match self.outcome {
            Outcome::Returned { at, .. } => at,
            Outcome::Indeterminate => u64::MAX,
        }
    }
}

/// The checker's answer for one history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some order of the operations explains every answer.
    Linearizable,
    /// No order does. `order` is the longest sequence of operations (indices into the
    /// history) the search could explain; `blocked` is an operation that, in that attempt,
    /// returned before it could be placed.
    Violation {
        /// The deepest explained prefix found.
        order: Vec<usize>,
        /// The operation the deepest attempt could not place.
        blocked: usize,
    },
    /// The search stopped after this many steps without an answer.
    Inconclusive {
        /// Steps taken.
        steps: u64,
    },
}

/// Steps the search takes before it says [`Verdict::Inconclusive`].
pub const DEFAULT_BUDGET: u64 = 50_000_000;

/// A set of operation indices, hashable for the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn is_subset_of(&self, other: &Self) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a & !b == 0)
    }
}

/// The operations placed so far, answered and indeterminate apart (see [`Explored`]).
struct Placed {
    answered: Bits,
    indeterminate: Bits,
    answered_count: usize,
}

impl Placed {
    fn new(len: usize) -> Self {
        Self {
            answered: Bits::new(len),
            indeterminate: Bits::new(len),
            answered_count: 0,
        }
    }

    fn set(&mut self, op: usize, is_answered: bool) {
        if is_answered {
            self.answered.set(op);
            self.answered_count += 1;
        } else {
            self.indeterminate.set(op);
        }
    }

    fn clear(&mut self, op: usize, is_answered: bool) {
        if is_answered {
            self.answered.clear(op);
            self.answered_count -= 1;
        } else {
            self.indeterminate.clear(op);
        }
    }
}

/// The configurations the search has explored: per (placed answered operations, state), the
/// minimal sets of placed indeterminate operations it was reached with.
struct Explored<S> {
    seen: HashMap<(Bits, S), Vec<Bits>>,
}

impl<S: Eq + Hash> Explored<S> {
    fn new() -> Self {
        Self {
            seen: HashMap::new(),
        }
    }

    /// Records the configuration; `false` if it, or one that placed a subset of its
    /// indeterminate operations, was explored before (nothing new can come of it).
    fn insert(&mut self, placed: &Placed, state: S) -> bool {
        let minimal = self
            .seen
            .entry((placed.answered.clone(), state))
            .or_default();
        if minimal
            .iter()
            .any(|seen| seen.is_subset_of(&placed.indeterminate))
        {
            return false;
        }
        minimal.retain(|seen| !placed.indeterminate.is_subset_of(seen));
        minimal.push(placed.indeterminate.clone());
        true
    }
}

const NIL: usize = usize::MAX;

/// The time-ordered call and return events, as a doubly linked list whose first node is a
/// sentinel, so that linearized operations can be taken out and put back in O(1).
struct Events {
    op: Vec<usize>,
    is_call: Vec<bool>,
    matching: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Events {
    fn new<I, O>(history: &[Operation<I, O>]) -> Self {
        // (time, returns after calls at the same instant, op): two operations that meet at
        // one instant count as concurrent, the lenient reading of a tie.
        let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(history.len() * 2);
        for (i, op) in history.iter().enumerate() {
            order.push((op.call, false, i));
            order.push((op.return_time().max(op.call), true, i));
        }
        order.sort_unstable();
        let nodes = order.len() + 1;
        let mut events = Self {
            op: vec![NIL; nodes],
            is_call: vec![false; nodes],
            matching: vec![NIL; nodes],
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
        };
        let mut call_node = vec![NIL; history.len()];
        for (position, (_, is_return, op)) in order.into_iter().enumerate() {
            let node = position + 1;
            events.op[node] = op;
            events.is_call[node] = !is_return;
            if is_return {
                events.matching[call_node[op]] = node;
            } else {
                call_node[op] = node;
            }
        }
        events
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.matching[call]);
    }

    /// Puts back what the matching `lift` took out (in the reverse order).
    fn unlift(&mut self, call: usize) {
        self.relink(self.matching[call]);
        self.relink(call);
    }
}

/// Checks one object's history against `model`, with the default step budget.
pub fn check<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>]) -> Verdict {
    check_with_budget(model, history, DEFAULT_BUDGET)
}

/// Checks one object's history against `model`, giving up after `budget` steps.
pub fn check_with_budget<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    budget: u64,
) -> Verdict {
    let mut events = Events::new(history);
    let answered = history
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Returned { .. }))
        .count();
    let mut placed = Placed::new(history.len());
    let mut explored = Explored::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    explored.insert(&placed, state.clone());
    let mut best: (Vec<usize>, usize) = (Vec::new(), NIL);
    let mut entry = events.first();
    let mut steps = 0u64;
    loop {
        if placed.answered_count == answered {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive { steps: budget };
        }
        let op = events.op[entry];
        if events.is_call[entry] {
            let operation = &history[op];
            let output = operation.output();
            let next = model.step(&state, &operation.input, output).filter(|next| {
                output.is_some()
                    || !shortcut_exists(model, history, &events, &stack, operation, next)
            });
            if let Some(next) = next {
                placed.set(op, output.is_some());
                if explored.insert(&placed, next.clone()) {
                    stack.push((entry, std::mem::replace(&mut state, next)));
                    events.lift(entry);
                    entry = events.first();
                    continue;
                }
                placed.clear(op, output.is_some());
            }
            entry = events.next[entry];
        } else {
            // A return whose operation is not placed (an answered one: indeterminate returns
            // come last, and the search is over once every answered operation is placed):
            // undo the last placement, try the next.
            if stack.len() > best.0.len() || best.1 == NIL {
                best = (stack.iter().map(|(node, _)| events.op[*node]).collect(), op);
            }
            let Some((call, previous)) = stack.pop() else {
                return Verdict::Violation {
                    order: best.0,
                    blocked: best.1,
                };
            };
            let undone = events.op[call];
            placed.clear(undone, history[undone].output().is_some());
            state = previous;
            events.unlift(call);
            entry = events.next[call];
        }
    }
}

/// Whether placing the indeterminate `operation` next, leading to `next`, is covered by
/// another configuration the search explores anyway: when the run of indeterminate
/// operations placed last (the top of `stack`) started from a state where `operation` leads
/// to `next` too, placing it there reaches the same state having used fewer indeterminate
/// operations (for a write that overwrites, always). An operation that changes nothing needs
/// no rule of its own: the configuration it leads to is dominated by the current one.
fn shortcut_exists<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    events: &Events,
    stack: &[(usize, M::State)],
    operation: &Operation<M::Input, M::Output>,
    next: &M::State,
) -> bool {
    let run = stack
        .iter()
        .rev()
        .take_while(|(node, _)| history[events.op[*node]].output().is_none())
        .last();
    match run {
        None => false,
        Some((_, start)) => model.step(start, &operation.input, None).as_ref() == Some(next),
    }
}

/// What [`check_per_key`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checked {
    /// Distinct keys.
    pub keys: usize,
    /// Operations, indeterminate ones included.
    pub operations: usize,
    /// Operations without an answer.
    pub indeterminate: usize,
}

/// The key whose history is not linearizable (or could not be decided), with the verdict
/// and the key's operations written out.
#[derive(Debug, Clone)]
pub struct Failure<K> {
    /// The key.
    pub key: K,
    /// The verdict for its history (indices into `report`'s numbering).
    pub verdict: Verdict,
    /// The key's operations, one per line, numbered as in the verdict.
    pub report: String,
}

impl<K: fmt::Debug> fmt::Display for Failure<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?}: {:?}", self.key, self.verdict)?;
        f.write_str(&self.report)
    }
}

/// Checks a history of many keys, key by key (linearizability is local: the whole history is
/// linearizable exactly when each key's is).
pub fn check_per_key<K, M>(model: &M, history: &[Keyed<K, M>]) -> Result<Checked, Box<Failure<K>>>
where
    K: Ord + Clone + fmt::Debug,
    M: Model,
    M::Input: Clone,
    M::Output: Clone,
{
    let mut by_key: std::collections::BTreeMap<&K, Vec<OperationOf<M>>> =
        std::collections::BTreeMap::new();
    for (key, op) in history {
        by_key.entry(key).or_default().push(op.clone());
    }
    let checked = Checked {
        keys: by_key.len(),
        operations: history.len(),
        indeterminate: history
            .iter()
            .filter(|(_, op)| matches!(op.outcome, Outcome::Indeterminate))
            .count(),
    };
    for (key, ops) in &by_key {
        let verdict = check(model, ops);
        if verdict != Verdict::Linearizable {
            let mut report = String::new();
            for (i, op) in ops.iter().enumerate() {
                report.push_str(&format!(
                    "  #{i} client {} call {} {:?} -> {:?}\n",
                    op.client, op.call, op.input, op.outcome
                ));
            }
            return Err(Box::new(Failure {
                key: (*key).clone(),
                verdict,
                report,
            }));
        }
    }
    Ok(checked)
}
