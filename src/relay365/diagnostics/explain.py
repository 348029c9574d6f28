"""``relay365 explain``: turn a pasted reply, NDR line or code into meaning and fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from relay365.replies import ParsedReply, ReplyEntry, classify, is_transient, parse_reply


@dataclass(frozen=True, slots=True)
class Explanation:
    """What relay365 knows about one reply."""

    query: str
    parsed: ParsedReply
    entry: ReplyEntry | None
    transient: bool

    @property
    def verdict(self) -> str:
        return "transient: relay365 defers and retries" if self.transient else "permanent: relay365 bounces"

    def to_dict(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "query": self.query,
            "reply_code": self.parsed.basic,
            "enhanced_code": self.parsed.enhanced_str,
            "found": entry is not None,
            "transient": self.transient,
            "verdict": self.verdict,
            "entry": None
            if entry is None
            else {
                "code": entry.code,
                "protocol": entry.protocol,
                "typical_reply": entry.typical_reply,
                "category": entry.category.value,
                "meaning": entry.meaning,
                "fix": entry.fix,
                "retryable_5xx": entry.retryable,
                "source": entry.source,
            },
        }


def explain(text: str) -> Explanation:
    """Explain ``text`` (a reply line, an NDR line, a bare code)."""
    return Explanation(text, parse_reply(text), classify(text), is_transient(text))


def render(explanation: Explanation, console: Console) -> None:
    """Print an explanation as a rich panel."""
    entry = explanation.entry
    if entry is None:
        codes = explanation.parsed.enhanced_str or explanation.parsed.basic or "no code found"
        console.print(
            Panel(
                f"[bold]{codes}[/bold] is not in relay365's catalogue.\n"
                f"Rule applied: {explanation.verdict} (4yz transient, 5yz permanent).",
                title="relay365 explain",
                border_style="yellow",
            )
        )
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Code", escape(entry.code))
    table.add_row("Typical reply", escape(entry.typical_reply))
    table.add_row("Category", entry.category.value)
    table.add_row("Meaning", escape(entry.meaning))
    table.add_row("Fix", escape(entry.fix))
    table.add_row("relay365", explanation.verdict)
    table.add_row("Source", escape(entry.source))
    style = "yellow" if explanation.transient else "red"
    console.print(Panel(table, title=f"relay365 explain: {escape(explanation.query)}", border_style=style))
