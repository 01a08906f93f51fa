"""Adding a technique is one file and one YAML: the README's example, copied into a copy of the project, trains,
validates its keys, sweeps (stacked) and appears in the report, with nothing else edited."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys

from tests.conftest import ROOT, TINY, job_dirs, read_summary

SECTION = "### Add your own technique"


def readme_blocks() -> dict[str, str]:
    """The section's code blocks by the path that a comment line of theirs names."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", section, flags=re.DOTALL)
    return {re.search(r"^# ((?:src|conf)/\S+)$", block, re.M).group(1): block for block in blocks}


def project_with_the_example(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "conf", project / "conf")
    shutil.copy(ROOT / "train.py", project / "train.py")
    blocks = readme_blocks()
    assert set(blocks) == {
        "src/reglab/regularizers/logit_squeezing.py",
        "conf/regularizer/logit_squeezing.yaml",
    }
    for path, block in blocks.items():
        (project / path).write_text(block)
    return project


def train(project, args, data_root, check=True):
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(project / "train.py"), *args, f"dataset.root={data_root}", "logger=none"]
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def test_the_readme_technique_trains_validates_sweeps_and_reports(tmp_path, data_root):
    project = project_with_the_example(tmp_path)
    bad = train(
        project, ["regularizer=logit_squeezing", "regularizer.logit_squeezing.beta=-1"], data_root, False
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "reglab: error: regularizer.logit_squeezing.beta=-1 is not allowed: a number >= 0"
    )

    sweep = tmp_path / "sweep"
    train(
        project,
        ["-m", "regularizer=logit_squeezing", *TINY, "hydra/launcher=stacked", f"hydra.sweep.dir={sweep}"],
        data_root,
    )
    jobs = job_dirs(sweep)
    assert len(jobs) == 4  # the YAML's grid
    summaries = [read_summary(job) for job in jobs]
    assert all(s["status"] == "completed" and s["stack"]["size"] == 4 for s in summaries)
    assert summaries[2]["regularization"] == ["logit squeezing β=0.01: β·mean‖z‖² added to the loss"]
    # the penalty is real: the same seed with a larger β ends with smaller logits, so a less confident model
    confidences = [s["test/confidence"] for s in summaries]
    assert confidences[3] < confidences[0]
    with open(sweep / "report.csv") as f:
        header = next(csv.reader(f))
    assert "logit_squeezing.beta" in header
    assert (sweep / "report_strength.png").exists()
