//! llm-egress: eBPF host agent for LLM egress control, as a library; the
//! binary (`src/main.rs`) only calls [`cli::main`].
//!
//! The rooms follow the data path (docs/architecture.md):
//!
//! - [`plaintext`]: the HTTP/1.1 reader of a provider connection's
//!   plaintext: the request's model, the response's usage, secrets in
//!   prompts.
//! - [`capture`]: that plaintext, from OpenSSL uprobes on the processes of
//!   `exact_tokens` workloads.
//! - [`policy`]: the policy file → a validated policy (with the built-in
//!   provider catalog and prices), who may change the files the agent
//!   trusts, and the watch on the policy file.
//! - [`kernel`]: policy → kernel entries (`plan`), loading, attaching and
//!   pinning the programs, the only map writer, verifier costs, dropping
//!   privileges.
//! - [`names`]: provider names → addresses (the resolver, the userspace DNS
//!   answer parser) and the userspace twins of the kernel's name readers.
//! - [`attribution`]: who a connection belongs to — processes, cgroups,
//!   workload cgroups, Kubernetes pods.
//! - [`events`]: the ring-buffer reader: kernel events decoded, attributed
//!   and handed on.
//! - [`accounting`]: connection bytes, durations, token estimates and exact
//!   counts, cost.
//! - [`limits`]: token budgets (per host, fleet-wide, in dollars) and the
//!   keeper that charges them.
//! - [`telemetry`]: Prometheus metrics, the audit log, the HTTP endpoint.
//! - [`run`]: the running agent: start-up and the handlers of what changes.
//! - [`cli`]: the command line (`run`, `check`, `providers`, `verify`,
//!   `status`).
//!
//! Below the rooms, [`state_file`] writes and reads the agent's own state
//! under `state_dir`.

pub mod accounting;
pub mod attribution;
pub mod capture;
pub mod cli;
pub mod events;
pub mod kernel;
pub mod limits;
pub mod names;
pub mod plaintext;
pub mod policy;
pub mod run;
pub mod state_file;
pub mod telemetry;

#[cfg(test)]
mod tests {
    //! The rooms depend on each other in one direction only: a room that
    //! imports another is never imported back, directly or around a loop.

    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
        path::Path,
    };

    const ROOMS: [&str; 12] = [
        "accounting",
        "attribution",
        "capture",
        "cli",
        "events",
        "kernel",
        "limits",
        "names",
        "plaintext",
        "policy",
        "run",
        "telemetry",
    ];

    /// The rooms a source file names as `crate::ROOM`, in code (comments
    /// and unit tests left out) and in `use crate::{ROOM::…, …}` groups as
    /// rustfmt lays them out.
    fn rooms_named(source: &str) -> BTreeSet<&'static str> {
        let code = source.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let mut named = BTreeSet::new();
        let mut in_group = false;
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("").trim();
            if line.starts_with("use crate::{") && !line.ends_with("};") {
                in_group = true;
                continue;
            }
            if in_group && line.starts_with('}') {
                in_group = false;
            }
            let mut heads: Vec<&str> = line
                .match_indices("crate::")
                .map(|(i, _)| &line[i + 7..])
                .collect();
            if in_group {
                heads.push(line);
            }
            for head in heads {
                let head = head.trim_start_matches('{');
                for room in ROOMS {
                    if head.starts_with(room)
                        && head[room.len()..].starts_with([':', ',', ';', '}'])
                    {
                        named.insert(room);
                    }
                }
            }
        }
        named
    }

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((
                    path.display().to_string(),
                    fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }

    #[test]
    fn rooms_import_each_other_without_a_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for room in ROOMS {
            let mut files = Vec::new();
            sources(&src.join(room), &mut files);
            assert!(!files.is_empty(), "room {room} has no files");
            for (_, text) in &files {
                let named = rooms_named(text).into_iter().filter(|r| *r != room);
                edges.entry(room).or_default().extend(named);
            }
        }
        // Depth-first search from every room; a room met again on the
        // current path closes a cycle.
        fn visit<'a>(
            room: &'a str,
            edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            path: &mut Vec<&'a str>,
        ) {
            if let Some(i) = path.iter().position(|r| *r == room) {
                panic!(
                    "import cycle between rooms: {} -> {room}",
                    path[i..].join(" -> ")
                );
            }
            path.push(room);
            for next in edges.get(room).into_iter().flatten() {
                visit(next, edges, path);
            }
            path.pop();
        }
        for room in ROOMS {
            visit(room, &edges, &mut Vec::new());
        }
        // The reader of the data path sits above what it feeds.
        assert!(edges["events"].contains("accounting") && !edges["accounting"].contains("events"));
    }

    #[test]
    fn a_group_import_names_its_rooms() {
        let text = "use crate::{\n    kernel::maps::KernelMaps,\n    telemetry::{audit, metrics},\n};\nfn f() { crate::names::dns::x(); }\n// crate::run\n";
        assert_eq!(
            rooms_named(text),
            BTreeSet::from(["kernel", "names", "telemetry"])
        );
    }
}
