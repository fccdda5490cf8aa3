"""Checks the deployment files as far as a machine without a container engine or a
Kubernetes cluster allows: every engine that deploy/compose.yaml and deploy/k8s/*.yaml
define must get a configuration the engine itself accepts (`postbackd check-config` with the
same POSTBACKD_* variables, so a misspelt setting or a bad role fails here), probe the
engine's real endpoints on the port it listens on, and the Dockerfile's settings must be
valid too.

    python deploy/check_deploy.py POSTBACKD_BINARY

Needs PyYAML. Prints what it checked; exits 1 on the first problem.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROBES = {"/ready", "/health"}


def fail(msg: str) -> None:
    print(f"check_deploy: {msg}", file=sys.stderr)
    sys.exit(1)


def check_config(binary: str, where: str, env: dict) -> None:
    clean = {"PATH": os.environ.get("PATH", "")}
    clean.update({k: str(v) for k, v in env.items()})
    run = subprocess.run([binary, "check-config"], env=clean, capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{where}: postbackd refuses its configuration: {run.stderr.strip()[:300]}")
    roles = re.search(r"^roles: (.*)$", run.stdout, re.M)
    print(f"ok  {where}: roles {roles.group(1) if roles else '?'}")


def dockerfile_env() -> dict:
    text = (ROOT / "deploy/Dockerfile").read_text()
    env = dict(re.findall(r"(POSTBACKD_\w+)=(\S+)", text))
    if not env:
        fail("deploy/Dockerfile sets no POSTBACKD_ variables")
    return env


def compose(binary: str, base: dict) -> None:
    doc = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    engines = {n: s for n, s in doc["services"].items() if "POSTBACKD_ROLES" in s.get("environment", {})}
    if len(engines) < 2:
        fail("compose.yaml should define two engines")
    for name, service in engines.items():
        env = dict(base)
        for key, value in service["environment"].items():
            env[key] = re.sub(r"\$\{[^}]*\}", "placeholder", str(value))
        check_config(binary, f"compose.yaml {name}", env)
        for dep in service.get("depends_on", {}):
            if dep not in doc["services"]:
                fail(f"compose.yaml {name} depends on a missing service {dep}")


def kubernetes(binary: str, base: dict) -> None:
    docs = []
    for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    kustomization = next((d for _, d in docs if d["kind"] == "Kustomization"), None)
    listed = set(kustomization["resources"]) if kustomization else set()
    workloads = [(f, d) for f, d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    if not workloads:
        fail("deploy/k8s defines no engine workload")
    for file, doc in workloads:
        if file not in listed:
            fail(f"{file} is not in kustomization.yaml's resources")
        spec = doc["spec"]["template"]["spec"]
        for c in spec["containers"]:
            where = f"k8s {doc['kind']} {doc['metadata']['name']}"
            env = dict(base)
            for source in c.get("envFrom", []):
                name = source["configMapRef"]["name"]
                if name not in configmaps:
                    fail(f"{where}: no ConfigMap {name}")
                env.update(configmaps[name])
            for e in c.get("env", []):
                env[e["name"]] = e.get("value", "placeholder")
            check_config(binary, where, env)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            listen_port = int(env["POSTBACKD_LISTEN"].rsplit(":", 1)[1])
            for kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(kind, {}).get("httpGet")
                if not probe or probe["path"] not in PROBES:
                    fail(f"{where}: {kind} must GET /ready or /health")
                port = ports.get(probe["port"], probe["port"])
                if port != listen_port:
                    fail(f"{where}: {kind} probes port {port}, the engine listens on {listen_port}")
            print(f"ok  {where}: probes {', '.join(c[k]['httpGet']['path'] for k in ('readinessProbe', 'livenessProbe'))}")


def main() -> None:
    binary = sys.argv[1]
    base = dockerfile_env()
    check_config(binary, "Dockerfile", base)
    compose(binary, base)
    kubernetes(binary, base)


if __name__ == "__main__":
    main()
