//! The linearizability checker: known answers, agreement with a brute-force oracle on small
//! histories, and histories produced by real sequential executions (always linearizable,
//! and not any more once one answer is corrupted).

use agentstore_check::linearizable::{
    Model, Operation, Outcome, Verdict, check, check_with_budget,
};
use agentstore_check::models::{
    Counter, CounterAnswer, CounterOp, Register, RegisterAnswer, RegisterOp,
};
use agentstore_check::{Recorder, check_per_key};
use proptest::prelude::*;

type Op = Operation<RegisterOp<u8>, RegisterAnswer<u8>>;

fn done(
    client: usize,
    input: RegisterOp<u8>,
    call: u64,
    at: u64,
    output: RegisterAnswer<u8>,
) -> Op {
    Operation {
        client,
        input,
        call,
        outcome: Outcome::Returned { at, output },
    }
}

fn lost(client: usize, input: RegisterOp<u8>, call: u64) -> Op {
    Operation {
        client,
        input,
        call,
        outcome: Outcome::Indeterminate,
    }
}

fn write(v: u8) -> RegisterOp<u8> {
    RegisterOp::Write(Some(v))
}

fn read(v: Option<u8>) -> RegisterAnswer<u8> {
    RegisterAnswer::Value(v)
}

fn verdict(history: &[Op]) -> Verdict {
    check(&Register::<u8>::new(), history)
}

#[test]
fn a_read_after_a_write_sees_it() {
    let history = [
        done(0, write(1), 0, 10, RegisterAnswer::Written),
        done(1, RegisterOp::Read, 20, 30, read(Some(1))),
    ];
    assert_eq!(verdict(&history), Verdict::Linearizable);
}

#[test]
fn a_stale_read_after_a_finished_write_is_a_violation() {
    let history = [
        done(0, write(1), 0, 10, RegisterAnswer::Written),
        done(0, write(2), 11, 20, RegisterAnswer::Written),
        done(1, RegisterOp::Read, 30, 40, read(Some(1))),
    ];
    let Verdict::Violation { order, blocked } = verdict(&history) else {
        panic!("stale read accepted");
    };
    assert_eq!(
        blocked, 2,
        "the stale read is the operation nothing explains"
    );
    assert_eq!(order, vec![0, 1]);
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    for seen in [None, Some(1)] {
        let history = [
            done(0, write(1), 0, 100, RegisterAnswer::Written),
            done(1, RegisterOp::Read, 10, 20, read(seen)),
        ];
        assert_eq!(
            verdict(&history),
            Verdict::Linearizable,
            "read saw {seen:?}"
        );
    }
}

#[test]
fn reads_may_not_go_back_in_time() {
    // Two reads during one write: once a read has seen the new value, a later read may not
    // see the old one (the "new-old inversion").
    let history = [
        done(0, write(1), 0, 100, RegisterAnswer::Written),
        done(1, RegisterOp::Read, 10, 20, read(Some(1))),
        done(2, RegisterOp::Read, 30, 40, read(None)),
    ];
    assert!(matches!(verdict(&history), Verdict::Violation { .. }));
}

#[test]
fn an_indeterminate_write_may_or_may_not_have_applied_but_not_both() {
    for seen in [None, Some(1)] {
        let history = [
            lost(0, write(1), 0),
            done(1, RegisterOp::Read, 50, 60, read(seen)),
        ];
        assert_eq!(
            verdict(&history),
            Verdict::Linearizable,
            "read saw {seen:?}"
        );
    }
    let flickers = [
        lost(0, write(1), 0),
        done(1, RegisterOp::Read, 50, 60, read(Some(1))),
        done(1, RegisterOp::Read, 70, 80, read(None)),
    ];
    assert!(matches!(verdict(&flickers), Verdict::Violation { .. }));
}

#[test]
fn a_value_nobody_wrote_is_a_violation() {
    let history = [done(0, RegisterOp::Read, 0, 10, read(Some(7)))];
    assert!(matches!(verdict(&history), Verdict::Violation { .. }));
}

#[test]
fn many_lost_writes_do_not_make_a_violation_expensive_to_prove() {
    // Forty writes whose answers were lost, all concurrent with everything, then a read of a
    // value none of them wrote. Each lost write may have applied or not: 2^40 subsets, which
    // an exhaustive search without the dominance rule would have to rule out one by one.
    let mut history: Vec<Op> = (0..40).map(|v| lost(v as usize, write(v), 0)).collect();
    history.push(done(40, RegisterOp::Read, 10, 20, read(Some(200))));
    let verdict = check_with_budget(&Register::<u8>::new(), &history, 100_000);
    assert!(
        matches!(verdict, Verdict::Violation { .. }),
        "decided within the budget: {verdict:?}"
    );
    // And the same history with a read of one of the lost values is explained at once.
    history.last_mut().unwrap().outcome = Outcome::Returned {
        at: 20,
        output: read(Some(17)),
    };
    assert_eq!(
        check_with_budget(&Register::<u8>::new(), &history, 1_000),
        Verdict::Linearizable
    );
}

#[test]
fn two_compare_and_sets_from_one_value_cannot_both_win() {
    let cas = |new| RegisterOp::CompareAndSet {
        expect: Some(1),
        new: Some(new),
    };
    let mut history = vec![
        done(0, write(1), 0, 10, RegisterAnswer::Written),
        done(1, cas(2), 20, 40, RegisterAnswer::Swapped(true)),
        done(2, cas(3), 20, 40, RegisterAnswer::Swapped(true)),
    ];
    assert!(matches!(verdict(&history), Verdict::Violation { .. }));
    history[2].outcome = Outcome::Returned {
        at: 40,
        output: RegisterAnswer::Swapped(false),
    };
    assert_eq!(verdict(&history), Verdict::Linearizable);
}

#[test]
fn a_counter_loses_no_acknowledged_addition_and_counts_none_twice() {
    let add = |client, call, at| Operation {
        client,
        input: CounterOp::Add(1),
        call,
        outcome: Outcome::Returned {
            at,
            output: CounterAnswer::Added,
        },
    };
    let total = |call, at, n| Operation {
        client: 9,
        input: CounterOp::Read,
        call,
        outcome: Outcome::Returned {
            at,
            output: CounterAnswer::Total(n),
        },
    };
    let maybe = Operation {
        client: 2,
        input: CounterOp::Add(1),
        call: 0,
        outcome: Outcome::Indeterminate,
    };
    let base = vec![add(0, 0, 10), add(1, 5, 15), maybe];
    for (n, ok) in [(1, false), (2, true), (3, true), (4, false)] {
        let mut history = base.clone();
        history.push(total(20, 30, n));
        let linearizable = check(&Counter, &history) == Verdict::Linearizable;
        assert_eq!(linearizable, ok, "total {n}");
    }
}

#[test]
fn keys_are_checked_apart_and_a_failure_names_its_key() {
    let history = vec![
        ("a", done(0, write(1), 0, 10, RegisterAnswer::Written)),
        ("b", done(0, write(2), 11, 20, RegisterAnswer::Written)),
        ("a", done(1, RegisterOp::Read, 30, 40, read(Some(1)))),
        ("b", done(1, RegisterOp::Read, 30, 40, read(None))),
    ];
    let failure = check_per_key(&Register::new(), &history).unwrap_err();
    assert_eq!(failure.key, "b");
    assert!(failure.to_string().contains("Read"), "{failure}");
    let fine = &history[..3];
    let checked = check_per_key(&Register::new(), fine).unwrap();
    assert_eq!((checked.keys, checked.operations), (2, 3));
}

#[test]
fn the_recorder_times_calls_and_drops_refused_ones() {
    let recorder: Recorder<&str, CounterOp, CounterAnswer> = Recorder::new();
    let a = recorder.invoke(0, "k", CounterOp::Add(1));
    let b = recorder.invoke(1, "k", CounterOp::Add(5));
    let c = recorder.invoke(2, "k", CounterOp::Add(7));
    recorder.returned(a, CounterAnswer::Added);
    recorder.refused(b);
    drop(c);
    let history = recorder.history();
    assert_eq!(history.len(), 2);
    let Outcome::Returned { at, .. } = history[0].1.outcome else {
        panic!("answered call recorded as {:?}", history[0].1.outcome);
    };
    assert!(at >= history[0].1.call);
    assert_eq!(history[1].1.outcome, Outcome::Indeterminate);
    assert_eq!(history[1].1.input, CounterOp::Add(7));
}

/// The brute-force oracle: some order of the operations (an indeterminate one may also be
/// left out) that respects real time and replays through the model with the same answers.
fn brute_force<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>]) -> bool {
    fn ret<I, O>(op: &Operation<I, O>) -> u64 {
        match op.outcome {
            Outcome::Returned { at, .. } => at,
            Outcome::Indeterminate => u64::MAX,
        }
    }
    fn search<M: Model>(
        model: &M,
        history: &[Operation<M::Input, M::Output>],
        state: &M::State,
        used: &mut Vec<bool>,
    ) -> bool {
        let pending: Vec<usize> = (0..history.len()).filter(|&i| !used[i]).collect();
        if pending
            .iter()
            .all(|&i| matches!(history[i].outcome, Outcome::Indeterminate))
        {
            return true; // the rest never applied
        }
        for &i in &pending {
            // `i` may go next only if no other pending operation returned before it was called.
            let first = pending.iter().all(|&j| ret(&history[j]) >= history[i].call);
            if !first {
                continue;
            }
            let output = match &history[i].outcome {
                Outcome::Returned { output, .. } => Some(output),
                Outcome::Indeterminate => None,
            };
            if let Some(next) = model.step(state, &history[i].input, output) {
                used[i] = true;
                let found = search(model, history, &next, used);
                used[i] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }
    search(
        model,
        history,
        &model.init(),
        &mut vec![false; history.len()],
    )
}

fn small_history() -> impl Strategy<Value = Vec<Op>> {
    let op = (
        0..3usize,
        prop_oneof![
            (0..3u8).prop_map(|v| RegisterOp::Write(Some(v))),
            Just(RegisterOp::Write(None)),
            Just(RegisterOp::Read),
            (proptest::option::of(0..3u8), proptest::option::of(0..3u8))
                .prop_map(|(expect, new)| RegisterOp::CompareAndSet { expect, new }),
        ],
        0..20u64,
        1..15u64,
        proptest::option::of(0..3u8),
        any::<bool>(),
        0..10u8,
    );
    proptest::collection::vec(op, 1..7).prop_map(|ops| {
        ops.into_iter()
            .map(|(client, input, call, length, value, flag, fate)| {
                let output = match &input {
                    RegisterOp::Write(_) => RegisterAnswer::Written,
                    RegisterOp::Read => RegisterAnswer::Value(value),
                    RegisterOp::CompareAndSet { .. } => RegisterAnswer::Swapped(flag),
                };
                let outcome = if fate == 0 {
                    Outcome::Indeterminate
                } else {
                    Outcome::Returned {
                        at: call + length,
                        output,
                    }
                };
                Operation {
                    client,
                    input,
                    call,
                    outcome,
                }
            })
            .collect()
    })
}

/// A history made by running the model: each client issues operations one after another,
/// each takes effect at a random point inside its interval, and some answers are lost (the
/// operation applied, or did not, and nobody knows).
fn executed_history() -> impl Strategy<Value = Vec<Op>> {
    let step = (0..4usize, 0..5u8, 1..50u64, 1..200u64, 0..20u8, 0..1000u64);
    proptest::collection::vec(step, 20..120).prop_map(|steps| {
        let mut clock = [0u64; 4];
        let mut planned: Vec<(u64, usize, RegisterOp<u8>, u64, u64, u8)> = Vec::new();
        for (i, (client, kind, gap, length, fate, point)) in steps.into_iter().enumerate() {
            let value = (i % 251) as u8; // distinct enough to make reads informative
            let input = match kind {
                0 | 1 => RegisterOp::Write(Some(value)),
                2 => RegisterOp::CompareAndSet {
                    expect: Some(value.wrapping_sub(3)),
                    new: Some(value),
                },
                _ => RegisterOp::Read,
            };
            let call = clock[client] + gap;
            let at = call + length;
            clock[client] = at;
            let effect = call + point % length;
            planned.push((effect, client, input, call, at, fate));
        }
        planned.sort_by_key(|p| p.0);
        let model = Register::<u8>::new();
        let mut state = model.init();
        let mut history = Vec::new();
        for (_, client, input, call, at, fate) in planned {
            let applies = fate != 0; // fate 0: lost before it applied
            let output = match &input {
                RegisterOp::Write(v) => {
                    if applies {
                        state = *v;
                    }
                    RegisterAnswer::Written
                }
                RegisterOp::Read => RegisterAnswer::Value(state),
                RegisterOp::CompareAndSet { expect, new } => {
                    let swapped = *expect == state;
                    if swapped && applies {
                        state = *new;
                    }
                    RegisterAnswer::Swapped(swapped)
                }
            };
            let outcome = if fate <= 1 {
                Outcome::Indeterminate
            } else {
                Outcome::Returned { at, output }
            };
            history.push(Operation {
                client,
                input,
                call,
                outcome,
            });
        }
        history
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_checker_agrees_with_brute_force(history in small_history()) {
        let model = Register::<u8>::new();
        let expected = brute_force(&model, &history);
        let verdict = check(&model, &history);
        prop_assert_eq!(verdict == Verdict::Linearizable, expected, "{:?}", verdict);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn an_executed_history_is_linearizable(history in executed_history()) {
        prop_assert_eq!(verdict(&history), Verdict::Linearizable);
    }

}

proptest! {
    // A violation is only reported once every order has been ruled out: fewer, slower cases.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_read_of_a_value_never_written_is_caught(history in executed_history(), pick in any::<prop::sample::Index>()) {
        let reads: Vec<usize> = history
            .iter()
            .enumerate()
            .filter(|(_, op)| op.input == RegisterOp::Read && matches!(op.outcome, Outcome::Returned { .. }))
            .map(|(i, _)| i)
            .collect();
        prop_assume!(!reads.is_empty());
        let mut corrupted = history.clone();
        let i = reads[pick.index(reads.len())];
        if let Outcome::Returned { output, .. } = &mut corrupted[i].outcome {
            *output = RegisterAnswer::Value(Some(255)); // values stop at 250
        }
        let caught = matches!(verdict(&corrupted), Verdict::Violation { .. });
        prop_assert!(caught, "read #{} corrupted, accepted", i);
    }
}
