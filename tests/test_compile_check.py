"""``python -m embedloss_kernels.compile_check`` in CI: ahead-of-time compiles of the Triton kernels for sm_80 and
sm_90 (no GPU needed) must succeed without register spills."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_compile_check_compiles_every_kernel_and_variant_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-m", "embedloss_kernels.compile_check"], env=env,
                              capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("compile_check took over 30 minutes")
    out = proc.stdout + proc.stderr
    if "No module named 'triton.backends.nvidia" in out:
        pytest.skip("this triton build has no NVIDIA backend to compile for")
    assert proc.returncode == 0, out[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:-1]]
    kernels = {r[0] for r in rows}
    assert kernels == _launched_kernels() == {
        "row_lse_kernel", "softmax_grad_kernel", "row_pass_kernel", "flash_dx_kernel", "flash_dy_kernel",
        "pair_lse_kernel", "pair_grad_kernel", "gist_masked_logits_kernel", "matryoshka_row_stats_kernel",
        "matryoshka_row_grad_kernel", "siglip_row_kernel"}
    # GIST's guide may come in another dtype than the model's embeddings (a float32 guide beside bf16 training)
    gist = [" ".join(r[1:r.index("guide") + 3]) for r in rows if r[0] == "gist_masked_logits_kernel"]
    assert {"bf16 BM32 BN32 BK32 guide fp32 BK32", "fp64 BM16 BN16 BK16 guide bf16 BK32"} <= set(gist)
    assert {r[-5] for r in rows} == {"sm_80", "sm_90"}
    # every penalty / mask variant is compiled (the modes add loads and compares: they once spilled alone)
    assert {tuple(r[6:8]) for r in rows if r[0] == "row_lse_kernel" and r[1] == "fp32"} >= {
        ("pen0", "mask0"), ("pen1", "mask0"), ("pen2", "mask0"), ("pen3", "mask0"), ("pen0", "mask1"),
        ("pen0", "mask2")}
    assert all(r[-1] == "ok" and r[-3] == "0" for r in rows), out[-4000:]


def _launched_kernels() -> set[str]:
    """Every ``*_kernel`` of the package's Triton modules (the launchable ones; helpers are ``@triton.jit`` too)."""
    import importlib
    import pkgutil

    import embedloss_kernels.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "arg_names")}
    return names


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_compile_check_help_prints_usage_and_compiles_nothing(flag):
    proc = subprocess.run([sys.executable, "-m", "embedloss_kernels.compile_check", flag], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "sm_80" in proc.stdout
    assert "compiles" not in proc.stdout  # the summary line of a real run


def test_compile_check_rejects_an_unknown_option():
    proc = subprocess.run([sys.executable, "-m", "embedloss_kernels.compile_check", "--quik"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--quik" in proc.stderr


def test_ptxas_answers_are_cached_by_ptx_and_target(monkeypatch, tmp_path):
    """A second compile_check over unchanged kernels runs no ptxas: its (registers, spills) come from the disk cache,
    keyed by ptxas, target and PTX (a changed PTX or another target runs ptxas again)."""
    from embedloss_kernels import compile_check

    calls = []

    def fake_ptxas(ptx, arch, ptxas):
        calls.append((ptx, arch))
        return 40 + len(calls), 0

    monkeypatch.setenv("EMBEDLOSS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_check, "_run_ptxas", fake_ptxas)
    first = compile_check._usage("// ptx A", 90, sys.executable)  # any existing file stands in for ptxas
    assert compile_check._usage("// ptx A", 90, sys.executable) == first == (41, 0) and len(calls) == 1
    assert compile_check._usage("// ptx B", 90, sys.executable) == (42, 0)
    assert compile_check._usage("// ptx A", 80, sys.executable) == (43, 0) and len(calls) == 3
