//! The house rules that the compiler does not check, checked on the source tree: no file in
//! src/ over 800 lines, no import circle between modules, and the one-way flow of lib.rs
//! (`schedule` and `config` never import candle; `model` never imports `schedule`; `engine` and
//! `pipeline` write no files).
//!
//! An import is a `crate::a::b` or `super::...` path in a file's code outside its
//! `#[cfg(test)]` module. Modules are files (`a/b.rs` and `a/b/mod.rs` are `a::b`). A circle is
//! two or more modules, none inside another, that reach each other through imports; a child
//! using its parent (`super::`) is the tree itself, not a circle, and is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` -> ["a", "b"]; `src/lib.rs` and `src/main.rs` -> [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The file's code without its `#[cfg(test)]` modules (tests may use anything).
fn code_without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let mut depth = 0i32;
            let mut opened = false;
            for inner in lines.by_ref() {
                depth += inner.matches('{').count() as i32 - inner.matches('}').count() as i32;
                opened |= inner.contains('{');
                if opened && depth <= 0 {
                    break;
                }
                if !opened && inner.trim_end().ends_with(';') {
                    break;
                }
            }
            continue;
        }
        // Doc and line comments name modules without importing them.
        let code = line.split("//").next().unwrap_or("");
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand_braces(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else {
        return vec![path.to_string()];
    };
    let (head, inner) = (&path[..open], &path[open + 1..]);
    let inner = inner.strip_suffix('}').unwrap_or(inner);
    // Split the group at its top-level commas.
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .flat_map(|item| expand_braces(&format!("{head}{item}")))
        .collect()
}

/// The modules (as known paths) that `code` of module `this` refers to.
fn imports(code: &str, this: &[String], known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    // Brace groups as one word: `super::{a, b}` -> `super::{a,b}` (also over lines).
    let mut compact = String::with_capacity(code.len());
    let mut last = ' ';
    for c in code.chars() {
        if c.is_whitespace() && matches!(last, '{' | ',') {
            continue;
        }
        if c == '}' {
            while compact.ends_with(char::is_whitespace) {
                compact.pop();
            }
        }
        compact.push(c);
        if !c.is_whitespace() {
            last = c;
        }
    }
    let code = compact;
    let mut paths = Vec::new();
    for word in code.split(|c: char| !(c.is_alphanumeric() || "_:{},".contains(c))) {
        let word = word.trim_end_matches(',');
        for start in ["crate::", "super::"] {
            if let Some(at) = word.find(start) {
                paths.extend(expand_braces(&word[at..]));
                break;
            }
        }
    }
    for path in paths {
        let (mut base, mut rest): (Vec<String>, &str) = match path.strip_prefix("crate::") {
            Some(rest) => (Vec::new(), rest),
            // In `a/b.rs` and in `a/b/mod.rs` alike (module a::b), `super` is `a`.
            None => (this.to_vec(), path.as_str()),
        };
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        for part in rest.split("::") {
            let mut candidate = base.clone();
            candidate.push(part.trim_matches(|c| c == '{' || c == '}' || c == ',').to_string());
            if known.contains(&candidate) {
                base = candidate;
            } else {
                break;
            }
        }
        if !base.is_empty() && base != this {
            found.insert(base);
        }
    }
    found
}

/// Whether `a` is `b` or inside it.
fn within(a: &[String], b: &[String]) -> bool {
    a.len() >= b.len() && a[..b.len()] == *b
}

struct Tree {
    files: BTreeMap<Vec<String>, (PathBuf, String)>,
}

fn tree() -> Tree {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let files = files
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "main.rs"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (module_of(&src, &f), (f, text))
        })
        .collect();
    Tree { files }
}

#[test]
fn no_file_in_src_is_over_800_lines() {
    let tree = tree();
    let long: Vec<String> = tree
        .files
        .values()
        .filter(|(_, text)| text.lines().count() > MAX_LINES)
        .map(|(path, text)| format!("{} ({} lines)", path.display(), text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "split these files (at most {MAX_LINES} lines): {long:?}"
    );
}

#[test]
fn no_import_circle_between_modules() {
    let tree = tree();
    let known: BTreeSet<Vec<String>> = tree.files.keys().cloned().collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, (_, text)) in &tree.files {
        let targets = imports(&code_without_tests(text), module, &known);
        // A child using its parent, or a parent its child, is the module tree, not a circle.
        let targets = targets
            .into_iter()
            .filter(|t| !within(module, t) && !within(t, module))
            .collect();
        edges.insert(module.clone(), targets);
    }
    // The same at the top level (`engine`, `model`, ...): lib.rs's one-way flow.
    let mut top: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, targets) in &edges {
        for to in targets {
            if let (Some(a), Some(b)) = (from.first(), to.first()) {
                if a != b {
                    top.entry(vec![a.clone()]).or_default().insert(vec![b.clone()]);
                }
            }
        }
    }
    let mut circles = find_circles(&edges);
    circles.extend(find_circles(&top));
    assert!(circles.is_empty(), "import circles: {circles:#?}");
}

/// Every path that leads from a module back to itself.
fn find_circles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<String> {
    // Depth-first search for a path back to the start, module by module.
    let mut circles = Vec::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    circles.push(path.iter().map(|m| m.join("::")).collect::<Vec<_>>().join(" -> "));
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    circles
}

#[test]
fn pure_data_modules_stay_pure_and_the_flow_is_one_way() {
    let tree = tree();
    for (module, (path, text)) in &tree.files {
        let code = code_without_tests(text);
        let top = module.first().map(String::as_str).unwrap_or("");
        if matches!(top, "schedule" | "config") {
            assert!(!code.contains("candle_core"), "{}: uses candle", path.display());
        }
        if top == "model" {
            assert!(
                !code.contains("crate::schedule"),
                "{}: model imports schedule",
                path.display()
            );
        }
        if matches!(top, "engine" | "pipeline") {
            for writer in ["std::fs::write", "File::create", "fs::create_dir"] {
                assert!(!code.contains(writer), "{}: writes files ({writer})", path.display());
            }
        }
    }
}
