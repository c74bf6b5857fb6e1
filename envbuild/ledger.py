"""The verified ledger: one committed record per cell that was built from the model's real
source and checked (audit, smoke env + model). A record holds the digest of the Plan it was
made for; when today's Plan for the same request differs, the record is stale.

Records live in the catalog (envbuild/matrices/verified/<cell>.json): they are facts about the
catalog, read wherever it is installed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

from .catalog import BUILTIN, builtin_root
from .errors import BadInput

PASSED = "passed"  # a record's verdict when the audit, env and model levels all passed: a verified cell

# What the digest covers: the decisions that make an image, not how they are explained, so a
# new explanatory field in the Plan does not make every record stale.
DIGEST_FIELDS = ("model", "commit", "cards", "python", "cuda", "torch", "torchvision", "torchaudio", "torch_index",
                 "packages", "compiled", "arch_list", "extensions", "fixers", "runtime_env", "index_cutoff",
                 "base_image", "construct")


def folder(model=None) -> Path:
    """Where records go: beside the catalog the model comes from (a user catalog's own models
    are verified into it), else the built-in catalog's."""
    origin = getattr(model, "origin", BUILTIN)
    return (Path(origin).parent.parent if origin != BUILTIN else builtin_root()) / "verified"


def folders() -> list[Path]:
    from .config import setting
    user = setting("catalog_dir")
    return [builtin_root() / "verified"] + ([Path(user) / "verified"] if user else [])


def digest(plan) -> str:
    data = plan.to_dict()
    decided = {k: data.get(k) for k in DIGEST_FIELDS}
    for key in ("python", "torch", "torchvision", "torchaudio"):
        decided[key] = (data[key] or {}).get("version")
    decided["packages"] = sorted((p["name"], p["version"]) for p in data["packages"])
    vendor = sorted(name for name, info in (data.get("native_packages") or {}).items()
                    if (info.get("build") or {}).get("from") == "vendor")
    if vendor:  # a vendor's wheel instead of a compile: another image (absent: records made before stay valid)
        decided["vendor_wheels"] = vendor
    trims = sorted((n, fx["name"], sorted(fx["args"].items())) for n, info in (data.get("native_packages") or {}).items()
                   for fx in info.get("sdist_fixers", ()) if fx.get("args"))
    if trims:  # --trim-kernels: fewer kernels compiled is another image (absent: records made before stay valid)
        decided["trimmed"] = trims
    git = data.get("git_packages") or {}
    if git:  # another commit of a package from git is another image
        decided["git_packages"] = sorted((n, g["url"], g["commit"], g.get("subdirectory", ""), g.get("build", "pip"))
                                         for n, g in git.items())
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()


def cell_name(request: dict) -> str:
    return f"{request['model']}-{request['card'].replace(',', '+')}-py{request.get('python') or 'default'}"


def load(path: Path | None = None) -> list[dict]:
    """Every record (built-in and user catalog); a malformed one is an error naming its file."""
    records = []
    files = sorted(path.glob("*.json")) if path else [f for d in folders() for f in sorted(d.glob("*.json"))]
    for file in files:
        try:
            rec = json.loads(file.read_text())
            shapes = {"request": dict, "digest": str, "verdict": str, "levels": dict, "date": str}
            wrong = [k for k, kind in shapes.items() if not isinstance(rec[k], kind)]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} of the wrong type")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise BadInput(f"{file}: not a ledger record ({exc})", "rerun make verify for that cell") from None
        rec["_file"] = str(file)
        records.append(rec)
    return records


def status(plan, request: dict, records: list[dict] | None = None) -> str:
    """'verified (DATE)', 'FAILED (DATE): reason', 'stale since DATE' or 'not verified' for this request."""
    records = load() if records is None else records
    same = [r for r in records if _same_request(r["request"], request)]
    if not same:
        cards = set(request["card"].split(","))
        near = [r for r in records if r["request"]["model"] == request["model"]
                and cards & set(r["request"]["card"].split(","))]
        if not near:
            return "not verified"
        return "not verified; the ledger holds only " + "; ".join(
            f"{_word(r)} {r['date']} as {_covers(r)}" for r in sorted(near, key=lambda r: r["date"]))
    rec = max(same, key=lambda r: r["date"])
    if rec["digest"] != digest(plan):
        return f"stale: the Plan changed since it was verified on {rec['date']}"
    if rec["verdict"] != PASSED:
        return f"FAILED on {rec['date']}: {rec.get('failure', '')}"
    return f"verified on {rec['date']} ({', '.join(k for k, v in rec['levels'].items() if v == 'passed')})"


def request_flags(request: dict) -> str:
    """The flags of the exact request a record covers: --card a800 --python 3.11 --cuda 11.8 --torch-index none."""
    parts = [f"--card {request['card']}"]
    for key, flag in (("python", "--python"), ("cuda", "--cuda"), ("torch_index", "--torch-index")):
        if request.get(key):
            parts.append(f"{flag} {request[key]}")
    if request.get("trim_kernels"):
        parts.append("--trim-kernels")
    return " ".join(parts)


def _mode(rec: dict, plan=None) -> str:
    """upstream or port: today's Plan's mode, else what the record's Plan deviated (a port deviates)."""
    if plan is not None:
        return plan.mode
    return "port" if (rec.get("plan") or {}).get("deviations") else "upstream"


def _covers(rec: dict, plan=None) -> str:
    return f"the {_mode(rec, plan)} of {request_flags(rec['request'])}"


def _word(rec: dict) -> str:
    return "verified" if rec["verdict"] == PASSED else "FAILED"


def _same_request(a: dict, b: dict) -> bool:
    keys = ("model", "card", "python", "cuda", "torch_index", "trim_kernels")
    return all((a.get(k) or None) == (b.get(k) or None) for k in keys)


def write(plan, request: dict, image: dict, audit_ok: bool | None, smoke_report: dict | None,
          failure: str = "", path: Path | None = None, model=None) -> Path:
    """The record of one verification, passed or not (a failure is recorded with its reason)."""
    levels = {k: v.get("status") for k, v in ((smoke_report or {}).get("levels") or {}).items()}
    model_level = ((smoke_report or {}).get("levels") or {}).get("model") or {}
    passed = not failure and audit_ok and levels.get("env") == "passed" and levels.get("model") == "passed"
    rec = {
        "request": request, "digest": digest(plan), "date": date.today().isoformat(),
        "verdict": PASSED if passed else "failed", "failure": failure,
        "image_id": image.get("image_id"), "image_size_bytes": image.get("size_bytes"),
        "build_seconds": image.get("build_seconds"),
        "machine": _machine(),  # what the stage times were measured on (estimate.py scales by it)
        "stages": [{"step": s["step"], "seconds": s["seconds"], "cached": s["cached"],
                    **{k: s[k] for k in ("from_log", "ccache") if s.get(k)}} for s in image.get("run_steps", [])],
        "audit": "passed" if audit_ok else ("failed" if audit_ok is False else "not run"),
        "levels": levels, "parameters": model_level.get("parameters"), "train_step": model_level.get("step"),
        "plan": {"torch": plan.torch.version, "cuda": plan.cuda, "python": plan.python.version,
                 "arch_list": plan.arch_list, "index_cutoff": plan.index_cutoff,
                 "deviations": plan.deviations},
    }
    out = (path or folder(model)) / f"{cell_name(request)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return out


def _machine() -> dict:
    from .estimate import this_machine
    return this_machine()


def plan_for_record(cat, rec: dict):
    """Today's Plan for the request a record was made for."""
    from .config import Sources
    from .resolve import resolve
    req = rec["request"]
    index = req.get("torch_index")
    sources = Sources(torch_index=None if index in (None, "none") else index)
    return resolve(cat, req["model"], req["card"], cuda=req.get("cuda"), python=req.get("python"), sources=sources,
                   trim_kernels=bool(req.get("trim_kernels")))


def marks(cat, request: dict | None = None) -> dict:
    """{(model, card): mark} for `matrix`, from the newest record of each cell: 'verified',
    'FAILED' or 'stale' when the record covers exactly the cell's request ({python, cuda,
    torch_index}; model and card are the cell's), else the same word and the exact request it
    covers and whether that is a port: 'verified only as the port of --card a800 --python 3.11 ...'."""
    out, newest = {}, {}
    for rec in sorted(load(), key=lambda r: r["date"]):
        for card in rec["request"]["card"].split(","):
            newest[(rec["request"]["model"], card)] = rec
    for (model, card), rec in newest.items():
        req = rec["request"]
        plan = None
        try:
            plan = plan_for_record(cat, rec)
        except BadInput:
            word = "stale"
        else:
            word = "stale" if digest(plan) != rec["digest"] else _word(rec)
        cell = {**(request or {}), "model": model, "card": card}
        same = request is not None and _same_request(req, cell)
        out[(model, card)] = word if same else f"{word} only as {_covers(rec, plan)}"
    return out


def with_cold_times(plan, summary: dict) -> dict:
    """A step this build found in the cache took no time here: record what it took in the newest
    build of this context that ran it (that log named), so the record says what the cell costs
    to build cold. Steps match by their command, not their stage index (which shifts)."""
    from .build import parse_progress, run_steps, state_dir
    steps = [dict(s) for s in summary.get("run_steps", [])]
    wanted = {_command(s["step"]) for s in steps if s["cached"]}
    found: dict[str, dict] = {}  # command -> that step as the log's build ran it, with the log named
    for log in sorted((state_dir() / "logs").glob(f"{plan.model}-{plan.card}-*.log"), reverse=True):
        if not wanted - found.keys():
            break
        for ran in run_steps(parse_progress(log.read_text(errors="replace").splitlines())):
            key = _command(ran["step"])
            if key in wanted and key not in found and not ran["cached"] and ran["seconds"] is not None:
                found[key] = dict(ran, from_log=str(log))
    for step in steps:
        if step["cached"] and _command(step["step"]) in found:
            ran = found[_command(step["step"])]
            step.update({k: ran[k] for k in ("seconds", "from_log", "ccache") if k in ran})
    return dict(summary, run_steps=steps, build_seconds=round(sum(s["seconds"] or 0 for s in steps), 1))


def _command(step_name: str) -> str:
    """'[builder  3/16] RUN pip install x' -> 'RUN pip install x'."""
    return step_name.split("] ", 1)[-1].strip()
