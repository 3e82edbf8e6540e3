"""Build script for ckakd.

The Triton kernels are the subpackage ``ckakd.kernels`` (``ckakd/kernels/``); the
shipped trainer configs (``ckakd/configs/**/*.yaml``) are installed as package data of ``ckakd.configs``.
The C++/CUDA extension (``ckakd._C``) is built from ``csrc/`` when sources are present: a
``CUDAExtension`` when torch has CUDA and ``CUDA_HOME`` is found (or ``FORCE_CUDA=1``), otherwise a
``CppExtension``. Install with ``pip install --no-build-isolation -e .`` so the torch already on the
machine is used (a bare ``torch`` requirement would pull the newest CUDA build).

CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set (e.g. ``"8.0;9.0"``, ``"9.0+PTX"``); otherwise the
GPUs visible at build time, and ``9.0+PTX`` (Hopper machine code, plus PTX that newer GPUs compile at load)
when none is visible, e.g. ``FORCE_CUDA=1`` on a build host without a GPU (torch would fail inside its own
detection there).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules() -> tuple[list, dict]:
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources or os.environ.get("CKAKD_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("FORCE_CUDA") == "1" or (cpp_extension.CUDA_HOME is not None and _torch_has_cuda())
    extra_cxx = ["-O3", "-fopenmp"]
    if want_cuda and cuda_sources:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), _visible_archs())
        ext = cpp_extension.CUDAExtension(
            "ckakd._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": extra_cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
            define_macros=[("WITH_CUDA", None)],  # ckakd._C.has_cuda() reports it
        )
    else:
        ext = cpp_extension.CppExtension(
            "ckakd._C", cpp_sources, extra_compile_args={"cxx": extra_cxx}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


DEFAULT_CUDA_ARCH = "9.0+PTX"


def cuda_arch_list(requested: str | None, visible: list[str]) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` to build with: the user's, else the visible GPUs', else 9.0 + PTX."""
    if requested and requested.strip():
        return requested
    return ";".join(sorted(set(visible))) if visible else DEFAULT_CUDA_ARCH


def _visible_archs() -> list[str]:
    import torch

    try:
        count = torch.cuda.device_count()
        return [".".join(map(str, torch.cuda.get_device_capability(i))) for i in range(count)]
    except Exception:  # no driver on a build host
        return []


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


# The optional dependencies. ``train``: the trainer (YAML configs, progress bars, the curves it plots); ``plot``:
# the plots alone; ``detection``: the trainer plus COCO evaluation and image reading; ``demo``: everything
# ``ckakd demo`` needs (the trainer and scikit-learn's bundled digits); ``test``: everything ``python -m pytest``
# needs. ckakd/apps/errors.py maps a missing module to its extra: keep the two in step.
TRAIN = ["pyyaml>=5.4", "tqdm", "matplotlib"]
EXTRAS = {
    "triton": ["triton>=3.6"],
    "train": TRAIN,
    "plot": ["matplotlib"],
    "detection": [*TRAIN, "pycocotools", "pillow", "scikit-learn"],
    "demo": [*TRAIN, "scikit-learn"],
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb"],
    "test": [
        *TRAIN,
        "pytest",
        "pytest-benchmark",
        "expecttest",
        "scikit-learn",
        "pot",
        "pillow",
        "triton>=3.6",
        "ruff",
        "pycocotools",
    ],
}


def main() -> None:
    ext_modules, cmdclass = extension_modules()
    setup(
        name="ckakd",
        version="0.1.0",
        description=(
            "Fast, exact knowledge-distillation losses built on centered kernel alignment and optimal transport"
        ),
        long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
        if os.path.exists(os.path.join(HERE, "README.md"))
        else "",
        long_description_content_type="text/markdown",
        license_expression="MIT",
        license_files=["LICENSE"],
        python_requires=">=3.10",
        packages=[
            "ckakd",
            "ckakd.ops",
            "ckakd.diagnostics",
            "ckakd.reference",
            "ckakd.train",
            "ckakd.train.data",
            "ckakd.train.distillers",
            "ckakd.train.engine",
            "ckakd.train.models",
            "ckakd.detection",
            "ckakd.detection.data",
            "ckakd.detection.distillers",
            "ckakd.detection.models",
            "ckakd.kernels",
            "ckakd.configs",
            "ckakd.apps",
            "ckakd.apps.selftest",
        ],
        package_data={"ckakd.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        # torch is deliberately not pinned here beyond a floor: an unpinned or newer requirement would make
        # pip replace the torch a user already has (GPU users have their own build).
        # The losses need torch and numpy only; everything else is an extra (the CLI names the one to install
        # when a command needs it, see ckakd/apps/errors.py).
        install_requires=["torch>=2.4", "numpy"],
        extras_require=EXTRAS,
        entry_points={"console_scripts": ["ckakd=ckakd.apps.cli:main", "ckakd-demo=ckakd.apps.demo:main"]},
    )


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    main()
