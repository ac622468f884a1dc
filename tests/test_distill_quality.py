"""Each distiller against `kd` on Fashion-MNIST subsets (same teacher, data and seeds).

Slow: the demonstration's setting for 3 seeds per method (about 3-5 minutes each on 2 cores).
CI runs the representative ones marked below; `pytest -m slow` runs them all. The measured
tables are in docs/methods.md.
"""

import pytest

import toolkit  # noqa: F401 - fills the registry
from recipes import distill
from toolkit import registry

CI_METHODS = {"dkd"}
SEEDS = "0,1,2"


def _params():
    for name in registry.names("distiller"):
        if name == "kd":
            continue
        marks = [pytest.mark.slow] + ([pytest.mark.ci] if name in CI_METHODS else [])
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("method", list(_params()))
def test_method_not_worse_than_kd_beyond_seed_spread(method, tmp_path):
    res = distill.main(
        [
            "--compare",
            f"kd,{method}",
            "--seeds",
            SEEDS,
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    kd, other = res["runs"]["kd"], res["runs"][method]
    spread = max(kd["acc_std"], other["acc_std"])
    assert other["acc"] >= kd["acc"] - spread, (
        f"{method} {100 * other['acc']:.2f} ± {100 * other['acc_std']:.2f} vs kd "
        f"{100 * kd['acc']:.2f} ± {100 * kd['acc_std']:.2f}"
    )
