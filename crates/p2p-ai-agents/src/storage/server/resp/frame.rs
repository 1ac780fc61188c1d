//! RESP2, the Redis protocol, as pure functions: requests parsed from bytes, replies encoded
//! to bytes. No I/O here; the connection loop feeds it what it reads.
//!
//! A request is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$5\r\nkey:1\r\n`, what every
//! client library sends) or an inline command (`GET key:1\r\n`, what a person types into a
//! telnet session). Replies are the five RESP2 types.

/// The largest bulk string a request may carry (a value or a key).
pub(super) const MAX_BULK: usize = 16 * 1024 * 1024;
/// The most arguments one request may carry.
pub(super) const MAX_ARGS: usize = 1024 * 1024;
/// The longest inline command or header line.
const MAX_LINE: usize = 64 * 1024;

/// Why a request could not be parsed; the connection answers it and closes, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub(super) struct ProtocolError(pub(super) String);

fn protocol(what: impl Into<String>) -> ProtocolError {
    ProtocolError(what.into())
}

/// A parsed request (its arguments and the bytes it took), or `None` while incomplete.
type Parsed = Result<Option<(Vec<Vec<u8>>, usize)>, ProtocolError>;

/// Parses one request from the front of `buf`: `Ok(Some((args, used)))` with the bytes it
/// took, `Ok(None)` if `buf` does not yet hold a whole request. An empty inline line parses
/// to no arguments (Redis ignores it).
pub(super) fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_array(buf),
        Some(_) => parse_inline(buf),
    }
}

/// The line starting at `from` (without its `\r\n`) and where the next one starts.
fn line(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[from..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end > MAX_LINE => Err(protocol("too big line")),
        Some(end) => Ok(Some((&rest[..end], from + end + 2))),
        None if rest.len() > MAX_LINE => Err(protocol("too big line")),
        None => Ok(None),
    }
}

fn number(text: &[u8], what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
        .ok_or_else(|| protocol(format!("invalid {what} length")))
}

fn parse_array(buf: &[u8]) -> Parsed {
    let Some((header, mut at)) = line(buf, 1)? else {
        return Ok(None);
    };
    let count = number(header, "multibulk")?;
    if count <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_ARGS {
        return Err(protocol("invalid multibulk length"));
    }
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        if at >= buf.len() {
            return Ok(None);
        }
        if buf[at] != b'$' {
            return Err(protocol(format!(
                "expected '$', got '{}'",
                char::from(buf[at]).escape_default()
            )));
        }
        let Some((header, start)) = line(buf, at + 1)? else {
            return Ok(None);
        };
        let len = number(header, "bulk")?;
        let len = usize::try_from(len).map_err(|_| protocol("invalid bulk length"))?;
        if len > MAX_BULK {
            return Err(protocol("invalid bulk length"));
        }
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(protocol("a bulk string does not end with CRLF"));
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

/// An inline command: words split by spaces, double quotes group words (with `\"` and `\\`
/// escapes), a bare `\n` ends the line as well as `\r\n`.
fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() > MAX_LINE {
            Err(protocol("too big inline request"))
        } else {
            Ok(None)
        };
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let mut args = Vec::new();
    let mut bytes = text.iter().copied().peekable();
    loop {
        while bytes.next_if(|b| b.is_ascii_whitespace()).is_some() {}
        let Some(first) = bytes.peek().copied() else {
            break;
        };
        let mut word = Vec::new();
        if first == b'"' {
            bytes.next();
            loop {
                match bytes.next() {
                    None => return Err(protocol("unbalanced quotes in request")),
                    Some(b'"') => break,
                    Some(b'\\') => match bytes.next() {
                        Some(b'n') => word.push(b'\n'),
                        Some(b'r') => word.push(b'\r'),
                        Some(b't') => word.push(b'\t'),
                        Some(other) => word.push(other),
                        None => return Err(protocol("unbalanced quotes in request")),
                    },
                    Some(other) => word.push(other),
                }
            }
            if bytes.peek().is_some_and(|b| !b.is_ascii_whitespace()) {
                return Err(protocol("unbalanced quotes in request"));
            }
        } else {
            while let Some(b) = bytes.next_if(|b| !b.is_ascii_whitespace()) {
                word.push(b);
            }
        }
        args.push(word);
    }
    Ok(Some((args, end + 1)))
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// `+OK`: a status.
    Simple(&'static str),
    /// `-CODE message`: an error; the first word is its code.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$n` and the bytes.
    Bulk(Vec<u8>),
    /// `$-1`: nothing.
    Nil,
    /// `*n` and the elements.
    Array(Vec<Reply>),
}

impl Reply {
    /// `+OK`.
    pub(super) const OK: Reply = Reply::Simple("OK");

    /// An error reply of `code` (upper case, one word) and a message.
    pub(super) fn error(code: &str, message: impl std::fmt::Display) -> Self {
        // A reply is one line: line breaks in a message would end it early.
        let message = message.to_string().replace(['\r', '\n'], " ");
        Reply::Error(format!("{code} {message}"))
    }

    /// A bulk string of text.
    pub(super) fn text(text: impl Into<String>) -> Self {
        Reply::Bulk(text.into().into_bytes())
    }

    /// Appends the reply's encoding to `out`.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => {
                out.push(b'+');
                out.extend_from_slice(text.as_bytes());
            }
            Reply::Error(text) => {
                out.push(b'-');
                out.extend_from_slice(text.as_bytes());
            }
            Reply::Integer(n) => {
                out.push(b':');
                out.extend_from_slice(n.to_string().as_bytes());
            }
            Reply::Bulk(bytes) => {
                out.push(b'$');
                out.extend_from_slice(bytes.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(bytes);
            }
            Reply::Nil => out.extend_from_slice(b"$-1"),
            Reply::Array(items) => {
                out.push(b'*');
                out.extend_from_slice(items.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                for item in items {
                    item.encode(out);
                }
                return;
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(args: &[&[u8]]) -> Vec<u8> {
        Reply::Array(args.iter().map(|a| Reply::Bulk(a.to_vec())).collect()).encode_to_vec()
    }

    impl Reply {
        fn encode_to_vec(&self) -> Vec<u8> {
            let mut out = Vec::new();
            self.encode(&mut out);
            out
        }
    }

    #[test]
    fn an_array_of_bulk_strings_parses_to_its_arguments() {
        let bytes = b"*2\r\n$3\r\nGET\r\n$5\r\nkey:1\r\nPING\r\n";
        let (args, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"key:1".to_vec()]);
        assert_eq!(&bytes[used..], b"PING\r\n");
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete_not_an_error() {
        let bytes = request(&[b"SET", b"key:1", b"a value\r\nwith a line break"]);
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]), Ok(None), "prefix of {end} bytes");
        }
        assert_eq!(parse(&bytes).unwrap().unwrap().1, bytes.len());
    }

    #[test]
    fn inline_commands_split_on_spaces_and_keep_quoted_words() {
        let (args, used) = parse(b"SET key:1 \"two words\\n\"  x\n").unwrap().unwrap();
        assert_eq!(
            args,
            vec![
                b"SET".to_vec(),
                b"key:1".to_vec(),
                b"two words\n".to_vec(),
                b"x".to_vec()
            ]
        );
        assert_eq!(used, 27);
        assert_eq!(parse(b"\r\n"), Ok(Some((Vec::new(), 2))));
        assert!(parse(b"GET \"open\r\n").is_err());
    }

    #[test]
    fn malformed_requests_are_protocol_errors() {
        assert!(
            parse(b"*1\r\n:3\r\n").is_err(),
            "an element that is not a bulk string"
        );
        assert!(parse(b"*x\r\n").is_err(), "a count that is not a number");
        assert!(parse(b"*1\r\n$-5\r\n").is_err(), "a negative bulk length");
        assert!(
            parse(b"*1\r\n$3\r\nGETxx").is_err(),
            "a bulk string without its CRLF"
        );
        let huge = format!("*1\r\n${}\r\n", MAX_BULK + 1);
        assert!(
            parse(huge.as_bytes()).is_err(),
            "a bulk string over the limit"
        );
        let long = vec![b'a'; MAX_LINE + 1];
        assert!(parse(&long).is_err(), "an inline line over the limit");
    }

    #[test]
    fn replies_encode_as_redis_does() {
        let reply = Reply::Array(vec![
            Reply::OK,
            Reply::Integer(-3),
            Reply::text("hé"),
            Reply::Nil,
            Reply::error("WRONGTYPE", "a set\r\nof members"),
            Reply::Array(Vec::new()),
        ]);
        assert_eq!(
            reply.encode_to_vec(),
            b"*6\r\n+OK\r\n:-3\r\n$3\r\nh\xc3\xa9\r\n$-1\r\n-WRONGTYPE a set  of members\r\n*0\r\n"
        );
    }

    proptest! {
        /// Any arguments, encoded as a client encodes them, parse back to themselves, and a
        /// request followed by another leaves exactly the other.
        #[test]
        fn requests_round_trip(
            args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..8),
            next in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut bytes = request(&refs);
            let len = bytes.len();
            bytes.extend_from_slice(&next);
            let (parsed, used) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(parsed, args);
            prop_assert_eq!(used, len);
        }

        /// Arbitrary bytes never panic the parser, and what it takes is within the input.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert!(used <= bytes.len() && used > 0);
            }
        }
    }
}
