"""Rich rendering of the diagnostics reports (kept apart from the logic that builds them)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from relay365.diagnostics.spf import SpfReport


def render_spf(report: SpfReport, console: Console) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Recommended", escape(report.recommended))
    if report.domain is not None:
        table.add_row("Domain", escape(report.domain))
        for record in report.existing or ("(none published)",):
            table.add_row("Published", escape(record))
        table.add_row("Publish this", f"[bold green]{escape(report.proposed)}[/]")
        if report.added:
            table.add_row("Added", escape(" ".join(report.added)))
        table.add_row("DNS lookups", f"{report.lookups} (limit 10)")
        table.add_row("IP now", f"SPF {report.current_result} for {report.ip}")
        for warning in report.warnings:
            table.add_row("[yellow]Warning[/]", escape(warning))
    console.print(Panel(table, title=f"relay365 spf --ip {report.ip}", border_style="cyan"))
