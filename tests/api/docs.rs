//! The repository stands on its own: every relative link in its Markdown resolves to a file
//! inside it (a clone has nothing beside it).

use std::path::{Path, PathBuf};

/// The Markdown files a reader starts from, and every file under `docs/`.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "md") {
            files.push(entry.path());
        }
    }
    files
}

/// The targets of `[text](target)` links, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).canonicalize().unwrap();
    let mut checked = 0;
    for file in markdown_files(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with('#') || link.starts_with("mailto:") {
                continue;
            }
            let target = link.split('#').next().unwrap();
            let resolved = file.parent().unwrap().join(target);
            let resolved = resolved
                .canonicalize()
                .unwrap_or_else(|_| panic!("{}: the link `{link}` names no file", file.display()));
            assert!(resolved.starts_with(&root), "{}: `{link}` points outside the repository", file.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "the README links to the API reference and more: {checked} links checked");
}

#[test]
fn the_link_finder_sees_links_and_skips_code() {
    let text = "see [a](docs/a.md) and [b](../b.md#x)\n```\n[c](nope.md)\n```\n[d](https://x.example)";
    assert_eq!(links(text), ["docs/a.md", "../b.md#x", "https://x.example"]);
}
