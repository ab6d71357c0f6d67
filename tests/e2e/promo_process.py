"""Running the real `promo` command in a subprocess, for tests of what a user's shell sees."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any PROMO_* setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(values)
    return env


async def run_promo(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the real `promo` command; its exit code and its combined output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"`promo {' '.join(args)}` did not stop:\n{out.decode()}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode()
