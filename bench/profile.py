"""py-spy on the router's services during one run, summarised as the top costs.

py-spy is not a project dependency: it is looked up in bench/.peers (where `make bench-peers`
installs it) and then on PATH. Samples are taken with `--nonblocking` (the process is not
paused) and idle threads are left out, so the shares are of the time the process was busy.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path

from bench.config import PEERS_VENV

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

# Python frames whose own time is native code py-spy cannot see into (without --native).
_NATIVE_LEAVES = {
    ("Runner.run", "stdlib:asyncio"): "[event loop: uvloop's C code, polling and callbacks]",
    ("run", "uvloop"): "[event loop: uvloop's C code, polling and callbacks]",
    ("StreamWriter.write", "stdlib:asyncio"): "[socket send: transport.write syscall]",
    ("StreamWriter.writelines", "stdlib:asyncio"): "[socket send: transport.write syscall]",
    ("StreamWriter._writelines", "aiohttp"): "[socket send: transport.write syscall]",
    ("StreamWriter._write", "aiohttp"): "[socket send: transport.write syscall]",
}
# Entry frames present in every sample: left out of the inclusive table.
_ENTRY_FILES = ("services/cli.py", "__main__.py", "shared/runner.py")


def py_spy() -> str | None:
    local = PEERS_VENV / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def record(pids: dict[str, int], seconds: float, out_prefix: Path) -> dict[str, Path]:
    """Sample each pid for `seconds` at once; returns name -> raw (collapsed stacks) file."""
    exe = py_spy()
    if exe is None:
        return {}
    procs = {}
    files = {}
    for name, pid in pids.items():
        path = out_prefix.with_name(f"{out_prefix.name}-{name}.txt")
        files[name] = path
        procs[name] = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1)),
            "--rate", "250", "--nonblocking", "--full-filenames", "--format", "raw",
            "--output", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    for name, proc in procs.items():
        _, err = await proc.communicate()
        if proc.returncode != 0 or not files[name].exists():
            files.pop(name)
            files_err = err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            print(f"bench: py-spy on {name} failed: {files_err[0]}")
    return files


def _module(file: str) -> str:
    """A frame's file as a package name: site-packages/aiormq/x.py -> aiormq."""
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in file:
        rest = file.rsplit("/lib/python3", 1)[1].split("/")
        return "stdlib:" + (rest[1].removesuffix(".py") if len(rest) > 1 else "?")
    parts = Path(file).parts
    for root in ("services", "shared", "fakes"):
        if root in parts:
            i = parts.index(root)
            return "/".join(parts[i : i + 2]).removesuffix(".py")
    return file


def summarise(raw: Path, top: int = 12) -> str:
    """Self time by function and by package, inclusive time by our own functions."""
    own: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        parsed = [_FRAME.match(f) for f in frames]
        leaf = parsed[-1] if parsed else None
        if leaf is not None:
            module = _module(leaf["file"])
            native = _NATIVE_LEAVES.get((leaf["func"], module))
            own[native or f"{leaf['func']} ({module})"] += count
            by_package[native or module] += count
        seen: set[str] = set()
        for m in parsed:
            if m is None or m["file"].endswith(_ENTRY_FILES):
                continue
            module = _module(m["file"])
            if module.startswith(("services/", "shared/")):
                key = f"{m['func']} ({module})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
    if total == 0:
        return "(no samples)"

    def table(counter: Counter[str]) -> list[str]:
        return [f"  {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]

    lines = [f"{total} busy samples", "self time by package:", *table(by_package)]
    lines += ["self time by function:", *table(own)]
    lines += ["inclusive time, our code:", *table(inclusive)]
    return "\n".join(lines)
