//! The `llm-egress` binary: everything is in the library (`src/lib.rs`).

fn main() -> std::process::ExitCode {
    llm_egress::cli::main()
}
