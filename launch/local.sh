#!/usr/bin/env bash
# N local peers: one process per site on loopback, with the repository's virtualenv.
#   launch/local.sh topologies/ring-10.toml --partition dirichlet:0.5
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/p2p-fl" launch "$@"
