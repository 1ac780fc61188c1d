use super::*;
use crate::hlc::HybridClock;
use crate::record::{self, Value};

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn key() -> Key {
    "doc:1".parse().unwrap()
}

fn replicas() -> Vec<NodeId> {
    vec![node("a"), node("b"), node("c")]
}

fn record_at(node_name: &str, value: &[u8], physical: u64) -> Record {
    let mut clock = HybridClock::new(node(node_name), 500);
    record::apply(None, &Mutation::Put(value.to_vec()), &mut clock, physical).unwrap()
}

fn write(c: &mut Coordinator, w: usize) -> Vec<Effect> {
    let input = Input::Write {
        request: 1,
        key: key(),
        mutation: Mutation::Put(b"v".to_vec()),
        replicas: replicas(),
        w,
        deadline_ms: 100,
    };
    c.step(input, 0)
}

fn replicated(c: &mut Coordinator, from: &str) -> Vec<Effect> {
    c.step(
        Input::Received {
            from: node(from),
            message: Message::Replicated { request: 1 },
        },
        10,
    )
}

#[test]
fn a_quorum_write_applies_locally_replicates_and_answers_after_w_acks() {
    let mut c = Coordinator::new(node("a"));
    assert_eq!(
        write(&mut c, 2),
        [Effect::ApplyLocal {
            request: 1,
            key: key(),
            mutation: Mutation::Put(b"v".to_vec())
        }]
    );
    let record = record_at("a", b"v", 1);
    let effects = c.step(
        Input::LocalApplied {
            request: 1,
            result: Ok(record.clone()),
        },
        1,
    );
    let replicate = |to: &str| Effect::Send {
        to: node(to),
        message: Message::Replicate {
            request: 1,
            key: key(),
            record: record.clone(),
        },
    };
    assert_eq!(
        effects,
        [replicate("b"), replicate("c")],
        "no answer yet: 1 of 2 acknowledgements"
    );
    assert_eq!(
        replicated(&mut c, "c"),
        [Effect::Reply {
            request: 1,
            outcome: Outcome::Written {
                record: record.clone()
            }
        }]
    );
    assert_eq!(
        c.in_flight(),
        1,
        "still waiting for b, to hint it if it never answers"
    );
    assert!(replicated(&mut c, "b").is_empty(), "answered once");
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn w_1_answers_after_the_local_write() {
    let mut c = Coordinator::new(node("a"));
    write(&mut c, 1);
    let record = record_at("a", b"v", 1);
    let effects = c.step(
        Input::LocalApplied {
            request: 1,
            result: Ok(record.clone()),
        },
        1,
    );
    assert_eq!(
        effects.last(),
        Some(&Effect::Reply {
            request: 1,
            outcome: Outcome::Written { record }
        })
    );
}

#[test]
fn a_missed_quorum_fails_at_the_deadline_and_hints_the_silent_replicas() {
    let mut c = Coordinator::new(node("a"));
    write(&mut c, 3);
    let record = record_at("a", b"v", 1);
    c.step(
        Input::LocalApplied {
            request: 1,
            result: Ok(record.clone()),
        },
        1,
    );
    replicated(&mut c, "b");
    assert!(c.step(Input::Tick, 99).is_empty(), "not yet");
    assert_eq!(
        c.step(Input::Tick, 100),
        [
            Effect::Reply {
                request: 1,
                outcome: Outcome::QuorumFailed {
                    answered: 2,
                    needed: 3
                }
            },
            Effect::Hint {
                node: node("c"),
                key: key(),
                record
            },
        ]
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn acks_from_strangers_and_duplicates_do_not_count() {
    let mut c = Coordinator::new(node("a"));
    write(&mut c, 3);
    c.step(
        Input::LocalApplied {
            request: 1,
            result: Ok(record_at("a", b"v", 1)),
        },
        1,
    );
    assert!(replicated(&mut c, "mallory").is_empty());
    assert!(replicated(&mut c, "b").is_empty());
    assert!(
        replicated(&mut c, "b").is_empty(),
        "a duplicate ack is still one replica"
    );
    assert_eq!(replicated(&mut c, "c").len(), 1);
}

#[test]
fn a_local_failure_is_answered_at_once() {
    let mut c = Coordinator::new(node("a"));
    write(&mut c, 2);
    let effects = c.step(
        Input::LocalApplied {
            request: 1,
            result: Err(LocalFailure::DiskFull("disk full".into())),
        },
        1,
    );
    assert_eq!(
        effects,
        [Effect::Reply {
            request: 1,
            outcome: Outcome::LocalFailure {
                failure: LocalFailure::DiskFull("disk full".into())
            }
        }]
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_node_that_is_not_a_replica_does_not_store_the_key() {
    let mut c = Coordinator::new(node("z"));
    assert_eq!(
        write(&mut c, 2),
        [Effect::Reply {
            request: 1,
            outcome: Outcome::NotAReplica {
                replicas: replicas()
            }
        }]
    );
}

fn read(c: &mut Coordinator, r: usize) -> Vec<Effect> {
    c.step(
        Input::Read {
            request: 7,
            key: key(),
            replicas: replicas(),
            r,
            deadline_ms: 100,
        },
        0,
    )
}

fn reply(c: &mut Coordinator, from: &str, record: Option<Record>) -> Vec<Effect> {
    c.step(
        Input::Received {
            from: node(from),
            message: Message::ReadReply { request: 7, record },
        },
        5,
    )
}

#[test]
fn a_quorum_read_answers_the_join_and_repairs_stale_replicas() {
    let mut c = Coordinator::new(node("a"));
    let effects = read(&mut c, 2);
    assert_eq!(
        effects[0],
        Effect::ReadLocal {
            request: 7,
            key: key()
        }
    );
    assert_eq!(effects.len(), 3, "asks b and c");
    let old = record_at("b", b"old", 1);
    let new = record_at("c", b"new", 2);
    assert!(
        c.step(
            Input::LocalRead {
                request: 7,
                record: Some(old.clone())
            },
            1
        )
        .is_empty()
    );
    let effects = reply(&mut c, "c", Some(new.clone()));
    let mut joined = old.clone();
    joined.merge(&new);
    assert_eq!(joined.value, Value::Register(Some(b"new".to_vec())));
    assert_eq!(
        effects,
        [
            Effect::Reply {
                request: 7,
                outcome: Outcome::Read {
                    record: Some(joined.clone())
                }
            },
            Effect::MergeLocal {
                key: key(),
                record: joined.clone()
            },
            Effect::Send {
                to: node("c"),
                message: Message::Replicate {
                    request: 0,
                    key: key(),
                    record: joined.clone()
                }
            },
        ],
        "c's answer lacks a's version, so c is repaired too"
    );
    // A late replica that answers with nothing is repaired too.
    let effects = reply(&mut c, "b", None);
    assert_eq!(
        effects,
        [Effect::Send {
            to: node("b"),
            message: Message::Replicate {
                request: 0,
                key: key(),
                record: joined
            }
        }]
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_read_without_its_quorum_fails_at_the_deadline() {
    let mut c = Coordinator::new(node("a"));
    read(&mut c, 3);
    c.step(
        Input::LocalRead {
            request: 7,
            record: None,
        },
        1,
    );
    assert_eq!(
        c.step(Input::Tick, 100),
        [Effect::Reply {
            request: 7,
            outcome: Outcome::QuorumFailed {
                answered: 1,
                needed: 3
            }
        }]
    );
}
