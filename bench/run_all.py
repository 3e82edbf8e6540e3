"""Run every ckakd benchmark (one per op) with the shared flags; one CSV, all tables.

Ops: alignment_stats (timed through ``ckakd.cka``), centered_gram, patch_alignment_stats (through
``ckakd.patch_cka_loss``), sinkhorn (through ``ckakd.wkd_logit_loss``).

python bench/run_all.py --quick              # minutes on 2 CPU cores
python bench/run_all.py --device cpu         # the CPU presets
python bench/run_all.py --device cuda        # the GPU presets (default when CUDA is available)
python bench/run_all.py --ops alignment_stats --shapes n256-d16k --providers ckakd,reference --modes full
"""

from __future__ import annotations

import sys

import bench_alignment_stats
import bench_centered_gram
import bench_patch_alignment_stats
import bench_sinkhorn
from harness import cli

BENCHES = {
    b.op: b
    for b in (
        bench_alignment_stats.BENCH,
        bench_centered_gram.BENCH,
        bench_patch_alignment_stats.BENCH,
        bench_sinkhorn.BENCH,
    )
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ops = tuple(BENCHES)
    if "--ops" in args:  # the one flag only run_all has; the rest goes to the shared parser
        i = args.index("--ops")
        ops = tuple(s for s in args[i + 1].split(",") if s)
        del args[i : i + 2]
        unknown = [o for o in ops if o not in BENCHES]
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; choose from {', '.join(BENCHES)}")
    return cli.main([BENCHES[o] for o in ops], args, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
