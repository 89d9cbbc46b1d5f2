"""Print constraints.txt: the installed version of every package `pip install -e '.[dev]'` pulls in.

Walks tgdp's requirements (with the `dev` extra) and theirs through the installed metadata, so only
what the project needs is listed (not whatever else the venv holds), tgdp itself excluded. Usage:
    .venv/bin/python .ci/freeze_constraints.py > constraints.txt
"""

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions of every package `pip install -e '.[dev]'` installs (tgdp's dependencies and
# theirs), used by .ci/setup.sh as `pip install -c constraints.txt -e '.[dev]'` so that a fresh
# set-up resolves the tested set, not whatever is newest that day. pyproject.toml keeps the
# direct pins; this file fixes the transitive ones too.
# Regenerate after changing a dependency (in a venv set up from pyproject.toml):
#   .venv/bin/python .ci/freeze_constraints.py > constraints.txt
"""


def walk(name: str, extras: tuple[str, ...], seen: dict[str, str]) -> None:
    for line in metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
            continue
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        try:
            seen[key] = metadata.version(req.name)
        except metadata.PackageNotFoundError:  # not needed on this platform
            continue
        walk(req.name, tuple(req.extras), seen)


def main() -> None:
    seen: dict[str, str] = {}
    walk("tgdp", ("dev",), seen)
    seen.pop("tgdp", None)
    print(HEADER + "\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))


if __name__ == "__main__":
    main()
