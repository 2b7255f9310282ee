"""`json.JSONDataset` that loads `{}` when its file does not exist yet.

For state a node reads and rewrites across runs, such as the training-step timings of the
planner (`data/05_model_input/timings/<model>.json`): the first run finds nothing.
"""

from __future__ import annotations

from typing import Any

from kedro_datasets.json import JSONDataset


class OptionalJSONDataset(JSONDataset):
    """A JSON file; `load()` gives `{}` when the file is missing."""

    def load(self) -> Any:
        return super().load() if self._exists() else {}
