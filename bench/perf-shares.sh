#!/usr/bin/env bash
# Self-time shares of a perf recording grouped by crate: what fraction of the
# samples falls in the kernel, rustls, ring/aws-lc, h2, tokio, tracing, sled,
# the allocator, our own crates (twokey_*)... Arguments after the file go to
# `perf report` (e.g. --comm twokey-vault, --tid 1234, --pid 99).
#
#   bench/perf-shares.sh /tmp/status.perf --comm twokey-vault
set -euo pipefail
file=$1
shift
perf report -i "$file" --no-children --percentage relative --sort sym --stdio -q -g none "$@" 2>/dev/null |
    awk '
    $1 ~ /%$/ {
        pct = $1 + 0
        kind = $2
        $1 = ""; $2 = ""
        sym = substr($0, 3)
        if (kind == "[k]") { c = "kernel" }
        else {
            s = sym
            sub(/^</, "", s)
            sub(/^_</, "", s)
            if (s ~ /^0x[0-9a-f]+$/) { c = "unresolved" }
            else if (s ~ /::/) { c = s; sub(/::.*/, "", c); sub(/ as .*/, "", c) }
            else if (s ~ /^(__)?(memcpy|memmove|memset|memcmp|bcmp)/) { c = "libc mem*" }
            else if (s ~ /^(malloc|free|_int_|realloc|cfree|calloc|__libc_)/) { c = "libc malloc" }
            else if (s ~ /^(pthread|__pthread|__lll|__futex|syscall|__GI_|__vdso|clock_gettime)/) { c = "libc other" }
            else if (s ~ /^(aws_lc|ring_core|GFp|sha256|aes|x25519|ChaCha|gcm|bn_|ecp_|p256)/) { c = "crypto (asm)" }
            else { c = "other: " s }
        }
        share[c] += pct
        total += pct
    }
    END {
        for (c in share) printf "%6.2f%%  %s\n", share[c], c
        printf "%6.2f%%  (total of the samples shown)\n", total
    }' | sort -rn
