"""``dent bench``: the cost of the dynamic defense against the static model, its floor and a naive reference.

* :mod:`dent.benchmark.config` -- the ``bench`` config section (:class:`BenchSection`) and default defenses;
* :mod:`dent.benchmark.naive` -- :class:`NaiveDent`, dent written the straightforward way (reference only);
* :mod:`dent.benchmark.timing` -- timing with warm-up and repeats, peak memory, profiler breakdowns;
* :mod:`dent.benchmark.runner` -- the benchmark itself (:class:`Bench`) and its table.
"""

from dent.benchmark.config import PRESETS, BenchSection
from dent.benchmark.naive import NaiveDent

__all__ = ["BenchSection", "NaiveDent", "PRESETS"]
