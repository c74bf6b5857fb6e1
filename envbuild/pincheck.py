"""Pin check (`envbuild resolve --check`): can the Plan's pins install together?

Before any build, a real resolver answers: pip's, in report mode (`pip install --dry-run
--report - --ignore-installed`), run by the tool's own Python for the image's Python and
platform (`--python-version`, `--platform manylinux...`, `--only-binary :all:`: nothing is
built on the host), against the era's index view the lock uses (era.EraIndex: PyPI as of the
Plan's cutoff, exact pins excepted). Its input is the requirements.in render writes: torch's
trio and every pip pin; the compiled packages (mmcv-full, flash-attn, PyG ops) are not in it,
since they build from their sdists in their wheel stages, so the check does not cover them and
says so. A clash is one line naming the Plan's pin and the requirement that refuses it, and a
pin of the era that satisfies every requirement when there is one.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import creds, era, render
from .plan import Plan

TIMEOUT = 600  # seconds for pip's whole run (ENVBUILD_CHECK_TIMEOUT)
MAX_ROUNDS = 8  # pip runs: each round leaves out the pins it found without a wheel
# glibc of the bases envbuild uses: Ubuntu 20.04 (2.31), 22.04 (2.35), Debian 12 (2.36); manylinux2014
# stands for 2.17 and (in pip) for manylinux2010 and manylinux1 below it.
PLATFORMS = ("linux_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 32)))

_CAUSED = re.compile(r"^The conflict is caused by:\s*$")
_REQUESTED = re.compile(r"^The user requested (?:\(constraint\) )?(?P<req>\S.*?)\s*$")
_DEPENDS = re.compile(r"^(?P<who>[A-Za-z0-9][A-Za-z0-9._-]*) (?P<version>\S+) depends on (?P<req>\S.*?)\s*$")
_NO_MATCH = re.compile(r"No matching distribution found for (?P<req>\S+)")
_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement (?P<req>\S+)"
                         r"(?: \(from (?!versions:)(?P<parent>[^)]*)\))?(?: \(from versions: (?P<versions>[^)]*)\))?")


def _requirement(text: str) -> Requirement | None:
    """pip writes `urllib3<1.27 and >=1.21.1`; packaging wants commas."""
    try:
        return Requirement(text.replace(" and ", ","))
    except InvalidRequirement:
        return None


def parse_conflict(output: str) -> list[dict]:
    """pip's ResolutionImpossible text -> one clash per package: {"package", "requested": [the
    requirement lines asked for], "required": [{"by", "version", "spec"}]}. [] when the text
    holds no such section."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if _CAUSED.match(line.strip())), None)
    if start is None:
        return []
    clashes: dict[str, dict] = {}

    def entry(req: Requirement) -> dict:
        name = canonicalize_name(req.name)
        return clashes.setdefault(name, {"package": name, "requested": [], "required": []})

    for line in lines[start + 1:]:
        text = line.strip()
        if not text:
            break
        if m := _REQUESTED.match(text):
            req = _requirement(m.group("req"))
            if req is not None:
                entry(req)["requested"].append(str(req))
        elif m := _DEPENDS.match(text):
            req = _requirement(m.group("req"))
            if req is not None:
                entry(req)["required"].append({"by": canonicalize_name(m.group("who")), "version": m.group("version"),
                                               "spec": str(req.specifier) or "(any)",
                                               "requirement": str(req)})
    # a package only its own pin names, with nothing requiring it, is not part of the clash
    return [c for c in clashes.values() if c["required"]]


def parse_missing(output: str) -> list[dict]:
    """The requirements pip found no file for (this Python and platform, wheels only):
    [{"package", "requirement", "from", "versions"}]."""
    out, seen = [], set()
    for m in _NO_VERSION.finditer(output):
        req = _requirement(m.group("req"))
        if req is None or canonicalize_name(req.name) in seen:
            continue
        seen.add(canonicalize_name(req.name))
        out.append({"package": canonicalize_name(req.name), "requirement": str(req),
                    "from": (m.group("parent") or "").strip(), "versions": (m.group("versions") or "").strip()})
    lines = output.splitlines()
    for i, line in enumerate(lines):  # "Additionally, some packages in these conflicts have no matching distributions"
        if line.startswith("Additionally, some packages") and "no matching distributions" in line:
            for name in lines[i + 1:]:
                if not name.strip():
                    break
                key = canonicalize_name(name.strip())
                if key not in seen:
                    seen.add(key)
                    out.append({"package": key, "requirement": name.strip(), "from": "", "versions": ""})
    for m in _NO_MATCH.finditer(output):
        req = _requirement(m.group("req"))
        if req is not None and canonicalize_name(req.name) not in seen:
            seen.add(canonicalize_name(req.name))
            out.append({"package": canonicalize_name(req.name), "requirement": str(req), "from": "", "versions": ""})
    return out


def describe(clash: dict, plan: Plan | None = None, fix: dict | None = None) -> str:
    """One line: the Plan's pin, the requirement that refuses it, and (when known) the pin that
    satisfies every requirement."""
    name = clash["package"]
    asked = " and ".join(clash["requested"]) or name
    pin = plan.pin(name) if plan is not None else None
    whose = ""
    if pin is not None and pin.deviation and pin.upstream:
        whose = f" (the Plan's {pin.source}: upstream pins {pin.upstream}; {pin.why})"
    elif pin is not None and pin.source != "upstream":
        whose = f" (the Plan's {pin.source} pin: {pin.why})"
    refusals = "; ".join(f"{r['by']} {r['version']} requires {r['requirement']}" for r in clash["required"])
    text = f"pin conflict: {asked}{whose} clashes with {refusals}" if clash["requested"] else \
        f"pin conflict on {name}: {refusals}, which no release satisfies together"
    if fix:
        text += f"; {fix['requirement']} satisfies them ({fix['how']}): --set {fix['requirement']}"
    return text


def _versions_in_view(view: era.EraIndex, name: str, python: str) -> dict[str, bool]:
    """{version: has a wheel for this Python} of the files the era view shows for a project."""
    out: dict[str, bool] = {}
    for f in view.files(name)[1]:
        version = era.file_version(f["filename"])
        if version is not None:
            out[version] = out.get(version, False) or era._wheel_for(f, python)
    return out


def _uninstallable(view: era.EraIndex, line: str, python: str) -> dict | None:
    """An exact pin with no wheel for this Python and no sdist either (open3d ships wheels only):
    no build can install it. A clash, fixed by the first later release with such a wheel."""
    req = _requirement(line.strip())
    pinned = next((sp.version for sp in req.specifier if sp.operator == "=="), None) if req else None
    if pinned is None:
        return None
    files = [f for f in view.files(req.name)[1] if era.file_version(f["filename"]) == pinned]
    if any(not f["filename"].endswith(".whl") for f in files):
        return None  # it builds from its sdist in the image
    later = sorted((Version(v) for v, wheel in _versions_in_view(view, req.name, python).items()
                    if wheel and _is_release(v) and Version(v) > Version(pinned)))
    fix = {"requirement": f"{canonicalize_name(req.name)}=={later[0]}",
           "how": f"the first release with a wheel for Python {python}"} if later else None
    said = (f"{line.strip()} cannot install on Python {python}: no wheel for it and no sdist on the index"
            + (f"; {later[0]} is the first release with one (a [python_floor] entry in packages.toml "
               "ports it for every model)" if later else ""))
    return {"package": canonicalize_name(req.name), "required": [], "requested": line.strip(), "fix": fix,
            "line": said}


def _is_release(v: str) -> bool:
    try:
        return not Version(v).is_prerelease
    except InvalidVersion:
        return False


def fix_for(clash: dict, versions: dict[str, bool]) -> dict | None:
    """The newest release (of the era view) that every requirement in the clash accepts."""
    spec = SpecifierSet(",".join(r["spec"] for r in clash["required"] if r["spec"] != "(any)"))
    fits = [Version(v) for v in versions if _is_release(v) and spec.contains(Version(v))]
    if not fits:
        return None
    best = str(max(fits))
    return {"requirement": f"{clash['package']}=={best}",
            "how": "a wheel for this Python" if versions[best] else "no wheel for this Python: it builds from its sdist"}


def _cert(ca_bundle: str | None) -> str | None:
    """The CA bundle pip trusts for an index outside loopback (the torch index line)."""
    for path in (ca_bundle, os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                 os.environ.get("REQUESTS_CA_BUNDLE"), ssl.get_default_verify_paths().openssl_cafile):
        if path and Path(path).is_file():
            return path
    return None


def pip_command(python: str, requirements: Path, index_url: str, cert: str | None = None) -> list[str]:
    """pip in report mode for the image's Python and platform. --isolated and PIP_CONFIG_FILE=/dev/null
    (check()): no pip.conf or PIP_* of this host adds an index, a constraint or find-links the build
    would not have."""
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--report", "-",
           "--no-input", "--disable-pip-version-check", "--progress-bar", "off", "--timeout", "60", "--retries", "1",
           "--python-version", python, "--implementation", "cp", "--only-binary", ":all:",
           *(arg for p in PLATFORMS for arg in ("--platform", p)),
           "--index-url", index_url, "-r", str(requirements)]
    return cmd + (["--cert", cert] if cert else [])


def check(plan: Plan, pypi_index: str, ca_bundle: str | None = None, netrc: str = "",
          timeout: int | None = None, echo=None) -> dict:
    """Ask pip whether the Plan's pins install together. The result: status "ok", "conflict"
    (clashes, each with its line), or "incomplete" (pip could not decide: a requirement without
    a wheel for this Python, an index it could not reach, the time limit), with what was left out."""
    ctx = render.make_context(plan, "envbuild resolve --check", pypi_index=pypi_index)
    return check_requirements(render.requirements_in(ctx), plan.python.version, plan.index_cutoff, pypi_index,
                              compiled=plan.compiled, plan=plan, ca_bundle=ca_bundle, netrc=netrc, timeout=timeout,
                              echo=echo)


def check_requirements(text: str, python: str, index_cutoff: str | None, pypi_index: str, compiled=(),
                       plan: Plan | None = None, ca_bundle: str | None = None, netrc: str = "",
                       timeout: int | None = None, echo=None) -> dict:
    """check() for a requirements.in text (render's): pip against the era view of PyPI as of
    index_cutoff (None: today), for this Python."""
    timeout = timeout or int(os.environ.get("ENVBUILD_CHECK_TIMEOUT", TIMEOUT))
    skipped = [f"{name}: compiled from its sdist in its wheel stage (not checked)" for name in compiled]
    result = {"status": "ok", "python": python, "index_cutoff": index_cutoff, "skipped": skipped,
              "clashes": [], "missing": [], "line": ""}
    upstream = next((line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith("--index-url ")),
                    pypi_index)
    cutoff = (datetime.fromisoformat(index_cutoff) + timedelta(days=1)) if index_cutoff else \
        datetime.now(timezone.utc) + timedelta(days=1)
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--index-url ")) + "\n"
    auth = creds.auth_header(upstream, creds.parse_netrc(netrc)) if netrc else {}
    deadline = time.monotonic() + timeout
    uninstallable = []  # exact pins with neither a wheel for this Python nor an sdist
    with tempfile.TemporaryDirectory(prefix="envbuild-check-") as tmp, \
            era.EraIndex(upstream, cutoff, era.exact_pins(text), ca_bundle, python=python, auth=auth) as view:
        req = Path(tmp) / "requirements.in"
        if echo:
            echo(f"check: pip --dry-run for Python {python}, PyPI as of {index_cutoff or 'today'} "
                 f"(exact pins excepted), wheels only; {len(compiled)} compiled package(s) left out")
        for _ in range(MAX_ROUNDS):
            req.write_text(body)
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise subprocess.TimeoutExpired("pip", timeout)
                run = subprocess.run(pip_command(python, req, view.url, _cert(ca_bundle)), capture_output=True,
                                     text=True, timeout=left, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
            except subprocess.TimeoutExpired:
                result.update(status="incomplete", line=f"pin check incomplete: pip did not decide within {timeout} s "
                                                        "(ENVBUILD_CHECK_TIMEOUT)")
                return result
            output = creds.redact(run.stdout + "\n" + run.stderr)
            # a pin of the Plan with no wheel for this Python builds from its sdist in the image:
            # left out (and said so), the rest checked again
            top = {canonicalize_name(r.name): line for line in body.splitlines()
                   if (r := _requirement(line.strip())) is not None and not line.startswith(("-", "#"))}
            sdist = [m for m in parse_missing(output) if m["package"] in top and not m["from"]
                     and not any(m["package"] == c["package"] for c in parse_conflict(output))] \
                if run.returncode != 0 and not parse_conflict(output) else []
            if not sdist:
                break
            for m in sdist:
                gone = _uninstallable(view, top[m["package"]], python)
                if gone:
                    uninstallable.append(gone)
                else:
                    skipped.append(f"{top[m['package']]}: no wheel for Python {python} (builds from its sdist; not checked)")
            drop = {top[m["package"]] for m in sdist}
            body = "\n".join(line for line in body.splitlines() if line not in drop) + "\n"
        if run.returncode == 0 and uninstallable:
            result.update(status="conflict", clashes=uninstallable, line=" | ".join(c["line"] for c in uninstallable))
            return result
        if run.returncode == 0:
            report = _report(run.stdout)
            result["installs"] = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                                  for i in report.get("install", [])}
            result["line"] = f"pin check: the Plan's pins install together on Python {python} " \
                             f"({len(result['installs'])} distributions" + \
                             (f"; not checked: {len(skipped)} (--json: skipped)" if skipped else "") + ")"
            return result
        clashes, unavailable = list(uninstallable), {m["package"] for m in parse_missing(output)}
        for clash in parse_conflict(output):
            versions = _versions_in_view(view, clash["package"], python)
            clash["fix"] = fix_for(clash, versions)
            if clash["package"] in unavailable and not clash["requested"] and clash["fix"]:
                continue  # a release satisfies every requirement but has no wheel here: missing, not a clash
            clash["line"] = describe(clash, plan, clash["fix"])
            clashes.append(clash)
        if clashes:
            result.update(status="conflict", clashes=clashes, line=clashes[0]["line"] if len(clashes) == 1 else
                          " | ".join(c["line"] for c in clashes))
            return result
        missing = parse_missing(output)
        compiled = {canonicalize_name(n) for n in compiled}
        result["missing"] = missing
        if missing:
            names = ", ".join(
                f"{m['requirement']}" + (" (compiled in its wheel stage)" if m["package"] in compiled else
                                         f" (from {m['from']})" if m["from"] else "")
                for m in missing)
            result.update(status="incomplete", line=f"pin check incomplete: no wheel for Python {python} on "
                                                    f"manylinux x86_64 of {names}; pip builds nothing here, so what "
                                                    "depends on it was not checked")
        else:
            tail = [line for line in output.strip().splitlines() if line.startswith("ERROR")][-1:] or \
                output.strip().splitlines()[-1:]
            result.update(status="incomplete", line=f"pin check incomplete: pip failed: {' '.join(tail)}")
        result["output"] = output[-4000:]
        return result


def _report(stdout: str) -> dict:
    """pip's JSON report (--report -): the JSON document in its standard output."""
    start = 0 if stdout.startswith("{") else stdout.find("\n{") + 1
    try:
        return json.JSONDecoder().raw_decode(stdout[start:])[0] if start > 0 or stdout.startswith("{") else {}
    except json.JSONDecodeError:
        return {}


def raise_for(result: dict) -> None:
    """The exit a check decides: a clash is bad input (2), a check pip could not finish failed (1)."""
    from .errors import BadInput, OperationFailed
    if result["status"] == "conflict":
        fixes = [c["fix"]["requirement"] for c in result["clashes"] if c.get("fix")]
        raise BadInput(result["line"], f"pin {', '.join(fixes)} with --set, or correct the catalog entry "
                                       "([corrections])" if fixes else "correct the catalog entry ([corrections]) "
                                                                       "or --set a pin both sides accept")
    if result["status"] == "incomplete":
        raise OperationFailed(result["line"], "the Plan is printed above; pip's words are in --json (output)")
