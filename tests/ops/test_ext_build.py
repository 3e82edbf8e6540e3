"""ckakd._ext: what a failed JIT build of the C++ extension reports (a real, tiny, failing build)."""

from __future__ import annotations

import shutil

import pytest

from ckakd import _ext


@pytest.mark.skipif(shutil.which("ninja") is None or shutil.which("c++") is None, reason="needs ninja and c++")
def test_failed_jit_build_shows_the_compiler_error_not_the_warnings(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    noise = [f'#warning "noisy warning number {i}"' for i in range(40)]
    (src / "broken.cpp").write_text("\n".join([*noise, "int f() { return undefined_name + 1; }", ""]))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.delenv("CKAKD_NO_JIT", raising=False)
    monkeypatch.setattr(_ext, "CSRC", src)
    monkeypatch.setattr(_ext, "JIT_NAME", "ckakd_broken_jit_test")
    module, detail = _ext._jit()
    assert module is None
    assert detail.startswith("JIT build failed (RuntimeError: Error building extension 'ckakd_broken_jit_test'")
    assert "broken.cpp:41:" in detail and "error:" in detail and "undefined_name" in detail  # the compiler's line
    assert "noisy warning" not in detail  # not the page of warnings before it
    assert len(detail.splitlines()) <= 13


def test_build_error_summary_keeps_error_lines_and_their_excerpts():
    log = "\n".join(
        [
            "Error building extension 'x': [1/2] c++ -MMD -MF a.o.d -O3 -c a.cpp -o a.o",
            *[f"a.cpp:{i}:2: warning: unused variable 'v{i}' [-Wunused-variable]" for i in range(30)],
            "FAILED: a.o",
            "a.cpp:40:5: error: expected ';' before '}' token",
            "   40 |   x = 1",
            "      |        ^",
            "ld: undefined reference to `g()'",
            "ninja: build stopped: subcommand failed.",
        ]
    )
    text = _ext.build_error_summary(RuntimeError(log))
    assert text.splitlines()[0] == "RuntimeError: Error building extension 'x'"
    body = [ln.strip() for ln in text.splitlines()[1:]]
    assert body == [
        "FAILED: a.o",
        "a.cpp:40:5: error: expected ';' before '}' token",
        "40 |   x = 1",
        "|        ^",
        "ld: undefined reference to `g()'",
        "ninja: build stopped: subcommand failed.",
    ]
