"""The trained segmenter served: the MLflow pyfunc model (`model`), the policy for the files a
request may read and write (`files`), and the catalog dataset that logs it to a run (`export`).
`model` and `files` import no Kedro, so a served model needs none.
"""
