"""kedro-datasets' JSON and CSV datasets that load as empty when their file does not exist yet.

For state a node reads and rewrites across runs: the training-step timings of the planner
(the catalog's `<model>.timings`), or the last run's `case_fingerprints.csv`, which
`validate_cases` reads to skip the cases whose files did not change. The first run finds nothing.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset


class OptionalJSONDataset(JSONDataset):
    """A JSON file; `load()` gives `{}` when the file is missing."""

    def load(self) -> Any:
        return super().load() if self._exists() else {}


class OptionalCSVDataset(CSVDataset):
    """A CSV file; `load()` gives an empty DataFrame when the file is missing."""

    def load(self) -> pd.DataFrame:
        return super().load() if self._exists() else pd.DataFrame()
