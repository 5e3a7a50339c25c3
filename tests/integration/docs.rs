//! The docs agree with the code: every `meterflow …` command written in `docs/`, the READMEs
//! and `deploy/README.md` names a real subcommand and only flags its `--help` lists, and every
//! TOML example in `docs/` is a config file that `meterflow config` accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn markdown_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.extend(["README.md", "deploy/README.md"].map(|f| Path::new(ROOT).join(f)));
    files.sort();
    files
}

/// The `meterflow …` commands of a Markdown text: lines of code blocks and inline code spans.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let line = line.trim();
            if line.starts_with("meterflow ") {
                out.push(line.to_string());
            }
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && span.starts_with("meterflow ") {
                out.push(span.to_string());
            }
        }
    }
    out
}

/// `meterflow … --help` text, cached per subcommand path.
fn help(cache: &mut BTreeMap<Vec<String>, String>, path: &[String]) -> String {
    cache
        .entry(path.to_vec())
        .or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_meterflow"))
                .args(path)
                .arg("--help")
                .env_remove("MF_CONFIG")
                .output()
                .expect("meterflow runs");
            assert!(out.status.success(), "meterflow {path:?} --help");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .clone()
}

/// The subcommands listed in a `--help` text.
fn subcommands(help: &str) -> Vec<String> {
    help.split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_command_in_the_docs_is_one_the_binary_takes() {
    let mut cache = BTreeMap::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("readable");
        for command in commands(&text) {
            let words: Vec<&str> = command.split_whitespace().skip(1).collect();
            let mut path: Vec<String> = Vec::new();
            let mut flags = Vec::new();
            let mut i = 0;
            while i < words.len() {
                let word = words[i].trim_matches(|c| "[](),".contains(c));
                if let Some(flag) = word.strip_prefix("--") {
                    flags.push(flag.split('=').next().unwrap_or_default().to_string());
                } else if !word.starts_with('-')
                    && (i == 0
                        || !words[i - 1]
                            .trim_start_matches(['[', '('])
                            .starts_with("--")
                        || words[i - 1].contains('='))
                {
                    let here = help(&mut cache, &path);
                    if subcommands(&here).iter().any(|s| s == word) {
                        path.push(word.to_string());
                    } else if path.is_empty() {
                        // A placeholder (`meterflow SUBCOMMAND --help`) or prose.
                        assert!(
                            word.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                            "{}: `{command}`: no subcommand {word}",
                            file.display()
                        );
                        break;
                    }
                }
                i += 1;
            }
            let here = help(&mut cache, &path);
            for flag in flags {
                assert!(
                    flag == "help" || here.contains(&format!("--{flag}")),
                    "{}: `{command}`: `meterflow {}` has no --{flag}",
                    file.display(),
                    path.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} commands found in the docs");
}

#[test]
fn every_toml_example_in_the_docs_is_a_valid_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("readable");
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line.trim_start()) {
                (None, l) if l.starts_with("```toml") => block = Some(String::new()),
                (Some(toml), l) if l.starts_with("```") => {
                    let path = dir.path().join(format!("example-{checked}.toml"));
                    std::fs::write(&path, &*toml).expect("written");
                    let component = if toml.contains("[agent") {
                        "agent"
                    } else {
                        "processor"
                    };
                    let out = Command::new(env!("CARGO_BIN_EXE_meterflow"))
                        .arg("--config")
                        .arg(&path)
                        .args(["config", component])
                        .env_remove("MF_CONFIG")
                        .output()
                        .expect("meterflow runs");
                    assert!(
                        out.status.success(),
                        "{}: a TOML example is refused: {}\n{toml}",
                        file.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    checked += 1;
                    block = None;
                }
                (Some(toml), _) => {
                    toml.push_str(line);
                    toml.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    assert!(checked >= 4, "only {checked} TOML examples found");
}
