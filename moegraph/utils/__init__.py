r"""Utilities shared by the layers, the data and the tasks."""
