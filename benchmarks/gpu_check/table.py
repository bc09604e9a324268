"""The verdict of a run (`checks`) and the short table printed last (`table`), both from the results dict."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.gpu_check import RATIO_GOAL, RATIO_STRETCH


def fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def gib(x: Any) -> str:
    """GiB with two decimals; below 0.1 GiB in MiB (tiny models)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return "-"
    return f"{x * 1024:.1f}M" if 0 < x < 0.1 else f"{x:.2f}"


def size_text(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "n/a"
    return f"{x * 1024:.1f} MiB" if 0 < x < 0.1 else f"{x:.2f} GiB"


def plan_text(plan: dict | None) -> str:
    """micro-batch x accumulation, ` gc` with gradient checkpointing."""
    if not plan:
        return "-"
    return f"{plan['micro_batch']}x{plan['grad_accum']}{' gc' if plan.get('gradient_checkpointing') else ''}"


def real_tok_s(row: dict | None) -> float | None:
    return ((row or {}).get("train") or {}).get("real_tok_s")


def failed_sections(results: dict) -> list[str]:
    """Sections that were asked for and did not run to the end (skipped ones included)."""
    failed = [
        name
        for name, m in results["models"].items()
        if m.get("status") != "ok" or m.get("errors") or not m.get("train")
    ]
    anchor = results.get("anchor")
    if anchor is not None and anchor.get("status") != "ok":
        failed.append("anchor")
    tp = results.get("throughput")
    if tp is not None and (
        tp.get("status") != "ok" or not any(real_tok_s(v) for v in tp.get("variants", []))
    ):
        failed.append("throughput")
    return failed


def checks(results: dict) -> dict[str, Any]:
    """4-bit everywhere, peaks within the limit (GPU only), throughput against the anchor, failed sections."""
    tiny = results["mode"] == "tiny"
    models = results["models"]
    limit = results["settings"]["peak_limit_gib"]
    shares = {m.get("model", name): (m.get("quant") or {}).get("share_4bit") for name, m in models.items()}
    peaks = [m.get("peak_ok") for m in models.values()]
    base = ((results.get("anchor") or {}).get("report_row") or {}).get("real_tok_s")
    rates = {
        v["name"]: real_tok_s(v)
        for v in (results.get("throughput") or {}).get("variants", [])
        if real_tok_s(v)
    }
    best = max(rates.values()) / base if base and rates else None
    return {
        # None: no model section was asked for (e.g. `--only throughput,anchor`)
        "all_4bit": all(s == 1.0 for s in shares.values()) if shares else None,
        "share_4bit": shares,
        "peak_limit_gib": limit,
        "peaks_ok": None if (tiny or not peaks) else all(p is True for p in peaks),
        "anchor_real_tok_s": base,
        "best_ratio": round(best, 3) if best else None,
        "ratios": {k: round(r / base, 3) for k, r in rates.items()} if base else {},
        "meets_goal": None if (tiny or best is None) else best >= RATIO_GOAL,
        "beyond_stretch": None if (tiny or best is None) else best >= RATIO_STRETCH,
        "failed": failed_sections(results),
    }


def verdict_ok(c: dict[str, Any]) -> bool:
    return not c["failed"] and c["all_4bit"] is not False and c["peaks_ok"] is not False


def _model_lines(results: dict) -> list[str]:
    limit = results["settings"]["peak_limit_gib"]
    lines = [
        f"{'model':<10} {'4bit share':>10} {'4bit GiB':>8} {'bf16 GiB':>8} | {'rows':>4} {'plan':>9} "
        f"{'est GiB':>7} {'peak GiB':>8} {'real tok/s':>10} {'pad':>5} status"
    ]
    for name, m in results["models"].items():
        q, tr = m.get("quant") or {}, m.get("train") or {}
        notes = []
        if q and q.get("share_4bit") != 1.0:
            notes.append("NOT ALL 4-BIT")
        if m.get("peak_ok") is False:
            notes.append(f"PEAK > {limit} GiB")
        if m.get("oom_events"):
            notes.append(f"{len(m['oom_events'])} OOM->halved")
        if m.get("status") != "ok" or m.get("errors"):
            err = (m.get("errors") or [{}])[-1].get("error", "")
            notes.append(f"{m.get('status')} {err}".strip()[:90])
        lines.append(
            f"{m.get('model', name):<10} {fmt(q.get('share_4bit'), '.3f'):>10} {gib(q.get('footprint_gib')):>8} "
            f"{gib(q.get('bf16_gib')):>8} | {m.get('batch_size', '-'):>4} {plan_text(m.get('plan')):>9} "
            f"{gib((m.get('initial_plan') or {}).get('estimate_gib')):>7} {gib(m.get('peak_gib')):>8} "
            f"{fmt(tr.get('real_tok_s'), ',.0f'):>10} {fmt(tr.get('padding_share'), '.0%'):>5} "
            f"{'; '.join(notes) or 'ok'}"
        )
    return lines


def _throughput_lines(results: dict) -> list[str]:
    tiny = results["mode"] == "tiny"
    a = results.get("anchor") or {}
    tp = results.get("throughput") or {}
    base = (a.get("report_row") or {}).get("real_tok_s")
    lines = [f"throughput, llama-3b architecture{'' if tiny else ', whole card'}:"]
    lines.append(f"  {'setting':<52} {'real tok/s':>10} {'peak GiB':>8} {'pad':>5} {'x anchor':>8}")
    if a.get("report_row"):
        r = a["report_row"]
        lines.append(
            f"  {'anchor: report setup (bs4, padded, checkpointing)':<52} {fmt(r.get('real_tok_s'), ',.0f'):>10} "
            f"{gib(r.get('peak_gib')) if not tiny else '-':>8} {fmt(r.get('pad_frac'), '.0%'):>5} {'1.00':>8}"
        )
    elif results.get("anchor") is None:
        lines.append("  anchor not run: ratio skipped")
    elif not a.get("found", True):
        lines.append(f"  anchor not found ({a.get('path')}): ratio skipped")
    else:
        lines.append(f"  anchor: {a.get('status', 'not run')}: ratio skipped")
    for v in tp.get("variants", []):
        plan = v.get("plan")
        ts = v.get("training") or {}
        grouped = ts.get("group_by_length", True)
        desc = f"{v['name']}: {v['batch_size']} rows, {'grouped' if grouped else 'padded'}" + (
            f", plan {plan_text(plan)}" if plan else ""
        )
        if v.get("skipped") or v.get("error"):
            lines.append(f"  {desc:<52} {(v.get('skipped') or v.get('error'))[:70]}")
            continue
        rate = real_tok_s(v)
        ratio = rate / base if base and rate else None
        best = " <- best" if tp.get("best") == v["name"] else ""
        oom = f" ({len(v['oom_events'])} OOM->halved)" if v.get("oom_events") else ""
        lines.append(
            f"  {desc:<52} {fmt(rate, ',.0f'):>10} {gib(v.get('peak_gib')):>8} "
            f"{fmt((v.get('train') or {}).get('padding_share'), '.0%'):>5} {fmt(ratio, '.2f'):>8}{best}{oom}"
        )
    if results.get("throughput") is None:
        lines.append("  throughput section not run")
    elif tp.get("status") != "ok" or (tp.get("errors") and not tp.get("variants")):
        err = (tp.get("errors") or [{}])[-1].get("error", "")
        lines.append(f"  throughput section: {tp.get('status')} {err}".rstrip()[:120])
    return lines


def table(results: dict) -> str:
    tiny = results["mode"] == "tiny"
    s, dev, ver = results["settings"], results.get("device") or {}, results["versions"]
    total = f" {fmt(dev.get('total_gib'), '.0f')} GiB" if dev.get("total_gib") else ""
    lines = [
        f"== gpu_check ({results['mode']}) on {dev.get('gpu', 'cpu')}{total}"
        f" | torch {ver.get('torch')} transformers {ver.get('transformers')} peft {ver.get('peft')}"
        f" bnb {ver.get('bitsandbytes')} | {results['wall_s']:.0f} s =="
    ]
    lines += _model_lines(results)
    cap = "no cap on the CPU" if tiny else f"cap {s['cap_gib']} GiB"
    lengths = sorted({m["max_length"] for m in results["models"].values() if m.get("max_length")})
    max_length = f"max_length {'/'.join(map(str, lengths))}, " if lengths else ""
    lines.append(
        f"  (train_stage with the report preset, {cap}, {max_length}{s['steps']} steps, first {s['warmup']} "
        f"untimed; peak = the stage's peak_memory_gib{', CUDA only' if tiny else ''})"
    )
    lines += _throughput_lines(results)
    c = results["checks"]
    verdict = [
        "4-bit everywhere: " + {True: "yes", False: "NO", None: "n/a"}[c["all_4bit"]],
        f"peaks <= {c['peak_limit_gib']} GiB: " + ("yes" if c["peaks_ok"] else "NO")
        if c["peaks_ok"] is not None
        else ("peaks: n/a on CPU" if tiny else "peaks: n/a"),
    ]
    if c.get("best_ratio") is not None:
        if tiny:
            goal = " - CPU tiny, not meaningful"
        elif c["best_ratio"] >= RATIO_STRETCH:
            goal = f" (beyond {RATIO_STRETCH:g}x)"
        elif c["best_ratio"] >= RATIO_GOAL:
            goal = f" (goal {RATIO_GOAL:g}x met)"
        else:
            goal = f" (below the {RATIO_GOAL:g}x goal)"
        verdict.append(f"best/anchor: {c['best_ratio']:.2f}x{goal}")
    else:
        verdict.append("best/anchor: n/a")
    lines.append("verdict: " + "; ".join(verdict) + f"; sections failed: {', '.join(c['failed']) or 'none'}")
    return "\n".join(lines)
