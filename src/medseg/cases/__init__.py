"""The dataset as a set of cases: its MSD layout (`msd`), the checks every case passes
(`validation`) and the split into training, validation and test sets and folds (`split`). No
Kedro, MLflow or Dask here.
"""
