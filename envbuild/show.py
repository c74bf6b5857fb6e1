"""Presentation: rich tables and plain text for the CLI. No decisions here."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape as e
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*[e(str(c)) for c in row])
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
    if p.compiled:
        out.print(f"  compiled from source: {', '.join(p.compiled)}", markup=False)
    for ext in p.extensions:
        out.print(f"  extension   {ext.name}: {ext.path} ({' '.join(ext.build)})", markup=False)
    for fx in p.fixers:
        out.print(f"  fixer       {fx.name}: {fx.why}", markup=False)
    for name, env in p.runtime_env.items():
        out.print(f"  runtime     {name}={env['value']}  [dim]# {e(env['why'])}[/]")
    for note in p.notes:
        out.print(f"  note        {note}", markup=False)
    if p.deviations:
        out.print(f"[yellow]* {len(p.deviations)} deviation(s) from upstream[/]; [cyan]+[/] era pin for what upstream left open")


def printable(text: str, keep_newlines: bool = False) -> str:
    """Control characters from arguments or files shown escaped: a newline cannot forge a line."""
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in str(text))


def error(exc) -> None:
    # Bad input is one line (it quotes what the user typed); a failed build keeps its excerpt's lines.
    err.print(f"[red]error:[/] {e(printable(exc.message, keep_newlines=exc.exit_code == 1))}")
    for line in getattr(exc, "chain", None) or []:
        err.print(f"  - {printable(line)}", markup=False)
    if exc.hint:
        err.print(f"hint: {printable(exc.hint)}", markup=False)
    if exc.log:
        err.print(f"full log: {printable(exc.log)}", markup=False)
