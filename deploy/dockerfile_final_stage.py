#!/usr/bin/env python3
"""Prints, as shell assignments, what the Dockerfile's final stage sets up: ENV, USER,
WORKDIR, ENTRYPOINT, CMD and the HEALTHCHECK command (deploy/check.sh runs the static
binary in a chroot laid out like the image, with these).

usage: eval "$(dockerfile_final_stage.py Dockerfile)"
"""
import json
import shlex
import sys


def instructions(path):
    text = open(path).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def main():
    ins = instructions(sys.argv[1])
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    if ins[last_from][1].split()[0] != "scratch":
        sys.exit("the final stage is not FROM scratch")
    env, user, workdir, entry, cmd, health = [], "", "/", [], [], []
    for word, rest in ins[last_from + 1:]:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env.append(f"{key}={value}")
        elif word == "USER":
            user = rest
        elif word == "WORKDIR":
            workdir = rest
        elif word == "ENTRYPOINT":
            entry = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3:])
    def arr(name, items):
        print(f"{name}=({' '.join(shlex.quote(x) for x in items)})")
    arr("IMAGE_ENV", env)
    print(f"IMAGE_USER={shlex.quote(user)}")
    print(f"IMAGE_WORKDIR={shlex.quote(workdir)}")
    arr("IMAGE_ENTRYPOINT", entry)
    arr("IMAGE_CMD", cmd)
    arr("IMAGE_HEALTHCHECK", health)


if __name__ == "__main__":
    main()
