"""The pynetdicom polling tune: only the association reactor's 1 ms wait is shortened."""

from __future__ import annotations

import time
import types

import pynetdicom.association as assoc_module

from dicom_node.scp import tune_pynetdicom_polling


def test_only_the_one_millisecond_wait_is_shortened_and_tuning_twice_does_not_nest():
    original = assoc_module.time
    calls: list[float] = []
    fake = types.ModuleType("time")
    fake.__dict__.update(time.__dict__)  # a plain time module, whatever tuned pynetdicom before
    fake.sleep = calls.append  # the "real" sleep records what it is asked for
    assoc_module.time = fake
    try:
        tune_pynetdicom_polling(0.0002)
        tune_pynetdicom_polling(0.0003)  # re-tuning replaces, never wraps the shim
        shim = assoc_module.time
        shim.sleep(0.001)  # the reactor's per-turn wait
        shim.sleep(0.1)  # other waits of pynetdicom stay as they are
        shim.sleep(0.0001)
        assert calls == [0.0003, 0.1, 0.0001]
        assert shim.time is time.time and shim.monotonic is time.monotonic
        tune_pynetdicom_polling(0.005)  # never longer than pynetdicom's own 1 ms
        assoc_module.time.sleep(0.001)
        assert calls[-1] == 0.001
    finally:
        assoc_module.time = original
