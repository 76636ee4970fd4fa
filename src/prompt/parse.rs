//! The emphasis syntax of a prompt: which text gets which weight.
//!
//! [`parse_attention`] is AUTOMATIC1111's `modules/prompt_parser.py` `parse_prompt_attention`,
//! behaviour for behaviour: `(a)` x1.1, `[a]` /1.1, `(a:1.3)`; the multipliers of nested brackets
//! are applied in place, left to right, in f64 (so `(((house:1.3)))` is 1.5730000000000004, not
//! 1.573); escapes `\( \) \[ \] \\`; brackets left open multiply to the end; runs of exactly equal
//! weight merged; `BREAK` (whole word, upper case) becomes the marker `("BREAK", -1)` that starts
//! a new chunk. Its quirks are kept on purpose: inside brackets the marker's weight is multiplied
//! too (`(a BREAK b)` gives `("BREAK", -1.1)`), so it no longer counts as a break and the word
//! is encoded as text; a lone `\` is dropped; an unmatched `)`, `]` or `:` is text.
//!
//! [`parse_comfy`] is ComfyUI's `comfy/sd1_clip.py` `token_weights` for `--emphasis comfy`: only
//! `()` weighs (x1.1 a level), an inner `(x:w)` replaces the weight instead of multiplying it
//! (`((a:1.3))` is 1.3, against A1111's 1.43), `[...]` is text, `\(` and `\)` escape.

use anyhow::{bail, Result};

/// What `(text)` multiplies by (A1111's `round_bracket_multiplier`, ComfyUI's nesting step).
pub const ROUND_MULTIPLIER: f64 = 1.1;
/// What `[text]` multiplies by (A1111's `square_bracket_multiplier`).
pub const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;
/// The word that ends a chunk, and the text of its marker fragment.
pub const BREAK_WORD: &str = "BREAK";
/// The weight of the marker fragment: A1111's `["BREAK", -1]`.
pub const BREAK_WEIGHT: f64 = -1.0;

/// A piece of prompt text and the weight of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    pub text: String,
    pub weight: f64,
}

impl Fragment {
    pub fn new(text: impl Into<String>, weight: f64) -> Self {
        Self {
            text: text.into(),
            weight,
        }
    }

    /// Whether this is a chunk break: A1111's `tokenize_line` tests `text == 'BREAK' and
    /// weight == -1`, so a marker whose weight a bracket changed is plain text again.
    pub fn is_break(&self) -> bool {
        self.text == BREAK_WORD && self.weight == BREAK_WEIGHT
    }
}

/// Python's `\s` on `str`: Unicode whitespace, plus the four separators `\x1c`..`\x1f` that
/// `str.isspace` counts and Rust's `char::is_whitespace` does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `\w` on `str` (for `\b`): letters, digits and the underscore.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One match of A1111's `re_attention`, in the regex's order of alternatives.
#[derive(Debug, PartialEq)]
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\`: the character after the backslash; a lone `\`: nothing.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:\s*([+-]?[.\d]+)\s*\)`: the number as written (digits are ASCII here; Python's `\d`
    /// would also take other scripts' decimal digits).
    WeightClose(&'a str),
    CloseRound,
    CloseSquare,
    /// `[^\\()\[\]:]+`, or a `:` that does not start a weight-close.
    Text,
}

/// The weight-close at the start of `rest` (which starts with `:`): its length and number.
fn weight_close(rest: &str) -> Option<(usize, &str)> {
    let bytes = rest.as_bytes();
    let skip_spaces = |mut at: usize| {
        while let Some(c) = rest[at..].chars().next().filter(|&c| is_python_space(c)) {
            at += c.len_utf8();
        }
        at
    };
    let number_start = skip_spaces(1);
    let mut at = number_start;
    if matches!(bytes.get(at), Some(b'+' | b'-')) {
        at += 1;
    }
    let digits_start = at;
    while matches!(bytes.get(at), Some(b'.' | b'0'..=b'9')) {
        at += 1;
    }
    if at == digits_start {
        return None;
    }
    let number_end = at;
    let at = skip_spaces(at);
    (bytes.get(at) == Some(&b')')).then(|| (at + 1, &rest[number_start..number_end]))
}

/// Splits `text` into A1111's `re_attention` matches, each with the text it matched.
fn lex(text: &str) -> Vec<(Lexeme<'_>, &str)> {
    let mut lexemes = Vec::new();
    let mut at = 0;
    while let Some(c) = text[at..].chars().next() {
        let rest = &text[at..];
        let (lexeme, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some(next @ ('(' | ')' | '[' | ']' | '\\')) => (Lexeme::Escaped(&rest[1..2]), 1 + next.len_utf8()),
                _ => (Lexeme::Escaped(""), 1),
            },
            '(' => (Lexeme::OpenRound, 1),
            '[' => (Lexeme::OpenSquare, 1),
            ':' => match weight_close(rest) {
                Some((len, number)) => (Lexeme::WeightClose(number), len),
                None => (Lexeme::Text, 1),
            },
            ')' => (Lexeme::CloseRound, 1),
            ']' => (Lexeme::CloseSquare, 1),
            _ => {
                let len = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                (Lexeme::Text, len)
            }
        };
        lexemes.push((lexeme, &rest[..len]));
        at += len;
    }
    lexemes
}

/// The `BREAK` at byte `at` of `text`, if it is a whole word (`\bBREAK\b`).
fn is_break_word_at(text: &str, at: usize) -> bool {
    text[at..].starts_with(BREAK_WORD)
        && !text[..at].chars().next_back().is_some_and(is_word_char)
        && !text[at + BREAK_WORD.len()..].chars().next().is_some_and(is_word_char)
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the parts between the breaks, whose surrounding
/// whitespace the split eats.
pub(crate) fn split_on_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK_WORD) {
        let word = search + found;
        if !is_break_word_at(text, word) {
            search = word + BREAK_WORD.len();
            continue;
        }
        // The match starts where the whitespace before the word starts (not before the
        // previous match's end) and runs over the whitespace after it.
        let before = &text[part_start..word];
        let match_start = part_start + before.trim_end_matches(is_python_space).len();
        let after = &text[word + BREAK_WORD.len()..];
        let match_end = text.len() - after.trim_start_matches(is_python_space).len();
        parts.push(&text[part_start..match_start]);
        part_start = match_end;
        search = match_end;
    }
    parts.push(&text[part_start..]);
    parts
}

/// Appends `text` split on `BREAK`, with a break marker between the parts (A1111's `else` arm).
fn push_text(fragments: &mut Vec<Fragment>, text: &str) {
    for (i, part) in split_on_break(text).into_iter().enumerate() {
        if i > 0 {
            fragments.push(Fragment::new(BREAK_WORD, BREAK_WEIGHT));
        }
        fragments.push(Fragment::new(part, 1.0));
    }
}

/// Python's `float()` of a weight the regex matched (`[+-]?[.\d]+`), which can still be no
/// number (`(a:1.2.3)`): A1111 then fails the whole generation, and so do we, with its name.
fn parse_weight(number: &str) -> Result<f64> {
    match number.parse::<f64>() {
        Ok(weight) => Ok(weight),
        Err(_) => bail!("the emphasis weight {number:?} in the prompt is not a number (write e.g. (word:1.2))"),
    }
}

/// Multiplies the weight of every fragment from `start` on, in place (A1111's `multiply_range`).
fn multiply_from(fragments: &mut [Fragment], start: usize, multiplier: f64) {
    for fragment in &mut fragments[start..] {
        fragment.weight *= multiplier;
    }
}

/// Joins neighbours whose weights are exactly equal ("merge runs of identical weights").
fn merge_equal_weights(fragments: Vec<Fragment>) -> Vec<Fragment> {
    let mut merged: Vec<Fragment> = Vec::with_capacity(fragments.len());
    for fragment in fragments {
        match merged.last_mut() {
            Some(last) if last.weight == fragment.weight => last.text.push_str(&fragment.text),
            _ => merged.push(fragment),
        }
    }
    merged
}

/// A1111's `parse_prompt_attention`: the prompt as fragments with their weights, break markers
/// included; the empty prompt is `[("", 1.0)]`. Fails only on a weight that is no number.
pub fn parse_attention(prompt: &str) -> Result<Vec<Fragment>> {
    let mut fragments = Vec::new();
    let mut round_opened = Vec::new();
    let mut square_opened = Vec::new();
    for (lexeme, matched) in lex(prompt) {
        // A closer with nothing open, or a weight-close with no `(` open, is text as written.
        let opened = match lexeme {
            Lexeme::Escaped(text) => {
                fragments.push(Fragment::new(text, 1.0));
                continue;
            }
            Lexeme::OpenRound => {
                round_opened.push(fragments.len());
                continue;
            }
            Lexeme::OpenSquare => {
                square_opened.push(fragments.len());
                continue;
            }
            Lexeme::WeightClose(number) => round_opened.pop().map(|start| (start, parse_weight(number))),
            Lexeme::CloseRound => round_opened.pop().map(|start| (start, Ok(ROUND_MULTIPLIER))),
            Lexeme::CloseSquare => square_opened.pop().map(|start| (start, Ok(SQUARE_MULTIPLIER))),
            Lexeme::Text => None,
        };
        match opened {
            Some((start, multiplier)) => multiply_from(&mut fragments, start, multiplier?),
            None => push_text(&mut fragments, matched),
        }
    }
    for start in round_opened {
        multiply_from(&mut fragments, start, ROUND_MULTIPLIER);
    }
    for start in square_opened {
        multiply_from(&mut fragments, start, SQUARE_MULTIPLIER);
    }
    if fragments.is_empty() {
        fragments.push(Fragment::new("", 1.0));
    }
    Ok(merge_equal_weights(fragments))
}

/// One character of a prompt after ComfyUI's `escape_important`: `\(` and `\)` become
/// characters that no longer open or close a group.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ComfyChar {
    Plain(char),
    Escaped(char),
}

impl ComfyChar {
    fn char(self) -> char {
        match self {
            Self::Plain(c) | Self::Escaped(c) => c,
        }
    }
}

fn comfy_escape(prompt: &str) -> Vec<ComfyChar> {
    let mut chars = Vec::with_capacity(prompt.len());
    let mut iter = prompt.chars().peekable();
    while let Some(c) = iter.next() {
        match (c, iter.peek()) {
            ('\\', Some(&next @ ('(' | ')'))) => {
                chars.push(ComfyChar::Escaped(next));
                iter.next();
            }
            _ => chars.push(ComfyChar::Plain(c)),
        }
    }
    chars
}

/// ComfyUI's `parse_parentheses`: the top-level groups `( ... )` and the text between them.
fn comfy_groups(chars: &[ComfyChar]) -> Vec<&[ComfyChar]> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut depth: i64 = 0;
    for (i, c) in chars.iter().enumerate() {
        match c {
            ComfyChar::Plain('(') => {
                if depth == 0 && i > start {
                    groups.push(&chars[start..i]);
                    start = i;
                }
                depth += 1;
            }
            ComfyChar::Plain(')') => {
                depth -= 1;
                if depth == 0 {
                    groups.push(&chars[start..=i]);
                    start = i + 1;
                }
            }
            _ => {}
        }
    }
    if start < chars.len() {
        groups.push(&chars[start..]);
    }
    groups
}

/// Python's `float()` for ComfyUI's `(x:w)`: surrounding whitespace allowed, `inf` and `nan`
/// read; anything else that is no number leaves the `:` in the text. (Python's `1_0` is not
/// read here.)
fn comfy_weight(chars: &[ComfyChar]) -> Option<f64> {
    if chars.iter().any(|c| matches!(c, ComfyChar::Escaped(_))) {
        return None;
    }
    let text: String = chars.iter().map(|c| c.char()).collect();
    text.trim_matches(is_python_space).parse().ok()
}

fn comfy_text(chars: &[ComfyChar]) -> String {
    chars.iter().map(|c| c.char()).collect()
}

/// ComfyUI's `token_weights`, recursively; `top_level` text is also split on `BREAK`.
fn comfy_token_weights(chars: &[ComfyChar], weight: f64, top_level: bool, out: &mut Vec<Fragment>) {
    for group in comfy_groups(chars) {
        let is_group = group.len() >= 2
            && group.first() == Some(&ComfyChar::Plain('('))
            && group.last() == Some(&ComfyChar::Plain(')'));
        if !is_group {
            if top_level {
                push_text(out, &comfy_text(group));
            } else {
                out.push(Fragment::new(comfy_text(group), weight));
            }
            continue;
        }
        let mut inner = &group[1..group.len() - 1];
        let mut inner_weight = weight * ROUND_MULTIPLIER;
        let colon = inner.iter().rposition(|&c| c == ComfyChar::Plain(':'));
        if let Some(colon) = colon.filter(|&i| i > 0) {
            if let Some(explicit) = comfy_weight(&inner[colon + 1..]) {
                inner_weight = explicit;
                inner = &inner[..colon];
            }
        }
        comfy_token_weights(inner, inner_weight, false, out);
    }
}

/// ComfyUI's weights (`comfy/sd1_clip.py` `token_weights`), for `--emphasis comfy`. Neighbours
/// are not merged (ComfyUI tokenizes each group apart); empty texts are dropped; `BREAK` outside
/// parentheses still starts a chunk, as A1111's does (ComfyUI has no `BREAK`).
pub fn parse_comfy(prompt: &str) -> Vec<Fragment> {
    let mut fragments = Vec::new();
    comfy_token_weights(&comfy_escape(prompt), 1.0, true, &mut fragments);
    fragments.retain(|f| !f.text.is_empty());
    if fragments.is_empty() {
        fragments.push(Fragment::new("", 1.0));
    }
    fragments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(prompt: &str) -> Vec<(String, f64)> {
        parse_attention(prompt)
            .unwrap()
            .into_iter()
            .map(|f| (f.text, f.weight))
            .collect()
    }

    fn pairs(expected: &[(&str, f64)]) -> Vec<(String, f64)> {
        expected.iter().map(|&(t, w)| (t.to_string(), w)).collect()
    }

    /// The vectors of `parse_prompt_attention`'s doctest, bit for bit.
    #[test]
    fn a1111_doctest_vectors() {
        assert_eq!(parsed("normal text"), pairs(&[("normal text", 1.0)]));
        assert_eq!(
            parsed("an (important) word"),
            pairs(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parsed("(unbalanced"), pairs(&[("unbalanced", 1.1)]));
        assert_eq!(parsed(r"\(literal\]"), pairs(&[("(literal]", 1.0)]));
        assert_eq!(parsed("(unnecessary)(parens)"), pairs(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pairs(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn the_spec_quirks() {
        assert_eq!(parsed("(cat: 1.3 )"), pairs(&[("cat", 1.3)]));
        assert_eq!(parsed("[cat:1.3]"), pairs(&[("cat:1.3", 1.0 / 1.1)]));
        assert_eq!(parsed("((a)"), pairs(&[("a", 1.1 * 1.1)]));
        assert_eq!(parsed("(a:0)"), pairs(&[("a", 0.0)]));
        assert_eq!(parsed("(a:-1)"), pairs(&[("a", -1.0)]));
        assert_eq!(parsed("((a:1.3))"), pairs(&[("a", 1.3 * 1.1)]));
        assert_eq!(parsed("((a:1.3))")[0].1, 1.4300000000000002);
        assert_eq!(parsed(""), pairs(&[("", 1.0)]));
    }

    #[test]
    fn break_splits_and_eats_its_whitespace() {
        assert_eq!(parsed("a BREAK b"), pairs(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]));
        assert_eq!(parsed("BREAK a"), pairs(&[("", 1.0), ("BREAK", -1.0), ("a", 1.0)]));
        assert_eq!(parsed("a BREAK"), pairs(&[("a", 1.0), ("BREAK", -1.0), ("", 1.0)]));
        assert_eq!(
            parsed("a \t BREAK\n BREAK b"),
            pairs(&[("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(parsed("a,BREAK,b"), pairs(&[("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]));
        // Not whole words, or not upper case: text.
        for text in ["aBREAK b", "a BREAKs", "a BREAK_ b", "a Break b", "BREAKBREAK"] {
            assert_eq!(parsed(text), pairs(&[(text, 1.0)]), "{text}");
        }
        assert!(parse_attention("a BREAK b").unwrap()[1].is_break());
    }

    /// Inside brackets the marker's weight is multiplied too, so it is text again.
    #[test]
    fn break_inside_brackets_becomes_text() {
        let fragments = parse_attention("(a BREAK b)").unwrap();
        assert_eq!(
            fragments
                .iter()
                .map(|f| (f.text.as_str(), f.weight))
                .collect::<Vec<_>>(),
            [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
        );
        assert!(!fragments[1].is_break());
    }

    #[test]
    fn escapes_and_stray_characters() {
        assert_eq!(parsed(r"a \\ b"), pairs(&[(r"a \ b", 1.0)]));
        // A lone backslash matches the regex's `\\` alternative and leaves nothing.
        assert_eq!(parsed(r"a\b"), pairs(&[("ab", 1.0)]));
        assert_eq!(parsed(r"a\"), pairs(&[("a", 1.0)]));
        assert_eq!(parsed("a) b] c: d"), pairs(&[("a) b] c: d", 1.0)]));
        // A weight-close with no `(` open is text, spaces and all.
        assert_eq!(parsed("a :1.5 ) b"), pairs(&[("a :1.5 ) b", 1.0)]));
        assert_eq!(parsed("(a:1.5x)"), pairs(&[("a:1.5x", 1.1)]));
        assert_eq!(parsed("(a:+.5)"), pairs(&[("a", 0.5)]));
        assert_eq!(parsed("[(a:2)]"), pairs(&[("a", 2.0 * SQUARE_MULTIPLIER)]));
    }

    #[test]
    fn a_weight_that_is_no_number_names_itself() {
        let err = parse_attention("(a:1.2.3)").unwrap_err().to_string();
        assert!(err.contains("\"1.2.3\""), "{err}");
        assert!(parse_attention("(a:.)").is_err());
    }

    #[test]
    fn unicode_text_keeps_its_characters() {
        assert_eq!(parsed("(café:1.2) 猫"), pairs(&[("café", 1.2), (" 猫", 1.0)]));
        assert_eq!(
            parsed("é BREAK\u{3000}ü"),
            pairs(&[("é", 1.0), ("BREAK", -1.0), ("ü", 1.0)])
        );
    }

    fn comfy(prompt: &str) -> Vec<(String, f64)> {
        parse_comfy(prompt).into_iter().map(|f| (f.text, f.weight)).collect()
    }

    /// ComfyUI's rule, from the spec's run of `token_weights`.
    #[test]
    fn comfy_inner_weight_replaces_the_outer_one() {
        assert_eq!(comfy("((a:1.3))"), pairs(&[("a", 1.3)]));
        assert_eq!(comfy("(a (b:0.5))"), pairs(&[("a ", 1.1), ("b", 0.5)]));
        assert_eq!(comfy("((a))"), pairs(&[("a", 1.1 * 1.1)]));
        assert_eq!(comfy("[a] (b)"), pairs(&[("[a] ", 1.0), ("b", 1.1)]));
        assert_eq!(comfy(r"\(a\) (b: 2 )"), pairs(&[("(a) ", 1.0), ("b", 2.0)]));
        // No number after the last `:`: the `:` stays, the group weighs 1.1.
        assert_eq!(comfy("(a:b)"), pairs(&[("a:b", 1.1)]));
        // `:` first: no weight (ComfyUI tests `rfind(":") > 0`).
        assert_eq!(comfy("(:2)"), pairs(&[(":2", 1.1)]));
        assert_eq!(comfy("(a"), pairs(&[("(a", 1.0)]));
        assert_eq!(comfy(""), pairs(&[("", 1.0)]));
        assert_eq!(comfy("a BREAK (b BREAK c)"), {
            pairs(&[("a", 1.0), ("BREAK", -1.0), ("b BREAK c", 1.1)])
        });
    }
}
