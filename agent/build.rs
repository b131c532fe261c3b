//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is taken from `LLM_EGRESS_EBPF_OBJ`, else from the workspace's
//! `target/bpfel-unknown-none/release/llm-egress-ebpf`. Without one, an empty
//! placeholder is embedded so that unit tests and `cargo check` work on a
//! machine without the BPF toolchain; `llm-egress run` then refuses to start
//! and says how to build the object.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LLM_EGRESS_EBPF_OBJ");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let default = manifest.join("../target/bpfel-unknown-none/release/llm-egress-ebpf");
    let source = env::var_os("LLM_EGRESS_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("llm-egress.bpf.o");
    if source.is_file() {
        fs::copy(&source, &out)?;
    } else {
        println!(
            "cargo:warning=no eBPF object at {}: embedding an empty one (run `cargo xtask build`)",
            source.display()
        );
        fs::write(&out, b"")?;
    }
    Ok(())
}
