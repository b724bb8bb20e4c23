"""``ray_address`` checks: the syntax at once, without Ray (``check_address``, which runs
before a model loads, and first in the backend's connect path), and a bounded probe before
joining a cluster: a closed port fails at once, a listening port that is not a Ray GCS
within the probe's bound, in one line. Only servers these tests open on 127.0.0.1 are
contacted, and no Ray instance starts."""

import socket
import sys
import time

import pytest

import orchestrator
from orchestrator import ray_address
from orchestrator.ray_address import PROBE_TIMEOUT_S, check_address
from orchestrator.ray_backend import RayBackend


@pytest.mark.parametrize("address", [
    None, "auto", "127.0.0.1:6379", "head-0.cluster.internal:1", "10.0.0.1:65535", "[::1]:6379",
    "[fe80::1%eth0]:6379",
])
def test_good_addresses_pass(address):
    check_address(address)  # syntax only: nothing is contacted


@pytest.mark.parametrize("address, match", [
    ("localhost", "must be 'host:port'"),
    ("127.0.0.1:x", "must be 'host:port'"),
    ("", "must be 'host:port'"),
    (":6379", "must be 'host:port'"),
    ("127.0.0.1:", "must be 'host:port'"),
    ("127.0.0.1:6379 ", "must be 'host:port'"),
    ("127.0.0.1:-1", "must be 'host:port'"),
    ("127.0.0.1:\uff16\uff13\uff17\uff19", "must be 'host:port'"),  # full-width digits
    ("ray://127.0.0.1:10001", "without a scheme"),
    ("::1:6379", "IPv6 host in brackets"),
    ("[not-v6]:6379", "not an IPv6 address"),
    ("127.0.0.1:65536", r"port 65536 is out of range 1\.\.65535"),
    ("127.0.0.1:0", r"port 0 is out of range"),
    ("127.0.0.1:99999999999999999999", "out of range"),
])
def test_bad_addresses_fail_without_ray(monkeypatch, address, match):
    monkeypatch.setitem(sys.modules, "ray", None)  # any import of Ray would fail
    with pytest.raises(ValueError, match=match):
        check_address(address)
    with pytest.raises(ValueError, match=match):
        RayBackend(address)  # the backend's connect path checks the same way, first


def test_an_address_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="ray_address must be a string"):
        check_address(6379)


def test_the_modules_import_no_ray(monkeypatch):
    # check_address runs before a model loads: importing the modules must not import Ray;
    # a missing Ray is an error once a backend is made, saying how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in ("ray_backend", "ray_address"):
        monkeypatch.delitem(sys.modules, f"orchestrator.{name}")
        monkeypatch.delattr(orchestrator, name)
    import orchestrator.ray_address as address
    import orchestrator.ray_backend as fresh

    address.check_address("127.0.0.1:6379")
    with pytest.raises(ImportError, match=r"pip install 'hetero\[ray\]'"):
        fresh.RayBackend()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_closed_port_fails_at_once():
    port = _closed_port()
    t = time.perf_counter()
    with pytest.raises(ValueError, match=rf"no Ray cluster answers at ray_address '127.0.0.1:{port}' "
                                         rf"\(Connection refused\): start one with 'ray start --head"):
        RayBackend(f"127.0.0.1:{port}")
    assert time.perf_counter() - t < 2


@pytest.fixture
def silent_server():
    """A plain TCP server on 127.0.0.1 that takes connections (the kernel completes them in
    its backlog) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_a_silent_server_fails_within_the_bound_in_one_line(silent_server, capfd):
    t = time.perf_counter()
    with pytest.raises(ValueError) as e:
        RayBackend(silent_server)
    elapsed = time.perf_counter() - t
    assert elapsed < 2 * PROBE_TIMEOUT_S + 2 and elapsed < 20
    msg = str(e.value)
    assert "\n" not in msg and silent_server in msg and "not a Ray GCS" in msg and "ray start --head" in msg
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) <= 3, out + err  # no log spam


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
                                   b"-ERR unknown command\r\n"])
def test_a_server_that_speaks_something_else_fails_fast(monkeypatch, reply):
    # answers (or hangs up) at once, as an HTTP or Redis server does: no need to wait out the bound
    import threading

    monkeypatch.setattr(ray_address, "PROBE_TIMEOUT_S", 2.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer():
            server.settimeout(10)
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(1)
                    try:
                        conn.recv(1024)
                        conn.sendall(reply)
                    except OSError:
                        pass

        threading.Thread(target=answer, daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t = time.perf_counter()
        with pytest.raises(ValueError, match="not a Ray GCS"):
            RayBackend(address)
        assert time.perf_counter() - t < 2 * 2.0 + 2
