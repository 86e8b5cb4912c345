import os

# No test may reach a model hub; everything they load is built in code or fetched by `make models`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
