#!/usr/bin/env bash
# Runs twokey-bench and profiles exactly one of its measured phases.
#
#   bench/profile-phase.sh PHASE COMMAND -- BENCH ARGS...
#
# PHASE is a phase name (a bash pattern: every phase it matches is profiled,
# and $PHASE_N in COMMAND counts them from 1) as the bench prints it on stderr
# (`twokey-bench: phase start: vault: Status`), e.g. "vault: Status",
# "vault: bare Status", "vault: GenerateCode", "flow: sequential",
# "flow: concurrent", "scaling 100000: Query by account".
# COMMAND is started (through bash, in the background) when the phase starts
# and sent SIGINT when it ends; in it $AUDIT_PID, $VAULT_PID, $BROKER_PID and
# $BENCH_PID are the processes of this run. Examples:
#
#   bench/profile-phase.sh "vault: Status" \
#     'perf record -a -g -F 999 -o /tmp/status.perf' -- vault --status-calls 200000
#   bench/profile-phase.sh "flow: sequential" \
#     'strace -f -c -o /tmp/broker.strace -p $BROKER_PID' -- flow --flows 200
#
# The bench binary is target/release/twokey-bench (TWOKEY_BENCH to change);
# build it and the services first (cargo build --release --bins).
set -euo pipefail
phase=$1
cmd=$2
shift 2
[[ ${1:-} == -- ]] && shift
bench=${TWOKEY_BENCH:-$(dirname "$0")/../target/release/twokey-bench}
profiler=
PHASE_N=0
export AUDIT_PID= VAULT_PID= BROKER_PID= BENCH_PID=
coproc BENCH { exec "$bench" "$@" 2>&1; }
BENCH_PID=$BENCH_PID
bench_pid=$BENCH_PID
# bash unsets BENCH when the bench exits; read its output from a copy.
exec {out}<&"${BENCH[0]}"
while IFS= read -r line <&"$out"; do
    printf '%s\n' "$line" >&2
    case $line in
        "twokey-bench: twokey-audit pid "*) AUDIT_PID=$(awk '{print $4}' <<<"$line") ;;
        "twokey-bench: twokey-vault pid "*) VAULT_PID=$(awk '{print $4}' <<<"$line") ;;
        "twokey-bench: twokey-broker pid "*) BROKER_PID=$(awk '{print $4}' <<<"$line") ;;
        "twokey-bench: phase start: "$phase)
            PHASE_N=$((PHASE_N + 1))
            # Job control on for this one: the command gets its own process
            # group and, unlike a plain background job, does not start with
            # SIGINT ignored (a bash script in it could not trap it).
            set -m
            PHASE_N=$PHASE_N bash -c "$cmd" &
            profiler=$!
            set +m
            echo "profile-phase: started pid $profiler: $cmd (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
            ;;
        "twokey-bench: phase end: "$phase)
            if [[ -n $profiler ]]; then
                # The command's process group: bash -c and what it started.
                # perf and strace stop on SIGINT or SIGTERM and write their
                # output; a background job inside bash -c starts with SIGINT
                # ignored, so it gets SIGTERM too.
                kill -INT -- "-$profiler" 2>/dev/null || true
                kill -TERM -- "-$profiler" 2>/dev/null || true
                wait "$profiler" || true
                echo "profile-phase: stopped $profiler (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
                profiler=
            fi
            ;;
    esac
done
wait "$bench_pid"
