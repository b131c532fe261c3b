# llm-egress container image (docs/install.md, "Container image").
#
#   docker build -t llm-egress:0.1.0 .
#
# Stage 1 builds the same binary as `cargo xtask build --release`, with the
# same two toolchains (docs/build.md): Debian's rustc-web/cargo-web with the
# prebuilt BPF `core` and bpf-linker against LLVM 22 for the kernel
# programs, rustup's toolchain for userspace. Stage 2 is debian:bookworm-slim
# with only the binary and a default (audit-only) policy.

FROM debian:bookworm AS build
ARG RUST_VERSION=1.95.0
ARG BPF_LINKER_VERSION=0.13.0
ENV DEBIAN_FRONTEND=noninteractive
# bookworm-security carries rustc-web 1.96, libstd-rust-web-dev-bpf and
# llvm-22-dev; the image's sources list includes it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl gcc libc6-dev \
      rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
# Downloaded to a file first, not piped into sh: a pipe's status is its
# last command's, so a failed download would build an image without rustup.
RUN curl --proto '=https' --tlsv1.2 -sSf -o /tmp/rustup-init.sh https://sh.rustup.rs \
 && sh /tmp/rustup-init.sh -y --no-modify-path --profile minimal --default-toolchain ${RUST_VERSION} \
 && rm /tmp/rustup-init.sh \
 && rustc --version
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker@${BPF_LINKER_VERSION} \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# `cargo xtask build --release` without its `setup` step (which would also
# install the integration tests' tools: dnsmasq, prometheus, ...).
RUN cargo xtask build-ebpf \
 && LLM_EGRESS_EBPF_OBJ=/src/target/bpfel-unknown-none/release/llm-egress-ebpf \
      cargo build --release --locked -p llm-egress --bins \
 && /src/target/release/llm-egress --version

FROM debian:bookworm-slim
COPY --from=build /src/target/release/llm-egress /usr/local/bin/llm-egress
COPY deploy/systemd/policy.toml /etc/llm-egress/policy.toml
# Root, deliberately: loading BPF programs needs CAP_BPF, CAP_NET_ADMIN and
# CAP_PERFMON in the effective set. Container runtimes give a non-root user
# added capabilities only through file capabilities, which
# allowPrivilegeEscalation: false (no_new_privs) disables, and bpffs and
# tracefs are root-only directories. So the agent runs as uid 0 with every
# capability dropped except those four (see deploy/kubernetes/03-daemonset.yaml
# and docs/install.md).
USER 0:0
EXPOSE 9469
ENTRYPOINT ["/usr/local/bin/llm-egress"]
CMD ["run", "--config", "/etc/llm-egress/policy.toml"]
