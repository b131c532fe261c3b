//! An HTTPS client in Go (`net/http` over `crypto/tls`), built by the
//! tests with Debian's Go (`golang-go`, `cargo xtask setup`) into a
//! temporary directory, and a copy stripped of its symbols (`-s -w`): the
//! clients of docs/plaintext.md's "Go" rows (tests/tests/exact_tokens.rs).
//!
//! The client (argv: ip, host, ca file, path, body, then `stream` or
//! `buffered`) POSTs `body` to `https://host/path`, dialing `ip:443`,
//! verifying the server as `host` against the CA file, with Go's default
//! transport otherwise (HTTP/1.1 here: a custom TLS config turns HTTP/2
//! off; `Accept-Encoding: gzip`, decoded by the transport). It reads the
//! whole answer and exits 1 unless the status is 200.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const CLIENT_GO: &str = r#"package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) != 7 {
		fmt.Fprintln(os.Stderr, "usage: ip host ca path body stream|buffered")
		os.Exit(2)
	}
	ip, host, ca, path, body := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	pem, err := os.ReadFile(ca)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	client := &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: host},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dialer.DialContext(ctx, network, net.JoinHostPort(ip, "443"))
			},
		},
	}
	req, _ := http.NewRequest("POST", "https://"+host+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer sk-proj-"+strings.Repeat("x", 40))
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		fmt.Fprintln(os.Stderr, resp.Status, err)
		os.Exit(1)
	}
	fmt.Println(resp.Status, n, os.Args[6])
}
"#;

/// The client and its stripped copy, built in `dir` (Go's build cache in
/// `dir` too; no network: only the standard library): (with symbols,
/// stripped). Panics with Go's output when it cannot be built (`go`
/// missing: `cargo xtask setup` installs golang-go).
pub fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("go_client.go");
    std::fs::write(&src, CLIENT_GO).unwrap();
    let build = |out: &Path, ldflags: &str| {
        let o = Command::new("go")
            .args(["build", "-trimpath", "-ldflags", ldflags, "-o"])
            .arg(out)
            .arg(&src)
            .env("GOCACHE", dir.join("go-cache"))
            .env("GOPATH", dir.join("go-path"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "0")
            .output()
            .unwrap_or_else(|e| panic!("cannot run go (golang-go: cargo xtask setup): {e}"));
        assert!(
            o.status.success(),
            "go build: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let (exe, stripped) = (dir.join("go_client"), dir.join("go_client_stripped"));
    build(&exe, "");
    build(&stripped, "-s -w");
    (exe, stripped)
}
