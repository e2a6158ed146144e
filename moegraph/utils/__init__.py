r"""Utilities shared by the layers, the data and the tasks (graph helpers in
:mod:`moegraph.utils.graph`)."""
