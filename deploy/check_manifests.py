#!/usr/bin/env python3
"""Cross-checks a set of Kubernetes objects of vllm-router (deploy/check.sh).

kubernetes-validate checks each object against the API schema; this checks that they
fit together: selectors match the pod labels, the HPA, Ingress and volumes name
objects that exist, probes use /livez and /readyz, and the grace period leaves room
for the router's shutdown_timeout.

usage: check_manifests.py [--expect KIND,KIND...] [--toml-out PATH] FILE...
"""
import argparse
import sys
import tomllib

import yaml


def fail(msg):
    print(f"check_manifests: {msg}", file=sys.stderr)
    sys.exit(1)


def subset(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect", default="")
    ap.add_argument("--toml-out")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    objs = []
    for path in args.files:
        with open(path) as f:
            objs += [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    if args.expect:
        want = set(args.expect.split(","))
        have = set(by_kind)
        if want != have:
            fail(f"kinds {sorted(have)} but expected {sorted(want)}")

    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    if not subset(dep["spec"]["selector"]["matchLabels"], labels):
        fail("the Deployment's selector does not match its pod labels")
    spec = pod["spec"]
    (c,) = spec["containers"]
    if c["livenessProbe"]["httpGet"]["path"] != "/livez":
        fail("liveness must probe /livez (a backend outage must not restart the routers)")
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("readiness must probe /readyz")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("CONFIG_PATH", {}).get("value") != "/etc/vllm-router/servers.toml":
        fail("CONFIG_PATH must be /etc/vllm-router/servers.toml")
    if "API_KEY" in env and not env["API_KEY"]["valueFrom"]["secretKeyRef"].get("optional"):
        fail("API_KEY must come from an optional secretKeyRef")
    sc = c.get("securityContext", {})
    psc = spec.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")):
        fail("pods must run as non-root with a read-only root filesystem")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    cfg_vol = vols[mounts["/etc/vllm-router"]]
    if any(m.get("subPath") for m in c["volumeMounts"]):
        fail("no subPath mounts: they do not receive ConfigMap updates (hot reload)")
    log_dir = env.get("LOG_DIR", {}).get("value", "/app/logs")
    if "emptyDir" not in vols[mounts[log_dir]]:
        fail("the log directory must be a writable emptyDir")
    (cm,) = by_kind["ConfigMap"]
    if cfg_vol["configMap"]["name"] != cm["metadata"]["name"]:
        fail("the config volume does not name the ConfigMap")
    text = cm["data"]["servers.toml"]
    cfg = tomllib.loads(text)
    shutdown = cfg.get("config", {}).get("shutdown_timeout", 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= shutdown + pre_stop:
        fail(f"terminationGracePeriodSeconds {grace} <= shutdown_timeout {shutdown} + preStop {pre_stop}")
    if args.toml_out:
        with open(args.toml_out, "w") as f:
            f.write(text)

    for svc in by_kind.get("Service", []):
        if not subset(svc["spec"]["selector"], labels):
            fail(f"Service {svc['metadata']['name']} selects no router pod")
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in ("http", 8888):
                fail("the Service must target the http port")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for ing in by_kind.get("Ingress", []):
        ann = ing["metadata"].get("annotations") or {}
        if "nginx.ingress.kubernetes.io/rewrite-target" in ann:
            fail("no rewrite-target: the router needs the request path as sent")
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                b = p["backend"]["service"]
                s = services.get(b["name"])
                if s is None or b["port"]["number"] not in [q["port"] for q in s["spec"]["ports"]]:
                    fail(f"Ingress backend {b} is not a Service port")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
            fail("the HPA does not scale the router Deployment")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not subset(pdb["spec"]["selector"]["matchLabels"], labels):
            fail("the PodDisruptionBudget selects no router pod")
    for np in by_kind.get("NetworkPolicy", []):
        if not subset(np["spec"]["podSelector"]["matchLabels"], labels):
            fail("the NetworkPolicy selects no router pod")
        ports = [p.get("port") for e in np["spec"].get("egress", []) for p in e.get("ports", [])]
        if 53 not in ports:
            fail("the NetworkPolicy must allow DNS (port 53) out")
    ns = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    if len(ns) != 1:
        fail(f"objects in several namespaces: {ns}")
    print(f"check_manifests: {len(objs)} objects fit together ({', '.join(sorted(by_kind))})")


if __name__ == "__main__":
    main()
