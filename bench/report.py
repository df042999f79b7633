"""Write a benchmark's section into docs/benchmarks.md, replacing only that section."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import psycopg

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nMeasured by the scripts in `bench/` on the development machine; each section says"
    " how to re-run it. Tests never assert timings.\n"
)


def machine(conninfo: str | None = None) -> str:
    cores = len(__import__("os").sched_getaffinity(0))
    pg = ""
    if conninfo:
        with psycopg.connect(conninfo) as conn:
            pg = ", PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0].split()[0]
    return f"{platform.system()} {platform.machine()}, {cores} cores, Python {platform.python_version()}{pg}"


def write_section(title: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text.rstrip() + "\n")
