"""Several hosts on one machine: one Linux network namespace per node, joined by a bridge.

Each host `i` is a namespace `RUN-n{i}` whose only links are loopback and `eth0`, with the
address 10.77.0.{i+1}/24. `eth0` is one end of a veth pair; the other end, `v{i}`, is a
port of the bridge `br0`, which lives in a namespace of its own (`RUN-br`), so nothing is
added to the machine's own network and deleting the namespaces removes everything. Cutting
a host's link sets its bridge port down: packets are lost silently, as when a cable or a
VPN drops, and the host keeps its address, so its sockets stay bound.

Needs root and iproute2's `ip`. Every run has its own name, `p2pfl-<pid>-<tag>`, so runs
beside each other never share a namespace; namespaces left by a process that no longer
exists (a run killed before its clean-up) are removed when the next run starts.

    with network_hosts(3) as hosts:
        subprocess.run([*hosts.exec_prefix(0), "python", "-m", "p2p_fl", "node", ...])
        hosts.cut(1)       # host 1 is unreachable ...
        hosts.restore(1)   # ... and back

`python -m p2p_fl.netns cut|restore OUT SITE` cuts a site of a running `launch --netns`
(it reads OUT/netns.json); `python -m p2p_fl.netns clean` removes stale namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIX = "p2pfl-"
SUBNET = "10.77.0"  # host i is SUBNET.(i+1)/24
MAX_HOSTS = 253
_RUN = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


class NetnsError(RuntimeError):
    """Namespaces cannot be made or changed here (not root, no `ip`, or `ip` refused)."""


@dataclass(frozen=True)
class Hosts:
    """The namespaces of one run; everything derives from the run's name and the count."""

    run: str
    count: int

    @property
    def bridge_namespace(self) -> str:
        return f"{self.run}-br"

    def namespace(self, i: int) -> str:
        return f"{self.run}-n{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """Prefix for a command that runs inside host i (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def cut(self, i: int) -> None:
        """Host i's link goes down: nothing reaches it or leaves it until `restore(i)`."""
        _ip("-n", self.bridge_namespace, "link", "set", f"v{i}", "down")

    def restore(self, i: int) -> None:
        _ip("-n", self.bridge_namespace, "link", "set", f"v{i}", "up")


def require_root() -> None:
    """Raises NetnsError (one line) where namespaces cannot be made."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (ip netns add); run as root or leave out --netns")
    if shutil.which("ip") is None:
        raise NetnsError("network namespaces need iproute2's `ip` command, which is not on PATH")


def create_hosts(count: int) -> Hosts:
    """Makes `count` hosts on one bridge; on any failure removes what it made and raises NetnsError."""
    if not 1 <= count <= MAX_HOSTS:
        raise NetnsError(f"network namespaces: 1 to {MAX_HOSTS} hosts on {SUBNET}.0/24, not {count}")
    require_root()
    remove_stale()
    hosts = Hosts(f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}", count)
    br = hosts.bridge_namespace
    try:
        _ip("netns", "add", br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i in range(count):
            ns = hosts.namespace(i)
            _ip("netns", "add", ns)
            _ip("-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{hosts.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # Some containers allow `ip netns add` but not the mounts `ip netns exec` makes.
        _ip("netns", "exec", hosts.namespace(0), sys.executable, "-I", "-S", "-c", "")
    except BaseException:
        destroy(hosts.run)
        raise
    return hosts


def destroy(run: str) -> None:
    """Deletes every namespace of the run (their veths and the bridge go with them)."""
    for ns in _namespaces():
        if ns.startswith(run + "-"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # best effort: gone is gone


def remove_stale() -> list[str]:
    """Deletes the namespaces of runs whose process no longer exists; returns their names."""
    stale = []
    for ns in _namespaces():
        match = _RUN.match(ns)
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            stale.append(ns)
    return stale


@contextlib.contextmanager
def network_hosts(count: int):
    """`create_hosts` for a `with` block; the namespaces are deleted however it ends."""
    hosts = create_hosts(count)
    try:
        yield hosts
    finally:
        destroy(hosts.run)


def _namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def site_link(out: Path, site: str) -> tuple[Hosts, int]:
    """The hosts and index of `site` in a `launch --netns` run, from OUT/netns.json."""
    try:
        layout = json.loads((out / "netns.json").read_text())
    except FileNotFoundError:
        raise NetnsError(f"{out}/netns.json: not found; is {out} the --out of a `launch --netns` run?") from None
    sites = layout["sites"]
    if site not in sites:
        raise NetnsError(f"{site!r} is not a site of {out} (sites: {', '.join(sites)})")
    return Hosts(layout["run"], layout.get("hosts", len(sites))), sites[site]["index"]


def main(argv: list[str]) -> int:
    usage = "usage: python -m p2p_fl.netns cut|restore OUT SITE | clean"
    try:
        if argv[:1] == ["clean"] and len(argv) == 1:
            require_root()
            print("\n".join(remove_stale()) or "no stale namespaces")
        elif argv[:1] in (["cut"], ["restore"]) and len(argv) == 3:
            hosts, i = site_link(Path(argv[1]), argv[2])
            hosts.cut(i) if argv[0] == "cut" else hosts.restore(i)
        else:
            print(usage, file=sys.stderr)
            return 2
    except NetnsError as err:
        print(f"p2p-fl netns: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
