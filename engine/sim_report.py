"""Print a ``fedlog simulate --json`` summary for people, optionally compared with another run.

``python -m engine.sim_report RUN.json [--compare OTHER.json]`` prints the summary
(and, for a federated-statistics result, a table of the combined statistics); with
``--compare`` it says whether both runs computed the same result and exits 1 if not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from engine.sim import format_summary

__all__ = ["describe_result", "main"]


def describe_result(result: Any, limit: int = 13) -> list[str]:
    """A short table of a federated-statistics result, or a model's hash and metrics."""
    if isinstance(result, dict) and "model_hash" in result:
        metrics = result.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        return [f"final model: blake3 {result['model_hash']}" + (f"; {shown}" if shown else "")]
    if not isinstance(result, dict) or not {"features", "mean", "variance"} <= set(result):
        return []
    lines = [f"{'feature':<30} {'mean':>12} {'variance':>14} {'min':>10} {'max':>10}"]
    rows = zip(result["features"], result["mean"], result["variance"], result.get("min", []),
               result.get("max", []), strict=False)
    for name, mean, var, lo, hi in list(rows)[:limit]:
        lines.append(f"{str(name)[:30]:<30} {mean:>12.4f} {var:>14.4f} {lo:>10.3f} {hi:>10.3f}")
    lines.append(f"({result.get('count')} rows over sites {', '.join(result.get('sites', []))}; "
                 "means and variances are exact fractions in the result)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.sim_report", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--compare", type=Path, help="another run of the same job")
    args = parser.parse_args(argv)
    summary = orjson.loads(args.run.read_bytes())
    print(format_summary(summary))
    for line in describe_result(summary.get("result")):
        print(line)
    if args.compare is None:
        return 0 if summary["status"] == "finished" else 1
    other = orjson.loads(args.compare.read_bytes())
    same = summary["result_hash"] == other["result_hash"] and summary["status"] == other["status"] == "finished"
    verdict = "the same result as" if same else "a DIFFERENT result from"
    print(f"=> {summary['status']} with {verdict} the uncrashed run ({summary['result_hash']})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
