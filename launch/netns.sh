#!/usr/bin/env bash
# Network namespaces of a running `p2p-fl launch --netns` (as root), with the repository's virtualenv.
#   launch/netns.sh cut OUT SITE       # SITE's link goes down: packets to and from it are lost
#   launch/netns.sh restore OUT SITE   # ... and comes back
#   launch/netns.sh clean              # delete namespaces left by runs that were killed
# OUT is the launch's --out folder (it reads OUT/netns.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/python" -m p2p_fl.netns "$@"
