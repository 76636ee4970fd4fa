//! The parts of A1111's prompt language that sdfix does not run yet, found so a front end can
//! warn once: prompt editing `[from:to:when]` (`[to:when]`, `[from::when]`), alternation
//! `[a|b]` (both from `modules/prompt_parser.py`'s lark grammar, `scheduled` and `alternate`)
//! and composable prompts `a AND b` (`get_multicond_prompt_list`, split on `\bAND\b`). They stay
//! in the prompt as literal text, which [`super::parse_attention`] reads as any other text.

/// What kind of unsupported syntax was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// `[from:to:when]`, `[to:when]`, `[from::when]`.
    PromptEditing,
    /// `[a|b|...]`.
    Alternation,
    /// `a AND b` (composable diffusion).
    Composition,
}

impl Unsupported {
    fn describe(self) -> &'static str {
        match self {
            Self::PromptEditing => "prompt editing",
            Self::Alternation => "alternation",
            Self::Composition => "AND (composable prompts)",
        }
    }
}

/// One place where the prompt uses unsupported syntax, and its text as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedSyntax {
    pub kind: Unsupported,
    pub text: String,
}

/// Whether `text` ends with lark's `":" [WHITESPACE] NUMBER [WHITESPACE]` (A1111 imports
/// `common.SIGNED_NUMBER` as `NUMBER`: `1`, `0.5`, `.5`, `-2`, `1e3`).
fn ends_with_schedule_number(text: &str) -> bool {
    let Some(colon) = text.rfind(':') else {
        return false;
    };
    let number = text[colon + 1..].trim();
    let unsigned = number.strip_prefix(['+', '-']).unwrap_or(number);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(e) => (&unsigned[..e], Some(&unsigned[e + 1..])),
        None => (unsigned, None),
    };
    let digits_and_one_dot = mantissa.chars().any(|c| c.is_ascii_digit())
        && mantissa.chars().all(|c| c.is_ascii_digit() || c == '.')
        && mantissa.matches('.').count() <= 1;
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    digits_and_one_dot && exponent_ok
}

/// What the content of one `[...]` group, with its nested groups blanked out, says.
fn classify_square_group(top_level: &str) -> Option<Unsupported> {
    if top_level.contains('|') {
        Some(Unsupported::Alternation)
    } else if ends_with_schedule_number(top_level) {
        Some(Unsupported::PromptEditing)
    } else {
        None
    }
}

/// The `[...]` groups that are prompt editing or alternation (grammar escapes `\x` skipped,
/// `:` and `|` inside nested brackets not counted), innermost first.
fn square_groups(prompt: &str) -> Vec<UnsupportedSyntax> {
    let mut found = Vec::new();
    // For each open bracket: where it opened, whether it is `[`, and its content so far with
    // nested groups left out.
    let mut open: Vec<(usize, bool, String)> = Vec::new();
    let mut chars = prompt.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
                if let Some((_, _, content)) = open.last_mut() {
                    content.push('x');
                }
            }
            '[' | '(' => open.push((at, c == '[', String::new())),
            ']' | ')' => {
                // A closer that does not match the innermost opener is text for the warning.
                if open.last().is_some_and(|(_, square, _)| *square == (c == ']')) {
                    let (start, square, content) = open.pop().unwrap_or_default();
                    if square {
                        if let Some(kind) = classify_square_group(&content) {
                            found.push(UnsupportedSyntax {
                                kind,
                                text: prompt[start..at + 1].to_string(),
                            });
                        }
                    }
                    if let Some((_, _, outer)) = open.last_mut() {
                        outer.push('x');
                    }
                }
            }
            _ => {
                if let Some((_, _, content)) = open.last_mut() {
                    content.push(c);
                }
            }
        }
    }
    found
}

/// The whole words `AND` (A1111's `re_AND = \bAND\b`) with a word on each side.
fn and_words(prompt: &str) -> Vec<UnsupportedSyntax> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    prompt
        .match_indices("AND")
        .filter(|&(at, _)| {
            !prompt[..at].chars().next_back().is_some_and(is_word)
                && !prompt[at + 3..].chars().next().is_some_and(is_word)
        })
        .map(|_| UnsupportedSyntax {
            kind: Unsupported::Composition,
            text: "AND".into(),
        })
        .collect()
}

/// Every use of syntax sdfix keeps as text, in the order: editing and alternation groups,
/// then `AND`s.
pub fn find_unsupported(prompt: &str) -> Vec<UnsupportedSyntax> {
    let mut found = square_groups(prompt);
    found.extend(and_words(prompt));
    found
}

/// One line for the user naming what was seen (the first example of each kind) and that it is
/// kept as text; `None` when the prompt uses none of it.
pub fn unsupported_warning(prompt: &str) -> Option<String> {
    let found = find_unsupported(prompt);
    let mut seen = Vec::new();
    for kind in [
        Unsupported::PromptEditing,
        Unsupported::Alternation,
        Unsupported::Composition,
    ] {
        if let Some(first) = found.iter().find(|f| f.kind == kind) {
            seen.push(match kind {
                Unsupported::Composition => kind.describe().to_string(),
                _ => format!("{} {}", kind.describe(), first.text),
            });
        }
    }
    (!seen.is_empty()).then(|| {
        format!(
            "the prompt uses {}, which sdfix does not support yet: kept as literal text",
            seen.join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(prompt: &str) -> Vec<(Unsupported, String)> {
        find_unsupported(prompt).into_iter().map(|f| (f.kind, f.text)).collect()
    }

    #[test]
    fn finds_editing_alternation_and_composition() {
        use Unsupported::*;
        assert_eq!(kinds("a [cat:dog:0.5] b"), [(PromptEditing, "[cat:dog:0.5]".into())]);
        assert_eq!(kinds("[cat:10]"), [(PromptEditing, "[cat:10]".into())]);
        assert_eq!(kinds("[cat::.5 ]"), [(PromptEditing, "[cat::.5 ]".into())]);
        // A1111's scheduler reads `[cat:1.3]` as editing before emphasis ever sees it.
        assert_eq!(kinds("[cat:1.3]"), [(PromptEditing, "[cat:1.3]".into())]);
        assert_eq!(kinds("[red|blue] car"), [(Alternation, "[red|blue]".into())]);
        assert_eq!(kinds("[fe|]male"), [(Alternation, "[fe|]".into())]);
        assert_eq!(
            kinds("[a (b:1.2) : c : 3]"),
            [(PromptEditing, "[a (b:1.2) : c : 3]".into())]
        );
        assert_eq!(kinds("a cat AND a dog"), [(Composition, "AND".into())]);
    }

    #[test]
    fn plain_emphasis_is_not_flagged() {
        for prompt in [
            "(a:1.2) [b] ((c))",
            "[a (b:1.2)]",
            "[a:b]",
            r"\[a:1\]",
            "ANDROID and",
            "[a|b",
        ] {
            assert!(find_unsupported(prompt).is_empty(), "{prompt}");
            assert_eq!(unsupported_warning(prompt), None);
        }
    }

    #[test]
    fn the_warning_names_what_was_seen() {
        let warning = unsupported_warning("[a:b:3] [c|d] [e|f] x AND y").unwrap();
        assert_eq!(
            warning,
            "the prompt uses prompt editing [a:b:3] and alternation [c|d] and AND (composable prompts), \
             which sdfix does not support yet: kept as literal text"
        );
    }
}
