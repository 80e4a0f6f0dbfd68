"""Bench output: the terminal table (rich), the JSON file and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from dflash_vllm.training.data import atomic_write_text


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    concs = [str(c) for c in results["config"]["concurrency"]]
    for c in concs:
        row = [c]
        for mode in ("baseline", "builtin", "plugin-fixed", "plugin"):
            m = results["modes"].get(mode, {}).get("by_concurrency", {}).get(c)
            row.append("-" if m is None else f"{m['tokens_per_s']:.1f}")
            if mode != "baseline":
                row.append("-" if m is None or m["tau"] is None else f"{m['tau']:.2f}")
        for table, key in RATIO_COLUMNS:
            r = results.get(table, {}).get(key, {}).get(c)
            row.append("-" if not r or r["median"] is None else f"{r['median']:.2f}x")
        rows.append(row)
    return rows


RATIO_COLUMNS = (("ratios", "plugin/baseline"), ("ratios", "plugin/builtin"), ("ratios", "plugin/plugin-fixed"),
                 ("full_load_ratios", "plugin/baseline"), ("full_load_ratios", "plugin/builtin"))
HEADER = ["conc.", "baseline tok/s", "builtin tok/s", "builtin tau", "fixed tok/s", "fixed tau",
          "adaptive tok/s", "adaptive tau", "adaptive/baseline", "adaptive/builtin", "adaptive/fixed",
          "full load: adaptive/baseline", "full load: adaptive/builtin"]


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dflash-vllm bench (T={results['config']['temperature']}, "
                        f"max_tokens={results['config']['max_tokens']}, {results['machine'].get('cpu') or ''})")
    for h in HEADER:
        table.add_column(h, justify="right")
    for row in table_rows(results):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for mode, err in results["errors"].items():
        console.print(f"[red]mode {mode} failed:[/red] {err.splitlines()[0] if err else ''}")


def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(results, indent=2) + "\n")


def write_plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = results["config"]["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, m in results["modes"].items():
        ax1.plot(concs, [m["by_concurrency"][str(c)]["tokens_per_s"] for c in concs], marker="o", label=mode)
        per_pos = m["by_concurrency"][str(concs[0])].get("per_position_acceptance")
        if per_pos:  # speculative modes only
            ax2.plot(range(1, len(per_pos) + 1), per_pos, marker="o", label=f"{mode} (conc. {concs[0]})")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent requests")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput")
    ax1.legend()
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance rate (unconditional)")
    ax2.set_ylim(0, 1)
    ax2.set_title("per-position acceptance")
    ax2.legend()
    fig.suptitle(f"dflash-vllm bench, T={results['config']['temperature']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
