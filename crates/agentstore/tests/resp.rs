//! The RESP endpoint of real node processes, driven by a Redis client library (`redis`) and
//! by raw bytes: the same values, levels, errors, sessions and tokens as the HTTP API.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{cluster, eventually, http};

const COLLECTIONS: &str = "  collections:\n    hits:\n      conflict: pn_counter\n    tags:\n      conflict: or_set\n    ledger:\n      consistency: strong\n    chat:\n      consistency: causal\n";

fn client(addr: SocketAddr) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap()
}

/// A command's error: its code (the first word) and message.
fn refused<T: std::fmt::Debug>(result: redis::RedisResult<T>) -> (String, String) {
    let err = result.expect_err("refused");
    (
        err.code().unwrap_or("").to_owned(),
        err.detail().unwrap_or("").to_owned(),
    )
}

#[test]
fn redis_commands_read_and_write_the_same_data_as_http_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let mut a = client(nodes[0].resp);
    let mut b = client(nodes[1].resp);
    let pong: String = redis::cmd("PING").query(&mut a).unwrap();
    assert_eq!(pong, "PONG");

    // A string written over RESP reads back over RESP and HTTP, on another node too.
    let ok: String = redis::cmd("SET")
        .arg("notes:a")
        .arg("hello")
        .query(&mut a)
        .unwrap();
    assert_eq!(ok, "OK");
    let (status, body) = http(nodes[2].client, "GET", "/v1/keys/notes:a", "").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"value\":\"hello\""), "{body}");
    eventually("node-b holds notes:a", || {
        let value: Option<String> = redis::cmd("GET").arg("notes:a").query(&mut b).unwrap();
        (value.as_deref() == Some("hello"))
            .then_some(())
            .ok_or(format!("{value:?}"))
    });
    // A JSON value written over HTTP reads as its JSON text.
    http(nodes[0].client, "PUT", "/v1/keys/notes:j", "{\"n\":1}").unwrap();
    let json: String = redis::cmd("GET").arg("notes:j").query(&mut a).unwrap();
    assert_eq!(json, "{\"n\":1}");
    let missing: Option<String> = redis::cmd("GET").arg("notes:none").query(&mut a).unwrap();
    assert_eq!(missing, None);
    let many: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&["notes:a", "notes:none"])
        .query(&mut a)
        .unwrap();
    assert_eq!(many, vec![Some("hello".to_owned()), None]);

    // EXISTS and DEL count the keys that had a value.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&["notes:a", "notes:j", "notes:none"])
        .query(&mut a)
        .unwrap();
    assert_eq!(exists, 2);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&["notes:a", "notes:none"])
        .query(&mut a)
        .unwrap();
    assert_eq!(deleted, 1);
    let gone: Option<String> = redis::cmd("GET").arg("notes:a").query(&mut a).unwrap();
    assert_eq!(gone, None);

    // Counters: INCRBY/DECR on a pn_counter collection; the total over HTTP is the same.
    let total: i64 = redis::cmd("INCRBY")
        .arg("hits:x")
        .arg(5)
        .query(&mut a)
        .unwrap();
    assert_eq!(total, 5);
    let total: i64 = redis::cmd("DECR").arg("hits:x").query(&mut a).unwrap();
    assert_eq!(total, 4);
    let text: String = redis::cmd("GET").arg("hits:x").query(&mut a).unwrap();
    assert_eq!(text, "4");
    let (_, body) = http(nodes[0].client, "GET", "/v1/keys/hits:x", "").unwrap();
    assert!(body.contains("\"value\":4"), "{body}");

    // Sets: SADD/SREM count what changed; SMEMBERS, SISMEMBER, SCARD read.
    let added: i64 = redis::cmd("SADD")
        .arg(&["tags:t", "red", "blue", "red"])
        .query(&mut a)
        .unwrap();
    assert_eq!(added, 2);
    let removed: i64 = redis::cmd("SREM")
        .arg(&["tags:t", "red", "green"])
        .query(&mut a)
        .unwrap();
    assert_eq!(removed, 1);
    let members: Vec<String> = redis::cmd("SMEMBERS").arg("tags:t").query(&mut a).unwrap();
    assert_eq!(members, vec!["blue".to_owned()]);
    let is: i64 = redis::cmd("SISMEMBER")
        .arg(&["tags:t", "blue"])
        .query(&mut a)
        .unwrap();
    let count: i64 = redis::cmd("SCARD").arg("tags:t").query(&mut a).unwrap();
    assert_eq!((is, count), (1, 1));

    // TYPE and TTL (keys do not expire: -1 for one that exists, -2 for one that does not).
    let kinds: Vec<String> = ["notes:j", "tags:t", "hits:x", "notes:none"]
        .iter()
        .map(|k| redis::cmd("TYPE").arg(k).query(&mut a).unwrap())
        .collect();
    assert_eq!(kinds, ["string", "set", "string", "none"]);
    let ttls: Vec<i64> = ["notes:j", "notes:none"]
        .iter()
        .map(|k| redis::cmd("TTL").arg(k).query(&mut a).unwrap())
        .collect();
    assert_eq!(ttls, [-1, -2]);
    // SET with EX or PX expires: TTL and PTTL say what is left, on another node too, and the
    // key reads as absent once it expired, over RESP and HTTP alike.
    let _: () = redis::cmd("SET")
        .arg(&["notes:beat", "alive", "PX", "3000"])
        .query(&mut a)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&["notes:long", "alive", "EX", "100"])
        .query(&mut a)
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg("notes:long")
        .query(&mut b)
        .unwrap_or(-9);
    assert!((99..=100).contains(&ttl), "TTL {ttl}");
    let pttl: i64 = redis::cmd("PTTL").arg("notes:beat").query(&mut a).unwrap();
    assert!((1..=3000).contains(&pttl), "PTTL {pttl}");
    let (status, body) = http(nodes[2].client, "GET", "/v1/keys/notes:beat", "").unwrap();
    assert!(
        status == 200 && body.contains("expires_at_ms"),
        "{status} {body}"
    );
    std::thread::sleep(Duration::from_millis(3100));
    let gone: Option<String> = redis::cmd("GET").arg("notes:beat").query(&mut a).unwrap();
    assert_eq!(gone, None);
    let ttl: i64 = redis::cmd("TTL").arg("notes:beat").query(&mut a).unwrap();
    assert_eq!(ttl, -2);
    for node in &nodes {
        let (status, _) = http(node.client, "GET", "/v1/keys/notes:beat", "").unwrap();
        assert_eq!(status, 404, "expired on {}", node.client);
    }
    // Over HTTP: ttl_ms on a write.
    let (status, body) =
        http(nodes[1].client, "PUT", "/v1/keys/notes:h?ttl_ms=60000", "1").unwrap();
    assert_eq!(status, 200, "{body}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg("notes:h")
        .query(&mut a)
        .unwrap_or(-9);
    assert!((1..=60_000).contains(&pttl), "PTTL {pttl}");
    // MSET is atomic, as in Redis: a transaction, which a strong collection takes and the
    // leaderless one refuses rather than writing the keys one by one.
    let _: () = redis::cmd("MSET")
        .arg(&["ledger:m1", "1", "ledger:m2", "2"])
        .query(&mut a)
        .unwrap();
    let both: Vec<String> = redis::cmd("MGET")
        .arg(&["ledger:m1", "ledger:m2"])
        .query(&mut a)
        .unwrap();
    assert_eq!(both, ["1", "2"]);
    let (code, _) = refused(
        redis::cmd("MSET")
            .arg(&["notes:m1", "1", "notes:m2", "2"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "UNSUPPORTED");

    // SCAN pages through a prefix with this connection's cursors.
    for i in 0..25 {
        let _: () = redis::cmd("SET")
            .arg(format!("page:{i:02}"))
            .arg(i.to_string())
            .query(&mut a)
            .unwrap();
    }
    let mut cursor = 0u64;
    let mut seen = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("page:*")
            .arg("COUNT")
            .arg(10)
            .query(&mut a)
            .unwrap();
        seen.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("page:{i:02}")).collect();
    assert_eq!(seen, expected);
}

#[test]
fn errors_are_typed_and_levels_and_sessions_are_the_apis() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let mut a = client(nodes[0].resp);

    // A value of another kind, an unsupported option, an unknown command.
    let (code, message) = refused(redis::cmd("INCR").arg("notes:n").query::<i64>(&mut a));
    assert_eq!(code, "WRONGTYPE", "{message}");
    let (code, _) = refused(redis::cmd("SET").arg("hits:x").arg("1").query::<()>(&mut a));
    assert_eq!(code, "WRONGTYPE");
    let (code, message) = refused(
        redis::cmd("SET")
            .arg(&["notes:t", "v", "EX", "0"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "ERR");
    assert!(message.contains("invalid expire time"), "{message}");
    let (code, message) = refused(
        redis::cmd("SET")
            .arg(&["hits:t", "1", "EX", "10"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "WRONGTYPE", "{message}");
    let (code, message) = refused(redis::cmd("FLUSHALL").query::<()>(&mut a));
    assert_eq!(code, "ERR");
    assert!(message.contains("unknown command"), "{message}");
    // SET NX needs a compare-and-set, which leaderless replication cannot do: refused, typed.
    let (code, _) = refused(
        redis::cmd("SET")
            .arg(&["notes:nx", "v", "NX"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "UNSUPPORTED");
    // On a strong collection it is a real compare-and-set: the second is nil.
    let first: Option<String> = redis::cmd("SET")
        .arg(&["ledger:nx", "v", "NX"])
        .query(&mut a)
        .unwrap();
    let second: Option<String> = redis::cmd("SET")
        .arg(&["ledger:nx", "w", "NX"])
        .query(&mut a)
        .unwrap();
    assert_eq!((first.as_deref(), second), (Some("OK"), None));
    let kept: String = redis::cmd("GET").arg("ledger:nx").query(&mut a).unwrap();
    assert_eq!(kept, "v");

    // A level the collection cannot deliver is refused, not silently weakened.
    let plan: Vec<String> = redis::cmd("AGENTSTORE.PLAN")
        .arg("notes")
        .query(&mut a)
        .unwrap();
    let guarantee = plan[plan.iter().position(|f| f == "guarantee").unwrap() + 1].clone();
    assert_eq!(guarantee, "eventual");
    let _: () = redis::cmd("AGENTSTORE.LEVEL")
        .arg("strong")
        .query(&mut a)
        .unwrap();
    let (code, _) = refused(redis::cmd("SET").arg(&["notes:s", "v"]).query::<()>(&mut a));
    assert_eq!(code, "CONSISTENCY_UNAVAILABLE");
    let _: () = redis::cmd("AGENTSTORE.LEVEL")
        .arg("collection")
        .query(&mut a)
        .unwrap();

    // A connection is a session: its token carries a causal write to another node, whose
    // read then waits for it (or says it cannot serve the session yet).
    let _: () = redis::cmd("SET")
        .arg(&["chat:1", "hi"])
        .query(&mut a)
        .unwrap();
    let token: String = redis::cmd("AGENTSTORE.SESSION").query(&mut a).unwrap();
    assert!(token.contains("node-a="), "{token}");
    let mut c = client(nodes[2].resp);
    let _: () = redis::cmd("AGENTSTORE.SESSION")
        .arg(&token)
        .query(&mut c)
        .unwrap();
    let read: Option<String> = redis::cmd("GET").arg("chat:1").query(&mut c).unwrap();
    assert_eq!(read.as_deref(), Some("hi"));
    let (code, _) = refused(
        redis::cmd("AGENTSTORE.SESSION")
            .arg("not a token")
            .query::<()>(&mut c),
    );
    assert_eq!(code, "INVALID_SESSION");

    // INFO names the node and its members.
    eventually("INFO counts three live members", || {
        let info: String = redis::cmd("INFO").query(&mut a).unwrap();
        (info.contains("node:node-a") && info.contains("members_alive:3"))
            .then_some(())
            .ok_or(info)
    });
}

/// Sends `bytes` and reads what comes back until the connection is quiet.
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn pipelined_inline_and_malformed_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addr = nodes[0].resp;
    // Three commands in one write, the last inline, then QUIT: every reply, in order.
    let answer = raw(
        addr,
        b"*3\r\n$3\r\nSET\r\n$7\r\nnotes:p\r\n$2\r\nv1\r\n*2\r\n$3\r\nGET\r\n$7\r\nnotes:p\r\nPING\r\nQUIT\r\n",
    );
    assert_eq!(answer, "+OK\r\n$2\r\nv1\r\n+PONG\r\n+OK\r\n");
    // A malformed request is answered with a protocol error and the connection closed.
    let answer = raw(addr, b"*1\r\n:12\r\n");
    assert!(answer.starts_with("-ERR Protocol error"), "{answer}");
    // A key that is not UTF-8 is refused with the reason.
    let answer = raw(addr, b"*2\r\n$3\r\nGET\r\n$2\r\n\xff\xfe\r\n");
    assert!(answer.starts_with("-ERR a key must be UTF-8"), "{answer}");
}

#[test]
fn a_node_that_checks_tokens_serves_resp_only_to_what_a_token_grants() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = common::nodes(dir.path(), COLLECTIONS);
    for node in &mut nodes {
        node.configure("clients: open", "clients: tokens");
        node.start();
    }
    let authority = agentstore_trust::SecretKey::load(&dir.path().join("authority.key")).unwrap();
    let notes = agentstore_trust::Capability::issue(
        &authority,
        vec![
            agentstore_trust::Right::new(
                &[
                    agentstore_trust::Operation::Read,
                    agentstore_trust::Operation::Write,
                ],
                "notes:",
            )
            .unwrap(),
        ],
        0,
    )
    .unwrap()
    .to_text();
    let mut a = client(nodes[0].resp);
    let (code, _) = refused(redis::cmd("GET").arg("notes:a").query::<()>(&mut a));
    assert_eq!(code, "NOAUTH");
    let (code, _) = refused(
        redis::cmd("AUTH")
            .arg("agentstore-token-v1:AAAA")
            .query::<()>(&mut a),
    );
    assert_eq!(code, "WRONGPASS");
    let _: () = redis::cmd("AUTH").arg(&notes).query(&mut a).unwrap();
    let _: () = redis::cmd("SET")
        .arg(&["notes:a", "mine"])
        .query(&mut a)
        .unwrap();
    let (code, message) = refused(
        redis::cmd("SET")
            .arg(&["ledger:a", "x"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "NOPERM", "{message}");
    let (code, _) = refused(
        redis::cmd("SCAN")
            .arg(&["0", "MATCH", "ledger:*"])
            .query::<()>(&mut a),
    );
    assert_eq!(code, "NOPERM");
    // `AUTH user token` (Redis 6 clients send a user name) works the same.
    let mut b = client(nodes[1].resp);
    let _: () = redis::cmd("AUTH")
        .arg(&["default", &notes])
        .query(&mut b)
        .unwrap();
    eventually("the write reached node-b", || {
        let value: Option<String> = redis::cmd("GET").arg("notes:a").query(&mut b).unwrap();
        (value.as_deref() == Some("mine"))
            .then_some(())
            .ok_or(format!("{value:?}"))
    });
}
