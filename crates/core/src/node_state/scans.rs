//! Scans across the cluster: every member sends its page, and the node answers with the join
//! of the copies once every member (and its own engine) has answered, or at the deadline.

use std::collections::{BTreeMap, BTreeSet};

use super::{Answer, Caller, Effect, Job, Liveness, NodeState};
use crate::crdt::Crdt;
use crate::key::Key;
use crate::node::NodeId;
use crate::record::Record;
use crate::replication::{Message, RequestId};

/// A page of a scan across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// Records in key order (each the join of the copies the members sent).
    pub entries: Vec<(Key, Record)>,
    /// Members that did not answer in time. Every key is still listed if fewer than N members
    /// are missing (each key has a replica that answered); otherwise keys may be missing.
    pub unanswered: Vec<NodeId>,
}

/// A scan waiting for members' pages.
#[derive(Debug)]
pub(super) struct PendingScan {
    caller: Caller,
    waiting: BTreeSet<NodeId>,
    /// Members known dead when the scan started: not asked, unanswered.
    skipped: Vec<NodeId>,
    /// Whether the local engine's page is in.
    local_done: bool,
    entries: BTreeMap<Key, Record>,
    limit: usize,
    pub(super) deadline_ms: u64,
}

/// Joins a page into what the other members sent.
fn merge_page(entries: &mut BTreeMap<Key, Record>, page: Vec<(Key, Record)>) {
    for (key, record) in page {
        match entries.get_mut(&key) {
            Some(known) => known.merge(&record),
            None => {
                entries.insert(key, record);
            }
        }
    }
}

impl NodeState {
    pub(super) fn start_scan(
        &mut self,
        caller: Caller,
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: u32,
        deadline_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let request = self.next_request();
        // Members known dead are not waited for; they count as unanswered.
        let (mut waiting, mut skipped) = (Vec::new(), Vec::new());
        for (member, liveness) in &self.members {
            match liveness {
                Liveness::Dead => skipped.push(member.clone()),
                _ => waiting.push(member.clone()),
            }
        }
        for member in &waiting {
            let message = Message::Scan {
                request,
                prefix: prefix.clone(),
                after: after.clone(),
                limit,
            };
            effects.push(Effect::Send {
                to: member.clone(),
                message,
                deadline_ms,
            });
        }
        effects.push(Effect::ScanLocal {
            request,
            prefix,
            after,
            limit: limit as usize,
        });
        let scan = PendingScan {
            caller,
            waiting: waiting.into_iter().collect(),
            skipped,
            local_done: false,
            entries: BTreeMap::new(),
            limit: limit as usize,
            deadline_ms,
        };
        self.jobs.insert(request, Job::Scan(scan));
    }

    pub(super) fn local_page(
        &mut self,
        request: RequestId,
        entries: Vec<(Key, Record)>,
        effects: &mut Vec<Effect>,
    ) {
        if let Some(Job::Scan(scan)) = self.jobs.get_mut(&request) {
            scan.local_done = true;
            merge_page(&mut scan.entries, entries);
            self.finish_scans(None, effects);
        }
    }

    pub(super) fn scanned(
        &mut self,
        from: &NodeId,
        request: RequestId,
        entries: Vec<(Key, Record)>,
        effects: &mut Vec<Effect>,
    ) {
        if let Some(Job::Scan(scan)) = self.jobs.get_mut(&request)
            && scan.waiting.remove(from)
        {
            merge_page(&mut scan.entries, entries);
            self.finish_scans(None, effects);
        }
    }

    /// Answers the scans every member has answered (or, at `expired_at`, whose deadline
    /// passed).
    pub(super) fn finish_scans(&mut self, expired_at: Option<u64>, effects: &mut Vec<Effect>) {
        let done: Vec<RequestId> = self
            .jobs
            .iter()
            .filter(|(_, job)| match job {
                Job::Scan(s) => {
                    (s.waiting.is_empty() && s.local_done)
                        || expired_at.is_some_and(|now| s.deadline_ms <= now)
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(Job::Scan(scan)) = self.jobs.remove(&id) {
                let entries = scan.entries.into_iter().take(scan.limit).collect();
                let mut unanswered: Vec<NodeId> = scan.waiting.into_iter().collect();
                unanswered.extend(scan.skipped);
                unanswered.sort();
                let page = ScanPage {
                    entries,
                    unanswered,
                };
                effects.push(Effect::Answer {
                    caller: scan.caller,
                    answer: Answer::Scan(page),
                });
            }
        }
    }
}
