"""medbox against Hugging Face transformers on the benchmark model, in one run.

Run through scripts/bench.sh, which makes the model first. For each dtype it
starts a medboxd serving the model in that dtype and loads the reference in
the same dtype (f32 for int8, which transformers does not run), then measures
every figure on both sides in turn (see suite.py), with both sides pinned to
the same CPUs and the same thread count.
"""

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time

import torch

from . import machine
from .hf_reference import TORCH_DTYPES, HfReference
from .medbox_client import MedboxClient
from .prompts import PromptMaker
from .server import ROOT, Medboxd, NotSupported, default_binary, generate_stubs
from .suite import Suite, Workload, log
from .table import Results, dtype_rows, render

DTYPES = ("f32", "bf16", "f16", "int8")
QUICK = Workload(new_tokens=32, runs=1, warmups=0)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, no per-figure warm-up, 32 new tokens instead of 128 (for development)")
    parser.add_argument("--dtype", default="f32,bf16,int8",
                        help="comma-separated medboxd dtypes (default f32,bf16,int8)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each side (default 2)")
    parser.add_argument("--runs", type=int, help="runs per figure after the warm-up (default 3; --quick 1)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this file")
    parser.add_argument("--model", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("MEDBOX_CACHE", pathlib.Path.home() / ".cache/medbox"))
                        / "models" / "bench-llama-768")
    parser.add_argument("--medboxd", type=pathlib.Path, default=default_binary())
    parser.add_argument("--model-key", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra key of the [[models]] entry medboxd is given (repeatable), "
                             "e.g. max_waiting=128")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtype: {unknown or 'none'} not among {', '.join(DTYPES)}")
    if any("=" not in item for item in args.model_key):
        parser.error("--model-key wants KEY=VALUE")
    args.model_keys = [tuple(item.split("=", 1)) for item in args.model_key]
    work = QUICK if args.quick else Workload()
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be ≥ 1")
        work = Workload(**{**work.__dict__, "runs": args.runs})
    args.work = work
    args.medboxd_builds = set()  # the binary's build time at each start
    return args


def pin_cpus(threads):
    """The first `threads` CPUs this process may use; both sides run on them."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(allowed):
        raise SystemExit(f"bench: --threads {threads}, but {len(allowed)} CPUs are available")
    cpus = set(allowed[:threads])
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    return cpus


def local_tokenize(model_dir):
    """medboxd's tokenizer read with the same library (the tokenizers crate's
    Python binding), for when no medboxd could serve the model."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text: tokenizer.encode(text, add_special_tokens=True).ids


def start_medboxd(args, dtype, cpus, pb, results):
    """(server, None), or (None, the cell to show) when this medboxd cannot serve the dtype."""
    if not args.medboxd.is_file():
        return None, f"not measured {results.note(f'no medboxd at {args.medboxd}')}"
    log(f"{dtype}: starting medboxd")
    args.medboxd_builds.add(machine.binary_built_at(args.medboxd))
    try:
        return Medboxd(args.medboxd, args.model, dtype, medboxd_device(args.device), cpus, pb, args.model_keys), None
    except NotSupported as reason:
        log(f"{dtype}: medboxd cannot serve it: {reason}")
        return None, f"not supported {results.note(f'{dtype}: {reason}')}"


def medboxd_device(device):
    return "cuda:0" if device == "cuda" else device


def warm_up(client, hf, prompts):
    """One short generation on each side, so that no figure pays for first use."""
    text, ids = prompts.prompt(32, seed=1)
    if client is not None:
        client.stream(text, len(ids), 8)
    if hf is not None:
        hf.stream(ids, 8)


def bench_dtype(args, dtype, cpus, pb, results, hf_done):
    """Every figure of one dtype; the reference runs unless its dtype was done."""
    hf_dtype = dtype if dtype in TORCH_DTYPES else "f32"
    server, missing = start_medboxd(args, dtype, cpus, pb, results)
    if server is None:
        results.unservable[dtype] = missing
        if hf_dtype in hf_done:
            return hf_dtype  # nothing left to measure in this dtype
    hf = None
    try:
        client = MedboxClient(server) if server else None
        prompts = PromptMaker(client.tokenize if client else local_tokenize(args.model))
        if hf_dtype not in hf_done:
            log(f"{dtype}: loading the reference in {hf_dtype}")
            hf = HfReference(args.model, hf_dtype, args.device)
            hf_done.add(hf_dtype)
        if dtype != hf_dtype:
            log(f"{dtype}: the reference is transformers in {hf_dtype}")
        warm_up(client, hf, prompts)
        Suite(results, dtype, hf_dtype, args.work, prompts, client, missing, hf).run_all()
    finally:
        if server is not None:
            server.stop()
        if hf is not None:
            hf.close()
    return hf_dtype


def header(args, cpus, bandwidth, samples, results, started):
    versions = machine.versions()
    spread, where = results.largest_spread()
    device = args.device if args.device == "cpu" else f"cuda ({machine.gpu_name('cuda')})"
    work = args.work
    lines = [
        f"medbox benchmark, {datetime.date.today().isoformat()}"
        + (f" — QUICK RUN ({work.runs} run(s), {work.new_tokens} new tokens): for development, not for the record"
           if args.quick else ""),
        "",
        f"- machine: {machine.cpu_model()} ({machine.cpu_flags_of_note()}), {len(cpus)} threads on CPUs "
        f"{','.join(map(str, sorted(cpus)))} for each side, device {device}",
        f"- read bandwidth ({len(cpus)} threads, 1 GiB sum, best of {len(samples)}): {bandwidth:.1f} GB/s "
        f"(runs {min(samples):.1f}–{max(samples):.1f})",
        f"- torch {versions['torch']}, transformers {versions['transformers']}, Python {versions['python']}",
        f"- medboxd {args.medboxd} built {' and '.join(sorted(args.medboxd_builds)) or 'never started'}"
        + (" (rebuilt during the run)" if len(args.medboxd_builds) > 1 else "")
        + f", tree {machine.git_revision(ROOT)}",
        f"- model {args.model.name}: Llama, hidden 768, 12 layers, 12 heads, 4 KV heads, FFN 2048, vocab 32000",
        f"- greedy, EOS ignored, {work.new_tokens} new tokens; cells: median (min–max) of {work.runs} run(s)"
        + (f" after {work.warmups} warm-up" if work.warmups else "")
        + "; ratio: medbox's speed over HF's (> 1: medbox faster), from the medians",
        f"- noise: the widest spread of a figure was "
        + (f"{100 * spread:.0f}% of its median ({where[0]} {where[1]} {where[2]})" if spread is not None
           else "not measured (1 run)"),
        f"- the whole run took {(time.monotonic() - started) / 60:.1f} min",
    ]
    return lines


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    cpus = pin_cpus(args.threads)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"bench: no model at {args.model} (scripts/make-bench-model makes it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch sees no GPU")
    if not args.medboxd.is_file():
        log(f"WARNING: no medboxd at {args.medboxd}; only the reference will be measured")
    log(f"measuring read bandwidth with {len(cpus)} threads")
    bandwidth, samples = machine.read_bandwidth(args.device)
    log(f"read bandwidth: {bandwidth:.1f} GB/s")
    results = Results()
    with tempfile.TemporaryDirectory(prefix="medbox-bench-stubs-") as stubs:
        pb = generate_stubs(stubs)
        hf_done, rows = set(), []
        # int8 last: it compares with transformers in f32, measured once.
        order = sorted(args.dtypes, key=lambda d: d == "int8")
        hf_dtypes = {}
        for dtype in order:
            hf_dtypes[dtype] = bench_dtype(args, dtype, cpus, pb, results, hf_done)
    bytes_per_token = {d: machine.weight_bytes_per_token(args.model, d) for d in DTYPES}
    bound = {"bytes": bytes_per_token, "gbps": bandwidth}
    for dtype in order:
        elsewhere = hf_dtypes[dtype] != dtype and hf_dtypes[dtype] in order
        rows.extend(dtype_rows(results, dtype, hf_dtypes[dtype], args.work.new_tokens, bound, elsewhere))
    text = render(header(args, cpus, bandwidth, samples, results, started), rows, results.notes)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0
