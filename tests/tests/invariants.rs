//! ARCHITECTURE.md's invariants, checked on the source: where storage may
//! be named, which modules decide without IO, who follows the registry's
//! change feed. A failure names the file and the line that broke one.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `.rs` file under `dir` (relative to the workspace root).
fn sources(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root().join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The lines of `file` that are code (not comments), with their numbers.
fn code_lines(file: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap().display().to_string()
}

/// Fails listing every code line of `files` that contains any of `needles`.
fn none_contain(files: &[PathBuf], needles: &[&str], rule: &str) {
    let mut broken = Vec::new();
    for f in files {
        for (n, line) in code_lines(f) {
            if needles.iter().any(|x| line.contains(x)) {
                broken.push(format!("{}:{n}: {}", rel(f), line.trim()));
            }
        }
    }
    assert!(broken.is_empty(), "{rule}:\n{}", broken.join("\n"));
}

/// Every crate of the workspace, by its folder: what the checks on all
/// sources read.
const CRATES: [&str; 11] = [
    "provisioning",
    "mqtt-core",
    "etcd",
    "bus",
    "mqtt",
    "http",
    "broker",
    "fleetgate-api",
    "firmware-sim",
    "tests",
    "faults",
];

#[test]
fn the_checks_read_every_crate_of_the_workspace() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members: Vec<&str> = manifest
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('"'))
        .map(|l| l.trim_end_matches(',').trim_matches('"'))
        .collect();
    let mut members = members;
    members.sort_unstable();
    let mut crates = CRATES.to_vec();
    crates.sort_unstable();
    assert_eq!(members, crates, "CRATES is not the workspace's members");
}

#[test]
fn only_the_sled_store_names_sled() {
    let allowed = [
        "provisioning/src/store/sled_store.rs",
        // Devices' MQTT sessions: one node's state, beside the registry.
        "provisioning/src/sessions.rs",
        // The one From<sled::Error> into provisioning::Error.
        "provisioning/src/error.rs",
    ];
    let files: Vec<PathBuf> = CRATES
        .iter()
        .flat_map(|c| sources(&format!("{c}/src")))
        .filter(|f| !allowed.contains(&rel(f).as_str()))
        .collect();
    none_contain(&files, &["sled::"], "sled named outside the sled store");
}

#[test]
fn decisions_do_no_io() {
    let pure = [
        "provisioning/src/lifecycle.rs",
        "provisioning/src/ocsp.rs",
        "provisioning/src/csr.rs",
        "mqtt-core/src/acl.rs",
        "mqtt-core/src/codec.rs",
        "mqtt-core/src/outbox.rs",
        "mqtt-core/src/acks.rs",
        "mqtt-core/src/quota.rs",
        "mqtt-core/src/stamp.rs",
    ]
    .map(|f| root().join(f));
    none_contain(
        &pure,
        &[
            "sled::",
            "std::fs",
            "tokio::net",
            "std::net::Tcp",
            "Registry",
            "spawn_blocking",
        ],
        "IO (or the registry) in a module that only decides",
    );
}

#[test]
fn only_the_events_follower_subscribes_to_the_registry() {
    let files: Vec<PathBuf> = ["broker/src", "mqtt/src", "http/src", "provisioning/src"]
        .iter()
        .flat_map(|d| sources(d))
        .filter(|f| {
            !matches!(
                rel(f).as_str(),
                "mqtt/src/events.rs"
                    | "provisioning/src/registry.rs"
                    | "provisioning/src/events.rs"
            )
        })
        .collect();
    none_contain(
        &files,
        &["registry.subscribe()", ".feed.subscribe()"],
        "the registry's change feed followed outside mqtt/src/events.rs",
    );
}

#[test]
fn the_fleet_simulator_does_not_link_the_server() {
    let manifest = std::fs::read_to_string(root().join("firmware-sim/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    assert!(
        deps.lines().any(|l| l.starts_with("fleetgate-api")),
        "firmware-sim should speak to fleetgate through fleetgate-api:\n{deps}"
    );
    for server in ["broker", "fleetgate-mqtt", "fleetgate-http"] {
        assert!(
            !deps.lines().any(|l| l.starts_with(server)),
            "firmware-sim links the server crate {server}:\n{deps}"
        );
    }
    let files: Vec<PathBuf> = sources("firmware-sim/src");
    none_contain(
        &files,
        &["broker::", "fleetgate_mqtt::", "fleetgate_http::"],
        "the server's code used by the fleet simulator",
    );
}

/// The module path of a source file under `src` (`mqtt/session.rs` is
/// `mqtt::session`; `mqtt/mod.rs` is `mqtt`; `lib.rs` is the crate).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every path a file names through `crate::` or `super::` (in `use`
/// declarations and in code), resolved to a module path from the crate
/// root, with its line.
fn crate_paths(module: &[String], file: &Path) -> Vec<(Vec<String>, usize)> {
    crate_paths_of(module, file, true)
}

/// [`crate_paths`], leaving out test code unless `with_tests`.
fn crate_paths_of(module: &[String], file: &Path, with_tests: bool) -> Vec<(Vec<String>, usize)> {
    paths_of(file, with_tests)
        .into_iter()
        .filter_map(|(segments, line)| {
            let mut rest = segments.as_slice();
            let mut at: Vec<String> = match rest.first().map(String::as_str) {
                Some("crate") => {
                    rest = &rest[1..];
                    Vec::new()
                }
                Some("super") => {
                    let mut at = module.to_vec();
                    while rest.first().map(String::as_str) == Some("super") {
                        at.pop();
                        rest = &rest[1..];
                    }
                    at
                }
                _ => return None,
            };
            at.extend(rest.iter().cloned());
            Some((at, line))
        })
        .collect()
}

#[test]
fn the_mqtt_front_names_nothing_of_the_http_front() {
    // By its dependencies: it cannot.
    let deps = dependencies("mqtt");
    for never in ["fleetgate-http", "broker", "axum", "hyper"] {
        assert!(
            !deps.iter().any(|d| d == never),
            "fleetgate-mqtt depends on {never}"
        );
    }
    // And by its sources (error codes are crate::wire's).
    let mut broken = Vec::new();
    for f in sources("mqtt/src") {
        for (path, line) in all_paths(&f) {
            // (A one-segment path is a local name, like a `broker`.)
            if path.len() > 1
                && matches!(
                    path.first().map(String::as_str),
                    Some("fleetgate_http" | "broker" | "axum" | "hyper")
                )
            {
                broken.push(format!("{}:{line}: {}", rel(&f), path.join("::")));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Every path a file names (in `use` declarations and in code), as
/// written, with its line.
fn all_paths(file: &Path) -> Vec<(Vec<String>, usize)> {
    paths_of(file, true)
}

/// [`all_paths`], leaving out test code unless `with_tests`.
fn paths_of(file: &Path, with_tests: bool) -> Vec<(Vec<String>, usize)> {
    use syn::visit::Visit;
    #[derive(Default)]
    struct Paths {
        out: Vec<(Vec<String>, usize)>,
    }
    impl Paths {
        fn tree(&mut self, prefix: Vec<String>, t: &syn::UseTree) {
            let mut leaf = |mut full: Vec<String>, ident: &syn::Ident| {
                full.push(ident.to_string());
                self.out.push((full, ident.span().start().line));
            };
            match t {
                syn::UseTree::Path(p) => {
                    let mut next = prefix;
                    next.push(p.ident.to_string());
                    self.tree(next, &p.tree);
                }
                syn::UseTree::Name(n) => leaf(prefix, &n.ident),
                syn::UseTree::Rename(r) => leaf(prefix, &r.ident),
                syn::UseTree::Glob(g) => {
                    self.out.push((prefix, g.star_token.spans[0].start().line))
                }
                syn::UseTree::Group(g) => {
                    for t in &g.items {
                        self.tree(prefix.clone(), t);
                    }
                }
            }
        }
    }
    impl<'ast> Visit<'ast> for Paths {
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            self.tree(Vec::new(), &u.tree);
        }
        fn visit_path(&mut self, p: &'ast syn::Path) {
            let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            let line = p
                .segments
                .first()
                .map_or(0, |s| s.ident.span().start().line);
            self.out.push((segments, line));
            syn::visit::visit_path(self, p);
        }
    }
    let text = std::fs::read_to_string(file).unwrap();
    let mut ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", rel(file)));
    if !with_tests {
        strip_tests(&mut ast.items);
    }
    let mut v = Paths::default();
    v.visit_file(&ast);
    v.out
}

/// Leaves out items marked `#[cfg(test)]`, at any depth of inline modules.
fn strip_tests(items: &mut Vec<syn::Item>) {
    let is_test = |attrs: &[syn::Attribute]| {
        attrs.iter().any(|a| {
            a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test")
        })
    };
    items.retain(|item| match item {
        syn::Item::Mod(m) => !is_test(&m.attrs),
        syn::Item::Fn(f) => !is_test(&f.attrs),
        syn::Item::Use(u) => !is_test(&u.attrs),
        syn::Item::Impl(i) => !is_test(&i.attrs),
        _ => true,
    });
    for item in items {
        if let syn::Item::Mod(syn::ItemMod {
            content: Some((_, inner)),
            ..
        }) = item
        {
            strip_tests(inner);
        }
    }
}

/// Which of a crate's top-level modules each names (outside its tests),
/// a name the crate root re-exports counted as its module's.
fn module_graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join(krate).join("src");
    let lib = src.join("lib.rs");
    // `pub use registry::{Registry, ...}` in lib.rs: Registry -> registry.
    let mut reexports = HashMap::new();
    for (path, _) in paths_of(&lib, false) {
        if path.len() == 2 {
            reexports.insert(path[1].clone(), path[0].clone());
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in sources(&format!("{krate}/src")) {
        let module = module_of(&src, &f);
        let Some(top) = module.first().cloned() else {
            continue;
        };
        if module.iter().any(|m| m == "tests") {
            continue;
        }
        for (path, _) in crate_paths_of(&module, &f, false) {
            let Some(first) = path.first() else { continue };
            let to = reexports.get(first).unwrap_or(first).clone();
            let is_module =
                src.join(format!("{to}.rs")).exists() || src.join(&to).join("mod.rs").exists();
            if to != top && is_module {
                graph.entry(top.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// Every cycle among a graph's nodes, each as a path back to its start
/// (one per strongly connected component).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn path_back(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        for next in graph.get(from).into_iter().flatten() {
            if next == to {
                return Some(vec![next.clone()]);
            }
            if seen.insert(next.clone()) {
                if let Some(mut rest) = path_back(graph, next, to, seen) {
                    rest.insert(0, next.clone());
                    return Some(rest);
                }
            }
        }
        None
    }
    let mut found: Vec<Vec<String>> = Vec::new();
    for start in graph.keys() {
        if found.iter().any(|c| c.contains(start)) {
            continue;
        }
        if let Some(mut cycle) = path_back(graph, start, start, &mut BTreeSet::new()) {
            cycle.insert(0, start.clone());
            found.push(cycle);
        }
    }
    found
}

#[test]
fn no_import_circles_between_modules() {
    let mut found = Vec::new();
    for krate in CRATES {
        for c in circles(&module_graph(krate)) {
            found.push(format!("{krate}: {}", c.join(" -> ")));
        }
    }
    assert!(
        found.is_empty(),
        "modules that name each other:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_circle_finder_sees_a_circle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("ca", &["registry"][..]),
        ("registry", &["manufacturer"]),
        ("manufacturer", &["ca"]),
        ("pem", &[]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
    .collect();
    assert_eq!(
        circles(&g),
        vec![vec!["ca", "registry", "manufacturer", "ca"]]
    );
    let mut acyclic = g.clone();
    acyclic.get_mut("manufacturer").unwrap().clear();
    assert!(circles(&acyclic).is_empty());
}

/// The dependencies a crate's Cargo.toml names under `[dependencies]`.
fn dependencies(krate: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[dependencies]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split(['.', '=', ' ']).next())
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_core_and_the_store_backend_do_not_depend_on_the_fronts() {
    // Crates whose names say their job: the connection core, the etcd
    // store and the NATS bus stand below the broker, never beside or
    // above it.
    for (krate, never) in [
        (
            "mqtt-core",
            &["broker", "fleetgate-etcd", "axum", "hyper"][..],
        ),
        (
            "etcd",
            &["broker", "fleetgate-mqtt-core", "rumqttd", "axum", "hyper"][..],
        ),
        (
            "bus",
            &[
                "broker",
                "fleetgate-mqtt-core",
                "fleetgate-etcd",
                "rumqttd",
                "axum",
                "hyper",
            ][..],
        ),
        ("mqtt", &["broker", "fleetgate-http", "axum", "hyper"][..]),
        ("http", &["broker"][..]),
    ] {
        let deps = dependencies(krate);
        assert!(
            deps.iter().any(|d| d == "provisioning"),
            "{krate}: {deps:?}"
        );
        for n in never {
            assert!(!deps.iter().any(|d| d == n), "{krate} depends on {n}");
        }
    }
}

#[test]
fn the_connection_core_does_no_io_and_reads_no_clock() {
    // fleetgate-mqtt-core decides; broker::mqtt's session drives it. Its
    // sources name no runtime, socket, TLS, store, thread, process or
    // registry; only its clock seam (channel/clock.rs) reads the time; and
    // its Cargo.toml brings in none of those crates itself.
    let files = sources("mqtt-core/src");
    assert!(files.len() >= 10, "{files:?}");
    let forbidden_roots = [
        "tokio",
        "tokio_rustls",
        "rustls",
        "sled",
        "reqwest",
        "hyper",
        "axum",
        "async_nats",
        "tonic",
    ];
    let forbidden_std = ["net", "fs", "thread", "process"];
    let forbidden_anywhere = [
        "spawn_blocking",
        "Registry",
        "registry",
        "store",
        "sessions",
    ];
    let clocks = ["SystemTime", "now_utc", "now_ms"];
    let mut broken = Vec::new();
    for f in &files {
        let clock_seam = f.ends_with("channel/clock.rs");
        for (path, line) in all_paths(f) {
            let first = path.first().map(String::as_str).unwrap_or_default();
            let second = path.get(1).map(String::as_str).unwrap_or_default();
            let named = |set: &[&str]| path.iter().any(|s| set.contains(&s.as_str()));
            if forbidden_roots.contains(&first)
                || (first == "std" && forbidden_std.contains(&second))
                || named(&forbidden_anywhere)
                || (!clock_seam && named(&clocks))
            {
                broken.push(format!("{}:{line}: {}", rel(f), path.join("::")));
            }
        }
    }
    let deps = dependencies("mqtt-core");
    assert!(deps.iter().any(|d| d == "rumqttd"), "{deps:?}");
    for name in deps {
        if forbidden_roots.contains(&name.replace('-', "_").as_str()) {
            broken.push(format!("mqtt-core/Cargo.toml: depends on {name}"));
        }
    }
    assert!(
        broken.is_empty(),
        "the connection core reaches outside what it may:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_module_path_reader_sees_what_it_must() {
    // The checker itself: a file that does reach across is caught, by
    // line, through `use`, groups, `super::` and paths in code.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("session.rs");
    std::fs::write(
        &f,
        "use crate::{api::ApiError, metrics::Refusal};\nuse super::super::api;\n\
         fn f() { let _ = crate::api::x(); }\n",
    )
    .unwrap();
    let found = crate_paths(&["mqtt".to_owned(), "session".to_owned()], &f);
    let api: Vec<usize> = found
        .iter()
        .filter(|(p, _)| p.first().map(String::as_str) == Some("api"))
        .map(|(_, l)| *l)
        .collect();
    assert_eq!(api, vec![1, 2, 3], "{found:?}");
}

#[test]
fn no_source_file_is_over_1200_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        for f in sources(&format!("{krate}/src")) {
            // etcd's protocol, generated by prost and checked in.
            if rel(&f).starts_with("etcd/src/pb/") {
                continue;
            }
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            if n > 1200 {
                long.push(format!("{}: {n} lines", rel(&f)));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these by concern:\n{}",
        long.join("\n")
    );
}
