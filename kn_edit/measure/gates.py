"""CI gates on the aggregate metrics, and the status that follows from them."""

from __future__ import annotations

OPS = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
    "==": lambda v, t: abs(v - t) <= 1e-12,
}


def check(gates, agg: dict, safety=()) -> dict:
    """gates, safety: spec.Gate lists (the spec's, the default checks) -> {"results": [{name, op,
    threshold, value, passed, safety}], "passed"}. A default check on something not measured (no
    probe prompts this tokenizer can read, say) passes; a gate of the spec does not."""
    results = []
    for g, default in [(g, False) for g in gates] + [(g, True) for g in safety]:
        value = agg.get(g.metric)
        results.append(
            {
                "name": g.metric,
                "op": g.op,
                "threshold": g.threshold,
                "value": value,
                "passed": default if value is None else OPS[g.op](value, g.threshold),
                "safety": default,
            }
        )
    return {"results": results, "passed": all(r["passed"] for r in results)}


def status(gate_doc: dict) -> str:
    """failed: a gate or default check failed; passed: the spec's gates passed; built: it has none."""
    if gate_doc["passed"] and not any(not r["safety"] for r in gate_doc["results"]):
        return "built"
    return "passed" if gate_doc["passed"] else "failed"


def describe_failure(r) -> str:
    if r.safety:
        what = {"edits_failed": "edits that did not hold", "text_ppl_change": "plain-text perplexity change",
                "probe_kept": "everyday prompts that kept their answer"}.get(r.name, r.name)  # fmt: skip
        return (f"safety check {r.name} {r.op} {r.threshold:g} failed: {what}: {r.value:.4g} "
                f"(loosen it in the spec's verify.safety)")  # fmt: skip
    if r.value is None:
        return f"gate {r.name} {r.op} {r.threshold:g} failed: not measured (no edit of that kind, or no prompts)"
    by = abs(r.value - r.threshold)
    return f"gate {r.name} {r.op} {r.threshold:g} failed: value {r.value:.4g} (off by {by:.4g})"
