"""Tables: plain-text columns for the console (shard build summary, eval scores, optimizer
groups) and markdown for reports (sweeps, scaling fits)."""


def align_columns(rows: list) -> str:
    """Rows of strings (the first is the header) as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def markdown_table(rows: list) -> str:
    """Rows of cells (the first is the header) as a markdown table."""
    lines = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in lines)
