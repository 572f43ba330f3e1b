"""CI gates on the aggregate metrics, and the status that follows from them."""

from __future__ import annotations

OPS = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
    "==": lambda v, t: abs(v - t) <= 1e-12,
}


def check(gates, agg: dict) -> dict:
    """gates: spec.Gate list -> {"results": [{name, op, threshold, value, passed}], "passed"}."""
    results = []
    for g in gates:
        value = agg.get(g.metric)
        results.append(
            {
                "name": g.metric,
                "op": g.op,
                "threshold": g.threshold,
                "value": value,
                "passed": value is not None and OPS[g.op](value, g.threshold),
            }
        )
    return {"results": results, "passed": all(r["passed"] for r in results)}


def status(gate_doc: dict) -> str:
    if not gate_doc["results"]:
        return "built"
    return "passed" if gate_doc["passed"] else "failed"


def describe_failure(r) -> str:
    if r.value is None:
        return f"gate {r.name} {r.op} {r.threshold:g} failed: not measured (no edit of that kind, or no prompts)"
    by = abs(r.value - r.threshold)
    return f"gate {r.name} {r.op} {r.threshold:g} failed: value {r.value:.4g} (off by {by:.4g})"
