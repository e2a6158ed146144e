r"""Utilities shared across moegraph (graph helpers in :mod:`moegraph.utils.graph`)."""
