#!/usr/bin/env bash
# The test command of the README: the whole CPU test suite (unit, integration and doc tests;
# examples and benches are compiled too), with the `candle` feature on so that its ops, doc
# examples and example are in the same build. Needs only Rust; GPU tests print that they were
# skipped. (The build without features is type-checked by CI's MSRV step.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo test --features candle --lib --tests --examples
cargo test --features candle --doc
cargo build --features candle --benches
