"""retrain --watch --fine_tune runs for days: nothing a retrain traces may outlive it.

Each retrain fine-tunes a new base and traces functions for it (the train step, the feature
function of the fine-tuned base). Counted here after each of two retrains of a --watch: fine-tuned
bases still alive, TensorFlow graphs and graph operations still alive.
"""

from __future__ import annotations

import gc
import threading

import tensorflow as tf

from imageclf.bases import BaseModel
from imageclf.fine_tune import FineTuneConfig
from imageclf.retrain import RetrainOptions, retrain
from imageclf.training import TrainConfig
from imageclf.watch import watch
from tests.demo_data import make_dataset


def alive() -> dict[str, int]:
    gc.collect()
    objects = gc.get_objects()
    return {"fine-tuned bases": sum(1 for o in objects if isinstance(o, BaseModel)
                                    and o.fingerprint.startswith("finetuned:")),
            "graphs": sum(1 for o in objects if isinstance(o, tf.Graph)),
            "operations": sum(1 for o in objects if isinstance(o, tf.Operation))}


def test_watch_with_fine_tune_frees_what_each_retrain_traced(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=4)
    opts = RetrainOptions(image_dir=str(data), output_graph=str(tmp_path / "graphs" / "m.pb"),
                          bottleneck_dir=str(tmp_path / "bottlenecks"), tfhub_module="builtin",
                          training=TrainConfig(steps=20, eval_step_interval=20, progress=False),
                          fine_tune=FineTuneConfig(blocks=1, max_epochs=1, patience=1, batch_size=8, progress=False))
    after = []

    def run():
        assert retrain(opts, log=lambda line: None).graph.is_file()
        after.append(alive())
        make_dataset(data, per_class=1, start=100 + len(after))  # the next change for the watch to see

    runs = watch(data, run, lambda line: None, interval=0.05, settle=0, stop=threading.Event(), max_runs=2)
    assert runs == 2
    assert [counts["fine-tuned bases"] for counts in after] == [0, 0]
    assert after[1] == after[0], after  # the second retrain left nothing more behind than the first
