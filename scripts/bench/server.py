"""A medboxd process serving the benchmark model, and the Python stubs to talk to it.

The stubs are generated from the project's proto/ files with grpcio-tools at
run time (as the end-to-end tests do), so the benchmark always speaks the
protocol of the tree it runs in.
"""

import importlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300
MODEL_NAME = "bench"


class NotSupported(Exception):
    """medboxd cannot do what a figure needs (a dtype it cannot load, a field it refuses)."""


def generate_stubs(out_dir):
    """Compiles proto/ into out_dir and returns (inference_pb2, inference_pb2_grpc)."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    status = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", *protos])
    if status != 0:
        raise RuntimeError("grpc_tools.protoc failed on proto/")
    sys.path.insert(0, str(out_dir))
    return (importlib.import_module("medbox.v1.inference_pb2"),
            importlib.import_module("medbox.v1.inference_pb2_grpc"))


def default_binary():
    explicit = os.environ.get("MEDBOX_BIN_DIR")
    if explicit:
        return pathlib.Path(explicit) / "medboxd"
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return pathlib.Path(target) / "release" / "medboxd"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(text):
    """A TOML value given on the command line: kept as is when it parses as a
    number, boolean, array or quoted string, else quoted."""
    if text in ("true", "false") or text[:1] in "[\"'" or text.replace(".", "", 1).lstrip("-").isdigit():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(addr, data_dir, model_dir, dtype, device, extra_model_keys):
    model_keys = "".join(f"{key} = {toml_value(value)}\n" for key, value in extra_model_keys)
    return (
        f'[server]\nlisten = "{addr}"\nmetrics_listen = ""\nshutdown_grace_seconds = 5\n'
        f'[storage]\ndata_dir = "{data_dir}"\n'
        # Loopback only, so the benchmark needs no key; the limits are raised
        # so that no figure measures the rate limiter.
        "[auth]\nenabled = false\n"
        "[limits]\nrequests_per_second = 100000.0\nburst = 100000\nrequest_timeout_seconds = 3600\n"
        f'[[models]]\nname = "{MODEL_NAME}"\npath = "{model_dir}"\ndtype = "{dtype}"\n'
        f'device = "{device}"\n{model_keys}'
    )


class Medboxd:
    """medboxd serving one model in one dtype, pinned to the benchmark's CPUs."""

    def __init__(self, binary, model_dir, dtype, device, cpus, pb, extra_model_keys=()):
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"medbox-bench-{dtype}-"))
        self.addr = f"127.0.0.1:{free_port()}"
        config = self.workdir / "medbox.toml"
        config.write_text(config_text(self.addr, self.workdir / "data", model_dir, dtype, device,
                                      extra_model_keys))
        self.log_path = self.workdir / "medboxd.log"
        self.log = open(self.log_path, "wb")
        env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)), MKL_NUM_THREADS=str(len(cpus)))
        self.proc = subprocess.Popen([str(binary), "--config", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                     preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.channel = grpc.insecure_channel(self.addr, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb[1].InferenceStub(self.channel)
        self.pb = pb[0]
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        """Waits until the model is loaded; NotSupported if it failed to load."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotSupported(f"medboxd exited with {self.proc.returncode}: {self.last_log_line()}")
            try:
                models = self.stub.ListModels(self.pb.ListModelsRequest(), timeout=2).models
            except grpc.RpcError:
                models = []
            state = next((m for m in models if m.name == MODEL_NAME), None)
            if state is not None and state.state == "ready":
                return
            if state is not None and state.state == "failed":
                raise NotSupported(f"model failed to load: {state.error}")
            time.sleep(0.2)
        raise RuntimeError(f"the model was not ready within {STARTUP_TIMEOUT_S}s:\n{self.log_text()}")

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def last_log_line(self):
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def stop(self):
        """Stops medboxd; its folder is removed, unless it exited with an error
        (then its log stays there for a look)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.log.close()
        if self.proc.returncode == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"bench: medboxd exited with {self.proc.returncode}; its log: {self.log_path}",
                  file=sys.stderr, flush=True)
