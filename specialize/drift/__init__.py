"""Per-class compute tracking over a stream, and drift alarms.

Online objects in the style of river: build once, feed with ``update``, read with ``get`` or
``drift_detected``, save with ``state_dict`` and restore with ``load_state_dict``. Every state
dict holds plain numbers, strings and lists only, so it can be written with ``json`` or
``torch.save`` and a resumed object continues exactly where the saved one stopped.

* :class:`ClassCostTracker` (``tracker.py``) records, per predicted class (and per true class
  when an evaluator supplies labels), how many samples were seen, their mean FLOPs and the
  exits they took: cumulatively, in the current window, and for every closed window.
* :class:`DriftDetector` (``base.py``) is the small base class of the detectors, one a file:
* :class:`PageHinkley` (``page_hinkley.py``) raises an alarm when the mean of a scalar signal
  (e.g. each sample's FLOPs as a fraction of the full path) shifts up and/or down.
* :class:`ClassMixDriftDetector` (``class_mix.py``) raises an alarm when the mix of predicted
  classes in the last ``window`` samples moves away from a reference window's.

FLOPs follow the project's convention: a multiply-add counts 2.
"""

from specialize.drift.base import DriftDetector
from specialize.drift.class_mix import ClassMixDriftDetector
from specialize.drift.page_hinkley import PageHinkley
from specialize.drift.tracker import ClassCostTracker

__all__ = [
    "ClassCostTracker",
    "ClassMixDriftDetector",
    "DriftDetector",
    "PageHinkley",
]
