//! Policy errors: which file, where in it, which key, which value, and why.
//!
//! Every problem the policy parser finds becomes one [`PolicyError`]; the
//! parser collects all of them into [`PolicyErrors`] instead of stopping at
//! the first, so one `check` run shows everything to fix.

use std::{fmt, ops::Range};

/// Longest value (in characters) an error repeats; longer ones are cut.
const MAX_VALUE_CHARS: usize = 80;

/// One problem in a policy file (or in the built-in catalog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file path, or `<builtin>` for the embedded catalog.
    pub origin: String,
    /// 1-based; 0 when the error is about the whole file (it cannot be read).
    pub line: usize,
    /// 1-based, in characters; 0 together with `line`.
    pub column: usize,
    /// Dotted path of the key, indices 0-based: `workloads[1].allow[2]`,
    /// `mode`. Empty for errors about the whole file.
    pub key: String,
    /// The offending value as written in the file (strings keep their
    /// quotes), when there is one.
    pub value: Option<String>,
    /// Why it is wrong, and what is accepted instead.
    pub message: String,
}

impl PolicyError {
    /// An error at byte offset `span.start` of `text`, quoting the source
    /// text of `span` as the value when `quote_value` is set.
    pub(crate) fn at(
        origin: &str,
        text: &str,
        span: Range<usize>,
        key: impl Into<String>,
        quote_value: bool,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = line_column(text, span.start);
        let value = quote_value.then(|| source_value(text, span));
        Self {
            origin: origin.to_owned(),
            line,
            column,
            key: key.into(),
            value,
            message: message.into(),
        }
    }

    /// An error about the whole file, with no position (it cannot be read).
    pub(crate) fn whole_file(origin: &str, message: impl Into<String>) -> Self {
        Self {
            origin: origin.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            value: None,
            message: message.into(),
        }
    }
}

/// `origin:line:column: key = value: message`; the position is left out
/// for whole-file errors, `= value` when there is no value.
impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
            if let Some(value) = &self.value {
                write!(f, " = {value}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in one policy, in file order; never empty when
/// returned as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// One error per line.
impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// 1-based line and character column of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The source text of `span`, on one line and cut to `MAX_VALUE_CHARS`.
fn source_value(text: &str, span: Range<usize>) -> String {
    let raw = text.get(span).unwrap_or_default();
    let one_line = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_VALUE_CHARS {
        one_line
    } else {
        let cut: String = one_line.chars().take(MAX_VALUE_CHARS).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_value() {
        let text = "mode = \"x\"\n[defaults]\nllm = \"nope\"\n";
        let e = PolicyError::at("p.toml", text, 28..34, "defaults.llm", true, "bad");
        assert_eq!((e.line, e.column), (3, 7));
        assert_eq!(e.to_string(), "p.toml:3:7: defaults.llm = \"nope\": bad");
        let e = PolicyError::at("p.toml", text, 11..21, "defaults", false, "bad");
        assert_eq!(e.to_string(), "p.toml:2:1: defaults: bad");
        let e = PolicyError::whole_file("p.toml", "cannot read: gone");
        assert_eq!(e.to_string(), "p.toml: cannot read: gone");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(line_column("a = \"é\" x", 9), (1, 9));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn long_values_are_cut_and_joined() {
        let text = format!("[{}\n]", "1, ".repeat(60));
        let v = source_value(&text, 0..text.len());
        assert!(v.ends_with('…') && !v.contains('\n'), "{v}");
    }

    #[test]
    fn errors_join_lines() {
        let a = PolicyError::whole_file("a", "x");
        let b = PolicyError::whole_file("b", "y");
        assert_eq!(PolicyErrors(vec![a, b]).to_string(), "a: x\nb: y");
    }
}
