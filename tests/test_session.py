"""What a trial leaves behind in the process, and `released_session` giving it back."""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest

from fmnist_search import session


def _tiny_model() -> keras.Model:
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((16, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 16)


def _train_one(x: np.ndarray, y: np.ndarray) -> None:
    _tiny_model().fit(x, y, epochs=1, batch_size=8, verbose=0)


def _func_graphs() -> int:
    gc.collect()
    return sum(type(o).__name__ == "FuncGraph" for o in gc.get_objects())


def test_training_registers_gradients_that_outlive_the_model(arrays):
    """The leak this module exists for: without it, each trained model's graph stays."""
    before = session.traced_gradients()
    _train_one(*arrays)
    keras.backend.clear_session(free_memory=True)
    added = session.traced_gradients() - before
    assert added, "a fit no longer registers custom gradients: the workaround may go"
    session.drop_traced_gradients(before)  # leave the process as it was


def test_released_session_frees_each_trials_graphs(arrays):
    with session.released_session():
        _train_one(*arrays)  # warm-up: Keras' and TensorFlow's one-time state
    names, graphs = session.traced_gradients(), _func_graphs()
    for _ in range(3):
        with session.released_session():
            _train_one(*arrays)
    assert session.traced_gradients() == names
    assert _func_graphs() <= graphs


def test_a_model_made_before_still_trains(arrays):
    """Only what was registered inside the block goes; an older model keeps its gradients."""
    x, y = arrays
    kept = _tiny_model()
    kept.fit(x, y, epochs=1, batch_size=8, verbose=0)
    its_own = session.traced_gradients()
    with session.gradients_released():
        _train_one(x, y)
    assert session.traced_gradients() == its_own
    loss = kept.fit(x, y, epochs=2, batch_size=8, verbose=0).history["loss"]
    assert np.isfinite(loss).all()
    del kept
    keras.backend.clear_session(free_memory=True)


def test_gradients_released_on_error(arrays):
    names = session.traced_gradients()
    with pytest.raises(RuntimeError), session.gradients_released():
        _train_one(*arrays)
        raise RuntimeError("the trial failed")
    assert session.traced_gradients() == names
