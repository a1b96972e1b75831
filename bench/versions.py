"""What a result depends on besides the code: the machine and the versions of what ran.

A bench figure is only comparable with another taken on the same CPU, kernel, Python, broker
and Redis, from a known commit; the report's set-up lines name all of them. Each probe answers
`"?"` rather than failing the run: a missing version never costs a measurement.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path

import aiormq
from redis.asyncio import Redis

UNKNOWN = "?"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return UNKNOWN


def git_commit(root: Path) -> str:
    """HEAD's short hash, with `+changes` when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{commit}+changes" if dirty else commit


async def rabbitmq_version(url: str) -> str:
    with contextlib.suppress(Exception):
        connection = await aiormq.connect(url)
        try:
            version = connection.server_properties.get("version", UNKNOWN)
        finally:
            await connection.close()
        return version.decode() if isinstance(version, bytes) else str(version)
    return UNKNOWN


async def redis_version(url: str) -> str:
    with contextlib.suppress(Exception):
        redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            info = await redis.info("server")
        finally:
            await redis.aclose()
        return str(info.get("redis_version", UNKNOWN))
    return UNKNOWN


async def describe(root: Path, rabbitmq_url: str, redis_url: str) -> dict[str, str]:
    """The set-up lines about the machine and the software under the router."""
    return {
        "cpu": f"{cpu_model()}; Linux {platform.release()}",
        "software": f"Python {platform.python_version()}, "
        f"RabbitMQ {await rabbitmq_version(rabbitmq_url)}, Redis {await redis_version(redis_url)}",
        "commit": git_commit(root),
    }
