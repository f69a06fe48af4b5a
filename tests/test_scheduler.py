"""A configured Dask scheduler that is not there, or is not a Dask scheduler, is a one-line
error within seconds: never a hang, never an allocation of what a stranger's bytes read as."""

import http.server
import socketserver
import threading
import time

import pytest
from cases import run, write_case
from tiny import free_port

from pipeline.config import ConfigError


def serve(handler) -> tuple[str, socketserver.TCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"tcp://127.0.0.1:{server.server_address[1]}", server


class Banner(socketserver.BaseRequestHandler):
    """A service that greets first, as SSH does."""

    def handle(self):
        self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        time.sleep(2)


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="did not answer within"):
        run(f"tcp://127.0.0.1:{free_port()}", write_case(tmp_path))


def test_an_http_server_as_the_scheduler_is_an_error_not_a_hang(tmp_path):
    address, server = serve(http.server.SimpleHTTPRequestHandler)
    start = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="sent nothing.*not a Dask scheduler"):
            run(address, write_case(tmp_path))
    finally:
        server.shutdown()
    assert time.monotonic() - start < 30


def test_a_service_that_greets_in_text_is_not_taken_for_a_scheduler(tmp_path):
    address, server = serve(Banner)
    try:
        with pytest.raises(ConfigError, match="is not a Dask scheduler: it answered b'SSH-2.0-'"):
            run(address, write_case(tmp_path))
    finally:
        server.shutdown()


def test_a_real_scheduler_still_passes_the_check(scheduler, tmp_path):
    from pipeline.data.store import open_store

    store = open_store(run(scheduler, write_case(tmp_path)))
    assert store["values"].shape[1] == 4
