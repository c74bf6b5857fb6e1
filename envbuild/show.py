"""Presentation: rich tables and plain text for the CLI. No decisions here.

Each command hands its result to one function here; `as_json` prints it as JSON on stdout instead.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.markup import escape as e
from rich.table import Table

from .smoke import LEVELS



def _width(stream) -> int | None:
    """A terminal's own width (or COLUMNS); unlimited for a pipe or a file, so that a table's
    cells are never folded where `grep` or a script reads them (rich would assume 80 columns)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else UNWRAPPED


UNWRAPPED = 100_000  # columns for output that is not a terminal: wider than any table envbuild prints
out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    # cells quote labels, tags and reasons from images and the daemon: control sequences shown escaped
    t = Table(title=e(printable(title)), title_justify="left", show_lines=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*[e(printable(str(c), keep_newlines=True)) for c in row])
    out.print(t)


def plan(p) -> None:
    """Print a Plan: every pin with its reason, deviations marked."""
    head = "PORT" if p.mode == "port" else "UPSTREAM"
    out.print(f"[bold]{e(p.model)}[/] on [bold]{e(p.card_name)}[/] (compute capability {p.cc_text}): "
              f"[bold]{head}[/]{' (strict)' if p.strict else ''}")
    out.print(f"  cards       {', '.join(p.cards)}  [dim]# {e(p.cards_why)}[/]")
    out.print(f"  source      {p.repo} @ {p.commit[:12]}", markup=False)
    out.print(f"  base image  {p.base_image}  [dim]# {e(p.base_why)}[/]")
    out.print(f"  CUDA        {p.cuda}  [dim]# {e(p.cuda_why)}[/]")
    out.print(f"  gcc         {p.gcc} (nvcc accepts <= {p.gcc_max}); extensions built as C++{p.cxx}")
    out.print(f"  driver      >= {p.min_driver} (>= {p.compat_driver} with minor-version compatibility)")
    out.print(f"  compile     torch.compile {'yes' if p.torch_compile else 'no'}: {p.torch_compile_why}")
    out.print(f"  torch index {p.torch_index or 'plain PyPI'}")
    out.print(f"  PyPI as of  {p.index_cutoff or 'today'}  [dim]# {e(p.index_cutoff_why)}[/]")
    t = Table(show_header=True, box=None, pad_edge=False)
    for col in ("", "package", "pin", "upstream", "why"):
        t.add_column(col, overflow="fold")
    for pin in p.pins:
        mark = "[yellow]*[/]" if pin.deviation else ("[cyan]+[/]" if pin.source == "era" else "")
        t.add_row(mark, e(pin.name), e(pin.version or "(lock)"), e(pin.upstream or "-"), e(pin.why))
    out.print(t)
    out.print(f"  TORCH_CUDA_ARCH_LIST={p.arch_list}  [dim]# {e(p.arch_why)}[/]")
    for name in p.compiled:  # each compiled package: a vendor's wheel or a source build, and why
        build = p.native_packages.get(name, {}).get("build") or {}
        how = "vendor wheel" if build.get("from") == "vendor" else "source build"
        out.print(f"  {how:<11} {name}  [dim]# {e(build.get('why', ''))}[/]")
        for fx in p.native_packages.get(name, {}).get("sdist_fixers", ()):  # its sdist's fixers: a port, a trim
            args = "".join(f" {k}={v}" for k, v in sorted((fx.get("args") or {}).items()))
            out.print(f"  sdist fixer {name}: {fx['name']}{args}: {fx['why']}", markup=False)
    for name, g in sorted(p.git_packages.items()):  # fetched and built at build time, pinned by commit
        where = f"#subdirectory={g['subdirectory']}" if g.get("subdirectory") else ""
        out.print(f"  from git    {name}: {g['url']}@{g['commit']}{where} ({g['build']})", markup=False)
    for ext in p.extensions:
        out.print(f"  extension   {ext.name}: {ext.path} ({' '.join(ext.build)})", markup=False)
    for fx in p.fixers:
        out.print(f"  fixer       {fx.name}: {fx.why}", markup=False)
    for name, env in p.runtime_env.items():
        out.print(f"  runtime     {name}={env['value']}  [dim]# in the image: {e(env['why'])}[/]")
    for text in host_settings(p):
        out.print(f"  on host     {e(text)}")
    for note in p.notes:
        out.print(f"  note        {note}", markup=False)
    if p.deviations:
        out.print(f"[yellow]* {len(p.deviations)} deviation(s) from upstream[/]; [cyan]+[/] era pin for what upstream left open")


def printable(text: str, keep_newlines: bool = False) -> str:
    """Control characters from arguments or files shown escaped: a newline cannot forge a line."""
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in str(text))


def error(exc) -> None:
    # Bad input is one line (it quotes what the user typed).
    # A failed build keeps its excerpt's lines, indented: no line of it can pass for a hint: line.
    message = printable(exc.message, keep_newlines=exc.exit_code == 1).replace("\n", "\n  ")
    err.print(f"[red]error:[/] {e(message)}")
    for line in getattr(exc, "chain", None) or []:
        err.print(f"  - {printable(line)}", markup=False)
    if exc.hint:
        err.print(f"hint: {printable(exc.hint)}", markup=False)
    if exc.log:
        err.print(f"full log: {printable(exc.log)}", markup=False)


def line(text: str) -> None:
    """One line of plain text on stdout (no markup: names and paths print as they are; control
    sequences from labels, manifests and reports shown escaped)."""
    out.print(printable(text, keep_newlines=True), markup=False)


def dim(text: str) -> None:
    """Build and lock output, streamed on stderr."""
    err.print(printable(text, keep_newlines=True), markup=False, style="dim")


def note(text: str) -> None:
    """A step worth its own line, on stderr (stdout stays the result)."""
    err.print(printable(text, keep_newlines=True), markup=False)


def host_settings(p) -> list[str]:
    """What the image's launcher decides on the host at start, for people: one line per setting."""
    out = []
    for name, item in sorted(getattr(p, "host_env", {}).items()):
        if item.get("rule") == "no-p2p":
            cards = ", ".join(c["id"] for c in item.get("cards", ())) or "none"
            out.append(f"{name}: decided on the host at start (P2P off only where a pair of GPUs lacks it "
                       f"or a card has none: {cards}); a value you set is kept")
        else:
            out.append(f"{name}: decided on the host at start; a value you set is kept")
    return out


def plan_cards(p) -> None:
    """Which cards a Plan is for, and why; and what is decided on the host the image runs on."""
    line(f"for     {', '.join(p.cards)}  ({p.cards_why})")
    for name, env in p.runtime_env.items():
        line(f"env     {name}={env['value']} in the image ({env['why']})")
    for text in host_settings(p):
        line(f"host    {text}")


def catalog_models(cat, as_json: bool = False) -> None:
    rows = [{"name": m.name, "title": m.title, "python": m.python, "torch": f"{m.torch}", "cuda": m.cuda,
             "repo": m.repo, "commit": m.commit, "extensions": [x.name for x in m.extensions],
             "launcher": m.train.launcher, "description": m.description, "from": m.origin}
            for m in cat.models.values()]
    if as_json:
        return emit_json(rows)
    table("models", ["name", "python", "torch", "CUDA", "extensions", "launcher", "description", "from"],
          [[r["name"], r["python"], r["torch"], r["cuda"], ", ".join(r["extensions"]) or "-",
            r["launcher"], r["description"], r["from"]] for r in rows])


def catalog_cards(cat, as_json: bool = False) -> None:
    rows = [{"id": c.id, "name": c.name, "cc": c.cc, "memory_gb": c.memory_gb, "p2p": c.p2p,
             "aliases": list(c.aliases), "from": c.origin} for c in cat.cards.values()]
    if as_json:
        return emit_json(rows)
    table("cards", ["id", "name", "compute capability", "memory GB", "P2P", "aliases", "from"],
          [[r["id"], r["name"], r["cc"], r["memory_gb"], "yes" if r["p2p"] else "NO",
            ", ".join(r["aliases"]), r["from"]] for r in rows])


def base_plan(planned: dict, as_json: bool = False) -> None:
    """`envbuild base --dry-run`: what it would build, and for which cards."""
    if as_json:
        emit_json(planned)
        return
    line(f"{planned['tag']}  (CUDA {planned['cuda']} from {planned['source']}, on {planned['debian']} "
         f"debootstrapped from {planned['mirror']})")
    line(f"SASS for: {', '.join(planned['sass_cards']) or '(no catalog card)'}")
    line(planned["dockerfile"].rstrip("\n"))


def based(result: dict, as_json: bool = False) -> None:
    """What `envbuild base` made or reused, and which cards its nvcc compiles for."""
    if as_json:
        emit_json(result)
        return
    made = "built" if result["tag"] in result["made"] else "reused"
    line(f"{result['tag']}  ({made}; CUDA {result['cuda']} from {result['source']}, on {result['debian']})")
    line(f"SASS for: {', '.join(result['sass_cards']) or '(no catalog card)'}")
    if result["ptx_cards"]:
        line(f"PTX only (JIT-compiled at load): {', '.join(result['ptx_cards'])}")
    line(f"use it:   --base-image {result['tag']} --runtime-image {result['debian']}")


def resolved(p, verified: str, as_json: bool = False) -> None:
    if as_json:
        return emit_json({**p.to_dict(), "verified": verified})
    plan(p)
    line(f"  ledger      {verified}")


def matrix(cells, marks: dict, as_json: bool = False) -> None:
    if as_json:
        return emit_json([{**c.__dict__, "verified": marks.get((c.model, c.card), "")} for c in cells])
    names = list(dict.fromkeys(c.model for c in cells))
    ids = list(dict.fromkeys(c.card for c in cells))
    by = {(c.model, c.card): c for c in cells}
    rows = []
    for cid in ids:
        row = [cid]
        for m in names:
            c = by[(m, cid)]
            mark = f" [{marks[(m, cid)]}]" if (m, cid) in marks else ""
            row.append((c.status if c.status == "upstream" else f"{c.status}: {c.summary}") + mark)
        rows.append(row)
    table("models x cards", ["card", *names], rows)


def rendered(p, listing: dict, as_json: bool = False) -> None:
    if as_json:
        return emit_json(listing)
    line(f"rendered {p.model} for {p.card_name} ({p.mode}) into {listing['dir']}")
    plan_cards(p)
    for name in listing["files"]:
        line(f"  {name}")
    if not listing["locked"]:
        line(f"not locked yet: {listing['lock_command']} (envbuild image locks first by itself)")


def findings(found, as_json: bool = False) -> None:
    """Each finding; checked without a plan.json, also which Plans would apply it (only_when)."""
    when = [getattr(f, "only_when", None) for f in found]
    if as_json:
        emit_json([{**f.to_dict(), **({"only_when": w} if w else {})} for f, w in zip(found, when)])
    else:
        for f, w in zip(found, when):
            line(f"{f.path}:{f.line}: {f.fixer}: {f.why}" + (f"  [{w}]" if w else ""))
        line(f"{len(found)} finding(s); nothing changed")
        if any(when):
            line("checked without --plan: each applies only to the Plans named beside it; "
                 "envbuild fix --list --plan plan.json lists what a build of that Plan applies")
    fix_problems(found, as_json)


def fixes(report: dict, as_json: bool = False) -> None:
    if as_json:
        emit_json(report)
    else:
        for name, files in report.items():
            line(f"{name}: {len(files)} file(s) changed")
            for f in files:
                line(f"  {f}")
    fix_problems(report, as_json)


def fix_problems(result, as_json: bool = False) -> None:
    """The files the fixers could not read or write, one line each (on stderr beside JSON)."""
    for path, what, why in getattr(result, "problems", []):
        (note if as_json else line)(f"{what} {printable(path)}: {printable(why)}")


def locked(p, path, ctx, as_json: bool = False) -> None:
    if as_json:
        return emit_json({"lock": str(path), "torch_lock": str(ctx / "torch.lock"), "dir": str(ctx)})
    line(f"locked {p.model} for {p.card_name}: {path}")


def wheels(p, dest, made: list[dict], as_json: bool = False) -> None:
    if as_json:
        return emit_json({"dir": str(dest), "wheels": made})
    line(f"{len(made)} wheel(s) for {p.model} on {', '.join(p.cards)} in {dest}")
    for w in made:
        line(f"  {w['package']} {w['version']}  torch {w['torch']}, CUDA {w['cuda']}, Python {w['python']}, "
             f"arch {w['arch_list']}, {w['size_bytes'] / 1e6:.1f} MB, "
             + ("compiled now" if w["built_now"] else "from BuildKit's cache"))
    line(f"install: pip install --find-links {dest} <package>==<version>")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else (f"~{minutes} min" if minutes < 90 else f"~{seconds / 3600:.1f} h")


def estimate(cost: dict) -> None:
    """What the build will cost, before it starts: each compiled package, the rest, disk."""
    m = cost["machine"]
    line(f"estimate {_duration(cost['seconds'])} on {m['cores']} cores / {m['memory_gb']} GB, "
         f"{cost['disk_bytes'] / 1e9:.0f} GB of disk (image ~{cost['image_bytes'] / 1e9:.1f} GB plus its builder stages)")
    for st in cost["stages"]:
        line(f"  {_duration(st['seconds']):>9}  {st['package']}: {st['why']}")
        if st.get("trim"):
            t = st["trim"]
            line(f"  {'':>9}  with --trim-kernels {_duration(t['seconds'])}: {t['objects']} of its {t['of']} objects, "
                 "the kernels the model calls (its catalog entry says which)")
    line(f"  {_duration(cost['rest_seconds']):>9}  base, torch, deps and runtime stages (as the ledger measured them)")


def dry_run(result: dict, as_json: bool = False) -> None:
    """image --dry-run: the Plan, its cards, the Dockerfile's stages and the estimate; nothing built."""
    if as_json:
        return emit_json({"plan": result["plan"].to_dict(), "image": result["image"], "stages": result["stages"],
                          "compiled": result["compiled"], "estimate": result["estimate"]})
    plan(result["plan"])
    line(f"image   {result['image']} (dry run: nothing built, locked or written)")
    line(f"stages  {', '.join(result['stages'])}")
    estimate(result["estimate"])


def building(ref: str, p, ctx) -> None:
    line(f"building {ref} ({p.mode}) from {ctx}")


def image(summary: dict, as_json: bool = False) -> None:
    """What `envbuild image` built: id, tags, size and time, each RUN step, pushes, lock and log."""
    if as_json:
        return emit_json(summary)
    line(f"image   {summary['image_id']}")
    for t in summary["tags"]:
        line(f"tag     {t}")
    line(f"size    {summary['size_bytes'] / 1e9:.2f} GB   build {summary['build_seconds']:.0f}s   "
         f"cache hits {summary['cached_steps']}/{summary['steps']} steps")
    for step in summary["run_steps"]:
        state = "cached" if step["cached"] else f"{step['seconds'] or 0:.1f}s"
        line(f"  {state:>8}  {step['step'][:110]}")
    for ref, digest in summary.get("pushed", {}).items():
        line(f"pushed  {ref}@{digest}")
    line(f"lock    {summary['lock']}")
    line(f"log     {summary['log']}")


def verified(result, as_json: bool = False) -> None:
    if as_json:
        return emit_json({"record": str(result.record) if result.record else None, "status": result.status})
    line(f"{result.plan.model} on {', '.join(result.plan.cards)}: {result.status}")
    line(f"record  {result.record}" if result.record else
         "record  none written: a build stopped at its time limit is no verdict on the cell (the ledger is as it was)")


def pushed(ref: str, digest: str, as_json: bool = False) -> None:
    if as_json:
        return emit_json({"image": ref, "digest": digest})
    line(f"pushed {ref}@{digest}")


def pulled(result: dict, as_json: bool = False) -> None:
    if as_json:
        return emit_json(result)
    line(f"pulled {result['image']} ({result['id']})")
    line(f"driver: {result['driver']}: {result['driver_reason']}")
    for card_id, verdict in result["validated"].items():
        line(f"validated for {card_id}: {verdict}")


def images(rows: list[dict], as_json: bool = False) -> None:
    if as_json:
        return emit_json(rows)
    if not rows:
        return line("no envbuild images in the local engine yet: build one with envbuild image MODEL (or envbuild pull, load)")
    table("envbuild images", ["id", "tags", "model", "card", "mode", "torch", "CUDA", "arch", "size GB"],
          [[r["id"], "\n".join(r["tags"]) or "<untagged>", r["model"], r["card"], r["mode"], r["torch"],
            r["cuda"], r["arch_list"], f"{r['size_bytes'] / 1e9:.2f}"] for r in rows])


def audit(ref: str, reports: list[dict], as_json: bool = False) -> None:
    """Per card: each library's SASS/PTX and what runs it; warnings on stderr; the verdict."""
    if as_json:
        return emit_json(reports[0] if len(reports) == 1 else reports)
    for report in reports:
        table(f"{ref} on {report['card_name']} ({report['cc']})", ["library", "kind", "SASS", "PTX", "runs via"],
              [[lib["path"], lib["kind"], " ".join(lib["sass"]) or "-", " ".join(lib["ptx"]) or "-", lib["via"] or "NOTHING"]
               for lib in report["libraries"]])
        for warning in report["warnings"]:
            err.print(f"warning: {printable(warning)}", markup=False)
        line(f"all {len(report['libraries'])} libraries with GPU code run on {report['card_name']}" if report["ok"]
             else f"FAILS on {report['card_name']}: " + "; ".join(report["failures"]))


def smoke(report: dict, path=None, as_json: bool = False) -> None:
    """A smoke report: one line per level, the problems under it, and where the report was written."""
    if as_json:
        return emit_json(report)
    env = report.get("environment", {})
    line(f"{report['image']} on {', '.join(env.get('gpus') or []) or 'no GPU (CPU levels only)'}")
    for name in [lv for lv in LEVELS if lv in report["levels"]]:
        lvl = report["levels"][name]
        line(f"  {name:6} {lvl['status']:8} {_level_detail(name, lvl)}")
        for problem in _smoke_findings(lvl):
            line(f"         {problem}")
    if report.get("recorded_in"):
        line(f"recorded for {report['card']} in the image's label ({report['image']} is now {report['recorded_in'][:19]})")
    if path:
        line(f"report: {path}")


def _level_detail(name: str, lvl: dict) -> str:
    detail = lvl.get("reason", "")
    if name == "train" and lvl.get("runs"):
        detail = "; ".join(_train_summary(rname, lvl["runs"][rname])
                           for rname in ("synthetic", "synthetic_compiled", "model") if rname in lvl["runs"])
    if name == "io" and lvl.get("status") == "passed":
        detail = f"checkpoint {lvl['size_mb']} MB: write {lvl['write_MBps']} MB/s, read {lvl['read_MBps']} MB/s"
    if name == "env" and "packages" in lvl:
        detail = (f"{len(lvl['packages'])} packages, {len(lvl.get('extensions', []))} compiled extensions loaded; "
                  f"{lvl.get('failed', 0)} failed")
        if lvl.get("optional_failures"):
            detail += f"; {len(lvl['optional_failures'])} outside the Plan did not load (not needed by it)"
    if name == "model" and lvl.get("status") == "passed":
        detail = f"{lvl['object']} built from the model's own code: {lvl['parameters']:,} parameters"
        if lvl.get("step"):
            detail += (f"; training step on a synthetic batch: loss {lvl['step']['loss']:.4g}, "
                       f"{lvl['step']['grads']} parameters got gradients")
    if name == "comm" and lvl.get("works_with"):
        detail = f"all-reduce over {lvl['gpus']} GPU(s) works with {lvl['works_with']}"
    if name == "ops" and lvl.get("checks"):
        detail = f"{sum(c['ok'] for c in lvl['checks'])}/{len(lvl['checks'])} op checks match their reference"
    return detail


def _train_summary(name: str, run: dict) -> str:
    label = {"synthetic": "synthetic", "synthetic_compiled": "torch.compile", "model": "model recipe"}[name]
    if run.get("status") != "passed":
        return f"{label}: {run.get('status')}" + (f" ({run['reason']})" if run.get("reason") else "")
    if name == "synthetic":
        return (f"synthetic: {run['samples_per_s']} samples/s, step {run['step_time_s']}s, "
                f"data wait {run['data_wait_share']:.0%}, loss {run['first_loss']:.3f} -> {run['last_loss']:.3f}")
    if name == "synthetic_compiled":
        return f"torch.compile: {run.get('speedup_vs_eager')}x eager samples/s"
    return f"model recipe: passed in {run.get('wall_s')}s ({run.get('steps')} steps)"


def _smoke_findings(lvl: dict) -> list[str]:
    """The lines under a level that say what went wrong, or what was not checked."""
    found = [f"{p['name']}: {'; '.join(p['problems'])}" for p in lvl.get("packages", []) if not p.get("ok")]
    found += [f"{x['path']}: {x['error']}" + ("" if x.get("required", True) else " (outside the Plan: reported only)")
              for x in lvl.get("extensions", []) if x.get("ok") is False]
    found += list(lvl.get("problems") or [])
    found += [f"{c['op']}: {c['detail']}" for c in lvl.get("checks", []) if not c["ok"]]
    found += [f"{a['setting']}: {a.get('error', '').strip()[-200:]}" for a in lvl.get("attempts", []) if not a["ok"]]
    if lvl.get("unchecked"):
        found.append(f"no op check ran on: {', '.join(lvl['unchecked'])}")
    return found


def doctor(results, as_json: bool = False) -> None:
    if as_json:
        return emit_json([r.__dict__ for r in results])
    table("envbuild doctor", ["check", "status", "reason"], [[r.name, r.status, r.reason] for r in results])


def exported(result: dict, format_: str, as_json: bool = False) -> None:
    if as_json:
        return emit_json(result)
    line(f"archive   {result['archive']} ({result['bytes'] / 1e9:.2f} GB, sha256 {result['sha256'][:16]}...)")
    line(f"manifest  {result['manifest']}")
    if format_ == "apptainer":
        line(f"apptainer {result['definition']}")
        line(f"sif       {result['sif'] or result.get('sif_note')}")


def loaded(result: dict, as_json: bool = False) -> None:
    if as_json:
        return emit_json(result)
    line(f"checksum ok; loaded {', '.join(result['loaded'])} ({', '.join(result['tags'])})")


def baked(path, doc: dict, skipped: list[dict], parallel: int, built: dict | None = None, as_json: bool = False) -> None:
    """The bake file written: its targets, shared bases and waves, the cells left out and why;
    with built (bake --build), each wave's time and compiles, and the images it made."""
    if as_json:
        return emit_json({"file": str(path), "bake": doc, "skipped": skipped, "built": built})
    targets = [n for n, t in doc["target"].items() if t.get("target") == "runtime"]
    waves = [g for g in doc["group"] if g.startswith("wave-")]
    line(f"wrote {path}: {len(targets)} image target(s), {len(doc['group']['bases']['targets'])} shared base(s), "
         f"{len(waves)} wave(s) of <= {parallel}")
    for s_ in skipped:
        line(f"  skipped {s_['model']} on {s_['card']}: {s_['reason']}")
    if built is None:
        then = " (then wave-2, ...)" if len(waves) > 1 else ""
        line(f"build: docker buildx bake -f {path} wave-1{then}, or `all` on a big builder; here: the same bake with --build")
        return
    if built.get("one_at_a_time"):
        note(built["one_at_a_time"])
    for wave in built["waves"]:
        ran = [s for s in wave["run_steps"] if not s["cached"]]
        line(f"  {wave['group']}: {wave['seconds']:.0f} s, {len(ran)} step(s) run, "
             f"{len(wave['run_steps']) - len(ran)} from cache (builder driver: {built['driver']})")
    for name, image in built["images"].items():
        line(f"  {name}: {image['tag']}" + (f" ({image['image_id'][:19]})" if image["image_id"] else " (pushed)"))


def added(d, as_json: bool = False) -> None:
    """envbuild add: the file written (or, on a dry run, the entry itself), what it could not
    decide as questions naming the file and key to edit, and the command to run next."""
    if as_json:
        return emit_json(d.to_dict())
    if d.dry_run:
        sys.stdout.write(printable(d.text, keep_newlines=True))
        note(f"dry run: nothing written; {len(d.questions)} question(s) in the comments above")
        return
    line(f"wrote {d.path}")
    line(f"  {d.name}: {d.repo} @ {d.commit[:12]}, era {d.era or '(none)'}; torch {d.torch} + CUDA {d.cuda}, "
         f"Python {d.python}")
    line(f"  {len(d.packages)} package(s), {len(d.extensions)} CUDA extension(s)"
         + (f", vendored {', '.join(d.vendored)}" if d.vendored else "")
         + (f", construct {d.construct['kind']}" if d.construct else ", no construct recipe"))
    for f in d.fixers:
        line(f"  fixer {f['fixer']}: {f['files']} file(s), first {f['first']}")
    if d.questions:
        line(f"questions ({len(d.questions)}): edit {d.path}")
        for q in d.questions:
            line(f"  {q.key}: {q.question}" + (f"  [{q.found}]" if q.found and q.found not in q.question else ""))
    line(f"next: {d.next_command}")
