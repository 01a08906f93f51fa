"""The numbers reglab publishes still come out of the code: what can be re-run in seconds is re-run and compared at
the precision it is printed with. Metrics are deterministic on the CPU, but other CPUs or torch versions may round
differently, so the comparison runs only on the kind of machine the documents were made on (the provenance they
record); timings are never compared."""

from __future__ import annotations

import json
import re

import pytest

from reglab.provenance import same_machine_kind
from tests.conftest import ROOT, read_summary, run_train

FIGURES = ROOT / "docs" / "figures"
REMAKE_FIGURES = (
    "stale: remake them with `make figures` (and commit the documents with the change that moved them)"
)
REMAKE_RESULTS = (
    "stale: remake them with `make reproduce` (and commit the documents with the change that moved them)"
)


def recorded(path) -> dict:
    return json.loads(path.read_text())


def require_same_machine(facts: dict) -> None:
    if not same_machine_kind(facts):
        pytest.skip(
            f"published on {facts.get('cpu')} with torch {facts.get('torch')}: not this kind of machine"
        )


def reglab_lines(text: str) -> list[str]:
    """The run's closing lines, without the machine-specific files line and the opening description."""
    return [
        line
        for line in text.splitlines()
        if line.startswith("[reglab]") and "files:" not in line and not line.startswith("[reglab] training")
    ]


def test_the_readme_quotes_the_example_run_as_made(tmp_path):
    published = reglab_lines((FIGURES / "example_run.txt").read_text())
    readme = (ROOT / "README.md").read_text()
    missing = [line for line in published if line not in readme]
    assert not missing, f"README.md does not quote docs/figures/example_run.txt: {missing}"


def test_the_default_run_prints_the_published_lines(tmp_path, data_root):
    require_same_machine(recorded(FIGURES / "provenance.json"))
    result = run_train(
        ["logger=none", "trainer.plots=false", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data_root
    )
    published = reglab_lines((FIGURES / "example_run.txt").read_text())
    assert reglab_lines(result.stdout) == published, f"docs/figures/example_run.txt is {REMAKE_FIGURES}"


def test_one_published_job_of_a_preset_comes_out_again(tmp_path, data_root):
    """The cheapest job of `make reproduce` (early stopping on val/loss stops after ~30 epochs), re-run alone."""
    records = recorded(ROOT / "docs" / "results.json")
    require_same_machine(records["provenance"])
    job = next(
        job
        for job in records["presets"]["early_stopping"]
        if "trainer.seed=0" in job["overrides"]
        and "regularizer.early_stopping.monitor=val/loss" in job["overrides"]
    )
    overrides = [o for o in job["overrides"] if not o.startswith(("hydra", "dataset.root"))]
    run_dir = tmp_path / "run"
    run_train(
        ["experiment=early_stopping", "logger=none", *overrides, f"hydra.run.dir={run_dir}"],
        tmp_path,
        data_root,
    )
    summary = read_summary(run_dir)
    for key, value in job.items():
        if key != "overrides":
            assert summary[key] == value, (
                f"{key}: docs/results.json (and docs/results.md) are {REMAKE_RESULTS}"
            )


def test_the_readme_findings_table_quotes_docs_results(tmp_path):
    """Every number in the README's findings table appears in docs/results.md, where `make reproduce` wrote it."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("<!-- findings:start -->") : readme.index("<!-- findings:end -->")]
    assert table.count("\n| ") >= 3, "the README's findings table is empty: run `make reproduce`"
    results = (ROOT / "docs" / "results.md").read_text()
    numbers = set(re.findall(r"\d+\.\d+", table))
    missing = sorted(n for n in numbers if n not in results)
    assert not missing, f"README findings quote numbers that docs/results.md does not hold: {missing}"
