//! Maps between positions in a YAML text and dotted field paths (`storage.replication.replicas`),
//! for block-style YAML, which is what configuration files are. Flow-style mappings degrade
//! gracefully: the path stops at the last block key.

/// One `key:` line of a block mapping.
struct KeyLine<'a> {
    line: u64,
    indent: usize,
    column: u64,
    key: &'a str,
}

fn key_lines(text: &str) -> impl Iterator<Item = KeyLine<'_>> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            return None;
        }
        let mut indent = raw.len() - trimmed.len();
        let mut body = trimmed;
        // A sequence item `- key: value` opens a mapping indented past the dash.
        while let Some(rest) = body.strip_prefix("- ") {
            let rest_trimmed = rest.trim_start();
            indent += body.len() - rest_trimmed.len();
            body = rest_trimmed;
        }
        let colon = body.find(':')?;
        let raw_key = body[..colon].trim();
        let quoted = raw_key.len() >= 2
            && (raw_key.starts_with('"') && raw_key.ends_with('"')
                || raw_key.starts_with('\'') && raw_key.ends_with('\''));
        let key = if quoted {
            &raw_key[1..raw_key.len() - 1]
        } else {
            raw_key
        };
        let after = &body[colon + 1..];
        let plain_key = quoted || !key.contains(' ');
        if key.is_empty() || !plain_key || !(after.is_empty() || after.starts_with(' ')) {
            return None;
        }
        Some(KeyLine {
            line: i as u64 + 1,
            indent,
            column: indent as u64 + 1,
            key,
        })
    })
}

/// The dotted path of the deepest key at or above `line` (1-based) whose mapping encloses it.
pub(crate) fn path_at(text: &str, line: u64) -> String {
    let mut stack: Vec<(usize, &str)> = Vec::new();
    for entry in key_lines(text).take_while(|entry| entry.line <= line) {
        while stack
            .last()
            .is_some_and(|&(indent, _)| indent >= entry.indent)
        {
            stack.pop();
        }
        stack.push((entry.indent, entry.key));
    }
    stack
        .iter()
        .map(|(_, key)| *key)
        .collect::<Vec<_>>()
        .join(".")
}

/// The line and column of the key at `path`, or of its deepest ancestor present in the text.
/// `(0, 0)` when not even the first segment is in the text (the value is a default).
pub(crate) fn locate(text: &str, path: &str) -> (u64, u64) {
    let wanted: Vec<&str> = path.split('.').collect();
    let mut stack: Vec<(usize, &str)> = Vec::new();
    let mut best = (0, 0, 0usize);
    for entry in key_lines(text) {
        while stack
            .last()
            .is_some_and(|&(indent, _)| indent >= entry.indent)
        {
            stack.pop();
        }
        stack.push((entry.indent, entry.key));
        let depth = stack.len();
        let matches = depth <= wanted.len()
            && stack
                .iter()
                .zip(&wanted)
                .all(|((_, key), want)| key == want);
        if matches && depth > best.2 {
            best = (entry.line, entry.column, depth);
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
storage:
  # a comment
  replication:
    strategy: quorum
    replicas: 3
  consistency_overrides:
    agents: strong
";

    #[test]
    fn paths_follow_indentation() {
        assert_eq!(path_at(TEXT, 5), "storage.replication.replicas");
        assert_eq!(path_at(TEXT, 7), "storage.consistency_overrides.agents");
        assert_eq!(path_at(TEXT, 1), "storage");
    }

    #[test]
    fn locate_finds_keys_or_their_parent() {
        assert_eq!(locate(TEXT, "storage.replication.replicas"), (5, 5));
        assert_eq!(locate(TEXT, "storage.replication.write_quorum"), (3, 3));
        assert_eq!(locate(TEXT, "other"), (0, 0));
    }
}
