//! How a problem in the file is reported: `ConfigError`, the one `path:line:col: message`
//! line callers print, and `Bad`, the same problem while the document is still being walked
//! (a byte span, turned into line and column once, where the text is at hand).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a config file was rejected. `Display` gives the one-line `path:line:col: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column of the offending key or value, when there is one.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    pub(super) fn new(
        path: &Path,
        location: Option<(usize, usize)>,
        message: impl Into<String>,
    ) -> Self {
        // Callers print this as one log line, so nothing from the input may break it.
        let message = message.into().replace(['\n', '\r'], " ");
        ConfigError {
            path: path.to_path_buf(),
            location,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A problem found while walking the document (byte span, message), before the span becomes
/// line:col.
pub(super) struct Bad(pub(super) Option<Range<usize>>, pub(super) String);

pub(super) fn bad(span: Range<usize>, msg: impl Into<String>) -> Bad {
    Bad(Some(span), msg.into())
}

/// 1-based line and column (in characters) of a byte offset. A leading BOM takes no column.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = before[line_start..]
        .chars()
        .filter(|&c| c != '\u{feff}')
        .count()
        + 1;
    (line, col)
}

/// User text made safe for a one-line message: escaped, and cut if long.
pub(super) fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 60;
    let cut: String = s.chars().take(MAX_CHARS).collect();
    let ellipsis = if cut.len() < s.len() { "..." } else { "" };
    format!("{}{ellipsis}", cut.escape_debug())
}

pub(super) fn quote(s: &str) -> String {
    format!("\"{}\"", shown(s))
}
