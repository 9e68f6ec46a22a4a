"""Listening sockets of a process tree, for the check that after a default ``kiln serve start`` (its
own local Ray instance) nothing that instance started listens beyond loopback, except Ray's own
token-protected listeners that README's Safety section names: Ray Serve's replica-to-replica gRPC
server in each replica (Serve binds it to ``[::]``)."""

from __future__ import annotations

import os
from pathlib import Path


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _hex_address(text: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(text)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def listening_sockets(pids: list[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by ``pids``."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = set()
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" or inode not in owner:  # 0A: TCP_LISTEN
                continue
            host, port = local.split(":")
            found.add((_hex_address(host, v6), int(port, 16), owner[inode]))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


def grpc_code_without_token(port: int) -> str:
    """The status a gRPC call without Ray's auth token gets from the listener at ``port``."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def assert_loopback_only(session: int) -> None:
    """Every TCP listener of process session ``session`` is on loopback, except one per Serve
    replica that refuses a call without Ray's auth token."""
    from kiln.local_ray import session_members

    sockets = listening_sockets(session_members(session))
    names = {owner: cmdline(owner) for _, _, owner in sockets}
    assert any("haproxy" in name for name in names.values())  # HAProxy's listeners are counted
    outside = {s for s in sockets if not is_loopback(s[0])}
    replicas = {s for s in outside if names[s[2]].startswith("ray::ServeReplica")}
    assert outside == replicas, [(s, names[s[2]]) for s in outside - replicas]
    assert len({owner for _, _, owner in replicas}) == len(replicas)  # one per replica
    for _, port, _ in replicas:
        assert grpc_code_without_token(port) == "UNAUTHENTICATED"
