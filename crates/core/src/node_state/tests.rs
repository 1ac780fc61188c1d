use super::*;
use crate::hlc::Timestamp;
use crate::record::Value;
use crate::version::VersionVector;

fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn key(text: &str) -> Key {
    text.parse().unwrap()
}

/// A register record written by `a` at `wall_ms`.
fn record(value: &str, wall_ms: u64) -> Record {
    Record {
        stamp: Timestamp {
            wall_ms,
            logical: 0,
            node: id("a"),
        },
        version: [(id("a"), 1)].into_iter().collect::<VersionVector>(),
        value: Value::Register(Some(value.as_bytes().to_vec())),
        attestation: None,
        expires_at_ms: None,
    }
}

/// Node `a` among `others` (all alive), N = `n`, W = R = 1.
fn node(others: &[&str], n: usize) -> NodeState {
    let settings = Settings::new(id("a"), n, 1, 1);
    let mut state = NodeState::new(settings, others.iter().map(|o| id(o)), 0);
    for other in others {
        step(&mut state, alive(other), 0);
    }
    state
}

/// A client's write.
fn write(caller: Caller, key: Key, mutation: Mutation) -> Input {
    Input::Call {
        caller,
        call: Call::Write { key, mutation },
    }
}

fn alive(member: &str) -> Input {
    Input::Liveness {
        member: id(member),
        liveness: Liveness::Alive,
    }
}

/// One step, with the invariants checked after it.
fn step(state: &mut NodeState, input: Input, now_ms: u64) -> Vec<Effect> {
    let effects = state.step(input, now_ms);
    state
        .validate()
        .expect("the invariants hold after every step");
    effects
}

/// A key whose only replica (N = 1) is `owner`.
fn key_of(state: &NodeState, owner: &str) -> Key {
    (0..)
        .map(|i| key(&format!("k:{i}")))
        .find(|k| state.replicas(k) == vec![id(owner)])
        .unwrap()
}

/// The one message sent.
fn only_sent(effects: &[Effect]) -> (NodeId, Message) {
    let mut messages = sent(effects);
    assert_eq!(messages.len(), 1, "one message: {effects:?}");
    messages.remove(0)
}

/// The reads sent, and to whom.
fn reads_sent(effects: &[Effect]) -> Vec<(NodeId, RequestId)> {
    sent(effects)
        .into_iter()
        .filter_map(|(to, m)| match m {
            Message::Read { request, .. } => Some((to, request)),
            _ => None,
        })
        .collect()
}

fn sent(effects: &[Effect]) -> Vec<(NodeId, Message)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { to, message, .. } => Some((to.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_hint_acknowledgement_removes_the_hint_and_nothing_else() {
    let mut state = node(&["b"], 2);
    let effects = step(&mut state, Input::Tick, 500);
    assert!(effects.contains(&Effect::LoadHints { peer: id("b") }));
    let hint = StoredHint {
        id: 7,
        key: key("k:1"),
        record: record("v", 1),
    };
    let hints = Input::Hints {
        peer: id("b"),
        hints: vec![hint],
    };
    let effects = step(&mut state, hints, 501);
    let (to, Message::Replicate { request, .. }) = only_sent(&effects) else {
        panic!("one hint sent: {effects:?}")
    };
    assert_eq!(to, id("b"));
    let acked = Input::Received {
        from: id("b"),
        message: Message::Replicated { request },
        deadline_ms: 0,
    };
    let effects = step(&mut state, acked, 502);
    assert_eq!(
        effects,
        vec![Effect::RemoveHint {
            peer: id("b"),
            id: 7
        }]
    );
    assert_eq!(state.in_flight(), 0);
}

#[test]
fn a_hint_on_its_way_is_not_sent_twice_within_the_hint_interval() {
    let mut state = node(&["b"], 2);
    let hint = StoredHint {
        id: 1,
        key: key("k:1"),
        record: record("v", 1),
    };
    let hints = |hint: &StoredHint| Input::Hints {
        peer: id("b"),
        hints: vec![hint.clone()],
    };
    assert_eq!(sent(&step(&mut state, hints(&hint), 10)).len(), 1);
    assert_eq!(sent(&step(&mut state, hints(&hint), 20)).len(), 0);
    // Unacknowledged past the interval: the next delivery sends it again.
    step(&mut state, Input::Tick, 600);
    assert_eq!(sent(&step(&mut state, hints(&hint), 601)).len(), 1);
}

#[test]
fn a_write_this_node_does_not_replicate_is_forwarded_and_its_answer_relayed() {
    let mut state = node(&["b"], 1);
    let k = key_of(&state, "b");
    let call = write(9, k.clone(), Mutation::Put(b"v".to_vec()));
    let effects = step(&mut state, call, 100);
    let (to, Message::Forward { request, .. }) = only_sent(&effects) else {
        panic!("forwarded: {effects:?}")
    };
    assert_eq!(to, id("b"));
    assert!(matches!(
        effects[0],
        Effect::Send {
            deadline_ms: 5_100,
            ..
        }
    ));
    let written = Outcome::Written {
        record: record("v", 100),
    };
    let answer = Input::Received {
        from: id("b"),
        message: Message::Forwarded {
            request,
            outcome: written.clone(),
        },
        deadline_ms: 0,
    };
    let effects = step(&mut state, answer, 120);
    assert_eq!(
        effects,
        vec![Effect::Answer {
            caller: 9,
            answer: Answer::Write(written)
        }]
    );
}

#[test]
fn a_forwarded_write_unanswered_by_its_deadline_is_indeterminate() {
    let mut state = node(&["b"], 1);
    let k = key_of(&state, "b");
    step(&mut state, write(3, k, Mutation::Delete), 0);
    let early = step(&mut state, Input::Tick, 4_999);
    assert!(
        !early.iter().any(|e| matches!(e, Effect::Answer { .. })),
        "still waiting before the deadline: {early:?}"
    );
    let effects = step(&mut state, Input::Tick, 5_000);
    assert!(effects.contains(&Effect::Answer {
        caller: 3,
        answer: Answer::Write(Outcome::QuorumFailed {
            answered: 0,
            needed: 1
        })
    }));
    assert_eq!(state.in_flight(), 0);
}

#[test]
fn a_leave_hands_every_record_over_before_it_leaves() {
    let mut state = node(&["b"], 1);
    let k = key_of(&state, "a");
    let r = record("v", 1);
    let effects = step(
        &mut state,
        Input::Call {
            caller: 1,
            call: Call::Leave,
        },
        10,
    );
    assert!(state.is_leaving());
    assert!(effects.contains(&Effect::LoadRecords {
        job: RecordsJob::Round { compare: false }
    }));
    assert_eq!(state.replicas(&k), vec![id("b")], "placement without a");
    let records = |records: Vec<(Key, Record)>| Input::Records {
        job: RecordsJob::Round { compare: false },
        seq: 0,
        records,
    };
    let effects = step(&mut state, records(vec![(k.clone(), r.clone())]), 11);
    let messages = sent(&effects);
    assert!(messages.contains(&(id("b"), Message::Leaving)));
    let Some((_, Message::Replicate { request, .. })) = messages
        .iter()
        .find(|(_, m)| matches!(m, Message::Replicate { .. }))
    else {
        panic!("handed over: {effects:?}")
    };
    let acked = Input::Received {
        from: id("b"),
        message: Message::Replicated { request: *request },
        deadline_ms: 0,
    };
    let effects = step(&mut state, acked, 12);
    assert_eq!(
        effects,
        vec![Effect::Purge {
            key: k,
            record: r,
            purpose: Purpose::HandedOff
        }]
    );
    // Every record is over, but b has not confirmed it knows: not yet.
    let effects = step(&mut state, records(Vec::new()), 20);
    assert!(!effects.contains(&Effect::Left));
    assert!(
        sent(&effects).contains(&(id("b"), Message::Leaving)),
        "asked again"
    );
    let confirmed = Input::Received {
        from: id("b"),
        message: Message::Departed {
            nodes: vec![id("a")],
        },
        deadline_ms: 0,
    };
    step(&mut state, confirmed, 21);
    let effects = step(&mut state, records(Vec::new()), 30);
    assert!(!sent(&effects).contains(&(id("b"), Message::Leaving)));
    assert!(effects.contains(&Effect::Left));
    assert!(effects.contains(&Effect::Answer {
        caller: 1,
        answer: Answer::Leave(Ok(()))
    }));
    assert!(state.has_left());
}

#[test]
fn a_leave_that_cannot_hand_over_in_time_fails_and_the_node_stays() {
    let mut state = node(&["b"], 1);
    let k = key_of(&state, "a");
    step(
        &mut state,
        Input::Call {
            caller: 1,
            call: Call::Leave,
        },
        0,
    );
    let records = Input::Records {
        job: RecordsJob::Round { compare: false },
        seq: 0,
        records: vec![(k.clone(), record("v", 1))],
    };
    let effects = step(&mut state, records, 60_001);
    assert!(effects.contains(&Effect::Answer {
        caller: 1,
        answer: Answer::Leave(Err(1))
    }));
    assert!(!state.is_leaving() && !state.has_left());
    assert_eq!(state.replicas(&k), vec![id("a")], "placed here again");
}

#[test]
fn a_leave_is_confirmed_to_the_leaving_node() {
    let mut state = node(&["b"], 3);
    let leaving = Input::Received {
        from: id("b"),
        message: Message::Leaving,
        deadline_ms: 0,
    };
    let effects = step(&mut state, leaving, 0);
    assert!(sent(&effects).contains(&(
        id("b"),
        Message::Departed {
            nodes: vec![id("b")]
        }
    )));
    assert!(state.members().is_empty());
}

#[test]
fn a_departure_passed_on_takes_the_node_out_of_placement_for_good() {
    let mut state = node(&["b", "c"], 3);
    let departed = Input::Received {
        from: id("b"),
        message: Message::Departed {
            nodes: vec![id("c"), id("a")],
        },
        deadline_ms: 0,
    };
    let effects = step(&mut state, departed, 0);
    assert!(effects.contains(&Effect::Placement {
        others: vec![id("b")]
    }));
    assert!(!state.members().contains_key(&id("c")));
    assert!(!state.has_left(), "its own name is ignored");
    step(&mut state, alive("c"), 1);
    assert!(
        !state.members().contains_key(&id("c")),
        "the failure detector does not bring it back"
    );
    // It passes the departure on with its next comparison.
    let round = Input::Records {
        job: RecordsJob::Round { compare: true },
        seq: 0,
        records: Vec::new(),
    };
    let messages = sent(&step(&mut state, round, 2));
    assert!(messages.contains(&(
        id("b"),
        Message::Departed {
            nodes: vec![id("c")]
        }
    )));
}

#[test]
fn a_scan_skips_dead_members_and_answers_once_the_others_and_the_engine_have() {
    let mut state = node(&["b", "c"], 3);
    let dead = Input::Liveness {
        member: id("c"),
        liveness: Liveness::Dead,
    };
    step(&mut state, dead, 0);
    let call = Call::Scan {
        prefix: b"k:".to_vec(),
        after: None,
        limit: 10,
    };
    let effects = step(&mut state, Input::Call { caller: 4, call }, 1);
    let (to, Message::Scan { request, .. }) = only_sent(&effects) else {
        panic!("asked b only: {effects:?}")
    };
    assert_eq!(to, id("b"));
    let theirs = Input::Received {
        from: id("b"),
        message: Message::Scanned {
            request,
            entries: vec![(key("k:2"), record("b", 2))],
        },
        deadline_ms: 0,
    };
    assert!(
        step(&mut state, theirs, 2).is_empty(),
        "the engine's page is not in"
    );
    let ours = Input::LocalPage {
        request,
        entries: vec![(key("k:1"), record("a", 1))],
    };
    let effects = step(&mut state, ours, 3);
    let [
        Effect::Answer {
            caller: 4,
            answer: Answer::Scan(page),
        },
    ] = &effects[..]
    else {
        panic!("answered: {effects:?}")
    };
    let keys: Vec<&Key> = page.entries.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![&key("k:1"), &key("k:2")]);
    assert_eq!(page.unanswered, vec![id("c")]);
}

#[test]
fn an_expired_value_is_collected_past_its_grace_and_a_live_or_unexpired_one_is_not() {
    let mut state = node(&["b", "c"], 3);
    let grace = Settings::new(id("a"), 3, 1, 1).tombstone_grace_ms;
    let round = |records| Input::Records {
        job: RecordsJob::Round { compare: false },
        seq: 0,
        records,
    };
    let mut expiring = record("heartbeat", 1);
    expiring.expires_at_ms = Some(1_000);
    let live = record("kept", 1);
    // Written at 1 ms: a tombstone would be past its grace at `grace + 2`; an expiring value
    // only once `grace` has passed since its expiry.
    let before = grace + 500;
    let effects = step(
        &mut state,
        round(vec![
            (key("k:1"), expiring.clone()),
            (key("k:2"), live.clone()),
        ]),
        before,
    );
    assert!(reads_sent(&effects).is_empty(), "not yet: {effects:?}");
    let after = grace + 1_002;
    let effects = step(
        &mut state,
        round(vec![(key("k:1"), expiring.clone()), (key("k:2"), live)]),
        after,
    );
    let asked = reads_sent(&effects);
    assert_eq!(
        asked.len(),
        2,
        "the expired value only, at both replicas: {effects:?}"
    );
    let mut purged = Vec::new();
    for (from, request) in asked {
        purged = step(
            &mut state,
            Input::Received {
                from,
                message: Message::ReadReply {
                    request,
                    record: Some(expiring.clone()),
                },
                deadline_ms: 0,
            },
            after,
        );
    }
    assert_eq!(
        purged,
        vec![Effect::Purge {
            key: key("k:1"),
            record: expiring,
            purpose: Purpose::Collected
        }]
    );
}

#[test]
fn a_tombstone_is_collected_only_when_every_other_replica_holds_it_or_nothing() {
    let mut state = node(&["b", "c"], 3);
    let k = key("k:1");
    let mut tombstone = record("x", 1);
    tombstone.value = Value::Register(None);
    let round = |records| Input::Records {
        job: RecordsJob::Round { compare: false },
        seq: 0,
        records,
    };
    let past_grace = Settings::new(id("a"), 3, 1, 1).tombstone_grace_ms + 2;
    let effects = step(
        &mut state,
        round(vec![(k.clone(), tombstone.clone())]),
        past_grace,
    );
    let asked = reads_sent(&effects);
    assert_eq!(asked.len(), 2, "both other replicas are asked: {effects:?}");
    let reply = |from: &NodeId, request, record| Input::Received {
        from: from.clone(),
        message: Message::ReadReply { request, record },
        deadline_ms: 0,
    };
    let (b, request) = asked[0].clone();
    assert!(
        step(
            &mut state,
            reply(&b, request, Some(tombstone.clone())),
            past_grace
        )
        .is_empty()
    );
    let (c, request) = asked[1].clone();
    let effects = step(&mut state, reply(&c, request, None), past_grace);
    assert_eq!(
        effects,
        vec![Effect::Purge {
            key: k.clone(),
            record: tombstone.clone(),
            purpose: Purpose::Collected
        }]
    );
    // A replica that still holds a live value stops the collection.
    let effects = step(
        &mut state,
        round(vec![(k.clone(), tombstone.clone())]),
        past_grace + 10_000,
    );
    let asked = reads_sent(&effects);
    let (b, request) = asked[0].clone();
    step(
        &mut state,
        reply(&b, request, Some(record("old", 0))),
        past_grace + 10_000,
    );
    let (c, request) = asked[1].clone();
    assert!(step(&mut state, reply(&c, request, None), past_grace + 10_000).is_empty());
}

#[test]
fn validate_names_a_request_that_outlived_its_deadline() {
    let mut state = node(&["b"], 1);
    let k = key_of(&state, "b");
    step(&mut state, write(1, k, Mutation::Delete), 0);
    // A tick that did not expire it (as a broken expiry would) is caught.
    state.last_tick_ms = 10_000;
    let broken = state.validate().unwrap_err();
    assert!(broken.contains("outlived its deadline"), "{broken}");
}

/// The coarse leaves `state` sends `to` in the comparison of a round run at `now_ms` (a
/// round between sweeps, from the trees the commits keep current: nothing is loaded).
fn leaves_compared(state: &mut NodeState, to: &str, now_ms: u64) -> Vec<u64> {
    let effects = step(state, Input::Tick, now_ms);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::LoadRecords { .. })),
        "a round between sweeps loads nothing: {effects:?}"
    );
    sent(&effects)
        .into_iter()
        .find_map(|(peer, message)| match message {
            Message::TreeLeaves { leaves, .. } if peer == id(to) => Some(leaves),
            _ => None,
        })
        .expect("compared with the peer")
}

/// A node `a` with `b` (N = 2) whose trees were built by a load of `records` (snapshot
/// `seq`).
fn loaded(records: &BTreeMap<Key, Record>, seq: u64) -> NodeState {
    let mut state = node(&["b"], 2);
    let load = Input::Records {
        job: RecordsJob::Round { compare: false },
        seq,
        records: records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect(),
    };
    step(&mut state, load, 1);
    state
}

fn digest(key: &Key, record: &Record) -> u64 {
    crate::merkle::entry_digest(key.as_bytes(), &crate::codec::encode(record))
}

/// Applies a put to `store` and says what changed, as the engine's commit feed would.
fn commit(store: &mut BTreeMap<Key, Record>, key: &Key, record: Record) -> Change {
    let before = store.insert(key.clone(), record.clone());
    Change {
        key: key.clone(),
        before: before.map(|b| digest(key, &b)),
        after: Some(digest(key, &record)),
    }
}

proptest::proptest! {
    /// Trees that follow the commits equal trees rebuilt from the records the commits left,
    /// whatever the writes and deletes: a round between sweeps compares what a sweep would.
    #[test]
    fn trees_that_follow_commits_equal_trees_rebuilt_from_the_records(
        writes in proptest::collection::vec((0u8..16, 0u8..4, proptest::bool::ANY), 1..40),
    ) {
        let mut store = BTreeMap::new();
        let mut state = loaded(&store, 0);
        for (seq, (k, v, purge)) in writes.into_iter().enumerate() {
            let k = key(&format!("k:{k}"));
            let change = match store.get(&k) {
                Some(old) if purge => {
                    let change = Change {
                        key: k.clone(),
                        before: Some(digest(&k, old)),
                        after: None,
                    };
                    store.remove(&k);
                    change
                }
                _ => commit(&mut store, &k, record(&v.to_string(), u64::from(v))),
            };
            let committed = Input::Committed { seq: seq as u64 + 1, changes: Some(vec![change]) };
            step(&mut state, committed, 2);
        }
        let interval = state.settings().anti_entropy_interval_ms;
        let mut rebuilt = loaded(&store, 0);
        proptest::prop_assert_eq!(
            leaves_compared(&mut state, "b", interval + 1),
            leaves_compared(&mut rebuilt, "b", interval + 1)
        );
    }
}

#[test]
fn commits_past_a_loads_snapshot_are_applied_to_the_trees_it_rebuilds() {
    let mut store = BTreeMap::new();
    let mut state = node(&["b"], 2);
    // A peer's comparison finds no trees: a load is asked for.
    let compare = Input::Received {
        from: id("b"),
        message: Message::TreeLeaves {
            depth: state.settings().tree_depth,
            leaves: vec![0; 1 << state.settings().tree_depth],
        },
        deadline_ms: 0,
    };
    let effects = step(&mut state, compare, 1);
    let job = effects
        .iter()
        .find_map(|e| match e {
            Effect::LoadRecords { job } => Some(job.clone()),
            _ => None,
        })
        .expect("a load");
    // Two commits arrive before the load's result; its snapshot includes only the first.
    let first = commit(&mut store, &key("k:1"), record("one", 1));
    let snapshot: Vec<(Key, Record)> = store.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
    let second = commit(&mut store, &key("k:2"), record("two", 2));
    step(
        &mut state,
        Input::Committed {
            seq: 1,
            changes: Some(vec![first.clone()]),
        },
        2,
    );
    step(
        &mut state,
        Input::Committed {
            seq: 2,
            changes: Some(vec![second]),
        },
        2,
    );
    let load = Input::Records {
        job,
        seq: 1,
        records: snapshot,
    };
    step(&mut state, load, 3);
    // A late report of a commit the snapshot holds changes nothing.
    step(
        &mut state,
        Input::Committed {
            seq: 1,
            changes: Some(vec![first]),
        },
        3,
    );
    let interval = state.settings().anti_entropy_interval_ms;
    let mut rebuilt = loaded(&store, 2);
    assert_eq!(
        leaves_compared(&mut state, "b", interval + 1),
        leaves_compared(&mut rebuilt, "b", interval + 1),
        "the trees hold both commits, once each"
    );
}

#[test]
fn an_undescribed_commit_leaves_the_trees_to_the_next_load() {
    let store = BTreeMap::new();
    let mut state = loaded(&store, 0);
    step(
        &mut state,
        Input::Committed {
            seq: 1,
            changes: None,
        },
        2,
    );
    let interval = state.settings().anti_entropy_interval_ms;
    let effects = step(&mut state, Input::Tick, interval + 1);
    assert!(
        effects.contains(&Effect::LoadRecords {
            job: RecordsJob::Round { compare: true }
        }),
        "the round loads every record: {effects:?}"
    );
}
