#!/usr/bin/env bash
# One institution's node, as a service manager starts it (launch/p2p-fl-node@.service).
#   launch/hospital-node.sh CONFIG NAME DATA KEY [OUT]
# A service's PATH rarely holds a virtualenv: p2p-fl is $P2P_FL if set, else the one on PATH,
# else the virtualenv of the checkout this script lies in.
set -euo pipefail
if [ "$#" -lt 4 ]; then
    echo "usage: $0 CONFIG NAME DATA KEY [OUT]   (OUT: /var/lib/p2p_fl/NAME)" >&2
    exit 2
fi
config="$1"; name="$2"; data="$3"; key="$4"; out="${5:-/var/lib/p2p_fl/$name}"
root="$(cd "$(dirname "$0")/.." && pwd)"
p2p_fl="${P2P_FL:-$(command -v p2p-fl || echo "$root/.venv/bin/p2p-fl")}"
if [ ! -x "$p2p_fl" ]; then
    echo "$0: no p2p-fl at $p2p_fl; install it (README) or set P2P_FL=/path/to/p2p-fl" >&2
    exit 2
fi
exec "$p2p_fl" node --config "$config" --name "$name" --data "$data" --key "$key" --out "$out"
