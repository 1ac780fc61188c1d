//! Clients that record what they asked of strong collections over HTTP and what they were
//! answered, and the linearizability check of what they recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentstore_check::check_per_key;
use agentstore_check::models::{
    Counter, CounterAnswer, CounterOp, Register, RegisterAnswer, RegisterOp,
};
use serde_json::Value as Json;

use super::http;

/// How a request over HTTP ended, for the history.
pub(crate) enum Sent {
    /// 200 with this body.
    Answered(String),
    /// 404: no such key.
    Missing,
    /// Certainly not applied: the node was not listening, or said no leader was reachable.
    Refused,
    /// Anything else: a write may have applied.
    Unknown,
}

pub(crate) fn send(node: SocketAddr, method: &str, path: &str, body: &str) -> Sent {
    match http(node, method, path, body) {
        Ok((200, body)) => Sent::Answered(body),
        Ok((404, _)) => Sent::Missing,
        Ok((503, body)) if body.contains(r#""code":"unavailable""#) => Sent::Refused,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => Sent::Refused,
        _ => Sent::Unknown,
    }
}

pub(crate) fn json_value(body: &str) -> Json {
    serde_json::from_str::<Json>(body).unwrap()["value"].clone()
}

/// Register operations on `agent:reg:0` and `agent:reg:1`.
pub(crate) type Registers =
    agentstore_check::Recorder<String, RegisterOp<String>, RegisterAnswer<String>>;
/// Counter operations on `bank:n`.
pub(crate) type Counts = agentstore_check::Recorder<String, CounterOp, CounterAnswer>;

/// One client: random operations through random nodes until `stop`; returns acknowledged
/// writes.
pub(crate) fn client(
    n: usize,
    nodes: &[SocketAddr],
    registers: &Registers,
    counts: &Counts,
    stop: &AtomicBool,
) -> usize {
    let mut rng = agentstore_sim::Rng::new(0x5eed + n as u64);
    let (mut acknowledged, mut written) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5 + rng.below(10)));
        let node = nodes[rng.below(nodes.len() as u64) as usize];
        let key = format!("agent:reg:{}", rng.below(2));
        match rng.below(10) {
            0..4 => {
                written += 1;
                let value = format!("c{n}-{written}");
                let call = registers.invoke(n, key.clone(), RegisterOp::Write(Some(value.clone())));
                match send(
                    node,
                    "PUT",
                    &format!("/v1/keys/{key}"),
                    &format!("\"{value}\""),
                ) {
                    Sent::Answered(_) => {
                        acknowledged += 1;
                        registers.returned(call, RegisterAnswer::Written);
                    }
                    Sent::Refused => registers.refused(call),
                    _ => {}
                }
            }
            4..7 => {
                let call = registers.invoke(n, key.clone(), RegisterOp::Read);
                match send(node, "GET", &format!("/v1/keys/{key}"), "") {
                    Sent::Answered(body) => {
                        let seen = json_value(&body).as_str().map(str::to_owned);
                        registers.returned(call, RegisterAnswer::Value(seen));
                    }
                    Sent::Missing => registers.returned(call, RegisterAnswer::Value(None)),
                    _ => registers.refused(call),
                }
            }
            7..9 => {
                let call = counts.invoke(n, "bank:n".into(), CounterOp::Add(1));
                match send(node, "POST", "/v1/counters/bank:n", r#"{"delta":1}"#) {
                    Sent::Answered(_) => {
                        acknowledged += 1;
                        counts.returned(call, CounterAnswer::Added);
                    }
                    Sent::Refused => counts.refused(call),
                    _ => {}
                }
            }
            _ => {
                let call = counts.invoke(n, "bank:n".into(), CounterOp::Read);
                match send(node, "GET", "/v1/keys/bank:n", "") {
                    Sent::Answered(body) => counts.returned(
                        call,
                        CounterAnswer::Total(json_value(&body).as_i64().unwrap()),
                    ),
                    _ => counts.refused(call),
                }
            }
        }
    }
    acknowledged
}

/// Runs `clients` recording clients against `nodes` while `nemesis` runs; returns the
/// writes acknowledged.
pub(crate) fn load_while(
    nodes: &[SocketAddr],
    clients: usize,
    histories: &(Registers, Counts),
    nemesis: impl FnOnce(),
) -> usize {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..clients)
            .map(|n| {
                let stop = &stop;
                scope.spawn(move || client(n, nodes, &histories.0, &histories.1, stop))
            })
            .collect();
        nemesis();
        stop.store(true, Ordering::Relaxed);
        running.into_iter().map(|c| c.join().unwrap()).sum()
    })
}

/// Every node reads every key once (the faults over, each must answer), into the history.
pub(crate) fn final_reads(nodes: &[SocketAddr], histories: &(Registers, Counts)) {
    for (i, node) in nodes.iter().enumerate() {
        for key in ["agent:reg:0", "agent:reg:1"] {
            let call = histories
                .0
                .invoke(100 + i, key.to_string(), RegisterOp::Read);
            let seen = match send(*node, "GET", &format!("/v1/keys/{key}"), "") {
                Sent::Answered(body) => json_value(&body).as_str().map(str::to_owned),
                Sent::Missing => None,
                _ => panic!("{key} unreadable on {node} after the faults"),
            };
            histories.0.returned(call, RegisterAnswer::Value(seen));
        }
        let call = histories
            .1
            .invoke(100 + i, "bank:n".into(), CounterOp::Read);
        let total = match send(*node, "GET", "/v1/keys/bank:n", "") {
            Sent::Answered(body) => json_value(&body).as_i64().unwrap(),
            _ => panic!("bank:n unreadable on {node} after the faults"),
        };
        histories.1.returned(call, CounterAnswer::Total(total));
    }
}

/// Checks both histories; panics with the offending key's operations if one is not
/// linearizable. Returns a one-line summary.
pub(crate) fn check(histories: &(Registers, Counts)) -> String {
    let registers = check_per_key(&Register::new(), &histories.0.history())
        .unwrap_or_else(|failure| panic!("not linearizable:\n{failure}"));
    let counter = check_per_key(&Counter, &histories.1.history())
        .unwrap_or_else(|failure| panic!("not linearizable:\n{failure}"));
    format!(
        "{} register and {} counter operations ({} and {} indeterminate)",
        registers.operations, counter.operations, registers.indeterminate, counter.indeterminate
    )
}
