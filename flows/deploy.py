"""Register the deployments of ``deploy/prefect.yaml`` with the server PREFECT_API_URL names.

Prefect's own ``prefect deploy`` reads the YAML, so it means exactly what Prefect documents.
This module adds what the YAML cannot say: each work pool it names exists (type process) and
runs at most one flow run at a time, which keeps the on-demand and the weekly deployment
from ever training at once.

``python -m flows.deploy [--project-dir DIR] [--name NAME ...]`` runs it from a shell (the
``deploy`` service of docker/compose.yaml does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.exceptions import ObjectAlreadyExists
from prefect.settings import PREFECT_API_KEY
from prefect.workers.process import ProcessWorker

from fer.errors import FerError
from flows.remote import require_api

PREFECT_FILE = Path("deploy") / "prefect.yaml"
POOL_CONCURRENCY_LIMIT = 1  # one training at a time per pool, whichever deployment asks
DEPLOY_TIMEOUT_S = 600


def deploy_all(project_dir: Path, *, names: Sequence[str] | None = None) -> list[str]:
    """Create the work pools and register the named deployments (all when None).

    Returns the registered deployments as ``flow/deployment`` names, read back from the server.
    """
    project_dir = Path(project_dir).resolve()
    pools = read_deployments(project_dir / PREFECT_FILE)
    chosen = list(pools) if names is None else _check_names(names, pools)
    api_url = require_api()
    for pool in sorted({pools[name] for name in chosen}):
        ensure_work_pool(pool, concurrency_limit=POOL_CONCURRENCY_LIMIT)
    _prefect_deploy(project_dir, chosen, api_url=api_url, everything=names is None)
    return _registered(chosen)


def read_deployments(prefect_file: Path) -> dict[str, str]:
    """Deployment name -> work pool name, as the YAML declares them."""
    try:
        config = yaml.safe_load(prefect_file.read_text())
    except OSError as exc:
        raise FerError(f"cannot read {prefect_file} ({exc.strerror}); run from the fer checkout "
                       "or pass its folder") from None
    except yaml.YAMLError as exc:
        raise FerError(f"{prefect_file} is not valid YAML: {' '.join(str(exc).split())}") from None
    deployments = (config or {}).get("deployments") or []
    pools = {}
    for index, deployment in enumerate(deployments):
        pool = (deployment.get("work_pool") or {}).get("name")
        if not deployment.get("name") or not pool:
            raise FerError(f"{prefect_file}: deployments[{index}] needs a name and a "
                           "work_pool.name")
        pools[deployment["name"]] = pool
    if not pools:
        raise FerError(f"{prefect_file} declares no deployments")
    return pools


def ensure_work_pool(name: str, *, concurrency_limit: int | None) -> None:
    """Create process work pool ``name`` if missing, then set its concurrency limit."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, concurrency_limit=concurrency_limit,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # a worker may have created it first; keep its type
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def _check_names(names: Sequence[str], pools: dict[str, str]) -> list[str]:
    unknown = [name for name in names if name not in pools]
    if unknown:
        raise FerError(f"no deployment named {', '.join(map(repr, unknown))} in {PREFECT_FILE}; "
                       f"expected one of {', '.join(pools)}")
    return list(dict.fromkeys(names))


def _prefect_deploy(project_dir: Path, names: list[str], *, api_url: str,
                    everything: bool) -> None:
    """``prefect --no-prompt deploy`` in the project folder, against ``api_url``."""
    selection = ["--all"] if everything else [arg for name in names for arg in ("--name", name)]
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
               "--prefect-file", str(PREFECT_FILE), *selection]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    if api_key := PREFECT_API_KEY.value():
        env["PREFECT_API_KEY"] = api_key.get_secret_value()
    try:
        done = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True,
                              timeout=DEPLOY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise FerError(f"`prefect deploy` in {project_dir} did not finish in "
                       f"{DEPLOY_TIMEOUT_S}s; check the server at {api_url}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        raise FerError(f"`prefect deploy` in {project_dir} failed (exit {done.returncode}): "
                       + " | ".join(line.strip() for line in output[-5:] if line.strip()))


def _registered(names: list[str]) -> list[str]:
    """``flow/deployment`` for each name, from the server: proof that the deploy took effect."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
    full = {d.name: f"{flows[d.flow_id]}/{d.name}" for d in found}
    missing = [name for name in names if name not in full]
    if missing:
        raise FerError(f"`prefect deploy` finished but {', '.join(missing)} is not registered; "
                       "check the output of `prefect --no-prompt deploy --prefect-file "
                       f"{PREFECT_FILE} --all`")
    return [full[name] for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.deploy``: register the deployments, print one line per deployment."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description="Register the deployments of deploy/prefect.yaml with the Prefect server "
                    "at PREFECT_API_URL, creating work pool fer if needed.")
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(),
                        help="folder holding deploy/prefect.yaml (default: the current one)")
    parser.add_argument("--name", action="append", dest="names",
                        help="deploy only this deployment (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        deployed = deploy_all(args.project_dir, names=args.names)
    except FerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in deployed:
        print(f"deployed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
