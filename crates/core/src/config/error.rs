//! Configuration errors that point at the file, line, column and field.

use std::fmt;

/// A configuration that cannot be used, and where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or other source) the text came from.
    pub source_name: String,
    /// 1-based line; 0 when the problem is not at one place (a missing block).
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub column: u64,
    /// Dotted path of the field, e.g. `storage.replication.write_quorum`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// The nearest valid name, when a name was misspelt.
    pub suggestion: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_name)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": field `{}`: {}", self.field, self.message)?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, " (did you mean `{suggestion}`?)")?;
        }
        Ok(())
    }
}

/// The candidate closest to `given` by edit distance, if it is close enough to be a typo.
pub(crate) fn nearest<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(given, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= (candidate.len().max(given.len()) / 3).max(2))
        .min()
        .map(|(_, candidate)| candidate.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// The names listed in "expected one of a, b, c" (with or without backticks) or
/// "expected `a` or `b`".
pub(crate) fn expected_names(message: &str) -> Vec<&str> {
    let Some(start) = message.find("expected ") else {
        return Vec::new();
    };
    let list = message[start + 9..].trim_start_matches("one of ");
    list.split(", ")
        .flat_map(|part| part.split(" or "))
        .map(|name| name.trim().trim_matches('`'))
        .filter(|name| !name.is_empty())
        .collect()
}

/// The name serde reports as unknown: "unknown field `x`" or "unknown variant `x`".
pub(crate) fn unknown_name(message: &str) -> Option<&str> {
    let start = message
        .find("unknown field `")
        .map(|i| i + 15)
        .or_else(|| message.find("unknown variant `").map(|i| i + 17))?;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let names = ["strategy", "replicas", "write_quorum", "read_quorum"];
        assert_eq!(nearest("replicaz", names).as_deref(), Some("replicas"));
        assert_eq!(
            nearest("write_qourum", names).as_deref(),
            Some("write_quorum")
        );
        assert_eq!(nearest("colour", names), None);
    }

    #[test]
    fn serde_messages_are_understood() {
        let m = "unknown variant `strnog`, expected one of `eventual`, `causal`, `strong`";
        assert_eq!(unknown_name(m), Some("strnog"));
        assert_eq!(expected_names(m), ["eventual", "causal", "strong"]);
        let m = "unknown field `replicaz`, expected one of strategy, replicas, read_quorum";
        assert_eq!(expected_names(m), ["strategy", "replicas", "read_quorum"]);
    }
}
