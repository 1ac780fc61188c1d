//! Causal consistency of a recorded history of sessions (Bouajjani, Enea, Guerraoui and Hamza,
//! "On Verifying Causal Consistency", POPL 2017: the "bad patterns").
//!
//! Every write writes a value no other write writes, so a read names the write it saw. The
//! causal order is the transitive closure of session order (each session's operations in the
//! order it issued them) and reads-from (a write before every read that saw it). A history is
//! causally consistent (with a last-writer-wins arbitration of concurrent writes) when none of
//! these appears:
//!
//! - **thin air**: a read sees a value nobody wrote;
//! - **cyclic causality**: the causal order has a cycle (a read saw a write from its own
//!   future, or two sessions each saw the other's later write);
//! - **stale initial read**: a read finds a key empty although a write of it is in the read's
//!   causal past;
//! - **stale read**: a read sees a write `w` although another write of the key that follows
//!   `w` causally is in the read's causal past.
//!
//! The four session guarantees are special cases, and a violation names the one it breaks:
//! read-your-writes (the newer write is the session's own), monotonic reads (the session had
//! already read the key at the newer write, or after it), monotonic writes (the session had
//! read a later write of the newer write's session), writes-follow-reads (the session had
//! read a write whose session had read the newer write before writing it), and otherwise
//! causality through longer chains of reads and sessions.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;

/// One operation of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CausalOp<K, V> {
    /// Wrote `value` (unique across the history) to `key`.
    Write {
        /// The key.
        key: K,
        /// The value.
        value: V,
    },
    /// Read `key` and saw `value` (`None`: no value).
    Read {
        /// The key.
        key: K,
        /// What it saw.
        value: Option<V>,
    },
}

/// Which guarantee a stale read breaks, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Guarantee {
    /// The newer write was the reading session's own.
    ReadYourWrites,
    /// The reading session had already read the key at the newer write (or after it).
    MonotonicReads,
    /// The reading session had read a write that the newer write's session made after it.
    MonotonicWrites,
    /// The reading session had read a write whose session had read the newer write first.
    WritesFollowReads,
    /// The newer write reached the read through a longer chain of reads and sessions.
    Causality,
}

/// Why a history is not causally consistent. Operations are named `(session, index)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CausalViolation {
    /// Two writes wrote the same value: the check needs each value written once.
    DuplicateValue {
        /// The first write.
        first: (usize, usize),
        /// The second.
        second: (usize, usize),
    },
    /// A read saw a value nobody wrote.
    ThinAir {
        /// The read.
        read: (usize, usize),
    },
    /// The causal order has a cycle through this operation.
    Cycle {
        /// An operation on the cycle.
        at: (usize, usize),
    },
    /// A read found the key empty, or saw `seen`, although `newer` (a write of the key after
    /// it) is in its causal past.
    StaleRead {
        /// The read.
        read: (usize, usize),
        /// The write it saw, if any.
        seen: Option<(usize, usize)>,
        /// A write of the key in the read's causal past that overwrites what it saw.
        newer: (usize, usize),
        /// The guarantee that breaks.
        guarantee: Guarantee,
    },
}

impl fmt::Display for CausalViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CausalViolation::DuplicateValue { first, second } => {
                write!(f, "writes {first:?} and {second:?} wrote the same value")
            }
            CausalViolation::ThinAir { read } => {
                write!(f, "read {read:?} saw a value nobody wrote")
            }
            CausalViolation::Cycle { at } => {
                write!(f, "the causal order has a cycle through {at:?}")
            }
            CausalViolation::StaleRead {
                read,
                seen,
                newer,
                guarantee,
            } => write!(
                f,
                "read {read:?} saw {seen:?} although {newer:?} overwrote it in its causal past ({guarantee:?})"
            ),
        }
    }
}

/// What [`check_causal`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CausalChecked {
    /// Sessions.
    pub sessions: usize,
    /// Writes.
    pub writes: usize,
    /// Reads.
    pub reads: usize,
}

/// A set of write indices.
#[derive(Debug, Clone, Default)]
struct Past(Vec<u64>);

impl Past {
    fn insert(&mut self, i: usize) {
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn union(&mut self, other: &Past) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// Checks `sessions` (each a list of operations in the order the session issued them).
pub fn check_causal<K, V>(
    sessions: &[Vec<CausalOp<K, V>>],
) -> Result<CausalChecked, CausalViolation>
where
    K: Eq + Hash + Clone,
    V: Eq + Hash + Clone,
{
    // Every write, numbered; the write of each value.
    let mut writes: Vec<((usize, usize), &K)> = Vec::new();
    let mut writer: HashMap<&V, usize> = HashMap::new();
    let mut checked = CausalChecked {
        sessions: sessions.len(),
        ..CausalChecked::default()
    };
    for (s, ops) in sessions.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            match op {
                CausalOp::Write { key, value } => {
                    if let Some(&w) = writer.get(value) {
                        return Err(CausalViolation::DuplicateValue {
                            first: writes[w].0,
                            second: (s, i),
                        });
                    }
                    writer.insert(value, writes.len());
                    writes.push(((s, i), key));
                    checked.writes += 1;
                }
                CausalOp::Read { .. } => checked.reads += 1,
            }
        }
    }
    let write_index: HashMap<(usize, usize), usize> = writes
        .iter()
        .enumerate()
        .map(|(w, (at, _))| (*at, w))
        .collect();
    // The causal past of each operation, computed in a topological order of session order
    // plus reads-from: an operation is ready once its session predecessor is done and, for
    // a read, the write it saw.
    let mut past: Vec<Vec<Option<Past>>> =
        sessions.iter().map(|ops| vec![None; ops.len()]).collect();
    let mut next = vec![0usize; sessions.len()];
    let total: usize = sessions.iter().map(Vec::len).sum();
    let mut done = 0;
    while done < total {
        let mut progressed = false;
        for s in 0..sessions.len() {
            while next[s] < sessions[s].len() {
                let i = next[s];
                let mut here = if i == 0 {
                    Past::default()
                } else {
                    past[s][i - 1].clone().expect("predecessor done")
                };
                if i > 0
                    && let Some(&w) = write_index.get(&(s, i - 1))
                {
                    here.insert(w);
                }
                if let CausalOp::Read { value: Some(v), .. } = &sessions[s][i] {
                    let Some(&w) = writer.get(v) else {
                        return Err(CausalViolation::ThinAir { read: (s, i) });
                    };
                    let (ws, wi) = writes[w].0;
                    let Some(source) = past[ws][wi].as_ref() else {
                        break; // the write it saw is not done yet
                    };
                    here.union(source);
                    here.insert(w);
                }
                past[s][i] = Some(here);
                next[s] += 1;
                done += 1;
                progressed = true;
            }
        }
        if !progressed {
            let s = (0..sessions.len())
                .find(|&s| next[s] < sessions[s].len())
                .unwrap_or(0);
            return Err(CausalViolation::Cycle { at: (s, next[s]) });
        }
    }
    // Writes by key, for the stale-read patterns.
    let mut by_key: HashMap<&K, Vec<usize>> = HashMap::new();
    for (w, (_, key)) in writes.iter().enumerate() {
        by_key.entry(*key).or_default().push(w);
    }
    for (s, ops) in sessions.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            let CausalOp::Read { key, value } = op else {
                continue;
            };
            let here = past[s][i].as_ref().expect("all done");
            let seen = value.as_ref().map(|v| writer[v]);
            // Every write of the key in the read's past that overwrites what it saw; the
            // most specific guarantee broken is reported.
            let mut worst: Option<(Guarantee, usize)> = None;
            for &w2 in by_key.get(key).into_iter().flatten() {
                if Some(w2) == seen || !here.contains(w2) {
                    continue;
                }
                let (ws, wi) = writes[w2].0;
                let overwrites = match seen {
                    None => true,
                    Some(w) => past[ws][wi].as_ref().expect("all done").contains(w),
                };
                if overwrites {
                    let broken = guarantee(sessions, &past, &writes, &writer, s, i, w2);
                    if worst.is_none_or(|(g, _)| broken < g) {
                        worst = Some((broken, w2));
                    }
                }
            }
            if let Some((guarantee, newer)) = worst {
                return Err(CausalViolation::StaleRead {
                    read: (s, i),
                    seen: seen.map(|w| writes[w].0),
                    newer: writes[newer].0,
                    guarantee,
                });
            }
        }
    }
    Ok(checked)
}

/// Which session guarantee the stale read `(s, i)` breaks, `newer` being the write it missed.
fn guarantee<K: PartialEq, V: Eq + Hash>(
    sessions: &[Vec<CausalOp<K, V>>],
    past: &[Vec<Option<Past>>],
    writes: &[((usize, usize), &K)],
    writer: &HashMap<&V, usize>,
    s: usize,
    i: usize,
    newer: usize,
) -> Guarantee {
    let (newer_session, newer_index) = writes[newer].0;
    if newer_session == s {
        return Guarantee::ReadYourWrites;
    }
    // An earlier read of the same key in this session whose past (what it saw included)
    // holds the newer write.
    let key = writes[newer].1;
    let earlier_read = (0..i).any(|j| {
        matches!(&sessions[s][j], CausalOp::Read { key: k, .. } if k == key)
            && past[s][j].as_ref().is_some_and(|p| p.contains(newer))
    });
    if earlier_read {
        return Guarantee::MonotonicReads;
    }
    // The writes this session read before `i`, by (session, index).
    let read_before: Vec<(usize, usize)> = sessions[s][..i]
        .iter()
        .filter_map(|op| match op {
            CausalOp::Read { value: Some(v), .. } => Some(writes[writer[v]].0),
            _ => None,
        })
        .collect();
    if read_before
        .iter()
        .any(|&(t, m)| t == newer_session && m > newer_index)
    {
        return Guarantee::MonotonicWrites;
    }
    // A write this session read whose session had read the newer write before making it.
    let follows_a_read_of_newer = |&(t, m): &(usize, usize)| {
        sessions[t][..m]
            .iter()
            .any(|op| matches!(op, CausalOp::Read { value: Some(v), .. } if writer[v] == newer))
    };
    if read_before.iter().any(follows_a_read_of_newer) {
        Guarantee::WritesFollowReads
    } else {
        Guarantee::Causality
    }
}
