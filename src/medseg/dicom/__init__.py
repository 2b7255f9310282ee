"""DICOM in and out: image series read into volumes in their own geometry (`series`), DICOM SEG
written and read (`seg`), and a training set of studies in MSD layout (`training_set`). No
Kedro, MLflow or Dask here.
"""
