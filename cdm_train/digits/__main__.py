"""`python -m cdm_train.digits --out PATH`: train the digits teacher (same as `cdm-train train-teacher`)."""

from .train import main

main()
