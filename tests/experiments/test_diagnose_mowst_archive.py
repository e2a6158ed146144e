r"""``experiments/diagnose_mowst.py`` reads a dataset's runs from the
``before_planetoid_protocol`` archive only while the cache folder has no
Mowst-variant run of it, and then both its GNN and Mowst runs."""


def test_run_dirs_archive_fallback(script, tmp_path, monkeypatch):
    diag = script("diagnose_mowst")
    runs, study = tmp_path / "mowst_diagnosis_runs", tmp_path / "node_classification_runs"
    monkeypatch.setattr(diag, "RUNS", runs)
    monkeypatch.setattr(diag, "STUDY_RUNS", study)
    for folder in (runs / diag.ARCHIVE, study / diag.ARCHIVE):
        folder.mkdir(parents=True)
    (runs / diag.ARCHIVE / "cora__mowst_paper__gcn__seed0.json").write_text("{}")
    (study / diag.ARCHIVE / "cora__gnn__gcn__seed0.json").write_text("{}")
    # a GNN run of the new protocol does not pull cora out of the archive
    (study / "cora__gnn__gcn__seed0.json").write_text("{}")
    assert diag.run_dirs("cora") == (runs / diag.ARCHIVE, study / diag.ARCHIVE)
    assert diag.archived("cora")
    assert diag.gnn_record("cora", "gcn", 0, *diag.run_dirs("cora")) == \
        study / diag.ARCHIVE / "cora__gnn__gcn__seed0.json"
    # no archive for a dataset: the cache folders
    assert diag.run_dirs("reed98") == (runs, study) and not diag.archived("reed98")
    # a Mowst-variant run of the current protocol: the cache folders again
    (runs / "cora__mowst_paper__gcn__seed0.json").write_text("{}")
    assert diag.run_dirs("cora") == (runs, study) and not diag.archived("cora")
    assert diag.gnn_record("cora", "gcn", 0, *diag.run_dirs("cora")) == \
        study / "cora__gnn__gcn__seed0.json"
