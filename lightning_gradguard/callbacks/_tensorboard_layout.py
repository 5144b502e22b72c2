"""The Custom Scalars layout gradguard writes: one chart per question a person asks while watching a run.

TensorBoard's custom-scalars plugin matches each entry of a chart as a regular expression from the start of the tag
(``re.match``), so every entry is anchored with ``$`` (``gradguard/grad_norm`` alone would also match
``gradguard/grad_norm_clipped``). Tags that no callback writes in a run simply leave their line out of the chart.
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.core.engine._scalars import tag

#: (title, tag names, per optimizer?) for each chart, in the order they are shown. Norms span decades, so the
#: threshold chart reads their ``_log10`` twins (written by :func:`~.log_writer.log_scalars`); the LR has a chart
#: of its own (on the norms' axis it would be a flat line at zero); counters are their own chart too.
CHARTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (
        "grad norm vs clip threshold (log10)",
        ("grad_norm_log10", "grad_norm_max_log10", "clip_threshold_log10", "grad_norm_clipped_log10"),
        True,
    ),
    ("grad norm vs clip threshold", ("grad_norm", "grad_norm_max", "clip_threshold"), True),
    ("learning rate", ("lr",), True),
    ("loss, max since the last log (log10)", ("loss_max_log10",), False),
    ("steps clipped / flagged since the last log", ("clipped_steps", "flagged_steps"), True),
    ("guard totals", ("skipped_steps", "rollbacks", "lr_scale"), False),
    ("layer health (layer counts)", ("vanishing_layers", "exploding_layers", "nonfinite_layers"), True),
)


def custom_scalars_layout(num_optimizers: int = 1) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: category ``gradguard``, then one per extra optimizer.

    Example:
        >>> layout = custom_scalars_layout()
        >>> layout["gradguard"]["learning rate"]
        ['Multiline', ['gradguard/lr$']]
        >>> custom_scalars_layout(2)["gradguard (optimizer 1)"]["learning rate"]
        ['Multiline', ['gradguard/lr_opt1$']]
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for idx in range(max(1, num_optimizers)):
        charts: dict[str, list[Any]] = {}
        for title, names, per_optimizer in CHARTS:
            if per_optimizer or idx == 0:
                charts[title] = ["Multiline", [tag(n, idx if per_optimizer else 0) + "$" for n in names]]
        layout["gradguard" if idx == 0 else f"gradguard (optimizer {idx})"] = charts
    return layout
