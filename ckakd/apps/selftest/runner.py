"""Running the checks: what each one dispatched to (:func:`dispatch_problems`), one check's record
(:func:`run_check`), the fast-path records of the CUDA rule and :func:`run_checks` with its progress bar."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckakd.ops import track_dispatch

from .check import Check
from .compare import DTYPE_NAMES, Comparison, clear_reference_cache, reference_scope
from .env import environment

__all__ = ["dispatch_problems", "fast_path_records", "run_check", "run_checks"]


def dispatch_problems(check: Check, ran: dict[tuple[str, str], int]) -> list[str]:
    """Why the recorded dispatches do not show ``check.backend`` doing the work (empty: they do)."""
    backend = check.backend
    if backend == "torch":
        if not check.required and not ran:
            return []  # pure-torch functions without a dispatch point
        others = sorted({f"{op} on {b}" for (op, b), k in ran.items() if b != "torch" and k})
        problems = [f"expected only torch, but {', '.join(others)} ran"] if others else []
        if not any(b == "torch" for (_, b) in ran):
            problems.append("no primitive ran on torch")
        return problems
    problems = []
    for op in check.required:
        if not ran.get((op, backend)):
            elsewhere = sorted(b for (o, b), k in ran.items() if o == op and k)
            where = f" (ran on {', '.join(elsewhere)}: a fallback)" if elsewhere else " (did not run)"
            problems.append(f"{op} did not run on {backend}{where}")
        else:
            fell_back = sorted(b for (o, b), k in ran.items() if o == op and b != backend and k)
            if fell_back:
                problems.append(f"{op} also ran on {', '.join(fell_back)} (a fallback)")
    return problems


def run_check(check: Check) -> dict:
    """Run one check; the record that goes into the report."""
    record: dict = {
        "name": check.name,
        "op": check.op,
        "backend": check.backend,
        "device": check.device,
        "dtype": DTYPE_NAMES[check.dtype],
        "case": check.case,
        "required_dispatch": list(check.required),
    }
    if check.skip:
        record.update(status="skip", message=check.skip, seconds=0.0, comparisons=[], dispatch={})
        return record
    start = time.perf_counter()
    comps: list[Comparison] = []
    problems: list[str] = []
    ran: dict = {}
    try:
        with reference_scope(f"{check.op}|{check.case}"), environment(check.env), track_dispatch() as counter:
            comps = check.run()
            if check.device == "cuda":
                torch.cuda.synchronize()
        ran = dict(counter)
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        problems.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}")
    else:
        problems += dispatch_problems(check, ran)
    for c in comps:  # empty when the check raised
        if not c.ok:
            problems.append(f"{c.what}: max error {c.max_abs_err:.3g} exceeds {c.tolerance()} ({c.ratio:.3g}x)")
    worst = max(comps, key=lambda c: c.ratio, default=None)
    record.update(
        status="fail" if problems else "pass",
        message="; ".join(problems),
        seconds=round(time.perf_counter() - start, 4),
        comparisons=[
            {
                "what": c.what,
                "max_abs_err": c.max_abs_err,
                "atol": c.atol,
                "rtol": c.rtol,
                "scale": c.scale,
                "ratio": c.ratio,
                "ok": c.ok,
            }
            for c in comps
        ],
        max_err=worst.max_abs_err if worst else None,
        tol=worst.tolerance() if worst else None,
        ratio=worst.ratio if worst else None,
        dispatch={f"{op}/{b}": k for (op, b), k in sorted(ran.items())},
    )
    return record


def fast_path_records(status: dict, device: str, on_cuda_rules: bool) -> list[dict]:
    """Under the CUDA rule, one record per fast path (triton, cuda): an inactive one fails, saying why."""
    if not on_cuda_rules:
        return []
    out = []
    for name, consequence in (
        ("triton", "the CKA family (cka, hsic, centered_gram, the CKA losses, patch CKA) would run on the torch path"),
        ("cuda", "Sinkhorn / WKD-L would run on the pure-torch iterations"),
    ):
        b = status[name]
        ok = b.active
        out.append(
            {
                "name": f"fast path {name} active",
                "op": "backends",
                "backend": name,
                "device": device,
                "dtype": "-",
                "case": "-",
                "status": "pass" if ok else "fail",
                "message": "" if ok else f"{name} is inactive on this CUDA machine ({b.detail}): {consequence}",
                "seconds": 0.0,
                "comparisons": [],
                "dispatch": {},
            }
        )
    return out


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # optional: no progress bar without it
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="check", dynamic_ncols=True, leave=False)


def run_checks(checks: Sequence[Check], *, progress: bool = True) -> list[dict]:
    """Run ``checks`` in order with a progress bar (tqdm, on stderr, when installed)."""
    bar = _progress(len(checks), progress)
    clear_reference_cache()  # reference results are shared within one run only
    records = []
    for check in checks:
        if bar is not None:
            bar.set_description_str(check.name[:60])
        records.append(run_check(check))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return records
