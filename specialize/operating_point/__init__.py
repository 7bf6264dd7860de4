"""The label-free operating point: exit thresholds that hold an accuracy budget on the stream.

Owns one concept in four modules: :mod:`~specialize.operating_point.search` (the estimator of
the drop at the stream's class mix and the threshold search, with the guarantee in words),
:mod:`~specialize.operating_point.controller` (:class:`BudgetController`, the step hook that
re-chooses the thresholds online), :mod:`~specialize.operating_point.audits` (which samples
run on to the final exit, and the label-free figures from them) and
:mod:`~specialize.operating_point.calibration` (temperature scaling of the final exit).

May import: :mod:`specialize.evaluation`, :mod:`specialize.policy`,
:mod:`specialize.updater` (the class prior) and ``backbones``; never the run, the
specializer or the report.
"""
