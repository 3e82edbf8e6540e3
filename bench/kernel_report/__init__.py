"""The modules of the offline compile report (``bench/compile_report.py``), one per job.

* :mod:`kernel_report.ptxas` — resource usage from ptxas / nvcc / cuobjdump output, C++ kernel names;
* :mod:`kernel_report.launches` — recorded launches, Triton's specialization key, the config string, recording;
* :mod:`kernel_report.harvest` — the literal shapes and keywords of the kernel test files (``ast``);
* :mod:`kernel_report.sweep` — the launcher calls from the tests, the benchmarks and the launch tables;
* :mod:`kernel_report.compiling` — every variant compiled for the target arch with no GPU (fake driver, ptxas);
* :mod:`kernel_report.cuda_sources` — ``csrc/*.cu`` through ``nvcc -Xptxas -v``;
* :mod:`kernel_report.output` — the rows, the CSV, the markdown table, the per-kernel summary, the offenders.

Nothing here imports triton or torch at module level: the report re-executes itself with the target triton first
on the path, and only that child process imports them.
"""
