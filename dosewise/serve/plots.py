"""The page's plots as inline SVG: the Q-curve of a vancomycin state and the predicted BIS and MAP
of an anesthesia plan against keeping the current rates.

Drawn with matplotlib's object API (`Figure`, never pyplot), whose figures share no global state,
because the server draws from several worker threads at once. Each SVG scales to its container
(viewBox, width 100%), so the same markup reads on a laptop and a tablet, and carries a title and
a description for screen readers; the page adds the values as a table.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape
from matplotlib.figure import Figure

BIS_TARGET = (40.0, 60.0)  # BIS band of general anesthesia
MAP_FLOOR = 65.0  # mmHg: below it, organ perfusion is at risk

INK = "#1f2933"
GRID = "#d9dee3"
PLAN = "#1d5fa8"  # the recommendation, everywhere on the page
ALTERNATIVE = "#b45309"  # the critic's greedy action, keeping the current rates
TARGET = "#2f855a"
LIMIT = "#c53030"
FONT_SIZE = 11.0

_SVG_OPEN = re.compile(r"<svg\b[^>]*>", re.DOTALL)


def q_curve_svg(answer: Mapping[str, Any], plot_id: str = "q-curve") -> Markup:
    """Q over the action grid, the policy's action (the recommendation, with its ensemble spread)
    and the critic's greedy action marked."""
    actions = [float(point[0]) for point in answer["q_curve"]]
    values = [float(point[1]) for point in answer["q_curve"]]
    policy, greedy = float(answer["policy_action"]), float(answer["greedy_action"])
    spread = float(answer.get("policy_action_sd") or 0.0) if int(answer.get("members", 1)) > 1 else 0.0

    figure = _figure(6.4, 3.9)
    axes = figure.add_subplot()
    _style(axes)
    if spread > 0:
        axes.axvspan(policy - spread, policy + spread, color=PLAN, alpha=0.12, linewidth=0, label="policy ± 1 SD over the ensemble")
    axes.plot(actions, values, color=INK, linewidth=2.0, label="Q of each dose change")
    axes.axvline(policy, color=PLAN, linewidth=2.5, label=f"policy {policy:+.2f}: recommended")
    axes.plot([policy], [float(answer["q_value"])], "o", color=PLAN, markersize=7)
    axes.axvline(greedy, color=ALTERNATIVE, linewidth=2.0, linestyle="--", label=f"greedy {greedy:+.2f}: highest Q")
    axes.plot([greedy], [float(answer["greedy_q_value"])], "D", color=ALTERNATIVE, markersize=6)
    margin = 0.03 * (max(actions) - min(actions))  # an action at the grid's end stays visible
    axes.set_xlim(min(actions) - margin, max(actions) + margin)
    axes.set_xlabel("dose change, normalised: −1 lower · 0 keep · +1 raise")
    axes.set_ylabel("Q (expected return)")
    _legend_below(figure, [axes], columns=2)

    best = max(range(len(values)), key=values.__getitem__)
    description = (
        f"Learned value Q of each dose change from {min(actions):+.2f} to {max(actions):+.2f}. "
        f"The policy's recommended action is {policy:+.2f} with Q {float(answer['q_value']):.3f}; "
        f"Q is highest at {actions[best]:+.2f} (the greedy action, Q {float(answer['greedy_q_value']):.3f})."
    )
    return svg_markup(figure, plot_id, "Q-curve of the patient's state", description)


def anesthesia_svg(answer: Mapping[str, Any], plot_id: str = "bis-map") -> Markup:
    """Predicted BIS (target band shaded) and MAP (65 mmHg line) over the next steps, under the
    plan and under keeping the current rates: two panels over minutes from now."""
    predicted = answer["predicted"]
    minutes = prediction_minutes(predicted["steps"], float(answer["step_s"]))
    plan, keep = predicted["plan"], predicted["keep_current"]

    figure = _figure(6.4, 5.4)
    bis_axes, map_axes = figure.subplots(2, 1, sharex=True)
    for axes in (bis_axes, map_axes):
        _style(axes)
    bis_axes.axhspan(*BIS_TARGET, color=TARGET, alpha=0.14, linewidth=0, label="BIS target 40–60")
    map_axes.axhline(MAP_FLOOR, color=LIMIT, linewidth=1.5, linestyle=":", label=f"MAP {MAP_FLOOR:g} mmHg")
    for axes, key in ((bis_axes, "bis"), (map_axes, "map")):
        axes.plot(minutes, plan[key], "-o", color=PLAN, linewidth=2.5, markersize=5, label="under the recommended rates")
        axes.plot(minutes, keep[key], "--s", color=ALTERNATIVE, linewidth=2.0, markersize=4.5, label="keeping the current rates")
    bis_axes.set_ylabel("BIS")
    bis_axes.set_ylim(*_limits([*plan["bis"], *keep["bis"], *BIS_TARGET], 0.0, 100.0, pad=8.0))
    map_axes.set_ylabel("MAP (mmHg)")
    map_axes.set_ylim(*_limits([*plan["map"], *keep["map"], MAP_FLOOR], 0.0, 250.0, pad=8.0))
    map_axes.set_xlabel("minutes from now")
    if len(minutes) > 1:
        map_axes.set_xlim(0.0, minutes[-1] + (minutes[1] - minutes[0]) * 0.5)
    else:
        map_axes.set_xlim(0.0, minutes[0] * 1.5 if minutes else 1.0)
    _legend_below(figure, [bis_axes, map_axes], columns=2)

    description = (
        f"Predicted over the next {len(minutes)} steps ({minutes[-1]:g} min): under the recommended rates BIS "
        f"{_span(plan['bis'])} and MAP {_span(plan['map'])} mmHg; keeping the current rates BIS {_span(keep['bis'])} "
        f"and MAP {_span(keep['map'])} mmHg. Target BIS 40 to 60, MAP at least 65 mmHg."
        if minutes
        else "No predicted steps."
    )
    return svg_markup(figure, plot_id, "Predicted BIS and MAP", description)


def prediction_minutes(steps: int, step_s: float) -> list[float]:
    """Minutes from now of predicted steps 1..steps (the prediction starts one step after the decision)."""
    return [round((k + 1) * step_s / 60.0, 3) for k in range(int(steps))]


def svg_markup(figure: Figure, plot_id: str, title: str, description: str) -> Markup:
    """The figure as an `<svg>` element to inline: no XML prolog, width 100% with its viewBox, a
    title and a description (escaped: they may quote values)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    start = text.index("<svg")
    opening = _SVG_OPEN.search(text, start)
    assert opening is not None, "matplotlib wrote no <svg> element"
    tag = re.sub(r'\s(width|height)="[^"]*"', "", opening.group(0))
    labelled = (
        f'{tag[:-1]} width="100%" preserveAspectRatio="xMidYMid meet" role="img" class="plot" '
        f'id="{escape(plot_id)}" aria-labelledby="{escape(plot_id)}-title {escape(plot_id)}-desc">'
        f'<title id="{escape(plot_id)}-title">{escape(title)}</title><desc id="{escape(plot_id)}-desc">{escape(description)}</desc>'
    )
    return Markup(labelled + text[opening.end() :])


def _figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    figure.patch.set_facecolor("white")
    return figure


def _legend_below(figure: Figure, axes: Sequence[Any], columns: int) -> None:
    """One legend for every panel, under the plot: over the data it would hide a curve at tablet width."""
    handles: dict[str, Any] = {}
    for panel in axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=columns, fontsize=FONT_SIZE - 1, frameon=False)


def _style(axes: Any) -> None:
    axes.grid(True, color=GRID, linewidth=0.8)
    axes.set_axisbelow(True)
    axes.tick_params(labelsize=FONT_SIZE - 1, colors=INK)
    axes.xaxis.label.set_size(FONT_SIZE)
    axes.yaxis.label.set_size(FONT_SIZE)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _limits(values: Sequence[float], floor: float, ceiling: float, pad: float) -> tuple[float, float]:
    return max(floor, min(values) - pad), min(ceiling, max(values) + pad)


def _span(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f} to {high:.0f}"
