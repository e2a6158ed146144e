r"""Resolve every config of ``conf/`` and compare two snapshots: a check that a
restructuring of the config tree changes no resolved value.

    python .ci/config_snapshot.py dump before.json      # on the old tree (moegraph importable)
    python .ci/config_snapshot.py dump after.json       # on the new tree
    python .ci/config_snapshot.py compare before.json after.json

A snapshot maps each tried override list (every option of every group alone,
every ``experiment=nc_*`` with every node model and backbone, every data set
with ``model=gnn``, every multi-task model on MovieLens) to its resolved config
(without the ``hydra`` node; the output folder fixed). Options whose name
starts with ``_`` are bases for other files, not choices.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from moegraph.train import CONFIG_DIR

NODE_MODELS = ["mlp", "gnn", "mowst", "gmoe", "moe_gnn", "dense_gnn"]
MULTITASK_MODELS = ["home", "home_paper", "mmoe", "ple", "shared_bottom"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")
                  if not p.stem.startswith("_"))


def override_lists() -> list[list[str]]:
    tried: list[list[str]] = [[]]
    for group in ("data", "model", "model/strong", "model/weak", "experiment", "trainer",
                  "callbacks", "logger", "debug", "hparams_search"):
        tried += [[f"{group}={name}"] for name in options(group)]
    strong = options("model/strong")
    for experiment in (e for e in options("experiment") if e.startswith("nc_")):
        for model in NODE_MODELS:
            backbones = strong if model in ("gnn", "mowst") else [None]
            for backbone in backbones:
                tried.append([f"experiment={experiment}", f"model={model}"]
                             + ([f"model/strong={backbone}"] if backbone else []))
    for data, model in itertools.product(options("data"), ["gnn"]):
        tried.append([f"data={data}", f"model={model}"])
    tried += [["data=movielens", f"model={m}"] for m in MULTITASK_MODELS]
    return tried


def resolved(overrides: list[str]) -> dict:
    # composed as moegraph.train.compose_config does, spelled out so that the
    # script also runs on a tree from before that function
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/config_snapshot_output"
    HydraConfig.instance().set_config(cfg)
    try:
        return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in cfg.items() if k != "hydra"}
    finally:
        HydraConfig.instance().cfg = None


def dump(path: str) -> None:
    snapshot = {}
    for overrides in override_lists():
        try:
            snapshot[" ".join(overrides)] = resolved(overrides)
        except Exception as e:  # noqa: BLE001  (a config that does not compose is a result too)
            snapshot[" ".join(overrides)] = {"error": f"{type(e).__name__}: {e}"}
    Path(path).write_text(json.dumps(snapshot, indent=1, sort_keys=True))
    print(f"{len(snapshot)} configs -> {path}")


def compare(a: str, b: str) -> int:
    before, after = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    missing = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    for key in missing:
        print(f"not tried any more: {key or '(defaults)'}")
    for key in changed:
        print(f"changed: {key or '(defaults)'}")
        for line in _diff(before[key], after[key]):
            print(f"    {line}")
    print(f"{len(before)} configs before, {len(after)} after; {len(changed)} changed, "
          f"{len(missing)} missing")
    return 1 if changed or missing else 0


def _diff(x, y, prefix=""):
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            yield from _diff(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{prefix}{k}.")
    elif x != y:
        yield f"{prefix.rstrip('.')}: {x!r} -> {y!r}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
