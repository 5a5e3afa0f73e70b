"""Plant the planted bugs of tests/README.md one at a time and check that the named tests catch each (issue 24).

    python scripts/plant_bugs.py            # every plant below
    python scripts/plant_bugs.py 2-cpp 6    # some of them
    python scripts/plant_bugs.py --list

For each plant: the file must be unmodified in git; the bug is written into it (an exact text replacement), the C++
extension is rebuilt in place when the plant is in csrc/ (`python setup.py build_ext --inplace`: ninja recompiles the
changed file, 2-4 minutes on 2 cores), the plant's pytest selection runs (PYTHONPATH = the repository), and the file
is restored with `git checkout`, also on an error or Ctrl-C. After the last C++ plant the extension is rebuilt clean.
Prints, per plant, how many tests of its selection failed; exits 1 when a plant was caught by none (a missing test).
Never commit while a plant is in place: `git status` shows it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Plant:
    what: str
    file: str
    old: str
    new: str
    tests: list[str]
    include: tuple[str, str] | None = None  # a second replacement (an #include the plant needs)


_PEN_INFONCE = """    x_qd[g] -= s * inv_rows * r_q * (inv_na ? inv_na[g] : T(1));
    if (p.alpha > 0) {  // PLANT 2: the penalized columns' gradient x (s + alpha) / s
      const T f = s_hard / s;
      if (p.hardness_mode == kHardnessHard) { for (int64_t c = 1; c < K; ++c) x_qd[g + c * Bq] *= f; }
      else if (p.hardness_mode == kHardnessInBatch) { for (int64_t j = 0; j < C; ++j) if (j % Bq != g) x_qd[j] *= f; }
      else if (p.hardness_mode == kHardnessAll) { for (int64_t j = 0; j < C; ++j) if (j != g) x_qd[j] *= f; }
    }
"""
_PEN_MATRYOSHKA = """        const T r = irn[d];
        if (d == 0 && p.alpha > 0) {  // PLANT 2: the penalized columns' G x (s + alpha) / s
          T* lw = scratch + dir.offset;
          const T f = static_cast<T>((p.scale + p.alpha) / p.scale);
          if (p.hardness_mode == kHardnessHard) { for (int64_t c = 1; c < K; ++c) lw[g + c * Bq] *= f; }
          else if (p.hardness_mode == kHardnessInBatch) {
            for (int64_t j = 0; j < dir.cols; ++j) if (j % Bq != g) lw[j] *= f;
          }
          else if (p.hardness_mode == kHardnessAll) { for (int64_t j = 0; j < dir.cols; ++j) if (j != g) lw[j] *= f; }
        }
"""
_PEN_TRITON = """    pos = cols[None, :] == rows[:, None]  # PLANT 2: the penalized columns' G x (s + alpha) / s
    if PEN_MODE == 1:
        g = tl.where(_own(owner_ptr, rows, cols, col_ok), g, g * (scale + boost) / scale)
    elif PEN_MODE == 2:
        g = tl.where(_own(owner_ptr, rows, cols, col_ok) & (~pos), g * (scale + boost) / scale, g)
    elif PEN_MODE == 3:
        g = tl.where(pos, g, g * (scale + boost) / scale)
    return tl.where(row_ok[:, None] & col_ok[None, :], g * rx[:, None] * ry[None, :], 0.0)
"""
_PEN_TRITON_MATRYOSHKA = """        grad = weight * tl.exp(lg - lse)
        own_p = tl.load(owner_ptr + cols, mask=ok, other=-1) == g  # PLANT 2: penalized columns' G x (s + alpha) / s
        if PEN_MODE == 1:
            grad = tl.where(own_p, grad, grad * ((scale + boost) / scale))
        elif PEN_MODE == 2:
            grad = tl.where(own_p & (cols != g), grad * ((scale + boost) / scale), grad)
        elif PEN_MODE == 3:
            grad = tl.where(cols == g, grad, grad * ((scale + boost) / scale))
"""
_GRAD_CALL = "_grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2"
_GRAD_DEF = ("def _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, "
             "EXP2: tl.constexpr")
_MNRL64 = ["tests/test_equivalence.py", "-k", "{b} and mnrl_float64"]
_MATRYOSHKA64 = ["tests/test_matryoshka.py", "-k", "{b} and float64_matches_sentence_transformers_matryoshka"]

PLANTS = {
    "1-cpp": Plant(
        "scale gradient x (1 + 1e-6)", "csrc/cpu/infonce_cpu.cpp",
        "                              .div_(2.0 * scale);",
        "                              .div_(2.0 * scale / (1 + 1e-6));  // PLANT 1",
        ["tests/test_scale.py", "-k", "cpp and mnrl_scale_gradient_matches_reference"]),
    "2-cpp": Plant(
        "hardness penalty without its stop-gradient (MNRL)", "csrc/cpu/infonce_cpu.cpp",
        "    x_qd[g] -= s * inv_rows * r_q * (inv_na ? inv_na[g] : T(1));\n", _PEN_INFONCE,
        [t.format(b="cpp") for t in _MNRL64]),
    "2-cpp-matryoshka": Plant(
        "hardness penalty without its stop-gradient (Matryoshka)", "csrc/cpu/matryoshka_cpu.cpp",
        "        const T r = irn[d];\n", _PEN_MATRYOSHKA, [t.format(b="cpp") for t in _MATRYOSHKA64]),
    "2-triton": Plant(
        "hardness penalty without its stop-gradient (MNRL kernels)", "embedloss_kernels/kernels/infonce.py",
        "    return tl.where(row_ok[:, None] & col_ok[None, :], g * rx[:, None] * ry[None, :], 0.0)\n", _PEN_TRITON,
        [t.format(b="triton") for t in _MNRL64],
        include=(_GRAD_DEF, _GRAD_DEF + ", owner_ptr, scale, boost, PEN_MODE: tl.constexpr")),
    "2-triton-matryoshka": Plant(
        "hardness penalty without its stop-gradient (Matryoshka row kernel)", "embedloss_kernels/kernels/matryoshka.py",
        "        grad = weight * tl.exp(lg - lse)\n", _PEN_TRITON_MATRYOSHKA,
        [t.format(b="triton") for t in _MATRYOSHKA64]),
    "3-cpp": Plant(
        "GIST threshold tie resolved with >=", "csrc/cpu/gist_cpu.cpp",
        "const T v = g[j] > bound ? neg_inf", "const T v = g[j] >= bound ? neg_inf",
        ["tests/test_gist.py", "-k", "cpp and (threshold_is_strict or repeated_texts)"]),
    "4-cpp": Plant(
        "doc_to_doc exclusion one column off (MNRL)", "csrc/cpu/infonce_cpu.cpp",
        "for (int64_t c = 0; c < K; ++c) x_dd[g + c * Bq] = neg_inf;",
        "for (int64_t c = 0; c < K; ++c) x_dd[(g + 1) % Bq + c * Bq] = neg_inf;  // PLANT 4",
        [t.format(b="cpp") for t in _MNRL64]),
    "4-cpp-matryoshka": Plant(
        "doc_to_doc exclusion one column off (Matryoshka)", "csrc/cpu/matryoshka_cpu.cpp",
        "for (int64_t c = 0; c < K; ++c) l[g + c * Bq] = neg_inf;",
        "for (int64_t c = 0; c < K; ++c) l[(g + 1) % Bq + c * Bq] = neg_inf;  // PLANT 4",
        [t.format(b="cpp") for t in _MATRYOSHKA64]),
    "5-cpp": Plant(
        "bf16 products under CPU autocast (MNRL)", "csrc/cpu/infonce_cpu.cpp",
        "  const at::Tensor q_in = q.detach().to(work).contiguous(), a_in = a.detach().to(work).contiguous();\n",
        """  // PLANT 5: the inputs rounded to bf16 under CPU autocast (autocast's cast of a matmul's inputs)
  const bool plant_bf16 = at::autocast::is_autocast_enabled(at::kCPU);
  const at::Tensor q_in = (plant_bf16 ? q.detach().to(at::kBFloat16) : q.detach()).to(work).contiguous();
  const at::Tensor a_in = (plant_bf16 ? a.detach().to(at::kBFloat16) : a.detach()).to(work).contiguous();
""",
        ["tests/test_autocast.py", "-k", "cpp and mnrl"],
        include=("#include <ATen/Parallel.h>\n", "#include <ATen/Parallel.h>\n#include <ATen/autocast_mode.h>\n")),
    "6": Plant(
        "backward not scaling by grad_output (every backend; run on cpp)", "embedloss_kernels/ops/autograd.py",
        "    factor = grad_loss.to(saved.dtype)\n",
        "    factor = torch.ones_like(grad_loss).to(saved.dtype)  # PLANT 6\n",
        [t.format(b="cpp") for t in _MNRL64]),
    "7-cpp": Plant(
        "one Matryoshka prefix weight dropped (the last taken as 1)", "csrc/cpu/matryoshka_cpu.cpp",
        "  std::vector<double> weights(weights_ref.begin(), weights_ref.end());\n",
        "  std::vector<double> weights(weights_ref.begin(), weights_ref.end());\n  weights.back() = 1.0;  // PLANT 7\n",
        [t.format(b="cpp") for t in _MATRYOSHKA64]),
    "8-cpp": Plant(
        "CoSENT pair order reversed on ties", "csrc/cpu/cosent_cpu.cpp",
        "const int64_t higher_start = std::upper_bound(", "const int64_t higher_start = std::lower_bound(",
        ["tests/test_equivalence.py", "-k", "cpp and cosent_and_angle_float64"]),
}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


def build() -> None:
    out = _run([sys.executable, "setup.py", "build_ext", "--inplace"])
    text = out.stdout + out.stderr
    if out.returncode != 0 or "building the C++ extension failed" in text:
        raise RuntimeError(f"the extension did not build:\n{text[-4000:]}")


def apply(plant: Plant) -> None:
    path = os.path.join(ROOT, plant.file)
    with open(path) as f:
        src = f.read()
    for old, new in [(plant.old, plant.new)] + ([plant.include] if plant.include else []):
        if src.count(old) != 1:
            raise RuntimeError(f"{plant.file}: the text to plant into occurs {src.count(old)} times, not once (the "
                               f"source moved on?): {old!r}")
        src = src.replace(old, new)
    if plant.include and plant.include[0] == _GRAD_DEF:  # the Triton plant: every call passes the new arguments
        src = src.replace(_GRAD_CALL + ")", _GRAD_CALL + ", owner_ptr, scale, boost, PEN_MODE)")
    with open(path, "w") as f:
        f.write(src)


def run_tests(args: list[str]) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = _run([sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "--no-header", "-rf"], env=env)
    failed = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")]
    summary = next((line for line in reversed(out.stdout.splitlines()) if " passed" in line or " failed" in line), "")
    return failed, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="plants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the plants and exit")
    opts = parser.parse_args()
    if opts.list:
        for name, plant in PLANTS.items():
            print(f"{name:18} {plant.what}  [{plant.file}]  pytest {' '.join(plant.tests)}")
        return 0
    names = opts.names or list(PLANTS)
    unknown = [n for n in names if n not in PLANTS]
    if unknown:
        parser.error(f"unknown plant(s) {unknown}; choose from {list(PLANTS)}")
    uncaught, built = [], False
    for name in names:
        plant = PLANTS[name]
        if _run(["git", "diff", "--quiet", "--", plant.file]).returncode != 0:
            raise SystemExit(f"{plant.file} has uncommitted changes: commit or stash them before planting")
        start = time.monotonic()
        try:
            apply(plant)
            if plant.file.startswith("csrc/"):
                build()
                built = True
            failed, summary = run_tests(plant.tests)
        finally:
            _run(["git", "checkout", "--", plant.file])
        print(f"{name}: {plant.what}: {len(failed)} failed ({summary}; {time.monotonic() - start:.0f} s)", flush=True)
        for test in failed[:3]:
            print(f"    {test}")
        if not failed:
            uncaught.append(name)
    if built:
        build()
        print("extension rebuilt clean", flush=True)
    if uncaught:
        print(f"NOT CAUGHT: {uncaught}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
