"""Every benchmark of the pipeline, one module per ``make bench-*`` target.

* :func:`bench_features` (``make bench-features``, :mod:`.stage_one`): runtimes,
  the streaming stage and start-up against the pure forward pass, on the same images;
* :func:`bench_features_ray` (``make bench-features ENGINE=ray``, :mod:`.on_ray`);
* :func:`bench_heads_on_folders` (``make bench-heads``, :mod:`.heads`): the head sweep
  against stage one's time, both timed in the run (:func:`bench_heads` on given caches
  takes their recorded extraction time); :func:`bench_heads_synthetic` (``make bench-heads
  CLASSES=100 ROWS=3000,30000``) on synthetic many-class features (:mod:`.synthetic`);
* :func:`bench_finetune` (``make bench-finetune``, :mod:`.finetune`): a phase-two
  epoch against a stage-one pass.

Figures are ratios measured in one run on the same machine; each writes its JSON
under ``artifacts/bench/``.
"""

from pipeline.benchmarks.finetune import bench_finetune
from pipeline.benchmarks.heads import bench_heads, bench_heads_on_folders, bench_heads_synthetic
from pipeline.benchmarks.on_ray import bench_features_ray
from pipeline.benchmarks.stage_one import bench_features

__all__ = [
    "bench_features",
    "bench_features_ray",
    "bench_finetune",
    "bench_heads",
    "bench_heads_on_folders",
    "bench_heads_synthetic",
]
