//! Text a peer sent us (an abort reason, a refusal, a role name in the
//! summary, a decoder's echo of a bad field) is shown to operators in log
//! lines, errors, reports and terminals. [`escape`] is the one way it gets
//! there: control characters, line breaks, escape sequences and bidi
//! overrides become visible `\u{..}` escapes, and the length is capped, so a
//! peer cannot forge a log line, recolour or clear a terminal, or flood it.

use std::borrow::Cow;
use std::fmt::Write;

/// Most characters of one piece of peer text that are shown; the rest is
/// replaced by a count.
pub const MAX_SHOWN_CHARS: usize = 2048;

/// True for characters that change how the following text is shown rather
/// than showing themselves: C0/C1 controls (newline, ESC, the 8-bit CSI),
/// DEL, and the Unicode bidi embedding/override/isolate controls.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || c == '\\'
}

/// Makes peer-supplied text safe to print: unsafe characters become
/// `\n`, `\t`, `\r`, `\\` or `\u{XX}`, and text beyond [`MAX_SHOWN_CHARS`]
/// is cut with a note of how many bytes were left out. Borrows when the
/// text needs no change.
pub fn escape(text: &str) -> Cow<'_, str> {
    let too_long = text.chars().nth(MAX_SHOWN_CHARS).is_some();
    if !too_long && !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_SHOWN_CHARS * 2) + 16);
    for (shown, (i, c)) in text.char_indices().enumerate() {
        if shown == MAX_SHOWN_CHARS {
            let _ = write!(out, "… ({} more bytes)", text.len() - i);
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`escape`] in place, for a `String` field of a message that came from
/// the peer.
pub fn escape_in_place(text: &mut String) {
    if let Cow::Owned(s) = escape(text) {
        *text = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let t = "the destination ran out of memory: 12 pages (ümlaut ok)";
        assert!(matches!(escape(t), Cow::Borrowed(s) if s == t));
    }

    #[test]
    fn controls_newlines_and_escapes_become_visible() {
        let t = "ok\n[ERROR] forged line\x1b[2J\x1b]0;title\x07\u{9b}31m\u{202e}evil\r\\";
        let e = escape(t);
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        assert!(!e.contains('\u{202e}'), "{e:?}");
        assert_eq!(
            e,
            "ok\\n[ERROR] forged line\\u{1b}[2J\\u{1b}]0;title\\u{7}\\u{9b}31m\\u{202e}evil\\r\\\\"
        );
    }

    #[test]
    fn long_text_is_cut_with_a_count() {
        let t = "a".repeat(MAX_SHOWN_CHARS + 500);
        let e = escape(&t);
        assert!(e.starts_with(&"a".repeat(MAX_SHOWN_CHARS)));
        assert!(e.ends_with("… (500 more bytes)"), "{}", &e[e.len() - 40..]);
    }

    #[test]
    fn in_place_escapes() {
        let mut s = String::from("a\nb");
        escape_in_place(&mut s);
        assert_eq!(s, "a\\nb");
    }
}
