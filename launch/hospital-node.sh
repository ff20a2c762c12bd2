#!/usr/bin/env bash
# One institution's node, as a service manager would start it.
#   launch/hospital-node.sh federation.toml hospital-a /data/xrays [/var/lib/p2p_fl]
set -euo pipefail
config="$1"; name="$2"; data="$3"; out="${4:-/var/lib/p2p_fl/$name}"
exec p2p-fl node --config "$config" --name "$name" --data "$data" --out "$out"
