# The Hydra config tree; installed as the package moegraph.conf (see pyproject.toml).
