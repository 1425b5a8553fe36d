//! The rules for values that come from callers, in one place.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::lock::LockRequest;

/// Longest name, source, step name or idempotency key, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 256;

/// Longest failure reason kept, in bytes; longer ones are truncated.
pub(crate) const MAX_REASON_BYTES: usize = 4096;

/// Longest log path, in bytes.
pub(crate) const MAX_PATH_BYTES: usize = 4096;

/// Deepest nesting of arrays and objects in metadata: serde_json refuses to
/// parse deeper JSON, so deeper metadata would be stored but never read back.
pub(crate) const MAX_METADATA_DEPTH: usize = 127;

/// Checks a name-like value: 1 to 256 bytes, no control characters, no
/// leading or trailing whitespace.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, value, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            what,
            value,
            format!(
                "is {} bytes, longer than the {MAX_NAME_BYTES}-byte limit",
                value.len()
            ),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            what,
            value,
            format!("contains the control character U+{:04X}", u32::from(c)),
        ));
    }
    if value.trim() != value {
        return Err(Error::invalid(
            what,
            value,
            "has leading or trailing whitespace",
        ));
    }
    Ok(())
}

/// Renders a failure reason, truncated at a character boundary to
/// [`MAX_REASON_BYTES`] with a trailing `…`. A NUL character becomes U+FFFD
/// (`�`): PostgreSQL's text cannot hold one, and a reason is never refused.
pub(crate) fn reason(reason: impl fmt::Display) -> String {
    let mut text = reason.to_string();
    if text.contains('\0') {
        text = text.replace('\0', "\u{FFFD}");
    }
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Serializes metadata, refusing it when larger than `limit` bytes or nested
/// deeper than [`MAX_METADATA_DEPTH`]. `null` is stored as no metadata at all.
pub(crate) fn metadata(value: &serde_json::Value, limit: usize) -> Result<Option<String>> {
    json("metadata", value, limit)
}

/// Serializes a JSON value handed to the API (`what` names it in errors),
/// with the rules of [`metadata`].
pub(crate) fn json(
    what: &'static str,
    value: &serde_json::Value,
    limit: usize,
) -> Result<Option<String>> {
    if value.is_null() {
        return Ok(None);
    }
    if nesting(value) > MAX_METADATA_DEPTH {
        return Err(Error::InvalidInput {
            what,
            value: String::new(),
            reason: format!(
                "nests arrays and objects deeper than {MAX_METADATA_DEPTH} levels, \
                 more than it could be read back with"
            ),
        });
    }
    let text = serde_json::to_string(value).map_err(|e| Error::InvalidInput {
        what,
        value: String::new(),
        reason: format!("cannot be serialized: {e}"),
    })?;
    if text.len() > limit {
        return Err(Error::InvalidInput {
            what,
            value: format!("of {} bytes", text.len()),
            reason: format!("larger than the {limit}-byte limit (see Builder::max_metadata_bytes)"),
        });
    }
    Ok(Some(text))
}

/// How many arrays and objects enclose the deepest value of `value`
/// (counting itself), without recursion and stopping just past the limit.
fn nesting(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let mut deepest = 0;
    let mut stack = vec![(value, 0)];
    while let Some((value, enclosing)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        let level = enclosing + 1;
        deepest = deepest.max(level);
        if deepest > MAX_METADATA_DEPTH {
            break;
        }
        stack.extend(children.map(|child| (child, level)));
    }
    deepest
}

/// Checks a log path: UTF-8, at most 4 KiB, no NUL.
pub(crate) fn log_path(path: &Path) -> Result<String> {
    let Some(text) = path.to_str() else {
        return Err(Error::invalid(
            "log path",
            &path.to_string_lossy(),
            "is not valid UTF-8",
        ));
    };
    if text.is_empty() {
        return Err(Error::invalid("log path", text, "must not be empty"));
    }
    if text.len() > MAX_PATH_BYTES {
        return Err(Error::invalid(
            "log path",
            text,
            format!("longer than the {MAX_PATH_BYTES}-byte limit"),
        ));
    }
    if text.contains('\0') {
        return Err(Error::invalid("log path", text, "contains a NUL byte"));
    }
    Ok(text.to_owned())
}

// With the other input rules rather than in `lock.rs`: what a request is
// checked for is decided here and in `LockRequest::checked_keys`.
impl LockRequest {
    /// Checks the request as [`Ledger::acquire`](crate::Ledger::acquire)
    /// does (at least one key, each 1 to 256 bytes without control
    /// characters or leading or trailing whitespace, at least one slot), and
    /// asks the ledger nothing: for a tool that must refuse bad input before
    /// it records a run.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] naming the bad key or mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use runledger::LockRequest;
    /// assert!(LockRequest::new(["build:symbol=AAPL"]).check().is_ok());
    /// let err = LockRequest::new([""]).check().unwrap_err();
    /// assert_eq!(err.to_string(), "invalid lock key \"\": must not be empty");
    /// ```
    pub fn check(&self) -> Result<()> {
        self.checked_keys().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rules() {
        for good in [
            "build",
            "build:symbol=AAPL",
            "ü",
            &"x".repeat(MAX_NAME_BYTES),
        ] {
            check_name("run name", good).unwrap();
        }
        let bad = [
            ("", "must not be empty"),
            (&*"x".repeat(MAX_NAME_BYTES + 1), "257 bytes"),
            ("a\tb", "U+0009"),
            ("a\u{7f}", "U+007F"),
            (" build", "whitespace"),
            ("build\u{a0}", "whitespace"),
        ];
        for (value, why) in bad {
            let msg = check_name("run name", value).unwrap_err().to_string();
            assert!(msg.contains(why), "{value:?}: {msg}");
        }
    }

    #[test]
    fn reasons_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let kept = reason(&long);
        assert!(kept.len() <= MAX_REASON_BYTES);
        assert!(kept.ends_with('…'));
        assert_eq!(reason("short"), "short");
        assert_eq!(reason("a\0b"), "a\u{FFFD}b");
    }

    /// Regression: metadata nested 128 levels deep was stored, and then
    /// every read of the run (and every listing that included it) failed
    /// with serde_json's "recursion limit exceeded".
    #[test]
    fn metadata_is_refused_only_when_nested_too_deep_to_read_back() {
        for wrap in [
            |v| serde_json::json!([v]),
            |v| serde_json::json!({ "n": v, "flat": "x" }),
        ] {
            let mut value = serde_json::json!(1);
            for _ in 0..MAX_METADATA_DEPTH {
                value = wrap(value);
            }
            let text = metadata(&value, usize::MAX).unwrap().unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
            let msg = metadata(&wrap(value), usize::MAX).unwrap_err().to_string();
            assert!(msg.contains("127 levels"), "{msg}");
        }
        assert_eq!(nesting(&serde_json::json!([])), 1);
        assert_eq!(nesting(&serde_json::json!("leaf")), 0);
    }

    #[test]
    fn metadata_over_the_limit_is_refused_with_its_size() {
        let big = serde_json::json!({"blob": "x".repeat(100)});
        let msg = metadata(&big, 50).unwrap_err().to_string();
        assert!(
            msg.contains("of 111 bytes") && msg.contains("50-byte limit"),
            "{msg}"
        );
        assert_eq!(metadata(&serde_json::Value::Null, 50).unwrap(), None);
        assert_eq!(
            metadata(&serde_json::json!([1]), 50).unwrap().unwrap(),
            "[1]"
        );
    }
}
