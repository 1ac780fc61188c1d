//! Forwarding: only a key's replicas stamp and store it, so a node that is not one of them
//! sends a client's write to one that is (the first the failure detector sees alive), which
//! coordinates it and answers with the outcome.

use super::{Answer, Caller, Effect, Job, NodeState};
use crate::key::Key;
use crate::node::NodeId;
use crate::record::Mutation;
use crate::replication::{Message, Outcome, RequestId};

use super::Liveness;

/// A write forwarded to one of its replicas, waiting for its answer.
#[derive(Debug)]
pub(super) struct Forwarded {
    caller: Caller,
    key: Key,
    needed: usize,
    pub(super) deadline_ms: u64,
}

impl NodeState {
    /// Sends a client's write to one of its replicas.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        caller: Caller,
        request: RequestId,
        key: Key,
        mutation: Mutation,
        replicas: Vec<NodeId>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let alive = |n: &&NodeId| self.members.get(*n) == Some(&Liveness::Alive);
        let Some(target) = replicas.iter().find(alive).or(replicas.first()).cloned() else {
            let answer = Answer::Write(Outcome::NotAReplica { replicas });
            effects.push(Effect::Answer { caller, answer });
            return;
        };
        let deadline_ms = self.deadline(now_ms);
        let forwarded = Forwarded {
            caller,
            key: key.clone(),
            needed: self.settings.write_quorum,
            deadline_ms,
        };
        self.jobs.insert(request, Job::Forwarded(forwarded));
        effects.push(Effect::Send {
            to: target,
            message: Message::Forward {
                request,
                key,
                mutation,
            },
            deadline_ms,
        });
    }

    /// The replica answered a forwarded write.
    pub(super) fn forwarded(
        &mut self,
        request: RequestId,
        outcome: Outcome,
        effects: &mut Vec<Effect>,
    ) {
        if !matches!(self.jobs.get(&request), Some(Job::Forwarded(_))) {
            return;
        }
        let Some(Job::Forwarded(forwarded)) = self.jobs.remove(&request) else {
            return;
        };
        if let Outcome::Written { record } = &outcome {
            self.acknowledged
                .acknowledged(&forwarded.key, &record.version);
        }
        effects.push(Effect::Answer {
            caller: forwarded.caller,
            answer: Answer::Write(outcome),
        });
    }

    /// Forwarded writes whose replica did not answer in time: indeterminate, like a missed
    /// quorum (the replica may have applied it).
    pub(super) fn expire_forwarded(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let expired: Vec<RequestId> = self
            .jobs
            .iter()
            .filter(|(_, job)| matches!(job, Job::Forwarded(f) if f.deadline_ms <= now_ms))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(Job::Forwarded(forwarded)) = self.jobs.remove(&id) {
                let outcome = Outcome::QuorumFailed {
                    answered: 0,
                    needed: forwarded.needed,
                };
                effects.push(Effect::Answer {
                    caller: forwarded.caller,
                    answer: Answer::Write(outcome),
                });
            }
        }
    }
}
