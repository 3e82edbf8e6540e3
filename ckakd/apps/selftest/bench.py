"""``ckakd selftest --bench``: the benchmarks of a source checkout (``bench/run_all.py``) as one more record."""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["bench_dir", "run_bench"]


def bench_dir() -> Path:
    """``bench/`` of the source checkout this package sits in (absent in a non-editable install)."""
    return Path(__file__).resolve().parents[3] / "bench"


def run_bench(device: str, out: str | None) -> dict:
    """The benchmarks of a source checkout: GPU presets on CUDA, the quick CPU presets otherwise."""
    bench = bench_dir()
    record = {
        "name": "benchmarks (bench/run_all.py)",
        "op": "bench",
        "backend": "auto",
        "device": device,
        "dtype": "fp32",
        "case": "-",
        "comparisons": [],
        "dispatch": {},
    }
    if not (bench / "run_all.py").is_file():
        record.update(
            status="skip",
            seconds=0.0,
            message=f"--bench needs a source checkout: {bench / 'run_all.py'} is not there (a non-editable install)",
        )
        return record
    argv = ["--device", "cuda"] if device == "cuda" else ["--quick", "--device", "cpu"]
    if out:
        argv += ["--out", out]
    start = time.perf_counter()
    sys.path.insert(0, str(bench))
    sys.modules.pop("run_all", None)  # this checkout's, not one imported from elsewhere
    try:
        import run_all  # bench/run_all.py of this checkout, found through the sys.path entry above

        rc = run_all.main(argv)
        message = "" if rc == 0 else f"bench/run_all.py {' '.join(argv)} exited {rc} (a value check failed)"
    except SystemExit as exc:  # argument errors
        rc, message = exc.code, f"bench/run_all.py {' '.join(argv)} stopped: {exc}"
    except Exception as exc:
        rc, message = 1, f"bench/run_all.py {' '.join(argv)} failed: {type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(str(bench))
    record.update(status="pass" if rc == 0 else "fail", message=message, seconds=round(time.perf_counter() - start, 2))
    record["argv"] = argv
    return record
