#!/usr/bin/env bash
# The test command of the README: the whole CPU test suite (unit, integration and doc tests;
# examples and benches are compiled too). Needs only Rust; GPU tests print that they were
# skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo test --lib --tests --examples
cargo test --doc
cargo build --benches
