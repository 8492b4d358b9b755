"""The GPU check kit's two reports: ``gpu_check_report.json`` (the record; schema in README
"GPU work", ``SCHEMA`` names its version) and ``gpu_check_report.md`` (the same, for people).

Both are rewritten after every step (atomically), so a kit killed half-way leaves the steps
it finished. The Markdown renders any step's numbers generically: scalars as a list, lists
of flat dicts as tables, anything else as JSON; so a new number needs no renderer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "visioncoach.gpu_check/1"
JSON_NAME = "gpu_check_report.json"
MD_NAME = "gpu_check_report.md"
STATUSES = ("passed", "failed", "skipped", "timed_out")
# Top-level keys of the JSON report and of each step record (tests check the report has them).
REPORT_KEYS = ("schema", "created", "command", "mode", "budget_s", "wall_s", "exit_code", "machine",
               "plan", "steps")
STEP_KEYS = ("name", "title", "limit_s", "needs_gpu", "status", "reason", "duration_s", "numbers",
             "dry_run", "log", "log_tail")
MACHINE_KEYS = ("host", "python", "cpu_count", "commit", "torch", "torch_cuda", "cuda_available",
                "triton", "transformers", "deepspeed", "liger_kernel", "dali", "flash_attn", "av",
                "gpu_name", "gpu_count", "gpu_memory_gib", "compute_capability", "driver",
                "cuda_driver_version")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _clean(v):
    """JSON has no NaN/inf: they become null (a number that could not be measured)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_reports(rep: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / JSON_NAME, out_dir / MD_NAME
    _atomic(j, json.dumps(_clean(rep), indent=2, default=str, allow_nan=False) + "\n")
    _atomic(m, render_markdown(rep))
    return j, m


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rows(v) -> bool:
    """A list of dicts: rendered as a table."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], dict) and not _rows(r[k])]
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _numbers(numbers: dict, depth: int = 0) -> list[str]:
    """Scalars as bullets, lists of flat dicts as tables, the rest as JSON."""
    lines: list[str] = []
    for k, v in numbers.items():
        if _rows(v):
            lines += ["", f"{k}:", ""] + _table(v)
            for i, x in enumerate(v):   # nested lists of rows (e.g. a run's steps) follow
                for kk, vv in x.items():
                    if _rows(vv):
                        lines += ["", f"{k}[{i}].{kk}:", ""] + _table(vv)
            lines.append("")
        elif isinstance(v, dict) and depth < 1:
            lines.append(f"- {k}:")
            lines += ["  " + ln for ln in _numbers(v, depth + 1)]
        elif isinstance(v, (dict, list)):
            text = json.dumps(_clean(v), default=str)
            lines.append(f"- {k}: `{text[:1500]}{'...' if len(text) > 1500 else ''}`")
        else:
            lines.append(f"- {k}: {_fmt(v)}")
    return lines


def render_markdown(rep: dict) -> str:
    m = rep["machine"]
    gpu = m.get("gpu_name") or "none"
    lines = [f"# GPU check report ({rep['mode']})", "",
             f"Created {rep['created']}, `{rep['command']}`, {rep['wall_s']:.0f} s of a "
             f"{rep['budget_s']:.0f} s budget, exit code {rep.get('exit_code')}.", "",
             "## Machine", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(m.get(k))} |" for k in MACHINE_KEYS]
    pb = m.get("peak_bandwidth")
    if pb:
        lines.append(f"| peak_bandwidth | {_fmt(pb.get('gbs'))} GB/s ({_fmt(pb.get('source'))}) |")
    lines += ["", f"GPU: {gpu}.", "", "## Steps", "",
              "| step | status | duration s | limit s | reason |", "| --- | --- | --- | --- | --- |"]
    for s in rep["steps"]:
        dry = f" (dry run {s['dry_run']['status']})" if s.get("dry_run") else ""
        lines.append(f"| {s['name']} | {s['status']}{dry} | {_fmt(s['duration_s'])} | "
                     f"{_fmt(s['limit_s'])} | {_fmt(s['reason'])} |")
    planned = {p["name"] for p in rep.get("plan", [])} - {s["name"] for s in rep["steps"]}
    if planned:
        lines += ["", f"Not reached yet: {', '.join(sorted(planned))}."]
    for s in rep["steps"]:
        lines += ["", f"## {s['name']}: {s['title']}", "",
                  f"Status **{s['status']}**" + (f": {s['reason']}" if s["reason"] else "")
                  + f"; {s['duration_s']} s of {s['limit_s']} s"
                  + (f"; log `{s['log']}`." if s.get("log") else ".")]
        if s["numbers"]:
            lines += [""] + _numbers(s["numbers"])
        d = s.get("dry_run")
        if d:
            lines += ["", f"CPU-safe part (dry run, no GPU number): **{d['status']}**"
                      + (f": {d['reason']}" if d.get("reason") else "") + f", {d['duration_s']} s"
                      + (f"; log `{d['log']}`." if d.get("log") else ".")]
            if d["numbers"]:
                lines += [""] + _numbers(d["numbers"])
            if d["status"] != "passed" and d.get("log_tail"):
                lines += ["", "```", d["log_tail"][-1500:], "```"]
        if s["status"] in ("failed", "timed_out") and s.get("log_tail"):
            lines += ["", "```", s["log_tail"][-2500:], "```"]
    return "\n".join(lines) + "\n"
