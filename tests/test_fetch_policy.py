"""The fetch policies of the offloaded decoders as strategy objects (``fetch_policy``)."""

import numpy as np
import pytest

from samoyeds_jax.fetch_policy import POLICIES, get_policy
from samoyeds_jax.offload import FETCH_POLICIES, OffloadConfig, resolve_slots

L, E = 4, 8
OWN = np.array([[5, 1], [1, 3]])
NEXT = np.array([[7, 2], [2, 2]])


@pytest.mark.parametrize("name,reads_own,needed,ahead", [
    ("gpu_only", False, list(range(E)), None),
    ("on_demand", True, [1, 3, 5], None),
    ("prefetch_all", False, list(range(E)), (0, list(range(E)))),   # after the last block: 0
    ("pregated", False, [4, 6], (L, [2, 7])),                       # block l >= 1: known ids
    ("speculative", True, [1, 3, 5], (L, [2, 7])),
])
def test_each_policy_decides_what_its_name_says(name, reads_own, needed, ahead):
    p = get_policy(name)
    assert p.reads_own(use_pregate=True) == reads_own
    assert p.needed(OWN, [4, 6], True, E) == needed
    assert p.prefetch(L - 1, L, E, NEXT if p.reads_next() else None) == ahead
    assert p.preload == (name == "gpu_only")


def test_pregated_block_zero_reads_and_fetches_its_own_routing():
    p = get_policy("pregated")
    assert p.reads_own(use_pregate=False) and p.needed(OWN, None, False, E) == [1, 3, 5]
    assert p.prefetch(2, L, E, None) is None  # the last block has no pre-gate


def test_slots_and_names():
    assert FETCH_POLICIES == tuple(POLICIES)
    assert resolve_slots(OffloadConfig(policy="gpu_only", routing_source="router"),
                         num_layers=L, num_experts=E, top_k=2, max_tokens=1) == L * E
    assert resolve_slots(OffloadConfig(policy="prefetch_all", routing_source="router"),
                         num_layers=L, num_experts=E, top_k=2, max_tokens=1) == 2 * E
    assert resolve_slots(OffloadConfig(), num_layers=L, num_experts=E, top_k=2,
                         max_tokens=1) == 4
    with pytest.raises(ValueError, match="needs slots >= 32"):
        resolve_slots(OffloadConfig(policy="gpu_only", routing_source="router", slots=8),
                      num_layers=L, num_experts=E, top_k=2, max_tokens=1)
    with pytest.raises(ValueError, match="policy must be one of"):
        OffloadConfig(policy="lazy")
    with pytest.raises(ValueError, match="policy='speculative' treats the pre-gate as a "
                                         "prediction.*routing_source='router'"):
        OffloadConfig(policy="speculative", routing_source="pregate")
