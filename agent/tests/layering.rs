//! The agent's layering, enforced: data flows sources → state model → reconcilers → kernel,
//! and a module may import only modules of lower layers (ARCHITECTURE.md draws the same
//! table). Inside a folder, the files' imports must not form a cycle.
//!
//! Imports are read from the sources with `syn`: `use` trees, paths in code and `crate::…`
//! tokens inside macros, with `super::`/`self::` resolved and a folder's re-exports followed
//! to the file that defines the item.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Lowest first. A module may import modules of lower layers only: never its own layer's
/// other modules, never a higher one.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "constants, task and test helpers",
        &["constants", "task", "testlog"],
    ),
    ("foundation", &["metrics", "netns", "hostnet"]),
    ("who is who", &["identity"]),
    ("formats and rules", &["wire", "policy"]),
    ("kvstore client, state model", &["kvstore", "state"]),
    ("local source", &["k8s"]),
    ("mesh, publishing, health", &["mesh", "publish", "health"]),
    ("route reconciler", &["routing"]),
    ("reconcilers", &["datapath", "wireguard", "masquerade"]),
    ("configuration", &["config"]),
    ("status document", &["status"]),
    ("agent API", &["api"]),
    ("CNI plugin", &["cni"]),
    ("wiring", &["daemon", "error"]),
    ("command line", &["cli"]),
];

/// A module path inside the crate (`["kvstore", "client"]`).
type ModPath = Vec<String>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every source file of the library with the module path it defines.
fn library_files(dir: &Path, prefix: &ModPath, out: &mut Vec<(ModPath, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut p = prefix.clone();
            p.push(name);
            library_files(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match (prefix.is_empty(), name.as_str()) {
                // The binaries (agent, strait-cni) are clients of the library, not part of its
                // layering.
                (true, "main" | "cni_main") => continue,
                (true, "lib") | (false, "mod") => prefix.clone(),
                _ => {
                    let mut p = prefix.clone();
                    p.push(name);
                    p
                }
            };
            out.push((module, path));
        }
    }
}

/// Paths one file refers to, made absolute (`crate` stripped).
struct Refs {
    /// Module of the file plus the inline modules (`mod tests { … }`) being visited.
    scope: ModPath,
    found: BTreeSet<ModPath>,
}

impl Refs {
    fn add(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let mut base = match first.as_str() {
            "crate" => vec![],
            "self" => self.scope.clone(),
            "super" => {
                let mut b = self.scope.clone();
                let mut rest = segments;
                while rest.first().is_some_and(|s| s == "super") {
                    b.pop();
                    rest = &rest[1..];
                }
                b.extend(rest.iter().cloned());
                self.found.insert(b);
                return;
            }
            _ => return,
        };
        base.extend(segments[1..].iter().cloned());
        self.found.insert(base);
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.add(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.add(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.add(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.scope.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.scope.pop();
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut vec![], &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(&segments);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Macro bodies are tokens: pick out `crate :: a :: b` sequences.
        flat_crate_paths(&m.tokens, &mut |path| self.add(&path));
        syn::visit::visit_macro(self, m);
    }
}

fn flat_crate_paths(tokens: &proc_macro2::TokenStream, f: &mut impl FnMut(Vec<String>)) {
    let list: Vec<_> = tokens.clone().into_iter().collect();
    let mut i = 0;
    while i < list.len() {
        if let proc_macro2::TokenTree::Group(g) = &list[i] {
            flat_crate_paths(&g.stream(), f);
        }
        if matches!(&list[i], proc_macro2::TokenTree::Ident(id) if id == "crate") {
            let mut path = vec!["crate".to_string()];
            let mut j = i + 1;
            // `::` arrives as two `:` puncts.
            while j + 2 < list.len()
                && matches!(&list[j], proc_macro2::TokenTree::Punct(p) if p.as_char() == ':')
                && matches!(&list[j + 1], proc_macro2::TokenTree::Punct(p) if p.as_char() == ':')
            {
                match &list[j + 2] {
                    proc_macro2::TokenTree::Ident(id) => path.push(id.to_string()),
                    _ => break,
                }
                j += 3;
            }
            f(path);
            i = j;
            continue;
        }
        i += 1;
    }
}

struct Crate {
    /// Module → the absolute paths it refers to.
    refs: BTreeMap<ModPath, BTreeSet<ModPath>>,
    /// Every module that is a file (or folder).
    modules: BTreeSet<ModPath>,
    /// `folder::Item` re-exported from a file of the folder → that file's module.
    reexports: BTreeMap<ModPath, ModPath>,
}

fn read_crate() -> Crate {
    let mut files = vec![];
    library_files(&src_dir(), &vec![], &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut refs = BTreeMap::new();
    let mut reexports = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", path.display()));
        let mut r = Refs {
            scope: module.clone(),
            found: BTreeSet::new(),
        };
        r.visit_file(&ast);
        // A folder's `pub use child::Item` makes `folder::Item` an alias of the child's item.
        for item in &ast.items {
            if let syn::Item::Use(u) = item
                && matches!(u.vis, syn::Visibility::Public(_))
            {
                let mut names = Refs {
                    scope: module.clone(),
                    found: BTreeSet::new(),
                };
                names.use_tree(&mut vec!["self".into()], &u.tree);
                for target in names.found {
                    if target.len() > module.len() + 1 {
                        let mut alias = module.clone();
                        alias.push(target.last().unwrap().clone());
                        reexports.insert(alias, target[..module.len() + 1].to_vec());
                    }
                }
            }
        }
        refs.insert(module.clone(), r.found);
    }
    Crate {
        refs,
        modules,
        reexports,
    }
}

impl Crate {
    /// The file-level module a path lands in: the longest module prefix, with re-exports
    /// followed.
    fn resolve(&self, path: &ModPath) -> Option<ModPath> {
        for len in (1..=path.len()).rev() {
            let prefix = path[..len].to_vec();
            if len < path.len() {
                let mut alias = prefix.clone();
                alias.push(path[len].clone());
                if let Some(target) = self.reexports.get(&alias) {
                    return Some(target.clone());
                }
            }
            if self.modules.contains(&prefix) {
                return Some(prefix);
            }
        }
        None
    }

    /// Module → modules it imports, at file level.
    fn edges(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        self.refs
            .iter()
            .map(|(from, paths)| {
                let to = paths
                    .iter()
                    .filter_map(|p| self.resolve(p))
                    .filter(|t| t != from)
                    .collect();
                (from.clone(), to)
            })
            .collect()
    }
}

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

/// Imports from a lower layer's view: `from` may use `to` only when `to` sits lower.
fn layer_violations(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<String> {
    let mut out = vec![];
    for (from, tos) in edges {
        let Some(from_top) = from.first() else {
            continue; // lib.rs declares the modules
        };
        for to in tos {
            let Some(to_top) = to.first() else { continue };
            if from_top == to_top {
                continue;
            }
            let (Some(lf), Some(lt)) = (layer_of(from_top), layer_of(to_top)) else {
                continue; // unknown modules are reported by their own test
            };
            if lt >= lf {
                out.push(format!(
                    "{} (layer {:?}) imports {} (layer {:?})",
                    from.join("::"),
                    LAYERS[lf].0,
                    to.join("::"),
                    LAYERS[lt].0
                ));
            }
        }
    }
    out
}

/// Cycles among the files of one folder (the folder's own mod.rs, its facade, excluded).
fn folder_cycles(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<String> {
    // Depth-first search for back edges among siblings.
    fn visit(
        node: &ModPath,
        graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        stack: &mut Vec<ModPath>,
        done: &mut BTreeSet<ModPath>,
        out: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(pos) = stack.iter().position(|n| n == node) {
            let mut cycle: Vec<String> = stack[pos..].iter().map(|m| m.join("::")).collect();
            cycle.push(node.join("::"));
            out.push(cycle.join(" → "));
            return;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, stack, done, out);
        }
        stack.pop();
        done.insert(node.clone());
    }
    let siblings = |a: &ModPath, b: &ModPath| a.len() >= 2 && b.len() >= 2 && a[0] == b[0];
    let graph: BTreeMap<ModPath, BTreeSet<ModPath>> = edges
        .iter()
        .map(|(from, tos)| {
            // Compare at the level of the folder's direct children.
            let key = |m: &ModPath| m[..2.min(m.len())].to_vec();
            let tos = tos
                .iter()
                .filter(|t| siblings(from, t))
                .map(key)
                .filter(|t| *t != key(from))
                .collect();
            (key(from), tos)
        })
        .fold(
            BTreeMap::new(),
            |mut acc, (k, v): (ModPath, BTreeSet<ModPath>)| {
                acc.entry(k).or_insert_with(BTreeSet::new).extend(v);
                acc
            },
        );
    let mut out = vec![];
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut vec![], &mut done, &mut out);
    }
    out
}

#[test]
fn every_module_has_a_layer() {
    let krate = read_crate();
    let tops: BTreeSet<&String> = krate.modules.iter().filter_map(|m| m.first()).collect();
    let missing: Vec<_> = tops.iter().filter(|t| layer_of(t).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules without a layer in LAYERS (add them, and to ARCHITECTURE.md): {missing:?}"
    );
}

#[test]
fn modules_import_only_lower_layers() {
    let violations = layer_violations(&read_crate().edges());
    assert!(
        violations.is_empty(),
        "a module imports its own layer or a higher one:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn no_import_cycles_inside_a_folder() {
    let cycles = folder_cycles(&read_crate().edges());
    assert!(
        cycles.is_empty(),
        "import cycles between files of one folder:\n  {}",
        cycles.join("\n  ")
    );
}

/// The checks themselves: they see imports in every form and report what they must.
#[test]
fn the_checks_catch_what_they_should() {
    let parse = |module: &[&str], src: &str| {
        let mut r = Refs {
            scope: module.iter().map(|s| s.to_string()).collect(),
            found: BTreeSet::new(),
        };
        r.visit_file(&syn::parse_file(src).unwrap());
        r.found
    };
    let p = |s: &str| -> ModPath { s.split("::").map(str::to_string).collect() };
    let found = parse(
        &["kvstore", "client"],
        "use super::lease::Lease; use crate::{wire::{keys, json::x}, state};
         fn f() { crate::metrics::m(); tracing::info!(a = crate::constants::X); }
         mod tests { use super::super::listwatch::*; }",
    );
    for want in [
        "kvstore::lease::Lease",
        "wire::keys",
        "wire::json::x",
        "state",
        "metrics::m",
        "constants::X",
        "kvstore::listwatch",
    ] {
        assert!(found.contains(&p(want)), "{want} not seen in {found:?}");
    }

    let edges = |list: &[(&str, &str)]| {
        let mut g: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
        for (a, b) in list {
            g.entry(p(a)).or_default().insert(p(b));
        }
        g
    };
    // A lower layer importing a higher one, and two modules of one layer.
    let v = layer_violations(&edges(&[
        ("wire::keys", "mesh::sync"),
        ("datapath::lb", "wireguard"),
        ("mesh::sync", "wire::keys"),
    ]));
    assert_eq!(v.len(), 2, "{v:?}");
    // A cycle between two files of one folder; the facade mod.rs does not count.
    let c = folder_cycles(&edges(&[
        ("kvstore::client", "kvstore::lease"),
        ("kvstore::lease", "kvstore::client"),
    ]));
    assert_eq!(c.len(), 1, "{c:?}");
    let c = folder_cycles(&edges(&[
        ("kvstore", "kvstore::lease"),
        ("kvstore::lease", "kvstore"),
    ]));
    assert!(c.is_empty(), "{c:?}");
}
