"""Every command the docs show as CPU-runnable works: exit 0, no traceback.

A fenced block in README.md or docs/*.md preceded by the line ``<!-- cpu-runnable: ... -->`` is
run here, one block per test, its commands (continuation lines joined) in order in one fresh
directory (a later command may read what an earlier one wrote), with the project's launch scripts
and the environment's console scripts. Training commands are paused after two steps
(``train.stop_at=2``, which leaves every schedule default as documented; one validation batch):
what is checked is that the command and its defaults are accepted and train, not how long.
Everything else runs as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- cpu-runnable\b.*-->\s*$")
# Appended to every training command; later overrides win in Hydra, so these shorten the run.
SHORT_RUN = "train.stop_at=2 train.eval_batches=1 train.threads=1 logging.progress=false"
TRAINS = re.compile(r"(^|\s|/)(mhc-train|launch/single_node\.sh|-m mhc_train\.train)(\s|$)")


def documented_blocks() -> list[tuple[str, list[str]]]:
    """(where, commands) for each marked block, the commands as the docs show them."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not MARKER.match(line):
                continue
            assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{doc.name}:{i + 1}: marker without a block"
            body, j = [], i + 2
            while not lines[j].startswith("```"):
                body.append(lines[j])
                j += 1
            joined = re.sub(r"\\\n\s*", " ", "\n".join(body))
            commands = [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]
            found.append((f"{doc.relative_to(ROOT)}:{i + 2}", commands))
    return found


def runnable(command: str) -> str:
    """The command as this test runs it: comments dropped, scripts and console scripts found."""
    words = shlex.split(command, comments=True)
    words = [w.removeprefix(".venv/bin/") for w in words]
    words = [str(ROOT / w) if w.startswith("launch/") else w for w in words]
    line = shlex.join(words)
    if TRAINS.search(line):
        line += " " + SHORT_RUN
    return line


BLOCKS = documented_blocks()


def test_the_docs_mark_their_cpu_commands():
    where = {w.split(":")[0] for w, _ in BLOCKS}
    assert {"README.md", "docs/training.md", "docs/distributed.md"} <= where, where
    assert any(c.startswith("mhc-train ") for _, block in BLOCKS for c in block)
    assert all(block for _, block in BLOCKS)


@pytest.mark.parametrize("where, commands", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_documented_block_runs(where, commands, subprocess_env, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**subprocess_env, "PATH": bin_dir + os.pathsep + subprocess_env.get("PATH", ""),
           "PY": sys.executable, "MPLBACKEND": "Agg"}
    for command in commands:
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {runnable(command)}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{where}: {command}\n{out[-3000:]}"
        assert "Traceback" not in out, f"{where}: {command}\n{out[-3000:]}"
