"""Label Studio ML backend (FastAPI + CPU Ray actors) serving InterFormer masks; `python -m connectors --help`."""
