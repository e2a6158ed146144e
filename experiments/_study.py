r"""What every study runner and benchmark under ``experiments/`` shares.

* :func:`train_cached` trains one configuration through
  :func:`moegraph.train.train` (a config composed by
  :func:`moegraph.train.compose_config`, the overrides ``moegraph-train``
  takes) and caches its record as one JSON file; :func:`run_pending` runs the
  jobs whose file does not exist yet, so a study can be completed in parts;
  :func:`reuse_run` copies a run another study made with the same config;
  :func:`composed` holds a composed config for a ``with`` block.
* :func:`add_tuned_study_arguments` gives a study runner its arguments
  (``--seeds``, ``--tune``, ``--set``, ...); :func:`parse_set` reads ``--set``.
* :func:`mean_std` formats the mean and sample standard deviation of a cell;
  :func:`command_line` and :func:`results_header` put the command that made a
  results file at its top; :class:`Timer`, :func:`timed` and
  :func:`time_rotated` measure wall time.

The scripts are run from anywhere as ``python experiments/<script>.py``;
Python puts ``experiments/`` first on the import path, so they import this
module as ``_study``.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
# Overrides that silence a run (no logger, no progress bar, no model summary).
QUIET = ["logger=none", "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false",
         "+trainer.enable_model_summary=false"]

Collect = Callable[[Any, Path], dict]
T = TypeVar("T")


class Timer:
    r"""Wall time of a ``with`` block, in ``seconds`` once the block ends."""

    def __enter__(self) -> Timer:
        self.seconds = 0.0
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def timed(fn: Callable[[], T], repeats: int,
          sync: Callable[[], object] = lambda: None) -> tuple[list[float], T]:
    r"""Seconds of each of ``repeats`` calls of ``fn`` after one warm-up call,
    and the last call's output; ``sync`` (e.g. a barrier) runs before each
    timed call."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync()
        with Timer() as t:
            out = fn()
        times.append(t.seconds)
    return times, out


def time_rotated(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    r"""Median seconds per call of each step, over ``repeats`` rounds in which
    every step runs once, the order rotated by one each round (so that no step
    always runs first, or right after the same neighbour)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            with Timer() as t:
                steps[n]()
            times[n].append(t.seconds)
    return {n: statistics.median(v) for n, v in times.items()}


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2,
             empty: str = "–") -> str:
    r"""``"mean ± std"`` of ``values`` times ``scale`` (percent by default),
    with the sample standard deviation (0 for one value); ``empty`` for none."""
    if not values:
        return empty
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def relative(path: Path) -> str:
    r"""``path`` relative to the repository root when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def target_cell(gnn: Sequence[float], model: Sequence[float]) -> str:
    r"""Issue 11's targets for one cell, on the seeds both have (``gnn[i]`` and
    ``model[i]`` of the same seed): never below the GNN by more than half its
    std; above it by more than one std (a gain). The gap in points, then
    ``gain``, ``ok`` or ``BELOW``; not judged below 2 seeds."""
    if len(gnn) < 2 or len(model) != len(gnn):
        return f"n = {min(len(gnn), len(model))}: not judged"
    g, s = statistics.fmean(gnn), statistics.stdev(gnn)
    m = statistics.fmean(model)
    gap = (m - g) * 100
    verdict = "gain" if m > g + s else "ok" if m >= g - s / 2 else "BELOW"
    return f"{gap:+.1f} ({verdict}; half std {s * 50:.1f})"


# Two-sided 95% quantiles of Student's t by degrees of freedom (1 to 30): the
# threshold of :func:`paired_difference`'s paired t-test.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(a: dict[int, float], b: dict[int, float],
                      higher_is_better: bool = True) -> Optional[dict[str, Any]]:
    r"""How much better ``a`` is than ``b`` on the seeds both have (``a[seed]``,
    ``b[seed]``: one score per seed; a gain is positive either way round):
    the mean and sample std of the per-seed gains, their number ``n``, the
    seeds where ``a`` is better (``wins``), the paired t statistic and the
    verdict of a two-sided paired t-test at 5% (:data:`T_975`): ``">"`` (``a``
    better beyond noise), ``"<"`` (worse beyond noise) or ``"~"`` (within
    noise; also with fewer than 2 seeds or identical gains). ``None`` when no
    seed is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    sign = 1.0 if higher_is_better else -1.0
    gains = [sign * (a[s] - b[s]) for s in seeds]
    mean = statistics.fmean(gains)
    std = statistics.stdev(gains) if len(gains) > 1 else 0.0
    n = len(gains)
    t = mean / (std / n ** 0.5) if std > 0 else float("nan")
    crit = T_975[min(n - 1, len(T_975)) - 1] if n > 1 else float("inf")
    verdict = "~" if not abs(t) > crit else (">" if t > 0 else "<")
    return {"mean": mean, "std": std, "n": n, "wins": sum(g > 0 for g in gains), "t": t,
            "verdict": verdict}


def histogram_range(counts: Sequence[float], low: float = 0.05,
                    high: float = 0.95) -> tuple[float, float]:
    r"""The edges ``(a, b)`` of the bins that hold the ``low`` and ``high``
    quantiles of values counted in equal bins over ``[0, 1]``: the spread of
    the values, to the bins' resolution."""
    total = sum(counts)
    if total <= 0:
        return float("nan"), float("nan")
    width = 1.0 / len(counts)
    seen, a, b = 0.0, None, None
    for i, c in enumerate(counts):
        seen += c
        if a is None and seen >= low * total:
            a = i * width
        if b is None and seen >= high * total:
            b = (i + 1) * width
    assert a is not None and b is not None
    return a, b


def command_line(script: str | Path, argv: Optional[Sequence[str]] = None,
                 drop: Iterable[str] = ("--table-only", "--dry-run")) -> str:
    r"""The command that runs ``script`` with ``argv`` (default: this
    process's arguments), less the flags in ``drop``, for a results file."""
    args = list(sys.argv[1:] if argv is None else argv)
    dropped = set(drop)
    return shlex.join(["python", relative(Path(script)), *(a for a in args if a not in dropped)])


# Flags of a study runner that change what it does, not what it measures: left
# out of the command written into a results file.
STUDY_FLAGS = ("--table-only", "--dry-run")


def add_study_arguments(parser: Any, runs: Path) -> None:
    r"""The arguments every study runner takes: ``--runs`` (the cache folder,
    default ``runs``), ``--threads``, ``--table-only``, ``--dry-run``."""
    parser.add_argument("--runs", type=Path, default=runs,
                        help="folder of the cached runs, one JSON each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the results from the cached runs, train nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs to do (not cached yet), train nothing")


def add_tuned_study_arguments(parser: Any, runs: Path, tuning: Path, tuned_runs: Path,
                              cell: str, set_runs: Optional[Path] = None,
                              set_table: str = "") -> Callable[[Optional[list[str]]], Any]:
    r"""The arguments of a study that can be tuned: ``--seeds``, ``--tune N``,
    ``--tuning`` (default ``tuning``) and those of :func:`add_study_arguments`
    (default cache ``runs``). Returns the parser's ``parse_args``, which also
    checks ``--tune`` and, with ``--tune`` and the default ``--runs``, caches
    the runs in ``tuned_runs`` instead; ``cell`` names what one search covers
    in the help text.

    With ``set_runs``, also ``--set KEY=VALUE ...``: fixed overrides added to
    every run (read by :func:`parse_set` into ``args.fixed``, ``{}`` without
    ``--set``), cached in ``set_runs`` with the default ``--runs`` and tabled
    in ``set_table``; ``--set`` with ``--tune`` is refused."""
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per dataset (default: the per-dataset protocol)")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help=f"the tuned study: N search trials per {cell} (every model the "
                             "same N), then every seed with the best configuration")
    parser.add_argument("--tuning", type=Path, default=tuning,
                        help="folder of the searches (one SQLite study per cell)")
    add_study_arguments(parser, runs)
    if set_runs is not None:
        parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                            help="a fixed configuration added to every run's protocol "
                                 f"(Hydra overrides), cached under {set_runs.name}/ and "
                                 f"tabled in {set_table}")

    def parse(argv: Optional[list[str]] = None) -> Any:
        args = parser.parse_args(argv)
        if args.tune < 0:
            parser.error("--tune takes a number of trials >= 1 (0: the untuned study)")
        args.fixed = parse_set(parser, getattr(args, "set", []))
        if args.fixed and args.tune:
            parser.error("--set and --tune are two studies: give one of them")
        if args.tune and args.runs == runs:
            args.runs = tuned_runs
        elif args.fixed and args.runs == runs and set_runs is not None:
            args.runs = set_runs
        return args

    return parse


# Keys a study sets per run, which ``--set`` may not change.
PER_RUN_KEYS = ("seed", "data.split", "experiment", "model", "model/strong")


def parse_set(parser: Any, items: Sequence[str]) -> dict[str, str]:
    r"""``--set``'s ``KEY=VALUE`` items as ``{key: value}`` (values as given);
    a malformed or repeated key, or one of :data:`PER_RUN_KEYS`, is a usage
    error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value or key.startswith(("+", "~")) or " " in key:
            parser.error(f"--set takes KEY=VALUE overrides, got {item!r}")
        if key in out:
            parser.error(f"--set gives {key!r} twice")
        if key in PER_RUN_KEYS:
            parser.error(f"--set cannot change {key!r}: the study sets it per run")
        out[key] = value
    return out


def results_header(title: str, command: str, runs: Optional[Path] = None) -> list[str]:
    r"""The first lines of a results file: its title and the command that made
    it (and where its cached runs are)."""
    made = f"Made by `{command}`"
    made += f" (cached runs in `{relative(runs)}/`)." if runs is not None else "."
    return [f"# {title}", "", made, ""]


def load_runs(runs: Path) -> list[dict]:
    r"""Every cached run record under ``runs``, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*.json"))]


@contextlib.contextmanager
def composed(overrides: Sequence[str], output_dir: str | Path | None = None) -> Iterator[Any]:
    r"""The config ``moegraph-train`` composes from ``overrides``
    (:func:`moegraph.train.compose_config`), registered with Hydra for the
    ``with`` block and cleared from it after, also on error."""
    from hydra.core.hydra_config import HydraConfig

    from moegraph.train import compose_config

    try:
        yield compose_config(overrides, output_dir)
    finally:
        HydraConfig.instance().cfg = None


def train_cached(overrides: Sequence[str], record: dict, path: Path,
                 collect: Sequence[Collect] = ()) -> dict:
    r"""Train one configuration through ``train(cfg)`` (the entry point of
    ``moegraph-train``, with the same overrides) and cache its record as JSON
    at ``path``: the overrides, then ``record`` (whose keys win), the metrics,
    the wall time (``wall_seconds``, fit and test) and what each
    ``collect(cfg, output_dir)`` returns, called before the run's temporary
    output folder is deleted."""
    from moegraph.train import train

    with tempfile.TemporaryDirectory() as tmp, composed(overrides, tmp) as cfg:
        with Timer() as timer:
            metrics = train(cfg)
        record = {"overrides": list(overrides), **record, "metrics": metrics,
                  "wall_seconds": timer.seconds}
        for fn in collect:
            record.update(fn(cfg, Path(tmp)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def reuse_run(overrides: Sequence[str], record: dict, path: Path,
              sources: Sequence[Path]) -> Optional[dict]:
    r"""Cache at ``path`` the record of a run another study already made with
    the same configuration: the first of ``sources`` (cached records) whose
    overrides compose the config that ``overrides`` compose (the ``hydra``
    node aside, so the order of the overrides does not matter). The copy
    takes ``overrides`` and ``record``'s keys and names its source in
    ``reused_from``. ``None`` (nothing written) where no source exists or
    none has this configuration."""
    from omegaconf import OmegaConf

    def config(o: Sequence[str]) -> dict:
        with composed(o) as cfg:
            out = OmegaConf.to_container(cfg, resolve=False)
        assert isinstance(out, dict)
        out.pop("hydra", None)
        return out

    ours = None
    for source in sources:
        if not source.exists():
            continue
        old = json.loads(source.read_text())
        ours = config(overrides) if ours is None else ours
        if config(old["overrides"]) != ours:
            continue
        new = {**old, **record, "overrides": list(overrides), "reused_from": relative(source)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=1))
        return new
    return None


def run_diagnostics(cfg: Any, output_dir: Path) -> dict:
    r"""A ``collect`` for node-level studies: the name of the data's metric
    and what the run's diagnostics wrote (Mowst confidence histogram on the
    test nodes, expert load)."""
    from moegraph.diagnostics import confidence_histogram

    out: dict[str, Any] = {"metric": cfg.data.get("metric", "acc")}
    confidence = output_dir / "confidence.json"
    if confidence.exists():
        c = json.loads(confidence.read_text())
        _, right, wrong = confidence_histogram(c["confidence"], c["weak_correct"])
        out["confidence_hist"] = {"right": right.tolist(), "wrong": wrong.tolist()}
    load = output_dir / "expert_load.json"
    if load.exists():
        out["expert_load"] = json.loads(load.read_text())
    return out


def backbone_protocol(cfg: Any, output_dir: Optional[Path] = None) -> dict:
    r"""A ``collect``: the protocol fields of a node-classification run."""
    stopping = (cfg.get("callbacks") or {}).get("early_stopping")
    return {"protocol": {
        "hidden_channels": cfg.backbone.hidden_channels, "num_layers": cfg.backbone.num_layers,
        "residual": cfg.backbone.residual, "max_epochs": cfg.trainer.max_epochs,
        "lr": cfg.model.optimizer.lr,
        "patience": stopping.get("patience") if stopping else None}}


def score_line(record: dict) -> str:
    r"""``test/<metric>=<value>`` of a record that names its metric."""
    metric = record["metric"]
    return f"test/{metric}={record['metrics'].get(f'test/{metric}', float('nan')):.4f}"


def run_pending(jobs: Sequence[tuple[Path, Callable[[], dict], str]], tag: str = "study",
                describe: Callable[[dict], str] = score_line,
                dry_run: bool = False) -> list[str]:
    r"""Run each job ``(cache path, run, label)`` whose cache file does not
    exist, printing ``describe(record)`` and its time; return the labels of
    the jobs that were to do. A job finished meanwhile by another process of
    the same study is skipped. ``dry_run``: only list the jobs to do."""
    todo = [job for job in jobs if not job[0].exists()]
    print(f"[{tag}] {len(todo)} runs to do, {len(jobs) - len(todo)} cached", flush=True)
    if dry_run:
        for path, _, label in todo:
            print(f"[{tag}] to do: {label} -> {relative(path)}")
        return [label for _, _, label in todo]
    for i, (path, run, label) in enumerate(todo, 1):
        if path.exists():
            continue
        with Timer() as t:
            record = run()
        print(f"[{tag}] {i}/{len(todo)} {label}: {describe(record)} ({t.seconds:.0f}s)",
              flush=True)
    return [label for _, _, label in todo]


# The line of a results file below which the text is written by hand (findings,
# diagnoses): :func:`write_results` keeps it when the tables are rebuilt.
FINDINGS_MARK = "<!-- Written by hand below this line: kept when the tables are rebuilt. -->"


def write_results(path: Path, generated: str) -> str:
    r"""Write ``generated`` (the tables a runner rebuilds) to ``path``, then
    the existing file's text from the :data:`FINDINGS_MARK` line on, so that
    hand-written findings survive a rebuild (``--table-only`` included); a
    new file gets the mark for them. Returns the text written."""
    path = Path(path)
    kept = FINDINGS_MARK + "\n"
    if path.exists():
        old = path.read_text()
        if FINDINGS_MARK in old:
            kept = old[old.index(FINDINGS_MARK):]
    text = generated.rstrip("\n") + "\n\n" + kept
    path.write_text(text)
    return text


def best_overrides(params: dict[str, Any]) -> list[str]:
    r"""The ``key=value`` overrides of a search's best parameters, as
    ``moegraph-train`` takes them (booleans in YAML spelling, floats exact),
    sorted by key."""
    def spell(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v)
        return str(v)
    return [f"{k}={spell(v)}" for k, v in sorted(params.items())]


def params_tag(params: dict[str, Any]) -> str:
    r"""A short, stable name of a parameter choice (8 hex digits), for the
    cache file of a run made with it: when a search that goes on finds
    another best choice, the runs of the old one are no longer read."""
    import hashlib

    return hashlib.sha1(" ".join(best_overrides(params)).encode()).hexdigest()[:8]


def tune_cached(overrides: Sequence[str], family: str, path: Path, n_trials: int,
                seed: int = 0) -> dict:
    r"""Hydra's Optuna search ``hparams_search=<family>`` over the run that
    ``overrides`` describe, kept in the SQLite file ``path`` (one study per
    file): runs ``moegraph-train -m`` for the trials the study still lacks
    to reach ``n_trials`` completed ones, so a search stopped anywhere goes on
    where it was. The sampler's seed is ``seed`` plus the trials already done,
    so a resumed search does not propose its first points again. Returns
    ``{"params", "value", "trials", "seconds"}`` of the best completed trial
    (``value``: the validation score that ``train()`` returns)."""
    import os
    import subprocess

    import optuna

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{path.resolve()}"
    name = path.stem

    def completed() -> list:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # no study of that name in the file yet
            return []
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    done = completed()
    if len(done) < n_trials:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "moegraph.train", f"hparams_search={family}",
                   *overrides, f"hydra.sweeper.n_trials={n_trials - len(done)}",
                   f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}",
                   f"hydra.sweeper.sampler.seed={seed + len(done)}",
                   f"hydra.sweep.dir={tmp}"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"search {name} failed ({shlex.join(cmd)}):\n"
                               f"{proc.stderr[-4000:]}")
        done = completed()
    # the first n_trials trials only: a search run further for another study
    # does not give this one a larger budget than its baseline
    done = sorted(done, key=lambda t: t.number)[:n_trials]
    if not done:
        raise RuntimeError(f"search {name}: no completed trial in {path}")
    best = max(done, key=lambda t: t.value)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done
               if t.datetime_complete and t.datetime_start]
    return {"params": best.params, "value": best.value, "trials": len(done),
            "seconds": statistics.fmean(seconds) if seconds else float("nan")}


def tune_cell(name: str, overrides: Sequence[str], family: str, folder: Path,
              trials: int, info: dict) -> dict:
    r"""The search ``hparams_search=<family>`` of one cell of a tuned study
    (``overrides``: its run on seed 0 / split 0; the validation score),
    resumed from ``folder/<name>.db``; its summary (``info``, then
    :func:`tune_cached`'s result) is also written to ``folder/<name>.json``."""
    search = tune_cached(overrides, family, folder / f"{name}.db", trials)
    summary = {**info, **search}
    (folder / f"{name}.json").write_text(json.dumps(summary, indent=1))
    print(f"[tune] {name}: best val {search['value']:.4f} after {search['trials']} trials "
          f"({search['seconds']:.0f}s each): {' '.join(best_overrides(search['params']))}",
          flush=True)
    return summary


def set_aside_search(folder: Path, name: str, summary: dict) -> Path:
    r"""Move the search ``folder/<name>.db`` / ``.json`` to
    ``folder/stale/<name>__<its config>/``, where a later search of the cell
    cannot resume it; the new folder."""
    target = folder / "stale" / f"{name}__{summary.get('config') or 'unrecorded'}"
    target.mkdir(parents=True, exist_ok=True)
    for suffix in (".db", ".json"):
        source = folder / f"{name}{suffix}"
        if source.exists():
            source.rename(target / source.name)
    return target


def load_or_tune(cells: Sequence[tuple[str, Callable[[], dict]]], folder: Path, trials: int,
                 search: bool = True, dry_run: bool = False,
                 configs: Optional[dict[str, str]] = None) -> dict[str, dict]:
    r"""The search summaries of a tuned study, cell name -> summary, read from
    ``folder/*.json``; with ``search``, each cell of ``cells`` (name, a call
    that searches it) whose summary does not count ``trials`` trials is
    searched (listed only, with ``dry_run``). Every model gets the same
    ``trials``.

    ``configs`` (cell name -> a hash of the cell's untuned config, which the
    search's summary records as ``config``): a summary made under another
    config (a default changed since, or none recorded) is *stale*: its
    trials searched another model. It is left out; with ``search`` (not
    ``dry_run``) it is moved to ``folder/stale/`` (:func:`set_aside_search`)
    and the cell searched again."""
    folder.mkdir(parents=True, exist_ok=True)
    tuned = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    for name, config in (configs or {}).items():
        summary = tuned.get(name)
        if summary is None or summary.get("config") == config:
            continue
        del tuned[name]
        was = summary.get("config") or "not recorded"
        if search and not dry_run:
            moved = set_aside_search(folder, name, summary)
            print(f"[tune] {name}: the search ran under another config ({was}, now "
                  f"{config}): moved to {moved}, searched again", flush=True)
        else:
            print(f"[tune] {name}: stale search (config {was}, now {config}): left out",
                  flush=True)
    if search:
        for name, tune in cells:
            summary = tuned.get(name)
            if summary is not None and summary["trials"] == trials:
                continue  # (more trials on disk: the best of the first N is recomputed)
            if dry_run:
                print(f"[tune] to do: {name}: {trials} trials "
                      f"({summary['trials'] if summary else 0} done)")
                continue
            tuned[name] = tune()
    return tuned
