"""Plain-text tables for the console: the shard build summary and the eval scores."""


def align_columns(rows: list) -> str:
    """Rows of strings (the first is the header) as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
