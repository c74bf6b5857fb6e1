"""What every compiled-package building block answers; the resolver, the renderer, bake and
the in-image checks ask these questions and nothing else about a package family."""

from __future__ import annotations

from dataclasses import dataclass

from ..catalog import V, Card, Catalog, TorchRelease, Toolkit, is_exact
from ..errors import unknown
from ..incontainer.archrules import code_name, runs_on
from ..plan import Pin


@dataclass(frozen=True)
class Target:
    """The stack a block chooses a pin for: one candidate (Python, torch build) on one card."""
    cat: Catalog
    torch: TorchRelease
    cuda: str  # CUDA of the torch build
    toolkit: Toolkit  # the nvcc that compiles
    card: Card
    python: str
    strict: bool  # upstream pins only
    vendor_wheels: bool = True  # vendors' prebuilt wheels may be fetched (not air-gapped, no --compile)


class Block:
    """One family of packages with native code.

    choose() returns the Pin, or the reason no version of the family fits the target (a str).
    """

    family = ""
    compiled = True  # compiled from its sdist in a wheel stage of its own (False: a prebuilt wheel)
    gb_per_job = 2  # builder memory one compile job needs, for one arch
    nvcc_threads = 1  # archs one job compiles at once (its setup.py's nvcc --threads): each needs gb_per_job

    def job_gb(self, archs: int) -> int:
        """Builder memory one compile job needs for a Plan of this many archs."""
        return self.gb_per_job * max(1, min(archs, self.nvcc_threads))
    build_env: dict = {}  # environment its build needs
    op_check: str | None = None  # the in-image op check (incontainer/op_checks.OP_CHECKS) of its import
    also_covers: tuple = ()  # compiled modules outside its import name that its op check exercises

    def owns(self, cat: Catalog, name: str) -> bool:
        raise NotImplementedError

    def choose(self, target: Target, name: str, spec: str, forced: str | None) -> Pin | str:
        raise NotImplementedError

    def import_name(self, name: str) -> str:
        return name.replace("-", "_")

    def check_override(self, cat: Catalog, name: str, version: str) -> None:
        """--set NAME==VERSION must name a version the catalog has facts about."""

    def cxx(self, cat: Catalog, pin: Pin) -> int:
        """The C++ standard its build needs (0: whatever torch's headers need)."""
        return 0

    def origin(self, target: Target, pin: Pin) -> dict:
        """Where its wheel comes from: {"from": "vendor", "why", "find_links", "sass", "ptx"} when a
        vendor's prebuilt wheel carries code for every card (its kernels are audited in the build
        before it is used), else {"from": "source", "why"}."""
        vendor = target.cat.vendor.get(pin.name)
        if vendor is None:
            return {"from": "source", "why": f"the catalog knows no vendor wheels of {pin.name}"}
        build = next((b for b in vendor.builds
                      if b.serves(pin.version, target.torch.version, target.cuda, target.python)), None)
        stack = f"torch {target.torch.version}, CUDA {target.cuda}, Python {target.python}"
        if build is None:
            return {"from": "source", "why": f"no vendor wheel of {pin.name} {pin.version} for {stack}"}
        arch = runs_on(build.sass, target.card.cc, build.ptx)
        if arch is None:
            return {"from": "source", "why": f"the vendor's {pin.name} {pin.version} wheel carries SASS "
                    f"{', '.join(build.sass)}{' PTX ' + ', '.join(build.ptx) if build.ptx else ''}: "
                    f"nothing runs on {target.card.name} ({target.card.cc})"}
        if not target.vendor_wheels:
            return {"from": "source", "why": f"a vendor wheel exists for {stack}, but vendor wheels are off "
                    "(--compile, or vendor_wheels = false: an air-gapped builder)"}
        return {"from": "vendor", "find_links": vendor.url(target.torch.version, target.cuda),
                "sass": list(build.sass), "ptx": list(build.ptx),
                "why": f"the vendor's wheel for {stack} carries {code_name(arch)} for {target.card.cc}; "
                       "its kernels are audited for the card before it is installed"}

    def sdist_fixers(self, cat: Catalog, pin: Pin, torch: str) -> list[dict]:
        """Porting fixers run on the sdist in its wheel stage, [{"name", "why"}]: none by default."""
        return []

    def trim_fixers(self, cat: Catalog, pin: Pin, model) -> list[dict]:
        """--trim-kernels: sdist fixers that compile only the kernels the model calls (as sdist_fixers
        gives them, with "args"): none by default."""
        return []

    def objects(self, cat: Catalog, version: str, head_dims=()) -> int:
        """How many objects a release's wheel stage compiles (0: not counted); head_dims: of those
        alone (--trim-kernels)."""
        return 0

    def model_fixers(self, pin: Pin) -> list[tuple[str, str]]:
        """Porting fixers the model's own code needs where the Plan's release changed an API the
        upstream pin had, [(name, why)]: none by default."""
        return []

    def op_check_for(self, name: str) -> str | None:
        return self.op_check

    def in_image(self, name: str) -> dict:
        """What the in-image checks need to know, written into plan.json (they are stdlib-only)."""
        return {"module": self.import_name(name), "op_check": self.op_check_for(name),
                "also_covers": list(self.also_covers)}


class CatalogCompiled(Block):
    """A package compiled against torch whose releases and torch ranges are catalog facts
    (toolchains/packages.toml [compiled.NAME."VERSION"]): any such package, without code."""

    family = "compiled"

    def owns(self, cat, name):
        return name in cat.compiled

    def check_override(self, cat, name, version):
        if version not in cat.compiled[name]:
            raise unknown(f"{name} version", version, sorted(cat.compiled[name], key=V))

    def cxx(self, cat, pin):
        facts = cat.compiled.get(pin.name, {}).get(pin.version)
        return facts.cxx if facts else 0

    def choose(self, target, name, spec, forced):
        known = target.cat.compiled.get(name, {})
        rel = target.torch
        upstream = spec if is_exact(spec) else None
        if forced:
            facts = known.get(forced)
            if facts and not facts.builds_with(rel.version):
                if facts.port and not target.strict:  # its sdist is ported, as the resolver would
                    return Pin(name, forced, f"set with --set; {name} {forced} is ported: its sdist gets the fixers "
                               f"{', '.join(facts.port)} before it is compiled", upstream, "override")
                return f"{name} {forced} (--set) builds only with torch [{facts.torch[0]}, {facts.torch[1]}): {facts.notes}"
            return Pin(name, forced, "set with --set", upstream, "override")
        if upstream is None:  # unpinned upstream: the newest known release that builds with this torch
            fits = [c for c in known.values() if c.builds_with(rel.version)]
            if not fits:
                return f"no {name} release in the catalog builds with torch {rel.version}"
            best = max(fits, key=lambda c: V(c.version))
            return Pin(name, best.version, f"newest {name} that builds with torch {rel.version}", spec, "era")
        facts = known.get(upstream)
        if facts is None:
            return f"no facts about {name} {upstream} in toolchains/packages.toml"
        if facts.builds_with(rel.version):
            return Pin(name, upstream, f"upstream pin; builds with torch {rel.version}", upstream)
        chain = f"{name} {upstream} builds only with torch [{facts.torch[0]}, {facts.torch[1]}): {facts.notes}"
        if target.strict:
            return chain
        series = sorted((c for c in known.values() if c.series == facts.series and V(c.version) >= V(upstream)
                         and V(c.torch[0]) <= V(rel.version)), key=lambda c: V(c.version))
        builds = [c for c in series if c.builds_with(rel.version)]
        if builds:
            return Pin(name, builds[0].version,
                       f"{name} {upstream} cannot build with torch {rel.version} ({facts.notes}); "
                       f"{builds[0].version} is the smallest release that can", upstream, "port")
        ported = [c for c in series if c.port]
        if not ported:
            return f"{chain}; no later {name} of the same series builds with torch {rel.version}, and none has a port"
        # The newest release of the series is the one closest to this torch: fewest breaks to port.
        best = ported[-1]
        which = "" if best.version == upstream else " (the newest portable release of its series: closest to it)"
        return Pin(name, best.version,
                   f"no {name} of the series builds with torch {rel.version} ({facts.notes}); {name} {best.version}"
                   f"{which} is ported: its sdist gets the fixers {', '.join(best.port)} before it is compiled",
                   upstream, "port")

    def sdist_fixers(self, cat, pin: Pin, torch: str) -> list[dict]:
        """The porting fixers this pin's sdist needs to build with torch (none within its range)."""
        facts = cat.compiled.get(pin.name, {}).get(pin.version)
        if facts is None or facts.builds_with(torch) or not facts.port:
            return []
        from ..fixers import FIXERS
        return [{"name": f, "why": f"{pin.name} {pin.version} past torch {facts.torch[1]}: {FIXERS[f].why}"}
                for f in facts.port]
