"""The stage files as typed plans: `geometry.json` loads as a
:class:`medseg.imaging.geometry.PreprocessingPlan`, `plan.json` as a
:class:`medseg.kinds.plans.ModelPlan`; both are written as the same JSON as before.

Example catalog entry::

    case_geometry:
      type: medseg.datasets.plans.PreprocessingPlanDataset
      filepath: <primary folder>/geometry.json
"""

from __future__ import annotations

from typing import Any

from kedro_datasets.json import JSONDataset

from medseg.imaging.geometry import PreprocessingPlan


class PreprocessingPlanDataset(JSONDataset):
    """`geometry.json` (local or on an fsspec store, as kedro-datasets' `JSONDataset`)."""

    def load(self) -> PreprocessingPlan:
        return PreprocessingPlan.from_json(super().load())

    def save(self, data: PreprocessingPlan) -> None:
        super().save(data.to_json())


class ModelPlanDataset(JSONDataset):
    """A model's `plan.json` (local or on an fsspec store)."""

    def load(self) -> Any:
        from medseg.kinds.plans import ModelPlan

        return ModelPlan.from_json(super().load())

    def save(self, data: Any) -> None:
        super().save(data.to_json())
