r"""Naive routing references shared by the nn tests.

Plain Python over lists of floats (loops, ``sorted``, ``math.exp``): no code in
common with the routers they check. Assignments are, per row, a list of
``(expert, weight)`` pairs, best first, null experts dropped.
"""
import math

import torch


def naive_logits(x, weight):
    r"""``x W^T`` with plain loops, in double precision."""
    W = weight.detach().double().tolist()
    X = x.detach().double().tolist()
    return [[sum(a * b for a, b in zip(row, w, strict=True)) for w in W] for row in X]


def naive_softmax(logits):
    out = []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return out


def ranked(row):
    r"""Expert indices of one row, best first."""
    return sorted(range(len(row)), key=lambda i: -row[i])


def naive_topk(probs, k, num_experts, normalize=True):
    r"""Per row: the k most probable experts (null ones dropped), best first."""
    out = []
    for row in probs:
        chosen = ranked(row)[:k]
        mass = sum(row[i] for i in chosen)
        out.append([(i, row[i] / mass if normalize else row[i]) for i in chosen if i < num_experts])
    return out


def naive_topp(probs, p, num_experts, max_k=None, normalize=False):
    r"""Per row: the smallest prefix (by probability) whose mass reaches p."""
    out = []
    for row in probs:
        kept, mass = [], 0.0
        for i in ranked(row):
            kept.append(i)
            mass += row[i]
            if mass >= p:
                break
        if max_k is not None:
            kept = kept[:max_k]
        total = sum(row[i] for i in kept)
        out.append([(i, row[i] / total if normalize else row[i]) for i in kept if i < num_experts])
    return out


def naive_expert_choice(probs, capacity_factor, num_experts):
    r"""Per expert: its c best rows, ``c = ceil(N * cf / E)`` (at most N)."""
    N = len(probs)
    c = min(N, math.ceil(N * capacity_factor / num_experts))
    out = [[] for _ in range(N)]
    for e in range(num_experts):
        rows = sorted(range(N), key=lambda n: -probs[n][e])[:c]
        for n in rows:
            out[n].append((e, probs[n][e]))
    return out, c


def to_dense(assignments, num_experts):
    r"""Assignments as a dense ``[N, E]`` float64 weight matrix."""
    dense = torch.zeros(len(assignments), num_experts, dtype=torch.float64)
    for n, pairs in enumerate(assignments):
        for e, w in pairs:
            dense[n, e] += w
    return dense
