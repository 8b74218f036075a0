import gc

from slicelm.engine.gc_tuning import YOUNG_THRESHOLD, tune_gc


def test_tune_gc_freezes_the_heap_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        cycle: list = []
        cycle.append(cycle)  # cyclic garbage made after the freeze is still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
