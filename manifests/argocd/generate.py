"""Write argocd-cm-patch.yaml from health.lua: one Argo CD health customization per pgscale kind.

Argo CD reads custom health checks from its `argocd-cm` ConfigMap, one key per
group and kind (`resource.customizations.health.<group>_<Kind>`). The Lua lives in
health.lua so that it can be read, reviewed and executed by the tests; this script
copies it under each kind's key. tests/unit/test_argocd_health.py fails when the
patch is stale.

    uv run python manifests/argocd/generate.py          # rewrite the patch
    uv run python manifests/argocd/generate.py --check  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgscale.api import GROUP, KINDS

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "health.lua"
PATCH = HERE / "argocd-cm-patch.yaml"

HEADER = """\
# Generated from health.lua by generate.py: do not edit by hand.
# Argo CD health checks for pgscale's kinds. Merge it into argocd-cm, e.g.
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file manifests/argocd/argocd-cm-patch.yaml
# or list it under `patches:` of the kustomization that installs Argo CD.
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
data:
"""


def key(kind: str) -> str:
    """The argocd-cm key Argo CD looks up for a kind's health."""
    return f"resource.customizations.health.{GROUP}_{kind}"


def render(script: str | None = None) -> str:
    """The patch: health.lua as a literal block under each kind's key."""
    lua = SCRIPT.read_text() if script is None else script
    body = "".join(f"    {line}".rstrip() + "\n" for line in lua.rstrip("\n").split("\n"))
    return HEADER + "".join(f"  {key(k.name)}: |\n{body}" for k in KINDS)


def main(argv: list[str] | None = None) -> int:
    """Write the patch, or with --check report whether it is current."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="exit 1 when argocd-cm-patch.yaml is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not PATCH.exists() or PATCH.read_text() != text:
            print(f"{PATCH} is stale: run `uv run python {Path(__file__).name}`", file=sys.stderr)
            return 1
        return 0
    PATCH.write_text(text)
    print(f"wrote {PATCH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
