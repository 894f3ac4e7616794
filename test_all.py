"""The repository's one test file: a section per script, tiny configs, CPU only, no network.

Run it as the README says:  python -m pytest test_all.py
Sections (each imports its script as a module; nothing runs on import):
  1. videollama_mini.py   2. vit_caption.py   3. video_llava.py   4. mark1.py   5. attention_basics.py
Tests never assert on wall time; benchmarks print figures instead.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
_shared_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_cache)


def run_script(script, *args, cwd=None, timeout=600):
    """Run `python <script> args...` as a user would; returns the CompletedProcess (stdout+stderr text)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_user_error(proc, *needles):
    """A user error: exit status 2, one clear line on stderr, no traceback, and it names the input."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    for n in needles:
        assert n in last, (n, last)
