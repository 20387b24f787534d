"""The machine and the model: read bandwidth, CPU, versions, and the weight
bytes a decoding step reads in each dtype."""

import datetime
import json
import math
import os
import pathlib
import platform
import struct
import subprocess
import time

import torch

GIB = 1 << 30
# Bytes per parameter of a weight matrix, and per entry of a 1-D tensor (norm scales).
MATRIX_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "int8": 1}
VECTOR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "int8": 2}
# int8 is weight-only with one bf16 scale per output channel (row).
INT8_SCALE_BYTES = 2


def read_bandwidth(device, repeats=7):
    """Best-of-`repeats` GB/s of summing a 1 GiB f32 tensor with the current
    thread count (torch.sum reads the tensor once). Returns (best, samples)."""
    data = torch.ones(GIB // 4, dtype=torch.float32, device=device)
    samples = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        data.sum().item()
        sync(device)
        samples.append(GIB / (time.perf_counter() - started) / 1e9)
    del data
    return max(samples), samples


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def safetensors_shapes(model_dir):
    """{tensor name: shape} from the safetensors files' headers (no weights read)."""
    shapes = {}
    for path in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    return shapes


def weight_bytes_per_token(model_dir, dtype):
    """Bytes of weights one decoding step of one sequence reads: every tensor but
    the embedding table, of which a step reads one row (negligible, left out).
    The KV cache is left out too (about 1% of f32 weights at 200 positions)."""
    total = 0
    for name, shape in safetensors_shapes(model_dir).items():
        if name.endswith("embed_tokens.weight"):
            continue
        count = math.prod(shape)
        if len(shape) >= 2:
            total += count * MATRIX_BYTES[dtype]
            if dtype == "int8":
                total += shape[0] * INT8_SCALE_BYTES
        else:
            total += count * VECTOR_BYTES[dtype]
    return total


def cpu_model():
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags_of_note():
    """The instruction sets that decide which kernels libtorch can use."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ""
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"]
    return " ".join(flag for flag in wanted if flag in flags)


def gpu_name(device):
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_name(torch.device(device))


def git_revision(root):
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with local changes)" if dirty else "")


def binary_built_at(binary):
    try:
        stamp = os.stat(binary).st_mtime
    except OSError:
        return "missing"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def versions():
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
