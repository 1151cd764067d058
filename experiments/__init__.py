"""Experiments: the bench drivers, audits and probes behind every published figure.

Nothing in the library packages imports this one. Run a driver as a module from the repository root
(``python -m experiments.dp_step --help``) or through ``rib-edge bench ...``; its specs are checked-in
files under ``experiments/specs/``, its results go to ``benchmarks/results/``.
"""
