"""Session settings shared by every test."""

import os
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent

# The data sets are found through DSSM_DATA_DIR; CI points it at the shared
# copy beside the checkout, and local runs get the same default. Tests that
# need real data skip when it is absent.
if "DSSM_DATA_DIR" not in os.environ:
    shared_music = REPOSITORY.parent / "shared" / "data" / "music"
    if shared_music.is_dir():
        os.environ["DSSM_DATA_DIR"] = str(shared_music)

# The models in the tests are tiny: with more than one thread torch spends
# far longer synchronising threads than computing.
torch.set_num_threads(1)
