"""The release gate for shipped artifacts, on the bundled model (see README.md beside this file).

Run: pytest examples/gate --hemorrhage-model=hemorrhage-tiny \
        --hemorrhage-candidate=examples/gate/artifacts/w4a16 [--hemorrhage-candidate=...]
"""

import pytest


# retune for your model: these hold for the bundled model's 4-bit artifacts (kl_mean 0.027 to
# 0.037, top-1 disagreement 0.11 to 0.12) and its Q8_0 GGUF (0.0002, 0.011)
@pytest.mark.hemorrhage(kl_mean=0.05, top1_disagreement=0.15, ppl_increase=0.03)
def test_release_candidate(hemorrhage, hemorrhage_candidate):
    hemorrhage.check(hemorrhage.measure_model(hemorrhage_candidate))
