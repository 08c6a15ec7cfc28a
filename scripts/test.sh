#!/usr/bin/env bash
# The test command (README): checks formatting and lints, then runs every test against real
# components (Synapse, an S3 server, the Docker engine) that the harness installs once.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --no-fail-fast
