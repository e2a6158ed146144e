r"""The HoME diagnosis script: the weight rescaling it uses to test the
effective-step hypothesis leaves the function unchanged, and its table."""
import torch


def test_unit_scale_keeps_the_function_and_makes_unit_pre_activations(script):
    diag = script("diagnose_home")
    from moegraph.nn import HoME

    torch.manual_seed(0)
    x = torch.randn(64, 10)
    model = HoME(10, 8, ["a", "b"], feature_gate=False)
    for lv in model.levels:
        lv.norm.eps = 1e-12  # near-exact invariance (with eps it holds up to eps / variance)
    model.train()
    before = model(x)
    diag.unit_scale(model, x)
    after = model(x)  # train-mode batch norm: invariant to each unit's scale
    for t in ("a", "b"):
        torch.testing.assert_close(after.outputs[t], before.outputs[t], rtol=1e-4, atol=1e-5)
    lv = model.levels[0]
    pre = torch.einsum("nf,efh->neh", x, lv.weight) + lv.bias  # level 1 reads x itself
    torch.testing.assert_close(pre.std(0), torch.ones(lv.num_experts, 8))


def test_summary_table_means(script):
    diag = script("diagnose_home")

    def rec(vals, losses, best, test):
        return {"epochs": [{"val_mean": v, "train_loss": tl} for v, tl in
                           zip(vals, losses, strict=True)],
                "best_epoch": best, "test": {"y1": test, "y2": test}}

    recs = {"M": [rec([0.5, 0.7, 0.6], [1.0, 0.5, 0.2], 2, 0.6),
                  rec([0.6, 0.8, 0.9], [0.9, 0.4, 0.3], 3, 0.8)]}
    row = diag.summary_table(recs, "AUC").splitlines()[2]
    # best epoch (2 + 3) / 2; best val (0.7 + 0.9) / 2; last val (0.6 + 0.9) / 2; test 0.7;
    # train loss at the best epoch (0.5 + 0.3) / 2, at the last (0.2 + 0.3) / 2
    assert row == "| M | 2 | 2.5 | 0.8000 | 0.7500 | 0.7000 | 0.400 / 0.250 | - | - |"
