"""flash-attn 2.x: compiled for the archs its own setup.py chooses (not TORCH_CUDA_ARCH_LIST),
so whether it runs on a card depends on nvcc, not on the Plan's arch list. The builder's nvcc
(incontainer/nvcc_archs.py) then drops those of its archs that no card of the Plan runs."""

from __future__ import annotations

from ..catalog import V, FlashAttn, is_exact, minor_key
from ..errors import unknown
from ..incontainer.archrules import code_name, runs_on
from ..plan import Pin
from .base import Block, Target


class FlashAttention(Block):
    family = "flash-attn"
    gb_per_job = 9  # its nvcc jobs are the hungry ones: fewer jobs, or the builder dies silently
    # Its setup.py passes nvcc --threads (2.3.2: 4; later: $NVCC_THREADS, default 2): one job compiles
    # two archs at once, and each cicc took 5.4 GB for the H20 + B200 kernels (CUDA 13, measured
    # here): two jobs of two archs ran a 24 GB builder out of memory.
    nvcc_threads = 2
    build_env = {"FLASH_ATTENTION_FORCE_BUILD": "TRUE"}  # no GitHub wheel download: compile for this card
    op_check = "flash_attn"
    also_covers = ("flash_attn_2_cuda", "flash_attn_cuda")

    def owns(self, cat, name):
        return name == "flash-attn"

    def check_override(self, cat, name, version):
        if version not in cat.flash_attn:
            raise unknown("flash-attn version", version, sorted(cat.flash_attn, key=V))

    def choose(self, target, name, spec, forced):
        cat, card = target.cat, target.card
        upstream = spec if is_exact(spec) else None
        if forced:
            fa = cat.flash_attn.get(forced)
            problem = fa and self.problem(fa, target)
            return problem + " (--set)" if problem else Pin(name, forced, "set with --set", upstream, "override")
        versions = sorted(cat.flash_attn, key=V)
        start = upstream or versions[0]
        if start not in cat.flash_attn:
            return f"no facts about flash-attn {start} in toolchains/packages.toml"
        problem = self.problem(cat.flash_attn[start], target)
        if problem is None:
            return Pin(name, start, f"upstream pin; has {code_name(card.cc)}-compatible kernels", upstream)
        if target.strict:
            return problem
        for v in versions:
            if V(v) > V(start) and self.problem(cat.flash_attn[v], target) is None:
                return Pin(name, v, f"{problem}; {v} is the smallest release that works", upstream, "port")
        return f"{problem}; no flash-attn 2.x release in the catalog fixes it"

    def objects(self, cat, version, head_dims=()):
        """Objects its wheel stage compiles: flash_api.cpp and one per kernel file, which every head
        dim has the same number of (dtypes, directions): with head_dims, theirs alone."""
        fa = cat.flash_attn.get(version)
        if not fa:
            return 0
        if not head_dims or not fa.head_dims or not fa.objects:
            return fa.objects
        return 1 + (fa.objects - 1) * len(head_dims) // len(fa.head_dims)

    def trim_fixers(self, cat, pin, model):
        fa = cat.flash_attn.get(pin.version)
        wanted = model.flash_attn_head_dims
        if not wanted or fa is None or not fa.head_dims:
            return []
        # a call's head dim runs the release's next kernel up (2.6 dropped 224: 224 runs 256)
        dims = sorted({min((k for k in fa.head_dims if k >= d), default=max(fa.head_dims)) for d in wanted})
        total, kept = self.objects(cat, pin.version), self.objects(cat, pin.version, dims)
        size = f": {kept} of its {total} objects" if kept and total else ""
        return [{"name": "flash-attn-head-dims", "args": {"dims": "+".join(map(str, dims))},
                 "why": f"--trim-kernels: {model.name} calls head dims {', '.join(map(str, dims))} only "
                        f"({model.flash_attn_why}); only their kernels are compiled{size}; a call with another "
                        "head dim raises 'compiled by envbuild for head dims ...'"}]

    # flash_attn.bert_padding.unpad_input returns a fifth value from 2.7.0 (read from PyPI's sdists:
    # 2.6.3 returns four, 2.7.0.post2 five); model code written for an older pin unpacks four.
    UNPAD_RETURNS_FIVE = "2.7"

    def model_fixers(self, pin):
        if V(pin.version) < V(self.UNPAD_RETURNS_FIVE) or (
                pin.upstream and is_exact(pin.upstream) and V(pin.upstream) >= V(self.UNPAD_RETURNS_FIVE)):
            return []
        was = f"upstream's {pin.upstream}" if pin.upstream and is_exact(pin.upstream) else "older releases"
        return [("flash-attn-unpad-input", f"flash-attn {pin.version}'s unpad_input returns five values (since "
                 f"{self.UNPAD_RETURNS_FIVE}); code written for {was} unpacks four: ValueError at the first "
                 "forward with a padding mask")]

    @staticmethod
    def problem(fa: FlashAttn, target: Target) -> str | None:
        """Why this release cannot run on the target, or None."""
        nvcc, card, py = target.toolkit.version, target.card, target.python
        if card.cc not in fa.runtime:
            return f"flash-attn {fa.version} runs only on compute capability {fa.runtime[0]}-{fa.runtime[-1]}; {card.name} is {card.cc}"
        if V(target.torch.version) < V(fa.min_torch):
            return f"flash-attn {fa.version} needs torch >= {fa.min_torch}"
        if minor_key(nvcc) < minor_key(fa.min_nvcc):
            return f"flash-attn {fa.version} needs nvcc >= {fa.min_nvcc}"
        if not (minor_key(fa.python[0]) <= minor_key(py) <= minor_key(fa.python[1])):
            return f"flash-attn {fa.version} supports Python {fa.python[0]}-{fa.python[1]}"
        sass = [a for a, need in fa.sass.items() if minor_key(nvcc) >= minor_key(need)]
        if runs_on(sass, card.cc) is None:
            need = [f"{code_name(a)} (nvcc >= {n})" for a, n in fa.sass.items()]
            return (f"flash-attn {fa.version} compiles {', '.join(need)} and ignores TORCH_CUDA_ARCH_LIST; "
                    f"with nvcc {nvcc} none runs on {card.cc}")
        return None
