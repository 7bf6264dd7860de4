"""Online specialization of the early exit heads from the model's own answers.

A sample answered at exit ``j`` teaches the heads of exits ``0..j-1`` (evaluated, not
selected) the selected exit's prediction: a hard label or its distribution softened at a
temperature. Only those heads train; the backbone (gates included) and the final head stay
frozen, so the model can always fall back to its original behaviour.

The package reads like tent's ``tent.py``: :func:`configure_model` freezes everything but the
early heads, :func:`collect_params` returns what trains, :func:`check_model` asserts the
preconditions with messages that say how to fix them, and :meth:`HeadUpdater.reset` returns to
the heads saved at construction.

How the engine drives a :class:`HeadUpdater`::

    with HeadUpdater(model, UpdaterConfig(mode="async")) as updater:   # close() on exit
        for x in stream.inputs(batch_size=1):
            with updater.serving():             # one consistent version of every head
                step = infer(model, x)          # exit choice; features of evaluated heads
            updater.observe(step.features, step.exit_index, step.selected_logits,
                            step.confidence, step.valid)
            updater.audit(exit_index, answered_pred, final_pred)  # optional, see audit()
        updater.flush()                         # wait for queued work (end of run)

``specialize.engine.Engine(model, policy, hooks=[updater], serving=updater.serving)`` does
the same: :meth:`HeadUpdater.on_step` is the engine hook.

``sync`` mode trains inline every ``update_every`` samples (deterministic: for experiments and
tests); ``async`` mode hands observations to a background thread that trains a shadow copy of
the heads and publishes its weights atomically under the lock :meth:`HeadUpdater.serving`
holds, so inference never waits for training and never reads half-written weights.

Memory: when a head starts with parameter-free layers (``AdaptiveAvgPool2d(1)``,
``Flatten``), they are applied once in :meth:`HeadUpdater.observe` and the replay buffer stores
the pooled vector, not the feature map; the updates train the remaining layers on it, which is
mathematically the same as training the whole head on the map.

Modules, in reading order:

* ``config``: :class:`UpdaterConfig`, one commented field per knob.
* ``model``: the tent-style functions that prepare and check the model.
* ``buffer``: :class:`ReplayBuffer`, one class-balanced buffer per early exit.
* ``observation``: one ``observe()`` batch checked, filtered and pooled.
* ``heads``: head weights as data (snapshots, loading, the precomputed prefix).
* ``trainer``: the update rounds on the early heads.
* ``health``: audit windows and the rollback verdicts.
* ``worker``: the ``async`` mode's background thread.
* ``core``: :class:`HeadUpdater`, which wires them, serves, observes and publishes.
"""

from specialize.updater.buffer import ReplayBuffer
from specialize.updater.config import STRATEGIES, UpdaterConfig
from specialize.updater.core import HeadUpdater
from specialize.updater.model import check_model, collect_params, configure_model
from specialize.updater.observation import ExitFeatures

__all__ = [
    "STRATEGIES",
    "ExitFeatures",
    "HeadUpdater",
    "ReplayBuffer",
    "UpdaterConfig",
    "check_model",
    "collect_params",
    "configure_model",
]
