"""Data parallelism for train.py --distribute: tf.distribute strategies, or keras.distribution under jax.

The batch size stays the global batch: each step sees the same images whatever the replica count, so the
learning rate needs no scaling. In a multi-worker run every worker runs every step (validation predictions
and checkpoints included) so that all take the same decisions, and only the chief's files are kept.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from nerve.common import UserError

import keras


def distribute(mode):
    """Set up --distribute for the backend; return (a context factory to build models in, replicas, whether
    this process writes the results)."""
    backend = keras.backend.backend()
    if mode == "none":
        return contextlib.nullcontext, 1, True
    if backend == "tensorflow":
        import tensorflow as tf

        if mode == "multiworker":
            strategy = multiworker_strategy()
            return strategy.scope, strategy.num_replicas_in_sync, is_chief(strategy.cluster_resolver)
        devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope, strategy.num_replicas_in_sync, True
    if backend == "jax" and mode == "mirrored":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext, len(devices), True
    needs = "tensorflow or jax" if mode == "mirrored" else "tensorflow"
    raise UserError(f"--distribute {mode} needs the {needs} backend, not {backend}")


def multiworker_strategy():
    """tf.distribute.MultiWorkerMirroredStrategy over the cluster in TF_CONFIG."""
    import tensorflow as tf

    try:
        config = json.loads(os.environ.get("TF_CONFIG", ""))
    except ValueError:
        config = None
    if not (isinstance(config, dict) and "cluster" in config and {"type", "index"} <= set(config.get("task") or {})):
        raise UserError(
            "--distribute multiworker needs TF_CONFIG describing the cluster and this process's task, "
            'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\' (see the README)'
        )

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3.15's fit() hands reduce() a nested batch and scalar logs with axis=0, which the
        # multi-worker strategy rejects (keras-team/keras#20585): reduce each value on its own
        def reduce(self, reduce_op, value, axis):
            def one(v):
                return super(Strategy, self).reduce(reduce_op, v, None if axis == 0 and v.shape.rank == 0 else axis)

            return tf.nest.map_structure(one, value)

    return Strategy()


def is_chief(resolver):
    """The task that writes results: the "chief" if the cluster has one, else worker 0."""
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


@contextlib.contextmanager
def worker_outputs(config, chief, resume):
    """The run's settings as this worker writes with them: the other workers of a multi-worker run write into a
    scratch folder, deleted when they finish."""
    if chief:
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="nerve-worker-") as scratch:
        if resume:  # every worker resumes from the chief's files, so they must see results/
            shutil.copytree(config.results, Path(scratch) / "results")
        mine = config.replace(results=Path(scratch) / "results", logs=Path(scratch) / "logs")
        try:
            yield mine
        except UserError as e:  # point the user at the chief's folder, which --resume continues from
            raise UserError(str(e).replace(str(mine.results), str(config.results))) from None
