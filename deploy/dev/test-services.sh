#!/usr/bin/env bash
# What `make test` needs besides Python: PostgreSQL for the store contract tests and headless Chromium for
# the playground browser test. Idempotent. Starts or installs what is missing where it can (Debian, root);
# otherwise says in one line on stderr what it could not start and which tests will skip (fail under CI=true).
# Prints the PostgreSQL URL on stdout (nothing when PostgreSQL could not be started).
set -uo pipefail
cd "$(dirname "$0")"

say() { echo "make test: $*" >&2; }
root=$([[ $(id -u) -eq 0 ]] && echo yes || echo no)

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null || ! command -v chromedriver >/dev/null; then
    if [[ $root == yes ]] && command -v apt-get >/dev/null; then
        say "installing Debian's chromium and chromium-driver for the browser test"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; } >&2 \
            || say "could not install chromium: the playground browser test will skip"
    else
        say "no chromium/chromedriver and cannot install them (needs root and apt-get): the playground browser test will skip"
    fi
fi

if [[ -n "${ALIGNER_TEST_POSTGRES_URL:-}" ]]; then
    echo "$ALIGNER_TEST_POSTGRES_URL"
elif [[ $root == yes ]] && command -v apt-get >/dev/null; then
    bash ./postgres.sh 2>/tmp/aligner-postgres.log | tail -n 1 \
        || say "could not start PostgreSQL (see /tmp/aligner-postgres.log): the PostgreSQL store tests will skip"
else
    say "no PostgreSQL (set ALIGNER_TEST_POSTGRES_URL, or run as root on Debian to start one): the PostgreSQL store tests will skip"
fi
