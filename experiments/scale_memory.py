r"""Memory of the graph pipeline alone, stage by stage: CSBM generation, the
neighbour sampler's CSR, a few sampled batches (no model). A quick probe of
what ``bench_scale.py`` measures with training, for comparing versions of
``moegraph.data``:

    python experiments/scale_memory.py --num-nodes 2000000
    PYTHONPATH=<an older checkout> python experiments/scale_memory.py ...

Peak = the resident high-water mark within the stage (reset at its start).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import peak_rss_gib, reset_peak_rss, rss_gib  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=1_000_000)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args(argv)
    from moegraph.data import csbm_graph
    from moegraph.data.loader import NeighborSampler

    N = args.num_nodes
    stages = {"start": {"rss_gib": rss_gib()}}
    reset_peak_rss()
    t = time.perf_counter()
    data = csbm_graph(num_nodes=N, num_features=32, avg_degree=args.avg_degree,
                      train_ratio=0.02, val_ratio=0.01)
    stages["generate"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_gib(),
                          "s": time.perf_counter() - t}
    reset_peak_rss()
    t = time.perf_counter()
    sampler = NeighborSampler(data.edge_index, N, [10, 5])
    stages["csr"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_gib(),
                     "s": time.perf_counter() - t}
    reset_peak_rss()
    t = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batches):
        sampler.sample(torch.randint(N, (1024,), generator=g), g)
    stages["sample"] = {"peak_gib": peak_rss_gib(), "rss_gib": rss_gib(),
                        "s": time.perf_counter() - t}
    row = {"num_nodes": N, "num_edges": int(data.edge_index.size(1)),
           "moegraph": str(Path(sys.modules["moegraph"].__file__).parent), "stages": stages}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
