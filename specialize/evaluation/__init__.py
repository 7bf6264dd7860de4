"""Offline evaluation of a multi-exit model on labelled held-out data.

Owns the cost/accuracy arithmetic: :mod:`~specialize.evaluation.curves` (threshold sweeps,
Pareto fronts, the oracle, iso-accuracy, the drop's standard error; numpy only) and
:mod:`~specialize.evaluation.passes` (:class:`~specialize.evaluation.passes.ExitPass`: one
pass of every exit over a data set, its heads re-run for new head weights, operating points
and per-class tables).

May import: ``backbones`` and ``streams``; nothing else of ``specialize``. Everything above
(the policy, the operating point, the run, the report) measures through here.
"""
