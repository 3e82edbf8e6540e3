"""The benchmark harness of ``bench/bench_<op>.py`` and ``bench/run_all.py``, one module per job.

* :mod:`harness.spec` — what a benchmark is: :class:`~harness.spec.OpBench` (shapes, presets, inputs, cost model,
  providers, checking baseline, targets), :class:`~harness.spec.Target`, the run's config, one result row;
* :mod:`harness.providers` — building blocks of the bench modules (ckakd / reference providers,
  ``torch.compile`` of a baseline, correlated features, the per-mode cost split);
* :mod:`harness.measure` — timing, peak memory, kernel launches, the machine ceilings and the roofline floor;
* :mod:`harness.run` — one bench: the value and gradient check against the baseline, then every timed row;
* :mod:`harness.report` — the markdown tables (results, ratios to ckakd, targets) and the CSV files;
* :mod:`harness.cli` — the shared command line: :func:`harness.cli.main` runs any number of benches.

Every provider's loss value and gradients are checked against the bench's baseline provider once per shape before
anything is timed (that first call is also the warm-up and absorbs ``torch.compile``). On CUDA each row also counts
the kernels one call launches (``torch.profiler``; see :func:`harness.measure.kernel_launches`).
"""
