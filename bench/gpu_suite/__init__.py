"""The checks of ``bench/gpu_checks.py``, one module per subcommand (``sanitizer``, ``graphs``, ``determinism``,
``bigoffset``) on what they share (``support``: where they run, the PASS / FAIL runner, the dispatch assertion,
inputs, the error measure). torch and ckakd are imported inside the checks: ``gpu_checks.py --dry`` sets
``TRITON_INTERPRET`` and ``CKAKD_AUTOTUNE`` first."""
