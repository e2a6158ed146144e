r"""moegraph: Mixture-of-Experts for graphs and multi-task learning."""
__version__ = "0.1.0"
