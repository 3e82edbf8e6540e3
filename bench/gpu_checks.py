"""GPU-only checks of ckakd that the test-suite cannot make on a CPU machine; one subcommand each.

    python bench/gpu_checks.py sanitizer-cases   tiny fused / general Sinkhorn and one case per Triton kernel, for
                                                 compute-sanitizer --tool memcheck / racecheck
    python bench/gpu_checks.py graphs            CUDA-graph capture + replay of a CKA distillation step vs eager,
                                                 and the same step on a side stream vs the default stream
    python bench/gpu_checks.py determinism       two runs of the same forward + backward are bitwise identical
    python bench/gpu_checks.py bigoffset         views whose elements lie past 2**31 of an 8 GiB buffer vs the
                                                 same data in a fresh small tensor
    python bench/gpu_checks.py all
    python bench/gpu_checks.py --dry all         the same logic on CPU tensors (Triton interpreter, C++ extension),
                                                 tiny sizes, the 2**31 limit replaced by a small one

Every check names its backend (``backend="triton"`` for the CKA family, ``"cuda"`` — ``"cpp"`` with ``--dry`` —
for Sinkhorn) and asserts with ``ckakd.ops.track_dispatch`` that it ran there. Each prints one PASS / FAIL line;
the exit status is 1 when any failed (2: no CUDA device without ``--dry``). ``CKAKD_AUTOTUNE=0`` is set unless
``--autotune`` is given (fixed launch configurations: fewer launches under the sanitizer, and the graph capture
uses the same configuration as eager runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's ckakd, also without an editable install

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the checks' modules (bench/gpu_suite/), also when loaded from its path

from gpu_suite.bigoffset import bigoffset  # noqa: E402
from gpu_suite.determinism import determinism  # noqa: E402
from gpu_suite.graphs import graphs  # noqa: E402
from gpu_suite.sanitizer import sanitizer_cases  # noqa: E402
from gpu_suite.support import Env, Runner  # noqa: E402

COMMANDS = ("sanitizer-cases", "graphs", "determinism", "bigoffset")
CHECKS = {"sanitizer-cases": sanitizer_cases, "graphs": graphs, "determinism": determinism, "bigoffset": bigoffset}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen checks; 0 when all passed, 1 when one failed, 2 when they cannot run here."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=(*COMMANDS, "all"), help="which checks")
    p.add_argument("--dry", action="store_true", help="CPU: the checks' logic on CPU tensors, tiny sizes")
    p.add_argument("--autotune", action="store_true", help="keep Triton launch-configuration autotuning on")
    args = p.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (ckakd imports it lazily)
    if not args.autotune:
        os.environ.setdefault("CKAKD_AUTOTUNE", "0")
    import torch

    import ckakd

    env = Env(dry=args.dry)
    if not args.dry and not torch.cuda.is_available():
        print("FAIL gpu_checks: no CUDA device visible (use --dry on a CPU machine)", flush=True)
        return 2
    status = ckakd.backends()
    needed = ("triton", env.ext)
    inactive = [f"{n}: {status[n].detail}" for n in needed if not status[n].active]
    where = "the CPU (dry run)" if args.dry else torch.cuda.get_device_name()
    print(f"gpu_checks on {where}; torch {torch.__version__}; backends: " + "; ".join(str(status[n]) for n in needed))
    if inactive:
        print(f"FAIL gpu_checks: needed backends inactive: {'; '.join(inactive)}", flush=True)
        return 1
    runner = Runner()
    for name in COMMANDS if args.command == "all" else (args.command,):
        CHECKS[name](env, runner)
    print(
        f"{'ALL PASSED' if not runner.failed else 'FAILED'}: {len(runner.results) - runner.failed} passed, "
        f"{runner.failed} failed"
    )
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
