//! docs/ARCHITECTURE.md's crate table is the truth about the workspace: every crate, what it
//! uses and what its tests also use, compared with `cargo metadata`; and no dependency cycle,
//! tests included (no crate's tests use a crate above it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

type Graph = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>;

fn names(cell: &str) -> BTreeSet<String> {
    cell.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The table between `<!-- crates:begin -->` and `<!-- crates:end -->`.
fn documented(text: &str) -> Graph {
    let begin = text
        .find("<!-- crates:begin -->")
        .expect("crates:begin marker");
    let end = text.find("<!-- crates:end -->").expect("crates:end marker");
    let mut graph = Graph::new();
    for line in text[begin..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
    {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "a table row has 4 cells: {line}");
        let old = graph.insert(cells[0].to_string(), (names(cells[2]), names(cells[3])));
        assert!(old.is_none(), "{} is in the table twice", cells[0]);
    }
    graph
}

/// The workspace as cargo sees it: each crate's workspace dependencies, normal and dev.
fn actual(root: &Path) -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let ours: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let mut graph = Graph::new();
    for p in packages {
        let (mut uses, mut dev) = (BTreeSet::new(), BTreeSet::new());
        for d in p["dependencies"].as_array().unwrap() {
            let name = d["name"].as_str().unwrap().to_string();
            if !ours.contains(&name) {
                continue;
            }
            match d["kind"].as_str() {
                Some("dev") => dev.insert(name),
                _ => uses.insert(name),
            };
        }
        // "its tests also use" lists only what the crate itself does not already use.
        let dev = dev.difference(&uses).cloned().collect();
        graph.insert(p["name"].as_str().unwrap().to_string(), (uses, dev));
    }
    graph
}

#[test]
fn the_documented_crate_graph_is_the_real_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let documented = documented(&doc);
    let actual = actual(&root);
    for (name, (uses, dev)) in &actual {
        let Some((doc_uses, doc_dev)) = documented.get(name) else {
            panic!("docs/ARCHITECTURE.md does not list the crate {name}");
        };
        assert_eq!(
            uses, doc_uses,
            "{name}: uses (cargo metadata vs docs/ARCHITECTURE.md)"
        );
        assert_eq!(
            dev, doc_dev,
            "{name}: its tests also use (cargo metadata vs docs)"
        );
    }
    for name in documented.keys() {
        assert!(
            actual.contains_key(name),
            "docs/ARCHITECTURE.md lists {name}, no such crate"
        );
    }
}

#[test]
fn dependencies_point_one_way_tests_included() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let graph = actual(&root);
    // Depth-first search for a cycle over normal and dev edges together.
    fn visit(n: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("dependency cycle: {} -> {n}", path[i..].join(" -> "));
        }
        path.push(n.to_string());
        if let Some((uses, dev)) = graph.get(n) {
            for d in uses.iter().chain(dev) {
                visit(d, graph, path, done);
            }
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn a_wrong_table_is_caught() {
    // The checker itself can fail: a table that drops an edge differs from the real graph.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    // kiln-qemu's row is the first to end in "| kiln-sys | |".
    let wrong = doc.replacen("| kiln-sys | |\n", "| | |\n", 1);
    assert_ne!(
        documented(&wrong),
        documented(&doc),
        "the edit must change the table"
    );
    let actual = actual(&root);
    let differs = documented(&wrong)
        .iter()
        .any(|(name, edges)| actual.get(name) != Some(edges));
    assert!(
        differs,
        "a table without kiln-qemu's edge to kiln-sys still matched"
    );
}
