"""One prepared check of the CUDA path, to run unattended whenever a GPU is lent.

Why: the pipeline is for researchers with GPUs, yet CI has none, so its CUDA path (bf16
autocast in the loss stage, the gradients stage's device-memory plan, Dask workers on CUDA,
the GPU modes of the benchmarks) runs nowhere else. This script runs all of it in one go on
one H100 or H200, within --budget-s (470 s, under 8 minutes), and
writes every number into one folder: ``gpu_check.json`` (all numbers, the targets with
pass/fail), ``gpu_check.log`` (everything each part printed) and ``pytest_gpu.xml``.

Parts, in order, each in a child process of its own with its own time limit; a part that
fails or runs out of time is recorded as such in the JSON, and the next part runs:

- ``env``: ``nvidia-smi`` and torch's view of the device, so the numbers carry their machine;
- ``wheels``: what the GPU box lacks (dask, distributed, leidenalg, igraph and their small
  dependencies),
  installed from the prepared, git-ignored folder bench/wheels/ with ``pip --no-index``;
  never torch: the box's CUDA build stays as it is;
- ``pytest``: ``pytest -m gpu``: losses, gradients, the projection and a Dask LocalCluster
  on CUDA against their CPU fp32 references (tests/test_losses.py, test_gradients.py,
  test_projection.py);
- ``matmul``: the dense bf16 and fp32 peaks of this device, measured with large products;
- ``losses``: bench_losses.py's methods at the pythia-160m, 410m and 1b shapes: ours (bf16,
  batched) against the paper's per-document batch-1 fp32 loop, tokens/s, the fraction of
  the measured bf16 peak, max and mean |Δloss| bf16 vs fp32;
- ``gradients``: at the pythia-70m and 160m shapes (context 1024), ours (the stage's
  defaults: sjlt k = 8192, ``memory_gb`` 8) against one forward + backward per target and
  against the paper's blocks of 250 at N = 10,000 (its loop timed on one block at 70m, its
  count of backward passes for the rest; at 160m two blocks' fp32 gradients do not fit in
  GPU memory, so its time comes from the per-target forward + backward), the projection's
  cosine error against exact gradients, and peak allocated memory against ``memory_gb``;
- ``planted``: the planted suite's stages, ``python -m stages.<name>`` with dvc.yaml's
  commands, once with ``suite.device: cuda`` and once on the CPU, and validate's ARI of
  both. To keep to the time limit the suite has one model, the default's largest
  (planted-w48, the QDG model) at its last revision; the language, corpus and QDG settings
  are the default's. The two runs share the trained suite and its corpus and run side by
  side, so their stage times are not each alone. Similarity and clustering have no device:
  they run on the CPU, on the CUDA run's gradients.

The targets are judged from those numbers and written into the JSON's
"targets", each with its value and pass (true, false, or null where its part did not
measure it).

    bash bench/gpu_check.sh                            # on the GPU box; results in $OUT (or --out DIR)
    python bench/gpu_check.py --prepare-wheels         # where there is network: fills bench/wheels/
    python bench/gpu_check.py --dry-run --out DIR      # CPU, tiny shapes, about a minute: the same code
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

WHEELS = ROOT / "bench" / "wheels"
WHEELS_MAX_BYTES = 64 * 2**20
# What the check installs on a GPU box that has torch, transformers, numpy, pandas, pyarrow,
# scikit-learn, scipy, matplotlib and tqdm: Dask, for the LocalCluster test on CUDA; Leiden
# (python-igraph), which the validate stage scores beside the main clustering.
INSTALL = ("dask", "distributed", "leidenalg", "igraph")
# Their dependencies, at this environment's versions: pip takes one only where the box's own
# copy is missing or too old, so the install works offline whatever the box holds.
DEPENDENCIES = ("partd", "locket", "tblib", "tornado", "zict", "toolz", "cloudpickle", "click", "fsspec", "msgpack",
                "sortedcontainers", "psutil", "jinja2", "markupsafe", "pyyaml", "packaging", "texttable")
# The box's interpreter: wheels are fetched for it, not for this machine's.
BOX_PYTHON, BOX_ABI, BOX_PLATFORM = "3.12", "cp312", "manylinux_2_28_x86_64"
NEVER_INSTALL = ("torch", "nvidia", "triton")  # the box's CUDA stack: a wheel of these in the folder is refused

PAPER_N, PAPER_BLOCK = 10_000, 250  # the paper's QDG: 10,000 samples, gradients in blocks of 250


class CheckError(Exception):
    """A part cannot go on; its one-line message goes into the JSON."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class GradShape:
    """One gradients benchmark: bench_gradients.py's shape `shape` with `n` samples for ours,
    `n_ref` for one forward + backward per target, the paper's loop timed on one block of
    `block` samples (0: not timed, estimated from the per-target time), and the projection
    checked against exact gradients on `cos_n` samples (0: not checked)."""

    shape: str
    n: int
    n_ref: int
    block: int
    cos_n: int
    context: Optional[int] = None  # default: the shape's


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every part: FULL on a GPU, DRY for the CPU dry run."""

    device: str
    budget_s: float  # the whole check
    part_budget_s: dict
    matmul_n: int
    matmul_s: float
    loss_args: tuple  # bench_losses.py's command line
    grad_shapes: tuple
    planted: dict  # params.yaml sections merged over the repository's
    threads: int = 0  # torch threads in the parts (0: torch's default)


PLANTED_MODEL = "planted-w48"
FULL = Plan(
    device="cuda",
    budget_s=470,
    part_budget_s=dict(env=30, wheels=60, pytest=90, matmul=30, losses=110, gradients=120, planted=170),
    matmul_n=8192,
    matmul_s=2.0,
    loss_args=("--shapes", "160m,410m,1b", "--n-docs", "500"),
    grad_shapes=(
        GradShape("pythia-70m", n=1000, n_ref=100, block=PAPER_BLOCK, cos_n=256),
        GradShape("pythia-160m", n=500, n_ref=50, block=0, cos_n=0),
    ),
    planted=dict(
        planted=dict(widths=[48]),
        suite=dict(models=[PLANTED_MODEL], revisions=["step3000"],
                   sources={PLANTED_MODEL: f"cache/planted/models/{PLANTED_MODEL}"}),
        losses=dict(scheduler="inprocess", progress=False),
        select=dict(model=PLANTED_MODEL, revision="step3000"),
        gradients=dict(scheduler="inprocess", progress=False),
    ),
)
DRY = Plan(
    device="cpu",
    budget_s=900,
    part_budget_s=dict(env=60, wheels=120, pytest=240, matmul=60, losses=180, gradients=180, planted=300),
    matmul_n=256,
    matmul_s=0.2,
    loss_args=("--shapes", "14m", "--n-docs", "6", "--max-len", "64"),
    grad_shapes=(
        GradShape("planted", n=48, n_ref=8, block=16, cos_n=32),
        GradShape("pythia-14m", n=12, n_ref=4, block=0, cos_n=0, context=32),
    ),
    planted=dict(
        planted=dict(n_quanta=12, n_args=4, n_answers=4, n_filler=16, doc_len=32, quanta_per_doc=4, n_eval_docs=40,
                     widths=[24], n_layers=1, n_heads=2, steps=40, batch_size=16, warmup_steps=5, seed=3, threads=1),
        suite=dict(models=["tiny"], revisions=["step40"], sources={"tiny": "cache/planted/models/tiny"}),
        corpus=dict(max_len=32),
        losses=dict(batch_tokens=512, scheduler="inprocess", progress=False),
        select=dict(model="tiny", revision="step40", max_loss=5.0, n_samples=150),
        gradients=dict(k=256, scheduler="inprocess", shard_samples=64, progress=False),
        cluster=dict(n_clusters=[4, 3], n_init=2),
    ),
    threads=1,
)


# --------------------------------------------------------------------------- results


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def write_json(path: Path, data: Any) -> None:
    """Write `data` whole or not at all (a temp file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


class Record(dict):
    """A part's results, rewritten to its file after every change (from any thread), so a part
    stopped by its time limit leaves what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.lock = threading.RLock()

    def __setitem__(self, key: str, value: Any) -> None:
        with self.lock:
            super().__setitem__(key, value)
            write_json(self.path, dict(self))


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


def read_part(out: Path, name: str) -> dict:
    """The results a part wrote into `out` (empty when it wrote none)."""
    path = out / "parts" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- parts


def _command_text(argv: list[str], timeout: float = 30) -> dict:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "error": one_line(e)}
    return {"ok": r.returncode == 0, "exit_code": r.returncode, "text": (r.stdout + r.stderr).strip()}


def part_env(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """The machine: nvidia-smi, torch's build and device properties, the library versions."""
    import torch

    rec["python"] = sys.version.split()[0]
    rec["executable"] = sys.executable
    rec["platform"] = platform.platform()
    rec["cpu"] = _common.machine()
    smi = _command_text(["nvidia-smi"])
    print(smi.get("text") or smi.get("error"))
    rec["nvidia_smi"] = smi
    rec["nvidia_smi_query"] = _command_text(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory,power.limit,"
         "temperature.gpu,persistence_mode", "--format=csv"])
    rec["torch"] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({
            "name": p.name, "total_memory_bytes": p.total_memory, "multi_processor_count": p.multi_processor_count,
            "compute_capability": f"{p.major}.{p.minor}", "l2_cache_bytes": getattr(p, "L2_cache_size", None),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    rec["devices"] = devices
    names = ("transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "scipy", "scikit-learn",
             "matplotlib", "pytest", "dask", "distributed")
    rec["packages"] = {n: _version(n) for n in names}
    print(json.dumps({"torch": rec["torch"], "devices": devices, "packages": rec["packages"]}, indent=1))
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckError(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda})")


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def wheel_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


def part_wheels(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """Install what the box lacks from bench/wheels/, offline; torch is never touched.

    In the dry run nothing is installed: where the folder exists, ``pip install --dry-run``
    checks that it resolves.
    """
    files = wheel_files(WHEELS)
    rec["folder"] = str(WHEELS)
    rec["wheels"] = [f.name for f in files]
    rec["size_bytes"] = sum(f.stat().st_size for f in files)
    banned = [f.name for f in files if f.name.lower().startswith(NEVER_INSTALL)]
    if banned:
        raise CheckError(f"{WHEELS} holds {', '.join(banned)}: the GPU box's own CUDA build must stay; remove them")
    missing = [n for n in INSTALL if not importable(n)]
    rec["missing_before"] = missing
    torch_before = _version("torch")
    rec["torch_version"] = torch_before
    requirements = WHEELS / "requirements.txt"
    if not files or not requirements.exists():
        if missing:
            raise CheckError(f"{', '.join(missing)} not installed and {WHEELS} is empty: run "
                             "`python bench/gpu_check.py --prepare-wheels` where there is network, and carry the folder")
        rec["action"] = "none: every package is importable and there is no wheel folder"
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch_before}\n")  # pins the installed build: pip may not replace it
        constraints = f.name
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS), "--disable-pip-version-check",
           "--no-warn-script-location", "-c", constraints, "-r", str(requirements)]
    if dry_run or not missing:
        cmd.insert(4, "--dry-run")
        rec["action"] = "pip install --dry-run: the folder resolves" + ("" if missing else "; nothing was missing")
    else:
        rec["action"] = f"pip install of {', '.join(missing)} and what they need from the folder"
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(constraints)
    print(r.stdout + r.stderr)
    rec["pip_exit_code"] = r.returncode
    rec["pip_output_tail"] = (r.stdout + r.stderr).strip().splitlines()[-5:]
    if r.returncode:
        raise CheckError(f"pip install from {WHEELS} failed (exit {r.returncode}): {rec['pip_output_tail'][-1:]}")
    importlib.invalidate_caches()
    rec["missing_after"] = [n for n in INSTALL if not importable(n)]
    rec["installed"] = {n: _version(n) for n in INSTALL}
    if _version("torch") != torch_before:
        raise CheckError(f"torch changed from {torch_before} to {_version('torch')} during the install")


def part_pytest(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """`pytest -m gpu` over the whole suite; counts and failures from its JUnit XML."""
    xml = out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    rec["command"] = " ".join(["python", *cmd[1:]])
    print(rec["command"], flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(r.stdout + r.stderr)
    rec["exit_code"] = r.returncode
    if r.returncode not in (0, 1) or not xml.exists():  # 1: tests failed (counted below); anything else: no run
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:]
        raise CheckError(f"pytest did not run the tests (exit {r.returncode}): {tail}")
    suites = ET.parse(xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    rec["collected"] = count["tests"]
    rec["failed"] = count["failures"]
    rec["errors"] = count["errors"]
    rec["skipped"] = count["skipped"]
    rec["passed"] = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    bad = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                bad.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                            "message": (el.get("message") or "")[:300]})
    rec["failures"] = bad


def part_matmul(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """The device's dense peaks: (n, n) @ (n, n) in bf16 and in fp32 (TF32 as torch leaves it)."""
    import torch
    from bench_losses import PEAK_BF16_TFLOPS

    rec["n"] = plan.matmul_n
    rec["seconds_each"] = plan.matmul_s
    rec["bf16_tflops"] = _common.matmul_tflops(plan.matmul_s, plan.matmul_n, "bfloat16", plan.device)
    rec["fp32_tflops"] = _common.matmul_tflops(plan.matmul_s, plan.matmul_n, "float32", plan.device)
    rec["fp32_allows_tf32"] = torch.backends.cuda.matmul.allow_tf32
    sheet = None
    if plan.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        sheet = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rec["datasheet_bf16_tflops"] = sheet
    print(f"bf16 {rec['bf16_tflops']:.1f} TFLOP/s, fp32 {rec['fp32_tflops']:.1f} TFLOP/s (n = {plan.matmul_n}); "
          f"datasheet bf16 {sheet}")


def part_losses(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """bench_losses.py's paper loop, its no-grad variant and ours, shape by shape."""
    import bench_losses

    peak = read_part(out, "matmul").get("bf16_tflops")
    argv = ["--device", plan.device, *plan.loss_args]
    if peak:
        argv += ["--peak-tflops", str(peak)]
    rec["command"] = "python bench/bench_losses.py " + " ".join(argv)
    rec["peak_bf16_tflops_from"] = "the matmul part (measured)" if peak else None
    args = bench_losses.parse_args(argv)
    docs = bench_losses.make_docs(args)
    lengths = [len(d) for d in docs]
    rec["docs"] = {"n": len(docs), "tokens_scored": sum(lengths) - len(docs), "mean_length": sum(lengths) / len(docs),
                   "batch_tokens": args.batch_tokens, "logits_chunk": args.logits_chunk}
    shapes = {}
    for shape in args.shapes:
        print(f"losses: pythia-{shape} shape ...", flush=True)
        try:
            row = bench_losses.bench_shape(shape, docs, args)
        except Exception as e:  # the next shape still runs
            traceback.print_exc()
            row = {"error": one_line(e)}
        shapes[shape] = row
        rec["shapes"] = shapes
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
        free_device_memory()


def part_gradients(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """Ours against one forward + backward per target and against the paper's blocks of 250."""
    shapes = {}
    for gs in plan.grad_shapes:
        print(f"gradients: {gs.shape} shape ...", flush=True)
        row: dict = {}
        shapes[gs.shape] = row
        try:
            _gradients_shape(gs, plan, out, row, lambda: rec.__setitem__("shapes", shapes))
        except Exception as e:  # the next shape still runs
            traceback.print_exc()
            row["error"] = one_line(e)
        rec["shapes"] = shapes
        free_device_memory()


def _gradients_shape(gs: GradShape, plan: Plan, out: Path, row: dict, save: Callable[[], None]) -> None:
    import bench_gradients as bg
    import numpy as np
    from bench_real_model import per_sample_reference

    from pipeline.core.config import GradientsConfig
    from pipeline.core.resources import Peak
    from pipeline.qdg import gradients

    device, k = plan.device, 8192
    s = bg.SHAPES[gs.shape]
    context = gs.context or s["context"]
    cfg = GradientsConfig(projection="sjlt", k=k)  # the stage's defaults, memory_gb included
    model = bg.make_model(gs.shape, device, seed=0)
    params = gradients.select_params(model, cfg.include, cfg.exclude)
    for _, p in params:
        p.requires_grad_(True)
    p_selected = sum(p.numel() for _, p in params)
    docs, doc_ids, positions = bg.make_samples(gs.n, context, s["vocab"], 4.0, seed=0)
    tokens_by_doc = {int(d): docs[d] for d in np.unique(doc_ids)}
    row.update(n=gs.n, context=context, p_selected=p_selected, k=k, memory_gb=cfg.memory_gb,
               mean_target_position=float(positions.mean()))
    calibrations: dict = {}

    # ours, the stage's way: the memory plan calibrated once (untimed, with the longest target
    # among the warm-up samples), then every sample -> C; peak as memory_gb counts it
    warm = np.unique(np.r_[int(positions.argmax()), np.arange(min(16, gs.n))])
    bg.our_similarity(model, docs, doc_ids[warm], positions[warm], "sjlt", k, calibrations=calibrations)
    stats: dict = {}
    with Peak(device) as peak:
        t0 = time.perf_counter()
        C = bg.our_similarity(model, docs, doc_ids, positions, "sjlt", k, stats, calibrations=calibrations)
        seconds = time.perf_counter() - t0
    del C
    fp32_peak = read_part(out, "matmul").get("fp32_tflops")
    useful = bg.useful_flops(model, positions, k) / seconds / 1e12
    row["ours"] = {
        "seconds": seconds, "samples_per_s": gs.n / seconds, "grad_s": stats["grad_s"], "matmul_s": stats["matmul_s"],
        "gradient_samples_per_s": gs.n / stats["grad_s"], "bad_samples": stats["bad_samples"],
        "peak_bytes": peak.bytes, "peak_is": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "VmHWM",
        "peak_over_memory_gb": peak.bytes / (cfg.memory_gb * 2**30), "useful_tflops": useful,
        "fraction_of_fp32_matmul": useful / fp32_peak if fp32_peak else None,
    }
    save()
    free_device_memory()

    # one forward + backward per target, projected by the same projector
    projector = gradients.build_projector(params, cfg)
    ref_ids, ref_pos = doc_ids[: gs.n_ref], positions[: gs.n_ref]
    per_sample_reference(model, docs, ref_ids[:1], ref_pos[:1], projector, params)  # untimed: first-call costs
    t0 = time.perf_counter()
    ref, fb = per_sample_reference(model, docs, ref_ids, ref_pos, projector, params)
    ref_seconds = time.perf_counter() - t0
    ours = gradients.compute_gradients(model, {"doc_id": ref_ids, "pos": ref_pos}, tokens_by_doc, cfg, projector,
                                       params=params, calibrations=calibrations).grads
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    row["per_target"] = {"n": gs.n_ref, "seconds": ref_seconds, "samples_per_s": gs.n_ref / ref_seconds,
                         "forward_backward_s": fb, "min_cosine_vs_ours": float(cos.min())}
    row["speedup_vs_per_target"] = row["ours"]["gradient_samples_per_s"] / row["per_target"]["samples_per_s"]
    save()
    del ref, ours, projector  # the projector's table cache too
    free_device_memory()

    # the paper's blocks of 250 at N = 10,000: its count of backward passes and block products
    passes, products = bg.reference_counts(PAPER_N, PAPER_BLOCK)
    blocked: dict = {"n": PAPER_N, "block": PAPER_BLOCK, "backward_passes": passes, "block_products": products}
    if gs.block:
        st: dict = {}
        b = min(gs.block, rows_that_fit(p_selected, device, copies=3))  # two blocks and one normalised copy
        bg.paper_similarity(model, docs, doc_ids[:2], positions[:2], 2)  # untimed: first-call costs
        bg.paper_similarity(model, docs, doc_ids[:b], positions[:b], b, "context", st)
        per_pass = st["grad_s"] / st["backward_passes"]
        per_product = st["matmul_s"] * (PAPER_BLOCK / b) ** 2  # one (b x b) product timed; (250 x 250) scaled
        blocked.update(method=f"the paper's loop timed on one block of {b} ({st['backward_passes']} backward passes), "
                              "scaled by its counts at N = 10,000", timed_block=b, timed_passes=st["backward_passes"])
    else:
        per_pass, per_product = fb / gs.n_ref, 0.0
        need = 2 * PAPER_BLOCK * p_selected * 4
        blocked.update(method="one forward + backward per target times its backward passes at N = 10,000; block "
                              f"products left out (a lower bound): two blocks' fp32 gradients take {need / 2**30:.0f} GiB",
                       timed_block=0)
    blocked.update(seconds_per_backward_pass=per_pass, seconds=passes * per_pass + products * per_product)
    blocked["samples_per_s"] = PAPER_N / blocked["seconds"]
    row["blocks_of_250"] = blocked
    row["speedup_vs_blocks_of_250"] = row["ours"]["samples_per_s"] / blocked["samples_per_s"]
    save()
    free_device_memory()

    # the projection's cosine error against the exact gradients of the first cos_n samples
    if gs.cos_n:
        n = min(gs.cos_n, gs.n, rows_that_fit(p_selected, device, copies=2))  # the host's array and the device's
        with tempfile.TemporaryDirectory(prefix="gpu_check_cos_") as tmp:
            for method, projection in (("ours-exact", "none"), ("ours-sjlt", "sjlt")):
                C = bg.our_similarity(model, docs, doc_ids[:n], positions[:n], projection, k)
                np.save(Path(tmp) / f"{method}.npy", C.cpu().numpy())
                del C
                free_device_memory()
            agree = bg.agreement(Path(tmp), ["ours-exact", "ours-sjlt"], n)
        row["projection_vs_exact"] = {"n": n, "pairs": n * (n - 1) // 2, "mae": agree["sjlt_mae"],
                                      "p999": agree["sjlt_p999"], "max": agree["sjlt_max"]}
        save()
    del model


def rows_that_fit(p_selected: int, device: str, copies: int) -> int:
    """Exact fp32 gradient rows of which `copies` copies fit in 80% of the free memory, on the
    host and on the device."""
    import torch

    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if device.startswith("cuda"):
        free = min(free, torch.cuda.mem_get_info()[0])
    return max(2, int(0.8 * free / copies // (4 * p_selected)))


def planted_params(sections: dict, device: str) -> dict:
    """The repository's params.yaml with `sections` merged in, section by section, on `device`."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, section in sections.items():
        params[name].update(section)
    params["suite"]["device"] = device
    return params


def part_planted(rec: Record, plan: Plan, out: Path, dry_run: bool) -> None:
    """The planted suite's QDG stages on the device and on the CPU; validate's ARI of both."""
    import yaml
    from bench_real_quality import run_stages

    model = plan.planted["select"]["model"]
    revision = plan.planted["select"]["revision"]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_planted_"))
    runs = {"device": (plan.device, work / "device"), "cpu": ("cpu", work / "cpu")}
    rec["settings"] = plan.planted
    chains: dict = {}
    try:
        for name, (device, d) in runs.items():
            d.mkdir()
            (d / "params.yaml").write_text(yaml.safe_dump(planted_params(plan.planted, device), sort_keys=False))
            chains[name] = {"device": device, "stages": {}}
        rec["chains"] = chains

        def stage(name: str, chain: str) -> bool:
            print(f"[{chain} on {runs[chain][0]}] {name} ...", flush=True)
            t0 = time.perf_counter()
            error = None
            try:
                run_stages(runs[chain][1], model, [name])
            except Exception as e:
                error = e
                print(f"[{chain}] {name} failed:\n{e}", flush=True)
            with rec.lock:  # the other chain's thread writes the same record
                chains[chain]["stages"][name] = {"seconds": time.perf_counter() - t0, "ok": error is None}
                if error is not None:
                    chains[chain]["stages"][name]["error"] = one_line(error)
                    chains[chain]["error"] = f"stage {name} failed"
                rec["chains"] = chains
            return error is None

        # the suite and its corpus once (training runs on the CPU whatever the device), then shared
        first, second = runs["device"][1], runs["cpu"][1]
        if not all(stage(s, "device") for s in ("check_params", "planted", "corpus")):
            raise CheckError("the planted suite or its corpus could not be built")
        for sub in ("cache/planted", "cache/corpus"):
            shutil.copytree(first / sub, second / sub)
        qdg = ("losses", "select", "gradients", "similarity", "cluster", "validate")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two chains at once, each stage in its own process
            list(pool.map(lambda chain: all(stage(s, chain) for s in qdg), ["device", "cpu"]))
        _compare_planted(rec, runs, model, revision)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def stage_dir(d: Path) -> Iterator[None]:
    """Read outputs as the stages that wrote them see them: from their folder, with their run
    facts (speeds, peaks) under its logs/, where bench_real_quality.run_stages puts them."""
    cwd, log = os.getcwd(), os.environ.get("QUANTA_RUN_LOG")
    os.chdir(d)
    os.environ["QUANTA_RUN_LOG"] = str(d / "logs")
    try:
        yield
    finally:
        os.chdir(cwd)
        if log is None:
            os.environ.pop("QUANTA_RUN_LOG", None)
        else:
            os.environ["QUANTA_RUN_LOG"] = log


def _chain_results(d: Path, model: str, revision: str) -> tuple[dict, Any, Optional[set]]:
    """(validate's numbers and the stages' run facts, the loss table, the selected (doc_id, pos)) of one chain."""
    from pipeline.core import files
    from pipeline.lm import partitions
    from pipeline.qdg.selection import read_samples

    res: dict = {}
    table, samples = None, None
    with stage_dir(d):
        if Path("metrics/validate.json").exists():
            v = files.read_json("metrics/validate.json")
            res.update(ari=v["qdg"]["ari"], nmi=v["qdg"]["nmi"], k=v["qdg"]["k"], n_samples=v["n_samples"],
                       validate_pass=v["pass"])
        if Path("cache/qdg/gradients_meta.json").exists():
            g = files.read_meta("cache/qdg/gradients_meta.json")
            res["gradients"] = {key: g.get(key) for key in ("n_samples", "dim", "n_bad", "samples_per_s", "peak_rss_bytes",
                                                          "execution")}
        part_dir = partitions.partition_dir("cache/losses", model, revision)
        if (part_dir / partitions.META_FILE).exists():
            meta = files.read_meta(part_dir / partitions.META_FILE)
            res["losses"] = {key: meta.get(key) for key in ("tokens", "tokens_per_s", "peak_cuda_bytes", "compute")}
            table = partitions.read_loss_partition("cache/losses", model, revision).to_pandas()
        if Path("cache/qdg/samples.parquet").exists():
            s = read_samples("cache/qdg/samples.parquet")
            samples = set(zip(s["doc_id"].tolist(), s["pos"].tolist()))
    return res, table, samples


def _compare_planted(rec: Record, runs: dict, model: str, revision: str) -> None:
    import numpy as np

    got = {}
    for chain, (device, d) in runs.items():
        got[chain] = _chain_results(d, model, revision)
        rec[chain] = {"device": device, **got[chain][0]}
    (a, x, sa), (b, y, sb) = got["device"], got["cpu"]
    if "ari" in a and "ari" in b:
        rec["ari_abs_diff"] = abs(a["ari"] - b["ari"])
    if sa is not None and sb is not None:
        rec["samples_jaccard"] = len(sa & sb) / max(1, len(sa | sb))
    if x is not None and y is not None:
        x, y = x.sort_values(["doc_id", "pos"]), y.sort_values(["doc_id", "pos"])
        if len(x) == len(y) and (x["pos"].to_numpy() == y["pos"].to_numpy()).all():
            diff = np.abs(x["loss"].to_numpy(np.float64) - y["loss"].to_numpy(np.float64))
            rec["loss_abs_diff"] = {"mean": float(diff.mean()), "max": float(diff.max()), "tokens": len(diff)}
    print(json.dumps({k: rec.get(k) for k in ("device", "cpu", "ari_abs_diff", "samples_jaccard", "loss_abs_diff")},
                     indent=1, default=_jsonable), flush=True)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Record, Plan, Path, bool], None]


PARTS = (
    Part("env", part_env),
    Part("wheels", part_wheels),
    Part("pytest", part_pytest),
    Part("matmul", part_matmul),
    Part("losses", part_losses),
    Part("gradients", part_gradients),
    Part("planted", part_planted),
)


def run_part(name: str, plan: Plan, out: Path, dry_run: bool) -> int:
    """Child process: one part; its results in out/parts/<name>.json, exit status 0 or 1."""
    part = next(p for p in PARTS if p.name == name)
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    rec = Record(out / "parts" / f"{name}.json")
    rec["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        part.run(rec, plan, out, dry_run)
    except Exception as e:
        traceback.print_exc()
        rec["error"] = one_line(e)
        return 1
    return 0


# --------------------------------------------------------------------------- targets


def _get(results: dict, *path: Any) -> Any:
    x: Any = results.get("parts", {})
    for key in path:
        if not isinstance(x, dict) or key not in x:
            return None
        x = x[key]
    return x


def judge(results: dict, plan: Plan) -> list[dict]:
    """The check's targets from the measured numbers: value, pass (null where not measured)."""
    loss_shapes = _get(results, "losses", "results", "shapes") or {}
    grad_shapes = _get(results, "gradients", "results", "shapes") or {}
    big = plan.loss_args[plan.loss_args.index("--shapes") + 1].split(",")[-1]  # the targets' shapes: 1b ...
    small = plan.grad_shapes[0].shape  # ... and pythia-70m
    bf16_means = [r["mean_abs_diff_nats"] for r in loss_shapes.values() if "mean_abs_diff_nats" in r]
    peaks = [r["ours"]["peak_over_memory_gb"] for r in grad_shapes.values() if "ours" in r]
    pytest_res = _get(results, "pytest", "results") or {}
    rows = [
        ("pytest.failed", "gpu-marked tests failed or in error", "pytest", "== 0",
         pytest_res["failed"] + pytest_res["errors"] if "failed" in pytest_res else None),
        ("pytest.passed_on_cuda", "gpu-marked tests that ran and passed (on a CPU all skip)", "pytest", ">= 1",
         pytest_res.get("passed")),
        ("losses.speedup_vs_paper", "ours / the paper's per-document batch-1 fp32 loop, tokens/s", big, ">= 10",
         _get(results, "losses", "results", "shapes", big, "speedup_vs_paper")),
        ("losses.fraction_of_bf16_peak", "ours' 2 N FLOPs per token / the bf16 matmul peak measured in this run", big,
         ">= 0.4", _get(results, "losses", "results", "shapes", big, "ours", "fraction_of_peak_bf16")),
        ("losses.bf16_mean_abs_diff", "mean |loss bf16 - loss fp32| (nats), the largest over the shapes",
         ",".join(loss_shapes), "<= 0.05", max(bf16_means) if bf16_means else None),
        ("gradients.speedup_vs_blocks_of_250", "ours / the paper's blocks of 250 at N = 10,000, samples/s", small, ">= 20",
         _get(results, "gradients", "results", "shapes", small, "speedup_vs_blocks_of_250")),
        ("gradients.projection_mae", "sjlt k = 8192: mean |C_sjlt - C_exact| over pairs", small, "<= 0.01",
         _get(results, "gradients", "results", "shapes", small, "projection_vs_exact", "mae")),
        ("gradients.projection_p999", "sjlt k = 8192: 99.9th percentile of |C_sjlt - C_exact|", small, "<= 0.05",
         _get(results, "gradients", "results", "shapes", small, "projection_vs_exact", "p999")),
        ("gradients.peak_over_memory_gb", "peak allocated memory / gradients.memory_gb, the largest over the shapes",
         ",".join(grad_shapes), "<= 1", max(peaks) if peaks else None),
        ("planted.ari_abs_diff", "|validate ARI on the device - on the CPU|", "planted", "<= 0.01",
         _get(results, "planted", "results", "ari_abs_diff")),
        ("planted.bf16_mean_abs_diff", "mean |loss on the device (bf16) - on the CPU (fp32)| of the trained planted model",
         "planted", "<= 0.05", _get(results, "planted", "results", "loss_abs_diff", "mean")),
    ]
    out = []
    for name, what, at, target, value in rows:
        op, bound = target.split()
        ok = None
        if value is not None:
            ok = {">=": value >= float(bound), "<=": value <= float(bound), "==": value == float(bound)}[op]
        part = name.split(".")[0]
        status = _get(results, part, "status")
        note = None if value is not None else f"not measured: part {part} {status or 'did not run'}"
        out.append({"name": name, "what": what, "at": at, "target": target, "value": value, "pass": ok, "note": note})
    return out


# --------------------------------------------------------------------------- driver


def run_all(plan: Plan, out: Path, dry_run: bool, only: Optional[set], budget_s: float) -> dict:
    """Every part in a child process with its own limit, within the whole check's budget."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    deadline = time.monotonic() + budget_s
    results: dict = {
        "command": " ".join(["python", *sys.argv]), "dry_run": dry_run, "device": plan.device, "budget_s": budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {},
    }
    t_start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    with log_path.open("a") as log:
        for part in PARTS:
            if only and part.name not in only:
                continue
            left = deadline - time.monotonic()
            limit = min(plan.part_budget_s[part.name], left)
            entry: dict = {"budget_s": plan.part_budget_s[part.name], "limit_s": round(limit, 1)}
            results["parts"][part.name] = entry
            if limit < 5:
                entry["status"] = "not run: the check's budget was spent"
                continue
            log.write(f"\n===== part {part.name} (limit {limit:.0f} s) =====\n")
            log.flush()
            print(f"part {part.name} (limit {limit:.0f} s) ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--out", str(out)]
            if dry_run:
                cmd.append("--dry-run")
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                entry["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
                proc.wait()
                entry["status"] = f"timed out after {limit:.0f} s"
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            entry["results"] = read_part(out, part.name)
            if "error" in entry["results"]:
                entry["error"] = entry["results"]["error"]
            log.write(f"----- part {part.name}: {entry['status']} in {entry['seconds']} s\n")
            log.flush()
            print(f"part {part.name}: {entry['status']} in {entry['seconds']} s"
                  + (f" ({entry['error']})" if "error" in entry else ""), flush=True)
            results["total_seconds"] = round(time.perf_counter() - t_start, 1)
            results["targets"] = judge(results, plan)
            write_json(out / "gpu_check.json", results)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["targets"] = judge(results, plan)
    results["summary"] = {
        "parts_ok": sum(p.get("status") == "ok" for p in results["parts"].values()),
        "parts": len(results["parts"]),
        "targets_passed": sum(t["pass"] is True for t in results["targets"]),
        "targets_failed": sum(t["pass"] is False for t in results["targets"]),
        "targets_not_measured": sum(t["pass"] is None for t in results["targets"]),
    }
    write_json(out / "gpu_check.json", results)
    return results


def print_summary(results: dict) -> None:
    print(f"\n{results['summary']} in {results['total_seconds']} s")
    for t in results["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "n/a "}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        print(f"  {verdict}  {t['name']} ({t['at']}): {value} (target {t['target']})" + (f"; {t['note']}" if t["note"] else ""))


def prepare_wheels(dest: Path) -> None:
    """Fill `dest` with INSTALL and DEPENDENCIES at this environment's versions, as wheels for
    the GPU box's Python, and the requirements file the check installs from."""
    versions = {}
    for name in INSTALL + DEPENDENCIES:
        v = _version(name)
        if v is None:
            raise SystemExit(f"{name} is not installed here: install the project (pip install -e .) first")
        versions[name] = v
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", BOX_PYTHON,
           "--implementation", "cp", "--abi", BOX_ABI, "--platform", BOX_PLATFORM, "--disable-pip-version-check",
           "-d", str(dest), *[f"{n}=={v}" for n, v in versions.items()]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    (dest / "requirements.txt").write_text("".join(f"{n}=={versions[n]}\n" for n in INSTALL))
    size = sum(f.stat().st_size for f in wheel_files(dest))
    print(f"{len(wheel_files(dest))} wheels, {size / 2**20:.1f} MiB in {dest}")
    if size > WHEELS_MAX_BYTES:
        raise SystemExit(f"{dest} holds {size / 2**20:.1f} MiB, over the {WHEELS_MAX_BYTES / 2**20:.0f} MiB that can travel")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the same code, in about a minute")
    ap.add_argument("--only", default=None, help=f"comma-separated parts to run, of {', '.join(p.name for p in PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="the whole check's limit (default 470; dry run 900)")
    ap.add_argument("--prepare-wheels", action="store_true", help=f"fill {WHEELS.relative_to(ROOT)}/ and stop")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.prepare_wheels:
        prepare_wheels(WHEELS)
        return 0
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        ap.error("give --out DIR or set OUT")
    out = out.resolve()
    plan = DRY if args.dry_run else FULL
    if args.part:
        return run_part(args.part, plan, out, args.dry_run)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {p.name for p in PARTS}
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; use {', '.join(p.name for p in PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(plan, out, args.dry_run, only, args.budget_s or plan.budget_s)
    print_summary(results)
    print(f"results: {out / 'gpu_check.json'}, log: {out / 'gpu_check.log'}")
    return 0 if results["summary"]["parts_ok"] == results["summary"]["parts"] else 1


if __name__ == "__main__":
    sys.exit(main())
