//! Text from outside (server messages, answers, titles): bounded to one line before it enters an
//! error or an event, and escaped before it reaches a terminal.
//!
//! An agent server or a backend can answer anything: a megabyte of error text, newlines that
//! forge extra log lines, or escape sequences (`ESC ] 0 ; title BEL`, `ESC [ 2 J`) that rewrite
//! the terminal of whoever reads the answer or runs `agentsync replay`. [`one_line`] is applied
//! where such text becomes a [`crate::ports::PortError`] (so every `CommandFailed.error`,
//! `CommandDeadLettered.last_error` and `ObservationFailed.error` is one bounded line);
//! [`printable`] and [`printable_lines`] are applied where the command line prints data.

use std::borrow::Cow;

/// The most characters [`one_line`] keeps, the ellipsis included.
pub const MAX_LINE_CHARS: usize = 1_000;

/// How [`one_line`] marks text it cut.
const ELLIPSIS: char = '…';

/// Whether a character must never reach a terminal raw: C0 and C1 controls (ESC, BEL, CR,
/// backspace, CSI, ...), DEL, and the bidirectional overrides and isolates that make text read
/// differently from what it is ("Trojan Source").
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// External text as one line of at most [`MAX_LINE_CHARS`] characters: runs of whitespace
/// (newlines included) become one space, other control characters are written as `\u{1b}`
/// escapes, and longer text is cut on a character boundary and ends with `…`. Empty text reads
/// `(empty)`. Idempotent, and it reads no more of `s` than it keeps.
pub fn one_line(s: &str) -> String {
    let mut out = String::new();
    let mut kept = 0usize;
    let mut cut = false;
    let mut push = |c: char, out: &mut String| -> bool {
        if kept == MAX_LINE_CHARS {
            cut = true;
            return false;
        }
        out.push(c);
        kept += 1;
        true
    };
    'words: for (i, word) in s.split_whitespace().enumerate() {
        if i > 0 && !push(' ', &mut out) {
            break;
        }
        for c in word.chars() {
            if is_unsafe(c) {
                for e in c.escape_unicode() {
                    if !push(e, &mut out) {
                        break 'words;
                    }
                }
            } else if !push(c, &mut out) {
                break 'words;
            }
        }
    }
    if cut {
        out.pop();
        out.push(ELLIPSIS);
    }
    if out.is_empty() {
        out.push_str("(empty)");
    }
    out
}

/// [`one_line`] of bytes that should be UTF-8 (a reply body): only the start is decoded, so a
/// huge body costs no more than the line it becomes.
pub fn one_line_bytes(bytes: &[u8]) -> String {
    // Enough for MAX_LINE_CHARS characters of up to 4 bytes each, and then some whitespace.
    let head = &bytes[..bytes.len().min(MAX_LINE_CHARS * 8)];
    one_line(&String::from_utf8_lossy(head))
}

/// External text for one line of a terminal: every control character (newlines too) and
/// bidirectional override is written as an escape (`\n`, `\u{1b}`); the rest is unchanged.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// External text meant to be read over several lines (an answer): newlines (LF or CRLF) and
/// tabs are kept, every other control character (ESC, BEL, a lone CR, ...) and bidirectional
/// override is written as an escape (`\u{1b}`).
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, lines: bool) -> Cow<'_, str> {
    let kept = |c: char| lines && (c == '\n' || c == '\t');
    if !s.chars().any(|c| is_unsafe(c) && !kept(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if lines && c == '\r' && chars.peek() == Some(&'\n') {
            // CRLF is a newline: the LF that follows is kept.
            continue;
        }
        if kept(c) || !is_unsafe(c) {
            out.push(c);
        } else {
            // `\n`, `\r`, `\t` by name; every other one as `\u{1b}`.
            out.extend(c.escape_debug());
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_megabyte_error_with_newlines_becomes_one_bounded_line() {
        let huge = "boom\r\nline two\n\tand more ".repeat(50_000);
        assert!(huge.len() > 1_000_000);
        let line = one_line(&huge);
        assert_eq!(line.chars().count(), MAX_LINE_CHARS);
        assert!(line.ends_with('…'));
        assert!(!line.contains(['\n', '\r', '\t']), "{line}");
        assert!(line.starts_with("boom line two and more boom"));
        assert_eq!(one_line(&line), line, "idempotent");
    }

    #[test]
    fn one_line_collapses_whitespace_escapes_controls_and_cuts_on_a_char_boundary() {
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        assert_eq!(one_line(""), "(empty)");
        assert_eq!(one_line(" \n "), "(empty)");
        assert_eq!(one_line("x\x1b]0;pwned\x07y"), "x\\u{1b}]0;pwned\\u{7}y");
        assert_eq!(one_line("\u{202e}abc"), "\\u{202e}abc");
        let wide = "é".repeat(5_000);
        let line = one_line(&wide);
        assert_eq!(line.chars().count(), MAX_LINE_CHARS);
        assert_eq!(line, format!("{}…", "é".repeat(MAX_LINE_CHARS - 1)));
        let exact = "z".repeat(MAX_LINE_CHARS);
        assert_eq!(one_line(&exact), exact, "text at the bound is not cut");
        assert_eq!(one_line_bytes(b"bad \xff bytes"), "bad \u{fffd} bytes");
    }

    #[test]
    fn an_answer_printed_to_a_terminal_has_its_escape_sequences_escaped() {
        let answer = "hello\x1b]0;pwned\x07\r\nworld\x1b[2J\rover\u{9b}31m";
        assert_eq!(
            printable_lines(answer),
            "hello\\u{1b}]0;pwned\\u{7}\nworld\\u{1b}[2J\\rover\\u{9b}31m"
        );
        assert_eq!(
            printable(answer),
            "hello\\u{1b}]0;pwned\\u{7}\\r\\nworld\\u{1b}[2J\\rover\\u{9b}31m"
        );
        assert!(matches!(printable_lines("plain\ttext\n"), Cow::Borrowed(_)));
        assert_eq!(printable("tab\there"), "tab\\there");
    }
}
