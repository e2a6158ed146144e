r"""The scratch patch behind two logs of this folder: runs
``experiments/trace_gmoe.py`` with the parameters whose name matches the regex
``NODECAY`` in a second parameter group, whose weight decay is the optimizer's
times ``SCALE`` (default 0)::

    NODECAY='experts\.' SCALE=0.25 python graph_moe_ablation_traces/param_groups_patch.py \
        router citeseer --seed 4 --epochs 120 --every 10 -- model=gmoe

It was run before ``expert_weight_decay`` existed, with the task building its
optimizer from ``optimizer_factory``; with the option set in the config (now
``model=gmoe``'s default) the two groupings clash: add
``model.expert_weight_decay=null``.
"""
import os
import re
import sys

sys.path.insert(0, os.getcwd())

import moegraph.train as mt  # noqa: E402
from experiments import trace_gmoe  # noqa: E402

pattern = os.environ["NODECAY"]
orig = mt.instantiate_run


def patched(cfg, trainer=False):
    run = orig(cfg, trainer=trainer)
    task = run["task"]
    fac = task.optimizer_factory

    def factory(params):
        named = list(task.net.named_parameters())
        nd = [p for n, p in named if re.search(pattern, n)]
        dd = [p for n, p in named if not re.search(pattern, n)]
        print("no decay:", [n for n, p in named if re.search(pattern, n)], flush=True)
        opt = fac(params=[{"params": dd}, {"params": nd}])
        opt.param_groups[1]["weight_decay"] *= float(os.environ.get("SCALE", "0"))
        print("groups wd", [g["weight_decay"] for g in opt.param_groups], flush=True)
        return opt

    task.optimizer_factory = factory
    return run


mt.instantiate_run = patched
trace_gmoe.main(sys.argv[1:])
