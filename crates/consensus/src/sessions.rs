//! Proposals that apply once however often they are sent (client sessions, as in §6.3 of
//! Ongaro's Raft dissertation).
//!
//! A member proposes under a session of its own (its id and the time it started, so a restart
//! opens a new one) and numbers its proposals. The state machine keeps each numbered
//! proposal's outcome; a copy of it that reaches the log again (the proposer sent it again
//! because the leader it asked died or did not answer in time) answers the kept outcome and
//! changes nothing. That is what lets a member send a write again to the next leader instead
//! of answering "indeterminate": a write reaching a follower while the leader is gone waits
//! for the new leader and goes there.
//!
//! What is kept stays bounded, deterministically (it depends on the log alone):
//! - every proposal names the lowest number its proposer still waits for (`low`); outcomes
//!   below it are dropped, and a copy numbered below it applies nothing (its proposer has
//!   given up on it);
//! - a session that proposed nothing in the last [`IDLE_ENTRIES`] entries is dropped.
//!
//! ```text
//! proposal = 3 session:bytes seq:uvarint low:uvarint command:bytes
//! ```

use agentstore_core::codec::{DecodeError, Reader, put_bytes, put_uvarint};
use agentstore_engine::EngineError;
use redb::{ReadableTable, Table, TableDefinition};

/// The format byte of a proposal in a session (commands are 1 and 2).
pub(crate) const PROPOSAL: u8 = 3;

/// session, 0, seq (big-endian) → the outcome's bytes.
pub(crate) const OUTCOMES: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("session_outcomes");
/// session → low (uvarint), then the index of its last entry (uvarint).
pub(crate) const SESSIONS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("sessions");

/// A session that proposed nothing in this many entries is forgotten: its proposer has been
/// gone far longer than any request waits.
pub(crate) const IDLE_ENTRIES: u64 = 1_000_000;

/// Idle sessions are looked for once every this many entries.
const SWEEP_EVERY: u64 = 4096;

/// A numbered proposal and the command it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal<'a> {
    /// The proposer's session.
    pub session: &'a [u8],
    /// The proposal's number in the session.
    pub seq: u64,
    /// The lowest number the proposer still waits for.
    pub low: u64,
    /// The command (`crate::command`).
    pub command: &'a [u8],
}

/// Encodes `command` as proposal `seq` of `session`, whose proposer waits for `low` and up.
pub fn encode_proposal(session: &[u8], seq: u64, low: u64, command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + session.len() + 24);
    out.push(PROPOSAL);
    put_bytes(&mut out, session);
    put_uvarint(&mut out, seq);
    put_uvarint(&mut out, low);
    put_bytes(&mut out, command);
    out
}

/// The proposal in `bytes`, or `None` if they are a bare command.
pub fn decode_proposal(bytes: &[u8]) -> Option<Result<Proposal<'_>, DecodeError>> {
    if bytes.first() != Some(&PROPOSAL) {
        return None;
    }
    let mut r = Reader::new(&bytes[1..]);
    let decoded = (|| {
        let proposal = Proposal {
            session: r.slice()?,
            seq: r.uvarint()?,
            low: r.uvarint()?,
            command: r.slice()?,
        };
        if r.remaining() != 0 {
            return Err(r.malformed("trailing bytes after the proposal"));
        }
        Ok(proposal)
    })();
    Some(decoded)
}

fn outcome_key(session: &[u8], seq: u64) -> Vec<u8> {
    let mut key = session.to_vec();
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn storage(err: impl std::fmt::Display) -> EngineError {
    EngineError::Storage {
        detail: format!("sessions: {err}"),
    }
}

/// The session tables inside an apply transaction.
pub(crate) struct Sessions<'a, 'txn> {
    pub(crate) outcomes: &'a mut Table<'txn, &'static [u8], &'static [u8]>,
    pub(crate) sessions: &'a mut Table<'txn, &'static [u8], &'static [u8]>,
}

/// What a session's row says.
#[derive(Debug, Clone, Copy, Default)]
struct Row {
    low: u64,
    last_index: u64,
}

impl Row {
    fn encode(self) -> Vec<u8> {
        let mut out = Vec::new();
        put_uvarint(&mut out, self.low);
        put_uvarint(&mut out, self.last_index);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(bytes);
        Ok(Self {
            low: r.uvarint().map_err(storage)?,
            last_index: r.uvarint().map_err(storage)?,
        })
    }
}

impl Sessions<'_, '_> {
    /// Applies `proposal`, the entry at `index`: `apply` runs its command unless a copy of it
    /// already applied (the kept outcome answers) or its proposer gave up on it (nothing
    /// applies). Returns the outcome's bytes.
    pub(crate) fn apply(
        &mut self,
        index: u64,
        proposal: &Proposal<'_>,
        apply: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Result<Vec<u8>, EngineError> {
        let mut row = match self.sessions.get(proposal.session).map_err(storage)? {
            Some(bytes) => Row::decode(bytes.value())?,
            None => Row::default(),
        };
        let key = outcome_key(proposal.session, proposal.seq);
        let kept = self
            .outcomes
            .get(key.as_slice())
            .map_err(storage)?
            .map(|v| v.value().to_vec());
        let outcome = if let Some(kept) = kept {
            kept
        } else if proposal.seq < row.low {
            agentstore_engine::batch_codec::encode_outcome(&Err(EngineError::Storage {
                detail: "a late copy of a proposal its proposer no longer waits for; not applied"
                    .into(),
            }))
        } else {
            let outcome = apply(proposal.command);
            self.outcomes
                .insert(key.as_slice(), outcome.as_slice())
                .map_err(storage)?;
            outcome
        };
        if proposal.low > row.low {
            let (from, to) = (
                outcome_key(proposal.session, 0),
                outcome_key(proposal.session, proposal.low),
            );
            self.outcomes
                .retain_in(from.as_slice()..to.as_slice(), |_, _| false)
                .map_err(storage)?;
            row.low = proposal.low;
        }
        row.last_index = index;
        self.sessions
            .insert(proposal.session, row.encode().as_slice())
            .map_err(storage)?;
        Ok(outcome)
    }

    /// Every [`SWEEP_EVERY`] entries, forgets the sessions idle for [`IDLE_ENTRIES`] at
    /// `index`.
    pub(crate) fn sweep(&mut self, index: u64) -> Result<(), EngineError> {
        if !index.is_multiple_of(SWEEP_EVERY) || index < IDLE_ENTRIES {
            return Ok(());
        }
        let mut idle = Vec::new();
        for item in self.sessions.iter().map_err(storage)? {
            let (session, row) = item.map_err(storage)?;
            if Row::decode(row.value())?.last_index + IDLE_ENTRIES < index {
                idle.push(session.value().to_vec());
            }
        }
        for session in idle {
            self.sessions.remove(session.as_slice()).map_err(storage)?;
            let (from, to) = (outcome_key(&session, 0), outcome_key(&session, u64::MAX));
            self.outcomes
                .retain_in(from.as_slice()..=to.as_slice(), |_, _| false)
                .map_err(storage)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    #[test]
    fn proposals_round_trip_and_bare_commands_are_not_proposals() {
        let bytes = encode_proposal(b"m/1", 7, 5, &[1, 2, 3]);
        let proposal = decode_proposal(&bytes).unwrap().unwrap();
        assert_eq!(
            proposal,
            Proposal {
                session: b"m/1",
                seq: 7,
                low: 5,
                command: &[1, 2, 3],
            }
        );
        assert!(decode_proposal(&[1, 0]).is_none());
        for cut in 1..bytes.len() {
            assert!(decode_proposal(&bytes[..cut]).unwrap().is_err(), "{cut}");
        }
    }

    fn with_tables(test: impl FnOnce(&mut Sessions<'_, '_>)) {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut outcomes = txn.open_table(OUTCOMES).unwrap();
            let mut sessions = txn.open_table(SESSIONS).unwrap();
            test(&mut Sessions {
                outcomes: &mut outcomes,
                sessions: &mut sessions,
            });
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_copy_answers_the_first_outcome_and_applies_nothing() {
        with_tables(|sessions| {
            let mut applied = 0;
            let proposal = Proposal {
                session: b"a/1",
                seq: 1,
                low: 1,
                command: b"x",
            };
            for index in [10, 11, 12] {
                let outcome = sessions
                    .apply(index, &proposal, |_| {
                        applied += 1;
                        vec![applied]
                    })
                    .unwrap();
                assert_eq!(outcome, vec![1], "every copy answers the first outcome");
            }
            assert_eq!(applied, 1);
            // Another session's proposal 1 is another proposal.
            let other = Proposal {
                session: b"b/1",
                ..proposal.clone()
            };
            sessions.apply(13, &other, |_| vec![9]).unwrap();
            assert_eq!(sessions.outcomes.len().unwrap(), 2);
        });
    }

    #[test]
    fn outcomes_below_low_are_dropped_and_late_copies_apply_nothing() {
        with_tables(|sessions| {
            let at = |seq, low| Proposal {
                session: b"a/1",
                seq,
                low,
                command: b"x",
            };
            for seq in 1..=3 {
                sessions
                    .apply(seq, &at(seq, 1), |_| vec![seq as u8])
                    .unwrap();
            }
            // The proposer has its answers up to 3: it waits for 4 and up.
            sessions.apply(4, &at(4, 4), |_| vec![4]).unwrap();
            assert_eq!(
                sessions.outcomes.len().unwrap(),
                1,
                "only 4's outcome is kept"
            );
            let late = sessions
                .apply(5, &at(2, 1), |_| panic!("a late copy applied"))
                .unwrap();
            let refused = agentstore_engine::batch_codec::decode_outcome(&late).unwrap();
            assert!(refused.is_err());
        });
    }

    #[test]
    fn idle_sessions_are_forgotten_after_their_window() {
        with_tables(|sessions| {
            let proposal = |session: &'static [u8]| Proposal {
                session,
                seq: 1,
                low: 1,
                command: b"x",
            };
            sessions.apply(1, &proposal(b"old"), |_| vec![1]).unwrap();
            let busy_at = IDLE_ENTRIES + SWEEP_EVERY;
            sessions
                .apply(busy_at, &proposal(b"busy"), |_| vec![2])
                .unwrap();
            sessions.sweep(busy_at + 1).unwrap();
            assert_eq!(
                sessions.sessions.len().unwrap(),
                2,
                "a sweep runs on its turn"
            );
            let turn = (IDLE_ENTRIES / SWEEP_EVERY + 2) * SWEEP_EVERY;
            sessions.sweep(turn).unwrap();
            assert!(sessions.sessions.get(&b"old"[..]).unwrap().is_none());
            assert!(sessions.sessions.get(&b"busy"[..]).unwrap().is_some());
            assert_eq!(sessions.outcomes.len().unwrap(), 1);
        });
    }
}
