"""A Ray cluster's address: its syntax, checked at once without Ray or the network
(:func:`check_address`, which ``LLM`` calls before it loads a model), and a bounded probe
that the address is a Ray GCS (:func:`probe_gcs`) before ``ray.init`` would retry a wrong
one for minutes."""

from __future__ import annotations

import ipaddress
import os
import re
import socket


def first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), "")


# What a ray_address may be, besides "auto": the head's GCS address, an IPv6 host in brackets.
_ADDRESS = re.compile(r"(?:\[(?P<ipv6>[^\[\]]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]+)")
_ADDRESS_FORMS = ("'host:port' (the head's GCS address, as 'ray start --head' prints it, e.g. "
                  "'10.0.0.1:6379'; an IPv6 host in brackets, '[::1]:6379') or 'auto' (the cluster "
                  "'ray start' runs on this machine)")
# Longest wait of each step of probing a cluster's address (the TCP connect, the server's
# HTTP/2 answer, Ray's GCS handshake): ray.init itself retries a silent address for minutes.
PROBE_TIMEOUT_S = 5.0


def check_address(address: str | None) -> None:
    """Check the syntax of a ``ray_address`` at once, without Ray or the network.

    Parameters
    ----------
    address : None (a local Ray instance), ``"auto"`` (the cluster ``ray start`` runs on this
        machine) or ``"host:port"``, the head's GCS address with a port in 1..65535 (an IPv6
        host in brackets: ``"[::1]:6379"``).

    Raises
    ------
    TypeError
        ``address`` is neither a string nor None.
    ValueError
        ``address`` has another form, or its port is out of range; the message says which
        forms are accepted.
    """
    split_address(address)


def split_address(address: str | None) -> tuple[str, int] | None:
    """``(host, port)`` of a checked ``host:port`` address; None for None and ``"auto"``."""
    if address is None or address == "auto":
        return None
    if not isinstance(address, str):
        raise TypeError(f"ray_address must be a string, {_ADDRESS_FORMS}, or None; "
                        f"got {type(address).__name__}")
    m = _ADDRESS.fullmatch(address)
    if m is None:
        hint = ""
        if "://" in address:
            hint = " (without a scheme: Ray Client addresses, 'ray://...', are not supported)"
        elif address.count(":") > 1 and "[" not in address:
            hint = " (put an IPv6 host in brackets)"
        raise ValueError(f"ray_address must be {_ADDRESS_FORMS}, got {address!r}{hint}")
    host, port = m["ipv6"] or m["host"], int(m["port"])
    if m["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"ray_address {address!r}: {host!r} in brackets is not an IPv6 address; "
                             f"ray_address must be {_ADDRESS_FORMS}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"ray_address {address!r}: port {port} is out of range 1..65535 (the head's "
                         f"GCS port is 6379 unless 'ray start --head --port' set another)")
    return host, port


def probe_gcs(address: str, host: str, port: int) -> None:
    """Fail in seconds, with one line, where ``ray.init`` would retry for minutes and log a
    line a second: nothing listens at ``host:port`` (refused at once, or no connection within
    ``PROBE_TIMEOUT_S``); what listens does not speak HTTP/2, as every gRPC server and so a
    Ray GCS does (checked here, silently, within ``PROBE_TIMEOUT_S``); or it speaks gRPC but
    is not a Ray GCS, or refuses this process's token (Ray's own GCS handshake says so at
    once, in one line of Ray's log)."""
    import ray

    check = ("ray_address must be the head's GCS address, as 'ray start --head' prints it "
             "(port 6379 by default)")
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            if not _use_tls() and not _speaks_http2(sock):
                raise ValueError(f"ray_address {address!r} is not a Ray GCS: what listens there does not "
                                 f"speak gRPC (no HTTP/2 answer within {PROBE_TIMEOUT_S:g} s); {check}")
    except OSError as e:
        raise ValueError(f"no Ray cluster answers at ray_address {address!r} ({e.strerror or e}): "
                         f"start one with 'ray start --head --port={port}', or check the address") from None
    client = getattr(ray._raylet, "InnerGcsClient", None)
    if not hasattr(client, "standalone"):  # another Ray version: ray.init checks it, slowly
        return
    try:
        client.standalone(address, None, int(PROBE_TIMEOUT_S * 1000))
    except ray.exceptions.RayError as e:
        if isinstance(e, getattr(ray.exceptions, "AuthenticationError", ())):
            raise ValueError(f"the Ray cluster at ray_address {address!r} refused this process: "
                             f"{first_line(e)}") from None
        code = getattr(e, "rpc_code", None)
        why = f"gRPC status {code}" if code is not None else first_line(e) or type(e).__name__
        raise ValueError(f"ray_address {address!r} is not a Ray GCS: it speaks gRPC but fails Ray's GCS "
                         f"handshake ({why}); {check}, not a raylet's or the Ray Client's") from None


# The first frames a gRPC client sends: HTTP/2's connection preface and an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_http2(sock: socket.socket) -> bool:
    """Whether the server on ``sock`` answers HTTP/2's connection preface with its own, a
    SETTINGS frame (type 4) on stream 0, before the socket's timeout."""
    head = b""
    try:
        sock.sendall(_HTTP2_PREFACE)
        while len(head) < 9:  # a frame header: length (3 bytes), type, flags, stream (4 bytes)
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # timed out, reset, or hung up
        return False
    return head[3] == 4 and head[5:9] == bytes(4)


def _use_tls() -> bool:
    """Ray's gRPC is TLS-wrapped (``RAY_USE_TLS``): its preface is not in plain text."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
