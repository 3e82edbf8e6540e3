"""Kernel launches: binding a recorded ``kernel[grid](...)`` to parameter names, the specialization key Triton
compiles a separate binary for (what the report deduplicates on), the compact config string of a variant, and
recording the launches of ckakd's launchers instead of running them."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# SM count the launch heuristics see while recording: an H200's
H200_SMS = 132

_DTYPE_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "bool": "i1",
    "float8_e4m3fn": "fp8e4nv",
    "float8_e5m2": "fp8e5",
}


def dtype_name(dtype: Any) -> str:
    """Triton's short name of a torch dtype (``torch.bfloat16`` -> ``bf16``)."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def is_pointer(value: Any) -> bool:
    return hasattr(value, "data_ptr") and hasattr(value, "dtype")


def data_ptr(value: Any) -> int:
    """The address Triton sees: meta tensors have none, so it is a 1024-aligned base plus the storage offset."""
    if getattr(getattr(value, "device", None), "type", None) == "meta":
        return 1024 + value.storage_offset() * value.element_size()
    return int(value.data_ptr())


def arg_spec(value: Any, specialize: bool = True, align: bool = True) -> tuple[str, Any]:
    """(type, key) of a non-constexpr argument, as Triton's ``native_specialize_impl`` computes it.

    ints equal to 1 become the constant 1, others are i32 / i64 / u64 by range and keyed ``"D"`` when
    divisible by 16; pointers are keyed ``"D"`` when 16-byte aligned; bools are ``u1``, floats ``fp32``.
    """
    if value is None:
        return ("constexpr", None)
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, int):
        if specialize and value == 1:
            return ("constexpr", 1)
        if -(2**31) <= value < 2**31:
            ty = "i32"
        elif 2**63 <= value < 2**64:
            ty = "u64"
        else:
            ty = "i64"
        return (ty, "D" if specialize and value % 16 == 0 else "")
    if isinstance(value, float):
        return ("fp32", None)
    if is_pointer(value):
        return ("*" + dtype_name(value.dtype), "D" if align and data_ptr(value) % 16 == 0 else "")
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    constexpr: bool
    specialize: bool = True
    align: bool = True


def kernel_params(kernel: Any) -> list[Param]:
    """The parameters of a ``@triton.jit`` kernel (JITFunction or the interpreter's InterpretedFunction)."""
    params = getattr(kernel, "params", None)
    if params:
        return [
            Param(
                p.name,
                bool(p.is_constexpr),
                not getattr(p, "do_not_specialize", False),
                not getattr(p, "do_not_specialize_on_alignment", False),
            )
            for p in params
        ]
    out = []
    for p in inspect.signature(kernel.fn).parameters.values():
        ann = p.annotation
        constexpr = "constexpr" in ann if isinstance(ann, str) else getattr(ann, "__name__", "") == "constexpr"
        out.append(Param(p.name, constexpr))
    return out


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(fn))


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its arguments (bound by name) and launch options."""

    kernel: Any
    grid: tuple
    args: dict[str, Any]
    options: dict[str, Any]
    source: str = ""

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)

    def constexprs(self) -> dict[str, Any]:
        return {p.name: self.args.get(p.name) for p in kernel_params(self.kernel) if p.constexpr}


def bind_launch(kernel: Any, grid: Any, args: Sequence[Any], meta: dict[str, Any], source: str = "") -> Launch:
    """Bind ``kernel[grid](*args, **meta)`` to parameter names; the rest of ``meta`` are launch options."""
    names = [p.name for p in kernel_params(kernel)]
    if len(args) > len(names):
        raise TypeError(f"{kernel_name(kernel)}: {len(args)} positional arguments for {len(names)} parameters")
    bound = dict(zip(names, args, strict=False))
    options = {}
    for key, value in meta.items():
        if key in names:
            bound[key] = value
        else:
            options[key] = value
    if callable(grid):
        try:
            grid = grid(dict(bound, **options))
        except Exception:
            grid = ("?",)
    return Launch(kernel, tuple(grid), bound, options, source)


def specialization_key(launch: Launch) -> tuple:
    """What Triton compiles a separate binary for: kernel, constexprs, options, argument types / specialization."""
    parts = []
    for p in kernel_params(launch.kernel):
        value = launch.args.get(p.name)
        if p.constexpr:
            parts.append((p.name, "constexpr", repr(value)))
        else:
            parts.append((p.name, *arg_spec(value, p.specialize, p.align)))
    fn = getattr(launch.kernel, "fn", launch.kernel)
    module = getattr(fn, "__module__", "")
    return (f"{module}.{launch.name}", tuple(parts), tuple(sorted((k, repr(v)) for k, v in launch.options.items())))


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def config_string(launch: Launch) -> str:
    """Compact description of a variant (see the module docstring); no commas."""
    consts, ptrs, ints = [], [], []
    for p in kernel_params(launch.kernel):
        value = launch.args.get(p.name)
        if p.constexpr:
            consts.append(f"{p.name}={_short(value)}")
            continue
        ty, key = arg_spec(value, p.specialize, p.align)
        if ty.startswith("*"):
            ptrs.append(ty[1:] + ("" if key == "D" else "!"))
        elif ty == "constexpr":
            ints.append("1" if value == 1 else "n")
        elif ty in ("i64", "u64"):
            ints.append("L" if key == "D" else "l")
        elif ty == "u1":
            ints.append("b")
        elif ty == "fp32":
            ints.append("f")
        else:
            ints.append("D" if key == "D" else ".")
    extra = [f"{k}={_short(v)}" for k, v in sorted(launch.options.items()) if k != "num_warps"]
    out = consts + extra
    if ptrs:
        out.append("ptrs=" + "/".join(ptrs))
    if ints:
        out.append("ints=" + "".join(ints))
    return " ".join(out)


def _jit_classes() -> list[type]:
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    with contextlib.suppress(Exception):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def recording_launches(callback: Callable[[Any, Any, tuple, dict], None], sms: int = H200_SMS) -> Iterator[None]:
    """Record every kernel launch of ckakd's launchers instead of running it.

    Uses ``ckakd.kernels._launch.recording`` when the package has it (then ``choose`` offers every
    candidate), and in any case patches ``JITFunction.run`` (and the interpreter's) so that a launcher
    calling ``kernel[grid](...)`` directly is recorded too. ``num_sms`` of every kernels module reports
    ``sms``.
    """
    import ckakd.kernels  # noqa: F401  (its modules must be loaded to patch num_sms)

    patched: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        patched.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def make_run(original: Callable) -> Callable:
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            callback(self, grid, args, kwargs)
            return None

        return run

    with contextlib.ExitStack() as stack:
        for cls in _jit_classes():
            patch(cls, "run", make_run(cls.run))
        for name, mod in list(sys.modules.items()):
            if name.startswith("ckakd.kernels") and callable(getattr(mod, "num_sms", None)):
                patch(mod, "num_sms", lambda device, _sms=sms: _sms)
        try:
            launch_mod = importlib.import_module("ckakd.kernels._launch")
        except ImportError:
            launch_mod = None
        if launch_mod is not None and hasattr(launch_mod, "recording"):
            stack.enter_context(launch_mod.recording(callback))
        try:
            yield
        finally:
            for obj, attr, value in reversed(patched):
                setattr(obj, attr, value)


def dedupe(launches: Iterable[Launch]) -> dict[tuple, Launch]:
    """One launch per specialization key (the first seen; its ``source`` lists every source that reached it)."""
    out: dict[tuple, Launch] = {}
    for launch in launches:
        key = specialization_key(launch)
        if key in out:
            if launch.source not in out[key].source.split("+"):
                out[key].source += "+" + launch.source
        else:
            out[key] = dataclasses.replace(launch)
    return out
