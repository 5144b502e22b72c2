"""The markdown report of ``overhead.py``: one table per section, then the targets with met / NOT met.

:func:`report` reads only the result dictionary the sections return (the same one ``--json`` writes), so a saved
result can be rendered again. The targets are reported, never enforced.
"""

from __future__ import annotations

from typing import Any

import common
from overhead_common import CLIP_METHODS, SNAPSHOT, TORCH_CLIP

TARGET_CLIP_RATIO = 1.15
TARGET_LOG_SPEEDUP = 10.0
TARGET_E2E_OVERHEAD = 0.03
#: issue 13: the three callbacks at defaults cost at most this much per step, end to end, over Lightning's fixed clip
TARGET_E2E_VS_CLIP = 1.05
#: NaNGuard's default snapshot_every_n_steps
SNAPSHOT_EVERY = 50

Rows = list[list[str]]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _micro(micro: dict[str, Any], lines: list[str], targets: Rows) -> None:
    for model_name, m in micro["models"].items():
        snap_mb = m.get("snapshot_bytes", 0) / 2**20
        lines.append(
            f"\n### micro: {model_name} ({m['tensors']} tensors, {m['params']:,} parameters; "
            f"one memory snapshot holds {snap_mb:.1f} MiB)\n"
        )
        rows = []
        for label, t in m["timings"].items():
            lo, hi = t["ratio_iqr"]
            rows.append([label, common.fmt_time(t["median_s"]), f"{t['ratio']:.2f}x", f"{lo:.2f}-{hi:.2f}"])
        for label, err in m["skipped"].items():
            rows.append([label, "not measured", err[:70], ""])
        lines.append(common.markdown_table(["per step", "median time", f"ratio to {TORCH_CLIP}", "IQR of ratio"], rows))
        snap_t = m["timings"].get(SNAPSHOT)
        if snap_t is not None:
            per_step = snap_t["median_s"] / SNAPSHOT_EVERY
            lines.append(
                f"\nA memory snapshot costs {common.fmt_time(snap_t['median_s'])}; at NaNGuard's default "
                f"snapshot_every_n_steps={SNAPSHOT_EVERY} that is {common.fmt_time(per_step)} per step "
                f"({per_step / m['timings'][TORCH_CLIP]['median_s']:.2f}x the torch clip), on top of the median rows "
                "above, which fall between snapshots. The monitor's logging-step cost is paid once per "
                "log_every_n_steps (Lightning's default 50)."
            )
        for method in CLIP_METHODS:
            name = f"clip {method} <= {TARGET_CLIP_RATIO}x torch clip ({model_name})"
            t = m["timings"].get(f"clip {method}")
            if t is None:
                targets.append([name, "not measured", "n/a"])
            else:
                targets.append([name, f"{t['ratio']:.2f}x", verdict(t["ratio"] <= TARGET_CLIP_RATIO)])
    many = next((m for k, m in micro["models"].items() if "small" in k), None)
    if many is None:
        return
    # Two baselines, both reported: Lightning's grad_norm alone only computes the per-layer norms (no logging);
    # grad_norm + self.log_dict computes and logs them, the like-for-like comparison for a logging step of the monitor.
    comparisons = (
        (
            "monitor, logging step",
            "lightning grad_norm + log_dict",
            "per-layer norm logging (monitor logging step) vs lightning grad_norm + log_dict (compute and log)",
        ),
        (
            "monitor, logging step",
            "lightning grad_norm",
            "per-layer norm logging (monitor logging step) vs lightning grad_norm alone (compute only, logs nothing)",
        ),
        (
            "core stats + layer norms + update ratios",
            "lightning grad_norm",
            "core stats + layer norms + update ratios vs lightning grad_norm alone (both compute only)",
        ),
    )
    for label, base_label, what in comparisons:
        t, gn = many["timings"].get(label), many["timings"].get(base_label)
        name = f"{what}: >= {TARGET_LOG_SPEEDUP:.0f}x faster (many small tensors)"
        if gn is None or t is None:
            targets.append([name, "not measured", "n/a"])
            continue
        speed = gn["median_s"] / t["median_s"]
        targets.append([name, f"{speed:.1f}x", verdict(speed >= TARGET_LOG_SPEEDUP)])


def _e2e(e2e: dict[str, Any], lines: list[str], targets: Rows) -> None:
    lines.append(
        f"\n### end-to-end step time ({e2e['pairs']} interleaved rounds of three fits, "
        f"{e2e['steps_per_fit']} steps each)\n"
    )
    rows = []
    for name, e in e2e["examples"].items():
        if "skipped" in e:
            rows.append([name, "not measured", e["skipped"][:70], "", ""])
            targets.append([f"end-to-end overhead <= {TARGET_E2E_OVERHEAD:.0%} ({name})", "not measured", "n/a"])
            continue
        lo, hi = e["overhead_iqr"]
        clo, chi = e["vs_lightning_clip_iqr"]
        rows.append(
            [
                name,
                common.fmt_time(e["unguarded_step_s"]),
                common.fmt_time(e["lightning_clip_step_s"]),
                common.fmt_time(e["guarded_step_s"]),
                f"{e['overhead'] * 100:+.1f}%",
                f"{lo * 100:+.1f}% to {hi * 100:+.1f}%",
                f"{e['vs_lightning_clip']:.3f}x ({clo:.3f}-{chi:.3f})",
            ]
        )
        targets.append(
            [
                f"end-to-end overhead <= {TARGET_E2E_OVERHEAD:.0%} ({name})",
                f"{e['overhead'] * 100:+.1f}%",
                verdict(e["overhead"] <= TARGET_E2E_OVERHEAD),
            ]
        )
        targets.append(
            [
                f"end-to-end <= {TARGET_E2E_VS_CLIP:.2f}x Lightning's gradient_clip_val=1.0 ({name})",
                f"{e['vs_lightning_clip']:.3f}x",
                verdict(e["vs_lightning_clip"] <= TARGET_E2E_VS_CLIP),
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "example",
                "no callbacks",
                "Lightning gradient_clip_val=1.0",
                "default_callbacks()",
                "overhead vs no callbacks (median of round ratios)",
                "IQR",
                "vs Lightning's clip (IQR)",
            ],
            rows,
        )
    )
    notes = e2e.get("notes", {})
    if notes:
        lines.append("")
        lines += [f"{name}: {text}." for name, text in notes.items()]


def _flat(flat: dict[str, Any], lines: list[str], targets: Rows) -> None:
    lines.append(
        f"\n### flatness: after N statistics updates (median of a timed block of {flat['block']} steps; "
        f"heap growth: traced memory after 2 x {flat.get('heap_block', flat['block'])} further steps minus after "
        "1 x, under tracemalloc, after gc)\n"
    )
    rows = []
    for label, f in flat["callbacks"].items():
        if "skipped" in f:
            rows.append([label, "not measured", f["skipped"][:60], "", "", ""])
            targets.append([f"flat memory and time ({label})", "not measured", "n/a"])
            continue
        r = f["rows"]
        for row in r:
            rows.append(
                [
                    label,
                    f"{row['updates']:,}",
                    common.fmt_time(row["median_step_s"]),
                    f"{row['state_bytes']:,}",
                    f"{row['heap_growth_per_step_bytes']:.1f}",
                    f"{row['rss_bytes'] / 2**20:.0f}",
                ]
            )
        state_flat = r[-1]["state_bytes"] <= max(r[1]["state_bytes"] * 1.05, r[1]["state_bytes"] + 256)
        time_ratio = r[-1]["median_step_s"] / r[1]["median_step_s"]
        heap_flat = r[-1]["heap_growth_per_step_bytes"] < 16
        ok = state_flat and heap_flat and time_ratio <= 1.25
        targets.append(
            [
                f"flat memory and time ({label})",
                f"state {r[1]['state_bytes']:,}->{r[-1]['state_bytes']:,} B; time x{time_ratio:.2f}; "
                f"heap {r[-1]['heap_growth_per_step_bytes']:.0f} B/step",
                verdict(ok),
            ]
        )
    lines.append(
        common.markdown_table(
            ["callback", "after updates", "median step", "state_dict bytes", "heap growth B/step", "RSS MiB"], rows
        )
    )


def _cuda(cuda: dict[str, Any], lines: list[str], targets: Rows) -> None:
    lines.append("\n### CUDA syncs per step\n")
    if "skipped" in cuda:
        lines.append(f"not run: {cuda['skipped']}")
        return
    rows = [
        [k, str(v.get("syncs_per_step_median", v.get("skipped"))), str(v.get("syncs_per_step_max", ""))]
        for k, v in cuda["callbacks"].items()
    ]
    lines.append(common.markdown_table(["callback", "syncs/step (median)", "max"], rows))


#: the report's sections, in the order they are printed (whatever order they were measured in)
SECTIONS = {"micro": _micro, "e2e": _e2e, "flat": _flat, "cuda": _cuda}


def report(res: dict[str, Any]) -> str:
    """The markdown tables of every section present in ``res``, then the targets."""
    lines: list[str] = []
    targets: Rows = []
    for section, render in SECTIONS.items():
        if res.get(section):
            render(res[section], lines, targets)
    if targets:
        lines.append("\n### targets\n")
        lines.append(common.markdown_table(["target", "measured", "verdict"], targets))
    return "\n".join(lines)
