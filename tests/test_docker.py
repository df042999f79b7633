"""Packaging without a Docker engine: docker-compose.yml resolved by the compose CLI for every
profile, the Dockerfiles parsed and their steps replayed outside Docker, and the helper scripts
(the local CouchDB set-up, Superset's start script) run against real servers.

`docker compose config` (or docker-compose 1.29's) interpolates .env and the profiles exactly as
`up` would; the tests read the resolved values, not just the exit code.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chtsync import config as config_mod
from chtsync.localservers import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SUPERSET_DIR = ROOT / "docker" / "superset"

# An .env as CHT Sync's env.template makes it (quotes, an inline comment, a trailing space),
# pointed at a real CHT instance and an external Postgres.
CHT_SYNC_ENV = """\
# (Optional) project wide
COMPOSE_PROJECT_NAME=pipeline

# postgresql
POSTGRES_USER=cht_sync
POSTGRES_PASSWORD=pg-Secret-1
POSTGRES_DB=data
POSTGRES_SCHEMA=v1
POSTGRES_TABLE=couchdb \n\
POSTGRES_HOST=db.example.org # Your postgres instance IP or endpoint in "prod".
POSTGRES_PORT=5433

# dbt
CHT_PIPELINE_BRANCH_URL="https://github.com/medic/cht-pipeline.git#main"
DATAEMON_INTERVAL=7

# couchdb
COUCHDB_USER=medic
COUCHDB_PASSWORD=couch-Secret-2
COUCHDB_DBS="medic medic-sentinel" # space separated list of databases you want to sync
COUCHDB_HOST=cht.example.org
COUCHDB_PORT=443
COUCHDB_SECURE=true
"""

SECRETS = {
    "POSTGRES_PASSWORD": "local-pg-Pass",
    "COUCHDB_PASSWORD": "local-couch-Pass",
    "SUPERSET_SECRET_KEY": "k" * 48,
    "SUPERSET_ADMIN_PASSWORD": "superset-Pass-3",
}


# --- the compose CLI ----------------------------------------------------------------------------


def compose_command() -> list[str]:
    """`docker compose` (v2) when it works, else docker-compose (1.28+); .ci/run installs one."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0:
                return cmd
    if os.environ.get("CI"):
        pytest.fail("no compose CLI: .ci/run should have installed docker-compose")
    pytest.skip("no compose CLI (docker compose / docker-compose); `bash .ci/run` installs one")


def env_example(**overrides: str) -> str:
    """.env.example with its required secrets filled in (and any overrides appended)."""
    text = (ROOT / ".env.example").read_text()
    values = {**SECRETS, **overrides}
    return text + "".join(f"{key}={value}\n" for key, value in values.items())


def resolve(env_text: str, *profiles: str, tmp_path: Path) -> dict[str, Any]:
    """The configuration `up` would use with this .env and these profiles (inactive services
    dropped: docker-compose 1.x lists every service, v2 only the active ones)."""
    env_file = tmp_path / "test.env"
    env_file.write_text(env_text)
    args = [*compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
            "--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    # Only what a compose CLI needs: nothing from the test's own environment may interpolate.
    clean = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, env=clean, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    active = {
        name: svc for name, svc in resolved["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }
    return {**resolved, "services": active}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def ports_of(service: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(host ip, published, target) for both the short (1.x) and the long (v2) form."""
    found = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add((port.get("host_ip", ""), str(port.get("published", "")), str(port["target"])))
        else:
            *host, target = str(port).split("/")[0].rsplit(":", 2)
            if len(host) == 2:
                ip, published = host
            else:
                ip, published = "", (host[0] if host else "")
            found.add((ip, published, target))
    return found


def volumes_of(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) for the short (1.x) and the long (v2) form."""
    found = set()
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found.add((str(volume.get("source", "")), str(volume["target"])))
        else:
            source, target, *_ = str(volume).split(":")
            found.add((source, target))
    return found


def seconds(duration: Any) -> float:
    """Compose durations as either CLI prints them: '5m', '5m0s', '30s', '1m30s', '1h'."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", str(duration)):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def depends_healthy(service: dict[str, Any]) -> set[str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return set()
    return {name for name, d in deps.items() if d.get("condition") == "service_healthy"}


def container_config(env: dict[str, str]) -> config_mod.Config:
    """chtsync's settings from the environment compose hands the container (config.yaml from
    the repository, as baked into the image)."""
    env = {key: value for key, value in env.items() if key != "CHTSYNC_CONFIG"}
    assert (ROOT / "config.yaml").is_file()
    return config_mod.load(ROOT / "config.yaml", env=env)


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_default_profile_runs_chtsync_with_a_cht_sync_env(tmp_path: Path) -> None:
    cfg = resolve(CHT_SYNC_ENV, tmp_path=tmp_path)
    assert set(cfg["services"]) == {"chtsync"}
    svc = cfg["services"]["chtsync"]
    env = env_of(svc)
    # CHT Sync's variables reach the container as they are, quotes and inline comments removed.
    assert env["COUCHDB_HOST"] == "cht.example.org"
    assert env["COUCHDB_PORT"] == "443"
    assert env["COUCHDB_SECURE"] == "true"
    assert env["COUCHDB_DBS"] == "medic medic-sentinel"
    assert env["COUCHDB_USER"] == "medic"
    assert env["COUCHDB_PASSWORD"] == "couch-Secret-2"
    assert env["POSTGRES_HOST"] == "db.example.org"
    assert env["POSTGRES_PORT"] == "5433"
    assert env["POSTGRES_USER"] == "cht_sync"
    assert env["POSTGRES_PASSWORD"] == "pg-Secret-1"
    assert env["POSTGRES_DB"] == "data"
    assert env["POSTGRES_TABLE"].strip() == "couchdb"
    assert env["DATAEMON_INTERVAL"] == "7"
    assert env["METRICS_PORT"] == "9090"
    assert env["METRICS_HOST"] == "0.0.0.0"
    assert "CHT_PIPELINE_BRANCH_URL" not in env  # dbt's setting: not ours, not passed

    # ...and make the configuration CHT Sync meant.
    c = container_config(env)
    (source,) = c.sources
    assert source.url == "https://cht.example.org:443"
    assert source.dbs == ("medic", "medic-sentinel")
    assert (source.user, source.password) == ("medic", "couch-Secret-2")
    assert source.source_name("medic") == "cht.example.org/medic"  # CHT Sync's `source` values
    pg = c.postgres
    assert (pg.host, pg.port, pg.user, pg.password, pg.dbname) == (
        "db.example.org", 5433, "cht_sync", "pg-Secret-1", "data")
    assert (pg.schema, pg.table) == ("v1", "couchdb")
    assert c.refresh_interval == 7.0
    assert (c.metrics_port, c.metrics_host) == (9090, "0.0.0.0")

    assert svc["command"] == ["run"]
    assert svc["restart"] == "unless-stopped"
    assert svc["image"] == "chtsync:latest"
    assert Path(svc["build"]["context"]).resolve() == ROOT
    assert ports_of(svc) == {("127.0.0.1", "9090", "9090")}
    check = svc["healthcheck"]
    assert check["test"][0] == "CMD"
    assert "/healthz" in " ".join(check["test"])
    assert seconds(check["interval"]) == 30
    assert seconds(check["start_period"]) >= 120  # first start: migrations and model creation
    assert check["retries"] >= 3
    # Stop: chtsync exits within 10 s of SIGTERM; compose must not SIGKILL it before.
    assert seconds(svc["stop_grace_period"]) >= 15
    # As CHT Sync's couch2pg. Compose versions print a list ("h:ip" or "h=ip") or a mapping.
    hosts = svc["extra_hosts"]
    hosts = [f"{k}:{v}" for k, v in hosts.items()] if isinstance(hosts, dict) else hosts
    assert "host.docker.internal:host-gateway" in [h.replace("=", ":", 1) for h in hosts]


def test_unset_values_fall_back_to_chtsyncs_defaults(tmp_path: Path) -> None:
    """An empty or absent variable reaches the container as '' and means `not set`."""
    cfg = resolve("COUCHDB_HOST=cht.example.org\nCOUCHDB_PASSWORD=x\n", tmp_path=tmp_path)
    env = env_of(cfg["services"]["chtsync"])
    assert env["COUCHDB_SECURE"] == "true"  # CHT Sync's compose default: https
    assert env["POSTGRES_SCHEMA"] == "" and env["BATCH_SIZE"] == ""
    c = container_config(env)
    assert c.sources[0].url == "https://cht.example.org:5984"
    assert c.sources[0].dbs == ("medic",)
    assert (c.postgres.host, c.postgres.user, c.postgres.schema, c.postgres.table) == (
        "postgres", "postgres", "v1", "couchdb")
    assert c.batch_size == 1000 and c.log_level == "INFO" and c.models == ROOT / "sql" / "models.yaml"


def test_every_setting_chtsync_reads_is_passed_through(tmp_path: Path) -> None:
    # every quoted upper-case name in config.py is an environment variable it reads
    names = set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', (ROOT / "chtsync" / "config.py").read_text()))
    assert {"COUCHDB_HOST", "POSTGRES_PASSWORD_FILE", "DATAEMON_INTERVAL", "LOG_FORMAT", "PAGE_BYTES",
            "FIRST_SYNC_READERS"} <= names
    values = {name: f"v-{name.lower()}" for name in sorted(names)}
    values["METRICS_PORT"] = "9191"  # also the published port's target: must be a number
    env_text = "".join(f"{key}={value}\n" for key, value in values.items())
    env = env_of(resolve(env_text, tmp_path=tmp_path)["services"]["chtsync"])
    fixed = {"METRICS_HOST"}  # 0.0.0.0 in a container, or nothing could scrape it
    for name in sorted(names - fixed):
        assert env.get(name) == values[name], name
    assert env["METRICS_HOST"] == "0.0.0.0"


def test_local_profile_adds_couchdb_and_postgres_and_points_chtsync_at_them(tmp_path: Path) -> None:
    cfg = resolve(env_example(), "local", tmp_path=tmp_path)
    services = cfg["services"]
    assert set(services) == {"chtsync", "couchdb", "couchdb-init", "postgres"}
    chtsync, couchdb, postgres = services["chtsync"], services["couchdb"], services["postgres"]
    env = env_of(chtsync)
    assert couchdb["image"] == "couchdb:3"
    assert postgres["image"] == "postgres:16"

    # chtsync reaches them by service name, with the credentials they were created with.
    assert env["COUCHDB_HOST"] == "couchdb" and env["POSTGRES_HOST"] == "postgres"
    c = container_config(env)
    assert c.sources[0].url == "http://couchdb:5984"
    assert c.postgres.host == "postgres" and c.postgres.port == 5432
    couch_env, pg_env = env_of(couchdb), env_of(postgres)
    assert couch_env["COUCHDB_USER"] == env["COUCHDB_USER"] == "medic"
    assert couch_env["COUCHDB_PASSWORD"] == env["COUCHDB_PASSWORD"] == SECRETS["COUCHDB_PASSWORD"]
    assert pg_env["POSTGRES_USER"] == env["POSTGRES_USER"] == "postgres"
    assert pg_env["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert pg_env["POSTGRES_DB"] == env["POSTGRES_DB"] == "data"

    assert "/_up" in " ".join(couchdb["healthcheck"]["test"])
    pg_check = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in pg_check and "-h 127.0.0.1" in pg_check
    assert volumes_of(couchdb) == {("couchdb-data", "/opt/couchdb/data")}
    assert volumes_of(postgres) == {("postgres-data", "/var/lib/postgresql/data")}
    assert ports_of(couchdb) == {("127.0.0.1", "5984", "5984")}
    assert ports_of(postgres) == {("127.0.0.1", "5432", "5432")}

    init = services["couchdb-init"]
    assert init["image"] == chtsync["image"]
    assert init["entrypoint"] == ["python", "/app/docker/couchdb_init.py"]
    assert depends_healthy(init) == {"couchdb"}
    assert env_of(init)["COUCHDB_DBS"] == env["COUCHDB_DBS"]


def test_superset_profile_runs_superset_and_imports_the_dashboard(tmp_path: Path) -> None:
    cfg = resolve(env_example(), "superset", tmp_path=tmp_path)
    services = cfg["services"]
    assert set(services) == {"chtsync", "superset", "superset-import"}
    superset, job = services["superset"], services["superset-import"]

    assert Path(superset["build"]["context"]).resolve() == SUPERSET_DIR
    assert superset["build"]["args"]["SUPERSET_VERSION"] == "6.1.0"
    s_env = env_of(superset)
    assert s_env["SUPERSET_SECRET_KEY"] == SECRETS["SUPERSET_SECRET_KEY"]
    assert s_env["SUPERSET_ADMIN_PASSWORD"] == SECRETS["SUPERSET_ADMIN_PASSWORD"]
    assert s_env["SUPERSET_PORT"] == "8088"
    assert ports_of(superset) == {("127.0.0.1", "8088", "8088")}
    assert "/health" in " ".join(superset["healthcheck"]["test"])
    assert seconds(superset["healthcheck"]["start_period"]) >= 120

    # The one-shot import: chtsync's own command, logged in as the admin Superset was given.
    assert job["command"] == ["superset", "import"]
    assert job["image"] == services["chtsync"]["image"]
    j_env = env_of(job)
    assert j_env["SUPERSET_URL"] == "http://superset:8088"
    assert j_env["SUPERSET_USER"] == s_env["SUPERSET_ADMIN_USER"] == "admin"
    assert j_env["SUPERSET_PASSWORD"] == s_env["SUPERSET_ADMIN_PASSWORD"]
    assert depends_healthy(job) == {"superset", "chtsync"}  # chtsync healthy = models created
    assert str(job["restart"]).startswith("on-failure")
    # Superset connects to the Postgres chtsync writes to.
    c = container_config(j_env)
    assert (c.postgres.host, c.postgres.user, c.postgres.dbname) == ("postgres", "postgres", "data")

    # The command exists and reads those variables.
    from chtsync import cli

    args = cli.build_parser().parse_args(["superset", "import"])
    assert args.func.__name__ == "cmd_import"


def test_local_and_superset_profiles_together(tmp_path: Path) -> None:
    cfg = resolve(env_example(), "local", "superset", tmp_path=tmp_path)
    assert set(cfg["services"]) == {"chtsync", "couchdb", "couchdb-init", "postgres", "superset",
                                    "superset-import"}
    assert set(cfg["volumes"]) >= {"couchdb-data", "postgres-data", "superset-home"}
    assert env_of(cfg["services"]["superset-import"])["POSTGRES_HOST"] == "postgres"


def test_published_ports_follow_env(tmp_path: Path) -> None:
    env_text = env_example(BIND_ADDRESS="0.0.0.0", METRICS_PUBLISHED_PORT="19090",
                           SUPERSET_PUBLISHED_PORT="18088", POSTGRES_PUBLISHED_PORT="15432",
                           METRICS_PORT="9191")
    services = resolve(env_text, "local", "superset", tmp_path=tmp_path)["services"]
    assert ports_of(services["chtsync"]) == {("0.0.0.0", "19090", "9191")}
    assert env_of(services["chtsync"])["METRICS_PORT"] == "9191"  # the healthcheck reads it
    assert ports_of(services["superset"]) == {("0.0.0.0", "18088", "8088")}
    assert ports_of(services["postgres"]) == {("0.0.0.0", "15432", "5432")}


def test_password_with_dollar_in_single_quotes(tmp_path: Path) -> None:
    cfg = resolve(env_example(COUCHDB_PASSWORD="'pa$word'"), tmp_path=tmp_path)
    # compose prints a literal `$` escaped as `$$`
    assert env_of(cfg["services"]["chtsync"])["COUCHDB_PASSWORD"].replace("$$", "$") == "pa$word"


def test_env_example_has_cht_syncs_names_and_no_secret() -> None:
    text = (ROOT / ".env.example").read_text()
    assigned = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE))
    cht_sync = ["POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_SCHEMA", "POSTGRES_TABLE",
                "POSTGRES_HOST", "POSTGRES_PORT", "DATAEMON_INTERVAL", "COUCHDB_USER", "COUCHDB_PASSWORD",
                "COUCHDB_DBS", "COUCHDB_HOST", "COUCHDB_PORT", "COUCHDB_SECURE"]
    assert [name for name in cht_sync if name not in assigned] == []
    for name, value in assigned.items():
        if re.search(r"PASSWORD|SECRET", name):
            assert value == "", f"{name} has a default in .env.example"
    # Every variable it sets is one the compose file uses.
    compose = COMPOSE_FILE.read_text()
    unused = [n for n in assigned if n != "COMPOSE_PROJECT_NAME" and "${" + n not in compose]
    assert unused == []


# --- Dockerfiles ----------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_vars(steps: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for word, rest in steps:
        if word == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)", rest):
                found[key] = value.strip('"')
    return found


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_dockerfile_shape() -> None:
    steps = instructions(DOCKERFILE)
    words = [w for w, _ in steps]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", steps[0][1]), steps[0]
    assert words.count("FROM") == 1

    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")
    assert any(w == "RUN" and "useradd" in rest for w, rest in steps)

    assert dict(steps)["ENTRYPOINT"] == '["chtsync"]'
    assert dict(steps)["CMD"] == '["run"]'

    env = env_vars(steps)
    assert "CHTSYNC_HOME" not in env  # the wheel carries migrations, models and the bundle
    assert env["CHTSYNC_CONFIG"] == "/app/config.yaml"
    assert env["METRICS_PORT"] == "9090" and env["METRICS_HOST"] == "0.0.0.0"

    (check,) = [rest for w, rest in steps if w == "HEALTHCHECK"]
    assert "--start-period=" in check and " CMD " in f" {check} "
    assert "/healthz" in check and "METRICS_PORT" in check and "curl" not in check


def test_dockerfile_installs_like_ci_and_copies_what_the_wheel_needs() -> None:
    steps = instructions(DOCKERFILE)
    (install,) = [rest for w, rest in steps if w == "RUN" and "pip install" in rest]
    cmd = shlex.split(install.split("&&")[0])
    assert cmd[:2] == ["pip", "install"]
    assert cmd[-1] == "."  # this project, runtime dependencies only: no extras, not editable
    assert "-e" not in cmd and "--editable" not in cmd and "--no-cache-dir" in cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install .*-e \"\.\[test\]\"", ci), "CI no longer installs the project"

    copies = {}
    for w, rest in steps:
        if w == "COPY":
            *sources, dest = [a for a in rest.split() if not a.startswith("--")]
            for src in sources:
                copies[src.rstrip("/")] = dest
    # The wheel is built from these: its package resources (chtsync/paths.py).
    assert copies["migrations"] == "migrations/"
    assert copies["sql"] == "sql/"
    assert copies["superset"] == "superset/"
    assert copies["config.yaml"] == "/app/config.yaml"
    for src in copies:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    # The package build needs these (pyproject's readme and package-dir).
    assert {"pyproject.toml", "README.md", "chtsync", "migrations", "sql", "superset"} <= set(copies)
    for private in (".env", ".git", "node_modules", "tests", "bench", ".env.example"):
        assert dockerignored(private), f"{private} would be sent to the Docker build"


def test_no_secret_baked_into_an_image() -> None:
    for dockerfile in (DOCKERFILE, SUPERSET_DIR / "Dockerfile"):
        steps = instructions(dockerfile)
        for w, rest in steps:
            if w in ("ENV", "ARG"):
                for key, _ in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", rest) or [(rest, "")]:
                    assert not re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", key.upper()), f"{dockerfile}: {w} {rest}"
            if w == "COPY":
                assert ".env" not in rest.split()
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert not (config.get("couchdb") or {}).get("password")
    assert not (config.get("postgres") or {}).get("password")


def test_superset_image_pins_what_the_tests_prove() -> None:
    from tests import superset_env

    steps = instructions(SUPERSET_DIR / "Dockerfile")
    text = (SUPERSET_DIR / "Dockerfile").read_text()
    assert re.search(rf"ARG SUPERSET_VERSION={re.escape(superset_env.SUPERSET_VERSION)}\b", text)
    assert steps[1] == ("FROM", "apache/superset:${SUPERSET_VERSION}")
    for package in superset_env.PACKAGES[1:]:  # what apache-superset itself lacks
        assert package in text, package
    assert [rest for w, rest in steps if w == "USER"][-1] == "superset"
    env = env_vars(steps)
    assert env["SUPERSET_CONFIG_PATH"] == "/app/chtsync/superset_config.py"
    (check,) = [rest for w, rest in steps if w == "HEALTHCHECK"]
    assert "/health" in check
    assert dict(steps)["CMD"] == '["/app/chtsync/start.sh"]'
    assert os.access(SUPERSET_DIR / "start.sh", os.X_OK)
    proc = subprocess.run(["sh", "-n", str(SUPERSET_DIR / "start.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- the steps, replayed outside Docker ---------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server names it so
        code = 200 if self.path in ("/healthz", "/health") else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_commands_pass_and_fail(tmp_path: Path) -> None:
    (check,) = [rest for w, rest in instructions(DOCKERFILE) if w == "HEALTHCHECK"]
    image_cmd = json.loads(check.split(" CMD ", 1)[1])
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    compose_cmd = compose["services"]["chtsync"]["healthcheck"]["test"][1:]
    for cmd in (image_cmd, compose_cmd):
        assert cmd[0] == "python"
        py = [sys.executable, *cmd[1:]]
        with health_server() as port:
            ok = subprocess.run(py, env={**os.environ, "METRICS_PORT": str(port)}, timeout=30)
        assert ok.returncode == 0
        down = subprocess.run(py, env={**os.environ, "METRICS_PORT": str(free_port())},
                              capture_output=True, timeout=30)
        assert down.returncode != 0


def test_image_build_steps_replayed(tmp_path: Path) -> None:
    """The COPY and pip steps of the Dockerfile in a scratch root and a fresh venv: the wheel
    builds from exactly the copied files, and the installed chtsync finds migrations, models and
    the Superset bundle in the wheel alone (no source checkout, no CHTSYNC_HOME)."""
    root = tmp_path / "image"
    workdir = root
    steps = instructions(DOCKERFILE)
    env = env_vars(steps)
    venv_dir = tmp_path / "venv"
    # Dependencies come from the test environment (CI installed them); the project itself is
    # built and installed into the venv from the copied files by the Dockerfile's own command.
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(venv_dir)
    bin_dir = venv_dir / "bin"
    for w, rest in steps:
        if w == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif w == "COPY":
            *sources, dest = [a for a in rest.split() if not a.startswith("--")]
            target = workdir / dest if not dest.startswith("/") else root / dest.lstrip("/")
            for src in sources:
                path = ROOT / src.rstrip("/")
                if path.is_dir():
                    shutil.copytree(path, target if dest.endswith("/") else target / path.name,
                                    dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    dest_file = target / path.name if dest.endswith("/") else target
                    dest_file.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest_file)
        elif w == "RUN" and "pip install" in rest:
            cmd = shlex.split(rest.split("&&")[0])
            proc = subprocess.run([str(bin_dir / "python"), "-m", *cmd], cwd=workdir, capture_output=True,
                                  text=True, timeout=600,
                                  env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            shutil.rmtree(workdir)  # as the Dockerfile does: the sources are gone
            workdir = root
    assert "CHTSYNC_HOME" not in env
    run_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "CHTSYNC_CONFIG": str(root / env["CHTSYNC_CONFIG"].lstrip("/")),
        "COUCHDB_HOST": "cht.example.org",
        "POSTGRES_HOST": "db.example.org",
        "POSTGRES_PASSWORD": "pw-Secret",
    }
    probe = (
        "import chtsync, json; from chtsync import paths; from chtsync.superset import bundle_dir;"
        "print(json.dumps({'file': chtsync.__file__, 'migrations': sorted(p.name for p in"
        " paths.migrations_dir().glob('*.sql')), 'models': paths.default_models().is_file(),"
        " 'bundle': (bundle_dir() / 'metadata.yaml').is_file()}))"
    )
    proc = subprocess.run([str(bin_dir / "python"), "-c", probe], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["file"].startswith(str(venv_dir)), found["file"]  # the wheel, not the checkout
    assert found["migrations"] == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert found["models"] and found["bundle"]
    version = subprocess.run([str(bin_dir / "chtsync"), "--version"], env=run_env, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("chtsync ")
    out = tmp_path / "bundle.zip"
    bundle = subprocess.run([str(bin_dir / "chtsync"), "superset", "bundle", "--out", str(out)], cwd=tmp_path,
                            env=run_env, capture_output=True, text=True, timeout=120)
    assert bundle.returncode == 0, bundle.stderr
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        text = b"".join(z.read(name) for name in names).decode()
    assert any(name.endswith("metadata.yaml") for name in names) and len(names) > 10
    assert "db.example.org" in text and "pw-Secret" not in text  # password masked


def test_couchdb_init_creates_the_databases(couch_server: Any, couch: Any) -> None:
    user, password = couch_server.auth
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COUCHDB_", "POSTGRES_", "CHTSYNC_"))},
        "COUCHDB_URL": couch_server.url, "COUCHDB_USER": user, "COUCHDB_PASSWORD": password,
        "COUCHDB_DBS": "dockerinit-a dockerinit-b", "CHTSYNC_CONFIG": str(ROOT / "config.yaml"),
    }
    script = ROOT / "docker" / "couchdb_init.py"
    for _ in range(2):  # the second run finds everything in place
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr
    assert "exists" in proc.stdout
    dbs = set(couch.http.get("/_all_dbs").json())
    assert {"dockerinit-a", "dockerinit-b", "_users", "_replicator"} <= dbs


def test_superset_start_script_refuses_missing_secrets(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for env, missing in (({}, "SUPERSET_ADMIN_PASSWORD"),
                         ({"SUPERSET_ADMIN_PASSWORD": "x"}, "SUPERSET_SECRET_KEY")):
        proc = subprocess.run(["sh", str(SUPERSET_DIR / "start.sh")], env={**base, **env},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and missing in proc.stderr


@pytest.mark.slow
def test_superset_start_script_with_real_superset(tmp_path: Path) -> None:
    """docker/superset's settings and start script with the pinned Superset (the same packages
    the image adds), outside Docker: metadata database, admin from the environment, web server."""
    from chtsync.superset import Superset as Client
    from tests import superset_env

    venv_dir = superset_env.ensure_venv()
    port = free_port()
    home = tmp_path / "superset_home"
    home.mkdir()
    # A metadata database left by an earlier run (admin with another password) skips the slow
    # first upgrade and proves the restart path: the password from the environment wins.
    template = venv_dir / ".chtsync-metadata.db"
    if template.is_file():
        shutil.copyfile(template, home / "superset.db")
    env = {
        "PATH": f"{venv_dir / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SUPERSET_HOME": str(home),
        "SUPERSET_CONFIG_PATH": str(SUPERSET_DIR / "superset_config.py"),
        "SUPERSET_SECRET_KEY": "s" * 40,
        "SUPERSET_ADMIN_PASSWORD": "Start-Script-Pass-1",
        "SUPERSET_PORT": str(port),
        "SUPERSET_BIND_ADDRESS": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["sh", str(SUPERSET_DIR / "start.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/health", timeout=5
            ) as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(1)
        client = Client(f"http://127.0.0.1:{port}")
        try:
            client.login("admin", env["SUPERSET_ADMIN_PASSWORD"])
            assert set(client.counts()) == {"dashboard", "chart", "dataset", "database"}
        finally:
            client.close()
        assert (home / "superset.db").is_file()  # the metadata lives on the volume
        assert env["SUPERSET_SECRET_KEY"] not in log_path.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
