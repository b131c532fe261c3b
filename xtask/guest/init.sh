#!/bin/busybox sh
# The guest's /init (PID 1) for `cargo xtask kernels` (docs/kernels.md).
#
# Mounts what the agent needs, runs `llm-egress verify --json`, then, for
# each program set, starts the agent on a test cgroup and checks with
# egress-probe that one connect is denied (EPERM) and one allowed, that a
# NAT64 address of a denied IPv4 address is denied, and that a ping socket
# is refused to a workload whose `other` is deny and made for one whose
# `other` is allow (cgroup/sock_create); with all programs, that an
# `openssl s_client` in an `exact_tokens` workload gets the OpenSSL uprobes
# (and a memory-BIO client, xtask/guest/membio.c, is joined to its socket)
# and its SSL_write reaches the agent; stops the agent with SIGTERM and
# checks its exit status. Every result goes to the
# console on a line holding "@@LLME " (xtask/src/kernels/results.rs parses
# them), between "@@LLME begin" and "@@LLME end". Then powers off.
#
# Kernel command line: llme.step=SECS bounds each wait (the verify run, an
# agent's start, its stop); the host sets it from its own timeout.

export PATH=/bin
/bin/busybox --install -s /bin

m() { echo "@@LLME $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mkdir -p /tmp /run /var/run /etc
ip link set lo up
# Ping sockets for every group (root's too; the default "1 0" allows none),
# so that a refused one is the agent's.
echo "0 2147483647" >/proc/sys/net/ipv4/ping_group_range

STEP=120
for word in $(cat /proc/cmdline); do
    case "$word" in
        llme.step=*) STEP="${word#llme.step=}" ;;
    esac
done

m begin
m kernel "$(uname -r)"
m uptime "$(cut -d' ' -f1 /proc/uptime)"
m step "$STEP"

# What an agent log says, one marker line per line: the error lines
# (a failed load carries the whole verifier log: its last lines are
# instructions, the verdict is in "program NAME: ..." and the
# "processed N insns" line), then the last lines; each cut to 300 bytes.
# log_lines SET FILE
log_lines() {
    {
        grep -E 'program [A-Za-z0-9_]+:|[Ee]rror|processed [0-9]+ insns|too large|limit' "$2" | head -n 8
        echo "(last lines)"
        tail -n 8 "$2"
    } | cut -c1-300 | while IFS= read -r line; do m log "$1" "$line"; done
}

# Whole seconds since boot (loops are bounded by the clock, not by a
# count: under TCG every command is slow).
now() { cut -d. -f1 /proc/uptime; }

# The agent runs in a subshell that waits for it at once and writes its
# exit status to /tmp/agent.rc (this shell reaps background children on
# its own, and `wait PID` here then no longer knows the status).
# start_agent SET: sets AGENT to the agent's pid.
start_agent() {
    rm -f /tmp/agent.pid /tmp/agent.rc
    (
        NO_COLOR=1 llm-egress run --config "/tmp/policy-$1.toml" >"/tmp/agent-$1.log" 2>&1 &
        echo $! >/tmp/agent.pid
        wait $!
        echo $? >/tmp/agent.rc
    ) &
    n=0
    while [ ! -s /tmp/agent.pid ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    AGENT=$(cat /tmp/agent.pid)
}

# Whether the agent has exited (its status is then in /tmp/agent.rc).
exited() { [ -s /tmp/agent.rc ]; }

# Waits up to SECS for the agent to exit; echoes its status, or "timeout".
wait_exit() {
    until=$(($(now) + $1))
    while [ "$(now)" -lt "$until" ]; do
        if exited; then
            cat /tmp/agent.rc; return
        fi
        sleep 0.1
    done
    echo timeout
}

# --- the verifier table ------------------------------------------------
m verify-begin
t0=$(cut -d' ' -f1 /proc/uptime)
timeout "$STEP" llm-egress verify --json >/tmp/verify.out 2>/tmp/verify.err
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
while IFS= read -r line; do m verify-out "$line"; done </tmp/verify.out
tail -n 20 /tmp/verify.err | while IFS= read -r line; do m verify-err "$line"; done
m verify-end "rc=$rc" "start=$t0" "end=$t1"

# --- a loopback listener and the test cgroups --------------------------
PORT=8080
mkdir -p /tmp/www && echo ok >/tmp/www/index.html
httpd -p "$PORT" -h /tmp/www
CG=/sys/fs/cgroup/matrix
mkdir -p "$CG/open" "$CG/closed" "$CG/traced"

# probe CGROUP ADDR [COMMAND]: prints ok, EPERM or another errno name
# (COMMAND: connect, or socket with ADDR a socket kind such as ping4)
probe() {
    out=$(egress-probe --cgroup "$CG/$1" --netns /proc/1/ns/net --timeout-ms 3000 "${3:-connect}" "$2" 2>&1)
    case "$out" in
        *'"ok":true'*) echo ok ;;
        *'"error":"EPERM"'*) echo EPERM ;;
        *'"error":"'*) echo "$out" | sed 's/.*"error":"\([^"]*\)".*/\1/' ;;
        *) echo "probe-failed: $out" ;;
    esac
}

# The uprobes on this kernel: `openssl s_client` (the shared libssl) in
# the exact_tokens workload "traced" is paused at exec, attached and
# resumed; its SSL_write reaches the agent (llm_egress_plaintext_calls_total).
# metric NAME: the agent's counter NAME (no labels) as an integer, 0
# when it is not there.
metric() {
    v=$(timeout 5 wget -q -O - http://127.0.0.1:9469/metrics 2>/dev/null | sed -n "s/^$1 \([0-9]*\).*/\1/p")
    echo "${v:-0}"
}

# wait_metric NAME AT_LEAST: polls NAME for up to 30 s until it is at
# least AT_LEAST; prints the last value.
wait_metric() {
    v=0; until=$(($(now) + 30))
    while [ "$(now)" -lt "$until" ]; do
        v=$(metric "$1")
        [ "$v" -ge "$2" ] && break
        sleep 0.5
    done
    echo "$v"
}

check_plaintext() {
    # -rev: the server echoes each line reversed and never reads its
    # stdin (a background job's is /dev/null: at its EOF a plain s_server
    # closes the connection, racing the client's write).
    openssl s_server -accept 8443 -cert /etc/matrix-cert.pem -key /etc/matrix-key.pem -rev -quiet >/tmp/s_server.out 2>&1 &
    srv=$!
    until=$(($(now) + 60))
    while [ "$(now)" -lt "$until" ] && ! netstat -ltn 2>/dev/null | grep -q ':8443 '; do sleep 0.2; done
    sh -c 'echo $$ >"$1/cgroup.procs" && echo hello-matrix | timeout 60 openssl s_client -connect 127.0.0.1:8443 -quiet -no_ign_eof' \
        _ "$CG/traced" >/tmp/s_client.out 2>&1
    calls=$(wait_metric llm_egress_plaintext_calls_total 1)
    # Memory BIOs: the client's SSL_write touches no socket; its SSL* is
    # joined to the socket by its next send (the sock tracepoint on 6.4+,
    # the tcp_sendmsg kprobe before). 127.0.0.3:8443 is the provider
    # matrix-llm, so the connection is tracked and has a cookie.
    sh -c 'echo $$ >"$1/cgroup.procs" && exec timeout 60 membio-client 127.0.0.3 8443 hello-membio' \
        _ "$CG/traced" >/tmp/membio.out 2>&1
    links=$(wait_metric llm_egress_plaintext_links_total 1)
    # Go's crypto/tls: found by symbol in the static go-client, probed at
    # the entry and the returns of (*Conn).Write and Read.
    before=$(metric llm_egress_plaintext_calls_total)
    sh -c 'echo $$ >"$1/cgroup.procs" && exec timeout 60 go-client 127.0.0.3:8443 hello-go' \
        _ "$CG/traced" >/tmp/go-client.out 2>&1
    gocalls=$(($(wait_metric llm_egress_plaintext_calls_total $((before + 2))) - before))
    kill "$srv" 2>/dev/null
    if [ "$gocalls" -ge 2 ] && grep -q "Go's crypto/tls in this file" "/tmp/agent-$1.log"; then
        m check "$1" plaintext-go pass "calls $gocalls"
    else
        m check "$1" plaintext-go fail "calls $gocalls"
        tail -n 4 /tmp/go-client.out | cut -c1-300 | while IFS= read -r line; do m log "$1" "go-client: $line"; done
        grep -i -E "plaintext|go" "/tmp/agent-$1.log" | tail -n 6 | cut -c1-300 | while IFS= read -r line; do m log "$1" "$line"; done
    fi
    if [ "${links:-0}" -ge 1 ]; then
        m check "$1" plaintext-join pass "links $links"
    else
        m check "$1" plaintext-join fail "links ${links:-0}"
        tail -n 4 /tmp/membio.out | cut -c1-300 | while IFS= read -r line; do m log "$1" "membio: $line"; done
        timeout 5 wget -q -O - http://127.0.0.1:9469/metrics 2>/dev/null | grep '^llm_egress_plaintext' |
            while IFS= read -r line; do m log "$1" "$line"; done
    fi
    if grep -q "uprobes attached" "/tmp/agent-$1.log"; then
        m check "$1" uprobe-attach pass attached
    else
        m check "$1" uprobe-attach fail "no uprobes attached"
        log_lines "$1" "/tmp/agent-$1.log"
        tail -n 3 /tmp/s_client.out | while IFS= read -r line; do m log "$1" "s_client: $line"; done
    fi
    if [ "${calls:-0}" -ge 1 ]; then
        m check "$1" plaintext pass "calls $calls"
    else
        m check "$1" plaintext fail "calls ${calls:-0}"
        for f in /tmp/s_client.out /tmp/s_server.out; do
            tail -n 4 "$f" | cut -c1-300 | while IFS= read -r line; do m log "$1" "$f: $line"; done
        done
        timeout 5 wget -q -O - http://127.0.0.1:9469/metrics 2>/dev/null | grep '^llm_egress_plaintext' |
            while IFS= read -r line; do m log "$1" "$line"; done
        grep -i plaintext "/tmp/agent-$1.log" | tail -n 6 | cut -c1-300 | while IFS= read -r line; do m log "$1" "$line"; done
    fi
}

# check SET NAME WANT GOT
check() {
    if [ "$3" = "$4" ]; then m check "$1" "$2" pass "$4"; else m check "$1" "$2" fail "want $3, got $4"; fi
}

# Without an agent both connects pass: the denials below are the agent's.
check none baseline-open ok "$(probe open 127.0.0.1:$PORT)"
check none baseline-closed ok "$(probe closed 127.0.0.2:$PORT)"
check none baseline-ping ok "$(probe closed ping4 socket)"

for SET in all connect; do
    m set-begin "$SET"
    TRACED=""
    if [ "$SET" = all ]; then
        TRACED='
[[providers]]
name = "matrix-llm"
cidrs = ["127.0.0.3/32"]
ports = [8443]

[[workloads]]
name = "traced"
cgroup = "traced"
allow = ["matrix-llm"]
other = "allow"
exact_tokens = true'
    fi
    cat >/tmp/policy-$SET.toml <<POLICY
mode = "enforce"
cgroup = "$CG"
programs = "$SET"
metrics_listen = "127.0.0.1:9469"
audit_log = "off"
pin_path = "/sys/fs/bpf/llme-$SET"
failure_mode = "open"
state_dir = "/tmp/state-$SET"

[resolver]
servers = ["127.0.0.1:9"]

[defaults]
llm = "deny"
other = "allow"

[[workloads]]
name = "open"
cgroup = "open"
allow = ["127.0.0.1/32"]
deny = ["127.0.0.2/32"]
other = "allow"

[[workloads]]
name = "closed"
cgroup = "closed"
other = "deny"
$TRACED
POLICY
    t0=$(cut -d' ' -f1 /proc/uptime)
    start_agent "$SET"
    ready=""; until=$(($(now) + STEP))
    while [ "$(now)" -lt "$until" ]; do
        if exited; then
            ready="exited with status $(cat /tmp/agent.rc)"; break
        fi
        # Debian's busybox wget has no -T: `timeout` bounds it.
        if timeout 5 wget -q -O /dev/null http://127.0.0.1:9469/readyz 2>/dev/null; then
            ready=yes; break
        fi
        sleep 0.2
    done
    [ -z "$ready" ] && ready="not ready within ${STEP}s"
    t1=$(cut -d' ' -f1 /proc/uptime)
    m timing "$SET" start "$t0" "$t1"
    if [ "$ready" = yes ]; then
        m check "$SET" start pass ready
        check "$SET" allow ok "$(probe open 127.0.0.1:$PORT)"
        check "$SET" deny-cidr EPERM "$(probe open 127.0.0.2:$PORT)"
        check "$SET" deny-other EPERM "$(probe closed 127.0.0.1:$PORT)"
        # 64:ff9b::127.0.0.2, judged as the denied 127.0.0.2 (as IPv6 it
        # would meet other = allow and fail with ENETUNREACH).
        check "$SET" deny-nat64 EPERM "$(probe open "[64:ff9b::7f00:2]:$PORT")"
        check "$SET" deny-ping EPERM "$(probe closed ping4 socket)"
        check "$SET" allow-ping ok "$(probe open ping4 socket)"
        [ "$SET" = all ] && check_plaintext "$SET"
        kill -TERM "$AGENT"
        st=$(wait_exit "$STEP")
        if [ "$st" = 0 ]; then
            m check "$SET" stop pass "exit 0 on SIGTERM"
        else
            m check "$SET" stop fail "exit $st on SIGTERM"
            # Where it hangs: each thread's state and kernel wait channel.
            for t in /proc/$AGENT/task/*; do
                m log "$SET" "thread $(cat $t/comm 2>/dev/null): state $(cut -d' ' -f3 $t/stat 2>/dev/null), wchan $(cat $t/wchan 2>/dev/null)"
            done
            kill -KILL "$AGENT" 2>/dev/null
            log_lines "$SET" /tmp/agent-$SET.log
        fi
        check "$SET" after-stop ok "$(probe closed 127.0.0.1:$PORT)"
    else
        m check "$SET" start fail "$ready"
        kill -KILL "$AGENT" 2>/dev/null
        log_lines "$SET" /tmp/agent-$SET.log
    fi
    m set-end "$SET"
done

m end
sync
poweroff -f
