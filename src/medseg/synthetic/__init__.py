"""Synthetic data: the phantoms' shapes (`shapes`), a dataset of phantoms in MSD layout
(`phantoms`), and DICOM series made from volumes for tests and examples (`dicom_series`). No
Kedro, MLflow or Dask here.
"""
