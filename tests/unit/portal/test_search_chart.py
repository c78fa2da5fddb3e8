"""The trials plot of a search job: validation loss by one parameter, as inline SVG."""

from __future__ import annotations

import re

from appliance.portal.render import scatter_chart


def test_trials_are_dots_the_best_ringed_and_pruned_ones_hollow():
    svg = str(scatter_chart([(1e-4, 6.26, "complete"), (1e-2, 6.09, "best"), (3e-4, 6.27, "pruned")],
                            x_label="learning_rate", log_x=True))
    assert 'aria-label="validation loss by learning_rate"' in svg
    assert svg.count("<circle") == 4 and svg.count('fill="none"') == 2  # the pruned dot and the best's ring
    assert "learning_rate 0.01: validation loss 6.09 (best)" in svg
    xs = {t: float(x) for x, t in re.findall(r'<circle cx="([\d.]+)"[^>]*><title>learning_rate ([\d.e-]+)', svg)}
    # spaced by the logarithm: 3e-4 lies about a quarter of the way from 1e-4 to 1e-2
    assert 0.2 < (xs["0.0003"] - xs["0.0001"]) / (xs["0.01"] - xs["0.0001"]) < 0.3


def test_no_trials_yet_and_names_are_escaped():
    assert "No trials yet" in str(scatter_chart([], x_label="lora_r"))
    assert "&lt;b&gt;" in str(scatter_chart([(8, 1.0, "complete")], x_label="<b>"))
