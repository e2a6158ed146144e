r"""Every GPU measurement of the project in one go, for a short loan of a GPU.

    python experiments/gpu_check.py                          # on CUDA, < 8 min on one H100
    python experiments/gpu_check.py --device cpu --quick     # dry run on CPU (what CI runs)

Steps, each a subprocess with its own time limit (a failing or hanging step
is recorded and the next one runs):

1. ``pytest -m gpu``: the CUDA-path tests (``tests/gpu``, every test marked
   ``gpu``). Dry run: the same test bodies on the CPU.
2. ``bench_moe.py`` in bf16 (E = 8, 64; k = 1, 2): SparseMoE against the
   dense FFN of equal active FLOPs and the naive expert loop.
3. ``bench_graph_moe.py``: HopMoEConv against all experts everywhere.
4. One short training run each of a MoE-GNN (synthetic graph), Mowst (Cora)
   and a multi-task HoME (MovieLens-100K) through ``python -m moegraph.train
   trainer=gpu`` (bf16-mixed).
5. ``bench_scale.py`` with 300,000 nodes (sampling on the CPU, training on
   the GPU).

It first copies the datasets it needs (Cora, MovieLens-100K raw files) from
``$MOEGRAPH_DATA_DIR``, ``../shared/data`` or ``shared/data`` into
``.gpu_check/data`` (git-ignored), so that nothing reads or writes the shared
copy; a dataset it cannot find is replaced by the synthetic graph (Mowst) or
its run is skipped (multi-task), and the summary says so. Results go to
``experiments/results/gpu/`` (``--out``): one markdown file per step and
``summary.md``; logs to ``.gpu_check/logs``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".gpu_check"
RESULTS = ROOT / "experiments" / "results" / "gpu"
DATASETS = {"cora": "Planetoid/Cora", "movielens": "MovieLens100K"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load_line, machine_load  # noqa: E402


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float
    result: str = ""  # the markdown file the step writes (relative to --out)
    note: str = ""
    status: str = "not run"
    seconds: float = 0.0
    tail: str = field(default="", repr=False)


def find_data_dir() -> Path | None:
    r"""The raw datasets: ``$MOEGRAPH_DATA_DIR``, else ``../shared/data``, else
    ``shared/data`` (next to or inside the checkout)."""
    candidates = [os.environ.get("MOEGRAPH_DATA_DIR"), ROOT.parent / "shared" / "data",
                  ROOT / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def prepare_data(target: Path) -> dict[str, bool]:
    r"""Copy the raw files of :data:`DATASETS` into ``target`` (once); which
    datasets are there."""
    source = find_data_dir()
    found = {}
    for name, relative in DATASETS.items():
        dst = target / relative
        if not dst.is_dir() and source is not None and (source / relative).is_dir():
            # raw files only: PyG processes them in the run's own cache dir
            shutil.copytree(source / relative, dst,
                            ignore=shutil.ignore_patterns("processed", "*.pt"))
        found[name] = dst.is_dir()
    return found


def build_steps(args, found: dict[str, bool], out: Path) -> list[Step]:
    py = sys.executable
    cuda = args.device == "cuda"
    quick = args.quick
    steps = []

    # 1. the CUDA-path tests (on CPU: the same bodies on the CPU parameter)
    pytest = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    steps.append(Step("pytest", pytest + (["-m", "gpu", "tests"] if cuda else ["tests/gpu"]),
                      300, "pytest.md"))

    # 2. SparseMoE vs dense FFN vs naive loop
    moe = [py, "experiments/bench_moe.py", "--device", args.device,
           "--dtype", "bfloat16" if cuda else "float32", "--out", str(out / "bench_moe.md")]
    if quick:
        moe += ["--quick", "--experts", "8", "--k", "1", "2", "--repeats", "1",
                "--skip-all-experts"]
    else:
        moe += ["--experts", "8", "64", "--k", "1", "2"]
    steps.append(Step("bench_moe", moe, 180, "bench_moe.md"))

    # 3. HopMoEConv
    graph = [py, "experiments/bench_graph_moe.py", "--device", args.device,
             "--out", str(out / "bench_graph_moe.md")]
    graph += ["--quick", "--experts", "4", "--k", "1"] if quick else ["--experts", "8", "16"]
    steps.append(Step("bench_graph_moe", graph, 150, "bench_graph_moe.md"))

    # 4. short training runs through the CLI
    trainer = ["trainer=gpu"] + ([] if cuda else ["trainer.accelerator=cpu"])
    epochs = 1 if quick else 20
    runs = {
        "train_moe_gnn": ([f"trainer.max_epochs={epochs}"]
                          + (["data.dataset_kwargs.num_nodes=500"] if quick else []), ""),
    }
    mowst_short = [f"model.pretrain_weak_epochs={1 if quick else 5}",
                   f"model.pretrain_strong_epochs={1 if quick else 5}",
                   f"model.max_turn_epochs={1 if quick else 5}", "model.max_rounds=1"]
    if found["cora"]:
        runs["train_mowst"] = (["experiment=nc_cora", "model=mowst", *mowst_short], "Cora")
    else:
        runs["train_mowst"] = (["model=mowst", *mowst_short]
                               + (["data.dataset_kwargs.num_nodes=500"] if quick else []),
                               "Cora not found: synthetic graph")
    if found["movielens"]:
        runs["train_multitask"] = (["experiment=movielens_home",
                                    f"trainer.max_epochs={1 if quick else 3}"], "MovieLens-100K")
    for name, (overrides, note) in runs.items():
        run_dir = WORK / "runs" / name
        command = [py, "-m", "moegraph.train", *trainer, *overrides, "logger=none",
                   f"hydra.run.dir={run_dir}", f"paths.cache_dir={WORK / 'cache'}"]
        steps.append(Step(name, command, 150, note=note))
    if not found["movielens"]:
        steps.append(Step("train_multitask", [], 0, note="MovieLens-100K not found: skipped"))

    # 5. scale: sampling on the CPU, training on the device
    threads = str(min(os.cpu_count() or 1, 8))
    scale = [py, "experiments/bench_scale.py", "--device", args.device, "--out", str(out),
             "--no-plot", "--threads", threads if cuda else "1"]
    scale += ["--sizes", "3000", "--train", "0.1"] if quick else ["--sizes", "300000"]
    steps.append(Step("bench_scale", scale, 240, "scale.md"))
    return steps


def run_step(step: Step, env: dict[str, str], logs: Path) -> None:
    if not step.command:
        step.status = "skipped"
        return
    start = time.perf_counter()
    log = logs / f"{step.name}.log"
    try:
        proc = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step.timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
        step.status = "ok" if code == 0 else f"FAILED (exit {code})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        step.status = f"TIMEOUT ({step.timeout:.0f} s)"
    step.seconds = time.perf_counter() - start
    log.write_text(" ".join(step.command) + "\n\n" + output)
    step.tail = "\n".join(output.strip().splitlines()[-15:])


def training_metrics(step: Step) -> str:
    path = WORK / "runs" / step.name / "metrics.json"
    if not path.exists():
        return ""
    metrics = json.loads(path.read_text())["metrics"]
    keep = {k: v for k, v in sorted(metrics.items()) if k.startswith("test/")}
    return ", ".join(f"{k} {v:.3f}" for k, v in list(keep.items())[:4])


def device_line(device: str) -> str:
    import torch
    text = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        text += (f", {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), "
                 f"CUDA {torch.version.cuda}")
    else:
        text += f", CPU ({os.cpu_count()} cores)"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (the CPU dry run: about a minute or two)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: experiments/results/gpu on CUDA, "
                             ".gpu_check/results for a CPU run)")
    parser.add_argument("--timeout-scale", type=float, default=None,
                        help="multiply each step's time limit (default: 1 on CUDA, 6 on CPU, "
                             "where every step runs on a few slow cores)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these steps (pytest, bench_moe, bench_graph_moe, "
                             "train_moe_gnn, train_mowst, train_multitask, bench_scale)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (dry run: --device cpu --quick)")
    out = (args.out or (RESULTS if args.device == "cuda" else WORK / "results")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    begin = time.perf_counter()
    found = prepare_data(WORK / "data")
    env = dict(os.environ, MOEGRAPH_DATA_DIR=str(WORK / "data"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PROJECT_ROOT=str(ROOT))
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    steps = build_steps(args, found, out)
    scale = args.timeout_scale or (1.0 if args.device == "cuda" else 6.0)
    for step in steps:
        step.timeout *= scale
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            parser.error(f"--only: unknown step(s) {sorted(unknown)}; steps: "
                         f"{[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    load_before = machine_load()
    for step in steps:
        print(f"[gpu_check] {step.name} ...", flush=True)
        run_step(step, env, logs)
        print(f"[gpu_check] {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
        if step.name == "pytest":
            (out / "pytest.md").write_text(
                f"# `pytest` on {args.device}\n\n`{' '.join(step.command[1:])}`: "
                f"{step.status}\n\n```\n{step.tail}\n```\n")
    load_after = machine_load()
    total = time.perf_counter() - begin

    lines = [f"# GPU check ({'dry run on CPU' if args.device == 'cpu' else 'CUDA'}"
             f"{', quick sizes' if args.quick else ''})", "",
             f"`python experiments/gpu_check.py --device {args.device}"
             f"{' --quick' if args.quick else ''}`: {device_line(args.device)}; "
             f"{total:.0f} s in all.", "",
             load_line(load_before, load_after, 1), "",
             "| step | status | time (s) | result | note |", "|---|---|---:|---|---|"]
    for s in steps:
        result = s.result if s.result and (out / s.result).exists() else ""
        note = "; ".join(x for x in (s.note, training_metrics(s)) if x)
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {result} | {note} |")
    failed = [s for s in steps if s.status not in ("ok", "skipped")]
    for s in failed:
        lines += ["", f"## {s.name}: {s.status}", "", "```", s.tail, "```"]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    for s in steps:
        if s.result and s.name != "pytest" and (out / s.result).exists():
            print(f"--- {out / s.result}")
            print((out / s.result).read_text())
    print(f"[gpu_check] wrote {out}; logs in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
