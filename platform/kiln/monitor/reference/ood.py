"""Per-row out-of-distribution scoring, calibrated on the validation split.

A row's score is how typical it is, as a tail probability under the reference (0..1, low = unusual):
the lower tail of its output score ('energy' = logsumexp of the logits, or 'msp' = maximum softmax
probability) among validation rows, and, with ``inputs``, the smallest two-sided tail of its input
features (tabular: each feature; images: brightness and contrast) among training rows. A row is OOD
when its score is below the threshold that ``pass_rate`` of the validation rows reach.

Why the inputs too: a small CNN is often more confident on uniform noise than on digits (larger
inputs, larger logits), so energy and MSP alone flag few noise images (measured in the README);
the input check catches those at no model cost.
"""

from __future__ import annotations

import numpy as np

from kiln.monitor.reference.features import plotting_positions, tail_probability


class OodScorer:
    """Scores rows against a reference: output-score quantiles (validation) and input sketches
    (train)."""

    def __init__(self, output_quantiles: list[float], input_samples: list[list[float]] | None):
        self.output = np.asarray(output_quantiles, np.float64)
        self.inputs = [np.asarray(s, np.float64) for s in (input_samples or []) if len(s)]
        self._ranks = {
            len(a): plotting_positions(len(a)) for a in [self.output, *self.inputs]
        }  # not per request

    def score(self, output_score: np.ndarray, input_columns: np.ndarray | None) -> np.ndarray:
        """Per-row typicality (0..1) from each row's output score and its input-feature columns."""
        typical = tail_probability(self.output, output_score, False, self._ranks[len(self.output)])
        if self.inputs and input_columns is not None:
            for j, sample in enumerate(self.inputs):
                column = input_columns[:, j].astype(np.float64)
                tails = tail_probability(sample, column, True, self._ranks[len(sample)])
                typical = np.minimum(typical, np.where(np.isnan(column), 1.0, tails))
        return typical
