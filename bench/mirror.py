"""The original code of a reference, read from a local git mirror (for the benches that run it
beside ours; nothing of it is copied into this repository)."""
from __future__ import annotations

import os
import subprocess
import sys


def git_dir(mirror: str, repo: str) -> str:
    """The bare git directory of the mirror of GitHub's ``repo`` (``mirror`` itself or
    ``mirror/repo``); exits with the command that makes one when there is none."""
    for cand in (mirror, os.path.join(mirror, "repo")):
        ok = subprocess.run(["git", f"--git-dir={cand}", "rev-parse", "--verify", "HEAD"],
                            capture_output=True, text=True)
        if ok.returncode == 0:
            return cand
    sys.exit(f"no git mirror of {repo} at '{mirror}'. Get one with 'git clone --mirror "
             f"https://github.com/{repo} {mirror}' (or pass --mirror <path of a clone>); this "
             f"benchmark needs the original code.")


def extract(gdir: str, dest: str) -> str:
    """Write the mirror's Python files (HEAD) under ``dest``; returns the commit."""
    commit = subprocess.run(["git", f"--git-dir={gdir}", "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    names = subprocess.run(["git", f"--git-dir={gdir}", "ls-tree", "-r", "--name-only",
                            "HEAD"], capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if not name.endswith(".py"):
            continue
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(subprocess.run(["git", f"--git-dir={gdir}", "show", f"HEAD:{name}"],
                                   capture_output=True, check=True).stdout)
    return commit
