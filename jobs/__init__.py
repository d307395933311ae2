"""Entry points of the product, one per job, each a thin `main(argv)`: parse options, call the library, print.

Installed as console scripts (`interformer-encode`, `-preannotate`, `-evaluate`, `-train`, `-backend`); from
a checkout they also run as `python -m jobs.<name>` or `python jobs/<name>.py` (the project installed with
`pip install -e .`, or its folder on PYTHONPATH as `ray job submit --working-dir .` arranges).
"""
