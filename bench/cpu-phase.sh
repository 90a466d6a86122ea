#!/usr/bin/env bash
# CPU time each process (and each named thread group) spends in one phase:
# a COMMAND for bench/profile-phase.sh. It reads /proc/PID/stat (utime +
# stime) of every PID given, and of every thread of them (by name, digits
# stripped: `tokio-runtime-w`, `bare-tonic-w`, `sled-io`), when it starts and
# again when it gets SIGINT (the phase's end), and prints the differences in
# ms to OUT (default stderr), with the wall time and the load average. It
# takes a snapshot every 0.1 s too, for processes that end with the phase.
#
#   bench/profile-phase.sh "vault: Status" \
#     'bench/cpu-phase.sh /tmp/status.cpu $VAULT_PID $AUDIT_PID $BENCH_PID' \
#     -- vault --status-calls 200000
set -euo pipefail
out=$1
shift
tick=$(getconf CLK_TCK)

# Prints "PID/THREADNAME TICKS" for every thread of every PID (threads of
# one name summed) and "PID/all TICKS" for the process, in one awk (fast:
# the phase starts while this runs).
snapshot() {
    local pid files=()
    for pid in "$@"; do
        files+=(/proc/"$pid"/task/*/stat)
    done
    awk '{
        split(FILENAME, f, "/")
        name = $0
        sub(/^[^(]*\(/, "", name)
        sub(/\) .*/, "", name)
        gsub(/[0-9]/, "", name)
        gsub(/ /, "_", name)
        rest = $0
        sub(/.*\) /, "", rest)
        split(rest, v, " ")
        t = v[12] + v[13]
        s[f[3] "/" name] += t
        s[f[3] "/all"] += t
    } END {for (k in s) print k, s[k]}' "${files[@]}" 2>/dev/null | sort || true
}

# The larger count of each key of two snapshots (a thread or process that
# ended keeps its last count).
merge() {
    join -a 1 -a 2 -e 0 -o 0,1.2,2.2 <(grep . <<<"$1" || true) <(grep . <<<"$2" || true) |
        awk '{print $1, ($2 > $3 ? $2 : $3)}'
}

finish() {
    # profile-phase.sh sends SIGINT and then SIGTERM to the whole process
    # group: ignore the second, here and in the snapshot's awk and sort.
    trap '' INT TERM
    local end after
    end=$(date +%s.%N)
    # The processes may be gone already (the bench stops them after its
    # last phase): then the last snapshot of the loop below counts.
    after=$(merge "$last" "$(snapshot "$@")")
    {
        echo "wall $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}') s," \
            "load average $load_start -> $(cut -d' ' -f1-3 /proc/loadavg)"
        join -a 2 -e 0 -o 0,1.2,2.2 <(echo "$before") <(echo "$after") |
            awk -v hz="$tick" '{d = $3 - $2; if (d > 0) printf "%-40s %10.0f ms CPU\n", $1, d * 1000 / hz}'
    } >"${out:-/dev/stderr}"
    exit 0
}
start=$(date +%s.%N)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
before=
# Trapped before the first snapshot: a short phase may end during it (bash
# runs the trap once the snapshot is taken).
trap 'finish "$@"' INT TERM
before=$(snapshot "$@")
last=$before
while :; do
    sleep 0.1 &
    wait $! || true
    last=$(merge "$last" "$(snapshot "$@")")
done
