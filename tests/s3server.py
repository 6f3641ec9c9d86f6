"""A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode), for the test suite's fixture and
for `make cluster-test`: one way to start it."""

from __future__ import annotations

import logging
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(bucket: str):
    """(server, endpoint URL) of a started moto S3 server holding an empty ``bucket``. Callers
    stop it with ``server.stop()``; credentials come from the environment (any test values)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's access log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return server, endpoint
